"""torch's bilinear resize on the host (`ops.bilinear`): hand-computed values and the per-pixel
formula, the reference the transform, its device form and mask pasting rest on."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn_jax.ops.bilinear import resize_bilinear


def test_bilinear_hand_computed():
    # Upsampling [0, 1] by 2 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75,
    # 1.25 (upper neighbour clamped) -> 0, 0.25, 0.75, 1.
    out = resize_bilinear(np.array([[0.0, 1.0]], np.float32), (1, 4))
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]], atol=1e-7)
    # Downsampling 4 -> 2 without antialiasing: sources 0.5 and 2.5 -> means of pairs.
    out = resize_bilinear(np.array([[0.0, 2.0, 4.0, 8.0]], np.float32), (1, 2))
    np.testing.assert_allclose(out, [[1.0, 6.0]], atol=1e-7)


def _bilinear_per_pixel(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """torch's bilinear (half-pixel centres, clamped, no antialias) one output pixel at a time,
    in float64: the reference for resize_bilinear's vectorised gathers."""
    in_h, in_w = image.shape[:2]

    def source(dst: int, in_size: int, out_size: int):
        src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = int(np.floor(src))
        return i0, min(i0 + 1, in_size - 1), src - i0

    out = np.zeros(tuple(out_hw) + image.shape[2:])
    for y in range(out_hw[0]):
        y0, y1, fy = source(y, in_h, out_hw[0])
        for x in range(out_hw[1]):
            x0, x1, fx = source(x, in_w, out_hw[1])
            top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
            bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((9, 7), (20, 17)),  # enlarging: each input row interpolated once, then gathered
     ((30, 25), (11, 9)),  # shrinking past half: only the rows the output reads
     ((12, 10), (12, 10))],  # same size: the identity
)
@pytest.mark.parametrize("channels", [(), (3,)])
def test_bilinear_equals_per_pixel_formula(in_hw, out_hw, channels):
    rng = np.random.default_rng(sum(in_hw) + len(channels))
    image = rng.standard_normal(in_hw + channels).astype(np.float32)
    out = resize_bilinear(image, out_hw)
    assert out.dtype == np.float32 and out.shape == out_hw + channels
    np.testing.assert_allclose(out, _bilinear_per_pixel(image, out_hw), atol=1e-5, rtol=0)
    if out_hw == in_hw:
        np.testing.assert_array_equal(out, image)
    # Integer masks go through the same float32 arithmetic.
    mask = image > 0
    np.testing.assert_array_equal(resize_bilinear(mask, out_hw),
                                  resize_bilinear(mask.astype(np.float32), out_hw))
