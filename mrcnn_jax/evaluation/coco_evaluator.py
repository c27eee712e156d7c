"""COCO evaluation with pycocotools: detections in, the standard COCO metrics out.

`CocoEvaluator` collects detections image by image (in original image pixels, with the model's
contiguous labels), turns them into COCO results (dataset category ids, `bbox` as [x, y, w, h],
masks as compressed RLE with a `str` `counts`), and runs `COCOeval` for `bbox`, `segm` and
`keypoints`. It returns a flat dict of numbers, ready for TensorBoard and JSON:

    bbox/AP, bbox/AP50, bbox/AP75, bbox/APs, bbox/APm, bbox/APl,
    bbox/AR1, bbox/AR10, bbox/AR100, bbox/ARs, bbox/ARm, bbox/ARl,      (same for segm/)
    keypoints/AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl        (COCOeval's 10 for OKS)
    bbox/AP-<category name>, ...                                         (per-category AP)

Conventions of the numbers (those of pycocotools, unchanged):
- Fractions in [0, 1] (not percent); `summary.py` prints them as percent.
- -1.0 means "undefined": no non-crowd ground truth in that area range (or for that category) among
  the evaluated images. It is not an AP of zero.
- An empty prediction set gives 0.0 for every metric whose ground truth exists (and -1.0 where it
  does not). pycocotools' `COCO.loadRes` crashes on an empty list; this module builds the empty
  results set itself so COCOeval runs as usual.

Which images are evaluated: the images given to `add_predictions` (also those where every slot is
invalid, so an image without detections counts as missing everything), or, if none were given, all
images of the ground truth (the official protocol for a results file).

Glossary: B images per `add_predictions` call, D detection slots per image, H_i x W_i the original
size of image i, P keypoints per instance (17 for COCO persons).

Note: pycocotools converts ground-truth polygons to RLE in place during `segm` evaluation and adds
an `ignore` field to every ground-truth annotation; the evaluator shares the `COCO` object it is
given, so these changes are visible to the caller (they do not change any later evaluation).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax import paths

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm", "keypoints")
# The order of COCOeval.stats for bbox/segm (12 numbers) and for keypoints (10 numbers).
DETECTION_METRIC_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
KEYPOINT_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# pycocotools' value for a metric without ground truth to measure it on.
UNDEFINED = -1.0
# Per-category metrics are stored as f"{iou_type}/{PER_CATEGORY_PREFIX}{category name}".
PER_CATEGORY_PREFIX = "AP-"
RESULTS_FILENAME = "coco_results.json"
METRICS_FILENAME = "metrics.json"
# Unknown ids are listed in errors up to this many (a whole split of bad ids is unreadable).
_MAX_IDS_IN_MESSAGE = 10


def metric_names(iou_type: str) -> tuple[str, ...]:
    """The names of COCOeval's summary numbers for `iou_type`, in COCOeval.stats order."""
    _check_iou_type(iou_type)
    return KEYPOINT_METRIC_NAMES if iou_type == "keypoints" else DETECTION_METRIC_NAMES


def load_coco_gt(annotations: COCO | Mapping[str, Any] | str | os.PathLike) -> COCO:
    """Returns a pycocotools `COCO` from a `COCO`, a dataset dict or an annotations json path.

    Raises:
      FileNotFoundError / ValueError naming the file when it is missing or not COCO json.
    """
    if isinstance(annotations, COCO):
        coco = annotations
    elif isinstance(annotations, Mapping):
        coco = _coco_from_dataset(copy.deepcopy(dict(annotations)))
    elif isinstance(annotations, (str, os.PathLike)):
        path = os.fspath(annotations)
        if not (resolved := paths.resolve(path)).is_file():
            raise FileNotFoundError(f"annotations json not found: {path!r}")
        try:
            with resolved.open() as f:
                dataset = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"annotations file {path!r} is not valid JSON: {e}") from e
        if not isinstance(dataset, dict):
            raise ValueError(f"annotations file {path!r} holds a {type(dataset).__name__}, "
                             "expected a COCO dict with 'images', 'annotations', 'categories'")
        coco = _coco_from_dataset(dataset, source=path)
    else:
        raise ValueError("annotations must be a pycocotools COCO, a dict or a json path, got "
                         f"{type(annotations).__name__}")
    _complete_gt_fields(coco)
    return coco


def contiguous_label_map(coco_gt: COCO) -> dict[int, int]:
    """The default label map: contiguous label k (1..K) -> the k-th smallest category id.

    This is the map of detectron2 and of the project's data pipeline. Models with torchvision's
    COCO head (91 outputs, label == category id) pass the identity map instead.
    """
    return {k + 1: int(cat_id) for k, cat_id in enumerate(sorted(coco_gt.getCatIds()))}


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (with `counts` as str, JSON-ready) of binary masks.

    Args:
      masks: [N, H, W] bool or {0, 1} integers (or [H, W] for a single mask).
    Returns:
      N dicts {"size": [H, W], "counts": str}.
    """
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or [H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    if masks.dtype != bool:
        masks = masks > 0
    # pycocotools wants [H, W, N] uint8 in Fortran order: one copy does the transpose and the
    # cast (the bulk of the cost for 100 full-size masks).
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def encode_crops(crops: Sequence[tuple[np.ndarray, tuple[int, int]]],
                 image_hw: tuple[int, int]) -> list[dict[str, Any]]:
    """`encode_masks` of masks given by their crops, without the full-size masks: each crop
    [h, w] bool sits at its top-left (x, y) in an [H, W] image that is zero elsewhere (what
    `ops.masks.paste_mask_crops` and `unpack_crops` give). The RLE's runs (column-major, as
    COCO's) come from the crop's own columns: the cost is its area, not H x W.
    """
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    out = []
    for crop, (x0, y0) in crops:
        crop = np.asarray(crop, bool)
        h, w = crop.shape
        if x0 < 0 or y0 < 0 or x0 + w > im_w or y0 + h > im_h:
            raise ValueError(f"crop {crop.shape} at ({x0}, {y0}) does not fit the image {image_hw}")
        # Column by column (COCO's order): +1 where a run of ones starts, -1 past its end.
        edges = np.diff(np.pad(crop.T.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        col_s, row_s = np.nonzero(edges == 1)
        col_e, row_e = np.nonzero(edges == -1)
        starts = (x0 + col_s) * im_h + y0 + row_s
        ends = (x0 + col_e) * im_h + y0 + row_e
        # A run that reaches the bottom of a full-height column goes on at the next one's top.
        if len(starts):
            joined = ends[:-1] == starts[1:]
            starts = starts[np.concatenate([[True], ~joined])]
            ends = ends[np.concatenate([~joined, [True]])]
        bounds = np.stack([starts, ends], axis=1).reshape(-1)
        counts = np.diff(np.concatenate([[0], bounds, [im_h * im_w]]))
        if len(counts) > 1 and counts[-1] == 0:  # ones to the last pixel: no zero run after
            counts = counts[:-1]
        rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [im_h, im_w]},
                                     im_h, im_w)
        out.append({"size": [im_h, im_w], "counts": rle["counts"].decode("ascii")})
    return out


def validate_results(results: Sequence[Mapping[str, Any]], coco_gt: COCO) -> None:
    """Raises ValueError naming the unknown image/category ids (or missing fields) in `results`."""
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise ValueError(f"results must be a list of dicts, got {type(results).__name__}")
    missing = [i for i, r in enumerate(results)
               if not isinstance(r, Mapping) or "image_id" not in r or "category_id" not in r
               or "score" not in r]
    if missing:
        raise ValueError("results entries need 'image_id', 'category_id' and 'score'; entries "
                         f"{_few(missing)} lack them")
    image_ids = {int(r["image_id"]) for r in results}
    category_ids = {int(r["category_id"]) for r in results}
    unknown_images = sorted(image_ids - set(coco_gt.getImgIds()))
    unknown_categories = sorted(category_ids - set(coco_gt.getCatIds()))
    problems = []
    if unknown_images:
        problems.append(f"{len(unknown_images)} unknown image ids {_few(unknown_images)}")
    if unknown_categories:
        problems.append(f"{len(unknown_categories)} unknown category ids "
                        f"{_few(unknown_categories)}")
    if problems:
        raise ValueError("results do not match the ground truth: " + "; ".join(problems)
                         + f" (ground truth has {len(coco_gt.getImgIds())} images, category ids "
                         f"{_few(sorted(coco_gt.getCatIds()))})")


def run_cocoeval(coco_gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: str,
                 image_ids: Sequence[int] | None = None) -> COCOeval:
    """Runs COCOeval (evaluate, accumulate, summarize) quietly and returns it.

    `results` must already be in the form for `iou_type` (see `CocoEvaluator`); they are copied,
    since pycocotools edits results in place. An empty `results` is evaluated as no detections.
    pycocotools picks the kind of results from the fields of the first one (bbox before
    segmentation before keypoints), and a result's `area` (which sets its small/medium/large
    range) from that field: give segm results without `bbox`, keypoint results without both.
    """
    _check_iou_type(iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            # loadRes sets top-level fields (id, area, ...) of each dict: a shallow copy is enough.
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:
            coco_dt = _coco_from_dataset({
                "images": list(coco_gt.dataset["images"]),
                "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                "annotations": [],
            })
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if iou_type == "keypoints":
            # OKS is defined for the categories with a keypoint schema only (COCO: person); the
            # official keypoint ground truth file holds just those.
            coco_eval.params.catIds = keypoint_category_ids(coco_gt)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def keypoint_category_ids(coco_gt: COCO) -> list[int]:
    """The ids of the categories with a keypoint schema (`keypoints` names), sorted."""
    return sorted(int(c["id"]) for c in coco_gt.dataset.get("categories", [])
                  if c.get("keypoints"))


def per_category_ap(coco_eval: COCOeval) -> dict[int, float]:
    """AP@[.5:.95] per category id (all areas, the largest maxDets), -1.0 without ground truth.

    Reads COCOeval's accumulated precision [T, R, K, A, M] the way its summary does: the mean of
    the entries that are defined (> -1).
    """
    precision = coco_eval.eval["precision"]
    area_all = coco_eval.params.areaRngLbl.index("all")
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, area_all, -1]
        p = p[p > -1]
        out[int(cat_id)] = float(np.mean(p)) if p.size else UNDEFINED
    return out


def mean_pr_curves(coco_eval: COCOeval) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Category-averaged precision-recall curves (all areas, the largest maxDets).

    Returns {"IoU=0.50": (recall [R], precision [R]), "IoU=0.75": ..., "IoU=0.50:0.95": ...}, where
    precision is NaN at recall levels no category defines.
    """
    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
    area_all = coco_eval.params.areaRngLbl.index("all")
    p = precision[:, :, :, area_all, -1]  # [T, R, K]
    p = np.where(p > -1, p, np.nan)
    recall = np.asarray(coco_eval.params.recThrs)
    iou_thrs = np.asarray(coco_eval.params.iouThrs)
    with np.errstate(invalid="ignore"), _quiet_nan_mean():
        per_iou = np.nanmean(p, axis=2)  # [T, R]
        curves = {}
        for thr in (0.5, 0.75):
            t = int(np.argmin(np.abs(iou_thrs - thr)))
            curves[f"IoU={thr:.2f}"] = (recall, per_iou[t])
        curves[f"IoU={iou_thrs[0]:.2f}:{iou_thrs[-1]:.2f}"] = (recall, np.nanmean(per_iou, 0))
    return curves


def plot_pr_curves(coco_eval: COCOeval, path: str, title: str = "") -> str:
    """Writes the category-averaged PR curves of `coco_eval` as a PNG to `path`; returns `path`."""
    # The Agg canvas directly: no pyplot, no global backend switch, safe in threads and headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (recall, precision) in mean_pr_curves(coco_eval).items():
        if np.isfinite(precision).any():
            ax.plot(recall, precision, label=label)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title or f"{coco_eval.params.iouType} precision-recall (mean over categories)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left")
    fig.tight_layout()
    with paths.resolve(path).open("wb") as f:
        fig.savefig(f, format="png")
    return path


class CocoEvaluator:
    """Collects detections and evaluates them against a COCO ground truth with pycocotools.

    Usage:
        evaluator = CocoEvaluator("instances_val.json")
        for batch, detections in ...:  # detections mapped to original pixels by the caller
            evaluator.add_predictions(batch_image_ids, boxes, scores, labels, masks=masks,
                                      valid=valid)
        metrics = evaluator.evaluate(("bbox", "segm"), output_dir=workdir)
    """

    def __init__(self, coco_gt: COCO | Mapping[str, Any] | str | os.PathLike,
                 label_to_category_id: Mapping[int, int] | Sequence[int] | None = None):
        """Args:
          coco_gt: the ground truth: a pycocotools COCO, a COCO dataset dict, or a json path.
          label_to_category_id: model label (>= 1) -> COCO category id, as a mapping or as a
            sequence whose entry k-1 is the category of label k. None: `contiguous_label_map`
            (pass the identity on category ids for torchvision's 91-class COCO head).
        """
        self.coco_gt = load_coco_gt(coco_gt)
        if label_to_category_id is None:
            label_map = contiguous_label_map(self.coco_gt)
        elif isinstance(label_to_category_id, Mapping):
            label_map = {int(k): int(v) for k, v in label_to_category_id.items()}
        else:
            label_map = {k + 1: int(v) for k, v in enumerate(label_to_category_id)}
        unknown = sorted(set(label_map.values()) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_category_id maps to category ids {_few(unknown)} that "
                             "are not in the ground truth's categories "
                             f"{_few(sorted(self.coco_gt.getCatIds()))}")
        if any(k < 1 for k in label_map):
            raise ValueError("label_to_category_id keys are model labels >= 1 "
                             f"(0 = background), got {_few(sorted(label_map))}")
        self.label_to_category_id = label_map
        self._gt_image_ids = frozenset(int(i) for i in self.coco_gt.getImgIds())
        self._results: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()
        # The COCOeval objects of the last `evaluate`, per iou type (precision arrays, params).
        self.coco_evals: dict[str, COCOeval] = {}

    # ---------------------------------------------------------------------------------------
    # Collecting predictions.

    def reset(self) -> None:
        """Forgets every prediction added so far (to evaluate another checkpoint)."""
        self._results = []
        self._image_ids = set()
        self.coco_evals = {}

    @property
    def results(self) -> list[dict[str, Any]]:
        """The COCO results added so far (one dict per detection, dataset ids)."""
        return self._results

    @property
    def image_ids(self) -> list[int]:
        """The image ids given to `add_predictions` / `add_results` so far, sorted."""
        return sorted(self._image_ids)

    @property
    def gt_iou_types(self) -> tuple[str, ...]:
        """The iou types the ground truth supports (segm needs masks, keypoints needs keypoints)."""
        anns = self.coco_gt.dataset.get("annotations", [])
        types = ["bbox"]
        if anns and all(_has_segmentation(a) for a in anns):
            types.append("segm")
        if keypoint_category_ids(self.coco_gt):
            types.append("keypoints")
        return tuple(types)

    def add_predictions(
        self,
        image_ids: Any,
        boxes: Any,
        scores: Any,
        labels: Any,
        masks: Any = None,
        valid: Any = None,
        keypoints: Any = None,
    ) -> list[dict[str, Any]]:
        """Adds the detections of B images and returns their COCO results.

        Args:
          image_ids: [B] dataset image ids (every one must be in the ground truth; images whose
            slots are all invalid still count as evaluated, with no detections).
          boxes: [B, D, 4] (x1, y1, x2, y2) in original image pixels.
          scores: [B, D] detection scores.
          labels: [B, D] model labels >= 1 (mapped with `label_to_category_id`).
          masks: None, or per image the full-size masks of its D slots: a [B, D, H, W] array when
            all images share a size, or a length-B sequence of [D, H_i, W_i] bool arrays or of
            length-D lists of COCO RLE dicts. Masks must have the image's original size.
          valid: [B, D] bool, False for padding slots. None: all slots valid.
          keypoints: None, or [B, D, P, 3] (x, y, score) in original image pixels.
        Returns:
          The COCO result dicts added (bbox [x, y, w, h], category_id, score, and segmentation /
          keypoints when given).
        """
        image_ids = np.asarray(image_ids).astype(np.int64).reshape(-1)
        num_images = image_ids.shape[0]
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 3 or boxes.shape[0] != num_images or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be [B={num_images}, D, 4], got shape {boxes.shape}")
        num_slots = boxes.shape[1]
        scores = _check_shape("scores", np.asarray(scores, np.float64), (num_images, num_slots))
        labels = _check_shape("labels", np.asarray(labels), (num_images, num_slots))
        if valid is None:
            valid = np.ones((num_images, num_slots), bool)
        valid = _check_shape("valid", np.asarray(valid, bool), (num_images, num_slots))
        if keypoints is not None:
            keypoints = np.asarray(keypoints, np.float64)
            if (keypoints.ndim != 4 or keypoints.shape[:2] != (num_images, num_slots)
                    or keypoints.shape[3] != 3):
                raise ValueError(f"keypoints must be [B={num_images}, D={num_slots}, P, 3], got "
                                 f"shape {keypoints.shape}")
        if masks is not None and len(masks) != num_images:
            raise ValueError(f"masks must hold one entry per image (B={num_images}), got "
                             f"{len(masks)}")

        self._check_image_ids(image_ids)
        labels = labels.astype(np.int64)
        bad_labels = sorted({int(x) for x in labels[valid]} - set(self.label_to_category_id))
        if bad_labels:
            known = _few(sorted(self.label_to_category_id))
            raise ValueError(f"labels {_few(bad_labels)} of valid detections have no category "
                             f"id in label_to_category_id (it maps labels {known})")

        added = []
        for i, image_id in enumerate(image_ids):
            slots = np.flatnonzero(valid[i])
            rles = None
            if masks is not None:
                rles = self._image_rles(int(image_id), masks[i], num_slots, slots)
            for j, slot in enumerate(slots):
                x1, y1, x2, y2 = (float(v) for v in boxes[i, slot])
                result = {
                    "image_id": int(image_id),
                    "category_id": self.label_to_category_id[int(labels[i, slot])],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(scores[i, slot]),
                }
                if rles is not None:
                    result["segmentation"] = rles[j]
                if keypoints is not None:
                    result["keypoints"] = [float(v) for v in keypoints[i, slot].reshape(-1)]
                added.append(result)
        self._image_ids.update(int(i) for i in image_ids)
        self._results.extend(added)
        return added

    def add_results(self, results: Sequence[Mapping[str, Any]],
                    image_ids: Sequence[int] | None = None) -> None:
        """Adds COCO results already in dataset ids (e.g. from another tool), after validation.

        `image_ids`: the images these results cover (so that images without detections count);
        None leaves the set of evaluated images to the other calls (or to all gt images).
        """
        validate_results(results, self.coco_gt)
        if image_ids is not None:
            ids = np.asarray(image_ids, np.int64).reshape(-1)
            self._check_image_ids(ids)
            self._image_ids.update(int(i) for i in ids)
        self._results.extend(_normalise_result(r) for r in results)

    def load_results(self, path: str | os.PathLike) -> None:
        """Adds the results of a COCO results json (validated: unknown ids raise ValueError)."""
        path = os.fspath(path)
        if not (resolved := paths.resolve(path)).is_file():
            raise FileNotFoundError(f"results json not found: {path!r}")
        try:
            with resolved.open() as f:
                results = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"results file {path!r} is not valid JSON: {e}") from e
        try:
            self.add_results(results)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def write_results(self, path: str | os.PathLike) -> str:
        """Writes all results (bbox, segmentation, keypoints in one entry each) as COCO json."""
        path = os.fspath(path)
        paths.write_json_atomic(path, self._results, indent=None)
        return path

    # ---------------------------------------------------------------------------------------
    # Evaluating.

    def evaluate(self, iou_types: Sequence[str] = ("bbox", "segm"),
                 output_dir: str | os.PathLike | None = None) -> dict[str, float]:
        """Runs COCOeval for each iou type and returns the flat dict of metrics.

        Args:
          iou_types: a subset of ("bbox", "segm", "keypoints").
          output_dir: if given, writes `coco_results.json`, `metrics.json` and
            `pr_curve_<iou type>.png` there (created if missing).
        Returns:
          {"<type>/<name>": value} for the summary numbers (`metric_names`) and the per-category
          AP ("<type>/AP-<category name>"); see the module docstring for the conventions.
        Raises:
          ValueError: unknown iou type; segm/keypoints asked of a ground truth without masks /
            keypoints, or of predictions without them.
        """
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        for t in iou_types:
            _check_iou_type(t)
        self._check_can_evaluate(iou_types)
        image_ids = self.image_ids or None
        if image_ids is None:
            logger.warning("No images were added with add_predictions: evaluating the %d "
                           "detections over all %d ground-truth images.",
                           len(self._results), len(self.coco_gt.getImgIds()))
        if not self._results:
            logger.warning("The prediction set is empty: every AP/AR with ground truth is 0.")

        metrics: dict[str, float] = {}
        self.coco_evals = {}
        cat_names = self._category_names()
        for iou_type in iou_types:
            coco_eval = run_cocoeval(self.coco_gt, self._results_for(iou_type), iou_type,
                                     image_ids)
            self.coco_evals[iou_type] = coco_eval
            for name, value in zip(metric_names(iou_type), coco_eval.stats):
                metrics[f"{iou_type}/{name}"] = float(value)
            per_cat = per_category_ap(coco_eval)
            for cat_id, ap in per_cat.items():
                metrics[f"{iou_type}/{PER_CATEGORY_PREFIX}{cat_names[cat_id]}"] = ap

        if output_dir is not None:
            output_dir = os.fspath(output_dir)
            paths.makedirs(output_dir)
            self.write_results(os.path.join(output_dir, RESULTS_FILENAME))
            paths.write_json_atomic(os.path.join(output_dir, METRICS_FILENAME), metrics,
                                    indent=None)
            for iou_type, coco_eval in self.coco_evals.items():
                plot_pr_curves(coco_eval, os.path.join(output_dir, f"pr_curve_{iou_type}.png"))
        return metrics

    # ---------------------------------------------------------------------------------------
    # Helpers.

    def _check_image_ids(self, image_ids: np.ndarray) -> None:
        ids = [int(i) for i in image_ids]
        unknown = sorted(set(ids) - self._gt_image_ids)
        if unknown:
            raise ValueError(f"image_ids {_few(unknown)} are not in the ground truth "
                             f"({len(self._gt_image_ids)} images)")
        repeated = sorted({i for i in ids if ids.count(i) > 1} | (set(ids) & self._image_ids))
        if repeated:
            raise ValueError(f"image_ids {_few(repeated)} were already added: each image once "
                             "(drop padded duplicates with the batch's image_valid)")

    def _image_rles(self, image_id: int, image_masks: Any, num_slots: int,
                    slots: np.ndarray) -> list[dict[str, Any]]:
        info = self.coco_gt.imgs[image_id]
        hw = [int(info["height"]), int(info["width"])]
        if isinstance(image_masks, np.ndarray) or hasattr(image_masks, "__array__"):
            image_masks = np.asarray(image_masks)
            if image_masks.ndim != 3 or image_masks.shape[0] != num_slots:
                raise ValueError(f"masks of image {image_id} must be [D={num_slots}, H, W], got "
                                 f"shape {image_masks.shape}")
            if list(image_masks.shape[1:]) != hw:
                raise ValueError(f"masks of image {image_id} have size {image_masks.shape[1:]}, "
                                 f"but the image's original size is {tuple(hw)}: paste masks "
                                 "at original resolution")
            return encode_masks(image_masks[slots])
        if len(image_masks) != num_slots:
            raise ValueError(f"masks of image {image_id}: {len(image_masks)} RLEs for "
                             f"D={num_slots} slots")
        rles = []
        for slot in slots:
            rle = image_masks[slot]
            if not isinstance(rle, Mapping) or "counts" not in rle or "size" not in rle:
                raise ValueError(f"mask of image {image_id} slot {slot} is not a COCO RLE dict")
            if [int(s) for s in rle["size"]] != hw:
                raise ValueError(f"mask RLE of image {image_id} slot {slot} has size "
                                 f"{list(rle['size'])}, the image is {hw}")
            counts = rle["counts"]
            if isinstance(counts, list):  # uncompressed RLE: compress it.
                counts = mask_utils.frPyObjects(dict(rle), *hw)["counts"]
            if isinstance(counts, bytes):
                counts = counts.decode("ascii")
            rles.append({"size": hw, "counts": counts})
        return rles

    def _check_can_evaluate(self, iou_types: Sequence[str]) -> None:
        anns = self.coco_gt.dataset.get("annotations", [])
        if "segm" in iou_types:
            without = [a.get("id") for a in anns if not _has_segmentation(a)]
            if without and len(without) == len(anns):
                raise ValueError("iou_types asks for 'segm' but the ground truth has no instance "
                                 "masks ('segmentation'); evaluate ('bbox',) only")
            if without:
                raise ValueError(f"iou_types asks for 'segm' but {len(without)} ground-truth "
                                 f"annotations have no 'segmentation': ids {_few(without)}")
            if self._results and not all("segmentation" in r for r in self._results):
                raise ValueError("iou_types asks for 'segm' but the predictions were added "
                                 "without masks")
        if "keypoints" in iou_types:
            if not keypoint_category_ids(self.coco_gt):
                raise ValueError("iou_types asks for 'keypoints' but no ground-truth category "
                                 "has a keypoint schema ('keypoints' names)")
            if self._results and not all("keypoints" in r for r in self._results):
                raise ValueError("iou_types asks for 'keypoints' but the predictions were added "
                                 "without keypoints")

    def _results_for(self, iou_type: str) -> list[dict[str, Any]]:
        # Each type gets the official results format for that task (as torchvision's COCO
        # evaluation writes them): pycocotools would take a segm or keypoint result's area from
        # its `bbox` if one were present.
        drop = {"bbox": ("segmentation", "keypoints"), "segm": ("bbox", "keypoints"),
                "keypoints": ("bbox", "segmentation")}[iou_type]
        return [{k: v for k, v in r.items() if k not in drop} for r in self._results]

    def _category_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        cats = self.coco_gt.loadCats(self.coco_gt.getCatIds())
        counts: dict[str, int] = {}
        for c in cats:
            counts[str(c.get("name", c["id"]))] = counts.get(str(c.get("name", c["id"])), 0) + 1
        for c in cats:
            name = str(c.get("name", c["id"]))
            names[int(c["id"])] = name if counts[name] == 1 else f"{name}#{c['id']}"
        return names


def _coco_from_dataset(dataset: dict[str, Any], source: str = "annotations") -> COCO:
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"{source}: COCO json lacks the {key!r} list")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _complete_gt_fields(coco: COCO) -> None:
    """Adds the gt fields COCOeval needs but COCO-format files may omit.

    iscrowd (0), area (of the mask, else the box) and, for instances of a category with a
    keypoint schema, keypoints (none visible) and num_keypoints (the visible ones).
    """
    filled = 0
    num_keypoints = {int(c["id"]): len(c["keypoints"])
                     for c in coco.dataset.get("categories", []) if c.get("keypoints")}
    for ann in coco.dataset.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        k = num_keypoints.get(ann.get("category_id"))
        if k:
            if not ann.get("keypoints"):
                ann["keypoints"] = [0.0] * (3 * k)
            if "num_keypoints" not in ann:
                ann["num_keypoints"] = int(sum(1 for v in ann["keypoints"][2::3] if v > 0))
        if "area" not in ann:
            filled += 1
            if _has_segmentation(ann) and ann["image_id"] in coco.imgs:
                ann["area"] = float(mask_utils.area(coco.annToRLE(ann)))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    if filled:
        logger.warning("%d ground-truth annotations had no 'area'; computed from their mask or "
                       "box.", filled)


def _has_segmentation(ann: Mapping[str, Any]) -> bool:
    seg = ann.get("segmentation")
    return bool(seg)


def _normalise_result(result: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(result)
    seg = out.get("segmentation")
    if isinstance(seg, Mapping) and isinstance(seg.get("counts"), bytes):
        out["segmentation"] = dict(seg, counts=seg["counts"].decode("ascii"))
    return out


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_types: unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")


def _check_shape(name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} [B, D], got {x.shape}")
    return x


def _few(ids: Sequence[Any]) -> str:
    ids = list(ids)
    head = ", ".join(str(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    return f"[{head}{', ...' if len(ids) > _MAX_IDS_IN_MESSAGE else ''}]"


@contextlib.contextmanager
def _quiet_nan_mean():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield
