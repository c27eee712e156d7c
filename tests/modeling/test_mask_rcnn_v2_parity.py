"""Parity with torchvision's maskrcnn_resnet50_fpn_v2 (configs/fpn_r50_v2.py) on the same random,
calibrated weights: BatchNorm after the FPN convs and in the 4conv1fc box head and the mask head,
two RPN convs, the v2 backbone's BatchNorm2d at eps 1e-5.

The same 2-image batch, stages and tolerances as v1's test_mask_rcnn_parity.py (whose docstring
states them; tests/modeling/parity.py holds both): every BatchNorm gets statistics measured on the
images (the heads' on the RoIs of the first proposals) plus noise and a random affine, so none is
the identity. Plus the import itself: every key of the v2 state_dict consumed, a v1 config refused
with the key at fault and the config to use.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("skimage.data")

from mrcnn_jax.checkpoints import torchvision as tvi  # noqa: E402
from mrcnn_jax.config_base import base_config  # noqa: E402
from mrcnn_jax.testing import torchvision_maskrcnn as tvm  # noqa: E402
from tests.modeling import parity as pt  # noqa: E402
from tests.reference import REPO_ROOT  # noqa: E402

pytestmark = pytest.mark.parity


def v2_config():
    spec = importlib.util.spec_from_file_location("fpn_r50_v2", REPO_ROOT / "configs/fpn_r50_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def parity():
    torch.set_num_threads(1)
    images = pt.images()
    model_t = tvm.build_model_v2(torch, torchvision, pt.MIN_SIZE, pt.MAX_SIZE)
    tvm.calibrate(torch, model_t, [torch.from_numpy(im).permute(2, 0, 1).float() / 255
                                   for im in images])
    config = v2_config()
    config.data.min_size, config.data.max_size = pt.MIN_SIZE, pt.MAX_SIZE
    return pt.run_both(model_t, config, images)


def test_v2_state_dict_imports_whole_and_a_v1_config_is_refused(parity):
    sd = parity["state_dict"]
    assert tvi.architecture_of(sd) == {"fpn_norm": "frozen_bn", "head_norm": "frozen_bn",
                                       "box_head": "4conv1fc", "rpn_conv_depth": 2}
    # Every key lands in a variable, but the BatchNorm step counters (dropped).
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(tvi._flatten(parity["variables"])) == len(sd) - len(counters)
    assert parity["config"].model.frozen_bn_eps == 1e-5
    # The norms really are calibrated, not torchvision's identity init.
    norm = parity["variables"]["batch_stats"]["roi_mask_head"]["mask_fcn4_norm"]
    assert np.abs(norm["mean"]).max() > 0.01 and np.abs(norm["var"] - 1).max() > 0.01
    with pytest.raises(ValueError, match=r"look like torchvision v2 weights.*configs/fpn_r50_v2\.py"
                                         r".*unknown key.*first 'backbone\.fpn\.inner_blocks\.0\."
                                         r"1\.weight'"):
        tvi.import_maskrcnn(sd, base_config().model)


def test_input_transform_equals_torchvision(parity):
    pt.check_input_transform(parity)


def test_fpn_features(parity):
    pt.check_fpn_features(parity)


def test_rpn_head_and_anchors(parity):
    pt.check_rpn_head_and_anchors(parity)


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
