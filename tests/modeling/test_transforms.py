"""The inference transform equals torchvision's GeneralizedRCNNTransform (sizes, pixels, boxes),
and mask pasting equals torchvision's paste_masks_in_image."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn_jax import transforms
from mrcnn_jax.ops import image_resize
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


@pytest.mark.parametrize("hw", [(37, 53), (120, 90), (64, 64), (200, 150)])
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
    canvas_hw = transforms.canvas_for([size], 32)
    canvas = transforms.pad_to_canvas([ours], canvas_hw)
    ref = image_list.tensors.permute(0, 2, 3, 1).numpy()
    assert canvas.shape == ref.shape
    np.testing.assert_allclose(canvas, ref, atol=2e-6, rtol=0)
    # The device form the Predictor runs, from the uint8 pixels in a larger raw bucket.
    raw = np.zeros((1, hw[0] + 5, hw[1] + 9, 3), np.uint8)
    raw[0, : hw[0], : hw[1]] = image
    rows, cols = ([a[None] for a in image_resize.axis_taps(hw[k], size[k], canvas_hw[k])]
                  for k in (0, 1))
    on_device = np.asarray(image_resize.normalize_resize_pad(raw, rows, cols, mean, std))
    np.testing.assert_allclose(on_device, ref, atol=2e-6, rtol=0)


def test_axis_taps_hand_computed():
    # 2 -> 4 (the upsampling case above) on a canvas of 6: two padding entries of weight 0.
    i0, i1, w0, w1 = image_resize.axis_taps(2, 4, 6)
    np.testing.assert_array_equal(i0, [0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(i1, [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(w1, [0.0, 0.25, 0.75, 0.25, 0, 0], atol=1e-7)
    np.testing.assert_allclose(w0 + w1, [1, 1, 1, 1, 0, 0], atol=1e-7)
    with pytest.raises(ValueError, match="resized size 7 does not fit the canvas size 6"):
        image_resize.axis_taps(2, 7, 6)


def test_device_transform_equals_host_on_a_mixed_batch():
    """uint8 and float images of different sizes in one raw batch: each image's canvas equals
    the host transform's (float32 rounding), and the padding is exactly zero."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
              rng.random((30, 50, 3)).astype(np.float32),
              rng.integers(0, 256, (41, 33, 3), dtype=np.uint8)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = [transforms.preprocess_image(im, 80, 133, mean, std) for im in images]
    sizes = [q[1] for q in pre]
    canvas_hw = transforms.canvas_for(sizes, 32)
    host = transforms.pad_to_canvas([q[0] for q in pre], canvas_hw)
    raw = np.zeros((3, 64, 64, 3), np.float32)
    for i, im in enumerate(images):
        raw[i, : im.shape[0], : im.shape[1]] = transforms.to_float_image(im)
    rows, cols = ([np.stack(t) for t in zip(*[image_resize.axis_taps(im.shape[k], s[k],
                                                                     canvas_hw[k])
                                              for im, s in zip(images, sizes)])]
                  for k in (0, 1))
    device = np.asarray(image_resize.normalize_resize_pad(raw, rows, cols, mean, std))
    np.testing.assert_allclose(device, host, atol=2e-6, rtol=0)
    for i, (h, w) in enumerate(sizes):
        assert not device[i, h:].any() and not device[i, :, w:].any()
        assert device[i, h - 1, :w].any() and device[i, :h, w - 1].any()  # last row / column


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
