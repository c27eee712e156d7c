"""The inference transform, equal to torchvision's `GeneralizedRCNNTransform`: images in,
detections back out.

Host-side numpy, the reference form (`Predictor` runs the same steps on the device:
`mrcnn_jax.ops.image_resize`). Steps, in torchvision's order:

1. `to_float_image`: uint8 RGB -> float32 in [0, 1] (what `ToTensor` gives torchvision users).
2. `normalize`: (x - mean) / std per channel.
3. `resize_image`: scale = min(min_size / short side, max_size / long side); the new size is
   `floor(side * scale)` computed in float64 (torch's `recompute_scale_factor=True` path), then
   bilinear interpolation with half-pixel centres, **no antialiasing**, and the source scale
   recomputed as in_size / out_size (float32), exactly as torch's CPU `upsample_bilinear2d` does
   (`ops.bilinear.resize_bilinear`).
4. `pad_to_canvas`: zero padding at the bottom/right to a canvas (torchvision pads each batch to the
   max size rounded up to a multiple of 32; `canvas_for` computes that size).

Back, torchvision's `postprocess`: `boxes_to_original` maps boxes (and keypoints) with the float32
ratios original / resized; `detections_to_original` also pastes the masks into the original image
(`ops.masks.paste_masks_in_image`). The evaluation and the `Predictor` both map detections back
with it, so COCO numbers and user-facing outputs come from the same code.

Shapes: H, W = original image; h, w = resized; Hc, Wc = canvas; B = batch; D = detection slots,
N = valid detections, M = mask resolution (28), P = keypoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mrcnn_jax.ops.bilinear import resize_bilinear
from mrcnn_jax.ops.masks import paste_masks_in_image


def rgb_array(image) -> np.ndarray:
    """RGB image (PIL, uint8 [H, W, 3] or float [H, W, 3] in [0, 1]; gray and RGBA converted)
    -> [H, W, 3] uint8 or float32, the pixel values unchanged."""
    if hasattr(image, "convert"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {image.dtype}")
    return image.astype(np.float32, copy=False)


def to_float_image(image) -> np.ndarray:
    """RGB image (as `rgb_array` takes it) -> float32 [H, W, 3] in [0, 1]."""
    image = rgb_array(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image - mean) / std per channel; image: [H, W, 3] float32 -> [H, W, 3] float32."""
    h, w, c = image.shape
    # On rows of w * c values: numpy broadcasting over a minor axis of 3 runs ~5x slower.
    mean = np.tile(np.asarray(mean, np.float32), w)
    std = np.tile(np.asarray(std, np.float32), w)
    out = np.subtract(image.reshape(h, w * c), mean, dtype=np.float32)
    np.divide(out, std, out=out)
    return out.reshape(h, w, c)


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """torchvision's resize factor min(min_size / short side, max_size / long side), float64."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height/width must be positive, got {height}x{width}")
    return min(float(min_size) / min(height, width), float(max_size) / max(height, width))


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after torchvision's resize: floor(side * `resize_scale`), float64 math.

    The one definition of the rule: the tf.data pipeline's graph form
    (`data.input_pipeline._tf_resized_size`) is tested against it.
    """
    scale = resize_scale(height, width, min_size, max_size)
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def preprocess_image(
    image, min_size: int, max_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """One image -> (normalised resized [h, w, 3] float32, (h, w), original (H, W))."""
    image = to_float_image(image)
    original_hw = (int(image.shape[0]), int(image.shape[1]))
    new_hw = resized_size(*original_hw, min_size, max_size)
    image = resize_bilinear(normalize(image, mean, std), new_hw)
    return image, new_hw, original_hw


def canvas_for(sizes_hw: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """torchvision's batch canvas: the max (h, w) over the batch rounded up to the divisibility."""
    d = int(size_divisibility)
    h = max(int(s[0]) for s in sizes_hw)
    w = max(int(s[1]) for s in sizes_hw)
    return -(-h // d) * d, -(-w // d) * d


def pad_to_canvas(images: Sequence[np.ndarray], canvas_hw: tuple[int, int]) -> np.ndarray:
    """Zero-pad each [h, w, 3] image at the bottom/right into one [B, Hc, Wc, 3] float32 batch."""
    hc, wc = int(canvas_hw[0]), int(canvas_hw[1])
    out = np.zeros((len(images), hc, wc, 3), np.float32)
    for i, img in enumerate(images):
        if img.shape[0] > hc or img.shape[1] > wc:
            raise ValueError(
                f"image {i} of size {img.shape[:2]} does not fit canvas_hw {canvas_hw}"
            )
        out[i, : img.shape[0], : img.shape[1]] = img
    return out


def boxes_to_original(
    boxes: np.ndarray, resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> np.ndarray:
    """Scale boxes [..., 4] (xyxy, resized pixels) to original pixels (torchvision's float32
    ratios original / resized per axis)."""
    boxes = np.asarray(boxes, np.float32)
    ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
    ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
    ratios = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    return boxes * ratios


def detections_to_original(
    detections: dict[str, np.ndarray],
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    mask_threshold: float | None = 0.5,
) -> dict[str, np.ndarray]:
    """One image's padded detections (resized pixels) -> its valid detections in original pixels.

    Args:
      detections: boxes [D, 4], scores [D], labels [D], valid [D], and (when the model has
        the branch) mask_probs [D, M, M], keypoints [D, P, 3] (x, y, score) (numpy).
      resized_hw: (h, w) of the image fed to the model.
      original_hw: (H, W) of the input image.
      mask_threshold: masks become `pasted probability > mask_threshold` (bool); None keeps the
        pasted probabilities (float32), like torchvision's model output.
    Returns:
      dict of boxes [N, 4] float32, scores [N], labels [N] int32, masks [N, H, W] (mask
      models), keypoints [N, P, 3] float32 (x, y, score; keypoint models).
    """
    valid = np.asarray(detections["valid"], bool)
    boxes = boxes_to_original(np.asarray(detections["boxes"])[valid], resized_hw, original_hw)
    out = {
        "boxes": boxes,
        "scores": np.asarray(detections["scores"], np.float32)[valid],
        "labels": np.asarray(detections["labels"], np.int32)[valid],
    }
    if "mask_probs" in detections:
        out["masks"] = paste_masks_in_image(
            np.asarray(detections["mask_probs"])[valid], boxes, original_hw,
            threshold=mask_threshold
        )
    if "keypoints" in detections:
        # (x, y) scaled by the same float32 ratios as the boxes; the score column unchanged.
        ratios = boxes_to_original(np.ones(4, np.float32), resized_hw, original_hw)[:2]
        keypoints = np.asarray(detections["keypoints"], np.float32)[valid].copy()
        keypoints[..., :2] *= ratios
        out["keypoints"] = keypoints
    return out
