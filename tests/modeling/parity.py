"""What the live Mask R-CNN parity tests share (tests/modeling/test_mask_rcnn_parity.py for
torchvision's v1, test_mask_rcnn_v2_parity.py for v2): the 2-image batch, running it through a
calibrated torchvision model and through ours on the imported weights, and the stage comparisons
with their tolerances (the v1 file's docstring states them; both architectures use the same).

Import it only after `pytest.importorskip("torch")` (it imports torch and torchvision).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mrcnn_jax import transforms
from mrcnn_jax.checkpoints.torchvision import import_maskrcnn
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.ops.boxes import BoxCoder
from mrcnn_jax.ops.masks import expand_boxes, paste_boxes, paste_masks_in_image
from mrcnn_jax.ops.proposals import generate_proposals
from mrcnn_jax.testing import torchvision_maskrcnn as tvm
from mrcnn_jax.transforms import detections_to_original

MIN_SIZE, MAX_SIZE = 320, 512
REL_TOL = 1e-4
END_TO_END_REL_TOL = 1e-3
SCORE_TOL = 1e-4
MASK_PROB_TOL = 2e-3
BOX_IOU_MIN = 0.99
MASK_IOU_MIN = 0.99
BORDER = 1e-4  # "within float noise" of a threshold
PASTE_EDGE_NOISE = 1e-2  # px: end-to-end boxes differ by ~1e-3 px


def images() -> list[np.ndarray]:
    """skimage's astronaut (512x512) and coffee (400x600): two sizes, one batch."""
    from skimage import data

    return [data.astronaut(), data.coffee()]


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def abs_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    return inter / (area_a[:, None] + area_b[None] - inter)


def run_both(model_t: Any, config: Any, images_uint8: list[np.ndarray]) -> dict:
    """torchvision's stages (`ref`) and ours (`out`, `MaskRCNN.detect`) on the same images, our
    variables imported from `model_t`'s state_dict into `config.model` (updated with the
    import's overrides). `model_t` is calibrated already."""
    images_t = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images_uint8]
    ref = tvm.intermediates(torch, model_t, images_t)
    state_dict = tvm.state_dict_numpy(model_t)
    variables, overrides = import_maskrcnn(state_dict, config.model)
    config.model.update(overrides)
    model = MaskRCNN(config.model)
    d = config.data
    pre = [transforms.preprocess_image(im, d.min_size, d.max_size, d.pixel_mean, d.pixel_std)
           for im in images_uint8]
    sizes = np.asarray([p[1] for p in pre], np.int32)
    canvas = transforms.pad_to_canvas([p[0] for p in pre],
                                      transforms.canvas_for(sizes, d.size_divisibility))
    detect = jax.jit(lambda v, x, s: model.apply(v, x, s, method=MaskRCNN.detect))
    out = jax.tree_util.tree_map(np.asarray, detect(variables, canvas, sizes))
    return dict(images=images_uint8, ref=ref, config=config, model=model, variables=variables,
                state_dict=state_dict, canvas=canvas, sizes=sizes, out=out, detect=detect,
                originals=[p[2] for p in pre])


# --- Matching ------------------------------------------------------------------------------------

def assert_same_proposal_sets(ours, valid, theirs, tol, unmatched=None):
    """Each of our valid proposals has a partner within `tol` px, one to one, but at most
    `unmatched[b]` of image b (see `pre_nms_top_k_swaps`)."""
    for b, pt in enumerate(theirs):
        p = ours[b][valid[b]]
        assert p.shape == pt.shape, (b, p.shape, pt.shape)
        dist = np.abs(p[:, None, :] - pt[None, :, :]).max(-1)
        partner = dist.argmin(1)
        paired = dist[np.arange(len(p)), partner] <= tol
        allowed = 0 if unmatched is None else unmatched[b]
        assert (~paired).sum() <= allowed, (b, int((~paired).sum()), allowed)
        assert len(np.unique(partner[paired])) == paired.sum(), b


def pre_nms_top_k_swaps(p: dict) -> list[int]:
    """Per image, the anchors that enter a level's pre-NMS top-k (torchvision's
    `pre_nms_top_n`) on one side only. Each must score within float noise (REL_TOL of the
    largest |objectness|, the RPN's own tolerance) of that level's k-th score; each such swap may
    change one proposal end to end. Where P2 holds tens of thousands of anchors, the k-th and
    (k+1)-th logits can sit 2e-5 apart, below the two sides' difference."""
    out, ref = p["out"], p["ref"]
    k = p["config"].model.rpn_pre_nms_top_n_test
    cells = [int(np.prod(f.shape[1:3])) for f in ref["features"]]
    per_cell = ref["objectness"].shape[1] // sum(cells)  # anchors per location
    sizes = [n * per_cell for n in cells]
    bounds = np.cumsum([0] + sizes)
    noise = REL_TOL * np.abs(ref["objectness"]).max()
    swaps = []
    for b in range(len(ref["proposals"])):
        n = 0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            o, r = out["objectness"][b, lo:hi], ref["objectness"][b, lo:hi]
            if hi - lo <= k:
                continue
            ours, theirs = set(np.argsort(-o)[:k]), set(np.argsort(-r)[:k])
            kth = np.sort(r)[::-1][k - 1]
            for i in ours ^ theirs:
                assert abs(r[i] - kth) <= noise, (b, lo, i, r[i], kth)
            n += len(ours - theirs)
        swaps.append(n)
    return swaps


def proposal_rows(out: dict, ref: dict, b: int, tol: float = 1e-2
                  ) -> tuple[np.ndarray, np.ndarray]:
    """For each of torchvision's proposals of image b: the row of our nearest proposal, and
    whether it is within `tol` px (False only for a `pre_nms_top_k_swaps` swap)."""
    p = out["proposals"][b][out["proposal_valid"][b]]
    dist = np.abs(p[:, None, :] - ref["proposals"][b][None, :, :]).max(-1)
    rows = dist.argmin(0)
    return rows, dist[rows, np.arange(dist.shape[1])] <= tol


def near_threshold(score, boxes, scores, labels, label, box, kept_scores):
    """Why a detection may lack a partner: it sits within float noise of a decision."""
    if abs(score - 0.05) <= BORDER:
        return True
    if len(kept_scores) == 100 and abs(score - kept_scores.min()) <= BORDER:
        return True
    same = (labels == label) & (scores > score)
    if same.any():
        iou = box_iou(box[None], boxes[same])[0]
        if np.any(np.abs(iou - 0.5) <= BORDER):
            return True
    return False


def match(ours: dict, theirs: dict) -> list[tuple[int, int]]:
    """Pairs (ours, theirs) by label and IoU >= 0.99; unpaired ones must be borderline."""
    iou = box_iou(ours["boxes"], theirs["boxes"])
    iou = np.where(ours["labels"][:, None] == theirs["labels"][None], iou, 0.0)
    pairs, used = [], set()
    for i in np.argsort(-ours["scores"], kind="stable"):
        j = int(np.argmax(iou[i])) if iou.shape[1] else -1
        if j >= 0 and iou[i, j] >= BOX_IOU_MIN and j not in used:
            pairs.append((int(i), j))
            used.add(j)
    for side, dets, paired in (("ours", ours, {p[0] for p in pairs}),
                               ("torchvision", theirs, used)):
        for i in range(len(dets["scores"])):
            if i not in paired:
                assert near_threshold(dets["scores"][i], dets["boxes"], dets["scores"],
                                      dets["labels"], dets["labels"][i], dets["boxes"][i],
                                      dets["scores"]), f"unmatched {side} detection {i}"
    return pairs


def valid_dets(out: dict, b: int) -> dict:
    v = out["valid"][b]
    return {k: out[k][b][v] for k in ("boxes", "scores", "labels", "mask_probs")}


# --- Stage checks (each test file calls them on its own fixture) -------------------------------

def check_input_transform(p: dict) -> None:
    np.testing.assert_array_equal(p["sizes"], p["ref"]["image_sizes"])
    assert p["canvas"].shape == p["ref"]["canvas"].shape
    np.testing.assert_allclose(p["canvas"], p["ref"]["canvas"], atol=1e-5, rtol=0)


def check_fpn_features(p: dict) -> None:
    ours, ref = p["out"]["features"], p["ref"]["features"]
    assert len(ours) == len(ref) == 5
    for level, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, level
        assert rel_err(a, b) < REL_TOL, (level, rel_err(a, b))


def check_rpn_head_and_anchors(p: dict) -> None:
    out, ref = p["out"], p["ref"]
    assert rel_err(out["objectness"], ref["objectness"]) < REL_TOL
    assert rel_err(out["box_deltas"], ref["box_deltas"]) < REL_TOL
    anchors = p["model"].anchors(out["features"], p["canvas"].shape[1:3])
    np.testing.assert_array_equal(anchors, ref["anchors"])


def check_proposals_on_torchvision_rpn_outputs(p: dict) -> None:
    """Same RPN outputs in -> the same proposal set out (exact op semantics)."""
    ref, c = p["ref"], p["config"].model
    per_level = [int(np.prod(f.shape[1:3])) * 3 for f in ref["features"]]
    boxes, scores, valid = generate_proposals(
        jnp.asarray(ref["objectness"]), jnp.asarray(ref["box_deltas"]), ref["anchors"], per_level,
        jnp.asarray(ref["image_sizes"]), pre_nms_top_n=c.rpn_pre_nms_top_n_test,
        post_nms_top_n=c.rpn_post_nms_top_n_test, nms_thresh=c.rpn_nms_thresh,
        score_thresh=c.rpn_score_thresh, min_size=c.rpn_min_size,
        box_coder=BoxCoder(tuple(c.rpn_box_weights)))
    boxes, scores, valid = np.asarray(boxes), np.asarray(scores), np.asarray(valid)
    assert_same_proposal_sets(boxes, valid, ref["proposals"], tol=1e-4)
    for b in range(len(ref["proposals"])):
        s = scores[b][valid[b]]
        assert np.all(np.diff(s) <= 0), "proposals must come in decreasing score"


def check_proposals_end_to_end(p: dict) -> None:
    # Deltas agree to ~1e-5 relative; on boxes up to ~500 px that is a few 1e-3 px. A proposal
    # may differ only where an anchor's logit ties the pre-NMS top-k cut within float noise.
    assert_same_proposal_sets(p["out"]["proposals"], p["out"]["proposal_valid"],
                              p["ref"]["proposals"], 1e-2, pre_nms_top_k_swaps(p))


def box_head_on_torchvision_proposals(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Our box branch fed torchvision's features and proposals: (logits, regression) [B, R, .]."""
    ref = p["ref"]
    r = p["config"].model.rpn_post_nms_top_n_test
    rois = np.zeros((len(ref["proposals"]), r, 4), np.float32)
    for b, prop in enumerate(ref["proposals"]):
        rois[b, : len(prop)] = prop
    box_head = jax.jit(lambda v, f, x: p["model"].apply(v, f, x, method=MaskRCNN.box_head))
    logits, regression = box_head(p["variables"], [jnp.asarray(f) for f in ref["features"]],
                                  jnp.asarray(rois))
    return np.asarray(logits), np.asarray(regression)


def check_box_head_on_torchvision_proposals(p: dict) -> None:
    """The box branch alone, fed torchvision's features and proposals: logits within 1e-4."""
    ref = p["ref"]
    logits, regression = box_head_on_torchvision_proposals(p)
    for b, prop in enumerate(ref["proposals"]):
        assert rel_err(logits[b, : len(prop)], ref["class_logits"][b]) < REL_TOL
        assert rel_err(regression[b, : len(prop)], ref["box_regression"][b]) < REL_TOL


def check_box_head_end_to_end(p: dict) -> None:
    """Class logits / regression per proposal (rows matched through the proposal sets); 1e-3
    since the proposals themselves differ by up to ~1e-2 px."""
    out, ref = p["out"], p["ref"]
    swaps = pre_nms_top_k_swaps(p)
    for b in range(len(ref["proposals"])):
        rows, paired = proposal_rows(out, ref, b)
        assert (~paired).sum() <= swaps[b]
        assert rel_err(out["class_logits"][b][rows[paired]],
                       ref["class_logits"][b][paired]) < END_TO_END_REL_TOL
        assert rel_err(out["box_regression"][b][rows[paired]],
                       ref["box_regression"][b][paired]) < END_TO_END_REL_TOL


def check_detections_and_mask_probs(p: dict) -> None:
    out, ref = p["out"], p["ref"]
    total = 0
    for b, theirs in enumerate(ref["detections"]):
        ours = valid_dets(out, b)
        assert np.all(np.diff(ours["scores"]) <= 0)
        pairs = match(ours, theirs)
        assert len(pairs) >= 0.95 * len(theirs["scores"]) and len(pairs) > 10, len(pairs)
        i, j = np.array(pairs).T
        np.testing.assert_allclose(ours["scores"][i], theirs["scores"][j], atol=SCORE_TOL, rtol=0)
        np.testing.assert_allclose(ours["mask_probs"][i], theirs["masks"][j, 0],
                                   atol=MASK_PROB_TOL, rtol=0)
        total += len(pairs)
    assert total > 50  # the calibrated model really detects


def mask_head_on_torchvision_boxes(p: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    """Our mask branch fed torchvision's features and final boxes: (our 28x28 logits
    [B, D, 28, 28, K + 1], torchvision's per image [n_b, 28, 28, K + 1])."""
    ref = p["ref"]
    d = p["config"].model.detections_per_img
    rois = np.zeros((len(ref["detections"]), d, 4), np.float32)
    counts = []
    for b, det in enumerate(ref["detections"]):
        rois[b, : len(det["boxes"])] = det["boxes"]
        counts.append(len(det["boxes"]))
    features = [jnp.asarray(f) for f in ref["features"]]
    mask_head = jax.jit(lambda v, f, r: p["model"].apply(v, f, r, method=MaskRCNN.mask_head))
    logits = np.asarray(mask_head(p["variables"], features, jnp.asarray(rois)))
    return logits, np.split(ref["mask_logits"], np.cumsum(counts)[:-1])


def check_mask_head_on_torchvision_boxes(p: dict) -> None:
    """The mask branch alone, fed torchvision's final boxes: 28x28 logits within 1e-4."""
    logits, ref_logits = mask_head_on_torchvision_boxes(p)
    for b, theirs in enumerate(ref_logits):
        assert rel_err(logits[b, : len(theirs)], theirs) < REL_TOL


def pasted_mask_ious(p: dict) -> list[float]:
    """IoU of each matched detection's pasted mask (original image size) with torchvision's.

    The paste snaps each grown box to whole pixels (truncation), so where a grown edge lies within
    `PASTE_EDGE_NOISE` of a pixel boundary the two sides' boxes, ~1e-3 px apart, can snap to
    boxes a pixel apart and resample the whole 28x28 grid differently. Such a pair pastes our
    probabilities into torchvision's box instead: the paste itself is still compared."""
    out, ious = p["out"], []
    for b, theirs in enumerate(p["ref"]["final"]):
        dets = {k: out[k][b] for k in ("boxes", "scores", "labels", "valid", "mask_probs")}
        hw = p["originals"][b]
        ours = detections_to_original(dets, tuple(p["sizes"][b]), hw)
        our_probs = np.asarray(dets["mask_probs"])[np.asarray(dets["valid"], bool)]
        assert ours["masks"].shape[1:] == p["images"][b].shape[:2]
        size = our_probs.shape[-1]
        for i, j in match({**ours, "mask_probs": None}, theirs):
            t = theirs["masks"][j, 0] > 0.5
            o = ours["masks"][i]
            pair = np.stack([ours["boxes"][i], theirs["boxes"][j]])
            snapped = paste_boxes(pair, size)
            edges = snapped[0] != snapped[1]
            if edges.any():
                grown = expand_boxes(pair, (size + 2) / size)
                assert np.all(np.abs(grown[:, edges] - np.round(grown[:, edges]))
                              < PASTE_EDGE_NOISE), (b, i, grown, snapped)
                o = paste_masks_in_image(our_probs[i][None], pair[1:], hw, threshold=0.5)[0]
            union = np.logical_or(t, o).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(t, o).sum() / union))
    return ious


def check_pasted_masks_and_original_boxes(p: dict) -> None:
    ious = pasted_mask_ious(p)
    assert ious and min(ious) >= MASK_IOU_MIN, min(ious)
