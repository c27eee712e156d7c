"""Parity with torchvision's maskrcnn_resnet50_fpn on the same (random, calibrated) weights.

One 2-image batch of different sizes (skimage's astronaut 512x512 and coffee 400x600, resized with
min_size 320 / max_size 512 on both sides so it runs in seconds on 2 cores) goes through both
implementations; every stage is compared: the input canvas, FPN features, RPN outputs, anchors,
proposals, box-head logits, final detections, 28x28 mask probabilities and pasted masks.
Stages whose inputs could differ by float noise get the *same* inputs on both sides too (the
mask head on torchvision's boxes), so their tolerance is the stage's own.

Tolerances (float32 CPU, XLA vs oneDNN convolutions accumulating differently):
- features, objectness, deltas, and logits/regression on the same proposals: max |diff| <=
  1e-4 x max |ref| per array (1e-3 end to end, where the proposals differ by ~1e-2 px);
- proposals: equal as sets (ordering may swap between scores equal to float precision), matched
  coordinates within 1e-4 px from the same RPN outputs and 1e-2 px end to end, where a proposal
  may differ only for an anchor whose logit sits within float noise of its level's pre-NMS
  top-k cut (one on each side; tens of thousands of P2 anchors put logits 2e-5 apart there);
- detections: matched as sets by label and IoU >= 0.99, scores within 1e-4; a detection without a
  partner is allowed only where float noise can flip it: score within 1e-4 of the 0.05
  threshold or of the 100th score, or an IoU within 1e-4 of the 0.5 NMS threshold with a kept box
  of its class;
- mask probabilities: 1e-4 on identical boxes; 2e-3 end to end (the boxes themselves differ by
  ~1e-3 px, which moves the RoIAlign sample points);
- pasted masks: IoU >= 0.99 per detection.
The batch, the comparisons and these tolerances live in tests/modeling/parity.py, shared with the
v2 architecture's tests (test_mask_rcnn_v2_parity.py).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("skimage.data")

from mrcnn_jax.checkpoints.orbax_io import restore_variables, save_variables  # noqa: E402
from mrcnn_jax.checkpoints.torchvision import import_maskrcnn  # noqa: E402
from mrcnn_jax.config_base import base_config  # noqa: E402
from mrcnn_jax.testing import torchvision_maskrcnn as tvm  # noqa: E402
from tests.modeling import parity as pt  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def parity():
    torch.set_num_threads(1)
    images = pt.images()
    model_t = tvm.build_model(torch, torchvision, pt.MIN_SIZE, pt.MAX_SIZE)
    tvm.calibrate(torch, model_t, [torch.from_numpy(im).permute(2, 0, 1).float() / 255
                                   for im in images])
    config = base_config()
    config.data.min_size, config.data.max_size = pt.MIN_SIZE, pt.MAX_SIZE
    return pt.run_both(model_t, config, images)


def test_input_transform_equals_torchvision(parity):
    pt.check_input_transform(parity)


def test_fpn_features(parity):
    pt.check_fpn_features(parity)


def test_rpn_head_and_anchors(parity):
    pt.check_rpn_head_and_anchors(parity)


def test_proposal_generation_on_torchvision_rpn_outputs(parity):
    pt.check_proposals_on_torchvision_rpn_outputs(parity)


def test_proposals_end_to_end(parity):
    pt.check_proposals_end_to_end(parity)


def test_box_head_on_torchvision_proposals(parity):
    pt.check_box_head_on_torchvision_proposals(parity)


def test_box_head_outputs_end_to_end(parity):
    pt.check_box_head_end_to_end(parity)


def test_detections_and_mask_probs(parity):
    pt.check_detections_and_mask_probs(parity)


def test_mask_head_on_torchvision_boxes(parity):
    pt.check_mask_head_on_torchvision_boxes(parity)


def test_pasted_masks_and_original_boxes(parity):
    pt.check_pasted_masks_and_original_boxes(parity)


def test_orbax_roundtrip_gives_identical_outputs(parity, tmp_path):
    save_variables(tmp_path / "ckpt", parity["variables"])
    restored = restore_variables(tmp_path / "ckpt", parity["variables"])
    again = parity["detect"](restored, parity["canvas"], parity["sizes"])
    for key in ("boxes", "scores", "labels", "valid", "mask_probs", "class_logits"):
        np.testing.assert_array_equal(np.asarray(again[key]), parity["out"][key], err_msg=key)


def test_import_accepts_legacy_head_key_names(parity):
    """torchvision's COCO weights file predates the v2 key names of RPNHead and MaskRCNNHeads."""
    legacy = {}
    for k, v in parity["state_dict"].items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy[k] = v
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    variables, _ = import_maskrcnn(legacy, parity["config"].model)
    same = jax.tree_util.tree_map(np.array_equal, variables, parity["variables"])
    assert all(jax.tree_util.tree_leaves(same))
