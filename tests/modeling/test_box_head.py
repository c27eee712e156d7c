"""The box head's first FC layer (modeling/conv.py's `flatten_dense`): NHWC maps against a kernel
kept in torchvision's (c, h, w) row order give torch's flatten-then-Linear result, under either
`conv_impl` ("cpu" permutes the kernel's rows instead of the maps)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.roi_heads.box_head import ConvFCHead, TwoMLPHead

CONV_IMPLS = ("xla", "cpu")


class _FlattenDense(nn.Module):
    conv_impl: str

    @nn.compact
    def __call__(self, x):
        return layers.flatten_dense(self.conv_impl, 4, nn.initializers.lecun_normal(),
                                    nn.initializers.normal(1.0), jnp.float32, "fc")(x)


def _torch_order(x: np.ndarray) -> np.ndarray:
    """[n, P, P, C] NHWC maps flattened as torch flattens NCHW ones: [n, C * P * P]."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_flatten_dense_equals_a_channel_major_flatten_and_product(conv_impl):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2, 5)).astype(np.float32)  # P differs per axis: 3 x 2
    layer = _FlattenDense(conv_impl)
    params = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]["fc"]
    kernel, bias = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"])
    assert kernel.shape == (30, 4)
    want = _torch_order(x.astype(np.float64)) @ kernel + bias
    got = layer.apply({"params": {"fc": params}}, jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # gradients: d kernel = flatten(x)^T . d y in the (c, h, w) row order, d x back in NHWC
    probe = rng.normal(size=want.shape)
    d_params, d_x = jax.grad(
        lambda p, a: jnp.sum(layer.apply({"params": {"fc": p}}, a) * probe), argnums=(0, 1))(
            params, jnp.asarray(x))
    np.testing.assert_allclose(d_params["kernel"], _torch_order(x.astype(np.float64)).T @ probe,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_params["bias"], probe.sum(0), rtol=1e-5, atol=1e-5)
    d_x_chw = (probe @ kernel.T).reshape(6, 5, 3, 2)
    np.testing.assert_allclose(d_x, d_x_chw.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_flatten_in_torch_order(dtype, conv_impl):
    """TwoMLPHead's fc6 and ConvFCHead's fc1 act on the (c, h, w)-ordered flatten: permuting a
    kernel's rows by that order changes the result unless the flatten matches it."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 4, 7, 7, 8)), jnp.float32)
    head = TwoMLPHead(16, dtype=dtype, conv_impl=conv_impl)
    params = head.init(jax.random.PRNGKey(1), x)["params"]
    fc6, fc7 = params["fc6"], params["fc7"]
    flat = _torch_order(np.asarray(x, np.float64).reshape(-1, 7, 7, 8))
    hidden = np.maximum(flat @ np.asarray(fc6["kernel"], np.float64) + fc6["bias"], 0)
    want = np.maximum(hidden @ np.asarray(fc7["kernel"], np.float64) + fc7["bias"], 0)
    got = np.asarray(head.apply({"params": params}, x), np.float64).reshape(-1, 16)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -6 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == jnp.float32 else 2 ** -6,
                               atol=tol)

    conv_fc = ConvFCHead(conv_dims=(), fc_dims=(16,), dtype=dtype, conv_impl=conv_impl)
    params = conv_fc.init(jax.random.PRNGKey(2), x)["params"]
    want = np.maximum(flat @ np.asarray(params["fc1"]["kernel"], np.float64)
                      + params["fc1"]["bias"], 0)
    got = np.asarray(conv_fc.apply({"params": params}, x), np.float64).reshape(-1, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == jnp.float32 else 2 ** -6,
                               atol=1e-5 if dtype == jnp.float32 else 2 ** -6 * np.abs(want).max())


def test_conv_fc_head_without_fc_layers_returns_torch_ordered_maps():
    x = np.random.default_rng(3).normal(size=(3, 2, 5, 5, 4)).astype(np.float32)
    head = ConvFCHead(conv_dims=(), fc_dims=())
    got = head.apply(head.init(jax.random.PRNGKey(0), jnp.asarray(x)), jnp.asarray(x))
    np.testing.assert_array_equal(got.reshape(6, -1), _torch_order(x.reshape(6, 5, 5, 4)))
