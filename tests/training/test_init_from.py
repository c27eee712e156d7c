"""`train.init_from`: a torchvision ImageNet ResNet-50 checkpoint (.pth) lands in the right place,
FPN (backbone body) and C4 (conv1..layer3 in the body, layer4 in the res5 box head), with the
values of the torch tensors, and nothing else changes."""

import jax
import numpy as np
import pytest

from mrcnn_jax import train_lib
from mrcnn_jax.checkpoints.init_from import init_from_imagenet
from mrcnn_jax.config_base import base_config
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.norm import FROZEN_COLLECTION

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def imagenet_pth(tmp_path_factory):
    """torchvision's resnet50 with random weights and random (positive-variance) BN statistics,
    saved as an ImageNet checkpoint is (a plain state_dict with fc.*)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    path = tmp_path_factory.mktemp("imagenet") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return path, {k: v.numpy() for k, v in net.state_dict().items()}


def _config(architecture: str, path) -> object:
    c = base_config()
    if architecture == "c4":
        from mrcnn_jax.ablations import apply_ablation
        apply_ablation(c, "c4")
    c.data.canvas_size = (64, 64)
    c.train.init_from = str(path)
    return c


def _kernel(torch_weight):
    return torch_weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO


@pytest.mark.parametrize("architecture", ["fpn", "c4"])
def test_imagenet_weights_land_in_body_and_res5(imagenet_pth, architecture):
    path, sd = imagenet_pth
    c = _config(architecture, path)
    before = train_lib.init_variables(MaskRCNN(c.model), jax.random.PRNGKey(0))
    after = init_from_imagenet(before, c)
    params, stats = after["params"], after[FROZEN_COLLECTION]
    body, body_stats = params["backbone"]["body"], stats["backbone"]["body"]
    np.testing.assert_array_equal(body["conv1"]["kernel"], _kernel(sd["conv1.weight"]))
    np.testing.assert_array_equal(body["layer3"]["block5"]["conv2"]["kernel"],
                                  _kernel(sd["layer3.5.conv2.weight"]))
    np.testing.assert_array_equal(body_stats["bn1"]["mean"], sd["bn1.running_mean"])
    np.testing.assert_array_equal(body_stats["bn1"]["var"], sd["bn1.running_var"])
    np.testing.assert_array_equal(body_stats["bn1"]["scale"], sd["bn1.weight"])
    if architecture == "fpn":
        layer4, layer4_stats = body["layer4"], body_stats["layer4"]
    else:
        assert "layer4" not in body
        layer4 = params["roi_box_head"]["layer4"]
        layer4_stats = stats["roi_box_head"]["layer4"]
    np.testing.assert_array_equal(layer4["block0"]["downsample_conv"]["kernel"],
                                  _kernel(sd["layer4.0.downsample.0.weight"]))
    np.testing.assert_array_equal(layer4["block2"]["conv3"]["kernel"],
                                  _kernel(sd["layer4.2.conv3.weight"]))
    np.testing.assert_array_equal(layer4_stats["block2"]["bn3"]["bias"], sd["layer4.2.bn3.bias"])
    # Everything outside the ResNet (FPN, RPN, heads) is the fresh initialisation, untouched.
    outside = {k: v for k, v in params.items() if k not in ("backbone", "roi_box_head")}
    outside_before = {k: v for k, v in before["params"].items() if k in outside}
    if architecture == "fpn":
        outside.update(fpn=params["backbone"]["fpn"], box_head=params["roi_box_head"])
        outside_before.update(fpn=before["params"]["backbone"]["fpn"],
                              box_head=before["params"]["roi_box_head"])
    assert len(jax.tree_util.tree_leaves(outside)) > 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, outside, outside_before)


# -m slow (CI's time): an error path; test_init_from_detector.py checks another architecture's.
@pytest.mark.slow
def test_a_body_of_another_depth_fails_naming_the_setting(imagenet_pth):
    path, _ = imagenet_pth
    c = _config("fpn", path)
    c.model.backbone = "resnet101"
    variables = train_lib.init_variables(MaskRCNN(c.model), jax.random.PRNGKey(0))
    with pytest.raises((ValueError, KeyError), match="layer3"):
        init_from_imagenet(variables, c)
