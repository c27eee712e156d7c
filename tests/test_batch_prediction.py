"""Prediction over a data set (`mrcnn_jax.batch_prediction`, `predict.py --input`) on a tiny random
model: one results json equal to the Predictor's detections image by image (RLEs decode to its
masks), one compilation for images of every size (one larger than the canvas: resized, not
cropped), an unreadable image reported and skipped, an interrupted job resumed without redoing
finished images, and the command line over two devices giving the one-device results."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mrcnn_jax import batch_prediction as bp
from mrcnn_jax.checkpoints.orbax_io import save_variables
from mrcnn_jax.data.label_map import LabelMap
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.predictor import Predictor
from tests.child_env import xla_flags
from tests.tiny_predict_config import TINY_CONFIG, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

CANVAS = (96, 96)  # max_size 96 is a multiple of size_divisibility 32
# Six images in name order (ids 1..6); "c_large" is 300 x 200, larger than the canvas: the
# model's rule resizes it to 96 x 64. "b_broken" is not an image.
SIZES = {"a_wide": (50, 70), "c_large": (300, 200), "d_small": (31, 45), "e_tall": (90, 60),
         "f_square": (64, 64)}
LABELS = LabelMap(num_classes=4, labels=(1, 2, 3), category_ids=(7, 3, 9),
                  names=("circle", "square", "triangle"))
# Pixels of mask crops the device pastes per image: about two full-image masks of the small
# images, so some detections of every image and most of c_large's are pasted by the host.
PASTE_CAPACITY = 8000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_prediction")
    config_path = root / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    config = load_config(config_path)
    variables = MaskRCNN(config.model).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3)), jnp.array([[64, 96]], jnp.int32))
    weights = root / "weights"
    save_variables(weights, variables)
    LABELS.save(weights)
    images_dir = root / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for name, hw in SIZES.items():
        images[name] = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        Image.fromarray(images[name]).save(images_dir / f"{name}.png")
    (images_dir / "b_broken.png").write_bytes(b"not a png at all")
    (images_dir / "notes.txt").write_text("not an image suffix: not listed")
    model = bp.BatchPredictor(config, variables, per_device_batch=2, paste="device",
                              paste_capacity=PASTE_CAPACITY)
    expected = Predictor(config, variables, canvas_hw=CANVAS)(list(images.values()))
    return dict(root=root, config_path=config_path, config=config, weights=weights,
                images_dir=images_dir, images=images, model=model,
                expected=dict(zip(images, expected)))


@pytest.fixture(scope="module")
def full_run(setup):
    """One uninterrupted job over the folder."""
    out = setup["root"] / "full"
    entries = bp.list_images(setup["images_dir"])
    summary = bp.predict_dataset(setup["model"], entries, out, LABELS.label_to_category_id,
                                 LABELS.label_names, progress_every=1)
    return dict(out=out, entries=entries, summary=summary)


def test_results_json_equals_the_predictor(setup, full_run):
    """results.json against `Predictor(canvas_hw=(96, 96))` on each image: the same detections
    (boxes within 1e-4 px, as test_export measures batch 2 against batch 1), category ids through
    the label map, RLEs that decode to exactly its masks (crops pasted on the device and, past
    the capacity, on the host), one compilation for five sizes."""
    from pycocotools import mask as mask_utils

    out, summary = full_run["out"], full_run["summary"]
    assert summary["complete"] and summary["images"] == 6 and summary["done"] == 6
    assert setup["model"].num_compilations == 1
    results = json.loads((out / bp.RESULTS_FILE).read_text())
    images = json.loads((out / bp.IMAGES_FILE).read_text())
    assert [im["file_name"] for im in images["images"]] == [
        str(setup["images_dir"] / f"{n}.png") for n in SIZES]
    ids = {pathlib.Path(im["file_name"]).stem: im["id"] for im in images["images"]}
    assert ids == {"a_wide": 1, "c_large": 3, "d_small": 4, "e_tall": 5, "f_square": 6}
    category_of = {1: 7, 2: 3, 3: 9}
    pasted_pixels = 0
    for name, expected in setup["expected"].items():
        entries = [r for r in results if r["image_id"] == ids[name]]
        assert len(entries) == len(expected["scores"]) == 10
        for e, box, score, label, mask in zip(entries, expected["boxes"], expected["scores"],
                                              expected["labels"], expected["masks"]):
            x1, y1, x2, y2 = box
            np.testing.assert_allclose(e["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-6,
                                       atol=1e-4)
            assert abs(e["score"] - score) < 1e-5 and e["category_id"] == category_of[label]
            assert e["segmentation"]["size"] == list(SIZES[name])
            rle = {**e["segmentation"], "counts": e["segmentation"]["counts"].encode()}
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
            pasted_pixels += int(mask.sum())
    assert pasted_pixels > 0
    large = setup["expected"]["c_large"]
    assert large["masks"].shape[1:] == (300, 200) and large["boxes"][:, 2:].max() > 96


def test_unreadable_image_is_reported_and_skipped(setup, full_run):
    images = json.loads((full_run["out"] / bp.IMAGES_FILE).read_text())
    broken = str(setup["images_dir"] / "b_broken.png")
    assert full_run["summary"]["unreadable"] == [broken]
    assert images["unreadable"][0]["path"] == broken and images["unreadable"][0]["image_id"] == 2
    assert "not a readable image" in images["unreadable"][0]["error"]
    assert len(images["images"]) == 5


def test_interrupted_job_resumes_without_redoing_images(setup, full_run, capfd):
    """Stopped (an exception, as a Ctrl-C) while its second batch is on the device: the first
    batch (a_wide, c_large, and b_broken met while reading it) is in progress.jsonl, the second
    is lost. The restart runs the model on the other 3 images only; its results.json is the
    uninterrupted job's, byte for byte."""
    model, out = setup["model"], setup["root"] / "resumed"
    entries = bp.list_images(setup["images_dir"])

    def stop(done):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bp.predict_dataset(model, entries, out, LABELS.label_to_category_id, LABELS.label_names,
                           on_batch=stop)
    records = bp.load_progress(out)
    assert [pathlib.Path(r["path"]).stem for r in records] == ["b_broken", "a_wide", "c_large"]
    assert not (out / bp.RESULTS_FILE).exists()
    before = model.images_run
    summary = bp.predict_dataset(model, entries, out, LABELS.label_to_category_id,
                                 LABELS.label_names)
    assert model.images_run - before == 3  # d_small, e_tall, f_square
    assert summary["skipped"] == 3 and summary["done"] == 3
    assert ((out / bp.RESULTS_FILE).read_bytes()
            == (full_run["out"] / bp.RESULTS_FILE).read_bytes())
    assert "predict: 6/6 images" in capfd.readouterr().err


def test_list_images_reads_folders_globs_lists_and_coco_json(setup, tmp_path):
    """Every --input form, and --split of a coco_format config (its eval json and images)."""
    folder = setup["images_dir"]
    names = [pathlib.Path(e.path).name for e in bp.list_images(folder)]
    assert names == ["a_wide.png", "b_broken.png", "c_large.png", "d_small.png", "e_tall.png",
                     "f_square.png"]
    assert [pathlib.Path(e.path).name for e in bp.list_images(f"{folder}/[ce]_*.png")] == [
        "c_large.png", "e_tall.png"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{folder}/e_tall.png\n\n../{tmp_path.name}/x.png\n")
    got = bp.list_images(listing)
    assert [(e.image_id, e.path) for e in got] == [
        (1, f"{folder}/e_tall.png"), (2, str(tmp_path / f"../{tmp_path.name}/x.png"))]
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [{"id": 42, "file_name": "d_small.png"},
                                           {"id": 7, "file_name": "a_wide.png"}]}))
    assert bp.list_images(coco, folder) == [bp.ImageEntry(42, str(folder / "d_small.png")),
                                            bp.ImageEntry(7, str(folder / "a_wide.png"))]
    data = setup["config"].data.copy_and_resolve_references()
    data.dataset, data.eval_images, data.eval_annotations = "coco_format", str(folder), str(coco)
    assert bp.split_images(data, data.eval_split) == bp.list_images(coco, folder)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        bp.list_images(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match="no image files match"):
        bp.list_images(f"{tmp_path}/*.jpg")


def test_cli_on_two_devices_with_a_stop_and_a_restart(setup, full_run):
    """`predict.py --input` with two CPU devices (batch 1 x 2 devices): --max_images=2 stops
    after the first batch (a_wide, c_large; b_broken reported), the second run finishes;
    results.json equals the one-device job's (boxes within 1e-4 px, RLEs equal: pasted by the
    host here, the CPU default, by the device there), the overlays are written and the
    progress lines name the rate."""
    out = setup["root"] / "cli"
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    args = [sys.executable, str(REPO / "predict.py"), f"--config={setup['config_path']}",
            f"--weights={setup['weights']}", f"--out={out}", f"--input={setup['images_dir']}",
            "--batch_size=1", "--progress_every=1"]
    first = subprocess.run([*args, "--max_images=2"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after 3 of 6 images" in first.stdout and "b_broken.png" in first.stderr
    assert not (out / bp.RESULTS_FILE).exists()
    second = subprocess.run([*args, "--vis"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "img/s, ETA" in second.stderr
    got = json.loads((out / bp.RESULTS_FILE).read_text())
    want = json.loads((full_run["out"] / bp.RESULTS_FILE).read_text())
    assert len(got) == len(want) == 50
    for g, w in zip(got, want):
        assert g["segmentation"] == w["segmentation"]
        assert (g["image_id"], g["category_id"]) == (w["image_id"], w["category_id"])
        np.testing.assert_allclose(g["bbox"], w["bbox"], rtol=1e-6, atol=1e-4)
    # Overlays only of the images predicted by the second run (--vis was not given before).
    assert sorted(p.name for p in (out / bp.VIS_DIR).iterdir()) == [
        "d_small.png", "e_tall.png", "f_square.png"]


def test_results_json_evaluates_with_coco_evaluator(setup, full_run):
    """results.json + images.json into `CocoEvaluator` (docs/deploy.md's recipe) against a ground
    truth made of the Predictor's own detections with a non-empty mask: every such detection
    matches its twin, so bbox and segm AP are 1.0."""
    from pycocotools import mask as mask_utils

    from mrcnn_jax.evaluation.coco_evaluator import CocoEvaluator, encode_masks

    out = full_run["out"]
    images = json.loads((out / bp.IMAGES_FILE).read_text())["images"]
    ids = {pathlib.Path(im["file_name"]).stem: im["id"] for im in images}
    annotations = []
    for name, det in setup["expected"].items():
        for box, label, mask, rle in zip(det["boxes"], det["labels"], det["masks"],
                                         encode_masks(det["masks"])):
            if mask.any():
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": ids[name], "iscrowd": 0,
                    "category_id": LABELS.label_to_category_id[int(label)], "segmentation": rle,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum())})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": n} for c, n in zip(LABELS.category_ids, LABELS.names)]}
    results = [r for r in json.loads((out / bp.RESULTS_FILE).read_text())
               if mask_utils.area({**r["segmentation"],
                                   "counts": r["segmentation"]["counts"].encode()}) > 0]
    assert len(results) == len(annotations) > 30  # of 50 detections
    evaluator = CocoEvaluator(gt)
    evaluator.add_results(results, image_ids=[im["id"] for im in images])
    metrics = evaluator.evaluate(("bbox", "segm"))
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)


def test_predictor_pastes_on_the_device_the_masks_the_host_pastes(setup, caplog):
    """`Predictor(paste="device")`, the accelerators' default: the device pastes the crops it
    has room for (`paste_capacity`), the host the rest, and the results equal the host paste's
    (`setup["expected"]`): masks exactly, the same detections, one compilation per batch shape."""
    config = setup["config"]
    variables = setup["model"].variables
    images = list(setup["images"].values())
    predictor = Predictor(config, variables, batch_size=2, canvas_hw=CANVAS, paste="device",
                          paste_capacity=PASTE_CAPACITY)
    assert predictor.paste == "device"
    with caplog.at_level("INFO", logger="mrcnn_jax.predictor"):
        got = predictor(images)
    assert predictor.num_compilations == 2  # batches of 2 and the last of 1, any image size
    on_host = sum(int(r.getMessage().split()[0]) for r in caplog.records
                  if "past the device paste's buffer" in r.getMessage())
    total = sum(len(r["scores"]) for r in got)
    assert 0 < on_host < total  # both paths ran
    for name, result in zip(setup["images"], got):
        expected = setup["expected"][name]
        assert result.keys() == expected.keys()
        np.testing.assert_array_equal(result["labels"], expected["labels"])
        np.testing.assert_allclose(result["boxes"], expected["boxes"], rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(result["scores"], expected["scores"], atol=1e-5)
        assert result["masks"].dtype == bool and result["masks"].shape == expected["masks"].shape
        np.testing.assert_array_equal(result["masks"], expected["masks"])


def test_predictor_paste_setting_errors(setup):
    config = setup["config"]
    variables = setup["model"].variables
    with pytest.raises(ValueError, match="paste must be one of auto, device, host, got 'gpu'"):
        Predictor(config, variables, paste="gpu")
    probabilities = load_config(setup["config_path"])
    probabilities.model.mask_threshold = None
    with pytest.raises(ValueError, match="paste='device' needs model.mask_threshold"):
        Predictor(probabilities, variables, paste="device")
    assert Predictor(probabilities, variables, paste="auto").paste == "host"
    assert Predictor(config, variables).paste == "host"  # auto on the CPU backend
