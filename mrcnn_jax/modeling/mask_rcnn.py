"""The Mask R-CNN meta-architecture: backbone -> RPN -> proposals -> box branch -> post-processing
-> mask branch, every array of a static size.

`MaskRCNN(config.model)` is a `flax.linen` module whose methods are the stages, so a training step
(or a parity test) can compose them with `model.apply(variables, ..., method=MaskRCNN.<stage>)`:

  backbone_features(images)            -> [P2, P3, P4, P5, P6], each [B, H_l, W_l, 256]
  rpn_head(features)                   -> objectness [B, A], box_deltas [B, A, 4] (anchor order)
  anchors(features, canvas_hw)         -> [A, 4] numpy (static, torchvision's AnchorGenerator)
  proposals(features, image_sizes)     -> boxes [B, P, 4], scores [B, P], valid [B, P]
  box_head(features, rois)             -> class_logits [B, R, K + 1], box_regression [B, R, 4(K + 1)]
  mask_head(features, rois)            -> mask_logits [B, R, 28, 28, K + 1] (or ..., 1 agnostic)
  roi_heads(features, proposals, ...)  -> post-processed detections with mask_probs
  detect(images, image_sizes)          -> detections and every intermediate (for tests)
  __call__(images, image_sizes)        -> detections: boxes [B, D, 4], scores [B, D],
                                          labels [B, D] int32, valid [B, D], mask_probs [B, D, 28, 28]

Boxes are in the pixels of the resized image inside the canvas; `image_sizes` [B, 2] is (h, w) of
each true image (clipping uses it). Parameter names mirror torchvision's module tree (see
`checkpoints/torchvision.py`): backbone/{body,fpn}, rpn, roi_box_head, roi_box_predictor,
roi_mask_head, roi_mask_predictor.

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

from mrcnn_jax.modeling.backbone.fpn import ResNetFPN
from mrcnn_jax.modeling.roi_heads.box_head import FastRCNNPredictor, TwoMLPHead
from mrcnn_jax.modeling.roi_heads.mask_head import (
    MaskRCNNHeads,
    MaskRCNNPredictor,
    select_class_masks,
)
from mrcnn_jax.modeling.rpn import RPNHead
from mrcnn_jax.ops.anchors import anchor_grid, num_anchors_per_location
from mrcnn_jax.ops.boxes import BoxCoder
from mrcnn_jax.ops.postprocess import postprocess_detections
from mrcnn_jax.ops.proposals import generate_proposals
from mrcnn_jax.ops.roi_align import multilevel_roi_align

# The RoI heads pool from P2..P5; P6 feeds the RPN only (torchvision's MultiScaleRoIAlign names).
NUM_POOLED_LEVELS = 4
DETECTION_KEYS = ("boxes", "scores", "labels", "valid", "mask_probs")


class MaskRCNN(nn.Module):
    """Mask R-CNN with an FPN backbone; `config` is `config.model` (see config_base.py)."""

    config: Any

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.backbone = ResNetFPN.from_config(c)
        self.rpn = RPNHead(num_anchors_per_location(c.anchor_aspect_ratios), c.fpn_channels,
                           dtype=dtype)
        self.roi_box_head = TwoMLPHead(c.box_head_dim, dtype=dtype)
        self.roi_box_predictor = FastRCNNPredictor(c.num_classes, dtype=dtype)
        self.roi_mask_head = MaskRCNNHeads(tuple(c.mask_head_layers), dtype=dtype)
        self.roi_mask_predictor = MaskRCNNPredictor(
            c.num_classes, c.mask_head_layers[-1], c.mask_class_agnostic, dtype=dtype
        )

    # --- Stages ---------------------------------------------------------------------------

    def backbone_features(self, images: jax.Array) -> list[jax.Array]:
        """images [B, Hc, Wc, 3] (normalised canvas) -> [P2..P6], each [B, H_l, W_l, C] float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
        return [f.astype(jnp.float32) for f in self.backbone(images)]

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

    def pool(self, features: Sequence[jax.Array], rois: jax.Array, output_size: int) -> jax.Array:
        """Multi-level RoI pooling from P2..P5: rois [B, R, 4] -> [B, R, O, O, C]."""
        c = self.config
        if rois.ndim != 3 or rois.shape[-1] != 4:
            raise ValueError(f"rois must be [B, R, 4], got shape {rois.shape}")
        levels = list(features[:NUM_POOLED_LEVELS])
        # Scales 1/4 .. 1/32: what torchvision infers (2^round(log2(feature / image size))) for
        # every image that fills its canvas to within a factor sqrt(2).
        scales = [1.0 / s for s in c.anchor_strides[:NUM_POOLED_LEVELS]]
        return multilevel_roi_align(
            levels,
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
        self, features: Sequence[jax.Array], rois: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """rois [B, R, 4] -> class_logits [B, R, K + 1], box_regression [B, R, (K + 1) * 4]."""
        pooled = self.pool(features, rois, self.config.box_pool_size)
        return self.roi_box_predictor(self.roi_box_head(pooled))

    def mask_head(self, features: Sequence[jax.Array], rois: jax.Array) -> jax.Array:
        """rois [B, R, 4] -> mask_logits [B, R, M, M, K + 1] (M = 28; last dim 1 if agnostic)."""
        pooled = self.pool(features, rois, self.config.mask_pool_size)
        return self.roi_mask_predictor(self.roi_mask_head(pooled))

    # --- Inference ------------------------------------------------------------------------

    def roi_heads(
        self,
        features: Sequence[jax.Array],
        proposals: jax.Array,
        proposal_valid: jax.Array,
        image_sizes: jax.Array,
    ) -> dict[str, jax.Array]:
        """Inference RoI heads: box branch on the proposals -> post-processing -> mask branch on
        the D detections. Returns DETECTION_KEYS plus class_logits, box_regression (per
        proposal), mask_logits (per detection, all classes) and num_valid_candidates."""
        c = self.config
        class_logits, box_regression = self.box_head(features, proposals)
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
        mask_logits = self.mask_head(features, dets["boxes"])
        mask_probs = select_class_masks(mask_logits, dets["labels"])
        mask_probs = jnp.where(dets["valid"][..., None, None], mask_probs, 0.0)
        return {
            **dets,
            "mask_probs": mask_probs,
            "class_logits": class_logits,
            "box_regression": box_regression,
            "mask_logits": mask_logits,
        }

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
        labels [B, D] int32, valid [B, D] bool, mask_probs [B, D, M, M] of the predicted class."""
        out = self.detect(images, image_sizes)
        return {k: out[k] for k in DETECTION_KEYS}
