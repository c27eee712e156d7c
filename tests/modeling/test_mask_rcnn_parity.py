"""Parity with torchvision's maskrcnn_resnet50_fpn on the same (random, calibrated) weights.

One 2-image batch of different sizes (skimage's astronaut 512x512 and coffee 400x600, resized with
min_size 320 / max_size 512 on both sides so it runs in seconds on 2 cores) goes through both
implementations; every stage is compared: the input canvas, FPN features, RPN outputs, anchors,
proposals, box-head logits, final detections, 28x28 mask probabilities and pasted masks.
Stages whose inputs could differ by float noise get the *same* inputs on both sides too (the
mask head on torchvision's boxes), so their tolerance is the stage's own.

Tolerances (float32 CPU, XLA vs oneDNN convolutions accumulating differently):
- features, objectness, deltas, and logits/regression on the same proposals: max |diff| <=
  1e-4 x max |ref| per array (1e-3 end to end, where the proposals differ by ~1e-2 px);
- proposals: equal as sets (ordering may swap between scores equal to float precision), matched
  coordinates within 1e-4 px from the same RPN outputs and 1e-2 px end to end;
- detections: matched as sets by label and IoU >= 0.99, scores within 1e-4; a detection without a
  partner is allowed only where float noise can flip it: score within 1e-4 of the 0.05
  threshold or of the 100th score, or an IoU within 1e-4 of the 0.5 NMS threshold with a kept box
  of its class;
- mask probabilities: 1e-4 on identical boxes; 2e-3 end to end (the boxes themselves differ by
  ~1e-3 px, which moves the RoIAlign sample points);
- pasted masks: IoU >= 0.99 per detection.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mrcnn_jax import transforms  # noqa: E402
from mrcnn_jax.checkpoints.orbax_io import restore_variables, save_variables  # noqa: E402
from mrcnn_jax.checkpoints.torchvision import import_maskrcnn  # noqa: E402
from mrcnn_jax.config_base import base_config  # noqa: E402
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN  # noqa: E402
from mrcnn_jax.ops.boxes import BoxCoder  # noqa: E402
from mrcnn_jax.ops.proposals import generate_proposals  # noqa: E402
from mrcnn_jax.testing import torchvision_maskrcnn as tvm  # noqa: E402
from mrcnn_jax.transforms import detections_to_original  # noqa: E402

pytestmark = pytest.mark.parity

MIN_SIZE, MAX_SIZE = 320, 512
REL_TOL = 1e-4
SCORE_TOL = 1e-4
BOX_IOU_MIN = 0.99
MASK_IOU_MIN = 0.99
BORDER = 1e-4  # "within float noise" of a threshold


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    return inter / (area_a[:, None] + area_b[None] - inter)


@pytest.fixture(scope="module")
def parity():
    torch.set_num_threads(1)
    images = [skimage_data.astronaut(), skimage_data.coffee()]
    images_t = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    model_t = tvm.build_model(torch, torchvision, MIN_SIZE, MAX_SIZE)
    tvm.calibrate(torch, model_t, images_t)
    ref = tvm.intermediates(torch, model_t, images_t)

    config = base_config()
    config.data.min_size, config.data.max_size = MIN_SIZE, MAX_SIZE
    state_dict = tvm.state_dict_numpy(model_t)
    variables, overrides = import_maskrcnn(state_dict, config.model)
    config.model.update(overrides)
    model = MaskRCNN(config.model)
    d = config.data
    pre = [transforms.preprocess_image(im, d.min_size, d.max_size, d.pixel_mean, d.pixel_std)
           for im in images]
    sizes = np.asarray([p[1] for p in pre], np.int32)
    canvas = transforms.pad_to_canvas([p[0] for p in pre],
                                      transforms.canvas_for(sizes, d.size_divisibility))
    detect = jax.jit(lambda v, x, s: model.apply(v, x, s, method=MaskRCNN.detect))
    out = jax.tree_util.tree_map(np.asarray, detect(variables, canvas, sizes))
    return dict(images=images, ref=ref, config=config, model=model, variables=variables,
                state_dict=state_dict,
                canvas=canvas, sizes=sizes, out=out, detect=detect,
                originals=[p[2] for p in pre])


def test_input_transform_equals_torchvision(parity):
    ref, out = parity["ref"], parity
    np.testing.assert_array_equal(out["sizes"], ref["image_sizes"])
    assert out["canvas"].shape == ref["canvas"].shape
    np.testing.assert_allclose(out["canvas"], ref["canvas"], atol=1e-5, rtol=0)


def test_fpn_features(parity):
    ours, ref = parity["out"]["features"], parity["ref"]["features"]
    assert len(ours) == len(ref) == 5
    for level, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, level
        assert _rel_err(a, b) < REL_TOL, (level, _rel_err(a, b))


def test_rpn_head_and_anchors(parity):
    out, ref = parity["out"], parity["ref"]
    assert _rel_err(out["objectness"], ref["objectness"]) < REL_TOL
    assert _rel_err(out["box_deltas"], ref["box_deltas"]) < REL_TOL
    anchors = parity["model"].anchors(out["features"], parity["canvas"].shape[1:3])
    np.testing.assert_array_equal(anchors, ref["anchors"])


def _assert_same_proposal_sets(ours, valid, theirs, tol):
    for b, pt in enumerate(theirs):
        p = ours[b][valid[b]]
        assert p.shape == pt.shape, (b, p.shape, pt.shape)
        # Each of ours has a partner within `tol`, one to one.
        dist = np.abs(p[:, None, :] - pt[None, :, :]).max(-1)
        partner = dist.argmin(1)
        assert dist[np.arange(len(p)), partner].max() <= tol, b
        assert len(np.unique(partner)) == len(p), b


def test_proposal_generation_on_torchvision_rpn_outputs(parity):
    """Same RPN outputs in -> the same proposal set out (exact op semantics)."""
    ref, c = parity["ref"], parity["config"].model
    per_level = [int(np.prod(f.shape[1:3])) * 3 for f in ref["features"]]
    boxes, scores, valid = generate_proposals(
        jnp.asarray(ref["objectness"]), jnp.asarray(ref["box_deltas"]), ref["anchors"], per_level,
        jnp.asarray(ref["image_sizes"]), pre_nms_top_n=c.rpn_pre_nms_top_n_test,
        post_nms_top_n=c.rpn_post_nms_top_n_test, nms_thresh=c.rpn_nms_thresh,
        score_thresh=c.rpn_score_thresh, min_size=c.rpn_min_size,
        box_coder=BoxCoder(tuple(c.rpn_box_weights)))
    boxes, scores, valid = np.asarray(boxes), np.asarray(scores), np.asarray(valid)
    _assert_same_proposal_sets(boxes, valid, ref["proposals"], tol=1e-4)
    for b in range(len(ref["proposals"])):
        s = scores[b][valid[b]]
        assert np.all(np.diff(s) <= 0), "proposals must come in decreasing score"


def test_proposals_end_to_end(parity):
    out, ref = parity["out"], parity["ref"]
    # Deltas agree to ~1e-5 relative; on boxes up to ~500 px that is a few 1e-3 px.
    _assert_same_proposal_sets(out["proposals"], out["proposal_valid"], ref["proposals"], 1e-2)


def test_box_head_on_torchvision_proposals(parity):
    """The box branch alone, fed torchvision's features and proposals: logits within 1e-4."""
    ref = parity["ref"]
    r = parity["config"].model.rpn_post_nms_top_n_test
    rois = np.zeros((len(ref["proposals"]), r, 4), np.float32)
    for b, p in enumerate(ref["proposals"]):
        rois[b, : len(p)] = p
    box_head = jax.jit(lambda v, f, x: parity["model"].apply(v, f, x, method=MaskRCNN.box_head))
    logits, regression = box_head(parity["variables"], [jnp.asarray(f) for f in ref["features"]],
                                  jnp.asarray(rois))
    for b, p in enumerate(ref["proposals"]):
        assert _rel_err(np.asarray(logits)[b, : len(p)], ref["class_logits"][b]) < REL_TOL
        assert _rel_err(np.asarray(regression)[b, : len(p)], ref["box_regression"][b]) < REL_TOL


def test_box_head_outputs_end_to_end(parity):
    """Class logits / regression per proposal (rows matched through the proposal sets); 1e-3
    since the proposals themselves differ by up to ~1e-2 px."""
    out, ref = parity["out"], parity["ref"]
    for b, pt in enumerate(ref["proposals"]):
        p = out["proposals"][b][out["proposal_valid"][b]]
        perm = np.abs(p[:, None, :] - pt[None, :, :]).max(-1).argmin(0)  # torch row -> ours
        assert _rel_err(out["class_logits"][b][perm], ref["class_logits"][b]) < 1e-3
        assert _rel_err(out["box_regression"][b][perm], ref["box_regression"][b]) < 1e-3


def _near_threshold(score, boxes, scores, labels, label, box, kept_scores):
    """Why a detection may lack a partner: it sits within float noise of a decision."""
    if abs(score - 0.05) <= BORDER:
        return True
    if len(kept_scores) == 100 and abs(score - kept_scores.min()) <= BORDER:
        return True
    same = (labels == label) & (scores > score)
    if same.any():
        iou = _box_iou(box[None], boxes[same])[0]
        if np.any(np.abs(iou - 0.5) <= BORDER):
            return True
    return False


def _match(ours: dict, theirs: dict) -> list[tuple[int, int]]:
    """Pairs (ours, theirs) by label and IoU >= 0.99; unpaired ones must be borderline."""
    iou = _box_iou(ours["boxes"], theirs["boxes"])
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
                assert _near_threshold(dets["scores"][i], dets["boxes"], dets["scores"],
                                       dets["labels"], dets["labels"][i], dets["boxes"][i],
                                       dets["scores"]), f"unmatched {side} detection {i}"
    return pairs


def _valid_dets(out, b):
    v = out["valid"][b]
    return {k: out[k][b][v] for k in ("boxes", "scores", "labels", "mask_probs")}


def test_detections_and_mask_probs(parity):
    out, ref = parity["out"], parity["ref"]
    total = 0
    for b, theirs in enumerate(ref["detections"]):
        ours = _valid_dets(out, b)
        assert np.all(np.diff(ours["scores"]) <= 0)
        pairs = _match(ours, theirs)
        assert len(pairs) >= 0.95 * len(theirs["scores"]) and len(pairs) > 10, len(pairs)
        i, j = np.array(pairs).T
        np.testing.assert_allclose(ours["scores"][i], theirs["scores"][j], atol=SCORE_TOL, rtol=0)
        np.testing.assert_allclose(ours["mask_probs"][i], theirs["masks"][j, 0], atol=2e-3,
                                   rtol=0)
        total += len(pairs)
    assert total > 50  # the calibrated model really detects


def test_mask_head_on_torchvision_boxes(parity):
    """The mask branch alone, fed torchvision's final boxes: 28x28 logits within 1e-4."""
    out, ref = parity["out"], parity["ref"]
    d = parity["config"].model.detections_per_img
    rois = np.zeros((len(ref["detections"]), d, 4), np.float32)
    counts = []
    for b, det in enumerate(ref["detections"]):
        rois[b, : len(det["boxes"])] = det["boxes"]
        counts.append(len(det["boxes"]))
    features = [jnp.asarray(f) for f in ref["features"]]
    mask_head = jax.jit(lambda v, f, r: parity["model"].apply(v, f, r, method=MaskRCNN.mask_head))
    logits = mask_head(parity["variables"], features, jnp.asarray(rois))
    logits = np.asarray(logits)
    ref_logits = np.split(ref["mask_logits"], np.cumsum(counts)[:-1])
    for b, n in enumerate(counts):
        assert _rel_err(logits[b, :n], ref_logits[b]) < REL_TOL


def test_pasted_masks_and_original_boxes(parity):
    out, ref = parity["out"], parity["ref"]
    for b, theirs in enumerate(ref["final"]):
        dets = {k: out[k][b] for k in ("boxes", "scores", "labels", "valid", "mask_probs")}
        ours = detections_to_original(dets, tuple(parity["sizes"][b]), parity["originals"][b])
        assert ours["masks"].shape[1:] == parity["images"][b].shape[:2]
        pairs = _match({**ours, "mask_probs": None}, theirs)
        for i, j in pairs:
            t = theirs["masks"][j, 0] > 0.5
            o = ours["masks"][i]
            union = np.logical_or(t, o).sum()
            iou = np.logical_and(t, o).sum() / max(union, 1)
            assert union == 0 or iou >= MASK_IOU_MIN, (b, i, iou)


def test_orbax_roundtrip_gives_identical_outputs(parity, tmp_path):
    save_variables(tmp_path / "ckpt", parity["variables"])
    restored = restore_variables(tmp_path / "ckpt", parity["variables"])
    again = parity["detect"](restored, parity["canvas"], parity["sizes"])
    for key in ("boxes", "scores", "labels", "valid", "mask_probs", "class_logits"):
        np.testing.assert_array_equal(np.asarray(again[key]), parity["out"][key], err_msg=key)


def test_import_accepts_legacy_head_key_names(parity):
    """torchvision's COCO weights file predates the v2 key names of RPNHead and MaskRCNNHeads."""
    legacy = {}
    for k, v in parity["state_dict"].items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy[k] = v
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    variables, _ = import_maskrcnn(legacy, parity["config"].model)
    same = jax.tree_util.tree_map(np.array_equal, variables, parity["variables"])
    assert all(jax.tree_util.tree_leaves(same))
