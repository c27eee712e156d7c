"""torchvision's inference transform (normalise, bilinear resize, pad) as one device program.

`mrcnn_jax.transforms` computes the same thing on the host in numpy; this form runs where the
model runs, so the host only copies each image's uint8 pixels into a bucketed raw batch and
computes the per-row / per-column source taps (`axis_taps`: torch's float32 source coordinates,
exact). The device then does, per image and in torchvision's order:

    x = raw / 255                                (uint8 inputs; float inputs are already in [0, 1])
    x = (x - mean) / std
    horizontal[r, c] = x[r, col0[c]] * wcol0[c] + x[r, col1[c]] * wcol1[c]
    canvas[r, c] = horizontal[row0[r], c] * wrow0[r] + horizontal[row1[r], c] * wrow1[r]

Canvas rows / columns past the resized size have zero weights, so the padding is zero as in
torchvision's batching. The result equals the host form up to float32 rounding (XLA may use a
reciprocal for the divisions and fused multiply-adds: ≤ 1e-6 measured on photos).

Shapes: B images, Hb x Wb the raw bucket (>= every original H x W), Hc x Wc the canvas, C = 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.bilinear import bilinear_source_taps


def axis_taps(in_size: int, out_size: int, canvas_size: int) -> tuple[np.ndarray, ...]:
    """Source taps of torch's bilinear resize `in_size -> out_size` along one axis, padded to
    `canvas_size` with zero weights.

    Returns (index0, index1 [canvas_size] int32, weight0, weight1 [canvas_size] float32).
    """
    if out_size > canvas_size:
        raise ValueError(f"resized size {out_size} does not fit the canvas size {canvas_size}")
    i0, i1, w0, w1 = bilinear_source_taps(in_size, out_size)
    pad = canvas_size - out_size
    return (np.pad(i0.astype(np.int32), (0, pad)), np.pad(i1.astype(np.int32), (0, pad)),
            np.pad(w0, (0, pad)), np.pad(w1, (0, pad)))


def normalize_resize_pad(
    raw: jax.Array,
    row_taps: Sequence[jax.Array],
    col_taps: Sequence[jax.Array],
    mean: Sequence[float],
    std: Sequence[float],
) -> jax.Array:
    """Raw images -> the model's normalised canvas batch (module docstring).

    Args:
      raw: [B, Hb, Wb, C] uint8 (0..255) or float ([0, 1]) pixels, each image at the top left.
      row_taps: (row0, row1 [B, Hc] int32, wrow0, wrow1 [B, Hc] float32) from `axis_taps`.
      col_taps: (col0, col1 [B, Wc] int32, wcol0, wcol1 [B, Wc] float32) from `axis_taps`.
      mean, std: per-channel normalisation (C values each).
    Returns:
      [B, Hc, Wc, C] float32.
    """
    x = raw.astype(jnp.float32)
    if raw.dtype == jnp.uint8:
        x = x / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

    def one(image, rows, cols):
        r0, r1, wr0, wr1 = rows
        c0, c1, wc0, wc1 = cols
        horizontal = image[:, c0] * wc0[:, None] + image[:, c1] * wc1[:, None]
        return horizontal[r0] * wr0[:, None, None] + horizontal[r1] * wr1[:, None, None]

    return jax.vmap(one)(x, tuple(row_taps), tuple(col_taps))
