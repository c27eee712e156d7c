"""Mask R-CNN, ResNet-50-FPN, detectron2's 3x multi-scale recipe (`mask_rcnn_R_50_FPN_3x`):
270k iterations at batch 16, LR 0.02 decayed x0.1 at 210k and 250k, the training short side
drawn per image from (640, 672, ..., 800) with the long side capped at 1333 (ResizeShortestEdge
"choice"), horizontal flips; evaluation at 800 / 1333.

Aims at detectron2's published 41.0 box AP / 37.2 mask AP on COCO val2017 (its model zoo; an
ImageNet ResNet-50 start: `--config.train.init_from=resnet50-0676ba61.pth`, README). detectron2
starts from its MSRA (caffe) ResNet-50, torchvision's weights are this project's: expect a few
tenths of AP either way.
"""

from mrcnn_jax.config_base import base_config


def get_config():
    config = base_config()
    config.data.train_min_sizes = (640, 672, 704, 736, 768, 800)
    t = config.train
    t.num_steps = 270_000
    t.lr_decay_steps = (210_000, 250_000)
    return config
