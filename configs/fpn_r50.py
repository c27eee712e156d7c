"""Mask R-CNN, ResNet-50-FPN, COCO 1x (90k iterations at batch 16, LR 0.02, steps at 60k/80k)."""

from mrcnn_jax.config_base import base_config


def get_config():
    return base_config()
