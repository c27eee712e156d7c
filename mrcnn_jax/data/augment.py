"""Training-time scale and colour augmentation inside the static canvas.

Three switches of `config.data`, all off by default (then the stream is exactly the unaugmented
one: same images, same bits):

- `train_min_sizes`: detectron2's multi-scale training (`ResizeShortestEdge` with a choice list):
  each training image draws its short side from the list, the long side still capped at
  `max_size` (torchvision's rule, `input_pipeline._tf_resized_size`). The canvas must hold
  `max_size`, as for one size.
- `scale_jitter = (lo, hi)`: large-scale jitter (detectron2's `ResizeScale` + `FixedSizeCrop`, the
  recipe of torchvision's v2 weights and detectron2's LSJ baselines). The image is resized to fit
  the canvas times a scale drawn uniformly in [lo, hi] (aspect ratio kept), then a random
  canvas-sized window of it is the training image: a crop where the resized image is larger than
  the canvas, padding where smaller. `min_size` / `max_size` then only rule evaluation.
- `color_jitter = (brightness, contrast, saturation)`: torchvision's `ColorJitter` factors drawn
  uniformly in [1 - s, 1 + s], applied on the device (`ops.color`), after the resize.

Geometry with the crop. The resized image is virtual: the host computes the resize taps of the
whole resized image and keeps the window's rows and columns, so the device resizes only what the
canvas shows. In canvas pixels, with window offset (oy, ox) and size (wh, ww) (`image_size`):
- boxes are resized, shifted by (-ox, -oy) and clipped to the window; an instance whose clipped
  box is empty (width or height <= 1e-5 px, detectron2's threshold) is dropped before the
  `max_instances` cut;
- `gt_mask_boxes` are shifted but not clipped: the cropped gt mask still covers the instance's
  whole region, and the mask targets sample it only inside the (clipped) proposals;
- keypoints are resized and shifted; those outside the window become invisible (v = 0, as
  detectron2's `transform_keypoint_annotations`).
The flip comes first (pixel-exact in the original image); detectron2 flips after the crop, which
draws from the same distribution of windows.

Randomness is stateless, keyed like the flip on (seed, epoch, image id) and folded with a
constant, so a resumed run draws the same values and the flip of an image does not change when
augmentation is switched on.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

# Detectron2's `Boxes.nonempty` threshold: an instance cropped to less than this is dropped.
MIN_VISIBLE_SIZE = 1e-5
_FOLD = 0x5CA1E  # folded into the flip's key: the augmentation's own random stream
# Layout of the per-image uniform draws.
_U_MIN_SIZE, _U_SCALE, _U_CROP_Y, _U_CROP_X, _U_COLOR = 0, 1, 2, 3, 4
_NUM_UNIFORMS = 7


def scale_jitter_on(d) -> bool:
    return bool(tuple(d.scale_jitter))


def color_jitter_on(d) -> bool:
    return any(float(s) > 0 for s in d.color_jitter)


def enabled(d) -> bool:
    """Whether any of the three switches is on."""
    return bool(tuple(d.train_min_sizes)) or scale_jitter_on(d) or color_jitter_on(d)


def check_config(d) -> None:
    """ValueError naming the `config.data` field at fault."""
    sizes = tuple(d.train_min_sizes)
    if any(not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"data.train_min_sizes must be positive ints (short sides), got {sizes}")
    if any(s > d.max_size for s in sizes):
        raise ValueError(f"data.train_min_sizes {sizes}: every size must be <= data.max_size "
                         f"({d.max_size})")
    jitter = tuple(d.scale_jitter)
    if jitter and (len(jitter) != 2 or not 0 < jitter[0] <= jitter[1]):
        raise ValueError(f"data.scale_jitter must be () (off) or (low, high) with "
                         f"0 < low <= high, e.g. (0.1, 2.0); got {jitter}")
    if jitter and sizes:
        raise ValueError("data.scale_jitter and data.train_min_sizes are two different resize "
                         "rules: set one of them")
    color = tuple(d.color_jitter)
    if len(color) != 3 or any(not 0 <= float(s) < 1 for s in color):
        raise ValueError(f"data.color_jitter must be (brightness, contrast, saturation), each in "
                         f"[0, 1); got {color}")


def draw(key: tf.Tensor, d) -> dict[str, tf.Tensor]:
    """One image's augmentation parameters from its flip key ([2] int64): `min_size` (int32),
    `scale` (float64, the jitter scale), `crop` ([2] float32 in [0, 1): where the window lies
    along y and x), `color_factors` ([3] float32: brightness, contrast, saturation)."""
    key = tf.random.experimental.stateless_fold_in(key, _FOLD)
    u = tf.random.stateless_uniform([_NUM_UNIFORMS], seed=key, dtype=tf.float32)
    sizes = tuple(d.train_min_sizes) or (d.min_size,)
    index = tf.minimum(tf.cast(u[_U_MIN_SIZE] * len(sizes), tf.int32), len(sizes) - 1)
    lo, hi = tuple(d.scale_jitter) or (1.0, 1.0)
    strength = tf.constant([float(s) for s in d.color_jitter], tf.float32)
    return {
        "min_size": tf.gather(tf.constant(sizes, tf.int32), index),
        "scale": lo + tf.cast(u[_U_SCALE], tf.float64) * (hi - lo),
        "crop": tf.stack([u[_U_CROP_Y], u[_U_CROP_X]]),
        "color_factors": 1.0 + strength * (2.0 * u[_U_COLOR:_U_COLOR + 3] - 1.0),
    }


def jitter_resize(h: tf.Tensor, w: tf.Tensor, scale: tf.Tensor, canvas: Sequence[int]):
    """Large-scale jitter's resized size: the image fit into the canvas times `scale`, aspect
    kept, sides floored as torchvision's rule: (new_h, new_w int32, factor float64)."""
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    factor = scale * tf.minimum(canvas[0] / hf, canvas[1] / wf)
    new_h = tf.maximum(tf.cast(tf.floor(hf * factor), tf.int32), 1)
    new_w = tf.maximum(tf.cast(tf.floor(wf * factor), tf.int32), 1)
    return new_h, new_w, factor


def window(new_h: tf.Tensor, new_w: tf.Tensor, crop: tf.Tensor, canvas: Sequence[int]):
    """The canvas-sized window of a (new_h, new_w) resized image at the relative position
    `crop` ([2] in [0, 1)), uniform over integer offsets: (offset_y, offset_x, height, width)
    int32, height <= canvas[0] and width <= canvas[1]."""
    spare_h = tf.maximum(new_h - canvas[0], 0)
    spare_w = tf.maximum(new_w - canvas[1], 0)
    oy = tf.minimum(tf.cast(crop[0] * tf.cast(spare_h + 1, tf.float32), tf.int32), spare_h)
    ox = tf.minimum(tf.cast(crop[1] * tf.cast(spare_w + 1, tf.float32), tf.int32), spare_w)
    return oy, ox, tf.minimum(new_h - oy, canvas[0]), tf.minimum(new_w - ox, canvas[1])
