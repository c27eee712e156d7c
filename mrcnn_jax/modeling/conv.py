"""The model's convolution and dense layers: flax's `nn.Conv` / `nn.ConvTranspose` / `nn.Dense`
with cheaper gradients.

`Conv` is `nn.Conv` with ops/conv.py's per-tap kernel gradient (and, in bfloat16, the bias added in
float32: a fast bias gradient). `ConvTranspose` has
`nn.ConvTranspose`'s parameters (kernel [kh, kw, in, out], bias [out]), initialisers and values
(flax's non-transposed-kernel convention), computed by ops/conv.py: the mask head's kernel-2
stride-2 deconvolution as one matrix product, others as a convolution of the zero-dilated input.
XLA:CPU computes the kernel gradient of `lax.conv_transpose` as a reversed, dilated convolution
that took 38 s of an 85 s R50-FPN train step (the mask head's 2x2 deconv over 256 RoIs).
`Dense` is `nn.Dense` whose product runs as ops/matmul.py's `dense` (in bfloat16 a plain
`nn.Dense` product runs in float32 on XLA:CPU: the box head's fc6, 12544 x 1024, was the largest).
The classes keep flax's class names, so auto-named layers keep their parameter names and
imported checkpoints still fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.ops import conv as conv_ops
from mrcnn_jax.ops import matmul


def _promote_keep_bias(inputs, kernel, bias, dtype=None, inexact=True):
    """flax's dtype promotion for the input and kernel; the bias keeps its parameter dtype."""
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


def _in_compute_dtype(layer: nn.Module, inputs: jax.Array, y: jax.Array) -> jax.Array:
    """A layer's float32 sum (product + float32 bias) rounded once to its compute dtype."""
    return y.astype(layer.dtype or jnp.result_type(inputs, layer.param_dtype))


class Conv(nn.Conv):
    """`nn.Conv` with ops/conv.py's gradients. In bfloat16 the bias is added in float32 and the
    sum rounded once: the bias gradient is then a float32 sum over the pixels, which XLA:CPU runs
    ~30x faster than the bfloat16 sum autodiff gives an all-bf16 add (121 vs 3.7 ms for a P2
    output; ~0.5 s of the bf16 R50-FPN step)."""

    conv_general_dilated: Any = conv_ops.conv_general_dilated
    promote_dtype: Any = _promote_keep_bias

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _in_compute_dtype(self, inputs, super().__call__(inputs))


class ConvTranspose(nn.Module):
    """[N, H, W, in] -> [N, H', W', features], as `nn.ConvTranspose(transpose_kernel=False)`."""

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
    """`nn.Dense` computed by ops/matmul.py's `dense` (float32 accumulation, bfloat16 gradients
    in the matrix units' operand order), the bias added in float32 and rounded once (see `Conv`).
    """

    dot_general: Any = matmul.dense_dot_general
    promote_dtype: Any = _promote_keep_bias

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _in_compute_dtype(self, inputs, super().__call__(inputs))
