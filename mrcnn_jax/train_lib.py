"""Training: TrainState, the optimizer and its schedule, the jitted data-parallel step and the loop.

    state, metrics = train_step(state, batch)                             # one SGD step
    train_and_evaluate(config, workdir)                                   # the whole run

The step is one pure function jitted once with explicit shardings on a `Mesh` with a `data` axis:
the batch is split over the axis, the state is replicated, and the state's buffers are donated.
The loss it minimises is the sum of `modeling.losses.training_losses`; a training pipeline batch
(uint8 pixels) becomes the normalised canvas inside it (`data.device_transform`).

The loop does not wait on the devices: batches are placed on them ahead of their step
(`data.prefetch.DevicePrefetcher`), the metrics stay there until a log line or a checkpoint
fetches those of every step since the last fetch (a non-finite loss stops the run naming the
step it first appeared at, before any checkpoint of a later state is written), and the log and
TensorBoard report end-to-end img/s and the fraction of wall time spent waiting for input.

Optimisation (torchvision/detectron2 recipe): SGD with momentum, L2 weight decay added to the
gradient, linear warmup from `warmup_factor` then step decay by `lr_decay_factor` at
`lr_decay_steps`, the LR scaled linearly with the global batch; the frozen backbone stages (conv1,
layer1 by default) get no update, and FrozenBN constants live outside `params`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mrcnn_jax import paths, sharding
from mrcnn_jax.checkpoints.init_from import init_from, init_from_overrides
from mrcnn_jax.checkpoints.workdir import CONFIG_FILENAME
from mrcnn_jax.data import device_transform
from mrcnn_jax.data.label_map import LABEL_MAP_FILE, NUM_CLASSES_FROM_DATA, LabelMap
from mrcnn_jax.data.prefetch import DevicePrefetcher
from mrcnn_jax.modeling.backbone.resnet import trainable_mask
from mrcnn_jax.modeling.conv import resolve_conv_impl
from mrcnn_jax.modeling.remat import compiler_options as remat_compiler_options
from mrcnn_jax.modeling.losses import (KEYPOINT_LOSS_NAME, LOSS_NAMES, loss_names,
                                       train_batch_keys, training_losses)
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.norm import FROZEN_COLLECTION
from mrcnn_jax.modeling.precision import DTYPES, resolve_dtype_name
from mrcnn_jax.ops import losses as loss_ops

logger = logging.getLogger(__name__)

# glibc's malloc then asks for transparent huge pages for the blocks it maps (glibc >= 2.35, the
# kernel's THP mode "madvise" or "always"). XLA:CPU frees its large per-step buffers and maps them
# again every step, and with 2 MiB pages their first touches fault far less often than with 4 KiB
# ones. glibc reads it at start-up only, so it is set in the environment (the Makefile does).
HUGEPAGE_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def cpu_malloc_hint() -> str | None:
    """What to set before a CPU training run on Linux whose malloc maps small pages; else None."""
    if jax.default_backend() != "cpu" or not sys.platform.startswith("linux"):
        return None
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    return (f"training on the CPU: start Python with GLIBC_TUNABLES={HUGEPAGE_MALLOC_TUNABLE} "
            "(the Makefile sets it): far fewer page faults per step, so a faster step")


def release_freed_host_memory() -> bool:
    """Return the heap pages malloc holds free to the OS (glibc's `malloc_trim`); False where
    the C library has none. Compiling the R50-FPN train step leaves ~0.9 GB freed by XLA's
    compiler in glibc's heap, which glibc keeps mapped: without this the step's buffers add to
    it in the process's peak memory."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # a C library without malloc_trim (musl)
        return False


def compile_train_step(step_fn: Callable, state: TrainState, batch: Mapping[str, jax.Array]
                       ) -> Callable:
    """`step_fn` (from `jit_train_step`) compiled for these shapes, the compiler's freed host
    memory returned (`release_freed_host_memory`) before the first step allocates its own."""
    compiled = step_fn.lower(state, batch).compile()
    release_freed_host_memory()
    return compiled


# Parameters are created on a small image: none of their shapes depends on the canvas.
_INIT_IMAGE_HW = (64, 64)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the message names the step and the term(s)."""


# --- Optimizer --------------------------------------------------------------------------------

def lr_decay_boundaries(train_config: Any) -> tuple[int, ...]:
    """The steps at which the LR drops, from `train.lr_decay_steps`.

    Each entry is either a step (an integer >= 1) or a fraction of `train.num_steps` (a float in
    (0, 1)), so a schedule written as fractions, e.g. (2/3, 8/9) = 60k/80k of COCO's 90k, follows
    `--config.train.num_steps` (a 2x schedule moves its decays with it).
    """
    t = train_config
    boundaries = []
    for entry in t.lr_decay_steps:
        if isinstance(entry, float) and 0.0 < entry < 1.0:
            boundaries.append(int(round(entry * t.num_steps)))
        elif float(entry) >= 1.0 and float(entry) == int(entry):
            boundaries.append(int(entry))
        else:
            raise ValueError(f"train.lr_decay_steps: {entry!r} is neither a step (integer >= 1) "
                             f"nor a fraction of train.num_steps (float in (0, 1)); got "
                             f"{tuple(t.lr_decay_steps)}")
    if boundaries != sorted(set(boundaries)):
        raise ValueError(f"train.lr_decay_steps must be increasing, got {tuple(t.lr_decay_steps)} "
                         f"= steps {tuple(boundaries)} of {t.num_steps}")
    return tuple(boundaries)


def learning_rate(train_config: Any) -> optax.Schedule:
    """LR at step s: base_lr * global/base batch, linear warmup from warmup_factor over
    warmup_steps (torchvision/detectron2 "linear"), times lr_decay_factor per passed decay step
    (`lr_decay_boundaries`)."""
    t = train_config
    peak = t.base_lr * t.global_batch_size / t.base_batch_size
    decay_steps = lr_decay_boundaries(t)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if t.warmup_steps > 0:
            alpha = jnp.minimum(step / t.warmup_steps, 1.0)
            warmup = t.warmup_factor * (1.0 - alpha) + alpha
        else:
            warmup = 1.0
        passed = sum((step >= s).astype(jnp.float32) for s in decay_steps) if decay_steps else 0.0
        return peak * warmup * t.lr_decay_factor ** passed

    return schedule


def _is_norm_or_bias(path: tuple[Any, ...]) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return name in ("bias", "scale")  # flax names of biases and norm scales; kernels are "kernel"


# train.freeze -> the top-level modules that get no update (prefixes of the params' keys).
FROZEN_MODULES = {
    "": (),
    "backbone": ("backbone",),
    "all_but_heads": ("backbone", "rpn"),
}


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + "_") for p in prefixes)


def make_optimizer(config: Any, params: Any) -> optax.GradientTransformation:
    """SGD(momentum) + L2 weight decay (optionally not on norms/biases) + optional global-norm
    clipping, with no update at all for the frozen backbone stages."""
    t, m = config.train, config.model
    tx = []
    if t.grad_clip_norm > 0:
        tx.append(optax.clip_by_global_norm(t.grad_clip_norm))
    decay_mask = None
    if not t.weight_decay_norm_and_bias:
        decay_mask = jax.tree_util.tree_map_with_path(lambda p, _: not _is_norm_or_bias(p),
                                                      params)
    tx.append(optax.add_decayed_weights(t.weight_decay, mask=decay_mask))
    tx.append(optax.sgd(learning_rate(t), momentum=t.momentum))
    trainable = trainable_mask(params, m.trainable_backbone_layers)
    frozen_modules = FROZEN_MODULES[t.get("freeze", "")]
    trainable = {module: jax.tree_util.tree_map(
        lambda x, module=module: bool(x) and not _in(module, frozen_modules), subtree)
        for module, subtree in trainable.items()}
    labels = jax.tree_util.tree_map(lambda x: "train" if x else "frozen", trainable)
    return optax.multi_transform({"train": optax.chain(*tx), "frozen": optax.set_to_zero()},
                                 labels)


# --- State and step ---------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the input position (which is `step`)."""

    step: jax.Array  # [] int32, number of steps done
    params: Any
    batch_stats: Any  # FrozenBN constants (never updated)
    opt_state: Any
    rng: jax.Array  # [2] uint32 base key; step s uses fold_in(rng, s)

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, FROZEN_COLLECTION: self.batch_stats}


def init_variables(model: MaskRCNN, rng: jax.Array) -> dict[str, Any]:
    """Fresh model variables (shapes do not depend on the canvas, so a small image is used)."""
    images = jnp.zeros((1, *_INIT_IMAGE_HW, 3), jnp.float32)
    sizes = jnp.asarray([_INIT_IMAGE_HW], jnp.int32)
    variables = jax.jit(model.init)(rng, images, sizes)
    return {"params": variables["params"], FROZEN_COLLECTION: variables.get(FROZEN_COLLECTION, {})}


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get(FROZEN_COLLECTION, {}),
                      opt_state=tx.init(params), rng=rng)


def make_train_step(model: MaskRCNN, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, data_config: Any = None,
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step: (state, batch) -> (state, metrics), metrics = losses, total loss, lr,
    grad_norm (of the gradients before clipping; frozen stages get none, see ResNet) and
    mask_rois / keypoint_rois (RoIs the mask / keypoint head ran on in the whole batch: its slot
    bucket x batch).

    A batch of the training pipeline (uint8 pixels and resize taps) becomes the normalised
    canvas first, on the device (`data.device_transform`, with `data_config`'s pixel mean and
    std); a batch with a float canvas goes to the model as it is. Packed gt masks
    ("gt_mask_bits") are unpacked on the device too.
    """

    def loss_fn(params, batch_stats, batch, rng):
        losses, stats = model.apply({"params": params, FROZEN_COLLECTION: batch_stats}, batch,
                                    rng, method=training_losses, mutable=["intermediates"])
        return sum(losses.values()), (losses, stats.get("intermediates", {}))

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        if device_transform.has_taps(batch):
            if data_config is None:
                raise ValueError("the batch carries uint8 pixels and resize taps (the training "
                                 "pipeline's form): pass data_config=config.data to "
                                 "make_train_step for the pixel mean and std")
            batch = device_transform.canvas_batch(batch, data_config.pixel_mean,
                                                  data_config.pixel_std)
        batch = device_transform.unpack_masks(batch)
        batch = {k: batch[k] for k in train_batch_keys(model.config)}
        rng = jax.random.fold_in(state.rng, state.step)
        (total, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(losses, loss=total, grad_norm=optax.global_norm(grads))
        for name in ("mask_rois", "keypoint_rois"):
            if name in stats:
                metrics[name] = stats[name][0]
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    # What the model's rematerialisation needs from the compiler (jit_train_step passes it).
    train_step.compiler_options = remat_compiler_options(model.config.remat)
    return train_step


def step_batch_keys(model_config: Any, batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The entries of a host batch the jitted step reads (what goes to the devices)."""
    return device_transform.shipped_keys(train_batch_keys(model_config), batch)


def jit_train_step(train_step: Callable, mesh: Mesh, state: TrainState) -> Callable:
    """jit with the batch split over `data`, the state replicated and donated, and the compiler
    options `make_train_step` asks for (`model.remat` on XLA:CPU). Pass it states placed by
    `sharding.replicate`."""
    state_sharding = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), state)
    return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=getattr(train_step, "compiler_options", None))


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
    """Raise NonFiniteLossError naming the step and every non-finite loss term."""
    bad = [k for k in (*LOSS_NAMES, KEYPOINT_LOSS_NAME, "loss") if k in metrics
           and not math.isfinite(float(metrics[k]))]
    if bad:
        values = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
        raise NonFiniteLossError(f"non-finite loss at step {step}: {values}; stopping (the last "
                                 f"good checkpoint is kept)")


# Steps dispatched to the devices and not yet known to be done: the loop runs ahead of the
# devices by at most this many steps (each holds its batch in device memory).
MAX_STEPS_IN_FLIGHT = 2
# Batches placed on the devices ahead of the step that reads them.
DEVICE_PREFETCH = 2
# An input wait above this fraction of the wall time between logs earns the log a hint.
INPUT_BOUND_FRACTION = 0.2


class PendingMetrics:
    """The metrics of the steps since the last fetch, left on the device (the loop never waits
    for them); `fetch` copies them all in one go and checks each step in order, so a non-finite
    loss is reported at the step it first appeared, whichever step fetches."""

    def __init__(self):
        self._steps: list[tuple[int, Mapping[str, jax.Array]]] = []

    def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self._steps.append((step, metrics))

    def fetch(self) -> dict[str, float] | None:
        """Host values of the last pending step's metrics (None if none is pending); raises
        NonFiniteLossError naming the first pending step with a non-finite loss."""
        if not self._steps:
            return None
        steps, self._steps = self._steps, []
        host = jax.device_get([m for _, m in steps])
        for (step, _), metrics in zip(steps, host):
            check_finite(step, metrics)
        return {k: float(v) for k, v in host[-1].items()}


class Throughput:
    """End-to-end images/s and the share of wall time spent waiting for input, per log interval.

    `start(now, input_wait)` opens an interval; `pause(seconds)` takes time out of it (the
    periodic evaluations; checkpoint saves count as training time); `end(now, input_wait,
    batch_size)` closes it and returns
    {"img_per_sec", "input_wait_fraction", "step_time"} (step_time: wall seconds per step).
    `input_wait` is the prefetcher's running total of seconds `next` blocked. `steps`: the steps
    of the open interval.
    """

    def __init__(self):
        self._t0 = self._wait0 = self._paused = 0.0
        self.steps = 0

    def start(self, now: float, input_wait: float) -> None:
        self._t0, self._wait0, self._paused, self.steps = now, input_wait, 0.0, 0

    def step(self) -> None:
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self._paused += seconds

    def end(self, now: float, input_wait: float, batch_size: int) -> dict[str, float]:
        if not self.steps:  # an interval of the compiling step only
            return {"img_per_sec": math.nan, "input_wait_fraction": math.nan,
                    "step_time": math.nan}
        elapsed = max(now - self._t0 - self._paused, 1e-9)
        wait = min(max(input_wait - self._wait0, 0.0), elapsed)
        return {"img_per_sec": self.steps * batch_size / elapsed,
                "input_wait_fraction": wait / elapsed, "step_time": elapsed / self.steps}


def input_bound_hint(wait_fraction: float, steps: int) -> str | None:
    """The log's hint when the input pipeline is the bottleneck; None below the threshold."""
    if not wait_fraction > INPUT_BOUND_FRACTION:
        return None
    return (f"input-bound: {wait_fraction:.0%} of the last {steps} steps' wall time went to "
            f"waiting for batches, so the input pipeline is the bottleneck: give it more host "
            f"CPU cores (data.num_parallel_calls=-1 uses them all), raise data.prefetch, read "
            f"from faster storage, or check the host's load")


# --- The run ----------------------------------------------------------------------------------

def _validate_config(config: Any) -> None:
    """Fail before any compilation on values that cannot work."""
    t = config.train
    n = jax.device_count()
    if t.global_batch_size % n:
        raise ValueError(f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
                         f"the number of devices ({n})")
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {config.model.dtype!r}")
    if t.num_steps <= 0:
        raise ValueError(f"train.num_steps must be > 0, got {t.num_steps}")
    if config.model.mask_loss not in loss_ops.MASK_LOSS_MODES:
        raise ValueError(f"model.mask_loss must be one of {loss_ops.MASK_LOSS_MODES}, got "
                         f"{config.model.mask_loss!r}")
    if t.init_from and not paths.resolve(t.init_from).exists():
        raise FileNotFoundError(f"train.init_from: no such file {t.init_from!r}")
    if t.get("freeze", "") not in FROZEN_MODULES:
        raise ValueError(f"train.freeze must be one of {sorted(FROZEN_MODULES)}, got "
                         f"{t.freeze!r}")
    if t.get("init_from_classes") and not t.init_from:
        raise ValueError("train.init_from_classes maps classes of train.init_from, which is empty")
    d = config.data
    # A local COCO-format set must exist (the synthetic sets are generated on demand).
    if d.dataset == "coco_format" and "shapes" not in d and "keypoint_shapes" not in d:
        for field in ("train_images", "train_annotations"):
            if not d[field] or not paths.resolve(d[field]).exists():
                raise FileNotFoundError(f"data.{field}: no such path {d[field]!r}")


def from_scratch_hint(config: Any) -> str | None:
    """A warning for a deep ResNet with frozen BatchNorm and no ImageNet weights, else None."""
    m = config.model
    if config.train.init_from or m.norm != "frozen_bn" or m.backbone == "resnet_tiny":
        return None
    return (f"train.init_from is empty: the {m.backbone} backbone starts from random weights "
            "with frozen BatchNorm, which does not normalise, so activations grow through the "
            "stages and the first losses are in the hundreds. Start from ImageNet weights "
            "(--config.train.init_from=resnet50-0676ba61.pth, README) or train from scratch with "
            "GroupNorm (configs/fpn_r50_gn.py)")


def resolve_label_map(config: Any, workdir: str) -> LabelMap:
    """The run's label map from the data (prepared here if needed) and `model.num_classes`,
    which it sets when 0 (from the data). A resumed run must find the map it started with.

    Raises ValueError naming both numbers when `model.num_classes` contradicts the data, or
    both maps when the workdir's label_map.json differs.
    """
    from mrcnn_jax.data import coco_instances

    builder = coco_instances.get_builder(config.data)
    label_map, notes = coco_instances.label_map_for_info(builder.info, config.model.num_classes)
    for note in notes:  # where num_classes came from is news; dropped or renamed classes warn
        (logger.info if note.startswith("model.num_classes") else logger.warning)(
            "label map: %s", note)
    logger.info("label map (%d classes + background):\n%s", len(label_map.labels),
                label_map.describe())
    saved_path = os.path.join(workdir, LABEL_MAP_FILE)
    if paths.resolve(saved_path).is_file():
        saved = LabelMap.load(saved_path)
        if saved != label_map:
            raise ValueError(
                f"{saved_path}: this workdir was trained with another label map than the data "
                f"gives now:\n{saved.describe()}\nnow:\n{label_map.describe()}\nuse a new "
                f"workdir, or the data and model.num_classes of that run")
    config.model.num_classes = label_map.num_classes
    return label_map


def save_config(config: Any, workdir: str) -> None:
    """The run's config as `workdir/config.json`, `model.conv_impl` resolved to the layers that
    ran ("xla" or "cpu": their values differ by float rounding, so the record says which) and
    `model.dtype` to the compute dtype ("auto": bfloat16 on a TPU, float32 elsewhere)."""
    record = config.copy_and_resolve_references()
    record.model.conv_impl = resolve_conv_impl(config.model.conv_impl)
    record.model.dtype = resolve_dtype_name(config.model.dtype)  # "auto" -> what ran
    logger.info("model.conv_impl=%s: %s layers", config.model.conv_impl, record.model.conv_impl)
    paths.write_json_atomic(os.path.join(workdir, CONFIG_FILENAME),
                            json.loads(record.to_json_best_effort()))


def train_and_evaluate(
    config: Any,
    workdir: str,
    train_iterator_fn: Callable[[int], Iterator[Mapping[str, np.ndarray]]] | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming from its checkpoints), then evaluate on
    `data.eval_split` when `evaluate`. Returns {"step", "train" (last logged metrics), "eval"}.

    `train_iterator_fn(start_step)` replaces the input pipeline (tests): the batches of steps
    start_step, start_step + 1, ...
    """
    from mrcnn_jax.checkpoints import orbax_train

    _validate_config(config)
    if hint := cpu_malloc_hint():
        logger.info(hint)
    if hint := from_scratch_hint(config):
        logger.warning(hint)
    t = config.train
    workdir = os.fspath(paths.makedirs(workdir))  # absolute; a bucket URL stays a URL
    # The data, its label map and the evaluation's ground truth are checked before anything is
    # compiled: what would stop the final evaluation stops the run now.
    evaluation = None
    if train_iterator_fn is None or evaluate:
        label_map = resolve_label_map(config, workdir)
        if evaluate:
            evaluation = _make_evaluation(config, label_map)
        if jax.process_index() == 0:
            label_map.save(workdir)
    else:
        label_map = None
        if config.model.num_classes == NUM_CLASSES_FROM_DATA:
            raise ValueError("model.num_classes = 0 takes the number of classes from the data; "
                             "without the data (train_iterator_fn) give it")
    if t.init_from and (overrides := init_from_overrides(config)):
        logger.info("train.init_from=%s needs %s", t.init_from, overrides)
        config.model.update(overrides)
    if jax.process_index() == 0:
        save_config(config, workdir)
    model = MaskRCNN(config.model)
    rng = jax.random.PRNGKey(t.seed)
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng)
    if t.init_from:
        variables = init_from(variables, config, label_map)
    tx = make_optimizer(config, variables["params"])
    schedule = learning_rate(t)
    state = create_train_state(variables, tx, state_rng)

    # Replicated over the global mesh before the restore, so that every process reads the
    # checkpoint into arrays of the step's sharding (multi-host: each its own devices' copies).
    mesh = sharding.make_mesh()
    state = sharding.replicate(state, mesh)
    manager = orbax_train.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                            max_to_keep=t.keep_checkpoints)
    state = manager.restore_latest(state)
    start = int(state.step)
    if start:
        logger.info("resumed from step %d", start)

    step_fn = jit_train_step(make_train_step(model, tx, schedule, config.data), mesh, state)

    if train_iterator_fn is None:
        from mrcnn_jax.data import input_pipeline

        train_iterator = input_pipeline.make_train_iterator(config, start)
    else:
        train_iterator = train_iterator_fn(start)

    def place(batch):
        return sharding.shard_batch(batch, mesh, step_batch_keys(config.model, batch))

    batches = DevicePrefetcher(train_iterator, place, size=DEVICE_PREFETCH)
    try:
        state, metrics = _train_loop(config, state, step_fn, batches, manager, workdir,
                                     start, evaluation)
    finally:
        batches.close()
    manager.wait()
    final = {"step": int(state.step), "train": metrics, "eval": {}}
    if evaluate:
        final["eval"] = _evaluate(evaluation, config, state, workdir)
    return final


def _train_loop(config: Any, state: TrainState, step_fn: Callable, batches: Any, manager: Any,
                workdir: str, start: int, evaluation: Any
                ) -> tuple[TrainState, dict[str, float]]:
    """Steps `start`..`train.num_steps` - 1. The loop only dispatches: metrics stay on the
    devices until a log or a checkpoint fetches them (every pending step is checked for
    non-finite losses before any checkpoint is written), and it runs at most
    MAX_STEPS_IN_FLIGHT steps ahead of the devices. `evaluation` (None: none) runs every
    `train.eval_every_steps`. Returns the state and the last logged metrics (with img/s, input
    wait fraction and seconds per step)."""
    from mrcnn_jax.evaluation.continuous import write_scalars

    t = config.train
    tb_dir = os.path.join(workdir, "train")
    primary = jax.process_index() == 0  # the one process that logs and writes TensorBoard
    metrics: dict[str, float] = {}
    pending, throughput = PendingMetrics(), Throughput()
    in_flight: list[jax.Array] = []
    timed = False  # the first step (compilation) is timed alone
    for step in range(start, t.num_steps):
        batch = next(batches)
        t0 = time.perf_counter()
        if not timed:  # one program for every step: the shapes are static
            step_fn = compile_train_step(step_fn, state, batch)
        state, out = step_fn(state, batch)
        pending.add(step, out)
        done = step + 1
        if not timed:  # wait for it: its time is the compilation's
            metrics = pending.fetch()
            logger.info("step %d (compile + run) took %.1fs", step, time.perf_counter() - t0)
            throughput.start(time.perf_counter(), batches.wait_seconds)
            timed = True
        else:
            throughput.step()
            in_flight.append(out["loss"])
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                in_flight.pop(0).block_until_ready()
        if done % t.log_every_steps == 0 or done == t.num_steps:
            last = pending.fetch()
            if last is not None:
                metrics = last
            # Contiguous intervals: the time spent logging counts in the next one.
            now, waited = time.perf_counter(), batches.wait_seconds
            metrics.update(throughput.end(now, waited, t.global_batch_size))
            if primary:
                _log_progress(config, done, metrics, throughput.steps, tb_dir, write_scalars)
            throughput.start(now, waited)
        if done % t.checkpoint_every_steps == 0 or done == t.num_steps:
            pending.fetch()  # no checkpoint holds the state of a non-finite step
            manager.save(done, state)  # every process calls it; orbax coordinates the writes
        if evaluation is not None and t.eval_every_steps and done % t.eval_every_steps == 0 \
                and done != t.num_steps:
            t_eval = time.perf_counter()
            pending.fetch()
            _evaluate(evaluation, config, state, workdir)
            throughput.pause(time.perf_counter() - t_eval)
    return state, metrics


def _log_progress(config: Any, done: int, metrics: Mapping[str, float], steps: int,
                  tb_dir: str, write_scalars: Callable) -> None:
    """The progress line (losses, lr, end-to-end img/s, input wait, ETA), the input-bound hint
    and the TensorBoard scalars of step `done`, `steps` the steps timed since the last line."""
    t = config.train
    rate = metrics["img_per_sec"]
    eta = (t.num_steps - done) * t.global_batch_size / rate if rate > 0 else math.nan
    write_scalars(tb_dir, done, dict(metrics))
    logger.info("step %d/%d loss %.4f (%s) lr %.5f | %.2f img/s, input wait %.0f%%, ETA %.0fs",
                done, t.num_steps, metrics["loss"],
                " ".join(f"{k[5:]}={metrics[k]:.4f}" for k in loss_names(config.model)),
                metrics.get("lr", float("nan")), rate, 100 * metrics["input_wait_fraction"], eta)
    if hint := input_bound_hint(metrics["input_wait_fraction"], steps):
        logger.warning(hint)


def _make_evaluation(config: Any, label_map: LabelMap | None = None) -> Any:
    from mrcnn_jax.evaluation.coco_evaluation import CocoEvaluation

    # Data, ground truth and jitted model, built once.
    return CocoEvaluation(config, label_map=label_map)


def _evaluate(evaluation: Any, config: Any, state: TrainState, workdir: str) -> dict[str, float]:
    """COCO evaluation of the current state, recorded like eval.py's (files, TensorBoard, the
    best step in the EvalLog), so `eval.py --watch` never evaluates this step again."""
    from mrcnn_jax.evaluation import continuous

    # The state's own device arrays, not host copies: the evaluation keeps the variables it
    # was given (placed on the devices once per tree), and a host view of the state would then
    # keep every later step from donating it (on the CPU, or a second copy on an accelerator).
    return continuous.evaluate_step(evaluation, state.variables, workdir, int(state.step),
                                    num_vis=config.eval.num_vis)


__all__ = [
    "NonFiniteLossError", "PendingMetrics", "Throughput", "TrainState", "check_finite",
    "compile_train_step", "create_train_state", "init_variables", "input_bound_hint",
    "jit_train_step", "learning_rate", "make_optimizer", "make_train_step",
    "release_freed_host_memory", "step_batch_keys", "train_and_evaluate",
]
