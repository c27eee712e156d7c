"""CocoEvaluation end to end on a tiny synthetic shapes split, with an oracle for the model.

The oracle answers each eval batch with its own ground truth (the pipeline's gt boxes in resized
pixels, its cropped gt masks resampled to 28x28), so the whole path data -> canvas detections ->
original pixels -> category ids -> COCOeval has known numbers to reach: bbox AP = 1.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from mrcnn_jax.evaluation import coco_evaluator as ce
from mrcnn_jax.evaluation import runner
from mrcnn_jax.transforms import resize_bilinear
from tests.reference import REPO_ROOT

MASK_SIZE = 28


def shapes_config(root, num_val=5):
    spec = importlib.util.spec_from_file_location("shapes_config",
                                                  REPO_ROOT / "configs" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"root={root}")
    config.data.shapes.num_train = 2
    config.data.shapes.num_val = num_val
    config.eval.batch_size = 2
    return config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from mrcnn_jax.data import coco_instances

    config = shapes_config(tmp_path_factory.mktemp("shapes"))
    return config, coco_instances.get_builder(config.data)


def _oracle(config, builder):
    """predict_fn answering batch k of the eval stream with batch k's ground truth."""
    from mrcnn_jax.data import input_pipeline

    stream = input_pipeline.make_eval_iterator(config, builder=builder)

    def predict(variables, images, image_sizes):
        batch = next(stream)
        np.testing.assert_array_equal(batch["image"], images)  # same batch, same order
        b, m = batch["gt_classes"].shape
        probs = np.zeros((b, m, MASK_SIZE, MASK_SIZE), np.float32)
        for i in range(b):
            for j in np.flatnonzero(batch["gt_valid"][i]):
                probs[i, j] = resize_bilinear(batch["gt_masks"][i, j].astype(np.float32),
                                              (MASK_SIZE, MASK_SIZE))
        return {"boxes": batch["gt_mask_boxes"], "scores": np.ones((b, m), np.float32),
                "labels": batch["gt_classes"], "valid": batch["gt_valid"], "mask_probs": probs}

    return predict


def test_oracle_detections_reach_ap_one_through_the_pipeline(shapes, tmp_path):
    config, builder = shapes
    evaluation = runner.CocoEvaluation(config, builder=builder,
                                       predict_fn=_oracle(config, builder))
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


def test_ground_truth_and_label_map_errors(shapes):
    config, _ = shapes
    with pytest.raises(ValueError, match="split 'test'"):
        runner.ground_truth_dataset(config.data, "test")
    assert runner.label_map_for(91, [1, 3, 90]) == {1: 1, 3: 3, 90: 90}  # torchvision's COCO
    assert runner.label_map_for(4, [1, 3, 5]) == {1: 1, 2: 3, 3: 5}
    with pytest.raises(ValueError, match="model.num_classes=3"):
        runner.label_map_for(3, [1, 3, 5])
