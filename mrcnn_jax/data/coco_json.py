"""Reading, validating and converting COCO-format annotation files, with bad-data accounting.

Two kinds of problems, two treatments:
- **Structural** (the file cannot be trusted as a whole): missing path, malformed JSON, a missing
  top-level section, a field of the wrong type, duplicate image or category ids. These raise a
  `ValueError`/`FileNotFoundError` naming the file and the field (`annotations[12].bbox`).
- **Per-record** (one image or annotation is bad, the rest is fine): degenerate polygons, boxes
  outside the image or of zero area, unknown category ids, empty masks, unreadable images. These
  are skipped and counted in a `BadDataReport` under a stable reason name, printed at the end of
  the build and stored in the data set's metadata. Boxes partly outside the image are clipped and
  counted too (kept, but never silently changed).

Images without annotations and crowd-only images are kept by the builder (evaluation needs them);
the input pipeline skips them at train time (configurable) and counts them.

Glossary: H, W = original image height and width; K = number of keypoints per instance.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_jax import paths

# Reasons under which records are skipped (or, for BOX_CLIPPED, fixed) and counted.
CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE_FILE = "missing_image_file"
IMAGE_IN_SUBFOLDER = "image_in_subfolder"  # kept: found by its base name below the images folder
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
UNKNOWN_IMAGE_ID = "unknown_image_id"
UNKNOWN_CATEGORY_ID = "unknown_category_id"
ZERO_AREA_BOX = "zero_area_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
BOX_CLIPPED = "box_clipped"  # kept after clipping to the image
DEGENERATE_POLYGON = "degenerate_polygon"  # one polygon dropped (< 3 points / odd length / no area)
EMPTY_SEGMENTATION = "empty_segmentation"  # annotation dropped: no usable polygon / missing
RLE_SIZE_MISMATCH = "rle_size_mismatch"
EMPTY_MASK = "empty_mask"  # the mask has no pixel inside the image
BAD_KEYPOINTS = "bad_keypoints"
IMAGE_WITHOUT_ANNOTATIONS = "image_without_annotations"  # counted, image kept
CROWD_ONLY_IMAGE = "crowd_only_image"  # counted, image kept
NO_VALID_INSTANCE = "no_valid_instance"  # train-time skip in the input pipeline

_EXAMPLES_PER_REASON = 5
# A box is reported as clipped only when it leaves the image by more than float noise.
_CLIP_TOLERANCE = 1e-3


class BadDataReport:
    """Counts of skipped/fixed records per reason, with the first few examples of each."""

    def __init__(self, source: str = ""):
        self.source = source
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
            self.examples[reason].append(where)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.counts:
            return f"{self.source}: no bad data"
        lines = [f"{self.source}: bad data counted (skipped unless noted):"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n}  e.g. {'; '.join(self.examples[reason])}")
        return "\n".join(lines)


@dataclasses.dataclass
class Instance:
    """One annotation converted to what the data set stores."""

    annotation_id: int
    label: int  # contiguous 1..num_classes
    category_id: int
    is_crowd: bool
    area: float  # the json's `area` (COCO evaluation's area ranges use it)
    mask_area: int  # pixels of the decoded mask (== pycocotools annToMask().sum())
    box: np.ndarray  # [4] float32 x1, y1, x2, y2 pixels, clipped to the image
    mask_box: np.ndarray  # [4] int32 x1, y1, x2, y2 (exclusive) of the tight mask crop
    mask_crop: np.ndarray  # [y2 - y1, x2 - x1] uint8 in {0, 1}
    keypoints: np.ndarray | None  # [K, 3] float32 (x, y, visibility) or None


@dataclasses.dataclass
class CocoIndex:
    """A validated COCO json: images in id order, annotations grouped by image, category maps."""

    path: str
    images: list[dict]
    annotations_by_image: dict[int, list[tuple[int, dict]]]  # image id -> [(json index, ann)]
    category_ids: list[int]  # label l (1..K) has category id category_ids[l - 1]
    category_names: list[str]
    keypoint_names: list[str]  # empty when the data set has no keypoints

    @property
    def label_of_category(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.category_ids)}


def _require(cond: bool, path: str, field: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{path}: {field} {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_json(path: str | os.PathLike, field: str = "annotations") -> dict:
    """Parse a COCO json file; clear errors for a missing file or malformed JSON.

    `field` names the config field the path came from, so the error says what to fix. The path
    may be local or in a bucket (`mrcnn_jax.paths`).
    """
    path = paths.resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: COCO annotations file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({e})") from e
    return data


def build_index(data: dict, path: str | os.PathLike) -> CocoIndex:
    """Validate the structure of a parsed COCO json and index it.

    Raises ValueError naming `path` and the offending field for any structural problem.
    Annotations pointing to an unknown image id are not structural: they are left to
    `annotations_by_image` consumers via `orphan_annotations`.
    """
    path = str(path)
    _require(isinstance(data, dict), path, "top level", "must be a JSON object")
    for key in ("images", "annotations", "categories"):
        _require(key in data, path, key, "is missing (not a COCO instances file?)")
        _require(isinstance(data[key], list), path, key, "must be a list")
    _require(len(data["categories"]) > 0, path, "categories", "is empty")

    categories = []
    seen_cat = set()
    for i, cat in enumerate(data["categories"]):
        f = f"categories[{i}]"
        _require(isinstance(cat, dict), path, f, "must be an object")
        _require(_is_int(cat.get("id")), path, f + ".id", "must be an integer")
        _require(isinstance(cat.get("name"), str), path, f + ".name", "must be a string")
        _require(cat["id"] not in seen_cat, path, f + ".id", f"duplicates id {cat.get('id')}")
        seen_cat.add(cat["id"])
        categories.append(cat)
    categories.sort(key=lambda c: c["id"])
    keypoint_names: list[str] = []
    for cat in categories:
        names = cat.get("keypoints") or []
        if names:
            _require(not keypoint_names or names == keypoint_names, path,
                     f"categories(id={cat['id']}).keypoints",
                     "differ between categories (one keypoint layout per data set is supported)")
            keypoint_names = list(names)

    images = []
    seen_img = set()
    for i, img in enumerate(data["images"]):
        f = f"images[{i}]"
        _require(isinstance(img, dict), path, f, "must be an object")
        _require(_is_int(img.get("id")), path, f + ".id", "must be an integer")
        _require(isinstance(img.get("file_name"), str) and img["file_name"], path,
                 f + ".file_name", "must be a non-empty string")
        for k in ("height", "width"):
            _require(_is_int(img.get(k)) and img[k] > 0, path, f"{f}.{k}",
                     "must be a positive integer")
        _require(img["id"] not in seen_img, path, f + ".id", f"duplicates id {img['id']}")
        seen_img.add(img["id"])
        images.append(img)
    images.sort(key=lambda m: m["id"])

    by_image: dict[int, list[tuple[int, dict]]] = collections.defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        f = f"annotations[{i}]"
        _require(isinstance(ann, dict), path, f, "must be an object")
        for k in ("id", "image_id", "category_id"):
            _require(_is_int(ann.get(k)), path, f"{f}.{k}", "must be an integer")
        bbox = ann.get("bbox")
        _require(isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)),
                 path, f + ".bbox", "must be a list of 4 numbers [x, y, width, height]")
        _require(ann.get("iscrowd", 0) in (0, 1, True, False), path, f + ".iscrowd",
                 "must be 0 or 1")
        seg = ann.get("segmentation")
        _require(seg is None or isinstance(seg, (list, dict)), path, f + ".segmentation",
                 "must be a list of polygons or an RLE object")
        if isinstance(seg, dict):
            _require("counts" in seg and "size" in seg, path, f + ".segmentation",
                     "RLE must have 'counts' and 'size'")
        kp = ann.get("keypoints")
        _require(kp is None or (isinstance(kp, list) and all(map(_is_number, kp))), path,
                 f + ".keypoints", "must be a list of numbers")
        by_image[ann["image_id"]].append((i, ann))

    return CocoIndex(path=path, images=images, annotations_by_image=dict(by_image),
                     category_ids=[c["id"] for c in categories],
                     category_names=[c["name"] for c in categories],
                     keypoint_names=keypoint_names)


def load_index(path: str | os.PathLike, field: str = "annotations") -> CocoIndex:
    """`build_index(load_json(path))`."""
    return build_index(load_json(path, field), path)


def count_orphan_annotations(index: CocoIndex, report: BadDataReport) -> None:
    """Count annotations whose image id is not among the images (they are never read)."""
    known = {img["id"] for img in index.images}
    for image_id, anns in index.annotations_by_image.items():
        if image_id not in known:
            for i, ann in anns:
                report.add(UNKNOWN_IMAGE_ID, f"annotations[{i}] (id {ann['id']}) -> {image_id}")


def _segmentation_to_rle(seg: Any, h: int, w: int, where: str,
                         report: BadDataReport) -> dict | None:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as one compressed RLE.

    None when unusable; the reason is counted in `report`.
    """
    if isinstance(seg, list):
        polys = []
        for j, poly in enumerate(seg):
            ok = (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                  and all(map(_is_number, poly)))
            if ok:
                xy = np.asarray(poly, np.float64).reshape(-1, 2)
                # Shoelace area: a polygon with all points on a line encloses nothing.
                x, y = xy[:, 0], xy[:, 1]
                ok = abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) > 0
            if ok:
                polys.append(poly)
            else:
                report.add(DEGENERATE_POLYGON, f"{where}.segmentation[{j}]")
        if not polys:
            report.add(EMPTY_SEGMENTATION, f"{where}.segmentation (no usable polygon)")
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(seg, dict):
        size = list(seg["size"])
        if size != [h, w]:
            report.add(RLE_SIZE_MISMATCH, f"{where}.segmentation.size {size} != [{h}, {w}]")
            return None
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, h, w)
        counts = seg["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": size, "counts": counts}
    report.add(EMPTY_SEGMENTATION, f"{where}.segmentation")
    return None


def convert_annotation(
    ann: dict, where: str, image: dict, label_of: dict[int, int], num_keypoints: int,
    report: BadDataReport,
) -> Instance | None:
    """Check and convert one annotation of `image`; None (counted in `report`) if unusable.

    `where` names the record in messages, e.g. 'instances.json annotations[12] (id 345)'.
    """
    h, w = image["height"], image["width"]
    cid = ann["category_id"]
    if cid not in label_of:
        report.add(UNKNOWN_CATEGORY_ID, f"{where}.category_id={cid}")
        return None
    x, y, bw, bh = (float(v) for v in ann["bbox"])
    if not (np.isfinite([x, y, bw, bh]).all() and bw > 0 and bh > 0):
        report.add(ZERO_AREA_BOX, f"{where}.bbox={ann['bbox']}")
        return None
    box = np.array([x, y, x + bw, y + bh], np.float64)
    clipped = np.clip(box, 0, [w, h, w, h])
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report.add(BOX_OUTSIDE_IMAGE, f"{where}.bbox={ann['bbox']} image {w}x{h}")
        return None
    if np.abs(clipped - box).max() > _CLIP_TOLERANCE:
        report.add(BOX_CLIPPED, f"{where}.bbox={ann['bbox']} image {w}x{h}")

    seg = ann.get("segmentation")
    if seg is None:
        report.add(EMPTY_SEGMENTATION, f"{where}.segmentation (missing)")
        return None
    rle = _segmentation_to_rle(seg, h, w, where, report)
    if rle is None:
        return None
    try:
        mask = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises bare errors on corrupt RLE strings
        report.add(EMPTY_SEGMENTATION, f"{where}.segmentation (undecodable RLE: {e})")
        return None
    mask_area = int(mask.sum())
    if mask_area == 0:
        report.add(EMPTY_MASK, f"{where}.segmentation")
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y1, y2, x1, x2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1

    keypoints = None
    if num_keypoints:
        kp = ann.get("keypoints")
        if kp is None or len(kp) == 0:
            keypoints = np.zeros((num_keypoints, 3), np.float32)
        elif len(kp) != 3 * num_keypoints:
            report.add(BAD_KEYPOINTS, f"{where}.keypoints has {len(kp)} values, "
                       f"expected {3 * num_keypoints}")
            return None
        else:
            keypoints = np.asarray(kp, np.float32).reshape(num_keypoints, 3)
            # Invisible / unlabelled keypoints (v = 0) carry no position.
            keypoints[keypoints[:, 2] <= 0] = 0.0

    area = ann.get("area")
    return Instance(
        annotation_id=int(ann["id"]),
        label=label_of[cid],
        category_id=int(cid),
        is_crowd=bool(ann.get("iscrowd", 0)),
        area=float(area) if _is_number(area) else float(mask_area),
        mask_area=mask_area,
        box=clipped.astype(np.float32),
        mask_box=np.array([x1, y1, x2, y2], np.int32),
        mask_crop=np.ascontiguousarray(mask[y1:y2, x1:x2]),
        keypoints=keypoints,
    )


def convert_image_annotations(
    index: CocoIndex, image: dict, report: BadDataReport
) -> list[Instance]:
    """All usable instances of `image` (in json order); bad ones skipped and counted."""
    label_of = index.label_of_category
    num_kp = len(index.keypoint_names)
    name = os.path.basename(index.path)
    instances = []
    for i, ann in index.annotations_by_image.get(image["id"], []):
        inst = convert_annotation(ann, f"{name} annotations[{i}] (id {ann['id']})", image,
                                  label_of, num_kp, report)
        if inst is not None:
            instances.append(inst)
    where = f"{name} image id {image['id']} ({image['file_name']})"
    if not instances:
        report.add(IMAGE_WITHOUT_ANNOTATIONS, where)
    elif all(inst.is_crowd for inst in instances):
        report.add(CROWD_ONLY_IMAGE, where)
    return instances


def keypoint_flip_indices(names: list[str]) -> list[int]:
    """Index permutation swapping left/right keypoints under a horizontal flip.

    'left_eye' <-> 'right_eye' etc. by name (COCO's convention); unpaired names map to themselves.
    """
    position = {n: i for i, n in enumerate(names)}
    out = []
    for n in names:
        if n.startswith("left_"):
            partner = "right_" + n[len("left_"):]
        elif n.startswith("right_"):
            partner = "left_" + n[len("right_"):]
        else:
            partner = n
        out.append(position.get(partner, position[n]))
    return out
