"""Mask R-CNN, ResNet-50-FPN with large-scale jitter, after detectron2's
`new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ` (the recipe of Ghiasi et al. 2021, "Simple
Copy-Paste", without the copy-paste; torchvision trained its v2 weights the same way, 400
epochs):
- from scratch (no ImageNet weights), every backbone stage trained;
- training images resized to fit 1024 x 1024 times a scale in [0.1, 2.0], then a random
  1024 x 1024 crop / pad (`data.scale_jitter`), horizontal flips;
- 2-conv RPN head, 4conv1fc box head, normalisation in the backbone, FPN and heads;
- batch 64, SGD LR 0.1, weight decay 4e-5, 500 warmup steps from 0.067 of the LR, 184,375 steps
  (100 epochs of COCO train2017) with x0.1 decays at 163,889 and 177,546.

Aims at detectron2's published 44.6 box AP / 40.3 mask AP on COCO val2017. Two differences to
know: detectron2 normalises with synchronised BatchNorm, this config with GroupNorm (32 groups;
the trainable normalisation this project has, the GroupNorm paper's from-scratch choice), and
the canvas is shared by training and evaluation, so evaluation resizes to 1024 / 1024 (the TF
TPU detection recipe's test size) where detectron2 tests at 800 / 1333; for that rule pass
`--config.data.min_size=800 --config.data.max_size=1333 --config.data.canvas_size=1344,1344` to
eval.py.
"""

from mrcnn_jax.ablations import apply_ablation
from mrcnn_jax.config_base import base_config

SIZE = 1024


def get_config():
    config = apply_ablation(base_config(), "group_norm")
    m = config.model
    m.rpn_conv_depth = 2
    m.trainable_backbone_layers = 5

    d = config.data
    d.scale_jitter = (0.1, 2.0)
    d.canvas_size = (SIZE, SIZE)
    d.min_size = d.max_size = SIZE

    t = config.train
    t.init_from = ""
    t.global_batch_size = t.base_batch_size = 64
    t.base_lr = 0.1
    t.weight_decay = 4e-5
    t.num_steps = 184_375
    t.warmup_steps = 500
    t.warmup_factor = 0.067
    t.lr_decay_steps = (163_889, 177_546)
    return config
