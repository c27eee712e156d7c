"""Multi-level RoIAlign benchmark: level-gather vs pool-every-level-then-select vs torchvision.

Mask R-CNN's box pooler on a 800x1216 image: P2..P5 (strides 4..32) with 256 channels, 2 images x
512 RoIs, 7x7 bins, sampling_ratio 2, aligned False. Forward and forward+backward (gradient of the
sum with respect to the features) are timed side by side in one run, interleaved round by round
so that load from other processes hits every contender alike; the table shows medians after
warm-up and ratios to the level-gather time. The level-gather and the pool-every-level outputs
are asserted equal (same per-RoI code; up to float32 rounding of the two compiled programs), and
torchvision's too.

Run alone: `python benchmarks/ops_roi_align.py [--rounds N] [--threads 2]`; writes
benchmarks/results/ops_roi_align.json. `benchmarks/ops.py` imports `run()`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

IMAGE_HW = (800, 1216)
STRIDES = (4, 8, 16, 32)
CHANNELS = 256
BATCH = 2
NUM_ROIS = 512
OUTPUT_SIZE = 7
SAMPLING_RATIO = 2
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "ops_roi_align.json"


def make_inputs(seed: int = 0):
    """NHWC features per level and [B, R, 4] boxes spread over all levels (log-uniform sizes)."""
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((BATCH, IMAGE_HW[0] // s, IMAGE_HW[1] // s, CHANNELS),
                                 dtype=np.float32) for s in STRIDES]
    centre = rng.uniform([0, 0], [IMAGE_HW[1], IMAGE_HW[0]], (BATCH, NUM_ROIS, 2))
    size = np.exp(rng.uniform(np.log(16), np.log(600), (BATCH, NUM_ROIS, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
    boxes = np.clip(boxes, 0, [IMAGE_HW[1], IMAGE_HW[0]] * 2).astype(np.float32)
    return feats, boxes


def _every_level_then_select(features, boxes):
    """The design we avoid: pool every RoI on every level, then keep its own level's result.

    Uses the same flat buffer and per-RoI code as the level-gather, with the level forced, so
    the two outputs are bitwise identical and only the amount of work differs.
    """
    import jax.numpy as jnp

    from mrcnn_jax.ops import roi_align as ra

    batch, num_rois = boxes.shape[:2]
    flat_boxes = boxes.reshape(-1, 4)
    batch_index = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_rois)
    level = ra.assign_fpn_levels(flat_boxes) - 2
    buffer = ra.flatten_levels(features)
    scales = jnp.asarray([1.0 / s for s in STRIDES], jnp.float32)
    bound = (SAMPLING_RATIO, SAMPLING_RATIO)
    pooled = jnp.stack([
        ra._pool_rois(buffer, flat_boxes, jnp.full_like(level, lvl), batch_index, scales,
                      (OUTPUT_SIZE, OUTPUT_SIZE), "align", SAMPLING_RATIO, False, bound, bound)
        for lvl in range(len(features))])  # [L, B*R, O, O, C]
    picked = jnp.take_along_axis(pooled, level[None, :, None, None, None], axis=0)[0]
    return picked.reshape(batch, num_rois, *picked.shape[1:])


def _level_gather(features, boxes):
    from mrcnn_jax.ops import roi_align as ra

    return ra.multilevel_roi_align(features, boxes, OUTPUT_SIZE, SAMPLING_RATIO,
                                   image_size_hw=IMAGE_HW)


def _contenders(feats_np, boxes_np):
    """name -> (fwd thunk, fwd+bwd thunk, fwd output as NHWC numpy)."""
    import jax
    import jax.numpy as jnp

    feats = [jnp.asarray(f) for f in feats_np]
    boxes = jnp.asarray(boxes_np)
    out = {}
    for name, fn in (("level-gather (ours)", _level_gather),
                     ("pool every level, select", _every_level_then_select)):
        fwd = jax.jit(fn)
        grad = jax.jit(jax.grad(lambda f, b, fn=fn: fn(f, b).sum()))
        out[name] = (lambda fwd=fwd: jax.block_until_ready(fwd(feats, boxes)),
                     lambda grad=grad: jax.block_until_ready(grad(feats, boxes)),
                     lambda fwd=fwd: np.asarray(fwd(feats, boxes)))
    try:
        import torch
        import torchvision
    except ImportError:
        return out
    pooler = torchvision.ops.MultiScaleRoIAlign(
        [str(i) for i in range(len(STRIDES))], OUTPUT_SIZE, SAMPLING_RATIO)
    t_feats = {str(i): torch.from_numpy(f.transpose(0, 3, 1, 2).copy())
               for i, f in enumerate(feats_np)}
    t_boxes = [torch.from_numpy(b) for b in boxes_np]
    shapes = [IMAGE_HW] * BATCH

    def t_fwd():
        with torch.no_grad():
            return pooler(t_feats, t_boxes, shapes)

    def t_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in t_feats.items()}
        pooler(leaves, t_boxes, shapes).sum().backward()
        return [v.grad for v in leaves.values()]

    def t_out():
        o = t_fwd().numpy().transpose(0, 2, 3, 1)
        return o.reshape(BATCH, NUM_ROIS, *o.shape[1:])

    out["torchvision MultiScaleRoIAlign"] = (t_fwd, t_grad, t_out)
    return out


def run(rounds: int = 5, threads: int = 2) -> list[dict]:
    """Times every contender; returns rows {name, ms, ratio, notes} (ratio vs level-gather)."""
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass
    feats, boxes = make_inputs()
    contenders = _contenders(feats, boxes)
    ours = "level-gather (ours)"
    reference = contenders[ours][2]()
    select = contenders["pool every level, select"][2]()
    # Same per-RoI code and buffer; XLA fuses the two programs differently (FMA contraction,
    # summation order), so the outputs agree to float32 rounding rather than bitwise.
    select_err = float(np.abs(select - reference).max())
    assert select_err <= 1e-6, select_err
    notes = {ours: "one flat buffer, per-RoI level offsets",
             "pool every level, select": f"same output (max |diff| {select_err:.1e}, asserted)"}
    if "torchvision MultiScaleRoIAlign" in contenders:
        tv = contenders["torchvision MultiScaleRoIAlign"][2]()
        err = float(np.abs(tv - reference).max())
        assert err < 1e-4, err
        notes["torchvision MultiScaleRoIAlign"] = f"max |diff| {err:.1e}, {threads} threads"

    times = {(n, k): [] for n in contenders for k in ("fwd", "fwd+bwd")}
    for n, (fwd, grad, _) in contenders.items():  # warm-up (compiles)
        fwd()
        grad()
    for _ in range(rounds):
        for n, (fwd, grad, _) in contenders.items():
            for k, thunk in (("fwd", fwd), ("fwd+bwd", grad)):
                t0 = time.perf_counter()
                thunk()
                times[(n, k)].append(time.perf_counter() - t0)
    rows = []
    for k in ("fwd", "fwd+bwd"):
        base = float(np.median(times[(ours, k)]))
        for n in contenders:
            ms = float(np.median(times[(n, k)]))
            rows.append({"name": f"multilevel RoIAlign {k}: {n}", "ms": 1e3 * ms,
                         "ratio": ms / base, "notes": notes.get(n, "")})
    return rows


def print_table(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"{'benchmark':<{width}}  {'ms':>9}  {'x ours':>7}  notes")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['ms']:9.1f}  {r['ratio']:7.2f}  {r['notes']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rows = run(args.rounds, args.threads)
    print_table(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"image_hw": IMAGE_HW, "strides": STRIDES, "channels": CHANNELS, "batch": BATCH,
            "num_rois": NUM_ROIS, "output_size": OUTPUT_SIZE,
            "sampling_ratio": SAMPLING_RATIO, "rounds": args.rounds, "threads": args.threads,
            "cpu_count": os.cpu_count()}
    RESULTS.write_text(json.dumps({"config": meta, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    main()
