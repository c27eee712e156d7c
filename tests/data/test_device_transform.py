"""The training image's transform on the device: the host's torch taps in the tf.data graph equal
numpy's bit for bit, and uint8 pixels + taps give the eval pipeline's normalised canvas (so the
torchvision parity of `preprocess_example` carries over to training)."""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import device_transform, input_pipeline as ip
from mrcnn_jax.ops import image_resize
from tests.data.test_input_pipeline import _examples

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# tf.image.resize (the eval pipeline) against torch's taps (the device): float32 rounding.
CANVAS_ATOL = 2e-5


def test_tf_taps_equal_torch_taps_bit_for_bit():
    rng = np.random.default_rng(0)
    cases = [(480, 800), (640, 1066), (1500, 444), (1, 800), (7, 3)]
    cases += list(zip(rng.integers(1, 2000, 150).tolist(), rng.integers(1, 1400, 150).tolist()))
    for in_size, out_size in cases:
        index, weight = ip._tf_axis_taps(tf.constant(in_size), tf.constant(out_size))
        want = image_resize.axis_taps(in_size, out_size, out_size)
        for got, ref in zip((index[:, 0], index[:, 1], weight[:, 0], weight[:, 1]), want):
            np.testing.assert_array_equal(got.numpy(), ref, err_msg=(in_size, out_size))


def _device_canvas(raw, d):
    """One train example (unpadded) -> the train stream's padded batch of 1 -> the device."""
    example = {k: v for k, v in raw.items() if not k.startswith("_")}
    batch = next(iter(tf.data.Dataset.from_tensors(example).padded_batch(
        1, padded_shapes=ip._train_padded_shapes(d, None)).as_numpy_iterator()))
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape[1:3] == ip.raw_canvas_size(d)
    return np.asarray(device_transform.canvas_batch(batch, MEAN, STD)["image"][0])


def _compare(shapes_cfg, shapes_builder, atol):
    d = shapes_cfg.data
    kflip = None
    worst, checked = 0.0, 0
    for ex in _examples(shapes_builder, "train", 6):
        for flip in (False, True):
            want = ip.preprocess_example(ex, tf.constant(flip), d, kflip)
            raw = ip.preprocess_example(ex, tf.constant(flip), d, kflip, raw_image=True)
            got = _device_canvas(raw, d)
            h, w = want["image_size"].numpy()
            assert not got[h:].any() and not got[:, w:].any()  # zero padding, as torchvision's
            worst = max(worst, float(np.abs(got - want["image"].numpy()).max()))
            checked += 1
    assert checked == 12 and worst <= atol, worst
    return worst


def test_uint8_pixels_and_taps_give_the_eval_canvas(shapes_cfg, shapes_builder):
    _compare(shapes_cfg, shapes_builder, CANVAS_ATOL)


def test_images_larger_than_the_raw_canvas_are_rounded_by_at_most_half_a_level(
        shapes_cfg, shapes_builder):
    cfg = shapes_cfg.copy_and_resolve_references()
    cfg.data.raw_canvas_size = (0, 0)  # the square canvas: the 1.25-wide images do not fit
    # Rounding to uint8 moves a pixel by <= 0.5/255, i.e. 0.5/255/std after normalisation.
    worst = _compare(cfg, shapes_builder, 0.5 / 255 / min(STD) + CANVAS_ATOL)
    assert worst > CANVAS_ATOL  # the rounded path was taken


def test_a_raw_canvas_below_the_canvas(shapes_cfg, shapes_builder):
    """The 96x96 canvas, the shapes images 96 high and 77-120 wide: a raw canvas of 40x48 holds
    neither the images nor their resized sizes, so each is shrunk on the host to fit it (the
    largest size of its aspect, by hand below) and resized up on the device: a blurred copy of
    the canvas. (Images that fit, or whose resized size fits, take the paths tested above.)"""
    cfg = shapes_cfg.copy_and_resolve_references()
    cfg.data.raw_canvas_size = (40, 48)
    d = cfg.data
    for ex in _examples(shapes_builder, "train", 6):
        h, w = ip.decode_image(ex["image"]).shape[:2]
        assert h > 40 and w > 48
        s = min(40 / h, 48 / w)
        fit_h, fit_w = int(np.floor(h * s)), int(np.floor(w * s))
        want = ip.preprocess_example(ex, tf.constant(False), d, None)
        raw = ip.preprocess_example(ex, tf.constant(False), d, None, raw_image=True)
        assert tuple(raw["image"].shape[:2]) == (fit_h, fit_w)
        new_h, new_w = want["image_size"].numpy()
        rows, cols = raw["resize_rows"].numpy(), raw["resize_cols"].numpy()
        assert rows.shape[0] == new_h and cols.shape[0] == new_w
        assert rows.max() == fit_h - 1 and cols.max() == fit_w - 1  # upsampled from the fit
        got = _device_canvas(raw, d)
        assert not got[new_h:].any() and not got[:, new_w:].any()
        canvas = want["image"].numpy()[:new_h, :new_w]
        error = np.abs(got[:new_h, :new_w] - canvas).mean()
        # Shrinking 2-2.5x and back blurs the shapes' edges and the textures: the mean error
        # stays a fraction of how far the canvas's pixels are from their mean.
        assert 0.02 < error < 0.3 * np.abs(canvas - canvas.mean((0, 1))).mean(), error
    # 0 = the canvas side, but 640 on COCO 2017: its longest image side.
    coco = base_config().data
    assert coco.dataset == "coco_instances/2017" and tuple(coco.canvas_size) == (1344, 1344)
    assert ip.raw_canvas_size(coco) == (640, 640)
    coco.raw_canvas_size = (0, 800)
    assert ip.raw_canvas_size(coco) == (640, 800)
    coco.dataset = "coco_format"
    assert ip.raw_canvas_size(coco) == (1344, 800)
    with pytest.raises(ValueError, match=r"data.raw_canvas_size \(40, -1\) must be"):
        d.raw_canvas_size = (40, -1)
        ip._check_data_config(d)


def test_gt_masks_cross_as_bits_and_come_back_exactly(shapes_cfg, shapes_builder):
    """The host packs each mask row 8 pixels to a byte (first pixel in the high bit, the row
    padded to whole bytes: numpy's packbits), the device unpacks them to the same {0, 1} masks;
    the step ships the bits in place of the masks, and the train iterator yields them."""
    masks = np.zeros((1, 2, 9, 9), np.uint8)
    masks[0, 0, 0, [0, 7, 8]] = 1  # 1000 0001 | 1(000 0000)
    masks[0, 1] = 1  # a padding slot: not packed
    batch = {"gt_masks": masks, "gt_valid": np.array([[True, False]])}
    bits = ip.pack_masks(batch)["gt_mask_bits"]
    assert bits.shape == (1, 2, 9, 2) and bits[0, 0, 0].tolist() == [129, 128]
    assert not bits[0, 0, 1:].any() and not bits[0, 1].any()
    rng = np.random.default_rng(0)
    for size in (20, 28, 112):
        masks = (rng.random((2, 5, size, size)) < 0.3).astype(np.uint8)
        batch = {"gt_masks": masks, "gt_valid": np.ones((2, 5), bool),
                 "gt_boxes": np.zeros((2, 5, 4), np.float32)}
        packed = ip.pack_masks(batch)
        assert "gt_masks" not in packed
        np.testing.assert_array_equal(packed["gt_mask_bits"], np.packbits(masks, axis=-1))
        out = device_transform.unpack_masks(packed)
        assert "gt_mask_bits" not in out and out["gt_masks"].dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(out["gt_masks"]), masks)
        assert device_transform.shipped_keys(("gt_boxes", "gt_masks"), packed) == (
            "gt_boxes", "gt_mask_bits")
    assert device_transform.shipped_keys(("gt_masks",), batch) == ("gt_masks",)
    with pytest.raises(ValueError, match="gt_mask_bits: rows of 14 bytes cannot hold 120"):
        device_transform.unpack_mask_bits(np.zeros((2, 120, 14), np.uint8), 120)
    # The stream's own batches: the iterator's bits are the data set's masks, packed.
    stream = ip.make_train_dataset(shapes_cfg, builder=shapes_builder).as_numpy_iterator()
    shipped = ip.make_train_iterator(shapes_cfg, builder=shapes_builder)
    for _ in range(2):
        want, got = next(stream), next(shipped)
        assert want["gt_masks"].any()
        np.testing.assert_array_equal(got["gt_mask_bits"],
                                      np.packbits(want["gt_masks"], axis=-1))
