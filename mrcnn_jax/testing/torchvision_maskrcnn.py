"""A torchvision Mask R-CNN R50-FPN with random weights that still detects something, for the
parity tests and the benchmarks (both import it from here; torch is imported inside the functions,
it is the optional `parity` extra).

torchvision's own random init makes the RPN logits tiny (N(0, 0.01) weights) and the classifier
uniform over 91 classes (every score ~0.011 < 0.05: no detections). So `calibrate` gives:
- every FrozenBatchNorm / BatchNorm statistics measured on the test images themselves (plus noise)
  and a random affine, so activations stay O(1) through all 50 layers; v2's norms after the FPN
  convs, and in the box and mask heads (on the RoIs of the RPN's first proposals), alike;
- the RPN logits a larger init so objectness is spread over O(1), not clustered at 0.5;
- a few classifier biases raised (`DETECTING_CLASSES`) so detections exist for them.
All of it is seeded. `build_model` is the model `maskrcnn_resnet50_fpn(weights=...)` builds
(FrozenBN with eps 0, torchvision's COCO checkpoint layout), `build_model_v2` the one
`maskrcnn_resnet50_fpn_v2` builds (BatchNorm2d in eval mode, eps 1e-5).
"""

from __future__ import annotations

import numpy as np

DETECTING_CLASSES = (1, 3, 18)


def build_model(torch, torchvision, min_size: int, max_size: int, seed: int = 0):
    """maskrcnn_resnet50_fpn's COCO architecture with random weights (eval mode, not calibrated)."""
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops

    torch.manual_seed(seed)
    body = torchvision.models.resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3)
    model = torchvision.models.detection.MaskRCNN(
        backbone, num_classes=91, min_size=min_size, max_size=max_size
    )
    overwrite_eps(model, 0.0)
    return model.eval()


def build_model_v2(torch, torchvision, min_size: int, max_size: int, seed: int = 0):
    """maskrcnn_resnet50_fpn_v2's architecture with random weights (eval mode, not calibrated)."""
    torch.manual_seed(seed)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=91, min_size=min_size,
        max_size=max_size)
    return model.eval()


def calibrate(torch, model, images: list, seed: int = 0) -> None:
    """Data-dependent norm statistics and head biases (see the module docstring)."""
    from torchvision.ops import misc as misc_nn_ops

    gen = torch.Generator().manual_seed(seed)
    norms = (misc_nn_ops.FrozenBatchNorm2d, torch.nn.BatchNorm2d)

    def pre_hook(module, inputs):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3)) + 1e-3
        c = mean.numel()
        module.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(c, generator=gen))
        module.running_var.copy_(var * (0.75 + 0.5 * torch.rand(c, generator=gen)))
        module.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
               if isinstance(m, norms)]
    rh = model.roi_heads
    with torch.no_grad():
        image_list, _ = model.transform(images)
        # The hooks fill the stats layer by layer (v1's FPN has no norms).
        features = model.backbone(image_list.tensors)
        head = model.rpn.head
        torch.nn.init.normal_(head.cls_logits.weight, std=0.2, generator=gen)
        torch.nn.init.normal_(head.bbox_pred.weight, std=0.02, generator=gen)
        heads = [h for h in (rh.box_head, rh.mask_head) if h is not None]  # keypointrcnn: no mask
        if any(isinstance(m, norms) for h in heads for m in h.modules()):
            proposals, _ = model.rpn(image_list, features)
            sizes = image_list.image_sizes
            rh.box_head(rh.box_roi_pool(features, proposals, sizes))
            if rh.has_mask():
                rh.mask_head(rh.mask_roi_pool(features, [p[:100] for p in proposals], sizes))
        for h in handles:
            h.remove()
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.zero_()
        bias[list(DETECTING_CLASSES)] = 3.0


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def save_calibrated_weights(path: str, images_uint8: list[np.ndarray], threads: int = 2) -> None:
    """torchvision's maskrcnn_resnet50_fpn (800/1333 resize) with random weights calibrated on
    `images_uint8` ([H, W, 3] uint8), written to the .npz at `path` (the benchmarks' weights)."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = build_model(torch, torchvision, 800, 1333)
    calibrate(torch, model, [torch.from_numpy(im).permute(2, 0, 1).float() / 255
                             for im in images_uint8])
    np.savez(path, **state_dict_numpy(model))


def intermediates(torch, model, images: list) -> dict:
    """torchvision's stages on `images` (list of [3, H, W] float tensors in [0, 1]), as numpy."""
    with torch.no_grad():
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        feats = list(features.values())
        objectness, deltas = model.rpn.head(feats)
        b = image_list.tensors.shape[0]
        objectness = torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1) for o in objectness], 1)
        deltas = torch.cat([
            d.view(b, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
            for d in deltas
        ], 1)
        anchors = model.rpn.anchor_generator(image_list, feats)[0]
        proposals, _ = model.rpn(image_list, features)
        rh = model.roi_heads
        pooled = rh.box_roi_pool(features, proposals, image_list.image_sizes)
        class_logits, box_regression = rh.box_predictor(rh.box_head(pooled))
        detections, _ = rh(features, proposals, image_list.image_sizes)
        mask_pooled = rh.mask_roi_pool(features, [d["boxes"] for d in detections],
                                       image_list.image_sizes)
        mask_logits = rh.mask_predictor(rh.mask_head(mask_pooled))
        final = model.transform.postprocess(
            [{k: v.clone() for k, v in d.items()} for d in detections],
            image_list.image_sizes, original_sizes)
    n = [len(p) for p in proposals]
    out = {
        "canvas": image_list.tensors.permute(0, 2, 3, 1).numpy(),
        "image_sizes": np.asarray(image_list.image_sizes, np.int32),
        "features": [f.permute(0, 2, 3, 1).numpy() for f in feats],
        "objectness": objectness.numpy(),
        "box_deltas": deltas.numpy(),
        "anchors": anchors.numpy(),
        "proposals": [p.numpy() for p in proposals],
        "class_logits": np.split(class_logits.numpy(), np.cumsum(n)[:-1]),
        "box_regression": np.split(box_regression.numpy(), np.cumsum(n)[:-1]),
        "detections": [{k: v.numpy() for k, v in d.items()} for d in detections],
        "mask_logits": mask_logits.permute(0, 2, 3, 1).numpy(),
        "final": [{k: v.numpy() for k, v in d.items()} for d in final],
    }
    return out
