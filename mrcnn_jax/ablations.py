"""The Mask R-CNN paper's ablations (He et al. 2017, Table 2) as named `config.model` overrides.

Each ablation is a switch of `config.model` (config_base.py); this module names the switches,
the paper's reported effect of each (for docs/ablations.md and benchmarks/ablations.py), and
applies them to any config, so configs/c4_r50.py, configs/fpn_r50_gn.py, configs/ablations.py and
the benchmark share one definition:

    config = configs/shapes.py's get_config(); apply_ablation(config, "c4")

`apply_ablation` derives what depends on the config it starts from (C4 puts all of the config's
FPN anchor sizes on the single res4 level, as detectron2's R50-C4 does with 32..512).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One switch: the `config.model` fields it sets and what the paper reports for it."""

    name: str
    fields: str  # the config.model fields, as users type them in overrides
    description: str
    paper: str  # the paper's reported effect (Table 2, COCO minival mask AP), or "" if none
    overrides: dict[str, Any]


# detectron2's R50-C4 anchors: all five sizes on the single stride-16 level.
C4_ANCHOR_STRIDE = 16

ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("baseline", "-", "RoIAlign, per-class sigmoid masks, FPN, FrozenBN",
             "ResNet-50-FPN: 33.6 mask AP (Table 2a reference row)", {}),
    Ablation("roi_pool", "model.pooler=pool",
             "RoIPool (quantised box and bins, max) in every pooler",
             "26.9 AP vs RoIAlign 30.3 (-3.4, ResNet-50-C4, Table 2c); 23.6 vs 30.9 "
             "(-7.3) on stride-32 C5 features (Table 2d)", {"pooler": "pool"}),
    Ablation("roi_warp", "model.pooler=warp",
             "RoIWarp (quantised box, bilinear resize) in every pooler",
             "RoIWarp 27.2 / 27.1 AP vs RoIAlign 30.2 / 30.3 (ResNet-50-C4, max / avg; "
             "Table 2c)", {"pooler": "warp"}),
    Ablation("class_agnostic", "model.mask_class_agnostic=True",
             "one mask for all classes (instead of one per class)",
             "29.7 AP vs 30.3 class-specific (ResNet-50-C4, text of section 4.2)",
             {"mask_class_agnostic": True}),
    Ablation("multinomial", "model.mask_loss=softmax",
             "softmax over classes per pixel (instead of per-class sigmoid BCE)",
             "24.8 AP vs 30.3 sigmoid (-5.5 AP, ResNet-50-C4, Table 2b)",
             {"mask_loss": "softmax"}),
    Ablation("c4", "model.architecture=c4",
             "RPN and RoIAlign on res4 (stride 16), res5 as the box head, 14x14 masks",
             "ResNet-50-C4 30.3 vs ResNet-50-FPN 33.6 AP (+3.3 for FPN, Table 2a)",
             {"architecture": "c4"}),
    Ablation("group_norm", "model.norm/fpn_norm/head_norm=group_norm, box_head=4conv1fc",
             "GroupNorm in backbone, FPN and heads (4conv1fc box head), as detectron2's GN "
             "configs",
             "not in the paper; the GroupNorm paper (Wu & He 2018, sec. 6.1) reports about "
             "+1 box and mask AP over frozen BN for R50-FPN Mask R-CNN",
             {"norm": "group_norm", "fpn_norm": "group_norm", "head_norm": "group_norm",
              "box_head": "4conv1fc"}),
    Ablation("bfloat16", "model.dtype=bfloat16",
             "bfloat16 compute (params, optimizer state, losses and box decoding stay float32)",
             "not in the paper; mixed precision is expected to leave AP unchanged (detectron2 "
             "and NVIDIA's MLPerf Mask R-CNN train in fp16/AMP at the fp32 AP)",
             {"dtype": "bfloat16"}),
    Ablation("resnet101", "model.backbone=resnet101", "ResNet-101 body",
             "R101-C4 32.7 vs R50-C4 30.3; R101-FPN 35.4 vs R50-FPN 33.6 AP (Table 2a)",
             {"backbone": "resnet101"}),
    Ablation("resnext101", "model.backbone=resnext101_32x8d", "ResNeXt-101 32x8d body",
             "ResNeXt-101-FPN 36.7 vs ResNet-101-FPN 35.4 AP (Table 2a)",
             {"backbone": "resnext101_32x8d"}),
)}


def apply_ablation(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set the fields of ablation `name` on `config` (in place, also returned).

    "c4" moves all of `config.model.anchor_sizes` onto the one res4 level (stride 16) and pools
    14x14 for both branches with 14x14 mask outputs (paper Figure 4, detectron2 R50-C4).
    """
    if name not in ABLATIONS:
        raise ValueError(f"name: unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
    m = config.model
    m.update(ABLATIONS[name].overrides)
    if name == "c4":
        sizes = [s for level in m.anchor_sizes
                 for s in (level if isinstance(level, (tuple, list)) else (level,))]
        m.anchor_sizes = (tuple(sizes),)
        m.anchor_strides = (C4_ANCHOR_STRIDE,)
        m.box_pool_size = 14
        m.mask_pool_size = 14
        m.mask_resolution = 14
    return config
