"""COCO json validation: a clear error naming the file/field, or a counted skip, per bad case."""

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mrcnn_jax.data import coco_json as cj

H, W = 20, 30
COCO_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle"]
# torchvision references/detection/transforms.py `_flip_coco_person_keypoints`.
TORCHVISION_COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]

SQUARE = [5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]  # 10x10 square polygon


def _data(**ann_overrides):
    ann = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5.0, 5.0, 10.0, 10.0],
           "area": 100.0, "iscrowd": 0, "segmentation": [list(SQUARE)]}
    ann.update(ann_overrides)
    return {"images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
            "annotations": [ann],
            "categories": [{"id": 7, "name": "thing"}, {"id": 3, "name": "other"}]}


def _convert(data):
    index = cj.build_index(data, "x.json")
    report = cj.BadDataReport("x")
    return cj.convert_image_annotations(index, index.images[0], report), report


def test_good_polygon_round_trip_and_label_map():
    (inst,), report = _convert(_data())
    assert not report.counts
    index = cj.build_index(_data(), "x.json")
    assert index.category_ids == [3, 7] and index.label_of_category == {3: 1, 7: 2}
    assert inst.label == 2 and inst.category_id == 7 and not inst.is_crowd
    full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([SQUARE], H, W)))
    x1, y1, x2, y2 = inst.mask_box
    assert inst.mask_area == full.sum() and (full.sum() == inst.mask_crop.sum())
    np.testing.assert_array_equal(full[y1:y2, x1:x2], inst.mask_crop)
    np.testing.assert_allclose(inst.box, [5, 5, 15, 15])


def test_missing_path_names_field_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train annotations: .*nope\.json"):
        cj.load_index(tmp_path / "nope.json", field="train annotations")


def test_malformed_json_names_file_and_position(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 1 column 18"):
        cj.load_index(p)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("annotations"), "annotations is missing"),
    (lambda d: d.update(categories=[]), "categories is empty"),
    (lambda d: d["images"][0].update(height=0), r"images\[0\]\.height"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"images\[1\]\.id duplicates"),
    (lambda d: d["categories"][1].update(id=7), r"categories\[1\]\.id duplicates"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\]\.bbox"),
    (lambda d: d["annotations"][0].update(category_id="7"), r"annotations\[0\]\.category_id"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": "x"}),
     r"annotations\[0\]\.segmentation"),
])
def test_structural_errors_name_the_field(mutate, field):
    data = copy.deepcopy(_data())
    mutate(data)
    with pytest.raises(ValueError, match=rf"x\.json: {field}"):
        cj.build_index(data, "x.json")


@pytest.mark.parametrize("overrides, reason", [
    ({"category_id": 99}, cj.UNKNOWN_CATEGORY_ID),
    ({"bbox": [5.0, 5.0, 0.0, 10.0]}, cj.ZERO_AREA_BOX),
    ({"bbox": [40.0, 5.0, 10.0, 10.0]}, cj.BOX_OUTSIDE_IMAGE),
    ({"segmentation": []}, cj.EMPTY_SEGMENTATION),
    ({"segmentation": None}, cj.EMPTY_SEGMENTATION),
    ({"segmentation": {"size": [H + 1, W], "counts": [0, 5]}}, cj.RLE_SIZE_MISMATCH),
    # A polygon entirely outside the image rasterises to nothing.
    ({"segmentation": [[40.0, 40.0, 50.0, 40.0, 50.0, 50.0]]}, cj.EMPTY_MASK),
    ({"keypoints": [1.0, 2.0, 2.0]}, cj.BAD_KEYPOINTS),
])
def test_bad_annotation_is_skipped_and_counted(overrides, reason):
    data = _data(**overrides)
    if reason == cj.BAD_KEYPOINTS:
        data["categories"][0]["keypoints"] = COCO_KEYPOINTS
    instances, report = _convert(data)
    assert instances == []
    assert report.counts[reason] == 1
    assert report.counts[cj.IMAGE_WITHOUT_ANNOTATIONS] == 1
    assert "x.json annotations[0] (id 1)" in report.summary()


def test_degenerate_polygons_dropped_good_parts_kept():
    line = [0.0, 0.0, 5.0, 5.0, 10.0, 10.0]  # collinear: no area
    short = [1.0, 1.0, 2.0, 2.0]  # fewer than 3 points
    (inst,), report = _convert(_data(segmentation=[line, list(SQUARE), short]))
    assert report.counts[cj.DEGENERATE_POLYGON] == 2
    assert "segmentation[0]" in report.summary() and "segmentation[2]" in report.summary()
    assert inst.mask_area == mask_utils.area(
        mask_utils.merge(mask_utils.frPyObjects([SQUARE], H, W)))


def test_box_partly_outside_is_clipped_and_counted():
    (inst,), report = _convert(_data(bbox=[-2.0, 5.0, 40.0, 10.0]))
    np.testing.assert_allclose(inst.box, [0, 5, W, 15])
    assert report.counts[cj.BOX_CLIPPED] == 1


def test_rle_compressed_and_uncompressed_equal_polygon_pixels():
    full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([SQUARE], H, W)))
    compressed = mask_utils.encode(np.asfortranarray(full))
    flat = full.reshape(-1, order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    for seg in ({"size": [H, W], "counts": compressed["counts"].decode()},
                {"size": [H, W], "counts": runs}):
        (inst,), report = _convert(_data(segmentation=seg, iscrowd=1))
        assert inst.is_crowd and not report.counts[cj.EMPTY_SEGMENTATION]
        x1, y1, x2, y2 = inst.mask_box
        np.testing.assert_array_equal(inst.mask_crop, full[y1:y2, x1:x2])


def test_crowd_only_and_empty_images_are_counted_not_dropped():
    data = _data(iscrowd=1)
    data["images"].append({"id": 2, "file_name": "b.jpg", "height": H, "width": W})
    index = cj.build_index(data, "x.json")
    report = cj.BadDataReport("x")
    assert len(cj.convert_image_annotations(index, index.images[0], report)) == 1
    assert cj.convert_image_annotations(index, index.images[1], report) == []
    assert report.as_dict() == {cj.CROWD_ONLY_IMAGE: 1, cj.IMAGE_WITHOUT_ANNOTATIONS: 1}


def test_orphan_annotations_counted():
    data = _data(image_id=42)
    report = cj.BadDataReport("x")
    cj.count_orphan_annotations(cj.build_index(data, "x.json"), report)
    assert report.as_dict() == {cj.UNKNOWN_IMAGE_ID: 1}


def test_keypoints_parsed_invisible_zeroed_and_flip_map_matches_torchvision():
    data = _data(keypoints=[3.0, 4.0, 2.0, 9.0, 9.0, 0.0] + [0.0] * 45)
    data["categories"][0]["keypoints"] = COCO_KEYPOINTS
    (inst,), _ = _convert(data)
    assert inst.keypoints.shape == (17, 3)
    np.testing.assert_array_equal(inst.keypoints[:2], [[3, 4, 2], [0, 0, 0]])
    assert cj.keypoint_flip_indices(COCO_KEYPOINTS) == TORCHVISION_COCO_FLIP


def test_undecodable_file_is_not_json(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"bin\.json"):
        cj.load_json(p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"bin\.json: top level must be a JSON object"):
        cj.load_index(p)
