"""The training losses of Mask R-CNN (and Keypoint R-CNN): targets, sampling and the heads' losses.

    losses = model.apply(variables, batch, rng, method=training_losses)   # {name: scalar}

Targets are torchvision's (ops/targets.py, ops/mask_targets.py): RPN anchors matched at 0.7/0.3
and 256 sampled at 50 %, proposals (no gradient) with the gt appended, 512 RoIs sampled at
<= 25 % foreground. The mask and keypoint heads run on the first S slots of the sampled RoIs,
where the sampler puts the foreground: S is the smallest of the config's slot buckets
(`mask_roi_buckets` / `keypoint_roi_buckets`, capped by `num_mask_rois` / `num_keypoint_rois`)
that holds every foreground RoI of the batch. Losses are named and normalised as torchvision's
(ops/losses.py, ops/keypoints.py); `mask_head=False` drops `loss_mask`, `keypoint_head` adds
`loss_keypoint`.

Glossary of shapes:
    B: images, M: gt slots per image (`data.max_instances`), A: anchors of all levels per image,
    R: sampled RoIs per image (`box_batch_size_per_image`), S: the foreground slots a mask or
    keypoint head runs on, K: keypoints per instance
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.ops import keypoints as keypoint_ops
from mrcnn_jax.ops import losses as loss_ops
from mrcnn_jax.ops import targets as target_ops
from mrcnn_jax.ops.mask_targets import mask_targets, select_mask_rois
from mrcnn_jax.ops.roi_align import FlatFeatures
from mrcnn_jax.ops.sampling import sample_balanced

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")
KEYPOINT_LOSS_NAME = "loss_keypoint"  # Keypoint R-CNN (model.keypoint_head)
# The batch entries the losses read (others, e.g. keypoints, are dropped before the step).
TRAIN_BATCH_KEYS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_valid", "gt_masks",
                    "gt_mask_boxes")
KEYPOINT_BATCH_KEYS = ("gt_keypoints",)


def loss_names(model_config: Any) -> tuple[str, ...]:
    """The loss terms of a model: LOSS_NAMES without loss_mask when `mask_head` is off, plus
    loss_keypoint when `keypoint_head` is on."""
    names = tuple(k for k in LOSS_NAMES if k != "loss_mask" or model_config.mask_head)
    return names + ((KEYPOINT_LOSS_NAME,) if model_config.keypoint_head else ())


def train_batch_keys(model_config: Any) -> tuple[str, ...]:
    """The batch entries a train step of this model reads."""
    return TRAIN_BATCH_KEYS + (KEYPOINT_BATCH_KEYS if model_config.keypoint_head else ())


def training_losses(module: MaskRCNN, batch: Mapping[str, jax.Array],
                    rng: jax.Array) -> dict[str, jax.Array]:
    """The five Mask R-CNN losses of a batch; use as `model.apply(v, batch, rng, method=...)`.

    Args:
        module: the bound MaskRCNN (flax passes it).
        batch: `train_batch_keys(config)` of the input pipeline's batch dict, [B, ...].
        rng: PRNG key for the RPN and RoI samplers.

    Returns:
        {name: scalar} for `loss_names(config)`.
    """
    c = module.config
    images = batch["image"]
    canvas_hw = images.shape[1:3]
    gt_boxes, gt_valid = batch["gt_boxes"], batch["gt_valid"]
    rpn_rng, roi_rng = jax.random.split(rng)

    features = module.backbone_features(images)
    objectness, deltas = module.rpn_head(features)
    anchors = module.anchors(features, canvas_hw)
    rpn_t = target_ops.rpn_anchor_targets(
        jnp.asarray(anchors), gt_boxes, gt_valid, c.rpn_fg_iou_thresh, c.rpn_bg_iou_thresh,
        tuple(c.rpn_box_weights))
    rpn_slots = sample_balanced(rpn_t.labels, rpn_rng, c.rpn_batch_size_per_image,
                                c.rpn_positive_fraction)
    out = loss_ops.rpn_losses(objectness, deltas, rpn_t.regression_targets, rpn_slots,
                              c.smooth_l1_beta)

    # Proposals come from the detached RPN outputs, as in torchvision.
    rpn_outputs = (jax.lax.stop_gradient(objectness), jax.lax.stop_gradient(deltas))
    proposals, _, proposal_valid = module.proposals(
        features, batch["image_size"], canvas_hw, training=True, rpn_outputs=rpn_outputs)
    roi_t = target_ops.roi_targets(
        proposals, proposal_valid, gt_boxes, batch["gt_classes"], gt_valid, roi_rng,
        c.box_fg_iou_thresh, c.box_bg_iou_thresh, c.box_batch_size_per_image,
        c.box_positive_fraction, tuple(c.box_weights))
    # One float32 buffer of P2..P5 for every head's pooling: built inside the mask / keypoint
    # heads' conditional it would be a second, slower copy.
    pooling = module.pooling_features(features)
    class_logits, box_regression = module.box_head(pooling, roi_t.rois)
    out.update(loss_ops.fastrcnn_losses(class_logits, box_regression, roi_t.labels,
                                        roi_t.regression_targets, roi_t.valid, c.smooth_l1_beta))

    if c.mask_head:
        out["loss_mask"] = _mask_loss(module, pooling, roi_t, batch["gt_masks"],
                                      batch["gt_mask_boxes"])
    if c.keypoint_head:
        out[KEYPOINT_LOSS_NAME] = _keypoint_loss(module, pooling, roi_t, batch["gt_keypoints"])
    return out


def foreground_slot_sizes(num_slots: int, buckets: Sequence[int] | None,
                          field: str) -> tuple[int, ...]:
    """A RoI head's slot counts per image, ascending: the `buckets` below `num_slots`, then
    `num_slots` (`field` names the config entry in errors)."""
    n = int(num_slots)
    buckets = tuple(buckets or ())
    bad = [b for b in buckets if not (isinstance(b, int) and b >= 1)]
    if bad:
        raise ValueError(f"{field}: expected positive ints, got {buckets}")
    return tuple(sorted({int(b) for b in buckets if b < n})) + (n,)


def mask_slot_sizes(model_config: Any) -> tuple[int, ...]:
    """The mask head's slot counts per image (`mask_roi_buckets`, `num_mask_rois`)."""
    return foreground_slot_sizes(model_config.num_mask_rois,
                                 model_config.get("mask_roi_buckets"), "model.mask_roi_buckets")


def keypoint_slot_sizes(model_config: Any) -> tuple[int, ...]:
    """The keypoint head's slot counts per image (`keypoint_roi_buckets`, `num_keypoint_rois`)."""
    return foreground_slot_sizes(model_config.num_keypoint_rois,
                                 model_config.get("keypoint_roi_buckets"),
                                 "model.keypoint_roi_buckets")


def _on_foreground_slots(module: MaskRCNN, heads: Sequence[str], sizes: Sequence[int],
                         loss_on: Callable[..., jax.Array], metric: str, pooling: FlatFeatures,
                         roi_t: Any, *targets: jax.Array, chunk: int = 0) -> jax.Array:
    """`loss_on(mdl, pooling, roi_t, *targets, num_slots=n)` for the smallest n of `sizes` that
    holds every image's foreground RoIs (the sampler puts them in the first slots); `heads`:
    the submodules whose parameters it uses.

    torchvision's mask and keypoint heads run on the step's positives only; ours have a fixed
    slot count per branch, and early in training or on sparse images most of the slots are
    empty. Each size is one branch of a `switch` compiled once; the loss is the same whichever
    runs (the extra slots have weight 0), so a run's numbers do not depend on the buckets beyond
    float rounding. The RoIs the head ran on (slots x batch) are sown as `metric`.

    The taken branch also computes the loss's gradient (`_switch_with_gradient`): autodiff of a
    `switch` would make every branch output the union of all branches' residuals for the
    backward (the untaken ones zero-filled), written every step; the branch's own gradient
    keeps the step's memory to the taken branch.

    `chunk` > 0: a branch of more slots per image (a multiple of it) runs in pieces of `chunk`
    (`_in_chunks`), which bounds the step's memory by the piece, not the largest branch: the
    memory a compiled step reserves is that of its largest branch, whichever runs.
    """
    branch = foreground_slot_branch(sizes, roi_t.is_foreground)
    # What the step computed, for the metrics (make_train_step) and benchmarks.
    module.sow("intermediates", metric, jnp.asarray(sizes)[branch] * roi_t.is_foreground.shape[0])
    # The heads' variables (C4's res5 has FrozenBN statistics too), applied on their own.
    head_vars = {col: {name: tree[name] for name in heads if name in tree}
                 for col, tree in module.variables.items()}
    detached = type(module)(module.config)

    def loss_of(num_slots, head_params, flat, consts):
        other_vars, *args = consts
        return detached.apply({**other_vars, "params": head_params}, pooling.replace(flat=flat),
                              *args, method=functools.partial(loss_on, num_slots=num_slots))

    branches = [functools.partial(loss_of, n) if not chunk or n <= chunk or n % chunk
                 else _in_chunks(functools.partial(loss_of, chunk), n, chunk)
                 for n in sizes]
    other_vars = {col: tree for col, tree in head_vars.items() if col != "params"}
    return _switch_with_gradient(branch, branches, head_vars["params"], pooling.flat,
                                 (other_vars, roi_t, *targets))


def _in_chunks(loss_of_chunk: Callable[..., jax.Array], num_slots: int, chunk: int
               ) -> Callable[..., jax.Array]:
    """A branch's loss over `num_slots` slots as `num_slots / chunk` pieces run one after the
    other, each recomputed in the backward (`jax.checkpoint` in a `scan`): the head's
    activations and gradients are live for one piece at a time.

    The mask loss is a mean over the positive slots' pixels, so the whole is the pieces'
    means weighted by their shares of the positives (equal up to float rounding).
    """

    def loss_of(head_params, flat, consts):
        other_vars, roi_t, *targets = consts
        total = jnp.sum(roi_t.is_foreground[:, :num_slots]).astype(jnp.float32)

        def piece(acc, start):
            part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1),
                                roi_t)
            value = jax.checkpoint(loss_of_chunk)(head_params, flat, (other_vars, part, *targets))
            share = jnp.sum(part.is_foreground).astype(jnp.float32) / jnp.maximum(total, 1.0)
            return acc + value * share, None

        starts = jnp.arange(0, num_slots, chunk, dtype=jnp.int32)
        loss, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32), starts)
        return loss

    return loss_of


def _switch_with_gradient(index: jax.Array, branches: Sequence[Callable[..., jax.Array]],
                          params: Any, features: jax.Array, consts: Any) -> jax.Array:
    """`lax.switch(index, branches, params, features, consts)` of scalar losses, differentiable
    in `params` and `features` (not `consts`): the taken branch computes its value and its
    gradient together, the backward only scales that gradient by the cotangent."""

    @jax.custom_vjp
    def switch(params, features, index, consts):
        return jax.lax.switch(index, branches, params, features, consts)

    def value_and_gradient(branch):
        return jax.value_and_grad(branch, argnums=(0, 1))

    def forward(params, features, index, consts):
        return jax.lax.switch(index, [value_and_gradient(b) for b in branches], params,
                              features, consts)

    def backward(gradients, cotangent):
        d_params, d_features = jax.tree.map(lambda g: g * cotangent.astype(g.dtype), gradients)
        return d_params, d_features, None, None

    switch.defvjp(forward, backward)
    return switch(params, features, index, consts)


def foreground_slot_branch(sizes: Sequence[int], is_foreground: jax.Array) -> jax.Array:
    """Index of the smallest of `sizes` (ascending) holding the foreground slots of every image.

    is_foreground: [B, S] bool of the sampled slots (foreground first). Under a sharded batch
    the max over B is global (jit inserts the reduction), so every device takes the same branch.
    """
    most_fg = jnp.max(jnp.sum(is_foreground[:, :sizes[-1]], axis=-1))
    branch = jnp.searchsorted(jnp.asarray(sizes), most_fg, side="left")
    return jnp.minimum(branch, len(sizes) - 1)


def _mask_loss(module: MaskRCNN, pooling: FlatFeatures, roi_t: Any,
               gt_masks: jax.Array, gt_mask_boxes: jax.Array) -> jax.Array:
    """loss_mask on the foreground slots of the sampled RoIs (`_on_foreground_slots`);
    `pooling`: the model's `pooling_features`."""
    c = module.config

    def loss_on(mdl: MaskRCNN, pooling: FlatFeatures, roi_t: Any, gt_masks: jax.Array,
                gt_mask_boxes: jax.Array, num_slots: int) -> jax.Array:
        mask_rois = select_mask_rois(roi_t, num_slots)
        # The sigmoid loss reads each RoI's gt-class map only: compute just that one.
        gt_class_only = mask_rois.labels if c.mask_loss == "sigmoid" else None
        mask_logits = mdl.mask_head(pooling, mask_rois.rois, gt_class_only)
        targets = mask_targets(mask_rois.rois, mask_rois.matched_gt, gt_masks, gt_mask_boxes,
                               c.mask_resolution, c.mask_target_sampling_ratio)
        return loss_ops.maskrcnn_loss(mask_logits, targets, mask_rois.labels,
                                      mask_rois.weights, c.mask_loss)

    # C4's mask branch runs res5 (the box head) on its RoIs before the deconv.
    heads = ("roi_box_head" if c.architecture == "c4" else "roi_mask_head", "roi_mask_predictor")
    return _on_foreground_slots(module, heads, mask_slot_sizes(c), loss_on, "mask_rois",
                                pooling, roi_t, gt_masks, gt_mask_boxes,
                                chunk=int(c.get("mask_head_chunk", 0)))


def _keypoint_loss(module: MaskRCNN, pooling: FlatFeatures, roi_t: Any,
                   gt_keypoints: jax.Array) -> jax.Array:
    """loss_keypoint on the foreground slots of the sampled RoIs (`_on_foreground_slots`);
    torchvision trains the keypoint branch on every foreground RoI (all of them fit when
    num_keypoint_rois >= 512 x 0.25). The loss is normalised by the visible keypoints, which
    empty slots do not add to."""

    def loss_on(mdl: MaskRCNN, pooling: FlatFeatures, roi_t: Any, gt_keypoints: jax.Array,
                num_slots: int) -> jax.Array:
        kp_rois = select_mask_rois(roi_t, num_slots)
        kp_logits = mdl.keypoint_head(pooling, kp_rois.rois)
        kp_targets, kp_valid = keypoint_ops.keypoint_targets(
            kp_rois.rois, kp_rois.matched_gt, gt_keypoints, kp_rois.weights, kp_logits.shape[2])
        return keypoint_ops.keypointrcnn_loss(kp_logits, kp_targets, kp_valid)

    return _on_foreground_slots(module, ("roi_keypoint_head", "roi_keypoint_predictor"),
                                keypoint_slot_sizes(module.config), loss_on, "keypoint_rois",
                                pooling, roi_t, gt_keypoints)


__all__ = [
    "KEYPOINT_BATCH_KEYS", "KEYPOINT_LOSS_NAME", "LOSS_NAMES", "TRAIN_BATCH_KEYS",
    "foreground_slot_branch", "foreground_slot_sizes", "keypoint_slot_sizes", "loss_names",
    "mask_slot_sizes", "train_batch_keys", "training_losses",
]
