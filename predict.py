"""Run Mask R-CNN on image files; write NAME.json (COCO-style results) and NAME.png (overlay;
keypoint models draw COCO's person skeleton).

    python predict.py --config=configs/fpn_r50.py --weights=maskrcnn_resnet50_fpn_coco.pth \\
        --out=out/ photo1.jpg photo2.png
    # torchvision's maskrcnn_resnet50_fpn_v2 weights need its architecture's config:
    python predict.py --config=configs/fpn_r50_v2.py \\
        --weights=maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth --out=out/ photo1.jpg

Over a data set (`mrcnn_jax.batch_prediction`: streamed, one fixed canvas, data parallel over the
local devices, masks pasted on the accelerator, resumable), one COCO results json for all of it:

    python predict.py --config=... --weights=... --out=out/ --input=photos/
        # or --input='photos/**/*.jpg', --input=list.txt,
        # --input=instances_val2017.json --images_dir=val2017/, or --split=validation
    -> out/results.json, out/images.json, out/progress.jsonl (+ out/vis/NAME.png with --vis)

--weights: a training workdir (its latest checkpoint), its checkpoints/ folder or one step of it,
an orbax directory written by `mrcnn_jax.checkpoints.orbax_io.save_variables`, or a torchvision
state_dict (.pth/.pt needs torch; .safetensors/.npz do not). Labels are written as category ids
with their names: a training run's own label map (WORKDIR/label_map.json), COCO's for
torchvision's 91-way head, or --categories (a COCO-format json the model was trained on).
A missing or unreadable image or weights file stops with an error naming it (exit status 1).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights: a training workdir (or its "
                               "checkpoints/ or a step), an orbax variables dir or a torchvision "
                               ".pth/.safetensors/.npz.")
_OUT = flags.DEFINE_string("out", None, "Output directory for NAME.json and NAME.png.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per forward pass (over a data set: per "
                               "device, times the local devices).")
_VIS = flags.DEFINE_float("vis_threshold", 0.5, "Lowest score drawn in the overlay pictures.")
_CATEGORIES = flags.DEFINE_string(
    "categories", "", "COCO-format json whose categories give label -> category id and names.")
_INPUT = flags.DEFINE_string(
    "input", "", "A data set to predict instead of IMAGE arguments: a folder of images, a glob, a "
    ".txt list of paths or a COCO-format .json (with --images_dir).")
_IMAGES_DIR = flags.DEFINE_string(
    "images_dir", "", "With a COCO .json --input: the folder its file_names are in (default: "
    "the json's folder).")
_SPLIT = flags.DEFINE_string(
    "split", "", "Predict this split of the config's data set (its original files, as the "
    "evaluation reads them), e.g. validation.")
_DATASET_VIS = flags.DEFINE_bool("vis", False, "Over a data set: also write out/vis/NAME.png.")
_PASTE = flags.DEFINE_enum("paste", "auto", ["auto", "device", "host"],
                           "Where masks are pasted (auto: on the device unless it is the CPU).")
_PASTE_CAPACITY = flags.DEFINE_integer(
    "paste_capacity", 0, "Pixels of mask crops per image the device pastes (the rest are "
    "pasted on the host); 0 = 2 canvases.")
_THREADS = flags.DEFINE_integer("num_threads", 4, "Over a data set: image decoding threads.")
_PROGRESS_EVERY = flags.DEFINE_integer("progress_every", 100,
                                       "Over a data set: images between progress lines.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", 0, "Over a data set: stop after the batch that reaches this many images "
    "(0 = all); run again to go on.")
flags.mark_flags_as_required(["config", "weights", "out"])


def run(config, weights: str, out_dir: str, image_paths: list[str], batch_size: int,
        vis_threshold: float, categories: str, paste: str = "auto",
        paste_capacity: int = 0) -> list[pathlib.Path]:
    """The whole command; returns the written files."""
    from mrcnn_jax import predictor as pred

    names = [pathlib.Path(p).stem for p in image_paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"images with the same name would overwrite each other's outputs: "
                         f"{sorted(dup)}")
    # Read everything first: a bad file fails before minutes of loading and compiling.
    images = [pred.read_image(p) for p in image_paths]
    variables, weights_labels = pred.load_weights_and_label_map(weights, config.model)
    labels = pred.label_map_of(config.model.num_classes, categories, weights_labels)
    label_to_id = None if labels is None else labels.label_to_category_id
    class_names = None if labels is None else labels.label_names
    predictor = pred.Predictor(config, variables, batch_size=batch_size, paste=paste,
                               paste_capacity=paste_capacity or None)
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


def run_dataset(config, weights: str, out_dir: str, source: str, images_dir: str, split: str,
                per_device_batch: int, categories: str, vis: bool, vis_threshold: float,
                paste: str, paste_capacity: int, num_threads: int, progress_every: int,
                max_images: int) -> dict:
    """The data set command (`batch_prediction.predict_dataset`); returns its summary."""
    from mrcnn_jax import batch_prediction as bp
    from mrcnn_jax import predictor as pred

    entries = (bp.split_images(config.data, split) if split
               else bp.list_images(source, images_dir))
    variables, weights_labels = pred.load_weights_and_label_map(weights, config.model)
    labels = pred.label_map_of(config.model.num_classes, categories, weights_labels)
    model = bp.BatchPredictor(config, variables, per_device_batch, paste=paste,
                              paste_capacity=paste_capacity or None)
    summary = bp.predict_dataset(
        model, entries, out_dir,
        category_ids=None if labels is None else labels.label_to_category_id,
        class_names=None if labels is None else labels.label_names, vis=vis,
        vis_threshold=vis_threshold, num_threads=num_threads, progress_every=progress_every,
        max_images=max_images)
    if summary["complete"]:
        print(f"{summary['detections']} detections of {summary['images']} images "
              f"({summary['skipped']} done before, {len(summary['unreadable'])} unreadable) in "
              f"{out_dir}/{bp.RESULTS_FILE}")
    else:
        print(f"stopped after {summary['skipped'] + summary['done']} of {summary['images']} "
              f"images: run again to go on")
    return summary


def main(argv: list[str]) -> None:
    image_paths = argv[1:]
    dataset = bool(_INPUT.value or _SPLIT.value)
    if dataset and image_paths:
        raise app.UsageError("give IMAGE paths or --input/--split, not both")
    if _INPUT.value and _SPLIT.value:
        raise app.UsageError("give --input or --split, not both")
    if not dataset and not image_paths:
        raise app.UsageError("give at least one IMAGE path after the flags (or --input/--split)")
    try:
        if dataset:
            run_dataset(_CONFIG.value, _WEIGHTS.value, _OUT.value, _INPUT.value,
                        _IMAGES_DIR.value, _SPLIT.value, _BATCH.value, _CATEGORIES.value,
                        _DATASET_VIS.value, _VIS.value, _PASTE.value, _PASTE_CAPACITY.value,
                        _THREADS.value, _PROGRESS_EVERY.value, _MAX_IMAGES.value)
        else:
            run(_CONFIG.value, _WEIGHTS.value, _OUT.value, image_paths, _BATCH.value,
                _VIS.value, _CATEGORIES.value, _PASTE.value, _PASTE_CAPACITY.value)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"predict.py: error: {e}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
