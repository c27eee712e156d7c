"""Your own data as exports bring it: prepare -> train.py -> eval.py -> predict.py on a generated
Roboflow-style export with its quirks, each command exiting 0 and naming every problem.

The export (train/ and valid/, each with `_annotations.coco.json` beside its images) is the
synthetic shapes set (categories 1 circle, 3 square, 5 triangle) with:
- Roboflow's parent category, id 0, whose name repeats a real class's ("square"), used by nothing;
- a category no annotation uses (id 9 "hexagon");
- an image the json lists that is not on disk, and one that sits in a subfolder the json omits;
- a box reaching outside its image.
"""

from __future__ import annotations

import json
import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest

from mrcnn_jax import train_lib
from mrcnn_jax.data import label_map, shapes

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64

# A config file of the test's own: configs/coco_export.py with the tiny model of the demo test.
TINY_CONFIG = f"""
import sys
sys.path.insert(0, {str(REPO / "configs")!r})
from coco_export import get_config as export_config
from shapes import _model_and_training


def get_config(arg):
    c = export_config(arg)
    _model_and_training(c)  # the demo's tiny from-scratch ResNet-FPN
    c.model.num_classes = 0  # from the data
    d = c.data
    d.data_dir = {{data_dir!r}}
    d.min_size = d.max_size = {SIZE}
    d.canvas_size = ({SIZE}, {SIZE})
    d.gt_mask_size = 16
    d.max_instances = 16
    d.shuffle_buffer = 8
    m = c.model
    m.rpn_pre_nms_top_n_train = m.rpn_post_nms_top_n_train = 50
    m.rpn_pre_nms_top_n_test = m.rpn_post_nms_top_n_test = 50
    m.box_batch_size_per_image = 16
    m.num_mask_rois = 4
    m.box_nms_candidates = 100
    m.detections_per_img = 20
    m.box_score_thresh = 0.0
    c.train.update(global_batch_size=2, num_steps=2, warmup_steps=1, lr_decay_steps=(),
                   log_every_steps=1, checkpoint_every_steps=2)
    c.eval.update(batch_size=2, num_vis=0)
    return c
"""


def write_quirky_export(root: pathlib.Path) -> pathlib.Path:
    """The export described in the module docstring, under `root/export`."""
    shapes.generate(root / "shapes", num_train=6, num_val=3, size=SIZE, seed=3)
    export = root / "export"
    for src_split, dst_split in (("train", "train"), ("val", "valid")):
        images_dir, ann_path = shapes.annotation_paths(root / "shapes", src_split)
        out = export / dst_split
        shutil.copytree(images_dir, out)
        data = json.loads(ann_path.read_text())
        data["categories"] = [{"id": 0, "name": "square", "supercategory": "none"},
                              *data["categories"], {"id": 9, "name": "hexagon"}]
        if dst_split == "train":
            data["images"].append({"id": 999, "file_name": "ghost.jpg", "height": SIZE,
                                   "width": SIZE})
            moved = data["images"][1]["file_name"]
            (out / "sub").mkdir()
            (out / moved).rename(out / "sub" / moved)
            ann = data["annotations"][0]
            x, y, w, h = ann["bbox"]
            ann["bbox"] = [x, y, w + 2 * SIZE, h]  # past the right edge: clipped
        (out / "_annotations.coco.json").write_text(json.dumps(data))
    return export


def _run(args: list[str], cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_prepare_train_eval_predict_on_a_quirky_export(tmp_path: pathlib.Path) -> None:
    export = write_quirky_export(tmp_path)
    config_file = tmp_path / "tiny_export.py"
    config_file.write_text(TINY_CONFIG.format(data_dir=str(tmp_path / "tfds")))
    config_flag = f"--config={config_file}:{export}"

    prepared = _run(["-m", "mrcnn_jax.data.prepare", config_flag])
    log = prepared.stderr
    assert "missing_image_file: 1" in log and "ghost.jpg" in log
    assert "image_in_subfolder: 1" in log and "-> sub/000002." in log
    assert "box_clipped: 1" in log
    report = prepared.stdout
    assert "categories no annotation uses get no label: id 0 'square', id 9 'hexagon'" in report
    assert "model.num_classes = 4 from the data" in report
    assert "train: 6 images" in report and "valid: 3 images" in report  # the subfolder one too

    # A number of classes the data contradicts stops train.py before anything is built.
    config = runpy.run_path(str(config_file))["get_config"](str(export))
    config.model.num_classes = 6
    with pytest.raises(ValueError, match=r"model.num_classes = 6 contradicts the data: it has 3 "
                                         r"classes \(\+ background = 4\)"):
        train_lib.train_and_evaluate(config, str(tmp_path / "never"))
    assert not (tmp_path / "never" / "checkpoints").exists()

    workdir = tmp_path / "work"
    trained = _run(["train.py", config_flag, f"--workdir={workdir}"])
    assert "model.num_classes = 4 from the data" in trained.stderr
    saved = label_map.LabelMap.load(workdir)
    assert saved.label_to_category_id == {1: 1, 2: 3, 3: 5}
    assert saved.names == ("circle", "square", "triangle")
    assert json.loads((workdir / "config.json").read_text())["model"]["num_classes"] == 4
    metrics = json.loads((workdir / "eval" / "valid" / "step_2" / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox/AP"] <= 1.0

    # eval.py reads the run from the workdir: the label map and the model come with it.
    out = tmp_path / "eval_out"
    _run(["eval.py", config_flag, f"--weights={workdir}", f"--output_dir={out}"])
    again = json.loads((out / "metrics.json").read_text())
    assert again["bbox/AP"] == pytest.approx(metrics["bbox/AP"], abs=1e-6)
    assert again["segm/AP"] == pytest.approx(metrics["segm/AP"], abs=1e-6)

    # predict.py on one step of it: category ids and names of the export, no extra flags.
    image = export / "valid" / json.loads(
        (export / "valid" / "_annotations.coco.json").read_text())["images"][0]["file_name"]
    _run(["predict.py", config_flag, f"--weights={workdir / 'checkpoints' / '2'}",
          f"--out={tmp_path / 'pred'}", str(image)])
    results = json.loads((tmp_path / "pred" / f"{image.stem}.json").read_text())
    assert results, "an untrained model still detects with box_score_thresh = 0"
    names = {1: "circle", 3: "square", 5: "triangle"}
    assert all(names[r["category_id"]] == r["category_name"] for r in results)


def test_from_scratch_frozen_bn_is_flagged_with_the_alternatives() -> None:
    from mrcnn_jax.config_base import base_config

    c = base_config()
    hint = train_lib.from_scratch_hint(c)
    assert "frozen BatchNorm" in hint and "configs/fpn_r50_gn.py" in hint
    assert "train.init_from" in hint
    c.train.init_from = "resnet50.pth"
    assert train_lib.from_scratch_hint(c) is None
    c.train.init_from, c.model.norm = "", "group_norm"
    assert train_lib.from_scratch_hint(c) is None


BREADCRUMB = REPO.parent / "shared" / "data" / "breadcrumb"


@pytest.mark.skipif(not BREADCRUMB.is_dir(), reason="../shared/data/breadcrumb is absent")
def test_breadcrumb_export_reads_as_five_classes(tmp_path) -> None:
    """The real Roboflow export: its parent class (id 0) dropped, 80 train and 20 test photos."""
    from mrcnn_jax.data import prepare

    config = runpy.run_path(str(REPO / "configs" / "breadcrumb.py"))["get_config"](
        str(BREADCRUMB))
    config.data.data_dir = str(tmp_path / "tfds")
    report = prepare.describe(config)
    assert "train: 80 images; bad data: none" in report
    assert "test: 20 images; bad data: none" in report
    assert "id 0 'electronic-components'" in report
    assert "label 4: category id 4 'logic gate'" in report
    assert config.data.eval_split == "test" and config.data.canvas_size == (384, 384)


def test_prepare_suggests_the_raw_canvas_that_holds_the_largest_image(tmp_path) -> None:
    from mrcnn_jax.config_base import base_config
    from mrcnn_jax.data import prepare

    def hint(sizes, raw=(0, 0), dataset="coco_format"):
        ann = tmp_path / "train.json"
        ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg", "height": h,
                                               "width": w} for i, (h, w) in enumerate(sizes)]}))
        d = base_config().data
        d.dataset, d.train_annotations, d.raw_canvas_size = dataset, str(ann), raw
        return prepare.raw_canvas_hint(d)

    # 1344 x 1344 / (480 x 640) = 5.88
    assert hint([(480, 640), (427, 640), (480, 360)]) == (
        "train images are at most 480x640 (height x width): "
        "--config.data.raw_canvas_size='(480,640)' carries them exactly in 5.9x fewer pixel "
        "bytes per batch than the 1344x1344 raw canvas")
    assert "'(1344,800)' carries them exactly in 1.7x fewer" in hint([(2000, 800)])
    assert hint([(2000, 1500)]) == ""  # larger on both sides: nothing to save
    assert hint([(480, 640)], raw=(480, 640)) == ""  # already set
    assert hint([(480, 640)], dataset="coco_instances/2017") == ""  # COCO: 640 already
