"""Input pipeline throughput: images/s of the training stream (the numpy batches train.py takes,
masks packed to bits), per data set and thread count, and the bytes of a batch.

Two inputs, both real COCO-format files read through the tfds builder:
- coco_like: 640x480 JPEGs with ~7 instances (shapes on textured backgrounds), resized by the
  COCO rule (800 / 1333) onto the 1344x1344 canvas, 100 instance slots, 112² gt masks;
- shapes: configs/shapes.py (256 px images, 256² canvas, 16 slots, 64² gt masks).

Each (data set, threads) cell runs in a fresh subprocess limited to that many threads (tf.data
private pool, map parallelism, TF intra/inter-op pools) and pinned to that many cores
(`os.sched_setaffinity`; `--no-pin` leaves it on all of them): everything the process runs,
the Python consumer and tf.data's own threads included, shares those cores, so the 1-thread row
is the per-core rate a TPU/GPU host's rate can be estimated from (rate ≈ per-core rate × cores),
and the ratio of the rows is the scaling in cores. Unpinned, a 1-thread cell would also use a
second core for the consumer and the batch assembly and flatter the per-core rate. Timing starts
after a warm-up of `--warmup` batches.

Batch assembly alone (`--assembly`, default on): the stage every batch passes through on one
thread whatever the core count (tf.data's `padded_batch` onto the static shapes, the hand-off to
numpy, `pack_masks`), timed on one in-memory COCO-like example (640x480 pixels, 7 instances)
repeated, for the raw pixel canvas train.py uses (the 1344x1344 canvas) and a 640x640 one: the
ceiling of one input process's rate however many cores feed it. Prints the tables and writes
`benchmarks/results/input_pipeline.json`.

    python benchmarks/input_pipeline.py [--images 48] [--batches 12] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "input_pipeline.json"
COCO_LIKE_HW = (480, 640)
COCO_LIKE_MAX_OBJECTS = 13  # uniform 1..13 shapes per image: 7 on average
BATCH = 4


def write_coco_like(root: pathlib.Path, num_images: int) -> None:
    """640x480 JPEGs with ~7 instances, as a COCO-format train split."""
    import numpy as np
    from PIL import Image

    from mrcnn_jax.data import shapes

    images_dir, ann_path = shapes.annotation_paths(root, "train")
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        rng = np.random.default_rng([1234, i])
        img, image_anns = shapes.generate_image(rng, COCO_LIKE_HW[0], COCO_LIKE_MAX_OBJECTS,
                                                width=COCO_LIKE_HW[1])
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(img).save(images_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "height": COCO_LIKE_HW[0],
                       "width": COCO_LIKE_HW[1]})
        for a in image_anns:
            a.update(id=len(anns) + 1, image_id=i + 1)
            anns.append(a)
    cats = [{"id": c, "name": n} for c, n in zip(shapes.CATEGORY_IDS, shapes.CLASS_NAMES)]
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def use_coco_like(data_config, root: pathlib.Path, num_images: int) -> None:
    """Points a data section at the coco_like set under `root` (written when missing)."""
    from mrcnn_jax.data import shapes

    images_dir, ann = shapes.annotation_paths(root / "coco_like", "train")
    if not ann.is_file():
        write_coco_like(root / "coco_like", num_images)
    d = data_config
    d.dataset, d.dataset_name = "coco_format", "coco_like"
    d.data_dir = str(root / "coco_like" / "tfds")
    d.train_images, d.train_annotations = str(images_dir), str(ann)


def _config(kind: str, root: pathlib.Path, num_images: int):
    from configs import shapes as shapes_config
    from mrcnn_jax.config_base import base_config

    if kind == "shapes":
        c = shapes_config.get_config(f"root={root / 'shapes'}")
        c.data.shapes.update(num_train=num_images, num_val=1)
        c.data.eval_images = c.data.eval_annotations = ""
        return c
    c = base_config()
    use_coco_like(c.data, root, num_images)
    return c


def _pin_to_cores(cores: int) -> list[int]:
    """Pins this process (its later threads too) to its first `cores` allowed CPUs; returns them
    ([] where the platform cannot, or the process has fewer CPUs than that)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < cores:
        return []
    os.sched_setaffinity(0, allowed[:cores])
    return allowed[:cores]


def _measure(kind: str, threads: int, root: pathlib.Path, num_images: int, batches: int,
             warmup: int, raw_canvas: tuple[int, int] = (0, 0), pin: bool = True) -> dict:
    """One cell, in this (fresh) process."""
    pinned = _pin_to_cores(threads) if pin else []  # before TF starts its thread pools
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from mrcnn_jax.data import coco_instances, input_pipeline

    c = _config(kind, root, num_images)
    if kind == "coco_like":
        c.data.raw_canvas_size = raw_canvas
    c.train.global_batch_size = BATCH
    c.data.num_parallel_calls = threads
    c.data.prefetch = 2
    builder = coco_instances.get_builder(c.data)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = input_pipeline.make_train_dataset(c, builder=builder).with_options(options)
    # As `make_train_iterator` yields them to train.py: numpy, the masks packed to bits.
    it = map(input_pipeline.pack_masks, ds.as_numpy_iterator())
    for _ in range(warmup):
        batch = next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    dt = time.perf_counter() - t0
    nbytes = sum(v.nbytes for v in batch.values())
    ips = batches * BATCH / dt
    return {"data": kind, "threads": threads, "pinned_cpus": pinned, "images_per_s": ips,
            "images_per_s_per_thread": ips / threads, "batch": BATCH,
            "canvas": list(c.data.canvas_size),
            "raw_canvas": list(input_pipeline.raw_canvas_size(c.data)),
            "max_instances": c.data.max_instances,
            "gt_mask_size": c.data.gt_mask_size, "batch_mbytes": nbytes / 2**20,
            "seconds": dt, "images_timed": batches * BATCH}


def _assembly_rate(raw_hw: tuple[int, int], batch: int, batches: int = 60) -> float:
    """img/s of `padded_batch` + numpy + `pack_masks` alone on one repeated in-memory example."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from mrcnn_jax.config_base import base_config
    from mrcnn_jax.data import input_pipeline

    d = base_config().data
    d.raw_canvas_size = raw_hw
    shapes = input_pipeline._train_padded_shapes(d, None)
    n = 7
    rng = np.random.default_rng(0)
    example = {
        "image": rng.integers(0, 256, (*COCO_LIKE_HW, 3), np.uint8), "image_size": [800, 1067],
        "resize_rows": np.zeros((d.canvas_size[0], 2), np.int32),
        "resize_row_weights": np.ones((d.canvas_size[0], 2), np.float32),
        "resize_cols": np.zeros((d.canvas_size[1], 2), np.int32),
        "resize_col_weights": np.ones((d.canvas_size[1], 2), np.float32),
        "gt_boxes": np.ones((n, 4), np.float32), "gt_classes": np.ones(n, np.int32),
        "gt_valid": np.ones(n, bool), "gt_mask_boxes": np.ones((n, 4), np.float32),
        "gt_masks": rng.integers(0, 2, (n, d.gt_mask_size, d.gt_mask_size), np.uint8)}
    ds = tf.data.Dataset.from_tensors(example).repeat()
    ds = ds.padded_batch(batch, padded_shapes=shapes, drop_remainder=True).prefetch(2)
    it = map(input_pipeline.pack_masks, ds.as_numpy_iterator())
    for _ in range(5):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def _raw_canvas(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.split(","))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images per data set")
    parser.add_argument("--batches", type=int, default=12, help=f"timed batches of {BATCH}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--data", default="coco_like,shapes")
    parser.add_argument("--root", default="", help="data folder (default: a temp dir)")
    parser.add_argument("--raw_canvas", default="0,0",
                        help="data.raw_canvas_size of coco_like, H,W (0 = the canvas side)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="run each cell on all the machine's cores (module docstring)")
    parser.add_argument("--no-assembly", dest="assembly", action="store_false",
                        help="skip the batch-assembly ceiling (module docstring)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON written here")
    parser.add_argument("--_cell", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._cell:  # child process: one measurement, JSON on the last stdout line
        kind, threads = args._cell.split(":")
        res = _measure(kind, int(threads), pathlib.Path(args.root), args.images, args.batches,
                       args.warmup, _raw_canvas(args.raw_canvas), args.pin)
        print(json.dumps(res))
        return

    tmp = None if args.root else tempfile.TemporaryDirectory(prefix="bench_input_")
    root = pathlib.Path(args.root or tmp.name)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rows = []
    for kind in args.data.split(","):
        for threads in [int(t) for t in args.threads.split(",")]:
            cmd = [sys.executable, __file__, f"--_cell={kind}:{threads}", f"--root={root}",
                   f"--images={args.images}", f"--batches={args.batches}",
                   f"--warmup={args.warmup}", f"--raw_canvas={args.raw_canvas}"]
            if not args.pin:
                cmd.append("--no-pin")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                sys.exit(f"{kind}:{threads} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if tmp is not None:
        tmp.cleanup()

    base = {r["data"]: r["images_per_s"] for r in rows if r["threads"] == min(
        x["threads"] for x in rows if x["data"] == r["data"])}
    print(f"{'data':<10} {'canvas':>10} {'raw canvas':>10} {'threads':>7} {'cores':>5} "
          f"{'img/s':>8} {'img/s/thread':>12} {'vs 1st row':>10} {'batch MB':>9}")
    for r in rows:
        r["ratio_vs_fewest_threads"] = r["images_per_s"] / base[r["data"]]
        print(f"{r['data']:<10} {'x'.join(map(str, r['canvas'])):>10} "
              f"{'x'.join(map(str, r['raw_canvas'])):>10} {r['threads']:>7} "
              f"{len(r['pinned_cpus']) or 'all':>5} {r['images_per_s']:>8.2f} "
              f"{r['images_per_s_per_thread']:>12.2f} {r['ratio_vs_fewest_threads']:>10.2f} "
              f"{r['batch_mbytes']:>9.1f}")
    assembly = []
    if args.assembly:
        print(f"\nbatch assembly alone (one thread per batch): {'raw canvas':>10} {'batch':>5} "
              f"{'img/s':>8}")
        for raw_hw in ((1344, 1344), (640, 640)):
            for batch in (BATCH, 8):
                ips = _assembly_rate(raw_hw, batch)
                assembly.append({"raw_canvas": list(raw_hw), "batch": batch, "images_per_s": ips})
                print(f"{'':<43} {'x'.join(map(str, raw_hw)):>10} {batch:>5} {ips:>8.0f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine_cpus": os.cpu_count(), "rows": rows,
                               "batch_assembly": assembly}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
