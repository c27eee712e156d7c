"""Scale augmentation inside the static canvas (data/augment.py): large-scale jitter's resize,
crop window, boxes, masks and keypoints against independent numpy/pycocotools transforms;
multi-scale short sides; colour jitter against torchvision's formulas; the config checks."""

import logging
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO

from mrcnn_jax import transforms
from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import augment, coco_instances, device_transform, input_pipeline as ip
from mrcnn_jax.ops import color
from tests.data import coco_fixtures as fx
from tests.tiny_predict_config import load_config
from tests.data.test_input_pipeline import _examples, _nearest_resize, _paste, _same, _take

logging.getLogger("absl").setLevel(logging.ERROR)

CANVAS = (128, 128)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """The hand-written COCO set (40x50 images, a person with keypoints, a disk, polygons) with
    scale jitter on: (config.data, builder, pycocotools COCO of its annotations)."""
    root = tmp_path_factory.mktemp("hand")
    images_dir, ann = fx.write_hand_coco(root / "hand")
    d = base_config().data
    d.dataset, d.dataset_name, d.data_dir = "coco_format", "hand", str(root / "tfds")
    d.train_images, d.train_annotations = str(images_dir), str(ann)
    d.min_size, d.max_size, d.canvas_size = 64, 100, CANVAS
    d.max_instances, d.gt_mask_size = 8, 64
    d.scale_jitter = (0.1, 2.0)
    return d, coco_instances.get_builder(d), COCO(str(ann))


def _aug(scale, crop_y, crop_x, color_factors=(1.0, 1.0, 1.0)):
    return {"min_size": tf.constant(0), "scale": tf.constant(scale, tf.float64),
            "crop": tf.constant([crop_y, crop_x], tf.float32),
            "color_factors": tf.constant(color_factors, tf.float32)}


def _numpy(out):
    return {k: v.numpy() for k, v in out.items()}


def test_jitter_resize_and_window_hand_computed():
    # 40x50 into 128x128 at scale 2: factor 2 * min(128/40, 128/50) = 5.12 -> 204 x 256; the
    # window's offsets are uniform over 0..76 rows and 0..128 columns.
    h, w, factor = augment.jitter_resize(tf.constant(40), tf.constant(50),
                                         tf.constant(2.0, tf.float64), CANVAS)
    assert (int(h), int(w)) == (204, 256) and float(factor) == pytest.approx(5.12)
    window = augment.window(h, w, tf.constant([0.5, 0.25]), CANVAS)
    assert [int(v) for v in window] == [38, 32, 128, 128]  # floor(0.5 * 77), floor(0.25 * 129)
    window = augment.window(h, w, tf.constant([0.9999, 0.0]), CANVAS)
    assert [int(v) for v in window] == [76, 0, 128, 128]
    # Scale 0.1: 20 x 25, no crop: the window is the image, padded by the canvas.
    h, w, _ = augment.jitter_resize(tf.constant(40), tf.constant(50),
                                    tf.constant(0.1, tf.float64), CANVAS)
    assert (int(h), int(w)) == (10, 12)  # floor(40 * 0.256 = 10.24), floor(50 * 0.256 = 12.8)
    assert [int(v) for v in augment.window(h, w, tf.constant([0.7, 0.7]), CANVAS)] == [
        0, 0, 10, 12]


def _reference(ex, coco, kflip, flip, scale, crop, canvas=CANVAS):
    """An independent numpy transform of one example's annotations (from the json through
    pycocotools): flip -> resize by the jitter rule -> window -> clip, cut instances dropped."""
    img_id = int(ex["image/id"])
    info = coco.imgs[img_id]
    h, w = info["height"], info["width"]
    factor = scale * min(canvas[0] / h, canvas[1] / w)
    nh, nw = math.floor(h * factor), math.floor(w * factor)
    spare_h, spare_w = max(nh - canvas[0], 0), max(nw - canvas[1], 0)
    oy = min(int(np.float32(crop[0]) * np.float32(spare_h + 1)), spare_h)
    ox = min(int(np.float32(crop[1]) * np.float32(spare_w + 1)), spare_w)
    wh, ww = min(nh - oy, canvas[0]), min(nw - ox, canvas[1])
    rows = []
    for ann_id, crowd in zip(ex["objects"]["id"].numpy(), ex["objects"]["is_crowd"].numpy()):
        if crowd:
            continue
        ann = coco.anns[int(ann_id)]
        x, y, bw, bh = ann["bbox"]
        box = np.array([x, y, min(x + bw, w), min(y + bh, h)], np.float64)
        mask = coco.annToMask(ann)
        kp = np.array(ann.get("keypoints", [0] * 51), np.float64).reshape(17, 3)
        if flip:
            box = np.array([w - box[2], box[1], w - box[0], box[3]])
            mask = mask[:, ::-1]
            kp = kp[kflip]
            kp[:, 0] = np.where(kp[:, 2] > 0, w - kp[:, 0], 0)
        box = box * np.array([nw / w, nh / h] * 2) - [ox, oy, ox, oy]
        box = np.clip(box, 0, [ww, wh, ww, wh])
        if box[2] - box[0] <= 1e-5 or box[3] - box[1] <= 1e-5:
            continue  # cut away by the window
        kp[:, 0] = kp[:, 0] * nw / w - ox
        kp[:, 1] = kp[:, 1] * nh / h - oy
        inside = ((kp[:, 2] > 0) & (kp[:, 0] >= 0) & (kp[:, 0] <= ww) & (kp[:, 1] >= 0)
                  & (kp[:, 1] <= wh))
        hidden = int(((kp[:, 2] > 0) & ~inside).sum())
        kp[~inside] = 0
        window_mask = _nearest_resize(mask, nh, nw)[oy:oy + wh, ox:ox + ww]
        rows.append(dict(box=box, mask=mask, window_mask=window_mask, keypoints=kp,
                         category=ann["category_id"], hidden=hidden))
    return rows, (nh, nw, oy, ox, wh, ww)


CASES = [  # (flip, scale, crop_y, crop_x)
    (False, 2.0, 0.0, 0.0), (True, 2.0, 0.9999, 0.9999), (False, 1.7, 0.5, 0.9),
    (True, 1.3, 0.2, 0.6), (False, 0.6, 0.3, 0.3), (True, 0.1, 0.0, 0.0)]


def test_scale_jitter_boxes_masks_keypoints_match_the_transformed_annotations(hand):
    """Per example and case: the window's size, boxes (clipped), classes, keypoints (flip map,
    visibility 0 outside) equal the numpy transform of the json's annotations; the cropped gt
    masks pasted over their boxes at the original resolution equal the pycocotools masks exactly,
    and in the window they match the pycocotools mask flipped, nearest-resized and cropped the
    same way (IoU >= 0.8 each, 0.9 mean: nearest resampling's staircase, as without jitter)."""
    d, builder, coco = hand
    kflip = builder.info.metadata["keypoint_flip"]
    label_of = {1: 1, 18: 2}
    dropped = kept = keypoints_hidden = 0
    ious = []
    for ex in _examples(builder, "train"):
        for flip, scale, cy, cx in CASES:
            out = _numpy(ip.preprocess_example(ex, tf.constant(flip), d, kflip,
                                               aug=_aug(scale, cy, cx)))
            want, (nh, nw, oy, ox, wh, ww) = _reference(ex, coco, kflip, flip, scale, (cy, cx))
            assert tuple(out["image_size"]) == (wh, ww)
            n = len(want)
            total = int((~ex["objects"]["is_crowd"].numpy()).sum())
            dropped, kept = dropped + total - n, kept + n
            assert int(out["gt_valid"].sum()) == n, (int(ex["image/id"]), flip, scale, cy, cx)
            if not n:
                continue
            np.testing.assert_allclose(out["gt_boxes"][:n], [r["box"] for r in want], atol=1e-3)
            assert list(out["gt_classes"][:n]) == [label_of[r["category"]] for r in want]
            kp = np.stack([r["keypoints"] for r in want])
            np.testing.assert_allclose(out["gt_keypoints"][:n], kp, atol=1e-3)
            keypoints_hidden += sum(r["hidden"] for r in want)
            shift = np.array([ox, oy, ox, oy], np.float32)
            ratios = np.array([nw / 50, nh / 40] * 2, np.float32)
            for j, r in enumerate(want):
                back = (out["gt_mask_boxes"][j] + shift) / ratios
                np.testing.assert_array_equal(_paste(out["gt_masks"][j], back, 40, 50),
                                              r["mask"].astype(bool))
                if r["window_mask"].sum() >= 20:  # IoU of a few pixels is noise
                    pasted = _paste(out["gt_masks"][j], out["gt_mask_boxes"][j], wh, ww)
                    ref = r["window_mask"].astype(bool)
                    ious.append((pasted & ref).sum() / (pasted | ref).sum())
    assert dropped >= 3 and kept >= 15, (dropped, kept)  # the crop cut instances away
    assert keypoints_hidden >= 5, keypoints_hidden  # visible keypoints the window left out
    assert len(ious) >= 10 and min(ious) >= 0.8 and np.mean(ious) >= 0.9, ious


def test_scale_jitter_pixels_of_the_window_equal_the_resized_crop(hand):
    """The train path (uint8 pixels, the window's rows/columns of the resize taps, normalised and
    resized on the device) equals the eval path's float resize of the whole image, cropped."""
    d, builder, _ = hand
    for ex in _examples(builder, "train"):
        for flip, scale, cy, cx in CASES:
            args = (ex, tf.constant(flip), d)
            ref = _numpy(ip.preprocess_example(*args, aug=_aug(scale, cy, cx)))
            raw = _numpy(ip.preprocess_example(*args, raw_image=True, aug=_aug(scale, cy, cx)))
            wh, ww = raw["image_size"]
            batch = {"image": raw["image"][None], "image_size": raw["image_size"][None]}
            for key, size in (("resize_rows", CANVAS[0]), ("resize_row_weights", CANVAS[0]),
                              ("resize_cols", CANVAS[1]), ("resize_col_weights", CANVAS[1])):
                batch[key] = np.pad(raw[key], [(0, size - len(raw[key])), (0, 0)])[None]
            canvas = np.asarray(device_transform.canvas_batch(batch, d.pixel_mean,
                                                              d.pixel_std)["image"][0])
            np.testing.assert_allclose(canvas, ref["image"], atol=2e-5)
            assert not canvas[wh:].any() and not canvas[:, ww:].any()


def test_multiscale_short_sides_follow_the_rule_cover_the_list_and_resume(shapes_cfg,
                                                                            shapes_builder):
    """Each image's size is torchvision's rule at one of the listed short sides (max_size still
    caps the long side), several sizes occur, and the draws survive a resume."""
    cfg = shapes_cfg.copy_and_resolve_references()
    sizes = (48, 64, 80, 96)
    cfg.data.train_min_sizes = sizes
    originals = {tuple(ip.decode_image(ex["image"]).shape[:2])
                 for ex in _examples(shapes_builder, "train")}
    allowed = {transforms.resized_size(h, w, s, cfg.data.max_size): s
               for h, w in originals for s in sizes}
    run = _take(cfg, shapes_builder, 0, 12)
    drawn = set()
    for batch in run:
        for h, w in batch["image_size"]:
            assert (int(h), int(w)) in allowed, (h, w)
            drawn.add(allowed[int(h), int(w)])
    assert len(drawn) >= 3, drawn
    # The draws are a function of (seed, epoch, image): the same run again, and resumed.
    assert _same(run, _take(cfg, shapes_builder, 0, 12))
    assert _same(run[7:], _take(cfg, shapes_builder, 7, 5))
    cfg.data.train_min_sizes = ()
    assert not _same(run, _take(cfg, shapes_builder, 0, 12))


def _torchvision_jitter(x, b, c, s):
    """torchvision.transforms.functional's adjust_brightness / contrast / saturation on float
    [0, 1] images, in numpy: _blend(img1, img2, ratio) = clamp(ratio * img1 + (1 - ratio) * img2)."""
    def gray(v):
        return (0.2989 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2])[..., None]
    x = np.clip(b * x, 0, 1)
    x = np.clip(c * x + (1 - c) * gray(x).mean(), 0, 1)
    return np.clip(s * x + (1 - s) * gray(x), 0, 1)


def test_color_jitter_equals_torchvision_formulas_and_skips_the_padding():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 12, 16, 3)).astype(np.float32)
    factors = np.array([[1.3, 0.6, 1.4], [0.7, 1.4, 0.5]], np.float32)
    valid = np.ones((2, 12, 16, 1), bool)
    got = np.asarray(color.jitter_unit_images(jnp.asarray(x), jnp.asarray(valid),
                                              jnp.asarray(factors)))
    for i in range(2):
        np.testing.assert_allclose(got[i], _torchvision_jitter(x[i], *factors[i]), atol=1e-6)
    # Hand case: brightness 2 saturates 0.6 to 1; contrast 0 gives the gray mean everywhere.
    flat = np.full((1, 2, 2, 3), 0.6, np.float32)
    ones = np.ones((1, 2, 2, 1), bool)
    out = color.jitter_unit_images(flat, ones, jnp.asarray([[2.0, 1.0, 1.0]]))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    out = color.jitter_unit_images(x[:1], np.ones((1, 12, 16, 1), bool),
                                   jnp.asarray([[1.0, 0.0, 1.0]]))
    gray = (x[0] @ np.array([0.2989, 0.587, 0.114], np.float32)).mean()
    np.testing.assert_allclose(out, gray, atol=1e-5)
    # On a normalised canvas: the image part equals the jitter of its pixels alone (the padding
    # does not enter the contrast mean), the padding stays 0, factors 1 change nothing.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    canvas = np.zeros((2, 16, 20, 3), np.float32)
    canvas[:, :12, :16] = (x - mean) / std
    size = np.array([[12, 16], [12, 16]], np.int32)
    out = np.asarray(color.jitter_canvas(jnp.asarray(canvas), size, factors, mean, std))
    np.testing.assert_allclose(out[:, :12, :16] * std + mean, got, atol=1e-5)
    assert not out[:, 12:].any() and not out[:, :, 16:].any()
    same = color.jitter_canvas(jnp.asarray(canvas), size, np.ones((2, 3), np.float32), mean, std)
    np.testing.assert_allclose(same, canvas, atol=1e-5)


@pytest.mark.parity
def test_color_jitter_equals_torchvision_live():
    torch = pytest.importorskip("torch")
    tf_fn = pytest.importorskip("torchvision.transforms.functional")
    x = np.random.default_rng(1).uniform(0, 1, (1, 10, 14, 3)).astype(np.float32)
    b, c, s = 1.2, 0.7, 1.5
    t = torch.tensor(x[0]).permute(2, 0, 1)
    t = tf_fn.adjust_saturation(tf_fn.adjust_contrast(tf_fn.adjust_brightness(t, b), c), s)
    got = color.jitter_unit_images(x, np.ones((1, 10, 14, 1), bool), jnp.asarray([[b, c, s]]))
    np.testing.assert_allclose(np.asarray(got)[0], t.permute(1, 2, 0).numpy(), atol=1e-6)


@pytest.mark.slow
def test_augmented_stream_trains_a_step_with_an_image_cut_empty(shapes_cfg, shapes_builder):
    """A stream with jitter and colour: the colour factors travel with the batch, drawn in
    range; a batch whose first image lost every instance gives finite losses, and the step's
    colour jitter changes them."""
    import jax

    from mrcnn_jax import train_lib
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    cfg = shapes_cfg.copy_and_resolve_references()
    cfg.data.scale_jitter = (0.5, 2.0)
    cfg.data.color_jitter = (0.4, 0.4, 0.4)
    batch = {k: np.array(v) for k, v in _take(cfg, shapes_builder, 0, 1)[0].items()}
    f = batch["color_factors"]
    assert f.shape == (2, 3) and (f >= 0.6).all() and (f <= 1.4).all() and np.ptp(f) > 0
    batch["gt_valid"][0] = False
    batch["gt_classes"][0] = 0
    keys = train_lib.step_batch_keys(cfg.model, batch)
    assert "color_factors" in keys and "resize_rows" in keys
    # The device transform applies the factors: the canvas differs from the unjittered one.
    jittered = device_transform.canvas_batch(batch, cfg.data.pixel_mean, cfg.data.pixel_std)
    plain = device_transform.canvas_batch({k: v for k, v in batch.items()
                                           if k != "color_factors"},
                                          cfg.data.pixel_mean, cfg.data.pixel_std)
    assert "color_factors" not in jittered
    assert np.abs(np.asarray(jittered["image"]) - np.asarray(plain["image"])).max() > 0.05
    model = MaskRCNN(cfg.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    tx = train_lib.make_optimizer(cfg, variables["params"])
    state = train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1))
    step = jax.jit(train_lib.make_train_step(model, tx, data_config=cfg.data))
    _, metrics = step(state, {k: batch[k] for k in keys})
    assert np.isfinite(float(metrics["loss"])), metrics
    assert float(metrics["loss_mask"]) > 0  # the second image's instances still train


def test_config_errors_name_the_field(shapes_cfg, shapes_builder):
    cases = [
        ("scale_jitter", (2.0, 0.1), "data.scale_jitter"),
        ("scale_jitter", (0.5,), "data.scale_jitter"),
        ("train_min_sizes", (64, 200), "data.train_min_sizes"),
        ("color_jitter", (0.2, 1.5, 0.0), "data.color_jitter"),
    ]
    for field, value, name in cases:
        cfg = shapes_cfg.copy_and_resolve_references()
        cfg.data[field] = value
        with pytest.raises(ValueError, match=name):
            ip.make_train_dataset(cfg, builder=shapes_builder)
    cfg = shapes_cfg.copy_and_resolve_references()
    cfg.data.scale_jitter, cfg.data.train_min_sizes = (0.1, 2.0), (64,)
    with pytest.raises(ValueError, match="set one of them"):
        ip.make_train_dataset(cfg, builder=shapes_builder)


def _load_config(name):
    return load_config(pathlib.Path(__file__).resolve().parents[2] / "configs" / name)


def test_recipe_configs_schedules_and_draws():
    """configs/fpn_r50_3x_ms.py and configs/fpn_r50_lsj.py: their LR at the recipe's steps and
    the distribution of their per-image draws over 600 images."""
    from mrcnn_jax import train_lib

    ms, lsj = _load_config("fpn_r50_3x_ms.py"), _load_config("fpn_r50_lsj.py")
    for config in (ms, lsj):
        augment.check_config(config.data)
        ip._check_data_config(config.data)
    lr = train_lib.learning_rate(ms.train)
    np.testing.assert_allclose([lr(0), lr(1000), lr(209_999), lr(210_000), lr(250_000)],
                               [0.02 * 1e-3, 0.02, 0.02, 0.002, 0.0002], rtol=1e-5)
    lr = train_lib.learning_rate(lsj.train)
    np.testing.assert_allclose([lr(0), lr(500), lr(163_888), lr(163_889), lr(177_546)],
                               [0.1 * 0.067, 0.1, 0.1, 0.01, 0.001], rtol=1e-5)
    keys = tf.stack([tf.zeros([600], tf.int64), tf.range(600, dtype=tf.int64)], 1)
    sizes = tf.map_fn(lambda k: augment.draw(k, ms.data)["min_size"], keys,
                      fn_output_signature=tf.int32).numpy()
    counts = np.bincount(sizes)[list(ms.data.train_min_sizes)]
    assert counts.sum() == 600 and counts.min() > 600 / 6 * 0.7, counts
    scales = tf.map_fn(lambda k: augment.draw(k, lsj.data)["scale"], keys,
                       fn_output_signature=tf.float64).numpy()
    assert 0.1 <= scales.min() < 0.2 and 1.9 < scales.max() <= 2.0
    assert abs(scales.mean() - 1.05) < 0.08
