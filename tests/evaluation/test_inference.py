"""Inference over a data set: the mapping of resized-canvas detections back to original images,
the loop over batches, and the data-parallel predict function.

A fake predict_fn returns the tiny COCO ground truth as the model would see it (boxes in the
pixels of an image resized by 1.5, 28x28 mask probabilities cropped from the gt masks), so the
numbers to reach are known: boxes back within float32 rounding, bbox AP = 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn_jax.evaluation import coco_evaluator as ce
from mrcnn_jax.evaluation import inference
from mrcnn_jax.evaluation.coco_evaluation import add_to_evaluator
from mrcnn_jax.ops.bilinear import resize_bilinear
from mrcnn_jax.ops.masks import paste_masks_in_image
from tests.evaluation import tiny_coco

SCALE = 1.5
SLOTS = 6
MASK_SIZE = 28
LABEL_OF_CATEGORY = {3: 1, 7: 2, 11: 3}


def _batch_and_detections(coco, image_ids, padded_images=1):
    """An eval batch (last `padded_images` images are padding) and the detections of a perfect
    model on it, in resized pixels."""
    ids = list(image_ids) + [image_ids[0]] * padded_images
    original = np.array([[coco.imgs[i]["height"], coco.imgs[i]["width"]] for i in ids], np.int32)
    resized = np.floor(original * SCALE).astype(np.int32)
    canvas = resized.max(0)
    b = len(ids)
    batch = {
        "image": np.zeros((b, canvas[0], canvas[1], 3), np.float32),
        "image_size": resized, "original_size": original,
        "image_id": np.array(ids, np.int64), "scale": np.full(b, SCALE, np.float32),
        "image_valid": np.arange(b) < len(image_ids),
    }
    dets = {"boxes": np.zeros((b, SLOTS, 4), np.float32), "scores": np.zeros((b, SLOTS)),
            "labels": np.zeros((b, SLOTS), np.int32), "valid": np.zeros((b, SLOTS), bool),
            "mask_probs": np.zeros((b, SLOTS, MASK_SIZE, MASK_SIZE), np.float32)}
    expected = {}
    for i, image_id in enumerate(ids):
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        ratio = resized[i, ::-1] / original[i, ::-1]  # (w, h)
        boxes = []
        for k, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            box = np.array([x, y, x + w, y + h])
            boxes.append(box)
            dets["boxes"][i, k] = box * np.tile(ratio, 2)
            dets["labels"][i, k] = LABEL_OF_CATEGORY[a["category_id"]]
            dets["scores"][i, k] = 0.9 - 0.1 * k
            dets["valid"][i, k] = True
            crop = coco.annToMask(a)[int(y):int(y + h), int(x):int(x + w)].astype(np.float32)
            dets["mask_probs"][i, k] = resize_bilinear(crop, (MASK_SIZE, MASK_SIZE))
        dets["boxes"][i, len(anns):] = 5.0  # garbage in padding slots, valid False
        expected[image_id] = np.array(boxes).reshape(-1, 4)
    return batch, dets, expected


def test_detections_map_back_to_original_pixels(tmp_path):
    gt_path = tiny_coco.write(tmp_path / "gt.json", tiny_coco.dataset())
    coco = ce.load_coco_gt(gt_path)
    batch, dets, expected = _batch_and_detections(coco, [10, 20, 30])
    images = inference.batch_to_images(batch, dets)
    assert [d.image_id for d in images] == [10, 20, 30]  # the padded 4th image is dropped
    for i, det in enumerate(images):
        np.testing.assert_allclose(det.boxes, expected[det.image_id], atol=1e-3)
        n = len(expected[det.image_id])
        assert det.masks.shape == (n, *det.original_hw) and det.masks.dtype == bool
        np.testing.assert_array_equal(det.labels, dets["labels"][i, :n])
        # Masks: torchvision's paste at the original-pixel boxes, thresholded at 0.5.
        np.testing.assert_array_equal(det.masks, paste_masks_in_image(
            dets["mask_probs"][i, :n], det.boxes, det.original_hw, threshold=0.5))

    # The loop, stopping after 2 images, and calling back with each batch's images.
    evaluator = ce.CocoEvaluator(gt_path)
    seen = []

    def on_images(batch, images):
        add_to_evaluator(evaluator, images)
        seen.extend(images)

    count = inference.evaluate_batches(lambda im, sz: dets, [batch, batch], on_images,
                                       num_images=2)
    assert count == 2 and evaluator.image_ids == [10, 20] and len(seen) == 2
    # Without a callback (the other hosts of a multi-host run) it only counts the real images.
    assert inference.evaluate_batches(lambda im, sz: dets, [batch, batch], None) == 6

    # The whole batch: perfect boxes give bbox AP 1; masks through 28x28 keep AP50 = 1.
    evaluator = ce.CocoEvaluator(gt_path)
    assert inference.evaluate_batches(
        lambda im, sz: dets, [batch], lambda b, ims: add_to_evaluator(evaluator, ims)) == 3
    metrics = evaluator.evaluate(("bbox", "segm"))
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["segm/AP50"] == pytest.approx(1.0, abs=1e-12)
    assert 0.5 < metrics["segm/AP"] < 1.0  # 28x28 masks of 6-pixel objects are not exact


def test_keypoints_scaled_with_box_ratios_and_no_detections():
    batch = {"image_id": np.array([5]), "image_size": np.array([[150, 200]]),
             "original_size": np.array([[300, 400]])}
    kps = np.zeros((1, 2, 17, 3), np.float32)
    kps[0, 0, :, 0] = 10.0
    kps[0, 0, :, 1] = 20.0
    kps[0, 0, :, 2] = 0.7
    dets = {"boxes": np.array([[[1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0]]]),
            "scores": np.ones((1, 2)),
            "labels": np.ones((1, 2)), "valid": np.array([[True, False]]), "keypoints": kps}
    (det,) = inference.batch_to_images(batch, dets)
    np.testing.assert_array_equal(det.boxes, [[2.0, 4.0, 6.0, 8.0]])
    np.testing.assert_array_equal(det.keypoints[0, :, :2], np.tile([20.0, 40.0], (17, 1)))
    np.testing.assert_array_equal(det.keypoints[0, :, 2], np.float32(0.7))
    assert det.masks is None
    dets["valid"][:] = False
    (det,) = inference.batch_to_images(batch, dets)
    assert det.boxes.shape == (0, 4) and det.keypoints.shape == (0, 17, 3)
    with pytest.raises(ValueError, match="batch lacks 'original_size'"):
        inference.batch_to_images({"image_id": [5], "image_size": [[1, 1]]}, dets)


_DATA_PARALLEL_ON_8_DEVICES = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from mrcnn_jax.evaluation import inference
assert len(jax.devices()) == 8

class Toy(nn.Module):  # per-image outputs, like the detector's
    @nn.compact
    def __call__(self, images, image_sizes):
        feats = nn.Dense(4)(images.mean(axis=(1, 2)))
        return {"boxes": feats[:, None, :] * image_sizes[:, None, :1], "scores": feats.sum(-1)}

model = Toy()
images = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
sizes = np.arange(16, dtype=np.int32).reshape(8, 2)
variables = model.init(jax.random.PRNGKey(0), images, sizes)
expected = jax.jit(model.apply)(variables, images, sizes)  # numpy in: device 0
predict = inference.data_parallel_predict_fn(model)
for _ in range(2):  # the second call reuses the replicated variables
    out = predict(variables, images, sizes)
    for k in expected:
        assert out[k].shape == expected[k].shape
        np.testing.assert_allclose(np.asarray(out[k]), expected[k], rtol=1e-6)
try:
    predict(variables, images[:4], sizes[:4])
except ValueError as e:
    assert "multiple of the 8 local devices" in str(e), e
else:
    raise AssertionError("batch 4 on 8 devices must fail")
print("OK")
"""


def test_data_parallel_predict_on_8_devices_equals_one_device():
    import os
    import subprocess
    import sys

    from tests.child_env import xla_flags
    from tests.reference import REPO_ROOT

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    run = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_ON_8_DEVICES], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stderr[-3000:]
