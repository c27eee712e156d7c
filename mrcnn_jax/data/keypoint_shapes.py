"""Synthetic stick figures: a small COCO-format person-keypoint data set written to disk.

Each image holds 1-3 stick figures (filled head with eyes, nose and ears, a torso, two arms and
two legs of random pose, drawn as thick strokes) on a textured background, later figures partly
occluding earlier ones. Every figure is a COCO person annotation with the 17 keypoints of COCO in
COCO's order and its skeleton, `num_keypoints`, an RLE mask of its visible pixels, the mask's
tight box and area; so the data set goes through the same builder, pipeline (with the left/right
swap of the horizontal flip) and pycocotools OKS evaluation as COCO persons do:

    python -m mrcnn_jax.data.keypoint_shapes --out DIR --num-train N --num-val M --size S

writes `DIR/{train,val}/*.{jpg,png}` and `DIR/annotations/person_keypoints_{train,val}.json`.

Conventions: figures face the viewer, so a person's left side is on the image's right (as for a
COCO person seen from the front); the horizontal flip in the pipeline mirrors the picture and
swaps the names, which keeps that convention. Visibility: 2 when the keypoint is seen, 1 when a
later figure covers it (labelled, not visible), 0 (with x = y = 0) outside the image.
Deterministic: image i of a split is a pure function of (seed, split, i).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from mrcnn_jax.data import shapes

SPLITS = ("train", "val")
ASPECT_RATIOS = shapes.ASPECT_RATIOS  # width / height, as the shapes set draws them
# COCO's 17 person keypoints, in COCO's order, and its skeleton (1-based keypoint pairs).
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
CATEGORY_ID = 1
_SPLIT_SEED = {"train": 0, "val": 1}
_META_FILE = "keypoint_shapes_meta.json"
_PNG_EVERY = 4
_JPEG_QUALITY = 95

# Figure geometry, in units of the figure's height (head top to ankles ~ 1).
_MIN_HEIGHT, _MAX_HEIGHT = 0.45, 0.85  # of the image height
_HEAD_Y, _HEAD_R = 0.09, 0.075
_SHOULDER_Y, _SHOULDER_X = 0.22, 0.11
_HIP_Y, _HIP_X = 0.52, 0.075
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.15, 0.24, 0.22
_STROKE = 0.055  # limb width
_MAX_OCCLUDED_FRACTION = 0.4
_MIN_VISIBLE_PIXELS = 200


def annotation_paths(root: str | os.PathLike, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(images folder, annotations json) of `split` ('train' | 'val')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = pathlib.Path(root)
    return root / split, root / "annotations" / f"person_keypoints_{split}.json"


def _direction(angle_deg: float, side: float) -> np.ndarray:
    """Unit vector at `angle_deg` from straight down, turned outwards on `side` (+1 = image
    right, the person's left)."""
    a = np.deg2rad(angle_deg)
    return np.array([side * np.sin(a), np.cos(a)])


def _pose(rng: np.random.Generator) -> np.ndarray:
    """[17, 2] keypoints of a unit-height figure centred on x = 0, head top at y = 0."""
    k = {}
    head = np.array([0.0, _HEAD_Y])
    k["nose"] = head + [0.0, 0.02]
    for side, name in ((1.0, "left"), (-1.0, "right")):
        k[f"{name}_eye"] = head + [side * 0.03, -0.012]
        k[f"{name}_ear"] = head + [side * _HEAD_R, 0.0]
        shoulder = np.array([side * _SHOULDER_X, _SHOULDER_Y])
        upper = rng.uniform(10, 160)
        fore = np.clip(upper + rng.uniform(-70, 70), 0, 180)
        elbow = shoulder + _UPPER_ARM * _direction(upper, side)
        k[f"{name}_shoulder"], k[f"{name}_elbow"] = shoulder, elbow
        k[f"{name}_wrist"] = elbow + _FOREARM * _direction(fore, side)
        hip = np.array([side * _HIP_X, _HIP_Y])
        thigh = rng.uniform(0, 40)
        shin = np.clip(thigh + rng.uniform(-35, 25), -10, 60)
        knee = hip + _THIGH * _direction(thigh, side)
        k[f"{name}_hip"], k[f"{name}_knee"] = hip, knee
        k[f"{name}_ankle"] = knee + _SHIN * _direction(shin, side)
    return np.stack([k[n] for n in KEYPOINT_NAMES])


def _draw_figure(draw: ImageDraw.ImageDraw, pts: np.ndarray, height: float, fill) -> None:
    """Head, torso and limbs of a figure with image keypoints `pts` [17, 2]."""
    idx = {n: i for i, n in enumerate(KEYPOINT_NAMES)}
    width = max(3, int(round(_STROKE * height)))
    torso = [pts[idx[n]] for n in ("left_shoulder", "right_shoulder", "right_hip", "left_hip")]
    draw.polygon([tuple(p) for p in torso], fill=fill)
    for a, b in (("shoulder", "elbow"), ("elbow", "wrist"), ("hip", "knee"), ("knee", "ankle")):
        for side in ("left", "right"):
            p, q = pts[idx[f"{side}_{a}"]], pts[idx[f"{side}_{b}"]]
            draw.line([tuple(p), tuple(q)], fill=fill, width=width)
            for c in (p, q):  # round joints
                draw.ellipse([c[0] - width / 2, c[1] - width / 2, c[0] + width / 2,
                              c[1] + width / 2], fill=fill)
    neck = (pts[idx["left_shoulder"]] + pts[idx["right_shoulder"]]) / 2
    head = (pts[idx["left_ear"]] + pts[idx["right_ear"]]) / 2
    draw.line([tuple(neck), tuple(head)], fill=fill, width=width)
    r = _HEAD_R * height
    draw.ellipse([head[0] - r, head[1] - r, head[0] + r, head[1] + r], fill=fill)
    for side in ("left", "right"):  # ears stick out of the head
        e = pts[idx[f"{side}_ear"]]
        draw.ellipse([e[0] - r / 3, e[1] - r / 2, e[0] + r / 3, e[1] + r / 2], fill=fill)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour noise with grain, [h, w, 3] float."""
    coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float64)
    return smooth + rng.normal(0, 6, size=(h, w, 3))


def generate_image(rng: np.random.Generator, size: int, max_figures: int = 3
                   ) -> tuple[np.ndarray, list[dict]]:
    """One image [h, w, 3] uint8 and its person annotations (COCO dicts without ids)."""
    h = size
    w = int(round(size * rng.choice(ASPECT_RATIOS)))
    img = _background(rng, h, w)
    figures: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (keypoints, mask, colour)
    for _ in range(int(rng.integers(1, max_figures + 1))):
        for _attempt in range(20):
            height = rng.uniform(_MIN_HEIGHT, _MAX_HEIGHT) * h
            pts = _pose(rng) * height * np.array([rng.uniform(0.85, 1.15), 1.0])
            lo, hi = pts.min(0), pts.max(0)
            span = hi - lo
            x0 = rng.uniform(-0.1 * span[0], w - 0.9 * span[0]) - lo[0]
            y0 = rng.uniform(-0.05 * span[1], h - 0.95 * span[1]) - lo[1]
            pts = pts + [x0, y0]
            mask_im = Image.new("L", (w, h), 0)
            _draw_figure(ImageDraw.Draw(mask_im), pts, height, 1)
            mask = np.asarray(mask_im, np.uint8)
            if mask.sum() < _MIN_VISIBLE_PIXELS:
                continue
            ok = all((m & (1 - mask)).sum() >= (1 - _MAX_OCCLUDED_FRACTION) * m.sum()
                     for _, m, _ in figures)
            if ok:
                figures.append((pts, mask, rng.uniform(0, 255, size=3)))
                break

    covered = np.zeros((h, w), np.uint8)
    visible = [None] * len(figures)
    occluded_by_later = [None] * len(figures)
    for i in range(len(figures) - 1, -1, -1):
        visible[i] = figures[i][1] & (1 - covered)
        occluded_by_later[i] = covered.copy()
        covered |= figures[i][1]

    anns = []
    for (pts, mask, colour), vis, later in zip(figures, visible, occluded_by_later):
        sel = vis.astype(bool)
        img[sel] = colour + rng.normal(0, 8, size=(h, w, 3))[sel]
        # Face marks in a contrasting colour, so eyes/nose/ears are visible features.
        marks = Image.new("L", (w, h), 0)
        md = ImageDraw.Draw(marks)
        r = max(1.5, 0.012 * (pts[:, 1].max() - pts[:, 1].min()))
        for j in range(5):
            x, y = pts[j]
            md.ellipse([x - r, y - r, x + r, y + r], fill=1)
        msel = sel & np.asarray(marks, bool)
        img[msel] = 255 - colour
        keypoints = []
        for x, y in pts:
            inside = 0 <= x < w and 0 <= y < h
            if not inside:
                keypoints += [0.0, 0.0, 0]
                continue
            seen = not later[min(int(y), h - 1), min(int(x), w - 1)]
            keypoints += [round(float(x), 2), round(float(y), 2), 2 if seen else 1]
        rle = mask_utils.encode(np.asfortranarray(vis))
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        anns.append({
            "category_id": CATEGORY_ID,
            "segmentation": segmentation,
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
            "keypoints": keypoints,
            "num_keypoints": int(sum(1 for v in keypoints[2::3] if v > 0)),
        })
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


def write_split(root: str | os.PathLike, split: str, num_images: int, size: int, seed: int,
                max_figures: int = 3) -> pathlib.Path:
    """Write one split; returns the annotations json path."""
    images_dir, ann_path = annotation_paths(root, split)
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_SEED[split], i])
        img, anns = generate_image(rng, size, max_figures)
        image_id = i + 1
        ext = "png" if i % _PNG_EVERY == _PNG_EVERY - 1 else "jpg"
        file_name = f"{image_id:06d}.{ext}"
        kwargs = {} if ext == "png" else {"quality": _JPEG_QUALITY}
        Image.fromarray(img).save(images_dir / file_name, **kwargs)
        images.append({"id": image_id, "file_name": file_name, "height": int(img.shape[0]),
                       "width": int(img.shape[1])})
        for ann in anns:
            ann.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(ann)
    data = {
        "info": {"description": f"mrcnn_jax synthetic stick figures, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": CATEGORY_ID, "name": "person", "supercategory": "person",
                        "keypoints": list(KEYPOINT_NAMES),
                        "skeleton": [list(p) for p in SKELETON]}],
    }
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(ann_path)  # atomic: a half-written json is never read as a data set
    return ann_path


def ensure_generated(out: str | os.PathLike, num_train: int, num_val: int, size: int,
                     seed: int, max_figures: int = 3) -> bool:
    """Generate the data set under `out` unless one with the same parameters is there.
    Returns True when it (re)generated."""
    if size < 64:
        raise ValueError(f"size must be >= 64 pixels, got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val must be >= 0, got {num_train}/{num_val}")
    out = pathlib.Path(out)
    params = dict(num_train=num_train, num_val=num_val, size=size, seed=seed,
                  max_figures=max_figures)
    meta = out / _META_FILE
    if meta.is_file() and json.loads(meta.read_text()) == params:
        return False
    for split, n in (("train", num_train), ("val", num_val)):
        write_split(out, split, n, size, seed, max_figures)
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(params))
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-figures", type=int, default=3)
    args = parser.parse_args(argv)
    ensure_generated(args.out, args.num_train, args.num_val, args.size, args.seed,
                     args.max_figures)
    for split in SPLITS:
        _, ann = annotation_paths(args.out, split)
        data = json.loads(ann.read_text())
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} persons -> "
              f"{ann}")


if __name__ == "__main__":
    main()
