"""`Predictor`: images of any sizes in, detections in original pixels out.

    predictor = Predictor(config, variables)
    results = predictor([pil_image, numpy_image, ...])
    results[0]["boxes"]   # [N, 4] float32 xyxy, original pixels
    results[0]["labels"]  # [N] int32, 1..K (contiguous model classes)
    results[0]["scores"]  # [N] float32, decreasing
    results[0]["masks"]   # [N, H, W] bool (probabilities > config.model.mask_threshold)

Host side: the torchvision transform (`mrcnn_jax.transforms`), one batch per `batch_size` images
padded to a canvas, then the jitted `MaskRCNN` on the device, then boxes scaled back and masks
pasted at the original size (`mrcnn_jax.ops.masks`). The canvas is torchvision's (the batch's
largest resized size rounded up to `size_divisibility`), so results equal torchvision's on the same
weights; pass `canvas_hw` to use one fixed canvas (one compilation for every image size). The jitted
function is compiled once per (batch size, canvas) and cached (`num_compilations`).

Glossary: B images per batch, D = detections_per_img, N = valid detections of one image,
H, W = original image size, M = mask resolution (28).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import transforms
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.ops.masks import paste_masks_in_image


def detections_to_original(
    detections: dict[str, np.ndarray],
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    mask_threshold: float | None = 0.5,
) -> dict[str, np.ndarray]:
    """One image's padded detections (resized pixels) -> its valid detections in original pixels.

    Args:
      detections: boxes [D, 4], scores [D], labels [D], valid [D], mask_probs [D, M, M] (numpy).
      resized_hw: (h, w) of the image fed to the model.
      original_hw: (H, W) of the input image.
      mask_threshold: masks become `pasted probability > mask_threshold` (bool); None keeps the
        pasted probabilities (float32), like torchvision's model output.
    Returns:
      dict of boxes [N, 4] float32, scores [N], labels [N] int32, masks [N, H, W].
    """
    valid = np.asarray(detections["valid"], bool)
    boxes = transforms.boxes_to_original(
        np.asarray(detections["boxes"])[valid], resized_hw, original_hw
    )
    masks = paste_masks_in_image(
        np.asarray(detections["mask_probs"])[valid], boxes, original_hw, threshold=mask_threshold
    )
    return {
        "boxes": boxes,
        "scores": np.asarray(detections["scores"], np.float32)[valid],
        "labels": np.asarray(detections["labels"], np.int32)[valid],
        "masks": masks,
    }


class Predictor:
    """Batched, jit-compiled Mask R-CNN inference on host images (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        variables: Any,
        batch_size: int = 1,
        canvas_hw: Sequence[int] | None = None,
    ):
        """config: the full config (model + data); variables: {"params", "batch_stats"}."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.model = MaskRCNN(config.model)
        self.variables = jax.device_put(variables)
        self.batch_size = int(batch_size)
        self.canvas_hw = None if canvas_hw is None else (int(canvas_hw[0]), int(canvas_hw[1]))
        self._compiled: dict[tuple[int, int, int], Any] = {}

        def infer(v, images, image_sizes):
            return self.model.apply(v, images, image_sizes)

        self._infer = jax.jit(infer)

    @property
    def num_compilations(self) -> int:
        """Distinct (batch, canvas) shapes compiled so far."""
        return len(self._compiled)

    def preprocess(self, images: Sequence[Any]):
        """Images -> (canvas batch [B, Hc, Wc, 3], resized sizes [B, 2] int32, original sizes)."""
        d = self.config.data
        pre = [transforms.preprocess_image(im, d.min_size, d.max_size, d.pixel_mean, d.pixel_std)
               for im in images]
        sizes = [p[1] for p in pre]
        canvas = self.canvas_hw or transforms.canvas_for(sizes, d.size_divisibility)
        batch = transforms.pad_to_canvas([p[0] for p in pre], canvas)
        return batch, np.asarray(sizes, np.int32), [p[2] for p in pre]

    def run_model(self, batch: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """The jitted model on one preprocessed batch; padded detections as numpy."""
        key = batch.shape[:3]
        if key not in self._compiled:
            self._compiled[key] = True
        out = self._infer(self.variables, jnp.asarray(batch), jnp.asarray(image_sizes))
        return jax.tree_util.tree_map(np.asarray, out)

    def __call__(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Images (PIL, uint8 or [0, 1] float RGB arrays, any sizes) -> one dict per image."""
        if not isinstance(images, (list, tuple)):
            raise ValueError("images must be a list of images (PIL or numpy RGB arrays)")
        results = []
        threshold = self.config.model.mask_threshold
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch, sizes, originals = self.preprocess(chunk)
            out = self.run_model(batch, sizes)
            for i in range(len(chunk)):
                dets = {k: v[i] for k, v in out.items()}
                results.append(detections_to_original(dets, tuple(sizes[i]), originals[i],
                                                      threshold))
        return results
