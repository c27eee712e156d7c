"""2-D convolutions whose forward and gradients XLA:CPU runs fast: per-tap kernel gradients,
Winograd's minimal filtering, 1x1 convolutions as matrix products.

XLA:CPU lowers a convolution's kernel ("weight") gradient to a backward-filter convolution several
times slower than the forward pass for the backbone/FPN shapes; the same gradient is one matrix
product per kernel tap,

    d kernel[dy, dx] = x_shifted(dy, dx)^T @ d out,   x_shifted: [batch * out_h * out_w, in]

where `x_shifted` is the (strided) window of the padded input that tap (dy, dx) multiplies. The
input gradient of a stride-1 convolution is the forward convolution of the flipped kernel
(`input_grad_by_flipped_kernel`), of a strided one one such convolution per input phase
(`input_grad_by_phases`), of a grouped one XLA's. A 1x1 convolution without padding is a matrix
product over channels, forward and backward. In bfloat16 the kernel gradient contracts a
transposed copy of the input ([in, pixels]), the operand order in which XLA:CPU runs bf16
products on the matrix units (`_bf16_kernel_grad_by_taps`), and a stride-1 forward convolution is
one product per tap (`conv_by_taps`) or, for a 3x3 kernel over many tiles, Winograd F(2x2, 3x3)
(`conv3x3_winograd`, with its kernel gradient `kernel_grad_winograd`). In float32 a stride-1 3x3
convolution with enough channels and tiles is Winograd F(4x4, 3x3) (`conv3x3_winograd4`), its
kernel gradient F(4x4, 3x3) or F(2x2, 3x3) by the same criteria (`f32_kernel_grad_impl`).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv` takes it as
`conv_general_dilated=`); modeling/conv.py uses it under `model.conv_impl="cpu"` only. Each form
is chosen from the shapes ("auto"); `ConvForms` forces one, for tests and benchmarks/conv_grad.py.
docs/cpu_performance.md has the measurements behind each criterion.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mrcnn_jax.cpu.matmul import dense, matmul_f32, unfused

_NHWC = ("NHWC", "HWIO", "NHWC")

BF16_FORWARD_FORMS = ("auto", "taps", "winograd")
F32_FORWARD_FORMS = ("auto", "xla", "winograd")
F32_KERNEL_GRAD_FORMS = ("auto", "taps", "winograd", "winograd4")


@dataclasses.dataclass(frozen=True)
class ConvForms:
    """Which form each convolution takes; "auto" chooses from the shapes (the model's setting).

    bf16_forward: a bfloat16 stride-1 forward convolution and its kernel gradient (`taps` or
      `winograd` F(2x2, 3x3)); f32_forward: a float32 stride-1 forward convolution (`xla` or
      `winograd` F(4x4, 3x3)); f32_kernel_grad: a float32 stride-1 kernel gradient (`taps`,
      `winograd` F(2x2, 3x3) or `winograd4` F(4x4, 3x3)). Kernels other than 3x3 always take the
      form that is not Winograd's.
    """

    bf16_forward: str = "auto"
    f32_forward: str = "auto"
    f32_kernel_grad: str = "auto"

    def __post_init__(self):
        for name, allowed in (("bf16_forward", BF16_FORWARD_FORMS),
                              ("f32_forward", F32_FORWARD_FORMS),
                              ("f32_kernel_grad", F32_KERNEL_GRAD_FORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ConvForms.{name}={getattr(self, name)!r}: expected one of "
                                 f"{', '.join(allowed)}")


AUTO = ConvForms()


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    forms: ConvForms = AUTO,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` with the forms of the module doc where they apply (NHWC/HWIO,
    no dilation, grouped or not); anything else is XLA's own.

    lhs: [batch, height, width, in], rhs: [kh, kw, in / groups, out] for the tap form.
    """
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    # flax passes ConvDimensionNumbers of axis indices, tests and callers may pass strings.
    nhwc = (dimension_numbers is not None and lhs.ndim == 4
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if kwargs or dilated or not nhwc or lhs.ndim != 4:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)) and feature_group_count == 1:
        return _pointwise_conv(lhs, rhs, tuple(int(s) for s in window_strides), precision)
    return _conv_taps(lhs, rhs, tuple(int(s) for s in window_strides), pads,
                      int(feature_group_count), precision, forms)


def _xla_conv(x, kernel, strides, pads, groups, precision):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC,
                                    feature_group_count=groups, precision=precision)


def _output_tiles(x_shape: Sequence[int], pads: Sequence[tuple[int, int]], tile: int = 2
                  ) -> int:
    """The tile x tile output tiles of a stride-1 3x3 convolution of an [n, h, w, c] input."""
    return int(x_shape[0] * np.prod([-(-(size + lo + hi - 2) // tile)
                                     for size, (lo, hi) in zip(x_shape[1:3], pads)]))


def _chosen(choice: str, kernel_shape: Sequence[int], auto_form: str, other: str) -> str:
    """`choice`, or `auto_form` where it says auto; kernels other than 3x3 always take `other`
    (the form that is not Winograd's)."""
    if tuple(kernel_shape[:2]) != (3, 3):
        return other
    return auto_form if choice == "auto" else choice


def bf16_forward_impl(x_shape: Sequence[int], kernel_shape: Sequence[int],
                      pads: Sequence[tuple[int, int]], choice: str = "auto") -> str:
    """"winograd" or "taps": the form of a bfloat16 stride-1 ungrouped forward convolution
    (and of its kernel gradient). Winograd's transforms are memory-bound passes that pay off
    only over `WINOGRAD_MIN_TILES` output tiles or more."""
    return _chosen(choice, kernel_shape,
                   "winograd" if _output_tiles(x_shape, pads) >= WINOGRAD_MIN_TILES else "taps",
                   "taps")


def f32_kernel_grad_impl(x_shape: Sequence[int], kernel_shape: Sequence[int],
                         pads: Sequence[tuple[int, int]], choice: str = "auto") -> str:
    """"winograd4", "winograd" or "taps": the form of a float32 stride-1 ungrouped kernel
    gradient: F(4x4, 3x3) (`kernel_grad_winograd4`) where the forward takes it
    (`_winograd4_pays`), else F(2x2, 3x3) (`kernel_grad_winograd`) over at least
    `WINOGRAD_MIN_TILES_F32_KERNEL_GRAD` 2x2 tiles, else per-tap products."""
    if _winograd4_pays(x_shape, kernel_shape, pads):
        auto_form = "winograd4"
    elif _output_tiles(x_shape, pads) >= WINOGRAD_MIN_TILES_F32_KERNEL_GRAD:
        auto_form = "winograd"
    else:
        auto_form = "taps"
    return _chosen(choice, kernel_shape, auto_form, "taps")


def _winograd4_pays(x_shape: Sequence[int], kernel_shape: Sequence[int],
                    pads: Sequence[tuple[int, int]]) -> bool:
    """Enough channels and 4x4 output tiles for F(4x4, 3x3) to beat the float32 alternatives
    (with fewer channels the transforms cost more than the shorter sums save)."""
    return (tuple(kernel_shape[:2]) == (3, 3)
            and min(kernel_shape[2], kernel_shape[3]) >= WINOGRAD4_MIN_CHANNELS
            and _output_tiles(x_shape, pads, 4) >= WINOGRAD4_MIN_TILES)


def f32_forward_impl(x_shape: Sequence[int], kernel_shape: Sequence[int],
                     pads: Sequence[tuple[int, int]], choice: str = "auto") -> str:
    """"winograd" or "xla": the form of a float32 stride-1 ungrouped forward convolution (so also
    of every stride-1 input gradient, `input_grad_by_flipped_kernel`): F(4x4, 3x3)
    (`conv3x3_winograd4`) where `_winograd4_pays`, else XLA's (near the CPU's peak)."""
    return _chosen(choice, kernel_shape,
                   "winograd" if _winograd4_pays(x_shape, kernel_shape, pads) else "xla", "xla")


def _forward_uses_winograd(x, kernel, strides, pads, groups, forms) -> bool:
    return (x.dtype == jnp.bfloat16 and strides == (1, 1) and groups == 1
            and bf16_forward_impl(x.shape, kernel.shape, pads, forms.bf16_forward) == "winograd")


def _kernel_grad_form(x, kernel, strides, pads, groups, forms) -> str:
    """"winograd4", "winograd" or "taps": bfloat16 with the forward (`bf16_forward_impl`),
    float32 `f32_kernel_grad_impl`."""
    if strides != (1, 1) or groups != 1:
        return "taps"
    if x.dtype == jnp.bfloat16:
        return bf16_forward_impl(x.shape, kernel.shape, pads, forms.bf16_forward)
    if x.dtype == jnp.float32:
        return f32_kernel_grad_impl(x.shape, kernel.shape, pads, forms.f32_kernel_grad)
    return "taps"


def _forward_conv(x, kernel, strides, pads, groups, precision, forms=AUTO):
    """The forward convolution: bfloat16 stride-1 ones as Winograd F(2x2, 3x3)
    (`conv3x3_winograd`) or per-tap products (`conv_by_taps`), see `bf16_forward_impl`; float32
    stride-1 3x3 ones over many tiles as Winograd F(4x4, 3x3) (`f32_forward_impl`)."""
    if _forward_uses_winograd(x, kernel, strides, pads, groups, forms):
        return conv3x3_winograd(x, kernel, pads, precision)
    if x.dtype == jnp.bfloat16 and strides == (1, 1) and groups == 1:
        return conv_by_taps(x, kernel, pads, precision)
    if (x.dtype == jnp.float32 and strides == (1, 1) and groups == 1
            and f32_forward_impl(x.shape, kernel.shape, pads, forms.f32_forward) == "winograd"):
        return conv3x3_winograd4(x, kernel, pads, precision)
    return _xla_conv(x, kernel, strides, pads, groups, precision)


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
# a 2x2 output tile of a 3x3 correlation is A^T [(G g G^T) * (B^T d B)] A for the 4x4 input tile
# d and kernel g, so a tile costs 16 multiplies per (in, out) channel pair instead of 36.
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
WINOGRAD_MIN_TILES = 1024
WINOGRAD_MIN_TILES_F32_KERNEL_GRAD = 256


def _linear_combination(coefficients: np.ndarray, terms: Sequence[jax.Array]) -> jax.Array:
    """sum_i coefficients[i] * terms[i] over the nonzero coefficients (a Winograd transform's
    small constants)."""
    total = None
    for c, term in zip(coefficients.tolist(), terms):
        if c == 0:
            continue
        term = term if c == 1 else -term if c == -1 else c * term
        total = term if total is None else total + term
    return total


def _tile_transform(rows: Sequence[jax.Array], column: Any, matrix: np.ndarray
                    ) -> list[jax.Array]:
    """matrix . tile . matrix^T for every tile at once, in (i, j) row-major order.

    rows[a] holds row a of every tile; column(t, b) slices column b of every tile out of t.
    """
    out = []
    for i in range(matrix.shape[0]):
        row = _linear_combination(matrix[i], rows)
        cols = [column(row, b) for b in range(matrix.shape[1])]
        out += [_linear_combination(matrix[j], cols) for j in range(matrix.shape[0])]
    return out



def _nhwc_tile_transform(padded: jax.Array, tiles_hw: Sequence[int], matrix: np.ndarray
                         ) -> list[jax.Array]:
    """`_tile_transform` of the tiles of an NHWC map (tile (r, c) starts at pixel (2r, 2c)):
    [matrix.shape[0] ** 2] x [n, tiles_h, tiles_w, channels] float32."""
    tiles_h, tiles_w = tiles_hw
    # Tile row a of every tile: rows a, a + 2, ... [n, tiles_h, width, channels].
    rows = [lax.slice_in_dim(padded, a, a + 2 * tiles_h - 1, 2, axis=1).astype(jnp.float32)
            for a in range(matrix.shape[1])]
    return _tile_transform(
        rows, lambda t, b: lax.slice_in_dim(t, b, b + 2 * tiles_w - 1, 2, axis=2), matrix)


def conv3x3_winograd(
    x: jax.Array,
    kernel: jax.Array,
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """A stride-1 3x3 NHWC/HWIO convolution by Winograd's F(2x2, 3x3): 16 float32-accumulated
    matrix products over the [tiles, in] transformed inputs instead of 36 per 2x2 output tile
    (`conv_by_taps`' 9 products over every pixel), 2.25x fewer multiplies.

    The transforms run in float32: the input tiles' (B^T d B, sums of 4 pixels) and the kernel's
    (G g G^T) are rounded once to bf16 for the products, the output transform (A^T m A) sums the
    float32 products and is rounded once. Against `conv_by_taps` the transformed operands add one
    bf16 rounding each: the error is ~2x the output's own rounding (measured on P2: 0.060 vs 0.031
    at outputs of magnitude 13). bfloat16 only (float32 keeps XLA's convolution).

    x: [batch, height, width, in], kernel: [3, 3, in, out] -> [batch, out_h, out_w, out].
    """
    n, h, w, _ = x.shape
    out_h, out_w = h + sum(pads[0]) - 2, w + sum(pads[1]) - 2
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    # Odd outputs get one more padded row / column, cropped at the end.
    x_padded = _winograd_padded_input(x, pads, (tiles_h, tiles_w))
    # [16] x [n, tiles_h, tiles_w, in]: B^T d B
    transformed = [v.astype(x.dtype) for v in _nhwc_tile_transform(
        x_padded, (tiles_h, tiles_w), WINOGRAD_BT)]
    kernel_t = jnp.einsum("ai,ijco,bj->abco", WINOGRAD_G, kernel.astype(jnp.float32), WINOGRAD_G,
                          precision=lax.Precision.HIGHEST).astype(x.dtype)
    products = [matmul_f32(v, kernel_t[t // 4, t % 4], 3, 0, precision)
                for t, v in enumerate(transformed)]  # [16] x [n, tiles_h, tiles_w, out] float32
    out_rows = []
    for p in range(2):
        row = [_linear_combination(WINOGRAD_AT[p], products[j::4]) for j in range(4)]
        out_rows.append(jnp.stack([_linear_combination(WINOGRAD_AT[q], row) for q in range(2)],
                                  axis=3))  # [n, tiles_h, tiles_w, 2, out]
    y = jnp.stack(out_rows, axis=2)  # [n, tiles_h, 2, tiles_w, 2, out]
    y = y.reshape(n, 2 * tiles_h, 2 * tiles_w, kernel.shape[-1])[:, :out_h, :out_w]
    return y.astype(x.dtype)


def _winograd_padded_input(x, pads, tiles_hw):
    """x padded for 2 x tiles_hw output tiles: [n, 2 * tiles_h + 2, 2 * tiles_w + 2, in]."""
    out_h, out_w = x.shape[1] + sum(pads[0]) - 2, x.shape[2] + sum(pads[1]) - 2
    return lax.pad(x, jnp.zeros((), x.dtype),
                   ((0, 0, 0), (pads[0][0], pads[0][1] + 2 * tiles_hw[0] - out_h, 0),
                    (pads[1][0], pads[1][1] + 2 * tiles_hw[1] - out_w, 0), (0, 0, 0)))


def kernel_grad_winograd(
    x: jax.Array,
    d_out: jax.Array,
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """The kernel gradient of `conv3x3_winograd`: G^T [sum over tiles (B^T d B) * (A dy A^T)] G.

    The forward is linear in the transformed kernel U = G g G^T through 16 products V_t . U_t, so
    d U_t = V_t^T . M_t with M = A dy A^T the output tiles' gradient, and d g = G^T d U G:
    16 products contracting the tiles instead of 9 contracting every pixel (2.25x fewer
    multiplies than `kernel_grad_by_taps`). As there, a bf16 input is transposed once, here to
    [in, n, H, column parity, W / 2] (a tile's columns are then contiguous slices, not stride-2
    ones along the minor axis), so each V_t^T is a canonical [in, tiles] operand (module doc),
    built in a conditional of its own (`matmul.unfused`); a float32 one is contracted over the
    tiles of [tiles, in] as it is (XLA:CPU's faster float32 order). Float32 result.

    x: [batch, height, width, in], d_out: [batch, out_h, out_w, out] -> [3, 3, in, out].
    """
    n, out_h, out_w, out = d_out.shape
    in_ch = x.shape[-1]
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    x_padded = _winograd_padded_input(x, pads, (tiles_h, tiles_w))
    # Output tiles' gradient: the padded rows / columns of odd outputs are zero.
    d_padded = lax.pad(d_out, jnp.zeros((), d_out.dtype),
                       ((0, 0, 0), (0, 2 * tiles_h - out_h, 0), (0, 2 * tiles_w - out_w, 0),
                        (0, 0, 0)))
    m = _nhwc_tile_transform(d_padded, (tiles_h, tiles_w),
                             WINOGRAD_AT.T)  # [16] x [n, tiles_h, tiles_w, out]: A dy A^T
    if x.dtype == jnp.bfloat16:
        # [in, n, H, column parity, W / 2]: the columns of a tile are then contiguous slices.
        x_t = unfused(jnp.transpose(x_padded.reshape(n, 2 * tiles_h + 2, tiles_w + 1, 2, in_ch),
                                    (4, 0, 1, 3, 2)))
        rows = [lax.slice_in_dim(x_t, a, a + 2 * tiles_h - 1, 2, axis=2).astype(jnp.float32)
                for a in range(4)]
        v_t = _tile_transform(rows, lambda t, b: t[:, :, :, b % 2, b // 2:b // 2 + tiles_w],
                              WINOGRAD_BT)  # [16] x [in, n, tiles_h, tiles_w]: (B^T d B)^T
        products = [matmul_f32(unfused(v.astype(x.dtype).reshape(in_ch, -1)),
                               g.astype(d_out.dtype).reshape(-1, out), 1, 0, precision)
                    for v, g in zip(v_t, m)]
    else:  # float32: XLA's own operand order, contracting the tiles of [tiles, in]
        v = _nhwc_tile_transform(x_padded, (tiles_h, tiles_w),
                                 WINOGRAD_BT)  # [16] x [n, tiles_h, tiles_w, in]: B^T d B
        products = [matmul_f32(a.reshape(-1, in_ch), g.reshape(-1, out), 0, 0, precision)
                    for a, g in zip(v, m)]
    d_kernel_t = jnp.stack(products).reshape(4, 4, in_ch, out)  # d U: [16] x [in, out]
    return jnp.einsum("ai,abco,bj->ijco", WINOGRAD_G, d_kernel_t, WINOGRAD_G,
                      precision=lax.Precision.HIGHEST)


# Winograd F(4x4, 3x3) (Lavin & Gray 2016, interpolation points 0, +-1, +-2 and infinity): a 4x4
# output tile from a 6x6 input tile with 36 multiplies per (in, out) channel pair instead of 144.
# Larger tiles amplify rounding (float32 outputs within ~2e-5 of their magnitude against ~1e-6 for
# F(2x2, 3x3)), so it serves float32 only.
WINOGRAD4_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                        np.float64)
WINOGRAD4_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
WINOGRAD4_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                         [0, 1, -1, 8, -8, 1]], np.float64)
WINOGRAD4_MIN_TILES = 128
WINOGRAD4_MIN_CHANNELS = 128
# From this size of one image's transformed tiles ([36, tiles, channels] float32: the 256-channel
# convolutions on FPN's P2, 140 MB each at 800 x 1216) a batch is transformed one image at a
# time, forward and backward (`_one_image_at_a_time`): the 2.25x expansion of the tiles then
# holds for one image, not for the batch, at the step's memory peak.
WINOGRAD4_PER_IMAGE_BYTES = 64 * 2**20
# The kernel and output transforms as matrices over a tile's pixels: kernel [36, 9], output
# [16, 36] (rows and columns row-major over the tile).
_WINOGRAD4_KERNEL = np.kron(WINOGRAD4_G, WINOGRAD4_G).astype(np.float32)
_WINOGRAD4_OUTPUT = np.kron(WINOGRAD4_AT, WINOGRAD4_AT).astype(np.float32)


def conv3x3_winograd4(
    x: jax.Array,
    kernel: jax.Array,
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """A float32 stride-1 3x3 NHWC/HWIO convolution by Winograd's F(4x4, 3x3): 36 matrix products
    over the [tiles, in] transformed inputs per 4x4 output tile, 4x fewer multiplies than the
    direct convolution's 144.

    The input transform is separable (`_winograd4_input`); the kernel's and the output's are one
    matrix product each with a Kronecker-product matrix over the tiles' pixels ((G (x) G),
    (A^T (x) A^T)), which XLA:CPU runs as single passes.

    x: [batch, height, width, in], kernel: [3, 3, in, out] -> [batch, out_h, out_w, out].
    """
    n, h, w, in_ch = x.shape
    out = kernel.shape[-1]
    out_h, out_w = h + sum(pads[0]) - 2, w + sum(pads[1]) - 2
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    if _one_image_at_a_time(n, tiles_h * tiles_w, max(in_ch, out)):
        return lax.map(lambda image: conv3x3_winograd4(image[None], kernel, pads, precision)[0],
                       x)
    v = _winograd4_input(x, pads, (tiles_h, tiles_w))  # [36, tiles, in]
    u = jnp.einsum("kt,tco->kco", _WINOGRAD4_KERNEL, kernel.reshape(9, in_ch, out),
                   precision=lax.Precision.HIGHEST)
    m = jnp.einsum("ktc,kco->kto", v, u, precision=precision)  # [36, tiles, out]
    y = jnp.einsum("jk,kto->jto", _WINOGRAD4_OUTPUT, m,
                   precision=lax.Precision.HIGHEST)  # [16, tiles, out]
    y = y.reshape(4, 4, n, tiles_h, tiles_w, out).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, 4 * tiles_h, 4 * tiles_w, out)[:, :out_h, :out_w]


def _one_image_at_a_time(batch: int, tiles_per_image: int, channels: int) -> bool:
    """Whether F(4x4, 3x3) runs over a batch image by image (`WINOGRAD4_PER_IMAGE_BYTES`)."""
    return batch > 1 and 36 * tiles_per_image * channels * 4 >= WINOGRAD4_PER_IMAGE_BYTES


def _winograd4_input(x: jax.Array, pads: Sequence[tuple[int, int]], tiles_hw: Sequence[int]
                     ) -> jax.Array:
    """B^T d B for every 6x6 input tile d (tile (r, c) starts at padded pixel (4r, 4c)):
    [36, n * tiles_h * tiles_w, in], element k = 6 i + j of a tile at [k].

    Separable, in two elementwise passes: B^T along every tile's columns (over the padded map,
    its output 1.5x the map), then along the rows, written in the [36, tiles, in] layout the
    products read. That moves less memory than gathering the 2.25x larger tiles first and
    transforming them as one [36, 36] matrix product (XLA:CPU's input side on FPN's P2: about a
    quarter less time).
    """
    (tiles_h, tiles_w), (_, h, w, channels) = tiles_hw, x.shape
    # Padded to the last tile's end; outputs past the convolution's are cropped (forward) or get
    # zero gradient (kernel gradient).
    x_padded = lax.pad(x, jnp.zeros((), x.dtype),
                       ((0, 0, 0), (pads[0][0], 4 * tiles_h + 2 - h - pads[0][0], 0),
                        (pads[1][0], 4 * tiles_w + 2 - w - pads[1][0], 0), (0, 0, 0)))
    # Column b of every tile: [n, rows, tiles_w, in]; then each tile's B^T d over its columns.
    columns = [lax.slice_in_dim(x_padded, b, b + 4 * tiles_w - 3, 4, axis=2) for b in range(6)]
    by_columns = jnp.stack([_linear_combination(WINOGRAD4_BT[j], columns) for j in range(6)])
    rows = [lax.slice_in_dim(by_columns, a, a + 4 * tiles_h - 3, 4, axis=2) for a in range(6)]
    # [6 (i), 6 (j), n, tiles_h, tiles_w, in]
    tiles = jnp.stack([_linear_combination(WINOGRAD4_BT[i], rows) for i in range(6)])
    return tiles.reshape(36, -1, channels)


def kernel_grad_winograd4(
    x: jax.Array,
    d_out: jax.Array,
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """The kernel gradient of `conv3x3_winograd4`, float32: with V the transformed input tiles
    and M = (A^T (x) A^T)^T . dy the output tiles' gradient, d U_k = V_k^T . M_k (36 products
    contracting the tiles) and d g = (G (x) G)^T . d U.

    x: [batch, height, width, in], d_out: [batch, out_h, out_w, out] -> [3, 3, in, out].
    """
    n, out_h, out_w, out = d_out.shape
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    if _one_image_at_a_time(n, tiles_h * tiles_w, max(x.shape[-1], out)):
        def add_image(total, image):
            x_i, d_i = image
            return total + kernel_grad_winograd4(x_i[None], d_i[None], pads, precision), None

        zeros = jnp.zeros((3, 3, x.shape[-1], out), jnp.float32)
        return lax.scan(add_image, zeros, (x, d_out))[0]
    v = _winograd4_input(x, pads, (tiles_h, tiles_w))  # [36, tiles, in]
    d_padded = lax.pad(d_out, jnp.zeros((), d_out.dtype),
                       ((0, 0, 0), (0, 4 * tiles_h - out_h, 0), (0, 4 * tiles_w - out_w, 0),
                        (0, 0, 0)))
    # Output tiles do not overlap: [16, tiles, out] by one transpose.
    d_tiles = d_padded.reshape(n, tiles_h, 4, tiles_w, 4, out).transpose(2, 4, 0, 1, 3, 5)
    m = jnp.einsum("jk,jto->kto", _WINOGRAD4_OUTPUT, d_tiles.reshape(16, -1, out),
                   precision=lax.Precision.HIGHEST)  # [36, tiles, out]
    d_u = jnp.einsum("ktc,kto->kco", v, m, precision=precision)
    return jnp.einsum("kt,kco->tco", _WINOGRAD4_KERNEL, d_u,
                      precision=lax.Precision.HIGHEST).reshape(3, 3, x.shape[-1], out)


def conv_by_taps(
    x: jax.Array,
    kernel: jax.Array,
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """A stride-1 NHWC/HWIO convolution as one matrix product per tap, summed in float32.

    For bfloat16 operands XLA:CPU runs float32-accumulating matrix products on the CPU's matrix
    units while its bfloat16 convolutions do not use them. Not used for float32, where XLA's
    convolution is the faster one.

    x: [batch, height, width, in], kernel: [kh, kw, in, out] -> [batch, out_h, out_w, out]
    (x's dtype).
    """
    kh, kw = kernel.shape[:2]
    x_padded = lax.pad(x, jnp.zeros((), x.dtype),
                       ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    out_h, out_w = x_padded.shape[1] - kh + 1, x_padded.shape[2] - kw + 1
    total = None
    for dy in range(kh):
        for dx in range(kw):
            window = _tap_window(x_padded, dy, dx, (out_h, out_w), (1, 1))
            tap = matmul_f32(window, kernel[dy, dx], 3, 0, precision)
            total = tap if total is None else total + tap
    return total.astype(x.dtype)


def _tap_window(x_padded: jax.Array, dy: int, dx: int, out_hw: Sequence[int],
                strides: Sequence[int]) -> jax.Array:
    """The pixels of the padded input [n, H, W, c] that kernel tap (dy, dx) multiplies:
    [n, out_h, out_w, c]."""
    (out_h, out_w), (sy, sx) = out_hw, strides
    n, _, _, channels = x_padded.shape
    return lax.slice(x_padded, (0, dy, dx, 0),
                     (n, dy + (out_h - 1) * sy + 1, dx + (out_w - 1) * sx + 1, channels),
                     (1, sy, sx, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_taps(x, kernel, strides, pads, groups, precision, forms):
    return _forward_conv(x, kernel, strides, pads, groups, precision, forms)


def _conv_taps_fwd(x, kernel, strides, pads, groups, precision, forms):
    return _forward_conv(x, kernel, strides, pads, groups, precision, forms), (x, kernel)


def _conv_taps_bwd(strides, pads, groups, precision, forms, residuals, d_out):
    x, kernel = residuals
    if strides == (1, 1) and groups == 1:
        d_x = input_grad_by_flipped_kernel(d_out, kernel, pads, precision, forms)
    elif groups == 1:
        d_x = input_grad_by_phases(d_out, kernel, x.shape[1:3], strides, pads, precision,
                                   forms)
    else:
        _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, strides, pads, groups, precision),
                               x)
        (d_x,) = input_vjp(d_out)
    form = _kernel_grad_form(x, kernel, strides, pads, groups, forms)
    if form == "winograd4":
        d_kernel = kernel_grad_winograd4(x, d_out, pads, precision)
    elif form == "winograd":
        d_kernel = kernel_grad_winograd(x, d_out, pads, precision)
    else:
        d_kernel = kernel_grad_by_taps(x, d_out, kernel.shape, strides, pads, groups, precision)
    return d_x, d_kernel.astype(kernel.dtype)


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def _pointwise_conv(x, kernel, strides, precision):
    """A 1x1 convolution without padding as a matrix product over channels (`matmul.dense`),
    which XLA:CPU runs faster than its convolution form, forward and backward. The skipped
    pixels of a strided one get zero gradient from the slice's own transpose."""
    return dense(x[:, ::strides[0], ::strides[1]], kernel[0, 0], precision)


def input_grad_by_flipped_kernel(
    d_out: jax.Array,
    kernel: jax.Array,
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
    forms: ConvForms = AUTO,
) -> jax.Array:
    """The input gradient of a stride-1 NHWC/HWIO convolution as a forward convolution.

    d x = conv(d out, kernel rotated by 180 degrees with in/out swapped), padded by
    (k - 1 - low, k - 1 - high): the same arithmetic as XLA's own input gradient, whose
    transposed form XLA:CPU runs slowly inside a conditional (the heads' slot-bucket switch,
    modeling/losses.py).

    d_out: [batch, out_h, out_w, out], kernel: [kh, kw, in, out] -> [batch, height, width, in].
    """
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    grad_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
                 (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    return _forward_conv(d_out, flipped, (1, 1), grad_pads, 1, precision, forms)


def input_grad_by_phases(
    d_out: jax.Array,
    kernel: jax.Array,
    in_hw: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
    forms: ConvForms = AUTO,
) -> jax.Array:
    """The input gradient of a strided NHWC/HWIO convolution as one stride-1 convolution per
    input phase.

    Input pixel u = s * a + p (phase p) is reached only by the taps d = p + pad_low (mod s),
    from output a + (p + pad_low - d) / s; so each phase's gradient is a forward convolution of
    d_out with those taps (in/out swapped), and the phases interleave into d x. XLA:CPU runs its
    own form (a convolution of the zero-dilated d_out) outside the fast convolution library.

    d_out: [batch, out_h, out_w, out], kernel: [kh, kw, in, out] ->
    [batch, in_hw[0], in_hw[1], in].
    """
    n, out_h, out_w, _ = d_out.shape
    kh, kw, in_channels, _ = kernel.shape
    (sy, sx), (h, w) = strides, in_hw
    rows, cols = -(-h // sy), -(-w // sx)  # per phase, the last one cropped below

    def taps(phase, stride, pad_low, size, out_size, phase_len):
        """(tap indices in kernel order of the correlation, padding of d_out)."""
        first = (phase + pad_low) % stride
        used = list(range(first, size, stride))[::-1]  # increasing offset into d_out
        if not used:
            return used, None
        low_offset = (phase + pad_low - used[0]) // stride
        high_offset = low_offset + len(used) - 1
        return used, (-low_offset, phase_len - 1 + high_offset - (out_size - 1))

    phase_rows = []
    for py in range(sy):
        ty, pad_y = taps(py, sy, pads[0][0], kh, out_h, rows)
        phase_cols = []
        for px in range(sx):
            tx, pad_x = taps(px, sx, pads[1][0], kw, out_w, cols)
            if not ty or not tx:  # no tap reaches this phase
                phase_cols.append(jnp.zeros((n, rows, cols, in_channels), d_out.dtype))
                continue
            sub = kernel[jnp.asarray(ty)][:, jnp.asarray(tx)].transpose(0, 1, 3, 2)
            phase_cols.append(_forward_conv(d_out, sub, (1, 1), (pad_y, pad_x), 1, precision,
                                            forms))
        phase_rows.append(jnp.stack(phase_cols, axis=3))  # [n, rows, cols, sx, in]
    d_x = jnp.stack(phase_rows, axis=2)  # [n, rows, sy, cols, sx, in]
    return d_x.reshape(n, rows * sy, cols * sx, in_channels)[:, :h, :w]


def kernel_grad_by_taps(
    x: jax.Array,
    d_out: jax.Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    groups: int = 1,
    precision: Any = None,
) -> jax.Array:
    """The kernel gradient of an NHWC/HWIO convolution as one matrix product per tap.

    x: [batch, height, width, in], d_out: [batch, out_h, out_w, out] -> [kh, kw, in / groups, out]
    (float32: the products are accumulated in float32 whatever the inputs' dtype).
    """
    kh, kw, in_per_group, out = kernel_shape
    n, out_h, out_w, _ = d_out.shape
    x_padded = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    rows = n * out_h * out_w
    out_per_group = out // groups
    d_out_rows = d_out.reshape(rows, groups, out_per_group)
    if groups == 1 and x.dtype == jnp.bfloat16:
        return _bf16_kernel_grad_by_taps(x_padded, d_out_rows[:, 0], kernel_shape, (out_h, out_w),
                                         strides, precision)
    taps = []
    for dy in range(kh):
        for dx in range(kw):
            window = _tap_window(x_padded, dy, dx, (out_h, out_w), strides)
            if groups == 1:  # a plain GEMM (a batch of one is a slower path on CPU)
                tap = lax.dot_general(window.reshape(rows, in_per_group), d_out_rows[:, 0],
                                      (((0,), (0,)), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)
            else:  # [groups, in / groups, out / groups], contracting the rows
                tap = lax.dot_general(window.reshape(rows, groups, in_per_group), d_out_rows,
                                      (((0,), (0,)), ((1,), (1,))), precision=precision,
                                      preferred_element_type=jnp.float32)
                tap = tap.transpose(1, 0, 2).reshape(in_per_group, out)
            taps.append(tap)
    return jnp.stack(taps).reshape(kh, kw, in_per_group, out)


def _bf16_kernel_grad_by_taps(x_padded, d_out_rows, kernel_shape, out_hw, strides, precision):
    """`kernel_grad_by_taps` for bfloat16, ungrouped: each tap as [in, rows] . [rows, out].

    XLA:CPU runs a bfloat16 product on the CPU's matrix units only when its left operand is
    row-major with the contracted axis minor; `window^T . d_out` with the window in NHWC order is
    not, so XLA converts both operands to float32 first. Here the padded input is transposed to
    [in, n, H, W] once, and each tap's window sliced from that is canonical. The transpose and
    each window are computed in conditionals of their own (`matmul.unfused`): otherwise XLA
    fuses the transpose into every window copy and the windows into the products, through
    float32.
    """
    kh, kw, in_ch, out = kernel_shape
    (out_h, out_w), (sy, sx) = out_hw, strides
    n = x_padded.shape[0]
    x_t = unfused(jnp.transpose(x_padded, (3, 0, 1, 2)))  # [in, n, H, W]
    taps = []
    for dy in range(kh):
        for dx in range(kw):
            window = lax.slice(x_t, (0, 0, dy, dx),
                               (in_ch, n, dy + (out_h - 1) * sy + 1, dx + (out_w - 1) * sx + 1),
                               (1, 1, sy, sx))
            window = unfused(window.reshape(in_ch, -1))
            taps.append(lax.dot_general(window, d_out_rows,
                                        (((1,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, in_ch, out)


def conv_transpose(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
) -> jax.Array:
    """`lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=NHWC)` (kernel not
    transposed, flax's default), with gradients that avoid XLA:CPU's slow reversed convolution.

    x: [n, h, w, in], kernel: [kh, kw, in, out]. A kernel equal to its stride with "VALID"
    padding (Mask R-CNN's 2x2 stride-2 mask deconvolution) places one kernel copy per input pixel
    without overlap: out[n, s*i + a, s*j + b] = x[n, i, j] @ kernel[s-1-a, s-1-b], one matrix
    product. Anything else is `conv_general_dilated` of the zero-dilated input.
    """
    kh, kw, _, out = kernel.shape
    sy, sx = strides
    if (kh, kw) == (sy, sx) and padding == "VALID":
        n, h, w, in_ch = x.shape
        # lax.conv_transpose does not flip the kernel: output offset a takes kernel row s-1-a.
        # One product [n, h, w, in] . [in, (a, b, out)] (`matmul.dense`: an einsum here ran in
        # float32 on XLA:CPU, with float32 transposes of its operands in the gradient), then
        # the blocks interleaved.
        flipped = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(in_ch, sy * sx * out)
        y = dense(x, flipped).reshape(n, h, w, sy, sx, out)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * sy, w * sx, out)
    if isinstance(padding, str):
        pads = [_conv_transpose_padding(k, s, padding) for k, s in ((kh, sy), (kw, sx))]
    else:
        pads = [tuple(p) for p in padding]
    dilated = lax.pad(x, jnp.zeros((), x.dtype),
                      ((0, 0, 0), (pads[0][0], pads[0][1], sy - 1),
                       (pads[1][0], pads[1][1], sx - 1), (0, 0, 0)))
    return conv_general_dilated(dilated, kernel, (1, 1), ((0, 0), (0, 0)),
                                dimension_numbers=_NHWC)


def _conv_transpose_padding(k: int, s: int, padding: str) -> tuple[int, int]:
    """lax.conv_transpose's padding of the dilated input for "SAME" / "VALID"."""
    if padding == "SAME":
        pad_len = k + s - 2
        pad_a = k - 1 if s > k - 1 else -(-pad_len // 2)
    elif padding == "VALID":
        pad_len = k + s - 2 + max(k - s, 0)
        pad_a = k - 1
    else:
        raise ValueError(f"padding must be 'SAME', 'VALID' or (low, high) pairs, got {padding!r}")
    return pad_a, pad_len - pad_a
