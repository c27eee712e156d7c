"""Train-step benchmark: R50-FPN Mask R-CNN, this project vs torchvision, same weights, same batch.

Run:  .venv/bin/python benchmarks/train_step.py [--runs 3] [--threads 2] [--dtypes float32,bfloat16]
      [--device-batch 2] [--sides torchvision,ours,shapes] [--conv-impl xla,cpu]
      [--device cpu|gpu] [--malloc default,hugepages,retained] [--warmup 3] [--no-flops]
On a GPU machine: --device gpu --device-batch 2,8 --no-flops (both sides on the GPU: torchvision
on CUDA, bfloat16 = `torch.autocast("cuda")`; ours on JAX's GPU backend; see benchmarks/gpu.sh).

Weights: torchvision's maskrcnn_resnet50_fpn architecture (FrozenBN, conv1 + layer1 frozen) with
random weights whose FrozenBN statistics are calibrated on the images
(mrcnn_jax/testing/torchvision_maskrcnn.py), so activations and losses are those of a working
network; written once to a .npz that both sides import. Batch: the coffee and astronaut photos at
800 x 1216 (a COCO-sized image, kept at that size by torchvision's min 800 / max 1333 resize; both
sides see the same normalised pixels), each with 3 elliptical instances of classes 1, 3, 18 (full
resolution masks for torchvision; crops of them at data.gt_mask_size for this project, as the
input pipeline stores them). A step is the whole update: forward with targets, backward, SGD with
momentum 0.9 and weight decay 1e-4.

Each side (and each dtype / per-device batch of ours) runs in its own subprocess with `--threads`
CPU threads. Reported per row: median step time over `--runs` steps after `--warmup` untimed
ones (the first compiles; glibc's heap and torch's allocator settle over the next),
images/s (global batch / median), compile time (ours: lower + compile of the jitted step;
torchvision: the first step minus the median), peak memory (process peak RSS; on an accelerator
also the device's peak bytes in use), FLOPs per step (torchvision: torch.utils.flop_counter over
one extra, untimed step; ours: XLA's cost analysis of the step compiled with the mask slot
bucket of the median timed step) and achieved GFLOP/s, and the mask RoIs per timed step
(torchvision's mask head runs on the step's sampled positives, ours on the smallest slot bucket
holding them: model.mask_roi_buckets / num_mask_rois per image). `shapes` is the shapes demo
config's model (tiny ResNet, 256 x 256, batch 4 per device) for the img/s of the CPU demo.
`--sides keypoints` (not in the default) times ours Keypoint R-CNN R50-FPN (configs/keypoint_r50.py,
random init, the same batch with 17 keypoints per instance) with the keypoint head on its slot
buckets (KP-R50) and on all num_keypoint_rois slots (KP-R50-all), and prints their ratio.
torchvision runs in each of --dtypes too (bfloat16: `torch.autocast(device, torch.bfloat16)`, its
mixed precision). `--no-flops` skips ours' second compilation for XLA's FLOP count (the count does
not depend on the device; on a GPU that compile costs machine time).
`--malloc`: glibc's malloc settings of every side's process, each compared with torchvision
under the same one. "default" is glibc's own; "hugepages" sets
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so the blocks malloc maps get transparent huge pages (the
Makefile sets it for every job); "retained" (RETAINED_HEAP_MALLOC_TUNABLES below) adds one
arena, no mmap and no trimming, so freed blocks stay in the heap for the next step. Both
frameworks free their large per-step buffers back to the kernel and map them again on the next
step; with 4 KiB pages the first touches of that memory were 1.2-3.0 million page faults per step
on both sides (`page_faults_per_step`), with 2 MiB pages a few thousand (ours) to tens of
thousands (torchvision), and the kernel still zeroes every fresh page (system time); retained,
none after the warm-up.
The table prints ours / torchvision ratios twice: against torchvision's
float32 step ("vs tv", the baseline of the training issue) and against torchvision in the row's
own precision ("same dtype"); everything goes to benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mrcnn_jax.train_lib import HUGEPAGE_MALLOC_TUNABLE  # noqa: E402

# Huge pages, and freed blocks kept in one heap for the next step instead of unmapped: one arena
# (the other arenas' heaps are capped at 64 MiB, so their big blocks would still be mapped), no
# mmap, no trimming. torchvision's step gains the most from it (docs/benchmarks.md).
RETAINED_HEAP_MALLOC_TUNABLES = (HUGEPAGE_MALLOC_TUNABLE + ":glibc.malloc.arena_max=1"
                                 ":glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold="
                                 + str(64 << 30))
MALLOC_TUNABLES = {"default": None, "hugepages": HUGEPAGE_MALLOC_TUNABLE,
                   "retained": RETAINED_HEAP_MALLOC_TUNABLES}

CANVAS_HW = (800, 1216)
NUM_INSTANCES = 3
INSTANCE_CLASSES = (1, 3, 18)
# Per image: (cx, cy, rx, ry) of each ellipse as fractions of the width / height.
ELLIPSES = ((0.3, 0.35, 0.15, 0.2), (0.65, 0.6, 0.2, 0.15), (0.5, 0.8, 0.1, 0.08))
LR, MOMENTUM, WEIGHT_DECAY = 0.02, 0.9, 1e-4


# --- the batch --------------------------------------------------------------------------------

def _images(batch: int, hw=CANVAS_HW):
    """`batch` RGB uint8 photos [H, W, 3] resized to `hw` (repeated when batch > 2)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [skimage.data.coffee(), skimage.data.astronaut()]
    return [np.asarray(Image.fromarray(photos[i % 2]).resize(hw[::-1], Image.BILINEAR))
            for i in range(batch)]


def _instances(index: int, hw=CANVAS_HW):
    """(boxes [N, 4] xyxy, masks [N, H, W] uint8, labels [N]) of image `index` (shifted by it)."""
    import numpy as np

    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    boxes, masks = [], []
    for k, (cx, cy, rx, ry) in enumerate(ELLIPSES[:NUM_INSTANCES]):
        cx = (cx + 0.05 * (index % 3)) * w
        cy, rx, ry = cy * h, rx * w, ry * h
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(m)
    return (np.asarray(boxes, np.float32), np.stack(masks),
            np.asarray(INSTANCE_CLASSES[:NUM_INSTANCES], np.int64))


def _our_batch(batch: int, data_config, hw=CANVAS_HW) -> dict:
    """The input pipeline's batch dict for the same images and instances on an `hw` canvas."""
    import numpy as np
    from PIL import Image

    d = data_config
    m, s = d.max_instances, d.gt_mask_size
    mean, std = np.asarray(d.pixel_mean, np.float32), np.asarray(d.pixel_std, np.float32)
    out = {
        "image": np.stack([(im / np.float32(255) - mean) / std for im in _images(batch, hw)]),
        "image_size": np.tile(np.asarray([hw], np.int32), (batch, 1)),
        "gt_boxes": np.zeros((batch, m, 4), np.float32),
        "gt_classes": np.zeros((batch, m), np.int32),
        "gt_valid": np.zeros((batch, m), bool),
        "gt_masks": np.zeros((batch, m, s, s), np.uint8),
        "gt_mask_boxes": np.zeros((batch, m, 4), np.float32),
    }
    for i in range(batch):
        boxes, masks, labels = _instances(i, hw)
        n = len(boxes)
        out["gt_boxes"][i, :n] = out["gt_mask_boxes"][i, :n] = boxes
        out["gt_classes"][i, :n] = labels
        out["gt_valid"][i, :n] = True
        for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            crop = Image.fromarray(masks[k][y1:y2, x1:x2] * 255)
            out["gt_masks"][i, k] = np.asarray(crop.resize((s, s), Image.BILINEAR)) >= 128
    return out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _minor_faults() -> int:
    """Page faults so far: each first touch of freshly mapped memory costs ~1 us here."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# --- torchvision side ------------------------------------------------------------------------

def run_torchvision(weights: str, device_batch: int, runs: int, threads: int,
                    dtype: str = "float32", device: str = "cpu", warmup: int = 1,
                    reset_state: bool = True, **_) -> dict:
    import contextlib
    import copy

    import numpy as np
    import torch
    import torchvision

    from mrcnn_jax.testing import torchvision_maskrcnn as tvm

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = tvm.build_model(torch, torchvision, 800, 1333)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(weights).items()})
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    images = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(dev)
              for im in _images(device_batch)]
    targets = []
    for i in range(device_batch):
        boxes, masks, labels = _instances(i)
        targets.append({"boxes": torch.from_numpy(boxes).to(dev),
                        "labels": torch.from_numpy(labels).to(dev),
                        "masks": torch.from_numpy(masks).to(dev)})

    mask_rois = []  # torchvision's mask head runs on the sampled positives of each step
    sample = model.roi_heads.select_training_samples

    def counting_sample(proposals, targets):
        out = sample(proposals, targets)
        mask_rois.append(sum(int((labels > 0).sum()) for labels in out[2]))
        return out

    model.roi_heads.select_training_samples = counting_sample

    # bfloat16: torch's mixed precision (autocast runs convolutions and matrix products in
    # bfloat16, through oneDNN on the CPU; parameters, optimizer and loss sums stay float32), the
    # counterpart of our model.dtype=bfloat16.
    precision = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                 else contextlib.nullcontext())
    # CUDA runs asynchronously: a step is timed up to the end of its optimizer update.
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad()
        with precision:
            losses = model(images, targets)
        total = sum(losses.values())
        total.backward()
        opt.step()
        sync()
        return {k: float(v) for k, v in losses.items()}

    cuda = dev.type == "cuda"
    first_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                   torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)

    def reset():
        """The first step's weights, momentum (none) and sampler RNG again (untimed)."""
        if reset_state:
            model.load_state_dict(first_state[0])
            opt.load_state_dict(first_state[1])
            torch.set_rng_state(first_state[2])
            if cuda:  # the samplers' randperm runs on the GPU's generator
                torch.cuda.set_rng_state(first_state[3])
        sync()  # the copies above are asynchronous on CUDA: not part of the timed step

    t0 = time.perf_counter()
    first_losses = step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        reset()
        step()
    times, faults = [], []
    for _ in range(runs):
        reset()
        t0, f0 = time.perf_counter(), _minor_faults()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(_minor_faults() - f0)
    median = statistics.median(times)
    timed_mask_rois = mask_rois[-runs:]
    peak_rss_mb = _peak_rss_mb()  # of the timed steps, before the FLOP-counting one
    # FLOPs of one more step (not timed: the counting mode intercepts every op).
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    reset()
    with counter:
        step()
    out = {"median_s": median, "first_step_s": first, "compile_s": max(first - median, 0.0),
           "global_batch": device_batch, "img_per_s": device_batch / median,
           "step_times_s": times, "peak_rss_mb": peak_rss_mb, "step0_losses": first_losses,
           "page_faults_per_step": statistics.median(faults),
           "mask_rois_per_step": timed_mask_rois,
           "gflop_step": counter.get_total_flops() / 1e9, "gflop_step_mask_rois": mask_rois[-1],
           "platform": dev.type,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    if dev.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device_kind"] = torch.cuda.get_device_name()
    return out


# --- this project ----------------------------------------------------------------------------

def _jitted_step(config, variables, batch_np):
    """(the jitted train step, its replicated state, the sharded batch) as train.py builds them."""
    step_fn, make_state, batch = _step_parts(config, variables, batch_np)
    return step_fn, make_state(), batch


def _step_parts(config, variables, batch_np):
    """(the jitted train step, a function making its first replicated state from `variables`
    afresh, the sharded batch)."""
    import jax

    from mrcnn_jax import sharding, train_lib
    from mrcnn_jax.modeling.losses import train_batch_keys
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    model = MaskRCNN(config.model)
    tx = train_lib.make_optimizer(config, variables["params"])
    mesh = sharding.make_mesh()
    step_fn = train_lib.jit_train_step(train_lib.make_train_step(model, tx), mesh,
                                       jax.eval_shape(lambda v: _initial_state(v, tx), variables))

    def make_state():
        # Fresh device buffers every time (device_put copies host arrays), so the step can
        # donate them: a buffer still viewed by a host array cannot be, and XLA would then
        # allocate the whole new state beside the old one.
        return sharding.replicate(_initial_state(variables, tx), mesh)

    return step_fn, make_state, sharding.shard_batch(batch_np, mesh,
                                                     train_batch_keys(config.model))


def _initial_state(variables, tx):
    import jax

    from mrcnn_jax import train_lib

    return train_lib.create_train_state(variables, tx, jax.random.PRNGKey(0))


def _time_our_step(config, variables, batch_np, runs: int, flops: bool = True,
                   warmup: int = 1, reset_state: bool = True) -> dict:
    """`variables` (host arrays) are the one copy of the first step's weights this side keeps
    for its resets, as torchvision's side keeps one copy of its state dict."""
    import jax

    from mrcnn_jax import train_lib

    variables = jax.device_get(variables)  # host arrays: numpy stays as it is
    step_fn, make_state, batch = _step_parts(config, variables, batch_np)
    state = make_state()
    t0 = time.perf_counter()
    # As train.py compiles it: the compiler's freed memory goes back before the first step.
    compiled = train_lib.compile_train_step(step_fn, state, batch)
    compile_s = time.perf_counter() - t0

    def fresh_state():
        """The first step's state again, built afresh (untimed) after the last step's state was
        let go, with the heap it was freed into handed back: a training loop donates its state
        from step to step and never holds such a freed copy beside the next step."""
        state = jax.block_until_ready(make_state())
        train_lib.release_freed_host_memory()
        return state

    times, faults, head_rois = [], [], {"mask_rois": [], "keypoint_rois": []}
    for i in range(warmup + runs):  # the first warm-up step starts from the compiled-for state
        if i and reset_state:
            del state
            state = fresh_state()
        timed = i >= warmup
        t0, f0 = time.perf_counter(), _minor_faults()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))  # up to the end of the optimizer update
        if not timed:
            if i == 0:
                first_losses = {k: float(v) for k, v in jax.device_get(m).items()}
            continue
        times.append(time.perf_counter() - t0)
        faults.append(_minor_faults() - f0)
        for name, rois in head_rois.items():
            if name in m:
                rois.append(int(m[name]))
    median = statistics.median(times)
    g = int(batch_np["image"].shape[0])
    out = {"median_s": median, "compile_s": compile_s, "global_batch": g, "step_times_s": times,
           "img_per_s": g / median, "devices": jax.device_count(),
           "img_per_s_per_device": g / median / jax.device_count(),
           "peak_rss_mb": _peak_rss_mb(), "step0_losses": first_losses,
           "page_faults_per_step": statistics.median(faults),
           "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind}
    # The slot bucket each timed step ran its mask / keypoint head on, x batch.
    out.update({f"{name}_per_step": rois for name, rois in head_rois.items() if rois})
    gflop = flops and _our_step_gflop(config, variables, batch_np,
                                      {name: statistics.median_low(rois) // g
                                       for name, rois in head_rois.items() if rois})
    if gflop:
        out["gflop_step"] = gflop
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        # The allocator's peak: on a GPU it includes the convolution autotuner's scratch space.
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    mem = compiled.memory_analysis()
    if mem is not None:  # what the step itself holds: state, batch, outputs and temporaries
        out["xla_step_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                              + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    return out


def _our_step_gflop(config, variables, batch_np, slots: dict[str, int]) -> float | None:
    """XLA's FLOP count of the step with the mask / keypoint head on `slots["mask_rois"]` /
    `slots["keypoint_rois"]` per image (the buckets the median timed step took; a switch would
    be counted as its costliest branch)."""
    config = config.copy_and_resolve_references()
    m = config.model
    if "mask_rois" in slots:
        m.num_mask_rois, m.mask_roi_buckets = slots["mask_rois"], ()
    if "keypoint_rois" in slots:
        m.num_keypoint_rois, m.keypoint_roi_buckets = slots["keypoint_rois"], ()
    step_fn, state, batch = _jitted_step(config, variables, batch_np)
    cost = step_fn.lower(state, batch).compile().cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return cost["flops"] / 1e9 if "flops" in cost else None


def run_ours(weights: str, device_batch: int, runs: int, threads: int, dtype: str = "float32",
             flops: bool = True, warmup: int = 1, reset_state: bool = True,
             conv_impl: str = "auto", remat: str = "none", **_) -> dict:
    import jax
    import numpy as np

    from mrcnn_jax.checkpoints.torchvision import import_maskrcnn
    from mrcnn_jax.config_base import base_config

    config = base_config()
    variables, overrides = import_maskrcnn(dict(np.load(weights)), config.model)
    config.model.update(overrides)
    config.model.dtype = dtype
    config.model.conv_impl = conv_impl
    config.model.remat = remat_parts(remat)
    config.data.canvas_size = CANVAS_HW
    g = device_batch * jax.device_count()
    config.train.global_batch_size = g
    config.train.warmup_steps = 0
    out = _time_our_step(config, variables, _our_batch(g, config.data), runs, flops, warmup,
                         reset_state)
    out["versions"] = {"jax": jax.__version__}
    return out


def run_shapes(device_batch: int, runs: int, dtype: str = "float32", flops: bool = True,
               warmup: int = 1, reset_state: bool = True, conv_impl: str = "auto", **_) -> dict:
    """The shapes demo config's model and canvas with random init (img/s of the CPU demo)."""
    import jax
    import numpy as np

    import importlib.util

    from mrcnn_jax import train_lib
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    spec = importlib.util.spec_from_file_location("shapes_config", ROOT / "configs" / "shapes.py")
    shapes_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes_config)
    config = shapes_config.get_config()
    config.model.dtype = dtype
    config.model.conv_impl = conv_impl
    g = device_batch * jax.device_count()
    config.train.global_batch_size = g
    variables = train_lib.init_variables(MaskRCNN(config.model), jax.random.PRNGKey(0))
    batch = _our_batch(g, config.data, tuple(config.data.canvas_size))
    batch["gt_classes"][:, :NUM_INSTANCES] = np.arange(1, NUM_INSTANCES + 1)  # the 3 shapes
    return _time_our_step(config, variables, batch, runs, flops, warmup, reset_state)


def run_keypoints(device_batch: int, runs: int, dtype: str = "float32",
                  keypoint_buckets: str = "", flops: bool = True, warmup: int = 1,
                  reset_state: bool = True, conv_impl: str = "auto", **_) -> dict:
    """Keypoint R-CNN R50-FPN (configs/keypoint_r50.py, random init) on the benchmark batch,
    with `model.keypoint_roi_buckets` = `keypoint_buckets` ("" = the head on all 128 slots)."""
    import importlib.util

    import jax
    import numpy as np

    from mrcnn_jax import train_lib
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    spec = importlib.util.spec_from_file_location("kp_config", ROOT / "configs" / "keypoint_r50.py")
    kp_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kp_config)
    config = kp_config.get_config()
    config.model.dtype = dtype
    config.model.conv_impl = conv_impl
    config.model.keypoint_roi_buckets = tuple(int(b) for b in keypoint_buckets.split("+") if b)
    config.data.canvas_size = CANVAS_HW
    g = device_batch * jax.device_count()
    config.train.global_batch_size = g
    config.train.warmup_steps = 0
    variables = train_lib.init_variables(MaskRCNN(config.model), jax.random.PRNGKey(0))
    batch = _our_batch(g, config.data)
    batch["gt_classes"][batch["gt_valid"]] = 1  # all persons
    # 17 keypoints per instance on the ellipse's horizontal and vertical axes, all visible.
    boxes = batch["gt_boxes"]
    t = np.linspace(0.1, 0.9, 9, dtype=np.float32)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    xs = np.concatenate([x1 + (x2 - x1) * t, np.repeat(cx, 8, -1)], -1)
    ys = np.concatenate([np.repeat(cy, 9, -1), y1 + (y2 - y1) * np.delete(t, 4)], -1)
    visible = np.broadcast_to(2.0 * batch["gt_valid"][..., None], xs.shape)
    batch["gt_keypoints"] = np.stack([xs, ys, visible], -1).astype(np.float32)
    out = _time_our_step(config, variables, batch, runs, flops, warmup, reset_state)
    out["keypoint_roi_buckets"] = list(config.model.keypoint_roi_buckets)
    return out


# --- driver ----------------------------------------------------------------------------------

def _make_weights(path: str) -> None:
    from mrcnn_jax.testing.torchvision_maskrcnn import save_calibrated_weights

    save_calibrated_weights(path, _images(2))


def remat_parts(text: str) -> tuple[str, ...]:
    """`model.remat` from a command-line value: "+"-joined part names, "none" for ()."""
    return () if text == "none" else tuple(text.split("+"))


def _subprocess(side: str, weights: str, args, device_batch: int, dtype: str,
                conv_impl: str = "auto", keypoint_buckets: str = "", *,
                malloc: str, remat: str = "none") -> dict:
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if MALLOC_TUNABLES[malloc]:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES[malloc]
    env["OMP_NUM_THREADS"] = str(args.threads)
    # torchvision's side imports jax but runs none: on the CPU platform it leaves the GPU alone.
    if side == "torchvision" or args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                        f"intra_op_parallelism_threads={args.threads}").strip()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--side", side, "--weights", weights or "", "--runs",
               str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--device-batch", str(device_batch), "--dtypes", dtype, "--result", f.name,
               "--keypoint-buckets", keypoint_buckets, "--device", args.device,
               "--conv-impl", conv_impl, "--remat", remat]
        if not args.flops:
            cmd.append("--no-flops")
        if not args.reset_state:
            cmd.append("--carry-state")
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        if proc.returncode:
            return {"error": f"exit status {proc.returncode}"}
        return json.loads(pathlib.Path(f.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before the timed ones (the first one compiles)")
    parser.add_argument("--carry-state", dest="reset_state", action="store_false",
                        help="each step from the state the last one left (the weights, and with "
                             "them the sampled RoIs, drift apart between the sides) instead of "
                             "the first step's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device-batch", default="2", help="per-device batches, e.g. 2,4,8")
    parser.add_argument("--sides", default="torchvision,ours,shapes")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where both sides run (gpu: torchvision on CUDA, ours on JAX's GPU)")
    parser.add_argument("--malloc", default=None,
                        help="glibc malloc of every side's process, any of: default, hugepages "
                             "(GLIBC_TUNABLES=" + HUGEPAGE_MALLOC_TUNABLE + "), retained "
                             "(GLIBC_TUNABLES=" + RETAINED_HEAP_MALLOC_TUNABLES + "); "
                             "default: all three on the CPU, default on a GPU (host memory is "
                             "not on a GPU step's path)")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip ours' extra compilation for XLA's FLOP count")
    parser.add_argument("--conv-impl", default="auto",
                        help="model.conv_impl values of ours to compare side by side, e.g. "
                             "xla,cpu (modeling/conv.py; auto = cpu on the CPU, xla elsewhere)")
    parser.add_argument("--remat", default="none",
                        help='model.remat values of ours (R50-FPN) side by side, "+"-joined parts, '
                             'e.g. none,backbone+fpn+rpn_head (modeling/remat.py)')
    parser.add_argument("--side", choices=("ours", "torchvision", "shapes", "keypoints"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--keypoint-buckets", default="", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args()
    device_batches = [int(b) for b in args.device_batch.split(",")]
    dtypes = args.dtypes.split(",")
    conv_impls = args.conv_impl.split(",")
    if args.malloc is None:
        args.malloc = "default" if args.device == "gpu" else "default,hugepages,retained"
    mallocs = args.malloc.split(",")
    if args.warmup < 1:
        parser.error(f"--warmup: expected at least 1 (the compiling step), got {args.warmup}")
    if set(mallocs) - set(MALLOC_TUNABLES):
        parser.error(f"--malloc: expected some of {', '.join(MALLOC_TUNABLES)}, "
                     f"got {args.malloc!r}")
    if args.side:
        fn = {"ours": run_ours, "torchvision": run_torchvision, "shapes": run_shapes,
              "keypoints": run_keypoints}[args.side]
        out = fn(weights=args.weights, device_batch=device_batches[0], runs=args.runs,
                 warmup=args.warmup, reset_state=args.reset_state, threads=args.threads,
                 dtype=dtypes[0], keypoint_buckets=args.keypoint_buckets, device=args.device,
                 flops=args.flops, conv_impl=conv_impls[0], remat=args.remat)
        pathlib.Path(args.result).write_text(json.dumps(out))
        return

    sides = args.sides.split(",")
    load = os.getloadavg()
    results = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(**row):
        results.append(row)
        print(json.dumps(row), flush=True)
        # Written after every row, so a run stopped half-way keeps what it measured.
        out.write_text(json.dumps({"rows": results, "threads": args.threads, "runs": args.runs,
                                   "warmup": args.warmup, "reset_state": args.reset_state,
                                   "canvas_hw": CANVAS_HW, "load_average": load}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            for impl in conv_impls:
                for malloc in (mallocs if "shapes" in sides else ()):
                    record(side="ours", model="shapes", dtype=dtype, device_batch=4,
                           conv_impl=impl, malloc=malloc,
                           **_subprocess("shapes", "", args, 4, dtype, impl, malloc=malloc))
        weights = os.path.join(tmp, "weights.npz")
        if {"ours", "torchvision"} & set(sides):
            _make_weights(weights)
        for b, malloc in itertools.product(device_batches, mallocs):
            for dtype in dtypes:
                if "torchvision" in sides:
                    record(side="torchvision", model="R50-FPN", dtype=dtype, device_batch=b,
                           malloc=malloc,
                           **_subprocess("torchvision", weights, args, b, dtype, malloc=malloc))
            for dtype in dtypes:
                for impl, remat in itertools.product(conv_impls, args.remat.split(",")):
                    if "ours" in sides:
                        record(side="ours", model="R50-FPN", dtype=dtype, device_batch=b,
                               conv_impl=impl, malloc=malloc, remat=remat,
                               **_subprocess("ours", weights, args, b, dtype, impl,
                                             malloc=malloc, remat=remat))
            for dtype in dtypes:
                # The keypoint head on its slot buckets vs on all 128 slots, side by side.
                for buckets in (("32+64", "") if "keypoints" in sides else ()):
                    record(side="ours", model="KP-R50" + ("" if buckets else "-all"),
                           dtype=dtype, device_batch=b, malloc=malloc, conv_impl=conv_impls[0],
                           **_subprocess("keypoints", "", args, b, dtype, conv_impls[0],
                                         keypoint_buckets=buckets, malloc=malloc))

    tv = {(r["device_batch"], r["dtype"], r.get("malloc")): r for r in results
          if r["side"] == "torchvision" and "error" not in r}
    kinds = sorted({r["device_kind"] for r in results if "device_kind" in r})
    where = (f"{args.threads} CPU threads" if args.device == "cpu"
             else "GPU: " + ", ".join(kinds))
    print(f"\nMask R-CNN train step, R50-FPN at {CANVAS_HW[0]}x{CANVAS_HW[1]} (shapes: its "
          f"256x256 config), {where}, median of {args.runs} steps after {args.warmup} warm-up "
          f"({platform.processor() or platform.machine()}, load average at start "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f})")
    header = (f"{'side':<12} {'model':<10} {'dtype':<9} {'impl':<5} {'malloc':<9} {'batch':>5} "
              f"{'step s':>8} "
              f"{'img/s':>7} {'GFLOP':>7} {'GFLOP/s':>7} {'head RoIs':>11} "
              f"{'compile s':>9} {'peak MB':>8} {'XLA MB':>7} {'vs tv':>6} "
              f"{'vs tv same dtype':>16}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['side']:<12} {r['model']:<10} {r['dtype']:<9} "
                  f"{r.get('conv_impl', '-'):<5} {r.get('malloc', '-'):<9} "
                  f"{r['device_batch']:>5} {r['error']}")
            continue
        peak = r.get("device_peak_mb", r["peak_rss_mb"])
        # "vs tv": against torchvision's float32 step (the baseline); "same dtype":
        # against torchvision in the row's precision (bfloat16: autocast).
        ratios = []
        for ref_dtype in ("float32", r["dtype"]):
            ref = (tv.get((r["device_batch"], ref_dtype, r.get("malloc")))
                   if r["model"] == "R50-FPN" else None)
            ratios.append(None if ref is None else r["median_s"] / ref["median_s"])
        r["ratio_vs_torchvision"], r["ratio_vs_torchvision_same_dtype"] = ratios
        ratio, ratio_same = ("-" if x is None else f"{x:.2f}" for x in ratios)
        xla_mb = f"{r['xla_step_mb']:.0f}" if "xla_step_mb" in r else "-"
        gflop = r.get("gflop_step")
        gflop_txt = "-" if gflop is None else f"{gflop:.0f}"
        rate_txt = "-" if gflop is None else f"{gflop / r['median_s']:.0f}"
        rois = r.get("mask_rois_per_step") or r.get("keypoint_rois_per_step") or []
        rois = (f"{min(rois)}-{max(rois)}" if rois and min(rois) != max(rois)
                else str(rois[0]) if rois else "-")
        model = r["model"] + ("" if r.get("remat", "none") == "none" else f" remat={r['remat']}")
        print(f"{r['side']:<12} {model:<10} {r['dtype']:<9} "
              f"{r.get('conv_impl', '-'):<5} {r.get('malloc', '-'):<9} "
              f"{r['global_batch']:>5} "
              f"{r['median_s']:>8.3f} {r['img_per_s']:>7.2f} {gflop_txt:>7} {rate_txt:>7} "
              f"{rois:>11} {r['compile_s']:>9.1f} {peak:>8.0f} {xla_mb:>7} {ratio:>6} "
              f"{ratio_same:>16}")
    kp = {(r["device_batch"], r["dtype"], r["model"]): r for r in results
          if r["model"].startswith("KP-") and "error" not in r}
    for (b, dtype, model), r in kp.items():
        full = kp.get((b, dtype, "KP-R50-all"))
        if model == "KP-R50" and full:
            r["ratio_vs_all_keypoint_slots"] = r["median_s"] / full["median_s"]
            print(f"keypoint R-CNN, {dtype}, batch {b}: keypoint_roi_buckets "
                  f"{tuple(r['keypoint_roi_buckets'])} {r['median_s']:.2f} s vs all "
                  f"{full['keypoint_rois_per_step'][0] // full['global_batch']} slots "
                  f"{full['median_s']:.2f} s = {r['ratio_vs_all_keypoint_slots']:.2f}x")
    out.write_text(json.dumps({"rows": results, "threads": args.threads, "runs": args.runs,
                               "warmup": args.warmup, "reset_state": args.reset_state,
                               "canvas_hw": CANVAS_HW, "load_average": load}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
