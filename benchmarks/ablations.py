"""The paper's ablations on the synthetic shapes data: mask/box AP of every switch, same budget.

Run:  .venv/bin/python benchmarks/ablations.py [--steps 900] [--switches baseline,roi_pool,...]

Every switch of mrcnn_jax/ablations.py trains configs/shapes.py's small from-scratch model with
that one switch on (configs/ablations.py:shapes,NAME) for the same number of steps at the same
batch, learning-rate schedule and seed, sequentially in this one process, then is evaluated with
pycocotools on the val split. The table prints box and mask AP@[.5:.95], mask AP50, the last
logged loss terms, train/eval seconds and AP relative to the baseline; everything (with the
budget, the machine's load average before/after each run and the paper's numbers) goes to
benchmarks/results/ablations.json. resnet101/resnext101 are the COCO backbones (hundreds of
times the shapes model's cost) and are not run by default; their training is covered by the
slow tests in tests/ablations.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_SWITCHES = ("baseline", "roi_pool", "roi_warp", "class_agnostic", "multinomial", "c4",
                    "group_norm", "bfloat16")
RESULTS = ROOT / "benchmarks" / "results" / "ablations.json"


def _ablation_config(arg: str):
    spec = importlib.util.spec_from_file_location("configs_ablations",
                                                  ROOT / "configs" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def budget_config(name: str, steps: int, root: str | None):
    """configs/ablations.py:shapes,NAME with the schedule squeezed into `steps` steps."""
    config = _ablation_config(f"shapes,{name}")
    if root:
        config.data.shapes.root = root
    t = config.train
    t.num_steps = steps
    # The shapes schedule's proportions: warmup ~7 %, one LR drop at 80 %.
    t.warmup_steps = max(1, steps // 15)
    t.lr_decay_steps = (0.8,)
    t.log_every_steps = max(1, steps // 10)
    t.checkpoint_every_steps = steps
    config.eval.num_vis = 0
    return config


def run_one(name: str, steps: int, workdir: str, root: str | None) -> dict:
    from mrcnn_jax import train_lib
    from mrcnn_jax.ablations import ABLATIONS
    from mrcnn_jax.data import coco_instances

    config = budget_config(name, steps, root)
    coco_instances.get_builder(config.data)  # the shapes set (generated once, if missing)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    out = train_lib.train_and_evaluate(config, os.path.join(workdir, name), evaluate=False)
    train_s = time.time() - t0
    t0 = time.time()
    state_metrics = _evaluate(config, os.path.join(workdir, name))
    eval_s = time.time() - t0
    train = out["train"]
    return {
        "name": name,
        "fields": ABLATIONS[name].fields,
        "paper": ABLATIONS[name].paper,
        "bbox_AP": float(state_metrics.get("bbox/AP", float("nan"))),
        "segm_AP": float(state_metrics.get("segm/AP", float("nan"))),
        "segm_AP50": float(state_metrics.get("segm/AP50", float("nan"))),
        "loss": float(train.get("loss", float("nan"))),
        "loss_mask": float(train.get("loss_mask", float("nan"))),
        "train_s": train_s,
        "eval_s": eval_s,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "model": {k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in config.model.to_dict().items()},
    }


def _evaluate(config, workdir: str) -> dict:
    from mrcnn_jax.evaluation import continuous

    evaluated = continuous.evaluate_workdir(config, workdir, num_vis=0, report=lambda _: None)
    return max(evaluated.items())[1]


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "baseline"), None)
    header = (f"{'switch':<15} {'box AP':>7} {'mask AP':>8} {'mask AP50':>9} {'vs base':>8} "
              f"{'loss':>7} {'train s':>8} {'eval s':>7}  field")
    print(header)
    print("-" * len(header))
    for r in rows:
        rel = f"{r['segm_AP'] / base['segm_AP']:.2f}x" if base and base["segm_AP"] > 0 else "-"
        print(f"{r['name']:<15} {r['bbox_AP']:7.3f} {r['segm_AP']:8.3f} {r['segm_AP50']:9.3f} "
              f"{rel:>8} {r['loss']:7.3f} {r['train_s']:8.0f} {r['eval_s']:7.0f}  {r['fields']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=900, help="train steps per switch")
    parser.add_argument("--switches", default=",".join(DEFAULT_SWITCHES))
    parser.add_argument("--root", default=None, help="shapes data root (default: the config's)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mrcnn_jax.train_lib").setLevel(logging.INFO)  # step lines with img/s

    import jax

    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        for name in args.switches.split(","):
            print(f"== {name}: {args.steps} steps", flush=True)
            rows.append(run_one(name, args.steps, workdir, args.root))
            print(f"   box AP {rows[-1]['bbox_AP']:.3f} mask AP {rows[-1]['segm_AP']:.3f} "
                  f"({rows[-1]['train_s']:.0f}s train)", flush=True)
            # Written after every switch, so an interrupted run keeps what it measured.
            _write(args, rows, started, jax)
    print()
    print_table(rows)
    print(f"\nJSON: {args.output}")


def _write(args, rows, started, jax) -> None:
    cfg = budget_config("baseline", args.steps, args.root)
    out = {
        "benchmark": "ablations",
        "budget": {"steps": args.steps, "global_batch_size": cfg.train.global_batch_size,
                   "images_seen": args.steps * cfg.train.global_batch_size,
                   "warmup_steps": cfg.train.warmup_steps,
                   "lr_decay_steps": list(cfg.train.lr_decay_steps),
                   "base_lr": cfg.train.base_lr, "seed": cfg.train.seed,
                   "eval_split": cfg.data.eval_split, "num_val": cfg.data.shapes.num_val},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "device": str(jax.devices()[0])},
        "wall_s": time.time() - started,
        "rows": rows,
    }
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
