"""Mask R-CNN, ResNet-50-FPN as torchvision's `maskrcnn_resnet50_fpn_v2` (its COCO_V1 weights:
47.4 box AP / 41.8 mask AP on COCO val2017, against 37.9 / 34.6 for `maskrcnn_resnet50_fpn`).

The v2 architecture (Li et al. 2021, "Benchmarking Detection Transfer Learning with Vision
Transformers") on top of configs/fpn_r50.py:
- BatchNorm after every FPN lateral and output conv (which lose their bias),
- two 3x3 conv + ReLU layers in the RPN head instead of one,
- the 4conv1fc box head: 4 x (conv 3x3 256, BatchNorm, ReLU), flatten, one FC 1024 + ReLU,
- BatchNorm between each of the 4 mask-head convs and its ReLU.
The backbone's BatchNorm2d and all these run with their running statistics at inference, which is
`frozen_bn` with torchvision's eps 1e-5 (its v2 builder keeps it; only the v1 COCO weights need 0).
Everything else (predictors, anchors, RPN and box-head thresholds and budgets, 800/1333 resize)
is v1's: torchvision's v2 builder passes MaskRCNN's defaults.

For torchvision's v2 weights (`--weights maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth` in
predict.py / eval.py, or `train.init_from`). The BatchNorm layers are frozen constants here
(statistics and affine): fine-tuning from the v2 weights keeps them, as detectron2 keeps FrozenBN;
from random weights they stay the identity, so this config is not for training from scratch
(torchvision trained v2 with synchronised BatchNorm and a 400-epoch large-scale-jitter recipe).
"""

from mrcnn_jax.config_base import base_config


def get_config():
    config = base_config()
    m = config.model
    m.fpn_norm = "frozen_bn"
    m.head_norm = "frozen_bn"
    m.frozen_bn_eps = 1e-5
    m.rpn_conv_depth = 2
    m.box_head = "4conv1fc"
    m.box_head_conv_dims = (256, 256, 256, 256)
    m.box_head_dim = 1024
    return config
