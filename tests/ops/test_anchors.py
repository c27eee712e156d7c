"""FPN anchors: hand-computed base anchors and order, and live equality with torchvision's
`AnchorGenerator` (exact: every value is an integer-valued float32)."""

import numpy as np
import pytest

from mrcnn_jax import config_base
from mrcnn_jax.ops import anchors as anchor_ops

CFG = config_base.base_config().model


def test_cell_anchors_hand_computed():
    # ratio 0.5: w = 32 * sqrt(2) = 45.25, h = 22.63 -> half sizes 22.63 / 11.31 -> 23 / 11.
    base = anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0))
    np.testing.assert_array_equal(
        base, [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    )
    # Ratio-major, then size (torchvision's order with several sizes per level).
    base = anchor_ops.cell_anchors((32, 64), (1.0, 2.0))
    np.testing.assert_array_equal(
        base, [[-16, -16, 16, 16], [-32, -32, 32, 32], [-11, -23, 11, 23], [-23, -45, 23, 45]]
    )
    assert anchor_ops.num_anchors_per_location(CFG.anchor_aspect_ratios) == 3


def test_grid_order_and_strides():
    canvas = (800, 1216)
    levels = anchor_ops.anchor_grid(
        canvas, CFG.anchor_strides, CFG.anchor_sizes, CFG.anchor_aspect_ratios
    )
    sizes = anchor_ops.feature_map_sizes(canvas, CFG.anchor_strides)
    assert sizes == [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    for (h, w), a in zip(sizes, levels):
        assert a.shape == (h * w * 3, 4) and a.dtype == np.float32
    # Level 0 (stride 4), cell (y=1, x=2), ratio 1 -> index (1 * 304 + 2) * 3 + 1.
    np.testing.assert_array_equal(levels[0][(1 * 304 + 2) * 3 + 1], [-8, -12, 24, 20])
    # P6: 13 rows on an 800-pixel canvas -> torchvision's stride is 800 // 13 = 61, not 64.
    a6 = levels[4].reshape(13, 19, 3, 4)
    np.testing.assert_array_equal(a6[1, 0, 1] - a6[0, 0, 1], [0, 61, 0, 61])
    np.testing.assert_array_equal(a6[0, 1, 1] - a6[0, 0, 1], [64, 0, 64, 0])
    np.testing.assert_array_equal(a6[0, 0, 1], [-256, -256, 256, 256])


def test_value_errors():
    with pytest.raises(ValueError, match="sizes"):
        anchor_ops.anchor_grid((64, 64), (4, 8), (32,), (1.0,))
    with pytest.raises(ValueError, match="canvas_hw"):
        anchor_ops.anchor_grid((64,), (4,), (32,), (1.0,))
    with pytest.raises(ValueError, match="grid_sizes"):
        anchor_ops.anchor_grid((64, 64), (4,), (32,), (1.0,), grid_sizes=[(16, 16), (8, 8)])


@pytest.mark.parity
@pytest.mark.parametrize("canvas", [(800, 1216), (1344, 1344), (224, 96)])
def test_live_torchvision_anchor_generator(canvas):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    torch.set_num_threads(1)
    ratios = CFG.anchor_aspect_ratios
    gen = AnchorGenerator(
        tuple((s,) for s in CFG.anchor_sizes), (tuple(ratios),) * len(CFG.anchor_sizes)
    )
    sizes = anchor_ops.feature_map_sizes(canvas, CFG.anchor_strides)
    images = ImageList(torch.zeros(1, 1, *canvas), [canvas])
    feats = [torch.zeros(1, 1, h, w) for h, w in sizes]
    ref = gen(images, feats)[0].numpy()
    ours = anchor_ops.anchor_grid(canvas, CFG.anchor_strides, CFG.anchor_sizes, ratios)
    np.testing.assert_array_equal(np.concatenate(ours), ref)
    # Per-level counts agree with torchvision's num_anchors_per_location.
    assert gen.num_anchors_per_location() == [
        anchor_ops.num_anchors_per_location(ratios)
    ] * len(sizes)
