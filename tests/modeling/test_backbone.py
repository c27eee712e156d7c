"""Backbone tests: FrozenBN/GroupNorm numbers, the torch nearest rule, trainable masks, parameter
counts against torchvision's published ones, and live parity of C2..C5 / P2..P6 with torchvision.

Tolerance of the parity tests: max |ours - torch| <= 1e-4 * max |torch| per feature map. Both sides
compute in float32 with different convolution algorithms (summation order). Measured on R50-FPN
(200x300 photo, randomised FrozenBN): ours vs torch <= 2.3e-6 of the scale, and each side is as
far from a float64 run (torch 1.0-1.3e-6, ours 1.4-1.8e-6), i.e. pure float32 noise. 1e-4 leaves
room for other CPUs / oneDNN versions; a layout, padding or stride mistake is O(1), and the
randomised statistics make eps 1e-5 vs 0 differ by 2e-3 (checked below), so eps is tested too.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.checkpoints import torchvision as tvi
from mrcnn_jax.config_base import base_config
from mrcnn_jax.modeling.backbone import fpn as fpn_lib
from mrcnn_jax.modeling.backbone import resnet
from mrcnn_jax.modeling.norm import FrozenBatchNorm, make_norm, norm_factory
from mrcnn_jax.modeling.conv import resolve_conv_impl

PARITY_RTOL = 1e-4


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def random_variables(abstract, seed):
    """Numpy-random variables shaped like `abstract` (jitting flax's RNG init of a whole ResNet
    costs seconds on CPU): He-scaled kernels, non-identity norm constants, positive variances."""
    rng = np.random.RandomState(seed)

    def fill(path, a):
        name = path[-1].key
        if name == "kernel":
            return (rng.randn(*a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        return (rng.randn(*a.shape) * 0.1).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_config(**overrides):
    c = base_config().model
    c.backbone = "resnet_tiny"
    c.fpn_channels = 16
    c.update(overrides)
    return c


# --- Norms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_frozen_bn_matches_formula_and_is_not_a_param(eps):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 4, 5).astype(np.float32)
    stats = {"scale": rng.uniform(0.5, 2, 5), "bias": rng.randn(5), "mean": rng.randn(5),
             "var": rng.uniform(0.1, 3, 5)}
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    m = FrozenBatchNorm(eps=eps)
    init = m.init(jax.random.PRNGKey(0), x)
    assert set(init) == {"batch_stats"}  # nothing an optimizer over "params" could update
    # torchvision's initial FrozenBatchNorm2d is the identity up to eps.
    np.testing.assert_allclose(m.apply(init, x), x / np.sqrt(1 + eps), rtol=1e-6)
    y = m.apply({"batch_stats": stats}, x)
    want = (x - stats["mean"]) * stats["scale"] / np.sqrt(stats["var"] + eps) + stats["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_bf16_frozen_bn_rounds_the_float32_map_once():
    """In bf16 the affine map runs in float32 with float32 constants and is rounded once, as
    torchvision's FrozenBatchNorm2d under autocast (bf16 input, float32 buffers)."""
    import ml_dtypes

    rng = np.random.RandomState(2)
    x = rng.randn(4, 6, 6, 16).astype(np.float32) * 5
    stats = {"scale": rng.uniform(0.5, 2, 16), "bias": rng.randn(16), "mean": rng.randn(16),
             "var": rng.uniform(0.1, 3, 16)}
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    x16 = jnp.asarray(x, jnp.bfloat16)
    y = FrozenBatchNorm(eps=1e-5, dtype=jnp.bfloat16).apply({"batch_stats": stats}, x16)
    assert y.dtype == jnp.bfloat16
    scale = stats["scale"] * (1 / np.sqrt(stats["var"] + np.float32(1e-5)))
    shift = stats["bias"] - stats["mean"] * scale
    exact = np.asarray(x16, np.float64) * scale + shift  # float64: float32's rounding is far finer
    want = exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    got = np.asarray(y, np.float64)
    # one rounding: every value is the exact map's nearest bf16 (or, where float32's own rounding
    # lands across a bf16 tie, its neighbour); rounding the constants and the product too would
    # put ~1/3 of the values one bf16 step off
    off = got != want
    assert off.mean() < 1e-3, off.mean()
    np.testing.assert_allclose(got, exact, rtol=2.0 ** -8, atol=0)


def test_group_norm_option_matches_numpy():
    cfg = base_config().model
    cfg.norm, cfg.group_norm_groups = "group_norm", 4
    m = make_norm(cfg)()
    x = np.random.RandomState(1).randn(2, 3, 3, 8).astype(np.float32) * 3 + 1
    v = m.init(jax.random.PRNGKey(0), x)
    assert set(v) == {"params"} and set(v["params"]) == {"scale", "bias"}  # trainable
    g = x.reshape(2, 3, 3, 4, 2)
    mu = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    want = ((g - mu) / np.sqrt(var + 1e-5)).reshape(x.shape)  # torch eps, identity affine
    np.testing.assert_allclose(m.apply(v, x), want, rtol=1e-4, atol=1e-5)


def test_unknown_norm_and_backbone_are_errors():
    with pytest.raises(ValueError, match="norm"):
        norm_factory("batch_norm")
    with pytest.raises(ValueError, match="model.backbone"):
        resnet.resnet_from_config(tiny_config(backbone="resnet18"))
    with pytest.raises(ValueError, match="images"):
        resnet.ResNetTiny().init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="features"):
        fpn_lib.FPN(8).init(jax.random.PRNGKey(0), [jnp.zeros((1, 4, 4, 8))] * 3)


# --- FPN upsampling --------------------------------------------------------------------------

def test_nearest_indices_follow_torch_rule():
    # floor(i * in / out), by hand: 3 -> 7 uses scale 3/7 = 0.4286.
    np.testing.assert_array_equal(fpn_lib.nearest_indices(3, 7), [0, 0, 0, 1, 1, 2, 2])
    # The FPN case: C_l has ceil(C_{l+1} * 2) or one less rows; both are i // 2.
    for n in (1, 4, 13, 25):
        np.testing.assert_array_equal(fpn_lib.nearest_indices(n, 2 * n), np.arange(2 * n) // 2)
        np.testing.assert_array_equal(fpn_lib.nearest_indices(n, 2 * n - 1),
                                      np.arange(2 * n - 1) // 2)


def test_upsample_nearest_even_fast_path_equals_gather_and_odd_sizes():
    x = jnp.asarray(np.random.RandomState(2).randn(2, 3, 5, 4), jnp.float32)
    fast = fpn_lib.upsample_nearest(x, (6, 10))
    np.testing.assert_array_equal(fast, np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))
    odd = fpn_lib.upsample_nearest(x, (5, 9))
    np.testing.assert_array_equal(odd, np.asarray(fast)[:, :5, :9])


def _conv_np(x, kernel, bias, pad):
    """Stride-1 NHWC conv with an HWIO kernel, numpy."""
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros(x.shape[:1] + (h, w, kernel.shape[-1]), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], kernel[i, j])
    return out + bias


def test_fpn_matches_numpy_reference_on_odd_sizes():
    rng = np.random.RandomState(3)
    sizes = [(13, 11), (7, 6), (4, 3), (2, 2)]  # C2..C5 of a 50x43 image: odd, uneven
    feats = [rng.randn(1, h, w, c).astype(np.float32) for (h, w), c in zip(sizes, (3, 4, 5, 6))]
    m = fpn_lib.FPN(channels=4)
    v = random_variables(jax.eval_shape(m.init, jax.random.PRNGKey(0), feats), seed=3)
    out = jax.jit(m.apply)(v, feats)
    p = v["params"]
    inner = _conv_np(feats[3], p["inner_blocks_3"]["kernel"], p["inner_blocks_3"]["bias"], 0)
    want = [_conv_np(inner, p["layer_blocks_3"]["kernel"], p["layer_blocks_3"]["bias"], 1)]
    for i in (2, 1, 0):
        lateral = p[f"inner_blocks_{i}"]
        lat = _conv_np(feats[i], lateral["kernel"], lateral["bias"], 0)
        h, w = lat.shape[1:3]
        up = inner[:, fpn_lib.nearest_indices(inner.shape[1], h)]
        inner = lat + up[:, :, fpn_lib.nearest_indices(inner.shape[2], w)]
        want.insert(0, _conv_np(inner, p[f"layer_blocks_{i}"]["kernel"],
                                p[f"layer_blocks_{i}"]["bias"], 1))
    want.append(want[-1][:, ::2, ::2])
    assert len(out) == 5
    for o, w in zip(out, want):
        np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-4)


# --- ResNet structure --------------------------------------------------------------------------

@pytest.mark.parametrize("name,torchvision_params", [
    # torchvision's documented parameter counts minus the ImageNet fc (2048 * 1000 + 1000).
    ("resnet50", 25_557_032 - 2_049_000),
    ("resnet101", 44_549_160 - 2_049_000),
    ("resnext101_32x8d", 88_791_336 - 2_049_000),
])
def test_parameter_counts_match_torchvision(name, torchvision_params):
    cfg = base_config().model
    cfg.backbone = name
    model = resnet.resnet_from_config(cfg)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
    # torchvision counts BN weight+bias as parameters; our FrozenBN keeps them with mean/var.
    assert count(v["params"]) + count(v["batch_stats"]) // 2 == torchvision_params


def test_output_strides_and_channels_on_odd_input():
    model = resnet.ResNetTiny()
    x = jnp.asarray(np.random.RandomState(4).randn(1, 50, 43, 3), jnp.float32)
    v = random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x), seed=4)
    feats = jax.jit(model.apply)(v, x)
    # torch's padded convs round up at every stride-2 step: 50 -> 25 -> 13 -> 7 -> 4 -> 2.
    assert [f.shape[1:] for f in feats] == [(13, 11, 32), (7, 6, 64), (4, 3, 128), (2, 2, 256)]
    assert model.out_channels == (32, 64, 128, 256)
    assert all(float(f.min()) >= 0.0 for f in feats)  # every stage ends in a ReLU


def test_trainable_mask_follows_torchvision_trainable_layers():
    cfg = tiny_config()
    model = fpn_lib.ResNetFPN.from_config(cfg)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    params = {"backbone": v["params"], "rpn": {"conv": {"kernel": 0}}}

    def frozen_modules(mask):
        flat = jax.tree_util.tree_flatten_with_path(mask)[0]
        return sorted({p[2].key for p, m in flat if not m})

    assert frozen_modules(resnet.trainable_mask(params, 3)) == ["conv1", "layer1"]
    assert frozen_modules(resnet.trainable_mask(params, 5)) == []
    assert frozen_modules(resnet.trainable_mask(params, 1)) == [
        "conv1", "layer1", "layer2", "layer3"]
    mask0 = resnet.trainable_mask(params, 0)
    assert not any(jax.tree_util.tree_leaves(mask0["backbone"]["body"]))
    assert all(jax.tree_util.tree_leaves(mask0["backbone"]["fpn"]))
    assert mask0["rpn"]["conv"]["kernel"]
    bare = resnet.trainable_mask(v["params"]["body"], 3, body_key=None)
    assert not bare["layer1"]["block0"]["conv2"]["kernel"]
    assert bare["layer2"]["block0"]["conv2"]["kernel"]
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        resnet.trainable_mask(params, 6)


def _body_and_fpn_grads(trainable_backbone_layers, variables, images, cotangents):
    model = fpn_lib.ResNetFPN.from_config(
        tiny_config(trainable_backbone_layers=trainable_backbone_layers))

    def loss(params):
        feats = model.apply({**variables, "params": params}, images)
        return sum(jnp.vdot(f, c) for f, c in zip(feats, cotangents))

    grad_fn = jax.grad(loss)
    jaxpr = str(jax.make_jaxpr(grad_fn)(variables["params"]))
    products = re.findall(r"\b(conv_general_dilated|dot_general)\[", jaxpr)
    return grad_fn(variables["params"]), len(products)


# -m slow (CI's time): test_train_lib.py checks that frozen stages do not change in training.
@pytest.mark.slow
def test_frozen_stages_get_no_gradient_and_leave_the_others_exact():
    """trainable_backbone_layers=3 cuts the backward pass at layer1 (torch's requires_grad=False):
    conv1/layer1 gradients are exactly zero and not computed at all (fewer convolutions in the
    gradient's program), every other gradient is the one of a fully trainable body."""
    model = fpn_lib.ResNetFPN.from_config(tiny_config())
    images = jnp.asarray(np.random.RandomState(0).randn(2, 48, 40, 3), jnp.float32)
    variables = random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), images), 1)
    feats = jax.eval_shape(model.apply, variables, images)
    rng = np.random.RandomState(2)
    cotangents = [jnp.asarray(rng.randn(*f.shape), jnp.float32) for f in feats]
    frozen3, convs3 = _body_and_fpn_grads(3, variables, images, cotangents)
    all5, convs5 = _body_and_fpn_grads(5, variables, images, cotangents)
    body3, body5 = frozen3["body"], all5["body"]
    for name in ("conv1", "layer1"):
        for (path, g), (_, g5) in zip(_leaves(body3[name]), _leaves(body5[name])):
            assert not np.any(np.asarray(g)), f"{name}{jax.tree_util.keystr(path)}"
            assert np.any(np.asarray(g5))
    for tree3, tree5 in ((body3["layer2"], body5["layer2"]), (body3["layer4"], body5["layer4"]),
                         (frozen3["fpn"], all5["fpn"])):
        for (path, g), (_, g5) in zip(_leaves(tree3), _leaves(tree5)):
            np.testing.assert_allclose(g, g5, rtol=1e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))
    # At least the kernel gradients of the frozen kernels are gone from the program: conv1 (7x7)
    # and layer1's block (1x1, 3x3, 1x1 and the 1x1 downsample), one product per tap on CPU
    # (model.conv_impl "cpu", mrcnn_jax/cpu/conv.py), one convolution each with XLA's own.
    taps = resolve_conv_impl("auto") == "cpu"
    assert convs5 - convs3 >= (49 + 1 + 9 + 1 + 1 if taps else 5), (convs5, convs3)


def test_group_norm_backbone_bf16_close_to_float32():
    x = jnp.asarray(np.random.RandomState(5).rand(1, 64, 64, 3), jnp.float32)
    cfg = tiny_config(norm="group_norm", group_norm_groups=4)
    m32 = fpn_lib.ResNetFPN.from_config(cfg)
    v = random_variables(jax.eval_shape(m32.init, jax.random.PRNGKey(0), x), seed=5)
    assert "batch_stats" not in v  # GroupNorm has no frozen constants
    out32 = jax.jit(m32.apply)(v, x)
    m16 = fpn_lib.ResNetFPN.from_config(tiny_config(norm="group_norm", group_norm_groups=4,
                                                    dtype="bfloat16"))
    out16 = jax.jit(m16.apply)(v, x)
    for a, b in zip(out32, out16):
        assert b.dtype == jnp.bfloat16
        diff = jnp.abs(a - b.astype(jnp.float32))
        # bf16 has 8 mantissa bits: ~0.4 % per rounding, and every convolution's output is
        # rounded (cpu/conv.py's bf16 products; XLA's own bf16 convolutions kept float32 in
        # their fused consumers: 2.0 % max here). Measured: max 1.5-3.1 %, RMS 1.3-2.6 %.
        max_err = float(diff.max() / jnp.abs(a).max())
        rms_err = float(jnp.sqrt(jnp.mean(diff**2) / jnp.mean(a**2)))
        assert max_err < 4e-2 and rms_err < 3e-2, (max_err, rms_err)


# --- Live parity with torchvision (parity extra) ----------------------------------------------

def _photo(hw=(200, 300)):
    """skimage's coffee photo resized (bilinear) to hw and normalised like torchvision: NCHW."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(data.coffee()).resize((hw[1], hw[0]), Image.BILINEAR)
    d = base_config().data
    x = (np.asarray(img, np.float32) / 255.0 - np.array(d.pixel_mean, np.float32)) / np.array(
        d.pixel_std, np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def _randomise_frozen_bn(torch_module, seed):
    """Non-identity BN statistics and affine, so eps/layout mistakes show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in torch_module.modules():
            if hasattr(m, "running_var"):
                n = m.running_var.numel()
                weight = torch.rand(n, generator=g) + 0.5
                var = torch.rand(n, generator=g) * 1.5 + 0.5
                # Every 8th channel: a small variance, where eps = 1e-5 moves the scale by 0.05 %
                # (so a wrong eps fails the test), with a small weight to keep the gain O(1).
                var[::8], weight[::8] = 0.01, weight[::8] * 0.1
                m.weight.copy_(weight)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(var)


def _assert_parity(ours, ref_nchw, name):
    ref = ref_nchw.detach().numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, name
    scale = float(np.abs(ref).max())
    assert scale > 1e-2, name  # the map is not degenerate
    err = float(np.abs(ours - ref).max()) / scale
    assert err <= PARITY_RTOL, f"{name}: max error {err:.2e} of the map's scale"


@pytest.fixture(scope="module")
def torch_maskrcnn():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    torch.set_num_threads(1)
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    # What `maskrcnn_resnet50_fpn` builds when given weights (with weights=None it would use
    # trainable nn.BatchNorm2d): a FrozenBatchNorm2d ResNet-50, layers 2..4 trainable, FPN.
    body = tv.models.resnet50(norm_layer=FrozenBatchNorm2d)
    model = tv.models.detection.MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91).eval()
    _randomise_frozen_bn(model.backbone.body, seed=1)
    return model


@pytest.mark.parity
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_resnet50_fpn_matches_torchvision(torch_maskrcnn, eps):
    import torch

    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = [m for m in torch_maskrcnn.backbone.body.modules()
              if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53
    for m in frozen:
        m.eps = eps  # torchvision's COCO builder does the same with eps 0
    x = _photo()
    with torch.no_grad():
        ref_c = torch_maskrcnn.backbone.body(torch.from_numpy(x))
        ref_p = torch_maskrcnn.backbone(torch.from_numpy(x))
    sd = {k: v.numpy() for k, v in torch_maskrcnn.state_dict().items() if k.startswith("backbone.")}
    cfg = base_config().model
    cfg.frozen_bn_eps = eps
    variables = tvi.import_resnet_fpn(sd, cfg)
    model = fpn_lib.ResNetFPN.from_config(cfg)
    xs = jnp.asarray(x.transpose(0, 2, 3, 1))
    p_maps, c_maps = jax.jit(lambda v, im: (model.apply(v, im),
                                            model.apply(v, im, method=model.body_features)))(
        variables, xs)
    for name, ours, ref in zip(["C2", "C3", "C4", "C5"], c_maps, ref_c.values()):
        _assert_parity(ours, ref, name)
    assert list(ref_p) == ["0", "1", "2", "3", "pool"]
    for name, ours, ref in zip(["P2", "P3", "P4", "P5", "P6"], p_maps, ref_p.values()):
        _assert_parity(ours, ref, name)
    # The test can see eps: the other eps is far outside the tolerance.
    cfg.frozen_bn_eps = 1e-5 if eps == 0.0 else 0.0
    wrong = jax.jit(fpn_lib.ResNetFPN.from_config(cfg).apply)(variables, xs)
    with pytest.raises(AssertionError, match="P2"):
        _assert_parity(wrong[0], ref_p["0"], "P2")


def _imagenet_parity(arch, hw, seed):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    from torchvision.models._utils import IntermediateLayerGetter

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    net = getattr(tv.models, arch)().eval()
    _randomise_frozen_bn(net, seed)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    assert "fc.weight" in sd and any(k.endswith("num_batches_tracked") for k in sd)
    cfg = base_config().model
    cfg.backbone = arch
    variables = tvi.import_resnet(sd, cfg)  # fc.* and num_batches_tracked dropped by name
    x = _photo(hw)
    getter = IntermediateLayerGetter(net, {f"layer{i}": f"C{i + 1}" for i in range(1, 5)})
    with torch.no_grad():
        ref = getter(torch.from_numpy(x))
    model = resnet.resnet_from_config(cfg)
    ours = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    for (name, r), o in zip(ref.items(), ours):
        _assert_parity(o, r, f"{arch} {name}")


@pytest.mark.parity
def test_imagenet_resnet50_matches_torchvision():
    _imagenet_parity("resnet50", (96, 128), seed=2)


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["resnet101", "resnext101_32x8d"])
def test_imagenet_deep_backbones_match_torchvision(arch):
    _imagenet_parity(arch, (64, 64), seed=3)
