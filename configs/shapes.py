"""The synthetic shapes data set (circle, square, triangle) on a small static canvas.

The data section is complete: `mrcnn_jax.data.coco_instances.get_builder(config.data)` generates
the set under `data.shapes.root` when it is missing (or was generated with other parameters),
builds the tfds copy under `data.data_dir`, and the input pipeline reads it. Images are
`shapes.size` pixels high and 0.8-1.25 times as wide; they are resized so the long side is at most
`max_size` and padded to the square canvas.

Model and training fields are the base config's (COCO) except the number of classes, which the
data fixes; the demo/training side overrides the rest (e.g. `--config.train.num_steps=...`).
`arg` ("root=DIR") changes where the data set and its tfds copy live.
"""

import ml_collections

from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root = "data/shapes"
    if arg:
        key, _, value = arg.partition("=")
        if key != "root" or not value:
            raise ValueError(f"configs/shapes.py: arg must be 'root=DIR', got {arg!r}")
        root = value

    c = base_config()
    c.model.num_classes = len(shapes.CLASS_NAMES) + 1  # + background

    d = c.data
    d.shapes = ml_collections.ConfigDict(
        dict(root=root, num_train=1000, num_val=100, size=256, seed=0))
    train_images, train_annotations = shapes.annotation_paths(root, "train")
    eval_images, eval_annotations = shapes.annotation_paths(root, "val")
    d.dataset = "coco_format"
    d.dataset_name = "shapes"
    d.data_dir = f"{root}/tfds"
    d.train_images = str(train_images)
    d.train_annotations = str(train_annotations)
    d.eval_images = str(eval_images)
    d.eval_annotations = str(eval_annotations)
    d.min_size = 256
    d.max_size = 256
    d.canvas_size = (256, 256)
    d.max_instances = 16  # the generator draws at most 6 shapes (+ 1 crowd region)
    d.gt_mask_size = 64  # shapes are at most ~115 px across: 64² keeps the 28² targets sharp
    d.shuffle_buffer = 1000
    return c
