"""BreadCrumb, the worked example of training on your own export: real phone photos of breadboard
components (button, capacitor, led, logic gate, resistor; 80 train / 10 valid / 20 test images,
512 px, polygons; a Roboflow COCO export, CC BY 4.0, liuandy1207/BreadCrumb on GitHub).

    python train.py --config=configs/breadcrumb.py --workdir=workdir_breadcrumb
    python train.py --config=configs/breadcrumb.py:/path/to/breadcrumb --workdir=...

The argument is the export folder (default ../shared/data/breadcrumb beside the checkout).
`configs/coco_export.py` reads the splits and classes (Roboflow's unused parent class, id 0, is
dropped: 5 classes); the test split evaluates. The model is the demo's from-scratch ResNet-FPN
(no ImageNet weights needed) at 384 px with anchors one octave below COCO's, as the components
are 10-50 px across there; the schedule fits half an hour of a 2-core CPU. With ImageNet weights,
configs/coco_export.py's R50-FPN is the stronger start.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

DEFAULT_FOLDER = "../shared/data/breadcrumb"
SIZE = 384


def _coco_export():
    spec = importlib.util.spec_from_file_location(
        "coco_export", pathlib.Path(__file__).with_name("coco_export.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _coco_export().get_config(f"{arg or DEFAULT_FOLDER},size={SIZE},eval=test")
    c.data.dataset_name = "breadcrumb"
    c.data.max_instances = 32
    c.data.gt_mask_size = 56
    c.data.shuffle_buffer = 100

    m = c.model
    m.backbone = "resnet_tiny"
    m.trainable_backbone_layers = 5
    m.fpn_channels = 64
    m.anchor_sizes = (16, 32, 64, 128, 256)
    m.rpn_pre_nms_top_n_train = 1000
    m.rpn_post_nms_top_n_train = 500
    m.rpn_pre_nms_top_n_test = 500
    m.rpn_post_nms_top_n_test = 200
    m.rpn_batch_size_per_image = 128
    m.box_batch_size_per_image = 128
    m.box_head_dim = 256
    m.mask_head_layers = (64, 64)
    m.num_mask_rois = 32
    m.box_nms_candidates = 1000

    t = c.train
    t.global_batch_size = 4
    t.base_batch_size = 4
    t.base_lr = 0.02
    t.num_steps = 2400
    t.warmup_steps = 100
    t.lr_decay_steps = (5 / 6,)
    t.grad_clip_norm = 10.0
    t.log_every_steps = 50
    t.checkpoint_every_steps = 600
    t.keep_checkpoints = 1

    c.eval.batch_size = 4
    c.eval.num_vis = 4
    return c
