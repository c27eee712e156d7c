"""Mask R-CNN, ResNet-101-FPN, COCO 1x."""

from mrcnn_jax.config_base import base_config


def get_config():
    config = base_config()
    config.model.backbone = "resnet101"
    return config
