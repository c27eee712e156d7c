"""The C4 backbone of the Mask R-CNN paper and detectron2's R50-C4: the ResNet body up to res4.

RPN and RoI pooling both read res4 (C4, stride 16, 1024 channels for ResNet-50); res5 (layer4)
is not part of the backbone but the RoI box head (`modeling/roi_heads/res5_head.py`), run on the
14x14 RoI features with its first block at stride 2, as in the paper's Figure 4 (left).

images [B, H, W, 3] -> [C4], one map [B, ceil(H / 16), ceil(W / 16), 4 * 4 * width].
Parameters live under `body` (the same tree as `ResNetFPN`'s body, without layer4), so
`trainable_mask` and the frozen stages work unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling.backbone.resnet import resnet_from_config

# Stages of the body the C4 backbone runs: layer1..layer3 (res2..res4).
C4_NUM_STAGES = 3
# Stride of res4.
C4_STRIDE = 16


class ResNetC4(nn.Module):
    """images [B, H, W, 3] -> [C4 [B, H / 16, W / 16, C]]; `body` is a 3-stage `ResNet`."""

    body: nn.Module

    def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
        return [self.body(images)[-1]]

    @property
    def out_channels(self) -> int:
        """Channels of res4 (1024 for ResNet-50/101 and ResNeXt-101)."""
        return self.body.out_channels[C4_NUM_STAGES - 1]

    @classmethod
    def from_config(cls, model_config: Any, **kwargs: Any) -> "ResNetC4":
        """From `config.model`: backbone, norm, frozen_bn_eps, group_norm_groups, dtype."""
        return cls(body=resnet_from_config(model_config, num_stages=C4_NUM_STAGES), **kwargs)
