"""Mask targets from cropped gt masks vs torchvision's full-resolution `project_masks_on_boxes`.

Measured here (24 real-ish shapes of 16-300 px on a 480x640 image, 6 positive RoIs each, the
config's S = 112 crop and adaptive sampling; `pytest -s` prints the figures):
    mean |target difference| 0.0056 per pixel, max 0.36 (one boundary pixel),
    IoU of the binarised (>= 0.5) targets 0.994 on average, 0.975 at worst;
    |loss difference| 0.0000 for random logits (loss 1.066), 0.0084 for confident logits fitted to
    torchvision's targets (loss 0.104: the difference sits on boundary pixels).
Where it comes from: (1) resolution: a mask wider than S px is resampled to S px, so boundary
detail finer than a crop pixel is lost (masks larger than S: 0.003 mean difference); (2) the crop
is binarised after resampling, which moves edges by up to half a crop pixel even for masks
smaller than S (0.007); (3) RoIAlign's adaptive grid counts crop pixels instead of image pixels,
so a large mask is averaged over fewer points. With S = 56 / 224 the mean difference is 0.009 /
0.004. When the crop is the mask at its own resolution (S = box size) the targets are equal to
torchvision's up to float rounding: the frames and the zero border are exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.config_base import base_config
from mrcnn_jax.ops import losses
from mrcnn_jax.ops.mask_targets import mask_targets, select_mask_rois
from mrcnn_jax.ops.targets import roi_targets

from tests.training.helpers import MODEL
from tests.training.mask_fixtures import crop_masks, positive_rois, shape_masks, tight_boxes

DATA = base_config().data
M = MODEL.mask_resolution


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def _torchvision_targets(torch, masks, rois, idx):
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    return project_masks_on_boxes(torch.from_numpy(masks), torch.from_numpy(rois),
                                  torch.from_numpy(idx), M).numpy()


def _ours(rois, idx, crops, boxes, **kw):
    fn = jax.jit(mask_targets, static_argnames=("resolution", "sampling_ratio",
                                                "max_sampling_ratio"))
    out = fn(jnp.asarray(rois[None]), jnp.asarray(idx[None].astype(np.int32)),
             jnp.asarray(crops[None]), jnp.asarray(boxes[None]), resolution=M, **kw)
    return np.asarray(out[0])


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_equal_to_torchvision_when_crop_has_full_resolution(sampling_ratio):
    torch = _torch()
    rng = np.random.default_rng(0)
    s = 48
    masks = np.zeros((3, 160, 200), np.uint8)
    boxes = np.array([[10, 20, 10 + s, 20 + s], [100, 90, 100 + s, 90 + s],
                      [140, 40, 140 + s, 40 + s]], np.float32)
    for m, (x1, y1, _, _) in zip(masks, boxes.astype(int)):
        m[y1:y1 + s, x1:x1 + s] = rng.uniform(size=(s, s)) < 0.6  # a hard, noisy mask
    crops = np.stack([m[int(b[1]):int(b[3]), int(b[0]):int(b[2])] for m, b in zip(masks, boxes)])
    rois, idx = positive_rois(rng, boxes, 8)
    rois = np.clip(rois, 2, [198, 158, 198, 158])  # stay off the image border (see docstring)
    if sampling_ratio > 0:
        # torchvision's adaptive count is ceil(side / 28); keep it at 2 to compare a fixed 2.
        ctr, half = (rois[:, :2] + rois[:, 2:]) / 2, np.clip((rois[:, 2:] - rois[:, :2]) / 2,
                                                             14.5, 27.5)
        rois = np.concatenate([ctr - half, ctr + half], 1).astype(np.float32)
    want = _torchvision_targets(torch, masks, rois, idx)
    got = _ours(rois, idx, crops, boxes, sampling_ratio=sampling_ratio, max_sampling_ratio=8)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_measured_difference_on_realistic_masks():
    torch = _torch()
    rng = np.random.default_rng(0)
    masks = shape_masks(rng, (480, 640), 24)
    boxes = tight_boxes(masks)
    rois, idx = positive_rois(rng, boxes, 6)
    want = _torchvision_targets(torch, masks, rois, idx)
    crops = crop_masks(masks, boxes, DATA.gt_mask_size)
    got = _ours(rois, idx, crops, boxes, sampling_ratio=MODEL.mask_target_sampling_ratio)
    diff = np.abs(got - want)
    bw, bg = want >= 0.5, got >= 0.5
    iou = (bw & bg).sum((1, 2)) / np.maximum((bw | bg).sum((1, 2)), 1)
    # The mask loss on either target set, for untrained (random) and for confident logits.
    def loss(targets, logits):
        return float(losses.maskrcnn_loss(
            jnp.asarray(logits[None, ..., None]), jnp.asarray(targets[None]),
            jnp.zeros((1, len(targets)), jnp.int32), jnp.ones((1, len(targets)))))

    random_logits = rng.normal(0, 2.0, want.shape)
    good_logits = 6.0 * (2.0 * want - 1.0) + rng.normal(0, 2.0, want.shape)
    loss_diffs = [abs(loss(got, x) - loss(want, x)) for x in (random_logits, good_logits)]
    print(f"\nmask targets, cropped S={DATA.gt_mask_size} vs torchvision full resolution: "
          f"mean|d|={diff.mean():.4f} max|d|={diff.max():.3f} binarised IoU mean={iou.mean():.4f} "
          f"min={iou.min():.4f}; |loss difference| random logits {loss_diffs[0]:.4f} "
          f"(loss {loss(want, random_logits):.3f}), confident logits {loss_diffs[1]:.4f} "
          f"(loss {loss(want, good_logits):.3f})")
    assert diff.mean() < 0.008
    assert iou.mean() > 0.99 and iou.min() > 0.97
    assert max(loss_diffs) < 0.015


@pytest.mark.parametrize("num_gt", [0, 2, 4])
def test_mask_branch_targets_under_jit(num_gt):
    """roi_targets -> select_mask_rois -> mask_targets -> loss, static shapes, 0 and full gt."""
    rng = np.random.default_rng(num_gt)
    masks = shape_masks(rng, (96, 128), 4, max_size=60)
    boxes = tight_boxes(masks)
    valid = np.arange(4) < num_gt
    crops = crop_masks(masks, boxes, 32)
    props = np.concatenate([positive_rois(rng, boxes, 3)[0], rng.uniform(0, 90, (20, 4))])
    props[-20:, 2:] = props[-20:, :2] + 8

    @jax.jit
    def step(key):
        rt = roi_targets(jnp.asarray(props[None]), jnp.ones((1, len(props)), bool),
                         jnp.asarray(boxes[None]), jnp.full((1, 4), 2), jnp.asarray(valid[None]),
                         key, batch_size_per_image=32, positive_fraction=0.25)
        mr = select_mask_rois(rt, 8)
        t = mask_targets(mr.rois, mr.matched_gt, jnp.asarray(crops[None]),
                         jnp.asarray(boxes[None]), resolution=M)
        logits = jnp.zeros((1, 8, M, M, 3))
        return mr, t, losses.maskrcnn_loss(logits, t, mr.labels, mr.weights)

    mr, t, loss = step(jax.random.key(0))
    assert t.shape == (1, 8, M, M)
    assert int(mr.weights.sum()) == min(3 * num_gt + num_gt, 8)
    if num_gt == 0:
        assert float(loss) == 0.0
    else:
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # zero logits: log 2 per pixel
        # A foreground slot's target covers its gt mask: mostly ones in the RoI's middle.
        fg = np.asarray(mr.weights[0]) > 0
        assert np.asarray(t[0][fg]).mean() > 0.3
