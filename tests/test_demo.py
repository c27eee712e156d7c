"""`make demo` (mrcnn_jax/demo.py): end to end on a tiny config, and (slow) the real demo's AP.

The fast test generates an 8-image shapes set into tmp_path, trains 2 steps on a 64 px canvas,
evaluates, and checks that the printed `demo:` line carries the evaluator's numbers, which in turn
equal a pycocotools evaluation run here independently on the written results json.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_jax import demo
from mrcnn_jax.modeling.conv import resolve_conv_impl

REPO = pathlib.Path(__file__).resolve().parents[1]
LINE_RE = re.compile(r"^demo: bbox_AP=(\d+\.\d{4}) segm_AP=(\d+\.\d{4}) seconds=(\d+)$")


def _shapes_config(root: pathlib.Path):
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import importlib

        shapes_config = importlib.import_module("shapes")
        return shapes_config.get_config(f"root={root}")
    finally:
        sys.path.pop(0)


def _tiny_config(root: pathlib.Path):
    c = _shapes_config(root)
    c.data.shapes.update(num_train=8, num_val=4, size=64)
    c.data.min_size = c.data.max_size = 64
    c.data.canvas_size = (64, 64)
    c.data.gt_mask_size = 16
    c.data.shuffle_buffer = 8
    c.model.rpn_pre_nms_top_n_train = c.model.rpn_post_nms_top_n_train = 50
    c.model.rpn_pre_nms_top_n_test = c.model.rpn_post_nms_top_n_test = 50
    c.model.box_batch_size_per_image = 16
    c.model.num_mask_rois = 4
    c.model.box_nms_candidates = 100
    c.model.detections_per_img = 20
    # No score threshold: an untrained model still yields detections, so AP is not trivially 0.
    c.model.box_score_thresh = 0.0
    c.train.update(global_batch_size=2, num_steps=2, warmup_steps=1, lr_decay_steps=(),
                   log_every_steps=1, checkpoint_every_steps=2)
    c.eval.update(batch_size=2, num_vis=2)
    return c


def _independent_ap(gt_json: str, results_json: str, iou_type: str) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(gt_json)
    results = json.load(open(results_json))
    if iou_type == "bbox":  # the same records, without the masks (as a bbox-only file would be)
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if not results:
        return 0.0
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0])


def test_format_result_line() -> None:
    line = demo.format_result_line(0.51234, 0.5, 1199.6)
    assert line == "demo: bbox_AP=0.5123 segm_AP=0.5000 seconds=1200"
    assert LINE_RE.match(line)


def test_demo_end_to_end_tiny(tmp_path: pathlib.Path) -> None:
    config = _tiny_config(tmp_path / "shapes")
    workdir = tmp_path / "work"
    printed: list[str] = []
    result = demo.run_demo(config, str(workdir), report=printed.append)

    # The data was generated, training reached its last step.
    assert (tmp_path / "shapes" / "annotations" / "instances_val.json").exists()
    assert result["step"] == 2
    assert np.isfinite(result["train"]["loss"])
    # The workdir records the config with the layers that ran (model.conv_impl resolved).
    saved = json.load(open(workdir / "config.json"))
    assert saved["model"]["conv_impl"] == resolve_conv_impl(config.model.conv_impl) == "cpu"
    assert saved["train"]["num_steps"] == config.train.num_steps == 2

    # The last printed line is the demo line, carrying the evaluator's numbers.
    match = LINE_RE.match(printed[-1])
    assert match, printed[-1]
    step_dir = workdir / "eval" / config.data.eval_split / "step_2"
    metrics = json.load(open(step_dir / "metrics.json"))
    assert float(match.group(1)) == pytest.approx(metrics["bbox/AP"], abs=5e-5)
    assert float(match.group(2)) == pytest.approx(metrics["segm/AP"], abs=5e-5)
    assert result["bbox_AP"] == metrics["bbox/AP"] and result["segm_AP"] == metrics["segm/AP"]
    assert 0 < int(match.group(3)) == round(result["seconds"])

    # ... which are pycocotools' AP of the written detections (computed here independently).
    gt_json = str(config.data.eval_annotations)
    results_json = str(step_dir / "coco_results.json")
    assert len(json.load(open(results_json))) > 0
    for kind in ("bbox", "segm"):
        assert metrics[f"{kind}/AP"] == pytest.approx(_independent_ap(gt_json, results_json, kind),
                                                      abs=1e-9)
    # The summary tables were printed before the line, and the pictures written.
    assert any("segm" in text and "AP50" in text for text in printed[:-1])
    pictures = sorted(os.listdir(step_dir / "vis"))
    assert len(pictures) == 2 and all(p.endswith(".png") for p in pictures)


@pytest.mark.slow
def test_make_demo_reaches_mask_ap(tmp_path: pathlib.Path) -> None:
    """The real `python -m mrcnn_jax.demo` (configs/shapes.py, fresh data): segm AP >= 0.5."""
    root = tmp_path / "shapes"
    proc = subprocess.run(
        [sys.executable, "-m", "mrcnn_jax.demo", f"--workdir={tmp_path / 'work'}",
         f"--config={REPO / 'configs' / 'shapes.py'}:root={root}"],
        cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = LINE_RE.match(last)
    assert match, last
    assert float(match.group(2)) >= 0.5, last
