"""The synthetic shapes generator: deterministic, real COCO files, annotations equal the pixels."""

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax.data import shapes


def _read(root, split):
    images_dir, ann = shapes.annotation_paths(root, split)
    return images_dir, json.loads(ann.read_text())


def test_cli_writes_coco_files_with_every_annotation_kind(tmp_path):
    shapes.main(["--out", str(tmp_path), "--num-train", "24", "--num-val", "3", "--size", "64",
                 "--seed", "3"])
    images_dir, data = _read(tmp_path, "train")
    assert len(data["images"]) == 24 and len(_read(tmp_path, "val")[1]["images"]) == 3
    assert [c["id"] for c in data["categories"]] == list(shapes.CATEGORY_IDS)
    kinds = set()
    for a in data["annotations"]:
        seg = a["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else
                  ("rle_" + ("list" if isinstance(seg["counts"], list) else "str")))
        if a["iscrowd"]:
            kinds.add("crowd")
    assert kinds == {"polygon", "rle_list", "rle_str", "crowd"}
    exts = {m["file_name"].rsplit(".", 1)[1] for m in data["images"]}
    assert exts == {"jpg", "png"}
    for m in data["images"]:
        with Image.open(images_dir / m["file_name"]) as im:
            assert im.size == (m["width"], m["height"]) and im.mode == "RGB"


def test_annotations_match_pycocotools_decoding(tmp_path):
    shapes.generate(tmp_path, num_train=12, num_val=0, size=80, seed=1)
    _, ann_path = shapes.annotation_paths(tmp_path, "train")
    coco = COCO(str(ann_path))
    by_image = {}
    for a in coco.dataset["annotations"]:
        m = coco.annToMask(a)
        assert m.sum() == a["area"] > 0
        rle = mask_utils.encode(np.asfortranarray(m))
        np.testing.assert_allclose(mask_utils.toBbox(rle), a["bbox"])
        by_image.setdefault(a["image_id"], []).append(m)
    # Visible masks of one image never overlap: occlusion was subtracted.
    for masks in by_image.values():
        assert np.stack(masks).sum(0).max() == 1


def test_deterministic_and_independent_of_counts(tmp_path):
    shapes.generate(tmp_path / "a", 5, 2, 64, seed=7)
    shapes.generate(tmp_path / "b", 3, 1, 64, seed=7)
    shapes.generate(tmp_path / "c", 3, 1, 64, seed=8)
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        a = (tmp_path / "a" / "train" / name).read_bytes()
        assert a == (tmp_path / "b" / "train" / name).read_bytes()
        assert a != (tmp_path / "c" / "train" / name).read_bytes()
    ann_a = _read(tmp_path / "a", "train")[1]["annotations"]
    ann_b = _read(tmp_path / "b", "train")[1]["annotations"]
    assert ann_a[: len(ann_b)] == ann_b


def test_ensure_generated_regenerates_only_on_new_parameters(tmp_path):
    assert shapes.ensure_generated(tmp_path, 2, 1, 48, seed=0)
    assert not shapes.ensure_generated(tmp_path, 2, 1, 48, seed=0)
    assert shapes.ensure_generated(tmp_path, 3, 1, 48, seed=0)
    assert len(_read(tmp_path, "train")[1]["images"]) == 3
