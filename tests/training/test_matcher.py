"""Matcher: torchvision's `Matcher` rules (thresholds, low-quality matches with ties), padded gt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.matcher import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher, match,
                                   match_rows)


def test_hand_computed_case():
    # 2 gt x 5 predictions. Column maxima: .8 (gt0), .5 (gt1), .2 (gt1), .75 (tie -> first, gt0), .1
    quality = jnp.array([
        [0.8, 0.1, 0.1, 0.75, 0.1],
        [0.3, 0.5, 0.2, 0.75, 0.05],
    ])
    valid = jnp.array([True, True])
    got = match(quality, valid, 0.7, 0.3, allow_low_quality_matches=False)
    np.testing.assert_array_equal(got, [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, 0, -1])
    # gt0's best is .8 at column 0; gt1's best is .75 at column 3 (column 3's own best gt stays 0).
    got = match(quality, valid, 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(got, [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, 0, -1])
    # Lower gt1's values: its best (.5 at column 1, tied with column 4) becomes a match to gt1.
    quality = quality.at[1, 3].set(0.1).at[1, 4].set(0.5)
    got = match(quality, valid, 0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(got, [0, 1, BELOW_LOW_THRESHOLD, 0, 1])


def test_padded_gt_never_matches_and_no_gt_is_background():
    quality = jnp.array([[0.9, 0.1], [1.0, 1.0]])
    got = match(quality, jnp.array([True, False]), 0.7, 0.3, True)
    np.testing.assert_array_equal(got, [0, BELOW_LOW_THRESHOLD])
    got = match(quality, jnp.array([False, False]), 0.7, 0.3, True)
    np.testing.assert_array_equal(got, [BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="gt_valid"):
        match(jnp.zeros((2, 3)), jnp.ones((3,), bool), 0.7, 0.3, True)
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


@pytest.mark.parametrize("allow_low", [False, True])
def test_parity_with_torchvision_matcher_incl_ties_and_padding(allow_low):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from torchvision.models.detection._utils import Matcher as TvMatcher

    rng = np.random.default_rng(0)
    tv = TvMatcher(0.7, 0.3, allow_low_quality_matches=allow_low)
    ours = jax.jit(Matcher(0.7, 0.3, allow_low))
    for trial in range(20):
        m, n = rng.integers(1, 8), rng.integers(1, 300)
        # Quantised qualities make ties (per gt and per prediction) common.
        q = (np.round(rng.uniform(0, 1, (m, n)) ** 2 * 20) / 20).astype(np.float32)
        if trial % 5 == 0:
            q[rng.integers(m)] = 0.0  # a gt overlapping nothing: torchvision's quirk applies
        want = tv(torch.from_numpy(q)).numpy()
        pad = 3
        q_pad = np.concatenate([q, np.ones((pad, n), np.float32)])  # padding would win everything
        valid = np.arange(m + pad) < m
        got = np.asarray(ours(jnp.asarray(q_pad), jnp.asarray(valid)))
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}, m={m}, n={n}")


def test_batched_leading_dims_equal_per_image():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.uniform(0, 1, (3, 4, 50)).astype(np.float32))
    valid = jnp.asarray(rng.uniform(size=(3, 4)) < 0.7)
    batched = match(q, valid, 0.5, 0.5, False)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], match(q[i], valid[i], 0.5, 0.5, False))


@pytest.mark.parametrize("allow_low", [False, True])
def test_match_rows_equals_match_on_the_stacked_rows(allow_low):
    """Row by row (the RPN's anchors: IoU rows computed on demand) gives `match`'s result:
    quantised qualities (ties within a row and across rows), padded rows that would win (also
    after the last valid row, where the loops stop), no valid row, a gt overlapping nothing, NaN
    (0 / 0 IoU of degenerate boxes), batch dimensions, a single row."""
    rng = np.random.default_rng(2)
    for trial in range(12):
        batch, m, n = (2,) if trial % 2 else (), int(rng.integers(1, 9)), int(rng.integers(1, 200))
        q = (np.round(rng.uniform(0, 1, batch + (m, n)) ** 2 * 20) / 20).astype(np.float32)
        valid = rng.uniform(size=batch + (m,)) < 0.8
        if trial == 7:
            valid[...] = False  # no gt: all background, whatever the padded rows hold
        q[..., ~valid, :] = 1.0 if trial % 3 else np.nan
        if trial % 4 == 0:
            q[..., 0, :] = 0.0
        if trial % 5 == 0:
            q[..., -1, rng.integers(n)] = np.nan
        quality = jnp.asarray(q)
        want = match(quality, jnp.asarray(valid), 0.7, 0.3, allow_low)
        got = jax.jit(lambda qq, v: match_rows(
            lambda row: jax.lax.dynamic_index_in_dim(qq, row, axis=qq.ndim - 2, keepdims=False),
            v, 0.7, 0.3, allow_low))(quality, jnp.asarray(valid))
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
