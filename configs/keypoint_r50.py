"""Keypoint R-CNN, ResNet-50-FPN: torchvision's `keypointrcnn_resnet50_fpn` (COCO persons).

The architecture of base_config() with 2 classes (background, person), no mask branch and the
keypoint branch (14x14 RoIAlign, 8 x conv 3x3 512, deconv + 2x bilinear -> 56x56 heatmaps for
COCO's 17 keypoints). torchvision's COCO_V1 weights need FrozenBN eps 0 (set by
`checkpoints.torchvision.import_keypointrcnn`). torchvision trains with min_size drawn from
(640, ..., 800) and tests at 800; we keep the fixed 800/1333 resize. Only images with persons
(the keypoint annotations' category) are used: point `data` at the person-keypoint json, e.g.
`data.dataset="coco_format"` with `train_annotations=.../person_keypoints_train2017.json`, or the
`coco_instances/2017` builder (which merges the keypoints; all 80 classes are then labels and
`model.num_classes` must be 91 - torchvision's keypoint head trains on every foreground RoI).
"""

from mrcnn_jax.checkpoints.torchvision import KEYPOINTRCNN_CONFIG_OVERRIDES
from mrcnn_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.update(KEYPOINTRCNN_CONFIG_OVERRIDES)
    return c
