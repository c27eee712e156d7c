"""cpu/conv.py: the per-tap and Winograd forms equal XLA's convolution for every convolution the
model uses; each form is chosen from the shapes, or forced with `ConvForms`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mrcnn_jax.cpu import conv
from mrcnn_jax.cpu import layers as cpu_layers

NHWC = ("NHWC", "HWIO", "NHWC")

# (input [n, h, w, in], kernel [kh, kw, in/groups, out], strides, padding, groups): the stem,
# bottleneck 1x1/3x3 (stride 1 and 2, ResNeXt groups), FPN/head 3x3, odd sizes, string padding.
CASES = [
    ((2, 17, 23, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), 1),
    ((2, 12, 10, 8), (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0)), 1),
    ((1, 13, 11, 8), (1, 1, 8, 16), (2, 2), ((0, 0), (0, 0)), 1),
    ((2, 15, 9, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), 1),
    ((2, 15, 9, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 1)), 1),
    ((2, 14, 14, 16), (3, 3, 4, 16), (1, 1), ((1, 1), (1, 1)), 4),
    ((1, 11, 9, 16), (3, 3, 2, 32), (2, 2), ((1, 1), (1, 1)), 8),
    ((3, 9, 8, 5), (3, 3, 5, 6), (1, 1), "SAME", 1),
    ((3, 9, 8, 5), (3, 3, 5, 6), (2, 2), "VALID", 1),
    ((2, 10, 9, 4), (3, 3, 4, 5), (1, 1), ((0, 2), (2, 0)), 1),  # asymmetric padding
    ((2, 8, 7, 3), (2, 2, 3, 4), (1, 1), "VALID", 1),  # even kernel
    ((2, 8, 7, 3), (5, 3, 3, 4), (1, 1), ((2, 2), (1, 1)), 1),  # non-square kernel
    ((1, 10, 11, 3), (2, 2, 3, 4), (3, 3), ((0, 1), (1, 0)), 1),  # phases no tap reaches
    ((2, 9, 12, 4), (4, 3, 4, 5), (2, 1), ((1, 2), (1, 1)), 1),  # mixed strides
    ((1, 16, 16, 6), (3, 3, 6, 4), (2, 2), ((0, 1), (0, 1)), 1),  # TF-style SAME
]


def _loss(conv_fn, x, kernel, strides, padding, groups, probe):
    y = conv_fn(x, kernel, strides, padding, dimension_numbers=NHWC, feature_group_count=groups)
    return jnp.sum(y.astype(jnp.float32) * probe)


@pytest.mark.parametrize("kernel_grad", ["taps", "winograd"])
@pytest.mark.parametrize("x_shape,k_shape,strides,padding,groups", CASES)
def test_value_and_both_gradients_equal_xla(x_shape, k_shape, strides, padding, groups,
                                            kernel_grad):
    """float32: the kernel gradient per tap, or (stride-1 3x3 ungrouped cases, forced) by
    Winograd's transforms, equals XLA's to float32 rounding."""
    conv_fn = functools.partial(conv.conv_general_dilated,
                                forms=conv.ConvForms(f32_kernel_grad=kernel_grad))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=NHWC, feature_group_count=groups)).shape
    probe = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    args = (strides, padding, groups, probe)
    want_value, want = jax.value_and_grad(
        lambda a, b: _loss(lax.conv_general_dilated, a, b, *args), argnums=(0, 1))(x, kernel)
    got_value, got = jax.jit(jax.value_and_grad(
        lambda a, b: _loss(conv_fn, a, b, *args), argnums=(0, 1)))(x, kernel)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    if groups == 1:  # the flipped kernel, the phase convolutions or the 1x1 matrix product
        scale = np.abs(np.asarray(want[0])).max()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6 * scale)
    else:
        np.testing.assert_array_equal(got[0], want[0])  # XLA's own input gradient
    scale = np.abs(np.asarray(want[1])).max()
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5 * scale)


def test_stride1_input_gradient_by_hand():
    """1 x 2 kernel [a, b] along the width, no padding: y[j] = a x[j] + b x[j + 1], so
    d x[j] = a d y[j] + b d y[j - 1] (each term where it exists)."""
    kernel = jnp.asarray([2.0, 3.0]).reshape(1, 2, 1, 1)
    d_out = jnp.asarray([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1)
    got = conv.input_grad_by_flipped_kernel(d_out, kernel, ((0, 0), (0, 0)))
    np.testing.assert_array_equal(got.reshape(4), [2.0, 3.0 + 20.0, 30.0 + 200.0, 300.0])


def test_kernel_gradient_by_hand():
    """1x1 kernel, one input channel: d kernel = sum over pixels of x * d_out."""
    x = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4, 1)
    d_out = jnp.ones((1, 3, 4, 2), jnp.float32).at[..., 1].set(2.0)
    got = conv.kernel_grad_by_taps(x, d_out, (1, 1, 1, 2), (1, 1), ((0, 0), (0, 0)))
    np.testing.assert_array_equal(got.reshape(2), [66.0, 132.0])  # 0+1+...+11 = 66


def test_bfloat16_kernel_gradient_close_to_float32():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, 16, 32)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 32, 32)).astype(np.float32) * 0.1
    probe = rng.normal(size=(2, 16, 16, 32)).astype(np.float32)
    grad = jax.grad(lambda k, a: _loss(conv.conv_general_dilated, a, k, (1, 1), "SAME", 1,
                                       probe), argnums=0)
    want = grad(jnp.asarray(kernel), jnp.asarray(x))
    got = grad(jnp.asarray(kernel, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    # bf16 inputs (8-bit mantissa) summed in float32 over 512 products per element.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05,
                               atol=0.02 * np.abs(np.asarray(want)).max())


def test_fallbacks_are_lax_itself_and_forms_are_checked():
    """A dilated convolution is XLA's own, gradient included; an unknown form is refused."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
    f = lambda k: jnp.sum(conv.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=NHWC, rhs_dilation=(2, 2)) ** 2)
    g = lambda k: jnp.sum(lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=NHWC, rhs_dilation=(2, 2)) ** 2)
    np.testing.assert_array_equal(jax.grad(f)(kernel), jax.grad(g)(kernel))
    with pytest.raises(ValueError, match="ConvForms.f32_kernel_grad='fast'"):
        conv.ConvForms(f32_kernel_grad="fast")


@pytest.mark.parametrize("kernel_size,strides,padding", [
    ((2, 2), (2, 2), "VALID"),          # the mask head's deconvolution (one matrix product)
    ((4, 4), (2, 2), ((2, 2), (2, 2))),  # the keypoint head's (torch k=4, s=2, p=1)
    ((3, 3), (2, 2), "SAME"),
    ((3, 3), (2, 2), "VALID"),
    ((2, 3), (1, 2), ((1, 0), (0, 2))),
])
def test_conv_transpose_equals_flax_values_and_gradients(kernel_size, strides, padding):
    import flax.linen as nn

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 7, 6, 5)), jnp.float32)
    kwargs = dict(features=4, kernel_size=kernel_size, strides=strides, padding=padding,
                  bias_init=nn.initializers.normal(1.0))
    ours, theirs = cpu_layers.ConvTranspose(**kwargs), nn.ConvTranspose(**kwargs)
    variables = theirs.init(jax.random.PRNGKey(0), x)
    assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(0), x))
            == jax.tree_util.tree_map(jnp.shape, variables))
    want_y = theirs.apply(variables, x)
    probe = jnp.asarray(rng.normal(size=want_y.shape), jnp.float32)

    def loss(module):
        return lambda v, a: jnp.sum(module.apply(v, a) * probe)

    np.testing.assert_allclose(ours.apply(variables, x), want_y, rtol=1e-5, atol=1e-5)
    want = jax.grad(loss(theirs), argnums=(0, 1))(variables, x)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_nonoverlapping_deconvolution_by_hand():
    """Kernel 2, stride 2, one channel: each input pixel becomes its 2x2 block times the kernel,
    in lax.conv_transpose's (unflipped-kernel) orientation: offset (a, b) takes kernel[1-a, 1-b]."""
    x = jnp.array([[1.0, 2.0]]).reshape(1, 1, 2, 1)
    kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    y = conv.conv_transpose(x, kernel, (2, 2), "VALID")
    np.testing.assert_array_equal(y[0, :, :, 0], [[4.0, 3.0, 8.0, 6.0], [2.0, 1.0, 4.0, 2.0]])
    np.testing.assert_array_equal(
        y, lax.conv_transpose(x, kernel, (2, 2), "VALID", dimension_numbers=NHWC))


def test_flax_layer_uses_the_tap_gradient():
    """flax's nn.Conv passes ConvDimensionNumbers of axis indices, not strings: the CPU Conv
    must still take the per-tap path (its gradient has the tap GEMMs, XLA's has no dot)."""
    import flax.linen as nn

    x = jnp.ones((1, 8, 8, 4))
    for layer, products in ((cpu_layers.Conv(4, (3, 3), padding=1), 9),  # one per tap
                            (nn.Conv(4, (3, 3), padding=1), 0)):
        variables = layer.init(jax.random.PRNGKey(0), x)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(layer.apply(v, x))))(variables))
        assert jaxpr.count("dot_general[") == products


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_bfloat16_layers_add_the_bias_in_float32(layer):
    """bf16 Conv / ConvTranspose: output = bf16(conv + float32 bias), rounded once, and the bias
    gradient is the float32 sum of the cotangent over every pixel."""
    cls = getattr(cpu_layers, layer)
    x = jnp.ones((1, 32, 32, 1), jnp.float32)
    module = cls(1, (1, 1), dtype=jnp.bfloat16)
    variables = module.init(jax.random.PRNGKey(0), x)
    # conv output 1.0 everywhere; bias 2^-8 + 2^-20: 1 + bias rounds up to 1 + 2^-7 in one
    # rounding, while rounding the bias to bf16 first (2^-8) leaves a tie that rounds to 1.0.
    params = {"kernel": jnp.ones((1, 1, 1, 1)), "bias": jnp.asarray([2.0**-8 + 2.0**-20])}
    y = module.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), 1 + 2.0**-7)
    d_bias = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x).astype(jnp.float32)
                                        * 0.5))(params)["bias"]
    assert d_bias.dtype == jnp.float32
    np.testing.assert_array_equal(d_bias, [0.5 * 32 * 32])
    assert jax.tree_util.tree_structure(variables["params"]) == jax.tree_util.tree_structure(
        params)


def test_pointwise_convolution_is_a_matrix_product_by_hand():
    """A 1x1 stride-2 convolution: out[i, j] = x[2i, 2j] @ kernel; the input gradient is
    d out @ kernel^T on the even pixels and exactly zero on the skipped ones."""
    x = jnp.arange(1 * 3 * 4 * 2, dtype=jnp.float32).reshape(1, 3, 4, 2)
    kernel = jnp.asarray([[[[1.0, -1.0, 2.0], [0.5, 0.0, 1.0]]]])  # [1, 1, 2, 3]
    f = lambda a, k: conv.conv_general_dilated(  # noqa: E731
        a, k, (2, 2), "VALID", dimension_numbers=NHWC)
    y = f(x, kernel)
    # pixels (0,0), (0,2), (2,0), (2,2) hold channel pairs (0,1), (4,5), (16,17), (20,21)
    want = np.array([[[0.5, 0.0, 1.0], [6.5, -4.0, 13.0]],
                     [[24.5, -16.0, 49.0], [30.5, -20.0, 61.0]]])
    np.testing.assert_array_equal(y[0], want)
    d_x, d_k = jax.grad(lambda a, k: jnp.sum(f(a, k)), argnums=(0, 1))(x, kernel)
    d_x_want = np.zeros((3, 4, 2), np.float32)
    d_x_want[::2, ::2] = [2.0, 1.5]  # each kept pixel: the kernel's row sums
    np.testing.assert_array_equal(d_x[0], d_x_want)
    np.testing.assert_array_equal(d_k[0, 0], np.repeat([[40.0], [44.0]], 3, axis=1))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, k: jnp.sum(f(a, k)), argnums=(0, 1)))(x, kernel))
    assert "conv_general_dilated" not in jaxpr


def test_bfloat16_pointwise_convolution_accumulates_in_float32():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 6, 5, 256)).astype(np.float32)
    kernel = rng.normal(size=(1, 1, 256, 8)).astype(np.float32) * 0.1
    x16, k16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    y = conv.conv_general_dilated(x16, k16, (1, 1), "VALID", dimension_numbers=NHWC)
    assert y.dtype == jnp.bfloat16
    # the float32 sum of the bf16 products, rounded once to bf16: within one bf16 step (2^-7)
    # of the exact sum, where a bf16 running sum over 256 terms drifts by several.
    want = np.einsum("nhwc,co->nhwo", np.asarray(x16, np.float32),
                     np.asarray(k16[0, 0], np.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("forward", ["taps", "winograd"])
@pytest.mark.parametrize("kernel_hw", [3, 1])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_bfloat16_value_and_gradients_accumulate_in_float32(strides, kernel_hw, forward):
    """bf16 convolutions (forward, every input gradient's phase convolutions, and the kernel
    gradient's per-tap products of the transposed input) are float32-accumulated products:
    within a bf16 rounding of float32 math on the same bf16 inputs (Winograd's transformed
    operands, in the forward and both gradients, add a rounding each: within two)."""
    if forward == "winograd" and (strides, kernel_hw) != ((1, 1), 3):
        pytest.skip("Winograd is the form of stride-1 3x3 convolutions only")
    conv_fn = functools.partial(conv.conv_general_dilated,
                                forms=conv.ConvForms(bf16_forward=forward))
    rng = np.random.default_rng(4)
    x16 = jnp.asarray(rng.normal(size=(2, 12, 10, 64)), jnp.bfloat16)
    k16 = jnp.asarray(rng.normal(size=(kernel_hw, kernel_hw, 64, 32)) * 0.1, jnp.bfloat16)
    x32, k32 = x16.astype(jnp.float32), k16.astype(jnp.float32)
    pads = ((kernel_hw // 2,) * 2,) * 2
    probe = jnp.asarray(rng.normal(size=(2, 12 // strides[0], 10 // strides[1], 32)),
                        jnp.bfloat16)

    def run(fn, x, k):
        y, vjp = jax.vjp(lambda a, b: fn(a, b, strides, pads, dimension_numbers=NHWC), x, k)
        return (y, *vjp(probe.astype(y.dtype)))

    got = jax.jit(lambda a, b: run(conv_fn, a, b))(x16, k16)
    want = run(lax.conv_general_dilated, x32, k32)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    for name, g, w in zip(("value", "input gradient", "kernel gradient"), got, want):
        scale = float(jnp.abs(w).max())
        if forward == "winograd":
            # The transformed tiles' rounding is relative to the tile, not to each output
            # (outputs near zero by cancellation keep it): within two roundings of the largest.
            np.testing.assert_array_less(np.abs(np.asarray(g, np.float32) - w), 2**-6 * scale,
                                         err_msg=name)
        else:
            np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2**-7,
                                       atol=2**-7 * scale / 64, err_msg=name)
    # The kernel gradient contracts the transposed input, materialised in a conditional.
    grad_jaxpr = str(jax.make_jaxpr(lambda a, b: run(conv_fn, a, b))(x16, k16))
    assert "cond[" in grad_jaxpr and "transpose" in grad_jaxpr
    if strides == (1, 1) and kernel_hw == 3:
        jaxpr = str(jax.make_jaxpr(lambda a: conv_fn(
            a, k16, strides, "SAME", dimension_numbers=NHWC))(x16))
        # 9 tap products, or Winograd's 16 products and the kernel transform's einsum
        products = {"taps": 9, "winograd": 16 + 2}[forward]
        assert "conv_general_dilated" not in jaxpr and jaxpr.count("dot_general") == products


@pytest.mark.parametrize("x_shape,pads", [
    ((2, 15, 9, 16), ((1, 1), (1, 1))),   # odd output height: a padded tile row, cropped
    ((1, 10, 9, 4), ((0, 2), (2, 0))),    # asymmetric padding
    ((3, 8, 8, 5), ((0, 0), (0, 0))),     # "VALID"
    ((1, 4, 3, 2), ((1, 1), (0, 1))),     # a single tile column
])
def test_winograd_equals_the_convolution(x_shape, pads):
    """F(2x2, 3x3) is exact algebra: in float32 it equals XLA's convolution to float32 rounding;
    in bfloat16 (transformed operands rounded once each) within two bf16 roundings of the output's
    magnitude, ~2x the per-tap products' error."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=x_shape).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, x_shape[-1], 6)) * 0.2).astype(np.float32)
    want = lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=NHWC,
                                    precision=lax.Precision.HIGHEST)
    got = conv.conv3x3_winograd(jnp.asarray(x), jnp.asarray(kernel), pads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    x16, k16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    want16 = lax.conv_general_dilated(x16.astype(jnp.float32), k16.astype(jnp.float32), (1, 1),
                                      pads, dimension_numbers=NHWC,
                                      precision=lax.Precision.HIGHEST)
    got16 = conv.conv3x3_winograd(x16, k16, pads)
    assert got16.dtype == jnp.bfloat16
    scale = float(np.abs(want16).max())
    error = np.abs(np.asarray(got16, np.float32) - want16).max()
    assert 0 < error <= 2 * 2**-7 * scale, (error, scale)


@pytest.mark.parametrize("x_shape,pads", [
    ((2, 15, 9, 16), ((1, 1), (1, 1))),
    ((1, 10, 9, 4), ((0, 2), (2, 0))),
    ((3, 8, 8, 5), ((0, 0), (0, 0))),
])
def test_winograd_kernel_gradient_equals_xla(x_shape, pads):
    """G^T [sum over tiles (B^T d B) * (A dy A^T)] G is XLA's kernel gradient: to float32
    rounding in float32, within two bf16 roundings of its magnitude in bfloat16; F(4x4, 3x3)'s
    (float32 only) within 3e-5 (the outputs past the convolution's, in the last tiles, get zero
    gradient)."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=x_shape).astype(np.float32)
    kernel = rng.normal(size=(3, 3, x_shape[-1], 6)).astype(np.float32)
    out = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, kernel, (1, 1), pads, dimension_numbers=NHWC)).shape
    d_out = rng.normal(size=out).astype(np.float32)
    for dtype, bound in ((jnp.float32, 1e-5), (jnp.bfloat16, 2 * 2**-7)):
        xd, dd = jnp.asarray(x, dtype), jnp.asarray(d_out, dtype)
        _, vjp = jax.vjp(lambda k, a=xd: lax.conv_general_dilated(
            a.astype(jnp.float32), k, (1, 1), pads, dimension_numbers=NHWC,
            precision=lax.Precision.HIGHEST), jnp.asarray(kernel))
        (want,) = vjp(dd.astype(jnp.float32))
        got = conv.kernel_grad_winograd(xd, dd, pads)
        assert got.dtype == jnp.float32
        error, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
        assert error <= bound * scale, (dtype, error, scale)
        if dtype == jnp.float32:
            got4 = conv.kernel_grad_winograd4(xd, dd, pads)
            assert float(jnp.abs(got4 - want).max()) <= 3e-5 * scale


def test_winograd_by_hand():
    """One 2x2 output tile of a 4x4 single-channel input: each output the sum of its 3x3 window
    times the kernel, for a kernel whose transform G g G^T has halves and quarters."""
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    kernel = jnp.asarray([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]).reshape(3, 3, 1, 1)
    y = conv.conv3x3_winograd(x, kernel, ((0, 0), (0, 0)))
    # window at (0, 0): rows [0 1 2], [4 5 6], [8 9 10] -> 0 - 2 + 8 + 5 + 27 + 10 = 48; one
    # column right every pixel is 1 more: + sum(kernel) = 7; one row down 4 more: + 28
    np.testing.assert_allclose(y[0, :, :, 0], [[48.0, 55.0], [76.0, 83.0]], rtol=1e-6)


@pytest.mark.parametrize("x_shape,pads", [
    ((2, 15, 9, 16), ((1, 1), (1, 1))),   # 15 x 9 outputs: partial tiles, cropped
    ((1, 10, 9, 4), ((0, 2), (2, 0))),    # asymmetric padding
    ((3, 8, 8, 5), ((0, 0), (0, 0))),     # "VALID": one 4x4 tile of 6 x 6 outputs used whole
    ((1, 3, 3, 2), ((1, 1), (0, 1))),     # a single tile, 3 x 2 outputs of it
])
def test_winograd4_equals_the_convolution(x_shape, pads):
    """F(4x4, 3x3) is exact algebra: it equals XLA's float32 convolution within 3e-5 of the
    output's magnitude (its transforms' constants, up to 8 and down to 1/24, amplify rounding
    more than F(2x2, 3x3)'s 1e-5)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=x_shape).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, x_shape[-1], 6)) * 0.2).astype(np.float32)
    want = np.asarray(lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=NHWC,
                                               precision=lax.Precision.HIGHEST))
    got = np.asarray(jax.jit(lambda a, b: conv.conv3x3_winograd4(a, b, pads))(x, kernel))
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 3e-5 * scale, (np.abs(got - want).max(), scale)


def test_winograd4_by_hand():
    """One 4x4 output tile of a 6x6 single-channel input, pixel values 0..35 row by row."""
    x = jnp.arange(36, dtype=jnp.float32).reshape(1, 6, 6, 1)
    kernel = jnp.asarray([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]).reshape(3, 3, 1, 1)
    y = conv.conv3x3_winograd4(x, kernel, ((0, 0), (0, 0)))
    # window at (0, 0): rows [0 1 2], [6 7 8], [12 13 14] -> 0 - 2 + 12 + 7 + 39 + 14 = 70; one
    # column right every pixel is 1 more: + sum(kernel) = 7; one row down 6 more: + 42
    want = 70.0 + 7.0 * np.arange(4)[None, :] + 42.0 * np.arange(4)[:, None]
    np.testing.assert_allclose(y[0, :, :, 0], want, rtol=2e-6)


@pytest.mark.parametrize("x_shape,pads", [
    ((2, 15, 9, 16), ((1, 1), (1, 1))),
    ((2, 10, 9, 4), ((0, 2), (2, 0))),
])
def test_f32_winograd4_value_and_gradients_equal_xla(x_shape, pads):
    """Forced, the float32 forward, input gradient (the flipped kernel's forward) and kernel
    gradient are F(4x4, 3x3)'s with no convolution left, within 3e-5 of XLA's."""
    conv_fn = functools.partial(conv.conv_general_dilated, forms=conv.ConvForms(
        f32_forward="winograd", f32_kernel_grad="winograd4"))
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, x_shape[-1], 5)), jnp.float32)
    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, kernel, (1, 1), pads, dimension_numbers=NHWC)).shape
    probe = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    args = ((1, 1), pads, 1, probe)
    want_value, want = jax.value_and_grad(
        lambda a, b: _loss(lax.conv_general_dilated, a, b, *args), argnums=(0, 1))(x, kernel)
    fn = jax.value_and_grad(lambda a, b: _loss(conv_fn, a, b, *args), argnums=(0, 1))
    got_value, got = jax.jit(fn)(x, kernel)
    for g, w in ((got_value, want_value), *zip(got, want)):
        scale = float(np.abs(np.asarray(w)).max())
        assert float(np.abs(np.asarray(g) - np.asarray(w)).max()) <= 3e-5 * scale
    jaxpr = str(jax.make_jaxpr(fn)(x, kernel))
    assert "conv_general_dilated" not in jaxpr


def test_f32_winograd4_image_by_image_equals_the_whole_batch(monkeypatch):
    """Over WINOGRAD4_PER_IMAGE_BYTES (P2's 256-channel convolutions at 800 x 1216) a batch is
    transformed one image at a time, forward and backward: the same values and gradients as the
    whole batch at once up to float32 rounding (the products blocked and the kernel gradient
    summed in another order; F(4x4, 3x3) itself is within 3e-5 of XLA), through a loop."""
    assert conv._one_image_at_a_time(2, 50 * 76, 256)  # P2, 800 x 1216, batch 2
    assert not conv._one_image_at_a_time(1, 50 * 76, 256)  # one image: nothing to split
    assert not conv._one_image_at_a_time(8, 25 * 38, 256)  # P3
    conv_fn = functools.partial(conv.conv_general_dilated, forms=conv.ConvForms(
        f32_forward="winograd", f32_kernel_grad="winograd4"))
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(3, 13, 10, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 6)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(3, 13, 10, 6)), jnp.float32)
    args = ((1, 1), ((1, 1), (1, 1)), 1, probe)

    def value_and_grads():
        fn = jax.value_and_grad(lambda a, b: _loss(conv_fn, a, b, *args), argnums=(0, 1))
        return jax.jit(fn)(x, kernel), str(jax.make_jaxpr(fn)(x, kernel))

    (want_value, want), whole_jaxpr = value_and_grads()
    monkeypatch.setattr(conv, "WINOGRAD4_PER_IMAGE_BYTES", 1)
    (got_value, got), jaxpr = value_and_grads()
    assert "scan" not in whole_jaxpr and jaxpr.count("scan[") >= 3  # forward, both gradients
    for g, w in ((got_value, want_value), *zip(got, want)):
        scale = float(np.abs(np.asarray(w)).max())
        assert float(np.abs(np.asarray(g) - np.asarray(w)).max()) <= 1e-5 * scale


def test_f32_forward_form_by_channels_and_tiles():
    """auto: F(4x4, 3x3) for a float32 3x3 kernel with >= 128 in and out channels over >= 128
    4x4 output tiles, XLA's convolution otherwise; a forced form holds for 3x3 kernels."""
    _assert_forms(conv.f32_forward_impl, {
        None: [((2, 200, 304, 256), (3, 3, 256, 256), "winograd"),
               ((2, 32, 32, 128), (3, 3, 128, 128), "winograd"),  # 2 x 8 x 8 tiles
               ((2, 28, 32, 128), (3, 3, 128, 128), "xla"),  # 2 x 7 x 8
               ((2, 200, 304, 64), (3, 3, 64, 64), "xla"),  # layer1's channels
               ((2, 200, 304, 256), (3, 3, 256, 64), "xla"),
               ((2, 200, 304, 256), (1, 1, 256, 256), "xla")],
        "winograd": [((1, 4, 4, 2), (3, 3, 2, 2), "winograd"),
                     ((1, 4, 4, 2), (1, 1, 2, 2), "xla")],
        "xla": [((2, 200, 304, 256), (3, 3, 256, 256), "xla")],
    })


def test_bf16_forward_form_by_tiles():
    """auto: Winograd for a 3x3 kernel with >= WINOGRAD_MIN_TILES 2x2 output tiles, per-tap
    products below that and for other kernels; a forced form holds for 3x3 kernels."""
    _assert_forms(conv.bf16_forward_impl, {
        None: [((2, 200, 304, 256), (3, 3, 256, 256), "winograd"),
               ((1, 64, 64, 8), (3, 3, 8, 8), "winograd"),  # 32 x 32 tiles
               ((1, 62, 62, 8), (3, 3, 8, 8), "taps"),  # 31 x 31
               ((16, 14, 14, 256), (3, 3, 256, 256), "taps"),  # 784
               ((2, 200, 304, 256), (5, 5, 256, 256), "taps")],
        "winograd": [((1, 4, 4, 2), (3, 3, 2, 2), "winograd"),
                     ((1, 4, 4, 2), (1, 1, 2, 2), "taps")],
        "taps": [((2, 200, 304, 256), (3, 3, 256, 256), "taps")],
    })


def _assert_forms(impl, cases_by_setting):
    """impl(x_shape, kernel_shape, SAME pads, choice) for each choice (None: "auto")."""
    same = ((1, 1), (1, 1))
    for setting, cases in cases_by_setting.items():
        for x_shape, kernel_shape, want in cases:
            got = impl(x_shape, kernel_shape, same, setting or "auto")
            assert got == want, (setting, x_shape, kernel_shape)


def test_f32_kernel_gradient_form_by_tiles():
    """auto: a float32 stride-1 3x3 kernel gradient is F(4x4, 3x3)'s where the forward is,
    else F(2x2, 3x3)'s over >= WINOGRAD_MIN_TILES_F32_KERNEL_GRAD output tiles (16 products, then
    G^T . G), per-tap (9 products) below that; a forced form holds for 3x3 kernels; with few
    channels the float32 forward and input gradient stay XLA's convolutions."""
    _assert_forms(conv.f32_kernel_grad_impl, {
        None: [((2, 25, 38, 512), (3, 3, 512, 512), "winograd4"),  # as the forward
               ((2, 200, 304, 64), (3, 3, 64, 64), "winograd"),
               ((1, 32, 32, 8), (3, 3, 8, 8), "winograd"),  # 256 tiles
               ((1, 30, 30, 8), (3, 3, 8, 8), "taps"),  # 225
               ((2, 200, 304, 8), (5, 5, 8, 8), "taps")],
        "winograd": [((1, 4, 4, 2), (3, 3, 2, 2), "winograd"),
                     ((2, 200, 304, 256), (3, 3, 256, 256), "winograd")],
        "winograd4": [((1, 4, 4, 2), (3, 3, 2, 2), "winograd4"),
                      ((1, 4, 4, 2), (1, 1, 2, 2), "taps")],
        "taps": [((2, 200, 304, 8), (3, 3, 8, 8), "taps")],
    })

    def grad_products(x_shape):
        x = jnp.ones(x_shape, jnp.float32)
        kernel = jnp.ones((3, 3, x_shape[-1], 4), jnp.float32)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: conv.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=NHWC).sum()))(kernel))
        return jaxpr.count("dot_general"), jaxpr.count("conv_general_dilated")

    # forward and input gradient: XLA's convolutions; kernel gradient: 16 + the einsum's 2 / 9
    assert grad_products((1, 32, 32, 3)) == (16 + 2, 2)
    assert grad_products((1, 30, 30, 3)) == (9, 2)
