"""The official COCO 2017 files of a manual dir, each as its extracted folder or as the zip that
cocodataset.org serves.

One reader of this layout for its two users, so both find the same files and merge them the same
way: the tfds builder (`coco_instances.CocoInstances`: images and annotations) and the ground
truth of the evaluation (`coco_instances.ground_truth_dataset`: annotations only).

    <manual_dir>/train2017/ or train2017.zip, val2017/ or val2017.zip        the images
    <manual_dir>/annotations/instances_val2017.json, person_keypoints_val2017.json, ...
        or <manual_dir>/annotations_trainval2017.zip holding those files    the annotations

The person keypoints live in a second file with the same annotation ids; `read_annotations`
merges them into the instances, so one ground truth serves bbox, segm and keypoints. Paths may be
local or in a bucket (`mrcnn_jax.paths`).
"""

from __future__ import annotations

import json
import os
import zipfile

from etils import epath

from mrcnn_jax import paths
from mrcnn_jax.data import coco_json

# COCO 2017 category ids -> names (torchvision's 91-way COCO head predicts these ids directly;
# the 11 unused ids of the original 91 are absent).
COCO_CATEGORY_NAMES: dict[int, str] = dict(enumerate([
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]))
COCO_CATEGORY_NAMES = {k: v for k, v in COCO_CATEGORY_NAMES.items() if v not in ("N/A",)}

# Split name -> the folder (and zip) name of its images and the suffix of its annotation files.
SPLIT_DIRS = {"train": "train2017", "validation": "val2017"}
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
NUM_KEYPOINTS = 17  # COCO's person keypoints
# The config field the manual dir comes from: errors name it, so users know what to fix.
FIELD = "data.manual_dir"


def split_dir(split: str) -> str:
    """The folder name of `split` ("validation" -> "val2017"); ValueError names the choices."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"COCO 2017 split must be one of {sorted(SPLIT_DIRS)}, got {split!r}")
    return SPLIT_DIRS[split]


def _zip_json(zf: zipfile.ZipFile, zipped: epath.Path, member: str) -> dict:
    """The json `member` of the open zip `zipped`; errors name both."""
    try:
        raw = zf.read(member)
    except KeyError:
        raise FileNotFoundError(f"{FIELD}: {member} not found in {zipped}") from None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{zipped}:{member}: malformed JSON: {e}") from e


def read_annotations(manual_dir: str | os.PathLike, split: str,
                     require_keypoints: bool = False) -> tuple[dict, str]:
    """(the instances json of `split` with the person keypoints merged in, where it was read).

    The annotations folder is used when it holds the instances file, else the annotations zip.
    Without a person keypoints file the instances are returned as they are, unless
    `require_keypoints` (the builder's 2017 config stores keypoints): then FileNotFoundError.
    A file without the sections the merge needs raises ValueError naming it.
    """
    folder = paths.resolve(manual_dir)
    name = split_dir(split)
    instances, keypoints = f"instances_{name}.json", f"person_keypoints_{name}.json"
    ann_dir, zipped = folder / "annotations", folder / ANNOTATIONS_ZIP
    if (ann_dir / instances).is_file():
        data = coco_json.load_json(ann_dir / instances, FIELD)
        kp_data = (coco_json.load_json(ann_dir / keypoints, FIELD)
                   if (ann_dir / keypoints).is_file() else None)
        where = os.fspath(ann_dir / instances)
    elif zipped.is_file():
        with zipped.open("rb") as f, zipfile.ZipFile(f) as zf:
            data = _zip_json(zf, zipped, f"annotations/{instances}")
            kp_data = (_zip_json(zf, zipped, f"annotations/{keypoints}")
                       if f"annotations/{keypoints}" in zf.namelist() else None)
        where = f"{zipped}:annotations/{instances}"
    else:
        raise FileNotFoundError(f"{FIELD}: neither {ann_dir / instances} nor {zipped} exists")
    if kp_data is None:
        if require_keypoints:
            raise FileNotFoundError(
                f"{FIELD}: {keypoints} not found beside {instances}; the 2017 config stores "
                "person keypoints (for instances only, read the folder and json as a coco_format "
                "data set)")
        return data, where
    merge_person_keypoints(data, kp_data, where)
    return data, where


def merge_person_keypoints(data: dict, kp_data: dict, where: str) -> None:
    """Copies the keypoints of `kp_data` (a person_keypoints file) into `data` (the instances of
    the same split), in place: per annotation id `keypoints` and `num_keypoints`, per category id
    the `keypoints` names and the `skeleton` (the instances file has neither)."""
    # The sections the merge walks; the builder validates the merged whole (`coco_json`).
    for content, name in ((data, where), (kp_data, f"{where}(keypoints)")):
        for key in ("annotations", "categories"):
            if not isinstance(content, dict) or not isinstance(content.get(key), list):
                raise ValueError(f"{name}: {key} is missing or not a list (not a COCO file?)")
    by_id = {ann.get("id"): ann for ann in kp_data["annotations"]}
    for ann in data["annotations"]:
        kp = by_id.get(ann.get("id"))
        if kp is not None and kp.get("keypoints") is not None:
            ann["keypoints"] = kp["keypoints"]
            if "num_keypoints" in kp:
                ann["num_keypoints"] = kp["num_keypoints"]
    schema = {c.get("id"): c for c in kp_data["categories"] if c.get("keypoints")}
    for cat in data["categories"]:
        if cat.get("id") in schema:
            cat["keypoints"] = schema[cat["id"]]["keypoints"]
            cat["skeleton"] = schema[cat["id"]].get("skeleton", [])
