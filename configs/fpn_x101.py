"""Mask R-CNN, ResNeXt-101 32x8d-FPN, COCO 1x."""

from mrcnn_jax.config_base import base_config


def get_config():
    config = base_config()
    config.model.backbone = "resnext101_32x8d"
    return config
