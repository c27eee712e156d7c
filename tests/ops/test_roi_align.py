"""RoIAlign / RoIPool / RoIWarp / multi-level pooling against torchvision and hand computations.

Tolerances (float32 throughout):
- RoIAlign forward vs torchvision's float32 output: 2e-6 absolute. Both compute the same sample
  positions in the same order of operations (divisions kept IEEE-exact, see `_div`), so they
  differ only by the order of the 16 weighted terms of a bin: a few ulps of values ~3 (we see
  <= 4.8e-7). Against the float64 recomputation we must be no worse than torchvision's own
  float32 error plus that (its `_f64` copies show up to 2.1e-5).
- Gradients are sums over every RoI sample touching a cell, accumulated in another order than
  torchvision's; the bound is 1e-6 + 16 * eps32 * (sum of |contributions|) per cell, the
  sum-of-magnitudes obtained by running the same backward with |cotangent|.
- RoIPool: exact (a maximum selects one input; its gradient sums a few cotangents).
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import roi_align as ra
from tests.reference import reference_params

EPS32 = float(np.finfo(np.float32).eps)
FWD_ATOL = 2e-6


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def adaptive_bound(boxes, scale, out, aligned):
    """Largest ceil(extent / out) over boxes: the exact static bound for sampling_ratio=-1."""
    off = 0.5 if aligned else 0.0
    ext = np.concatenate([(boxes[:, 2] * scale - off) - (boxes[:, 0] * scale - off),
                          (boxes[:, 3] * scale - off) - (boxes[:, 1] * scale - off)])
    if not aligned:
        ext = np.maximum(ext, 1.0)
    return max(1, int(np.ceil(ext / out).max()))


@functools.partial(jax.jit, static_argnames=("op", "out", "kwargs"))
def fwd_and_grads(feats, boxes, index, cots, scale, *, op, out, kwargs):
    """op(feats) and d sum(op(feats) * cot) / d feats for each cot in cots [K, ...]."""
    fn = getattr(ra, op)
    pooled, vjp = jax.vjp(lambda f: fn(f, boxes, index, out, scale, **dict(kwargs)), feats)
    return pooled, jax.vmap(lambda c: vjp(c)[0])(cots)


def run_op(op, feats, boxes, index, cot, scale, out, **kwargs):
    """Output, gradient and the gradient tolerance of the module docstring, as numpy.

    The pooling is linear in the features, so the backward of |cotangent| sums the magnitudes
    of the contributions per cell; both backwards run in one compiled call.
    """
    cots = jnp.stack([jnp.asarray(cot), jnp.abs(jnp.asarray(cot))])
    pooled, grads = fwd_and_grads(jnp.asarray(feats), jnp.asarray(boxes),
                                  jnp.asarray(index, jnp.int32), cots, scale, op=op, out=out,
                                  kwargs=tuple(sorted(kwargs.items())))
    grads = np.asarray(grads)
    return np.asarray(pooled), grads[0], 1e-6 + 16 * EPS32 * grads[1]


def roi_align_cases(data):
    return sorted(k[len("out."):] for k in data.files
                  if k.startswith("out.a") and not k.endswith("_f64"))


def parse(case):
    a, sr, o, s = case.split(".")
    return bool(int(a[1:])), (-1 if sr == "srm1" else int(sr[2:])), int(o[1:]), int(s[1:])


# --------------------------------------------------------------------------------------------
# Reference arrays (../shared/reference): every case of every seed file.


@pytest.mark.parametrize("path", reference_params("roi_align_seed*.npz"))
def test_roi_align_matches_torchvision_reference(path):
    data = np.load(path)
    cases_json = path.with_name(path.name.replace("roi_align_", "cases_").replace(".npz", ".json"))
    failures = set()
    if cases_json.exists():
        info = json.loads(cases_json.read_text()).get("roi_align_malformed_boxes", {})
        failures = {(e["case"], e["roi"]) for e in info.get("torchvision_errors", [])}
    # The malformed (inverted) boxes ride along as extra RoIs: RoIs never interact.
    rois = np.concatenate([data["rois"], data["rois_malformed"]])
    num = len(data["rois"])
    cases = roi_align_cases(data)
    assert len(cases) == 32
    for case in cases:
        aligned, sr, out, stride = parse(case)
        scale = 1.0 / stride
        bound = adaptive_bound(rois[:, 1:], scale, out, aligned)
        cot = np.asarray(data[f"cot.o{out}"]).transpose(0, 2, 3, 1)
        cot = np.concatenate([cot, np.zeros((len(rois) - num, *cot.shape[1:]), np.float32)])
        got, grad, tol = run_op("roi_align", nhwc(data[f"feat.s{stride}"]), rois[:, 1:],
                                rois[:, 0], cot, scale, out, sampling_ratio=sr,
                                aligned=aligned, max_sampling_ratio=bound)
        want = data[f"out.{case}"].transpose(0, 2, 3, 1)
        want64 = data[f"out.{case}_f64"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got[:num], want, rtol=0, atol=FWD_ATOL, err_msg=case)
        tv_err = np.abs(want - want64).max()
        assert np.abs(got[:num] - want64).max() <= tv_err + FWD_ATOL, case
        want_grad = data[f"grad.{case}"].transpose(0, 2, 3, 1)
        assert np.all(np.abs(grad - want_grad) <= tol), (case, np.abs(grad - want_grad).max())
        for j in range(len(rois) - num):
            key = f"malformed.out.{case}.r{j}"
            if key in data.files:
                np.testing.assert_allclose(got[num + j], data[key][0].transpose(1, 2, 0),
                                           rtol=0, atol=FWD_ATOL, err_msg=key)
            else:
                # torchvision raises here (one negative adaptive grid side); we return 0.
                assert (case, j) in failures, key
                np.testing.assert_array_equal(got[num + j], 0.0)


@pytest.mark.parametrize("path", reference_params("roi_pool_seed*.npz"))
def test_roi_pool_matches_torchvision_reference(path):
    data = np.load(path)
    rois = data["rois"]
    cases = sorted(k[len("out."):] for k in data.files if k.startswith("out."))
    assert len(cases) == 8
    for case in cases:
        o, s = case.split(".")
        out, stride = int(o[1:]), int(s[1:])
        # The widest quantised bin of these boxes (the largest stick out of the map) spans 20
        # cells; a bound of 24 keeps every case exact (the default is exact inside the map).
        got, grad, _ = run_op("roi_pool", nhwc(data[f"feat.s{stride}"]), rois[:, 1:],
                              rois[:, 0], nhwc(data[f"cot.o{out}"]), 1.0 / stride, out,
                              max_bin_size=24)
        np.testing.assert_array_equal(got, data[f"out.{case}"].transpose(0, 2, 3, 1),
                                      err_msg=case)
        np.testing.assert_allclose(grad, data[f"grad.{case}"].transpose(0, 2, 3, 1), rtol=0,
                                   atol=1e-6, err_msg=case)


@pytest.mark.parametrize("path", reference_params("multiscale_roi_align_seed*.npz"))
def test_multiscale_roi_align_matches_torchvision_reference(path):
    data = np.load(path)
    feats = [nhwc(data[f"feat.{i}"]) for i in range(4)]
    boxes = jnp.stack([jnp.asarray(data["boxes.img0"]), jnp.asarray(data["boxes.img1"])])
    # LevelMapper, incl. the boxes at and around sqrt(area) = 112, 224, 448: exact.
    levels = ra.assign_fpn_levels(boxes.reshape(-1, 4)) - 2
    np.testing.assert_array_equal(np.asarray(levels), data["levels"])
    for out in (7, 14):
        want = data[f"out.o{out}"].transpose(0, 2, 3, 1)
        for kwargs in ({"image_size_hw": (800, 1216)}, {}):  # inferred / FPN-default scales
            got = ra.multilevel_roi_align(feats, boxes, out, 2, **kwargs)
            np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=0,
                                       atol=FWD_ATOL)


# --------------------------------------------------------------------------------------------
# Live torchvision parity on fresh inputs (other seeds, sizes, non-square outputs).


def random_boxes(rng, n, width, height, stride):
    """Boxes inside, across the border, outside, tiny and zero-size, in image pixels."""
    w, h = width * stride, height * stride
    x = rng.uniform(-0.3 * w, 1.2 * w, (n, 2))
    y = rng.uniform(-0.3 * h, 1.2 * h, (n, 2))
    boxes = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
    boxes[: n // 4, 2:] = boxes[: n // 4, :2] + rng.uniform(0, 1.5, (n // 4, 2))  # tiny
    boxes[n // 4: n // 4 + 2, 2:] = boxes[n // 4: n // 4 + 2, :2]  # zero size
    return boxes.astype(np.float32)


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_roi_align_and_pool_match_torchvision_live(seed):
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    batch, height, width, channels, stride = 2, 11 + seed, 17 - seed, 3, 4
    feats = rng.standard_normal((batch, height, width, channels)).astype(np.float32)
    boxes = random_boxes(rng, 24, width, height, stride)
    index = rng.integers(0, batch, len(boxes)).astype(np.int32)
    t_feats = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy()).requires_grad_()
    t_rois = torch.from_numpy(np.concatenate([index[:, None], boxes], 1).astype(np.float32))
    out = (5, 4)
    cot = rng.standard_normal((len(boxes), *out, channels)).astype(np.float32)
    t_cot = torch.from_numpy(cot.transpose(0, 3, 1, 2).copy())
    for aligned in (False, True):
        for sr in (2, 3, -1):
            bound = adaptive_bound(boxes, 1 / stride, min(out), aligned)
            got, grad, tol = run_op("roi_align", feats, boxes, index, cot, 1 / stride, out,
                                    sampling_ratio=sr, aligned=aligned,
                                    max_sampling_ratio=bound)
            t_out = tv_ops.roi_align(t_feats, t_rois, out, 1 / stride, sr, aligned)
            (t_grad,) = torch.autograd.grad((t_out * t_cot).sum(), t_feats)
            np.testing.assert_allclose(got, t_out.detach().numpy().transpose(0, 2, 3, 1),
                                       rtol=0, atol=FWD_ATOL, err_msg=f"{aligned} {sr}")
            assert np.all(np.abs(grad - t_grad.numpy().transpose(0, 2, 3, 1)) <= tol), \
                (aligned, sr)
    # RoIPool: these boxes stick out of the map, so use the always-exact bound (the map size).
    got, grad, _ = run_op("roi_pool", feats, boxes, index, cot, 1 / stride, out,
                          max_bin_size=max(height, width))
    t_out = tv_ops.roi_pool(t_feats, t_rois, out, 1 / stride)
    (t_grad,) = torch.autograd.grad((t_out * t_cot).sum(), t_feats)
    np.testing.assert_array_equal(got, t_out.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(grad, t_grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_multiscale_roi_align_matches_torchvision_live_with_grad():
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    image_hw, channels = (192, 256), 3
    feats = [rng.standard_normal((2, image_hw[0] // s, image_hw[1] // s, channels))
             .astype(np.float32) for s in (4, 8, 16, 32)]
    centre = rng.uniform(0, 190, (2, 20, 2))
    size = np.exp(rng.uniform(np.log(4), np.log(300), (2, 20, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)
    boxes[:, :3] = [[0, 0, 112, 112], [10, 10, 234, 234], [0, 0, 448, 448]]  # level edges
    pooler = tv_ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    t_feats = {str(i): torch.from_numpy(f.transpose(0, 3, 1, 2).copy()).requires_grad_()
               for i, f in enumerate(feats)}
    t_out = pooler(t_feats, [torch.from_numpy(b) for b in boxes], [image_hw] * 2)
    cot = rng.standard_normal((2, 20, 7, 7, channels)).astype(np.float32)
    t_cot = torch.from_numpy(cot.reshape(40, 7, 7, channels).transpose(0, 3, 1, 2).copy())
    t_grads = torch.autograd.grad((t_out * t_cot).sum(), list(t_feats.values()))

    def fn(fs):
        return ra.multilevel_roi_align(fs, jnp.asarray(boxes), 7, 2, image_size_hw=image_hw)

    got = np.asarray(jax.jit(fn)([jnp.asarray(f) for f in feats]))
    np.testing.assert_allclose(got.reshape(40, 7, 7, channels),
                               t_out.detach().numpy().transpose(0, 2, 3, 1), rtol=0,
                               atol=FWD_ATOL)
    grads = jax.grad(lambda fs: jnp.sum(fn(fs) * cot))([jnp.asarray(f) for f in feats])
    for g, t_g in zip(grads, t_grads):
        np.testing.assert_allclose(np.asarray(g), t_g.numpy().transpose(0, 2, 3, 1), rtol=0,
                                   atol=1e-5)


# --------------------------------------------------------------------------------------------
# RoIWarp: the definition in its docstring, computed by hand in numpy.


def warp_numpy(feat, box, out, scale):
    """One sample per bin at start - .5 + (p + .5) * n / O of the quantised box (per axis)."""
    def quant(lo, hi):
        start = int(math.floor(abs(lo * scale) + 0.5) * np.sign(lo * scale))
        end = int(math.floor(abs(hi * scale) + 0.5) * np.sign(hi * scale))
        return start, max(end - start + 1, 1)

    def axis(lo, hi, size):
        start, n = quant(lo, hi)
        taps = []
        for p in range(out):
            pos = start - 0.5 + (p + 0.5) * n / out
            if pos < -1 or pos > size:
                taps.append({})
                continue
            pos = min(max(pos, 0.0), size - 1)
            low = int(math.floor(pos))
            frac = pos - low
            taps.append({low: 1 - frac, min(low + 1, size - 1): frac} if frac else {low: 1.0})
        return taps

    rows = axis(box[1], box[3], feat.shape[0])
    cols = axis(box[0], box[2], feat.shape[1])
    res = np.zeros((out, out, feat.shape[2]))
    for p, row in enumerate(rows):
        for q, col in enumerate(cols):
            for y, wy in row.items():
                for x, wx in col.items():
                    res[p, q] += wy * wx * feat[y, x]
    return res


def test_roi_warp_matches_hand_computation():
    rng = np.random.default_rng(4)
    feat = rng.standard_normal((1, 12, 15, 2)).astype(np.float32)
    boxes = np.array([[8.0, 8.0, 36.0, 36.0],  # n = 8 cells
                      [3.1, 10.4, 50.2, 30.9],  # fractional, rounded
                      [-10.0, -6.0, 22.0, 60.0],  # across the border
                      [20.0, 20.0, 21.0, 21.0]], np.float32)  # one cell
    warp = jax.jit(ra.roi_warp, static_argnums=(3,))
    got = np.asarray(warp(jnp.asarray(feat), jnp.asarray(boxes), jnp.zeros(4, jnp.int32), 4,
                          0.25))
    for r, box in enumerate(boxes):
        np.testing.assert_allclose(got[r], warp_numpy(feat[0], box, 4, 0.25), atol=1e-5)
    # n == O: the crop itself; n == 2 O: the mean of each 2x2 block of the crop.
    crop = np.asarray(warp(jnp.asarray(feat), jnp.asarray([[8.0, 4.0, 20.0, 16.0]]),
                           jnp.zeros(1, jnp.int32), 4, 0.25))[0]
    np.testing.assert_allclose(crop, feat[0, 1:5, 2:6], atol=1e-6)
    half = np.asarray(warp(jnp.asarray(feat), jnp.asarray([[4.0, 4.0, 32.0, 32.0]]),
                           jnp.zeros(1, jnp.int32), 4, 0.25))[0]
    blocks = feat[0, 1:9, 1:9].reshape(4, 2, 4, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(half, blocks, atol=1e-6)


def test_multilevel_modes_use_each_rois_own_level():
    """pool/warp through the multi-level path equal the single-level op on the RoI's level."""
    rng = np.random.default_rng(5)
    feats = [rng.standard_normal((2, 64 // s, 96 // s, 3)).astype(np.float32) for s in (4, 8)]
    boxes = np.array([[[0, 0, 20, 20], [10, 5, 90, 60]], [[30, 20, 40, 50], [0, 0, 96, 64]]],
                     np.float32)
    level = np.asarray(ra.assign_fpn_levels(boxes, 2, 3, 32, 3)).reshape(-1) - 2
    assert set(level) == {0, 1}  # canonical 32 at level 3: both levels are used
    index = jnp.asarray([0, 0, 1, 1], jnp.int32)
    for mode, single in (("pool", "roi_pool"), ("warp", "roi_warp"), ("align", "roi_align")):
        got = jax.jit(functools.partial(ra.multilevel_roi_align, output_size=3, mode=mode,
                                        canonical_scale=32, canonical_level=3))(
            [jnp.asarray(f) for f in feats], jnp.asarray(boxes))
        kwargs = {"sampling_ratio": 2} if mode == "align" else {}
        op = jax.jit(functools.partial(getattr(ra, single), output_size=3, **kwargs))
        per_level = [np.asarray(op(jnp.asarray(f), jnp.asarray(boxes.reshape(-1, 4)), index,
                                   spatial_scale=0.25 / 2 ** lvl))
                     for lvl, f in enumerate(feats)]
        want = np.stack([per_level[lvl][r] for r, lvl in enumerate(level)])
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=1e-6,
                                   err_msg=mode)


def test_flattened_levels_pool_as_the_maps_and_carry_their_layout():
    """`flatten_levels` built once gives the same values and feature gradients as passing the
    maps (every mode), and its level table is the row layout of the concatenated maps."""
    rng = np.random.default_rng(7)
    feats = [jnp.asarray(rng.standard_normal((2, 64 // s, 96 // s, 3)), jnp.float32)
             for s in (4, 8)]
    boxes = jnp.asarray([[[0, 0, 20, 20], [10, 5, 90, 60]], [[30, 20, 40, 50], [0, 0, 96, 64]]],
                        jnp.float32)
    flat = ra.flatten_levels(feats)
    assert flat.level_shapes == ((2, 16, 24), (2, 8, 12))
    offsets, heights, widths = (np.asarray(a) for a in flat.level_table())
    np.testing.assert_array_equal(offsets, [0, 2 * 16 * 24])
    np.testing.assert_array_equal(heights, [16, 8])
    np.testing.assert_array_equal(widths, [24, 12])
    # Row (offset + (b * H + y) * W + x) is the map's pixel [b, y, x].
    np.testing.assert_array_equal(np.asarray(flat.flat[offsets[1] + (1 * 8 + 3) * 12 + 5]),
                                  np.asarray(feats[1][1, 3, 5]))
    for mode in ra.MODES:
        pool = functools.partial(ra.multilevel_roi_align, output_size=3, mode=mode,
                                 canonical_scale=32, canonical_level=3)
        # A flax.struct dataclass: it goes through jit like the list of maps.
        from_flat = jax.jit(lambda f, b: pool(ra.flatten_levels(f), b))
        np.testing.assert_array_equal(np.asarray(from_flat(feats, boxes)),
                                      np.asarray(jax.jit(pool)(feats, boxes)), err_msg=mode)
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda fl, b: pool(fl, b))(flat, boxes)),
            np.asarray(jax.jit(pool)(feats, boxes)), err_msg=mode)
        grads = [jax.grad(lambda f: jnp.sum(fn(f, boxes) ** 2))(feats)
                 for fn in (lambda f, b: pool(ra.flatten_levels(f), b), pool)]
        for got, want in zip(*grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6,
                                       err_msg=mode)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        ra.flatten_levels([feats[0], jnp.zeros((1, 8, 12, 3))])
    with pytest.raises(ValueError, match=r"boxes must have shape \[2, num_rois, 4\]"):
        ra.multilevel_roi_align(flat, boxes[:1], 3)


# --------------------------------------------------------------------------------------------
# Hand-computed cases and invariants.


def test_assign_fpn_levels_boundaries():
    boxes = jnp.asarray([[0, 0, 224, 224], [0, 0, 223.9, 224], [0, 0, 112, 112],
                         [0, 0, 111.9, 112], [0, 0, 448, 448], [0, 0, 2000, 2000],
                         [5, 5, 5, 5], [10, 10, 4, 20]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(ra.assign_fpn_levels(boxes)),
                                  [4, 3, 3, 2, 5, 5, 2, 2])


def test_roi_align_hand_computed_bin():
    """A 1x1 output over cells [0, 2] x [0, 2] with 2x2 samples at 0.5 and 1.5 (aligned=False)."""
    feat = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)  # value = 4 y + x
    align = jax.jit(ra.roi_align, static_argnums=(3, 5, 6))
    out = align(feat, jnp.asarray([[0.0, 0.0, 2.0, 2.0]]), jnp.zeros(1, jnp.int32), 1, 1.0, 2,
                False)
    # Bilinear of a linear function is exact: mean of 4 y + x at y, x in {0.5, 1.5} = 5.
    np.testing.assert_allclose(np.asarray(out), [[[[5.0]]]])
    # aligned=True shifts by half a pixel: samples at 0 and 1 -> mean 4 * .5 + .5 = 2.5.
    out = align(feat, jnp.asarray([[0.0, 0.0, 2.0, 2.0]]), jnp.zeros(1, jnp.int32), 1, 1.0, 2,
                True)
    np.testing.assert_allclose(np.asarray(out), [[[[2.5]]]])


def test_adaptive_grid_beyond_bound_uses_the_bound():
    """A box needing 6 samples per axis with max_sampling_ratio=3 equals sampling_ratio=3."""
    rng = np.random.default_rng(6)
    feat = jnp.asarray(rng.standard_normal((1, 20, 20, 2)).astype(np.float32))
    box, index = jnp.asarray([[0.5, 1.0, 12.5, 13.0]]), jnp.zeros(1, jnp.int32)
    align = jax.jit(ra.roi_align, static_argnames=("output_size", "sampling_ratio",
                                                   "max_sampling_ratio"))

    def run(sr, bound=None):
        return np.asarray(align(feat, box, index, output_size=2, sampling_ratio=sr,
                                max_sampling_ratio=bound))

    np.testing.assert_allclose(run(-1, 3), run(3), atol=1e-6)
    np.testing.assert_allclose(run(-1, 6), run(6), atol=1e-6)
    assert np.abs(run(-1, 3) - run(-1, 6)).max() > 1e-3  # the cap changes the result


def test_jit_grad_vmap_and_empty():
    rng = np.random.default_rng(7)
    feat = jnp.asarray(rng.standard_normal((2, 9, 10, 3)).astype(np.float32))
    boxes = jnp.asarray(random_boxes(rng, 6, 10, 9, 2))
    index = jnp.asarray([0, 1, 0, 1, 1, 0], jnp.int32)

    def fn(f, b):
        return ra.roi_align(f, b, index, 3, 0.5, 2)

    # Eager (op by op) and jit differ only by XLA's fused multiply-adds in the bin sums.
    eager = np.asarray(fn(feat, boxes))
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(feat, boxes)), eager, atol=1e-6)
    stacked = jax.jit(jax.vmap(lambda f, b, i: ra.roi_align(f, b, i, 3, 0.5, 2),
                               in_axes=(None, 0, 0)))(
        feat, jnp.stack([boxes, boxes[::-1]]), jnp.stack([index, index[::-1]]))
    np.testing.assert_allclose(np.asarray(stacked[0]), eager, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stacked[1]), eager[::-1], atol=1e-6)
    # Linear in the features: <grad, f> equals the output's weighted sum; boxes get no gradient.
    cot = jnp.asarray(rng.standard_normal(eager.shape).astype(np.float32))
    g_f, g_b = jax.jit(jax.grad(lambda f, b: jnp.sum(fn(f, b) * cot), argnums=(0, 1)))(
        feat, boxes)
    np.testing.assert_allclose(float(jnp.sum(g_f * feat)), float(jnp.sum(eager * cot)),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(g_b), 0.0)
    empty = ra.roi_align(feat, jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32), 3, 0.5, 2)
    assert empty.shape == (0, 3, 3, 3)
    ml = ra.multilevel_roi_align([feat, feat[:, ::2, ::2]], jnp.zeros((2, 0, 4)), 3)
    assert ml.shape == (2, 0, 3, 3, 3)


def test_clear_value_errors():
    feat = jnp.zeros((1, 8, 8, 2))
    boxes, index = jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="features"):
        ra.roi_align(feat[0], boxes, index, 2)
    with pytest.raises(ValueError, match="boxes"):
        ra.roi_align(feat, jnp.zeros((3, 5)), index, 2)
    with pytest.raises(ValueError, match="box_batch_index"):
        ra.roi_align(feat, boxes, index[:2], 2)
    with pytest.raises(ValueError, match="output_size"):
        ra.roi_pool(feat, boxes, index, 0)
    with pytest.raises(ValueError, match="max_sampling_ratio"):
        ra.roi_align(feat, boxes, index, 2, sampling_ratio=-1, max_sampling_ratio=0)
    with pytest.raises(ValueError, match="mode"):
        ra.multilevel_roi_align([feat], boxes[None], 2, mode="bilinear")
    with pytest.raises(ValueError, match="boxes"):
        ra.multilevel_roi_align([feat], boxes, 2)
    with pytest.raises(ValueError, match="spatial_scales"):
        ra.multilevel_roi_align([feat], boxes[None], 2, spatial_scales=[0.25, 0.125])
    with pytest.raises(ValueError, match=r"features\[1\]"):
        ra.multilevel_roi_align([feat, jnp.zeros((1, 4, 4, 3))], boxes[None], 2)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_backward_over_channel_halves_equals_one_loop(monkeypatch, sampling_ratio):
    """The feature gradient's scatter-adds run as two loops over channel halves (from
    2 * _MIN_SPLIT_CHANNELS channels): per channel the same terms in the same order, so the
    gradient equals the single loop's bit for bit (odd channel counts split unevenly)."""
    rng = np.random.default_rng(7)
    feats = jnp.asarray(rng.normal(size=(2, 12, 15, 9)), jnp.float32)
    boxes = jnp.asarray([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 59.0, 47.0], [20.0, 5.0, 21.0, 9.0]])
    index = jnp.asarray([0, 1, 1], jnp.int32)
    cot = jnp.asarray(rng.normal(size=(3, 4, 4, 9)), jnp.float32)

    def grad():
        return jax.grad(lambda f: jnp.sum(ra.roi_align(
            f, boxes, index, 4, 0.25, sampling_ratio=sampling_ratio) * cot))(feats)

    def loops():  # fori_loops with static bounds are scans (adaptive sampling adds the forward's)
        return str(jax.make_jaxpr(grad)()).count("scan[")

    monkeypatch.setattr(ra, "_MIN_SPLIT_CHANNELS", 100)
    jax.clear_caches()  # the constant is read when tracing
    one_loop, loops_unsplit = np.asarray(grad()), loops()
    monkeypatch.setattr(ra, "_MIN_SPLIT_CHANNELS", 4)
    jax.clear_caches()
    assert loops() == loops_unsplit + 1
    np.testing.assert_array_equal(np.asarray(grad()), one_loop)
    assert np.abs(one_loop).max() > 0


@pytest.mark.parametrize("num_rois", [4, 5])
def test_forward_over_roi_halves_equals_one_fusion(monkeypatch, num_rois):
    """On the CPU the forward's gathers run as two fusions over RoI halves (from _MIN_SPLIT_BINS
    output bins): per RoI the same terms in the same order, so the pooled features equal the
    single fusion's bit for bit (odd RoI counts split unevenly), and so does the gradient."""
    rng = np.random.default_rng(8)
    feats = jnp.asarray(rng.normal(size=(2, 12, 15, 6)), jnp.float32)
    boxes = jnp.asarray(rng.uniform(0, 40, size=(num_rois, 2)), jnp.float32)
    boxes = jnp.concatenate([boxes, boxes + jnp.asarray(rng.uniform(1, 20, (num_rois, 2)),
                                                        jnp.float32)], axis=1)
    index = jnp.asarray(np.arange(num_rois) % 2, jnp.int32)

    def pooled(f):
        return ra.roi_align(f, boxes, index, 4, 0.25, sampling_ratio=2)

    def barriers():
        return str(jax.make_jaxpr(pooled)(feats)).count("optimization_barrier")

    def grad():
        return jax.grad(lambda f: jnp.sum(pooled(f) ** 2))(feats)

    monkeypatch.setattr(ra, "_MIN_SPLIT_BINS", 10**9)
    jax.clear_caches()  # the constant is read when tracing
    one, one_grad, barriers_unsplit = np.asarray(pooled(feats)), np.asarray(grad()), barriers()
    monkeypatch.setattr(ra, "_MIN_SPLIT_BINS", 16)
    jax.clear_caches()
    assert barriers() == 2 * barriers_unsplit + 1  # each half's own, and the one over both
    np.testing.assert_array_equal(np.asarray(pooled(feats)), one)
    np.testing.assert_array_equal(np.asarray(grad()), one_grad)
    assert np.abs(one).max() > 0
