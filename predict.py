"""Run Mask R-CNN on image files; write NAME.json (COCO-style results) and NAME.png (overlay;
keypoint models draw COCO's person skeleton).

    python predict.py --config=configs/fpn_r50.py --weights=maskrcnn_resnet50_fpn_coco.pth \\
        --out=out/ photo1.jpg photo2.png

--weights: a torchvision state_dict (.pth/.pt needs torch; .safetensors/.npz do not) or an orbax
directory written by `mrcnn_jax.checkpoints.orbax_io.save_variables`. Labels are written as
category ids: identity for torchvision's 91-way COCO head (names built in), or mapped through
--categories (a COCO-format json whose `categories` the model was trained on).
A missing or unreadable image or weights file stops with an error naming it (exit status 1).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights: .pth/.safetensors/.npz or orbax dir.")
_OUT = flags.DEFINE_string("out", None, "Output directory for NAME.json and NAME.png.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per forward pass.")
_VIS = flags.DEFINE_float("vis_threshold", 0.5, "Lowest score drawn in the overlay pictures.")
_CATEGORIES = flags.DEFINE_string(
    "categories", "", "COCO-format json whose categories give label -> category id and names.")
flags.mark_flags_as_required(["config", "weights", "out"])


def _label_maps(num_classes: int, categories_path: str):
    """(label -> category id, label -> name) for the json output and the pictures."""
    from mrcnn_jax.evaluation.visualization import COCO_CATEGORY_NAMES

    if not categories_path:
        names = COCO_CATEGORY_NAMES if num_classes == 91 else None
        return None, names
    path = pathlib.Path(categories_path)
    if not path.is_file():
        raise FileNotFoundError(f"categories file not found: {path}")
    try:
        cats = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
        ids = [int(c["id"]) for c in cats]
        id_names = {int(c["id"]): str(c["name"]) for c in cats}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO-format json with 'categories' ({e})") from e
    if num_classes == len(ids) + 1:  # contiguous labels 1..K in category-id order
        label_to_id = {k + 1: c for k, c in enumerate(ids)}
    elif max(ids) < num_classes:  # labels are the category ids (torchvision's COCO head)
        label_to_id = {c: c for c in ids}
    else:
        raise ValueError(f"{path}: {len(ids)} categories fit neither model.num_classes="
                         f"{num_classes} as contiguous labels nor as category ids")
    return label_to_id, {label: id_names[c] for label, c in label_to_id.items()}


def run(config, weights: str, out_dir: str, image_paths: list[str], batch_size: int,
        vis_threshold: float, categories: str) -> list[pathlib.Path]:
    """The whole command; returns the written files."""
    from mrcnn_jax import predictor as pred

    names = [pathlib.Path(p).stem for p in image_paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"images with the same name would overwrite each other's outputs: "
                         f"{sorted(dup)}")
    # Read everything first: a bad file fails before minutes of loading and compiling.
    images = [pred.read_image(p) for p in image_paths]
    label_to_id, class_names = _label_maps(config.model.num_classes, categories)
    variables = pred.load_weights(weights, config.model)
    predictor = pred.Predictor(config, variables, batch_size=batch_size)
    skeleton = None
    if config.model.get("keypoint_head", False):
        from mrcnn_jax.data import keypoint_shapes

        if config.model.num_keypoints == len(keypoint_shapes.KEYPOINT_NAMES):
            skeleton = [(a - 1, b - 1) for a, b in keypoint_shapes.SKELETON]  # COCO's, 1-based
    written = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        for name, image, result in zip(names[start:], chunk, predictor(chunk)):
            written += pred.write_outputs(out_dir, name, image, result, label_to_id,
                                          class_names, vis_threshold, skeleton)
            print(f"{name}: {len(result['scores'])} detections, "
                  f"{int((result['scores'] >= vis_threshold).sum())} >= {vis_threshold}")
    return written


def main(argv: list[str]) -> None:
    image_paths = argv[1:]
    if not image_paths:
        raise app.UsageError("give at least one IMAGE path after the flags")
    try:
        run(_CONFIG.value, _WEIGHTS.value, _OUT.value, image_paths, _BATCH.value, _VIS.value,
            _CATEGORIES.value)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"predict.py: error: {e}")


if __name__ == "__main__":
    app.run(main)
