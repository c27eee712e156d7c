"""Keypoint R-CNN end to end on the synthetic stick figures (mrcnn_jax/data/keypoint_shapes.py).

Protects: the data set is real COCO person keypoints (schema, skeleton, num_keypoints, masks) read
by the same builder; the pipeline's horizontal flip mirrors x and swaps COCO's left/right names,
which keeps the figures' convention (a person's left on the image's right); the train step with
`keypoint_head` (and no mask branch) gives finite losses named as torchvision's, whose keypoint term
starts at log(56^2) (uniform heatmaps) and falls; the COCO evaluation reports keypoint (OKS) AP of
keypoints that lie inside their boxes; the ground truth scored against itself has AP 1.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import keypoint_shapes as kp_config
from mrcnn_jax import sharding, train_lib
from mrcnn_jax.data import coco_instances, keypoint_shapes
from mrcnn_jax.data import input_pipeline as ip
from mrcnn_jax.evaluation.coco_evaluation import CocoEvaluation
from mrcnn_jax.evaluation.coco_evaluator import CocoEvaluator
from mrcnn_jax.modeling.losses import loss_names
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

SIZE = 96
NUM_STEPS = 10
# COCO's flip map: each left_* <-> right_*, the nose stays.
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def small_config(root):
    c = kp_config.get_config(f"root={root}")
    c.data.keypoint_shapes.update(num_train=6, num_val=2, size=SIZE)
    d = c.data
    d.min_size = d.max_size = SIZE
    d.canvas_size = (SIZE, SIZE)
    d.num_parallel_calls = 1
    d.prefetch = 1
    m = c.model
    m.fpn_channels = 16
    m.box_head_dim = 32
    m.keypoint_head_layers = (16, 16)
    m.rpn_pre_nms_top_n_train = m.rpn_post_nms_top_n_train = 128
    m.rpn_pre_nms_top_n_test = m.rpn_post_nms_top_n_test = 64
    m.rpn_batch_size_per_image = 64
    m.box_nms_candidates = 256
    m.detections_per_img = 10
    t = c.train
    t.global_batch_size = t.base_batch_size = 2
    t.warmup_steps = 0
    t.base_lr = 0.05
    c.eval.batch_size = 2
    t.lr_decay_steps = ()
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    c = small_config(tmp_path_factory.mktemp("kps"))
    builder = coco_instances.get_builder(c.data)
    return c, builder


def test_dataset_is_coco_person_keypoints(setup):
    c, builder = setup
    data = json.loads(open(c.data.train_annotations).read())
    (cat,) = data["categories"]
    assert cat["name"] == "person" and cat["keypoints"] == list(keypoint_shapes.KEYPOINT_NAMES)
    assert len(cat["skeleton"]) == 19 and all(1 <= i <= 17 for p in cat["skeleton"] for i in p)
    for ann in data["annotations"]:
        kp = np.asarray(ann["keypoints"]).reshape(17, 3)
        assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum()) > 0
        x, y, w, h = ann["bbox"]
        assert ann["area"] > 0 and w > 0 and h > 0
    assert builder.info.metadata["keypoint_flip"] == COCO_FLIP


def test_flip_swaps_left_right_and_keeps_the_convention(setup):
    c, builder = setup
    ds = builder.as_dataset(split="train", decoders={"image": tfds_skip()})
    checked = 0
    for ex in ds.take(4):
        a = ip.preprocess_example(ex, tf.constant(False), c.data, COCO_FLIP)
        b = ip.preprocess_example(ex, tf.constant(True), c.data, COCO_FLIP)
        n = int(a["gt_valid"].numpy().sum())
        ka, kb = a["gt_keypoints"].numpy()[:n], b["gt_keypoints"].numpy()[:n]
        w = float(a["image_size"].numpy()[1])
        mirrored = ka[:, COCO_FLIP].copy()
        seen = mirrored[..., 2] > 0
        mirrored[..., 0] = np.where(seen, w - mirrored[..., 0], 0.0)
        np.testing.assert_allclose(kb, mirrored, atol=1e-3)
        for kp in (ka, kb):  # left shoulder/hip on the image's right, flipped or not
            for left, right in ((5, 6), (11, 12)):
                both = (kp[:, left, 2] > 0) & (kp[:, right, 2] > 0)
                assert np.all(kp[both, left, 0] > kp[both, right, 0])
                checked += int(both.sum())
    assert checked > 0


def tfds_skip():
    import tensorflow_datasets as tfds

    return tfds.decode.SkipDecoding()


def test_train_steps_finite_and_falling_then_inference(setup):
    c, _ = setup
    batch = next(ip.make_train_iterator(c))
    assert batch["gt_keypoints"].shape == (2, c.data.max_instances, 17, 3)
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    assert "roi_mask_head" not in variables["params"]
    tx = train_lib.make_optimizer(c, variables["params"])
    state = train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh()
    step_fn = train_lib.jit_train_step(train_lib.make_train_step(model, tx, data_config=c.data),
                                       mesh, state)
    state = sharding.replicate(state, mesh)
    sharded = sharding.shard_batch(batch, mesh, train_lib.step_batch_keys(c.model, batch))
    metrics = []
    for _ in range(NUM_STEPS):
        state, m = step_fn(state, sharded)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    names = loss_names(c.model)
    assert names == ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_keypoint")
    assert all(math.isfinite(m[k]) for m in metrics for k in (*names, "loss"))
    np.testing.assert_allclose(metrics[0]["loss"], sum(metrics[0][k] for k in names), rtol=1e-5)
    # Near-uniform heatmaps at init: cross-entropy ~ log(56^2) = 8.05.
    assert abs(metrics[0]["loss_keypoint"] - math.log(56 ** 2)) < 0.5, metrics[0]
    # One fixed batch (RoIs resampled every step): the last steps average clearly lower.
    for k in ("loss", "loss_keypoint", "loss_rpn_cls"):
        first, last = metrics[0][k], np.mean([m[k] for m in metrics[-3:]])
        assert last < 0.97 * first, (k, [round(m[k], 4) for m in metrics])

    # Evaluation through CocoEvaluation (real eval pipeline, pycocotools OKS), capturing the
    # detections the model returned.
    seen = []
    apply = jax.jit(model.apply)

    def predict_fn(variables, images, image_sizes):
        out = apply(variables, images, image_sizes)
        seen.append(jax.tree_util.tree_map(np.asarray, out))
        return out

    evaluation = CocoEvaluation(c, predict_fn=predict_fn)
    metrics = evaluation.run(jax.device_get(state.variables))
    assert 0.0 <= metrics["keypoints/AP"] <= 1.0 and 0.0 <= metrics["bbox/AP"] <= 1.0
    assert not any(k.startswith("segm/") for k in metrics)  # no mask branch, no segm
    out = seen[0]
    assert set(out) == {"boxes", "scores", "labels", "valid", "keypoints"}
    kps, boxes, valid = (np.asarray(out[k]) for k in ("keypoints", "boxes", "valid"))
    assert kps.shape == (c.eval.batch_size, c.model.detections_per_img, 17, 3)
    assert np.all(kps[~valid] == 0)
    v = valid
    # Argmax cell centres lie inside the (>= 1 px) box.
    assert np.all(kps[v][..., 0] >= boxes[v][:, None, 0] - 1e-3)
    assert np.all(kps[v][..., 0] <= np.maximum(boxes[v][:, None, 2], boxes[v][:, None, 0] + 1))


def test_ground_truth_as_predictions_has_keypoint_ap_1(setup):
    """The stick figures are valid OKS ground truth: predicting it exactly scores AP 1."""
    c, _ = setup
    data = json.loads(open(c.data.eval_annotations).read())
    evaluator = CocoEvaluator(data, [keypoint_shapes.CATEGORY_ID])
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        kps = np.asarray([a["keypoints"] for a in anns], np.float64).reshape(len(anns), 17, 3)
        evaluator.add_predictions([image["id"]], boxes[None], np.ones((1, len(anns))),
                                  np.ones((1, len(anns)), np.int64), keypoints=kps[None])
    metrics = evaluator.evaluate(("bbox", "keypoints"))
    assert metrics["keypoints/AP"] == pytest.approx(1.0)
    assert metrics["bbox/AP"] == pytest.approx(1.0)
