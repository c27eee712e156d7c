"""Mask R-CNN losses, normalised as torchvision does, on static sampled slots.

Each loss takes per-slot arrays with a `valid` (or weight) mask and divides by the number of
sampled elements over the whole batch, which is what torchvision's concatenation over images does:

    loss_rpn_cls  BCE-with-logits, mean over sampled anchors
    loss_rpn_loc  smooth-L1 (beta 1/9) over positive anchors, summed / number of sampled anchors
    loss_cls      cross-entropy, mean over sampled RoIs
    loss_box_reg  class-specific smooth-L1 over positive RoIs, summed / number of sampled RoIs
    loss_mask     per-pixel BCE on the mask of the gt class, mean over positive RoIs' pixels
                  (ablations: class-agnostic mask, multinomial softmax over classes per pixel)

Where torchvision would divide by zero (nothing sampled) these return 0 instead of NaN.

Glossary of shapes:
    B: images, A: anchors per image, S: sampled slots per image,
    K1: classes including background (K + 1), R: mask slots per image, m: mask resolution (28)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mrcnn_jax.ops.sampling import SampledSlots, gather_slots

MASK_LOSS_MODES = ("sigmoid", "softmax")


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """Elementwise smooth-L1 (Huber / beta), as `torch.nn.functional.smooth_l1_loss`.

    0.5 * d**2 / beta where |d| < beta, else |d| - 0.5 * beta; plain L1 when beta == 0.
    """
    d = jnp.abs(pred - target)
    if beta == 0.0:
        return d
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def sigmoid_bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise BCE-with-logits in the stable form torch uses: max(x,0) - x*t + log1p(e^-|x|)."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.maximum(count, 1.0)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def rpn_losses(
    objectness: jax.Array,
    box_deltas: jax.Array,
    regression_targets: jax.Array,
    slots: SampledSlots,
    beta: float = 1.0 / 9.0,
) -> dict[str, jax.Array]:
    """`loss_rpn_cls` and `loss_rpn_loc` of torchvision's `RegionProposalNetwork.compute_loss`.

    Args:
        objectness: [B, A] logits.
        box_deltas: [B, A, 4] predicted deltas (weights (1, 1, 1, 1)).
        regression_targets: [B, A, 4] encoded matched gt boxes (only positives are read).
        slots: the sampled anchors, [B, S] (labels 1 positive, 0 negative).
        beta: smooth-L1 beta.

    Returns:
        {"loss_rpn_cls": scalar, "loss_rpn_loc": scalar}.
    """
    if objectness.ndim != 2:
        raise ValueError(f"objectness must be [B, A], got {objectness.shape}")
    if box_deltas.shape != objectness.shape + (4,):
        raise ValueError(f"box_deltas must be {objectness.shape + (4,)}, got {box_deltas.shape}")
    if regression_targets.shape != box_deltas.shape:
        raise ValueError(
            f"regression_targets must be {box_deltas.shape}, got {regression_targets.shape}"
        )
    weights = slots.weights
    num_sampled = jnp.sum(weights)
    logits = _f32(gather_slots(objectness, slots.indices))
    cls = sigmoid_bce_with_logits(logits, _f32(slots.is_positive))
    loss_cls = _safe_divide(jnp.sum(cls * weights), num_sampled)

    pred = _f32(gather_slots(box_deltas, slots.indices))
    target = _f32(gather_slots(regression_targets, slots.indices))
    pos = slots.is_positive[..., None]
    # Zero non-positive targets first: a NaN target must not leak into the gradient via where.
    target = jnp.where(pos, target, 0.0)
    loc = jnp.where(pos, smooth_l1(pred, target, beta), 0.0)
    loss_loc = _safe_divide(jnp.sum(loc), num_sampled)
    return {"loss_rpn_cls": loss_cls, "loss_rpn_loc": loss_loc}


def fastrcnn_losses(
    class_logits: jax.Array,
    box_regression: jax.Array,
    labels: jax.Array,
    regression_targets: jax.Array,
    valid: jax.Array,
    beta: float = 1.0 / 9.0,
) -> dict[str, jax.Array]:
    """`loss_cls` and `loss_box_reg` of torchvision's `fastrcnn_loss`.

    Args:
        class_logits: [B, S, K1].
        box_regression: [B, S, K1 * 4] class-specific deltas, or [B, S, 4] class-agnostic.
        labels: [B, S] int, 0 background, 1..K foreground.
        regression_targets: [B, S, 4] encoded (weights (10, 10, 5, 5)); read only where
            labels > 0.
        valid: [B, S] bool, sampled slots.
        beta: smooth-L1 beta.

    Returns:
        {"loss_cls": scalar, "loss_box_reg": scalar}; both divided by the number of sampled RoIs.
    """
    if class_logits.ndim != 3:
        raise ValueError(f"class_logits must be [B, S, K1], got {class_logits.shape}")
    b, s, k1 = class_logits.shape
    if box_regression.shape not in ((b, s, k1 * 4), (b, s, 4)):
        raise ValueError(
            f"box_regression must be {(b, s, k1 * 4)} or {(b, s, 4)}, got {box_regression.shape}"
        )
    if labels.shape != (b, s) or valid.shape != (b, s):
        raise ValueError(f"labels {labels.shape} and valid {valid.shape} must be {(b, s)}")
    if regression_targets.shape != (b, s, 4):
        raise ValueError(f"regression_targets must be {(b, s, 4)}, got {regression_targets.shape}")
    weights = _f32(valid)
    num_sampled = jnp.sum(weights)
    labels = jnp.clip(labels.astype(jnp.int32), 0, k1 - 1)

    log_probs = jax.nn.log_softmax(_f32(class_logits), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    loss_cls = _safe_divide(jnp.sum(nll * weights), num_sampled)

    deltas = _f32(box_regression).reshape(b, s, -1, 4)
    cls_index = labels if deltas.shape[2] == k1 else jnp.zeros_like(labels)
    pred = jnp.take_along_axis(deltas, cls_index[..., None, None], axis=2)[:, :, 0]
    pos = (valid & (labels > 0))[..., None]
    target = jnp.where(pos, _f32(regression_targets), 0.0)
    box = jnp.where(pos, smooth_l1(pred, target, beta), 0.0)
    loss_box = _safe_divide(jnp.sum(box), num_sampled)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


def maskrcnn_loss(
    mask_logits: jax.Array,
    mask_targets: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    mode: str = "sigmoid",
) -> jax.Array:
    """`loss_mask`: torchvision's `maskrcnn_loss` and the paper's multinomial ablation.

    Args:
        mask_logits: [B, R, m, m, C], C = K1 per-class masks or C = 1 class-agnostic.
        mask_targets: [B, R, m, m] in [0, 1] (soft targets from RoIAlign of the gt mask).
        labels: [B, R] int gt class of each slot (1..K where weights > 0).
        weights: [B, R] 1 for a positive RoI slot, 0 otherwise (bool accepted).
        mode: "sigmoid" per-pixel BCE on the gt class's mask (decoupled, the paper's choice;
            with C = 1 the class-agnostic ablation), or "softmax": per-pixel cross-entropy over
            the C classes against the soft target t * onehot(label) + (1 - t) * onehot(0)
            (the multinomial ablation; needs C = K1 with channel 0 the background).

    Returns:
        scalar: mean over the pixels of all weighted RoIs (0 when there is none).
    """
    if mode not in MASK_LOSS_MODES:
        raise ValueError(f"mode must be one of {MASK_LOSS_MODES}, got {mode!r}")
    if mask_logits.ndim != 5:
        raise ValueError(f"mask_logits must be [B, R, m, m, C], got {mask_logits.shape}")
    b, r, mh, mw, c = mask_logits.shape
    if mask_targets.shape != (b, r, mh, mw):
        raise ValueError(f"mask_targets must be {(b, r, mh, mw)}, got {mask_targets.shape}")
    if labels.shape != (b, r) or weights.shape != (b, r):
        raise ValueError(f"labels {labels.shape} and weights {weights.shape} must be {(b, r)}")
    if mode == "softmax" and c < 2:
        raise ValueError("mode 'softmax' needs mask_logits with a background channel (C >= 2)")
    w = _f32(weights)
    # Empty slots may hold garbage targets; zero them so no NaN reaches the gradient via where.
    t = jnp.where((w > 0)[:, :, None, None], _f32(mask_targets), 0.0)
    logits = _f32(mask_logits)
    cls_index = jnp.clip(labels.astype(jnp.int32), 0, c - 1) if c > 1 else jnp.zeros_like(labels)
    idx = cls_index[:, :, None, None, None]
    if mode == "sigmoid":
        x = jnp.take_along_axis(logits, idx, axis=-1)[..., 0]
        per_pixel = sigmoid_bce_with_logits(x, t)
    else:
        log_p = jax.nn.log_softmax(logits, axis=-1)
        log_p_cls = jnp.take_along_axis(log_p, idx, axis=-1)[..., 0]
        per_pixel = -(t * log_p_cls + (1.0 - t) * log_p[..., 0])
    per_roi = jnp.sum(per_pixel, axis=(2, 3))
    per_roi = jnp.where(w > 0, per_roi, 0.0)  # a garbage slot must not leak NaN via the weight
    return _safe_divide(jnp.sum(per_roi * w), jnp.sum(w) * (mh * mw))
