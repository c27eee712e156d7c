"""The CPU shapes demo (`make demo`): data, training, COCO evaluation and pictures in one command.

    python -m mrcnn_jax.demo --workdir=DIR [--config=configs/shapes.py] [--config.train.x=y]

1. generates the synthetic shapes data set and its tfds copy when missing (`data.shapes`),
2. trains with `train_lib.train_and_evaluate` (resuming from the checkpoints in DIR),
3. evaluates the last checkpoint on the val split with pycocotools (bbox and segm) with
   `evaluation.continuous.evaluate_workdir`, which also writes `config.eval.num_vis` overlay
   pictures (predictions beside the ground truth) to `DIR/eval/<split>/step_<N>/vis/`,
4. prints the COCO summaries and ends with the line

    demo: bbox_AP=<x> segm_AP=<y> seconds=<t>

with COCO AP@[.5:.95] as fractions and t the wall seconds of the whole demo (data generation
included). Thin on purpose: every loop lives in the library.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

# The config the demo trains when --config is not given (absolute, so any cwd works).
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "shapes.py"


def format_result_line(bbox_ap: float, segm_ap: float, seconds: float) -> str:
    """The demo's last line: `demo: bbox_AP=<x> segm_AP=<y> seconds=<t>`."""
    return f"demo: bbox_AP={bbox_ap:.4f} segm_AP={segm_ap:.4f} seconds={seconds:.0f}"


def run_demo(config: Any, workdir: str, report: Callable[[str], None] = print,
             start_time: float | None = None) -> dict[str, Any]:
    """Data (if missing) -> training -> evaluation with pictures; see the module doc.

    Args:
        config: the full config (configs/shapes.py or any with a `data.shapes` section).
        workdir: checkpoints, TensorBoard scalars, eval files and pictures.
        report: receives the printed text (the summaries and the final `demo:` line).
        start_time: `time.time()` when the demo started (default: now).

    Returns:
        {"step", "metrics" (the evaluator's dict), "bbox_AP", "segm_AP", "seconds", "line"}.
    """
    from mrcnn_jax import train_lib
    from mrcnn_jax.data import coco_instances
    from mrcnn_jax.evaluation import continuous

    start_time = time.time() if start_time is None else start_time
    t0 = time.time()
    coco_instances.get_builder(config.data)  # generates the shapes set and its tfds copy
    data_s = time.time() - t0

    t0 = time.time()
    trained = train_lib.train_and_evaluate(config, workdir, evaluate=False)
    train_s = time.time() - t0

    t0 = time.time()
    evaluated = continuous.evaluate_workdir(config, workdir, num_vis=int(config.eval.num_vis),
                                            report=report)
    eval_s = time.time() - t0
    step, metrics = max(evaluated.items())
    bbox_ap = float(metrics.get("bbox/AP", 0.0))
    segm_ap = float(metrics.get("segm/AP", 0.0))
    seconds = time.time() - start_time
    # Process CPU seconds (all threads) beside the wall times: on a shared machine they tell what
    # the demo would take alone (about cpu / number of cores while they are all busy).
    report(f"step {step}: data {data_s:.0f}s, training {train_s:.0f}s, evaluation {eval_s:.0f}s "
           f"(wall); process CPU {time.process_time():.0f}s; results and pictures in "
           f"{workdir}/eval")
    line = format_result_line(bbox_ap, segm_ap, seconds)
    report(line)
    return {"step": step, "train": trained["train"], "metrics": metrics, "bbox_AP": bbox_ap,
            "segm_AP": segm_ap, "seconds": seconds, "line": line}


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    flags_ = flags.FLAGS
    run_demo(flags_.config, flags_.workdir, report=lambda text: print(text, flush=True),
             start_time=_START)


_START = time.time()

if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (get_config).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "workdir_demo", "Checkpoints, eval results and pictures.")
    app.run(main)
