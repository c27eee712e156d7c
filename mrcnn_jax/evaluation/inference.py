"""Inference over a data set: batches of the static-shape pipeline -> model -> detections of each
image in its original pixels.

The model's detections are in the pixels of the resized image inside the canvas and carry 28x28
mask probabilities. They are mapped back the way torchvision's `postprocess` does, by the same
`transforms.detections_to_original` the `Predictor` uses: boxes (and keypoints) scaled by the
float32 ratios original / resized size, masks pasted into the *original* image at those boxes and
thresholded at `mask_threshold` (0.5). What is done with them (COCO evaluation, pictures) is the
caller's `on_images`.

Glossary: B images per batch, D detection slots per image (100), N valid detections of an image,
H x W an image's original size, P keypoints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mrcnn_jax import transforms

logger = logging.getLogger(__name__)

# Seconds between progress lines of `evaluate_batches`.
PROGRESS_EVERY_S = 30.0


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


def batch_to_images(batch: Mapping[str, Any], detections: Mapping[str, Any],
                    mask_threshold: float = 0.5) -> list[ImageDetections]:
    """A batch's detections -> one `ImageDetections` per real image, in original pixels.

    Padding slots and the padded images of the last batch are dropped.

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
        image = transforms.detections_to_original(
            {k: v[i] for k, v in detections.items()},
            (int(resized_hw[i, 0]), int(resized_hw[i, 1])), ohw, mask_threshold)
        out.append(ImageDetections(
            image_id=int(image_ids[i]), original_hw=ohw, boxes=image["boxes"],
            scores=image["scores"], labels=image["labels"].astype(np.int64),
            masks=image.get("masks"), keypoints=image.get("keypoints")))
    return out


def evaluate_batches(
    predict_fn: Callable[[Any, Any], Mapping[str, Any]],
    batches: Iterable[Mapping[str, Any]],
    on_images: Callable[[Mapping[str, Any], list[ImageDetections]], None] | None,
    mask_threshold: float = 0.5,
    num_images: int = 0,
) -> int:
    """Runs `predict_fn` over `batches` and hands every real image's detections to `on_images`.

    Args:
      predict_fn: (images [B, Hc, Wc, 3], image_sizes [B, 2]) -> detections dict (see
        `batch_to_images`), e.g. a jitted `model.apply`.
      batches: eval batch dicts of the input pipeline.
      on_images: called with (batch, detections of its real images) after each batch, e.g. to
        add them to a COCO evaluator and draw pictures; None only runs the model (the other hosts
        of a multi-host evaluation).
      mask_threshold: binarisation of pasted masks.
      num_images: stop after this many real images (0 = all batches).
    Returns:
      The number of images evaluated.
    """
    done = 0
    start = last_log = time.perf_counter()

    def finish(batch, detections) -> bool:
        """Host work of one batch; True when `num_images` are done."""
        nonlocal done, last_log
        if on_images is None:
            valid = batch.get("image_valid", np.ones(len(batch["image_id"]), bool))
            done += int(np.sum(valid))
            return False
        # One host copy of the whole dict (device_get when jax arrays, a no-op for numpy).
        detections = {k: np.asarray(v) for k, v in detections.items()}
        images = batch_to_images(batch, detections, mask_threshold)
        if num_images:
            images = images[:max(num_images - done, 0)]
        done += len(images)
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


def data_parallel_predict_fn(model: Any) -> Callable[[Any, Any, Any], Mapping[str, Any]]:
    """(variables, images [B, ...], image_sizes [B, 2]) -> detections of the batch.

    On one host the detections are jax arrays, returned before they are computed (the caller
    fetches them with np.asarray when it needs them, so it can prepare the next batch).

    One jit; the batch is split over the `data` axis of `sharding.make_mesh()` (all devices) and
    the variables replicated, as in training (B must be a multiple of the local devices). In a
    multi-host run each host passes its own part of the global batch and receives the
    detections of the whole global batch (in process order), so host 0 can evaluate everything.
    """
    import jax
    from jax.experimental import multihost_utils

    from mrcnn_jax import sharding

    apply = jax.jit(model.apply)
    mesh = sharding.make_mesh()
    # The variables on the devices, put there once per variables tree (not once per batch).
    placed: list[Any] = [None, None]

    def predict(variables, images, image_sizes):
        if np.shape(images)[0] % jax.local_device_count():
            raise ValueError(f"eval.batch_size per host ({np.shape(images)[0]}) must be a "
                             f"multiple of the {jax.local_device_count()} local devices")
        if placed[0] is not variables:
            placed[:] = [variables, sharding.replicate(variables, mesh)]
        batch = sharding.shard_batch({"image": images, "image_size": image_sizes}, mesh)
        out = apply(placed[1], batch["image"], batch["image_size"])  # fetched by the caller
        if jax.process_count() == 1:
            return out
        return multihost_utils.process_allgather(out, tiled=True)

    return predict


def gather_batch_metadata(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A host's eval batch with the mapping fields of the global batch (all hosts, in order),
    so host 0 can map the gathered detections of every host back to their images."""
    from jax.experimental import multihost_utils

    out = dict(batch)
    for key in ("image_id", "image_size", "original_size", "image_valid"):
        out[key] = multihost_utils.process_allgather(np.asarray(batch[key]), tiled=True)
    return out
