"""The model's convolution, dense and max-pool layers, in the implementation `model.conv_impl`
names; every module of the model builds its layers here.

    "xla"   flax's stock layers (`nn.Conv`, `nn.ConvTranspose`, `nn.Dense`, `nn.max_pool`, bias
            added in the compute dtype): what cuDNN and the TPU compiler run best.
    "cpu"   the same parameters and values through mrcnn_jax/cpu/, whose gradients XLA:CPU runs
            several times faster (per-tap and Winograd kernel gradients, 1x1 convolutions and the
            mask deconvolution as matrix products, float32 bias adds in bfloat16), and
            in inference each residual block's output computed once (`materialized`).
    "auto"  "cpu" on the CPU backend, "xla" on every other.

Both create the same parameters under the same names (the CPU classes keep flax's class names),
so a checkpoint, an import or an init made under one runs under the other; outputs agree to the
compute dtype's rounding (tests/modeling/test_conv_impl.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax.cpu import conv as cpu_conv
from mrcnn_jax.cpu import layers as cpu_layers
from mrcnn_jax.cpu import matmul as cpu_matmul
from mrcnn_jax.cpu import stem_max_pool as cpu_pool

CONV_IMPLS = ("auto", "xla", "cpu")

# torchvision's init of the ResNet, FPN-less head and mask/keypoint convs:
# kaiming_normal_(mode="fan_out", nonlinearity="relu").
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_conv_impl(conv_impl: str) -> str:
    """"xla" or "cpu" for `model.conv_impl` on the backend being traced for."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={conv_impl!r}: expected one of {', '.join(CONV_IMPLS)}")
    if conv_impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return conv_impl


def _uses_cpu_kernels(conv_impl: str) -> bool:
    return resolve_conv_impl(conv_impl) == "cpu"


def conv(conv_impl: str, features: int, kernel_size: Sequence[int], **kwargs: Any) -> nn.Module:
    """`nn.Conv(features, kernel_size, **kwargs)` in `conv_impl`."""
    cls = cpu_layers.Conv if _uses_cpu_kernels(conv_impl) else nn.Conv
    return cls(features, tuple(kernel_size), **kwargs)


def conv_transpose(conv_impl: str, features: int, kernel_size: Sequence[int],
                   **kwargs: Any) -> nn.Module:
    """`nn.ConvTranspose(features, kernel_size, **kwargs)` (kernel not transposed, flax's
    default: torch's ConvTranspose2d weight imports flipped) in `conv_impl`."""
    cls = cpu_layers.ConvTranspose if _uses_cpu_kernels(conv_impl) else nn.ConvTranspose
    return cls(features, tuple(kernel_size), **kwargs)


def dense(conv_impl: str, features: int, **kwargs: Any) -> nn.Module:
    """`nn.Dense(features, **kwargs)` in `conv_impl`."""
    cls = cpu_layers.Dense if _uses_cpu_kernels(conv_impl) else nn.Dense
    return cls(features, **kwargs)


class _ChwFlattenDense(nn.Dense):
    """`nn.Dense` over [..., P, P, C] maps flattened in torch's (c, h, w) order."""

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-3]
        return super().__call__(jnp.moveaxis(x, -1, -3).reshape(lead + (-1,)))


def flatten_dense(conv_impl: str, features: int, kernel_init: Callable[..., jax.Array],
                  bias_init: Callable[..., jax.Array], dtype: Any, name: str) -> nn.Module:
    """A Dense layer over RoI maps, [..., P, P, C] -> [..., features], its kernel [C * P * P,
    features] in torch's (c, h, w) flatten order (an imported Linear weight is its transpose).
    Under "cpu" the kernel's rows are permuted instead of the maps (cpu/layers.py)."""
    if _uses_cpu_kernels(conv_impl):
        return cpu_layers.FlattenDense(features, kernel_init, bias_init, dtype, name=name)
    return _ChwFlattenDense(features, kernel_init=kernel_init, bias_init=bias_init,
                            dtype=dtype, name=name)


def conv_general_dilated(conv_impl: str) -> Callable[..., jax.Array]:
    """`lax.conv_general_dilated` in `conv_impl`, for layers that hold their own kernel."""
    return cpu_conv.conv_general_dilated if _uses_cpu_kernels(conv_impl) else lax.conv_general_dilated


def materialized(conv_impl: str, x: jax.Array) -> jax.Array:
    """`x`, under "cpu" computed once into its own buffer. XLA:CPU fuses a cheap elementwise
    producer (a residual block's affine + add + ReLU) into each of its consumers, so every later
    block's output pass recomputed the chain from the earlier blocks' convolution outputs, reading
    three or four maps instead of two, on one thread. Other backends get `x` unchanged, and so
    does a value being differentiated: a train step keeps the block outputs for its backward
    pass anyway, and there the conditional cost the step 1-2 %."""
    return _computed_once(x) if _uses_cpu_kernels(conv_impl) else x


@jax.custom_vjp
def _computed_once(x: jax.Array) -> jax.Array:
    return cpu_matmul.unfused(x)


_computed_once.defvjp(lambda x: (x, None), lambda _, d_x: (d_x,))


def max_pool(conv_impl: str, x: jax.Array, window: Sequence[int], strides: Sequence[int],
             pads: Sequence[tuple[int, int]]) -> jax.Array:
    """x [B, H, W, C] -> the max over each window of x padded with -inf (torch's max_pool2d;
    the gradient goes to each window's first maximum)."""
    if _uses_cpu_kernels(conv_impl):
        return cpu_pool.max_pool(x, window, strides, pads)
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding=tuple(pads))
