"""RoI feature extractors: RoIAlign, RoIPool, RoIWarp and the multi-level (FPN) pooler.

Glossary of shapes:
    B   images in the batch          H, W  one feature map's height and width (cells)
    C   channels (minor dimension)   R     RoIs (flat, with a batch index, or per image)
    O   output size (O_h, O_w)       G     static upper bound on samples per bin and axis

All functions work on NHWC features and (x1, y1, x2, y2) boxes in image pixels; `spatial_scale`
maps them to the feature grid. Each pooler is written for one RoI and vectorised over RoIs with
`jax.vmap`; its gradient with respect to the features is the transpose of the gather (a
scatter-add), which is what torchvision's backward kernels compute by hand.

Implementation: the feature maps are viewed as one flat buffer of C-vectors (levels
concatenated, with per-level offsets, heights, widths and scales), so a RoI gathers only from its
own level. The per-RoI sample positions and separable bilinear weights (which carry the 1/count
of the bin average) are computed under `jax.vmap`; the bin values are then a sum over the
4 * G_h * G_w corner terms of one gathered C-vector per bin times its weight, which XLA fuses into
a single loop over the output (nothing of size bins x samples is materialised). The backward is
a custom VJP that scatter-adds every term into one buffer in place, one term per loop iteration,
one loop per half of the channels (JAX's own transpose scatters each term into a fresh zero
buffer and sums them); like torchvision's, it gives the boxes no gradient. Sample positions are
computed with torchvision's float32 roundings (see `_mul`, `_div`), so samples exactly on the map
border or a quantised bin edge fall on the same side.

Measured against pooling every level and selecting, and against torchvision:
docs/benchmarks.md ("Multi-level RoIAlign"); the backward's two loops: docs/cpu_performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MODES = ("align", "pool", "warp")
# Samples per bin up to which the bilinear sum is unrolled (sampling_ratio 2 -> 4).
_MAX_UNROLLED_SAMPLES = 9
# Channels from which the backward's scatter-adds run as two loops over channel halves.
_MIN_SPLIT_CHANNELS = 64
# Output bins (RoIs x O_h x O_w) from which the forward's gathers run as two fusions over RoI
# halves on the CPU backend.
_MIN_SPLIT_BINS = 16384


# --------------------------------------------------------------------------------------------
# Argument checks.


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(value[0]), int(value[1])


def _check_rank(x, rank: int, name: str, layout: str) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have shape {layout}, got shape {jnp.shape(x)}")


def _check_boxes(boxes, name: str = "boxes") -> None:
    _check_rank(boxes, 2, name, "[num_rois, 4]")
    if boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [num_rois, 4] (x1, y1, x2, y2), "
                         f"got shape {boxes.shape}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _runtime_zero(x: jax.Array) -> jax.Array:
    """0 (NaN for NaN) that XLA cannot constant-fold: min(|x|, 0)."""
    return jnp.minimum(jnp.abs(x), 0.0)


def _mul(a, b) -> jax.Array:
    """a * b rounded on its own, as torchvision's kernels compute it.

    XLA CPU contracts a product feeding an add into one fused multiply-add, which skips the
    product's rounding; adding a runtime zero makes the product the whole FMA, so the following
    add rounds separately again.
    """
    prod = jnp.asarray(a) * b
    return prod + _runtime_zero(prod)


def _div(num, den) -> jax.Array:
    """num / den rounded as IEEE division, as torchvision's kernels compute it.

    XLA rewrites a division by a constant or broadcast divisor into a multiplication by its
    reciprocal, which is off by an ulp even when the quotient is exact (42 / 7 -> 6.0000005);
    that moves samples across the map border (y > H) and quantised bin edges. Adding a runtime
    zero of the numerator's shape makes the divisor a full-shape array, divided exactly.
    """
    num = jnp.asarray(num)
    return num / (den + _runtime_zero(num))


def _round_half_away(x: jax.Array) -> jax.Array:
    # torchvision's RoIPool uses C's round(): halves go away from zero (jnp.round goes to even).
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


# --------------------------------------------------------------------------------------------
# The flat feature buffer: all levels of all images as rows of C-vectors.


@flax.struct.dataclass
class FlatFeatures:
    """Feature maps of several levels as one buffer of C-vectors, the form every pooler reads.

    Building it copies every map (the levels are concatenated), so a caller that pools the same
    maps more than once (the box, mask and keypoint heads of one step) builds it once with
    `flatten_levels` and passes it to `multilevel_roi_align` each time. Reads past a map's last
    row or column (the high corner of a sample clamped to the border) always carry weight 0;
    gathers clip them into the buffer so they stay finite.
    """

    flat: jax.Array  # [sum_l B * H_l * W_l, C]
    # (B, H_l, W_l) per level: static (not a pytree leaf), so jit traces only the buffer.
    level_shapes: tuple[tuple[int, int, int], ...] = flax.struct.field(pytree_node=False)

    @property
    def sizes_hw(self) -> list[tuple[int, int]]:
        """(H_l, W_l) per level."""
        return [(h, w) for _, h, w in self.level_shapes]

    def level_table(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(offsets, heights, widths) [L] int32: first buffer row and map size of each level."""
        offsets = np.cumsum([0] + [math.prod(s) for s in self.level_shapes[:-1]])
        return (jnp.asarray(offsets, jnp.int32),
                jnp.asarray([h for _, h, _ in self.level_shapes], jnp.int32),
                jnp.asarray([w for _, _, w in self.level_shapes], jnp.int32))


def flatten_levels(features: Sequence[jax.Array]) -> FlatFeatures:
    """L maps [B, H_l, W_l, C] (same B and C) -> `FlatFeatures` (a free reshape for one level)."""
    features = [jnp.asarray(f) for f in features]
    if not features:
        raise ValueError("features must hold at least one feature map")
    for i, f in enumerate(features):
        _check_rank(f, 4, f"features[{i}]", "[batch, height, width, channels] (NHWC)")
        if f.shape[0] != features[0].shape[0] or f.shape[3] != features[0].shape[3]:
            raise ValueError(f"features[{i}] has shape {f.shape}; every level needs the batch "
                             f"and channels of features[0] {features[0].shape}")
    pieces = [f.reshape(-1, f.shape[-1]) for f in features]
    return FlatFeatures(
        flat=jnp.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0],
        level_shapes=tuple(tuple(int(d) for d in f.shape[:3]) for f in features),
    )


def _take(flat: jax.Array, idx: jax.Array) -> jax.Array:
    """flat[idx] with indices clipped into the buffer: idx [...] -> [..., C]."""
    return jnp.take(flat, idx, axis=0, mode="clip")


# --------------------------------------------------------------------------------------------
# Per-axis sampling rules (one RoI, one axis); they return sample positions and weights.


def _bilinear_axis(pos: jax.Array, size: jax.Array):
    """torchvision's bilinear rule along one axis of length `size`.

    A position < -1 or > size contributes 0; otherwise it is clamped to [0, size - 1] and split
    between cells `low` and `low + 1` with weights (1 - frac, frac) (frac = 0 at the last cell).
    Returns (low int32, w_low, w_high), all shaped like `pos`.
    """
    inside = (pos >= -1.0) & (pos <= size.astype(pos.dtype))
    p = jnp.maximum(pos, 0.0)
    low = jnp.floor(p).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    p = jnp.where(at_end, low.astype(pos.dtype), p)
    frac = p - low.astype(pos.dtype)
    w_low = jnp.where(inside, 1.0 - frac, 0.0)
    w_high = jnp.where(inside, frac, 0.0)
    return low, w_low, w_high


def _align_axis(lo, hi, scale, size, out: int, sampling_ratio: int, max_grid: int,
                aligned: bool):
    """RoIAlign sample rows (or columns) of one RoI: ([out, G] low, w_low, w_high).

    The weights include validity, the adaptive-grid mask and 1/grid, so that the bin average is
    the plain weighted sum over samples.
    """
    offset = 0.5 if aligned else 0.0
    start = _mul(lo, scale) - offset
    extent = (_mul(hi, scale) - offset) - start
    if not aligned:
        extent = jnp.maximum(extent, 1.0)
    bin_size = _div(extent, out)
    if sampling_ratio > 0:
        grid_static = sampling_ratio
        grid = jnp.asarray(sampling_ratio, jnp.int32)
    else:
        # Adaptive: ceil(extent / out) samples, at most max_grid (see roi_align's docstring).
        grid_static = max_grid
        grid = jnp.minimum(jnp.ceil(_div(extent, out)).astype(jnp.int32), max_grid)
    p = jnp.arange(out, dtype=lo.dtype)[:, None]
    i = jnp.arange(grid_static, dtype=lo.dtype)[None, :]
    gridf = grid.astype(lo.dtype)
    # Same association order as torchvision's kernel, so float32 results agree to the ulp.
    pos = start + _mul(p, bin_size) + _div(_mul(i + 0.5, bin_size), gridf)
    low, w_low, w_high = _bilinear_axis(pos, size)
    # A non-positive grid (zero or inverted box with aligned=True) has no samples: output 0.
    keep = (jnp.arange(grid_static)[None, :] < grid) & (grid > 0)
    norm = jnp.where(keep, 1.0 / jnp.maximum(gridf, 1.0), 0.0)
    return low, w_low * norm, w_high * norm


def _quantised_extent(lo, hi, scale):
    """RoIPool's quantisation of a box side: (start cell, number of cells >= 1)."""
    start = _round_half_away(_mul(lo, scale)).astype(jnp.int32)
    end = _round_half_away(_mul(hi, scale)).astype(jnp.int32)
    return start, jnp.maximum(end - start + 1, 1)


def _warp_axis(lo, hi, scale, size, out: int):
    """RoIWarp sample rows (or columns): one bilinear sample per bin of the quantised box."""
    start, extent = _quantised_extent(lo, hi, scale)
    p = jnp.arange(out, dtype=lo.dtype)
    # Cell k has its value at coordinate k, so the quantised box covers [start - .5, end + .5].
    pos = start.astype(lo.dtype) - 0.5 + _mul(p + 0.5, _div(extent.astype(lo.dtype), out))
    low, w_low, w_high = _bilinear_axis(pos, size)
    return low[:, None], w_low[:, None], w_high[:, None]


def _pool_axis(lo, hi, scale, size, out: int, max_bin: int):
    """RoIPool cells of one axis: ([out, max_bin] cell index, [out, max_bin] in-bin mask)."""
    start, extent = _quantised_extent(lo, hi, scale)
    bin_size = _div(extent.astype(lo.dtype), out)
    p = jnp.arange(out, dtype=lo.dtype)
    b_start = jnp.floor(_mul(p, bin_size)).astype(jnp.int32) + start
    b_end = jnp.ceil(_mul(p + 1, bin_size)).astype(jnp.int32) + start
    b_start = jnp.clip(b_start, 0, size)
    b_end = jnp.clip(b_end, 0, size)
    n = (b_end - b_start)[:, None]
    k = jnp.arange(max_bin)[None, :]
    # A bin wider than max_bin is covered by max_bin evenly spread cells (see roi_pool).
    step = jnp.where(n > max_bin, (k * n) // max_bin, k)
    cells = jnp.minimum(b_start[:, None] + step, size - 1)
    return jnp.maximum(cells, 0), k < n


# --------------------------------------------------------------------------------------------
# One RoI, any mode, reading from the flat buffer.


class _Samples(NamedTuple):
    """Separable bilinear samples of R RoIs: row r of a RoI reads flat[base + y * width + x]."""
    base: jax.Array  # [R] int32, first buffer row of the RoI's image and level
    width: jax.Array  # [R] int32, row length of that map
    y_low: jax.Array  # [R, O_h, G_h] int32
    wy: jax.Array  # [R, O_h, G_h, 2] weights of rows y_low, y_low + 1
    x_low: jax.Array  # [R, O_w, G_w] int32
    wx: jax.Array  # [R, O_w, G_w, 2] weights of columns x_low, x_low + 1


def _term(s: _Samples, i, j, a: int, b: int):
    """Corner (a, b) of sample (i, j) of every bin: buffer rows and weights [R, O_h, O_w]."""
    idx = (s.base[:, None, None] + (s.y_low[:, :, i, None] + a) * s.width[:, None, None]
           + s.x_low[:, None, :, j] + b)
    weight = s.wy[:, :, i, a, None] * s.wx[:, None, :, j, b]
    return idx, weight


@jax.custom_vjp
def _bilinear_gather_sum(flat: jax.Array, s: _Samples) -> jax.Array:
    """out[r, p, q] = sum over terms of weight * flat[idx]: [R, O_h, O_w, C].

    One term is one gathered C-vector per bin; XLA fuses the gathers, products and the sum
    into one loop over the output, so the 4 * G * G gathered vectors per bin are never
    materialised (gathering them all, then reducing, was ~10x slower on CPU).
    """
    (rois, out_h, grid_h), (_, out_w, grid_w) = s.y_low.shape, s.x_low.shape
    if grid_h * grid_w > _MAX_UNROLLED_SAMPLES:  # an adaptive grid: a loop over the samples
        def add_sample(k, acc):
            for a in range(2):
                for b in range(2):
                    idx, weight = _term(s, k // grid_w, k % grid_w, a, b)
                    acc = acc + weight[..., None] * _take(flat, idx)
            return acc

        return lax.fori_loop(0, grid_h * grid_w, add_sample,
                             jnp.zeros((rois, out_h, out_w, flat.shape[1]), flat.dtype))
    if rois * out_h * out_w >= _MIN_SPLIT_BINS and jax.default_backend() == "cpu":
        # XLA:CPU runs a loop fusion on one thread; two independent halves of the RoIs run side
        # by side on two (R50-FPN inference's box pooler, 1000 RoIs: ~4 % of the whole call).
        # The barrier keeps the concatenation from fusing the halves back into one loop.
        halves = [_Samples(*(field[part] for field in s))
                  for part in (slice(None, rois // 2), slice(rois // 2, None))]
        return jnp.concatenate(lax.optimization_barrier(
            [_unrolled_gather_sum(flat, half) for half in halves]), axis=0)
    return _unrolled_gather_sum(flat, s)


def _unrolled_gather_sum(flat: jax.Array, s: _Samples) -> jax.Array:
    """`_bilinear_gather_sum` for grids of up to `_MAX_UNROLLED_SAMPLES` samples per bin."""
    out = jnp.zeros(s.y_low.shape[:2] + s.x_low.shape[1:2] + flat.shape[1:], flat.dtype)
    grid_w = s.x_low.shape[2]
    # The buffer rows and weights of every term, computed once per bin ([terms, R, O_h, O_w])
    # and kept out of the gathering loop: fused into it, XLA:CPU recomputed them for every
    # channel of every bin (the box pooler of R50-FPN inference: 3x the time).
    terms = [_term(s, k // grid_w, k % grid_w, a, b)
             for k in range(s.y_low.shape[2] * grid_w) for a in range(2) for b in range(2)]
    idx, weight = lax.optimization_barrier((jnp.stack([i for i, _ in terms]),
                                            jnp.stack([w for _, w in terms])))
    for t in range(len(terms)):
        out = out + weight[t][..., None] * _take(flat, idx[t])
    return out


def _bilinear_gather_sum_fwd(flat, s):
    # A [N, 0] array carries the buffer's row count and dtype into the backward at no cost.
    return _bilinear_gather_sum(flat, s), (jnp.zeros((flat.shape[0], 0), flat.dtype), s)


def _bilinear_gather_sum_bwd(res, g):
    """The transpose of the gathers: one chain of scatter-adds into a single buffer.

    JAX's own transpose scatters every term into a fresh zero buffer and adds the buffers;
    chaining them in place saves those full-size zero fills and adds. Boxes get no gradient,
    as in torchvision's roi_align.
    """
    like, s = res
    grid_w = s.x_low.shape[2]

    def scatter_terms(g_part):
        def add_term(t, acc):
            sample, corner = t // 4, t % 4
            idx, weight = _term(s, sample // grid_w, sample % grid_w, corner // 2, corner % 2)
            return acc.at[idx].add(weight[..., None] * g_part, mode="drop")

        # A loop, not unrolled: XLA:CPU computed every unrolled term's product [R, O_h, O_w, C]
        # before the first scatter, 0.8 GB live at the R50-FPN train step's memory peak (16
        # terms, 1024 RoIs, 256 channels, float32); in a loop one is live at a time.
        return lax.fori_loop(0, 4 * s.y_low.shape[2] * grid_w, add_term,
                             jnp.zeros((like.shape[0], g_part.shape[-1]), like.dtype))

    channels = g.shape[-1]
    if channels < 2 * _MIN_SPLIT_CHANNELS:
        return scatter_terms(g), None
    # XLA:CPU's scatter runs on one thread; two independent loops over the channel halves run
    # side by side on two.
    half = channels // 2
    return jnp.concatenate([scatter_terms(g[..., :half]), scatter_terms(g[..., half:])],
                           axis=-1), None


_bilinear_gather_sum.defvjp(_bilinear_gather_sum_fwd, _bilinear_gather_sum_bwd)


def _pool_one(flat, base, width, rows, cols):
    """Max over each quantised bin; empty bins give 0; the gradient goes to the first maximum in
    raster order, as in torchvision's kernel."""
    r, r_in = rows  # [Oh, Kh]
    c, c_in = cols  # [Ow, Kw]
    idx = base + r[:, :, None, None] * width + c[None, None, :, :]  # [Oh, Kh, Ow, Kw]
    vals = _take(flat, idx)  # [Oh, Kh, Ow, Kw, C]
    inside = r_in[:, :, None, None] & c_in[None, None, :, :]
    oh, kh, ow, kw, ch = vals.shape
    vals = vals.transpose(0, 2, 1, 3, 4).reshape(oh, ow, kh * kw, ch)
    inside = inside.transpose(0, 2, 1, 3).reshape(oh, ow, kh * kw, 1)
    masked = jnp.where(inside, vals, -jnp.inf)
    first = jnp.argmax(masked, axis=2, keepdims=True)  # first maximum: ties -> lowest (h, w)
    best = jnp.take_along_axis(vals, first, axis=2)[:, :, 0]
    return jnp.where(jnp.any(inside, axis=2), best, jnp.zeros_like(best))


def _pool_rois(flat_features: FlatFeatures, boxes, level, batch_index, scales,
               output_size: tuple[int, int], mode: str, sampling_ratio: int, aligned: bool,
               grid_bound: tuple[int, int], bin_bound: tuple[int, int]) -> jax.Array:
    """All RoIs: boxes [R, 4], level/batch_index [R] int, scales [L] -> [R, O_h, O_w, C].

    The per-RoI work (sample positions, weights, buffer rows) is vectorised with jax.vmap.
    """
    flat = flat_features.flat
    offsets, heights, widths = flat_features.level_table()
    out_h, out_w = output_size

    def locate(box, lvl, b):
        height = heights[lvl]
        width = widths[lvl]
        base = offsets[lvl] + b * height * width
        return height, width, base, scales[lvl], box[0], box[1], box[2], box[3]

    def samples(box, lvl, b):
        height, width, base, scale, x1, y1, x2, y2 = locate(box, lvl, b)
        if mode == "align":
            rows = _align_axis(y1, y2, scale, height, out_h, sampling_ratio, grid_bound[0],
                               aligned)
            cols = _align_axis(x1, x2, scale, width, out_w, sampling_ratio, grid_bound[1],
                               aligned)
        else:
            rows = _warp_axis(y1, y2, scale, height, out_h)
            cols = _warp_axis(x1, x2, scale, width, out_w)
        return _Samples(base, width, rows[0], jnp.stack(rows[1:], -1), cols[0],
                        jnp.stack(cols[1:], -1))

    def pool_one(box, lvl, b):
        height, width, base, scale, x1, y1, x2, y2 = locate(box, lvl, b)
        rows = _pool_axis(y1, y2, scale, height, out_h, bin_bound[0])
        cols = _pool_axis(x1, x2, scale, width, out_w, bin_bound[1])
        return _pool_one(flat, base, width, rows, cols)

    if mode == "pool":
        return jax.vmap(pool_one)(boxes, level, batch_index)
    return _bilinear_gather_sum(flat, jax.vmap(samples)(boxes, level, batch_index))


def _default_grid_bound(max_sampling_ratio, sizes_hw, output_size) -> tuple[int, int]:
    if max_sampling_ratio is not None:
        if int(max_sampling_ratio) < 1:
            raise ValueError(f"max_sampling_ratio must be >= 1, got {max_sampling_ratio}")
        return int(max_sampling_ratio), int(max_sampling_ratio)
    # Exact for every box inside the map: its extent is at most the map's side.
    return tuple(max(1, max(math.ceil(s[a] / output_size[a]) for s in sizes_hw))
                 for a in range(2))


def _default_bin_bound(max_bin_size, sizes_hw, output_size) -> tuple[int, int]:
    if max_bin_size is not None:
        if int(max_bin_size) < 1:
            raise ValueError(f"max_bin_size must be >= 1, got {max_bin_size}")
        return int(max_bin_size), int(max_bin_size)
    # A quantised bin of a box inside the map spans at most ceil(side / out) + 1 cells.
    return tuple(max(min(s[a], math.ceil(s[a] / output_size[a]) + 1) for s in sizes_hw)
                 for a in range(2))


# --------------------------------------------------------------------------------------------
# Public single-level poolers.


def _single_level(features, boxes, box_batch_index, output_size, spatial_scale, mode,
                  sampling_ratio=2, aligned=False, max_sampling_ratio=None, max_bin_size=None):
    _check_rank(features, 4, "features", "[batch, height, width, channels] (NHWC)")
    _check_boxes(boxes)
    _check_rank(box_batch_index, 1, "box_batch_index", "[num_rois]")
    if box_batch_index.shape[0] != boxes.shape[0]:
        raise ValueError(f"box_batch_index must have shape [{boxes.shape[0]}] like boxes, "
                         f"got {box_batch_index.shape}")
    out = _pair(output_size, "output_size")
    features = jnp.asarray(features)
    sizes = [features.shape[1:3]]
    flat = flatten_levels([features])
    level = jnp.zeros(boxes.shape[:1], jnp.int32)
    scales = jnp.asarray([spatial_scale], features.dtype)
    return _pool_rois(flat, boxes.astype(features.dtype), level,
                      box_batch_index.astype(jnp.int32), scales, out, mode, int(sampling_ratio),
                      aligned, _default_grid_bound(max_sampling_ratio, sizes, out),
                      _default_bin_bound(max_bin_size, sizes, out))


def roi_align(features: jax.Array, boxes: jax.Array, box_batch_index: jax.Array,
              output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False,
              max_sampling_ratio: int | None = None) -> jax.Array:
    """RoIAlign, equal to `torchvision.ops.roi_align` (CPU kernel) in value and gradient.

    Args:
        features: [B, H, W, C] feature map (NHWC).
        boxes: [R, 4] (x1, y1, x2, y2) in image pixels; `* spatial_scale` gives feature cells.
        box_batch_index: [R] int, the image each box reads from.
        output_size: O or (O_h, O_w) bins.
        spatial_scale: feature cells per image pixel (1 / stride).
        sampling_ratio: samples per bin and axis; <= 0 means adaptive, ceil(roi_extent / O).
        aligned: False is the Mask R-CNN paper's RoIAlign (box sides clamped to >= 1 cell);
            True shifts by half a pixel and keeps zero/negative sides as they are.
        max_sampling_ratio: static upper bound G of adaptive samples per bin and axis (needed
            for static shapes). None takes ceil(side / O) of the map, exact for every box inside
            the map. A RoI that needs more than G samples gets G samples per axis, evenly spread
            over the bin as torchvision would place them for sampling_ratio=G (an RoIAlign with a
            lower sampling ratio, not an error). Ignored when sampling_ratio > 0.

    Returns:
        [R, O_h, O_w, C] bin averages. A sample at y < -1 or y > H (x likewise) counts as 0; one
        inside is clamped to the map. With aligned=True and an adaptive grid, an inverted box
        (x2 < x1 or y2 < y1) has a non-positive grid and gives 0; torchvision gives 0 too, except
        where exactly one grid side is negative, where its kernel raises instead. The gradient
        flows to the features only (the boxes get none, as in torchvision).

    Raises:
        ValueError: wrong ranks/shapes of features, boxes or box_batch_index, bad output_size.
    """
    return _single_level(features, boxes, box_batch_index, output_size, spatial_scale, "align",
                         sampling_ratio, aligned, max_sampling_ratio=max_sampling_ratio)


def roi_pool(features: jax.Array, boxes: jax.Array, box_batch_index: jax.Array,
             output_size: int | tuple[int, int], spatial_scale: float = 1.0,
             max_bin_size: int | None = None) -> jax.Array:
    """RoIPool (Fast R-CNN), equal to `torchvision.ops.roi_pool` in value and gradient.

    The box is quantised to cells (round half away from zero, `end - start + 1` cells, at least
    1), split into O bins with floor/ceil edges, each clipped to the map; a bin's output is its
    maximum, 0 when empty. The gradient goes to the first maximum in raster order.

    Args:
        features: [B, H, W, C]; boxes: [R, 4] image pixels; box_batch_index: [R] int.
        output_size: O or (O_h, O_w). spatial_scale: 1 / stride.
        max_bin_size: static bound K on the cells of a bin per axis. None takes
            min(side, ceil(side / O) + 1), exact for every box inside the map. A bin that spans
            n > K cells is read at the K cells start + floor(k * n / K) (a strided maximum).

    Returns:
        [R, O_h, O_w, C].
    """
    return _single_level(features, boxes, box_batch_index, output_size, spatial_scale, "pool",
                         max_bin_size=max_bin_size)


def roi_warp(features: jax.Array, boxes: jax.Array, box_batch_index: jax.Array,
             output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> jax.Array:
    """RoIWarp (the Mask R-CNN paper's ablation, after MNC): quantise, then bilinear resize.

    Definition implemented, per axis (y shown; x alike): the box is quantised exactly as
    RoIPool does, start = round(y1 * s), end = round(y2 * s) (halves away from zero), n =
    max(end - start + 1, 1) cells. Cell k holds its value at coordinate k, so the quantised box
    covers [start - 0.5, end + 0.5]; output bin p takes ONE bilinear sample at its centre,
        y_p = start - 0.5 + (p + 0.5) * n / O,
    with RoIAlign's interpolation rule on the whole map (y < -1 or > H gives 0, otherwise
    clamped to the map). For a box inside the map, away from its border, this is a half-pixel
    bilinear resize (no antialiasing) of the n quantised cells to O, reading neighbours of the
    region at its edges; when n == O it is the crop itself.

    Args:
        features: [B, H, W, C]; boxes: [R, 4] image pixels; box_batch_index: [R] int.
        output_size: O or (O_h, O_w). spatial_scale: 1 / stride.

    Returns:
        [R, O_h, O_w, C].
    """
    return _single_level(features, boxes, box_batch_index, output_size, spatial_scale, "warp")


# --------------------------------------------------------------------------------------------
# Multi-level (FPN) pooling.


def assign_fpn_levels(boxes: jax.Array, min_level: int = 2, max_level: int = 5,
                      canonical_scale: int = 224, canonical_level: int = 4,
                      eps: float = 1e-6) -> jax.Array:
    """torchvision's LevelMapper (FPN paper eq. 1): floor(k0 + log2(sqrt(area) / s0) + eps).

    Args:
        boxes: [..., 4] (x1, y1, x2, y2) image pixels.

    Returns:
        [...] int32 level in [min_level, max_level]. Computed in float32 in torchvision's order
        of operations, so boxes on a boundary land on the same side. An inverted box (negative
        area, where torchvision's result is undefined) goes to min_level.
    """
    if jnp.ndim(boxes) < 1 or jnp.shape(boxes)[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {jnp.shape(boxes)}")
    boxes = jnp.asarray(boxes, jnp.float32)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s = jnp.sqrt(area)
    k = jnp.floor(canonical_level + jnp.log2(s / jnp.float32(canonical_scale))
                  + jnp.float32(eps))
    k = jnp.where(jnp.isnan(k), min_level, k)
    return jnp.clip(k, min_level, max_level).astype(jnp.int32)


def infer_spatial_scales(feature_sizes_hw: Sequence[Sequence[int]],
                         image_size_hw: Sequence[int]) -> list[float]:
    """torchvision's scale inference: 2 ** round(log2(feature_height / image_height))."""
    return [float(2.0 ** np.round(np.log2(np.float32(h) / np.float32(image_size_hw[0]))))
            for h, _ in feature_sizes_hw]


def multilevel_roi_align(features: Sequence[jax.Array] | FlatFeatures, boxes: jax.Array,
                         output_size: int | tuple[int, int], sampling_ratio: int = 2,
                         aligned: bool = False, mode: str = "align",
                         canonical_scale: int = 224, canonical_level: int = 4, *,
                         spatial_scales: Sequence[float] | None = None,
                         image_size_hw: Sequence[int] | None = None,
                         min_level: int = 2, max_sampling_ratio: int | None = None,
                         max_bin_size: int | None = None) -> jax.Array:
    """torchvision's `MultiScaleRoIAlign`: each RoI pooled from its LevelMapper level only.

    All levels are one flat buffer with per-level offsets, sizes and scales; a RoI's samples
    index its own level, so the cost is that of one pooling pass over the RoIs (not one per
    level).

    Args:
        features: L maps [B, H_l, W_l, C] from fine to coarse (P2..P5), same B and C, or
            `flatten_levels` of them (built once for several calls on the same maps).
        boxes: [B, R, 4] (x1, y1, x2, y2) image pixels per image.
        output_size: O or (O_h, O_w).
        sampling_ratio, aligned, max_sampling_ratio: as in `roi_align` (mode "align").
        mode: "align" (RoIAlign), "pool" (RoIPool) or "warp" (RoIWarp), the paper's ablation.
        canonical_scale, canonical_level: LevelMapper's s0 and k0 (224 at level 4).
        spatial_scales: L scales (1 / stride) of the maps. When None they are inferred as
            torchvision does from `image_size_hw` (the canvas the maps were computed on):
            2 ** round(log2(H_l / image_height)); with neither given, the maps are taken to be
            the FPN levels min_level, min_level + 1, ... (scale 2 ** -level).
        min_level: level of features[0] when neither scales nor image size are given.
        max_bin_size: as in `roi_pool` (mode "pool").

    Returns:
        [B, R, O_h, O_w, C]. Levels are clamped to [-log2(scale_0), -log2(scale_L-1)].
    """
    _check_mode(mode)
    flat_features = features if isinstance(features, FlatFeatures) else flatten_levels(features)
    num_levels = len(flat_features.level_shapes)
    batch = flat_features.level_shapes[0][0]
    _check_rank(boxes, 3, "boxes", "[batch, num_rois, 4]")
    if boxes.shape[2] != 4 or boxes.shape[0] != batch:
        raise ValueError(f"boxes must have shape [{batch}, num_rois, 4], got {boxes.shape}")
    out = _pair(output_size, "output_size")
    sizes = flat_features.sizes_hw
    if spatial_scales is None:
        if image_size_hw is not None:
            spatial_scales = infer_spatial_scales(sizes, image_size_hw)
        else:
            spatial_scales = [2.0 ** -(min_level + i) for i in range(num_levels)]
    if len(spatial_scales) != num_levels:
        raise ValueError(f"spatial_scales must have {num_levels} entries (one per level), "
                         f"got {len(spatial_scales)}")
    k_min = int(round(-math.log2(spatial_scales[0])))
    k_max = int(round(-math.log2(spatial_scales[-1])))

    num_rois = boxes.shape[1]
    dtype = flat_features.flat.dtype
    flat_boxes = boxes.reshape(batch * num_rois, 4).astype(dtype)
    level = assign_fpn_levels(flat_boxes, k_min, k_max, canonical_scale, canonical_level) - k_min
    batch_index = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_rois)
    pooled = _pool_rois(flat_features, flat_boxes, level, batch_index,
                        jnp.asarray(spatial_scales, dtype), out, mode, int(sampling_ratio),
                        aligned, _default_grid_bound(max_sampling_ratio, sizes, out),
                        _default_bin_bound(max_bin_size, sizes, out))
    return pooled.reshape(batch, num_rois, *pooled.shape[1:])
