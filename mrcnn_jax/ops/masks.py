"""Pasting the 28x28 mask probabilities of detections into full-size images (inference).

`paste_masks_in_image` is torchvision's `paste_masks_in_image` (the Detectron convention): pad
the M x M mask by one pixel (so the box grows by (M + 2) / M about its centre), truncate the
expanded box to integers, bilinearly resize the padded mask to the box's integer size (half-pixel
centres, no antialias) and write it into a zero image; `threshold` then binarises.

It runs on the host in numpy, by choice: the output is [D, H, W] at the *original* image size,
which differs per image (one compile per size otherwise) and is large (100 x H x W), and every
detection has its own integer paste size, which static shapes could only express as a gather over
all H x W pixels per detection (the cost torchvision avoids by resizing to the box only). On the
host the work is proportional to the boxes' areas. Mask *targets* for training live in
`ops/mask_targets.py`.

Shapes: D = detections, M = mask resolution (28), H, W = image size.
"""

from __future__ import annotations

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


def paste_mask(
    mask: np.ndarray, box: np.ndarray, out: np.ndarray, threshold: float | None = None
) -> None:
    """Write one padded mask [M + 2, M + 2] into the zero image `out` [H, W] at the integer box.

    box: [4] int (x1, y1, x2, y2), inclusive integer corners as in torchvision. With `threshold`,
    `out` is bool and receives `resized > threshold`.
    """
    im_h, im_w = out.shape
    x1, y1, x2, y2 = (int(v) for v in box)
    w = max(x2 - x1 + 1, 1)  # torchvision's "TO_REMOVE = 1": integer boxes are inclusive
    h = max(y2 - y1 + 1, 1)
    xa, xb = max(x1, 0), min(x2 + 1, im_w)
    ya, yb = max(y1, 0), min(y2 + 1, im_h)
    if xb <= xa or yb <= ya:
        return
    resized = resize_bilinear(mask, (h, w))[ya - y1 : yb - y1, xa - x1 : xb - x1]
    out[ya:yb, xa:xb] = resized if threshold is None else resized > np.float32(threshold)


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
    m = masks.shape[-1]
    scale = float(m + 2 * padding) / m
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    # int64 conversion truncates toward zero, like torch's `.to(torch.int64)`.
    int_boxes = expand_boxes(boxes, scale).astype(np.int64)
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    out = np.zeros((masks.shape[0], im_h, im_w), np.float32 if threshold is None else bool)
    for i in range(masks.shape[0]):
        paste_mask(padded[i], int_boxes[i], out[i], threshold)
    return out
