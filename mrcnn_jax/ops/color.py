"""torchvision's colour jitter (brightness, contrast, saturation) on the device.

torchvision's `ColorJitter` works on [0, 1] pixels before normalisation, each adjustment a blend
clamped to [0, 1] (`torchvision.transforms.functional`):

    brightness f:  clamp(f * x)
    contrast f:    clamp(f * x + (1 - f) * mean(gray(x)))     mean over the image
    saturation f:  clamp(f * x + (1 - f) * gray(x))           per pixel
    gray(x) = 0.2989 r + 0.587 g + 0.114 b

Here they run on the normalised, resized canvas (`data.device_transform`): the canvas is mapped
back to [0, 1], adjusted in this fixed order, normalised again, and the padding zeroed. The
adjustments are affine in the pixels, so they commute with the bilinear resize except for the
clamps and the contrast mean, which is taken over the resized image (the crop's window under
scale jitter): an augmentation's distribution, not a parity target.

Shapes: B images, Hc x Wc the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grayscale(x: jax.Array) -> jax.Array:
    """[..., 3] RGB -> [..., 1] luma with torchvision's weights."""
    return jnp.sum(x * jnp.asarray(GRAY_WEIGHTS, x.dtype), axis=-1, keepdims=True)


def jitter_unit_images(x: jax.Array, valid: jax.Array, factors: jax.Array) -> jax.Array:
    """Brightness, contrast, saturation of [0, 1] images.

    Args:
      x: [B, H, W, 3] float32 in [0, 1].
      valid: [B, H, W, 1] bool, the image's pixels (the contrast mean is taken over them).
      factors: [B, 3] float32 (brightness, contrast, saturation); 1 leaves the image as is.
    Returns:
      [B, H, W, 3] float32 in [0, 1].
    """
    b, c, s = (factors[:, i, None, None, None] for i in range(3))
    x = jnp.clip(x * b, 0.0, 1.0)
    count = jnp.maximum(jnp.sum(valid, axis=(1, 2, 3), keepdims=True), 1)
    mean = jnp.sum(jnp.where(valid, grayscale(x), 0.0), axis=(1, 2, 3), keepdims=True) / count
    x = jnp.clip(c * x + (1.0 - c) * mean, 0.0, 1.0)
    return jnp.clip(s * x + (1.0 - s) * grayscale(x), 0.0, 1.0)


def jitter_canvas(canvas: jax.Array, image_size: jax.Array, factors: jax.Array,
                  mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """`jitter_unit_images` on normalised canvases (module docstring).

    Args:
      canvas: [B, Hc, Wc, 3] float32, normalised with `mean` / `std`, zero past the image.
      image_size: [B, 2] int32 (h, w) of each image inside its canvas.
      factors: [B, 3] float32 (brightness, contrast, saturation).
    Returns:
      [B, Hc, Wc, 3] float32, normalised, zero past the image.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    rows = jnp.arange(canvas.shape[1])[None, :, None, None] < image_size[:, 0, None, None, None]
    cols = jnp.arange(canvas.shape[2])[None, None, :, None] < image_size[:, 1, None, None, None]
    valid = rows & cols
    x = jnp.clip(canvas * std + mean, 0.0, 1.0)
    x = jitter_unit_images(x, valid, factors)
    return jnp.where(valid, (x - mean) / std, 0.0)
