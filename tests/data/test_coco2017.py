"""The one reader of the official COCO 2017 files (`data/coco2017.py`): annotations from the
folder or the zip, person keypoints merged by annotation id, and the evaluation's ground truth
read through it (`coco_instances.ground_truth_dataset`)."""

from __future__ import annotations

import json
import zipfile

import pytest

from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import coco2017, coco_instances
from mrcnn_jax.evaluation import coco_evaluator as ce
from tests.evaluation import tiny_coco


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_coco2017_ground_truth_merges_person_keypoints(tmp_path, zipped):
    data = tiny_coco.keypoint_dataset()
    keypoints = tiny_coco.person_keypoints_only(data)
    instances = json.loads(json.dumps(data))
    for a in instances["annotations"]:  # the instances file has no keypoints
        a.pop("keypoints", None)
        a.pop("num_keypoints", None)
    for c in instances["categories"]:
        c.pop("keypoints", None)
    files = {"annotations/instances_val2017.json": instances,
             "annotations/person_keypoints_val2017.json": keypoints}
    if zipped:
        with zipfile.ZipFile(tmp_path / coco2017.ANNOTATIONS_ZIP, "w") as zf:
            for name, content in files.items():
                zf.writestr(name, json.dumps(content))
    else:
        (tmp_path / "annotations").mkdir()
        for name, content in files.items():
            tiny_coco.write(tmp_path / name, content)
    d = base_config().data
    d.manual_dir = str(tmp_path)
    gt = coco_instances.ground_truth_dataset(d, "validation")
    merged = {a["id"]: a for a in gt["annotations"]}
    for a in keypoints["annotations"]:
        assert merged[a["id"]]["keypoints"] == a["keypoints"]
        assert merged[a["id"]]["num_keypoints"] == a["num_keypoints"]
    assert "keypoints" not in merged[4]  # the ball
    assert gt["categories"][0]["keypoints"] == tiny_coco.KEYPOINT_NAMES
    evaluator = ce.CocoEvaluator(gt)
    assert evaluator.gt_iou_types == ("bbox", "keypoints")
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        coco_instances.ground_truth_dataset(d, "train")


def test_ground_truth_names_the_split_and_field_it_lacks(tmp_path):
    d = base_config().data
    d.dataset = "coco_format"
    d.eval_annotations = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="split 'test'"):
        coco_instances.ground_truth_dataset(d, "test")
    with pytest.raises(FileNotFoundError, match="data.eval_annotations.*missing.json"):
        coco_instances.ground_truth_dataset(d, d.eval_split)
    d.dataset = "coco_instances/2017"
    with pytest.raises(ValueError, match="data.manual_dir must name"):
        coco_instances.ground_truth_dataset(d, "validation")
    d.manual_dir = str(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        coco_instances.ground_truth_dataset(d, "test")
    with pytest.raises(FileNotFoundError, match="data.manual_dir: neither"):
        coco_instances.ground_truth_dataset(d, "validation")
