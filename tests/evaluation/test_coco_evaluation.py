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
    """predict_fn answering each eval batch with its own ground truth (looked up by the image
    bytes). Variables {"drop": k} leave out the first k instances of every image."""
    from mrcnn_jax.data import input_pipeline

    answers = {}
    for batch in input_pipeline.make_eval_iterator(config, builder=builder):
        b, m = batch["gt_classes"].shape
        probs = np.zeros((b, m, MASK_SIZE, MASK_SIZE), np.float32)
        for i in range(b):
            for j in np.flatnonzero(batch["gt_valid"][i]):
                probs[i, j] = resize_bilinear(batch["gt_masks"][i, j].astype(np.float32),
                                              (MASK_SIZE, MASK_SIZE))
        answers[batch["image"].tobytes()] = {
            "boxes": batch["gt_mask_boxes"], "scores": np.ones((b, m), np.float32),
            "labels": batch["gt_classes"], "valid": batch["gt_valid"], "mask_probs": probs}

    def predict(variables, images, image_sizes):
        out = dict(answers[np.asarray(images).tobytes()])
        drop = (variables or {}).get("drop", 0)
        out["valid"] = out["valid"] & (np.arange(out["valid"].shape[1]) >= drop)
        return out

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


class _FakeCheckpoints:
    """Checkpoints of a fake training run: step k restores variables that drop k // 10 gt."""

    directory = "fake"

    def __init__(self, steps):
        self.steps = steps

    def all_steps(self):
        return list(self.steps)

    def restore_variables(self, step):
        return {"drop": step // 10}


def test_evaluate_workdir_latest_watch_resume_and_tensorboard(shapes, tmp_path):
    tf = pytest.importorskip("tensorflow")
    config, builder = shapes
    config.train.num_steps = 20
    evaluation = runner.CocoEvaluation(config, builder=builder,
                                       predict_fn=_oracle(config, builder))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        runner.evaluate_workdir(config, tmp_path, checkpoints=_FakeCheckpoints([]),
                                evaluation=evaluation)
    # Without --watch: the latest checkpoint only.
    reports = []
    done = runner.evaluate_workdir(config, tmp_path, checkpoints=_FakeCheckpoints([0, 10]),
                                   evaluation=evaluation, report=reports.append)
    assert list(done) == [10] and reports[0].startswith("step 10\n")
    assert done[10]["bbox/AP"] < 1.0  # one instance per image left out
    # --watch: the steps not evaluated yet (0 and the final 20), then it ends.
    done = runner.evaluate_workdir(config, tmp_path, watch=True,
                                   checkpoints=_FakeCheckpoints([0, 10, 20]),
                                   evaluation=evaluation)
    assert list(done) == [0, 20]
    assert done[0]["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    eval_dir = tmp_path / "eval" / config.data.eval_split
    log = runner.EvalLog(str(eval_dir))
    assert sorted(log.steps) == [0, 10, 20]
    assert log.steps[20]["bbox/AR100"] < log.steps[10]["bbox/AR100"] < 1.0  # 2 vs 1 left out
    assert log.best()[:2] == (0, "segm/AP")
    for step in (0, 10, 20):
        assert (eval_dir / f"step_{step}" / "metrics.json").is_file()
    # Restarted watcher: nothing left to evaluate.
    assert runner.evaluate_workdir(config, tmp_path, watch=True,
                                   checkpoints=_FakeCheckpoints([0, 10, 20]),
                                   evaluation=evaluation) == {}
    # TensorBoard: the summary numbers of each step, per-category and undefined ones left out.
    scalars = {}
    for path in eval_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                scalars[(event.step, v.tag)] = float(tf.make_ndarray(v.tensor))
    assert scalars[(0, "eval/bbox/AP")] == pytest.approx(1.0, abs=1e-6)
    assert scalars[(10, "eval/segm/AP")] == pytest.approx(log.steps[10]["segm/AP"], abs=1e-6)
    assert not any("AP-" in tag for _, tag in scalars)


_SAVE_ON_8_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mrcnn_jax.checkpoints import orbax_train
from mrcnn_jax.train_lib import TrainState
mesh = Mesh(np.array(jax.devices()), ("data",))
assert len(jax.devices()) == 8
state = TrainState(step=jnp.array(7, jnp.int32), params={"w": jnp.arange(3.0)},
                   batch_stats={"m": jnp.ones(2)}, opt_state=({"mu": jnp.zeros(3)},),
                   rng=jax.random.PRNGKey(0))
state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
manager = orbax_train.CheckpointManager(sys.argv[1], max_to_keep=2)
for step in (5, 7, 9):
    manager.save(step, state)
manager.wait()
"""


def test_workdir_checkpoints_read_training_checkpoints_of_another_topology(tmp_path):
    # train_lib's checkpoints, saved replicated over 8 devices, read back here on one.
    import os
    import subprocess
    import sys

    checkpoints = runner.WorkdirCheckpoints(tmp_path)
    assert checkpoints.all_steps() == []
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run([sys.executable, "-c", _SAVE_ON_8_DEVICES,
                    str(tmp_path / runner.CHECKPOINT_SUBDIR)],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert checkpoints.all_steps() == [7, 9]  # keep-last-2 removed step 5
    variables = checkpoints.restore_variables(9)
    assert set(variables) == {"params", "batch_stats"}
    assert isinstance(variables["params"]["w"], np.ndarray)
    np.testing.assert_array_equal(variables["params"]["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(variables["batch_stats"]["m"], [1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="5 does not exist"):
        checkpoints.restore_variables(5)


def test_vis_writes_prediction_beside_ground_truth(shapes, tmp_path):
    from PIL import Image

    config, builder = shapes
    evaluation = runner.CocoEvaluation(config, builder=builder,
                                       predict_fn=_oracle(config, builder))
    metrics = runner.run_and_report(evaluation, None, tmp_path, num_vis=2)
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    pictures = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pictures) == 2
    gt = evaluation.ground_truth
    for path in pictures:
        info = gt.imgs[int(path.stem)]
        h, w = info["height"], info["width"]
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB"))
        assert picture.shape == (h, 2 * w + runner.VIS_GAP_PIXELS, 3)
        np.testing.assert_array_equal(picture[:, w:w + runner.VIS_GAP_PIXELS], 255)
        # The oracle predicts the ground truth: both halves show the same instances, so they
        # agree on most pixels (masks differ only by the 28x28 round trip).
        left, right = picture[:, :w].astype(int), picture[:, -w:].astype(int)
        assert np.mean(np.abs(left - right).sum(-1) > 30) < 0.05


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_coco2017_ground_truth_merges_person_keypoints(tmp_path, zipped):
    import zipfile

    from mrcnn_jax.config_base import base_config
    from tests.evaluation import tiny_coco

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
        with zipfile.ZipFile(tmp_path / runner.COCO2017_ANNOTATIONS_ZIP, "w") as zf:
            for name, content in files.items():
                zf.writestr(name, json.dumps(content))
    else:
        (tmp_path / "annotations").mkdir()
        for name, content in files.items():
            tiny_coco.write(tmp_path / name, content)
    d = base_config().data
    d.manual_dir = str(tmp_path)
    gt = runner.ground_truth_dataset(d, "validation")
    merged = {a["id"]: a for a in gt["annotations"]}
    for a in keypoints["annotations"]:
        assert merged[a["id"]]["keypoints"] == a["keypoints"]
        assert merged[a["id"]]["num_keypoints"] == a["num_keypoints"]
    assert "keypoints" not in merged[4]  # the ball
    assert gt["categories"][0]["keypoints"] == tiny_coco.KEYPOINT_NAMES
    evaluator = ce.CocoEvaluator(gt)
    assert evaluator.gt_iou_types == ("bbox", "keypoints")
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        runner.ground_truth_dataset(d, "train")


def test_a_mask_model_without_detections_reports_segm_zero(shapes, tmp_path):
    # An untrained model detects nothing: both types are still evaluated (AP 0, not missing).
    config, builder = shapes
    oracle = _oracle(config, builder)
    evaluation = runner.CocoEvaluation(config, builder=builder, predict_fn=oracle)
    metrics = evaluation.run({"drop": 100})
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AP"] == 0.0
    assert evaluation.evaluator.results == []
