"""torchvision weight import: layouts by hand, total name map, file formats, errors naming keys.

Most tests build a torchvision-layout state_dict for the tiny ResNet-FPN from the name map itself
(numpy only); the `.pth` and layer-level checks use torch when the parity extra is installed.
The full-size numeric parity (C2..C5, P2..P6) lives in tests/modeling/test_backbone.py.
"""

from __future__ import annotations

import json
import struct
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mrcnn_jax.checkpoints import torchvision as tvi
from mrcnn_jax.config_base import base_config
from mrcnn_jax.modeling.backbone.fpn import ResNetFPN
from mrcnn_jax.modeling.backbone.resnet import resnet_from_config

TORCH_SHAPE = {  # our converted shape -> torchvision's stored shape
    tvi.CONV: lambda s: (s[3], s[2], s[0], s[1]),
    tvi.LINEAR: lambda s: (s[1], s[0]),
    tvi.CONV_TRANSPOSE: lambda s: (s[2], s[3], s[0], s[1]),
    tvi.VECTOR: lambda s: tuple(s),
}


def tiny_config(**overrides):
    c = base_config().model
    c.backbone, c.fpn_channels = "resnet_tiny", 16
    c.update(overrides)
    return c


def _abstract(module):
    return tvi._abstract_variables(module)


def fake_state_dict(entries, target, seed=0):
    """A torchvision-layout state_dict for `entries`, shaped from our model's `target`."""
    rng = np.random.RandomState(seed)
    flat = tvi._flatten(target)
    sd = {}
    for e in entries:
        if e.kind == tvi.IGNORE:
            continue
        value = rng.randn(*TORCH_SHAPE[e.kind](flat[e.path].shape)).astype(np.float32)
        # Variances must be positive for the imported model to run.
        sd[e.torch_key] = np.abs(value) + 0.5 if e.torch_key.endswith("running_var") else value
    return sd


@pytest.fixture(scope="module")
def fpn_case():
    """(config, torch-layout state_dict with backbone.* keys, entries) of the tiny ResNet-FPN."""
    cfg = tiny_config()
    target = _abstract(ResNetFPN.from_config(cfg))
    entries = (tvi.resnet_entries((1, 1, 1, 1), torch_prefix="backbone.body.",
                                  path_prefix=("body",))
               + tvi.fpn_entries(path_prefix=("fpn",)))
    return cfg, fake_state_dict(entries, target), entries


# --- Layouts --------------------------------------------------------------------------------------

def test_conversions_by_hand():
    w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # torch (O, I, kh, kw)
    k = tvi._convert_array(tvi.Entry("c", (), tvi.CONV), w)
    assert k.shape == (4, 5, 3, 2) and k[3, 1, 2, 0] == w[0, 2, 3, 1]
    lin = np.arange(6, dtype=np.float32).reshape(2, 3)  # (out, in)
    np.testing.assert_array_equal(tvi._convert_array(tvi.Entry("l", (), tvi.LINEAR), lin), lin.T)
    # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), spatially flipped.
    t = tvi._convert_array(tvi.Entry("t", (), tvi.CONV_TRANSPOSE), w)
    assert t.shape == (4, 5, 2, 3) and t[4 - 1 - 1, 5 - 1 - 3, 1, 2] == w[1, 2, 1, 3]
    half = tvi._convert_array(tvi.Entry("v", (), tvi.VECTOR), np.ones(3, np.float16))
    assert half.dtype == np.float32  # half-precision checkpoints are widened


def test_tiny_resnet_fpn_import_is_total_and_exact(fpn_case):
    cfg, sd, entries = fpn_case
    variables = tvi.import_resnet_fpn(sd, cfg)
    target = _abstract(ResNetFPN.from_config(cfg))
    # Every model variable came from exactly one key, and every key was used.
    assert len(tvi._flatten(variables)) == len(tvi._flatten(target)) == len(sd)
    got = variables["params"]["body"]["layer2"]["block0"]["conv2"]["kernel"]
    np.testing.assert_array_equal(
        got, sd["backbone.body.layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
    bs = variables["batch_stats"]["body"]["layer1"]["block0"]["downsample_bn"]
    np.testing.assert_array_equal(bs["var"], sd["backbone.body.layer1.0.downsample.1.running_var"])
    np.testing.assert_array_equal(bs["scale"], sd["backbone.body.layer1.0.downsample.1.weight"])
    np.testing.assert_array_equal(variables["params"]["fpn"]["layer_blocks_3"]["bias"],
                                  sd["backbone.fpn.layer_blocks.3.0.bias"])
    # The imported tree runs in the model.
    out = jax.jit(ResNetFPN.from_config(cfg).apply)(variables, np.ones((1, 64, 64, 3), np.float32))
    assert len(out) == 5 and np.isfinite(np.asarray(out[0])).all()


def test_legacy_fpn_key_names_are_accepted(fpn_case):
    cfg, sd, _ = fpn_case
    legacy = {k.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
              if k.startswith("backbone.fpn.") else k: v for k, v in sd.items()}
    assert "backbone.fpn.inner_blocks.2.weight" in legacy
    a, b = tvi.import_resnet_fpn(legacy, cfg), tvi.import_resnet_fpn(sd, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    both = dict(sd, **{"backbone.fpn.inner_blocks.2.weight": legacy[
        "backbone.fpn.inner_blocks.2.weight"]})
    with pytest.raises(ValueError, match="inner_blocks.2"):
        tvi.import_resnet_fpn(both, cfg)


def test_imagenet_keys_fc_and_step_counters_are_dropped():
    cfg = tiny_config()
    model = resnet_from_config(cfg)
    entries = tvi.resnet_entries(model.stage_sizes)
    sd = fake_state_dict(entries, _abstract(model), seed=1)
    sd["fc.weight"], sd["fc.bias"] = np.ones((10, 256), np.float32), np.ones(10, np.float32)
    sd["layer3.0.bn2.num_batches_tracked"] = np.array(7, np.int64)
    variables = tvi.import_resnet(sd, cfg)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    assert "fc" not in variables["params"]


def test_group_norm_layout_imports_into_params():
    cfg = tiny_config(norm="group_norm", group_norm_groups=4)
    model = resnet_from_config(cfg)
    entries = tvi.resnet_entries(model.stage_sizes, norm="group_norm")
    sd = fake_state_dict(entries, _abstract(model), seed=2)
    assert "bn1.running_mean" not in sd
    variables = tvi.import_resnet(sd, cfg)
    assert set(variables) == {"params"}
    np.testing.assert_array_equal(variables["params"]["layer4"]["block0"]["bn3"]["scale"],
                                  sd["layer4.0.bn3.weight"])


def test_maskrcnn_import_defaults_to_eps_zero(fpn_case, monkeypatch):
    cfg, sd, _ = fpn_case
    assert tvi.MASKRCNN_CONFIG_OVERRIDES == {"frozen_bn_eps": 0.0}
    # Backbone part only: the heads' table is the heads engineer's (empty here on purpose).
    monkeypatch.setattr(tvi, "heads_entries", lambda model_config: [])
    body = _abstract(ResNetFPN.from_config(cfg))
    target = {c: {"backbone": tree} for c, tree in body.items()}
    variables, overrides = tvi.import_maskrcnn(sd, cfg, target=target)
    assert overrides == {"frozen_bn_eps": 0.0}
    np.testing.assert_array_equal(variables["params"]["backbone"]["fpn"]["inner_blocks_0"]["bias"],
                                  sd["backbone.fpn.inner_blocks.0.0.bias"])


V2_FIELDS = dict(fpn_norm="frozen_bn", head_norm="frozen_bn", box_head="4conv1fc",
                 rpn_conv_depth=2)


def test_v2_layout_imports_and_a_v1_config_names_the_key_and_the_config():
    """torchvision v2's layers (BatchNorm after the FPN and head convs, two RPN convs, the
    4conv1fc box head) on the tiny model: total map, read back off the keys, v1 config refused."""
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    cfg = tiny_config(box_head_conv_dims=(16, 16), box_head_dim=32, mask_head_layers=(16, 16),
                      **V2_FIELDS)
    sizes = jax.ShapeDtypeStruct((1, 2), np.int32)
    target = tvi._abstract_variables(MaskRCNN(cfg), (64, 64), sizes)
    sd = fake_state_dict(tvi.maskrcnn_entries(cfg), target, seed=3)
    sd["backbone.fpn.layer_blocks.2.1.num_batches_tracked"] = np.array(5, np.int64)
    for key in ("backbone.fpn.inner_blocks.3.1.running_mean", "rpn.head.conv.1.0.bias",
                "roi_heads.box_head.1.1.running_var", "roi_heads.box_head.3.weight",
                "roi_heads.mask_head.1.1.weight"):
        assert key in sd, key
    assert "backbone.fpn.inner_blocks.3.0.bias" not in sd  # the norm's conv has no bias
    assert tvi.architecture_of(sd) == V2_FIELDS
    assert tvi.detector_config_overrides(sd) == {"frozen_bn_eps": 1e-5}
    variables, overrides = tvi.import_maskrcnn(sd, cfg, target=target)
    assert overrides == {"frozen_bn_eps": 1e-5}
    assert len(tvi._flatten(variables)) == len(tvi._flatten(target)) == len(sd) - 1
    np.testing.assert_array_equal(variables["params"]["roi_box_head"]["fc1"]["kernel"],
                                  sd["roi_heads.box_head.3.weight"].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["fpn"]["layer_blocks_2_norm"]["mean"],
        sd["backbone.fpn.layer_blocks.2.1.running_mean"])
    np.testing.assert_array_equal(variables["params"]["rpn"]["conv2"]["bias"],
                                  sd["rpn.head.conv.1.0.bias"])
    # convert_detector (train.init_from) reads the architecture off the keys, whatever the config.
    detector = tvi.convert_detector(sd, tiny_config())
    jax.tree_util.tree_map(np.testing.assert_array_equal, detector, variables)

    v1 = tiny_config(box_head_dim=32, mask_head_layers=(16, 16))
    with pytest.raises(ValueError, match=r"look like torchvision v2 weights.*configs/fpn_r50_v2\.py"
                                         r".*model\.fpn_norm='frozen_bn' \(config: ''\).*unknown "
                                         r"key.*first 'backbone\.fpn\.inner_blocks\.0\.1\.weight'"):
        tvi.import_maskrcnn(sd, v1)


# --- Errors name the key --------------------------------------------------------------------------

def test_unknown_key_is_an_error_naming_it(fpn_case):
    cfg, sd, _ = fpn_case
    with pytest.raises(ValueError, match=r"unknown key.*backbone\.body\.layer5\.0\.conv1\.weight"):
        tvi.import_resnet_fpn(dict(sd, **{"backbone.body.layer5.0.conv1.weight": np.ones(1)}), cfg)


def test_missing_key_is_an_error_naming_it(fpn_case):
    cfg, sd, _ = fpn_case
    partial = {k: v for k, v in sd.items() if k != "backbone.body.layer3.0.bn2.running_var"}
    with pytest.raises(ValueError, match=r"missing key.*layer3\.0\.bn2\.running_var"):
        tvi.import_resnet_fpn(partial, cfg)


def test_shape_and_rank_mismatches_are_errors_naming_the_key(fpn_case):
    cfg, sd, _ = fpn_case
    bad = dict(sd)
    key = "backbone.fpn.layer_blocks.1.0.weight"
    bad[key] = np.ones((16, 16, 1, 3), np.float32)  # 3x3 expected
    with pytest.raises(ValueError, match=r"layer_blocks\.1\.0\.weight.*\(16, 16, 1, 3\)"):
        tvi.import_resnet_fpn(bad, cfg)
    bad[key] = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match=r"layer_blocks\.1\.0\.weight.*4-D"):
        tvi.import_resnet_fpn(bad, cfg)


def test_model_variable_without_key_is_an_error(fpn_case):
    cfg, sd, entries = fpn_case
    target = _abstract(ResNetFPN.from_config(cfg))
    short = [e for e in entries if e.torch_key != "backbone.fpn.inner_blocks.1.0.bias"]
    sd = {k: v for k, v in sd.items() if k != "backbone.fpn.inner_blocks.1.0.bias"}
    with pytest.raises(ValueError, match="fpn/inner_blocks_1/bias"):
        tvi.convert(sd, short, target)


def test_file_errors_name_the_file(tmp_path, fpn_case):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        tvi.load_state_dict(tmp_path / "nowhere.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="bad.safetensors"):
        tvi.load_state_dict(bad)
    trunc = tmp_path / "trunc.safetensors"
    tvi.save_safetensors({"a": np.ones(100, np.float32)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:-8])
    with pytest.raises(ValueError, match="'a'.*truncated"):
        tvi.load_state_dict(trunc)
    npz = tmp_path / "bad.npz"
    npz.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.npz"):
        tvi.load_state_dict(npz)
    other = tmp_path / "w.h5"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="w.h5"):
        tvi.load_state_dict(other)


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    path.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match=r"model\.pth.*requirements-parity.*safetensors"):
        tvi.load_state_dict(path)


# --- File formats ---------------------------------------------------------------------------------

def test_safetensors_and_npz_round_trips_give_identical_params(tmp_path, fpn_case):
    cfg, sd, _ = fpn_case
    tvi.save_safetensors(sd, tmp_path / "w.safetensors")
    tvi.save_npz(sd, tmp_path / "w.npz")
    ref = tvi.import_resnet_fpn(sd, cfg)
    for name in ("w.safetensors", "w.npz"):
        got = tvi.import_resnet_fpn(tmp_path / name, cfg)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)


def test_safetensors_format_by_hand(tmp_path):
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.array(-5, np.int64),
              "f16": np.array([0.5, -1.0], np.float16), "mask": np.array([True, False])}
    path = tmp_path / "x.safetensors"
    tvi.save_safetensors(arrays, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0  # data starts aligned, as the format recommends
    # Keys are written sorted: f16 (4 bytes) first, then f32 (24 bytes).
    assert header["f32"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}
    assert header["i64"]["shape"] == [] and header["mask"]["dtype"] == "BOOL"
    back = tvi.load_state_dict(path)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    # A file written elsewhere with BF16 and metadata: 1.0 = 0x3F80, -2.5 = 0xC020.
    hdr = json.dumps({"__metadata__": {"format": "pt"},
                      "w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + struct.pack("<HH", 0x3F80, 0xC020))
    np.testing.assert_array_equal(tvi.load_state_dict(path)["w"], np.array([1.0, -2.5], np.float32))


# --- With torch (parity extra) --------------------------------------------------------------------

@pytest.mark.parity
def test_pth_files_load_like_the_state_dict(tmp_path, fpn_case):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    cfg, sd, _ = fpn_case
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save(tsd, tmp_path / "w.pth")
    torch.save({"model": tsd, "epoch": 3}, tmp_path / "train.pth")  # torchvision's train script
    ref = tvi.import_resnet_fpn(sd, cfg)
    for name in ("w.pth", "train.pth"):
        got = tvi.import_resnet_fpn(tmp_path / name, cfg)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)
    torch.save({"x": torch.tensor([1.0, -2.5], dtype=torch.bfloat16)}, tmp_path / "b.pth")
    np.testing.assert_array_equal(tvi.load_state_dict(tmp_path / "b.pth")["x"], [1.0, -2.5])


@pytest.mark.parity
def test_linear_and_conv_transpose_conversions_match_torch_layers():
    """The layouts the heads import relies on: Linear -> nn.Dense, ConvTranspose2d(k2, s2) ->
    nn.ConvTranspose (flax default transpose_kernel=False, any padding for k = s)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = np.random.RandomState(0).randn(2, 5, 7, 4).astype(np.float32)
    ct = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)
    lin = torch.nn.Linear(4, 6)
    with torch.no_grad():
        ref_ct = ct(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        ref_lin = lin(torch.from_numpy(x)).numpy()
    sd = {"m.weight": ct.weight.detach().numpy(), "m.bias": ct.bias.detach().numpy(),
          "fc.weight": lin.weight.detach().numpy(), "fc.bias": lin.bias.detach().numpy()}
    v = tvi.convert(sd, tvi._conv_transpose("m", ("m",)) + tvi._linear("fc", ("fc",)))
    out_ct = nn.ConvTranspose(3, (2, 2), strides=(2, 2)).apply({"params": v["params"]["m"]}, x)
    out_lin = nn.Dense(6).apply({"params": v["params"]["fc"]}, x)
    np.testing.assert_allclose(out_ct, ref_ct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_lin, ref_lin, rtol=1e-5, atol=1e-6)
