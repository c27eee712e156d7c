"""Balanced sampler: static slots, torchvision's quotas, uniform choice, fed-in samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.sampling import BalancedPositiveNegativeSampler, sample_from_masks

from tests.training.helpers import MODEL


def _labels(num_pos, num_neg, num_ignore, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignore, np.int32)
    labels[:num_pos] = rng.integers(1, 4, num_pos)  # RoI labels are classes; any >= 1 is positive
    return rng.permutation(labels)


@pytest.mark.parametrize(
    "num_pos,num_neg,want_pos,want_neg",
    [(300, 1000, 128, 128), (10, 1000, 10, 246), (10, 20, 10, 20), (0, 500, 0, 256), (0, 0, 0, 0)],
)
def test_quotas_and_slot_layout(num_pos, num_neg, want_pos, want_neg):
    sampler = BalancedPositiveNegativeSampler(
        MODEL.rpn_batch_size_per_image, MODEL.rpn_positive_fraction
    )
    labels = _labels(num_pos, num_neg, 50)
    s = jax.jit(sampler)(jnp.asarray(labels), jax.random.key(3))
    idx, valid, pos = map(np.asarray, (s.indices, s.valid, s.is_positive))
    assert idx.shape == (256,)
    assert pos.sum() == want_pos and (valid & ~pos).sum() == want_neg
    # positives, then negatives, then padding (-1)
    np.testing.assert_array_equal(pos, np.arange(256) < want_pos)
    np.testing.assert_array_equal(valid, np.arange(256) < want_pos + want_neg)
    assert np.all(idx[~valid] == -1)
    chosen = idx[valid]
    assert len(np.unique(chosen)) == len(chosen)
    np.testing.assert_array_equal(labels[idx[pos]] >= 1, True)
    np.testing.assert_array_equal(labels[idx[valid & ~pos]], 0)
    np.testing.assert_array_equal(np.asarray(s.labels)[valid], labels[chosen])
    np.testing.assert_array_equal(np.asarray(s.weights), valid.astype(np.float32))


def test_roi_quota_is_int_of_fraction():
    sampler = BalancedPositiveNegativeSampler(
        MODEL.box_batch_size_per_image, MODEL.box_positive_fraction
    )
    assert sampler.num_positive_slots == 128
    s = sampler(jnp.asarray(_labels(1000, 3000, 0)), jax.random.key(0))
    assert int(s.is_positive.sum()) == 128 and int(s.valid.sum()) == 512


def test_choice_is_uniform_and_keys_differ_per_image():
    # 20 positives, quota 4 -> each positive is chosen with p = 0.2; 4000 draws.
    labels = jnp.asarray(_labels(20, 100, 10, seed=1))
    batched = jnp.broadcast_to(labels, (4000,) + labels.shape)
    s = jax.jit(lambda l, k: BalancedPositiveNegativeSampler(8, 0.5)(l, k))(batched, jax.random.key(0))
    idx = np.asarray(s.indices)
    pos_counts = np.bincount(idx[np.asarray(s.is_positive)], minlength=labels.shape[0])
    pos_cands = np.flatnonzero(np.asarray(labels) >= 1)
    expected, sigma = 4000 * 0.2, np.sqrt(4000 * 0.2 * 0.8)
    assert np.all(np.abs(pos_counts[pos_cands] - expected) < 5 * sigma), pos_counts[pos_cands]
    neg_counts = np.bincount(idx[np.asarray(s.valid & ~s.is_positive)], minlength=labels.shape[0])
    neg_cands = np.flatnonzero(np.asarray(labels) == 0)
    expected, sigma = 4000 * 0.04, np.sqrt(4000 * 0.04 * 0.96)
    assert np.all(np.abs(neg_counts[neg_cands] - expected) < 5 * sigma)
    # Images of one batch draw different samples.
    assert len({tuple(r) for r in idx[:50]}) == 50


def test_from_masks_reproduces_torchvision_sample():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler as TvSampler

    torch.manual_seed(0)
    labels = np.stack([_labels(40, 900, 60, seed=i) for i in range(2)])
    labels[1, labels[1] >= 1] = 0  # an image without positives
    tv = TvSampler(MODEL.rpn_batch_size_per_image, MODEL.rpn_positive_fraction)
    pos, neg = tv([torch.from_numpy(l) for l in labels])
    pos = np.stack([p.numpy().astype(bool) for p in pos])
    neg = np.stack([n.numpy().astype(bool) for n in neg])
    s = jax.jit(sample_from_masks, static_argnums=(3, 4))(
        jnp.asarray(labels), jnp.asarray(pos), jnp.asarray(neg), 256, 0.5
    )
    for i in range(2):
        idx, valid, is_pos = (np.asarray(a[i]) for a in (s.indices, s.valid, s.is_positive))
        np.testing.assert_array_equal(idx[is_pos], np.flatnonzero(pos[i]))
        np.testing.assert_array_equal(idx[valid & ~is_pos], np.flatnonzero(neg[i]))
        assert valid.sum() == 256


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedPositiveNegativeSampler(256, 1.5)
    with pytest.raises(ValueError, match="positive_mask"):
        sample_from_masks(jnp.zeros(5), jnp.zeros(4, bool), jnp.zeros(5, bool), 4, 0.5)
