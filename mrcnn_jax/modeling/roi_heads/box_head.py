"""The box branch of the RoI heads: torchvision's `TwoMLPHead` (flatten, fc6 + ReLU, fc7 + ReLU),
detectron2's 4conv1fc `ConvFCHead` (GN configs) and `FastRCNNPredictor` (class logits and
class-specific box regression). The C4 box head (res5) is in res5_head.py.

The pooled features are NHWC and flatten in (h, w, c) order, a free reshape; the first FC layer's
kernel keeps torchvision's (c, h, w) row order, so its fc6 weight imports as a plain Linear
transpose, and `FlattenDense` permutes the kernel's rows instead of the features (whose
(h, w, c) -> (c, h, w) transpose, 49 x 256 per RoI, cost XLA:CPU 40-50 ms per bf16 step).

Shapes: N = RoIs (any leading dims), P = pool size (7), C = channels, K + 1 = classes incl. background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.conv import Conv, Dense
from mrcnn_jax.ops import matmul


def torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torchvision/detectron2 initialise the head convs with kaiming_normal(fan_out, relu), bias 0.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch.nn.Linear/Conv default kernel init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense(features: int, fan_in: int, dtype, name: str) -> Dense:
    return Dense(features, kernel_init=torch_default_kernel_init,
                 bias_init=torch_linear_bias_init(fan_in), dtype=dtype, name=name)


class FlattenDense(nn.Module):
    """A Dense layer over flattened [..., P, P, C] maps: [..., P, P, C] -> [..., features].

    Its kernel [C * P * P, features] has torchvision's (c, h, w) row order (the order of a
    torch flatten of NCHW maps, so an imported Linear weight is its plain transpose); the rows
    are permuted to (h, w, c) in the compute dtype, where each row of `features` stays
    contiguous, so the NHWC maps flatten by a reshape. The same products as flattening the maps
    in (c, h, w) order, summed in another order. Product as `Dense` (ops/matmul.py's `dense`),
    bias added in float32 and rounded once.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, height, width, channels = x.shape
        fan_in = height * width * channels
        kernel = self.param("kernel", torch_default_kernel_init, (fan_in, self.features))
        bias = self.param("bias", torch_linear_bias_init(fan_in), (self.features,))
        kernel_hwc = (kernel.astype(self.dtype).reshape(channels, height, width, self.features)
                      .transpose(1, 2, 0, 3).reshape(fan_in, self.features))
        y = matmul.dense(x.astype(self.dtype).reshape(*lead, fan_in), kernel_hwc)
        return (y + bias).astype(self.dtype)


class TwoMLPHead(nn.Module):
    """Pooled RoI features [..., P, P, C] -> representation [..., representation_size]."""

    representation_size: int = 1024
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 3:
            raise ValueError(f"x must be [..., P, P, C], got shape {x.shape}")
        x = nn.relu(FlattenDense(self.representation_size, self.dtype, name="fc6")(x))
        x = nn.relu(_dense(self.representation_size, self.representation_size, self.dtype,
                           "fc7")(x))
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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 4:
            raise ValueError(f"x must be [..., P, P, C], got shape {x.shape}")
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])
        for i, ch in enumerate(self.conv_dims):
            x = Conv(ch, (3, 3), padding=1, use_bias=self.norm is None,
                     kernel_init=kaiming_fan_out, dtype=self.dtype, name=f"conv{i + 1}")(x)
            if self.norm is not None:
                x = self.norm(name=f"conv{i + 1}_norm")(x)
            x = nn.relu(x)
        x = x.reshape(lead + x.shape[-3:])
        if not self.fc_dims:  # the maps themselves, flattened as torch flattens them
            return jnp.moveaxis(x, -1, -3).reshape(lead + (-1,))
        for j, dim in enumerate(self.fc_dims):
            layer = (FlattenDense(dim, self.dtype, name="fc1") if j == 0
                     else _dense(dim, self.fc_dims[j - 1], self.dtype, f"fc{j + 1}"))
            x = nn.relu(layer(x))
        return x


class FastRCNNPredictor(nn.Module):
    """Representation [..., F] -> (class_logits [..., K + 1], box_regression [..., (K + 1) * 4])."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        fan_in = x.shape[-1]
        logits = _dense(self.num_classes, fan_in, self.dtype, "cls_score")(x)
        regression = _dense(self.num_classes * 4, fan_in, self.dtype, "bbox_pred")(x)
        return logits.astype(jnp.float32), regression.astype(jnp.float32)
