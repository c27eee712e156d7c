"""Keypoints in the user-facing outputs: Predictor results in original pixels (torchvision's
`resize_keypoints` ratios), COCO-style json entries, and skeleton overlays."""

from __future__ import annotations

import numpy as np

from mrcnn_jax.data import keypoint_shapes
from mrcnn_jax.evaluation.visualization import class_color, render_detections
from mrcnn_jax.predictor import coco_results
from mrcnn_jax.transforms import detections_to_original


def _detections():
    kps = np.zeros((3, 17, 3), np.float32)
    kps[0, :, 0] = np.arange(17) * 2.0 + 10  # x
    kps[0, :, 1] = 20.0  # y
    kps[0, :, 2] = np.linspace(-1, 1, 17)  # scores
    return {
        "boxes": np.array([[8, 15, 50, 40], [0, 0, 1, 1], [0, 0, 0, 0]], np.float32),
        "scores": np.array([0.9, 0.3, 0.0], np.float32),
        "labels": np.array([1, 1, 0], np.int32),
        "valid": np.array([True, True, False]),
        "keypoints": kps,
    }


def test_predictor_output_scales_keypoints_like_boxes():
    # Resized 60 x 80 from an original 120 x 200: x * 2.5, y * 2; the score column unchanged.
    out = detections_to_original(_detections(), (60, 80), (120, 200))
    assert set(out) == {"boxes", "scores", "labels", "keypoints"}  # no mask branch, no masks
    assert out["keypoints"].shape == (2, 17, 3)
    kp = _detections()["keypoints"][0]
    np.testing.assert_allclose(out["keypoints"][0, :, 0], kp[:, 0] * 2.5, rtol=1e-6)
    np.testing.assert_allclose(out["keypoints"][0, :, 1], kp[:, 1] * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(out["keypoints"][0, :, 2], kp[:, 2])
    np.testing.assert_allclose(out["boxes"][0], [20, 30, 125, 80], rtol=1e-6)

    entries = coco_results(out)
    assert "segmentation" not in entries[0]
    np.testing.assert_allclose(entries[0]["keypoints"], out["keypoints"][0].reshape(-1))
    assert len(entries[0]["keypoints"]) == 51


def test_overlay_draws_keypoints_and_skeleton():
    image = np.full((60, 80, 3), 100, np.uint8)
    boxes = np.array([[5.0, 5.0, 75.0, 55.0]], np.float32)
    kps = np.zeros((1, 17, 3), np.float32)
    kps[0, :, :2] = [40.0, 30.0]  # every keypoint at the centre ...
    kps[0, 9, :2] = [20.0, 45.0]  # ... but the left wrist, joined to the left elbow (8 -> 10)
    skeleton = [(a - 1, b - 1) for a, b in keypoint_shapes.SKELETON]
    pic = render_detections(image, boxes, np.array([1]), np.array([0.9]), None, None,
                            keypoints=kps, skeleton=skeleton)
    color = np.asarray(class_color(1))
    assert np.array_equal(pic[30, 40], [255, 255, 255])  # a keypoint dot (white fill)
    assert np.array_equal(pic[38, 30], color)  # on the elbow-wrist bone, between the dots
    plain = render_detections(image, boxes, np.array([1]), np.array([0.9]))
    assert np.all(plain[38, 30] == 100)  # without keypoints nothing is drawn there
