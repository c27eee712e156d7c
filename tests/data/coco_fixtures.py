"""Tiny hand-written COCO-format data sets for the data tests (written into a tmp folder)."""

import io
import json
import pathlib
import zipfile

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import coco_json as cj

H, W = 40, 50
COCO_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle"]


def _image(seed, h=H, w=W, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def _save(im, fmt):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _rle(mask, compressed):
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(mask.shape[0]), int(mask.shape[1])],
                "counts": rle["counts"].decode()}
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _box_of(seg, h=H, w=W):
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:
        rle = (mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list)
               else {"size": seg["size"], "counts": seg["counts"].encode()})
    return [float(v) for v in mask_utils.toBbox(rle)]


def person_keypoints(seed):
    """[17 * 3] COCO keypoints: some visible (v=2), some labelled-invisible (1), some absent (0)."""
    rng = np.random.default_rng(seed)
    kp = np.zeros((17, 3))
    kp[:, 0] = rng.uniform(2, W - 2, 17).round(1)
    kp[:, 1] = rng.uniform(2, H - 2, 17).round(1)
    kp[:, 2] = rng.choice([0, 1, 2], 17)
    kp[kp[:, 2] == 0, :2] = 0
    return kp.reshape(-1).tolist()


# Bad-data counts the builder must report for `write_hand_coco`'s train split.
HAND_BAD_DATA = {
    cj.UNKNOWN_CATEGORY_ID: 1, cj.ZERO_AREA_BOX: 1, cj.DEGENERATE_POLYGON: 1, cj.BOX_CLIPPED: 1,
    cj.CROWD_ONLY_IMAGE: 1, cj.IMAGE_WITHOUT_ANNOTATIONS: 1, cj.CORRUPT_IMAGE: 1,
    cj.MISSING_IMAGE_FILE: 1, cj.IMAGE_SIZE_MISMATCH: 1, cj.UNKNOWN_IMAGE_ID: 1,
}
HAND_GOOD_IMAGE_IDS = [1, 2, 3, 4, 5]  # stored by the builder
HAND_TRAINABLE_IMAGE_IDS = [1, 2, 5]  # with at least one non-crowd instance


def write_hand_coco(root):
    """A COCO json exercising every annotation kind and every bad-data case; returns
    (images dir, annotations json path). Keypoints: the person category has COCO's 17."""
    root = pathlib.Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    files = {
        "rgb.png": _save(_image(1), "PNG"),
        "gray.jpg": _save(_image(2, mode="L"), "JPEG"),
        "crowd.png": _save(_image(3), "PNG"),
        "empty.png": _save(_image(4), "PNG"),
        "rgba.png": _save(_image(5, mode="RGBA"), "PNG"),
        "corrupt.jpg": _save(_image(6), "JPEG")[:200],  # truncated
        "wrong_size.png": _save(_image(8, h=30, w=30), "PNG"),
    }
    for name, data in files.items():
        (images_dir / name).write_bytes(data)
    names = ["rgb.png", "gray.jpg", "crowd.png", "empty.png", "rgba.png", "corrupt.jpg",
             "missing.jpg", "wrong_size.png"]
    images = [{"id": i + 1, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)]

    disk = np.zeros((H, W), bool)
    yy, xx = np.mgrid[0:H, 0:W]
    disk[(yy - 20) ** 2 + (xx - 30) ** 2 <= 64] = True
    blob = np.zeros((H, W), bool)
    blob[25:35, 5:20] = True
    blob[28:31, 10:40] = True
    tri = [[4.0, 4.0, 24.0, 6.0, 10.0, 30.0]]
    quad = [[30.0, 2.0, 48.0, 2.0, 48.0, 12.0, 30.0, 12.0]]
    anns = [
        dict(image_id=1, category_id=1, segmentation=tri, keypoints=person_keypoints(0)),
        dict(image_id=1, category_id=18, segmentation=_rle(disk, compressed=True)),
        dict(image_id=1, category_id=18, segmentation=_rle(blob, compressed=False), iscrowd=1),
        dict(image_id=1, category_id=99, segmentation=quad),  # unknown category
        dict(image_id=1, category_id=18, segmentation=quad, bbox=[30.0, 2.0, 0.0, 10.0]),
        # One degenerate part (collinear) next to a good one: the annotation is kept.
        dict(image_id=1, category_id=1, segmentation=[[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]] + quad,
             keypoints=person_keypoints(1)),
        # A box reaching past the right edge: clipped and counted.
        dict(image_id=2, category_id=18, segmentation=quad, bbox=[30.0, 2.0, 30.0, 10.0]),
        dict(image_id=3, category_id=1, segmentation=_rle(blob, compressed=False), iscrowd=1),
        dict(image_id=5, category_id=1, segmentation=tri),
        dict(image_id=99, category_id=1, segmentation=tri),  # unknown image
    ]
    for i, a in enumerate(anns):
        a["id"] = 100 + i
        a.setdefault("iscrowd", 0)
        a.setdefault("bbox", _box_of(a["segmentation"]))
        a["area"] = float(a["bbox"][2] * a["bbox"][3])
    data = {"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "person", "keypoints": COCO_KEYPOINTS, "skeleton": []},
        {"id": 18, "name": "dog"}]}
    ann_path = root / "annotations.json"
    ann_path.write_text(json.dumps(data))
    return images_dir, ann_path


def write_coco2017_zips(manual_dir, with_keypoints=True):
    """Fake official layout: train2017.zip, val2017.zip, annotations_trainval2017.zip.

    Returns {split dir: (instances dict, keypoints dict)} as written.
    """
    manual_dir = pathlib.Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 18, "name": "dog", "supercategory": "animal"}]
    written = {}
    ann_zip = zipfile.ZipFile(manual_dir / "annotations_trainval2017.zip", "w")
    for split_dir, ids in (("train2017", [9, 25, 30]), ("val2017", [139])):
        with zipfile.ZipFile(manual_dir / f"{split_dir}.zip", "w") as zf:
            for image_id in ids:
                zf.writestr(f"{split_dir}/{image_id:012d}.jpg", _save(_image(image_id), "JPEG"))
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W}
                  for i in ids]
        anns, kp_anns = [], []
        for k, image_id in enumerate(ids):
            tri = [[4.0 + k, 4.0, 24.0, 6.0 + k, 10.0, 30.0]]
            person = dict(id=1000 + 10 * image_id, image_id=image_id, category_id=1,
                          segmentation=tri, bbox=_box_of(tri), area=100.0, iscrowd=0)
            dog = dict(id=1001 + 10 * image_id, image_id=image_id, category_id=18,
                       segmentation=[[30.0, 2.0, 48.0, 2.0, 48.0, 12.0, 30.0, 12.0]],
                       bbox=[30.0, 2.0, 18.0, 10.0], area=180.0, iscrowd=0)
            anns += [person, dog]
            kp_anns.append(dict(person, keypoints=person_keypoints(image_id),
                                num_keypoints=17))
        instances = {"images": images, "annotations": anns, "categories": categories}
        keypoints = {"images": images, "annotations": kp_anns, "categories": [
            dict(categories[0], keypoints=COCO_KEYPOINTS, skeleton=[])]}
        ann_zip.writestr(f"annotations/instances_{split_dir}.json", json.dumps(instances))
        if with_keypoints:
            ann_zip.writestr(f"annotations/person_keypoints_{split_dir}.json",
                             json.dumps(keypoints))
        written[split_dir] = (instances, keypoints)
    ann_zip.close()
    return written
