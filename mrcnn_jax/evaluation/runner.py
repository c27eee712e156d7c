"""The evaluation loop: batches of the static-shape pipeline -> model -> COCO results.

The model's detections are in the pixels of the resized image inside the canvas and carry 28x28
mask probabilities. For COCO they are mapped back the way torchvision's `postprocess` does:
boxes (and keypoints) scaled by the float32 ratios original / resized size
(`transforms.boxes_to_original`), masks pasted into the *original* image at those boxes
(`ops.masks.paste_masks_in_image`) and thresholded at `mask_threshold` (0.5), labels mapped to
dataset category ids by the `CocoEvaluator`.

Glossary: B images per batch, D detection slots per image (100), N valid detections of an image,
H x W an image's original size, P keypoints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mrcnn_jax import paths
from mrcnn_jax.evaluation.coco_evaluator import (
    PER_CATEGORY_PREFIX,
    UNDEFINED,
    CocoEvaluator,
    encode_masks,
    load_coco_gt,
)

logger = logging.getLogger(__name__)

# Seconds between progress lines of `evaluate_batches`.
PROGRESS_EVERY_S = 30.0
# White pixels between the prediction and ground-truth halves of an overlay picture.
VIS_GAP_PIXELS = 8


@dataclasses.dataclass(frozen=True)
class ImageDetections:
    """The valid detections of one image in its original pixels (for COCO and for pictures).

    boxes: [N, 4] xyxy; scores: [N]; labels: [N] contiguous 1..K; masks: [N, H, W] bool or None;
    keypoints: [N, P, 3] (x, y, score) or None; original_hw: (H, W).
    """

    image_id: int
    original_hw: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None


def detections_to_original(batch: Mapping[str, Any], detections: Mapping[str, Any],
                           mask_threshold: float = 0.5) -> list[ImageDetections]:
    """Maps a batch's detections to original pixels, dropping padding slots and padded images.

    Args:
      batch: the eval batch dict: image_id [B], image_size [B, 2] (resized h, w),
        original_size [B, 2] (H, W), image_valid [B] (optional, default all True).
      detections: the model's output: boxes [B, D, 4] (resized pixels), scores [B, D],
        labels [B, D], valid [B, D], optionally mask_probs [B, D, M, M] of the predicted class and
        keypoints [B, D, P, 3] (resized pixels).
      mask_threshold: binarisation of the pasted mask probabilities (Mask R-CNN: 0.5).
    Returns:
      One `ImageDetections` per real image of the batch, in batch order.
    """
    for key in ("image_id", "image_size", "original_size"):
        if key not in batch:
            raise ValueError(f"batch lacks {key!r}: evaluate with the pipeline's eval mode")
    for key in ("boxes", "scores", "labels", "valid"):
        if key not in detections:
            raise ValueError(f"detections lack {key!r}")
    image_ids = np.asarray(batch["image_id"]).astype(np.int64).reshape(-1)
    num_images = image_ids.shape[0]
    resized_hw = np.asarray(batch["image_size"]).reshape(num_images, 2)
    original_hw = np.asarray(batch["original_size"]).reshape(num_images, 2)
    image_valid = np.asarray(batch.get("image_valid", np.ones(num_images, bool)), bool)
    from mrcnn_jax.predictor import detections_to_original as image_detections_to_original

    boxes = np.asarray(detections["boxes"], np.float32)
    if boxes.ndim != 3 or boxes.shape[0] != num_images:
        raise ValueError(f"detections['boxes'] must be [B={num_images}, D, 4], got {boxes.shape}")
    per_image_keys = [k for k in ("boxes", "scores", "labels", "valid", "mask_probs", "keypoints")
                      if k in detections]
    detections = {k: np.asarray(detections[k]) for k in per_image_keys}

    out = []
    for i in range(num_images):
        if not image_valid[i]:
            continue
        ohw = (int(original_hw[i, 0]), int(original_hw[i, 1]))
        image = image_detections_to_original(
            {k: v[i] for k, v in detections.items()},
            (int(resized_hw[i, 0]), int(resized_hw[i, 1])), ohw, mask_threshold)
        out.append(ImageDetections(
            image_id=int(image_ids[i]), original_hw=ohw, boxes=image["boxes"],
            scores=image["scores"], labels=image["labels"].astype(np.int64),
            masks=image.get("masks"), keypoints=image.get("keypoints")))
    return out


def add_to_evaluator(evaluator: CocoEvaluator, images: Iterable[ImageDetections]) -> int:
    """Adds `detections_to_original`'s output to `evaluator`; returns the number of images."""
    count = 0
    for det in images:
        n = det.boxes.shape[0]
        masks = None
        if det.masks is not None:
            # Encoded here, one image at a time, so no [D, H, W] array of a batch is kept.
            masks = [encode_masks(det.masks) if n else []]
        evaluator.add_predictions(
            [det.image_id], det.boxes[None], det.scores[None],
            det.labels[None], masks=masks,
            keypoints=None if det.keypoints is None else det.keypoints[None])
        count += 1
    return count


def evaluate_batches(
    predict_fn: Callable[[Any, Any], Mapping[str, Any]],
    batches: Iterable[Mapping[str, Any]],
    evaluator: CocoEvaluator | None,
    mask_threshold: float = 0.5,
    num_images: int = 0,
    on_images: Callable[[Mapping[str, Any], list[ImageDetections]], None] | None = None,
) -> int:
    """Runs `predict_fn` over `batches` and adds every real image's detections to `evaluator`.

    Args:
      predict_fn: (images [B, Hc, Wc, 3], image_sizes [B, 2]) -> detections dict (see
        `detections_to_original`), e.g. a jitted `model.apply`.
      batches: eval batch dicts of the input pipeline.
      evaluator: receives the detections (its ground truth must hold the batches' image ids);
        None only runs the model (the other hosts of a multi-host evaluation).
      mask_threshold: binarisation of pasted masks.
      num_images: stop after this many real images (0 = all batches).
      on_images: called with (batch, detections of its real images) after each batch, e.g. to
        draw pictures.
    Returns:
      The number of images evaluated.
    """
    done = 0
    start = last_log = time.perf_counter()

    def finish(batch, detections) -> bool:
        """Host work of one batch; True when `num_images` are done."""
        nonlocal done, last_log
        if evaluator is None and on_images is None:
            valid = batch.get("image_valid", np.ones(len(batch["image_id"]), bool))
            done += int(np.sum(valid))
            return False
        # One host copy of the whole dict (device_get when jax arrays, a no-op for numpy).
        detections = {k: np.asarray(v) for k, v in detections.items()}
        images = detections_to_original(batch, detections, mask_threshold)
        if num_images:
            images = images[:max(num_images - done, 0)]
        done += add_to_evaluator(evaluator, images) if evaluator is not None else len(images)
        if on_images is not None:
            on_images(batch, images)
        now = time.perf_counter()
        if now - last_log > PROGRESS_EVERY_S:
            logger.info("evaluated %d images (%.1f img/s)", done, done / (now - start))
            last_log = now
        return bool(num_images) and done >= num_images

    # One batch in flight: the device computes batch k + 1 (jax dispatches asynchronously)
    # while the host pastes and encodes the masks of batch k.
    pending = None
    for batch in batches:
        detections = predict_fn(batch["image"], batch["image_size"])
        if pending is not None and finish(*pending):
            pending = None
            break
        pending = (batch, detections)
    if pending is not None:
        finish(*pending)
    logger.info("evaluated %d images in %.1f s", done, time.perf_counter() - start)
    return done


# -------------------------------------------------------------------------------------------
# One evaluation of a model on a split: ground truth, label map, data, predictions, COCOeval.

# COCO 2017's split folders, as the data builder names them.
COCO2017_SPLIT_DIRS = {"train": "train2017", "validation": "val2017"}
COCO2017_ANNOTATIONS_ZIP = "annotations_trainval2017.zip"


def _read_json(path: epath.Path, member: str | None = None) -> dict:
    """A json file, or the member of a zip; errors name the file."""
    try:
        if member is None:
            with path.open() as f:
                return json.load(f)
        with path.open("rb") as f, zipfile.ZipFile(f) as zf:
            return json.loads(zf.read(member))
    except KeyError:
        raise FileNotFoundError(f"{member} not found in {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}{':' + member if member else ''} is not valid JSON: {e}") from e


def ground_truth_dataset(data_config: Any, split: str) -> dict:
    """The COCO ground-truth dict of `split` for `config.data`, read from the original files.

    coco_format data sets: `data.eval_annotations` (or `data.train_annotations` for the train
    split). COCO 2017: `annotations/instances_<split>2017.json` in `data.manual_dir` (folder or
    the annotations zip), with the person keypoints of `person_keypoints_<split>2017.json` merged
    in by annotation id when present (so one ground truth serves bbox, segm and keypoints).
    """
    d = data_config
    if d.dataset == "coco_format":
        if split == d.eval_split and d.eval_annotations:
            path = d.eval_annotations
        elif split == d.train_split and d.train_annotations:
            path = d.train_annotations
        else:
            raise ValueError(f"split {split!r}: data.dataset='coco_format' has annotations for "
                             f"{d.train_split!r} (data.train_annotations) and {d.eval_split!r} "
                             "(data.eval_annotations) only")
        path = paths.resolve(path)
        if not path.is_file():
            raise FileNotFoundError(f"annotations json of split {split!r} not found: {path}")
        return _read_json(path)
    if d.dataset.startswith("coco_instances/"):
        if split not in COCO2017_SPLIT_DIRS:
            raise ValueError(f"split must be one of {sorted(COCO2017_SPLIT_DIRS)}, got {split!r}")
        if not d.manual_dir:
            raise ValueError("data.manual_dir must name the folder with the COCO annotations "
                             "(the ground truth of the evaluation)")
        folder = paths.resolve(d.manual_dir)
        name = COCO2017_SPLIT_DIRS[split]
        instances, keypoints = f"instances_{name}.json", f"person_keypoints_{name}.json"
        zipped = folder / COCO2017_ANNOTATIONS_ZIP
        if (folder / "annotations" / instances).is_file():
            data = _read_json(folder / "annotations" / instances)
            kp_path = folder / "annotations" / keypoints
            kp_data = _read_json(kp_path) if kp_path.is_file() else None
        elif zipped.is_file():
            data = _read_json(zipped, f"annotations/{instances}")
            with zipped.open("rb") as f, zipfile.ZipFile(f) as zf:
                has_kp = f"annotations/{keypoints}" in zf.namelist()
            kp_data = _read_json(zipped, f"annotations/{keypoints}") if has_kp else None
        else:
            raise FileNotFoundError(f"neither {folder / 'annotations' / instances} nor "
                                    f"{zipped} exists (data.manual_dir)")
        if kp_data is not None:
            by_id = {a["id"]: a for a in kp_data["annotations"]}
            for ann in data["annotations"]:
                if ann["id"] in by_id:
                    ann["keypoints"] = by_id[ann["id"]]["keypoints"]
                    ann["num_keypoints"] = by_id[ann["id"]]["num_keypoints"]
            schema = {c["id"]: c for c in kp_data["categories"] if c.get("keypoints")}
            for cat in data["categories"]:
                if cat["id"] in schema:
                    cat["keypoints"] = schema[cat["id"]]["keypoints"]
                    cat["skeleton"] = schema[cat["id"]].get("skeleton", [])
        return data
    raise ValueError(f"data.dataset must be 'coco_instances/2017' or 'coco_format', got "
                     f"{d.dataset!r}")


def label_map_for(num_classes: int, category_ids: Sequence[int]) -> dict[int, int]:
    """The model label -> dataset category id map.

    `num_classes` (with background) = number of categories + 1: the data's contiguous labels,
    label l -> category_ids[l - 1]. Otherwise, when every category id is a valid label (e.g.
    torchvision's COCO head: 91 outputs indexed by COCO category id), the identity on them.
    """
    category_ids = [int(c) for c in category_ids]
    if num_classes == len(category_ids) + 1:
        return {k + 1: c for k, c in enumerate(category_ids)}
    if max(category_ids) < num_classes:
        logger.info("model.num_classes=%d != %d categories + 1: labels are category ids "
                    "(torchvision's COCO convention)", num_classes, len(category_ids))
        return {c: c for c in category_ids}
    raise ValueError(f"model.num_classes={num_classes} fits neither the data's {len(category_ids)} "
                     f"contiguous classes (+1 background) nor its category ids up to "
                     f"{max(category_ids)}")


def data_parallel_predict_fn(model: Any) -> Callable[[Any, Any, Any], Mapping[str, Any]]:
    """(variables, images [B, ...], image_sizes [B, 2]) -> detections of the batch.

    On one host the detections are jax arrays, returned before they are computed (the caller
    fetches them with np.asarray when it needs them, so it can prepare the next batch).

    One jit; with several devices the batch is split over a 1-D `data` mesh of all devices and
    the variables replicated (B must divide evenly). In a multi-host run each host passes its own
    part of the global batch and receives the detections of the whole global batch (in process
    order), so host 0 can evaluate everything.
    """
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    apply = jax.jit(model.apply)
    devices = jax.devices()
    if len(devices) == 1:
        batch_sharding = replicated = None
    else:
        mesh = Mesh(np.asarray(devices), ("data",))
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
    # The variables on the devices, put there once per variables tree (not once per batch).
    placed: list[Any] = [None, None]

    def predict(variables, images, image_sizes):
        if batch_sharding is not None and np.shape(images)[0] % jax.local_device_count():
            raise ValueError(f"eval.batch_size per host ({np.shape(images)[0]}) must be a "
                             f"multiple of the {jax.local_device_count()} local devices")
        if placed[0] is not variables:
            placed[:] = [variables, jax.device_put(variables, replicated)]
        if batch_sharding is None:
            return apply(placed[1], images, image_sizes)  # fetched by the caller, later
        images = jax.make_array_from_process_local_data(batch_sharding, np.asarray(images))
        sizes = jax.make_array_from_process_local_data(batch_sharding, np.asarray(image_sizes))
        out = apply(placed[1], images, sizes)
        if jax.process_count() == 1:
            return out
        return multihost_utils.process_allgather(out, tiled=True)

    return predict


class CocoEvaluation:
    """COCO evaluation of a model on one split, built once and run on many variables.

        evaluation = CocoEvaluation(config)           # data, ground truth, jitted model
        metrics = evaluation.run(variables, output_dir=f"{workdir}/eval/step_{step}")

    The iou types are those the model and the ground truth both have: bbox always, segm when the
    detections carry masks and the ground truth has them, keypoints likewise. In a multi-host run
    every host runs the model on its part of the split; host 0 gathers the detections, evaluates
    and writes the files (the other hosts return an empty dict).
    """

    def __init__(self, config: Any, split: str | None = None, builder: Any = None,
                 predict_fn: Callable[[Any, Any, Any], Mapping[str, Any]] | None = None):
        """Args:
          config: the full config; uses config.data, config.eval (batch_size, num_images) and
            config.model (num_classes, mask_threshold).
          split: the split to evaluate (default config.data.eval_split).
          builder: the tfds builder (default `coco_instances.get_builder(config.data)`).
          predict_fn: (variables, images, image_sizes) -> detections (default: the jitted
            `MaskRCNN(config.model)`, data-parallel over all devices).
        """
        from mrcnn_jax.data import coco_instances

        self.config = copy.deepcopy(config)
        if split:
            self.config.data.eval_split = split
        self.split = self.config.data.eval_split
        self.builder = builder or coco_instances.get_builder(self.config.data)
        category_ids = list(self.builder.info.metadata["category_ids"])
        self.category_names = dict(zip(category_ids,
                                       self.builder.info.metadata["category_names"]))
        self.label_to_category_id = label_map_for(self.config.model.num_classes, category_ids)
        self.ground_truth = load_coco_gt(ground_truth_dataset(self.config.data, self.split))
        if predict_fn is None:
            from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

            predict_fn = data_parallel_predict_fn(MaskRCNN(self.config.model))
        self.predict_fn = predict_fn
        self.evaluator: CocoEvaluator | None = None

    def iou_types(self, evaluator: CocoEvaluator, predicted: Iterable[str]) -> tuple[str, ...]:
        """The iou types to evaluate: bbox, plus segm / keypoints when the model predicts them
        (`predicted`: the keys of its detections dict) and the ground truth has them."""
        types = ["bbox"]
        gt_types = evaluator.gt_iou_types
        for kind, key in (("segm", "mask_probs"), ("keypoints", "keypoints")):
            if key in predicted and kind in gt_types:
                types.append(kind)
            elif key in predicted:
                logger.warning("the model predicts %s but the ground truth of split %r has none: "
                               "no %s evaluation", key, self.split, kind)
        return tuple(types)

    def run(self, variables: Any, output_dir: str | os.PathLike | None = None,
            on_images: Callable[[Mapping[str, Any], list[ImageDetections]], None] | None = None
            ) -> dict[str, float]:
        """Predicts the split with `variables`, evaluates, writes files to `output_dir`.

        Returns the metrics dict of `CocoEvaluator.evaluate` (empty on hosts other than 0).
        """
        import jax

        from mrcnn_jax.data import input_pipeline

        evaluator = CocoEvaluator(self.ground_truth, self.label_to_category_id)
        self.evaluator = evaluator
        primary = jax.process_index() == 0
        batches = input_pipeline.make_eval_iterator(self.config, builder=self.builder)
        if jax.process_count() > 1:
            batches = (_gather_batch_metadata(b) for b in batches)

        predicted: set[str] = set()

        def predict(images, image_sizes):
            detections = self.predict_fn(variables, images, image_sizes)
            predicted.update(detections)
            return detections

        count = evaluate_batches(
            predict, batches, evaluator if primary else None,
            mask_threshold=self.config.model.mask_threshold, on_images=on_images)
        if not primary:
            return {}
        logger.info("split %r: %d images, %d detections", self.split, count,
                    len(evaluator.results))
        return evaluator.evaluate(self.iou_types(evaluator, predicted), output_dir=output_dir)


def _gather_batch_metadata(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A host's eval batch with the mapping fields of the global batch (all hosts, in order)."""
    from jax.experimental import multihost_utils

    out = dict(batch)
    for key in ("image_id", "image_size", "original_size", "image_valid"):
        out[key] = multihost_utils.process_allgather(np.asarray(batch[key]), tiled=True)
    return out


def run_and_report(
    evaluation: CocoEvaluation,
    variables: Any,
    output_dir: str | os.PathLike,
    num_vis: int = 0,
    step: int | None = None,
    eval_log: EvalLog | None = None,
    tensorboard_dir: str | None = None,
) -> dict[str, float]:
    """`evaluation.run` with the pictures, the TensorBoard scalars and the step record.

    Returns the metrics (empty on hosts other than 0, which write nothing).
    """
    import jax

    output_dir = os.fspath(output_dir)
    on_images = make_vis_callback(evaluation, os.path.join(output_dir, "vis"),
                                  num_vis if jax.process_index() == 0 else 0)
    metrics = evaluation.run(variables, output_dir=output_dir, on_images=on_images)
    if jax.process_index() != 0:
        return metrics
    logger.info("metrics written to %s", output_dir)
    if step is not None and tensorboard_dir:
        write_scalars(tensorboard_dir, step, metrics_for_tensorboard(metrics))
    if step is not None and eval_log is not None:
        eval_log.record(step, metrics)
    return metrics


def metrics_for_tensorboard(metrics: Mapping[str, float]) -> dict[str, float]:
    """The summary numbers (not per category), under "eval/", undefined (-1) ones left out."""
    return {f"eval/{k}": v for k, v in metrics.items()
            if PER_CATEGORY_PREFIX not in k and v != UNDEFINED}


def make_vis_callback(evaluation: CocoEvaluation, vis_dir: str, num_vis: int
                      ) -> Callable[[Mapping[str, Any], list[ImageDetections]], None] | None:
    """An `on_images` callback writing the first `num_vis` images' overlays to `vis_dir`.

    Each picture shows the predictions (left) beside the ground truth (right) on the image as the
    model saw it (de-normalised, resized back to the original size); predictions scoring below
    `config.eval.vis_score_threshold` are not drawn. Drawing is `visualization.render_detections`.
    Files: `<vis_dir>/<image id>.png`.
    """
    if num_vis <= 0:
        return None
    from mrcnn_jax.evaluation import visualization

    d = evaluation.config.data
    score_threshold = float(evaluation.config.eval.get("vis_score_threshold", 0.0))
    mean = np.asarray(d.pixel_mean, np.float32)
    std = np.asarray(d.pixel_std, np.float32)
    gt = evaluation.ground_truth
    names = {label: evaluation.category_names.get(cat, str(cat))
             for label, cat in evaluation.label_to_category_id.items()}
    label_of_category = {cat: label for label, cat in evaluation.label_to_category_id.items()}
    written: list[str] = []

    def on_images(batch: Mapping[str, Any], images: list[ImageDetections]) -> None:
        from PIL import Image

        ids = [int(i) for i in np.asarray(batch["image_id"]).reshape(-1)]
        for det in images:
            if len(written) >= num_vis:
                return
            i = ids.index(det.image_id)
            if i >= np.asarray(batch["image"]).shape[0]:
                continue  # another host's image (multi-host: only its detections are here)
            h, w = (int(v) for v in np.asarray(batch["image_size"])[i])
            pixels = np.asarray(batch["image"])[i, :h, :w] * std + mean
            pixels = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
            oh, ow = det.original_hw
            image = np.asarray(Image.fromarray(pixels).resize((ow, oh), Image.BILINEAR))
            anns = [a for a in gt.imgToAnns[det.image_id] if not a.get("iscrowd", 0)]
            gt_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                  a["bbox"][1] + a["bbox"][3]] for a in anns],
                                np.float32).reshape(-1, 4)
            gt_labels = np.array([label_of_category.get(a["category_id"], 0) for a in anns],
                                 np.int64)
            gt_masks = (np.array([gt.annToMask(a) for a in anns], bool).reshape(-1, oh, ow)
                        if anns and all(a.get("segmentation") for a in anns) else None)
            left = visualization.render_detections(
                image, det.boxes, det.labels, det.scores, masks=det.masks, class_names=names,
                score_threshold=score_threshold)
            right = visualization.render_detections(
                image, gt_boxes, gt_labels, np.ones(len(gt_labels), np.float32), masks=gt_masks,
                class_names=names)
            gap = np.full((oh, VIS_GAP_PIXELS, 3), 255, np.uint8)
            path = paths.makedirs(vis_dir) / f"{det.image_id}.png"
            with path.open("wb") as f:
                Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(f, format="PNG")
            written.append(os.fspath(path))

    return on_images


# -------------------------------------------------------------------------------------------
# Continuous evaluation (`eval.py --watch`): which checkpoints to evaluate, and a record of
# those done, so a restarted evaluator resumes and never evaluates a step twice.

EVAL_LOG_FILENAME = "evaluated_steps.json"
BEST_FILENAME = "best_metrics.json"


class EvalLog:
    """The metrics of every evaluated step, kept in `<eval_dir>/evaluated_steps.json`.

    Also keeps `<eval_dir>/best_metrics.json`: the step with the highest `best_metric` (the first
    of `best_metrics` present in the step's metrics, e.g. segm/AP, then bbox/AP) and its metrics.
    Files are replaced atomically, so a killed evaluator leaves the last complete record.
    """

    def __init__(self, eval_dir: str, best_metrics: tuple[str, ...] = ("segm/AP", "bbox/AP")):
        self.eval_dir = eval_dir
        self.best_metrics = best_metrics
        self.path = os.path.join(eval_dir, EVAL_LOG_FILENAME)
        self.steps: dict[int, dict[str, float]] = {}
        if paths.resolve(self.path).exists():
            self.steps = {int(k): v for k, v in paths.read_json(self.path).items()}

    def __contains__(self, step: int) -> bool:
        return int(step) in self.steps

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """Stores the metrics of `step` and updates the best step."""
        paths.makedirs(self.eval_dir)
        self.steps[int(step)] = {k: float(v) for k, v in metrics.items()}
        paths.write_json_atomic(self.path, {str(k): v for k, v in sorted(self.steps.items())})
        best = self.best()
        if best is not None:
            record = {"step": best[0], "metric": best[1], "metrics": self.steps[best[0]]}
            paths.write_json_atomic(os.path.join(self.eval_dir, BEST_FILENAME), record)

    def best(self) -> tuple[int, str, float] | None:
        """(step, metric name, value) of the best evaluated step, or None."""
        for name in self.best_metrics:
            scored = [(m[name], s) for s, m in self.steps.items() if name in m]
            if scored:
                value, step = max(scored, key=lambda t: (t[0], -t[1]))  # ties: earliest step
                return step, name, value
        return None


def watch_steps(
    list_steps: Callable[[], Iterable[int]],
    done: Callable[[int], bool],
    final_step: int,
    poll_interval_s: float = 60.0,
    timeout_s: float = 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[int]:
    """Yields each checkpoint step not yet `done`, oldest first, as checkpoints appear.

    Ends once every saved step has been offered (or was done before) and one of them is
    >= `final_step`, or when no new checkpoint has appeared for `timeout_s` (the trainer died or
    was stopped: a warning says so). A step is offered once even if the caller fails on it (a
    checkpoint deleted by the trainer's keep-last-N before it was read).

    Args:
      list_steps: the steps currently saved (e.g. an orbax CheckpointManager's `all_steps`).
      done: whether a step was already evaluated (e.g. `step in EvalLog`).
      final_step: the training run's last step (config.train.num_steps).
    """
    last_new = clock()
    yielded: set[int] = set()  # a step the caller could not evaluate is not offered again
    while True:
        steps = sorted(int(s) for s in list_steps())
        pending = [s for s in steps if not done(s) and s not in yielded]
        if pending:
            for step in pending:
                yielded.add(step)
                yield step
            last_new = clock()
            continue
        if steps and steps[-1] >= final_step:
            return  # every step up to the final one has been handled
        if clock() - last_new > timeout_s:
            logger.warning("no new checkpoint for %.0f s and step %d not reached: stopping",
                           timeout_s, final_step)
            return
        sleep(poll_interval_s)


_SCALAR_WRITERS: dict[str, Any] = {}  # one open event file per logdir for the process


def write_scalars(logdir: str, step: int, scalars: Mapping[str, float]) -> None:
    """Appends `scalars` at `step` to the TensorBoard event file of `logdir`.

    The writer of a logdir is opened once per process and kept, so a run writes one event file
    (not one per call); each call flushes, so a killed run loses nothing already written. Uses
    TF's summary writer with the scalars plugin's metadata, which needs only TensorFlow
    (`tf.summary.scalar` requires the tensorboard package, not a dependency here).
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    key = os.fspath(paths.resolve(logdir))
    writer = _SCALAR_WRITERS.get(key)
    if writer is None:
        writer = _SCALAR_WRITERS[key] = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for name, value in scalars.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step),
                             metadata=metadata)
    writer.flush()


class WorkdirCheckpoints:
    """The training checkpoints of a workdir, read-only: their steps and their model variables.

    Reads the orbax `CheckpointManager` directory `<workdir>/checkpoints` that
    `checkpoints/orbax_train.py` writes (a `state` item holding the TrainState pytree). Arrays are
    restored as host numpy, so a checkpoint saved on any device topology (8 GPUs, a TPU pod)
    can be evaluated on another (1 GPU, a CPU).
    """

    def __init__(self, workdir: str | os.PathLike):
        import orbax.checkpoint as ocp

        self.directory = paths.resolve(workdir) / CHECKPOINT_SUBDIR
        paths.check_orbax_directory(self.directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))

    def all_steps(self) -> list[int]:
        """The steps saved so far (re-read from disk on every call)."""
        if not self.directory.is_dir():
            return []
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def restore_variables(self, step: int) -> dict[str, Any]:
        """{"params", "batch_stats"} (numpy) of the checkpoint at `step`.

        Raises FileNotFoundError when the step is gone (the trainer keeps the last N only),
        ValueError when no item of the checkpoint holds model `params`.
        """
        import jax
        import orbax.checkpoint as ocp

        from mrcnn_jax.checkpoints import orbax_train

        step_dir = self.directory / str(int(step))
        if not step_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {step_dir} does not exist")
        # The item with the train state first (orbax_train's name), then any other item.
        items = sorted((p for p in step_dir.iterdir() if p.is_dir()),
                       key=lambda p: p.name != orbax_train.STATE_ITEM)
        checkpointer = ocp.PyTreeCheckpointer()
        for item in items:
            try:
                tree = checkpointer.metadata(item).item_metadata
            except (FileNotFoundError, ValueError, AttributeError):
                continue  # not a pytree item (e.g. the json metadata)
            tree = getattr(tree, "tree", tree)
            if not isinstance(tree, Mapping) or "params" not in tree:
                continue
            as_numpy = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
                restore_args=as_numpy))
            variables = {"params": restored["params"]}
            if restored.get("batch_stats") is not None:
                variables["batch_stats"] = restored["batch_stats"]
            return variables
        raise ValueError(f"checkpoint {step_dir} holds no item with model 'params' "
                         f"(items: {[p.name for p in items]})")


# The workdir subfolder of the training checkpoints (train_lib's).
CHECKPOINT_SUBDIR = "checkpoints"


def evaluate_step(
    evaluation: CocoEvaluation,
    variables: Any,
    workdir: str | os.PathLike,
    step: int,
    num_vis: int = 0,
    output_dir: str | None = None,
    eval_log: EvalLog | None = None,
) -> dict[str, float]:
    """Evaluates the variables of training step `step` the way every evaluation of a workdir is
    recorded (by eval.py, --watch, or the training loop's periodic evaluation):

    files in `<workdir>/eval/<split>/step_<step>/` (or `<output_dir>/step_<step>`), TensorBoard
    scalars `eval/<type>/<metric>` in `<workdir>/eval/<split>`, and the step's metrics in the
    `EvalLog` there (best step kept), so `eval.py --watch` never evaluates that step again.
    """
    eval_dir = os.path.join(os.fspath(workdir), "eval", evaluation.split)
    eval_log = eval_log or EvalLog(eval_dir)
    return run_and_report(evaluation, variables,
                          os.path.join(output_dir or eval_dir, f"step_{int(step)}"),
                          num_vis=num_vis, step=int(step), eval_log=eval_log,
                          tensorboard_dir=eval_dir)


def evaluate_workdir(
    config: Any,
    workdir: str | os.PathLike,
    split: str | None = None,
    watch: bool = False,
    num_vis: int = 0,
    output_dir: str | None = None,
    poll_interval_s: float = 60.0,
    timeout_s: float = 3600.0,
    report: Callable[[str], None] | None = None,
    checkpoints: Any = None,
    evaluation: CocoEvaluation | None = None,
) -> dict[int, dict[str, float]]:
    """Evaluates the latest checkpoint of `workdir`, or (watch) every checkpoint as it appears.

    Results go to `<workdir>/eval/<split>/step_<step>/` (or `output_dir/step_<step>`), TensorBoard
    scalars to `<workdir>/eval/<split>`, and the record of evaluated steps (`EvalLog`) beside
    them: a restarted watcher resumes after the last evaluated step, and a step is never
    evaluated twice. `report` receives the printed summary of each step.

    Returns {step: metrics} of the steps evaluated by this call.
    Raises FileNotFoundError when, without `watch`, the workdir has no checkpoint.
    """
    workdir = os.fspath(workdir)
    checkpoints = checkpoints or WorkdirCheckpoints(workdir)
    split = split or config.data.eval_split
    log = EvalLog(os.path.join(workdir, "eval", split))
    if watch:
        steps: Iterable[int] = watch_steps(
            checkpoints.all_steps, log.__contains__, int(config.train.num_steps),
            poll_interval_s=poll_interval_s, timeout_s=timeout_s)
    else:
        saved = checkpoints.all_steps()
        if not saved:
            raise FileNotFoundError(f"no checkpoint in {workdir} (looked in "
                                    f"{getattr(checkpoints, 'directory', workdir)}): train first, "
                                    "or pass --watch to wait for one")
        steps = [saved[-1]]
    evaluation = evaluation or CocoEvaluation(config, split)
    done: dict[int, dict[str, float]] = {}
    for step in steps:
        try:
            variables = checkpoints.restore_variables(step)
        except FileNotFoundError as e:  # removed by the trainer's keep-last-N meanwhile
            logger.warning("checkpoint of step %d disappeared before it was read (%s): skipped",
                           step, e)
            continue
        logger.info("evaluating step %d of %s", step, workdir)
        metrics = evaluate_step(evaluation, variables, workdir, step, num_vis=num_vis,
                                output_dir=output_dir, eval_log=log)
        done[step] = metrics
        if report is not None and metrics:
            from mrcnn_jax.evaluation import summary

            report(f"step {step}\n{summary.format_report(metrics)}")
    return done
