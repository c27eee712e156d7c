"""Continuous evaluation (`eval.py --watch`): the order checkpoints are evaluated in, the record
of evaluated steps that lets a restarted watcher resume, the best step, and the TensorBoard
scalars; end to end on the shapes split with an oracle for the model."""

from __future__ import annotations

import json

import pytest

from mrcnn_jax.evaluation import continuous
from mrcnn_jax.evaluation.coco_evaluation import CocoEvaluation
from tests.evaluation.shapes_oracle import oracle


class _FakeTrainer:
    """Checkpoints appearing over time: `timeline[i]` is the saved steps at the i-th poll; keeps
    the last 2 like a CheckpointManager with max_to_keep=2."""

    def __init__(self, timeline):
        self.timeline = timeline
        self.polls = 0
        self.now = 0.0

    def list_steps(self):
        steps = self.timeline[min(self.polls, len(self.timeline) - 1)]
        return steps[-2:]

    def sleep(self, seconds):
        self.polls += 1
        self.now += seconds


def test_watch_evaluates_each_checkpoint_once_and_ends_after_final_step(tmp_path):
    trainer = _FakeTrainer([[], [100], [100], [100, 200], [100, 200, 300]])
    log = continuous.EvalLog(str(tmp_path))
    order = []
    for step in continuous.watch_steps(trainer.list_steps, log.__contains__, final_step=300,
                                       poll_interval_s=10, sleep=trainer.sleep,
                                       clock=lambda: trainer.now):
        order.append(step)
        log.record(step, {"bbox/AP": step / 1000, "segm/AP": 0.5 - abs(step - 200) / 1000})
    assert order == [100, 200, 300]
    assert trainer.polls == 4  # waited at the polls with nothing new
    # Restarted: everything is done, so it ends without evaluating again.
    restarted = continuous.EvalLog(str(tmp_path))
    assert sorted(restarted.steps) == [100, 200, 300]
    assert list(continuous.watch_steps(trainer.list_steps, restarted.__contains__, 300,
                                       sleep=trainer.sleep, clock=lambda: trainer.now)) == []
    # The best step by segm/AP (0.5 at step 200), written beside the log.
    assert restarted.best() == (200, "segm/AP", 0.5)
    best = json.loads((tmp_path / continuous.BEST_FILENAME).read_text())
    assert best["step"] == 200 and best["metrics"]["bbox/AP"] == 0.2


def test_watch_skips_a_failed_step_and_times_out_without_final_step():
    trainer = _FakeTrainer([[100], [100, 200]])
    done = set()
    got = []
    for step in continuous.watch_steps(trainer.list_steps, done.__contains__, final_step=1000,
                                       poll_interval_s=60, timeout_s=300, sleep=trainer.sleep,
                                       clock=lambda: trainer.now):
        got.append(step)
        if step != 100:  # step 100 "fails" (e.g. deleted): not marked done, not retried
            done.add(step)
    assert got == [100, 200]
    assert trainer.now > 300 and trainer.polls == 7  # 1 poll to see 200, then the timeout


def test_write_scalars_to_tensorboard_events(tmp_path):
    tf = pytest.importorskip("tensorflow")
    continuous.write_scalars(str(tmp_path), 7, {"bbox/AP": 0.25, "segm/AP": 0.5})
    continuous.write_scalars(str(tmp_path), 9, {"bbox/AP": 0.75})
    (path,) = tmp_path.glob("events.out.tfevents.*")  # one event file for the run, not per call
    values = {}
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        for v in event.summary.value:
            assert v.metadata.plugin_data.plugin_name == "scalars"
            values[(event.step, v.tag)] = float(tf.make_ndarray(v.tensor))
    assert values == {(7, "bbox/AP"): 0.25, (7, "segm/AP"): 0.5, (9, "bbox/AP"): 0.75}



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
    evaluation = CocoEvaluation(config, builder=builder,
                                predict_fn=oracle(config, builder))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        continuous.evaluate_workdir(config, tmp_path, checkpoints=_FakeCheckpoints([]),
                                    evaluation=evaluation)
    # Without --watch: the latest checkpoint only.
    reports = []
    done = continuous.evaluate_workdir(config, tmp_path, checkpoints=_FakeCheckpoints([0, 10]),
                                       evaluation=evaluation, report=reports.append)
    assert list(done) == [10] and reports[0].startswith("step 10\n")
    assert done[10]["bbox/AP"] < 1.0  # one instance per image left out
    # --watch: the steps not evaluated yet (0 and the final 20), then it ends.
    done = continuous.evaluate_workdir(config, tmp_path, watch=True,
                                       checkpoints=_FakeCheckpoints([0, 10, 20]),
                                       evaluation=evaluation)
    assert list(done) == [0, 20]
    assert done[0]["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    eval_dir = tmp_path / "eval" / config.data.eval_split
    log = continuous.EvalLog(str(eval_dir))
    assert sorted(log.steps) == [0, 10, 20]
    assert log.steps[20]["bbox/AR100"] < log.steps[10]["bbox/AR100"] < 1.0  # 2 vs 1 left out
    assert log.best()[:2] == (0, "segm/AP")
    for step in (0, 10, 20):
        assert (eval_dir / f"step_{step}" / "metrics.json").is_file()
    # Restarted watcher: nothing left to evaluate.
    assert continuous.evaluate_workdir(config, tmp_path, watch=True,
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
