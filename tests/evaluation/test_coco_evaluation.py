"""CocoEvaluation end to end on a tiny synthetic shapes split, with an oracle for the model
(tests/evaluation/shapes_oracle.py): the numbers to reach are known, bbox AP = 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrcnn_jax.evaluation import coco_evaluation, visualization
from mrcnn_jax.evaluation import coco_evaluator as ce
from tests.evaluation.shapes_oracle import oracle


def test_oracle_detections_reach_ap_one_through_the_pipeline(shapes, tmp_path):
    config, builder = shapes
    evaluation = coco_evaluation.CocoEvaluation(config, builder=builder,
                                                predict_fn=oracle(config, builder))
    # The shapes categories are 1, 3, 5: the label map is the data's, not the identity.
    assert evaluation.label_to_category_id == {1: 1, 2: 3, 3: 5}
    seen = []
    metrics = evaluation.run(None, output_dir=tmp_path,
                             on_images=lambda batch, images: seen.extend(images))
    gt = evaluation.ground_truth
    assert sorted(d.image_id for d in seen) == sorted(gt.getImgIds())  # padding dropped
    for det in seen:
        info = gt.imgs[det.image_id]
        assert det.original_hw == (info["height"], info["width"])
    # Tight mask boxes equal the gt boxes of these shapes up to the float32 round trip.
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["bbox/AR100"] == pytest.approx(1.0, abs=1e-9)
    # Masks through 64x64 crops and 28x28 probabilities: every one above IoU 0.75.
    assert metrics["segm/AP50"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["segm/AP75"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["segm/AP"] > 0.8
    written = json.loads((tmp_path / ce.METRICS_FILENAME).read_text())
    assert written == metrics
    results = json.loads((tmp_path / ce.RESULTS_FILENAME).read_text())
    assert {r["category_id"] for r in results} <= {1, 3, 5}


def test_vis_writes_prediction_beside_ground_truth(shapes, tmp_path):
    from PIL import Image

    config, builder = shapes
    evaluation = coco_evaluation.CocoEvaluation(config, builder=builder,
                                                predict_fn=oracle(config, builder))
    metrics = coco_evaluation.run_and_report(evaluation, None, tmp_path, num_vis=2)
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    pictures = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pictures) == 2
    gt = evaluation.ground_truth
    for path in pictures:
        info = gt.imgs[int(path.stem)]
        h, w = info["height"], info["width"]
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB"))
        assert picture.shape == (h, 2 * w + visualization.VIS_GAP_PIXELS, 3)
        np.testing.assert_array_equal(picture[:, w:w + visualization.VIS_GAP_PIXELS], 255)
        # The oracle predicts the ground truth: both halves show the same instances, so they
        # agree on most pixels (masks differ only by the 28x28 round trip).
        left, right = picture[:, :w].astype(int), picture[:, -w:].astype(int)
        assert np.mean(np.abs(left - right).sum(-1) > 30) < 0.05


def test_a_mask_model_without_detections_reports_segm_zero(shapes, tmp_path):
    # An untrained model detects nothing: both types are still evaluated (AP 0, not missing).
    config, builder = shapes
    predict = oracle(config, builder)
    evaluation = coco_evaluation.CocoEvaluation(config, builder=builder, predict_fn=predict)
    metrics = evaluation.run({"drop": 100})
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AP"] == 0.0
    assert evaluation.evaluator.results == []
