"""The mask branch of the RoI heads: torchvision's `MaskRCNNHeads` (4 x conv 3x3 256 + ReLU) and
`MaskRCNNPredictor` (ConvTranspose 2x2 stride 2 + ReLU, 1x1 conv to one logit map per class).

`class_agnostic=True` predicts a single mask for all classes (the paper's ablation); inference then
reads channel 0 whatever the predicted class.

Shapes: N = RoIs (any leading dims), S = pooled size (14), M = 2S (28), C = channels,
K + 1 = classes incl. background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.conv import kaiming_fan_out


# Mask probabilities at inference, one per mask loss (ops.losses.MASK_LOSS_MODES).
MASK_PROB_MODES = ("sigmoid", "softmax")


def _flatten_leading(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    if x.ndim < 4:
        raise ValueError(f"x must be [..., S, S, C], got shape {x.shape}")
    lead = x.shape[:-3]
    return x.reshape((-1,) + x.shape[-3:]), lead


class MaskRCNNHeads(nn.Module):
    """Pooled RoI features [..., S, S, C] -> [..., S, S, layers[-1]] (conv 3x3 + ReLU each).

    `norm` (e.g. GroupNorm, detectron2's GN configs) goes between each conv, then without bias,
    and its ReLU; None is torchvision's v1 head.
    """

    layers: Sequence[int] = (256, 256, 256, 256)
    dtype: jnp.dtype = jnp.float32
    norm: Callable[..., nn.Module] | None = None
    conv_impl: str = "auto"  # modeling/conv.py

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, lead = _flatten_leading(x)
        for i, ch in enumerate(self.layers):
            x = layers.conv(self.conv_impl, ch, (3, 3), padding=1, use_bias=self.norm is None,
                            kernel_init=kaiming_fan_out, dtype=self.dtype,
                            name=f"mask_fcn{i + 1}")(x)
            if self.norm is not None:
                x = self.norm(name=f"mask_fcn{i + 1}_norm")(x)
            x = nn.relu(x)
        return x.reshape(lead + x.shape[1:])


class MaskLogits(nn.Module):
    """`nn.Conv(features, (1, 1))` (same parameters: kernel [1, 1, C, features], bias) that can
    compute one output channel per RoI instead of all of them.

    x: [N, H, W, C] -> [N, H, W, features], or with `classes` [N] int -> [N, H, W, 1], channel
    `classes[n]` of RoI n. Training's sigmoid mask loss reads only the gt class's map, so the
    other K maps (and their 1x1 products over 28 x 28 x num_mask_rois pixels) need not exist.
    """

    features: int
    kernel_init: Callable[..., jax.Array] = kaiming_fan_out
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, classes: jax.Array | None = None) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if classes is None:
            y = layers.conv_general_dilated(self.conv_impl)(
                x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + bias
        if classes.shape != x.shape[:1]:
            raise ValueError(f"classes must be [{x.shape[0]}] (one per RoI), got {classes.shape}")
        classes = jnp.clip(classes.astype(jnp.int32), 0, self.features - 1)
        per_roi_kernel = jnp.take(kernel[0, 0], classes, axis=1).T  # [N, C]
        y = jnp.einsum("nhwc,nc->nhw", x, per_roi_kernel)
        return (y + jnp.take(bias, classes)[:, None, None])[..., None]


class MaskRCNNPredictor(nn.Module):
    """[..., S, S, C] -> mask logits [..., 2S, 2S, K + 1] (or [..., 2S, 2S, 1] class-agnostic,
    or with `classes` [...] the logits of each RoI's class only, [..., 2S, 2S, 1])."""

    num_classes: int
    dim_reduced: int = 256
    class_agnostic: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, classes: jax.Array | None = None) -> jax.Array:
        x, lead = _flatten_leading(x)
        # Kernel 2, stride 2: every pixel becomes a 2x2 block (torch's ConvTranspose2d(2, 2);
        # the weight import flips the kernel for flax's non-transposed convention).
        x = layers.conv_transpose(self.conv_impl, self.dim_reduced, (2, 2), strides=(2, 2),
                                  padding="VALID", kernel_init=kaiming_fan_out,
                                  dtype=self.dtype, name="conv5_mask")(x)
        x = nn.relu(x)
        out = 1 if self.class_agnostic else self.num_classes
        classes = None if classes is None or self.class_agnostic else classes.reshape(-1)
        x = MaskLogits(out, dtype=self.dtype, conv_impl=self.conv_impl,
                       name="mask_fcn_logits")(x, classes)
        return x.reshape(lead + x.shape[1:]).astype(jnp.float32)


def select_class_masks(mask_logits: jax.Array, labels: jax.Array,
                       mode: str = "sigmoid") -> jax.Array:
    """Mask probabilities of each RoI's class, as the mask loss of `mode` defines them.

    Args:
      mask_logits: [..., M, M, K + 1] or [..., M, M, 1] (class-agnostic: channel 0 for all).
      labels: [...] int class per RoI.
      mode: "sigmoid" (torchvision's `maskrcnn_inference`: sigmoid of the class's logit) or
        "softmax" (the multinomial ablation: the class's share of the per-pixel softmax over
        all K + 1 channels, channel 0 the background); see `ops.losses.maskrcnn_loss`.
    Returns:
      [..., M, M] float32 probabilities.
    """
    if mode not in MASK_PROB_MODES:
        raise ValueError(f"mode must be one of {MASK_PROB_MODES}, got {mode!r}")
    if mode == "softmax":
        if mask_logits.shape[-1] < 2:
            raise ValueError("mode 'softmax' needs mask_logits with a background channel "
                             f"(K + 1 >= 2 channels), got shape {mask_logits.shape}")
        mask_logits = jax.nn.log_softmax(mask_logits.astype(jnp.float32), axis=-1)
    if mask_logits.shape[-1] == 1:
        chosen = mask_logits[..., 0]
    else:
        idx = labels[..., None, None, None].astype(jnp.int32)
        idx = jnp.broadcast_to(idx, mask_logits.shape[:-1] + (1,))
        chosen = jnp.take_along_axis(mask_logits, idx, axis=-1)[..., 0]
    return jnp.exp(chosen) if mode == "softmax" else jax.nn.sigmoid(chosen)
