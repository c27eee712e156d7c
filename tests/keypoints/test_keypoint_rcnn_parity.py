"""Parity with torchvision's keypointrcnn_resnet50_fpn on the same (random, calibrated) weights.

torchvision's architecture (2 classes, FrozenBN eps 0, no mask branch, 8 x 512 keypoint convs) is
built with random weights, calibrated as for the mask model (mrcnn_jax/testing/torchvision_maskrcnn:
data-dependent FrozenBN statistics so activations stay O(1), larger RPN logits, a raised person
bias so there are detections), saved as a state_dict and imported with the strict name map. Two
small images (min_size 192, max_size 320, 20 detections per image) keep it to seconds of compute.

Compared: the 56x56 heatmap logits of the keypoint branch on torchvision's own detection boxes
(max |diff| <= 1e-4 x max |ref|), the static-shape decode of those heatmaps against torchvision's
keypoints and scores, and the end-to-end keypoints of detections matched by IoU >= 0.99.
Decoding torchvision's heatmaps gives its keypoints exactly (1e-3 px) and scores to 1e-5. End to
end (boxes differ by float noise, ~1e-3 px) scores agree to 1e-3 and coordinates to 1e-3 px, except
where the argmax moved between near-equal cells of these flat random-weight heatmaps: there our
cell's value on torchvision's own bicubic map is within 1e-3 of its maximum (checked per point).
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
from mrcnn_jax.checkpoints.torchvision import (  # noqa: E402
    import_keypointrcnn, keypointrcnn_model_config)
from mrcnn_jax.config_base import base_config  # noqa: E402
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN  # noqa: E402
from mrcnn_jax.ops.keypoints import heatmaps_to_keypoints  # noqa: E402
from mrcnn_jax.testing import torchvision_maskrcnn as tvm  # noqa: E402

pytestmark = pytest.mark.parity

MIN_SIZE, MAX_SIZE = 192, 320
DETECTIONS = 20
REL_TOL = 1e-4
PERSON = 1


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


def _build_torchvision_model():
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops

    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    model = KeypointRCNN(_resnet_fpn_extractor(body, 3), num_classes=2, num_keypoints=17,
                         min_size=MIN_SIZE, max_size=MAX_SIZE,
                         box_detections_per_img=DETECTIONS)
    overwrite_eps(model, 0.0)  # as keypointrcnn_resnet50_fpn does for its COCO_V1 weights
    return model.eval()


def _reference(model, images_t):
    with torch.no_grad():
        image_list, _ = model.transform(images_t)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        rh = model.roi_heads
        detections, _ = rh(features, proposals, image_list.image_sizes)
        boxes = [d["boxes"] for d in detections]
        pooled = rh.keypoint_roi_pool(features, boxes, image_list.image_sizes)
        logits = rh.keypoint_predictor(rh.keypoint_head(pooled))
    counts = [len(b) for b in boxes]
    return {
        "image_sizes": np.asarray(image_list.image_sizes, np.int32),
        "features": [f.permute(0, 2, 3, 1).numpy() for f in features.values()],
        "detections": [{k: v.numpy() for k, v in d.items()} for d in detections],
        "keypoint_logits": np.split(logits.permute(0, 2, 3, 1).numpy(), np.cumsum(counts)[:-1]),
    }


@pytest.fixture(scope="module")
def parity():
    torch.set_num_threads(1)
    images = [skimage_data.astronaut(), skimage_data.coffee()]
    images_t = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    model_t = _build_torchvision_model()
    saved, tvm.DETECTING_CLASSES = tvm.DETECTING_CLASSES, (PERSON,)
    try:
        tvm.calibrate(torch, model_t, images_t)
    finally:
        tvm.DETECTING_CLASSES = saved
    ref = _reference(model_t, images_t)

    config = base_config()
    config.model = keypointrcnn_model_config()
    config.model.detections_per_img = DETECTIONS
    config.data.min_size, config.data.max_size = MIN_SIZE, MAX_SIZE
    variables, overrides = import_keypointrcnn(tvm.state_dict_numpy(model_t), config.model)
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
    return dict(ref=ref, config=config, model=model, variables=variables, canvas=canvas,
                sizes=sizes, out=out)


def test_import_has_keypoint_branch_and_no_mask_branch(parity):
    params = parity["variables"]["params"]
    assert "roi_mask_head" not in params and "roi_mask_predictor" not in params
    convs = params["roi_keypoint_head"]
    assert len(convs) == 8 and convs["conv_fcn1"]["kernel"].shape == (3, 3, 256, 512)
    assert params["roi_keypoint_predictor"]["kps_score_lowres"]["kernel"].shape == (4, 4, 512, 17)
    np.testing.assert_array_equal(parity["sizes"], parity["ref"]["image_sizes"])


def _ref_rois(parity):
    ref = parity["ref"]
    rois = np.zeros((len(ref["detections"]), DETECTIONS, 4), np.float32)
    counts = []
    for b, det in enumerate(ref["detections"]):
        rois[b, : len(det["boxes"])] = det["boxes"]
        counts.append(len(det["boxes"]))
    return rois, counts


def test_keypoint_heatmaps_on_torchvision_boxes(parity):
    ref = parity["ref"]
    rois, counts = _ref_rois(parity)
    assert sum(counts) >= 20  # the calibrated model detects persons
    head = jax.jit(lambda v, f, r: parity["model"].apply(v, f, r, method=MaskRCNN.keypoint_head))
    logits = np.asarray(head(parity["variables"], [jnp.asarray(f) for f in ref["features"]],
                             jnp.asarray(rois)))
    assert logits.shape == (2, DETECTIONS, 56, 56, 17)
    for b, n in enumerate(counts):
        assert _rel_err(logits[b, :n], ref["keypoint_logits"][b]) < REL_TOL


def _assert_keypoints_equal(kps, scores, ref_kps, ref_scores, score_rtol, ref_maps=None,
                            ref_boxes=None):
    """(x, y) equal to 1e-3 px, except where the argmax moved to a cell whose value on
    torchvision's own bicubic map (`ref_maps` [N, 56, 56, K] resized to `ref_boxes`) is within
    `score_rtol` of the maximum: a near-tie that float noise in the inputs decides."""
    np.testing.assert_allclose(scores, ref_scores, rtol=score_rtol, atol=score_rtol)
    far = np.abs(kps[..., :2] - ref_kps[..., :2]).max(-1) > 1e-3
    if ref_maps is None:
        assert not far.any(), np.argwhere(far)
    for n, k in np.argwhere(far):
        x1, y1, x2, y2 = (float(v) for v in ref_boxes[n])
        w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        mw, mh = int(np.ceil(w)), int(np.ceil(h))
        roi_map = torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(ref_maps[n, :, :, k]))[None, None],
            size=(mh, mw), mode="bicubic", align_corners=False)[0, 0].numpy()
        cx = min(max(int(np.floor((kps[n, k, 0] - x1) / (w / mw))), 0), mw - 1)
        cy = min(max(int(np.floor((kps[n, k, 1] - y1) / (h / mh))), 0), mh - 1)
        top = roi_map.max()
        assert abs(roi_map[cy, cx] - top) <= score_rtol * max(abs(top), 1.0), (n, k)
    np.testing.assert_allclose(kps[~far][..., :2], ref_kps[~far][..., :2], atol=1e-3)
    return int(far.sum())


def test_decode_of_torchvision_heatmaps(parity):
    """ops.heatmaps_to_keypoints on torchvision's logits and boxes = its keypoints and scores."""
    ref = parity["ref"]
    canvas_hw = parity["canvas"].shape[1:3]
    for b, det in enumerate(ref["detections"]):
        kps, scores = heatmaps_to_keypoints(jnp.asarray(ref["keypoint_logits"][b]),
                                            jnp.asarray(det["boxes"]), canvas_hw)
        _assert_keypoints_equal(np.asarray(kps), np.asarray(scores), det["keypoints"],
                                det["keypoints_scores"], 1e-5)
        np.testing.assert_array_equal(np.asarray(kps)[..., 2], 1.0)


def test_keypoints_end_to_end(parity):
    out, ref = parity["out"], parity["ref"]
    total = moved = 0
    for b, theirs in enumerate(ref["detections"]):
        v = out["valid"][b]
        boxes, kps = out["boxes"][b][v], out["keypoints"][b][v]
        assert np.all(out["keypoints"][b][~v] == 0)
        iou = _box_iou(boxes, theirs["boxes"])
        i = np.arange(len(boxes))
        j = iou.argmax(1)
        ok = iou[i, j] >= 0.99
        # Boxes differ by float noise only: nearly every detection has its partner.
        assert ok.sum() >= 0.9 * len(theirs["boxes"]), (ok.sum(), len(theirs["boxes"]))
        i, j = i[ok], j[ok]
        # Scores within 1e-3 relative (the boxes, hence RoIAlign samples, differ by ~1e-3 px).
        moved += _assert_keypoints_equal(
            kps[i], kps[i][..., 2], theirs["keypoints"][j], theirs["keypoints_scores"][j], 1e-3,
            ref["keypoint_logits"][b][j], theirs["boxes"][j])
        total += len(i)
    assert total >= 20
    assert moved <= 0.1 * total * 17, moved  # near-ties are the exception
