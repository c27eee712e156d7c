"""The box branch of the RoI heads: torchvision's `TwoMLPHead` (flatten, fc6 + ReLU, fc7 + ReLU),
detectron2's 4conv1fc `ConvFCHead` (GN configs) and `FastRCNNPredictor` (class logits and
class-specific box regression). The C4 box head (res5) is in res5_head.py.

The first FC layer's kernel keeps torchvision's (c, h, w) row order, so its weight imports as a
plain Linear transpose (modeling/conv.py's `flatten_dense`).

Shapes: N = RoIs (any leading dims), P = pool size (7), C = channels, K + 1 = classes incl. background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.conv import kaiming_fan_out


def torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torch.nn.Linear/Conv default kernel init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense(conv_impl: str, features: int, fan_in: int, dtype, name: str) -> nn.Module:
    return layers.dense(conv_impl, features, kernel_init=torch_default_kernel_init,
                        bias_init=torch_linear_bias_init(fan_in), dtype=dtype, name=name)


def _flatten_dense(conv_impl: str, features: int, x: jax.Array, dtype, name: str) -> nn.Module:
    """The first FC layer over pooled maps x [..., P, P, C], torch's Linear init."""
    fan_in = math.prod(x.shape[-3:])
    return layers.flatten_dense(conv_impl, features, torch_default_kernel_init,
                                torch_linear_bias_init(fan_in), dtype, name)


class TwoMLPHead(nn.Module):
    """Pooled RoI features [..., P, P, C] -> representation [..., representation_size]."""

    representation_size: int = 1024
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"  # modeling/conv.py

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 3:
            raise ValueError(f"x must be [..., P, P, C], got shape {x.shape}")
        x = nn.relu(_flatten_dense(self.conv_impl, self.representation_size, x, self.dtype,
                                   "fc6")(x))
        x = nn.relu(_dense(self.conv_impl, self.representation_size, self.representation_size,
                           self.dtype, "fc7")(x))
        return x


class ConvFCHead(nn.Module):
    """detectron2's FastRCNNConvFCHead ("4conv1fc", its GN configs; torchvision's v2
    `FastRCNNConvFCHead`): `conv_dims` 3x3 convs, each followed by `norm` (then without bias)
    and ReLU, then flatten in (c, h, w) order and `fc_dims` FC + ReLU.

    Pooled RoI features [..., P, P, C] -> representation [..., fc_dims[-1]].
    """

    conv_dims: Sequence[int] = (256, 256, 256, 256)
    fc_dims: Sequence[int] = (1024,)
    norm: Callable[..., nn.Module] | None = None
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 4:
            raise ValueError(f"x must be [..., P, P, C], got shape {x.shape}")
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])
        for i, ch in enumerate(self.conv_dims):
            x = layers.conv(self.conv_impl, ch, (3, 3), padding=1, use_bias=self.norm is None,
                            kernel_init=kaiming_fan_out, dtype=self.dtype,
                            name=f"conv{i + 1}")(x)
            if self.norm is not None:
                x = self.norm(name=f"conv{i + 1}_norm")(x)
            x = nn.relu(x)
        x = x.reshape(lead + x.shape[-3:])
        if not self.fc_dims:  # the maps themselves, flattened as torch flattens them
            return jnp.moveaxis(x, -1, -3).reshape(lead + (-1,))
        for j, dim in enumerate(self.fc_dims):
            layer = (_flatten_dense(self.conv_impl, dim, x, self.dtype, "fc1") if j == 0
                     else _dense(self.conv_impl, dim, self.fc_dims[j - 1], self.dtype,
                                 f"fc{j + 1}"))
            x = nn.relu(layer(x))
        return x


class FastRCNNPredictor(nn.Module):
    """Representation [..., F] -> (class_logits [..., K + 1], box_regression [..., (K + 1) * 4])."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        fan_in = x.shape[-1]
        logits = _dense(self.conv_impl, self.num_classes, fan_in, self.dtype, "cls_score")(x)
        regression = _dense(self.conv_impl, self.num_classes * 4, fan_in, self.dtype,
                            "bbox_pred")(x)
        return logits.astype(jnp.float32), regression.astype(jnp.float32)
