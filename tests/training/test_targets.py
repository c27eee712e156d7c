"""RPN anchor targets and RoI sampling targets against torchvision's own RPN / RoIHeads code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import losses, targets
from mrcnn_jax.ops.sampling import sample_from_masks

from tests.training.helpers import MODEL, jitter_boxes, random_gt

CANVAS = (128, 192)
MAX_GT = 6
NUM_GT = (4, 0, MAX_GT)  # a partly padded image, an image without gt, a full one
TARGET_TOL = dict(rtol=1e-5, atol=1e-6)  # same float32 formulas on both sides


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def _anchors():
    levels = anchor_ops.anchor_grid(CANVAS, MODEL.anchor_strides, MODEL.anchor_sizes,
                                    MODEL.anchor_aspect_ratios)
    return np.concatenate(levels)


def _gt_batch(seed):
    rng = np.random.default_rng(seed)
    gts = [random_gt(rng, n, MAX_GT, CANVAS) for n in NUM_GT]
    return [np.stack(a) for a in zip(*gts)]  # boxes [B,M,4], classes [B,M], valid [B,M]


def test_rpn_targets_and_losses_match_torchvision():
    torch = _torch()
    from torchvision.models.detection.rpn import RegionProposalNetwork

    anchors = _anchors()
    gt_boxes, _, gt_valid = _gt_batch(0)
    rpn = RegionProposalNetwork(
        None, None, MODEL.rpn_fg_iou_thresh, MODEL.rpn_bg_iou_thresh,
        MODEL.rpn_batch_size_per_image, MODEL.rpn_positive_fraction, {}, {}, MODEL.rpn_nms_thresh,
    )
    t_anchors = [torch.from_numpy(anchors)] * len(NUM_GT)
    t_targets = [{"boxes": torch.from_numpy(b[v])} for b, v in zip(gt_boxes, gt_valid)]
    tv_labels, tv_matched = rpn.assign_targets_to_anchors(t_anchors, t_targets)
    tv_reg = rpn.box_coder.encode(tv_matched, t_anchors)

    got = jax.jit(targets.rpn_anchor_targets, static_argnums=(3, 4, 5))(
        jnp.asarray(anchors), jnp.asarray(gt_boxes), jnp.asarray(gt_valid),
        MODEL.rpn_fg_iou_thresh, MODEL.rpn_bg_iou_thresh, MODEL.rpn_box_weights,
    )
    for i in range(len(NUM_GT)):
        labels = np.asarray(got.labels[i])
        np.testing.assert_array_equal(labels, tv_labels[i].numpy().astype(np.int32))
        pos = labels == 1
        assert pos.sum() >= NUM_GT[i]  # every gt has at least its best anchor
        np.testing.assert_allclose(np.asarray(got.regression_targets[i])[pos],
                                   tv_reg[i].numpy()[pos], **TARGET_TOL)

    # Losses on torchvision's sampled anchors (the same seed draws the same sample twice).
    rng = np.random.default_rng(1)
    objectness = rng.normal(0, 2, (len(NUM_GT), len(anchors))).astype(np.float32)
    deltas = rng.normal(0, 0.2, (len(NUM_GT), len(anchors), 4)).astype(np.float32)
    torch.manual_seed(3)
    pos, neg = rpn.fg_bg_sampler(tv_labels)
    torch.manual_seed(3)
    want_cls, want_loc = rpn.compute_loss(
        torch.from_numpy(objectness).reshape(-1, 1), torch.from_numpy(deltas).reshape(-1, 4),
        tv_labels, tv_reg,
    )
    slots = sample_from_masks(got.labels, jnp.asarray(np.stack(pos).astype(bool)),
                              jnp.asarray(np.stack(neg).astype(bool)),
                              MODEL.rpn_batch_size_per_image, MODEL.rpn_positive_fraction)
    got_losses = losses.rpn_losses(jnp.asarray(objectness), jnp.asarray(deltas),
                                   got.regression_targets, slots)
    np.testing.assert_allclose(got_losses["loss_rpn_cls"], want_cls.item(), rtol=1e-5)
    np.testing.assert_allclose(got_losses["loss_rpn_loc"], want_loc.item(), rtol=1e-5)


def test_rpn_anchor_valid_marks_ignored():
    anchors = _anchors()
    gt_boxes, _, gt_valid = _gt_batch(2)
    inside = np.all((anchors[:, :2] >= 0) & (anchors[:, 2:] <= CANVAS[::-1]), axis=1)
    full = targets.rpn_anchor_targets(anchors, gt_boxes, gt_valid)
    masked = targets.rpn_anchor_targets(anchors, gt_boxes, gt_valid, anchor_valid=inside)
    np.testing.assert_array_equal(masked.labels[:, ~inside], -1)
    np.testing.assert_array_equal(masked.labels[:, inside], full.labels[:, inside])


def test_roi_hand_computed_case():
    gt = jnp.array([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    proposals = jnp.array([[[1.0, 0.0, 11.0, 10.0],  # IoU 9/11 -> fg, dx = 10 * (-1/10)
                            [0.0, 0.0, 10.0, 25.0],  # IoU 0.4 -> bg
                            [0.0, 0.0, 10.0, 10.0]]])  # padded: never sampled
    cands = targets.roi_candidates(proposals, jnp.array([[True, True, False]]), gt,
                                   jnp.array([[3, 9]]), jnp.array([[True, False]]))
    np.testing.assert_array_equal(cands.labels, [[3, 0, -1, 3, -1]])  # 2 proposals + gt + pad
    rt = targets.roi_targets(proposals, jnp.array([[True, True, False]]), gt, jnp.array([[3, 9]]),
                             jnp.array([[True, False]]), jax.random.key(0),
                             batch_size_per_image=4, positive_fraction=0.5)
    np.testing.assert_array_equal(rt.valid, [[True, True, True, False]])
    np.testing.assert_array_equal(np.sort(rt.indices[0, :2]), [0, 3])  # the two foregrounds first
    np.testing.assert_array_equal(rt.labels, [[3, 3, 0, 0]])
    fg0 = int(np.flatnonzero(np.asarray(rt.indices[0]) == 0)[0])
    np.testing.assert_allclose(rt.regression_targets[0, fg0], [-1.0, 0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(rt.regression_targets[0, 2:], 0.0)


def test_roi_targets_match_torchvision_select_training_samples():
    torch = _torch()
    from torchvision.models.detection.roi_heads import RoIHeads

    gt_boxes, gt_classes, gt_valid = _gt_batch(4)
    rng = np.random.default_rng(5)
    num_props, num_valid = 300, (300, 220, 260)
    props = np.zeros((len(NUM_GT), num_props, 4), np.float32)
    prop_valid = np.zeros((len(NUM_GT), num_props), bool)
    for i, nv in enumerate(num_valid):
        props[i, :nv] = jitter_boxes(rng, gt_boxes[i][gt_valid[i]], nv, 0.3, CANVAS)
        props[i, nv:] = gt_boxes[i, :1] if NUM_GT[i] else 5.0  # padding that would match
        prop_valid[i, :nv] = True
    heads = RoIHeads(None, None, None, MODEL.box_fg_iou_thresh, MODEL.box_bg_iou_thresh,
                     MODEL.box_batch_size_per_image, MODEL.box_positive_fraction,
                     MODEL.box_weights, MODEL.box_score_thresh, MODEL.box_nms_thresh,
                     MODEL.detections_per_img)
    t_props = [torch.from_numpy(p[v]) for p, v in zip(props, prop_valid)]
    t_targets = [{"boxes": torch.from_numpy(b[v]), "labels": torch.from_numpy(c[v]).long()}
                 for b, c, v in zip(gt_boxes, gt_classes, gt_valid)]
    torch.manual_seed(11)
    tv_rois, tv_matched, tv_labels, tv_reg = heads.select_training_samples(
        [p.clone() for p in t_props], t_targets)
    # Replay the same steps to read torchvision's candidate labels and sampled masks.
    torch.manual_seed(11)
    all_props = heads.add_gt_proposals(t_props, [t["boxes"] for t in t_targets])
    _, cand_labels = heads.assign_targets_to_proposals(
        all_props, [t["boxes"] for t in t_targets], [t["labels"] for t in t_targets])
    pos, neg = heads.fg_bg_sampler(cand_labels)

    cands = targets.roi_candidates(*map(jnp.asarray, (props, prop_valid, gt_boxes, gt_classes,
                                                      gt_valid)))
    pos_ours = np.zeros(cands.labels.shape, bool)
    neg_ours = np.zeros(cands.labels.shape, bool)
    for i, nv in enumerate(num_valid):
        # torchvision's candidate k: proposal k < nv, else gt k - nv; ours: gt m sits at P + m.
        ours_index = np.concatenate([np.arange(nv), num_props + np.arange(NUM_GT[i])])
        labels_i = np.asarray(cands.labels[i])
        np.testing.assert_array_equal(labels_i[ours_index], cand_labels[i].numpy())
        assert np.all(np.delete(labels_i, ours_index) == -1)  # padding is never sampled
        pos_ours[i, ours_index] = pos[i].numpy().astype(bool)
        neg_ours[i, ours_index] = neg[i].numpy().astype(bool)
        assert pos_ours[i].sum() <= 128
    slots = sample_from_masks(cands.labels, jnp.asarray(pos_ours), jnp.asarray(neg_ours),
                              MODEL.box_batch_size_per_image, MODEL.box_positive_fraction)
    rt = targets.roi_targets_from_slots(cands, jnp.asarray(gt_boxes), slots, MODEL.box_weights)
    for i, nv in enumerate(num_valid):
        valid = np.asarray(rt.valid[i])
        assert valid.sum() == len(tv_labels[i]) == min(nv + NUM_GT[i], 512)
        idx = np.asarray(rt.indices[i])[valid]
        tv_k = np.where(idx < num_props, idx, idx - num_props + nv)
        order = np.argsort(tv_k)  # torchvision keeps the sampled candidates in index order
        np.testing.assert_array_equal(np.asarray(rt.labels[i])[valid][order], tv_labels[i].numpy())
        np.testing.assert_array_equal(np.asarray(rt.rois[i])[valid][order], tv_rois[i].numpy())
        fg = tv_labels[i].numpy() > 0
        np.testing.assert_array_equal(np.asarray(rt.matched_gt[i])[valid][order][fg],
                                      tv_matched[i].numpy()[fg])
        np.testing.assert_allclose(np.asarray(rt.regression_targets[i])[valid][order][fg],
                                   tv_reg[i].numpy()[fg], **TARGET_TOL)
        np.testing.assert_array_equal(np.asarray(rt.regression_targets[i])[valid][order][~fg], 0)


@pytest.mark.parametrize("num_gt", [0, 3, MAX_GT])
def test_roi_targets_jit_static_shapes(num_gt):
    rng = np.random.default_rng(num_gt)
    gt = random_gt(rng, num_gt, MAX_GT, CANVAS)
    gt_boxes, gt_classes, gt_valid = (jnp.asarray(a[None]) for a in gt)
    props = jitter_boxes(rng, gt[0][gt[2]], 400, 0.3, CANVAS)[None]
    fn = jax.jit(targets.roi_targets, static_argnums=(6, 7, 8, 9, 10))
    args = (jnp.asarray(props), jnp.ones((1, 400), bool), gt_boxes, gt_classes, gt_valid)
    rt = fn(*args, jax.random.key(0), 0.5, 0.5, 512, 0.25, MODEL.box_weights)
    assert rt.rois.shape == (1, 512, 4) and rt.labels.shape == (1, 512)
    cands = targets.roi_candidates(*args)
    num_fg_cands = int((cands.labels > 0).sum())
    assert num_fg_cands >= num_gt  # the appended gt match themselves
    assert int(rt.is_foreground.sum()) == min(num_fg_cands, 128)
    assert int(rt.valid.sum()) == min(400 + num_gt, 512)
    assert np.isfinite(np.asarray(rt.regression_targets)).all()
    # A second key compiles nothing new and samples differently.
    rt2 = fn(*args, jax.random.key(1), 0.5, 0.5, 512, 0.25, MODEL.box_weights)
    assert fn._cache_size() == 1
    assert not np.array_equal(rt.indices, rt2.indices)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="gt_valid"):
        targets.rpn_anchor_targets(jnp.zeros((5, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 3), bool))
    with pytest.raises(ValueError, match="anchors"):
        targets.rpn_anchor_targets(jnp.zeros((5, 3)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), bool))
    with pytest.raises(ValueError, match="proposal_valid"):
        targets.roi_candidates(jnp.zeros((1, 5, 4)), jnp.zeros((1, 4), bool), jnp.zeros((1, 2, 4)),
                               jnp.zeros((1, 2), int), jnp.zeros((1, 2), bool))
