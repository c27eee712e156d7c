"""A tiny Mask R-CNN config and a fixed synthetic batch for train-step tests."""

from __future__ import annotations

import ml_collections
import numpy as np

from mrcnn_jax.config_base import base_config

from tests.training.mask_fixtures import crop_masks, shape_masks, tight_boxes

CANVAS = (96, 96)


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    c = base_config()
    m = c.model
    m.num_classes = 4
    m.backbone = "resnet_tiny"
    m.fpn_channels = 16
    m.box_head_dim = 32
    m.mask_head_layers = (16, 16)
    m.rpn_pre_nms_top_n_train = m.rpn_post_nms_top_n_train = 128
    m.rpn_pre_nms_top_n_test = m.rpn_post_nms_top_n_test = 64
    m.rpn_batch_size_per_image = 64
    m.box_batch_size_per_image = 64
    m.num_mask_rois = 16
    m.mask_roi_buckets = ()  # one mask-head branch: each bucket is compiled with the step
    m.box_nms_candidates = 256
    m.detections_per_img = 10
    c.data.canvas_size = CANVAS
    c.data.max_instances = 4
    c.data.gt_mask_size = 32
    t = c.train
    t.global_batch_size = 2
    t.base_batch_size = 2
    t.base_lr = 0.02
    t.num_steps = 4
    t.warmup_steps = 0
    t.lr_decay_steps = ()
    t.log_every_steps = 1
    t.checkpoint_every_steps = 2
    t.update(train_overrides)
    return c


def fixed_batch(seed: int = 0, batch: int = 2, num_gt=(3, 1)) -> dict[str, np.ndarray]:
    """A batch dict with the input pipeline's keys: textured image, shapes with their masks."""
    rng = np.random.default_rng(seed)
    h, w = CANVAS
    m, s = 4, 32
    out = {
        "image": rng.normal(0, 0.3, (batch, h, w, 3)).astype(np.float32),
        "image_size": np.tile(np.array([[h, w]], np.int32), (batch, 1)),
        "gt_boxes": np.zeros((batch, m, 4), np.float32),
        "gt_classes": np.zeros((batch, m), np.int32),
        "gt_valid": np.zeros((batch, m), bool),
        "gt_masks": np.zeros((batch, m, s, s), np.uint8),
        "gt_mask_boxes": np.zeros((batch, m, 4), np.float32),
    }
    for i in range(batch):
        n = num_gt[i % len(num_gt)]
        masks = shape_masks(rng, CANVAS, n, min_size=16, max_size=40)
        boxes = tight_boxes(masks)
        classes = rng.integers(1, 4, n)
        for k in range(n):
            # Paint each shape with its class colour so the task is learnable.
            out["image"][i][masks[k] > 0] = np.eye(3)[classes[k] - 1] * 2 - 1
        out["gt_boxes"][i, :n] = boxes
        out["gt_mask_boxes"][i, :n] = boxes
        out["gt_classes"][i, :n] = classes
        out["gt_valid"][i, :n] = True
        out["gt_masks"][i, :n] = crop_masks(masks, boxes, s)
    return out


def synthetic_iterator(start_step: int):
    """Batches as a pure function of the step (like the input pipeline): step k -> seed k."""
    step = start_step
    while True:
        yield fixed_batch(seed=step)
        step += 1


def main(argv: list[str]) -> None:
    """`python -m tests.training.train_fixtures WORKDIR NUM_STEPS [SLEEP]`: train tiny_config on
    the synthetic stream with a checkpoint every step (the kill/resume test runs this)."""
    import json
    import os
    import time

    from mrcnn_jax import train_lib

    workdir, num_steps = argv[0], int(argv[1])
    sleep = float(argv[2]) if len(argv) > 2 else 0.0

    def slow_iterator(start):
        for batch in synthetic_iterator(start):
            time.sleep(sleep)  # widens the window in which the test kills the process
            yield batch

    config = tiny_config(num_steps=num_steps, checkpoint_every_steps=1)
    out = train_lib.train_and_evaluate(config, workdir, slow_iterator, evaluate=False)
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(out["train"], f)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
