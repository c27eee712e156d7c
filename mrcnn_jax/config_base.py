"""The one place every constant of the model, data and training lives.

`base_config()` returns torchvision's ResNet-50-FPN Mask R-CNN (v1) with detectron2's COCO 1x
schedule. Files in `configs/` start from it and override fields; nothing in the code base has its
own copy of these numbers. Field names follow torchvision/detectron2 so users can map them.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- Model -------------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.num_classes = 91  # including background (torchvision's COCO head has 91 outputs)
    m.backbone = "resnet50"  # resnet50 | resnet101 | resnext101_32x8d
    m.norm = "frozen_bn"  # frozen_bn | group_norm
    m.frozen_bn_eps = 1e-5  # torchvision's COCO Mask R-CNN checkpoint needs 0.0
    m.group_norm_groups = 32
    m.trainable_backbone_layers = 3  # layer2..layer4 (conv1 and layer1 frozen)
    m.fpn_channels = 256
    # The paper's backbone ablation: "fpn" (RPN on P2..P6, RoI pooling on P2..P5) or "c4"
    # (detectron2's R50-C4: RPN and RoI pooling on res4 at stride 16, res5 as the box head,
    # see configs/c4_r50.py and modeling/backbone/c4.py).
    m.architecture = "fpn"
    # Normalisation after the FPN convs and the RoI head convs: "" (none, torchvision v1),
    # "frozen_bn" (BatchNorm statistics as constants, torchvision v2's weights at inference,
    # configs/fpn_r50_v2.py) or "group_norm" (detectron2's GN configs, configs/fpn_r50_gn.py);
    # the backbone's is `norm`.
    m.fpn_norm = ""
    m.head_norm = ""
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 | auto (bf16 on TPU); params f32
    # How convolutions, dense layers and the stem's max pool are computed (modeling/conv.py):
    # "xla" (flax's stock layers, for GPU/TPU), "cpu" (mrcnn_jax/cpu/'s kernels, whose gradients
    # XLA:CPU runs fast) or "auto" ("cpu" on the CPU backend, "xla" elsewhere). Same parameters.
    m.conv_impl = "auto"
    # Parts whose activations the backward recomputes instead of keeping: some of "backbone"
    # (each bottleneck block), "fpn", "rpn_head" (modeling/remat.py). Less memory for bigger
    # batches at the cost of recomputing them; () keeps everything.
    m.remat = ()

    # Anchors / RPN.
    m.anchor_sizes = (32, 64, 128, 256, 512)  # one per level P2..P6
    m.anchor_aspect_ratios = (0.5, 1.0, 2.0)
    m.anchor_strides = (4, 8, 16, 32, 64)
    m.rpn_pre_nms_top_n_train = 2000
    m.rpn_pre_nms_top_n_test = 1000
    m.rpn_post_nms_top_n_train = 2000
    m.rpn_post_nms_top_n_test = 1000
    m.rpn_nms_thresh = 0.7
    m.rpn_score_thresh = 0.0
    m.rpn_min_size = 1e-3
    m.rpn_fg_iou_thresh = 0.7
    m.rpn_bg_iou_thresh = 0.3
    m.rpn_batch_size_per_image = 256
    m.rpn_positive_fraction = 0.5
    m.rpn_box_weights = (1.0, 1.0, 1.0, 1.0)
    m.rpn_conv_depth = 1  # 3x3 conv + ReLU layers of the RPN head (torchvision v2: 2)

    # RoI heads.
    m.pooler = "align"  # align | pool | warp  (the paper's ablation)
    m.pooler_sampling_ratio = 2
    m.pooler_aligned = False
    m.pooler_canonical_scale = 224
    m.pooler_canonical_level = 4
    m.box_pool_size = 7
    m.mask_pool_size = 14
    m.box_head_dim = 1024
    # Box head: "2fc" (torchvision's TwoMLPHead: two FC of box_head_dim) or "4conv1fc"
    # (detectron2's FastRCNNConvFCHead: box_head_conv_dims 3x3 convs, then one FC of box_head_dim).
    m.box_head = "2fc"
    m.box_head_conv_dims = (256, 256, 256, 256)
    m.box_fg_iou_thresh = 0.5
    m.box_bg_iou_thresh = 0.5
    m.box_batch_size_per_image = 512
    m.box_positive_fraction = 0.25
    m.box_weights = (10.0, 10.0, 5.0, 5.0)
    m.smooth_l1_beta = 1.0 / 9.0
    m.box_score_thresh = 0.05
    m.box_nms_thresh = 0.5
    m.box_min_size = 1e-2
    m.detections_per_img = 100
    # Best valid (proposal, class) pairs by score entering the box NMS: exact torchvision output
    # while <= this many pass score_thresh or 100 survive among them (ops/postprocess.py).
    m.box_nms_candidates = 2000
    m.mask_head_layers = (256, 256, 256, 256)
    m.mask_resolution = 28
    m.num_mask_rois = 128  # fixed foreground slots per image for the mask loss
    # Smaller slot counts the mask head may run on instead, when no image of the (global) batch
    # has more foreground RoIs: the same loss, one compiled branch each, picked per step.
    m.mask_roi_buckets = (8, 16, 32, 64)
    # Slots per image the mask head trains on at a time: a branch of more runs in pieces of this
    # many, recomputed in the backward (modeling/losses.py), so the step's memory is bounded by
    # a piece, not by num_mask_rois (XLA reserves the largest branch's memory). 0 = one piece.
    m.mask_head_chunk = 32
    m.mask_target_sampling_ratio = -1  # RoIAlign of the cropped gt masks; -1 adaptive as torchvision
    m.mask_class_agnostic = False
    # C4 only: channels of the mask deconv on res5's output (detectron2's ROI_MASK_HEAD.CONV_DIM
    # with NUM_CONV 0); the FPN mask head deconvs to mask_head_layers[-1] as torchvision does.
    m.res5_mask_deconv_dim = 256
    # sigmoid (per-class BCE, the paper's) | softmax (multinomial over classes per pixel, the
    # paper's ablation); inference reads the matching probability of the predicted class.
    m.mask_loss = "sigmoid"
    m.mask_threshold = 0.5
    # Branch switches: torchvision's keypointrcnn_resnet50_fpn is mask_head=False,
    # keypoint_head=True (configs/keypoint_r50.py).
    m.mask_head = True
    m.keypoint_head = False
    # Keypoint branch (the paper's section 5, torchvision's KeypointRCNNHeads/Predictor).
    m.num_keypoints = 17
    m.keypoint_pool_size = 14  # RoIAlign 14x14 -> deconv x2 -> bilinear x2 = 56x56 heatmaps
    m.keypoint_head_layers = (512,) * 8
    m.num_keypoint_rois = 128  # fixed foreground slots per image for the keypoint loss
    # As mask_roi_buckets, for the keypoint head (8 convs of 512 channels: most of a keypoint
    # R-CNN step's arithmetic on 128 slots per image).
    m.keypoint_roi_buckets = (32, 64)
    # Static bound (h, w) of the bicubic heatmap resize at inference (ops/keypoints.py); exact
    # for boxes up to this size. 0 = the image canvas (always exact).
    m.keypoint_max_map_size = 0

    # --- Data --------------------------------------------------------------------------------
    d = c.data = ml_collections.ConfigDict()
    d.dataset = "coco_instances/2017"  # tfds name, or "coco_format" for any local dataset
    d.data_dir = ""  # tfds data_dir ("" = tfds default)
    d.manual_dir = ""  # where the official COCO zips / extracted folders are
    d.train_split = "train"
    d.eval_split = "validation"
    # For dataset == "coco_format": the two paths of a local COCO-format dataset per split.
    d.train_images = ""
    d.train_annotations = ""
    d.eval_images = ""
    d.eval_annotations = ""
    d.dataset_name = ""  # name of the local data set's tfds config (a hash of the paths is added)
    d.min_size = 800
    d.max_size = 1333
    d.canvas_size = (1344, 1344)  # (height, width) static canvas, multiple of 32
    # (height, width) of the uint8 pixels a training batch carries to the device, which resizes
    # them (input_pipeline.py, "Training images"); larger images are resized on the host and
    # rounded to uint8. 0 = 640 on COCO 2017 (its longest image side: 4.4x fewer bytes per batch
    # than 1344x1344, every image exact), the canvas side on other data. Below the canvas, an
    # image larger than it whose resized size does not fit either is shrunk to fit (less detail).
    d.raw_canvas_size = (0, 0)
    d.size_divisibility = 32
    d.pixel_mean = (0.485, 0.456, 0.406)
    d.pixel_std = (0.229, 0.224, 0.225)
    d.max_instances = 100
    d.gt_mask_size = 112  # cropped gt masks (DESIGN.md section 4)
    d.gt_mask_border = 0.0
    d.hflip_prob = 0.5
    # Training-time augmentation (data/augment.py), all off by default. Multi-scale: the short
    # side drawn per image from this tuple, e.g. (640, 672, 704, 736, 768, 800); () = min_size.
    d.train_min_sizes = ()
    # Large-scale jitter: resize to the canvas x a scale drawn in (low, high), e.g. (0.1, 2.0),
    # then a random canvas-sized crop / pad; () = off. Exclusive with train_min_sizes.
    d.scale_jitter = ()
    # torchvision's ColorJitter (brightness, contrast, saturation) strengths, applied on device.
    d.color_jitter = (0.0, 0.0, 0.0)
    d.skip_images_without_instances = True
    d.shuffle_buffer = 1000
    d.prefetch = 2
    d.num_parallel_calls = -1  # tf.data.AUTOTUNE

    # --- Training ----------------------------------------------------------------------------
    t = c.train = ml_collections.ConfigDict()
    t.global_batch_size = 16
    t.num_steps = 90_000
    t.base_lr = 0.02  # at base_batch_size images per step; scaled linearly with the batch
    t.base_batch_size = 16
    t.momentum = 0.9
    t.weight_decay = 1e-4
    t.weight_decay_norm_and_bias = True
    t.warmup_steps = 1000
    t.warmup_factor = 1e-3
    # Steps (ints) or fractions of num_steps (floats in (0, 1)): 2/3 and 8/9 of 90k = 60k, 80k.
    t.lr_decay_steps = (2 / 3, 8 / 9)
    t.lr_decay_factor = 0.1
    t.grad_clip_norm = 0.0  # 0 = off
    t.seed = 0
    t.log_every_steps = 20
    t.checkpoint_every_steps = 5000
    t.keep_checkpoints = 3
    t.eval_every_steps = 0  # 0 = only at the end
    # Where the weights start (checkpoints/init_from.py): a torchvision ImageNet classifier (the
    # ResNet body), or a detector: a torchvision Mask/Keypoint R-CNN file, or one of our runs
    # (a workdir, a step of it, exported variables); layers of another class count start fresh.
    t.init_from = ""
    # With a detector: keep the checkpoint's rows of these classes, "new=old,new2=old2,same".
    t.init_from_classes = ""
    # "" | "backbone" (ResNet body and FPN) | "all_but_heads" (all but the RoI heads): no update.
    t.freeze = ""

    # --- Evaluation --------------------------------------------------------------------------
    e = c.eval = ml_collections.ConfigDict()
    e.batch_size = 8
    e.num_images = 0  # 0 = the whole split
    e.num_vis = 0
    e.vis_score_threshold = 0.5  # eval.py --vis draws predictions scoring at least this

    return c
