"""Train Mask R-CNN: `python train.py --config=configs/fpn_r50.py --workdir=DIR [--config.x=y]`.

Multi-process (several hosts, or one process per GPU): every process runs the same command with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the JAX_COORDINATOR_ADDRESS
/ JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, or `--distributed=on` where jax detects the
cluster, e.g. a TPU pod slice); see `mrcnn_jax/distributed.py` and docs/scaling.md.

Thin entry point: flags -> config -> `mrcnn_jax.train_lib.train_and_evaluate(config, workdir)`,
which resumes from the checkpoints in `workdir`. The config is locked, so a mistyped override
(`--config.train.num_stepz=1`) fails before anything is built, naming the field.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from mrcnn_jax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard scalars and eval results.")
flags.DEFINE_bool("evaluate", True, "Evaluate on data.eval_split after training.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # Before anything touches a device: the multi-process runtime fixes jax.devices().
    distributed.initialize_from_flags()
    from mrcnn_jax import train_lib

    result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir, evaluate=FLAGS.evaluate)
    logging.info("done at step %d; eval %s", result["step"], result["eval"])


if __name__ == "__main__":
    app.run(main)
