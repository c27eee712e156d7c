"""The training image's transform on the device: the host's torch taps in the tf.data graph equal
numpy's bit for bit, and uint8 pixels + taps give the eval pipeline's normalised canvas (so the
torchvision parity of `preprocess_example` carries over to training)."""

import numpy as np
import tensorflow as tf

from mrcnn_jax.data import device_transform, input_pipeline as ip
from mrcnn_jax.ops import image_resize
from tests.data.test_input_pipeline import _examples

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# tf.image.resize (the eval pipeline) against torch's taps (the device): float32 rounding.
CANVAS_ATOL = 2e-5


def test_tf_taps_equal_torch_taps_bit_for_bit():
    rng = np.random.default_rng(0)
    cases = [(480, 800, 1344), (640, 1066, 1344), (1500, 444, 1344), (1, 800, 800), (7, 3, 5)]
    cases += [(int(i), int(o), int(o) + int(p)) for i, o, p in zip(
        rng.integers(1, 2000, 150), rng.integers(1, 1400, 150), rng.integers(0, 40, 150))]
    for in_size, out_size, canvas in cases:
        index, weight = ip._tf_axis_taps(tf.constant(in_size), tf.constant(out_size), canvas)
        want = image_resize.axis_taps(in_size, out_size, canvas)
        for got, ref in zip((index[:, 0], index[:, 1], weight[:, 0], weight[:, 1]), want):
            np.testing.assert_array_equal(got.numpy(), ref, err_msg=(in_size, out_size))


def _device_canvas(raw):
    batch = {k: v.numpy()[None] for k, v in raw.items() if not k.startswith("_")}
    return np.asarray(device_transform.canvas_batch(batch, MEAN, STD)["image"][0])


def _compare(shapes_cfg, shapes_builder, atol):
    d = shapes_cfg.data
    kflip = None
    worst, checked = 0.0, 0
    for ex in _examples(shapes_builder, "train", 6):
        for flip in (False, True):
            want = ip.preprocess_example(ex, tf.constant(flip), d, kflip)
            raw = ip.preprocess_example(ex, tf.constant(flip), d, kflip, raw_image=True)
            assert raw["image"].dtype == tf.uint8
            assert raw["image"].shape[:2] == ip.raw_canvas_size(d)
            got = _device_canvas(raw)
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
