"""Mask pasting without the dense [D, H, W] array: the host's crops, the device's packed crops
and the RLE of crops, each against the dense reference (`paste_masks_in_image`, torchvision's rule,
tests/modeling/test_transforms.py; `encode_masks`, pycocotools on full masks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import transforms
from mrcnn_jax.evaluation.coco_evaluator import encode_crops, encode_masks
from mrcnn_jax.ops import masks

# The boxes of test_paste_masks_equals_torchvision: inside, out at either corner, sub-pixel,
# the whole image, at the edge, tiny.
BOXES = np.array([
    [10.3, 12.7, 60.2, 40.9], [-5.0, -8.5, 20.0, 15.0], [70.0, 50.0, 130.0, 95.0],
    [30.0, 30.0, 30.4, 30.2], [0.0, 0.0, 99.9, 79.9], [95.0, 75.0, 99.0, 79.0],
    [5.5, 60.5, 6.5, 61.5]], np.float32)
IMAGE_HW = (80, 100)


def _device_crops(probs, boxes, valid, resized_hw, original_hw, capacity):
    out = masks.paste_masks_packed(jnp.asarray(probs)[None], jnp.asarray(boxes)[None],
                                   jnp.asarray(valid)[None], jnp.asarray([resized_hw]),
                                   jnp.asarray([original_hw]), capacity, 0.5)
    out = jax.tree_util.tree_map(lambda v: np.asarray(v)[0], out)
    return out, masks.unpack_crops(out["mask_bits"], out["paste_boxes"], out["mask_offsets"],
                                   out["mask_pasted"], original_hw)


def test_encode_crops_equals_encode_masks_of_the_dense_masks():
    """300 crops: empty, sparse, dense, full; full-height columns (runs that go on across
    columns), at every border. The RLE strings are equal."""
    rng = np.random.default_rng(0)
    h_img, w_img = IMAGE_HW
    for case in range(300):
        h, w = rng.integers(0, h_img + 1), rng.integers(0, w_img + 1)
        y, x = rng.integers(0, h_img - h + 1), rng.integers(0, w_img - w + 1)
        if case % 5 == 0:
            y, h = 0, h_img
        crop = rng.random((h, w)) < rng.choice([0.0, 0.1, 0.5, 0.9, 1.0])
        dense = np.zeros(IMAGE_HW, bool)
        dense[y:y + h, x:x + w] = crop
        assert encode_crops([(crop, (x, y))], IMAGE_HW) == encode_masks(dense[None]), case


def test_host_crops_are_the_dense_paste():
    probs = np.random.default_rng(1).random((7, 28, 28), dtype=np.float32)
    crops = masks.paste_mask_crops(probs, BOXES, IMAGE_HW, 0.5)
    dense = masks.paste_masks_in_image(probs, BOXES, IMAGE_HW, threshold=0.5)
    np.testing.assert_array_equal(masks.crops_to_dense(crops, IMAGE_HW), dense)
    assert crops[1][1] == (0, 0) and crops[2][0].shape == (80 - 48, 100 - 67)  # clipped


def test_device_paste_equals_host_paste():
    """The packed device crops against the host's, boxes scaled from the resized image as
    `transforms.boxes_to_original` does: 60 random detections (3 invalid) on a shrunk and an
    enlarged image. Same crops everywhere; a pixel may differ only where the host's pasted
    probability is within 1e-6 of the threshold (measured: none)."""
    rng = np.random.default_rng(2)
    for resized_hw, original_hw in (((64, 89), (50, 70)), ((64, 96), (120, 180))):
        n = 60
        probs = rng.random((n, 28, 28), dtype=np.float32)
        xy = rng.uniform(-10, 90, (n, 2)).astype(np.float32)
        wh = rng.uniform(0.2, 60, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        valid = np.ones(n, bool)
        valid[[3, 17, 40]] = False
        out, got = _device_crops(probs, boxes, valid, resized_hw, original_hw, 1 << 20)
        np.testing.assert_array_equal(out["mask_pasted"], valid)
        original_boxes = transforms.boxes_to_original(boxes, resized_hw, original_hw)
        np.testing.assert_array_equal(out["paste_boxes"],
                                      masks.paste_boxes(original_boxes, 28))
        want = masks.paste_mask_crops(probs, original_boxes, original_hw, 0.5)
        padded = np.pad(probs, ((0, 0), (1, 1), (1, 1)))
        int_boxes = masks.paste_boxes(original_boxes, 28)
        for i in np.flatnonzero(valid):
            (g, g_xy), (w, w_xy) = got[i], want[i]
            assert g_xy == w_xy and g.shape == w.shape, i
            differs = g != w
            if differs.any():
                p = masks.paste_crop(padded[i], int_boxes[i], original_hw)
                assert np.all(np.abs(p[differs] - 0.5) < 1e-6), i
        assert all(got[i] is None for i in np.flatnonzero(~valid))


def test_device_paste_leaves_what_does_not_fit_to_the_host():
    """A capacity of 4000 pixels holds the first four crops; the fifth is the whole image (8000),
    so it and the ones after it are not pasted; the crops that are stay exact. Crop areas by
    hand: box 0 grows by 30/28 to x 8.52..61.98, y 11.69..41.91 -> 54 x 31 = 1674; box 1 to
    x -5.89..20.89, y -9.34..15.84, truncated toward zero and clipped -> 21 x 16 = 336; box 2
    to x 67.86.., y 48.39.. -> 33 x 32 = 1056 (clipped at 100, 80); the sub-pixel box 3 -> 2 x 2."""
    probs = np.random.default_rng(3).random((7, 28, 28), dtype=np.float32)
    out, got = _device_crops(probs, BOXES, np.ones(7, bool), IMAGE_HW, IMAGE_HW, 4000)
    areas = [c.size for c, _ in masks.paste_mask_crops(probs, BOXES, IMAGE_HW, 0.5)]
    assert areas[:5] == [1674, 336, 1056, 4, 8000]
    np.testing.assert_array_equal(out["mask_pasted"], [True] * 4 + [False] * 3)
    np.testing.assert_array_equal(out["mask_offsets"][:4], np.cumsum([0] + areas[:3]))
    want = masks.paste_mask_crops(probs, BOXES, IMAGE_HW, 0.5)
    for i in range(4):
        np.testing.assert_array_equal(got[i][0], want[i][0])
    assert got[4:] == [None] * 3
