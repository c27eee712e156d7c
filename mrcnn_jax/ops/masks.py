"""Pasting the 28x28 mask probabilities of detections into full-size images (inference).

`paste_masks_in_image` is torchvision's `paste_masks_in_image` (the Detectron convention): pad
the M x M mask by one pixel (so the box grows by (M + 2) / M about its centre), truncate the
expanded box to integers, bilinearly resize the padded mask to the box's integer size (half-pixel
centres, no antialias) and write it into a zero image; `threshold` then binarises.

Two forms of the same rule:

- host (numpy): `paste_masks_in_image` gives the dense [D, H, W] masks; `paste_mask_crops` only
  each mask's crop (its integer box clipped to the image, where the mask can be nonzero), so the
  work is proportional to the boxes' areas and nothing of size D x H x W is ever allocated.
- device (jnp, static shapes): `paste_masks_packed` computes every detection's thresholded crop
  in one flat buffer of `capacity` pixels per image, bit-packed, so only the crops (1 bit a
  pixel) cross to the host; `unpack_crops` splits them there. The per-pixel arithmetic is the
  host's in float32, in the same order; an accelerator may fuse a multiply and an add into one
  rounding, so a pixel whose pasted probability lies within ~1e-6 of the threshold may come out
  differently, as against torchvision itself (tests/modeling/test_transforms.py). The crops of
  detections past `capacity` are left to the host (`pasted` False).

Mask *targets* for training live in `ops/mask_targets.py`.

Shapes: D = detections, M = mask resolution (28), G = M + 2 padding, H, W = image size,
C = capacity (pixels per image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.bilinear import resize_bilinear


def expand_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Grow boxes [D, 4] about their centres by `scale` (float32 arithmetic as torchvision)."""
    boxes = np.asarray(boxes, np.float32)
    scale = np.float32(scale)
    w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    return np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)


def clip_box(box: np.ndarray, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """An integer paste box (x1, y1, x2, y2), inclusive, -> its crop (xa, ya, xb, yb) inside the
    image, exclusive ends (empty when the box lies outside)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    xa, xb = max(x1, 0), min(x2 + 1, int(image_hw[1]))
    ya, yb = max(y1, 0), min(y2 + 1, int(image_hw[0]))
    return xa, ya, max(xb, xa), max(yb, ya)


def paste_crop(mask: np.ndarray, box: np.ndarray, image_hw: tuple[int, int],
               threshold: float | None = None) -> np.ndarray:
    """One padded mask [G, G] resized to the integer box and cut to `clip_box(box, image_hw)`:
    [yb - ya, xb - xa] float32, or bool (`resized > threshold`) with `threshold`."""
    x1, y1, x2, y2 = (int(v) for v in box)
    xa, ya, xb, yb = clip_box(box, image_hw)
    if xb <= xa or yb <= ya:
        return np.zeros((yb - ya, xb - xa), np.float32 if threshold is None else bool)
    w = max(x2 - x1 + 1, 1)  # torchvision's "TO_REMOVE = 1": integer boxes are inclusive
    h = max(y2 - y1 + 1, 1)
    resized = resize_bilinear(mask, (h, w))[ya - y1 : yb - y1, xa - x1 : xb - x1]
    return resized if threshold is None else resized > np.float32(threshold)


def paste_mask(
    mask: np.ndarray, box: np.ndarray, out: np.ndarray, threshold: float | None = None
) -> None:
    """Write one padded mask [G, G] into the zero image `out` [H, W] at the integer box.

    box: [4] int (x1, y1, x2, y2), inclusive integer corners as in torchvision. With `threshold`,
    `out` is bool and receives `resized > threshold`.
    """
    xa, ya, xb, yb = clip_box(box, out.shape)
    if xb > xa and yb > ya:
        out[ya:yb, xa:xb] = paste_crop(mask, box, out.shape, threshold)


def paste_boxes(boxes: np.ndarray, mask_size: int, padding: int = 1) -> np.ndarray:
    """Detection boxes [D, 4] -> torchvision's integer paste boxes [D, 4] int64 (inclusive):
    grown by (M + 2 padding) / M and truncated toward zero."""
    scale = float(mask_size + 2 * padding) / mask_size
    # int64 conversion truncates toward zero, like torch's `.to(torch.int64)`.
    return expand_boxes(boxes, scale).astype(np.int64)


def paste_masks_in_image(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    padding: int = 1,
    threshold: float | None = None,
) -> np.ndarray:
    """Paste mask probabilities into the image, as torchvision's `paste_masks_in_image`.

    Args:
      masks: [D, M, M] float mask probabilities of each detection's class.
      boxes: [D, 4] xyxy boxes in the pixels of the target image.
      image_hw: (H, W) of the target image.
      padding: pixels added around the M x M grid (1 in torchvision).
      threshold: None returns the pasted probabilities (float32); a value (0.5 in Mask R-CNN)
        returns `probs > threshold` as bool.
    Returns:
      [D, H, W] float32 probabilities, or bool masks when `threshold` is given.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be [D, M, M], got shape {masks.shape}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be [D, 4] with D = {masks.shape[0]}, got shape {boxes.shape}")
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    int_boxes = paste_boxes(boxes, masks.shape[-1], padding)
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    out = np.zeros((masks.shape[0], im_h, im_w), np.float32 if threshold is None else bool)
    for i in range(masks.shape[0]):
        paste_mask(padded[i], int_boxes[i], out[i], threshold)
    return out


def paste_mask_crops(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float,
    padding: int = 1,
) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Host form without the dense array: per detection (its thresholded crop [h, w] bool, the
    crop's top-left (x, y) in the image); `paste_masks_in_image` is these crops in zeros.

    masks: [D, M, M] probabilities; boxes: [D, 4] xyxy in the image's pixels.
    """
    masks = np.asarray(masks, np.float32)
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    int_boxes = paste_boxes(np.asarray(boxes, np.float32), masks.shape[-1], padding)
    return [(paste_crop(padded[i], int_boxes[i], image_hw, threshold),
             clip_box(int_boxes[i], image_hw)[:2]) for i in range(masks.shape[0])]


def crops_to_dense(crops: list[tuple[np.ndarray, tuple[int, int]]],
                   image_hw: tuple[int, int]) -> np.ndarray:
    """`paste_mask_crops`' crops -> the dense [D, H, W] bool masks."""
    out = np.zeros((len(crops), int(image_hw[0]), int(image_hw[1])), bool)
    for i, (crop, (x, y)) in enumerate(crops):
        out[i, y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    return out


def paste_masks_packed(
    mask_probs: jax.Array,
    boxes: jax.Array,
    valid: jax.Array,
    resized_hw: jax.Array,
    original_hw: jax.Array,
    capacity: int,
    threshold: float,
    padding: int = 1,
) -> dict[str, jax.Array]:
    """Device form: the thresholded crops of a batch's detections, packed (module docstring).

    Per image, the crops of its valid detections (each its paste box clipped to the original
    image, row-major) follow each other in a buffer of `capacity` pixels, as long as they fit.

    Args:
      mask_probs: [B, D, M, M] probabilities of each detection's class.
      boxes: [B, D, 4] xyxy in the pixels of the resized image (the model's output); scaled to
        original pixels by `transforms.boxes_to_original`'s float32 ratios original / resized.
      valid: [B, D] bool.
      resized_hw, original_hw: [B, 2] int32 (h, w) fed to the model, (H, W) of the input image.
      capacity: pixels per image, a multiple of 8 (static).
      threshold: masks are `pasted probability > threshold`.
    Returns:
      mask_bits [B, C / 8] uint8 (`jnp.packbits`, big bit order), paste_boxes [B, D, 4] int32
      (x1, y1, x2, y2 inclusive, `paste_boxes`), mask_offsets [B, D] int32 (a crop's first pixel
      in the buffer), mask_pasted [B, D] bool (valid and inside the capacity).
    """
    if capacity <= 0 or capacity % 8:
        raise ValueError(f"capacity must be a positive multiple of 8, got {capacity}")
    if mask_probs.ndim != 4 or mask_probs.shape[-1] != mask_probs.shape[-2]:
        raise ValueError(f"mask_probs must be [B, D, M, M], got shape {mask_probs.shape}")
    f32 = jnp.float32
    m = mask_probs.shape[-1]
    g = m + 2 * padding
    ratio_hw = original_hw.astype(f32) / resized_hw.astype(f32)  # boxes_to_original's ratios
    scale = f32(float(g) / m)
    half = f32(0.5)

    def one(probs, boxes, valid, image_hw, ratio):
        boxes = boxes.astype(f32) * jnp.tile(ratio[::-1], 2)
        # expand_boxes, operation by operation.
        w_half = (boxes[:, 2] - boxes[:, 0]) * half * scale
        h_half = (boxes[:, 3] - boxes[:, 1]) * half * scale
        x_c = (boxes[:, 2] + boxes[:, 0]) * half
        y_c = (boxes[:, 3] + boxes[:, 1]) * half
        ib = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half],
                       axis=1).astype(jnp.int32)  # truncation toward zero
        x1, y1, x2, y2 = ib[:, 0], ib[:, 1], ib[:, 2], ib[:, 3]
        w = jnp.maximum(x2 - x1 + 1, 1)
        h = jnp.maximum(y2 - y1 + 1, 1)
        xa, xb = jnp.maximum(x1, 0), jnp.minimum(x2 + 1, image_hw[1])
        ya, yb = jnp.maximum(y1, 0), jnp.minimum(y2 + 1, image_hw[0])
        cw, ch = jnp.maximum(xb - xa, 0), jnp.maximum(yb - ya, 0)
        area = jnp.where(valid, cw * ch, 0)
        ends = jnp.cumsum(area)
        offsets = ends - area
        pasted = valid & (ends <= capacity)

        pos = jnp.arange(capacity, dtype=jnp.int32)
        # The crop that holds each position: how many crops end at or before it (searchsorted
        # by one scatter of D marks and a prefix sum, cheaper than C binary searches).
        marks = jnp.zeros(capacity + 1, jnp.int32).at[jnp.minimum(ends, capacity)].add(1)
        det = jnp.cumsum(marks[:capacity])
        inside = det < probs.shape[0]
        det = jnp.minimum(det, probs.shape[0] - 1)
        inside &= pasted[det]
        local = pos - offsets[det]
        width = jnp.maximum(cw[det], 1)
        row = local // width
        col = local - row * width

        def taps(index, size):  # ops.bilinear.bilinear_source_taps for in_size G
            src = (f32(g) / size.astype(f32)) * (index.astype(f32) + half) - half
            src = jnp.maximum(src, f32(0.0))
            i0 = src.astype(jnp.int32)
            return i0, jnp.minimum(i0 + 1, g - 1), src - i0.astype(f32)

        y0i, y1i, ly1 = taps(ya[det] + row - y1[det], h[det])
        x0i, x1i, lx1 = taps(xa[det] + col - x1[det], w[det])
        flat = jnp.pad(probs.astype(f32), ((0, 0), (padding, padding), (padding, padding)))
        flat = flat.reshape(-1)
        base = det * (g * g)

        def at(yi, xi):
            return flat[base + yi * g + xi]

        lx0, ly0 = f32(1.0) - lx1, f32(1.0) - ly1
        # resize_bilinear's order: along x, then y.
        top = at(y0i, x0i) * lx0 + at(y0i, x1i) * lx1
        bottom = at(y1i, x0i) * lx0 + at(y1i, x1i) * lx1
        value = top * ly0 + bottom * ly1
        bits = jnp.packbits(inside & (value > f32(threshold)))
        return bits, ib, offsets, pasted

    bits, ib, offsets, pasted = jax.vmap(one)(mask_probs, boxes, valid,
                                              original_hw.astype(jnp.int32), ratio_hw)
    return {"mask_bits": bits, "paste_boxes": ib, "mask_offsets": offsets,
            "mask_pasted": pasted}


def unpack_crops(
    mask_bits: np.ndarray, paste_boxes: np.ndarray, mask_offsets: np.ndarray,
    mask_pasted: np.ndarray, image_hw: tuple[int, int],
) -> list[tuple[np.ndarray, tuple[int, int]] | None]:
    """One image's `paste_masks_packed` output (numpy) -> per detection (crop [h, w] bool, its
    top-left (x, y)) as `paste_mask_crops` gives it, or None where not pasted."""
    crops = [clip_box(b, image_hw) for b in paste_boxes]
    areas = [(xb - xa) * (yb - ya) for xa, ya, xb, yb in crops]
    used = max((int(o) + a for o, a, p in zip(mask_offsets, areas, mask_pasted) if p), default=0)
    flat = np.unpackbits(np.asarray(mask_bits)[:(used + 7) // 8], count=used).view(bool)
    out = []
    for (xa, ya, xb, yb), area, offset, pasted in zip(crops, areas, mask_offsets, mask_pasted):
        if not pasted:
            out.append(None)
            continue
        offset = int(offset)
        out.append((flat[offset:offset + area].reshape(yb - ya, xb - xa), (xa, ya)))
    return out
