"""Continuous evaluation of a training run (`eval.py --workdir`, `--watch`): which checkpoints to
evaluate, and a record of those done, so a restarted evaluator resumes and never evaluates a step
twice.

Every evaluation of a workdir's step (by eval.py, by `--watch`, or by the training loop's periodic
evaluation) goes through `evaluate_step` and is recorded the same way:

    <workdir>/eval/<split>/step_<step>/       metrics.json, results, vis/ (`coco_evaluation`)
    <workdir>/eval/<split>/events.out.tfevents.*   TensorBoard scalars eval/<type>/<metric>
    <workdir>/eval/<split>/evaluated_steps.json    `EvalLog`: the metrics of every evaluated step
    <workdir>/eval/<split>/best_metrics.json       the best step and its metrics
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from mrcnn_jax import paths
from mrcnn_jax.data.label_map import LABEL_MAP_FILE, LabelMap
from mrcnn_jax.evaluation.coco_evaluation import CocoEvaluation, run_and_report
from mrcnn_jax.evaluation.coco_evaluator import PER_CATEGORY_PREFIX, UNDEFINED

logger = logging.getLogger(__name__)

EVAL_LOG_FILENAME = "evaluated_steps.json"
BEST_FILENAME = "best_metrics.json"


class EvalLog:
    """The metrics of every evaluated step, kept in `<eval_dir>/evaluated_steps.json`.

    Also keeps `<eval_dir>/best_metrics.json`: the step with the highest `best_metric` (the first
    of `best_metrics` present in the step's metrics, e.g. segm/AP, then bbox/AP) and its metrics.
    Files are replaced atomically, so a killed evaluator leaves the last complete record.
    """

    def __init__(self, eval_dir: str, best_metrics: tuple[str, ...] = ("segm/AP", "bbox/AP")):
        self.eval_dir = eval_dir
        self.best_metrics = best_metrics
        self.path = os.path.join(eval_dir, EVAL_LOG_FILENAME)
        self.steps: dict[int, dict[str, float]] = {}
        if paths.resolve(self.path).exists():
            self.steps = {int(k): v for k, v in paths.read_json(self.path).items()}

    def __contains__(self, step: int) -> bool:
        return int(step) in self.steps

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """Stores the metrics of `step` and updates the best step."""
        paths.makedirs(self.eval_dir)
        self.steps[int(step)] = {k: float(v) for k, v in metrics.items()}
        paths.write_json_atomic(self.path, {str(k): v for k, v in sorted(self.steps.items())})
        best = self.best()
        if best is not None:
            record = {"step": best[0], "metric": best[1], "metrics": self.steps[best[0]]}
            paths.write_json_atomic(os.path.join(self.eval_dir, BEST_FILENAME), record)

    def best(self) -> tuple[int, str, float] | None:
        """(step, metric name, value) of the best evaluated step, or None."""
        for name in self.best_metrics:
            scored = [(m[name], s) for s, m in self.steps.items() if name in m]
            if scored:
                value, step = max(scored, key=lambda t: (t[0], -t[1]))  # ties: earliest step
                return step, name, value
        return None


def watch_steps(
    list_steps: Callable[[], Iterable[int]],
    done: Callable[[int], bool],
    final_step: int,
    poll_interval_s: float = 60.0,
    timeout_s: float = 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[int]:
    """Yields each checkpoint step not yet `done`, oldest first, as checkpoints appear.

    Ends once every saved step has been offered (or was done before) and one of them is
    >= `final_step`, or when no new checkpoint has appeared for `timeout_s` (the trainer died or
    was stopped: a warning says so). A step is offered once even if the caller fails on it (a
    checkpoint deleted by the trainer's keep-last-N before it was read).

    Args:
      list_steps: the steps currently saved (e.g. `WorkdirCheckpoints.all_steps`).
      done: whether a step was already evaluated (e.g. `step in EvalLog`).
      final_step: the training run's last step (config.train.num_steps).
    """
    last_new = clock()
    yielded: set[int] = set()  # a step the caller could not evaluate is not offered again
    while True:
        steps = sorted(int(s) for s in list_steps())
        pending = [s for s in steps if not done(s) and s not in yielded]
        if pending:
            for step in pending:
                yielded.add(step)
                yield step
            last_new = clock()
            continue
        if steps and steps[-1] >= final_step:
            return  # every step up to the final one has been handled
        if clock() - last_new > timeout_s:
            logger.warning("no new checkpoint for %.0f s and step %d not reached: stopping",
                           timeout_s, final_step)
            return
        sleep(poll_interval_s)


_SCALAR_WRITERS: dict[str, Any] = {}  # one open event file per logdir for the process


def write_scalars(logdir: str, step: int, scalars: Mapping[str, float]) -> None:
    """Appends `scalars` at `step` to the TensorBoard event file of `logdir`.

    The writer of a logdir is opened once per process and kept, so a run writes one event file
    (not one per call); each call flushes, so a killed run loses nothing already written. Uses
    TF's summary writer with the scalars plugin's metadata, which needs only TensorFlow
    (`tf.summary.scalar` requires the tensorboard package, not a dependency here).
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    key = os.fspath(paths.resolve(logdir))
    writer = _SCALAR_WRITERS.get(key)
    if writer is None:
        writer = _SCALAR_WRITERS[key] = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for name, value in scalars.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step),
                             metadata=metadata)
    writer.flush()


def metrics_for_tensorboard(metrics: Mapping[str, float]) -> dict[str, float]:
    """The summary numbers (not per category), under "eval/", undefined (-1) ones left out."""
    return {f"eval/{k}": v for k, v in metrics.items()
            if PER_CATEGORY_PREFIX not in k and v != UNDEFINED}


def evaluate_step(
    evaluation: CocoEvaluation,
    variables: Any,
    workdir: str | os.PathLike,
    step: int,
    num_vis: int = 0,
    output_dir: str | None = None,
    eval_log: EvalLog | None = None,
) -> dict[str, float]:
    """Evaluates the variables of training step `step` the way every evaluation of a workdir is
    recorded (module docstring): files in `<workdir>/eval/<split>/step_<step>/` (or
    `<output_dir>/step_<step>`), TensorBoard scalars in `<workdir>/eval/<split>`, and the step's
    metrics in the `EvalLog` there, so `eval.py --watch` never evaluates that step again.

    Returns the metrics (empty on hosts other than 0, which write nothing).
    """
    import jax

    eval_dir = os.path.join(os.fspath(workdir), "eval", evaluation.split)
    eval_log = eval_log or EvalLog(eval_dir)
    metrics = run_and_report(evaluation, variables,
                             os.path.join(output_dir or eval_dir, f"step_{int(step)}"),
                             num_vis=num_vis)
    if jax.process_index() != 0:
        return metrics
    write_scalars(eval_dir, int(step), metrics_for_tensorboard(metrics))
    eval_log.record(int(step), metrics)
    return metrics


def evaluate_workdir(
    config: Any,
    workdir: str | os.PathLike,
    split: str | None = None,
    watch: bool = False,
    num_vis: int = 0,
    output_dir: str | None = None,
    poll_interval_s: float = 60.0,
    timeout_s: float = 3600.0,
    report: Callable[[str], None] | None = None,
    checkpoints: Any = None,
    evaluation: CocoEvaluation | None = None,
) -> dict[int, dict[str, float]]:
    """Evaluates the latest checkpoint of `workdir`, or (watch) every checkpoint as it appears.

    Results are recorded by `evaluate_step`: a restarted watcher resumes after the last evaluated
    step, and a step is never evaluated twice. `report` receives the printed summary of each step.
    `checkpoints` defaults to `checkpoints.workdir.WorkdirCheckpoints(workdir)`.

    Returns {step: metrics} of the steps evaluated by this call.
    Raises FileNotFoundError when, without `watch`, the workdir has no checkpoint.
    """
    from mrcnn_jax.checkpoints.workdir import WorkdirCheckpoints

    workdir = os.fspath(workdir)
    checkpoints = checkpoints or WorkdirCheckpoints(workdir)
    split = split or config.data.eval_split
    log = EvalLog(os.path.join(workdir, "eval", split))
    if watch:
        steps: Iterable[int] = watch_steps(
            checkpoints.all_steps, log.__contains__, int(config.train.num_steps),
            poll_interval_s=poll_interval_s, timeout_s=timeout_s)
    else:
        saved = checkpoints.all_steps()
        if not saved:
            raise FileNotFoundError(f"no checkpoint in {workdir} (looked in "
                                    f"{getattr(checkpoints, 'directory', workdir)}): train first, "
                                    "or pass --watch to wait for one")
        steps = [saved[-1]]
    if evaluation is None:
        # The run's own label map when it wrote one (train_lib does).
        saved = paths.resolve(workdir) / LABEL_MAP_FILE
        label_map = LabelMap.load(saved) if saved.is_file() else None
        evaluation = CocoEvaluation(config, split, label_map=label_map)
    done: dict[int, dict[str, float]] = {}
    for step in steps:
        try:
            variables = checkpoints.restore_variables(step)
        except FileNotFoundError as e:  # removed by the trainer's keep-last-N meanwhile
            logger.warning("checkpoint of step %d disappeared before it was read (%s): skipped",
                           step, e)
            continue
        logger.info("evaluating step %d of %s", step, workdir)
        metrics = evaluate_step(evaluation, variables, workdir, step, num_vis=num_vis,
                                output_dir=output_dir, eval_log=log)
        done[step] = metrics
        if report is not None and metrics:
            from mrcnn_jax.evaluation import summary

            report(f"step {step}\n{summary.format_report(metrics)}")
    return done
