"""Feature Pyramid Network (P2..P6) on a ResNet body, as torchvision's `resnet_fpn_backbone`.

Glossary: B batch, C_l channels of the body output C_l, D = `channels` (256), P_l at stride 2^l.
For l = 5..2: inner_l = lateral 1x1(C_l) + nearest-upsample(inner_{l+1} to C_l's size);
P_l = 3x3 conv(inner_l); P6 = P5[:, ::2, ::2] (torchvision's max_pool2d(k=1, s=2), used by the
RPN only). Parameter names follow torchvision: `inner_blocks_{i}` / `layer_blocks_{i}`, i = 0..3
for C2..C5; `ResNetFPN` names its children `body` and `fpn` like `backbone.body` / `backbone.fpn`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling.backbone.resnet import resnet_from_config
from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.norm import optional_norm
from mrcnn_jax.modeling.precision import compute_dtype
from mrcnn_jax.modeling.remat import check_remat, maybe_remat

# torchvision's FPN initialises its convs with kaiming_uniform_(a=1) (variance 1 / fan_in), bias 0.
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output row of torch's `F.interpolate(size=out_size, mode="nearest")`.

    floor(i * (in_size / out_size)) in float32, clamped to in_size - 1, as torch's CPU kernel
    computes it; equals i // 2 for out_size = 2 * in_size and out_size = 2 * in_size - 1.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, in_size - 1)


def upsample_nearest(x: jnp.ndarray, size_hw: Sequence[int]) -> jnp.ndarray:
    """Nearest-neighbour resize, torch's rule: x [B, h, w, C] -> [B, size_hw[0], size_hw[1], C]."""
    if x.ndim != 4:
        raise ValueError(f"x: expected [batch, height, width, channels], got shape {x.shape}")
    b, h, w, c = x.shape
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if (out_h, out_w) == (2 * h, 2 * w):
        # The common case (canvas a multiple of 32): a broadcast, cheaper than a gather.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, out_h, out_w, c)
    x = jnp.take(x, nearest_indices(h, out_h), axis=1)
    return jnp.take(x, nearest_indices(w, out_w), axis=2)


class FPN(nn.Module):
    """[C2, C3, C4, C5] -> [P2, P3, P4, P5, P6], each [B, H_l, W_l, channels].

    `norm` (a factory from modeling/norm.py, e.g. GroupNorm for detectron2's GN configs) follows
    every lateral and output conv, which then have no bias (torchvision's Conv2dNormActivation);
    None is torchvision's v1 FPN (convs with bias, no norm).
    """

    channels: int = 256
    dtype: Any = jnp.float32
    norm: Callable[..., nn.Module] | None = None
    conv_impl: str = "auto"  # modeling/conv.py

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
        if len(features) != 4:
            raise ValueError(f"features: expected 4 maps C2..C5, got {len(features)}")

        def conv(kernel, name, x):
            padding = ((kernel // 2, kernel // 2),) * 2
            y = layers.conv(self.conv_impl, self.channels, (kernel, kernel), padding=padding,
                            use_bias=self.norm is None, dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=fpn_init, name=name)(x)
            return y if self.norm is None else self.norm(name=f"{name}_norm")(y)

        n = len(features)
        inner = conv(1, f"inner_blocks_{n - 1}", features[-1])
        results = [conv(3, f"layer_blocks_{n - 1}", inner)]
        for i in range(n - 2, -1, -1):
            lateral = conv(1, f"inner_blocks_{i}", features[i])
            inner = lateral + upsample_nearest(inner, lateral.shape[1:3])
            results.insert(0, conv(3, f"layer_blocks_{i}", inner))
        # P6: torchvision's LastLevelMaxPool is max_pool2d(kernel 1, stride 2), a subsample.
        results.append(results[-1][:, ::2, ::2, :])
        return results


class ResNetFPN(nn.Module):
    """The Mask R-CNN backbone: images [B, H, W, 3] -> [P2, P3, P4, P5, P6] at strides 4..64.

    `body` is a `ResNet` (see resnet.py); its params live under `body`, the FPN's under `fpn`.
    Build it from a config with `ResNetFPN.from_config(config.model)`.
    """

    body: nn.Module
    fpn_channels: int = 256
    dtype: Any = jnp.float32
    fpn_norm: Callable[..., nn.Module] | None = None
    conv_impl: str = "auto"
    remat_fpn: bool = False  # recompute the pyramid in the backward (modeling/remat.py)

    def setup(self) -> None:
        self.fpn = maybe_remat(FPN, self.remat_fpn)(self.fpn_channels, dtype=self.dtype,
                                                    norm=self.fpn_norm, conv_impl=self.conv_impl)

    def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
        return self.fpn(self.body(images))

    def body_features(self, images: jnp.ndarray) -> list[jnp.ndarray]:
        """C2..C5 of the body alone (for parity tests and the C4 variant)."""
        return self.body(images)

    @classmethod
    def from_config(cls, model_config: Any, **kwargs: Any) -> "ResNetFPN":
        """From `config.model`: backbone, norm, frozen_bn_eps, group_norm_groups, fpn_channels,
        fpn_norm, dtype. `kwargs` go to the module (e.g. `name="backbone"`)."""
        dtype = compute_dtype(model_config.dtype)
        return cls(body=resnet_from_config(model_config), fpn_channels=model_config.fpn_channels,
                   dtype=dtype, fpn_norm=optional_norm(model_config, model_config.fpn_norm),
                   conv_impl=model_config.conv_impl,
                   remat_fpn="fpn" in check_remat(model_config.remat), **kwargs)
