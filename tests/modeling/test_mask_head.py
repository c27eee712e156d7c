"""The mask predictor's per-RoI class path (training's sigmoid loss reads one map per RoI): same
logits and same parameter gradients as computing all K + 1 maps and taking the RoI's class."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling.roi_heads.mask_head import MaskRCNNPredictor

NUM_CLASSES = 7  # K + 1


def _setup(class_agnostic=False):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 5, 6, 6, 16), jnp.float32)  # [B, R, S, S, C]
    classes = jnp.asarray(rng.randint(0, NUM_CLASSES, (2, 5)), jnp.int32)
    module = MaskRCNNPredictor(NUM_CLASSES, dim_reduced=8, class_agnostic=class_agnostic)
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    # Non-zero biases, so a wrong bias gather shows.
    params = jax.tree_util.tree_map(
        lambda p: p + jnp.asarray(rng.randn(*p.shape) * 0.1, p.dtype), params)
    return module, params, x, classes


def test_gt_class_logits_equal_the_full_maps_at_the_class():
    module, params, x, classes = _setup()
    full = module.apply({"params": params}, x)
    one = module.apply({"params": params}, x, classes)
    assert full.shape == (2, 5, 12, 12, NUM_CLASSES) and one.shape == (2, 5, 12, 12, 1)
    expected = jnp.take_along_axis(full, classes[:, :, None, None, None], axis=-1)
    np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-5)


def test_gt_class_path_has_the_gradients_of_the_full_maps():
    module, params, x, classes = _setup()
    weights = jnp.asarray(np.random.RandomState(1).randn(2, 5, 12, 12), jnp.float32)

    def via_full(p):
        full = module.apply({"params": p}, x)
        picked = jnp.take_along_axis(full, classes[:, :, None, None, None], axis=-1)[..., 0]
        return jnp.sum(weights * picked)

    def via_class(p):
        return jnp.sum(weights * module.apply({"params": p}, x, classes)[..., 0])

    g_full, g_class = jax.grad(via_full)(params), jax.grad(via_class)(params)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_full),
                                 jax.tree_util.tree_leaves_with_path(g_class)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # Classes no RoI has get no gradient at all.
    unused = sorted(set(range(NUM_CLASSES)) - set(np.asarray(classes).ravel().tolist()))
    bias_grad = np.asarray(g_class["mask_fcn_logits"]["bias"])
    assert unused and not np.any(bias_grad[unused])


def test_class_agnostic_ignores_classes_and_bad_shapes_fail():
    module, params, x, classes = _setup(class_agnostic=True)
    np.testing.assert_array_equal(module.apply({"params": params}, x, classes),
                                  module.apply({"params": params}, x))
    module, params, x, classes = _setup()
    with pytest.raises(ValueError, match="classes must be"):
        module.apply({"params": params}, x, classes[:, :3])


def test_inference_computes_the_predicted_class_map_only():
    """The model's inference (`__call__`) reads each detection's mask from the predicted class's
    map alone: the same probabilities as all K + 1 maps read at the label (`detect`), and the
    compiled program holds no array of all the maps."""
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from tests.training.train_fixtures import CANVAS, tiny_config

    c = tiny_config().model
    c.box_score_thresh = 0.0  # detections from random weights
    model = MaskRCNN(c)
    images = jnp.asarray(np.random.RandomState(0).normal(0, 0.3, (2, *CANVAS, 3)), jnp.float32)
    sizes = jnp.asarray([[96, 96], [80, 64]], jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, sizes)
    # Each program compiled once, run and read: eager application would take most of a minute.
    infer = jax.jit(lambda v: model.apply(v, images, sizes)).lower(variables).compile()
    detect = jax.jit(lambda v: model.apply(v, images, sizes, method=MaskRCNN.detect)
                     ).lower(variables).compile()
    out, full = infer(variables), detect(variables)
    valid = np.asarray(out["valid"])
    assert valid.sum() >= 4
    np.testing.assert_array_equal(out["labels"], full["labels"])
    want = jax.nn.sigmoid(jnp.take_along_axis(
        full["mask_logits"], full["labels"][:, :, None, None, None], axis=-1)[..., 0])
    np.testing.assert_allclose(out["mask_probs"], np.where(valid[..., None, None], want, 0.0),
                               rtol=1e-6, atol=1e-6)
    all_maps = "f32[{},{},{},{}]".format(2 * c.detections_per_img, *full["mask_logits"].shape[2:])
    assert all_maps in detect.as_text()
    assert all_maps not in infer.as_text()
