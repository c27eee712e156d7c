"""COCO evaluation of a model on one split: ground truth, label map, data, inference, COCOeval.

    evaluation = CocoEvaluation(config)           # data, ground truth, jitted model: built once
    metrics = evaluation.run(variables, output_dir=f"{workdir}/eval/step_{step}")

Built once and run on many variables (every checkpoint of a training run). The inference loop is
`inference.evaluate_batches`; the detections, in original pixels, go to a `CocoEvaluator`
(pycocotools) with the model's labels mapped to the data set's category ids by the label map
(`data/label_map.py`: the training run's, or the data's for `model.num_classes`).
Continuous evaluation of a workdir's checkpoints is `continuous.py`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mrcnn_jax.data.label_map import LabelMap
from mrcnn_jax.evaluation import inference
from mrcnn_jax.evaluation.coco_evaluator import CocoEvaluator, encode_masks, load_coco_gt
from mrcnn_jax.evaluation.inference import ImageDetections

logger = logging.getLogger(__name__)

OnImages = Callable[[Mapping[str, Any], list[ImageDetections]], None]


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
                 predict_fn: Callable[[Any, Any, Any], Mapping[str, Any]] | None = None,
                 label_map: LabelMap | None = None):
        """Args:
          config: the full config; uses config.data, config.eval (batch_size, num_images) and
            config.model (num_classes, mask_threshold).
          split: the split to evaluate (default config.data.eval_split).
          builder: the tfds builder (default `coco_instances.get_builder(config.data)`).
          predict_fn: (variables, images, image_sizes) -> detections (default: the jitted
            `MaskRCNN(config.model)`, data-parallel over all devices).
          label_map: the model's labels (a training run's `label_map.json`); default: the data's
            for `config.model.num_classes`.

        Raises ValueError naming the split when it has no image to evaluate, or when the label
        map names a category the ground truth lacks: at construction, so a training run that
        builds it first fails before training rather than after.
        """
        from mrcnn_jax.data import coco_instances

        self.config = copy.deepcopy(config)
        if split:
            self.config.data.eval_split = split
        self.split = self.config.data.eval_split
        self.builder = builder or coco_instances.get_builder(self.config.data)
        if label_map is None:
            label_map, _ = coco_instances.label_map_for_info(self.builder.info,
                                                             self.config.model.num_classes)
        self.label_map = label_map
        self.config.model.num_classes = label_map.num_classes  # 0 = from the data: resolved
        self.label_to_category_id = label_map.label_to_category_id
        self.category_names = dict(zip(label_map.category_ids, label_map.names))
        splits = self.builder.info.splits
        if self.split not in splits or splits[self.split].num_examples == 0:
            bad = self.builder.info.metadata.get("bad_data", {}).get(self.split, {})
            raise ValueError(
                f"{self.builder.info.full_name}: split {self.split!r} has no image to evaluate "
                f"(splits: {sorted(splits.keys())}; bad data counted: {bad or 'none'})")
        self.ground_truth = load_coco_gt(
            coco_instances.ground_truth_dataset(self.config.data, self.split))
        missing = sorted(set(label_map.category_ids) - set(self.ground_truth.getCatIds()))
        if missing:
            raise ValueError(f"split {self.split!r}: the label map's category ids {missing} are "
                             f"not among the ground truth's categories")
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
