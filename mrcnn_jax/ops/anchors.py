"""FPN anchors, identical to torchvision's `AnchorGenerator` (order, rounding, strides).

Anchors depend only on the static canvas, so they are built once in numpy (float32) and enter
jitted code as constants.

torchvision's rules, reproduced here:
- Base ("cell") anchors per level: for each aspect ratio r (= h / w), for each size s:
  h_ratio = sqrt(r), w_ratio = 1 / h_ratio, w = w_ratio * s, h = h_ratio * s, anchor =
  round((-w, -h, w, h) / 2), all in float32 and rounded half to even (`torch.round`).
- Per level the anchors are ordered row-major over the cells, and within a cell in the base
  anchor order: index = (y * W_l + x) * A + a.
- Cell shifts are integer multiples of the level's stride, where torchvision's stride is
  canvas_size // feature_map_size (per axis). The feature map of a ResNet/FPN level with nominal
  stride s has ceil(canvas / s) cells (every stride-2 conv/pool with padding rounds up), so
  e.g. P6 of an 800-pixel-high canvas has 13 rows at an effective stride of 800 // 13 = 61, not
  64. We reproduce that quirk for exact parity.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _sizes_per_level(sizes: Sequence, num_levels: int) -> list[tuple[float, ...]]:
    out = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in sizes]
    if len(out) != num_levels:
        raise ValueError(f"sizes must have one entry per level ({num_levels}), got {len(out)}")
    return out


def num_anchors_per_location(aspect_ratios: Sequence[float], sizes_per_level: int = 1) -> int:
    """Anchors per feature-map cell: len(aspect_ratios) * sizes_per_level (3 for FPN)."""
    if len(aspect_ratios) == 0:
        raise ValueError("aspect_ratios must not be empty")
    return len(aspect_ratios) * sizes_per_level


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred rounded base anchors of one level (torchvision `generate_anchors`).

    Args:
        sizes: anchor sizes of this level (one for FPN).
        aspect_ratios: h / w ratios.
    Returns:
        float32 [len(aspect_ratios) * len(sizes), 4], ratio-major then size.
    """
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    if scales.ndim != 1 or ratios.ndim != 1 or scales.size == 0 or ratios.size == 0:
        raise ValueError(
            f"sizes and aspect_ratios must be non-empty 1-D, got {scales.shape} and {ratios.shape}"
        )
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
    return np.round(base).astype(np.float32)


def feature_map_sizes(
    canvas_hw: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
    """(H_l, W_l) = (ceil(H / s), ceil(W / s)) of each level of a ResNet/FPN on the canvas."""
    h, w = (int(v) for v in canvas_hw)
    return [(-(-h // int(s)), -(-w // int(s))) for s in strides]


def anchor_grid(
    canvas_hw: Sequence[int],
    strides: Sequence[int],
    sizes: Sequence,
    aspect_ratios: Sequence[float],
    grid_sizes: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Anchors of every level for a padded canvas, as torchvision's `AnchorGenerator` makes them.

    Args:
        canvas_hw: (H, W) of the padded image canvas (torchvision's batched image tensor size).
        strides: nominal stride of each level, e.g. (4, 8, 16, 32, 64); used to derive the
            feature-map sizes when `grid_sizes` is not given.
        sizes: one anchor size (or a tuple of sizes) per level, e.g. (32, 64, 128, 256, 512).
        aspect_ratios: h / w ratios shared by all levels, e.g. (0.5, 1.0, 2.0).
        grid_sizes: optional explicit (H_l, W_l) per level (the actual feature-map sizes).
    Returns:
        One float32 array [H_l * W_l * A, 4] (xyxy, canvas pixels) per level.
    """
    if len(canvas_hw) != 2:
        raise ValueError(f"canvas_hw must be (H, W), got {canvas_hw}")
    if grid_sizes is None:
        grid_sizes = feature_map_sizes(canvas_hw, strides)
    elif len(grid_sizes) != len(strides):
        raise ValueError(
            f"grid_sizes must have one (H_l, W_l) per level ({len(strides)}), got {grid_sizes}"
        )
    level_sizes = _sizes_per_level(sizes, len(grid_sizes))
    h, w = (int(v) for v in canvas_hw)
    out = []
    for (gh, gw), level_size in zip(grid_sizes, level_sizes):
        base = cell_anchors(level_size, aspect_ratios)
        # torchvision: stride = image_size // grid_size, integer shifts, then float32 add.
        stride_h, stride_w = h // int(gh), w // int(gw)
        shift_y, shift_x = np.meshgrid(
            np.arange(int(gh), dtype=np.int64) * stride_h,
            np.arange(int(gw), dtype=np.int64) * stride_w,
            indexing="ij",
        )
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
        out.append((shifts.astype(np.float32) + base[None]).reshape(-1, 4))
    return out
