"""Greedy non-maximum suppression with static shapes, equal to `torchvision.ops.nms`.

Semantics (torchvision's CPU kernel, reproduced bit for bit):
- boxes are visited in decreasing score; equal scores keep their input order (lower index
  first; torch's CPU sort is stable);
- a visited box that is not yet suppressed is kept and suppresses every later box j with
  IoU > iou_threshold (strict), IoU = inter / ((area_i + area_j) - inter) in float32 and
  compared, as the C++ kernel does, against the threshold as a double;
- the result is the kept indices in visiting order, here truncated / padded to `max_output`.

Two implementations behind one `nms` function (`method=`):
- "loop": one kept box per `lax.while_loop` iteration: suppress with its IoU row, jump to the
  next unsuppressed box, stop after `max_output` kept. Least arithmetic, but one iteration per
  kept box.
- "tiled": the padded-NMS idea of the TF TPU code: sort once, walk tiles of `tile_size` boxes.
  A tile is first suppressed by the boxes already kept (one [D, T] IoU block against the
  compact list of at most D kept boxes), then resolves suppression inside itself by a
  fixed-point iteration on its [T, T] IoU matrix (after t sweeps the first t entries are final,
  so it converges to the greedy answer, usually in a few sweeps). Few, wide loop iterations.
"auto" picks per backend from `_AUTO_METHOD`: the tiled form everywhere, since it also measured
fastest on CPU (benchmarks/ops.py); on accelerators every loop iteration costs kernel launches.

Glossary: N = number of input boxes, D = max_output, T = tile size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mrcnn_jax.ops.boxes import rounded

# torchvision.ops.batched_nms takes its per-class loop ("vanilla") path instead of the
# coordinate-offset trick when boxes.numel() exceeds this on CPU (100_000 on GPU). The two paths
# can differ in the last float32 bit of an IoU, so "auto" mode follows the CPU rule.
TORCHVISION_CPU_COORDINATE_TRICK_MAX_NUMEL = 4000

# What `tile_size=None` uses per backend, the fastest of benchmarks/ops.py (docs/benchmarks.md,
# "NMS"): on CPUs a mid-sized tile, on GPUs the larger the better (fewer sequential steps);
# TPUs: 512, the TF TPU implementation's tile (not measured here).
_AUTO_TILE_SIZE = {"cpu": 256, "gpu": 1024, "tpu": 512}
_METHODS = ("auto", "loop", "tiled")
# What `method="auto"` runs per backend: the tiled form, faster than the per-box loop on CPUs
# for RPN-like and dense boxes alike (docs/benchmarks.md); the loop only wins when very few boxes
# survive, and on accelerators every loop iteration costs kernel launches.
_AUTO_METHOD = {"cpu": "tiled", "gpu": "tiled", "tpu": "tiled"}
_BATCHED_MODES = ("auto", "offset", "per_group")


def float32_threshold(iou_threshold: float) -> np.float32:
    """The float32 t such that (iou > t) == (double(iou) > iou_threshold) for every float32 iou.

    torchvision's kernel compares a float32 IoU against a double threshold; comparing against
    float32(threshold) would be wrong when rounding goes up (then equality must suppress). The
    largest float32 not above the threshold gives exactly the double comparison.
    """
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
        t = np.nextafter(t, np.float32(-np.inf))
    return np.float32(t)


def _check_inputs(boxes, scores, valid, max_output, iou_threshold):
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {boxes.shape}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [N] = [{boxes.shape[0]}], got shape {scores.shape}")
    if valid is None:
        valid = jnp.ones(scores.shape, bool)
    else:
        valid = jnp.asarray(valid)
        if valid.shape != scores.shape:
            raise ValueError(f"valid must be [N] = [{boxes.shape[0]}], got shape {valid.shape}")
        valid = valid.astype(bool)
    if not isinstance(max_output, (int, np.integer)) or max_output < 0:
        raise ValueError(f"max_output must be a non-negative Python int, got {max_output!r}")
    if np.ndim(iou_threshold) != 0:
        raise ValueError(f"iou_threshold must be a scalar, got shape {np.shape(iou_threshold)}")
    return boxes, scores, valid


def _threshold(iou_threshold) -> jnp.ndarray | np.float32:
    """A Python / float64 number is compared like torchvision (as a double); a jax array or a
    float32 value is used as the float32 threshold itself (it may be traced)."""
    if isinstance(iou_threshold, jax.Array) or np.asarray(iou_threshold).dtype == np.float32:
        return jnp.asarray(iou_threshold, jnp.float32)
    return float32_threshold(float(iou_threshold))


def _resolve_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "auto":
        return _AUTO_METHOD.get(jax.default_backend(), "tiled")
    return method


def default_tile_size() -> int:
    """The tiled form's tile size for the backend being traced for (`_AUTO_TILE_SIZE`)."""
    return _AUTO_TILE_SIZE.get(jax.default_backend(), 256)


def _sort_order(scores: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """[N] int32 permutation: valid boxes by decreasing score, ties by index, invalid last."""
    n = scores.shape[0]
    iota = lax.iota(jnp.int32, n)
    # `+ 0.0` maps -0.0 to +0.0 so both compare equal, as in torch's sort.
    neg = -(scores.astype(jnp.float32) + 0.0)
    _, _, order = lax.sort((~valid, neg, iota), num_keys=3)
    return order


class _Pairwise:
    """Suppression test between sorted boxes, with the float32 operation order of torchvision."""

    def __init__(self, boxes, thr, groups=None, use_groups=None):
        self.x1, self.y1, self.x2, self.y2 = (boxes[:, k] for k in range(4))
        self.area = rounded((self.x2 - self.x1) * (self.y2 - self.y1))
        self.thr = thr
        self.groups = groups
        self.use_groups = use_groups

    def suppresses(self, i, j):
        """bool [len(i), len(j)]: box i (kept, higher score) suppresses box j. i, j: int [.]."""
        xx1 = jnp.maximum(self.x1[i][:, None], self.x1[j][None, :])
        yy1 = jnp.maximum(self.y1[i][:, None], self.y1[j][None, :])
        xx2 = jnp.minimum(self.x2[i][:, None], self.x2[j][None, :])
        yy2 = jnp.minimum(self.y2[i][:, None], self.y2[j][None, :])
        w = jnp.maximum(xx2 - xx1, 0.0)
        h = jnp.maximum(yy2 - yy1, 0.0)
        inter = rounded(w * h)  # no fused multiply-add into the union (see boxes.rounded)
        iou = inter / (self.area[i][:, None] + self.area[j][None, :] - inter)
        out = iou > self.thr
        if self.groups is not None:
            same = self.groups[i][:, None] == self.groups[j][None, :]
            out = out & (same | ~self.use_groups)
        return out


def _first_true_after(mask: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
    """Smallest index > pos where mask is True, or len(mask) if none."""
    n = mask.shape[0]
    cand = mask & (lax.iota(jnp.int32, n) > pos)
    return jnp.where(jnp.any(cand), jnp.argmax(cand).astype(jnp.int32), jnp.int32(n))


def _nms_loop(pair: _Pairwise, valid_sorted: jnp.ndarray, max_output: int) -> jnp.ndarray:
    """Kept sorted positions [D] (-1 padded), one kept box per while_loop iteration."""
    n = valid_sorted.shape[0]
    all_idx = lax.iota(jnp.int32, n)

    def cond(state):
        pos, _, count, _ = state
        return (pos < n) & (count < max_output)

    def body(state):
        pos, alive, count, out = state
        out = out.at[count].set(pos)
        alive = alive & ~pair.suppresses(pos[None], all_idx)[0]
        return _first_true_after(alive, pos), alive, count + 1, out

    first = _first_true_after(valid_sorted, jnp.int32(-1))
    out0 = jnp.full((max_output,), -1, jnp.int32)
    state = (first, valid_sorted, jnp.int32(0), out0)
    return lax.while_loop(cond, body, state)[3]


def _nms_tiled(
    pair: _Pairwise, valid_sorted: jnp.ndarray, max_output: int, tile_size: int
) -> jnp.ndarray:
    """Kept sorted positions [D] (-1 padded), tile by tile."""
    n = valid_sorted.shape[0]
    t = max(1, min(int(tile_size), n))
    num_tiles = -(-n // t)
    n_pad = num_tiles * t
    # Padded positions point at box n - 1 but are never alive, so they neither keep nor suppress.
    all_idx = jnp.minimum(lax.iota(jnp.int32, n_pad), n - 1)
    alive0 = jnp.pad(valid_sorted, (0, n_pad - n))
    upper = lax.iota(jnp.int32, t)[:, None] < lax.iota(jnp.int32, t)[None, :]
    slots = lax.iota(jnp.int32, max_output)

    def cond(state):
        tile, _, count = state
        return (tile < num_tiles) & (count < max_output)

    def body(state):
        tile, kept, count = state
        start = tile * t
        tile_pos = start + lax.iota(jnp.int32, t)
        tile_idx = lax.dynamic_slice(all_idx, (start,), (t,))
        tile_alive = lax.dynamic_slice(alive0, (start,), (t,))
        # Suppression by the boxes kept so far (a compact list of at most D, all from earlier
        # tiles): a [D, T] block rather than [N, T].
        by_kept = pair.suppresses(jnp.maximum(kept, 0), tile_idx) & (slots < count)[:, None]
        init = tile_alive & ~jnp.any(by_kept, axis=0)
        within = pair.suppresses(tile_idx, tile_idx) & upper

        def sweep(c):
            keep, _ = c
            new = init & ~jnp.any(within & keep[:, None], axis=0)
            return new, jnp.any(new != keep)

        keep, _ = lax.while_loop(lambda c: c[1], sweep, (init, jnp.bool_(True)))
        # Append this tile's kept positions to the list (beyond D they are dropped).
        dest = jnp.where(keep, count + jnp.cumsum(keep, dtype=jnp.int32) - 1, max_output)
        kept = kept.at[dest].set(tile_pos, mode="drop")
        return tile + 1, kept, count + jnp.sum(keep, dtype=jnp.int32)

    state = (jnp.int32(0), jnp.full((max_output,), -1, jnp.int32), jnp.int32(0))
    return lax.while_loop(cond, body, state)[1]


def _run(pair, order, valid_sorted, max_output, method, tile_size):
    n = order.shape[0]
    tile_size = default_tile_size() if tile_size is None else tile_size
    if n == 0 or max_output == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((max_output,), bool)
    if method == "loop":
        pos = _nms_loop(pair, valid_sorted, max_output)
    else:
        pos = _nms_tiled(pair, valid_sorted, max_output, tile_size)
    keep_valid = pos >= 0
    keep = jnp.where(keep_valid, order[jnp.maximum(pos, 0)], -1)
    return keep.astype(jnp.int32), keep_valid


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float,
    max_output: int,
    valid: jnp.ndarray | None = None,
    method: str = "auto",
    tile_size: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS returning exactly `torchvision.ops.nms(boxes[valid], ...)`'s kept indices.

    Args:
        boxes: [N, 4] xyxy float32.
        scores: [N].
        iou_threshold: a box is suppressed when IoU > iou_threshold. A Python number is
            compared exactly as torchvision does (float32 IoU against the double); a jax array
            or float32 scalar is used as is and may be traced (pass `float32_threshold(x)` to
            get torchvision's comparison for x without recompiling per threshold).
        max_output: static D; at most D kept boxes are returned (the D best).
        valid: optional bool [N]; False boxes are ignored (neither kept nor suppressing).
        method: "auto" (the measured-fastest form for the backend, see `_AUTO_METHOD`),
            "loop" or "tiled".
        tile_size: boxes per tile of the tiled form (None: `default_tile_size()`).
    Returns:
        keep_indices: int32 [D], indices into boxes in decreasing score order, -1 padded.
        keep_valid: bool [D].
    """
    boxes, scores, valid = _check_inputs(boxes, scores, valid, max_output, iou_threshold)
    method = _resolve_method(method)
    order = _sort_order(scores, valid)
    pair = _Pairwise(boxes[order], _threshold(iou_threshold))
    return _run(pair, order, valid[order], int(max_output), method, tile_size)


def batched_nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    group_ids: jnp.ndarray,
    iou_threshold: float,
    max_output: int,
    valid: jnp.ndarray | None = None,
    method: str = "auto",
    mode: str = "auto",
    tile_size: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """NMS independently per group (class or level), equal to `torchvision.ops.batched_nms`.

    torchvision has two paths that can differ in the last bit of an IoU:
    - "offset": the coordinate-offset trick, boxes + group * (max coordinate + 1) in float32,
      then one plain NMS (taken on CPU when 4 * num_boxes <= 4000);
    - "per_group": NMS per group on the original coordinates (taken otherwise); here it is one
      NMS whose suppression test also requires equal groups.
    "auto" takes torchvision's CPU choice from the number of *valid* boxes at run time, so the
    result equals torchvision's on the filtered boxes `boxes[valid]`. One caveat: torchvision's
    per-class path orders its final result with an unstable sort, so among exactly equal scores
    its order is implementation-defined; here it is always lower index first (the kept set is
    the same).

    Args:
        boxes: [N, 4] xyxy float32.
        scores: [N].
        group_ids: int [N] (class or level index, any non-negative ints).
        iou_threshold: suppress when IoU > iou_threshold within a group (see `nms`).
        max_output: static D.
        valid: optional bool [N].
        method: "auto", "loop" or "tiled" (see `nms`).
        mode: "auto", "offset" or "per_group".
        tile_size: boxes per tile of the tiled form (None: `default_tile_size()`).
    Returns:
        keep_indices: int32 [D] in decreasing score order, -1 padded; keep_valid: bool [D].
    """
    boxes, scores, valid = _check_inputs(boxes, scores, valid, max_output, iou_threshold)
    group_ids = jnp.asarray(group_ids)
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids must be [N] = [{boxes.shape[0]}], got {group_ids.shape}")
    if mode not in _BATCHED_MODES:
        raise ValueError(f"mode must be one of {_BATCHED_MODES}, got {mode!r}")
    method = _resolve_method(method)
    if mode == "auto":
        num_valid = jnp.sum(valid, dtype=jnp.int32)
        use_offset = 4 * num_valid <= TORCHVISION_CPU_COORDINATE_TRICK_MAX_NUMEL
    else:
        use_offset = jnp.bool_(mode == "offset")
    # torchvision: offsets = idxs.to(boxes) * (boxes.max() + 1), all in the boxes' dtype.
    max_coordinate = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf), initial=-jnp.inf)
    max_coordinate = jnp.where(jnp.isfinite(max_coordinate), max_coordinate, 0.0)
    offsets = rounded(
        group_ids.astype(boxes.dtype) * (max_coordinate + jnp.asarray(1, boxes.dtype))
    )
    shifted = jnp.where(use_offset, boxes + offsets[:, None], boxes)
    order = _sort_order(scores, valid)
    pair = _Pairwise(
        shifted[order],
        _threshold(iou_threshold),
        groups=group_ids[order],
        use_groups=~use_offset,
    )
    return _run(pair, order, valid[order], int(max_output), method, tile_size)
