"""The keypoint branch of the RoI heads: torchvision's `KeypointRCNNHeads` (8 x conv 3x3 512 +
ReLU on 14x14 pooled features) and `KeypointRCNNPredictor` (ConvTranspose 4x4 stride 2 padding 1
to 28x28, then 2x bilinear upsampling, align_corners=False, to 56x56 heatmap logits, one per
keypoint).

Shapes: N = RoIs (any leading dims), S = pooled size (14), C = channels, K = keypoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.conv import kaiming_fan_out

DECONV_KERNEL = 4
DECONV_PADDING = DECONV_KERNEL // 2 - 1  # torch's ConvTranspose2d padding
UP_SCALE = 2


def _flatten_leading(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    if x.ndim < 4:
        raise ValueError(f"x must be [..., S, S, C], got shape {x.shape}")
    return x.reshape((-1,) + x.shape[-3:]), x.shape[:-3]


def upsample_bilinear_2x(x: jax.Array, axis: int) -> jax.Array:
    """Exact 2x bilinear upsampling along `axis` with half-pixel centres (PyTorch's
    `interpolate(scale_factor=2, mode="bilinear", align_corners=False)`): output 2i reads input
    i - 1/4, output 2i + 1 reads i + 1/4, the border sample repeated."""
    n = x.shape[axis]
    prev = jnp.take(x, jnp.maximum(jnp.arange(n) - 1, 0), axis=axis)
    nxt = jnp.take(x, jnp.minimum(jnp.arange(n) + 1, n - 1), axis=axis)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)


class KeypointRCNNHeads(nn.Module):
    """Pooled RoI features [..., S, S, C] -> [..., S, S, layers[-1]] (conv 3x3 + ReLU each)."""

    layers: Sequence[int] = (512,) * 8
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"  # modeling/conv.py

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, lead = _flatten_leading(x)
        for i, ch in enumerate(self.layers):
            x = nn.relu(layers.conv(self.conv_impl, ch, (3, 3), padding=1,
                                    kernel_init=kaiming_fan_out, dtype=self.dtype,
                                    name=f"conv_fcn{i + 1}")(x))
        return x.reshape(lead + x.shape[1:])


class KeypointRCNNPredictor(nn.Module):
    """[..., S, S, C] -> heatmap logits [..., 4S, 4S, K] float32."""

    num_keypoints: int = 17
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, lead = _flatten_leading(x)
        # torch's ConvTranspose2d(k=4, s=2, p=1) is a stride-2-dilated input padded by
        # k - 1 - p = 2 on each side, convolved with the flipped kernel (the import flips it).
        pad = DECONV_KERNEL - 1 - DECONV_PADDING
        x = layers.conv_transpose(self.conv_impl, self.num_keypoints,
                                  (DECONV_KERNEL, DECONV_KERNEL), strides=(2, 2),
                                  padding=((pad, pad), (pad, pad)), kernel_init=kaiming_fan_out,
                                  dtype=self.dtype, name="kps_score_lowres")(x)
        x = x.astype(jnp.float32)
        x = upsample_bilinear_2x(upsample_bilinear_2x(x, 1), 2)
        return x.reshape(lead + x.shape[1:])
