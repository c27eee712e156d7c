"""TPU readiness without a TPU: the bf16 train step (the training pipeline's uint8 batch split
over an 8-device mesh) and the predictor lower for the `tpu` platform through `jax.export`, with
no custom call (nothing CPU- or GPU-only) and the convolutions in bfloat16; `model.dtype="auto"`
resolves to bfloat16 on a TPU and float32 elsewhere, and the saved config records what ran.

Lowering is what can be checked here: XLA's TPU compilation, the TPU's memory and its speed are
not (docs/scaling.md). R50-FPN at its 1344² canvas: lowering without compiling is fast enough for
the default suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mrcnn_jax import train_lib
from mrcnn_jax.modeling.precision import resolve_dtype_name
from tests.child_env import xla_flags
from tests.reference import REPO_ROOT
from tests.training.train_fixtures import tiny_config

BATCH_KEYS = 11  # the 7 train batch entries + the 4 resize-tap arrays of the uint8 image


def _export(tmp_path, model):
    out = tmp_path / f"{model}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
               XLA_FLAGS=xla_flags(8), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "tests.scale.workers", "tpu_export", str(out),
                           model], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _check(result):
    step = result["train_step"]
    assert step["platforms"] == ["tpu"] and step["nr_devices"] == 8
    assert len(result["batch_keys"]) == BATCH_KEYS and "resize_rows" in result["batch_keys"]
    # Every batch entry split over `data`; the state (params, optimizer, step, rng) whole.
    assert step["args_split_over_data"] == BATCH_KEYS
    assert step["args"] > 100
    assert step["bf16_convolutions"] > 0
    for name in ("train_step", "predictor", "transform"):
        assert result[name]["platforms"] == ["tpu"]
        assert result[name]["custom_calls"] == [], (name, result[name]["custom_calls"])
    assert result["predictor"]["bf16_convolutions"] > 0


def test_r50_fpn_train_step_and_predictor_lower_for_tpu(tmp_path):
    _check(_export(tmp_path, "r50"))  # lowering only: ~15 s on the 2-core CPU


def test_auto_dtype_is_bfloat16_on_tpu_only_and_recorded(tmp_path):
    assert resolve_dtype_name("auto", "tpu") == "bfloat16"
    assert resolve_dtype_name("auto", "gpu") == resolve_dtype_name("auto", "cpu") == "float32"
    assert resolve_dtype_name("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="model.dtype='bf16'"):
        resolve_dtype_name("bf16")
    c = tiny_config()
    c.model.dtype = "auto"
    train_lib.save_config(c, str(tmp_path))
    saved = json.loads((tmp_path / train_lib.CONFIG_FILENAME).read_text())
    assert saved["model"]["dtype"] == "float32"  # this machine's backend is the CPU
