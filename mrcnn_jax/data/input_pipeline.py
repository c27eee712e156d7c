"""Static-shape tf.data input pipeline: tfds records -> host-local numpy batches.

Per example: decode -> (train) random horizontal flip of image, boxes, masks and keypoints with the
left/right keypoint swap -> normalise with mean/std on [0, 1] RGB -> resize by torchvision's rule
(bilinear, half-pixel centres, no antialiasing) -> pad to the static canvas (top-left, zeros) ->
crowd instances dropped, the rest padded to `max_instances` with `gt_valid` -> gt masks cropped to
their region and resampled to `gt_mask_size`² -> batch -> prefetch.

The training stream leaves the image's normalise, resize and pad to the device (see "Training
images" below): its batches carry the decoded uint8 pixels and the resize taps instead. With
`data.train_min_sizes`, `data.scale_jitter` or `data.color_jitter` it also augments (data/augment.py:
a drawn short side, or a jittered resize seen through a random canvas window, and colour factors
the device applies).

Batch dict (B = per-host batch, M = `data.max_instances`, S = `data.gt_mask_size`, K keypoints):

    image          [B, Hc, Wc, 3] float32  normalised, zero-padded canvas (eval);
                   [B, Hr, Wr, 3] uint8    the decoded, flipped pixels at the top left (train)
    image_size     [B, 2] int32            (h, w) of the resized image inside the canvas
    gt_boxes       [B, M, 4] float32       x1, y1, x2, y2 in resized pixels
    gt_classes     [B, M] int32            the label map's labels (data/label_map.py), 0 = padding
    gt_valid       [B, M] bool             a real, non-crowd instance
    gt_masks       [B, M, S, S] uint8      {0, 1}: the instance mask over `gt_mask_boxes`
    gt_mask_bits   [B, M, S, ceil(S/8)]    uint8, the masks 8 pixels a byte: `make_train_iterator`'s
                                           batches carry them in place of gt_masks (`pack_masks`)
    gt_mask_boxes  [B, M, 4] float32       x1, y1, x2, y2 (resized pixels) that `gt_masks` covers
    gt_keypoints   [B, M, K, 3] float32    x, y (resized pixels), visibility; only with keypoints
  train mode adds (Hr x Wr = `data.raw_canvas_size`, the device's `data.device_transform`)
    resize_rows         [B, Hc, 2] int32    source rows of each canvas row (torch's taps)
    resize_row_weights  [B, Hc, 2] float32  their weights; 0 on the canvas padding
    resize_cols         [B, Wc, 2] int32    source columns of each canvas column
    resize_col_weights  [B, Wc, 2] float32
  eval mode adds
    image_id       [B] int64
    original_size  [B, 2] int32            (h, w) of the image as stored
    scale          [B] float32             torchvision's scale factor: resized ≈ original × scale
    image_valid    [B] bool                False for the padding of the last batch

Resizing follows `torchvision.models.detection.transform._resize_image_and_masks`:
scale = min(min_size / short, max_size / long) in float64, resized side = floor(side × scale), and
boxes/keypoints are multiplied by the per-axis ratio resized/original computed in float32
(`resize_boxes`). The exact per-axis ratios for mapping detections back are
`image_size / original_size`; `scale` is the scalar factor.

Masks: the builder stores each mask cropped to its tight pixel box; here the crop is flipped and
bilinearly resampled at S×S half-pixel-centred points of its region (the tight box, widened by
`gt_mask_border` of its size on each side; outside the crop the mask is 0), thresholded at 0.5.
Resampling straight from the original-resolution crop avoids resizing full masks.

Training images. A training batch crosses to the device as uint8 pixels, 4x fewer bytes than the
float32 canvas, and the host skips the float work. The device computes torchvision's transform in
its order (`data.device_transform.canvas_batch`, inside the jitted step: /255, normalise, bilinear
resize through the taps, zero padding), so the canvas equals the eval pipeline's up to float32
rounding (the resize of normalised values is linear, tested to 1e-5). Resizing on the host and
shipping the result as uint8 instead would round every resized pixel (up to 0.5/255); shipping the
un-resized pixels keeps the transform exact. The pixels need a static shape: `data.raw_canvas_size`
(default: the canvas; on COCO 2017 640x640, its longest image side, so the batch assembly, one
thread per batch, copies 4.4x fewer bytes). An image larger than it on a side (none in COCO 2017;
the shapes sets set the size of their widest image) is resized on the host in float and rounded
to uint8, with identity taps: off by at most 0.5/255 before normalisation. When even its resized
size does not fit (a raw canvas below the canvas), it is shrunk on the host to fit (antialiased,
aspect kept) and resized up on the device, so it loses detail. The rest of a training batch
crosses in the smallest dtype that holds it: masks as bits (8 pixels a byte, packed in numpy as
the batches leave tf.data, unpacked on the device), `gt_valid` bool; boxes
and keypoints stay float32 (sub-pixel coordinates up to the canvas size).

Determinism and resume. The training stream is a pure function of (seed, step):
- each host reads its `tfds.even_splits` part of the split (disjoint, complete), in file order;
- images without a non-crowd instance are skipped (`data.skip_images_without_instances`) before
  any decoding, and counted;
- epoch e is that list shuffled with a buffer of `data.shuffle_buffer` seeded by (seed, e); epochs
  are concatenated, so batches may straddle an epoch boundary;
- the flip of an image is drawn by a stateless RNG keyed on (seed, epoch, image id), so it does not
  depend on the position in the stream, the number of hosts, or the parallelism;
- resuming at step k starts at epoch ⌊kB/n⌋ and skips the remaining (kB mod n) records before
  decoding (n = the host's number of training images). `make_train_iterator(config, k)` yields
  exactly the batches k, k+1, ... of an uninterrupted run; the only state to save is the step.
tf.data's shuffle also mixes in TF's global seed: a program that calls `tf.random.set_seed` must
call it the same way when it resumes (the order is then still a function of (seed, step)).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mrcnn_jax.data import augment, coco_instances, device_transform

log = logging.getLogger(__name__)

_MAX_EPOCHS = 1 << 30  # "forever": the stream of epochs is lazily concatenated
_EPOCH_SEED_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct shuffle seeds
_DECODERS = {"image": tfds.decode.SkipDecoding()}  # images are decoded in `preprocess_example`


def _tf_resized_size(h: tf.Tensor, w: tf.Tensor, min_size: int, max_size: int):
    """`transforms.resized_size` and `transforms.resize_scale` in the tf.data graph:
    (new_h int32, new_w int32, scale float64)."""
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    min_size = tf.cast(min_size, tf.float64)  # an int, or a drawn int32 (data/augment.py)
    scale = tf.minimum(min_size / tf.minimum(hf, wf), max_size / tf.maximum(hf, wf))
    new_h = tf.cast(tf.floor(hf * scale), tf.int32)
    new_w = tf.cast(tf.floor(wf * scale), tf.int32)
    return new_h, new_w, scale


def _tf_axis_taps(in_size: tf.Tensor, out_size: tf.Tensor):
    """`ops.image_resize.axis_taps` in the tf.data graph (torch's float32 source coordinates,
    the fused multiply-add's single rounding reproduced in float64), unpadded: ([out_size, 2]
    int32 source indices, [out_size, 2] float32 weights)."""
    scale = tf.cast(tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32), tf.float64)
    dst = tf.cast(tf.range(out_size, dtype=tf.float32) + 0.5, tf.float64)
    src = tf.maximum(tf.cast(scale * dst - 0.5, tf.float32), 0.0)
    i0 = tf.cast(src, tf.int32)  # floor, src >= 0
    i1 = tf.minimum(i0 + 1, in_size - 1)
    l1 = src - tf.cast(i0, tf.float32)
    return tf.stack([i0, i1], 1), tf.stack([1.0 - l1, l1], 1)


def _tf_identity_taps(out_size: tf.Tensor):
    """Taps that copy `out_size` already resized rows/columns: (index (i, i), weights (1, 0))."""
    i = tf.range(out_size, dtype=tf.int32)
    w = tf.ones([out_size], tf.float32)
    return tf.stack([i, i], 1), tf.stack([w, tf.zeros_like(w)], 1)


# The longest side of every COCO 2017 image.
COCO2017_MAX_SIDE = 640


def raw_canvas_size(d) -> tuple[int, int]:
    """`data.raw_canvas_size` (Hr, Wr), a 0 read as: 640 on tfds's COCO 2017 (every image fits
    as it is, in 4.4x fewer bytes than the 1344 canvas), the canvas side on any other data."""
    coco2017 = str(d.dataset).startswith("coco_instances/2017")
    return tuple(int(r) or (COCO2017_MAX_SIDE if coco2017 else int(c))
                 for r, c in zip(d.raw_canvas_size, d.canvas_size))


def _raw_image(image: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor, d,
               window: tuple[tf.Tensor, ...] | None = None) -> dict:
    """The (flipped) uint8 image of a training example and its taps (module docstring,
    "Training images"). window: (offset_y, offset_x, height, width) of the part of the
    (new_h, new_w) resized image the canvas shows (data/augment.py); None = all of it."""
    hr, wr = raw_canvas_size(d)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    oy, ox, win_h, win_w = window if window is not None else (0, 0, new_h, new_w)

    def exact():
        rows, row_weights = _tf_axis_taps(h, new_h)
        cols, col_weights = _tf_axis_taps(w, new_w)
        return (image, rows[oy:oy + win_h], row_weights[oy:oy + win_h], cols[ox:ox + win_w],
                col_weights[ox:ox + win_w])

    def rounded():  # larger than the raw canvas: resized here, one rounding to uint8
        resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                                  method="bilinear", antialias=False)
        resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
        resized = resized[oy:oy + win_h, ox:ox + win_w]
        return (resized, *_tf_identity_taps(win_h), *_tf_identity_taps(win_w))

    def shrunk():
        # Larger than a raw canvas below the canvas, and so is its resized window: shrunk here
        # to fit the raw canvas (aspect kept, one rounding to uint8), resized up on the device.
        fit = tf.minimum(tf.cast(hr, tf.float64) / tf.cast(h, tf.float64),
                         tf.cast(wr, tf.float64) / tf.cast(w, tf.float64))
        fit_h = tf.maximum(tf.cast(tf.floor(tf.cast(h, tf.float64) * fit), tf.int32), 1)
        fit_w = tf.maximum(tf.cast(tf.floor(tf.cast(w, tf.float64) * fit), tf.int32), 1)
        small = tf.image.resize(tf.cast(image, tf.float32), tf.stack([fit_h, fit_w]),
                                method="bilinear", antialias=True)
        small = tf.cast(tf.clip_by_value(tf.round(small), 0.0, 255.0), tf.uint8)
        rows, row_weights = _tf_axis_taps(fit_h, new_h)
        cols, col_weights = _tf_axis_taps(fit_w, new_w)
        return (small, rows[oy:oy + win_h], row_weights[oy:oy + win_h], cols[ox:ox + win_w],
                col_weights[ox:ox + win_w])

    fits = tf.logical_and(h <= hr, w <= wr)
    window_fits = tf.logical_and(win_h <= hr, win_w <= wr)
    pixels, rows, row_weights, cols, col_weights = tf.case(
        [(fits, exact), (window_fits, rounded)], default=shrunk, exclusive=False)
    pixels.set_shape([None, None, 3])
    for taps in (rows, row_weights, cols, col_weights):
        taps.set_shape([None, 2])
    return {"image": pixels, "resize_rows": rows, "resize_row_weights": row_weights,
            "resize_cols": cols, "resize_col_weights": col_weights}


def _train_padded_shapes(d, num_keypoints: int | None) -> dict[str, list[int]]:
    """The static shapes `padded_batch` pads a train example to (zeros: zero taps weights on the
    canvas padding, False `gt_valid` on the instance padding)."""
    hc, wc = d.canvas_size
    m, s = d.max_instances, d.gt_mask_size
    shapes = {
        "image": [*raw_canvas_size(d), 3], "image_size": [2],
        "resize_rows": [hc, 2], "resize_row_weights": [hc, 2],
        "resize_cols": [wc, 2], "resize_col_weights": [wc, 2],
        "gt_boxes": [m, 4], "gt_classes": [m], "gt_valid": [m], "gt_masks": [m, s, s],
        "gt_mask_boxes": [m, 4]}
    if num_keypoints is not None:
        shapes["gt_keypoints"] = [m, num_keypoints, 3]
    if augment.color_jitter_on(d):
        shapes["color_factors"] = [3]
    return shapes


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG bytes -> [H, W, 3] uint8, pixel-identical to PIL (torchvision's loader).

    JPEG uses the accurate integer DCT: tf's default (the fast one) is off by up to ~10 levels.
    """
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(data, channels=3))
    image.set_shape([None, None, 3])
    return image


def _check_data_config(d) -> None:
    hc, wc = d.canvas_size
    if min(hc, wc) < d.max_size:
        raise ValueError(f"data.canvas_size {tuple(d.canvas_size)} must be >= data.max_size "
                         f"({d.max_size}) on both sides so every resized image fits")
    if d.min_size > d.max_size:
        raise ValueError(f"data.min_size ({d.min_size}) must be <= data.max_size ({d.max_size})")
    if not 0.0 <= d.hflip_prob <= 1.0:
        raise ValueError(f"data.hflip_prob must be in [0, 1], got {d.hflip_prob}")
    if hc % d.size_divisibility or wc % d.size_divisibility:
        raise ValueError(f"data.canvas_size {tuple(d.canvas_size)} must be a multiple of "
                         f"data.size_divisibility ({d.size_divisibility})")
    if d.gt_mask_border < 0:
        raise ValueError(f"data.gt_mask_border must be >= 0, got {d.gt_mask_border}")
    if len(d.raw_canvas_size) != 2 or any(int(r) != r or r < 0 for r in d.raw_canvas_size):
        raise ValueError(f"data.raw_canvas_size {tuple(d.raw_canvas_size)} must be (height, "
                         f"width), each 0 (the canvas side) or a size in pixels")
    augment.check_config(d)


def _resample_mask_crop(png: tf.Tensor, box: tf.Tensor, region: tf.Tensor, flip: tf.Tensor,
                        size: int) -> tf.Tensor:
    """One cropped mask resampled over `region`: [size, size] uint8 in {0, 1}.

    png: PNG bytes of the crop [ch, cw] of the tight box `box` (x1, y1, x2, y2, original pixels,
    before any flip). region: [4] float32 x1, y1, x2, y2 in the same (unflipped) frame.
    """
    crop = tf.io.decode_png(png, channels=1)
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    # One zero pixel around the crop, so bilinear samples fade to 0 past its edge as they would
    # on the full-image mask (crop_and_resize would otherwise clamp to the edge row).
    crop = tf.pad(tf.cast(crop, tf.float32), [[1, 1], [1, 1], [0, 0]])
    ph = tf.cast(tf.shape(crop)[0], tf.float32)
    pw = tf.cast(tf.shape(crop)[1], tf.float32)
    box = tf.cast(box, tf.float32)
    # In the (flipped) crop's frame the region starts at (region.x1 - box.x1) unflipped, or
    # (box.x2 - region.x2) flipped.
    x0 = tf.where(flip, box[2] - region[2], region[0] - box[0])
    y0 = region[1] - box[1]
    rw, rh = region[2] - region[0], region[3] - region[1]
    # Sample j at region coordinate (j + 0.5) * r / S, i.e. pixel index that - 0.5, + 1 (pad);
    # crop_and_resize samples y1 * (ph - 1) + i * (y2 - y1) * (ph - 1) / (S - 1).
    first_y = y0 + 0.5 * rh / size + 0.5
    first_x = x0 + 0.5 * rw / size + 0.5
    last_y = first_y + (size - 1) * rh / size
    last_x = first_x + (size - 1) * rw / size
    nbox = tf.stack([first_y / (ph - 1), first_x / (pw - 1), last_y / (ph - 1),
                     last_x / (pw - 1)])[None]
    out = tf.image.crop_and_resize(crop[None], nbox, [0], [size, size], method="bilinear",
                                   extrapolation_value=0.0)
    return tf.cast(out[0, :, :, 0] >= 0.5, tf.uint8)


def preprocess_example(
    example: dict, flip: tf.Tensor, d, keypoint_flip: list[int] | None = None,
    label_of_category: np.ndarray | None = None, raw_image: bool = False,
    aug: dict[str, tf.Tensor] | None = None,
) -> dict:
    """One tfds example (image bytes undecoded) -> fixed-shape tensors of the batch dict.

    flip: scalar bool tensor. d: `config.data`. keypoint_flip: the left/right permutation of
    keypoints (metadata `keypoint_flip`), None when the data set has no keypoints.
    label_of_category: [max category id + 1] int32, the label map's gt class of each category id
    (`LabelMap.category_to_label_table`; 0 = no class: such instances are dropped); None = the
    tfds label + 1. raw_image: the train mode: the uint8 image and resize taps instead of the
    normalised canvas, and nothing padded (the image at its own size, the taps at the resized
    size, N instances): the train stream's `padded_batch` pads into zeroed batch buffers, far
    cheaper than a pad per example. aug: the image's draws of `augment.draw` (multi-scale short
    side, scale jitter and crop window, colour factors; the switches of `d` say which apply);
    None = no augmentation. Besides the batch-dict entries it returns `_scale` and
    `_original_size`, used by eval mode.
    """
    hc, wc = d.canvas_size
    m, s = d.max_instances, d.gt_mask_size
    image = decode_image(example["image"])
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    cropped = aug is not None and augment.scale_jitter_on(d)
    if cropped:
        new_h, new_w, scale = augment.jitter_resize(h, w, aug["scale"], d.canvas_size)
        oy, ox, win_h, win_w = augment.window(new_h, new_w, aug["crop"], d.canvas_size)
    else:
        min_size = d.min_size if aug is None else aug["min_size"]
        new_h, new_w, scale = _tf_resized_size(h, w, min_size, d.max_size)
        oy, ox, win_h, win_w = 0, 0, new_h, new_w

    # Flipping first keeps the flip exact in pixels.
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    if raw_image:
        out = _raw_image(image, new_h, new_w, d, (oy, ox, win_h, win_w) if cropped else None)
    else:  # torchvision normalises, then resizes
        image = tf.cast(image, tf.float32) / 255.0
        image = ((image - tf.constant(d.pixel_mean, tf.float32))
                 / tf.constant(d.pixel_std, tf.float32))
        image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear",
                                antialias=False)
        if cropped:
            image = image[oy:oy + win_h, ox:ox + win_w]
        image = tf.image.pad_to_bounding_box(image, 0, 0, hc, wc)
        image.set_shape([hc, wc, 3])
        out = {"image": image}

    objects = example["objects"]
    if label_of_category is None:
        classes = tf.cast(objects["label"], tf.int32) + 1
    else:
        table = tf.constant(label_of_category, tf.int32)
        cid = objects["category_id"]
        known = (cid >= 0) & (cid < table.shape[0])
        classes = tf.where(known, tf.gather(table, tf.clip_by_value(cid, 0, table.shape[0] - 1)),
                           0)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ratio_h = tf.cast(new_h, tf.float32) / hf
    ratio_w = tf.cast(new_w, tf.float32) / wf
    ratios = tf.stack([ratio_w, ratio_h, ratio_w, ratio_h])
    shift = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)

    def flip_x(boxes):  # [N, 4] xyxy in original pixels
        return tf.stack([wf - boxes[:, 2], boxes[:, 1], wf - boxes[:, 0], boxes[:, 3]], axis=1)

    ymin, xmin, ymax, xmax = tf.unstack(objects["bbox"], axis=1)
    all_boxes = tf.stack([xmin * wf, ymin * hf, xmax * wf, ymax * hf], axis=1)
    all_boxes = tf.cond(flip, lambda: flip_x(all_boxes), lambda: all_boxes) * ratios
    # Crowd regions are never targets, nor instances of a category without a label, nor, under
    # the crop of scale jitter, instances the window cuts away.
    usable = tf.logical_not(objects["is_crowd"]) & (classes > 0)
    if cropped:
        limit = tf.cast(tf.stack([win_w, win_h, win_w, win_h]), tf.float32)
        all_boxes = tf.clip_by_value(all_boxes - shift, 0.0, limit)
        usable &= ((all_boxes[:, 2] - all_boxes[:, 0] > augment.MIN_VISIBLE_SIZE)
                   & (all_boxes[:, 3] - all_boxes[:, 1] > augment.MIN_VISIBLE_SIZE))
    keep = tf.where(usable)[:, 0][:m]
    n = tf.shape(keep)[0]
    boxes = tf.gather(all_boxes, keep)

    mask_box = tf.gather(objects["mask_box"], keep)
    mb = tf.cast(mask_box, tf.float32)
    border = d.gt_mask_border * tf.stack([mb[:, 2] - mb[:, 0], mb[:, 3] - mb[:, 1]] * 2, axis=1)
    region = mb + border * tf.constant([-1.0, -1.0, 1.0, 1.0])
    masks = tf.map_fn(
        lambda args: _resample_mask_crop(args[0], args[1], args[2], flip, s),
        (tf.gather(objects["mask_png"], keep), mask_box, region),
        fn_output_signature=tf.TensorSpec([s, s], tf.uint8))
    mask_boxes = tf.cond(flip, lambda: flip_x(region), lambda: region) * ratios
    if cropped:
        mask_boxes -= shift  # not clipped: the crop covers the instance's whole region

    instances = {
        "gt_boxes": boxes,
        "gt_classes": tf.gather(classes, keep),
        "gt_valid": tf.ones([n], tf.bool),
        "gt_masks": masks,
        "gt_mask_boxes": mask_boxes,
    }
    if keypoint_flip is not None:
        kp = tf.gather(objects["keypoints"], keep)  # [N, K, 3]
        x, y, v = tf.unstack(kp, axis=2)

        def flipped():
            return tf.gather(tf.stack([wf - x, y, v], axis=2), keypoint_flip, axis=1)

        kp = tf.cond(flip, flipped, lambda: kp)
        x, y, v = tf.unstack(kp, axis=2)
        x, y = x * ratio_w, y * ratio_h
        visible = v > 0
        if cropped:  # keypoints outside the window are not visible there
            x, y = x - tf.cast(ox, tf.float32), y - tf.cast(oy, tf.float32)
            visible &= ((x >= 0) & (x <= tf.cast(win_w, tf.float32)) & (y >= 0)
                        & (y <= tf.cast(win_h, tf.float32)))
            v = tf.where(visible, v, 0.0)
        instances["gt_keypoints"] = tf.stack(
            [tf.where(visible, x, 0.0), tf.where(visible, y, 0.0), v], axis=2)
    out["image_size"] = tf.stack([win_h, win_w])
    if aug is not None and augment.color_jitter_on(d):
        out["color_factors"] = aug["color_factors"]
    for k, t in instances.items():
        if not raw_image:  # the train stream's padded_batch pads them (`_train_padded_shapes`)
            t = tf.pad(t, [[0, m - n]] + [[0, 0]] * (t.shape.rank - 1))
            t.set_shape([m] + t.shape[1:].as_list())
        out[k] = t
    out["_scale"] = tf.cast(scale, tf.float32)
    out["_original_size"] = tf.stack([h, w])
    return out


def _keypoint_flip(builder: tfds.core.DatasetBuilder) -> list[int] | None:
    if "keypoints" not in builder.info.features["objects"]:
        return None
    return list(builder.info.metadata["keypoint_flip"])


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index must be in [0, {pc}), got {pi}")
    return pi, pc


def _per_host_batch(global_batch: int, process_count: int, field: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"{field} ({global_batch}) must be a positive multiple of the number "
                         f"of hosts ({process_count})")
    return global_batch // process_count


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


def _label_of_category(config, builder) -> np.ndarray:
    """The label map's category id -> gt class table for `config.model.num_classes`."""
    label_map, _ = coco_instances.label_map_for_info(builder.info, config.model.num_classes)
    return label_map.category_to_label_table()


def _has_instance(example: dict) -> tf.Tensor:
    return tf.reduce_any(tf.logical_not(example["objects"]["is_crowd"]))


def _host_records(builder, split: str, process_index: int, process_count: int):
    """This host's part of `split`, undecoded images, in a fixed order."""
    host_split = tfds.even_splits(split, n=process_count)[process_index]
    # No tfds auto-cache: small sets would be cached in memory only when an epoch is read
    # through, which the resumable stream does not promise; reading records again is cheap.
    read_config = tfds.ReadConfig(try_autocache=False)
    return builder.as_dataset(split=host_split, shuffle_files=False, decoders=_DECODERS,
                              read_config=read_config)


def count_train_examples(config, process_index: int | None = None,
                         process_count: int | None = None, builder=None) -> tuple[int, int]:
    """(kept, skipped): this host's training images used / skipped for lack of a valid instance.

    One pass over the records without decoding images (the resume position needs `kept`). Also
    logs how many images have more non-crowd instances than `data.max_instances` (the first
    `max_instances` of those are kept), so a truncation is never silent.
    """
    d = config.data
    pi, pc = _host(process_index, process_count)
    builder = builder or coco_instances.get_builder(d)

    def flags(ex):
        n = tf.reduce_sum(tf.cast(tf.logical_not(ex["objects"]["is_crowd"]), tf.int32))
        return n > 0, n > d.max_instances

    kept = total = truncated = 0
    records = _host_records(builder, d.train_split, pi, pc).map(flags)
    for has, over in records.batch(4096).as_numpy_iterator():
        kept += int(has.sum())
        truncated += int(over.sum())
        total += len(has)
    if truncated:
        log.warning("train split %r, host %d/%d: %d images have more than data.max_instances="
                    "%d non-crowd instances; only the first %d of each are targets",
                    d.train_split, pi, pc, truncated, d.max_instances, d.max_instances)
    if not d.skip_images_without_instances:
        return total, 0
    return kept, total - kept


def make_train_dataset(config, start_step: int = 0, *, process_index: int | None = None,
                       process_count: int | None = None, builder=None) -> tf.data.Dataset:
    """The infinite training stream of per-host batches, starting at batch `start_step`.

    Uses `config.data`, `config.train.global_batch_size` (split evenly over hosts) and
    `config.train.seed`. See the module docstring for the determinism/resume contract. Starting
    costs one pass over this host's records without image decoding (`count_train_examples`).
    """
    d = config.data
    _check_data_config(d)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    pi, pc = _host(process_index, process_count)
    batch = _per_host_batch(config.train.global_batch_size, pc, "train.global_batch_size")
    builder = builder or coco_instances.get_builder(d)
    seed = int(config.train.seed)

    n, skipped = count_train_examples(config, pi, pc, builder)
    if n == 0:
        raise ValueError(f"{builder.info.full_name} split {d.train_split!r}: host {pi}/{pc} has "
                         f"no training image with a valid (non-crowd) instance")
    (log.warning if skipped else log.info)(
        "train split %r, host %d/%d: %d images used, %d skipped (no valid non-crowd instance; "
        "data.skip_images_without_instances)", d.train_split, pi, pc, n, skipped)
    start_epoch, offset = divmod(start_step * batch, n)

    records = _host_records(builder, d.train_split, pi, pc)
    if d.skip_images_without_instances:
        records = records.filter(_has_instance)

    def epoch(e):
        shuffled = records.shuffle(d.shuffle_buffer, seed=seed * _EPOCH_SEED_STRIDE + e,
                                   reshuffle_each_iteration=False)
        return shuffled.map(lambda ex: (e, ex))

    keypoint_flip = _keypoint_flip(builder)
    classes = _label_of_category(config, builder)

    def process(e, ex):
        key = tf.stack([tf.constant(seed, tf.int64), e * _EPOCH_SEED_STRIDE + ex["image/id"]])
        flip = tf.random.stateless_uniform([], seed=key) < d.hflip_prob
        aug = augment.draw(key, d) if augment.enabled(d) else None
        out = preprocess_example(ex, flip, d, keypoint_flip, classes, raw_image=True, aug=aug)
        del out["_scale"], out["_original_size"]
        return out

    ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch).skip(offset)
    ds = ds.map(process, num_parallel_calls=d.num_parallel_calls, deterministic=True)
    num_keypoints = None if keypoint_flip is None else len(keypoint_flip)
    ds = ds.padded_batch(batch, padded_shapes=_train_padded_shapes(d, num_keypoints),
                         drop_remainder=True)
    return ds.prefetch(d.prefetch).with_options(_options())


def make_train_iterator(config, start_step: int = 0, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of `make_train_dataset(config, start_step)`: batch k, k+1, ... of the run,
    their masks packed to bits (`pack_masks`) as they cross to the devices.

    Resuming needs only the step: `make_train_iterator(config, restored_step)`.
    """
    # map, not a generator: a bad config or data set fails here, not at the first batch.
    return map(pack_masks, make_train_dataset(config, start_step, **kwargs).as_numpy_iterator())


def pack_masks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A training batch with "gt_masks" [B, M, S, S] uint8 {0, 1} replaced by "gt_mask_bits"
    [B, M, S, ceil(S / 8)] uint8: each row's pixels 8 to a byte, the first in the high bit (numpy's
    `packbits`; `device_transform.unpack_masks` inverts it on the device).

    Only the valid instances are packed (~7 of 100 slots in COCO): in numpy that is ~15x cheaper
    than the same packing as tf.data ops per example. A padding slot's bits are 0.
    """
    out = dict(batch)
    masks, valid = out.pop(device_transform.MASKS_KEY), batch["gt_valid"]
    bits = np.zeros((*masks.shape[:-1], -(-masks.shape[-1] // 8)), np.uint8)
    bits[valid] = np.packbits(masks[valid], axis=-1)
    out[device_transform.MASK_BITS_KEY] = bits
    return out


def eval_num_batches(config, *, process_count: int | None = None, builder=None) -> int:
    """Number of eval batches every host yields (the same on all hosts)."""
    d = config.data
    _, pc = _host(0, process_count)
    batch = _per_host_batch(config.eval.batch_size, pc, "eval.batch_size")
    builder = builder or coco_instances.get_builder(d)
    split = _eval_split(config)
    most = max(builder.info.splits[s].num_examples for s in tfds.even_splits(split, n=pc))
    return max(1, math.ceil(most / batch))


def _eval_split(config) -> str:
    n = config.eval.num_images
    return f"{config.data.eval_split}[:{n}]" if n else config.data.eval_split


def make_eval_dataset(config, *, process_index: int | None = None,
                      process_count: int | None = None, builder=None) -> tf.data.Dataset:
    """One pass over this host's part of the eval split, in a fixed order, no flip.

    Every host yields `eval_num_batches(config)` batches of `eval.batch_size / hosts`; the padding
    (end of the last batch, and whole batches on hosts with fewer images) has
    `image_valid = False` and zeros elsewhere. `eval.num_images` > 0 takes the first images only.
    """
    d = config.data
    _check_data_config(d)
    pi, pc = _host(process_index, process_count)
    batch = _per_host_batch(config.eval.batch_size, pc, "eval.batch_size")
    builder = builder or coco_instances.get_builder(d)
    num_batches = eval_num_batches(config, process_count=pc, builder=builder)
    keypoint_flip = _keypoint_flip(builder)
    classes = _label_of_category(config, builder)

    def process(ex):
        out = preprocess_example(ex, tf.constant(False), d, keypoint_flip, classes)
        out["image_id"] = ex["image/id"]
        out["original_size"] = out.pop("_original_size")
        out["scale"] = out.pop("_scale")
        out["image_valid"] = tf.constant(True)
        return out

    ds = _host_records(builder, _eval_split(config), pi, pc)
    ds = ds.map(process, num_parallel_calls=d.num_parallel_calls, deterministic=True)
    ds = ds.batch(batch)

    def pad_batch(b: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {}
        for k, t in b.items():
            missing = batch - tf.shape(t)[0]
            padded = tf.pad(t, [[0, missing]] + [[0, 0]] * (t.shape.rank - 1))
            padded.set_shape([batch] + t.shape[1:].as_list())
            out[k] = padded
        return out

    ds = ds.map(pad_batch)
    empty = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
    return ds.prefetch(d.prefetch).with_options(_options())


def make_eval_iterator(config, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of `make_eval_dataset(config)`."""
    return make_eval_dataset(config, **kwargs).as_numpy_iterator()


def element_spec_summary(ds: tf.data.Dataset) -> dict[str, Any]:
    """{name: (shape, dtype)} of a batch, for logs and tests."""
    return {k: (tuple(v.shape), v.dtype.name) for k, v in ds.element_spec.items()}
