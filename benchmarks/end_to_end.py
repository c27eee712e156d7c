"""End to end: train.py's own loop against the step alone, and the input pipeline alone.

    python benchmarks/end_to_end.py --config=configs/shapes.py --steps=30
    python benchmarks/end_to_end.py --config=configs/fpn_r50.py --steps=30 \\
        --config.train.global_batch_size=8 --config.model.dtype=bfloat16

Measured on this machine's devices, one config (overrides as train.py takes them):
- e2e: `train_lib.train_and_evaluate`, the loop train.py runs (the tf.data pipeline reading
  COCO-format files from disk, batches prefetched to the devices, the jitted step, logging), for
  --steps steps with no evaluation and no checkpoint until the final save, which comes after the
  timing. Its img/s and input-wait fraction are those of the last log interval, the last third
  of the steps (the first third holds the batches made during the compilation, the second the
  first TensorBoard write).
- step: the same jitted step (the device's image transform included) on the loop's first --steps
  batches, all placed on the devices beforehand and dispatched back to back after a 2-step
  warm-up, timed to the end of the last: the loop without its input.
- pipeline: the config's input pipeline alone (numpy batches, every host core), and the per-core
  rate on COCO-sized examples (benchmarks/input_pipeline.py's coco_like set: 640x480 JPEGs with
  ~7 instances, 1344² canvas; one thread, in a subprocess).
Data: a config with a `data.shapes` section generates its set (under its data.shapes.root); any
other is pointed at the coco_like set written under --root. The model starts from random weights
(`train.init_from` is cleared).

Prints a table, writes benchmarks/results/end_to_end.json (--out) and ends with the line
`end_to_end: e2e_img_s=<x> step_img_s=<y> ratio=<x/y> pipeline_img_s_per_core=<z>`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config).", lock_config=True)
flags.DEFINE_integer("steps", 30, "Steps of the loop and of the step alone (>= 6).")
flags.DEFINE_string("root", "", "Where the coco_like set is written (default: a temp dir).")
flags.DEFINE_integer("coco_like_images", 48, "Images of the coco_like set.")
flags.DEFINE_integer("pipeline_batches", 12, "Timed batches of 4 of the per-core measurement.")
flags.DEFINE_bool("per_core", True, "Measure the per-core COCO-sized pipeline rate.")
flags.DEFINE_string("out", str(ROOT / "benchmarks" / "results" / "end_to_end.json"), "JSON out.")
flags.mark_flags_as_required(["config"])

WARMUP_STEPS = 2  # the step alone: the compiling step and one more, untimed


def _prepare_data(config, root: pathlib.Path) -> str:
    """Generated data for the config: its own shapes set, or the coco_like set."""
    from benchmarks import input_pipeline as pipeline_bench
    from mrcnn_jax.data import coco_instances

    if "shapes" in config.data or "keypoint_shapes" in config.data:
        coco_instances.get_builder(config.data)  # generates the set and its tfds copy if missing
        return config.data.dataset_name
    pipeline_bench.use_coco_like(config.data, root, FLAGS.coco_like_images)
    coco_instances.get_builder(config.data)
    return "coco_like"


def _end_to_end(config) -> dict:
    from mrcnn_jax import train_lib

    c = config.copy_and_resolve_references()
    c.train.num_steps = FLAGS.steps
    every = c.train.log_every_steps = max(1, FLAGS.steps // 3)
    c.train.checkpoint_every_steps = FLAGS.steps + 1  # only the final save, after the timing
    c.train.eval_every_steps = 0
    with tempfile.TemporaryDirectory(prefix="e2e_") as workdir:
        t0 = time.perf_counter()
        out = train_lib.train_and_evaluate(c, workdir, evaluate=False)
        total = time.perf_counter() - t0
    m = out["train"]
    return {"img_per_s": m["img_per_sec"], "input_wait_fraction": m["input_wait_fraction"],
            "step_time_s": m["step_time"], "run_s": total, "loss": m["loss"],
            "timed_steps": FLAGS.steps - (FLAGS.steps - 1) // every * every}


def _step_alone(config) -> dict:
    """The loop's step and its first --steps batches (the same stream), all placed on the devices
    first, then dispatched back to back: the loop without its input."""
    import jax

    from mrcnn_jax import sharding, train_lib
    from mrcnn_jax.data import input_pipeline
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    t = config.train
    model = MaskRCNN(config.model)
    rng = jax.random.PRNGKey(t.seed)
    init_rng, state_rng = jax.random.split(rng)  # as train_and_evaluate starts
    variables = train_lib.init_variables(model, init_rng)
    tx = train_lib.make_optimizer(config, variables["params"])
    state = train_lib.create_train_state(variables, tx, state_rng)
    mesh = sharding.make_mesh()
    step_fn = train_lib.jit_train_step(
        train_lib.make_train_step(model, tx, train_lib.learning_rate(t), config.data), mesh, state)
    state = sharding.replicate(state, mesh)
    it = input_pipeline.make_train_iterator(config)
    host = [next(it) for _ in range(FLAGS.steps)]
    batches = [sharding.shard_batch(b, mesh, train_lib.step_batch_keys(config.model, b))
               for b in host]
    jax.block_until_ready(batches)
    t0 = time.perf_counter()
    for batch in batches[:WARMUP_STEPS]:
        state, m = step_fn(state, batch)
    jax.block_until_ready((state, m))
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches:
        state, m = step_fn(state, batch)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return {"img_per_s": FLAGS.steps * t.global_batch_size / dt, "step_time_s": dt / FLAGS.steps,
            "warmup_s": warmup_s,
            "batch_mbytes": sum(v.nbytes for v in host[0].values()) / 2**20}


def _pipeline_alone(config) -> dict:
    """The config's training stream, numpy batches, every host core."""
    from mrcnn_jax.data import input_pipeline

    it = input_pipeline.make_train_iterator(config)
    for _ in range(WARMUP_STEPS):
        next(it)
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        next(it)
    dt = time.perf_counter() - t0
    return {"img_per_s": FLAGS.steps * config.train.global_batch_size / dt,
            "host_cpus": os.cpu_count()}


def _per_core(root: pathlib.Path) -> dict:
    """benchmarks/input_pipeline.py's coco_like cell with one thread, in a fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), "--_cell=coco_like:1",
           f"--root={root}", f"--images={FLAGS.coco_like_images}",
           f"--batches={FLAGS.pipeline_batches}", "--warmup=2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"the per-core pipeline measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.steps < 6:
        raise app.UsageError("--steps must be >= 6 (the last third of the loop is timed)")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # tfds's and orbax's chatter
    import jax

    config = FLAGS.config
    config.train.init_from = ""
    tmp = None if FLAGS.root else tempfile.TemporaryDirectory(prefix="bench_e2e_")
    root = pathlib.Path(FLAGS.root or tmp.name)
    data = _prepare_data(config, root)

    e2e = _end_to_end(config)
    step = _step_alone(config)
    pipeline = _pipeline_alone(config)
    per_core = _per_core(root) if FLAGS.per_core else None
    if tmp is not None:
        tmp.cleanup()

    ratio = e2e["img_per_s"] / step["img_per_s"]
    z = per_core["images_per_s_per_thread"] if per_core else float("nan")
    device = jax.devices()[0]
    rows = [("e2e (train loop)", e2e["img_per_s"], f"input wait {e2e['input_wait_fraction']:.0%}"),
            ("step alone", step["img_per_s"], f"{step['step_time_s'] * 1e3:.1f} ms/step"),
            (f"pipeline alone ({pipeline['host_cpus']} cpus)", pipeline["img_per_s"], data),
            ("pipeline per core (coco_like)", z, "1 thread")]
    print(f"\n{config_flags.get_config_filename(FLAGS['config'])}: "
          f"{device.platform} {device.device_kind} x{jax.device_count()}, "
          f"batch {config.train.global_batch_size}, {config.model.dtype}, {FLAGS.steps} steps")
    print(f"{'measurement':<34} {'img/s':>9}  note")
    for name, value, note in rows:
        print(f"{name:<34} {value:>9.2f}  {note}")
    result = {"argv": sys.argv[1:], "platform": device.platform,
              "device_kind": device.device_kind, "devices": jax.device_count(),
              "global_batch": config.train.global_batch_size, "dtype": config.model.dtype,
              "steps": FLAGS.steps, "data": data, "e2e": e2e, "step": step,
              "pipeline": pipeline, "pipeline_per_core_coco_like": per_core, "ratio": ratio}
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    print(f"end_to_end: e2e_img_s={e2e['img_per_s']:.2f} step_img_s={step['img_per_s']:.2f} "
          f"ratio={ratio:.3f} pipeline_img_s_per_core={z:.2f}")


if __name__ == "__main__":
    app.run(main)
