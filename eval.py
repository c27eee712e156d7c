r"""Evaluate Mask R-CNN on a COCO-format split with pycocotools.

  # Given weights: a torchvision Mask R-CNN state_dict (.pth/.safetensors/.npz), an orbax
  # variables directory (`mrcnn_jax.checkpoints.orbax_io`), or a training workdir (its latest
  # checkpoint; its model and label map), its checkpoints/ folder or one step of it.
  python eval.py --config=configs/fpn_r50.py --weights=maskrcnn_resnet50_fpn_coco.pth \
      --config.data.manual_dir=/data/coco
  # torchvision's v2 weights (maskrcnn_resnet50_fpn_v2) with its architecture:
  python eval.py --config=configs/fpn_r50_v2.py \
      --weights=maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth --config.data.manual_dir=/data/coco
  # The latest checkpoint of a training run, or (--watch) each checkpoint as training writes it.
  python eval.py --config=configs/shapes.py --workdir=workdir_demo [--watch]

Flags: --split (default config.data.eval_split), --vis=N (N overlay pictures, predictions beside
ground truth), --output_dir. Prints the 12-number summary per iou type and the per-category AP,
and writes to the output directory (default <workdir>/eval/<split>/step_<step>, or
eval_<weights name>/<split>): coco_results.json, metrics.json, pr_curve_<type>.png, vis/*.png.
With --workdir the metrics also go to TensorBoard (<workdir>/eval/<split>) and to
<workdir>/eval/<split>/evaluated_steps.json (with best_metrics.json beside it), which --watch uses
to resume without evaluating a step twice.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mrcnn_jax import distributed, predictor
from mrcnn_jax.evaluation import coco_evaluation, continuous, summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir whose checkpoints to evaluate.")
_WEIGHTS = flags.DEFINE_string("weights", None,
                               "Model weights: torchvision .pth/.safetensors/.npz, an orbax "
                               "variables directory, or a training workdir / its checkpoints/ "
                               "folder / one step of it.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default config.data.eval_split).")
_VIS = flags.DEFINE_integer("vis", None, "Overlay pictures to write (default config.eval.num_vis).")
_WATCH = flags.DEFINE_bool("watch", False, "With --workdir: evaluate every new checkpoint until "
                           "the final step (config.train.num_steps).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write results (see above).")
_POLL_S = flags.DEFINE_float("poll_interval_s", 60.0, "--watch: seconds between looks.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 3600.0,
                                "--watch: stop after this long without a new checkpoint.")
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ...


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/shapes.py")
    if bool(_WORKDIR.value) == bool(_WEIGHTS.value):
        raise app.UsageError("give exactly one of --workdir (training checkpoints) or --weights")
    if _WATCH.value and not _WORKDIR.value:
        raise app.UsageError("--watch needs --workdir")
    # Multi-host evaluation: every process predicts its part of the split, process 0 scores.
    distributed.initialize_from_flags()
    split = _SPLIT.value or config.data.eval_split
    num_vis = config.eval.num_vis if _VIS.value is None else _VIS.value

    if _WEIGHTS.value:
        try:
            # Applies what the weights need to config.model (a training run's model and number
            # of classes, torchvision's frozen_bn_eps); a run's label map comes with them.
            variables, label_map = predictor.load_weights_and_label_map(_WEIGHTS.value,
                                                                        config.model)
            evaluation = coco_evaluation.CocoEvaluation(config, split, label_map=label_map)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"eval.py: {e}")
        output_dir = _OUTPUT_DIR.value or os.path.join(
            f"eval_{pathlib.Path(_WEIGHTS.value).resolve().name}", split)
        metrics = coco_evaluation.run_and_report(evaluation, variables, output_dir,
                                                 num_vis=num_vis)
        if metrics:
            print(summary.format_report(metrics))
        return

    try:
        continuous.evaluate_workdir(config, _WORKDIR.value, split, watch=_WATCH.value,
                                    num_vis=num_vis, output_dir=_OUTPUT_DIR.value,
                                    poll_interval_s=_POLL_S.value, timeout_s=_TIMEOUT_S.value,
                                    report=print)
    except (FileNotFoundError, ValueError) as e:  # no checkpoint, no data, a bad label map
        sys.exit(f"eval.py: {e}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
