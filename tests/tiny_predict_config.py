"""The tiny predictor config the command-line tests write to a file and pass as --config:
random weights, score threshold 0, so every image yields detections (and masks) to check."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

TINY_CONFIG = '''
from mrcnn_jax.config_base import base_config


def get_config():
    c = base_config()
    m = c.model
    m.backbone = "resnet_tiny"
    m.fpn_channels = 16
    m.box_head_dim = 32
    m.mask_head_layers = (16, 16)
    m.num_classes = 4
    m.box_score_thresh = 0.0
    m.rpn_pre_nms_top_n_test = 100
    m.rpn_post_nms_top_n_test = 50
    m.detections_per_img = 10
    m.box_nms_candidates = 200
    c.data.min_size = 64
    c.data.max_size = 96
    return c
'''


def load_config(path: str | pathlib.Path) -> Any:
    """`get_config()` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
