"""What the compiled train step's memory holds: XLA's memory analysis and the buffers live at its
peak, grouped by the part of the model that made them.

    .venv/bin/python benchmarks/step_memory.py [--batches 2,8] [--chunks 0,32] \
        [--conv-impls xla,cpu] [--dtypes float32] [--remats none,backbone+fpn+rpn_head]

R50-FPN (random weights) on benchmarks/train_step.py's batch: 800 x 1216 images with their
instances. Each row compiles the step (`train_lib.jit_train_step`, as train.py builds it) in a
subprocess with XLA's dumps on, and reads
- `memory_analysis()`: temp (the activations, gradients and scratch the step reserves; on a GPU
  what it allocates beyond the arguments), arguments (state and batch);
- the dump's live-range file: every buffer live at the heap's peak, summed by the model part in
  its source op name (backbone, fpn, rpn, pooling, box head, mask branch, optimizer, ...).
Nothing runs, so the figures do not depend on the machine's load. `model.mask_head_chunk` bounds
the mask branch (modeling/losses.py); 0 runs the largest branch (128 RoIs per image) in one piece.
`model.remat` recomputes parts in the backward (modeling/remat.py): `--remats` takes "+"-joined
part lists, "none" for ().

On the CPU, `--conv-impls xla` is the stock-flax program an accelerator compiles (its layouts
differ: XLA:CPU adds transposes around its convolutions); `cpu` is what this backend runs.
Writes benchmarks/results/step_memory.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Source-op substrings -> model part, first match wins (the order matters).
PARTS = (
    ("/cond", "mask branch (largest bucket)"),
    ("/scan", "mask branch (largest bucket)"),
    ("/while", "mask branch (largest bucket)"),
    ("opt_state", "optimizer state"),
    ("state.", "parameters"),
    ("batch", "batch"),
    ("pooling_features", "pooling buffer (P2-P5 copy)"),
    ("rpn_head", "rpn head"),
    ("box_head", "box head"),
    ("roi_align", "roi align"),
    ("fpn", "fpn"),
    ("backbone", "backbone"),
    ("transpose_copy", "layout copies"),
    ("copy", "copies"),
)


def _part(name: str) -> str:
    for key, part in PARTS:
        if key in name:
            return part
    return "other"


def peak_breakdown(live_range_text: str) -> tuple[int, dict[str, int], list[tuple[str, int]]]:
    """(peak bytes, bytes per part, the 10 largest top-level entries) from XLA's
    `*-live-range.txt` "Stack trace breakdown for peak usage"."""
    lines = live_range_text.splitlines()
    start = next(i for i, l in enumerate(lines) if "Stack trace breakdown for peak usage" in l)
    peak = int(re.sub(r"\D", "", lines[start].split(":")[1]))
    entry = re.compile(r"^      [├└]── (.*) \([\d.]+%, total: ([\d ]+) bytes")
    parts: dict[str, int] = {}
    top = []
    for line in lines[start + 1:]:
        m = entry.match(line)
        if not m:
            continue
        name, size = m.group(1), int(m.group(2).replace(" ", ""))
        parts[_part(name)] = parts.get(_part(name), 0) + size
        top.append((name, size))
    top.sort(key=lambda t: -t[1])
    return peak, parts, top[:10]


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax

    import train_step as ts
    from mrcnn_jax import train_lib
    from mrcnn_jax.config_base import base_config
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    config = base_config()
    config.model.conv_impl = args.conv_impl
    config.model.dtype = args.dtype
    config.model.mask_head_chunk = args.chunk
    config.model.remat = ts.remat_parts(args.remat)
    config.data.canvas_size = ts.CANVAS_HW
    config.train.global_batch_size = args.batch
    config.train.warmup_steps = 0
    variables = train_lib.init_variables(MaskRCNN(config.model), jax.random.PRNGKey(0))
    step_fn, state, batch = ts._jitted_step(config, variables,
                                            ts._our_batch(args.batch, config.data))
    analysis = step_fn.lower(state, batch).compile().memory_analysis()
    dump = pathlib.Path(args.dump)
    live = next(dump.glob("*jit_train_step*live-range.txt")).read_text()
    peak, parts, top = peak_breakdown(live)
    pathlib.Path(args.result).write_text(json.dumps({
        "temp_mb": analysis.temp_size_in_bytes / 2**20,
        "argument_mb": analysis.argument_size_in_bytes / 2**20,
        "peak_heap_mb": peak / 2**20,
        "parts_mb": {k: v / 2**20 for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "top": [(name, size / 2**20) for name, size in top]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--chunks", default="0,32")
    parser.add_argument("--conv-impls", default="xla,cpu")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--remats", default="none", help='e.g. "none,backbone+rpn_head"')
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step_memory.json"))
    for name in ("batch", "chunk"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    for name in ("conv_impl", "dtype", "remat", "dump", "result"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.result:
        child(args)
        return
    rows = []
    for impl in args.conv_impls.split(","):
        for dtype in args.dtypes.split(","):
            for batch, chunk, remat in itertools.product(
                    [int(b) for b in args.batches.split(",")],
                    [int(c) for c in args.chunks.split(",")], args.remats.split(",")):
                with tempfile.TemporaryDirectory() as tmp:
                    result = pathlib.Path(tmp, "result.json")
                    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp}/dump "
                               "--xla_dump_hlo_as_text")
                    subprocess.run([sys.executable, __file__, f"--batch={batch}",
                                    f"--chunk={chunk}", f"--conv_impl={impl}",
                                    f"--dtype={dtype}", f"--remat={remat}",
                                    f"--dump={tmp}/dump", f"--result={result}"], check=True,
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    row = {"conv_impl": impl, "dtype": dtype, "batch": batch,
                           "mask_head_chunk": chunk, "remat": remat,
                           **json.loads(result.read_text())}
                rows.append(row)
                parts = ", ".join(f"{k} {v:.0f}" for k, v in list(row["parts_mb"].items())[:5])
                print(f"{impl:4s} {dtype:8s} batch {batch} chunk {chunk:3d} remat {remat}: temp "
                      f"{row['temp_mb']:7.0f} MB, arguments {row['argument_mb']:4.0f} MB; "
                      f"at the peak: {parts}", flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"canvas_hw": [800, 1216], "rows": rows},
                                                 indent=1))


if __name__ == "__main__":
    main()
