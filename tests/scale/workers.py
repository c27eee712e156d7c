"""Subprocess entry points of the scale tests (the device count and the multi-process runtime are
fixed when jax starts, so each configuration runs in its own process).

  python -m tests.scale.workers devices OUT.json
      Needs XLA_FLAGS=--xla_force_host_platform_device_count=8. Runs the same 2 train steps of the
      tiny model (mask slot buckets on) on a 1-device mesh and on the 8-device mesh (global
      batch 8), and the inference step on 1 device and data-parallel on 8; writes losses,
      parameter and detection differences.

  python -m tests.scale.workers tpu_export OUT.json [tiny|r50]
      Needs XLA_FLAGS=--xla_force_host_platform_device_count=8. Exports for the `tpu` platform
      with `jax.export` (lowering only: no TPU needed) the bf16 train step with the batch in the
      training pipeline's form (uint8 pixels + resize taps) sharded over the 8-device mesh, and
      the predictor's transform and model; writes what the exports hold.

  python -m tests.scale.workers train WORKDIR NUM_STEPS SLEEP [PORT NUM_PROCESSES PROCESS_ID]
      `train_lib.train_and_evaluate` of the tiny model on the synthetic stream (global batch
      GLOBAL_BATCH, a checkpoint every step); with PORT, one process of a multi-process run on
      127.0.0.1:PORT over gloo, fed its own slice of each global batch. Process 0 writes
      WORKDIR/final_metrics.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

GLOBAL_BATCH = 2  # multi-process runs: one image per process with 2 processes
DEVICES_BATCH = 8  # the 8-device run: one image per device
NUM_DEVICE_STEPS = 2


def _tiny(global_batch: int, **overrides):
    from tests.training.train_fixtures import tiny_config

    return tiny_config(global_batch_size=global_batch, base_batch_size=global_batch, **overrides)


def devices_main(out_path: str) -> None:
    import jax

    from mrcnn_jax import sharding, train_lib
    from mrcnn_jax.evaluation.inference import data_parallel_predict_fn
    from mrcnn_jax.modeling.losses import TRAIN_BATCH_KEYS
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from tests.training.train_fixtures import fixed_batch

    assert jax.device_count() == 8, jax.devices()
    c = _tiny(DEVICES_BATCH)
    # Small mask slot buckets, so the step's switch over them runs under the sharded batch too.
    c.model.mask_roi_buckets = (2, 4, 8)
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    tx = train_lib.make_optimizer(c, variables["params"])
    state0 = jax.device_get(train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1)))
    batches = [fixed_batch(seed=s, batch=DEVICES_BATCH) for s in range(NUM_DEVICE_STEPS)]

    results = {}
    for name, devices in (("1", jax.devices()[:1]), ("8", jax.devices())):
        mesh = sharding.make_mesh(devices)
        step_fn = train_lib.jit_train_step(train_lib.make_train_step(model, tx), mesh, state0)
        state = sharding.replicate(state0, mesh)
        losses = []
        t0 = time.time()
        for b in batches:
            state, m = step_fn(state, sharding.shard_batch(b, mesh, TRAIN_BATCH_KEYS))
            losses.append({k: float(v) for k, v in jax.device_get(m).items()})
        results[name] = (losses, jax.device_get(state), time.time() - t0)

    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree_util.tree_leaves(results["1"][1]),
                             jax.tree_util.tree_leaves(results["8"][1]))]
    moved = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree_util.tree_leaves(state0.params),
                             jax.tree_util.tree_leaves(results["8"][1].params))]

    # The eval step: the same trained variables, 1 device vs the evaluation's data-parallel predict.
    trained = jax.device_get(results["8"][1].variables)
    images = batches[0]["image"]
    sizes = batches[0]["image_size"]
    on_one = jax.device_put((trained, images, sizes), jax.devices()[0])
    single = jax.device_get(jax.jit(model.apply)(*on_one))
    parallel = jax.device_get(data_parallel_predict_fn(model)(trained, images, sizes))
    det_diff = {k: float(np.max(np.abs(np.asarray(single[k], np.float64)
                                       - np.asarray(parallel[k], np.float64))))
                for k in single}
    with open(out_path, "w") as f:
        json.dump({"losses_1": results["1"][0], "losses_8": results["8"][0],
                   "max_param_diff": max(diffs), "max_param_moved": max(moved),
                   "steps": [int(results[k][1].step) for k in ("1", "8")],
                   "num_valid_detections": int(np.sum(single["valid"])),
                   "detection_diff": det_diff,
                   "seconds": {k: results[k][2] for k in results}}, f)


def tpu_export_main(out_path: str, model: str = "tiny") -> None:
    import re

    import jax

    from mrcnn_jax import sharding, train_lib
    from mrcnn_jax.config_base import base_config
    from mrcnn_jax.data import input_pipeline
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from mrcnn_jax.predictor import Predictor
    from mrcnn_jax.train_lib import step_batch_keys

    assert jax.device_count() == 8, jax.devices()
    if model == "tiny":
        c = _tiny(DEVICES_BATCH)
    else:  # configs/fpn_r50.py at its canvas, one image per device
        c = base_config()
        c.train.global_batch_size = DEVICES_BATCH
    c.model.dtype = "bfloat16"
    c.model.conv_impl = "xla"  # what a TPU runs ("auto" picks the CPU kernels on this machine)
    d = c.data
    b, m, s = DEVICES_BATCH, d.max_instances, d.gt_mask_size
    (hc, wc), (hr, wr) = d.canvas_size, input_pipeline.raw_canvas_size(d)
    batch_shapes = {
        "image": ((b, hr, wr, 3), "uint8"), "image_size": ((b, 2), "int32"),
        "resize_rows": ((b, hc, 2), "int32"), "resize_row_weights": ((b, hc, 2), "float32"),
        "resize_cols": ((b, wc, 2), "int32"), "resize_col_weights": ((b, wc, 2), "float32"),
        "gt_boxes": ((b, m, 4), "float32"), "gt_classes": ((b, m), "int32"),
        "gt_valid": ((b, m), "bool"), "gt_mask_bits": ((b, m, s, -(-s // 8)), "uint8"),
        "gt_mask_boxes": ((b, m, 4), "float32")}  # the training pipeline's form
    net = MaskRCNN(c.model)
    t0 = time.time()
    variables = jax.eval_shape(lambda k: train_lib.init_variables(net, k), jax.random.PRNGKey(0))
    tx = train_lib.make_optimizer(c, variables["params"])
    state = jax.eval_shape(lambda v: train_lib.create_train_state(v, tx, jax.random.PRNGKey(1)),
                           variables)
    mesh = sharding.make_mesh()
    step_fn = train_lib.jit_train_step(
        train_lib.make_train_step(net, tx, train_lib.learning_rate(c.train), d), mesh, state)
    split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    keys = step_batch_keys(c.model, batch_shapes)
    batch = {k: jax.ShapeDtypeStruct(*batch_shapes[k], sharding=split) for k in keys}
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), state)
    step = jax.export.export(step_fn, platforms=["tpu"])(state, batch)
    step_s = time.time() - t0

    def summary(exported):
        text = exported.mlir_module()
        main = re.search(r"func\.func public @main\((.*)\) ->", text).group(1)
        return {"platforms": list(exported.platforms), "nr_devices": exported.nr_devices,
                "custom_calls": sorted(set(re.findall(r'call_target_name = "([^"]+)"', text))),
                "bf16_convolutions": len(re.findall(r"stablehlo.convolution[^\n]*bf16", text)),
                # Shardy's annotations of the arguments: split over `data` / whole.
                "args_split_over_data": main.count('sdy.sharding<@mesh, [{"data"}'),
                "args": main.count("%arg"), "mlir_bytes": len(text)}

    t0 = time.time()
    predictor = Predictor(c, jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype),
                                          variables), batch_size=1, canvas_hw=(hc, wc))
    image = jax.ShapeDtypeStruct((1, hc, wc, 3), "float32")
    sizes = jax.ShapeDtypeStruct((1, 2), "int32")
    infer = jax.export.export(predictor._infer, platforms=["tpu"])(predictor.variables, image,
                                                                   sizes)
    taps = [jax.ShapeDtypeStruct((1, n), t) for n in (hc, wc) for t in ("int32",) * 2
            + ("float32",) * 2]
    raw = jax.ShapeDtypeStruct((1, 128, 128, 3), "uint8")
    transform = jax.export.export(predictor._transform, platforms=["tpu"])(
        raw, tuple(taps[:4]), tuple(taps[4:]))
    with open(out_path, "w") as f:
        json.dump({"train_step": summary(step), "batch_keys": list(keys),
                   "predictor": summary(infer), "transform": summary(transform),
                   "seconds": {"train_step": step_s, "predictor": time.time() - t0}}, f)


def train_main(workdir: str, num_steps: int, sleep: float, port: int | None = None,
               num_processes: int = 1, process_id: int = 0) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    if port is not None:
        from mrcnn_jax import distributed

        distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, mode="on", cpu_collectives="gloo")
        distributed.quiet_non_primary_logging()
    import jax

    from mrcnn_jax import train_lib
    from tests.training.train_fixtures import fixed_batch

    per_host = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * per_host

    def host_iterator(start: int):
        """This process's slice of global batch k = fixed_batch(seed=k), k = start, ..."""
        step = start
        while True:
            time.sleep(sleep)  # widens the window in which the test kills a process
            batch = fixed_batch(seed=step, batch=GLOBAL_BATCH)
            yield {k: v[lo:lo + per_host] for k, v in batch.items()}
            step += 1

    config = _tiny(GLOBAL_BATCH, num_steps=num_steps, checkpoint_every_steps=1)
    out = train_lib.train_and_evaluate(config, workdir, host_iterator, evaluate=False)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(dict(out["train"], process_count=jax.process_count()), f)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "devices":
        devices_main(args[0])
    elif mode == "tpu_export":
        tpu_export_main(*args)
    elif mode == "train":
        rest = [int(a) for a in args[3:]]
        train_main(args[0], int(args[1]), float(args[2]), *rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}: devices | tpu_export | train")
