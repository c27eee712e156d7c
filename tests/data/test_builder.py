"""tfds builder round trips: stored boxes, labels and mask pixels equal pycocotools' decoding."""

import io
import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import coco_instances, input_pipeline, shapes
from tests.data import coco_fixtures as fx

logging.getLogger("absl").setLevel(logging.ERROR)


def _local_data_config(tmp_path, images, annotations, eval_images="", eval_annotations=""):
    d = base_config().data
    d.dataset = "coco_format"
    d.dataset_name = "hand"
    d.data_dir = str(tmp_path / "tfds")
    d.train_images, d.train_annotations = str(images), str(annotations)
    d.eval_images, d.eval_annotations = str(eval_images), str(eval_annotations)
    return d


def _check_round_trip(builder, split, coco: COCO, images_dir):
    """Every stored image/object equals the json decoded by pycocotools; returns the examples."""
    info = builder.info
    cat_map = [0] + list(info.metadata["category_ids"])  # tfds label l: category l + 1 by id
    decoders = {"image": tfds.decode.SkipDecoding()}
    examples = list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))
    for ex in examples:
        image_id = int(ex["image/id"])
        meta = coco.imgs[image_id]
        h, w = meta["height"], meta["width"]
        assert ex["image/filename"].decode() == meta["file_name"]
        path = images_dir / meta["file_name"]
        with Image.open(path) as im:
            if im.mode in ("RGB", "L"):  # stored as is; others re-encoded as RGB PNG
                assert ex["image"] == path.read_bytes()
            ref = np.asarray(im.convert("RGB"))
        ex["image"] = input_pipeline.decode_image(tf.constant(ex["image"])).numpy()
        np.testing.assert_array_equal(ex["image"], ref)  # the pipeline decodes as PIL does
        objs = ex["objects"]
        for j, ann_id in enumerate(objs["id"]):
            ann = coco.anns[int(ann_id)]
            full = coco.annToMask(ann)
            assert cat_map[objs["label"][j] + 1] == ann["category_id"] == objs["category_id"][j]
            assert bool(objs["is_crowd"][j]) == bool(ann["iscrowd"])
            assert objs["mask_area"][j] == full.sum()
            np.testing.assert_allclose(objs["area"][j], ann["area"], rtol=1e-6)
            x, y, bw, bh = ann["bbox"]
            want = np.clip([y / h, x / w, (y + bh) / h, (x + bw) / w], 0, 1)
            np.testing.assert_allclose(objs["bbox"][j], want, atol=1e-6)
            crop = np.asarray(Image.open(io.BytesIO(objs["mask_png"][j])))
            x1, y1, x2, y2 = objs["mask_box"][j]
            pasted = np.zeros_like(full)
            pasted[y1:y2, x1:x2] = crop
            np.testing.assert_array_equal(pasted, full)
    return examples


def test_shapes_round_trip(shapes_cfg, shapes_builder):
    info = shapes_builder.info
    assert info.metadata["category_ids"] == list(shapes.CATEGORY_IDS)
    assert info.features["objects"]["label"].names == list(shapes.CLASS_NAMES)
    assert info.metadata["bad_data"] == {"train": {}, "validation": {}}
    for split, shapes_split in (("train", "train"), ("validation", "val")):
        images_dir, ann = shapes.annotation_paths(shapes_cfg.data.shapes.root, shapes_split)
        coco = COCO(str(ann))
        examples = _check_round_trip(shapes_builder, split, coco, images_dir)
        assert sorted(int(e["image/id"]) for e in examples) == sorted(coco.imgs)
        assert sum(len(e["objects"]["id"]) for e in examples) == len(coco.anns)


def test_hand_written_coco_round_trip_and_bad_data(tmp_path):
    images_dir, ann = fx.write_hand_coco(tmp_path / "hand")
    builder = coco_instances.get_builder(_local_data_config(tmp_path, images_dir, ann))
    info = builder.info
    assert info.metadata["bad_data"]["train"] == fx.HAND_BAD_DATA
    assert info.metadata["category_ids"] == [1, 18]
    assert info.metadata["keypoint_names"] == fx.COCO_KEYPOINTS
    coco = COCO(str(ann))
    examples = _check_round_trip(builder, "train", coco, images_dir)
    assert sorted(int(e["image/id"]) for e in examples) == fx.HAND_GOOD_IMAGE_IDS
    by_id = {int(e["image/id"]): e for e in examples}
    # Image 1: polygon, compressed RLE, crowd uncompressed RLE, and the partly degenerate one.
    assert sorted(by_id[1]["objects"]["id"]) == [100, 101, 102, 105]
    assert list(by_id[3]["objects"]["is_crowd"]) == [True]
    assert len(by_id[4]["objects"]["id"]) == 0
    # Keypoints stored as (x, y, v), v = 0 entries zeroed, zeros for non-person instances.
    objs = by_id[1]["objects"]
    for j, ann_id in enumerate(objs["id"]):
        want = np.asarray(coco.anns[int(ann_id)].get("keypoints", [0.0] * 51)).reshape(17, 3)
        np.testing.assert_allclose(objs["keypoints"][j], want, atol=1e-6)
    # Grayscale JPEG decodes to 3 equal channels; RGBA PNG was re-encoded as RGB.
    gray = by_id[2]["image"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert by_id[5]["image"].shape == (fx.H, fx.W, 3)


def test_official_zip_layout_through_2017_config(tmp_path):
    written = fx.write_coco2017_zips(tmp_path / "manual")
    d = base_config().data
    d.data_dir, d.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "manual")
    builder = coco_instances.get_builder(d)
    assert builder.info.full_name == "coco_instances/2017/1.0.0"
    assert builder.info.metadata["keypoint_flip"][:5] == [0, 2, 1, 4, 3]
    for split, split_dir in (("train", "train2017"), ("validation", "val2017")):
        instances, keypoints = written[split_dir]
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert sorted(int(e["image/id"]) for e in examples) == sorted(
            m["id"] for m in instances["images"])
        kp_by_id = {a["id"]: np.reshape(a["keypoints"], (17, 3)) for a in keypoints["annotations"]}
        n = 0
        for e in examples:
            for ann_id, cid, kp in zip(e["objects"]["id"], e["objects"]["category_id"],
                                       e["objects"]["keypoints"]):
                want = kp_by_id.get(int(ann_id), np.zeros((17, 3)))
                assert (int(ann_id) in kp_by_id) == (cid == 1)
                np.testing.assert_allclose(kp, want, atol=1e-6)
                n += 1
        assert n == len(instances["annotations"])


def test_official_layout_without_keypoints_file_is_a_clear_error(tmp_path):
    fx.write_coco2017_zips(tmp_path / "manual", with_keypoints=False)
    d = base_config().data
    d.data_dir, d.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "manual")
    with pytest.raises(FileNotFoundError, match=r"person_keypoints_train2017\.json not found"):
        coco_instances.get_builder(d)


def test_missing_paths_raise_naming_them(tmp_path):
    d = base_config().data
    d.data_dir, d.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        coco_instances.get_builder(d)
    images_dir, ann = fx.write_hand_coco(tmp_path / "hand")
    with pytest.raises(FileNotFoundError, match="train images folder not found: .*nope"):
        coco_instances.get_builder(_local_data_config(tmp_path, tmp_path / "nope", ann))
    with pytest.raises(FileNotFoundError, match=r"train annotations: .*nope\.json"):
        coco_instances.get_builder(
            _local_data_config(tmp_path, images_dir, tmp_path / "nope.json"))
    d = _local_data_config(tmp_path, images_dir, ann)
    d.train_images = ""
    with pytest.raises(ValueError, match="the train split needs both"):
        coco_instances.get_builder(d)


def test_splits_with_different_categories_rejected(tmp_path):
    images_dir, ann = fx.write_hand_coco(tmp_path / "hand")
    shapes.generate(tmp_path / "shp", 1, 1, 48, seed=0)
    val_images, val_ann = shapes.annotation_paths(tmp_path / "shp", "val")
    d = _local_data_config(tmp_path, images_dir, ann, val_images, val_ann)
    with pytest.raises(ValueError, match="differ"):
        coco_instances.get_builder(d)
