"""The device's half of the training input: uint8 pixels + resize taps -> the normalised canvas.

The training stream (`input_pipeline.make_train_dataset`) ships each image as its decoded, flipped
uint8 pixels at the top left of a `data.raw_canvas_size` array, with torch's bilinear source taps
per canvas row and column (zero weights on the padding). Inside the jitted train step,
`canvas_batch` computes torchvision's transform in torchvision's order (/255, normalise, resize,
pad with 0) with `ops.image_resize.normalize_resize_pad`, so the model sees the canvas the eval
pipeline builds on the host (equal up to float32 rounding). With `data.color_jitter` on, the
batch also carries each image's colour factors, applied to the canvas (`ops.color`). Batches
without the taps (a float canvas, as the tests' synthetic streams give) pass through unchanged.

The gt masks cross packed 8 pixels to a byte ("gt_mask_bits", numpy's `packbits` order along each
row, the row padded to a whole byte): 8x fewer bytes than uint8 {0, 1}. `unpack_masks` restores
"gt_masks" on the device.

Shapes: B images, Hr x Wr the raw canvas, Hc x Wc the model's canvas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import color, image_resize

# The entries a training batch carries for the device transform, besides the uint8 "image".
TAP_KEYS = ("resize_rows", "resize_row_weights", "resize_cols", "resize_col_weights")
# [B, 3] float32 brightness, contrast, saturation factors (data/augment.py), when colour jitter
# is on.
COLOR_KEY = "color_factors"
# [B, M, S, ceil(S / 8)] uint8: the gt masks [B, M, S, S] with each row's pixels 8 to a byte, the
# first in the high bit (`input_pipeline.pack_masks`); "gt_masks" once `unpack_masks` ran.
MASK_BITS_KEY = "gt_mask_bits"
MASKS_KEY = "gt_masks"


def has_taps(batch: Mapping[str, object]) -> bool:
    """Whether `batch` carries uint8 pixels for `canvas_batch` (the train pipeline's form)."""
    return all(k in batch for k in TAP_KEYS)


def transform_keys(batch: Mapping[str, object]) -> tuple[str, ...]:
    """The entries of `batch` that only `canvas_batch` reads (taps, colour factors)."""
    if not has_taps(batch):
        return ()
    return TAP_KEYS + ((COLOR_KEY,) if COLOR_KEY in batch else ())


def shipped_keys(model_keys: Sequence[str], batch: Mapping[str, object]) -> tuple[str, ...]:
    """The entries of a host `batch` that go to the devices for a model reading `model_keys`:
    "gt_mask_bits" in place of "gt_masks" where the batch has them packed, and the transform's."""
    packed = MASK_BITS_KEY in batch
    keys = tuple(MASK_BITS_KEY if packed and k == MASKS_KEY else k for k in model_keys)
    return keys + transform_keys(batch)


def unpack_mask_bits(bits: jax.Array, size: int) -> jax.Array:
    """[..., S, ceil(S / 8)] uint8 packed rows -> [..., S, S] uint8 {0, 1}, S = `size`."""
    if bits.shape[-1] != -(-size // 8):
        raise ValueError(f"{MASK_BITS_KEY}: rows of {bits.shape[-1]} bytes cannot hold {size} "
                         f"pixels (expected {-(-size // 8)})")
    return jnp.unpackbits(bits, axis=-1, count=size)


def unpack_masks(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`batch` with "gt_mask_bits" [B, M, S, ceil(S / 8)] replaced by "gt_masks" [B, M, S, S]
    uint8 (the square masks' S is the bits' second-last axis); any other batch as it is."""
    out = dict(batch)
    if MASK_BITS_KEY in out:
        bits = out.pop(MASK_BITS_KEY)
        out[MASKS_KEY] = unpack_mask_bits(bits, bits.shape[-2])
    return out


def canvas_batch(batch: Mapping[str, jax.Array], mean: Sequence[float],
                 std: Sequence[float]) -> dict[str, jax.Array]:
    """`batch` with "image" [B, Hr, Wr, 3] uint8 and the taps -> "image" [B, Hc, Wc, 3] float32
    (normalised, resized, zero-padded) and no taps; a batch without taps is returned as is."""
    if not has_taps(batch):
        return dict(batch)
    out = {k: v for k, v in batch.items() if k not in transform_keys(batch)}
    rows, cols = batch["resize_rows"], batch["resize_cols"]  # [B, Hc, 2], [B, Wc, 2]
    row_w, col_w = batch["resize_row_weights"], batch["resize_col_weights"]
    row_taps = (rows[..., 0], rows[..., 1], row_w[..., 0], row_w[..., 1])
    col_taps = (cols[..., 0], cols[..., 1], col_w[..., 0], col_w[..., 1])
    out["image"] = image_resize.normalize_resize_pad(batch["image"], row_taps, col_taps,
                                                     tuple(mean), tuple(std))
    if COLOR_KEY in batch:
        out["image"] = color.jitter_canvas(out["image"], batch["image_size"], batch[COLOR_KEY],
                                           mean, std)
    return out
