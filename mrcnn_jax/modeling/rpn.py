"""The RPN head (torchvision's `RPNHead`): `conv_depth` 3x3 convs + ReLU shared over levels (one in
torchvision v1, two in v2), then a 1x1 objectness conv (A channels) and a 1x1 box-regression conv
(4A channels). The 3x3 convs are named `conv`, `conv2`, ... (torchvision's `conv.{i}.0`).

Outputs are concatenated over levels in torchvision's anchor order (per level: row, column, anchor),
which NHWC gives by a plain reshape: torch's [N, A, H, W] -> [N, H, W, A] permute is our layout.
Proposal generation from these outputs is `mrcnn_jax.ops.proposals.generate_proposals`.

Shapes: B = batch, H_l, W_l = level sizes, C = channels, A = anchors per location.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import conv as layers


class RPNHead(nn.Module):
    """Objectness logits and box deltas for every anchor of every level.

    Attributes:
      num_anchors: A, anchors per location (sizes x aspect ratios per level).
      channels: C of the FPN maps and of the 3x3 convs.
      conv_depth: number of 3x3 conv + ReLU layers (torchvision's `conv_depth`).
      dtype: compute dtype (params stay float32).
      conv_impl: modeling/conv.py's implementation of the layers.
    """

    num_anchors: int
    channels: int = 256
    conv_depth: int = 1
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """L maps [B, H_l, W_l, C] -> (objectness [B, A_total], deltas [B, A_total, 4])."""
        if self.conv_depth < 1:
            raise ValueError(f"conv_depth must be >= 1, got {self.conv_depth}")
        # torchvision initialises all its convs with N(0, 0.01) and zero bias.
        init = nn.initializers.normal(stddev=0.01)
        convs = [layers.conv(self.conv_impl, self.channels, (3, 3), padding=1, kernel_init=init,
                             dtype=self.dtype, name="conv" if i == 0 else f"conv{i + 1}")
                 for i in range(self.conv_depth)]
        cls_logits = layers.conv(self.conv_impl, self.num_anchors, (1, 1), kernel_init=init,
                                 dtype=self.dtype, name="cls_logits")
        bbox_pred = layers.conv(self.conv_impl, 4 * self.num_anchors, (1, 1), kernel_init=init,
                                dtype=self.dtype, name="bbox_pred")
        objectness, deltas = [], []
        for level, f in enumerate(features):
            if f.ndim != 4:
                raise ValueError(f"features[{level}] must be [B, H, W, C], got shape {f.shape}")
            t = f
            for conv in convs:
                t = nn.relu(conv(t))
            b = f.shape[0]
            objectness.append(cls_logits(t).reshape(b, -1))
            # Channel a * 4 + c is coordinate c of anchor a (torch's view(N, A, 4, H, W)).
            deltas.append(bbox_pred(t).reshape(b, -1, 4))
        return (jnp.concatenate(objectness, axis=1).astype(jnp.float32),
                jnp.concatenate(deltas, axis=1).astype(jnp.float32))
