"""torch's bilinear resize (`F.interpolate(mode="bilinear", align_corners=False)`) on the host.

Half-pixel centres, source coordinates clamped at 0, **no antialiasing** (torch's default, also
when shrinking), the source scale in float32 as in_size / out_size: the arithmetic of torch's CPU
`upsample_bilinear2d`, so results equal torch's to the bit. The input transform
(`mrcnn_jax.transforms`), its device form (`ops/image_resize.py`) and mask pasting
(`ops/masks.py`) all resample through these taps; they live in ops, the bottom layer, so that
each of them may import them.

Shapes: H, W = input; h, w = output; C = channels.
"""

from __future__ import annotations

import numpy as np


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
