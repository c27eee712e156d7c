"""Real-ish instance masks for the mask-target tests, and the pipeline's way of cropping them.

`crop_masks` reproduces the input pipeline's resampling (DESIGN.md section 4): S x S bilinear point
samples at half-pixel centres of the mask box, zero outside the mask's own pixels, thresholded at
0.5. It is written in numpy here so the tests need neither TF nor the data files.
"""

from __future__ import annotations

import numpy as np


def shape_masks(rng: np.random.Generator, hw: tuple[int, int], num: int,
                min_size: float = 16, max_size: float = 300) -> np.ndarray:
    """`num` full-image uint8 masks: rotated ellipses, rectangles, triangles and rings."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    masks = np.zeros((num, h, w), np.uint8)
    for i in range(num):
        size = np.exp(rng.uniform(np.log(min_size), np.log(max_size)))
        a, b = size / 2, size / 2 * rng.uniform(0.4, 1.0)
        cx = rng.uniform(a + 2, w - a - 2)
        cy = rng.uniform(a + 2, h - a - 2)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        kind = i % 4
        if kind == 0:
            m = (u / a) ** 2 + (v / b) ** 2 <= 1
        elif kind == 1:
            m = (np.abs(u) <= a) & (np.abs(v) <= b)
        elif kind == 2:
            m = (v >= -b) & (v <= b * (1 - 2 * np.abs(u) / a)) & (np.abs(u) <= a)
        else:
            r = (u / a) ** 2 + (v / b) ** 2
            m = (r <= 1) & (r >= 0.35)
        masks[i] = m
    return masks


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """[N, 4] float32 x1, y1, x2, y2 (exclusive) of each mask's pixels."""
    out = []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        out.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return np.array(out, np.float32)


def _bilinear_zero_outside(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample a mask (pixel i's value at centre i + 0.5, zero outside) at points (x, y)."""
    padded = np.pad(mask.astype(np.float64), 1)
    px, py = x - 0.5 + 1, y - 0.5 + 1  # index coordinates in the padded mask
    x0 = np.clip(np.floor(px).astype(int), 0, padded.shape[1] - 2)
    y0 = np.clip(np.floor(py).astype(int), 0, padded.shape[0] - 2)
    fx = np.clip(px - x0, 0, 1)
    fy = np.clip(py - y0, 0, 1)
    return ((1 - fy) * (1 - fx) * padded[y0, x0] + (1 - fy) * fx * padded[y0, x0 + 1]
            + fy * (1 - fx) * padded[y0 + 1, x0] + fy * fx * padded[y0 + 1, x0 + 1])


def crop_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """[N, size, size] uint8: each mask resampled over its box at half-pixel centres, >= 0.5."""
    out = np.zeros((len(masks), size, size), np.uint8)
    j = np.arange(size) + 0.5
    for i, (m, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
        xs = x1 + j * (x2 - x1) / size
        ys = y1 + j * (y2 - y1) / size
        yg, xg = np.meshgrid(ys, xs, indexing="ij")
        out[i] = _bilinear_zero_outside(m, xg, yg) >= 0.5
    return out


def positive_rois(rng: np.random.Generator, boxes: np.ndarray, per_box: int,
                  min_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Jittered copies of each box with IoU >= min_iou: rois [R, 4], matched box index [R]."""
    rois, idx = [], []
    for k, b in enumerate(boxes):
        size = b[2:] - b[:2]
        while sum(i == k for i in idx) < per_box:
            c = b[:2] + size * (0.5 + rng.normal(0, 0.12, 2))
            s = size * np.exp(rng.normal(0, 0.15, 2))
            r = np.concatenate([c - s / 2, c + s / 2])
            lt, rb = np.maximum(r[:2], b[:2]), np.minimum(r[2:], b[2:])
            inter = np.prod(np.maximum(rb - lt, 0))
            if inter / (np.prod(size) + np.prod(s) - inter) >= min_iou:
                rois.append(r)
                idx.append(k)
    return np.array(rois, np.float32), np.array(idx, np.int64)
