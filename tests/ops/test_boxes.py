"""Box ops and BoxCoder: torchvision reference arrays, hand computation, live parity, jit/vmap/grad.

Tolerances. IoU, area, clip and the small-box mask use the same float32 operations in the same
order as torchvision, so they are compared bit for bit. The coder calls `exp`/`log`, whose
float32 implementations (XLA vs torch/SLEEF) differ by 1 ulp on ~9 % of inputs:
- decode: x1, x2 = ctr -/+ half_w, so an ulp of error in exp(dw) * w or in ctr shows up
  relative to max(|ctr|, half_w) <= (|x1| + |x2|) / 2; we allow 4 eps * (|x1| + |x2|)
  (measured max: 1.9 eps on the reference set);
- encode: dx is exact up to one division rounding; dw = ww * log(ratio) carries one ulp of the
  ratio (absolute error eps * ww) plus one ulp of log; we allow 4 eps * (|ref| + weight)
  (measured max 2.4e-7 at |ref| ~ 21).
The reference set has no float64 copies for the coder; the live tests below also check the
coder against a float64 numpy evaluation to show both sides sit at the float32 floor.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import boxes as box_ops
from tests.reference import reference_params

EPS32 = float(np.finfo(np.float32).eps)
WEIGHTS = {"w1111": (1.0, 1.0, 1.0, 1.0), "w10_10_5_5": (10.0, 10.0, 5.0, 5.0)}


def _decode_tol(ref: np.ndarray) -> np.ndarray:
    ref = ref.reshape(ref.shape[:-1] + (-1, 2, 2))  # [..., k, (x1,y1)/(x2,y2), (x,y)]
    scale = np.abs(ref[..., 0, :]) + np.abs(ref[..., 1, :])
    return (4 * EPS32 * np.stack([scale, scale], axis=-2)).reshape(ref.shape[:-3] + (-1,))


def _encode_tol(ref: np.ndarray, weights) -> np.ndarray:
    return 4 * EPS32 * (np.abs(ref) + np.asarray(weights, np.float32))


def _assert_within(actual, expected, tol, what):
    """|actual - expected| <= tol where finite; identical infinities / NaNs elsewhere."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=what)
    err = np.where(finite, np.abs(actual - np.where(finite, expected, 0.0)), 0.0)
    err = np.where(np.isfinite(actual) | ~finite, err, np.inf)
    bad = err > tol
    assert not bad.any(), f"{what}: {bad.sum()} entries off, worst {err.max()} (tol at worst)"


# --- reference arrays ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", reference_params("box_coder_seed*.npz"))
@pytest.mark.parametrize("wname", sorted(WEIGHTS))
def test_box_coder_matches_reference(path, wname):
    d = np.load(path)
    w = WEIGHTS[wname]
    coder = box_ops.BoxCoder(w)
    dec = np.asarray(coder.decode(d["rel_codes"], d["anchors"]))
    ref = d[f"decode.{wname}"]
    _assert_within(dec, ref, _decode_tol(ref), f"decode {wname}")
    # Clamped codes really are in the set: some dw/dh exceed the clip.
    assert (d["rel_codes"][:, 2:] / np.asarray(w[2:]) > math.log(1000 / 16)).any()
    enc = np.asarray(coder.encode(d["gt"], d["anchors"]))
    ref = d[f"encode.{wname}"]
    _assert_within(enc, ref, _encode_tol(ref, w), f"encode {wname}")


@pytest.mark.parametrize("path", reference_params("box_coder_seed*.npz"))
def test_box_iou_matches_reference_bitwise(path):
    d = np.load(path)
    iou = np.asarray(box_ops.box_iou(d["iou.a"], d["iou.b"]))
    np.testing.assert_array_equal(iou, d["iou"])


# --- hand-computed cases -------------------------------------------------------------------------


def test_area_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 6, 7]], np.float32)
    b = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    np.testing.assert_array_equal(np.asarray(box_ops.box_area(a)), [100, 100, 2])
    iou = np.asarray(box_ops.box_iou(a, b))
    # Box 3 lies inside box b2 (2 / 100) and touches b0 only along the line y = 5 (0).
    expected = np.array([[0.5, 0.0, 1.0], [0.5, 0.0, 1.0], [0.0, 0.0, 0.02]], np.float32)
    np.testing.assert_array_equal(iou, expected)
    # Batched leading dims broadcast.
    batched = np.asarray(box_ops.box_iou(np.stack([a, a]), np.stack([b, b])))
    np.testing.assert_array_equal(batched, np.stack([expected, expected]))


def test_clip_and_small_mask_hand_computed():
    boxes = np.array([[-5, -1, 50, 30], [10, 10, 12, 10.5]], np.float32)
    clipped = np.asarray(box_ops.clip_boxes(boxes, (20, 40)))
    np.testing.assert_array_equal(clipped, [[0, 0, 40, 20], [10, 10, 12, 10.5]])
    # Per-image sizes for [B, R, 4] boxes.
    sizes = np.array([[20, 40], [8, 9]])
    per_image = np.asarray(box_ops.clip_boxes(np.stack([boxes, boxes]), sizes))
    np.testing.assert_array_equal(per_image[1], [[0, 0, 9, 8], [9, 8, 9, 8]])
    # remove_small: both sides >= min_size (equality keeps).
    np.testing.assert_array_equal(np.asarray(box_ops.remove_small_boxes_mask(boxes, 0.5)), [1, 1])
    np.testing.assert_array_equal(np.asarray(box_ops.remove_small_boxes_mask(boxes, 0.6)), [1, 0])


def test_decode_hand_computed_and_clip():
    anchor = np.array([[10, 20, 30, 60]], np.float32)  # w 20, h 40, centre (20, 40)
    codes = np.array([[1.0, -0.5, math.log(2.0), 100.0]], np.float32)
    out = np.asarray(box_ops.decode_boxes(codes, anchor, (1, 1, 1, 1)))
    h = 40 * 1000 / 16  # dh clamped at log(1000/16)
    expected = [40 - 20, 20 - h / 2, 40 + 20, 20 + h / 2]
    np.testing.assert_allclose(out[0], expected, rtol=4 * EPS32)
    # Round trip through encode for weights (10, 10, 5, 5).
    gt = np.array([[12, 18, 40, 50]], np.float32)
    coder = box_ops.BoxCoder((10, 10, 5, 5))
    np.testing.assert_allclose(
        np.asarray(coder.decode(coder.encode(gt, anchor), anchor)), gt, rtol=0, atol=1e-4
    )


def test_decode_several_codes_per_anchor():
    rng = np.random.default_rng(1)
    anchors = np.sort(rng.uniform(0, 100, (6, 2, 2)), axis=1).reshape(6, 4).astype(np.float32)
    anchors = anchors[:, [0, 2, 1, 3]]
    codes = rng.normal(0, 1, (6, 3 * 4)).astype(np.float32)
    many = np.asarray(box_ops.decode_boxes(codes, anchors, (10, 10, 5, 5)))
    for k in range(3):
        one = np.asarray(box_ops.decode_boxes(codes[:, 4 * k : 4 * k + 4], anchors, (10, 10, 5, 5)))
        np.testing.assert_array_equal(many[:, 4 * k : 4 * k + 4], one)


# --- jit / vmap / grad ---------------------------------------------------------------------------


def test_jit_vmap_grad():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 200, (3, 8, 2)).astype(np.float32)
    anchors = np.concatenate([xy, xy + rng.uniform(4, 60, (3, 8, 2)).astype(np.float32)], -1)
    codes = rng.normal(0, 2, (3, 8, 4)).astype(np.float32)
    w = (10.0, 10.0, 5.0, 5.0)
    coder = box_ops.BoxCoder(w)
    eager = np.asarray(coder.decode(codes, anchors))
    # Under jit XLA may fuse multiply-adds in the coder (1 ulp); IoU is guarded to stay exact.
    _assert_within(jax.jit(coder.decode)(codes, anchors), eager, _decode_tol(eager), "jit")
    _assert_within(jax.vmap(coder.decode)(codes, anchors), eager, _decode_tol(eager), "vmap")
    ious = np.asarray(jax.jit(jax.vmap(box_ops.box_iou))(anchors, anchors))
    np.testing.assert_array_equal(ious, np.asarray(box_ops.box_iou(anchors, anchors)))

    # d sum(x1 + x2) / d dx = 2 * width / wx; d sum(x2 - x1) / d dw = exp(dw / ww) * width / ww
    # below the clip and 0 above it.
    def centre_sum(c):
        b = coder.decode(c, anchors)
        return jnp.sum(b[..., 0] + b[..., 2])

    def width_sum(c):
        b = coder.decode(c, anchors)
        return jnp.sum(b[..., 2] - b[..., 0])

    width = anchors[..., 2] - anchors[..., 0]
    g = np.asarray(jax.grad(centre_sum)(codes))
    np.testing.assert_allclose(g[..., 0], 2 * width / w[0], rtol=1e-6)
    g = np.asarray(jax.grad(width_sum)(codes))
    dw = codes[..., 2] / w[2]
    expected = np.where(dw < math.log(1000 / 16), np.exp(dw) * width / w[2], 0.0)
    np.testing.assert_allclose(g[..., 2], expected, rtol=1e-5)
    g = np.asarray(jax.grad(lambda b: jnp.sum(box_ops.box_area(b)))(anchors))
    np.testing.assert_allclose(g[..., 2], anchors[..., 3] - anchors[..., 1], rtol=1e-6)


def test_value_errors_name_the_argument():
    with pytest.raises(ValueError, match="boxes1"):
        box_ops.box_iou(np.zeros((3, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="image_size_hw"):
        box_ops.clip_boxes(np.zeros((3, 4)), np.zeros((3,)))
    with pytest.raises(ValueError, match="rel_codes"):
        box_ops.decode_boxes(np.zeros((3, 6)), np.zeros((3, 4)), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        box_ops.BoxCoder((1.0, 1.0))


# --- live torchvision parity ---------------------------------------------------------------------


def _random_boxes(rng, n, span=1000.0, max_size=300.0):
    xy = rng.uniform(-50, span, (n, 2))
    wh = rng.uniform(0.5, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("seed", [11, 12])
def test_live_torchvision_parity(seed):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    a = _random_boxes(rng, 300)
    b = _random_boxes(rng, 200)
    # Some integer-coordinate boxes make exact ties (e.g. IoU exactly 0.5).
    a[:50] = np.round(a[:50])
    b[:50] = np.round(b[:50])
    ref_iou = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(np.asarray(box_ops.box_iou(a, b)), ref_iou)
    # Bit for bit under jit too: XLA's multiply-add contraction must not reach the IoU.
    np.testing.assert_array_equal(np.asarray(jax.jit(box_ops.box_iou)(a, b)), ref_iou)
    np.testing.assert_array_equal(
        np.asarray(box_ops.box_area(a)), torchvision.ops.box_area(torch.from_numpy(a)).numpy()
    )
    np.testing.assert_array_equal(
        np.asarray(box_ops.clip_boxes(a, (480, 640))),
        torchvision.ops.clip_boxes_to_image(torch.from_numpy(a), (480, 640)).numpy(),
    )
    keep = torchvision.ops.remove_small_boxes(torch.from_numpy(a), 20.0).numpy()
    np.testing.assert_array_equal(np.flatnonzero(box_ops.remove_small_boxes_mask(a, 20.0)), keep)

    codes = rng.normal(0, 1.5, (300, 4)).astype(np.float32)
    codes[:20, 2:] = rng.uniform(4, 30, (20, 2))  # beyond the clip for both weight sets
    for w in WEIGHTS.values():
        tv = TVBoxCoder(w)
        ref = tv.decode_single(torch.from_numpy(codes), torch.from_numpy(a)).numpy()
        out = np.asarray(box_ops.BoxCoder(w).decode(codes, a))
        _assert_within(out, ref, _decode_tol(ref), f"live decode {w}")
        # Both sit at the float32 floor of a float64 evaluation of the same formula.
        f64 = _decode_f64(codes, a, w)
        _assert_within(ref, f64, _decode_tol(f64), f"torchvision decode vs float64 {w}")
        _assert_within(out, f64, _decode_tol(f64), f"decode vs float64 {w}")
        ref = tv.encode_single(torch.from_numpy(b), torch.from_numpy(a[:200])).numpy()
        enc = np.asarray(box_ops.BoxCoder(w).encode(b, a[:200]))
        _assert_within(enc, ref, _encode_tol(ref, w), f"live encode {w}")


def _decode_f64(codes, anchors, w):
    codes = codes.astype(np.float64)
    anchors = anchors.astype(np.float64)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    cx = anchors[:, 0] + 0.5 * widths
    cy = anchors[:, 1] + 0.5 * heights
    clip = math.log(1000 / 16)
    pcx = codes[:, 0] / w[0] * widths + cx
    pcy = codes[:, 1] / w[1] * heights + cy
    pw = np.exp(np.minimum(codes[:, 2] / w[2], clip)) * widths
    ph = np.exp(np.minimum(codes[:, 3] / w[3], clip)) * heights
    return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
