"""`Predictor`: images of any sizes in, detections in original pixels out.

    predictor = Predictor(config, variables)
    results = predictor([pil_image, numpy_image, ...])
    results[0]["boxes"]   # [N, 4] float32 xyxy, original pixels
    results[0]["labels"]  # [N] int32, 1..K (contiguous model classes)
    results[0]["scores"]  # [N] float32, decreasing
    results[0]["masks"]   # [N, H, W] bool (probabilities > config.model.mask_threshold)
    results[0]["keypoints"]  # [N, P, 3] (x, y, score), original pixels (keypoint models only)

One batch per `batch_size` images: the host copies the pixels (uint8 as given) into a raw batch
bucketed to multiples of `RAW_BUCKET` and computes torchvision's resize taps; the device runs
torchvision's transform (normalise, bilinear resize, pad: `mrcnn_jax.ops.image_resize`, its own
small jit per raw bucket and canvas) and then the jitted `MaskRCNN`; the host scales boxes back
(`transforms.detections_to_original`, as the evaluation does). Masks are pasted at the original
size where `paste` says: on an accelerator the device pastes each detection's crop into a packed
buffer of one bit a pixel (`ops.masks.paste_masks_packed`, in the same jit) and the host only
places the crops; on the CPU backend the host pastes them (`ops.masks.paste_masks_in_image`),
the device form's fixed buffer costing a CPU more than the crops. Both give the same masks.
The canvas is torchvision's (the batch's largest resized size rounded up to `size_divisibility`),
so results equal torchvision's on the same weights; pass `canvas_hw` to use one fixed canvas (one
compilation for every image size). The jitted function is compiled once per (batch size, canvas)
and cached (`num_compilations`).

Glossary: B images per batch, D = detections_per_img, N = valid detections of one image,
H, W = original image size, M = mask resolution (28).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import paths, transforms
from mrcnn_jax.data.label_map import LabelMap
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.ops import image_resize
from mrcnn_jax.ops import masks as mask_ops

# Raw images are padded up to multiples of this many pixels per side before they go to the device:
# the transform's jit compiles once per bucket (COCO's <= 640 px images: at most 5 x 5 buckets).
RAW_BUCKET = 128
PASTES = ("auto", "device", "host")
# Pixels per image of the device paste's buffer, in canvases: 2 x 1344 x 1344 holds the crops of
# ~12 full-size COCO images (640 x 480); detections past it are pasted on the host.
PASTE_CAPACITY_CANVASES = 2

logger = logging.getLogger(__name__)


class Predictor:
    """Batched, jit-compiled Mask R-CNN inference on host images (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        variables: Any,
        batch_size: int = 1,
        canvas_hw: Sequence[int] | None = None,
        paste: str = "auto",
        paste_capacity: int | None = None,
    ):
        """config: the full config (model + data); variables: {"params", "batch_stats"};
        paste: where masks are pasted, "auto" | "device" | "host" (`resolve_paste`);
        paste_capacity: pixels per image of the device paste's buffer (default
        `PASTE_CAPACITY_CANVASES` canvases; crops past it are pasted on the host)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.model = MaskRCNN(config.model)
        self.variables = jax.device_put(variables)
        self.batch_size = int(batch_size)
        self.canvas_hw = None if canvas_hw is None else (int(canvas_hw[0]), int(canvas_hw[1]))
        threshold = config.model.mask_threshold
        self.paste = resolve_paste(paste)
        if not config.model.mask_head:
            self.paste = "host"  # nothing to paste
        elif self.paste == "device" and threshold is None:
            if paste == "device":
                raise ValueError("paste='device' needs model.mask_threshold: the device pastes "
                                 "thresholded masks, mask_threshold=None asks for probabilities")
            self.paste = "host"

        def infer(v, images, image_sizes):
            return self.model.apply(v, images, image_sizes)

        def detect(v, images, image_sizes, original_sizes):
            out = infer(v, images, image_sizes)
            capacity = paste_buffer_pixels(images.shape[1:3], paste_capacity)
            out.update(mask_ops.paste_masks_packed(
                out["mask_probs"], out["boxes"], out["valid"], image_sizes, original_sizes,
                capacity, float(threshold)))
            return out

        self._infer = jax.jit(infer)
        self._detect = jax.jit(detect) if self.paste == "device" else None
        d = config.data
        self._transform = jax.jit(lambda raw, rows, cols: image_resize.normalize_resize_pad(
            raw, rows, cols, tuple(d.pixel_mean), tuple(d.pixel_std)))

    @property
    def num_compilations(self) -> int:
        """Compilations of the model so far: one per distinct (batch, canvas) shape."""
        return (self._detect or self._infer)._cache_size()

    def preprocess(self, images: Sequence[Any]):
        """Images -> (canvas batch [B, Hc, Wc, 3] float32 on the device, resized sizes [B, 2]
        int32, original sizes): torchvision's transform, computed on the device."""
        raw, rows, cols, sizes, originals = host_inputs(images, self.config.data, self.canvas_hw)
        return self._transform(raw, rows, cols), sizes, originals

    def run_model(self, batch: Any, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """The jitted model on one preprocessed batch ([B, Hc, Wc, 3], numpy or on the device);
        padded detections as numpy."""
        out = self._infer(self.variables, jnp.asarray(batch), jnp.asarray(image_sizes))
        return jax.tree_util.tree_map(np.asarray, out)

    def __call__(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Images (PIL, uint8 or [0, 1] float RGB arrays, any sizes) -> one dict per image."""
        if not isinstance(images, (list, tuple)):
            raise ValueError("images must be a list of images (PIL or numpy RGB arrays)")
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch, sizes, originals = self.preprocess(chunk)
            if self._detect is None:
                out = self.run_model(batch, sizes)
                results += [transforms.detections_to_original(
                    {k: v[i] for k, v in out.items()}, tuple(sizes[i]), originals[i],
                    self.config.model.mask_threshold) for i in range(len(chunk))]
            else:
                results += self._pasted_on_device(batch, sizes, originals)
        return results

    def _pasted_on_device(self, batch: jax.Array, sizes: np.ndarray,
                          originals: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """One preprocessed batch through the model and the device paste: the crops come back
        packed and are placed in zeros here (the masks `detections_to_original` would paste)."""
        out = self._detect(self.variables, batch, jnp.asarray(sizes),
                           jnp.asarray(np.asarray(originals, np.int32)))
        host = {k: np.asarray(v) for k, v in out.items() if k != "mask_probs"}
        # Brought to the host only if some crop did not fit the device's buffer.
        mask_probs = functools.cache(lambda: np.asarray(out["mask_probs"]))
        results = []
        for i, original in enumerate(originals):
            result = transforms.detections_to_original(
                {k: v[i] for k, v in host.items()}, tuple(sizes[i]), original)
            crops = mask_crops(host, i, result["boxes"], original,
                               self.config.model.mask_threshold, mask_probs)
            result["masks"] = mask_ops.crops_to_dense(crops, original)
            results.append(result)
        return results


def resolve_paste(paste: str) -> str:
    """"device" or "host" for a `paste` setting; "auto" is the host on the CPU backend (where
    the device paste's fixed buffer costs more than the crops themselves), else the device."""
    if paste not in PASTES:
        raise ValueError(f"paste must be one of {', '.join(PASTES)}, got {paste!r}")
    if paste == "auto":
        return "host" if jax.default_backend() == "cpu" else "device"
    return paste


def paste_buffer_pixels(canvas_hw: Sequence[int], paste_capacity: int | None = None) -> int:
    """The device paste's pixels per image: `paste_capacity`, else `PASTE_CAPACITY_CANVASES`
    canvases, rounded up to a multiple of 8 (whole bytes of bits)."""
    capacity = paste_capacity or PASTE_CAPACITY_CANVASES * int(canvas_hw[0]) * int(canvas_hw[1])
    return -(-int(capacity) // 8) * 8


def mask_crops(host: Mapping[str, np.ndarray], index: int, boxes: np.ndarray,
               original_hw: tuple[int, int], threshold: float,
               mask_probs: Callable[[], np.ndarray]) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Image `index`'s valid detections as thresholded mask crops (`ops.masks.paste_mask_crops`'
    form): unpacked from the device paste where `host` has its outputs (`mask_bits`,
    `paste_boxes`, `mask_offsets`, `mask_pasted`, [B, ...] numpy) and the crop fit the buffer;
    the rest pasted here from `mask_probs()` ([B, D, M, M], asked for only then).

    host: at least `valid` [B, D]; boxes: [N, 4] the valid detections' boxes, original pixels.
    """
    keep = np.flatnonzero(host["valid"][index])
    if "mask_bits" in host:
        crops = mask_ops.unpack_crops(
            host["mask_bits"][index], host["paste_boxes"][index][keep],
            host["mask_offsets"][index][keep], host["mask_pasted"][index][keep], original_hw)
    else:
        crops = [None] * len(keep)
    missing = [j for j, crop in enumerate(crops) if crop is None]
    if missing:
        on_host = mask_ops.paste_mask_crops(mask_probs()[index][keep[missing]], boxes[missing],
                                            original_hw, threshold)
        for j, crop in zip(missing, on_host):
            crops[j] = crop
        if "mask_bits" in host:
            logger.info("%d detections past the device paste's buffer pasted on the host",
                        len(missing))
    return crops


def host_inputs(images: Sequence[Any], data_config: Any,
                canvas_hw: Sequence[int] | None = None):
    """The host's part of the transform: images -> (raw [B, Hb, Wb, 3] uint8 (float32 [0, 1]
    when any image is float) bucketed to multiples of `RAW_BUCKET`, row taps, column taps
    (`image_resize.axis_taps`, stacked: [B, Hc] / [B, Wc] each), resized sizes [B, 2] int32,
    original sizes [(H, W)]). The canvas: `canvas_hw`, else torchvision's for the batch."""
    d = data_config
    pixels = [transforms.rgb_array(im) for im in images]
    originals = [(int(p.shape[0]), int(p.shape[1])) for p in pixels]
    sizes = [transforms.resized_size(*hw, d.min_size, d.max_size) for hw in originals]
    canvas = canvas_hw or transforms.canvas_for(sizes, d.size_divisibility)
    for i, (h, w) in enumerate(sizes):
        if h > canvas[0] or w > canvas[1]:
            raise ValueError(f"image {i} of resized size {(h, w)} does not fit canvas_hw "
                             f"{tuple(canvas)}")
    bucket = [-(-max(hw[k] for hw in originals) // RAW_BUCKET) * RAW_BUCKET for k in (0, 1)]
    dtype = np.uint8 if all(p.dtype == np.uint8 for p in pixels) else np.float32
    raw = np.zeros((len(pixels), *bucket, 3), dtype)
    for i, p in enumerate(pixels):
        # uint8 images alongside float ones: [0, 1] floats like the rest of the batch.
        raw[i, : p.shape[0], : p.shape[1]] = (p / np.float32(255.0) if p.dtype != dtype
                                              else p)
    taps = [[image_resize.axis_taps(o[k], s[k], canvas[k]) for o, s in zip(originals, sizes)]
            for k in (0, 1)]
    rows, cols = (tuple(np.stack(t) for t in zip(*axis)) for axis in taps)
    return raw, rows, cols, np.asarray(sizes, np.int32), originals


# --- Files: weights in, images in, COCO-style json and overlay pictures out -------------------

def abstract_variables(model_config: Any) -> Any:
    """Shapes/dtypes of `MaskRCNN(model_config)` variables (no memory, no compute)."""
    model = MaskRCNN(model_config)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    sizes = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, sizes)


def load_weights(path: str | os.PathLike, model_config: Any) -> Any:
    """Variables from any `--weights` path (`checkpoints.weights.locate`); updates
    `model_config` in place with what the weights need. See `load_weights_and_label_map`."""
    return load_weights_and_label_map(path, model_config)[0]


def load_weights_and_label_map(path: str | os.PathLike,
                               model_config: Any) -> tuple[Any, LabelMap | None]:
    """(variables, the label map that travels with them or None) from a training workdir (its
    latest checkpoint), its checkpoints/ folder or one step of it, an orbax variables directory
    (`checkpoints/orbax_io.py`) or a torchvision state_dict file (.pth/.pt/.safetensors/.npz).

    Updates `model_config` in place: a training run's model (its config.json, `conv_impl`
    excepted) and number of classes, the overrides exported variables carry, torchvision's
    (v1 COCO weights: frozen_bn_eps = 0; v2 weights keep 1e-5 and need configs/fpn_r50_v2.py's
    model, else a ValueError names the first key and the config). Raises FileNotFoundError /
    ValueError naming the path.
    """
    from mrcnn_jax.checkpoints import orbax_io
    from mrcnn_jax.checkpoints import torchvision as tv_import
    from mrcnn_jax.checkpoints import weights

    source = weights.locate(path)
    label_map = source.label_map()
    if source.kind == weights.TRAINING:
        trained = source.model_config()
        if trained is not None:
            _update_model_config(model_config, trained, source.describe())
        if label_map is not None:
            model_config.num_classes = label_map.num_classes
        logger.info("weights: %s", source.describe())
        return source.restore_variables(), label_map
    if source.kind == weights.VARIABLES:
        model_config.update(orbax_io.load_model_overrides(source.path))
        if label_map is not None:
            model_config.num_classes = label_map.num_classes
        return orbax_io.restore_variables(source.path, abstract_variables(model_config)), label_map
    variables, overrides = tv_import.import_maskrcnn(source.path, model_config)
    model_config.update(overrides)
    return variables, None


# Model fields a prediction chooses for itself whatever the training run used: the layers and
# the precision of this backend, the inference thresholds and budgets, and `remat` (a backward's
# setting, nothing to a forward).
INFERENCE_FIELDS = frozenset({
    "conv_impl", "dtype", "remat", "box_score_thresh", "box_nms_thresh", "detections_per_img",
    "box_nms_candidates", "mask_threshold", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "keypoint_max_map_size"})


def label_map_of(num_classes: int, categories_path: str,
                 weights_label_map: LabelMap | None) -> LabelMap | None:
    """The label map of predictions (predict.py's json and pictures, export.py's meta.json): from
    `categories_path` (--categories: a COCO-format json, mapped as training maps it), else the
    one that came with the weights (a training run's), else COCO's names for torchvision's
    91-way head; None: labels stay as they are."""
    from mrcnn_jax.data import coco_json, label_map
    from mrcnn_jax.evaluation.visualization import COCO_CATEGORY_NAMES

    if categories_path:
        path = pathlib.Path(categories_path)
        if not path.is_file():
            raise FileNotFoundError(f"categories file not found: {path}")
        index = coco_json.load_index(path, "--categories")
        used = {ann["category_id"] for anns in index.annotations_by_image.values()
                for _, ann in anns} or None  # a json of categories only: all of them
        mapping, notes = label_map.label_map_for_data(
            zip(index.category_ids, index.category_names), used, num_classes)
        for note in notes:
            logger.info("label map: %s", note)
        return mapping
    if weights_label_map is not None:
        return weights_label_map
    if num_classes == label_map.TORCHVISION_COCO_NUM_CLASSES:
        ids = sorted(c for c in COCO_CATEGORY_NAMES if c)
        return label_map.coco_label_map(ids, [COCO_CATEGORY_NAMES[c] for c in ids])
    return None


def _update_model_config(model_config: Any, trained: Mapping[str, Any], where: str) -> None:
    """`model_config` takes the trained model's architecture (every field but
    `INFERENCE_FIELDS`); the fields that differ are logged."""
    changed = []
    for key, value in trained.items():
        if key in INFERENCE_FIELDS or key not in model_config:
            continue
        current = model_config[key]
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if current != value:
            changed.append(f"{key}={value!r} (config: {current!r})")
            model_config[key] = value
    if changed:
        logger.info("model as trained in %s: %s", where, ", ".join(changed))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB. Errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = paths.resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with path.open("rb") as f, Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def coco_results(
    result: Mapping[str, np.ndarray], category_ids: Mapping[int, int] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections (`Predictor` output) -> COCO-style result dicts: bbox [x, y, w, h]
    (original pixels), category_id (label mapped by `category_ids`, identity by default), score,
    segmentation (RLE with a str `counts`; mask models), keypoints [x1, y1, s1, ...] (keypoint
    models; s = the keypoint's score) and category_name when names are known."""
    from mrcnn_jax.evaluation.coco_evaluator import encode_masks

    rles = encode_masks(result["masks"]) if "masks" in result else None
    out = []
    for i in range(len(result["scores"])):
        x1, y1, x2, y2 = (float(v) for v in result["boxes"][i])
        label = int(result["labels"][i])
        entry = {
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "category_id": int((category_ids or {}).get(label, label)),
            "score": float(result["scores"][i]),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        if "keypoints" in result:
            entry["keypoints"] = [float(v) for v in np.asarray(result["keypoints"][i]).reshape(-1)]
        if class_names and label in class_names:
            entry["category_name"] = class_names[label]
        out.append(entry)
    return out


def write_outputs(
    out_dir: str | os.PathLike, name: str, image: np.ndarray, result: Mapping[str, np.ndarray],
    category_ids: Mapping[int, int] | None = None, class_names: Mapping[int, str] | None = None,
    vis_threshold: float = 0.5,
    skeleton: Sequence[tuple[int, int]] | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write NAME.json (COCO-style list) and NAME.png (overlay of detections >= vis_threshold;
    keypoints joined by `skeleton`, 0-based index pairs)."""
    from PIL import Image

    from mrcnn_jax.evaluation.visualization import render_detections

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(coco_results(result, category_ids, class_names)))
    picture = render_detections(image, result["boxes"], result["labels"], result["scores"],
                                result.get("masks"), class_names, score_threshold=vis_threshold,
                                keypoints=result.get("keypoints"), skeleton=skeleton)
    Image.fromarray(picture).save(png_path)
    return json_path, png_path
