"""RPN proposal generation with static shapes, equal to torchvision's `RPN.filter_proposals`.

torchvision, per image: decode every anchor's deltas (BoxCoder (1, 1, 1, 1)), take the top
`pre_nms_top_n` anchors *per level* by objectness logit, sigmoid, clip to the image, drop boxes
with a side < `min_size` and scores < `score_thresh`, NMS per level (`batched_nms` with the
level as the group) at `nms_thresh`, keep the first `post_nms_top_n` in decreasing score. Here
every list has a fixed length: the dropped boxes become `valid = False` before NMS (NMS ignores
them), and the output is always `post_nms_top_n` long with a `valid` mask for short lists.

Decoding only the selected anchors gives the same numbers as decoding all (decode is elementwise).

Shapes: B = batch, A = anchors over all levels (torchvision's order), L = levels,
N = sum over levels of min(pre_nms_top_n, A_l), P = post_nms_top_n.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.boxes import BoxCoder, clip_boxes, remove_small_boxes_mask
from mrcnn_jax.ops.nms import batched_nms


def select_top_per_level(
    objectness: jax.Array, num_anchors_per_level: Sequence[int], pre_nms_top_n: int
) -> tuple[jax.Array, np.ndarray]:
    """Indices of the top-scoring anchors of each level (torchvision's `_get_top_n_idx`).

    Args:
      objectness: [B, A] logits, levels concatenated in `num_anchors_per_level` order.
      num_anchors_per_level: A_l per level (static).
      pre_nms_top_n: anchors kept per level (fewer when a level is smaller).
    Returns:
      (indices [B, N] int32 into A, level ids [N] int32 numpy), per level in decreasing objectness.
    """
    if objectness.ndim != 2 or objectness.shape[1] != sum(num_anchors_per_level):
        raise ValueError(
            f"objectness must be [B, {sum(num_anchors_per_level)}] "
            f"(sum of num_anchors_per_level), got shape {objectness.shape}"
        )
    indices, levels = [], []
    offset = 0
    for level, n in enumerate(num_anchors_per_level):
        k = min(int(pre_nms_top_n), int(n))
        _, idx = jax.lax.top_k(objectness[:, offset : offset + n], k)
        indices.append(idx.astype(jnp.int32) + offset)
        levels.append(np.full((k,), level, np.int32))
        offset += n
    return jnp.concatenate(indices, axis=1), np.concatenate(levels)


def generate_proposals(
    objectness: jax.Array,
    box_deltas: jax.Array,
    anchors: jax.Array | np.ndarray,
    num_anchors_per_level: Sequence[int],
    image_sizes: jax.Array,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float,
    min_size: float,
    box_coder: BoxCoder,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RPN outputs -> a fixed number of proposals per image.

    Args:
      objectness: [B, A] logits.
      box_deltas: [B, A, 4] regression deltas.
      anchors: [A, 4] xyxy anchors of the canvas (the same for every image).
      num_anchors_per_level: A_l per level, summing to A.
      image_sizes: [B, 2] (h, w) of each true image inside the canvas (clipping uses it).
      pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size: torchvision's RPN settings.
      box_coder: the RPN box coder (weights (1, 1, 1, 1)).
    Returns:
      boxes [B, P, 4] (zeros where invalid), scores [B, P] (sigmoid objectness, 0 where invalid),
      valid [B, P] bool; valid proposals first, in decreasing score.
    """
    if box_deltas.shape != objectness.shape + (4,):
        raise ValueError(
            f"box_deltas must be [B, A, 4] matching objectness {objectness.shape}, "
            f"got {box_deltas.shape}"
        )
    anchors = jnp.asarray(anchors, jnp.float32)
    if anchors.shape != (objectness.shape[1], 4):
        raise ValueError(f"anchors must be [{objectness.shape[1]}, 4], got {anchors.shape}")
    if image_sizes.shape != (objectness.shape[0], 2):
        raise ValueError(f"image_sizes must be [{objectness.shape[0]}, 2], got {image_sizes.shape}")

    # Proposals are inputs to the second stage, not a function of it (torchvision detaches them).
    objectness = jax.lax.stop_gradient(objectness)
    box_deltas = jax.lax.stop_gradient(box_deltas)
    top_idx, levels = select_top_per_level(objectness, num_anchors_per_level, pre_nms_top_n)
    levels = jnp.asarray(levels)

    def per_image(logits, deltas, idx, size_hw):
        sel_logits = logits[idx]
        sel_boxes = box_coder.decode(deltas[idx], anchors[idx])
        sel_boxes = clip_boxes(sel_boxes, size_hw)
        scores = jax.nn.sigmoid(sel_logits)
        valid = remove_small_boxes_mask(sel_boxes, min_size) & (scores >= score_thresh)
        keep, keep_valid = batched_nms(
            sel_boxes, scores, levels, nms_thresh, post_nms_top_n, valid=valid
        )
        safe = jnp.where(keep_valid, keep, 0)
        boxes = jnp.where(keep_valid[:, None], sel_boxes[safe], 0.0)
        out_scores = jnp.where(keep_valid, scores[safe], 0.0)
        return boxes, out_scores, keep_valid

    return jax.vmap(per_image)(objectness, box_deltas, top_idx, image_sizes)
