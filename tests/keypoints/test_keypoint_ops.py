"""ops/keypoints.py against torchvision's keypoint functions and hand-computed cases.

Protects: the one-hot target rule (`keypoints_to_heatmap`, incl. the right/bottom edge and
out-of-RoI/invisible keypoints), the loss normalisation (`keypointrcnn_loss`: mean over every
valid (RoI, keypoint) pair of the batch) and the static-shape bicubic decode
(`heatmaps_to_keypoints`: same argmax cell, coordinates and scores as PyTorch's bicubic resize).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import keypoints as kp_ops


def _random_case(rng: np.random.Generator, r: int, k: int, size: float = 120.0):
    x1 = rng.uniform(0, size, r)
    y1 = rng.uniform(0, size, r)
    w = rng.uniform(0.3, 90, r)
    h = rng.uniform(0.3, 90, r)
    rois = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)
    # Keypoints around (and partly outside) their RoI; some exactly on the edges.
    fx = rng.uniform(-0.2, 1.2, (r, k))
    fy = rng.uniform(-0.2, 1.2, (r, k))
    x = rois[:, None, 0] + fx * w[:, None]
    y = rois[:, None, 1] + fy * h[:, None]
    x[:, 0] = rois[:, 2]
    y[:, 1] = rois[:, 3]
    v = rng.integers(0, 3, (r, k)).astype(np.float32)
    return rois, np.stack([x, y, v], -1).astype(np.float32)


def test_keypoints_to_heatmap_hand_case():
    rois = jnp.asarray([[10.0, 20.0, 66.0, 76.0]])  # 56 x 56 px: one cell per pixel
    kps = jnp.asarray([[[10.0, 20.0, 2], [65.5, 21.9, 1], [66.0, 76.0, 2], [30.0, 30.0, 0],
                        [9.99, 30.0, 2]]])
    targets, valid = kp_ops.keypoints_to_heatmap(kps, rois, 56)
    np.testing.assert_array_equal(valid, [[True, True, True, False, False]])
    # (0, 0); (x 55, y 1); the far corner -> (55, 55); invalid -> 0.
    np.testing.assert_array_equal(targets, [[0, 1 * 56 + 55, 55 * 56 + 55, 0, 0]])


def test_keypoint_loss_hand_case():
    # Uniform logits: the cross-entropy is log(m^2) for every valid pair, whatever the target.
    logits = jnp.zeros((1, 2, 4, 4, 3))
    targets = jnp.zeros((1, 2, 3), jnp.int32)
    valid = jnp.asarray([[[True, False, True], [False, False, True]]])
    np.testing.assert_allclose(kp_ops.keypointrcnn_loss(logits, targets, valid), np.log(16),
                               rtol=1e-6)
    # One peaked logit on the target of the first pair only: mean of (ce1, log 16, log 16).
    logits = logits.at[0, 0, 0, 0, 0].set(5.0)
    ce1 = np.log(np.exp(5.0) + 15) - 5.0
    np.testing.assert_allclose(kp_ops.keypointrcnn_loss(logits, targets, valid),
                               (ce1 + 2 * np.log(16)) / 3, rtol=1e-6)
    assert float(kp_ops.keypointrcnn_loss(logits, targets, jnp.zeros_like(valid))) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_keypoints_to_heatmap_vs_torchvision(seed):
    torch = pytest.importorskip("torch")
    from torchvision.models.detection import roi_heads

    torch.set_num_threads(1)
    rois, kps = _random_case(np.random.default_rng(seed), 64, 17)
    ref_t, ref_v = roi_heads.keypoints_to_heatmap(torch.from_numpy(kps), torch.from_numpy(rois),
                                                  56)
    targets, valid = kp_ops.keypoints_to_heatmap(jnp.asarray(kps), jnp.asarray(rois), 56)
    np.testing.assert_array_equal(np.asarray(valid), ref_v.numpy().astype(bool))
    np.testing.assert_array_equal(np.asarray(targets), ref_t.numpy())
    assert 0.2 < ref_v.numpy().mean() < 0.8  # both branches exercised


def test_keypoint_loss_vs_torchvision():
    torch = pytest.importorskip("torch")
    from torchvision.models.detection import roi_heads

    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    b, r, m, k, n_gt = 2, 6, 8, 5, 3
    rois, _ = _random_case(rng, b * r, k)
    rois = rois.reshape(b, r, 4)
    gt = np.stack([_random_case(rng, n_gt, k)[1] for _ in range(b)])  # [B, M, K, 3]
    matched = rng.integers(0, n_gt, (b, r))
    weights = np.ones((b, r), np.float32)
    weights[0, 4:] = 0  # empty slots: image 0 has 4 positive RoIs, image 1 has 6
    logits = rng.normal(0, 2, (b, r, m, m, k)).astype(np.float32)

    targets, valid = kp_ops.keypoint_targets(jnp.asarray(rois), jnp.asarray(matched),
                                             jnp.asarray(gt), jnp.asarray(weights), m)
    ours = kp_ops.keypointrcnn_loss(jnp.asarray(logits), targets, valid)

    pos = [np.flatnonzero(weights[i] > 0) for i in range(b)]
    logits_t = torch.cat([torch.from_numpy(logits[i, p]).permute(0, 3, 1, 2)
                          for i, p in enumerate(pos)]).contiguous()
    ref = roi_heads.keypointrcnn_loss(
        logits_t, [torch.from_numpy(rois[i, p]) for i, p in enumerate(pos)],
        [torch.from_numpy(gt[i]) for i in range(b)],
        [torch.from_numpy(matched[i, p]) for i, p in enumerate(pos)])
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)


def _tv_heatmaps_to_keypoints(torch, maps_nhwc, rois):
    from torchvision.models.detection import roi_heads

    kps, scores = roi_heads.heatmaps_to_keypoints(
        torch.from_numpy(maps_nhwc).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(rois))
    return kps.numpy(), scores.numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_heatmaps_to_keypoints_vs_torchvision(seed):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    r, k, m = 12, 17, 56
    rois, _ = _random_case(rng, r, k)
    rois[0] = [3.0, 4.0, 3.4, 4.2]  # sub-pixel box: clamped to 1 px
    rois[1] = [5.0, 7.0, 125.0, 47.0]  # integer sides: no ceil
    # Smooth maps with a few bumps, like trained heatmaps (ties are then measure-zero).
    maps = rng.normal(0, 1, (r, m, m, k)).astype(np.float32)
    maps = np.array(jax.image.resize(maps[:, ::4, ::4], (r, m, m, k), "cubic"), np.float32)
    ref_kps, ref_scores = _tv_heatmaps_to_keypoints(torch, maps, rois)
    kps, scores = kp_ops.heatmaps_to_keypoints(jnp.asarray(maps), jnp.asarray(rois), (128, 128))
    kps, scores = np.asarray(kps), np.asarray(scores)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kps, ref_kps, rtol=0, atol=1e-4)


def test_heatmaps_to_keypoints_grid_bound():
    """A box larger than the static grid is decoded on the grid (coarser, still in the box)."""
    maps = jnp.zeros((1, 56, 56, 1)).at[0, 10, 40, 0].set(10.0)
    rois = jnp.asarray([[0.0, 0.0, 200.0, 100.0]])
    kps, _ = kp_ops.heatmaps_to_keypoints(maps, rois, (200, 200))
    coarse, _ = kp_ops.heatmaps_to_keypoints(maps, rois, (50, 50))
    # Cell 40 of 56 across 200 px -> ~ (40.5 / 56) * 200; the 50-cell grid is within 2 cells.
    assert abs(float(kps[0, 0, 0]) - 40.5 / 56 * 200) < 2.0
    assert abs(float(coarse[0, 0, 0]) - float(kps[0, 0, 0])) <= 2 * 200 / 50


def test_heatmaps_to_keypoints_skips_invalid_rois():
    rng = np.random.default_rng(5)
    maps = jnp.asarray(rng.normal(size=(3, 56, 56, 4)).astype(np.float32))
    rois = jnp.asarray([[0.0, 0.0, 30.0, 40.0], [5.0, 5.0, 60.0, 20.0], [1.0, 2.0, 9.0, 9.0]])
    full_kps, full_scores = kp_ops.heatmaps_to_keypoints(maps, rois, (64, 64))
    kps, scores = kp_ops.heatmaps_to_keypoints(maps, rois, (64, 64),
                                               valid=jnp.asarray([True, False, True]))
    np.testing.assert_array_equal(np.asarray(kps)[[0, 2]], np.asarray(full_kps)[[0, 2]])
    np.testing.assert_array_equal(np.asarray(scores)[[0, 2]], np.asarray(full_scores)[[0, 2]])
    assert np.all(np.asarray(kps)[1] == 0) and np.all(np.asarray(scores)[1] == 0)
