"""cpu/stem_max_pool.max_pool: torch's max_pool2d values, gradients to the first maximum, by hand and
against XLA's reduce_window (flax's nn.max_pool) in both dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.cpu.stem_max_pool import max_pool

STEM = ((3, 3), (2, 2), ((1, 1), (1, 1)))  # the ResNet stem's pool


def _flax_pool(x, window, strides, pads):
    return nn.max_pool(x, window, strides=strides, padding=pads)


def test_max_pool_by_hand_with_ties():
    """One 4x4 map, 3x3 stride 2 padding 1: out[i, j] = max of rows/cols 2i-1..2i+1; on a tie
    the whole gradient goes to the first maximum in raster order (torch's kernel)."""
    x = np.array([[1, 5, 2, 0],
                  [5, 3, 5, 1],
                  [0, 4, 7, 7],
                  [2, 6, 1, 3]], np.float32)[None, :, :, None]
    for dtype in (jnp.float32, jnp.bfloat16):
        xs = jnp.asarray(x, dtype)
        out = max_pool(xs, *STEM)
        np.testing.assert_array_equal(np.asarray(out, np.float32)[0, :, :, 0],
                                      [[5, 5], [6, 7]], err_msg=str(dtype))
        d_x = jax.grad(lambda v: jnp.sum(max_pool(v, *STEM).astype(jnp.float32)
                                         * jnp.asarray([[1., 2.], [3., 4.]])[None, :, :, None]))(xs)
        # Window (0, 0), rows and cols -1..1: 5 at (0, 1) before (1, 0). Window (0, 1), rows
        # -1..1, cols 1..3: 5 at (0, 1) before (1, 2). Window (1, 0), rows 1..3, cols -1..1: 6 at
        # (3, 1). Window (1, 1), rows and cols 1..3: 7 at (2, 2) before (2, 3).
        want = np.zeros((4, 4), np.float32)
        want[0, 1] = 1 + 2
        want[3, 1] = 3
        want[2, 2] = 4
        np.testing.assert_array_equal(np.asarray(d_x, np.float32)[0, :, :, 0], want,
                                      err_msg=str(dtype))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("window, strides, pads", [
    STEM, ((2, 3), (2, 1), ((0, 1), (1, 0))), ((3, 3), (1, 1), ((1, 1), (1, 1)))])
def test_max_pool_equals_reduce_window_values_and_gradients(dtype, window, strides, pads):
    """Random maps with many ties (small integers after a relu): values and input gradients
    equal XLA's reduce_window max and its select-and-scatter gradient (in bfloat16: the float32
    one rounded once; a pixel in several windows sums their gradients in float32, in float32 to
    the rounding of that sum's order)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.integers(-3, 4, (2, 9, 11, 5)), 0), dtype)
    got = jax.jit(lambda v: max_pool(v, window, strides, pads))(x)
    want = _flax_pool(x, window, strides, pads)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # Representable in dtype: the pool's cotangent arrives in its output dtype.
    weights = jnp.asarray(rng.standard_normal(got.shape), dtype).astype(jnp.float32)

    def loss(pool):
        return lambda v: jnp.sum(pool(v, window, strides, pads).astype(jnp.float32) * weights)

    d_got = jax.jit(jax.grad(loss(max_pool)))(x)
    d_want = jax.grad(loss(_flax_pool))(x.astype(jnp.float32)).astype(dtype)
    assert d_got.dtype == x.dtype
    d_got, d_want = np.asarray(d_got, np.float32), np.asarray(d_want, np.float32)
    np.testing.assert_array_equal(d_got != 0, d_want != 0)
    # float32: a pixel's window gradients (up to 9, of both signs) summed in another order.
    tol = 1e-6 * np.abs(d_want).max() if dtype == jnp.float32 else 0
    np.testing.assert_allclose(d_got, d_want, rtol=0, atol=tol)


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (4, 1)])
def test_max_pool_of_maps_smaller_than_a_window(hw):
    """Windows that overhang the map on several sides, and taps that see only padding: the
    values and gradients still equal reduce_window's (every window holds one pixel)."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, *hw, 3)), jnp.float32)
    np.testing.assert_array_equal(max_pool(x, *STEM), _flax_pool(x, *STEM))
    d_got = jax.grad(lambda v: jnp.sum(max_pool(v, *STEM) ** 2))(x)
    d_want = jax.grad(lambda v: jnp.sum(_flax_pool(v, *STEM) ** 2))(x)
    np.testing.assert_allclose(d_got, d_want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pool_is_elementwise_not_reduce_window(dtype):
    """Neither dtype compiles to a reduce-window (XLA:CPU runs one on one thread, a bf16 one
    through float32), forward or backward (no select-and-scatter)."""
    x = jnp.zeros((1, 8, 8, 4), dtype)
    fwd = jax.jit(lambda v: max_pool(v, *STEM)).lower(x).as_text()
    bwd = jax.jit(jax.grad(lambda v: jnp.sum(max_pool(v, *STEM).astype(jnp.float32)))).lower(
        x).as_text()
    for hlo in (fwd, bwd):
        assert "reduce_window" not in hlo and "select_and_scatter" not in hlo


def test_max_pool_rejects_a_wrong_rank():
    with pytest.raises(ValueError, match=r"x must be \[batch, height, width, channels\]"):
        max_pool(jnp.zeros((8, 8, 4)), *STEM)
