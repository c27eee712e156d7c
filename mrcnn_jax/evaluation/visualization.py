"""Overlay pictures of detections: translucent masks with outlines, keypoints with their skeleton,
boxes, class names and scores.

`render_detections` draws on a copy of an RGB uint8 image and returns it; sizes of lines and text
scale with the image so that small and large pictures stay legible. Colours are fixed per class
(a golden-ratio walk around the hue circle), so one class has one colour across pictures.
Used by predict.py and, through `make_vis_callback` (predictions beside the ground truth), by the
evaluation.

Shapes: H, W = image size; N = detections.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mrcnn_jax import paths
from mrcnn_jax.data.coco2017 import COCO_CATEGORY_NAMES  # noqa: F401 (callers import it here)

if TYPE_CHECKING:  # the evaluation's types, for the signature only: no import at run time
    from mrcnn_jax.evaluation.inference import ImageDetections


_GOLDEN = 0.618033988749895
# White pixels between the prediction and ground-truth halves of an evaluation picture.
VIS_GAP_PIXELS = 8


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour fixed per class label."""
    hue = (0.1 + int(label) * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` [H, W] bool with a 4-neighbour outside the mask."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
    score_threshold: float = 0.0,
    mask_alpha: float = 0.45,
    keypoints: np.ndarray | None = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Draw detections on an RGB image.

    Args:
      image: [H, W, 3] uint8 RGB.
      boxes: [N, 4] xyxy in the image's pixels.
      labels: [N] int class labels (looked up in `class_names`, else shown as numbers).
      scores: [N] float.
      masks: optional [N, H, W] bool.
      class_names: label -> name.
      score_threshold: detections with a lower score are not drawn.
      mask_alpha: opacity of the mask fill.
      keypoints: optional [N, P, 2 or 3] (x, y[, score]) in the image's pixels, drawn as dots.
      skeleton: 0-based keypoint index pairs joined by lines (e.g. COCO's person skeleton).
    Returns:
      [H, W, 3] uint8, the picture.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"boxes, labels, scores disagree in length: "
                         f"{len(boxes)}, {len(labels)}, {len(scores)}")
    if masks is not None and np.shape(masks) != (len(boxes),) + image.shape[:2]:
        raise ValueError(f"masks must be [{len(boxes)}, {image.shape[0]}, {image.shape[1]}], "
                         f"got {np.shape(masks)}")
    if keypoints is not None:
        keypoints = np.asarray(keypoints, np.float32)
        if keypoints.ndim != 3 or keypoints.shape[0] != len(boxes) or keypoints.shape[2] < 2:
            raise ValueError(f"keypoints must be [{len(boxes)}, P, 2 or 3], got "
                             f"{keypoints.shape}")
    keep = np.nonzero(scores >= score_threshold)[0]
    # Low scores first so the most confident detections end up on top.
    keep = keep[np.argsort(scores[keep], kind="stable")]

    h, w = image.shape[:2]
    canvas = image.astype(np.float32)
    if masks is not None:
        for i in keep:
            m = np.asarray(masks[i], bool)
            color = np.asarray(class_color(labels[i]), np.float32)
            canvas[m] = (1 - mask_alpha) * canvas[m] + mask_alpha * color
            canvas[_mask_outline(m)] = color
    picture = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    line = max(1, round(min(h, w) / 320))
    font = _font(max(11, round(min(h, w) / 45)))
    if keypoints is not None:
        radius = max(2, round(min(h, w) / 160))
        for i in keep:
            color = class_color(labels[i])
            pts = keypoints[i, :, :2]
            for a, b in skeleton or ():
                draw.line([tuple(pts[a]), tuple(pts[b])], fill=color, width=line)
            for x, y in pts:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255),
                             outline=color)
    for i in keep:
        color = class_color(labels[i])
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
        name = (class_names or {}).get(int(labels[i]), str(int(labels[i])))
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(1, th // 5)
        # Label above the box, or inside its top edge when the box touches the image top.
        ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1
        tx = min(max(x1, 0), max(w - tw - 2 * pad, 0))
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), text, fill=ink, font=font)
    return np.asarray(picture)


def make_vis_callback(
    vis_dir: str,
    num_vis: int,
    ground_truth: Any,
    label_to_category_id: Mapping[int, int],
    category_names: Mapping[int, str],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    score_threshold: float = 0.0,
) -> Callable[[Mapping[str, Any], list[ImageDetections]], None] | None:
    """An `on_images` callback of the evaluation writing the first `num_vis` images' overlays.

    Each picture shows the predictions (left) beside the ground truth (right) on the image as the
    model saw it (de-normalised with `pixel_mean` / `pixel_std`, resized back to the original
    size); predictions scoring below `score_threshold` are not drawn.

    Args:
      vis_dir: the folder of the files, `<vis_dir>/<image id>.png`.
      num_vis: pictures to write; 0 returns None (no callback).
      ground_truth: the pycocotools `COCO` of the split.
      label_to_category_id: model label -> category id; category_names: category id -> name.
    """
    if num_vis <= 0:
        return None
    mean = np.asarray(pixel_mean, np.float32)
    std = np.asarray(pixel_std, np.float32)
    gt = ground_truth
    names = {label: category_names.get(cat, str(cat))
             for label, cat in label_to_category_id.items()}
    label_of_category = {cat: label for label, cat in label_to_category_id.items()}
    written: list[str] = []

    def on_images(batch: Mapping[str, Any], images: list[ImageDetections]) -> None:
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
            left = render_detections(
                image, det.boxes, det.labels, det.scores, masks=det.masks, class_names=names,
                score_threshold=score_threshold)
            right = render_detections(
                image, gt_boxes, gt_labels, np.ones(len(gt_labels), np.float32), masks=gt_masks,
                class_names=names)
            gap = np.full((oh, VIS_GAP_PIXELS, 3), 255, np.uint8)
            path = paths.makedirs(vis_dir) / f"{det.image_id}.png"
            with path.open("wb") as f:
                Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(f, format="PNG")
            written.append(os.fspath(path))

    return on_images
