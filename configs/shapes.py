"""The synthetic shapes data set (circle, square, triangle) on a small static canvas.

The data section is complete: `mrcnn_jax.data.coco_instances.get_builder(config.data)` generates
the set under `data.shapes.root` when it is missing (or was generated with other parameters),
builds the tfds copy under `data.data_dir`, and the input pipeline reads it. Images are
`shapes.size` pixels high and 0.8-1.25 times as wide; they are resized so the long side is at most
`max_size` and padded to the square canvas.

Model and training fields (the `make demo` budget: mask AP@[.5:.95] >= 0.5 on the val split in
<= 20 minutes of a 2-core CPU, data generation included) are set below; override any with
`--config.model.x=...` / `--config.train.x=...`.
`arg` ("root=DIR") changes where the data set and its tfds copy live.
"""

import ml_collections

from mrcnn_jax.config_base import base_config
from mrcnn_jax.data import shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root = "data/shapes"
    if arg:
        key, _, value = arg.partition("=")
        if key != "root" or not value:
            raise ValueError(f"configs/shapes.py: arg must be 'root=DIR', got {arg!r}")
        root = value

    c = base_config()
    c.model.num_classes = len(shapes.CLASS_NAMES) + 1  # + background

    d = c.data
    generated_dataset(d, "shapes", shapes, root, size=256)
    d.max_instances = 16  # the generator draws at most 6 shapes (+ 1 crowd region)
    d.gt_mask_size = 64  # shapes are at most ~115 px across: 64² keeps the 28² targets sharp
    d.shuffle_buffer = 1000

    _model_and_training(c)
    return c


def generated_dataset(d: ml_collections.ConfigDict, name: str, generator, root: str,
                      size: int) -> None:
    """Points `d` (a data section) at a generated COCO-format set (`generator` is its module,
    e.g. `mrcnn_jax.data.shapes`) under `root`, on a `size`² canvas."""
    d[name] = ml_collections.ConfigDict(
        dict(root=root, num_train=1000, num_val=100, size=size, seed=0))
    train_images, train_annotations = generator.annotation_paths(root, "train")
    eval_images, eval_annotations = generator.annotation_paths(root, "val")
    d.dataset = "coco_format"
    d.dataset_name = name
    d.data_dir = f"{root}/tfds"
    d.train_images = str(train_images)
    d.train_annotations = str(train_annotations)
    d.eval_images = str(eval_images)
    d.eval_annotations = str(eval_annotations)
    d.min_size = size
    d.max_size = size
    d.canvas_size = (size, size)
    # The generators' widest images (aspect 1.25) reach the device unresized: exact resizes.
    d.raw_canvas_size = (size, int(round(size * max(generator.ASPECT_RATIOS))))


def _model_and_training(c: ml_collections.ConfigDict) -> None:
    """A small from-scratch model and a short schedule for the CPU demo (see the module doc)."""
    m = c.model
    # No ImageNet weights: a tiny ResNet trained from scratch, every stage trainable.
    m.backbone = "resnet_tiny"
    m.trainable_backbone_layers = 5
    m.fpn_channels = 64
    # Shapes are ~35-115 px across on the 256 px canvas: anchors one octave below COCO's.
    m.anchor_sizes = (16, 32, 64, 128, 256)
    # At most 6 objects per image: far fewer proposals and sampled RoIs than on COCO.
    m.rpn_pre_nms_top_n_train = 600
    m.rpn_post_nms_top_n_train = 300
    m.rpn_pre_nms_top_n_test = 300
    m.rpn_post_nms_top_n_test = 100
    m.rpn_batch_size_per_image = 128
    m.box_batch_size_per_image = 64
    m.box_head_dim = 256
    # 2 x 32 channels suffice for three convex shapes and keep the CPU step short.
    m.mask_head_layers = (32, 32)
    m.num_mask_rois = 16  # <= 25 % foreground of 64 RoIs
    m.box_nms_candidates = 500

    t = c.train
    t.global_batch_size = 4
    t.base_batch_size = 4
    t.base_lr = 0.02
    # 1800 steps fit the demo's budget on a 2-core CPU; half of them (benchmarks/ablations.py)
    # reach about half the AP: the later steps are where the AP comes from. Measured AP and
    # times: README.md, "Results".
    t.num_steps = 1800
    t.warmup_steps = 100
    t.lr_decay_steps = (5 / 6,)  # step 1500 of 1800
    t.grad_clip_norm = 10.0
    t.log_every_steps = 25
    t.checkpoint_every_steps = 500
    t.keep_checkpoints = 1

    c.eval.batch_size = 4
    c.eval.num_vis = 8
