"""eval.py as users run it: flag errors, a workdir without checkpoints, and (slow) a whole run
of a randomly initialised model on a tiny shapes split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mrcnn_jax.evaluation import continuous
from tests.reference import REPO_ROOT

TINY_SHAPES = ["--config.data.shapes.num_train=2", "--config.data.shapes.num_val=3",
               "--config.eval.batch_size=2"]


def _eval(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_flag_errors_and_empty_workdir(tmp_path):
    config = f"--config=configs/shapes.py:root={tmp_path / 'shapes'}"
    run = _eval(config)
    assert run.returncode != 0 and "exactly one of --workdir" in run.stderr
    run = _eval(config, f"--weights={tmp_path}/w.pth", f"--workdir={tmp_path}")
    assert run.returncode != 0 and "exactly one of --workdir" in run.stderr
    run = _eval(config, f"--weights={tmp_path}/w.pth", "--watch")
    assert run.returncode != 0 and "--watch needs --workdir" in run.stderr
    run = _eval(config, f"--weights={tmp_path}/missing.pth")
    assert run.returncode == 1 and "weights not found" in run.stderr
    run = _eval(config, f"--workdir={tmp_path}")
    assert run.returncode == 1 and f"no checkpoint in {tmp_path}" in run.stderr


@pytest.mark.slow
def test_eval_random_model_weights_end_to_end(tmp_path):
    import jax
    import jax.numpy as jnp

    from mrcnn_jax.checkpoints import orbax_io
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from tests.evaluation.shapes_oracle import shapes_config

    model_config = shapes_config(tmp_path / "shapes").model  # what eval.py will build
    variables = jax.jit(MaskRCNN(model_config).init)(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]], jnp.int32))
    orbax_io.save_variables(tmp_path / "weights", variables)
    out = tmp_path / "out"
    run = _eval(f"--config=configs/shapes.py:root={tmp_path / 'shapes'}",
                f"--weights={tmp_path / 'weights'}", f"--output_dir={out}", *TINY_SHAPES,
                timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert 0.0 <= metrics[f"{iou_type}/AP"] <= 1.0
        assert (out / f"pr_curve_{iou_type}.png").is_file()
    assert "\nbbox      |" in run.stdout and "\nsegm      |" in run.stdout  # the summary


def _tiny_shapes_config(root):
    """configs/shapes.py with the tiny model of the training tests and a 96x96 canvas."""
    from tests.evaluation.shapes_oracle import shapes_config
    from tests.training.train_fixtures import tiny_config

    config = shapes_config(root, num_val=3)
    tiny = tiny_config(num_steps=2, checkpoint_every_steps=1)
    config.model = tiny.model
    config.train = tiny.train
    d = config.data
    d.shapes.size = 96
    d.min_size = d.max_size = 96
    d.canvas_size = (96, 96)
    d.max_instances = 8
    d.gt_mask_size = 32
    return config


@pytest.mark.slow
def test_train_then_watch_evaluates_every_checkpoint_with_the_real_model(tmp_path):
    # train_lib writes checkpoints at steps 1 and 2 (tiny model, real shapes data); the watcher
    # reads them with WorkdirCheckpoints and evaluates each with the jitted MaskRCNN (~3 min).
    from mrcnn_jax import train_lib

    config = _tiny_shapes_config(tmp_path / "shapes")
    workdir = tmp_path / "work"
    train_lib.train_and_evaluate(config, str(workdir), evaluate=False)
    done = continuous.evaluate_workdir(config, workdir, watch=True, num_vis=1,
                                       poll_interval_s=0.1, timeout_s=1.0)
    assert sorted(done) == [1, 2]  # every checkpoint, then the final step ends the watch
    for step, metrics in done.items():
        for iou_type in ("bbox", "segm"):
            assert 0.0 <= metrics[f"{iou_type}/AP"] <= 1.0
        out = workdir / "eval" / config.data.eval_split / f"step_{step}"
        assert (out / "metrics.json").is_file() and len(list((out / "vis").glob("*.png"))) == 1
    log = continuous.EvalLog(str(workdir / "eval" / config.data.eval_split))
    assert sorted(log.steps) == [1, 2]


@pytest.mark.slow
def test_periodic_evaluation_during_training_is_recorded_once(tmp_path):
    # eval_every_steps=1 over 2 steps: step 1 evaluated periodically, step 2 at the end, both
    # recorded in the EvalLog, so the watcher afterwards has nothing left to evaluate.
    from mrcnn_jax import train_lib

    config = _tiny_shapes_config(tmp_path / "shapes")
    config.train.eval_every_steps = 1
    workdir = tmp_path / "work"
    final = train_lib.train_and_evaluate(config, str(workdir))
    eval_dir = workdir / "eval" / config.data.eval_split
    log = continuous.EvalLog(str(eval_dir))
    assert sorted(log.steps) == [1, 2]
    final_metrics = json.loads((eval_dir / "step_2" / "metrics.json").read_text())
    assert final["eval"]["bbox/AP"] == pytest.approx(final_metrics["bbox/AP"])
    assert 0.0 <= final_metrics["segm/AP"] <= 1.0
    assert (eval_dir / "step_1" / "metrics.json").is_file()
    assert continuous.evaluate_workdir(config, workdir, watch=True, poll_interval_s=0.1,
                                       timeout_s=1.0) == {}
