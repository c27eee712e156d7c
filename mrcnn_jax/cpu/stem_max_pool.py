"""The ResNet stem's 3x3 stride-2 max pool as torch's `max_pool2d` (NHWC, padding with -inf),
as the max of the window's kh * kw strided slices: one elementwise loop, into which XLA fuses
the stem's affine and ReLU.

XLA:CPU runs `reduce_window` (flax's `nn.max_pool`) on one thread, a bfloat16 one through
float32, after a separate pass that writes the ReLU's output (docs/cpu_performance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             pads: Sequence[tuple[int, int]]) -> jax.Array:
    """x [B, H, W, C] -> [B, out_h, out_w, C], the max over each (kh, kw) window of x padded with
    -inf by pads ((top, bottom), (left, right)). The gradient goes to the first maximum of each
    window in raster order, as in torch's kernel and XLA's select-and-scatter."""
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, height, width, channels], got shape {x.shape}")
    window = tuple(int(k) for k in window)
    strides = tuple(int(s) for s in strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _max_pool_by_slices(x, window, strides, pads)


def _window_slices(x_padded, window, strides, out_hw):
    """(dy, dx, the pixels that tap (dy, dx) of every window reads: [B, out_h, out_w, C])."""
    n, _, _, c = x_padded.shape
    (sy, sx), (out_h, out_w) = strides, out_hw
    for dy in range(window[0]):
        for dx in range(window[1]):
            yield dy, dx, lax.slice(x_padded, (0, dy, dx, 0),
                                    (n, dy + (out_h - 1) * sy + 1, dx + (out_w - 1) * sx + 1, c),
                                    (1, sy, sx, 1))


def _out_hw(x, window, strides, pads):
    return tuple((x.shape[1 + a] + sum(pads[a]) - window[a]) // strides[a] + 1 for a in range(2))


def _pad_and_shape(x, window, strides, pads):
    x_padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    return x_padded, _out_hw(x, window, strides, pads)


def _valid_range(size: int, offset: int, stride: int, pad_lo: int, out_size: int):
    """(first, last) output index whose tap `offset` (in padded coordinates) falls inside the
    unpadded axis of `size`; first > last when none does."""
    first = max(0, -(-(pad_lo - offset) // stride))
    last = min(out_size - 1, (size - 1 + pad_lo - offset) // stride)
    return first, last


def _unpadded_tap(x, dy, dx, strides, pads, out_hw):
    """Tap (dy, dx) of every window, [B, out_h, out_w, C]: a strided slice of x itself, padded
    with -inf only where the window overhangs."""
    n, height, width, c = x.shape
    (fy, ly), (fx, lx) = (_valid_range(size, off, st, pad[0], out)
                          for size, off, st, pad, out in zip((height, width), (dy, dx), strides,
                                                             pads, out_hw))
    if fy > ly or fx > lx:
        return jnp.full((n, *out_hw, c), -jnp.inf, x.dtype)
    (sy, sx), (py, px) = strides, (pads[0][0], pads[1][0])
    y0, x0 = fy * sy + dy - py, fx * sx + dx - px
    tap = lax.slice(x, (0, y0, x0, 0), (n, y0 + (ly - fy) * sy + 1, x0 + (lx - fx) * sx + 1, c),
                    (1, sy, sx, 1))
    return jnp.pad(tap, ((0, 0), (fy, out_hw[0] - 1 - ly), (fx, out_hw[1] - 1 - lx), (0, 0)),
                   constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_by_slices(x, window, strides, pads):
    # Padding each small tap rather than x lets XLA fuse the taps, and the affine and ReLU
    # before them, into one loop that writes no padded copy of x (the stem at batch 1: 32 ms of
    # a padded copy and the loop, 8 ms without the copy).
    out_hw = _out_hw(x, window, strides, pads)
    return functools.reduce(jnp.maximum, (_unpadded_tap(x, dy, dx, strides, pads, out_hw)
                                          for dy in range(window[0]) for dx in range(window[1])))


def _max_pool_fwd(x, window, strides, pads):
    # Differentiated, the backward pass reads x padded anyway: one padded copy serves both
    # (forward and gradient 112 ms against 169 ms with the taps above).
    x_padded, out_hw = _pad_and_shape(x, window, strides, pads)
    out = functools.reduce(jnp.maximum,
                           (tap for _, _, tap in _window_slices(x_padded, window, strides, out_hw)))
    return out, (x_padded, out)


def _max_pool_bwd(window, strides, pads, residuals, d_out):
    x_padded, out = residuals
    out_hw = out.shape[1:3]
    (sy, sx), (height, width) = strides, x_padded.shape[1:3]
    d_out = d_out.astype(jnp.float32)  # a pixel in several windows sums their gradients
    taken = jnp.zeros(out.shape, bool)
    d_padded = None
    for dy, dx, tap in _window_slices(x_padded, window, strides, out_hw):
        first_max = (tap == out) & ~taken
        taken = taken | first_max
        # The transpose of the strided slice: back to the tap's pixels, zeros between.
        placed = lax.pad(jnp.where(first_max, d_out, 0.0), jnp.float32(0),
                         ((0, 0, 0),
                          (dy, height - dy - (out_hw[0] - 1) * sy - 1, sy - 1),
                          (dx, width - dx - (out_hw[1] - 1) * sx - 1, sx - 1),
                          (0, 0, 0)))
        d_padded = placed if d_padded is None else d_padded + placed
    (top, bottom), (left, right) = pads
    d_x = d_padded[:, top:height - bottom, left:width - right]
    return (d_x.astype(x_padded.dtype),)


_max_pool_by_slices.defvjp(_max_pool_fwd, _max_pool_bwd)
