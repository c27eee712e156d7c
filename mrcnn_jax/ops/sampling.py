"""Balanced positive/negative sampling with a static number of slots.

torchvision's `BalancedPositiveNegativeSampler` draws up to `batch_size_per_image *
positive_fraction` positives at random and fills the rest with random negatives, so the number of
sampled elements varies. Here the result always has exactly `batch_size_per_image` slots (256
anchors for the RPN, 512 RoIs for the box head) with a `valid` mask for slots that could not be
filled. The random choice is "draw a uniform key per candidate, keep the `top_k` keys", which picks
a uniformly random subset without replacement, like `randperm(n)[:k]`.

Slot layout (both samplers): positives first, then negatives, then padding. Hence the first
`int(batch_size_per_image * positive_fraction)` slots hold every sampled positive, which is how the
mask branch takes its fixed `num_mask_rois` foreground slots.

Glossary of shapes:
    N: candidates (anchors, or proposals with the gt appended)
    S: slots, `batch_size_per_image`
    ...: optional leading batch dimensions
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SampledSlots(NamedTuple):
    """The sampled elements of one or more images.

    indices: [..., S] int32 index into the candidates, -1 in padded slots.
    labels: [..., S] int32 the candidate's label (>= 1 positive, 0 negative), 0 in padded slots.
    is_positive: [..., S] bool, a valid slot holding a positive.
    valid: [..., S] bool, the slot holds a sampled element.
    """

    indices: jax.Array
    labels: jax.Array
    is_positive: jax.Array
    valid: jax.Array

    @property
    def weights(self) -> jax.Array:
        """[..., S] float32: 1 for a sampled element, 0 for padding."""
        return self.valid.astype(jnp.float32)

    def gather(self, values: jax.Array) -> jax.Array:
        """values [..., N, *rest] -> [..., S, *rest], taken at the slots (padded slots read 0)."""
        return gather_slots(values, self.indices)


def gather_slots(values: jax.Array, indices: jax.Array) -> jax.Array:
    """Gather along the candidate axis.

    Args:
        values: [..., N, *rest].
        indices: [..., S] int, -1 for padded slots (they read element 0; mask them with `valid`).

    Returns:
        [..., S, *rest].
    """
    lead = indices.ndim - 1
    if values.shape[:lead] != indices.shape[:lead]:
        raise ValueError(
            f"values {values.shape} and indices {indices.shape} must share leading dimensions"
        )
    idx = jnp.maximum(indices, 0)
    idx = idx.reshape(idx.shape + (1,) * (values.ndim - lead - 1))
    return jnp.take_along_axis(values, idx, axis=lead)


def num_positive_slots(batch_size_per_image: int, positive_fraction: float) -> int:
    """The most positives one image can have: int(batch * fraction), as torchvision rounds."""
    return int(batch_size_per_image * positive_fraction)


def _top_k_indices(priority: jax.Array, k: int, size: int) -> jax.Array:
    """Indices of the k largest priorities along the last axis, zero-padded to `size`."""
    k = min(k, priority.shape[-1])
    _, idx = jax.lax.top_k(priority, k)
    pad = [(0, 0)] * (idx.ndim - 1) + [(0, size - k)]
    return jnp.pad(idx, pad)


def _select_slots(
    labels: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    priority: jax.Array,
    batch_size_per_image: int,
    positive_fraction: float,
) -> SampledSlots:
    """Take up to the quota of positives, then negatives, each by decreasing `priority`."""
    s = batch_size_per_image
    max_pos = num_positive_slots(s, positive_fraction)
    neg_inf = jnp.array(-jnp.inf, priority.dtype)
    pos_idx = _top_k_indices(jnp.where(positive, priority, neg_inf), max_pos, s)
    neg_idx = _top_k_indices(jnp.where(negative, priority, neg_inf), s, s)

    num_pos = jnp.minimum(jnp.sum(positive, axis=-1), max_pos)[..., None]
    num_neg = jnp.minimum(jnp.sum(negative, axis=-1)[..., None], s - num_pos)
    slot = jnp.arange(s)
    from_pos = slot < num_pos
    neg_slot = jnp.clip(slot - num_pos, 0, s - 1)
    from_neg = ~from_pos & (slot - num_pos < num_neg)
    neg_at_slot = jnp.take_along_axis(neg_idx, neg_slot, axis=-1)
    indices = jnp.where(from_pos, pos_idx, jnp.where(from_neg, neg_at_slot, -1)).astype(jnp.int32)
    valid = from_pos | from_neg
    slot_labels = jnp.where(valid, gather_slots(labels, indices), 0).astype(jnp.int32)
    return SampledSlots(indices=indices, labels=slot_labels, is_positive=from_pos, valid=valid)


def _check_labels(labels: jax.Array) -> None:
    if labels.ndim < 1:
        raise ValueError(f"labels must be [..., N], got shape {labels.shape}")


def sample_balanced(
    labels: jax.Array,
    rng: jax.Array,
    batch_size_per_image: int,
    positive_fraction: float,
) -> SampledSlots:
    """Random balanced sample, torchvision's `BalancedPositiveNegativeSampler` with static slots.

    Args:
        labels: [..., N] int or float; >= 1 positive, 0 negative, -1 (or any other negative
            value) ignored, as torchvision's sampler reads them.
        rng: a PRNG key; each leading index draws independent keys.
        batch_size_per_image: S, the number of slots.
        positive_fraction: at most int(S * positive_fraction) positives.

    Returns:
        SampledSlots with [..., S] arrays, positives first (in random order), then negatives.
    """
    _check_labels(labels)
    priority = jax.random.uniform(rng, labels.shape, jnp.float32)
    return _select_slots(
        labels.astype(jnp.int32),
        labels >= 1,
        labels == 0,
        priority,
        batch_size_per_image,
        positive_fraction,
    )


def sample_from_masks(
    labels: jax.Array,
    positive_mask: jax.Array,
    negative_mask: jax.Array,
    batch_size_per_image: int,
    positive_fraction: float,
) -> SampledSlots:
    """Slots for a sample chosen elsewhere, e.g. torchvision's sampled set in a parity test.

    Args:
        labels: [..., N] the candidates' labels (copied into the slots).
        positive_mask: [..., N] bool, the chosen positives (at most the positive quota).
        negative_mask: [..., N] bool, the chosen negatives (at most S minus the positives).

    Returns:
        SampledSlots with [..., S] arrays, the chosen positives by increasing index, then the
        chosen negatives by increasing index. Chosen elements beyond the quotas are dropped.
    """
    _check_labels(labels)
    if positive_mask.shape != labels.shape or negative_mask.shape != labels.shape:
        raise ValueError(
            f"positive_mask {positive_mask.shape} and negative_mask {negative_mask.shape} "
            f"must have the shape of labels {labels.shape}"
        )
    n = labels.shape[-1]
    # Lower index first; float32 represents every index exactly up to 2**24 candidates.
    priority = jnp.broadcast_to(-jnp.arange(n, dtype=jnp.float32), labels.shape)
    return _select_slots(
        labels.astype(jnp.int32),
        positive_mask.astype(bool),
        negative_mask.astype(bool),
        priority,
        batch_size_per_image,
        positive_fraction,
    )


@dataclasses.dataclass(frozen=True)
class BalancedPositiveNegativeSampler:
    """torchvision's sampler as a static configuration: `sampler(labels, rng) -> SampledSlots`."""

    batch_size_per_image: int
    positive_fraction: float

    def __post_init__(self):
        if self.batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image must be >= 1, got {self.batch_size_per_image}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")

    @property
    def num_positive_slots(self) -> int:
        return num_positive_slots(self.batch_size_per_image, self.positive_fraction)

    def __call__(self, labels: jax.Array, rng: jax.Array) -> SampledSlots:
        return sample_balanced(labels, rng, self.batch_size_per_image, self.positive_fraction)

    def from_masks(
        self, labels: jax.Array, positive_mask: jax.Array, negative_mask: jax.Array
    ) -> SampledSlots:
        return sample_from_masks(
            labels, positive_mask, negative_mask, self.batch_size_per_image,
            self.positive_fraction,
        )
