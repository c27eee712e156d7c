"""Box arithmetic: area, pairwise IoU, clipping, the small-box mask and the box coder.

All functions are pure `jnp`, work under `jit`, `vmap` and `grad`, and follow torchvision's
operation order exactly (same float32 roundings), so results agree with
`torchvision.ops.box_iou` / `box_area` / `clip_boxes_to_image` / `remove_small_boxes` and
`torchvision.models.detection._utils.BoxCoder` to the last bit or to ~1 ulp (where `exp`/`log`
implementations differ).

Glossary: boxes are (x1, y1, x2, y2) in absolute pixels; N, M = numbers of boxes; `...` = any
leading batch dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp

# torchvision's `BoxCoder` default: dw/dh are clamped at log(1000/16) before `exp` so a wild
# regression cannot produce boxes larger than ~1000 px / 16 px-stride anchors.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_last_dim(x: jnp.ndarray, name: str, size: int = 4) -> None:
    if x.ndim < 1 or x.shape[-1] != size:
        raise ValueError(f"{name} must have a last dimension of size {size}, got shape {x.shape}")


def rounded(x: jnp.ndarray) -> jnp.ndarray:
    """Returns `x` unchanged, but rounded to its dtype before any later addition uses it.

    XLA's CPU and GPU backends contract `a * b + c` inside a fusion into one fused multiply-add,
    which skips the rounding of `a * b` and changes the last bit (openxla/xla#41579); neither an
    optimisation barrier nor `reduce_precision` survives XLA's simplifier. torchvision rounds
    every product, and IoUs compared at a threshold (NMS, matching) must have the same bits, so
    products that feed an addition pass through this identity select (NaN stays NaN), which the
    contraction cannot look through. Tests check the jitted IoU bit for bit against torchvision.
    """
    return jnp.where(x == x, x, jnp.asarray(jnp.nan, x.dtype))


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area (x2 - x1) * (y2 - y1) of boxes.

    Args:
        boxes: [..., 4] xyxy.
    Returns:
        [...] areas (negative for inverted boxes, as torchvision).
    """
    boxes = jnp.asarray(boxes)
    _check_last_dim(boxes, "boxes")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Pairwise intersection over union, computed like `torchvision.ops.box_iou`.

    inter = clamp(min(x2) - max(x1), 0) * clamp(min(y2) - max(y1), 0);
    iou = inter / ((area1 + area2) - inter)  (0/0 gives NaN, as in torchvision).

    Args:
        boxes1: [..., N, 4] xyxy.
        boxes2: [..., M, 4] xyxy (leading dimensions broadcast with boxes1's).
    Returns:
        [..., N, M] IoU.
    """
    boxes1 = jnp.asarray(boxes1)
    boxes2 = jnp.asarray(boxes2)
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    if boxes1.ndim < 2 or boxes2.ndim < 2:
        raise ValueError(
            f"boxes1 and boxes2 must be [..., N, 4] and [..., M, 4], got {boxes1.shape} and "
            f"{boxes2.shape}"
        )
    area1 = rounded(box_area(boxes1))
    area2 = rounded(box_area(boxes2))
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = rounded(wh[..., 0] * wh[..., 1])
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def clip_boxes(boxes: jnp.ndarray, image_size_hw: jnp.ndarray | Sequence[int]) -> jnp.ndarray:
    """Clamps x to [0, w] and y to [0, h] (torchvision's `clip_boxes_to_image`).

    Args:
        boxes: [..., 4] xyxy.
        image_size_hw: [2] (h, w) for all boxes, or [*batch, 2] per image where `batch` is a
            prefix of the leading dimensions of `boxes` (e.g. boxes [B, R, 4], sizes [B, 2]).
    Returns:
        [..., 4] clipped boxes.
    """
    boxes = jnp.asarray(boxes)
    _check_last_dim(boxes, "boxes")
    size = jnp.asarray(image_size_hw)
    if size.ndim < 1 or size.shape[-1] != 2 or size.ndim > boxes.ndim:
        raise ValueError(
            f"image_size_hw must be [2] or [*batch, 2] with batch a prefix of boxes' leading "
            f"dims {boxes.shape[:-1]}, got shape {size.shape}"
        )
    if size.ndim > 1 and size.shape[:-1] != boxes.shape[: size.ndim - 1]:
        raise ValueError(
            f"image_size_hw batch dims {size.shape[:-1]} do not match boxes' leading dims "
            f"{boxes.shape[: size.ndim - 1]}"
        )
    size = size.astype(boxes.dtype)
    # Insert singleton axes so [*batch, 2] broadcasts against boxes[..., i] of shape [*batch, ...].
    extra = boxes.ndim - size.ndim
    h = size[..., 0].reshape(size.shape[:-1] + (1,) * extra)
    w = size[..., 1].reshape(size.shape[:-1] + (1,) * extra)
    x1 = jnp.clip(boxes[..., 0], 0.0, w)
    y1 = jnp.clip(boxes[..., 1], 0.0, h)
    x2 = jnp.clip(boxes[..., 2], 0.0, w)
    y2 = jnp.clip(boxes[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def remove_small_boxes_mask(boxes: jnp.ndarray, min_size: float) -> jnp.ndarray:
    """Validity mask of torchvision's `remove_small_boxes`: True = keep (both sides >= min_size).

    Args:
        boxes: [..., 4] xyxy.
        min_size: minimum side length in pixels.
    Returns:
        bool [...].
    """
    boxes = jnp.asarray(boxes)
    _check_last_dim(boxes, "boxes")
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4:
        raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {weights}")
    return weights


def encode_boxes(
    gt_boxes: jnp.ndarray, anchors: jnp.ndarray, weights: Sequence[float]
) -> jnp.ndarray:
    """Regression targets of `gt_boxes` relative to `anchors` (torchvision `encode_boxes`).

    dx = wx * (gt_cx - a_cx) / a_w, dy likewise, dw = ww * log(gt_w / a_w), dh likewise, with
    centres x1 + 0.5 * w.

    Args:
        gt_boxes: [..., 4] xyxy target boxes (torchvision's `reference_boxes`).
        anchors: [..., 4] xyxy anchors or proposals (torchvision's `proposals`), broadcastable.
        weights: (wx, wy, ww, wh), e.g. (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    Returns:
        [..., 4] (dx, dy, dw, dh).
    """
    gt_boxes = jnp.asarray(gt_boxes)
    anchors = jnp.asarray(anchors)
    _check_last_dim(gt_boxes, "gt_boxes")
    _check_last_dim(anchors, "anchors")
    wx, wy, ww, wh = _check_weights(weights)
    ex_w = anchors[..., 2] - anchors[..., 0]
    ex_h = anchors[..., 3] - anchors[..., 1]
    ex_cx = anchors[..., 0] + 0.5 * ex_w
    ex_cy = anchors[..., 1] + 0.5 * ex_h
    gt_w = gt_boxes[..., 2] - gt_boxes[..., 0]
    gt_h = gt_boxes[..., 3] - gt_boxes[..., 1]
    gt_cx = gt_boxes[..., 0] + 0.5 * gt_w
    gt_cy = gt_boxes[..., 1] + 0.5 * gt_h
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * jnp.log(gt_w / ex_w)
    dh = wh * jnp.log(gt_h / ex_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    rel_codes: jnp.ndarray,
    anchors: jnp.ndarray,
    weights: Sequence[float],
    clip: float = DEFAULT_BBOX_XFORM_CLIP,
) -> jnp.ndarray:
    """Applies regression deltas to anchors (torchvision `BoxCoder.decode_single`).

    Several deltas per anchor (the box head's per-class regression) are supported: the last
    dimension of `rel_codes` is 4 * k and every group of 4 is decoded against the same anchor.

    Args:
        rel_codes: [..., 4 * k] (dx, dy, dw, dh) per group.
        anchors: [..., 4] xyxy, broadcastable with rel_codes[..., 0].
        weights: (wx, wy, ww, wh).
        clip: upper clamp of dw / wx and dh / wh before `exp` (log(1000/16)).
    Returns:
        [..., 4 * k] xyxy boxes.
    """
    rel_codes = jnp.asarray(rel_codes)
    anchors = jnp.asarray(anchors)
    _check_last_dim(anchors, "anchors")
    if rel_codes.ndim < 1 or rel_codes.shape[-1] % 4 != 0 or rel_codes.shape[-1] == 0:
        raise ValueError(f"rel_codes must be [..., 4 * k], got shape {rel_codes.shape}")
    wx, wy, ww, wh = _check_weights(weights)
    anchors = anchors.astype(rel_codes.dtype)
    k = rel_codes.shape[-1] // 4
    codes = rel_codes.reshape(rel_codes.shape[:-1] + (k, 4))
    widths = (anchors[..., 2] - anchors[..., 0])[..., None]
    heights = (anchors[..., 3] - anchors[..., 1])[..., None]
    ctr_x = anchors[..., 0][..., None] + 0.5 * widths
    ctr_y = anchors[..., 1][..., None] + 0.5 * heights
    dx = codes[..., 0] / wx
    dy = codes[..., 1] / wy
    dw = jnp.minimum(codes[..., 2] / ww, clip)
    dh = jnp.minimum(codes[..., 3] / wh, clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    out = jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
        axis=-1,
    )
    return out.reshape(out.shape[:-2] + (4 * k,))


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """torchvision's `BoxCoder` as a frozen (hashable, jit-static) value.

    Attributes:
        weights: (wx, wy, ww, wh).
        bbox_xform_clip: clamp of dw/dh before `exp`.
    """

    weights: tuple[float, float, float, float]
    bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP

    def __post_init__(self):
        object.__setattr__(self, "weights", _check_weights(self.weights))

    def encode(self, gt_boxes: jnp.ndarray, anchors: jnp.ndarray) -> jnp.ndarray:
        """[..., 4] targets of gt_boxes [..., 4] relative to anchors [..., 4]."""
        return encode_boxes(gt_boxes, anchors, self.weights)

    def decode(self, rel_codes: jnp.ndarray, anchors: jnp.ndarray) -> jnp.ndarray:
        """[..., 4 * k] boxes from rel_codes [..., 4 * k] and anchors [..., 4]."""
        return decode_boxes(rel_codes, anchors, self.weights, self.bbox_xform_clip)
