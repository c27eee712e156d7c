"""Any config with one of the paper's ablations switched on (mrcnn_jax/ablations.py).

    --config=configs/ablations.py:roi_warp           ResNet-50-FPN (configs/fpn_r50.py) + RoIWarp
    --config=configs/ablations.py:shapes,multinomial configs/shapes.py + softmax mask loss

`arg` = "[shapes,]NAME[+NAME...]" with NAME among baseline, roi_pool, roi_warp, class_agnostic,
multinomial, c4, group_norm, bfloat16, resnet101, resnext101. On shapes (the tiny from-scratch
ResNet), group_norm uses 8 groups (the stem has 8 channels) and a 4conv1fc head of 64-channel
convs, the width of its other heads; resnet101/resnext101 are the COCO backbones and far over a CPU budget.
"""

import importlib.util
import pathlib

from mrcnn_jax.ablations import apply_ablation
from mrcnn_jax.config_base import base_config

# The shapes data and model live in configs/shapes.py (not a package: load it by path).
_SHAPES = pathlib.Path(__file__).resolve().parent / "shapes.py"
# GroupNorm groups and 4conv1fc widths that fit the shapes model's 8..64-channel layers.
SHAPES_GROUP_NORM_GROUPS = 8
SHAPES_BOX_HEAD_CONV_DIMS = (64, 64, 64, 64)


def shapes_config(root: str | None = None):
    spec = importlib.util.spec_from_file_location("configs_shapes", _SHAPES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"root={root}" if root else None)


def get_config(arg: str | None = None):
    parts = (arg or "baseline").split(",")
    on_shapes = parts[0] == "shapes"
    if on_shapes:
        parts = parts[1:]
    if len(parts) != 1 or not parts[0]:
        raise ValueError(f"configs/ablations.py: arg must be '[shapes,]NAME[+NAME...]', "
                         f"got {arg!r}")
    config = shapes_config() if on_shapes else base_config()
    for name in parts[0].split("+"):
        apply_ablation(config, name)
        if on_shapes and name == "group_norm":
            config.model.group_norm_groups = SHAPES_GROUP_NORM_GROUPS
            config.model.box_head_conv_dims = SHAPES_BOX_HEAD_CONV_DIMS
    return config
