"""Multi-process training on one machine: 2 CPU processes joined by `jax.distributed` (gloo
collectives, coordinator on 127.0.0.1) train like 1 process, and survive a kill.

Each process is `tests/scale/workers.py train`: `mrcnn_jax.distributed.initialize`, then
`train_lib.train_and_evaluate` fed this process's slice of each global batch (global batch 2, one
image per process, made global with `jax.make_array_from_process_local_data`), a checkpoint every
step written by orbax from both processes into the shared workdir.

What it protects: per-host batches are assembled in process order and the gradients reduced over
processes (a process training on its own image would drift from the 1-process run), checkpoints
are written once and restored by every process, and a run whose process died resumes.
Tolerance 1e-5 on parameters (gloo sums in another order than one device). Both tests are
`slow` (several jax processes compiling the step); run them with `pytest -m slow tests/scale`.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mrcnn_jax.checkpoints.workdir import WorkdirCheckpoints
from tests.child_env import xla_flags
from tests.reference import REPO_ROOT
from tests.scale import workers

NUM_STEPS = 3
TOL = 1e-5
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: pathlib.Path, num_steps: int, sleep: float, port: int | None = None,
           process_id: int = 0, num_processes: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.scale.workers", "train", str(workdir), str(num_steps),
           str(sleep)]
    if port is not None:
        cmd += [str(port), str(num_processes), str(process_id)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
               TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=xla_flags())  # one CPU device per process
    log = open(workdir.parent / f"{workdir.name}_p{process_id}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log(workdir: pathlib.Path, process_id: int) -> str:
    return (workdir.parent / f"{workdir.name}_p{process_id}.log").read_text()


def _run_two(workdir: pathlib.Path, num_steps: int) -> None:
    port = _free_port()
    procs = [_start(workdir, num_steps, 0.0, port, i) for i in range(2)]
    for p in procs:
        p.wait(timeout=TIMEOUT_S)
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{_log(workdir, i)[-4000:]}"


def _params(workdir: pathlib.Path) -> tuple[int, dict]:
    ckpts = WorkdirCheckpoints(workdir)
    step = ckpts.all_steps()[-1]
    return step, ckpts.restore_variables(step)


def _max_diff(a, b) -> float:
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same run in one process (this one), one CPU device."""
    workdir = tmp_path_factory.mktemp("one") / "work"
    workers.train_main(str(workdir), NUM_STEPS, 0.0)
    return workdir


@pytest.mark.slow  # ~100 s of CPU: three compilations (the reference and each process)
def test_two_processes_train_like_one(one_process, tmp_path):
    workdir = tmp_path / "two"
    _run_two(workdir, NUM_STEPS)
    metrics = json.loads((workdir / "final_metrics.json").read_text())
    reference = json.loads((one_process / "final_metrics.json").read_text())
    assert metrics["process_count"] == 2 and reference["process_count"] == 1
    for name in ("loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg",
                 "loss_mask"):
        np.testing.assert_allclose(metrics[name], reference[name], rtol=TOL, atol=TOL,
                                   err_msg=name)
    # One set of checkpoints, written once (orbax: process 0 writes replicated arrays).
    assert WorkdirCheckpoints(workdir).all_steps() == list(range(1, NUM_STEPS + 1))
    step, params = _params(workdir)
    ref_step, ref_params = _params(one_process)
    assert step == ref_step == NUM_STEPS
    assert _max_diff(params, ref_params) <= TOL
    # Only process 0 logs the progress lines.
    assert "loss" in _log(workdir, 0) and "img/s" in _log(workdir, 0)
    assert "img/s" not in _log(workdir, 1)


@pytest.mark.slow
def test_kill_one_process_then_restart_both_resumes(one_process, tmp_path):
    workdir = tmp_path / "killed"
    port = _free_port()
    # A second per batch: time to kill process 1 between checkpoints 2 and NUM_STEPS.
    procs = [_start(workdir, NUM_STEPS, 1.0, port, i) for i in range(2)]
    ckpt = workdir / "checkpoints"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and all(p.poll() is None for p in procs):
        steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= 1:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), "the run ended before a process could be killed"
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    # Process 0 now waits on a collective with a dead peer (or fails): the launcher's job is to
    # stop it and start both again, which is what a job scheduler does.
    try:
        procs[0].wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
    assert not (workdir / "final_metrics.json").exists()
    resumed_from = WorkdirCheckpoints(workdir).all_steps()[-1]
    assert 1 <= resumed_from < NUM_STEPS

    (workdir.parent / "killed_p0.log").rename(workdir.parent / "killed_first_p0.log")
    _run_two(workdir, NUM_STEPS)
    assert f"resumed from step {resumed_from}" in _log(workdir, 0)
    step, params = _params(workdir)
    _, ref_params = _params(one_process)
    assert step == NUM_STEPS
    assert _max_diff(params, ref_params) <= TOL
    metrics = json.loads((workdir / "final_metrics.json").read_text())
    reference = json.loads((one_process / "final_metrics.json").read_text())
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=TOL, atol=TOL)
