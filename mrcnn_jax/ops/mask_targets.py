"""Mask targets from gt masks cropped to their box (DESIGN.md section 4).

torchvision's `project_masks_on_boxes` RoIAligns the full-resolution gt mask (one image-sized
bitmap per instance) at each positive RoI: `roi_align(mask, roi, 28, spatial_scale=1,
sampling_ratio=-1, aligned=False)`. Feeding full-size masks through a static-shape pipeline costs
M x H x W bytes per image, so the batch carries each gt mask cropped to `gt_mask_boxes` and
resized to S x S instead, and the target is RoIAlign of that crop at the RoI expressed in the
crop's frame. A mask is zero outside its own box, so only resolution is lost: the difference is
measured against torchvision in tests/training/test_mask_targets.py.

Coordinate frames. A crop pixel j covers image x in [bx1 + j / sx, bx1 + (j + 1) / sx) with
sx = S / (bx2 - bx1) (half-pixel-centre resize). torchvision's aligned=False RoIAlign reads image
pixel i's value at the point x = i, i.e. the continuous mask at x + 0.5; the RoI is mapped so that
every sample point reads the same continuous mask point from the crop. The crop gets a one-pixel
zero border first, so samples just outside the gt box interpolate towards 0 (the mask is empty
there) instead of repeating the edge row as RoIAlign's border clamp would.

Glossary of shapes:
    B: images, R: mask slots per image (`num_mask_rois`), M: gt slots, S: gt mask crop size,
    m: mask target resolution (28)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops.roi_align import roi_align
from mrcnn_jax.ops.sampling import gather_slots
from mrcnn_jax.ops.targets import RoiTargets

# One zero pixel around each crop: the mask is empty just outside its box.
_CROP_BORDER = 1


class MaskRois(NamedTuple):
    """The fixed foreground slots of the mask branch.

    rois: [B, R, 4]; labels: [B, R] int32 gt class; matched_gt: [B, R] int32;
    weights: [B, R] float32, 1 for a foreground RoI, 0 for an empty slot."""

    rois: jax.Array
    labels: jax.Array
    matched_gt: jax.Array
    weights: jax.Array


def select_mask_rois(roi_targets: RoiTargets, num_mask_rois: int) -> MaskRois:
    """The first `num_mask_rois` sampled slots, where the sampler puts every foreground RoI.

    With `num_mask_rois` >= int(batch_size_per_image * positive_fraction) (128 = 512 x 0.25)
    every foreground RoI gets a mask slot, exactly torchvision's set of positive proposals; with
    fewer, a random subset of them (the slots are in random order).
    """
    s = roi_targets.labels.shape[-1]
    if not 1 <= num_mask_rois <= s:
        raise ValueError(f"num_mask_rois must be in [1, {s}], got {num_mask_rois}")
    sl = slice(0, num_mask_rois)
    fg = roi_targets.is_foreground[:, sl]
    return MaskRois(
        rois=roi_targets.rois[:, sl],
        labels=jnp.where(fg, roi_targets.labels[:, sl], 0),
        matched_gt=roi_targets.matched_gt[:, sl],
        weights=fg.astype(jnp.float32),
    )


def rois_in_crop_frame(
    rois: jax.Array, mask_boxes: jax.Array, crop_size: int, border: int = _CROP_BORDER
) -> jax.Array:
    """Express image-frame RoIs in the pixel-index frame of a crop (for aligned=False RoIAlign).

    Args:
        rois: [..., 4] xyxy image pixels.
        mask_boxes: [..., 4] xyxy image pixels of the region the crop covers.
        crop_size: S, the crop's side in pixels (before the border).
        border: zero pixels added around the crop.

    Returns:
        [..., 4] boxes such that aligned=False RoIAlign (spatial_scale 1) on the bordered crop
        samples the same continuous mask points as torchvision's aligned=False RoIAlign on the
        full-resolution mask samples at `rois`.
    """
    bx1, by1, bx2, by2 = jnp.split(mask_boxes.astype(jnp.float32), 4, axis=-1)
    # A degenerate gt box has an empty mask anyway; keep the scale finite.
    sx = crop_size / jnp.maximum(bx2 - bx1, 1e-6)
    sy = crop_size / jnp.maximum(by2 - by1, 1e-6)
    x1, y1, x2, y2 = jnp.split(rois.astype(jnp.float32), 4, axis=-1)
    # Image point x reads the continuous mask at x + 0.5; crop pixel j's centre sits at index j,
    # i.e. crop coordinate (x + 0.5 - bx1) * sx - 0.5, shifted by the border.
    off = border - 0.5
    return jnp.concatenate(
        [
            (x1 + 0.5 - bx1) * sx + off,
            (y1 + 0.5 - by1) * sy + off,
            (x2 + 0.5 - bx1) * sx + off,
            (y2 + 0.5 - by1) * sy + off,
        ],
        axis=-1,
    )


def mask_targets(
    rois: jax.Array,
    matched_gt: jax.Array,
    gt_masks: jax.Array,
    gt_mask_boxes: jax.Array,
    resolution: int = 28,
    sampling_ratio: int = -1,
    max_sampling_ratio: int | None = None,
) -> jax.Array:
    """Soft m x m mask targets for RoIs from the cropped gt masks.

    Args:
        rois: [B, R, 4] xyxy image pixels (the mask slots' RoIs).
        matched_gt: [B, R] int gt index of each RoI.
        gt_masks: [B, M, S, S] uint8/bool/float 0-1, each instance's mask cropped to its
            `gt_mask_boxes` entry and resized to S x S.
        gt_mask_boxes: [B, M, 4] xyxy image pixels covered by each crop.
        resolution: m, the mask head's output size.
        sampling_ratio: RoIAlign samples per bin side; <= 0 is adaptive, ceil(roi side / m)
            counted in crop pixels (torchvision counts image pixels of the full mask).
        max_sampling_ratio: static bound of the adaptive count (see `roi_align`); None takes
            ceil((S + 2) / m), enough for a RoI the size of its gt box.

    Returns:
        [B, R, m, m] float32 in [0, 1], no gradient.
    """
    if gt_masks.ndim != 4 or gt_masks.shape[2] != gt_masks.shape[3]:
        raise ValueError(f"gt_masks must be [B, M, S, S], got {gt_masks.shape}")
    b, m, s, _ = gt_masks.shape
    if gt_mask_boxes.shape != (b, m, 4):
        raise ValueError(f"gt_mask_boxes must be {(b, m, 4)}, got {gt_mask_boxes.shape}")
    if rois.ndim != 3 or rois.shape[0] != b or rois.shape[-1] != 4:
        raise ValueError(f"rois must be [{b}, R, 4], got {rois.shape}")
    r = rois.shape[1]
    if matched_gt.shape != (b, r):
        raise ValueError(f"matched_gt must be {(b, r)}, got {matched_gt.shape}")

    matched = jnp.clip(matched_gt.astype(jnp.int32), 0, m - 1)
    crops = jnp.pad(
        gt_masks.astype(jnp.float32),
        ((0, 0), (0, 0), (_CROP_BORDER, _CROP_BORDER), (_CROP_BORDER, _CROP_BORDER)),
    )
    crops = crops.reshape(b * m, s + 2 * _CROP_BORDER, s + 2 * _CROP_BORDER, 1)
    mask_boxes = gather_slots(gt_mask_boxes, matched)
    boxes = rois_in_crop_frame(jax.lax.stop_gradient(rois), mask_boxes, s)
    batch_index = (jnp.arange(b, dtype=jnp.int32)[:, None] * m + matched).reshape(-1)
    out = roi_align(
        crops,
        boxes.reshape(-1, 4),
        batch_index,
        output_size=resolution,
        spatial_scale=1.0,
        sampling_ratio=sampling_ratio,
        aligned=False,
        max_sampling_ratio=max_sampling_ratio,
    )
    return jax.lax.stop_gradient(out.reshape(b, r, resolution, resolution))
