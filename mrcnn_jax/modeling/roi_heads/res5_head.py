"""The C4 RoI head of the Mask R-CNN paper (Figure 4, left) and detectron2's `Res5ROIHeads`.

res5 (torchvision's layer4: ResNet stage 4, first block at stride 2) runs on the RoI features
pooled from res4, then average pooling over space gives the vector the box predictor reads:

    pooled [..., 14, 14, C4] -> res5 -> [..., 7, 7, 2048] -> mean -> [..., 2048]

The mask branch shares res5 (the same weights): `feature_map` gives the [..., 7, 7, 2048] map
its deconv starts from (MaskRCNNPredictor: deconv 2x2 s2 to 256 channels, ReLU, 1x1 -> 14x14).

Shapes: N = RoIs (any leading dims), S = pooled size (14), C = channels.
Parameters: `layer4/block{j}/...`, the names of the ResNet body, so torchvision's ImageNet
`layer4.*` keys map onto them as they map onto the FPN body's layer4.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.backbone.resnet import ResNetStage, resnet_from_config
from mrcnn_jax.modeling.norm import norm_factory

# res5's first block halves the 14x14 RoI features to 7x7.
RES5_STRIDE = 2


class Res5Head(nn.Module):
    """res5 on RoI features: [..., S, S, C_in] -> [..., planes * 4] (spatial mean)."""

    num_blocks: int = 3
    planes: int = 512
    groups: int = 1
    width_per_group: int = 64
    norm: Callable[..., nn.Module] = norm_factory("frozen_bn")
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # modeling/conv.py

    def setup(self) -> None:
        self.layer4 = ResNetStage(self.num_blocks, self.planes, RES5_STRIDE, groups=self.groups,
                                  width_per_group=self.width_per_group, norm=self.norm,
                                  dtype=self.dtype, conv_impl=self.conv_impl)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """[..., S, S, C_in] -> [..., ceil(S / 2), ceil(S / 2), planes * 4]."""
        if x.ndim < 4:
            raise ValueError(f"x must be [..., S, S, C], got shape {x.shape}")
        lead = x.shape[:-3]
        y = self.layer4(x.reshape((-1,) + x.shape[-3:]))
        return y.reshape(lead + y.shape[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., S, S, C_in] -> [..., planes * 4]: res5, then the mean over its output cells."""
        return jnp.mean(self.feature_map(x), axis=(-3, -2))

    @classmethod
    def from_config(cls, model_config: Any, **kwargs: Any) -> "Res5Head":
        """layer4 of the ResNet named by `model_config.backbone`, with its norm and dtype."""
        body = resnet_from_config(model_config)
        last = len(body.stage_sizes) - 1
        return cls(num_blocks=body.stage_sizes[last], planes=body.width * 2**last,
                   groups=body.groups, width_per_group=body.width_per_group, norm=body.norm,
                   dtype=body.dtype, conv_impl=body.conv_impl, **kwargs)
