"""`train.init_from` with detector weights: every layer that fits loads, the class-dependent ones
start fresh (or keep the mapped classes' rows), another architecture fails naming the layer, and
`train.freeze` stops the updates it names."""

from __future__ import annotations

import logging

import jax
import numpy as np
import optax
import pytest

from mrcnn_jax import train_lib
from mrcnn_jax.checkpoints import init_from as init
from mrcnn_jax.checkpoints import orbax_io
from mrcnn_jax.config_base import base_config
from mrcnn_jax.data.label_map import LabelMap
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN


def _tiny(num_classes: int):
    c = base_config()
    c.model.update(backbone="resnet_tiny", fpn_channels=16, num_classes=num_classes,
                   box_head_dim=32, mask_head_layers=(16, 16), trainable_backbone_layers=5)
    c.data.canvas_size = (64, 64)
    return c


def _variables(config, seed: int):
    return jax.tree_util.tree_map(
        np.asarray, train_lib.init_variables(MaskRCNN(config.model), jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 5-class run of ours (exported variables with its label map)."""
    config = _tiny(5)
    variables = _variables(config, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "variables"
    orbax_io.save_variables(path, variables)
    LabelMap(5, (1, 2, 3, 4), (1, 2, 3, 4), ("person", "car", "dog", "cat")).save(path)
    return path, variables


def test_new_class_count_loads_all_but_the_class_layers(checkpoint, caplog):
    path, source = checkpoint
    config = _tiny(3)
    config.train.init_from = str(path)
    fresh = _variables(config, seed=2)
    with caplog.at_level(logging.WARNING, logger=init.__name__):
        merged = init.init_from(fresh, config, LabelMap(3, (1, 2), (7, 9), ("car", "bus")))
    flat_merged, flat_source, flat_fresh = (init._flatten(v) for v in (merged, source, fresh))
    class_keys = {k for k in flat_merged if k[1:3] in init.CLASS_LAYERS}
    assert len(class_keys) == 6  # kernel and bias of cls_score, bbox_pred, mask_fcn_logits
    for key, value in flat_merged.items():
        want = flat_fresh[key] if key in class_keys else flat_source[key]
        np.testing.assert_array_equal(value, want, err_msg="/".join(key))
    for layer in ("roi_box_predictor/cls_score/kernel", "roi_box_predictor/bbox_pred/bias",
                  "roi_mask_predictor/mask_fcn_logits/kernel"):
        assert f"params/{layer} (" in caplog.text and "another class count" in caplog.text


def test_mapped_classes_keep_their_rows(checkpoint):
    path, source = checkpoint
    config = _tiny(3)
    config.train.init_from = str(path)
    config.train.init_from_classes = "car,bus=dog"  # car keeps car's rows, bus takes dog's
    fresh = _variables(config, seed=2)
    merged = init.init_from(fresh, config, LabelMap(3, (1, 2), (7, 9), ("car", "bus")))
    src, new = source["params"], merged["params"]
    # label 0 <- 0 (background), 1 <- 2 (car), 2 <- 3 (dog)
    for new_label, old_label in ((0, 0), (1, 2), (2, 3)):
        np.testing.assert_array_equal(new["roi_box_predictor"]["cls_score"]["kernel"][:, new_label],
                                      src["roi_box_predictor"]["cls_score"]["kernel"][:, old_label])
        np.testing.assert_array_equal(
            new["roi_box_predictor"]["bbox_pred"]["bias"][4 * new_label:4 * new_label + 4],
            src["roi_box_predictor"]["bbox_pred"]["bias"][4 * old_label:4 * old_label + 4])
        np.testing.assert_array_equal(
            new["roi_mask_predictor"]["mask_fcn_logits"]["kernel"][..., new_label],
            src["roi_mask_predictor"]["mask_fcn_logits"]["kernel"][..., old_label])
    with pytest.raises(ValueError, match="'truck' is not a class of"):
        init.parse_class_mapping("car=truck", LabelMap(3, (1, 2), (7, 9), ("car", "bus")),
                                 {"car": 2}, "ckpt")
    with pytest.raises(ValueError, match="'boat' is not a class of the data"):
        init.parse_class_mapping("boat", LabelMap(3, (1, 2), (7, 9), ("car", "bus")),
                                 {"car": 2}, "ckpt")


def test_another_architecture_fails_naming_the_layer(checkpoint):
    path, _ = checkpoint
    config = _tiny(5)
    config.model.fpn_channels = 32
    config.train.init_from = str(path)
    with pytest.raises(ValueError, match=r"params/backbone/fpn/inner_blocks_0/bias is \(.*\) in the "
                                         r"checkpoint but .*another architecture"):
        init.init_from(_variables(config, seed=0), config)


def test_freeze_backbone_or_all_but_heads():
    config = _tiny(3)
    params = _variables(config, seed=0)["params"]
    grads = jax.tree_util.tree_map(np.ones_like, params)
    for freeze, still in (("backbone", {"backbone"}), ("all_but_heads", {"backbone", "rpn"})):
        config.train.freeze = freeze
        tx = train_lib.make_optimizer(config, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        for module, subtree in updates.items():
            moved = any(np.any(u != 0) for u in jax.tree_util.tree_leaves(subtree))
            assert moved == (module not in still), (freeze, module)
    config.train.freeze = "heads"
    with pytest.raises(ValueError, match="train.freeze must be one of"):
        train_lib._validate_config(config)
    assert optax  # the optimizer chain under test is optax's


@pytest.mark.parity
def test_torchvision_coco_detector_into_three_classes(tmp_path, caplog):
    """torchvision's 91-way Mask R-CNN file -> an R50-FPN of 3 classes, person and car kept."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from mrcnn_jax.checkpoints import torchvision as tv_import

    torch.manual_seed(0)
    net = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "maskrcnn.pth"
    torch.save(net.state_dict(), path)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}

    config = base_config()
    config.model.num_classes = 3
    config.data.canvas_size = (64, 64)
    config.train.init_from = str(path)
    config.train.init_from_classes = "person,auto=car"
    assert init.init_from_overrides(config) == tv_import.MASKRCNN_CONFIG_OVERRIDES
    fresh = _variables(config, seed=0)
    labels = LabelMap(3, (1, 2), (1, 2), ("person", "auto"))
    with caplog.at_level(logging.INFO, logger=init.__name__):
        merged = init.init_from(fresh, config, labels)["params"]
    cls = sd["roi_heads.box_predictor.cls_score.weight"]  # [91, 1024]
    for new_label, coco_id in ((0, 0), (1, 1), (2, 3)):  # person = 1, car = 3
        np.testing.assert_array_equal(merged["roi_box_predictor"]["cls_score"]["kernel"][:, new_label],
                                      cls[coco_id])
    np.testing.assert_array_equal(merged["backbone"]["body"]["conv1"]["kernel"],
                                  sd["backbone.body.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(merged["rpn"]["conv"]["bias"], sd["rpn.head.conv.0.0.bias"])
    assert "arrays loaded" in caplog.text


# -m slow (CI's time): test_mask_rcnn_v2_parity.py also refuses v2 weights under a v1 config.
@pytest.mark.slow
@pytest.mark.parity
def test_torchvision_v2_detector_needs_the_v2_config(tmp_path, caplog):
    """maskrcnn_resnet50_fpn_v2's file: configs/fpn_r50_v2.py takes every layer (BatchNorm
    statistics included) with eps 1e-5, configs/fpn_r50.py fails before loading, naming the
    fields and the config to use."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import importlib.util

    from tests.reference import REPO_ROOT

    torch.manual_seed(0)
    net = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None,
                                                                weights_backbone=None)
    path = tmp_path / "maskrcnn_v2.pth"
    torch.save(net.state_dict(), path)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}

    spec = importlib.util.spec_from_file_location("fpn_r50_v2", REPO_ROOT / "configs/fpn_r50_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.canvas_size = (64, 64)
    config.train.init_from = str(path)
    assert init.init_from_overrides(config) == {"frozen_bn_eps": 1e-5}
    with caplog.at_level(logging.INFO, logger=init.__name__):
        merged = init.init_from(_variables(config, seed=0), config)
    assert "arrays loaded" in caplog.text and "fresh" not in caplog.text
    assert "unused" not in caplog.text
    np.testing.assert_array_equal(merged["params"]["rpn"]["conv2"]["kernel"],
                                  sd["rpn.head.conv.1.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        merged["batch_stats"]["roi_box_head"]["conv4_norm"]["var"],
        sd["roi_heads.box_head.3.1.running_var"])
    np.testing.assert_array_equal(merged["params"]["roi_box_head"]["fc1"]["kernel"],
                                  sd["roi_heads.box_head.5.weight"].T)

    v1 = base_config()
    v1.train.init_from = str(path)
    with pytest.raises(ValueError, match=r"another architecture: .*use configs/fpn_r50_v2\.py.*"
                                         r"model\.fpn_norm='frozen_bn' \(config: ''\)"):
        init.init_from({}, v1)
