"""Mask R-CNN, ResNet-50-C4 (the paper's C4 backbone, detectron2's R50-C4), COCO 1x.

RPN and RoIAlign on res4 (stride 16, 1024 channels) with 15 anchors per cell (sizes 32..512 x
ratios 0.5, 1, 2 on the one level), res5 (stride-2 first block) as the box head on 14x14 RoI
features, average-pooled to the 2048-d vector the box predictor reads, and the mask branch
deconvolving res5's 7x7 output to 14x14 masks (paper Figure 4, left). Proposal counts are
detectron2's for C4 (12000/6000 before NMS, 2000/1000 after). Kept from the FPN base (and the
paper): RoIAlign with aligned=False and sampling ratio 2 (detectron2's C4 uses ROIAlignV2,
aligned=True with adaptive sampling). The switches: mrcnn_jax/ablations.py.
"""

from mrcnn_jax.ablations import apply_ablation
from mrcnn_jax.config_base import base_config


def get_config():
    config = apply_ablation(base_config(), "c4")
    m = config.model
    m.rpn_pre_nms_top_n_train = 12000
    m.rpn_pre_nms_top_n_test = 6000
    m.rpn_post_nms_top_n_train = 2000
    m.rpn_post_nms_top_n_test = 1000
    return config
