"""Synthetic shapes: a small COCO-format instance-segmentation data set written to disk.

Coloured circles, squares and triangles of random size, position and rotation, partly occluding
each other, on textured backgrounds. The result is a real COCO-format data set (JPEG and PNG images,
`instances_{train,val}.json`) read by the same builder as COCO itself, so the demo and the tests go
through the code path users do:

    python -m mrcnn_jax.data.shapes --out DIR --num-train N --num-val M --size S --seed K

writes `DIR/train/*.{jpg,png}`, `DIR/val/*`, `DIR/annotations/instances_{train,val}.json`.

Every annotation path of the COCO format is exercised: unoccluded shapes are polygons, occluded ones
(whose visible part is not a polygon) are RLE, alternately compressed (string counts) and
uncompressed (list counts), and some images hold a crowd (`iscrowd=1`, uncompressed RLE) of small
shapes. Each annotation's mask is exactly the set of pixels painted with that shape, so image and
target agree pixel for pixel (up to JPEG noise in the colours). Category ids are deliberately not
contiguous (1, 3, 5) so the contiguous-label map is exercised as on COCO.

Deterministic: image i of a split is a pure function of (seed, split, i), whatever N and M are.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASS_NAMES = ("circle", "square", "triangle")
CATEGORY_IDS = (1, 3, 5)  # not contiguous on purpose: the label map must be applied
SPLITS = ("train", "val")
ASPECT_RATIOS = (1.0, 1.0, 0.8, 1.25)  # width / height of an image, drawn uniformly
_SPLIT_SEED = {"train": 0, "val": 1}

# Geometry of the generator, relative to the short image side.
_MIN_RADIUS = 0.07
_MAX_RADIUS = 0.22
_MAX_OCCLUDED_FRACTION = 0.5  # a shape keeps at least half of its pixels visible
_MIN_VISIBLE_PIXELS = 30
_CROWD_PROB = 0.15  # probability that an image holds one crowd region
_PNG_EVERY = 4  # every 4th image is written as PNG, the rest as JPEG
_JPEG_QUALITY = 95
_CIRCLE_POINTS = 40
_META_FILE = "shapes_meta.json"


def annotation_paths(root: str | os.PathLike, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(images folder, annotations json) of `split` ('train' | 'val') of a shapes data set."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = pathlib.Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices [P, 2] (x, y) of a shape of circumradius `r` centred at (cx, cy), rotated."""
    if kind == "circle":
        t = np.linspace(0.0, 2 * np.pi, _CIRCLE_POINTS, endpoint=False)
    elif kind == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
    elif kind == "triangle":
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * np.pi
    else:
        raise ValueError(f"kind must be one of {CLASS_NAMES}, got {kind!r}")
    t = t + angle
    pts = np.stack([cx + r * np.cos(t), cy - r * np.sin(t)], axis=1)
    # Rounded as written to the json, so the rasterised mask is exactly the annotation's.
    return np.round(pts, 2)


def _rasterise(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Binary mask [h, w] uint8 of a polygon, by pycocotools' rasteriser (as COCO's annToMask)."""
    rles = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rles))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background [h, w, 3] float in [0, 255]: smooth colour noise, stripes, grain."""
    coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    img = smooth + rng.uniform(5, 25) * stripes[..., None] + rng.normal(0, 6, size=(h, w, 3))
    return img


def _rle_for_json(mask: np.ndarray, compressed: bool) -> dict:
    """COCO RLE of a binary mask: string counts (compressed) or a list of run lengths."""
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    flat = mask.reshape(-1, order="F")  # COCO runs are column-major, starting with zeros
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def generate_image(
    rng: np.random.Generator, size: int, max_objects: int, width: int | None = None
) -> tuple[np.ndarray, list[dict]]:
    """One image [h, w, 3] uint8 and its annotations (COCO dicts without ids).

    `h = size`; `w` is `width`, or by default `size` times 1, 0.8 or 1.25 so the resize rule
    sees both orientations.
    """
    h = size
    aspect = rng.choice(ASPECT_RATIOS)
    w = int(round(size * aspect)) if width is None else width
    img = _background(rng, h, w)
    short = min(h, w)

    # Objects in drawing order (later ones on top): (category index, full mask, polygon, crowd).
    objects: list[tuple[int, np.ndarray, np.ndarray | None, bool]] = []
    if rng.random() < _CROWD_PROB:
        kind_idx = int(rng.integers(len(CLASS_NAMES)))
        cx0, cy0 = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        crowd = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(4, 8))):
            poly = _polygon(CLASS_NAMES[kind_idx], cx0 + rng.normal(0, 0.06 * short),
                            cy0 + rng.normal(0, 0.06 * short), rng.uniform(0.015, 0.03) * short,
                            rng.uniform(0, 2 * np.pi))
            crowd |= _rasterise(poly, h, w)
        if crowd.sum() >= _MIN_VISIBLE_PIXELS:
            objects.append((kind_idx, crowd, None, True))

    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            kind_idx = int(rng.integers(len(CLASS_NAMES)))
            r = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * short
            cx, cy = rng.uniform(0.08, 0.92) * w, rng.uniform(0.08, 0.92) * h
            poly = _polygon(CLASS_NAMES[kind_idx], cx, cy, r, rng.uniform(0, 2 * np.pi))
            mask = _rasterise(poly, h, w)
            if mask.sum() < _MIN_VISIBLE_PIXELS:
                continue
            # Reject placements that would hide too much of a shape already drawn.
            ok = all(
                (m & (1 - mask)).sum() >= max((1 - _MAX_OCCLUDED_FRACTION) * m.sum(),
                                              _MIN_VISIBLE_PIXELS)
                for _, m, _, _ in objects
            )
            if ok:
                objects.append((kind_idx, mask, poly, False))
                break

    # Visible part of each object: its mask minus everything drawn after it.
    covered = np.zeros((h, w), np.uint8)
    visible = [None] * len(objects)
    for i in range(len(objects) - 1, -1, -1):
        visible[i] = objects[i][1] & (1 - covered)
        covered |= objects[i][1]

    anns = []
    for (kind_idx, mask, poly, crowd), vis in zip(objects, visible):
        colour = rng.uniform(0, 255, size=3)
        grain = rng.normal(0, 8, size=(h, w, 3))
        sel = vis.astype(bool)
        img[sel] = colour + grain[sel]
        if crowd:
            segmentation = _rle_for_json(vis, compressed=False)
        elif (vis == mask).all():
            segmentation = [poly.reshape(-1).tolist()]
        else:
            segmentation = _rle_for_json(vis, compressed=bool(rng.integers(2)))
        rle = mask_utils.encode(np.asfortranarray(vis))
        anns.append({
            "category_id": CATEGORY_IDS[kind_idx],
            "segmentation": segmentation,
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": int(crowd),
        })
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


def write_split(
    root: str | os.PathLike, split: str, num_images: int, size: int, seed: int,
    max_objects: int = 6,
) -> pathlib.Path:
    """Write one split of the shapes set; returns the annotations json path."""
    images_dir, ann_path = annotation_paths(root, split)
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_SEED[split], i])
        img, anns = generate_image(rng, size, max_objects)
        image_id = i + 1
        ext = "png" if i % _PNG_EVERY == _PNG_EVERY - 1 else "jpg"
        file_name = f"{image_id:06d}.{ext}"
        if ext == "png":
            Image.fromarray(img).save(images_dir / file_name)
        else:
            Image.fromarray(img).save(images_dir / file_name, quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "height": int(img.shape[0]),
                       "width": int(img.shape[1])})
        for ann in anns:
            ann.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(ann)
    data = {
        "info": {"description": f"mrcnn_jax synthetic shapes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name in zip(CATEGORY_IDS, CLASS_NAMES)],
    }
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(ann_path)  # atomic: a half-written json is never read as a data set
    return ann_path


def generate(
    out: str | os.PathLike, num_train: int, num_val: int, size: int, seed: int,
    max_objects: int = 6,
) -> pathlib.Path:
    """Write the train and val splits of a shapes data set under `out`; returns `out`."""
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val must be >= 0, got {num_train}/{num_val}")
    out = pathlib.Path(out)
    for split, n in (("train", num_train), ("val", num_val)):
        write_split(out, split, n, size, seed, max_objects)
    params = dict(num_train=num_train, num_val=num_val, size=size, seed=seed,
                  max_objects=max_objects)
    (out / _META_FILE).write_text(json.dumps(params))
    return out


def ensure_generated(
    out: str | os.PathLike, num_train: int, num_val: int, size: int, seed: int,
    max_objects: int = 6,
) -> bool:
    """Generate the data set under `out` unless one with the same parameters is there.

    Returns True when it (re)generated. The parameters are recorded in `out/shapes_meta.json`.
    """
    out = pathlib.Path(out)
    params = dict(num_train=num_train, num_val=num_val, size=size, seed=seed,
                  max_objects=max_objects)
    meta = out / _META_FILE
    if meta.is_file() and json.loads(meta.read_text()) == params:
        return False
    generate(out, **params)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=6)
    args = parser.parse_args(argv)
    out = generate(args.out, args.num_train, args.num_val, args.size, args.seed,
                   args.max_objects)
    for split in SPLITS:
        _, ann = annotation_paths(out, split)
        data = json.loads(ann.read_text())
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} annotations "
              f"-> {ann}")


if __name__ == "__main__":
    main()
