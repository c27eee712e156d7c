"""Training targets for the RPN and the box head, with static shapes.

RPN (torchvision's `RegionProposalNetwork.assign_targets_to_anchors`): every anchor is matched
to the gt by IoU with `Matcher(0.7, 0.3, allow_low_quality_matches=True)`; labels are 1 (matched),
0 (below 0.3) and -1 (in between, ignored). Like torchvision, anchors outside the image are NOT
dropped; `anchor_valid` can mark anchors to ignore (e.g. those of the static canvas beyond the
padded batch extent torchvision would have used).

RoI heads (torchvision's `RoIHeads.select_training_samples`): the valid gt boxes are appended to
the proposals, every candidate is matched with `Matcher(0.5, 0.5)`, labels are the gt class
(foreground), 0 (background) or -1 (ignored); `BalancedPositiveNegativeSampler(512, 0.25)` picks
exactly 512 slots; the box targets are the matched gt encoded with weights (10, 10, 5, 5).

Glossary of shapes:
    B: images, A: anchors, M: gt slots (padded, `gt_valid`), P: proposals per image (padded,
    `proposal_valid`), N = P + M: RoI candidates, S: sampled slots
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.matcher import BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, match, match_rows
from mrcnn_jax.ops.sampling import SampledSlots, gather_slots, sample_balanced

IGNORE = -1  # label of candidates the sampler must skip


class AnchorTargets(NamedTuple):
    """labels: [B, A] int32 1 / 0 / -1; matched_gt: [B, A] int32 (-1/-2 unmatched);
    regression_targets: [B, A, 4] float32, the matched gt encoded on the anchor (0 where the
    anchor is not positive)."""

    labels: jax.Array
    matched_gt: jax.Array
    regression_targets: jax.Array


class RoiCandidates(NamedTuple):
    """The proposals with the gt appended, matched to the gt.

    boxes: [B, N, 4]; labels: [B, N] int32 gt class / 0 / -1; matched_gt: [B, N] int32 gt index
    clamped to >= 0 (as torchvision's `clamped_matched_idxs`)."""

    boxes: jax.Array
    labels: jax.Array
    matched_gt: jax.Array


class RoiTargets(NamedTuple):
    """The sampled RoIs of the box head.

    rois: [B, S, 4] boxes (xyxy, no gradient); labels: [B, S] int32 0..K (0 in padded slots);
    matched_gt: [B, S] int32 gt index; regression_targets: [B, S, 4] (0 unless foreground);
    is_foreground: [B, S] bool; valid: [B, S] bool; indices: [B, S] int32 candidate index
    (proposal p < P, gt m at P + m; -1 padded)."""

    rois: jax.Array
    labels: jax.Array
    matched_gt: jax.Array
    regression_targets: jax.Array
    is_foreground: jax.Array
    valid: jax.Array
    indices: jax.Array


def _check_gt(gt_boxes: jax.Array, gt_valid: jax.Array) -> None:
    if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, M, 4], got {gt_boxes.shape}")
    if gt_valid.shape != gt_boxes.shape[:2]:
        raise ValueError(f"gt_valid must be {gt_boxes.shape[:2]}, got {gt_valid.shape}")


def _encode(gt: jax.Array, ref: jax.Array, weights: Sequence[float], keep: jax.Array) -> jax.Array:
    """Encode gt [..., 4] on ref [..., 4], zero where not `keep` (degenerate pairs give inf/NaN,
    which must not reach a loss or its gradient)."""
    safe_gt = jnp.where(keep[..., None], gt, ref)
    codes = box_ops.encode_boxes(safe_gt, ref, weights)
    return jnp.where(keep[..., None], codes, 0.0)


def rpn_anchor_targets(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    anchor_valid: Optional[jax.Array] = None,
) -> AnchorTargets:
    """Anchor labels and regression targets, torchvision's `assign_targets_to_anchors` + encode.

    Args:
        anchors: [A, 4] (the same for every image) or [B, A, 4].
        gt_boxes: [B, M, 4] xyxy.
        gt_valid: [B, M] bool.
        fg_iou_thresh, bg_iou_thresh: the matcher's thresholds (low-quality matches allowed).
        box_weights: the RPN box coder weights.
        anchor_valid: optional [A] or [B, A] bool; False anchors get label -1.

    Returns:
        AnchorTargets. An image without valid gt has every anchor labelled 0, like torchvision.
    """
    _check_gt(gt_boxes, gt_valid)
    b = gt_boxes.shape[0]
    if anchors.ndim == 2:
        anchors = jnp.broadcast_to(anchors, (b,) + anchors.shape)
    if anchors.ndim != 3 or anchors.shape[0] != b or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4] or [{b}, A, 4], got {anchors.shape}")
    anchors = anchors.astype(jnp.float32)
    gt_boxes = gt_boxes.astype(jnp.float32)

    def iou_row(m):  # gt m against every anchor: [B, A]; the [B, M, A] IoU is never stored
        gt = lax.dynamic_slice_in_dim(gt_boxes, m, 1, axis=1)
        return jax.vmap(box_ops.box_iou)(gt, anchors)[:, 0]

    matched = match_rows(iou_row, gt_valid, fg_iou_thresh, bg_iou_thresh,
                         allow_low_quality_matches=True)
    labels = jnp.where(matched >= 0, 1, jnp.where(matched == BELOW_LOW_THRESHOLD, 0, IGNORE))
    if anchor_valid is not None:
        anchor_valid = jnp.broadcast_to(anchor_valid, labels.shape)
        labels = jnp.where(anchor_valid, labels, IGNORE)
    matched_boxes = gather_slots(gt_boxes, jnp.maximum(matched, 0))
    targets = _encode(matched_boxes, anchors, box_weights, labels == 1)
    return AnchorTargets(labels.astype(jnp.int32), matched, targets)


def roi_candidates(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.5,
    append_gt: bool = True,
) -> RoiCandidates:
    """Append the gt to the proposals and match them, torchvision's `add_gt_proposals` +
    `assign_targets_to_proposals`.

    Args:
        proposals: [B, P, 4] xyxy (gradient stopped here, as torchvision detaches them).
        proposal_valid: [B, P] bool.
        gt_boxes: [B, M, 4]; gt_classes: [B, M] int 1..K; gt_valid: [B, M] bool.
        append_gt: append the gt boxes (torchvision always does).

    Returns:
        RoiCandidates over N = P + M candidates (N = P without `append_gt`); padded proposals
        and padded gt are labelled -1 so they are never sampled.
    """
    _check_gt(gt_boxes, gt_valid)
    if proposals.ndim != 3 or proposals.shape[-1] != 4 or proposals.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"proposals must be [{gt_boxes.shape[0]}, P, 4], got {proposals.shape}")
    if proposal_valid.shape != proposals.shape[:2]:
        raise ValueError(
            f"proposal_valid must be {proposals.shape[:2]}, got {proposal_valid.shape}")
    if gt_classes.shape != gt_valid.shape:
        raise ValueError(f"gt_classes must be {gt_valid.shape}, got {gt_classes.shape}")
    gt_boxes = gt_boxes.astype(jnp.float32)
    boxes = jax.lax.stop_gradient(proposals).astype(jnp.float32)
    valid = proposal_valid.astype(bool)
    if append_gt:
        boxes = jnp.concatenate([boxes, gt_boxes], axis=1)
        valid = jnp.concatenate([valid, gt_valid.astype(bool)], axis=1)
    iou = jax.vmap(box_ops.box_iou)(gt_boxes, boxes)  # [B, M, N]
    matched = match(iou, gt_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
    clamped = jnp.maximum(matched, 0)
    labels = jnp.take_along_axis(gt_classes.astype(jnp.int32), clamped, axis=1)
    labels = jnp.where(matched == BELOW_LOW_THRESHOLD, 0, labels)
    labels = jnp.where((matched == BETWEEN_THRESHOLDS) | ~valid, IGNORE, labels)
    return RoiCandidates(boxes, labels.astype(jnp.int32), clamped.astype(jnp.int32))


def roi_targets_from_slots(
    candidates: RoiCandidates,
    gt_boxes: jax.Array,
    slots: SampledSlots,
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> RoiTargets:
    """Gather the sampled candidates and encode their box targets.

    Args:
        candidates: from `roi_candidates`, [B, N].
        gt_boxes: [B, M, 4].
        slots: [B, S] sampled from `candidates.labels`.
        box_weights: the box head's coder weights.
    """
    rois = jnp.where(slots.valid[..., None], gather_slots(candidates.boxes, slots.indices), 0.0)
    matched = jnp.where(slots.valid, gather_slots(candidates.matched_gt, slots.indices), 0)
    labels = jnp.where(slots.valid, slots.labels, 0)
    fg = slots.valid & (labels > 0)
    matched_boxes = gather_slots(gt_boxes.astype(jnp.float32), matched)
    targets = _encode(matched_boxes, rois, box_weights, fg)
    return RoiTargets(
        rois=rois,
        labels=labels.astype(jnp.int32),
        matched_gt=matched.astype(jnp.int32),
        regression_targets=targets,
        is_foreground=fg,
        valid=slots.valid,
        indices=slots.indices,
    )


def roi_targets(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    rng: jax.Array,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> RoiTargets:
    """torchvision's `select_training_samples` with exactly `batch_size_per_image` slots.

    Args: as `roi_candidates`, plus `rng` for the sampler.

    Returns:
        RoiTargets [B, S]; foreground slots come first, so the first
        int(S * positive_fraction) slots hold every sampled foreground RoI.
    """
    cands = roi_candidates(
        proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, fg_iou_thresh, bg_iou_thresh
    )
    slots = sample_balanced(cands.labels, rng, batch_size_per_image, positive_fraction)
    return roi_targets_from_slots(cands, gt_boxes, slots, box_weights)
