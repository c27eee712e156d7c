"""predict.py end to end on a tiny random model: valid COCO json (the RLE decodes to exactly the
Predictor's mask, boxes equal its boxes), an overlay png, and clear errors naming bad files."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mrcnn_jax.checkpoints.orbax_io import save_variables
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.predictor import Predictor, load_weights, read_image
from tests.tiny_predict_config import TINY_CONFIG, load_config

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config_path = root / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    config = load_config(config_path)
    variables = MaskRCNN(config.model).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3)), jnp.array([[64, 96]], jnp.int32))
    weights = root / "weights"
    save_variables(weights, variables)
    rng = np.random.default_rng(0)
    # Both resize to 64 x 89 / 64 x 96: one canvas (64 x 96), one compilation.
    images = {"noise": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
              "gradient": np.broadcast_to(np.linspace(0, 255, 90, dtype=np.uint8)[None, :, None],
                                          (60, 90, 3)).copy()}
    paths = []
    for name, im in images.items():
        paths.append(root / f"{name}.png")
        Image.fromarray(im).save(paths[-1])
    return dict(root=root, config_path=config_path, config=config, weights=weights,
                images=images, paths=paths)


def _run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_predict_writes_coco_json_and_overlay(setup):
    from pycocotools import mask as mask_utils

    out = setup["root"] / "out"
    proc = _run_cli(f"--config={setup['config_path']}", f"--weights={setup['weights']}",
                    f"--out={out}", "--vis_threshold=0.0", *setup["paths"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = setup["config"]
    predictor = Predictor(config, load_weights(setup["weights"], config.model))
    results = predictor([read_image(p) for p in setup["paths"]])
    assert predictor.num_compilations == 1
    for (name, image), result in zip(setup["images"].items(), results):
        entries = json.loads((out / f"{name}.json").read_text())
        assert len(entries) == len(result["scores"]) > 0
        for e, box, score, label, mask in zip(entries, result["boxes"], result["scores"],
                                              result["labels"], result["masks"]):
            x1, y1, x2, y2 = box
            np.testing.assert_allclose(e["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-4)
            assert e["category_id"] == label and abs(e["score"] - score) < 1e-6
            assert isinstance(e["segmentation"]["counts"], str)
            assert e["segmentation"]["size"] == list(image.shape[:2])
            rle = {"size": e["segmentation"]["size"],
                   "counts": e["segmentation"]["counts"].encode("ascii")}
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert any(m.any() for m in result["masks"])
        scores = [e["score"] for e in entries]
        assert scores == sorted(scores, reverse=True)
        picture = np.asarray(Image.open(out / f"{name}.png"))
        assert picture.shape == image.shape
        assert np.abs(picture.astype(int) - image).sum() > 0  # something was drawn


# CI time: keypoint inference is checked in tests/keypoints (training then detection, parity);
# this CLI run of a keypoint model is slow-only.
@pytest.mark.slow
def test_predict_keypoint_model_writes_keypoints_and_skeleton(setup):
    """A Keypoint R-CNN config (keypoint branch on, mask branch off): the json carries each
    detection's 17 (x, y, score) keypoints in original pixels and no segmentation."""
    config_path = setup["root"] / "tiny_keypoints.py"
    config_path.write_text(TINY_CONFIG.replace(
        "    return c\n", "    m.num_classes = 2\n    m.mask_head = False\n"
        "    m.keypoint_head = True\n    m.keypoint_head_layers = (16, 16)\n    return c\n"))
    config = load_config(config_path)
    variables = MaskRCNN(config.model).init(
        jax.random.PRNGKey(1), jnp.zeros((1, 64, 96, 3)), jnp.array([[64, 96]], jnp.int32))
    weights = setup["root"] / "keypoint_weights"
    save_variables(weights, variables)
    out = setup["root"] / "out_keypoints"
    proc = _run_cli(f"--config={config_path}", f"--weights={weights}", f"--out={out}",
                    "--vis_threshold=0.0", *setup["paths"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictor = Predictor(config, load_weights(weights, config.model))
    results = predictor([read_image(p) for p in setup["paths"]])
    for (name, image), result in zip(setup["images"].items(), results):
        entries = json.loads((out / f"{name}.json").read_text())
        assert len(entries) == len(result["scores"]) > 0
        for e, keypoints in zip(entries, result["keypoints"]):
            assert "segmentation" not in e and e["category_id"] == 1
            np.testing.assert_allclose(np.reshape(e["keypoints"], (17, 3)), keypoints,
                                       rtol=1e-6, atol=1e-4)
        h, w = image.shape[:2]
        xy = result["keypoints"][..., :2]
        assert xy.min() >= -1 and xy[..., 0].max() <= w + 1 and xy[..., 1].max() <= h + 1
        picture = np.asarray(Image.open(out / f"{name}.png"))
        assert picture.shape == image.shape
        assert np.abs(picture.astype(int) - image).sum() > 0


def test_predict_cli_names_a_missing_image(setup):
    missing = setup["root"] / "no_such_image.jpg"
    proc = _run_cli(f"--config={setup['config_path']}", f"--weights={setup['weights']}",
                    f"--out={setup['root'] / 'out2'}", missing)
    assert proc.returncode == 1
    assert "image file not found" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_files_give_errors_naming_them(setup, tmp_path):
    corrupt_image = tmp_path / "broken.png"
    corrupt_image.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        read_image(corrupt_image)
    with pytest.raises(FileNotFoundError, match="weights not found: .*nothing.pth"):
        load_weights(tmp_path / "nothing.pth", setup["config"].model)
    corrupt_weights = tmp_path / "weights.npz"
    corrupt_weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="weights.npz"):
        load_weights(corrupt_weights, setup["config"].model)
    not_orbax = tmp_path / "empty_dir"
    not_orbax.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_weights(not_orbax, setup["config"].model)


def test_overlay_draws_masks_boxes_and_nothing_else():
    from mrcnn_jax.evaluation.visualization import class_color, render_detections

    image = np.full((60, 80, 3), 100, np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 20:30, 20:40] = True
    boxes = np.array([[15.0, 15.0, 45.0, 35.0], [50.0, 40.0, 70.0, 55.0]], np.float32)
    pic = render_detections(image, boxes, np.array([3, 5]), np.array([0.9, 0.2]), masks,
                            {3: "car"}, score_threshold=0.5, mask_alpha=0.5)
    color = np.asarray(class_color(3))
    # Mask interior: 50/50 blend of grey 100 and the class colour (rounded).
    np.testing.assert_array_equal(pic[25, 30], np.floor(0.5 * 100 + 0.5 * color + 0.5))
    assert np.array_equal(pic[20, 20], color)  # mask outline in the class colour
    assert np.array_equal(pic[33, 15], color)  # box edge x = 15 (1 px line on a small image)
    assert np.all(pic[45:60, 48:75] == 100)  # the 0.2-score detection is not drawn
    assert np.all(pic[50:, :10] == 100)  # far from everything: untouched
