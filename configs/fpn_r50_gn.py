"""Mask R-CNN, ResNet-50-FPN with GroupNorm (32 groups) in the backbone, the FPN and the RoI
heads, as detectron2's `mask_rcnn_R_50_FPN_*_gn` configs: GN after every FPN lateral/output conv,
a 4conv1fc box head (4 x conv 3x3 256 + GN + ReLU, one FC 1024) and GN in the 4 mask-head convs.
GN layers train (they are parameters, not frozen constants). The switches: mrcnn_jax/ablations.py.
"""

from mrcnn_jax.ablations import apply_ablation
from mrcnn_jax.config_base import base_config


def get_config():
    return apply_ablation(base_config(), "group_norm")
