"""Prediction over a data set: a folder, a glob, a list file or a COCO json of images in, one COCO
results json out, resumable.

    entries = list_images("photos/")               # or "photos/*.jpg", "list.txt",
                                                   # "instances_val2017.json" (+ images_dir)
    predictor = BatchPredictor(config, variables, per_device_batch=2)
    summary = predict_dataset(predictor, entries, "out/", category_ids=...)
    # out/results.json: [{"image_id", "category_id", "bbox", "score", "segmentation"}, ...]

How it runs:
- Images are read and decoded by a pool of threads that stays at most `prefetch` images ahead of
  the model: the set is never in memory at once.
- One fixed canvas: `data.max_size` rounded up to `data.size_divisibility` on both sides (the
  export's, `export.default_canvas`), so the model compiles once whatever the image sizes; every
  image fits it after the model's own resize rule (nothing is cropped).
- Data parallel over this process's devices: a batch is `per_device_batch` x local devices
  images, split over the `data` axis of `sharding.make_mesh` (variables replicated); the last
  batch is padded with copies of its last image, whose results are dropped.
- Masks never exist at full size: each detection's crop (its box) becomes its RLE directly
  (`coco_evaluator.encode_crops`). On an accelerator the crops are pasted on the device
  (`ops.masks.paste_masks_packed`) and only they come back, one bit a pixel; on the CPU backend
  the host pastes them in numpy (`ops.masks.paste_mask_crops`): the device form computes a
  fixed buffer of `paste_capacity` pixels per image, which costs a CPU more than the crops
  themselves. `paste="device"` / `"host"` chooses either; both give the same masks.
- While the device computes batch k + 1, the host turns batch k into results.
- Every finished batch is appended to OUT/progress.jsonl (one line per image: its path, id, size
  and results, or why it could not be read). A restarted job skips the paths already there; at
  the end OUT/results.json (every detection, in the order of the images) and OUT/images.json
  (the images as COCO `images` entries, and the unreadable ones) are written from it.
- An unreadable image is reported by name, recorded and skipped; the job goes on.

Glossary: B = images per batch (all devices), D = detections per image, N = valid detections.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mrcnn_jax import paths, predictor, sharding, transforms
from mrcnn_jax.ops import masks as mask_ops

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PROGRESS_FILE = "progress.jsonl"
RESULTS_FILE = "results.json"
IMAGES_FILE = "images.json"
VIS_DIR = "vis"


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image of the set: its COCO id and its file (the key a restarted job skips by)."""

    image_id: int
    path: str


# --- What to predict --------------------------------------------------------------------------

def list_images(source: str | os.PathLike, images_dir: str | os.PathLike = "") -> list[ImageEntry]:
    """The images named by `source`:

    - a COCO-format json (`*.json`): its `images`, with their ids; files are `images_dir`
      (default: the json's folder) / `file_name`;
    - a list file (`*.txt`): one path a line (blank lines and `#` comments skipped; relative
      paths are relative to the list's folder);
    - a folder: its image files (`IMAGE_SUFFIXES`, any case), sorted by name;
    - a glob pattern (`*`, `?`, `[`; `**` recurses): the image files it matches, sorted.

    Images of a list, folder or glob get the ids 1, 2, ... in that order. Raises
    FileNotFoundError / ValueError naming what was wrong.
    """
    source = os.fspath(source)
    if any(ch in source for ch in "*?["):
        found = sorted(p for p in glob.glob(source, recursive=True)
                       if p.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"no image files match {source!r}")
        return _numbered(found)
    path = pathlib.Path(source)
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path}/")
        return _numbered(found)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path} (a folder, a glob, a .txt list or a "
                                f"COCO .json)")
    if path.suffix.lower() == ".json":
        from mrcnn_jax.data import coco_json

        data = coco_json.load_json(path, "--input")
        return coco_images(data, images_dir or path.parent, str(path))
    if path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        found = [str(path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
        if not found:
            raise ValueError(f"{path}: no image paths in the list")
        return _numbered(found)
    raise ValueError(f"{path}: expected a folder, a glob, a .txt list of paths or a COCO .json")


def coco_images(data: Mapping[str, Any], images_dir: str | os.PathLike,
                where: str = "COCO json") -> list[ImageEntry]:
    """A parsed COCO json's `images` -> entries (images_dir / file_name), in the json's order."""
    images = data.get("images") if isinstance(data, Mapping) else None
    if not isinstance(images, list) or not images:
        raise ValueError(f"{where}: no 'images' list")
    bad = [i for i, im in enumerate(images)
           if not isinstance(im, Mapping) or "id" not in im or "file_name" not in im]
    if bad:
        raise ValueError(f"{where}: images {bad[:5]} lack 'id' or 'file_name'")
    folder = pathlib.Path(images_dir)
    return [ImageEntry(int(im["id"]), str(folder / im["file_name"])) for im in images]


def split_images(data_config: Any, split: str) -> list[ImageEntry]:
    """The images of the config's `split` from the data set's original files, as the evaluation
    reads its ground truth (`coco_instances.ground_truth_dataset`): a coco_format set's
    `data.eval_images` / `data.train_images`; COCO 2017's extracted `data.manual_dir/val2017/`."""
    from mrcnn_jax.data import coco2017, coco_instances

    d = data_config
    data = coco_instances.ground_truth_dataset(d, split)
    if d.dataset == "coco_format":
        folder = d.eval_images if split == d.eval_split else d.train_images
    else:
        folder = os.path.join(d.manual_dir, coco2017.split_dir(split))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data.manual_dir: {folder}/ not found: extract the split's "
                                    f"zip there (the images are read as files)")
    return coco_images(data, folder, f"split {split!r}")


def _numbered(files: Sequence[str]) -> list[ImageEntry]:
    return [ImageEntry(i + 1, f) for i, f in enumerate(files)]


# --- Reading ahead ----------------------------------------------------------------------------

def read_ahead(entries: Iterable[ImageEntry], num_threads: int = 4, prefetch: int = 16
               ) -> Iterator[tuple[ImageEntry, np.ndarray | Exception]]:
    """(entry, its [H, W, 3] uint8 pixels or the error reading it), in order; a pool of
    `num_threads` decodes at most `prefetch` images ahead of the consumer."""
    def read(entry):
        try:
            return predictor.read_image(entry.path)
        except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
            return e

    entries = iter(entries)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        pending = collections.deque()
        for entry in entries:
            pending.append((entry, pool.submit(read, entry)))
            if len(pending) >= max(1, prefetch):
                break
        while pending:
            entry, future = pending.popleft()
            nxt = next(entries, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            yield entry, future.result()


Read = tuple[ImageEntry, Any]  # an entry and its pixels (or the error reading them)


def batches(items: Iterable[Read], batch_size: int) -> Iterator[tuple[list[Read], list[Read]]]:
    """`read_ahead`'s stream -> (up to `batch_size` readable images, the unreadable ones met
    while filling it)."""
    good, bad = [], []
    for entry, image in items:
        if isinstance(image, Exception):
            bad.append((entry, image))
            continue
        good.append((entry, image))
        if len(good) == batch_size:
            yield good, bad
            good, bad = [], []
    if good or bad:
        yield good, bad


# --- The model on a batch ---------------------------------------------------------------------

class BatchPredictor:
    """Fixed-canvas, data-parallel inference of batches of images (module docstring).

    `start(images)` preprocesses and dispatches a batch (at most `batch_size` images; fewer are
    padded) and returns at once; `finish(pending)` waits for it and returns one result per real
    image: boxes [N, 4], scores [N], labels [N] (original pixels, as `Predictor`),
    mask_crops (mask models: per detection (crop [h, w] bool, its top-left (x, y)), see
    `ops.masks.paste_mask_crops`), keypoints [N, P, 3] (keypoint models).
    """

    def __init__(self, config: Any, variables: Any, per_device_batch: int = 1,
                 paste: str = "auto", paste_capacity: int | None = None,
                 devices: Sequence[Any] | None = None):
        from mrcnn_jax.export import default_canvas
        from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
        from mrcnn_jax.ops import image_resize

        if per_device_batch < 1:
            raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
        paste = predictor.resolve_paste(paste)
        self.config = config
        self.canvas_hw = default_canvas(config.data)
        self.mesh = sharding.make_mesh(devices if devices is not None else jax.local_devices())
        self.batch_size = int(per_device_batch) * self.mesh.devices.size
        self.mask_head = bool(config.model.mask_head)
        self.paste = paste
        self.paste_capacity = predictor.paste_buffer_pixels(self.canvas_hw, paste_capacity)
        self.threshold = float(config.model.mask_threshold)
        self.variables = sharding.replicate(variables, self.mesh)
        self.images_run = 0  # real images the model has been given
        model = MaskRCNN(config.model)
        d = config.data
        mean, std = tuple(d.pixel_mean), tuple(d.pixel_std)
        self._transform = jax.jit(lambda raw, rows, cols: image_resize.normalize_resize_pad(
            raw, rows, cols, mean, std))
        device_paste = self.mask_head and paste == "device"

        def detect(variables, images, image_sizes, original_sizes):
            out = model.apply(variables, images, image_sizes)
            if device_paste:
                out.update(mask_ops.paste_masks_packed(
                    out["mask_probs"], out["boxes"], out["valid"], image_sizes, original_sizes,
                    self.paste_capacity, self.threshold))
            return out

        self._detect = jax.jit(detect)

    @property
    def num_compilations(self) -> int:
        """Compilations of the model (and paste): 1 after any number of batches."""
        return self._detect._cache_size()

    def start(self, images: Sequence[np.ndarray]) -> dict[str, Any]:
        """Dispatch one batch; returns what `finish` needs (the outputs are still computing)."""
        n = len(images)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} images, got {n}")
        padded = list(images) + [images[-1]] * (self.batch_size - n)
        raw, rows, cols, sizes, originals = predictor.host_inputs(
            padded, self.config.data, self.canvas_hw)
        put = sharding.batch_sharding(self.mesh)
        raw, rows, cols, sizes_d, originals_d = jax.device_put(
            (raw, rows, cols, sizes, np.asarray(originals, np.int32)), put)
        out = self._detect(self.variables, self._transform(raw, rows, cols), sizes_d,
                           originals_d)
        self.images_run += n
        return {"out": out, "sizes": sizes, "originals": originals, "num_images": n}

    def finish(self, pending: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The results of a `start`ed batch, one dict per real image (class docstring)."""
        out = pending["out"]
        keys = ["boxes", "scores", "labels", "valid", "keypoints", "mask_bits", "paste_boxes",
                "mask_offsets", "mask_pasted"]
        if self.mask_head and self.paste == "host":
            keys.append("mask_probs")
        host = {k: np.asarray(out[k]) for k in keys if k in out}
        mask_probs = functools.cache(lambda: host["mask_probs"] if "mask_probs" in host
                                     else np.asarray(out["mask_probs"]))
        results = []
        for i in range(pending["num_images"]):
            resized, original = tuple(pending["sizes"][i]), pending["originals"][i]
            dets = {k: host[k][i] for k in ("boxes", "scores", "labels", "valid", "keypoints")
                    if k in host}
            result = transforms.detections_to_original(dets, resized, original)
            if self.mask_head:
                result["mask_crops"] = predictor.mask_crops(
                    host, i, result["boxes"], original, self.threshold, mask_probs)
            results.append(result)
        return results

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Images (any number) -> one result per image (class docstring)."""
        results = []
        for start in range(0, len(images), self.batch_size):
            results += self.finish(self.start(images[start:start + self.batch_size]))
        return results


# --- The job ----------------------------------------------------------------------------------

def load_progress(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of OUT/progress.jsonl (none when absent); a last line cut short by a killed
    job is dropped (its batch is predicted again)."""
    path = pathlib.Path(out_dir) / PROGRESS_FILE
    if not path.is_file():
        return []
    records, lines = [], path.read_text().splitlines(keepends=True)
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise ValueError(f"{path}: line {n + 1} is not JSON: delete the file to start "
                                 f"over") from None
            path.write_text("".join(lines[:n]))
            logger.warning("%s: dropped the unfinished last line", path)
    return records


class Progress:
    """The progress line: images done of the total, img/s and ETA, on stderr every `every`
    images (and at the end)."""

    def __init__(self, total: int, done: int = 0, every: int = 100, stream=None):
        self.total, self.done, self.every = total, done, max(1, every)
        self.stream = stream or sys.stderr
        self._start, self._first = time.perf_counter(), done
        self._last_report = done

    def update(self, n: int, final: bool = False) -> None:
        self.done += n
        if not final and self.done - self._last_report < self.every:
            return
        self._last_report = self.done
        elapsed = time.perf_counter() - self._start
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        print(f"predict: {self.done}/{self.total} images, {rate:.2f} img/s, ETA {eta}",
              file=self.stream, flush=True)


def predict_dataset(
    batch_predictor: BatchPredictor,
    entries: Sequence[ImageEntry],
    out_dir: str | os.PathLike,
    category_ids: Mapping[int, int] | None = None,
    class_names: Mapping[int, str] | None = None,
    vis: bool = False,
    vis_threshold: float = 0.5,
    num_threads: int = 4,
    prefetch: int = 0,
    progress_every: int = 100,
    max_images: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict `entries`, resuming OUT/progress.jsonl, and write OUT/results.json and
    OUT/images.json (module docstring). Returns a summary: images, done (this call), skipped
    (done before), unreadable (paths), detections, complete (False when `max_images` stopped it
    first: the json files are then not written yet).

    category_ids / class_names: label -> COCO category id / name (`predictor.label_map_of`);
    vis: also OUT/vis/NAME.png overlays (detections >= vis_threshold); prefetch: images read
    ahead (default: 2 batches); max_images: stop after the batch that reaches this many images
    (0 = all); on_batch: called with the images done so far after each batch.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths_seen = [e.path for e in entries]
    if len(set(paths_seen)) != len(paths_seen):
        raise ValueError("the same image path is listed twice; give each image once")
    finished = {r["path"] for r in load_progress(out_dir)}
    todo = [e for e in entries if e.path not in finished]
    if finished:
        logger.info("resuming: %d of %d images done before", len(entries) - len(todo),
                    len(entries))
    stems = [pathlib.Path(p).stem for p in paths_seen]
    unique_stems = len(set(stems)) == len(stems)
    progress = Progress(len(entries), len(entries) - len(todo), progress_every)
    bp = batch_predictor
    reader = read_ahead(todo, num_threads, prefetch or 2 * bp.batch_size)
    done = 0
    summary = {"images": len(entries), "done": 0, "skipped": len(entries) - len(todo),
               "unreadable": [], "complete": False}

    with (out_dir / PROGRESS_FILE).open("a") as log:
        def write(batch, bad, results):
            records = [{"path": e.path, "image_id": e.image_id, "error": str(err)}
                       for e, err in bad]
            for (entry, image), result in zip(batch, results):
                hw = image.shape[:2]
                records.append({
                    "path": entry.path, "image_id": entry.image_id, "height": int(hw[0]),
                    "width": int(hw[1]),
                    "results": _coco_entries(entry.image_id, result, hw, category_ids,
                                             class_names)})
                if vis:
                    name = pathlib.Path(entry.path).stem
                    _write_overlay(out_dir / VIS_DIR / (name if unique_stems else
                                                        f"{entry.image_id}_{name}"),
                                   image, result, class_names, vis_threshold)
            for e, err in bad:
                print(f"predict: skipped {e.path}: {err}", file=sys.stderr, flush=True)
                summary["unreadable"].append(e.path)
            log.write("".join(json.dumps(r) + "\n" for r in records))
            log.flush()
            os.fsync(log.fileno())
            progress.update(len(records))

        # One batch in flight: the device computes batch k + 1 while the host writes batch k.
        pending = None
        for batch, bad in batches(reader, bp.batch_size):
            started = bp.start([im for _, im in batch]) if batch else None
            if pending is not None:
                write(*pending[:2], bp.finish(pending[2]) if pending[2] else [])
            pending = (batch, bad, started)
            done += len(batch) + len(bad)
            if on_batch is not None:
                on_batch(done)
            if max_images and done >= max_images:
                break
        if pending is not None:
            write(*pending[:2], bp.finish(pending[2]) if pending[2] else [])
    summary["done"] = done
    if max_images and summary["skipped"] + done < len(entries):
        return summary
    progress.update(0, final=True)
    summary.update(assemble(out_dir, entries))
    summary["complete"] = True
    return summary


def assemble(out_dir: str | os.PathLike, entries: Sequence[ImageEntry]) -> dict[str, Any]:
    """OUT/progress.jsonl -> OUT/results.json (the detections of `entries`, in their order) and
    OUT/images.json ({"images": COCO image entries, "unreadable": [{path, image_id, error}]});
    returns {"detections", "unreadable"}. Raises ValueError when an image is missing."""
    by_path = {r["path"]: r for r in load_progress(out_dir)}
    missing = [e.path for e in entries if e.path not in by_path]
    if missing:
        raise ValueError(f"{len(missing)} images not predicted yet (e.g. {missing[0]}): run "
                         f"the job again to finish them")
    results, images, unreadable = [], [], []
    for e in entries:
        r = by_path[e.path]
        if "error" in r:
            unreadable.append({"path": e.path, "image_id": e.image_id, "error": r["error"]})
            continue
        images.append({"id": e.image_id, "file_name": e.path, "height": r["height"],
                       "width": r["width"]})
        results += r["results"]
    out_dir = pathlib.Path(out_dir)
    paths.write_json_atomic(out_dir / RESULTS_FILE, results, indent=None)
    paths.write_json_atomic(out_dir / IMAGES_FILE, {"images": images, "unreadable": unreadable})
    return {"detections": len(results), "unreadable": [u["path"] for u in unreadable]}


def _coco_entries(image_id: int, result: Mapping[str, Any], image_hw: tuple[int, int],
                  category_ids, class_names) -> list[dict[str, Any]]:
    from mrcnn_jax.evaluation.coco_evaluator import encode_crops

    rles = (encode_crops(result["mask_crops"], image_hw) if "mask_crops" in result else None)
    entries = predictor.coco_results({k: v for k, v in result.items() if k != "mask_crops"},
                                     category_ids, class_names)
    if rles is not None:
        for entry, rle in zip(entries, rles):
            entry["segmentation"] = rle
    return [{"image_id": int(image_id), **entry} for entry in entries]


def _write_overlay(path_stem: pathlib.Path, image: np.ndarray, result: Mapping[str, Any],
                   class_names, vis_threshold: float) -> None:
    from PIL import Image

    from mrcnn_jax.evaluation.visualization import render_detections

    shown = result["scores"] >= vis_threshold
    masks = None
    if "mask_crops" in result:
        crops = [c for c, s in zip(result["mask_crops"], shown) if s]
        masks = mask_ops.crops_to_dense(crops, image.shape[:2])
    keypoints = result.get("keypoints")
    picture = render_detections(image, result["boxes"][shown], result["labels"][shown],
                                result["scores"][shown], masks, class_names,
                                score_threshold=vis_threshold,
                                keypoints=None if keypoints is None else keypoints[shown])
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path_stem.with_suffix(".png"))
