"""Losses: hand-computed values, torchvision parity on the same sampled set, NaN safety."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import losses
from mrcnn_jax.ops.sampling import SampledSlots, sample_from_masks

from tests.training.helpers import MODEL

BETA = MODEL.smooth_l1_beta
RTOL = 1e-5  # float32 sums of a few thousand terms, same formulas on both sides


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def test_smooth_l1_and_bce_by_hand():
    d = jnp.array([0.0, 0.05, -0.1, 1.0, -2.0])
    got = losses.smooth_l1(d, jnp.zeros(5), BETA)
    want = [0.0, 0.5 * 0.05**2 * 9, 0.5 * 0.01 * 9, 1 - 0.5 / 9, 2 - 0.5 / 9]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(losses.smooth_l1(d, 0.0, 0.0), np.abs(d))
    x, t = jnp.array([2.0, -3.0, 0.0, 100.0]), jnp.array([1.0, 1.0, 0.5, 0.0])
    want = [math.log1p(math.exp(-2)), 3 + math.log1p(math.exp(-3)), math.log(2), 100.0]
    np.testing.assert_allclose(losses.sigmoid_bce_with_logits(x, t), want, rtol=1e-6)


def _rpn_case(rng, num_anchors=600):
    labels = rng.choice([1.0, 0.0, -1.0], size=(2, num_anchors), p=[0.05, 0.85, 0.1])
    labels = labels.astype(np.float32)
    objectness = rng.normal(0, 2, (2, num_anchors)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (2, num_anchors, 4)).astype(np.float32)
    targets = rng.normal(0, 0.3, (2, num_anchors, 4)).astype(np.float32)
    return labels, objectness, deltas, targets


def test_rpn_losses_match_torchvision_compute_loss():
    torch = _torch()
    from torchvision.models.detection.rpn import RegionProposalNetwork

    rng = np.random.default_rng(0)
    labels, objectness, deltas, targets = _rpn_case(rng)
    rpn = RegionProposalNetwork(
        None, None, MODEL.rpn_fg_iou_thresh, MODEL.rpn_bg_iou_thresh,
        MODEL.rpn_batch_size_per_image, MODEL.rpn_positive_fraction, {}, {}, MODEL.rpn_nms_thresh,
    )
    t_labels = [torch.from_numpy(l) for l in labels]
    t_targets = [torch.from_numpy(t) for t in targets]
    torch.manual_seed(7)
    pos, neg = rpn.fg_bg_sampler(t_labels)
    torch.manual_seed(7)  # compute_loss draws the same sample again
    want_cls, want_loc = rpn.compute_loss(
        torch.from_numpy(objectness).reshape(-1, 1), torch.from_numpy(deltas).reshape(-1, 4),
        t_labels, t_targets,
    )
    slots = sample_from_masks(
        jnp.asarray(labels), jnp.asarray(np.stack(pos).astype(bool)),
        jnp.asarray(np.stack(neg).astype(bool)), MODEL.rpn_batch_size_per_image,
        MODEL.rpn_positive_fraction,
    )
    got = jax.jit(losses.rpn_losses)(
        jnp.asarray(objectness), jnp.asarray(deltas), jnp.asarray(targets), slots
    )
    np.testing.assert_allclose(got["loss_rpn_cls"], want_cls.item(), rtol=RTOL)
    np.testing.assert_allclose(got["loss_rpn_loc"], want_loc.item(), rtol=RTOL)


def _roi_case(rng, num_classes=6, num_rois=64):
    labels = rng.integers(0, num_classes, (2, num_rois)) * (rng.uniform(size=(2, num_rois)) < 0.4)
    valid = np.ones((2, num_rois), bool)
    valid[1, 50:] = False  # the second image sampled fewer RoIs
    logits = rng.normal(0, 2, (2, num_rois, num_classes)).astype(np.float32)
    box_reg = rng.normal(0, 0.5, (2, num_rois, num_classes * 4)).astype(np.float32)
    targets = rng.normal(0, 0.5, (2, num_rois, 4)).astype(np.float32)
    return labels.astype(np.int32), valid, logits, box_reg, targets


def test_fastrcnn_losses_match_torchvision():
    torch = _torch()
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    rng = np.random.default_rng(1)
    labels, valid, logits, box_reg, targets = _roi_case(rng)
    # Padded slots hold garbage that must not count.
    logits[~valid] = 1e4
    targets[~valid] = np.nan
    got = jax.jit(losses.fastrcnn_losses)(*map(jnp.asarray, (logits, box_reg, labels, targets,
                                                             valid)))
    want_cls, want_box = fastrcnn_loss(
        torch.from_numpy(logits[valid]), torch.from_numpy(box_reg[valid]),
        [torch.from_numpy(labels[valid]).long()], [torch.from_numpy(targets[valid])],
    )
    np.testing.assert_allclose(got["loss_cls"], want_cls.item(), rtol=RTOL)
    np.testing.assert_allclose(got["loss_box_reg"], want_box.item(), rtol=RTOL)


def test_fastrcnn_class_agnostic_box_reads_the_only_deltas():
    rng = np.random.default_rng(2)
    labels, valid, logits, box_reg, targets = _roi_case(rng)
    agnostic = box_reg[..., :4]
    specific = np.tile(agnostic, (1, 1, logits.shape[-1]))
    args = lambda b: map(jnp.asarray, (logits, b, labels, targets, valid))  # noqa: E731
    np.testing.assert_allclose(
        losses.fastrcnn_losses(*args(agnostic))["loss_box_reg"],
        losses.fastrcnn_losses(*args(specific))["loss_box_reg"], rtol=1e-6,
    )


def _mask_case(rng, num_classes=5, r=12, m=28):
    logits = rng.normal(0, 2, (2, r, m, m, num_classes)).astype(np.float32)
    targets = np.clip(rng.normal(0.5, 0.5, (2, r, m, m)), 0, 1).astype(np.float32)
    labels = rng.integers(1, num_classes, (2, r)).astype(np.int32)
    weights = np.zeros((2, r), np.float32)
    weights[0, :7] = 1
    weights[1, :3] = 1
    return logits, targets, labels, weights


def test_mask_loss_matches_torchvision_maskrcnn_loss():
    torch = _torch()
    from torchvision.models.detection import roi_heads

    rng = np.random.default_rng(3)
    logits, targets, labels, weights = _mask_case(rng)
    logits[weights == 0] = np.nan  # empty slots are ignored even when garbage
    got = jax.jit(losses.maskrcnn_loss)(*map(jnp.asarray, (logits, targets, labels, weights)))
    keep = weights > 0
    # Feed torchvision the same targets: its project_masks_on_boxes is replaced by ours' output.
    t_targets = torch.from_numpy(targets[keep])
    orig = roi_heads.project_masks_on_boxes
    roi_heads.project_masks_on_boxes = lambda m, p, i, M: t_targets
    try:
        want = roi_heads.maskrcnn_loss(
            torch.from_numpy(logits[keep]).permute(0, 3, 1, 2), [None], [None],
            [torch.from_numpy(labels[keep]).long()], [torch.arange(int(keep.sum()))],
        )
    finally:
        roi_heads.project_masks_on_boxes = orig
    np.testing.assert_allclose(got, want.item(), rtol=RTOL)


def test_mask_loss_class_agnostic_and_multinomial_by_hand():
    rng = np.random.default_rng(4)
    logits, targets, labels, weights = _mask_case(rng, r=4, m=3)
    keep = weights > 0
    # class-agnostic: one channel, read whatever the label
    agn = losses.maskrcnn_loss(*map(jnp.asarray, (logits[..., :1], targets, labels, weights)))
    x = logits[..., 0][keep].astype(np.float64)
    t = targets[keep]
    want = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
    np.testing.assert_allclose(agn, want, rtol=1e-5)
    # multinomial: softmax over classes per pixel, soft target between the class and background
    got = losses.maskrcnn_loss(*map(jnp.asarray, (logits, targets, labels, weights)),
                               mode="softmax")
    z = logits[keep].astype(np.float64)
    logp = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    lab = labels[keep]
    logp_cls = np.take_along_axis(logp, lab[:, None, None, None], axis=-1)[..., 0]
    want = np.mean(-(t * logp_cls + (1 - t) * logp[..., 0]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        losses.maskrcnn_loss(*map(jnp.asarray, (logits, targets, labels, weights)), mode="l2")


def test_nothing_sampled_gives_zero_and_finite_gradients():
    slots = SampledSlots(
        indices=-jnp.ones((1, 4), jnp.int32), labels=jnp.zeros((1, 4), jnp.int32),
        is_positive=jnp.zeros((1, 4), bool), valid=jnp.zeros((1, 4), bool),
    )
    nan_targets = jnp.full((1, 10, 4), jnp.nan)

    def total(obj, deltas):
        out = losses.rpn_losses(obj, deltas, nan_targets, slots)
        return out["loss_rpn_cls"] + out["loss_rpn_loc"]

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(jnp.zeros((1, 10)),
                                                             jnp.zeros((1, 10, 4)))
    assert value == 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    logits = jnp.zeros((1, 4, 28, 28, 3))

    def mask_total(x):
        return losses.maskrcnn_loss(x, jnp.full((1, 4, 28, 28), jnp.nan), jnp.ones((1, 4), int),
                                    jnp.zeros((1, 4)))

    value, grad = jax.value_and_grad(mask_total)(logits)
    assert value == 0.0 and np.isfinite(np.asarray(grad)).all()
