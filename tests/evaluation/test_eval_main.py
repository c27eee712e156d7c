"""eval.py as users run it: flag errors, a workdir without checkpoints, and (slow) a whole run
of a randomly initialised model on a tiny shapes split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    assert run.returncode == 1 and "weights file not found" in run.stderr
    run = _eval(config, f"--workdir={tmp_path}")
    assert run.returncode == 1 and f"no checkpoint in {tmp_path}" in run.stderr


@pytest.mark.slow
def test_eval_random_model_weights_end_to_end(tmp_path):
    import jax
    import jax.numpy as jnp

    from mrcnn_jax.checkpoints import orbax_io
    from mrcnn_jax.config_base import base_config
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    model_config = base_config().model
    model_config.num_classes = 4  # the shapes config's
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
