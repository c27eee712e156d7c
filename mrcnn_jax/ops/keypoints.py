"""Keypoint R-CNN targets, loss and post-processing with static shapes (the paper's section 5).

Each keypoint of a RoI is a one-hot position on an m x m grid over the RoI (m = 56); the head
predicts one logit map per keypoint and is trained with softmax cross-entropy over the m^2
positions, only for the visible keypoints of foreground RoIs. At inference each map is resized
bicubically to the (ceil) size of its box, and the argmax is the keypoint. The rules are
torchvision's (`keypoints_to_heatmap`, `keypointrcnn_loss`, `heatmaps_to_keypoints` in
`torchvision/models/detection/roi_heads.py`), the targets bit-exact, the loss to 1e-5 relative and
the decoded keypoints equal up to argmax near-ties (tests/keypoints/test_keypoint_ops.py):

- target: x_cell = floor((x - x1) * (m / (x2 - x1))) (a keypoint exactly on the right/bottom edge
  goes to cell m - 1); valid when 0 <= cell < m and visibility > 0;
- loss: cross-entropy averaged over every valid (RoI, keypoint) pair of the batch, 0 when none;
- decode: the box side is clamped to >= 1 and rounded up to an integer map size; PyTorch's
  `interpolate(mode="bicubic", align_corners=False)` (a = -0.75, border taps clamped) gives the
  map, whose first argmax (row-major) is the cell; its centre (+0.5) scaled back by
  side / map size is the coordinate, the map value there the score.

The decode is evaluated on a fixed grid of `max_map_hw` cells with the cells beyond each box's map
masked, so its shapes are static; with `max_map_hw` >= every box's ceil size (e.g. the canvas) it
is exact, and a larger box is resized to at most `max_map_hw` (a coarser argmax). Cost: two small
matmuls and a K x Gh x Gw max per valid RoI, one RoI at a time (`lax.map`; invalid RoIs skipped),
growing with the grid's area: set `model.keypoint_max_map_size` to bound it.

Glossary of shapes: R RoIs (any leading dims where noted), K keypoints, m heatmap side (56),
Gh x Gw the static decode grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# PyTorch's bicubic convolution constant (`get_cubic_upsample_coefficients`).
BICUBIC_A = -0.75


def _check_last(x: jax.Array, size: int, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] != size:
        raise ValueError(f"{name} must be [..., {size}], got shape {x.shape}")


def keypoints_to_heatmap(
    keypoints: jax.Array, rois: jax.Array, heatmap_size: int
) -> tuple[jax.Array, jax.Array]:
    """One-hot heatmap targets as flat cell indices (torchvision's `keypoints_to_heatmap`).

    Args:
        keypoints: [..., K, 3] (x, y, visibility) in the RoIs' pixels.
        rois: [..., 4] xyxy, the same leading dims.
        heatmap_size: m.

    Returns:
        targets: [..., K] int32 cell index y * m + x (0 where not valid, as torchvision);
        valid: [..., K] bool, the keypoint is visible (v > 0) and falls inside the RoI's grid.
    """
    _check_last(keypoints, 3, "keypoints")
    _check_last(rois, 4, "rois")
    if keypoints.shape[:-2] != rois.shape[:-1]:
        raise ValueError(f"keypoints [..., K, 3] and rois [..., 4] must share leading dims, got "
                         f"{keypoints.shape} and {rois.shape}")
    rois = rois.astype(jnp.float32)
    keypoints = keypoints.astype(jnp.float32)
    x1, y1, x2, y2 = (rois[..., i, None] for i in range(4))
    # float32 in the same order as torchvision; a zero-width RoI gives inf/NaN cells, which the
    # range test below marks invalid (NaN compares False).
    scale_x = heatmap_size / (x2 - x1)
    scale_y = heatmap_size / (y2 - y1)
    x, y, vis = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    cx = jnp.floor((x - x1) * scale_x)
    cy = jnp.floor((y - y1) * scale_y)
    cx = jnp.where(x == x2, heatmap_size - 1, cx)
    cy = jnp.where(y == y2, heatmap_size - 1, cy)
    valid = (cx >= 0) & (cy >= 0) & (cx < heatmap_size) & (cy < heatmap_size) & (vis > 0)
    cx = jnp.where(valid, cx, 0).astype(jnp.int32)
    cy = jnp.where(valid, cy, 0).astype(jnp.int32)
    return cy * heatmap_size + cx, valid


def keypoint_targets(
    rois: jax.Array, matched_gt: jax.Array, gt_keypoints: jax.Array, roi_weights: jax.Array,
    heatmap_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Targets of the keypoint slots of a batch.

    Args:
        rois: [B, R, 4] the keypoint slots' RoIs (no gradient).
        matched_gt: [B, R] int gt index of each RoI.
        gt_keypoints: [B, M, K, 3] (x, y, visibility) in resized pixels.
        roi_weights: [B, R] > 0 for a foreground RoI, 0 for an empty slot.
        heatmap_size: m.

    Returns:
        targets [B, R, K] int32 flat cells, valid [B, R, K] bool (foreground slots only).
    """
    if gt_keypoints.ndim != 4 or gt_keypoints.shape[-1] != 3:
        raise ValueError(f"gt_keypoints must be [B, M, K, 3], got {gt_keypoints.shape}")
    b, m = gt_keypoints.shape[:2]
    if rois.shape[:1] != (b,) or rois.ndim != 3 or matched_gt.shape != rois.shape[:2]:
        raise ValueError(f"rois [B, R, 4] and matched_gt [B, R] must match B={b}, got "
                         f"{rois.shape} and {matched_gt.shape}")
    idx = jnp.clip(matched_gt.astype(jnp.int32), 0, m - 1)
    kps = jnp.take_along_axis(gt_keypoints, idx[:, :, None, None], axis=1)  # [B, R, K, 3]
    targets, valid = keypoints_to_heatmap(kps, jax.lax.stop_gradient(rois), heatmap_size)
    return targets, valid & (roi_weights > 0)[..., None]


def keypointrcnn_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax cross-entropy over the m^2 cells, mean over the valid (RoI, keypoint) pairs.

    Args:
        logits: [B, R, m, m, K] heatmap logits (channels last).
        targets: [B, R, K] int flat cell y * m + x.
        valid: [B, R, K] bool.

    Returns:
        scalar float32; 0 (with a zero gradient) when nothing is valid, as torchvision.
    """
    if logits.ndim != 5 or logits.shape[2] != logits.shape[3]:
        raise ValueError(f"logits must be [B, R, m, m, K], got {logits.shape}")
    b, r, m, _, k = logits.shape
    if targets.shape != (b, r, k) or valid.shape != (b, r, k):
        raise ValueError(f"targets and valid must be {(b, r, k)}, got {targets.shape} and "
                         f"{valid.shape}")
    flat = jnp.moveaxis(logits.astype(jnp.float32), -1, 2).reshape(b, r, k, m * m)
    picked = jnp.take_along_axis(flat, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(flat, axis=-1) - picked
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)


def _cubic_weights(t: jax.Array) -> jax.Array:
    """[...] fraction -> [..., 4] tap weights of PyTorch's bicubic (taps at -1, 0, 1, 2)."""
    a = BICUBIC_A

    def conv1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def conv2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    t2 = 1.0 - t
    return jnp.stack([conv2(t + 1.0), conv1(t), conv1(t2), conv2(t2 + 1.0)], axis=-1)


def _bicubic_taps(in_size: int, out_size: jax.Array, grid: int) -> tuple[jax.Array, jax.Array]:
    """Tap indices [grid, 4] int32 and weights [grid, 4] of PyTorch's bicubic resize from
    `in_size` to `out_size` (traced scalar) for output cells 0..grid-1 (align_corners=False)."""
    scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
    real = scale * (jnp.arange(grid, dtype=jnp.float32) + 0.5) - 0.5
    index = jnp.minimum(jnp.floor(real).astype(jnp.int32), in_size - 1)
    lam = jnp.clip(real - index.astype(jnp.float32), 0.0, 1.0)
    taps = jnp.clip(index[:, None] + jnp.arange(-1, 3, dtype=jnp.int32), 0, in_size - 1)
    return taps, _cubic_weights(lam)


def _resize_argmax(maps: jax.Array, out_hw: jax.Array, grid_hw: tuple[int, int]):
    """One RoI: maps [m, m, K] bicubically resized to out_hw (h, w) inside a grid_hw grid.

    Returns (x cell [K], y cell [K], value [K]) of each map's first row-major maximum.
    """
    m_h, m_w, _ = maps.shape
    gh, gw = grid_hw
    ty, wy = _bicubic_taps(m_h, out_hw[0], gh)  # [Gh, 4]
    tx, wx = _bicubic_taps(m_w, out_hw[1], gw)  # [Gw, 4]
    maps = jnp.moveaxis(maps.astype(jnp.float32), -1, 0)  # [K, m, m]
    # The 4-tap resize as two dense matmuls (width, then height, as PyTorch's kernel): each
    # row of the [G, m] matrices holds the 4 tap weights (summed where border taps clamp to the
    # same pixel). ~10x faster on CPU than gathering taps; the extra terms are exact zeros.
    dense_x = jnp.sum(jax.nn.one_hot(tx, m_w, dtype=jnp.float32) * wx[..., None], axis=1)
    dense_y = jnp.sum(jax.nn.one_hot(ty, m_h, dtype=jnp.float32) * wy[..., None], axis=1)
    hi = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("kij,xj->kix", maps, dense_x, precision=hi)  # [K, m, Gw]
    out = jnp.einsum("yi,kix->kyx", dense_y, rows, precision=hi)  # [K, Gh, Gw]
    inside = ((jnp.arange(gh) < out_hw[0])[:, None] & (jnp.arange(gw) < out_hw[1])[None, :])
    out = jnp.where(inside, out, -jnp.inf)
    flat = out.reshape(out.shape[0], gh * gw)
    pos = jnp.argmax(flat, axis=-1)
    value = jnp.take_along_axis(flat, pos[:, None], axis=-1)[:, 0]
    return pos % gw, pos // gw, value


def heatmaps_to_keypoints(
    maps: jax.Array, rois: jax.Array, max_map_hw: Sequence[int], valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Keypoints from heatmap logits (torchvision's `heatmaps_to_keypoints`, static shapes).

    Args:
        maps: [R, m, m, K] heatmap logits (channels last).
        rois: [R, 4] xyxy boxes the maps cover.
        max_map_hw: (Gh, Gw) static decode grid; exact when every box's ceil size fits.
        valid: optional [R] bool; invalid RoIs (padded detections) are not decoded (their
            map is skipped: the decode costs K x Gh x Gw per RoI) and get zeros.

    Returns:
        keypoints [R, K, 3] (x, y, 1) in the boxes' pixels, scores [R, K] (the resized map's
        value at the keypoint); zeros for invalid RoIs.
    """
    if maps.ndim != 4 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"maps must be [R, m, m, K], got {maps.shape}")
    if rois.shape != (maps.shape[0], 4):
        raise ValueError(f"rois must be [{maps.shape[0]}, 4], got {rois.shape}")
    gh, gw = (int(v) for v in max_map_hw)
    if gh < 1 or gw < 1:
        raise ValueError(f"max_map_hw must be positive, got {max_map_hw}")
    rois = rois.astype(jnp.float32)
    widths = jnp.maximum(rois[:, 2] - rois[:, 0], 1.0)
    heights = jnp.maximum(rois[:, 3] - rois[:, 1], 1.0)
    map_w = jnp.minimum(jnp.ceil(widths), gw)
    map_h = jnp.minimum(jnp.ceil(heights), gh)
    out_hw = jnp.stack([map_h, map_w], axis=-1).astype(jnp.int32)

    if valid is None:
        valid = jnp.ones(rois.shape[:1], bool)
    k = maps.shape[-1]
    skipped = (jnp.zeros(k, jnp.int32), jnp.zeros(k, jnp.int32), jnp.zeros(k, jnp.float32))

    def decode(args):
        m, hw, v = args
        return jax.lax.cond(v, lambda: _resize_argmax(m, hw, (gh, gw)), lambda: skipped)

    # One RoI at a time: the grid is K x Gh x Gw floats, too big to hold for every RoI at once.
    cx, cy, scores = jax.lax.map(decode, (maps, out_hw, valid.astype(bool)))
    width_correction = (widths / map_w)[:, None]
    height_correction = (heights / map_h)[:, None]
    x = (cx.astype(jnp.float32) + 0.5) * width_correction + rois[:, 0, None]
    y = (cy.astype(jnp.float32) + 0.5) * height_correction + rois[:, 1, None]
    keypoints = jnp.stack([x, y, jnp.ones_like(x)], axis=-1)
    keypoints = jnp.where(valid[:, None, None], keypoints, 0.0)
    return keypoints, scores
