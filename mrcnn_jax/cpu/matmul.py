"""Matrix products over the channel axis with float32 accumulation, and gradients in the operand
order XLA:CPU runs fast in bfloat16.

XLA:CPU runs a bfloat16 product on the CPU's matrix units (YNNPACK) only when it accumulates in
float32 and its left operand is row-major with the contracted axis minor ([m, k] . [k, n]).
Otherwise it converts both operands to float32 first and runs a slower float32 product: a
plain bfloat16 `x @ kernel` (flax's `nn.Dense`, `jnp.einsum`) and the kernel gradient autodiff
gives it (`x^T . d_y`, contracting the rows of a row-major x) are both such products. `dense` is
the product with both fixed; the 1x1 convolutions, the mask head's deconvolution and the box
head's fully connected layers use it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def matmul_f32(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int, precision: Any = None
               ) -> jax.Array:
    """a . b contracting axis `a_axis` of a with axis `b_axis` of b, accumulated in (and
    returned as) float32: for bfloat16 operands XLA:CPU then runs it on the matrix units."""
    return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """x [..., in] . kernel [in, out] -> [..., out] in x's dtype, accumulated in float32.

    The kernel gradient of a bfloat16 product on the CPU contracts a transposed copy of x
    ([in, rows]): the canonical order for the matrix units (module doc).
    """
    return matmul_f32(x, kernel, x.ndim - 1, 0, precision).astype(x.dtype)


def _dense_fwd(x, kernel, precision):
    return dense(x, kernel, precision), (x, kernel)


def _dense_bwd(precision, residuals, d_y):
    x, kernel = residuals
    d_x = matmul_f32(d_y, kernel, d_y.ndim - 1, 1, precision).astype(x.dtype)
    x_rows = x.reshape(-1, x.shape[-1])
    d_y_rows = d_y.reshape(-1, d_y.shape[-1])
    if x.dtype == jnp.bfloat16:
        d_kernel = matmul_f32(unfused(x_rows.T), d_y_rows, 1, 0, precision)
    else:  # float32: XLA's own order is the fast one
        d_kernel = matmul_f32(x_rows, d_y_rows, 0, 0, precision)
    return d_x, d_kernel.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                      precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """`lax.dot_general` for flax's `nn.Dense(dot_general=...)`: its product (lhs's last axis
    with rhs's first, no batch axes) as `dense`, in lhs's dtype; anything else as XLA's."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not lhs_batch and not rhs_batch and rhs.ndim == 2 and lhs.dtype == rhs.dtype
            and preferred_element_type in (None, lhs.dtype)):
        return dense(lhs, rhs, precision)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def unfused(value: jax.Array) -> jax.Array:
    """`value`, materialised once: computed inside a conditional, which XLA does not fuse into
    the consumers. Both branches return `value` (the predicate is a runtime value only so that
    the conditional is not simplified away; NaN makes it false, with the same result)."""
    first = value.reshape(-1)[0]
    return lax.cond(first == first, lambda v: v, lambda v: v + jnp.zeros((), v.dtype), value)
