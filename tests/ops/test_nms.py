"""NMS: exact equality of kept indices with torchvision (reference arrays and live), both forms.

There is no tolerance here: NMS returns indices, and they must be torchvision's exactly. That
needs the IoU bit for bit (float32, torchvision's operation order, no fused multiply-add) and
the threshold compared as torchvision compares it (float32 IoU against a double); the
adversarial tests put the threshold exactly on IoU values that occur in the data.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import nms as nms_ops
from tests.reference import reference_params

METHODS = ("loop", "tiled")



# Thresholds enter as traced float32 values (`float32_threshold` gives torchvision's double
# comparison), so one compile serves every threshold; `valid` is always passed for the same
# reason.
@functools.partial(jax.jit, static_argnames=("max_output", "method", "tile_size"))
def _nms_jit(boxes, scores, thr32, valid, max_output, method, tile_size):
    return nms_ops.nms(boxes, scores, thr32, max_output, valid, method=method, tile_size=tile_size)


@functools.partial(jax.jit, static_argnames=("max_output", "method", "mode"))
def _batched_jit(boxes, scores, idxs, thr32, valid, max_output, method, mode):
    return nms_ops.batched_nms(
        boxes, scores, idxs, thr32, max_output, valid, method=method, mode=mode
    )


def _nms(boxes, scores, thr, max_output, valid=None, method="tiled", tile_size=256):
    valid = np.ones(len(scores), bool) if valid is None else valid
    thr32 = nms_ops.float32_threshold(thr)
    return _nms_jit(boxes, scores, thr32, valid, max_output, method, tile_size)


def _batched(boxes, scores, idxs, thr, max_output, valid=None, method="tiled", mode="auto"):
    valid = np.ones(len(scores), bool) if valid is None else valid
    thr32 = nms_ops.float32_threshold(thr)
    return _batched_jit(boxes, scores, idxs, thr32, valid, max_output, method, mode)


def _kept(out):
    keep, valid = (np.asarray(x) for x in out)
    # Padding is -1 / False and sits after the kept boxes.
    assert keep.dtype == np.int32 and valid.dtype == bool
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any() and (keep[n:] == -1).all()
    return keep[:n]


# --- reference arrays ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", reference_params("nms_seed*.npz"))
@pytest.mark.parametrize("method", METHODS)
def test_nms_matches_reference(path, method):
    d = np.load(path)
    boxes, scores = d["nms.boxes"], d["nms.scores"]
    n = len(scores)
    for t in (30, 50, 70):
        ref = d[f"nms.keep.t{t}"]
        # tile_size 64: several tiles, so cross-tile suppression is exercised.
        got = _kept(_nms(boxes, scores, t / 100, n, method=method, tile_size=64))
        np.testing.assert_array_equal(got, ref, err_msg=f"t={t}")
    # A short max_output returns the best D of the same answer.
    got = _kept(_nms(boxes, scores, 0.5, 50, method=method))
    np.testing.assert_array_equal(got, d["nms.keep.t50"][:50])
    # Exact-0.5 / 1.0 / 0 IoU pairs: suppression is strict. Also through the public call with
    # a Python float threshold (the static path).
    got = _kept(_nms(d["tie.boxes"], d["tie.scores"], 0.5, 8, method=method))
    np.testing.assert_array_equal(got, d["tie.keep.t50"])
    got = _kept(nms_ops.nms(d["tie.boxes"], d["tie.scores"], 0.5, 8, method=method))
    np.testing.assert_array_equal(got, d["tie.keep.t50"])


@pytest.mark.parametrize("path", reference_params("nms_seed*.npz"))
@pytest.mark.parametrize("case", ["small", "large"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_nms_matches_reference(path, case, method):
    d = np.load(path)
    boxes, scores, idxs = (d[f"bnms.{case}.{k}"] for k in ("boxes", "scores", "idxs"))
    n = len(scores)
    # torchvision's path for this size: offset trick for <= 4000 numbers, else per class.
    path_mode = "offset" if 4 * n <= 4000 else "per_group"
    for mode in ("auto", path_mode):
        for t in (50, 70):
            ref = d[f"bnms.{case}.keep.t{t}"]
            got = _kept(_batched(boxes, scores, idxs, t / 100, n, method=method, mode=mode))
            np.testing.assert_array_equal(got, ref, err_msg=f"t={t} mode={mode}")


@pytest.mark.parametrize("path", reference_params("nms_seed*.npz"))
@pytest.mark.parametrize("method", METHODS)
def test_padding_is_ignored(path, method):
    """Invalid boxes with top scores, mixed in, change nothing (indices map back)."""
    d = np.load(path)
    boxes, scores = d["nms.boxes"], d["nms.scores"]
    n, pad = len(scores), 77
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(n + pad, n, replace=False))  # where the real boxes go
    big_boxes = np.tile(boxes[:1], (n + pad, 1))  # padding duplicates a real box ...
    big_scores = np.full(n + pad, 10.0, np.float32)  # ... with the best score
    big_valid = np.zeros(n + pad, bool)
    big_boxes[pos], big_scores[pos], big_valid[pos] = boxes, scores, True
    got = _kept(_nms(big_boxes, big_scores, 0.5, n, big_valid, method=method, tile_size=128))
    np.testing.assert_array_equal(got, pos[d["nms.keep.t50"]])


# --- hand-made cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_all_valid(method):
    d_out = 7
    # No boxes at all.
    keep, valid = _nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, d_out,
                       method=method)
    np.testing.assert_array_equal(keep, [-1] * d_out)
    np.testing.assert_array_equal(valid, [False] * d_out)
    keep, valid = _batched(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                           np.zeros((0,), np.int32), 0.5, d_out, method=method)
    np.testing.assert_array_equal(keep, [-1] * d_out)
    assert not np.asarray(valid).any()
    # Boxes, none valid.
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 0, 10, 10]],
                     np.float32)
    scores = np.array([0.1, 0.9, 0.5, 0.7], np.float32)
    keep, valid = _nms(boxes, scores, 0.5, d_out, np.zeros(4, bool), method=method)
    np.testing.assert_array_equal(keep, [-1] * d_out)
    assert not np.asarray(valid).any()
    keep, valid = _batched(boxes, scores, np.arange(4), 0.5, d_out, np.zeros(4, bool),
                           method=method)
    np.testing.assert_array_equal(keep, [-1] * d_out)
    assert not np.asarray(valid).any()
    # All valid: box 3 duplicates box 0 (IoU 1) with a higher score, so box 0 goes.
    got = _kept(_nms(boxes, scores, 0.5, d_out, method=method))
    np.testing.assert_array_equal(got, [1, 3, 2])
    # All valid and all kept, D = N: the full permutation by score.
    got = _kept(_nms(boxes[:3], scores[:3], 0.5, 3, method=method))
    np.testing.assert_array_equal(got, [1, 2, 0])
    # Equal scores: lower index first (torch's CPU sort is stable), then suppression.
    tie = np.full(4, 0.5, np.float32)
    np.testing.assert_array_equal(_kept(_nms(boxes, tie, 0.5, 4, method=method)), [0, 1, 2])


@pytest.mark.parametrize("method", METHODS)
def test_jit_vmap(method):
    rng = np.random.default_rng(3)
    b, n, d_out = 3, 120, 40
    boxes = np.stack([_clustered_boxes(rng, n, 10) for _ in range(b)])
    scores = rng.random((b, n)).astype(np.float32)
    valid = rng.random((b, n)) < np.array([[0.0], [0.5], [1.0]])  # none, half, all
    kw = dict(iou_threshold=0.6, max_output=d_out, method=method, tile_size=32)
    keep, kvalid = jax.jit(jax.vmap(lambda b_, s_, v_: nms_ops.nms(b_, s_, valid=v_, **kw)))(
        boxes, scores, valid
    )
    for i in range(b):
        k1, v1 = _nms(boxes[i], scores[i], 0.6, d_out, valid[i], method, tile_size=32)
        np.testing.assert_array_equal(keep[i], k1)
        np.testing.assert_array_equal(kvalid[i], v1)
    assert not np.asarray(kvalid[0]).any() and np.asarray(kvalid[2]).sum() > 0
    # batched_nms under vmap: its "auto" path choice depends on each example's valid count.
    groups = rng.integers(0, 4, (b, n))

    def batched(b_, s_, g_, v_):
        return nms_ops.batched_nms(b_, s_, g_, 0.6, d_out, v_, method=method, tile_size=32)

    keep, kvalid = jax.jit(jax.vmap(batched))(boxes, scores, groups, valid)
    for i in range(b):
        k1, v1 = _batched(boxes[i], scores[i], groups[i], 0.6, d_out, valid[i], method=method)
        np.testing.assert_array_equal(keep[i], k1)
        np.testing.assert_array_equal(kvalid[i], v1)


def test_float32_threshold_compares_like_a_double():
    for thr in (0.1, 0.3, 0.5, 0.7, 0.9, 1 / 3):
        t32 = nms_ops.float32_threshold(thr)
        x = np.float32(thr)
        near = [x]
        for _ in range(3):
            near = [np.nextafter(near[0], np.float32(-1))] + near + [
                np.nextafter(near[-1], np.float32(2))
            ]
        for v in near:
            assert bool(v > t32) == (float(v) > thr), (thr, v)
    # 0.1 rounds up in float32, so float32(0.1) itself must count as above the threshold.
    assert np.float32(0.1) > nms_ops.float32_threshold(0.1)


def test_value_errors():
    boxes, scores = np.zeros((5, 4), np.float32), np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="boxes"):
        nms_ops.nms(np.zeros((5, 5)), scores, 0.5, 3)
    with pytest.raises(ValueError, match="scores"):
        nms_ops.nms(boxes, np.zeros(4), 0.5, 3)
    with pytest.raises(ValueError, match="valid"):
        nms_ops.nms(boxes, scores, 0.5, 3, valid=np.ones(4, bool))
    with pytest.raises(ValueError, match="method"):
        nms_ops.nms(boxes, scores, 0.5, 3, method="fast")
    with pytest.raises(ValueError, match="max_output"):
        nms_ops.nms(boxes, scores, 0.5, -1)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_ops.nms(boxes, scores, jnp.ones(2), 3)
    with pytest.raises(ValueError, match="group_ids"):
        nms_ops.batched_nms(boxes, scores, np.zeros(3, np.int32), 0.5, 3)
    with pytest.raises(ValueError, match="mode"):
        nms_ops.batched_nms(boxes, scores, np.zeros(5, np.int32), 0.5, 3, mode="vanilla")


# --- live torchvision parity --------------------------------------------------------------------


def _clustered_boxes(rng, n, clusters, integer=False):
    """RPN-like boxes: jittered copies of a few objects (many IoUs near any threshold)."""
    centres = rng.uniform(0, 600, (clusters, 2))
    sizes = rng.uniform(8, 200, (clusters, 2))
    c = rng.integers(0, clusters, n)
    ctr = centres[c] + rng.normal(0, 1, (n, 2)) * sizes[c] * 0.1
    wh = sizes[c] * np.exp(rng.normal(0, 0.1, (n, 2)))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1)
    if integer:
        boxes = np.round(boxes)  # exact-tie IoUs (0.5, 1.0, ...) become common
    return boxes.astype(np.float32)


def _live_inputs(seed, n):
    rng = np.random.default_rng(seed)
    boxes = _clustered_boxes(rng, n, max(3, n // 40), integer=seed % 2 == 0)
    boxes[: n // 10] = boxes[n // 10 : 2 * (n // 10)]  # exact duplicates
    scores = rng.random(n).astype(np.float32)
    scores[::3] = np.round(scores[::3] * 8) / 8  # many equal scores
    return boxes, scores


@pytest.mark.parity
def test_backend_default_tile_sizes_keep_torchvisions_boxes():
    """The per-backend default tiles (CPU 256, GPU 1024, TPU 512; `tile_size=None` picks one)
    on 2,500 clustered boxes: several tiles of 256 / 512 and one of 1,024 then a partial one."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    assert nms_ops.default_tile_size() == {"cpu": 256, "gpu": 1024, "tpu": 512}.get(
        jax.default_backend(), 256)
    boxes, scores = _live_inputs(105, 2500)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.7).numpy()
    assert 300 < len(ref) < 2400  # suppression inside and across tiles
    for tile in (None, 256, 512, 1024):
        got = _kept(_nms(boxes, scores, 0.7, len(scores), tile_size=tile))
        np.testing.assert_array_equal(got, ref, err_msg=f"tile_size={tile}")


@pytest.mark.parity
@pytest.mark.parametrize("seed,n", [(101, 300), (102, 1000), (103, 64)])
def test_live_nms_parity(seed, n):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.set_num_threads(1)
    boxes, scores = _live_inputs(seed, n)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    # Adversarial thresholds: IoU values that occur between the top box (always kept) and
    # others, so the answer hinges on the last bit of the IoU and on the strict comparison.
    top = int(np.argmax(scores))
    row = torchvision.ops.box_iou(tb[top : top + 1], tb)[0].numpy()
    row = np.unique(row[(row > 0.2) & (row < 0.9)])
    # Thresholds are traced, so many cost no compile.
    thresholds = [0.5, 0.7] + [float(v) for v in row[:: max(1, len(row) // 30)]]
    for thr in thresholds:
        ref = torchvision.ops.nms(tb, ts, thr).numpy()
        for method in METHODS:
            got = _kept(_nms(boxes, scores, thr, n, method=method, tile_size=128))
            np.testing.assert_array_equal(got, ref, err_msg=f"{method} thr={thr!r}")


@pytest.mark.parity
@pytest.mark.parametrize("seed,n,groups", [(201, 400, 5), (202, 1200, 30)])
def test_live_batched_nms_parity(seed, n, groups):
    """Exact on distinct scores. With equal scores torchvision's per-class path orders its
    result with an unstable `sort` (implementation-defined among ties), so there we check the
    same kept set and the same score sequence; ours puts lower indices first."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.set_num_threads(1)
    boxes, tied_scores = _live_inputs(seed, n)
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct
    idxs = rng.integers(0, groups, n)
    valid = rng.random(n) < 0.6
    sub = np.flatnonzero(valid)

    def tv(s, sel):
        args = (torch.from_numpy(boxes[sel]), torch.from_numpy(s[sel]), torch.from_numpy(idxs[sel]))
        return sel[torchvision.ops.batched_nms(*args, 0.5).numpy()]

    everything = np.arange(n)
    for method in METHODS:
        got = _kept(_batched(boxes, scores, idxs, 0.5, n, method=method))
        np.testing.assert_array_equal(got, tv(scores, everything), err_msg=method)
    # With padding: torchvision on the valid subset (which may switch its path) vs ours.
    got = _kept(_batched(boxes, scores, idxs, 0.5, n, valid))
    np.testing.assert_array_equal(got, tv(scores, sub))
    # Tied scores.
    got = _kept(_batched(boxes, tied_scores, idxs, 0.5, n))
    ref = tv(tied_scores, everything)
    np.testing.assert_array_equal(np.sort(got), np.sort(ref))
    np.testing.assert_array_equal(tied_scores[got], tied_scores[ref])
    order = np.lexsort((got, -tied_scores[got]))
    np.testing.assert_array_equal(got, got[order])
