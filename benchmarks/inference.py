"""Inference benchmark: R50-FPN Mask R-CNN, this project vs torchvision, same weights, per stage.

Run:  .venv/bin/python benchmarks/inference.py [--runs 5] [--rounds 1] [--threads 2] [--batches 1,2]
      [--dtypes float32[,bfloat16]] [--whole_only] [--device cpu|gpu]
      (gpu: torchvision on CUDA, ours on JAX's GPU backend)

Needs the parity extra (torch, torchvision, scikit-image) for the reference side and the weights.
Weights: torchvision's maskrcnn_resnet50_fpn architecture with random weights calibrated to detect
(mrcnn_jax/testing/torchvision_maskrcnn.py), so both sides do the full work of ~100 detections per
image; written once to a temporary .npz and imported by both sides. Inputs: photos resized to
800 x 1216 (torchvision keeps that size with min 800 / max 1333): batch 1 = coffee, batch 2 =
coffee + astronaut.

Each side runs in its own subprocess with `--threads` CPU threads (peak RSS from getrusage of that
process; on a GPU also the device's peak memory). `--rounds N` runs the pair N times, each round
starting with the other side, and reports the median over the rounds and each round's whole
ratio: on a shared 2-core machine either side's speed moves by up to 1.4x between runs. A GPU
stage is timed up to its results being ready (torch.cuda.synchronize / jax.block_until_ready).
Stages, timed separately (median of `--runs` after one warm-up):
  preprocess  normalise + resize + pad (ours: the Predictor's, host copy of the pixels + device
              transform; torchvision: its transform on the images, already on the device)
  backbone    ResNet-50 + FPN
  rpn         RPN head + anchors + proposal filtering
  roi_heads   box head + post-processing + mask head (incl. the RoI pooling)
  paste       boxes to original pixels + masks pasted at the original size
  whole       the end-to-end call a user makes (ours: `Predictor`, one jit, masks pasted where
              its `paste="auto"` puts them: the host on a CPU, the device on a GPU; torchvision:
              model())
Ours also reports compile time (whole model, per batch shape) and the number of XLA compilations
during the timed whole-model runs (must be 0 after the first call). The table prints the ratio
ours / torchvision per stage and the whole call's time per image; everything goes to
benchmarks/results/inference.json.
Compute dtypes (`--dtypes`): float32, and bfloat16 as ours' `model.dtype=bfloat16` against
torchvision under `torch.autocast(dtype=torch.bfloat16)` (convolutions and linear layers in bf16 on
both sides; on a CPU with AMX both run them on its matrix units). With float32 among them, each
(dtype, side) also reports the fraction of its whole call's detections that torchvision's float32
call has too (same label, box IoU >= 0.5): how far bf16, or ours, moves the results.
Two more whole calls of ours run on export.py's default canvas (max_size rounded up to
size_divisibility: 1344 x 1344, more pixels than torchvision's 800 x 1216, so they are compared
with each other, not with torchvision):
  fixed_canvas  `Predictor(..., canvas_hw=(1344, 1344))`
  exported      the same model through `mrcnn_jax.export`: model.jax loaded back by
                `mrcnn_jax.export.load` and called on the images (host paste included)
Masks to COCO RLEs, from the roi_heads stage's detections of the batch (ours only):
  paste_dense   `detections_to_original` (dense [N, H, W] masks) + `encode_masks`: what
                predict.py's per-image json costs
  paste_crops   the host paste as crops (`ops.masks.paste_mask_crops`) + `encode_crops`
  paste_device  the device paste (`ops.masks.paste_masks_packed`, jitted, up to its bits being
                on the host) + `unpack_crops` + `encode_crops`
Prediction over a data set (`--dataset_images N`, 0 skips it; ours only): N generated images of
several sizes written as JPEG to a temporary folder, `batch_prediction.predict_dataset` over it
with `per_device_batch` = the batch on every local device (fixed 1344 x 1344 canvas), compiled by
a first pass over it, then timed end to end (reading, model, paste, RLE, progress file,
results.json):
  dataset_device / dataset_host   img/s with the masks pasted on the device / on the host
`--whole_only` times the whole call alone (and ours' preprocess): one compilation of ours per
batch and dtype, for a short run on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CANVAS_HW = (800, 1216)
STAGES = ("preprocess", "backbone", "rpn", "roi_heads", "paste", "whole")


def _images(batch: int):
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [skimage.data.coffee(), skimage.data.astronaut()]
    return [np.array(Image.fromarray(p).resize(CANVAS_HW[::-1], Image.BILINEAR))
            for p in photos[:batch]]


def _median_time(fn, runs: int, sync=lambda: None) -> tuple[float, object]:
    """Median wall time of `fn()` over `runs` calls after a warm-up; `sync` waits for a device."""
    import statistics

    out = fn()  # warm-up
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- torchvision side ------------------------------------------------------------------------

def run_torchvision(weights: str, batches: list[int], runs: int, threads: int,
                    device: str = "cpu", dtypes: tuple[str, ...] = ("float32",),
                    whole_only: bool = False) -> dict:
    import numpy as np
    import torch
    import torchvision

    from mrcnn_jax.testing import torchvision_maskrcnn as tvm

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = tvm.build_model(torch, torchvision, 800, 1333)
    sd = {k: torch.from_numpy(v) for k, v in np.load(weights).items()}
    model.load_state_dict(sd)
    model.to(dev).eval()
    results = {}
    for dtype in dtypes:
        # bfloat16: torchvision's mixed precision (convolutions and linear layers in bf16).
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            results[dtype] = _torchvision_batches(model, batches, runs, dev, sync, whole_only)
    out = {"results": results, "peak_rss_mb": _peak_rss_mb(), "platform": dev.type,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    if dev.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device_kind"] = torch.cuda.get_device_name()
    return out


def _torchvision_batches(model, batches: list[int], runs: int, dev, sync,
                         whole_only: bool = False) -> dict:
    import torch

    results = {}
    for batch in batches:
        # The images start on the device, as ours do (device_put before the timed stages).
        imgs = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(dev)
                for im in _images(batch)]
        original_sizes = [tuple(im.shape[-2:]) for im in imgs]
        t = {}
        with torch.no_grad():
            if not whole_only:
                t.update(_torchvision_stages(model, imgs, original_sizes, runs, sync))
            t["whole"], final = _median_time(lambda: model(imgs), runs, sync)
        results[str(batch)] = {"seconds": t, **_detections_of(
            [{k: d[k].float().cpu().numpy() for k in ("boxes", "labels", "scores")}
             for d in final])}
    return results


def _torchvision_stages(model, imgs, original_sizes, runs: int, sync) -> dict[str, float]:
    t = {}
    t["preprocess"], (image_list, _) = _median_time(lambda: model.transform(imgs), runs, sync)
    t["backbone"], features = _median_time(lambda: model.backbone(image_list.tensors), runs,
                                           sync)
    t["rpn"], (proposals, _) = _median_time(lambda: model.rpn(image_list, features), runs, sync)
    t["roi_heads"], (dets, _) = _median_time(
        lambda: model.roi_heads(features, proposals, image_list.image_sizes), runs, sync)
    t["paste"], _ = _median_time(lambda: model.transform.postprocess(
        [{k: v.clone() for k, v in d.items()} for d in dets], image_list.image_sizes,
        original_sizes), runs, sync)
    return t


def _detections_of(final: list[dict]) -> dict:
    """The whole call's detections as JSON: per image their count, boxes and labels."""
    return {"detections": [int(len(d["scores"])) for d in final],
            "boxes": [d["boxes"].round(2).tolist() for d in final],
            "labels": [d["labels"].astype(int).tolist() for d in final]}


# --- this project ----------------------------------------------------------------------------

def run_ours(weights: str, batches: list[int], runs: int, threads: int,
             device: str = "cpu", dataset_images: int = 0,
             dtypes: tuple[str, ...] = ("float32",), whole_only: bool = False) -> dict:
    import jax
    import numpy as np

    from mrcnn_jax.checkpoints.torchvision import import_maskrcnn
    from mrcnn_jax.config_base import base_config

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(secs)
        if name == "/jax/core/compile/backend_compile_duration" else None)

    base = base_config()
    variables, overrides = import_maskrcnn(dict(np.load(weights)), base.model)
    base.model.update(overrides)
    variables = jax.device_put(variables)
    results = {}
    for dtype in dtypes:
        config = base.copy_and_resolve_references()
        config.model.dtype = dtype
        # The export, paste and data set rows: once, in the first dtype.
        extras = dtype == dtypes[0] and not whole_only
        results[dtype] = _ours_batches(config, variables, batches, runs, compiles,
                                       dataset_images if extras else None, whole_only)
    out = {"results": results, "peak_rss_mb": _peak_rss_mb(), "platform": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind, "versions": {"jax": jax.__version__}}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def _ours_batches(config, variables, batches: list[int], runs: int, compiles: list,
                  dataset_images: int | None, whole_only: bool = False) -> dict:
    """Ours' stages and whole call per batch in config.model.dtype; `dataset_images` None
    skips the export, paste and data set rows, `whole_only` the stages but preprocess."""
    import jax
    import numpy as np

    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from mrcnn_jax.predictor import Predictor
    from mrcnn_jax.transforms import detections_to_original

    c = config.model
    model = MaskRCNN(c)
    backbone = jax.jit(lambda v, x: model.apply(v, x, method=MaskRCNN.backbone_features))
    rpn = jax.jit(lambda v, f, s: model.apply(v, f, s, CANVAS_HW, method=MaskRCNN.proposals))
    heads = jax.jit(lambda v, f, p, pv, s: model.apply(v, f, p, pv, s,
                                                       method=MaskRCNN.roi_heads))
    block = jax.block_until_ready
    results = {}
    for batch in batches:
        images = _images(batch)
        predictor = Predictor(config, variables, batch_size=batch)
        t = {}

        def preprocess():  # the Predictor's: raw pixels in, the canvas batch on the device
            x, sizes, originals = predictor.preprocess(images)
            return block(x), sizes, originals

        t["preprocess"], (x, sizes, originals) = _median_time(preprocess, runs)
        sizes_j = jax.device_put(sizes)
        t0 = time.perf_counter()
        predictor._infer.lower(variables, x, sizes_j).compile()
        compile_s = time.perf_counter() - t0
        if not whole_only:
            t["backbone"], feats = _median_time(lambda: block(backbone(variables, x)), runs)
            t["rpn"], (props, _, valid) = _median_time(
                lambda: block(rpn(variables, feats, sizes_j)), runs)
            t["roi_heads"], dets = _median_time(
                lambda: block(heads(variables, feats, props, valid, sizes_j)), runs)
            dets = {k: np.asarray(dets[k]) for k in ("boxes", "scores", "labels", "valid",
                                                     "mask_probs")}
            dets["mask_probs"] = dets["mask_probs"].astype(np.float32)  # bf16 in a bf16 model
            t["paste"], _ = _median_time(lambda: [detections_to_original(
                {k: v[i] for k, v in dets.items()}, tuple(sizes[i]), originals[i],
                c.mask_threshold) for i in range(batch)], runs)
        predictor(images)  # compile the Predictor's own jit for this shape
        n_before = len(compiles)
        t["whole"], final = _median_time(lambda: predictor(images), runs)
        n_after = len(compiles)
        if dataset_images is not None:
            t.update(_time_exported(config, variables, images, batch, runs))
            t.update(_time_paste(dets, sizes, originals, c.mask_threshold, runs))
            if dataset_images:
                t.update(_time_dataset(config, variables, batch, dataset_images))
        results[str(batch)] = {
            "seconds": t, "compile_s": compile_s,
            "compilations_during_timed_runs": n_after - n_before,
            "predictor_compilations": predictor.num_compilations, **_detections_of(final)}
    return results


def _time_exported(config, variables, images, batch: int, runs: int) -> dict[str, float]:
    """Whole calls on export.py's default canvas: the fixed-canvas Predictor and the exported
    program loaded back (`mrcnn_jax.export`, lowered for this backend only)."""
    import jax

    from mrcnn_jax import export
    from mrcnn_jax.predictor import Predictor

    backend = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    with tempfile.TemporaryDirectory() as tmp:
        export.export_model(config, variables, tmp, batch_size=batch, platforms=(backend,),
                            saved_model=False)
        loaded = export.load(tmp)
        fixed = Predictor(config, variables, batch_size=batch, canvas_hw=loaded.canvas_hw)
        return {"fixed_canvas": _median_time(lambda: fixed(images), runs)[0],
                "exported": _median_time(lambda: loaded(images), runs)[0]}


def _time_paste(dets, sizes, originals, threshold: float, runs: int) -> dict[str, float]:
    """Seconds from one batch's detections to every image's RLEs, three ways (module
    docstring); the three give the same RLEs (checked)."""
    import jax
    import numpy as np

    from mrcnn_jax.evaluation.coco_evaluator import encode_crops, encode_masks
    from mrcnn_jax.ops import masks
    from mrcnn_jax.transforms import boxes_to_original, detections_to_original

    batch = len(originals)

    def dense():
        return [encode_masks(detections_to_original(
            {k: v[i] for k, v in dets.items()}, tuple(sizes[i]), originals[i],
            threshold)["masks"]) for i in range(batch)]

    def crops():
        out = []
        for i in range(batch):
            keep = dets["valid"][i]
            boxes = boxes_to_original(dets["boxes"][i][keep], tuple(sizes[i]), originals[i])
            out.append(encode_crops(masks.paste_mask_crops(
                dets["mask_probs"][i][keep], boxes, originals[i], threshold), originals[i]))
        return out

    capacity = 2 * 1344 * 1344
    paste = jax.jit(lambda p, b, v, s, o: masks.paste_masks_packed(p, b, v, s, o, capacity,
                                                                     threshold))
    on_device = jax.device_put((dets["mask_probs"], dets["boxes"], dets["valid"], sizes,
                                np.asarray(originals, np.int32)))

    def device():
        out = jax.tree_util.tree_map(np.asarray, paste(*on_device))
        rles = []
        for i in range(batch):
            keep = dets["valid"][i]
            got = masks.unpack_crops(out["mask_bits"][i], out["paste_boxes"][i][keep],
                                     out["mask_offsets"][i][keep], out["mask_pasted"][i][keep],
                                     originals[i])
            if any(c is None for c in got):
                raise RuntimeError("the benchmark's paste capacity is too small")
            rles.append(encode_crops(got, originals[i]))
        return rles

    t = {}
    t["paste_dense"], want = _median_time(dense, runs)
    t["paste_crops"], got_crops = _median_time(crops, runs)
    t["paste_device"], got_device = _median_time(device, runs)
    if not want == got_crops == got_device:
        raise RuntimeError("the three pastes gave different RLEs")
    return t


def _time_dataset(config, variables, batch: int, num_images: int) -> dict[str, float]:
    """img/s of `batch_prediction.predict_dataset` over `num_images` generated JPEGs, masks
    pasted on the device and on the host (module docstring)."""
    import jax
    import numpy as np
    from PIL import Image

    from mrcnn_jax import batch_prediction

    photos = _images(2)
    sizes = [(480, 640), (640, 427), (375, 500), (800, 1216)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "images"
        folder.mkdir()
        for i in range(num_images):
            h, w = sizes[i % len(sizes)]
            image = Image.fromarray(np.asarray(photos[i % len(photos)], np.uint8))
            image.resize((w, h)).save(folder / f"{i:05d}.jpg", quality=90)
        entries = batch_prediction.list_images(folder)
        per_device = max(1, batch // jax.local_device_count())
        for paste in ("device", "host"):
            model = batch_prediction.BatchPredictor(config, variables, per_device, paste=paste)
            # A first pass compiles the model and the transform of every raw-size bucket.
            batch_prediction.predict_dataset(model, entries, pathlib.Path(tmp) / f"warm_{paste}",
                                             progress_every=num_images)
            t0 = time.perf_counter()
            summary = batch_prediction.predict_dataset(
                model, entries, pathlib.Path(tmp) / f"out_{paste}",
                progress_every=num_images)
            out[f"dataset_{paste}"] = summary["images"] / (time.perf_counter() - t0)
    return out


# --- driver ----------------------------------------------------------------------------------

def _make_weights(path: str) -> None:
    from mrcnn_jax.testing.torchvision_maskrcnn import save_calibrated_weights

    save_calibrated_weights(path, _images(2))


def _subprocess(side: str, weights: str, args) -> dict:
    env = dict(os.environ)
    if side == "torchvision" or args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"  # torchvision's side imports no jax work: leave the GPU be
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                        f"intra_op_parallelism_threads={args.threads}").strip()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--side", side, "--weights", weights, "--runs",
               str(args.runs), "--threads", str(args.threads), "--batches", args.batches,
               "--result", f.name, "--device", args.device,
               "--dataset_images", str(args.dataset_images), "--dtypes", args.dtypes]
        cmd += ["--whole_only"] if args.whole_only else []
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return json.loads(pathlib.Path(f.name).read_text())


def _merge_rounds(results: list[dict]) -> dict:
    """One side's rounds as one result: each time the median over the rounds (of each round's
    median), the rounds' own times under "seconds_per_round", the largest peak RSS."""
    import copy
    import statistics

    out = copy.deepcopy(results[0])
    for dtype, by_batch in out["results"].items():
        for batch, merged in by_batch.items():
            per_round = {k: [r["results"][dtype][batch]["seconds"][k] for r in results]
                         for k in merged["seconds"]}
            merged["seconds"] = {k: statistics.median(v) for k, v in per_round.items()}
            merged["seconds_per_round"] = per_round
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    return out


def _agreement(got: dict, want: dict, min_iou: float = 0.5) -> float:
    """The fraction of `got`'s detections (a whole call's, every image) that `want` has too:
    a detection of the same label and image with box IoU >= min_iou."""
    import numpy as np

    from mrcnn_jax.ops.boxes import box_iou

    matched = total = 0
    for boxes, labels, want_boxes, want_labels in zip(got["boxes"], got["labels"],
                                                      want["boxes"], want["labels"]):
        a = np.asarray(boxes, np.float32).reshape(-1, 4)
        b = np.asarray(want_boxes, np.float32).reshape(-1, 4)
        iou = np.nan_to_num(np.asarray(box_iou(a, b)))  # 0/0 of empty boxes: no match
        iou = np.where(np.asarray(labels)[:, None] == np.asarray(want_labels)[None, :], iou, 0)
        matched += int((iou.max(axis=1, initial=0) >= min_iou).sum())
        total += len(a)
    return matched / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="times both sides run, alternating which goes first; the table "
                             "gives the median over the rounds and each round's whole ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--dtypes", default="float32",
                        help="compute dtypes, comma-separated (float32, bfloat16: ours' "
                             "model.dtype, torchvision's torch.autocast); the export, paste and "
                             "data set rows run in the first")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where both sides run (gpu: torchvision on CUDA, ours on JAX's GPU)")
    parser.add_argument("--dataset_images", type=int, default=32,
                        help="images of the data set prediction rows (0: skip them)")
    parser.add_argument("--whole_only", action="store_true",
                        help="time the whole call only: no stages apart, no export, paste or "
                             "data set rows (one compilation per batch and dtype)")
    parser.add_argument("--side", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = tuple(args.dtypes.split(","))
    if unknown := set(dtypes) - {"float32", "bfloat16"}:
        parser.error(f"--dtypes: unknown {sorted(unknown)} (float32, bfloat16)")
    if args.side:
        if args.side == "ours":
            out = run_ours(args.weights, batches, args.runs, args.threads, args.device,
                           args.dataset_images, dtypes, args.whole_only)
        else:
            out = run_torchvision(args.weights, batches, args.runs, args.threads, args.device,
                                  dtypes, args.whole_only)
        pathlib.Path(args.result).write_text(json.dumps(out))
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        _make_weights(weights)
        rounds = {"torchvision": [], "ours": []}
        for r in range(args.rounds):
            # Each round starts with the other side, so a drift in the machine's speed (a
            # shared host's neighbours) lands on both alike.
            for side in ("torchvision", "ours")[::1 if r % 2 == 0 else -1]:
                rounds[side].append(_subprocess(side, weights, args))
    tv, ours = _merge_rounds(rounds["torchvision"]), _merge_rounds(rounds["ours"])

    rows = []
    header = f"{'batch':>5} {'stage':<11} {'torchvision s':>14} {'ours s':>9} {'ours/tv':>8}"
    where = (f"{args.threads} threads" if args.device == "cpu"
             else f"GPU: {ours.get('device_kind')} / {tv.get('device_kind')}")
    print(f"\nR50-FPN Mask R-CNN inference, {CANVAS_HW[0]}x{CANVAS_HW[1]}, {where}, "
          f"median of {args.runs} runs ({platform.processor() or platform.machine()})")
    print(header)
    print("-" * len(header))
    for dtype, b in [(d, str(b)) for d in dtypes for b in batches]:
        tv_r, r = tv["results"][dtype][b], ours["results"][dtype][b]
        key = {"dtype": dtype, "batch": int(b)}
        if len(dtypes) > 1 and b == str(batches[0]):
            print(f"{dtype}:")
        for stage in [s for s in STAGES if s in tv_r["seconds"]]:
            tv_s, our_s = tv_r["seconds"][stage], r["seconds"][stage]
            rows.append({**key, "stage": stage, "torchvision_s": tv_s, "ours_s": our_s,
                         "ratio": our_s / tv_s})
            print(f"{b:>5} {stage:<11} {tv_s:>14.3f} {our_s:>9.3f} {our_s / tv_s:>8.2f}")
        print(f"{b:>5} whole per image: torchvision {1e3 * tv_r['seconds']['whole'] / int(b):.1f}"
              f" ms, ours {1e3 * r['seconds']['whole'] / int(b):.1f} ms")
        per_round = [o / t for o, t in zip(r["seconds_per_round"]["whole"],
                                           tv_r["seconds_per_round"]["whole"])]
        if len(per_round) > 1:
            rows.append({**key, "stage": "whole_per_round", "ratios": per_round})
            print(f"{b:>5} whole, ours/tv in each round: "
                  f"{', '.join(f'{x:.2f}' for x in per_round)}")
        if "float32" in dtypes:
            # How far each side's detections are from torchvision's float32 ones.
            reference = tv["results"]["float32"][b]
            agree = {"ours": _agreement(r, reference), "torchvision": _agreement(tv_r, reference)}
            rows.append({**key, "stage": "agreement_with_torchvision_float32", **agree})
            print(f"{b:>5} detections also in torchvision's float32 ones (same label, IoU >= "
                  f"0.5): ours {agree['ours']:.3f}, torchvision {agree['torchvision']:.3f}")
        if "fixed_canvas" in r["seconds"]:
            fixed_s, exported_s = (r["seconds"][k] for k in ("fixed_canvas", "exported"))
            rows.append({**key, "stage": "exported", "fixed_canvas_s": fixed_s,
                         "exported_s": exported_s, "ratio": exported_s / fixed_s})
            print(f"{b:>5} on the export canvas: Predictor {fixed_s:.3f} s, exported "
                  f"{exported_s:.3f} s, exported/Predictor {exported_s / fixed_s:.2f}")
            paste = {k: r["seconds"][k] for k in ("paste_dense", "paste_crops", "paste_device")}
            rows.append({**key, "stage": "masks_to_rle",
                         **{f"{k}_s": v for k, v in paste.items()}})
            print(f"{b:>5} masks to RLE: dense host paste {paste['paste_dense']:.3f} s, host "
                  f"crops {paste['paste_crops']:.3f} s, device paste "
                  f"{paste['paste_device']:.3f} s")
        if "dataset_device" in r["seconds"]:
            rate = {k: r["seconds"][k] for k in ("dataset_device", "dataset_host")}
            rows.append({**key, "stage": "dataset", "images": args.dataset_images,
                         "device_paste_img_s": rate["dataset_device"],
                         "host_paste_img_s": rate["dataset_host"]})
            print(f"{b:>5} data set of {args.dataset_images} images: "
                  f"{rate['dataset_device']:.2f} img/s (device paste), "
                  f"{rate['dataset_host']:.2f} img/s (host paste)")
        print(f"{b:>5} compile: {r['compile_s']:.1f} s, compilations during timed runs: "
              f"{r['compilations_during_timed_runs']}, detections ours "
              f"{r['detections']} / torchvision {tv_r['detections']}")
    print(f"peak RSS: torchvision {tv['peak_rss_mb']:.0f} MB, ours {ours['peak_rss_mb']:.0f} MB")
    if "device_peak_mb" in tv or "device_peak_mb" in ours:
        print(f"peak device memory: torchvision {tv.get('device_peak_mb', 0):.0f} MB, "
              f"ours {ours.get('device_peak_mb', 0):.0f} MB")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "torchvision": tv, "ours": ours,
                               "threads": args.threads, "runs": args.runs,
                               "rounds": args.rounds,
                               "device": args.device, "dtypes": dtypes,
                               "canvas_hw": CANVAS_HW}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
