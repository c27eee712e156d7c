"""The inference transform equals torchvision's GeneralizedRCNNTransform (sizes, pixels, boxes),
and mask pasting equals torchvision's paste_masks_in_image."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn_jax import transforms
from mrcnn_jax.ops.masks import expand_boxes, paste_masks_in_image


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1066)),  # 800/480 = 1.667 < 1333/640: short side -> 800, 640*1.667
        ((400, 1200), (444, 1333)),  # long side bound: 1333/1200 = 1.1108, 400*1.1108 = 444.3
        ((800, 800), (800, 800)),
        ((1000, 500), (1333, 666)),  # 800/500 = 1.6 > 1333/1000: floor(500 * 1.333) = 666
    ],
)
def test_resized_size_hand_computed(hw, expected):
    assert transforms.resized_size(*hw, 800, 1333) == expected


def test_bilinear_hand_computed():
    # Upsampling [0, 1] by 2 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75,
    # 1.25 (upper neighbour clamped) -> 0, 0.25, 0.75, 1.
    out = transforms.resize_bilinear(np.array([[0.0, 1.0]], np.float32), (1, 4))
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]], atol=1e-7)
    # Downsampling 4 -> 2 without antialiasing: sources 0.5 and 2.5 -> means of pairs.
    out = transforms.resize_bilinear(np.array([[0.0, 2.0, 4.0, 8.0]], np.float32), (1, 2))
    np.testing.assert_allclose(out, [[1.0, 6.0]], atol=1e-7)


@pytest.mark.parametrize("hw", [(37, 53), (120, 90), (64, 64)])
@pytest.mark.parametrize("min_max", [(50, 80), (200, 333)])
def test_preprocess_equals_torchvision_transform(hw, min_max):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    torch.set_num_threads(1)
    rng = np.random.default_rng(sum(hw) + min_max[0])
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tv = GeneralizedRCNNTransform(min_max[0], min_max[1], list(mean), list(std)).eval()
    with torch.no_grad():
        image_list, _ = tv([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    ours, size, original = transforms.preprocess_image(image, *min_max, mean, std)
    assert size == tuple(image_list.image_sizes[0]) and original == hw
    canvas = transforms.pad_to_canvas([ours], transforms.canvas_for([size], 32))
    ref = image_list.tensors.permute(0, 2, 3, 1).numpy()
    assert canvas.shape == ref.shape
    np.testing.assert_allclose(canvas, ref, atol=2e-6, rtol=0)


def test_canvas_pad_and_boxes_back():
    assert transforms.canvas_for([(800, 1066), (750, 1333)], 32) == (800, 1344)
    a = np.ones((2, 3, 3), np.float32)
    batch = transforms.pad_to_canvas([a, 2 * np.ones((3, 1, 3), np.float32)], (4, 4))
    assert batch.shape == (2, 4, 4, 3)
    assert batch[0].sum() == 18 and batch[1].sum() == 18 and batch[1, :3, 0].min() == 2
    with pytest.raises(ValueError, match="canvas_hw"):
        transforms.pad_to_canvas([np.zeros((5, 5, 3), np.float32)], (4, 4))
    # torchvision's ratios original / resized, in float32: 480 -> 800 means x 0.6.
    boxes = transforms.boxes_to_original(np.array([[10.0, 20.0, 100.0, 200.0]]), (800, 1066),
                                         (480, 640))
    np.testing.assert_allclose(boxes, [[10 * 640 / 1066, 12.0, 100 * 640 / 1066, 120.0]],
                               rtol=1e-6)


def test_expand_boxes_hand_computed():
    # 28 -> 30 grid: the half sizes grow by 30/28 about the centre.
    out = expand_boxes(np.array([[10.0, 20.0, 38.0, 76.0]]), 30 / 28)
    np.testing.assert_allclose(out, [[9.0, 18.0, 39.0, 78.0]], rtol=1e-6)


def test_paste_masks_equals_torchvision():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    masks = rng.random((7, 28, 28), dtype=np.float32)
    boxes = np.array([
        [10.3, 12.7, 60.2, 40.9],
        [-5.0, -8.5, 20.0, 15.0],  # sticks out at the top-left
        [70.0, 50.0, 130.0, 95.0],  # sticks out at the bottom-right
        [30.0, 30.0, 30.4, 30.2],  # sub-pixel box
        [0.0, 0.0, 99.9, 79.9],  # the whole image
        [95.0, 75.0, 99.0, 79.0],
        [5.5, 60.5, 6.5, 61.5],
    ], np.float32)
    image_hw = (80, 100)
    ours = paste_masks_in_image(masks, boxes, image_hw)
    with torch.no_grad():
        ref = tv_paste(torch.from_numpy(masks[:, None]), torch.from_numpy(boxes), image_hw)
    ref = ref[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    binary = paste_masks_in_image(masks, boxes, image_hw, threshold=0.5)
    assert binary.dtype == bool
    differs = binary != (ref > 0.5)
    assert np.all(np.abs(ref[differs] - 0.5) < 1e-6)  # only float-noise ties may differ
