"""A hand-written tiny COCO ground truth for the evaluation tests.

Instances (non-contiguous category ids 3 circle, 7 square, 11 triangle):
  image 10 (48x64): square polygon 10x10, square polygon 12x8, circle as compressed RLE   (small)
  image 20 (120x128): square polygon 100x100 (large, area 10000), triangle polygon (medium),
                      circle as compressed RLE r=20 (medium), a crowd square as uncompressed RLE
  image 30 (40x40): triangle polygon (small), circle as a two-part polygon (small)
  image 40 (32x32): no annotations (detections there are false positives)
So each area range has ground truth, and square has 2 instances in image 10: with perfect
detections AR1 = mean over categories of (images with the category / its instances)
= (3/3 + 2/3 + 2/2) / 3 = 8/9.

A second dataset, `keypoint_dataset`, has three persons with COCO's 17 keypoints.
"""

from __future__ import annotations

import copy
import json

import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 3, "name": "circle", "supercategory": "shape"},
    {"id": 7, "name": "square", "supercategory": "shape"},
    {"id": 11, "name": "triangle", "supercategory": "shape"},
]
IMAGES = [
    {"id": 10, "height": 48, "width": 64, "file_name": "a.png"},
    {"id": 20, "height": 120, "width": 128, "file_name": "b.png"},
    {"id": 30, "height": 40, "width": 40, "file_name": "c.png"},
    {"id": 40, "height": 32, "width": 32, "file_name": "d.png"},
]
PERFECT_AR1 = (1.0 + 2.0 / 3.0 + 1.0) / 3.0


def _rect(x, y, w, h):
    return [float(x), float(y), float(x + w), float(y), float(x + w), float(y + h), float(x),
            float(y + h)]


def _disk(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r).astype(np.uint8)


def _compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask):
    # Column-major run lengths starting with zeros: COCO's uncompressed (crowd) RLE.
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def dataset() -> dict:
    """The COCO dict (bbox and area derived from the rasterised segmentation, like COCO)."""
    anns = [
        (10, 7, [_rect(5, 5, 10, 10)], 0),
        (10, 7, [_rect(30, 20, 12, 8)], 0),
        (10, 3, _compressed(_disk(48, 64, 50, 12, 6)), 0),
        (20, 7, [_rect(14, 10, 100, 100)], 0),
        (20, 11, [[10.0, 110.0, 120.0, 110.0, 65.0, 0.0]], 0),
        (20, 3, _compressed(_disk(120, 128, 64, 60, 20)), 0),
        (20, 7, None, 1),  # crowd, filled below
        (30, 11, [[2.0, 30.0, 20.0, 30.0, 11.0, 12.0]], 0),
        (30, 3, [_rect(25, 5, 6, 6), _rect(25, 20, 6, 4)], 0),
    ]
    crowd = np.zeros((120, 128), np.uint8)
    crowd[100:118, 0:30] = 1
    sizes = {im["id"]: (im["height"], im["width"]) for im in IMAGES}
    annotations = []
    for ann_id, (image_id, cat, seg, iscrowd) in enumerate(anns, start=1):
        h, w = sizes[image_id]
        if iscrowd:
            seg = _uncompressed(crowd)
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        annotations.append({
            "id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": iscrowd,
        })
    return {"images": copy.deepcopy(IMAGES), "annotations": annotations,
            "categories": copy.deepcopy(CATEGORIES)}


def write(path, data: dict) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]


def keypoint_dataset(seed: int = 0) -> dict:
    """Two 160x160 images, three persons (areas medium and large) with 17 keypoints each, a person
    without keypoints and a ball (a category without a keypoint schema)."""
    rng = np.random.default_rng(seed)
    images = [{"id": 1, "height": 160, "width": 160}, {"id": 2, "height": 160, "width": 160}]
    boxes = [(1, [10.0, 10.0, 40.0, 60.0]), (1, [60.0, 20.0, 90.0, 130.0]),
             (2, [30.0, 30.0, 50.0, 70.0])]
    annotations = []
    for ann_id, (image_id, (x, y, w, h)) in enumerate(boxes, start=1):
        kx = rng.uniform(x, x + w, 17)
        ky = rng.uniform(y, y + h, 17)
        vis = np.where(rng.uniform(size=17) < 0.2, 0, 2)
        kps = np.stack([np.where(vis > 0, kx, 0), np.where(vis > 0, ky, 0), vis], -1)
        annotations.append({
            "id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [x, y, w, h],
            "area": w * h, "iscrowd": 0, "keypoints": [float(v) for v in kps.reshape(-1)],
            "num_keypoints": int((vis > 0).sum()),
        })
    # A category without keypoints (and a person without them in the json) as in a merged
    # instances + person_keypoints COCO file: keypoint evaluation must look at persons only.
    annotations.append({"id": 4, "image_id": 2, "category_id": 2, "iscrowd": 0,
                        "bbox": [100.0, 100.0, 20.0, 20.0], "area": 400.0})
    annotations.append({"id": 5, "image_id": 2, "category_id": 1, "iscrowd": 0,
                        "bbox": [120.0, 10.0, 30.0, 30.0], "area": 900.0})
    categories = [{"id": 1, "name": "person", "keypoints": KEYPOINT_NAMES, "skeleton": []},
                  {"id": 2, "name": "ball"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def person_keypoints_only(data: dict) -> dict:
    """The official keypoint ground-truth layout of `data`: the keypoint categories only, every
    instance of them with keypoints and num_keypoints."""
    cats = [c for c in data["categories"] if c.get("keypoints")]
    ids = {c["id"] for c in cats}
    anns = []
    for a in data["annotations"]:
        if a["category_id"] in ids:
            a = dict(a)
            a.setdefault("keypoints", [0.0] * 51)
            a.setdefault("num_keypoints", sum(1 for v in a["keypoints"][2::3] if v > 0))
            anns.append(a)
    return {"images": data["images"], "annotations": anns, "categories": cats}
