"""Keypoint R-CNN on the synthetic stick figures (mrcnn_jax/data/keypoint_shapes.py), on CPU.

The data set (COCO-format person keypoints, 17 COCO keypoints, masks) is generated under
`data.keypoint_shapes.root` when missing and read by the same builder and pipeline as COCO; the
evaluation reports box and keypoint (OKS) AP with pycocotools. The model is the small from-scratch
one of configs/shapes.py with the keypoint branch on (narrower than torchvision's 8 x 512 convs)
and the mask branch off, as torchvision's keypointrcnn. `arg` ("root=DIR") moves the data.
The schedule is configs/shapes.py's (1800 steps at batch 4), aimed at keypoint AP >= 0.5 within
20 minutes of a 2-core CPU, data generation included; tests/keypoints/test_keypoint_shapes_slow.py
runs this config as is. Measured AP and time: README.md, "Results".
"""

import ml_collections

from configs import shapes as shapes_config
from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import keypoint_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root = "data/keypoint_shapes"
    if arg:
        key, _, value = arg.partition("=")
        if key != "root" or not value:
            raise ValueError(f"configs/keypoint_shapes.py: arg must be 'root=DIR', got {arg!r}")
        root = value

    c = base_config()
    d = c.data
    shapes_config.generated_dataset(d, "keypoint_shapes", keypoint_shapes, root, size=256)
    d.max_instances = 4  # at most 3 figures per image
    d.gt_mask_size = 32  # masks are not trained (no mask branch) but the batch carries them

    shapes_config._model_and_training(c)
    m = c.model
    m.num_classes = 2  # background, person
    m.mask_head = False
    m.keypoint_head = True
    m.keypoint_head_layers = (64,) * 4
    m.num_keypoint_rois = 16  # <= 25 % foreground of 64 RoIs
    m.anchor_aspect_ratios = (0.5, 1.0, 2.0)
    c.eval.num_vis = 8
    return c
