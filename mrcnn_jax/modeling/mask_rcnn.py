"""The Mask R-CNN meta-architecture: backbone -> RPN -> proposals -> box branch -> post-processing
-> mask branch, every array of a static size.

`MaskRCNN(config.model)` is a `flax.linen` module whose methods are the stages, so a training step
(or a parity test) can compose them with `model.apply(variables, ..., method=MaskRCNN.<stage>)`:

  backbone_features(images)            -> [P2, P3, P4, P5, P6], each [B, H_l, W_l, 256]
                                          ([C4] [B, H / 16, W / 16, 1024] with architecture c4)
  rpn_head(features)                   -> objectness [B, A], box_deltas [B, A, 4] (anchor order)
  anchors(features, canvas_hw)         -> [A, 4] numpy (static, torchvision's AnchorGenerator)
  proposals(features, image_sizes)     -> boxes [B, P, 4], scores [B, P], valid [B, P]
  pooling_features(features)           -> P2..P5 in float32 as one `FlatFeatures` buffer (what
                                          the heads pool from; build it once, pass it to each)
  box_head(features, rois)             -> class_logits [B, R, K + 1],
                                          box_regression [B, R, 4(K + 1)]
  mask_head(features, rois)            -> mask_logits [B, R, 28, 28, K + 1] (or ..., 1 agnostic)
  keypoint_head(features, rois)        -> heatmap logits [B, R, 56, 56, num_keypoints]
  roi_heads(features, proposals, ...)  -> post-processed detections with mask_probs
  detect(images, image_sizes)          -> detections and every intermediate (for tests)
  __call__(images, image_sizes)        -> detections: boxes [B, D, 4], scores [B, D],
                                          labels [B, D] int32, valid [B, D],
                                          mask_probs [B, D, 28, 28]

The paper's ablations are config switches (docs/ablations.md): `architecture` "fpn" | "c4"
(RPN and RoI pooling on res4, res5 as the box head whose output the mask deconv shares),
`pooler` align | pool | warp for every pooler, `mask_class_agnostic`, `mask_loss` sigmoid |
softmax (training and inference), `norm` / `fpn_norm` / `head_norm` with `box_head` 2fc |
4conv1fc (GroupNorm as detectron2's GN configs), and the ResNet/ResNeXt `backbone`. torchvision's
v2 (configs/fpn_r50_v2.py) is `fpn_norm` / `head_norm` frozen_bn, `box_head` 4conv1fc and
`rpn_conv_depth` 2.

Boxes are in the pixels of the resized image inside the canvas; `image_sizes` [B, 2] is (h, w) of
each true image (clipping uses it). Parameter names mirror torchvision's module tree (see
`checkpoints/torchvision.py`): backbone/{body,fpn}, rpn, roi_box_head, roi_box_predictor,
roi_mask_head, roi_mask_predictor, roi_keypoint_head, roi_keypoint_predictor. Keypoint R-CNN is
`keypoint_head=True` (torchvision's keypointrcnn also sets `mask_head=False`): the keypoint branch
runs on the detections and adds `keypoints` (x, y, score) to the output (ops/keypoints.py).

Glossary: B batch, A anchors over all levels, P proposals per image (post_nms_top_n), R RoIs,
K + 1 classes with background, D detections per image (100), L = 4 pooled levels P2..P5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling.backbone.c4 import ResNetC4
from mrcnn_jax.modeling.backbone.fpn import ResNetFPN
from mrcnn_jax.modeling.conv import resolve_conv_impl
from mrcnn_jax.modeling.norm import optional_norm
from mrcnn_jax.modeling.precision import compute_dtype
from mrcnn_jax.modeling.roi_heads.box_head import ConvFCHead, FastRCNNPredictor, TwoMLPHead
from mrcnn_jax.modeling.roi_heads.mask_head import (
    MASK_PROB_MODES,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    select_class_masks,
)
from mrcnn_jax.modeling.roi_heads.keypoint_head import KeypointRCNNHeads, KeypointRCNNPredictor
from mrcnn_jax.modeling.roi_heads.res5_head import Res5Head
from mrcnn_jax.modeling.remat import check_remat, maybe_remat
from mrcnn_jax.modeling.rpn import RPNHead
from mrcnn_jax.ops.anchors import anchor_grid, num_anchors_per_location
from mrcnn_jax.ops.boxes import BoxCoder
from mrcnn_jax.ops.keypoints import heatmaps_to_keypoints
from mrcnn_jax.ops.postprocess import postprocess_detections
from mrcnn_jax.ops.proposals import generate_proposals
from mrcnn_jax.ops.roi_align import FlatFeatures, flatten_levels, multilevel_roi_align

# The RoI heads pool from P2..P5; P6 feeds the RPN only (torchvision's MultiScaleRoIAlign names).
NUM_POOLED_LEVELS = 4
# What __call__ returns (mask_probs with model.mask_head, keypoints with model.keypoint_head).
DETECTION_KEYS = ("boxes", "scores", "labels", "valid", "mask_probs", "keypoints")
ARCHITECTURES = ("fpn", "c4")
BOX_HEADS = ("2fc", "4conv1fc")


def check_ablation_config(c: Any) -> None:
    """ValueError naming the `config.model` field whose ablation value cannot work."""
    if c.architecture not in ARCHITECTURES:
        raise ValueError(f"model.architecture must be one of {ARCHITECTURES}, got "
                         f"{c.architecture!r}")
    if c.box_head not in BOX_HEADS:
        raise ValueError(f"model.box_head must be one of {BOX_HEADS}, got {c.box_head!r}")
    if c.rpn_conv_depth < 1:
        raise ValueError(f"model.rpn_conv_depth must be >= 1, got {c.rpn_conv_depth}")
    if c.mask_loss not in MASK_PROB_MODES:
        raise ValueError(f"model.mask_loss must be one of {MASK_PROB_MODES}, got "
                         f"{c.mask_loss!r}")
    if c.mask_loss == "softmax" and c.mask_class_agnostic:
        raise ValueError("model.mask_loss 'softmax' (multinomial over classes) needs class-"
                         "specific masks: set model.mask_class_agnostic=False")
    num_maps = 1 if c.architecture == "c4" else len(c.anchor_strides)
    if len(c.anchor_strides) != num_maps or len(c.anchor_sizes) != num_maps:
        raise ValueError(f"model.anchor_strides {tuple(c.anchor_strides)} and anchor_sizes "
                         f"{tuple(c.anchor_sizes)} need one entry per feature map ({num_maps} "
                         f"for architecture {c.architecture!r})")


def anchor_sizes_per_level(anchor_sizes: Sequence[Any]) -> int:
    """Sizes per level: 1 for FPN's (32, 64, ...), 5 for C4's ((32, 64, 128, 256, 512),)."""
    counts = {len(s) if isinstance(s, (tuple, list)) else 1 for s in anchor_sizes}
    if len(counts) != 1:
        raise ValueError(f"model.anchor_sizes: every level needs as many sizes, got "
                         f"{tuple(anchor_sizes)}")
    return counts.pop()


class MaskRCNN(nn.Module):
    """Mask R-CNN with an FPN (or C4) backbone; `config` is `config.model` (config_base.py)."""

    config: Any

    def setup(self) -> None:
        c = self.config
        check_ablation_config(c)
        dtype = compute_dtype(c.dtype)
        impl = resolve_conv_impl(c.conv_impl)  # checks the value too
        num_anchors = num_anchors_per_location(c.anchor_aspect_ratios,
                                               anchor_sizes_per_level(c.anchor_sizes))
        self.roi_box_predictor = FastRCNNPredictor(c.num_classes, dtype=dtype, conv_impl=impl)
        rpn_head = maybe_remat(RPNHead, "rpn_head" in check_remat(c.remat))
        if c.architecture == "c4":
            if c.keypoint_head or not c.mask_head:
                raise ValueError("model.architecture 'c4' has the mask branch only: set "
                                 "model.mask_head=True, model.keypoint_head=False")
            backbone = ResNetC4.from_config(c)
            self.backbone = backbone
            # detectron2's StandardRPNHead keeps the input width (1024 on res4).
            self.rpn = rpn_head(num_anchors, backbone.out_channels, c.rpn_conv_depth,
                                dtype=dtype, conv_impl=impl)
            # res5 is the box head; the mask branch deconvs from its output (no mask convs).
            self.roi_box_head = Res5Head.from_config(c)
            self.roi_mask_predictor = MaskRCNNPredictor(
                c.num_classes, c.res5_mask_deconv_dim, c.mask_class_agnostic, dtype=dtype,
                conv_impl=impl)
            return
        head_norm = optional_norm(c, c.head_norm)
        self.backbone = ResNetFPN.from_config(c)
        self.rpn = rpn_head(num_anchors, c.fpn_channels, c.rpn_conv_depth, dtype=dtype,
                            conv_impl=impl)
        if c.box_head == "4conv1fc":
            self.roi_box_head = ConvFCHead(tuple(c.box_head_conv_dims), (c.box_head_dim,),
                                           norm=head_norm, dtype=dtype, conv_impl=impl)
        else:
            if head_norm is not None:
                raise ValueError("model.head_norm needs a box head with convs: set "
                                 "model.box_head='4conv1fc' (detectron2's GN configs, "
                                 "torchvision's v2)")
            self.roi_box_head = TwoMLPHead(c.box_head_dim, dtype=dtype, conv_impl=impl)
        if c.mask_head:
            self.roi_mask_head = MaskRCNNHeads(tuple(c.mask_head_layers), dtype=dtype,
                                               norm=head_norm, conv_impl=impl)
            self.roi_mask_predictor = MaskRCNNPredictor(
                c.num_classes, c.mask_head_layers[-1], c.mask_class_agnostic, dtype=dtype,
                conv_impl=impl)
        if c.keypoint_head:
            self.roi_keypoint_head = KeypointRCNNHeads(tuple(c.keypoint_head_layers),
                                                       dtype=dtype, conv_impl=impl)
            self.roi_keypoint_predictor = KeypointRCNNPredictor(c.num_keypoints, dtype=dtype,
                                                                conv_impl=impl)

    # --- Stages ---------------------------------------------------------------------------

    def backbone_features(self, images: jax.Array) -> list[jax.Array]:
        """images [B, Hc, Wc, 3] (normalised canvas) -> [P2..P6], each [B, H_l, W_l, C] in the
        compute dtype (architecture c4: [C4] at stride 16). In bfloat16 the RPN head takes them
        as they are (torchvision's autocast runs its convolutions in bf16 too), `pool` in
        float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
        return list(self.backbone(images))

    def rpn_head(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """[P2..P6] -> objectness [B, A], box_deltas [B, A, 4], levels concatenated."""
        return self.rpn(features)

    def anchors(self, features: Sequence[jax.Array], canvas_hw: Sequence[int]) -> np.ndarray:
        """[A, 4] anchors of the canvas for these feature maps (static numpy)."""
        c = self.config
        grids = [tuple(int(s) for s in f.shape[1:3]) for f in features]
        return np.concatenate(
            anchor_grid(tuple(canvas_hw), c.anchor_strides, c.anchor_sizes,
                        c.anchor_aspect_ratios, grid_sizes=grids)
        )

    def proposals(
        self,
        features: Sequence[jax.Array],
        image_sizes: jax.Array,
        canvas_hw: Sequence[int],
        training: bool = False,
        rpn_outputs: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """RPN + proposal generation: (boxes [B, P, 4], scores [B, P], valid [B, P]).

        `rpn_outputs`: (objectness, box_deltas) when the caller already ran `rpn_head`.
        `training` selects the train pre/post NMS sizes (2000/2000) over the test ones.
        """
        c = self.config
        if rpn_outputs is None:
            rpn_outputs = self.rpn_head(features)
        objectness, deltas = rpn_outputs
        per_level = [int(np.prod(f.shape[1:3])) * self.rpn.num_anchors for f in features]
        return generate_proposals(
            objectness,
            deltas,
            self.anchors(features, canvas_hw),
            per_level,
            jnp.asarray(image_sizes),
            pre_nms_top_n=c.rpn_pre_nms_top_n_train if training else c.rpn_pre_nms_top_n_test,
            post_nms_top_n=c.rpn_post_nms_top_n_train if training else c.rpn_post_nms_top_n_test,
            nms_thresh=c.rpn_nms_thresh,
            score_thresh=c.rpn_score_thresh,
            min_size=c.rpn_min_size,
            box_coder=BoxCoder(tuple(c.rpn_box_weights)),
        )

    def pooling_features(self, features: Sequence[jax.Array]) -> FlatFeatures:
        """[P2..P6] (C4: [C4]) -> the pooled levels P2..P5 in float32 as one flat buffer.

        float32, as torchvision's autocast pools: RoIAlign's gradient sums many bilinear
        contributions per feature pixel. Building the buffer copies every level; the train
        step builds it once for the box, mask and keypoint heads (built again inside the heads'
        slot-bucket conditional, that copy took 263 ms in a bf16 step's profile, 22 ms outside).
        """
        return flatten_levels([f.astype(jnp.float32) for f in features[:NUM_POOLED_LEVELS]])

    def pool(self, features: Sequence[jax.Array] | FlatFeatures, rois: jax.Array,
             output_size: int) -> jax.Array:
        """Multi-level RoI pooling from P2..P5 (C4: res4 alone), `config.pooler` align | pool |
        warp: rois [B, R, 4] -> [B, R, O, O, C]. `features`: the maps or their
        `pooling_features`."""
        c = self.config
        if rois.ndim != 3 or rois.shape[-1] != 4:
            raise ValueError(f"rois must be [B, R, 4], got shape {rois.shape}")
        if not isinstance(features, FlatFeatures):
            features = self.pooling_features(features)
        # Scales 1/4 .. 1/32: what torchvision infers (2^round(log2(feature / image size))) for
        # every image that fills its canvas to within a factor sqrt(2).
        scales = [1.0 / s for s in c.anchor_strides[:NUM_POOLED_LEVELS]]
        return multilevel_roi_align(
            features,
            rois,
            output_size,
            c.pooler_sampling_ratio,
            aligned=c.pooler_aligned,
            mode=c.pooler,
            canonical_scale=c.pooler_canonical_scale,
            canonical_level=c.pooler_canonical_level,
            spatial_scales=scales,
        )

    def box_head(
        self, features: Sequence[jax.Array] | FlatFeatures, rois: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """rois [B, R, 4] -> class_logits [B, R, K + 1], box_regression [B, R, (K + 1) * 4]."""
        pooled = self.pool(features, rois, self.config.box_pool_size)
        return self.roi_box_predictor(self.roi_box_head(pooled))

    def mask_head(self, features: Sequence[jax.Array] | FlatFeatures, rois: jax.Array,
                  classes: jax.Array | None = None) -> jax.Array:
        """rois [B, R, 4] -> mask_logits [B, R, M, M, K + 1] (M = 28; last dim 1 if agnostic,
        or with `classes` [B, R] only the logits of each RoI's class, [B, R, M, M, 1]).

        C4: M = mask_pool_size (14), from res5 (shared with the box head) and the deconv."""
        return self.roi_mask_predictor(self.mask_head_features(features, rois), classes)

    def mask_head_features(self, features: Sequence[jax.Array] | FlatFeatures, rois: jax.Array
                           ) -> jax.Array:
        """rois [B, R, 4] -> the mask predictor's input [B, R, S, S, C] (FPN: the mask convs'
        output, S = 14; C4: res5's, S = 7)."""
        pooled = self.pool(features, rois, self.config.mask_pool_size)
        if self.config.architecture == "c4":
            return self.roi_box_head.feature_map(pooled)
        return self.roi_mask_head(pooled)

    def keypoint_head(self, features: Sequence[jax.Array] | FlatFeatures, rois: jax.Array
                      ) -> jax.Array:
        """rois [B, R, 4] -> keypoint heatmap logits [B, R, 56, 56, num_keypoints]."""
        pooled = self.pool(features, rois, self.config.keypoint_pool_size)
        return self.roi_keypoint_predictor(self.roi_keypoint_head(pooled))

    def keypoints(self, features: Sequence[jax.Array] | FlatFeatures, boxes: jax.Array,
                  valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The keypoint branch on detections: boxes [B, D, 4], valid [B, D] -> (keypoints
        [B, D, num_keypoints, 3] (x, y, score) in resized pixels, 0 for invalid detections;
        heatmap logits [B, D, 56, 56, num_keypoints]). torchvision's `heatmaps_to_keypoints`
        decoded on a static grid: `keypoint_max_map_size`, or the canvas (exact for every box)
        when 0. `features`: the maps or their `pooling_features`."""
        c = self.config
        if not isinstance(features, FlatFeatures):
            features = self.pooling_features(features)
        logits = self.keypoint_head(features, boxes)
        if c.keypoint_max_map_size:
            size = c.keypoint_max_map_size
            grid = (size, size) if isinstance(size, int) else tuple(size)
        else:  # the canvas: P2 is at stride anchor_strides[0]
            grid = tuple(int(s) * c.anchor_strides[0] for s in features.sizes_hw[0])
        b, d = boxes.shape[:2]
        kps, scores = heatmaps_to_keypoints(logits.reshape((b * d,) + logits.shape[2:]),
                                            boxes.reshape(b * d, 4), grid, valid.reshape(-1))
        kps = jnp.concatenate([kps[..., :2], scores[..., None]], axis=-1)
        kps = kps.reshape(b, d, *kps.shape[1:])
        return jnp.where(valid[..., None, None], kps, 0.0), logits

    # --- Inference ------------------------------------------------------------------------

    def roi_heads(
        self,
        features: Sequence[jax.Array],
        proposals: jax.Array,
        proposal_valid: jax.Array,
        image_sizes: jax.Array,
    ) -> dict[str, jax.Array]:
        """Inference RoI heads: box branch on the proposals -> post-processing -> mask branch on
        the D detections (and/or keypoint branch). Returns DETECTION_KEYS plus class_logits,
        box_regression (per proposal), mask_logits (per detection, all classes),
        keypoint_logits (per detection) and num_valid_candidates; a branch that is off
        (model.mask_head / model.keypoint_head) leaves its keys out."""
        c = self.config
        pooling = self.pooling_features(features)
        class_logits, box_regression = self.box_head(pooling, proposals)
        dets = postprocess_detections(
            class_logits,
            box_regression,
            proposals,
            proposal_valid,
            image_sizes,
            box_coder=BoxCoder(tuple(c.box_weights)),
            score_thresh=c.box_score_thresh,
            nms_thresh=c.box_nms_thresh,
            min_size=c.box_min_size,
            detections_per_img=c.detections_per_img,
            num_candidates=c.box_nms_candidates,
        )
        out = {**dets, "class_logits": class_logits, "box_regression": box_regression}
        if c.mask_head:
            mask_features = self.mask_head_features(pooling, dets["boxes"])
            # All classes' logits are an output of `detect`; `__call__` drops them, and XLA
            # then computes only the predicted class's map (K + 1 times fewer 1x1 products).
            mask_logits = self.roi_mask_predictor(mask_features)
            read = (mask_logits if c.mask_loss == "softmax"  # the softmax needs all K + 1 maps
                    else self.roi_mask_predictor(mask_features, dets["labels"]))
            mask_probs = select_class_masks(read, dets["labels"], c.mask_loss)
            out["mask_probs"] = jnp.where(dets["valid"][..., None, None], mask_probs, 0.0)
            out["mask_logits"] = mask_logits
        if c.keypoint_head:
            out["keypoints"], out["keypoint_logits"] = self.keypoints(
                pooling, dets["boxes"], dets["valid"])
        return out

    def detect(self, images: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
        """Whole inference, returning the detections and the intermediate stages.

        Returns a dict with DETECTION_KEYS plus features (list), objectness, box_deltas,
        proposals, proposal_scores, proposal_valid, class_logits, box_regression, mask_logits
        (of the detections, all classes) and num_valid_candidates.
        """
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        if image_sizes.shape != (images.shape[0], 2):
            raise ValueError(f"image_sizes must be [{images.shape[0]}, 2], got {image_sizes.shape}")
        canvas_hw = images.shape[1:3]
        features = self.backbone_features(images)
        objectness, deltas = self.rpn_head(features)
        proposals, proposal_scores, proposal_valid = self.proposals(
            features, image_sizes, canvas_hw, rpn_outputs=(objectness, deltas)
        )
        heads = self.roi_heads(features, proposals, proposal_valid, image_sizes)
        return {
            **heads,
            "features": features,
            "objectness": objectness,
            "box_deltas": deltas,
            "proposals": proposals,
            "proposal_scores": proposal_scores,
            "proposal_valid": proposal_valid,
        }

    def __call__(self, images: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
        """Inference detections: boxes [B, D, 4] (resized pixels), scores [B, D],
        labels [B, D] int32, valid [B, D] bool, mask_probs [B, D, M, M] of the predicted class
        (mask_head), keypoints [B, D, num_keypoints, 3] (x, y, score) (keypoint_head)."""
        out = self.detect(images, image_sizes)
        return {k: out[k] for k in DETECTION_KEYS if k in out}
