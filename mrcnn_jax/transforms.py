"""The inference input transform, equal to torchvision's `GeneralizedRCNNTransform`.

Host-side numpy, the reference form (`Predictor` runs the same steps on the device:
`mrcnn_jax.ops.image_resize`). Steps, in torchvision's order:

1. `to_float_image`: uint8 RGB -> float32 in [0, 1] (what `ToTensor` gives torchvision users).
2. `normalize`: (x - mean) / std per channel.
3. `resize_image`: scale = min(min_size / short side, max_size / long side); the new size is
   `floor(side * scale)` computed in float64 (torch's `recompute_scale_factor=True` path), then
   bilinear interpolation with half-pixel centres, **no antialiasing**, and the source scale
   recomputed as in_size / out_size (float32), exactly as torch's CPU `upsample_bilinear2d` does.
4. `pad_to_canvas`: zero padding at the bottom/right to a canvas (torchvision pads each batch to the
   max size rounded up to a multiple of 32; `canvas_for` computes that size).

`boxes_to_original` maps detections back with torchvision's float32 ratios original / resized.

Shapes: H, W = original image; h, w = resized; Hc, Wc = canvas; B = batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rgb_array(image) -> np.ndarray:
    """RGB image (PIL, uint8 [H, W, 3] or float [H, W, 3] in [0, 1]; gray and RGBA converted)
    -> [H, W, 3] uint8 or float32, the pixel values unchanged."""
    if hasattr(image, "convert"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {image.dtype}")
    return image.astype(np.float32, copy=False)


def to_float_image(image) -> np.ndarray:
    """RGB image (as `rgb_array` takes it) -> float32 [H, W, 3] in [0, 1]."""
    image = rgb_array(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image - mean) / std per channel; image: [H, W, 3] float32 -> [H, W, 3] float32."""
    h, w, c = image.shape
    # On rows of w * c values: numpy broadcasting over a minor axis of 3 runs ~5x slower.
    mean = np.tile(np.asarray(mean, np.float32), w)
    std = np.tile(np.asarray(std, np.float32), w)
    out = np.subtract(image.reshape(h, w * c), mean, dtype=np.float32)
    np.divide(out, std, out=out)
    return out.reshape(h, w, c)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after torchvision's resize: floor(side * min(min/short, max/long)), float64 math."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def bilinear_source_taps(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source taps of torch's bilinear resize (align_corners=False) along one axis: per output
    index, (index0, index1 [out_size] int64, weight0, weight1 [out_size] float32)."""
    scale = np.float32(in_size) / np.float32(out_size)
    # torch's C++ `scale * (dst + 0.5) - 0.5` compiles to a fused multiply-add: one rounding of
    # the exact value, which float64 arithmetic reproduces (the product of two float32 is exact).
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = np.float32(1.0) - l1
    return i0, i1, l0, l1


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize as torch's `F.interpolate(mode="bilinear", align_corners=False)`.

    No antialiasing (torch's default), also when shrinking.

    Args:
      image: [H, W] or [H, W, C] float32.
      out_hw: (h, w) output size, each >= 1.
    Returns:
      [h, w] or [h, w, C] float32.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"out_hw must be positive, got {out_hw}")
    in_h = image.shape[0]
    channels = image.shape[2] if image.ndim == 3 else 1
    y0, y1, ly0, ly1 = bilinear_source_taps(in_h, out_h)
    x0, x1, lx0, lx1 = bilinear_source_taps(image.shape[1], out_w)
    # Along x first, then y, with torch's operation order (so the result is unchanged to the
    # bit); each row is one [in_w * C] vector and each output column a gather of C contiguous
    # values, which numpy runs ~5x faster than fancy indexing of the [H, W, C] array.
    image = np.asarray(image)
    if image.dtype != np.float64:  # torch's float32 math (uint8 / bool / float16 promote to it)
        image = image.astype(np.float32, copy=False)
    rows = image.reshape(in_h, -1)
    ch = np.arange(channels)
    cols0 = (x0[:, None] * channels + ch).ravel()
    cols1 = (x1[:, None] * channels + ch).ravel()
    w0, w1 = np.repeat(lx0, channels), np.repeat(lx1, channels)

    def along_x(r: np.ndarray) -> np.ndarray:
        out = np.take(r, cols0, axis=1)
        out *= w0
        right = np.take(r, cols1, axis=1)
        right *= w1
        out += right
        return out

    if 2 * out_h < in_h:  # shrinking: only the rows the output reads
        top, bottom = along_x(rows[y0]), along_x(rows[y1])
    else:  # each input row once
        horizontal = along_x(rows)
        top, bottom = horizontal[y0], horizontal[y1]
    top *= ly0[:, None]
    bottom *= ly1[:, None]
    top += bottom
    return top.reshape((out_h, out_w) + image.shape[2:]).astype(np.float32, copy=False)


def preprocess_image(
    image, min_size: int, max_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """One image -> (normalised resized [h, w, 3] float32, (h, w), original (H, W))."""
    image = to_float_image(image)
    original_hw = (int(image.shape[0]), int(image.shape[1]))
    new_hw = resized_size(*original_hw, min_size, max_size)
    image = resize_bilinear(normalize(image, mean, std), new_hw)
    return image, new_hw, original_hw


def canvas_for(sizes_hw: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """torchvision's batch canvas: the max (h, w) over the batch rounded up to the divisibility."""
    d = int(size_divisibility)
    h = max(int(s[0]) for s in sizes_hw)
    w = max(int(s[1]) for s in sizes_hw)
    return -(-h // d) * d, -(-w // d) * d


def pad_to_canvas(images: Sequence[np.ndarray], canvas_hw: tuple[int, int]) -> np.ndarray:
    """Zero-pad each [h, w, 3] image at the bottom/right into one [B, Hc, Wc, 3] float32 batch."""
    hc, wc = int(canvas_hw[0]), int(canvas_hw[1])
    out = np.zeros((len(images), hc, wc, 3), np.float32)
    for i, img in enumerate(images):
        if img.shape[0] > hc or img.shape[1] > wc:
            raise ValueError(
                f"image {i} of size {img.shape[:2]} does not fit canvas_hw {canvas_hw}"
            )
        out[i, : img.shape[0], : img.shape[1]] = img
    return out


def boxes_to_original(
    boxes: np.ndarray, resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> np.ndarray:
    """Scale boxes [..., 4] (xyxy, resized pixels) to original pixels (torchvision's float32
    ratios original / resized per axis)."""
    boxes = np.asarray(boxes, np.float32)
    ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
    ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
    ratios = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    return boxes * ratios
