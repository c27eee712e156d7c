"""Box-branch post-processing with static shapes, equal to torchvision's
`RoIHeads.postprocess_detections`.

torchvision, per image: softmax over the K + 1 class logits, decode the class-specific regression
(BoxCoder (10, 10, 5, 5)) on every proposal, clip to the image, drop the background column, flatten
(proposal-major, then class) into R * K candidates, keep score > `score_thresh`, drop boxes
with a side < `min_size`, NMS per class at `nms_thresh`, keep the first `detections_per_img` in
decreasing score.

Static version: the dropped candidates become `valid = False`. R * K is large (1000 x 90), and an
NMS over all of it is wasted work, so the `num_candidates` best valid candidates by score go to
the NMS. Greedy NMS decides a box only from higher-scoring boxes, so the kept list from the top
candidates is exactly the beginning of torchvision's kept list: the result is identical whenever
at least `detections_per_img` boxes survive among them or there are no more than `num_candidates`
valid candidates (the returned `num_valid_candidates` lets a caller check that).

Shapes: B = batch, R = proposals per image, K = foreground classes (num_classes - 1),
C = num_candidates, D = detections_per_img.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mrcnn_jax.ops.boxes import BoxCoder, clip_boxes, remove_small_boxes_mask
from mrcnn_jax.ops.nms import batched_nms


def decode_class_boxes(
    box_regression: jax.Array, proposals: jax.Array, box_coder: BoxCoder
) -> jax.Array:
    """Class-specific box decode.

    Args:
      box_regression: [..., R, (K + 1) * 4] deltas, class-major as torchvision's `bbox_pred`.
      proposals: [..., R, 4] xyxy boxes the deltas are relative to.
    Returns:
      [..., R, K + 1, 4] decoded boxes.
    """
    if box_regression.shape[-1] % 4 != 0:
        raise ValueError(
            f"box_regression last dim must be a multiple of 4, got {box_regression.shape}"
        )
    num_classes = box_regression.shape[-1] // 4
    deltas = box_regression.reshape(box_regression.shape[:-1] + (num_classes, 4))
    anchors = jnp.broadcast_to(proposals[..., None, :], deltas.shape)
    return box_coder.decode(deltas, anchors)


def postprocess_detections(
    class_logits: jax.Array,
    box_regression: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    image_sizes: jax.Array,
    *,
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    min_size: float,
    detections_per_img: int,
    num_candidates: int,
) -> dict[str, jax.Array]:
    """Box-head outputs -> exactly `detections_per_img` detections per image with `valid`.

    Args:
      class_logits: [B, R, K + 1].
      box_regression: [B, R, (K + 1) * 4].
      proposals: [B, R, 4] xyxy (resized image pixels).
      proposal_valid: [B, R] bool; invalid proposals produce no detections.
      image_sizes: [B, 2] (h, w) to clip to.
      box_coder: weights (10, 10, 5, 5) in torchvision.
      score_thresh, nms_thresh, min_size, detections_per_img: torchvision's settings.
      num_candidates: C, how many valid candidates (by score) enter the NMS.
    Returns:
      dict of boxes [B, D, 4] (zeros where invalid), scores [B, D] (0 where invalid),
      labels [B, D] int32 in 1..K (0 where invalid), valid [B, D] bool, and
      num_valid_candidates [B] int32 (exactness holds if it is <= C or D boxes are valid).
    """
    b, r, k1 = class_logits.shape
    if box_regression.shape != (b, r, k1 * 4):
        raise ValueError(f"box_regression must be [{b}, {r}, {k1 * 4}], got {box_regression.shape}")
    if proposals.shape != (b, r, 4):
        raise ValueError(f"proposals must be [{b}, {r}, 4], got {proposals.shape}")
    if proposal_valid.shape != (b, r):
        raise ValueError(f"proposal_valid must be [{b}, {r}], got {proposal_valid.shape}")
    if image_sizes.shape != (b, 2):
        raise ValueError(f"image_sizes must be [{b}, 2], got {image_sizes.shape}")
    num_fg = k1 - 1
    c = min(int(num_candidates), r * num_fg)
    d = int(detections_per_img)

    def per_image(logits, regression, props, props_valid, size_hw):
        scores = jax.nn.softmax(logits, axis=-1)[:, 1:].reshape(-1)  # [R * K]
        boxes = decode_class_boxes(regression, props, box_coder)
        boxes = clip_boxes(boxes, size_hw)[:, 1:].reshape(-1, 4)
        labels = jnp.tile(jnp.arange(1, k1, dtype=jnp.int32), r)
        valid = (
            jnp.repeat(props_valid, num_fg)
            & (scores > score_thresh)
            & remove_small_boxes_mask(boxes, min_size)
        )
        num_valid = jnp.sum(valid, dtype=jnp.int32)
        # Best C valid candidates; top_k breaks score ties by lower index, i.e. torchvision's order.
        _, cand = jax.lax.top_k(jnp.where(valid, scores, -1.0), c)
        cand_boxes, cand_scores = boxes[cand], scores[cand]
        cand_labels, cand_valid = labels[cand], valid[cand]
        keep, keep_valid = batched_nms(
            cand_boxes, cand_scores, cand_labels, nms_thresh, d, valid=cand_valid
        )
        safe = jnp.where(keep_valid, keep, 0)
        return {
            "boxes": jnp.where(keep_valid[:, None], cand_boxes[safe], 0.0),
            "scores": jnp.where(keep_valid, cand_scores[safe], 0.0),
            "labels": jnp.where(keep_valid, cand_labels[safe], 0).astype(jnp.int32),
            "valid": keep_valid,
            "num_valid_candidates": num_valid,
        }

    return jax.vmap(per_image)(class_logits, box_regression, proposals, proposal_valid, image_sizes)
