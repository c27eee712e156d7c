"""Workdirs, weights and annotations in a bucket (gs://...): the run's file IO keeps URLs.

There is no network here, so `gs://bucket/...` is served from a local folder through etils'
`mock_epath` (every epath backend call sees the URL mapped to `<tmp>/gcs/bucket/...`). What the
tests protect: a URL is never turned into a local relative path (the old `os.path.abspath` made
`gs://b/run` a folder `./gs:/b/run` whose checkpoints die with the VM), and every reader and
writer of the trainer and evaluator goes through epath, so it reaches the bucket.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils as orbax_gcs_utils

from mrcnn_jax import paths
from tests.evaluation import tiny_coco

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "gs://bucket"


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    """Serves gs://bucket/... from tmp_path/gcs/bucket/...; yields that local folder."""
    root = tmp_path / "gcs"

    def local(path):
        path = os.fspath(path)
        return os.fspath(root / path[len("gs://"):]) if path.startswith("gs://") else path

    def url(path):
        path = os.fspath(path)
        return "gs://" + path[len(os.fspath(root)) + 1:] if path.startswith(os.fspath(root)) \
            else path

    def mapped(original, path, *args, **kwargs):
        return original(local(path), *(local(a) for a in args), **kwargs)

    def glob(original, path):
        return [url(p) for p in original(local(path))]

    def walk(original, top, **kwargs):
        for folder, dirs, files in original(local(top), **kwargs):
            yield url(folder), dirs, files

    # With TensorFlow imported epath sends gs:// to TF's gfile, which mock_epath leaves alone.
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    # A plain (flat namespace) bucket, as orbax would learn from google-cloud-storage.
    monkeypatch.setattr(paths, "_find_spec", lambda module: object())
    monkeypatch.setattr(orbax_gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
             "rename", "replace", "rmtree", "stat")
    with epath_testing.mock_epath(glob=glob, walk=walk, **{n: mapped for n in names}):
        (root / "bucket").mkdir(parents=True)
        monkeypatch.chdir(tmp_path)  # where a URL taken for a local path would land
        yield root / "bucket"
    assert not (tmp_path / "gs:").exists(), "a gs:// path was used as a local relative path"


def _shapes_config():
    spec = importlib.util.spec_from_file_location("shapes_config", ROOT / "configs" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.resolve("gs://b/run/ckpt")) == "gs://b/run/ckpt"
    assert os.fspath(paths.resolve("s3://b/x")) == "s3://b/x"
    assert os.fspath(paths.resolve("run")) == os.fspath(tmp_path / "run")
    assert os.fspath(paths.resolve(tmp_path / "a" / ".." / "b")) == os.fspath(tmp_path / "b")
    assert paths.is_url("gs://b") and not paths.is_url("/tmp/gs/b")
    # What os.path did to a URL, the failure this module exists for:
    assert os.path.abspath("gs://b/run") == os.fspath(tmp_path / "gs:" / "b" / "run")


def test_json_files_in_a_bucket_are_atomic_and_errors_name_them(bucket):
    target = f"{BUCKET}/run/eval/log.json"
    paths.makedirs(f"{BUCKET}/run/eval")
    paths.write_json_atomic(target, {"10": {"segm/AP": 0.5}})
    assert json.loads((bucket / "run" / "eval" / "log.json").read_text()) == {
        "10": {"segm/AP": 0.5}}
    assert sorted(os.listdir(bucket / "run" / "eval")) == ["log.json"]  # no .tmp left
    paths.write_json_atomic(target, [1, 2])  # replaces
    assert paths.read_json(target) == [1, 2]
    (bucket / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="gs://bucket/bad.json"):
        paths.read_json(f"{BUCKET}/bad.json")
    with pytest.raises(FileNotFoundError, match="gs://bucket/none.json"):
        paths.read_json(f"{BUCKET}/none.json")


def test_eval_log_and_workdir_checkpoints_live_in_the_bucket(bucket):
    from mrcnn_jax.checkpoints import workdir
    from mrcnn_jax.evaluation import continuous

    log = continuous.EvalLog(f"{BUCKET}/run/eval/validation")
    log.record(100, {"segm/AP": 0.25, "bbox/AP": 0.5})
    log.record(200, {"segm/AP": 0.4, "bbox/AP": 0.3})
    folder = bucket / "run" / "eval" / "validation"
    assert json.loads((folder / continuous.BEST_FILENAME).read_text())["step"] == 200
    reread = continuous.EvalLog(f"{BUCKET}/run/eval/validation")  # a restarted watcher
    assert 100 in reread and 200 in reread and 300 not in reread
    assert reread.best() == (200, "segm/AP", 0.4)

    checkpoints = workdir.WorkdirCheckpoints(f"{BUCKET}/run")
    assert os.fspath(checkpoints.directory) == f"{BUCKET}/run/{workdir.CHECKPOINT_SUBDIR}"
    assert checkpoints.all_steps() == []


def test_training_checkpoint_manager_keeps_the_bucket_url(bucket):
    from mrcnn_jax.checkpoints import orbax_train

    manager = orbax_train.CheckpointManager(f"{BUCKET}/run/checkpoints", max_to_keep=2)
    try:
        assert manager.directory == f"{BUCKET}/run/checkpoints"
        assert manager.latest_step() is None
        assert (bucket / "run" / "checkpoints").is_dir()  # created in the bucket
    finally:
        manager.close()


def test_orbax_in_a_bucket_without_the_gcs_client_fails_naming_the_package(monkeypatch):
    from mrcnn_jax.checkpoints import orbax_io, orbax_train, workdir

    monkeypatch.setattr(paths, "_find_spec", lambda module: None)  # not installed
    message = "gs://b/run/checkpoints: orbax needs the google-cloud-storage package"
    with pytest.raises(ImportError, match=message):
        orbax_train.CheckpointManager("gs://b/run/checkpoints")
    with pytest.raises(ImportError, match=message):
        workdir.WorkdirCheckpoints("gs://b/run")
    with pytest.raises(ImportError, match="gs://b/weights: orbax needs"):
        orbax_io.restore_variables("gs://b/weights")
    paths.check_orbax_directory("/local/run/checkpoints")  # local folders need nothing


def test_validate_config_finds_init_weights_in_the_bucket(bucket):
    from mrcnn_jax import train_lib

    config = _shapes_config()
    config.train.init_from = f"{BUCKET}/weights/r50.npz"
    with pytest.raises(FileNotFoundError, match="train.init_from.*gs://bucket/weights/r50.npz"):
        train_lib._validate_config(config)
    (bucket / "weights").mkdir()
    np.savez(bucket / "weights" / "r50.npz", w=np.zeros(3, np.float32))
    train_lib._validate_config(config)  # found: no error


def test_state_dicts_are_read_from_and_written_to_the_bucket(bucket):
    from mrcnn_jax.checkpoints import torchvision as tv_import

    rng = np.random.default_rng(0)
    state = {"conv1.weight": rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
             "bn1.running_var": rng.random(4).astype(np.float32),
             "steps": np.array(7, np.int64)}
    tv_import.save_safetensors(state, f"{BUCKET}/w.safetensors")
    np.savez(bucket / "w.npz", **state)
    for name in ("w.safetensors", "w.npz"):
        loaded = tv_import.load_state_dict(f"{BUCKET}/{name}")
        assert sorted(loaded) == sorted(state)
        for k in state:
            np.testing.assert_array_equal(loaded[k], state[k])
    with pytest.raises(FileNotFoundError, match="gs://bucket/missing.npz"):
        tv_import.load_state_dict(f"{BUCKET}/missing.npz")


def test_evaluation_reads_ground_truth_and_writes_results_in_the_bucket(bucket):
    from PIL import Image

    from mrcnn_jax.data import coco_instances
    from mrcnn_jax.evaluation import coco_evaluator as ce

    tiny_coco.write(bucket / "gt.json", tiny_coco.dataset())
    config = _shapes_config()
    config.data.dataset = "coco_format"
    config.data.eval_annotations = f"{BUCKET}/gt.json"
    gt = coco_instances.ground_truth_dataset(config.data, config.data.eval_split)
    assert gt == json.loads((bucket / "gt.json").read_text())

    # Perfect detections of image 30 (its two non-crowd instances), evaluated into the bucket.
    evaluator = ce.CocoEvaluator(f"{BUCKET}/gt.json")
    coco = evaluator.coco_gt
    anns = [a for a in coco.imgToAnns[30] if not a["iscrowd"]]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns], np.float64)
    labels = np.array([{3: 1, 7: 2, 11: 3}[a["category_id"]] for a in anns])
    masks = np.array([coco.annToMask(a) for a in anns], bool)
    evaluator.add_predictions([30], boxes[None], np.ones((1, len(anns))), labels[None],
                              masks=[masks])
    metrics = evaluator.evaluate(("bbox", "segm"), output_dir=f"{BUCKET}/eval/step_1")
    out = bucket / "eval" / "step_1"
    assert json.loads((out / ce.METRICS_FILENAME).read_text()) == metrics
    assert len(json.loads((out / ce.RESULTS_FILENAME).read_text())) == len(anns)
    with Image.open(out / "pr_curve_segm.png") as im:
        assert im.size == (500, 400)
    evaluator.load_results(f"{BUCKET}/eval/step_1/{ce.RESULTS_FILENAME}")  # reads back


def test_dataset_sources_given_as_urls_fail_naming_the_field(bucket):
    from mrcnn_jax.data import coco_instances

    config = _shapes_config()
    config.data.dataset = "coco_format"
    config.data.shapes = None
    config.data.train_images = f"{BUCKET}/images"
    config.data.train_annotations = f"{BUCKET}/train.json"
    with pytest.raises(ValueError, match="data.train_images='gs://bucket/images'.*data_dir"):
        coco_instances.get_builder(config.data)
