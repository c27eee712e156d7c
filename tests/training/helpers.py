"""Shared inputs for the training-target tests: random gt boxes and proposals near them."""

from __future__ import annotations

import numpy as np

from mrcnn_jax.config_base import base_config

MODEL = base_config().model


def random_gt(rng: np.random.Generator, num: int, max_num: int, hw: tuple[int, int]):
    """`num` real boxes inside an image of size hw, padded to `max_num` with garbage + valid.

    Returns boxes [max_num, 4] float32, classes [max_num] int32 (1..5), valid [max_num] bool.
    """
    h, w = hw
    boxes = np.zeros((max_num, 4), np.float32)
    wh = rng.uniform(8, min(h, w) / 2, (num, 2))
    xy = rng.uniform(0, 1, (num, 2)) * (np.array([w, h]) - wh)
    boxes[:num] = np.concatenate([xy, xy + wh], axis=1)
    # Padding rows hold boxes that would match if they were read: the valid mask must hide them.
    boxes[num:] = boxes[0] if num else np.array([0, 0, w / 2, h / 2], np.float32)
    classes = np.zeros(max_num, np.int32)
    classes[:num] = rng.integers(1, 6, num)
    classes[num:] = 7
    valid = np.arange(max_num) < num
    return boxes.astype(np.float32), classes, valid


def jitter_boxes(rng: np.random.Generator, boxes: np.ndarray, num: int, scale: float,
                 hw: tuple[int, int]) -> np.ndarray:
    """`num` boxes made by moving and resizing random rows of `boxes` (or random boxes if none)."""
    h, w = hw
    if len(boxes) == 0:
        wh = rng.uniform(4, min(h, w) / 2, (num, 2))
        xy = rng.uniform(0, 1, (num, 2)) * (np.array([w, h]) - wh)
        return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    src = boxes[rng.integers(0, len(boxes), num)]
    size = src[:, 2:] - src[:, :2]
    ctr = src[:, :2] + 0.5 * size + rng.normal(0, scale, (num, 2)) * size
    size = size * np.exp(rng.normal(0, scale, (num, 2)))
    out = np.concatenate([ctr - 0.5 * size, ctr + 0.5 * size], axis=1)
    return np.clip(out, 0, [w, h, w, h]).astype(np.float32)
