"""COCO evaluation of a model on one split: ground truth, label map, data, inference, COCOeval.

    evaluation = CocoEvaluation(config)           # data, ground truth, jitted model: built once
    metrics = evaluation.run(variables, output_dir=f"{workdir}/eval/step_{step}")

Built once and run on many variables (every checkpoint of a training run). The inference loop is
`inference.evaluate_batches`; the detections, in original pixels, go to a `CocoEvaluator`
(pycocotools) with the model's labels mapped to the data set's category ids (`label_map_for`).
Continuous evaluation of a workdir's checkpoints is `continuous.py`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mrcnn_jax.evaluation import inference
from mrcnn_jax.evaluation.coco_evaluator import CocoEvaluator, encode_masks, load_coco_gt
from mrcnn_jax.evaluation.inference import ImageDetections

logger = logging.getLogger(__name__)

OnImages = Callable[[Mapping[str, Any], list[ImageDetections]], None]


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


def add_to_evaluator(evaluator: CocoEvaluator, images: Iterable[ImageDetections]) -> int:
    """Adds `inference.batch_to_images`' output to `evaluator`; returns the number of images."""
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


class CocoEvaluation:
    """COCO evaluation of a model on one split, built once and run on many variables.

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
        self.ground_truth = load_coco_gt(
            coco_instances.ground_truth_dataset(self.config.data, self.split))
        if predict_fn is None:
            from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

            predict_fn = inference.data_parallel_predict_fn(MaskRCNN(self.config.model))
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
            on_images: OnImages | None = None) -> dict[str, float]:
        """Predicts the split with `variables`, evaluates, writes files to `output_dir`.

        `on_images` also receives each batch's detections (host 0 only), e.g. to draw them.
        Returns the metrics dict of `CocoEvaluator.evaluate` (empty on hosts other than 0).
        """
        import jax

        from mrcnn_jax.data import input_pipeline

        evaluator = CocoEvaluator(self.ground_truth, self.label_to_category_id)
        self.evaluator = evaluator
        primary = jax.process_index() == 0
        batches = input_pipeline.make_eval_iterator(self.config, builder=self.builder)
        if jax.process_count() > 1:
            batches = (inference.gather_batch_metadata(b) for b in batches)

        predicted: set[str] = set()

        def predict(images, image_sizes):
            detections = self.predict_fn(variables, images, image_sizes)
            predicted.update(detections)
            return detections

        def add(batch: Mapping[str, Any], images: list[ImageDetections]) -> None:
            add_to_evaluator(evaluator, images)
            if on_images is not None:
                on_images(batch, images)

        count = inference.evaluate_batches(
            predict, batches, add if primary else None,
            mask_threshold=self.config.model.mask_threshold)
        if not primary:
            return {}
        logger.info("split %r: %d images, %d detections", self.split, count,
                    len(evaluator.results))
        return evaluator.evaluate(self.iou_types(evaluator, predicted), output_dir=output_dir)


def run_and_report(evaluation: CocoEvaluation, variables: Any, output_dir: str | os.PathLike,
                   num_vis: int = 0) -> dict[str, float]:
    """`evaluation.run` writing its files to `output_dir`, with the overlay pictures of the first
    `num_vis` images in `<output_dir>/vis` (`visualization.make_vis_callback`).

    Returns the metrics (empty on hosts other than 0, which write nothing).
    """
    import jax

    from mrcnn_jax.evaluation import visualization

    output_dir = os.fspath(output_dir)
    on_images = None
    if jax.process_index() == 0 and num_vis > 0:
        d = evaluation.config.data
        on_images = visualization.make_vis_callback(
            os.path.join(output_dir, "vis"), num_vis, evaluation.ground_truth,
            evaluation.label_to_category_id, evaluation.category_names,
            d.pixel_mean, d.pixel_std,
            score_threshold=float(evaluation.config.eval.get("vis_score_threshold", 0.0)))
    metrics = evaluation.run(variables, output_dir=output_dir, on_images=on_images)
    if jax.process_index() == 0:
        logger.info("metrics written to %s", output_dir)
    return metrics
