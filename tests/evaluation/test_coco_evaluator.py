"""CocoEvaluator against pycocotools run independently, on the hand-written tiny COCO of tiny_coco.

What each test protects is in its name; the numbers come from pycocotools on a results json the
test writes itself, or from hand computation (perfect detections: AP = 1, AR1 = 8/9).
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax.evaluation import coco_evaluator as ce
from mrcnn_jax.evaluation import summary
from tests.evaluation import tiny_coco

LABEL_OF_CATEGORY = {3: 1, 7: 2, 11: 3}  # the default contiguous map, inverted by hand


@pytest.fixture()
def gt_path(tmp_path):
    return tiny_coco.write(tmp_path / "gt.json", tiny_coco.dataset())


def _gt_instances(coco, image_id):
    """Non-crowd gt of an image as (boxes xyxy [N,4], labels [N], masks [N,H,W])."""
    anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
    info = coco.imgs[image_id]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns], np.float64).reshape(-1, 4)
    labels = np.array([LABEL_OF_CATEGORY[a["category_id"]] for a in anns], np.int64)
    masks = np.array([coco.annToMask(a) for a in anns], bool).reshape(
        -1, info["height"], info["width"])
    return boxes, labels, masks


def _pad(x, slots, fill):
    out = np.full((slots,) + x.shape[1:], fill, dtype=x.dtype)
    out[:len(x)] = x
    return out


def _quiet_cocoeval(gt_path, results_path, iou_type):
    """pycocotools on files, the way its README does it: the independent reference."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_dt = coco_gt.loadRes(results_path)
        e = COCOeval(coco_gt, coco_dt, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def test_ground_truth_as_detections_gives_ap_one(gt_path, tmp_path):
    coco = ce.load_coco_gt(gt_path)
    evaluator = ce.CocoEvaluator(gt_path)
    slots = 5
    for image_id in (10, 20, 30, 40):
        boxes, labels, masks = _gt_instances(coco, image_id)
        n = len(boxes)
        info = coco.imgs[image_id]
        evaluator.add_predictions(
            [image_id], _pad(boxes, slots, 7.0)[None], np.ones((1, slots)),
            _pad(labels, slots, 0)[None],
            masks=[_pad(masks, slots, True)] if n else
            [np.ones((slots, info["height"], info["width"]), bool)],
            valid=(np.arange(slots) < n)[None])
    metrics = evaluator.evaluate(("bbox", "segm"), output_dir=tmp_path / "out")
    for iou_type in ("bbox", "segm"):
        for name in ce.DETECTION_METRIC_NAMES:
            expected = tiny_coco.PERFECT_AR1 if name == "AR1" else 1.0
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(expected, abs=1e-12), name
        for cat in ("circle", "square", "triangle"):
            assert metrics[f"{iou_type}/AP-{cat}"] == 1.0
        # A perfect detector's mean PR curve is 1 at every recall level.
        for _, (recall, precision) in ce.mean_pr_curves(evaluator.coco_evals[iou_type]).items():
            assert recall.shape == (101,)
            np.testing.assert_array_equal(precision, 1.0)
    # The files: metrics.json equals the returned dict, the results json loads in pycocotools,
    # and the PR plots are real PNGs.
    out = tmp_path / "out"
    assert json.loads((out / ce.METRICS_FILENAME).read_text()) == metrics
    results = json.loads((out / ce.RESULTS_FILENAME).read_text())
    assert len(results) == 8  # the 9 annotations less the crowd one
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    for iou_type in ("bbox", "segm"):
        with Image.open(out / f"pr_curve_{iou_type}.png") as im:
            assert im.size == (500, 400)


@pytest.mark.parametrize("seed", [0, 1])
def test_perturbed_detections_match_independent_pycocotools(gt_path, tmp_path, seed):
    rng = np.random.default_rng(seed)
    coco = ce.load_coco_gt(gt_path)
    evaluator = ce.CocoEvaluator(gt_path)
    slots = 8
    independent = {"bbox": [], "segm": []}
    image_ids = [10, 20, 30, 40]
    cat_of_label = {v: k for k, v in LABEL_OF_CATEGORY.items()}
    for start in (0, 2):  # two calls of B = 2 images of different sizes
        batch_ids = image_ids[start:start + 2]
        b_boxes = np.zeros((2, slots, 4))
        b_scores = np.zeros((2, slots))
        b_labels = np.zeros((2, slots), np.int64)
        b_valid = np.zeros((2, slots), bool)
        b_masks = []
        for i, image_id in enumerate(batch_ids):
            info = coco.imgs[image_id]
            h, w = info["height"], info["width"]
            boxes, labels, masks = _gt_instances(coco, image_id)
            keep = rng.uniform(size=len(boxes)) < 0.8
            boxes = boxes[keep] + rng.uniform(-3, 3, (int(keep.sum()), 4))
            labels = labels[keep]
            masks = np.array([np.roll(m, rng.integers(-2, 3, 2), (0, 1)) for m in masks[keep]],
                             bool).reshape(-1, h, w)
            swap = rng.uniform(size=len(labels)) < 0.2  # a few wrong classes
            labels = np.where(swap, rng.integers(1, 4, len(labels)), labels)
            # False positives: random boxes with their box as mask.
            num_fp = int(rng.integers(1, 3))
            xy = rng.uniform(0, [w - 8, h - 8], (num_fp, 2))
            fp_boxes = np.concatenate([xy, xy + rng.uniform(3, 8, (num_fp, 2))], 1)
            fp_masks = np.zeros((num_fp, h, w), bool)
            for k, (x1, y1, x2, y2) in enumerate(fp_boxes.astype(int)):
                fp_masks[k, y1:y2, x1:x2] = True
            boxes = np.concatenate([boxes, fp_boxes])
            labels = np.concatenate([labels, rng.integers(1, 4, num_fp)])
            masks = np.concatenate([masks, fp_masks])
            scores = rng.uniform(0.05, 1.0, len(boxes))
            # Shuffled into random slots, the rest padding with garbage that must be ignored.
            n = len(boxes)
            order = rng.permutation(slots)[:n]
            b_boxes[i] = rng.uniform(0, 30, (slots, 4))
            b_scores[i] = 0.99
            b_boxes[i, order], b_scores[i, order], b_labels[i, order] = boxes, scores, labels
            b_valid[i, order] = True
            full = np.ones((slots, h, w), bool)
            full[order] = masks
            b_masks.append(full)
            # The independent results, written the way COCO's results format documents.
            for k in np.argsort(order):
                x1, y1, x2, y2 = boxes[k]
                cat = cat_of_label[int(labels[k])]
                independent["bbox"].append({"image_id": image_id, "category_id": cat,
                                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                                            "score": scores[k]})
                rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                independent["segm"].append({"image_id": image_id, "category_id": cat,
                                            "segmentation": rle, "score": scores[k]})
        evaluator.add_predictions(batch_ids, b_boxes, b_scores, b_labels, masks=b_masks,
                                  valid=b_valid)

    metrics = evaluator.evaluate(("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        path = tmp_path / f"independent_{iou_type}.json"
        path.write_text(json.dumps(independent[iou_type], default=float))
        reference = _quiet_cocoeval(gt_path, str(path), iou_type)
        ours = np.array([metrics[f"{iou_type}/{n}"] for n in ce.DETECTION_METRIC_NAMES])
        np.testing.assert_array_equal(ours, reference.stats)
        assert 0.05 < reference.stats[0] < 0.95  # a non-trivial AP, or the test proves little
        precision = reference.eval["precision"][:, :, :, 0, -1]
        for k, (cat_id, name) in enumerate([(3, "circle"), (7, "square"), (11, "triangle")]):
            assert reference.params.catIds[k] == cat_id
            p = precision[:, :, k]
            assert metrics[f"{iou_type}/AP-{name}"] == np.mean(p[p > -1])


def test_empty_predictions_report_zero_not_crash(gt_path, tmp_path):
    # pycocotools' loadRes raises IndexError on []; the evaluator reports AP 0 instead.
    with pytest.raises(IndexError), contextlib.redirect_stdout(io.StringIO()):
        COCO(gt_path).loadRes([])
    metrics = ce.CocoEvaluator(gt_path).evaluate(("bbox", "segm"), output_dir=tmp_path)
    for iou_type in ("bbox", "segm"):
        for name in ce.DETECTION_METRIC_NAMES:
            assert metrics[f"{iou_type}/{name}"] == 0.0, name
    assert json.loads((tmp_path / ce.RESULTS_FILENAME).read_text()) == []
    # Images added with every slot invalid: evaluated over just those images, still 0.
    evaluator = ce.CocoEvaluator(gt_path)
    evaluator.add_predictions([30], np.zeros((1, 2, 4)), np.ones((1, 2)), np.ones((1, 2)),
                              masks=[np.ones((2, 40, 40), bool)], valid=np.zeros((1, 2), bool))
    metrics = evaluator.evaluate(("bbox", "segm"))
    assert evaluator.coco_evals["bbox"].params.imgIds == [30]
    # Image 30 has only small objects: medium/large are undefined (-1), the rest 0.
    for iou_type in ("bbox", "segm"):
        for name in ce.DETECTION_METRIC_NAMES:
            undefined = name in ("APm", "APl", "ARm", "ARl")
            assert metrics[f"{iou_type}/{name}"] == (-1.0 if undefined else 0.0), name
        assert metrics[f"{iou_type}/AP-square"] == -1.0  # no square in image 30


def test_subset_of_images_is_what_gets_evaluated(gt_path):
    # Detections for image 30 only: evaluating over all gt images would halve recall.
    coco = ce.load_coco_gt(gt_path)
    boxes, labels, masks = _gt_instances(coco, 30)
    evaluator = ce.CocoEvaluator(gt_path)
    evaluator.add_predictions([30], boxes[None], np.ones((1, 2)), labels[None], masks=[masks])
    metrics = evaluator.evaluate(("bbox",))
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["bbox/AR100"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["bbox/AP-square"] == -1.0  # no square in image 30


def test_rle_masks_equal_array_masks(gt_path):
    coco = ce.load_coco_gt(gt_path)
    boxes, labels, masks = _gt_instances(coco, 20)
    by_array = ce.CocoEvaluator(gt_path).add_predictions(
        [20], boxes[None], np.full((1, 3), 0.5), labels[None], masks=[masks])
    compressed = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    by_rle = ce.CocoEvaluator(gt_path).add_predictions(
        [20], boxes[None], np.full((1, 3), 0.5), labels[None], masks=[compressed])
    uncompressed = [tiny_coco._uncompressed(m.astype(np.uint8)) for m in masks]
    by_uncompressed = ce.CocoEvaluator(gt_path).add_predictions(
        [20], boxes[None], np.full((1, 3), 0.5), labels[None], masks=[uncompressed])
    assert by_array == by_rle == by_uncompressed
    assert [r["category_id"] for r in by_array] == [7, 11, 3]
    x1, y1, x2, y2 = boxes[0]
    assert by_array[0]["bbox"] == [x1, y1, x2 - x1, y2 - y1]


def test_keypoints_gt_as_detections_and_perturbed_match_pycocotools(tmp_path):
    data = tiny_coco.keypoint_dataset()
    gt_path = tiny_coco.write(tmp_path / "kp.json", data)
    perfect = ce.CocoEvaluator(gt_path)
    perturbed = ce.CocoEvaluator(gt_path)
    rng = np.random.default_rng(0)
    independent = []
    for image_id in (1, 2):
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and "keypoints" in a]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns])
        kps = np.array([a["keypoints"] for a in anns]).reshape(len(anns), 17, 3)
        ones = np.ones((1, len(anns)))
        perfect.add_predictions([image_id], boxes[None], ones, ones, keypoints=kps[None])
        noisy = kps + np.concatenate([rng.normal(0, 2.0, kps[..., :2].shape),
                                      np.zeros(kps[..., 2:].shape)], -1)
        scores = rng.uniform(0.1, 1, len(anns))
        perturbed.add_predictions([image_id], boxes[None], scores[None], ones,
                                  keypoints=noisy[None])
        for k in range(len(anns)):
            independent.append({"image_id": image_id, "category_id": 1, "score": scores[k],
                                "keypoints": noisy[k].reshape(-1).tolist()})
    metrics = perfect.evaluate(("keypoints",))
    for name in ce.KEYPOINT_METRIC_NAMES:
        assert metrics[f"keypoints/{name}"] == pytest.approx(1.0, abs=1e-12), name
    assert metrics["keypoints/AP-person"] == pytest.approx(1.0, abs=1e-12)
    assert "keypoints/AP-ball" not in metrics  # OKS only for categories with keypoints
    path = tmp_path / "independent_kp.json"
    path.write_text(json.dumps(independent, default=float))
    official_gt = tiny_coco.write(tmp_path / "person_kp.json",
                                  tiny_coco.person_keypoints_only(data))
    reference = _quiet_cocoeval(official_gt, str(path), "keypoints")
    metrics = perturbed.evaluate(("keypoints",))
    ours = np.array([metrics[f"keypoints/{n}"] for n in ce.KEYPOINT_METRIC_NAMES])
    np.testing.assert_array_equal(ours, reference.stats)
    assert 0.05 < reference.stats[0] < 0.95
    with pytest.raises(ValueError, match="no instance masks"):
        perturbed.evaluate(("segm",))


def test_unknown_ids_raise_errors_naming_them(gt_path, tmp_path):
    evaluator = ce.CocoEvaluator(gt_path)
    box = np.array([[[1.0, 1.0, 5.0, 5.0]]])
    with pytest.raises(ValueError, match=r"image_ids \[99\] are not in the ground truth"):
        evaluator.add_predictions([99], box, [[0.9]], [[1]])
    with pytest.raises(ValueError, match=r"labels \[4\] of valid detections"):
        evaluator.add_predictions([10], box, [[0.9]], [[4]])
    with pytest.raises(ValueError, match=r"labels \[0\]"):  # background is not a detection
        evaluator.add_predictions([10], box, [[0.9]], [[0]])
    with pytest.raises(ValueError, match=r"category ids \[5\]"):
        ce.CocoEvaluator(gt_path, label_to_category_id=[3, 5, 11])
    bad = [{"image_id": 10, "category_id": 3, "bbox": [1, 1, 2, 2], "score": 0.5},
           {"image_id": 77, "category_id": 8, "bbox": [1, 1, 2, 2], "score": 0.5}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json.*unknown image ids \[77\].*category ids \[8\]"):
        evaluator.load_results(path)
    assert evaluator.results == []  # nothing half-added
    # A valid results json is accepted and evaluated over all gt images.
    path.write_text(json.dumps(bad[:1]))
    evaluator.load_results(path)
    metrics = evaluator.evaluate(("bbox",))
    assert evaluator.coco_evals["bbox"].params.imgIds == [10, 20, 30, 40]
    assert metrics["bbox/AP"] == 0.0


def test_bad_input_errors(gt_path, tmp_path):
    evaluator = ce.CocoEvaluator(gt_path)
    box = np.array([[[1.0, 1.0, 5.0, 5.0]]])
    with pytest.raises(ValueError, match="original size is \\(48, 64\\)"):
        evaluator.add_predictions([10], box, [[0.9]], [[1]], masks=[np.ones((1, 24, 32), bool)])
    with pytest.raises(ValueError, match=r"scores must have shape \[1, 1\]"):
        evaluator.add_predictions([10], box, [0.9], [[1]])
    with pytest.raises(ValueError, match="iou_types: unknown iou type 'mask'"):
        evaluator.evaluate(("mask",))
    evaluator.add_predictions([10], box, [[0.9]], [[1]])
    with pytest.raises(ValueError, match=r"image_ids \[10\] were already added"):
        evaluator.add_predictions([10], box, [[0.9]], [[1]])
    with pytest.raises(ValueError, match="predictions were added without masks"):
        evaluator.evaluate(("bbox", "segm"))
    with pytest.raises(ValueError, match="no ground-truth category has a keypoint schema"):
        evaluator.evaluate(("keypoints",))
    # A ground truth without masks asked for segm.
    data = tiny_coco.dataset()
    for a in data["annotations"]:
        del a["segmentation"]
    no_masks = ce.CocoEvaluator(data)
    assert no_masks.gt_iou_types == ("bbox",)
    assert ce.CocoEvaluator(gt_path).gt_iou_types == ("bbox", "segm")
    with pytest.raises(ValueError, match="ground truth has no instance masks"):
        no_masks.evaluate(("bbox", "segm"))
    # Missing or malformed annotation files name the file.
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ce.CocoEvaluator(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        ce.CocoEvaluator(tmp_path / "broken.json")


def test_missing_gt_area_and_iscrowd_are_filled(gt_path):
    data = tiny_coco.dataset()
    expected = {a["id"]: a["area"] for a in data["annotations"]}
    for a in data["annotations"]:
        del a["area"]
        if not a["iscrowd"]:
            del a["iscrowd"]
    coco = ce.load_coco_gt(data)
    assert {a["id"]: a["area"] for a in coco.dataset["annotations"]} == expected
    assert sum(a["iscrowd"] for a in coco.dataset["annotations"]) == 1


def test_encode_masks_round_trip():
    masks = np.zeros((2, 5, 7), bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    rles = ce.encode_masks(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    np.testing.assert_array_equal(mask_utils.decode(rles).transpose(2, 0, 1), masks)
    assert [float(a) for a in mask_utils.area(rles)] == [8.0, 1.0]
    assert ce.encode_masks(np.zeros((0, 5, 7), bool)) == []


def test_summary_tables():
    metrics = {f"bbox/{n}": 0.5 for n in ce.DETECTION_METRIC_NAMES}
    metrics["bbox/APl"] = -1.0
    metrics.update({"bbox/AP-circle": 0.379, "bbox/AP-square": -1.0, "bbox/AP-traffic light": 1})
    metrics.update({f"keypoints/{n}": 0.25 for n in ce.KEYPOINT_METRIC_NAMES})
    assert summary.format_value(0.379) == "37.9"
    assert summary.format_value(-1.0) == "-"
    assert summary.iou_types_in(metrics) == ("bbox", "keypoints")
    text = summary.format_summary(metrics)
    rows = text.splitlines()
    assert rows[2].split("|")[1].split() == ["50.0"] * 5 + ["-"] + ["50.0"] * 6
    assert rows[5].split("|")[1].split() == ["25.0"] * 10
    assert rows[3].split("|")[1].split() == list(ce.KEYPOINT_METRIC_NAMES)
    assert summary.per_category(metrics, "bbox") == {"circle": 0.379, "square": -1.0,
                                                     "traffic light": 1}
    table = summary.format_per_category(metrics, "bbox")
    assert "circle" in table and "37.9" in table and "traffic light" in table
    assert "100.0" in table
    report = summary.format_report(metrics)
    assert report.startswith(text) and table in report
