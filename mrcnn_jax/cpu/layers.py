"""flax's `nn.Conv`, `nn.ConvTranspose` and `nn.Dense` computed by this package's kernels: the
same parameters (names, shapes, initialisers) and values, gradients in the forms XLA:CPU runs
fast. In bfloat16 each adds its bias in float32 and rounds the sum once: the bias gradient is
then a float32 sum over the pixels, which XLA:CPU runs far faster than the bfloat16 sum autodiff
gives an all-bf16 add. The classes keep flax's class names, so auto-named layers keep their
parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.cpu import conv as conv_ops
from mrcnn_jax.cpu import matmul


def _promote_keep_bias(inputs, kernel, bias, dtype=None, inexact=True):
    """flax's dtype promotion for the input and kernel; the bias keeps its parameter dtype."""
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


def _in_compute_dtype(layer: nn.Module, inputs: jax.Array, y: jax.Array) -> jax.Array:
    """A layer's float32 sum (product + float32 bias) rounded once to its compute dtype."""
    return y.astype(layer.dtype or jnp.result_type(inputs, layer.param_dtype))


class Conv(nn.Conv):
    """`nn.Conv` through cpu/conv.py's `conv_general_dilated`, the bias added in float32."""

    conv_general_dilated: Any = conv_ops.conv_general_dilated
    promote_dtype: Any = _promote_keep_bias

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _in_compute_dtype(self, inputs, super().__call__(inputs))


class ConvTranspose(nn.Module):
    """[N, H, W, in] -> [N, H', W', features], as `nn.ConvTranspose(transpose_kernel=False)`,
    computed by cpu/conv.py's `conv_transpose` (the mask head's 2x2 stride-2 deconvolution as one
    matrix product, XLA:CPU's own kernel gradient of it being a slow reversed convolution)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        dtype = self.dtype or jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        y = conv_ops.conv_transpose(x, kernel, tuple(self.strides), self.padding)
        if bias is not None:  # in float32, rounded once (see `Conv`)
            y = (y + bias).astype(dtype)
        return y


class Dense(nn.Dense):
    """`nn.Dense` through cpu/matmul.py's `dense` (float32 accumulation, bfloat16 gradients in
    the matrix units' operand order), the bias added in float32."""

    dot_general: Any = matmul.dense_dot_general
    promote_dtype: Any = _promote_keep_bias

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _in_compute_dtype(self, inputs, super().__call__(inputs))


class FlattenDense(nn.Module):
    """A Dense layer over flattened maps, [..., P, P, C] -> [..., features], whose kernel
    [C * P * P, features] has torch's (c, h, w) flatten order (an imported Linear weight is its
    plain transpose). The kernel's rows are permuted to (h, w, c) in the compute dtype instead of
    transposing every RoI's features (a costly transpose on XLA:CPU), so the NHWC maps flatten by
    a reshape: the same products summed in another order. Product as `Dense`."""

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, height, width, channels = x.shape
        fan_in = height * width * channels
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        kernel_hwc = (kernel.astype(self.dtype).reshape(channels, height, width, self.features)
                      .transpose(1, 2, 0, 3).reshape(fan_in, self.features))
        y = matmul.dense(x.astype(self.dtype).reshape(*lead, fan_in), kernel_hwc)
        return (y + bias).astype(self.dtype)
