"""The predictor as a serialised program: `jax.export` (model.jax) and a TF SavedModel (jax2tf).

    export_model(config, variables, "exported/", batch_size=1, platforms=("cpu",))
    predict = load("exported/")          # numpy + jax only: no flax, no model code
    results = predict([image, ...])      # as `Predictor.__call__`: per image boxes, labels,
                                         # scores, masks (and keypoints), original pixels

The exported function is the whole device side of `Predictor` in one program: torchvision's
resize rule and resize taps computed from the image sizes, normalise + resize + pad
(`ops.image_resize`), the model, and the detections scaled back to original pixels:

    detect(weights, images [B, Hc, Wc, 3] uint8, image_sizes [B, 2] int32 (H, W))
      -> boxes [B, D, 4] float32 (xyxy, original pixels), scores [B, D] float32,
         labels [B, D] int32, valid [B, D] bool, num_detections [B] int32,
         mask_probs [B, D, M, M] float32 (mask models: the predicted class, not pasted),
         keypoints [B, D, P, 3] float32 (keypoint models: x, y in original pixels, score)

Each image sits at the top left of the uint8 canvas (the rest is ignored). One compiled program
covers every image up to the canvas; the canvas must hold the largest resized image
(max_size x max_size rounded up to size_divisibility), and `load` shrinks a larger image on the
host by the model's own rule before it goes in (its results then differ from `Predictor`'s by
the uint8 rounding of that shrink), so nothing is ever cropped. The masks are pasted at the
original size on the host (`transforms.detections_to_original`, numpy), as `Predictor` does.

torchvision's resized size and tap coordinates are float64 arithmetic (`transforms.resized_size`,
`ops.bilinear.bilinear_source_taps`). JAX traces the model without 64-bit types, so those few
per-image scalars are traced on their own with 64-bit types on (`_resize_plan`) and called from
the model's function: the exported program computes the same taps as the host, to the bit.

Files written by `export_model` into DIR:
  model.jax      `jax.export` serialisation of `detect` for `platforms`
  weights.npz    the variables, one array per leaf, in the order meta.json's `weights` lists
  saved_model/   the same function through `jax2tf` (native serialisation) as a TF SavedModel,
                 signature `serving_default` (inputs images, image_sizes; outputs as above),
                 variables as TF variables: servable by TF Serving
  meta.json      labels (label -> category id -> name), canvas, batch size, preprocessing,
                 platforms, versions, input/output signature (docs/deploy.md lists the fields)

Glossary: B = batch_size, Hc x Wc = canvas, D = detections_per_img, M = mask resolution (28),
P = keypoints, H x W = an original image.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import transforms
from mrcnn_jax.ops.bilinear import resize_bilinear

if TYPE_CHECKING:
    from mrcnn_jax.data.label_map import LabelMap

# jax.export's names of the platforms a program may be lowered for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
MODEL_FILE = "model.jax"
WEIGHTS_FILE = "weights.npz"
SAVED_MODEL_DIR = "saved_model"
META_FILE = "meta.json"
FORMAT = "mrcnn_jax.export/1"
INPUT_NAMES = ("images", "image_sizes")
# StableHLO compatibility window of the SavedModel's program (`_stablehlo_window`).
SAVED_MODEL_STABLEHLO_WINDOW = "WEEK_12"


# --- Building the program ----------------------------------------------------------------------

def check_platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
    """"cpu,tpu" or ("cpu", "tpu") -> ("cpu", "tpu"); an unknown name is a ValueError naming it."""
    if isinstance(platforms, str):
        platforms = [p for p in platforms.split(",") if p.strip()]
    platforms = tuple(p.strip().lower() for p in platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"unknown platform(s) {unknown or platforms!r}: expected one or more of "
                         f"{', '.join(PLATFORMS)} (comma-separated)")
    return tuple(dict.fromkeys(platforms))


def default_canvas(data_config: Any) -> tuple[int, int]:
    """The smallest square canvas that holds every resized image: max_size rounded up to
    size_divisibility on both sides."""
    d = int(data_config.size_divisibility)
    side = -(-int(data_config.max_size) // d) * d
    return side, side


def check_canvas(canvas_hw: Sequence[int], data_config: Any) -> tuple[int, int]:
    """A canvas (H, W) that holds any resized image and is a multiple of size_divisibility."""
    hc, wc = (int(v) for v in canvas_hw)
    d, max_size = int(data_config.size_divisibility), int(data_config.max_size)
    if min(hc, wc) < max_size:
        raise ValueError(f"canvas {hc}x{wc} does not cover data.max_size={max_size}: a resized "
                         f"image can be up to {max_size} pixels on either side; use at least "
                         f"{default_canvas(data_config)}")
    if hc % d or wc % d:
        raise ValueError(f"canvas {hc}x{wc} is not a multiple of data.size_divisibility={d}")
    return hc, wc


def _resize_plan(image_sizes: jax.Array, canvas_hw: tuple[int, int], min_size: int,
                 max_size: int):
    """Original sizes [B, 2] int32 -> (resized sizes [B, 2] int32, row taps, col taps) with the
    arithmetic of `transforms.resized_size` and `image_resize.axis_taps` (float64 where those
    use it). Traced with 64-bit types on (`_export_resize_plan`)."""
    f32, f64 = jnp.float32, jnp.float64
    sizes = image_sizes.astype(f64)
    scale = jnp.minimum(f64(min_size) / sizes.min(axis=1), f64(max_size) / sizes.max(axis=1))
    resized = jnp.floor(sizes * scale[:, None]).astype(jnp.int32)

    def taps(in_size, out_size, canvas):
        step = in_size.astype(f32) / out_size.astype(f32)
        dst = jnp.arange(canvas, dtype=f32) + f32(0.5)
        src = (step.astype(f64)[:, None] * dst.astype(f64) - f64(0.5)).astype(f32)
        src = jnp.maximum(src, f32(0.0))
        i0 = src.astype(jnp.int32)
        i1 = jnp.minimum(i0 + 1, in_size[:, None] - 1)
        w1 = src - i0.astype(f32)
        w0 = f32(1.0) - w1
        inside = jnp.arange(canvas)[None, :] < out_size[:, None]  # zero weights past the image
        return (jnp.where(inside, i0, 0), jnp.where(inside, i1, 0),
                jnp.where(inside, w0, f32(0.0)), jnp.where(inside, w1, f32(0.0)))

    rows = taps(image_sizes[:, 0], resized[:, 0], canvas_hw[0])
    cols = taps(image_sizes[:, 1], resized[:, 1], canvas_hw[1])
    return resized, rows, cols


def _export_resize_plan(batch_size, canvas_hw, data_config, platforms):
    """`_resize_plan` as its own exported function (traced with 64-bit types)."""
    import functools

    fn = functools.partial(_resize_plan, canvas_hw=canvas_hw, min_size=int(data_config.min_size),
                           max_size=int(data_config.max_size))
    with jax.enable_x64(True):
        return jax.export.export(jax.jit(fn), platforms=platforms)(
            jax.ShapeDtypeStruct((batch_size, 2), jnp.int32))


def resolve_model_config(model_config: Any, platforms: Sequence[str]) -> Any:
    """A copy of `model_config` with "auto" resolved for the export. `conv_impl`: the CPU kernels
    for a CPU-only export, flax's stock layers as soon as an accelerator is among `platforms`
    (what cuDNN and the TPU compiler run best; same parameters, modeling/conv.py). `dtype`: what
    "auto" means on the platforms (bfloat16 for a TPU-only export) when they all agree, else
    float32 (one program serves them all), not the exporting machine's backend."""
    from mrcnn_jax.modeling import precision  # the loader side imports no model code

    resolved = model_config.copy_and_resolve_references()
    if resolved.conv_impl == "auto":
        resolved.conv_impl = "cpu" if tuple(platforms) == ("cpu",) else "xla"
    if resolved.dtype == "auto":
        names = {precision.resolve_dtype_name("auto", p) for p in platforms}
        resolved.dtype = names.pop() if len(names) == 1 else "float32"
    return resolved


def make_detect_fn(config: Any, model_config: Any, treedef: Any, batch_size: int,
                   canvas_hw: tuple[int, int], platforms: Sequence[str]):
    """The exported function `detect(weights, images, image_sizes)` (module docstring);
    `weights` is the tuple of the variables' leaves in `treedef`'s order."""
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from mrcnn_jax.ops import image_resize

    model = MaskRCNN(model_config)
    d = config.data
    plan = _export_resize_plan(batch_size, canvas_hw, d, tuple(platforms))
    mean, std = tuple(d.pixel_mean), tuple(d.pixel_std)

    def detect(weights, images, image_sizes):
        variables = jax.tree_util.tree_unflatten(treedef, weights)
        resized, rows, cols = plan.call(image_sizes)
        batch = image_resize.normalize_resize_pad(images, rows, cols, mean, std)
        dets = model.apply(variables, batch, resized)
        # transforms.boxes_to_original's float32 ratios original / resized.
        ratio_hw = image_sizes.astype(jnp.float32) / resized.astype(jnp.float32)
        ratio_xy = ratio_hw[:, ::-1]
        out = {
            "boxes": dets["boxes"] * jnp.tile(ratio_xy, 2)[:, None, :],
            "scores": dets["scores"],
            "labels": dets["labels"],
            "valid": dets["valid"],
            "num_detections": jnp.sum(dets["valid"], axis=1, dtype=jnp.int32),
        }
        if "mask_probs" in dets:
            out["mask_probs"] = dets["mask_probs"]
        if "keypoints" in dets:
            kps = dets["keypoints"]
            out["keypoints"] = kps.at[..., :2].multiply(ratio_xy[:, None, None, :])
        return out

    return detect


def _leaf_names(variables: Any) -> tuple[list[str], list[np.ndarray], Any]:
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves_with_paths]
    leaves = [np.asarray(leaf) for _, leaf in leaves_with_paths]
    for name, leaf in zip(names, leaves):
        if leaf.dtype.kind not in "fiub":
            raise ValueError(f"variable {name} has dtype {leaf.dtype}: export float/int weights")
    return names, leaves, treedef


def _signature(exported: Any) -> dict[str, Any]:
    outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    inputs = exported.in_avals[-2:]
    return {
        "inputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype)}
                   for name, a in zip(INPUT_NAMES, inputs)},
        "outputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype)}
                    for name, a in sorted(outputs.items())},
    }


def export_model(
    config: Any,
    variables: Any,
    out_dir: str | os.PathLike,
    batch_size: int = 1,
    canvas_hw: Sequence[int] | None = None,
    platforms: Sequence[str] | str = ("cpu",),
    label_map: LabelMap | None = None,
    saved_model: bool = True,
) -> dict[str, Any]:
    """Write model.jax, weights.npz, meta.json and (`saved_model`) saved_model/ into `out_dir`
    (module docstring); returns the meta dict.

    config: the full config (model + data); variables: {"params", "batch_stats"} of
    `MaskRCNN(config.model)`; label_map: label -> category id -> name for meta.json
    (`predictor.label_map_of`), None: labels stay 1..K.
    """
    import mrcnn_jax

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    platforms = check_platforms(platforms)
    canvas_hw = check_canvas(canvas_hw or default_canvas(config.data), config.data)
    model_config = resolve_model_config(config.model, platforms)
    names, leaves, treedef = _leaf_names(variables)
    detect = make_detect_fn(config, model_config, treedef, batch_size, canvas_hw, platforms)
    specs = (tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves),
             jax.ShapeDtypeStruct((batch_size, *canvas_hw, 3), jnp.uint8),
             jax.ShapeDtypeStruct((batch_size, 2), jnp.int32))
    exported = jax.export.export(jax.jit(detect), platforms=platforms)(*specs)

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(exported.serialize())
    np.savez(out_dir / WEIGHTS_FILE, **{f"{i:05d}": leaf for i, leaf in enumerate(leaves)})
    m, d = model_config, config.data
    meta = {
        "format": FORMAT,
        "batch_size": int(batch_size),
        "canvas": list(canvas_hw),
        "platforms": list(platforms),
        "labels": label_map.to_json()["labels"] if label_map is not None else [],
        "num_classes": int(m.num_classes),
        "detections_per_img": int(m.detections_per_img),
        "mask_threshold": float(m.mask_threshold),
        "mask_head": bool(m.mask_head),
        "keypoint_head": bool(m.keypoint_head),
        "num_keypoints": int(m.num_keypoints) if m.keypoint_head else 0,
        "conv_impl": str(m.conv_impl),
        "compute_dtype": str(m.dtype),
        "preprocessing": {
            "pixel_mean": [float(v) for v in d.pixel_mean],
            "pixel_std": [float(v) for v in d.pixel_std],
            "min_size": int(d.min_size),
            "max_size": int(d.max_size),
            "size_divisibility": int(d.size_divisibility),
            "resize": "scale = min(min_size / min(H, W), max_size / max(H, W)) in float64; "
                      "(h, w) = floor((H, W) * scale); bilinear, half-pixel centres, no "
                      "antialiasing (torchvision's GeneralizedRCNNTransform)",
        },
        **_signature(exported),
        "weights": names,
        "files": {"model": MODEL_FILE, "weights": WEIGHTS_FILE,
                  "saved_model": SAVED_MODEL_DIR if saved_model else None},
        "versions": {"jax": jax.__version__, "jaxlib": _version("jaxlib"),
                     "mrcnn_jax": mrcnn_jax.__version__},
    }
    if saved_model:
        meta["versions"]["tensorflow"] = write_saved_model(
            out_dir / SAVED_MODEL_DIR, detect, specs, names, leaves, platforms)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_saved_model(path: pathlib.Path, detect, specs, names, leaves, platforms) -> str:
    """`detect` through jax2tf (native serialisation for `platforms`) as a SavedModel whose
    `serving_default` signature takes images and image_sizes; the weights are TF variables.
    Returns TensorFlow's version."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    tf_detect = jax2tf.convert(detect, native_serialization_platforms=tuple(platforms),
                               with_gradient=False)
    module = tf.Module()
    module.weights = [tf.Variable(leaf, trainable=False, name=name.replace("/", "."))
                      for name, leaf in zip(names, leaves)]
    _, images, sizes = specs

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec(images.shape, tf.uint8, name=INPUT_NAMES[0]),
        tf.TensorSpec(sizes.shape, tf.int32, name=INPUT_NAMES[1])])
    def serve(images, image_sizes):
        return tf_detect(tuple(module.weights), images, image_sizes)

    module.serve = serve
    with _stablehlo_window(SAVED_MODEL_STABLEHLO_WINDOW):  # jax2tf lowers here, when traced
        tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return tf.__version__


@contextlib.contextmanager
def _stablehlo_window(requirement: str):
    """Serialise the StableHLO of the programs lowered inside for StableHLO's `requirement`
    compatibility window instead of jax's default (4 weeks).

    jax 0.10 writes its modules as StableHLO 1.15.0 portable artifacts, and TensorFlow 2.21's
    XlaCallModule reads up to 1.13.7 (the 12-week window): without this, running the SavedModel
    fails with "failed to deserialize portable artifact using StableHLO_v1.13.7" at the model's
    first `lax.top_k`. jax has no public switch for the version, so this swaps the function
    `jax._src.export._export` asks for it while the SavedModel is traced.
    """
    from jax._src.export import _export

    hlo = _export.hlo
    original = hlo.get_version_from_compatibility_requirement
    window = getattr(hlo.StablehloCompatibilityRequirement, requirement)
    hlo.get_version_from_compatibility_requirement = lambda _: original(window)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = original


# --- Loading: numpy + jax only -------------------------------------------------------------------

class ExportedPredictor:
    """`load(DIR)`: the exported program with `Predictor.__call__`'s interface."""

    def __init__(self, directory: str | os.PathLike):
        directory = pathlib.Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a directory written by export.py")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT}")
        backend = jax.default_backend()  # "gpu" for both cuda and rocm
        names = ("cuda", "rocm") if backend == "gpu" else (backend,)
        if not set(names) & set(self.meta["platforms"]):
            raise ValueError(f"{directory} was exported for {self.meta['platforms']}, this process "
                             f"runs on {backend}: export again with --platforms={names[0]}")
        self._exported = jax.export.deserialize(bytearray((directory / MODEL_FILE).read_bytes()))
        with np.load(directory / WEIGHTS_FILE) as npz:
            weights = tuple(npz[f"{i:05d}"] for i in range(len(self.meta["weights"])))
        self._weights = jax.device_put(weights)
        self._call = jax.jit(self._exported.call)
        self.batch_size = int(self.meta["batch_size"])
        self.canvas_hw = tuple(self.meta["canvas"])

    @property
    def category_ids(self) -> dict[int, int]:
        return {e["label"]: e["category_id"] for e in self.meta["labels"]}

    @property
    def class_names(self) -> dict[int, str]:
        return {e["label"]: e["name"] for e in self.meta["labels"]}

    def run(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program: images [B, Hc, Wc, 3] uint8, image_sizes [B, 2] int32 ->
        its padded outputs as numpy (module docstring)."""
        out = self._call(self._weights, np.asarray(images, np.uint8),
                         np.asarray(image_sizes, np.int32))
        return {k: np.asarray(v) for k, v in out.items()}

    def _fit(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """(uint8 pixels that fit the canvas, original (H, W)): a larger image is shrunk to its
        resized size (the model's rule, so the model's own resize is then the identity)."""
        pixels = transforms.rgb_array(image)
        if pixels.dtype != np.uint8:
            raise ValueError(f"exported models take uint8 images, got dtype {pixels.dtype}")
        hw = (int(pixels.shape[0]), int(pixels.shape[1]))
        if hw[0] > self.canvas_hw[0] or hw[1] > self.canvas_hw[1]:
            p = self.meta["preprocessing"]
            size = transforms.resized_size(*hw, p["min_size"], p["max_size"])
            resized = resize_bilinear(pixels, size)
            pixels = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
        return pixels, hw

    def __call__(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Images (PIL or uint8 RGB arrays, any sizes) -> one dict per image: boxes [N, 4]
        float32 xyxy, labels [N] int32, scores [N] float32 (original pixels), masks [N, H, W]
        bool (mask models), keypoints [N, P, 3] (keypoint models)."""
        if not isinstance(images, (list, tuple)):
            raise ValueError("images must be a list of images (PIL or uint8 RGB arrays)")
        b, (hc, wc) = self.batch_size, self.canvas_hw
        threshold = self.meta["mask_threshold"]
        results = []
        for start in range(0, len(images), b):
            fitted = [self._fit(im) for im in images[start:start + b]]
            canvas = np.zeros((b, hc, wc, 3), np.uint8)
            sizes = np.zeros((b, 2), np.int32)
            for i in range(b):  # a short last batch repeats its last image
                pixels, _ = fitted[min(i, len(fitted) - 1)]
                canvas[i, :pixels.shape[0], :pixels.shape[1]] = pixels
                sizes[i] = pixels.shape[:2]
            out = self.run(canvas, sizes)
            for i, (_, original_hw) in enumerate(fitted):
                dets = {k: v[i] for k, v in out.items() if k != "num_detections"}
                # Boxes are in the pixels of what went in: scale by 1 unless it was shrunk.
                results.append(transforms.detections_to_original(
                    dets, tuple(sizes[i]), original_hw, threshold))
        return results


def load(directory: str | os.PathLike) -> ExportedPredictor:
    """A directory written by `export_model` -> a callable like `Predictor` (class docstring)."""
    return ExportedPredictor(directory)
