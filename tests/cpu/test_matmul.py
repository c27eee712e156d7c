"""cpu/matmul.py and the layers built on it (cpu/layers.py's Dense, the mask deconvolution):
float32-accumulated products whose bf16 gradients keep bf16 operands."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mrcnn_jax.cpu import conv, matmul
from mrcnn_jax.cpu.layers import Dense


def _products(closed_jaxpr) -> list[tuple[tuple, object]]:
    """(operand dtypes, preferred_element_type) of every dot_general, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append((tuple(v.aval.dtype for v in eqn.invars),
                              eqn.params.get("preferred_element_type")))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(closed_jaxpr.jaxpr)
    return found


def test_dense_by_hand_and_float32_gradients_equal_autodiff():
    x = jnp.asarray([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])  # [3, 2]
    kernel = jnp.asarray([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])  # [2, 3]
    np.testing.assert_array_equal(matmul.dense(x, kernel),
                                  [[-1.0, 2.0, 3.0], [4.0, -1.0, 5.5], [0.5, 0.0, 1.0]])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 7, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 5, 7, 8)), jnp.float32)
    got = jax.grad(lambda a, b: jnp.sum(matmul.dense(a, b) * probe), (0, 1))(x, kernel)
    want = jax.grad(lambda a, b: jnp.sum(jnp.einsum("nhwc,co->nhwo", a, b) * probe),
                    (0, 1))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bfloat16_dense_value_and_gradients_accumulate_in_float32():
    """Value, input and kernel gradient: one bf16 rounding of float32 math on the bf16 inputs
    (a bf16 running sum over 512 terms would drift by several roundings), every product on bf16
    operands accumulating in float32, the kernel gradient on the transposed input."""
    rng = np.random.default_rng(1)
    x16 = jnp.asarray(rng.normal(size=(64, 512)), jnp.bfloat16)
    k16 = jnp.asarray(rng.normal(size=(512, 32)) * 0.05, jnp.bfloat16)
    probe = jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16)

    def run(fn, a, b):
        y, vjp = jax.vjp(fn, a, b)
        return (y, *vjp(probe.astype(y.dtype)))

    got = jax.jit(lambda a, b: run(matmul.dense, a, b))(x16, k16)
    want = run(lambda a, b: a @ b, x16.astype(jnp.float32), k16.astype(jnp.float32))
    assert all(g.dtype == jnp.bfloat16 for g in got)
    for name, g, w in zip(("value", "input gradient", "kernel gradient"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2**-8,
                                   atol=2**-8 * float(jnp.abs(w).max()) / 64, err_msg=name)
    jaxpr = jax.make_jaxpr(lambda a, b: run(matmul.dense, a, b))(x16, k16)
    products = _products(jaxpr)
    assert len(products) == 3
    assert all(dtypes == (jnp.bfloat16, jnp.bfloat16) and acc == jnp.float32
               for dtypes, acc in products), products
    assert "cond[" in str(jaxpr) and "transpose" in str(jaxpr)


def test_dense_dot_general_takes_only_the_plain_product():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(matmul.dense_dot_general(a, b, batched),
                                  lax.dot_general(a, b, batched))
    plain = (((2,), (0,)), ((), ()))
    jaxpr = str(jax.make_jaxpr(lambda u, v: matmul.dense_dot_general(u, v, plain))(a, b[0]))
    assert "custom_vjp" in jaxpr


def test_dense_layer_equals_flax_and_adds_the_bias_in_float32():
    """Dense has nn.Dense's parameters, values and gradients in float32; in bf16 the output is
    bf16(x @ kernel + float32 bias), rounded once, with a float32 bias gradient."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(6, 20)), jnp.float32)
    kwargs = dict(features=7, bias_init=nn.initializers.normal(1.0))
    ours, theirs = Dense(**kwargs), nn.Dense(**kwargs)
    variables = theirs.init(jax.random.PRNGKey(0), x)
    assert (jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x))
            == jax.tree_util.tree_structure(variables))
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-6)
    probe = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
    got, want = (jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) * probe))(variables)
                 for m in (ours, theirs))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    layer = Dense(1, dtype=jnp.bfloat16)
    ones = jnp.ones((1024, 1), jnp.float32)
    # x @ kernel = 1; bias 2^-8 + 2^-20: one rounding gives 1 + 2^-7, rounding the bias to bf16
    # first (2^-8) leaves a tie that rounds to 1.0.
    params = {"kernel": jnp.ones((1, 1)), "bias": jnp.asarray([2.0**-8 + 2.0**-20])}
    y = layer.apply({"params": params}, ones)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), 1 + 2.0**-7)
    d_bias = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, ones).astype(jnp.float32)
                                        * 0.5))(params)["bias"]
    assert d_bias.dtype == jnp.float32
    np.testing.assert_array_equal(d_bias, [0.5 * 1024])


@pytest.mark.parametrize("module", ["box_head", "deconvolution"])
def test_bfloat16_heads_run_every_product_on_bf16_operands(module):
    """The bf16 box head (fc6 / fc7) and the mask head's 2x2 deconvolution, forward and
    backward: every product has bf16 operands and float32 accumulation (a plain bf16
    `nn.Dense` or einsum ran as a float32 product on XLA:CPU), within a bf16 rounding of
    float32 math."""
    from mrcnn_jax.modeling.roi_heads.box_head import TwoMLPHead

    rng = np.random.default_rng(5)
    if module == "box_head":
        x = jnp.asarray(rng.normal(size=(16, 7, 7, 32)), jnp.float32)
        head16 = TwoMLPHead(64, dtype=jnp.bfloat16, conv_impl="cpu")
        head32 = TwoMLPHead(64, conv_impl="cpu")
        variables = head32.init(jax.random.PRNGKey(0), x)
        f16 = lambda v, a: head16.apply(v, a)  # noqa: E731
        f32 = lambda v, a: head32.apply(v, a)  # noqa: E731
    else:
        x = jnp.asarray(rng.normal(size=(4, 14, 14, 32)), jnp.float32)
        variables = {"kernel": jnp.asarray(rng.normal(size=(2, 2, 32, 16)) * 0.2, jnp.float32)}
        f16 = lambda v, a: conv.conv_transpose(  # noqa: E731
            a.astype(jnp.bfloat16), v["kernel"].astype(jnp.bfloat16), (2, 2), "VALID")
        f32 = lambda v, a: lax.conv_transpose(  # noqa: E731
            a, v["kernel"], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x16 = x.astype(jnp.bfloat16).astype(jnp.float32)
    variables16 = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), variables)
    want = f32(variables16, x16)
    probe = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

    def run(f, v, a):
        y, vjp = jax.vjp(lambda p, b: f(p, b).astype(jnp.float32), v, a)
        return y, vjp(probe)

    products = _products(jax.make_jaxpr(lambda v, a: run(f16, v, a))(variables, x))
    assert products and all(dtypes == (jnp.bfloat16, jnp.bfloat16) and acc == jnp.float32
                            for dtypes, acc in products), products
    got_y, got_grads = jax.jit(lambda v, a: run(f16, v, a))(variables, x)
    want_y, want_grads = run(f32, variables16, x16)
    scale = float(jnp.abs(want_y).max())
    # one bf16 rounding per layer (two for the two-layer head)
    np.testing.assert_allclose(got_y, want_y, rtol=2**-6, atol=2**-6 * scale)
    # Each gradient as a whole (relative Frobenius norm). The deconvolution is linear: one
    # rounding. Through the head's two bf16-rounded ReLU layers units near zero switch and the
    # random probe's sums cancel: 5.6-7.4 % here, as with flax's own bf16 nn.Dense (5.9-7.6 %).
    bound = 2**-3 if module == "box_head" else 2**-7
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < bound
