"""Ops benchmark: NMS forms vs torchvision, plus RoIAlign rows from benchmarks/ops_roi_align.py.

Run:  .venv/bin/python benchmarks/ops.py [--repeats 20] [--skip-roi-align]

NMS: 4,000 RPN-like clustered boxes (jittered copies of objects, distinct random scores) ->
at most 1,000 kept at IoU 0.7, as the RPN does per image. Timed: the default `nms`
(method="auto"), the tiled form, the one-box-per-iteration `lax` loop, and torchvision's C++
`nms` on the same boxes. Each jitted function is compiled first (compile time reported
separately), then called `--repeats` times after a warm-up; the table shows the median and the
ratio to torchvision's median. Results must equal torchvision's kept indices exactly (asserted).

Rows are dicts with keys: op, case, impl, median_ms, and optionally compile_s, ratio,
ratio_to, note; rows of benchmarks/ops_roi_align.py's `run() -> list[dict]` ({name, ms, ratio,
notes}, ratio vs its level-gather) are mapped onto that schema.
Everything is printed as one table and written to benchmarks/results/ops.json.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mrcnn_jax.ops import nms as nms_ops  # noqa: E402

NUM_BOXES = 4000
MAX_OUTPUT = 1000
IOU_THRESHOLD = 0.7
# (name, clusters, jitter as a fraction of object size). "rpn_like" keeps > 1,000 boxes, as
# RPN proposals at 0.7 do; "dense" keeps fewer than 1,000, so every box must be visited.
CASES = (("rpn_like", 400, 0.3), ("dense", 60, 0.08))


def rpn_like_boxes(seed: int, num_boxes: int, clusters: int, jitter: float):
    """[num_boxes, 4] float32 boxes around `clusters` objects on a ~1000 px image, scores [N]."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1000, (clusters, 2))
    sizes = rng.uniform(16, 400, (clusters, 2))
    c = rng.integers(0, clusters, num_boxes)
    ctr = centres[c] + rng.normal(0, 1, (num_boxes, 2)) * sizes[c] * jitter
    wh = sizes[c] * np.exp(rng.normal(0, 0.15, (num_boxes, 2)))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
    scores = rng.permutation(num_boxes).astype(np.float32) / num_boxes
    return boxes, scores


def time_calls(fns: dict, repeats: int) -> dict:
    """Median wall time in ms of each fn() after one warm-up call each.

    The functions are called in interleaved rounds, so load from other processes on a shared
    machine affects all of them alike and the ratios stay meaningful.
    """
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def nms_rows(repeats: int, tile_sizes: tuple[int, ...] = ()) -> list[dict]:
    """NMS rows; `tile_sizes` adds the tiled form at each of these tile sizes."""
    try:
        import torch
        import torchvision
    except ImportError:
        torch = torchvision = None
    if torch is not None:
        torch.set_num_threads(1)  # torchvision's NMS kernel is single-threaded anyway
    default = nms_ops._resolve_method("auto")
    default_tile = nms_ops.default_tile_size()
    rows = []
    for case, clusters, jitter in CASES:
        boxes, scores = rpn_like_boxes(0, NUM_BOXES, clusters, jitter)
        bj, sj = jnp.asarray(boxes), jnp.asarray(scores)
        impls = (
            (f"nms default (auto -> {default})", "auto"),
            (f"nms tiled (T={default_tile})", "tiled"),
            ("nms per-box lax loop", "loop"),
        ) + tuple((f"nms tiled (T={t})", ("tiled", t)) for t in tile_sizes
                  if t != default_tile)
        ref = None
        calls, rows_by_name = {}, {}
        if torchvision is not None:
            tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
            ref = torchvision.ops.nms(tb, ts, IOU_THRESHOLD).numpy()
        for name, method in impls:
            method, tile = method if isinstance(method, tuple) else (method, default_tile)
            fn = jax.jit(
                lambda b, s, m=method, t=tile: nms_ops.nms(b, s, IOU_THRESHOLD, MAX_OUTPUT,
                                                           method=m, tile_size=t)
            )
            t0 = time.perf_counter()
            compiled = fn.lower(bj, sj).compile()
            compile_s = time.perf_counter() - t0
            keep, valid = compiled(bj, sj)
            got = np.asarray(keep)[np.asarray(valid)]
            if ref is not None:
                assert np.array_equal(got, ref[:MAX_OUTPUT]), f"{name} differs from torchvision"
            calls[name] = lambda c=compiled: c(bj, sj)[0].block_until_ready()
            rows_by_name[name] = {"op": "nms", "case": case, "impl": name,
                                  "compile_s": compile_s, "note": f"kept {len(got)}"}
        if ref is not None:
            name = "torchvision.ops.nms (C++)"
            calls[name] = lambda: torchvision.ops.nms(tb, ts, IOU_THRESHOLD)
            rows_by_name[name] = {"op": "nms", "case": case, "impl": name,
                                  "note": f"kept {min(len(ref), MAX_OUTPUT)} of {len(ref)}"}
        if ref is not None and jax.default_backend() == "gpu" and torch.cuda.is_available():
            # On a GPU machine torchvision's CUDA kernel too (the ratios stay against its C++).
            tbc, tsc = tb.cuda(), ts.cuda()
            got = torchvision.ops.nms(tbc, tsc, IOU_THRESHOLD).cpu().numpy()
            assert np.array_equal(got, ref), "torchvision's CUDA NMS differs from its C++"
            name = "torchvision.ops.nms (CUDA)"
            calls[name] = lambda: (torchvision.ops.nms(tbc, tsc, IOU_THRESHOLD),
                                   torch.cuda.synchronize())
            rows_by_name[name] = {"op": "nms", "case": case, "impl": name,
                                  "note": f"kept {min(len(got), MAX_OUTPUT)} of {len(got)}"}
        for name, ms in time_calls(calls, repeats).items():
            rows_by_name[name]["median_ms"] = ms
        if ref is not None:
            tv_ms = rows_by_name["torchvision.ops.nms (C++)"]["median_ms"]
            for r in rows_by_name.values():
                r["ratio"] = r["median_ms"] / tv_ms
                r["ratio_to"] = "torchvision"
        rows += list(rows_by_name.values())
    return rows


def roi_align_rows(repeats: int) -> list[dict]:
    """Rows from benchmarks/ops_roi_align.py when it exists (another engineer's part)."""
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module("ops_roi_align")
    except ModuleNotFoundError as e:
        if e.name != "ops_roi_align":
            raise
        print("benchmarks/ops_roi_align.py not found: RoIAlign rows skipped")
        return []
    params = inspect.signature(module.run).parameters
    rows = module.run(repeats=repeats) if "repeats" in params else module.run()
    return [_normalise_row(r) for r in rows]


def _normalise_row(row: dict) -> dict:
    """Maps the {name, ms, ratio, notes} rows of ops_roi_align.run() onto this table's schema."""
    if "impl" in row:
        return row
    out = {"op": "roi_align", "case": "", "impl": row.get("name", ""),
           "median_ms": row.get("ms"), "note": row.get("notes", "")}
    if row.get("ratio") is not None:
        out["ratio"] = row["ratio"]
        out["ratio_to"] = row.get("ratio_to", "level-gather")
    out.update({k: v for k, v in row.items() if k not in ("name", "ms", "notes", "ratio")})
    return out


def format_table(rows: list[dict]) -> str:
    head = ("op", "case", "impl", "median ms", "compile s", "ratio", "note")
    body = []
    for r in rows:
        ratio = r.get("ratio")
        extra = {k: v for k, v in r.items()
                 if k not in ("op", "case", "impl", "median_ms", "compile_s", "ratio", "ratio_to",
                              "note")}
        note = "; ".join([str(r["note"])] if r.get("note") else []
                         + [f"{k}={v}" for k, v in extra.items()])
        body.append((
            str(r.get("op", "")), str(r.get("case", "")), str(r.get("impl", "")),
            f"{r['median_ms']:.2f}" if r.get("median_ms") is not None else "",
            f"{r['compile_s']:.2f}" if r.get("compile_s") is not None else "",
            f"{ratio:.3f}x {r.get('ratio_to', '')}".strip() if ratio is not None else "",
            note,
        ))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-roi-align", action="store_true")
    parser.add_argument("--tile-sizes", default="", help="more tile sizes of the tiled NMS, e.g. "
                        "64,128,512")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ops.json"))
    args = parser.parse_args(argv)

    rows = nms_rows(args.repeats, tuple(int(t) for t in args.tile_sizes.split(",") if t))
    if not args.skip_roi_align:
        rows += roi_align_rows(args.repeats)
    print(format_table(rows))

    goals = {}
    for case, _, _ in CASES:
        by = {r["impl"]: r for r in rows if r["op"] == "nms" and r["case"] == case}
        default = next(r for k, r in by.items() if k.startswith("nms default"))
        if "ratio" in default:
            goals[f"nms_{case}_default_le_0.5x_torchvision"] = default["ratio"] <= 0.5
    if jax.default_backend() != "cpu":
        for case, _, _ in CASES:
            by = {r["impl"]: r for r in rows if r["op"] == "nms" and r["case"] == case}
            tiled = by[f"nms tiled (T={nms_ops.default_tile_size()})"]
            speedup = by["nms per-box lax loop"]["median_ms"] / tiled["median_ms"]
            goals[f"nms_{case}_tiled_ge_10x_loop"] = speedup >= 10
    for k, v in goals.items():
        print(f"goal {k}: {'met' if v else 'NOT met'}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "repeats": args.repeats,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
