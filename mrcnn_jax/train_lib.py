"""Training: TrainState, the optimizer and its schedule, the jitted data-parallel step and the loop.

    state, metrics = train_step(state, batch)                             # one SGD step
    train_and_evaluate(config, workdir)                                   # the whole run

The step is one pure function jitted once with explicit shardings on a `Mesh` with a `data` axis:
the batch is split over the axis, the state is replicated, and the state's buffers are donated.
The loss it minimises is the sum of `modeling.losses.training_losses`.

Optimisation (torchvision/detectron2 recipe): SGD with momentum, L2 weight decay added to the
gradient, linear warmup from `warmup_factor` then step decay by `lr_decay_factor` at
`lr_decay_steps`, the LR scaled linearly with the global batch; the frozen backbone stages (conv1,
layer1 by default) get no update, and FrozenBN constants live outside `params`.
"""

from __future__ import annotations

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
from mrcnn_jax.data.label_map import LABEL_MAP_FILE, NUM_CLASSES_FROM_DATA, LabelMap
from mrcnn_jax.modeling.backbone.resnet import trainable_mask
from mrcnn_jax.modeling.conv import resolve_conv_impl
from mrcnn_jax.modeling.losses import (KEYPOINT_LOSS_NAME, LOSS_NAMES, loss_names,
                                       train_batch_keys, training_losses)
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.norm import FROZEN_COLLECTION
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
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step: (state, batch) -> (state, metrics), metrics = losses, total loss, lr,
    grad_norm (of the gradients before clipping; frozen stages get none, see ResNet) and
    mask_rois / keypoint_rois (RoIs the mask / keypoint head ran on in the whole batch: its slot
    bucket x batch)."""

    def loss_fn(params, batch_stats, batch, rng):
        losses, stats = model.apply({"params": params, FROZEN_COLLECTION: batch_stats}, batch,
                                    rng, method=training_losses, mutable=["intermediates"])
        return sum(losses.values()), (losses, stats.get("intermediates", {}))

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
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

    return train_step


def jit_train_step(train_step: Callable, mesh: Mesh, state: TrainState) -> Callable:
    """jit with the batch split over `data`, the state replicated and donated. Pass it states
    placed by `sharding.replicate`."""
    state_sharding = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), state)
    return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
    """Raise NonFiniteLossError naming the step and every non-finite loss term."""
    bad = [k for k in (*LOSS_NAMES, KEYPOINT_LOSS_NAME, "loss") if k in metrics
           and not math.isfinite(float(metrics[k]))]
    if bad:
        values = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
        raise NonFiniteLossError(f"non-finite loss at step {step}: {values}; stopping (the last "
                                 f"good checkpoint is kept)")


# --- The run ----------------------------------------------------------------------------------

def _validate_config(config: Any) -> None:
    """Fail before any compilation on values that cannot work."""
    t = config.train
    n = jax.device_count()
    if t.global_batch_size % n:
        raise ValueError(f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
                         f"the number of devices ({n})")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got "
                         f"{config.model.dtype!r}")
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
    ran ("xla" or "cpu": their values differ by float rounding, so the record says which)."""
    record = config.copy_and_resolve_references()
    record.model.conv_impl = resolve_conv_impl(config.model.conv_impl)
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
    from mrcnn_jax.evaluation.continuous import write_scalars

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

    step_fn = jit_train_step(make_train_step(model, tx, schedule), mesh, state)

    if train_iterator_fn is None:
        from mrcnn_jax.data import input_pipeline

        train_iterator = input_pipeline.make_train_iterator(config, start)
    else:
        train_iterator = train_iterator_fn(start)
    tb_dir = os.path.join(workdir, "train")
    primary = jax.process_index() == 0  # the one process that logs and writes TensorBoard
    metrics: dict[str, float] = {}
    t_start, images_done, timed_from = time.time(), 0, None
    for step in range(start, t.num_steps):
        batch = sharding.shard_batch(next(train_iterator), mesh, train_batch_keys(config.model))
        t0 = time.time()
        state, out = step_fn(state, batch)
        out = jax.device_get(out)
        check_finite(step, out)
        dt = time.time() - t0
        if timed_from is None:  # the first step includes compilation
            timed_from, images_done, t_start = step + 1, 0, time.time()
            logger.info("step %d (compile + run) took %.1fs", step, dt)
        else:
            images_done += t.global_batch_size
        done = step + 1
        if done % t.log_every_steps == 0 or done == t.num_steps:
            elapsed = time.time() - t_start
            rate = images_done / elapsed if elapsed > 0 and images_done else float("nan")
            eta = (t.num_steps - done) * t.global_batch_size / rate if rate == rate else 0.0
            metrics = {k: float(v) for k, v in out.items()}
            metrics.update(img_per_sec=rate, step_time=dt)
            if primary:
                write_scalars(tb_dir, done, metrics)
                logger.info("step %d/%d loss %.4f (%s) lr %.5f | %.2f img/s, ETA %.0fs", done,
                            t.num_steps, metrics["loss"],
                            " ".join(f"{k[5:]}={metrics[k]:.4f}"
                                     for k in loss_names(config.model)),
                            metrics.get("lr", float("nan")), rate, eta)
        if done % t.checkpoint_every_steps == 0 or done == t.num_steps:
            manager.save(done, state)  # every process calls it; orbax coordinates the writes
        if evaluate and t.eval_every_steps and done % t.eval_every_steps == 0 \
                and done != t.num_steps:
            _evaluate(evaluation, config, state, workdir)
    manager.wait()
    final = {"step": int(state.step), "train": metrics, "eval": {}}
    if evaluate:
        final["eval"] = _evaluate(evaluation, config, state, workdir)
    return final


def _make_evaluation(config: Any, label_map: LabelMap | None = None) -> Any:
    from mrcnn_jax.evaluation.coco_evaluation import CocoEvaluation

    # Data, ground truth and jitted model, built once.
    return CocoEvaluation(config, label_map=label_map)


def _evaluate(evaluation: Any, config: Any, state: TrainState, workdir: str) -> dict[str, float]:
    """COCO evaluation of the current state, recorded like eval.py's (files, TensorBoard, the
    best step in the EvalLog), so `eval.py --watch` never evaluates this step again."""
    from mrcnn_jax.evaluation import continuous

    variables = jax.device_get(state.variables)
    return continuous.evaluate_step(evaluation, variables, workdir, int(state.step),
                                    num_vis=config.eval.num_vis)


__all__ = [
    "NonFiniteLossError", "TrainState", "check_finite", "create_train_state", "init_variables",
    "jit_train_step", "learning_rate", "make_optimizer", "make_train_step", "train_and_evaluate",
]
