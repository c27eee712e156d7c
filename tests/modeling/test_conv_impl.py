"""`model.conv_impl`: "xla" (flax's stock layers) and "cpu" (mrcnn_jax/cpu/'s kernels) create the
same parameters and compute the same values and gradients, layer by layer and through the model;
under "xla" nothing of mrcnn_jax/cpu/ enters the train step."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from mrcnn_jax.modeling import conv as layers
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

# max |cpu - xla| / max |xla|: float32 differs by summation order (Winograd's transforms, per-tap
# sums), bfloat16 by the roundings the CPU forms skip (float32 bias adds and accumulations).
TOLERANCE = {jnp.float32: 5e-5, jnp.bfloat16: 1e-2}
# A bfloat16 bias gradient is a sum over every pixel: stock flax sums it in bfloat16, the CPU
# form in float32. Against the float32 layer the CPU form keeps bfloat16's tolerance; stock
# flax's is what a bfloat16 sum of thousands of terms gives.
BF16_BIAS_GRAD_TOLERANCE = {"cpu": 1e-2, "xla": 0.25}


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def _is_bias(path) -> bool:
    return getattr(path[-1], "key", None) == "bias"


def _assert_trees_close(got, want, tol, what, skip=None):
    flat_got, tree_got = jax.tree_util.tree_flatten_with_path(got)
    flat_want, tree_want = jax.tree_util.tree_flatten_with_path(want)
    assert tree_got == tree_want, f"{what}: different structures"
    for (path, a), (_, b) in zip(flat_got, flat_want):
        if skip is not None and skip(path):
            continue
        err = _relative_error(a, b)
        assert err <= tol, f"{what} {jax.tree_util.keystr(path)}: relative error {err:.2e} > {tol}"


# (name, input shape, layer factory taking (conv_impl, dtype)): every layer form the model has.
LAYERS = [
    ("stem 7x7 s2", (2, 32, 48, 3), lambda i, d: layers.conv(
        i, 16, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=d)),
    ("1x1", (2, 16, 24, 32), lambda i, d: layers.conv(i, 24, (1, 1), use_bias=False, dtype=d)),
    ("1x1 s2 downsample", (2, 16, 24, 32), lambda i, d: layers.conv(
        i, 48, (1, 1), strides=(2, 2), use_bias=False, dtype=d)),
    ("3x3 s2", (2, 16, 24, 32), lambda i, d: layers.conv(
        i, 32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, dtype=d)),
    ("3x3 grouped (ResNeXt)", (2, 16, 24, 32), lambda i, d: layers.conv(
        i, 32, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=4, use_bias=False, dtype=d)),
    ("3x3 grouped s2", (2, 16, 24, 32), lambda i, d: layers.conv(
        i, 32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=4,
        use_bias=False, dtype=d)),
    ("FPN/RPN 3x3 + bias", (2, 24, 20, 16), lambda i, d: layers.conv(
        i, 16, (3, 3), padding=1, dtype=d)),
    ("RPN 1x1 + bias", (2, 24, 20, 16), lambda i, d: layers.conv(i, 12, (1, 1), dtype=d)),
    # Large enough for Winograd: F(2x2, 3x3) in bf16 (>= 1024 tiles), F(4x4, 3x3) in float32
    # (>= 128 channels, >= 128 tiles).
    ("3x3 Winograd-sized", (1, 64, 64, 128), lambda i, d: layers.conv(
        i, 128, (3, 3), padding=1, dtype=d)),
    ("mask head 3x3 on RoIs", (16, 14, 14, 32), lambda i, d: layers.conv(
        i, 32, (3, 3), padding=1, dtype=d)),
    ("mask deconv 2x2 s2", (16, 14, 14, 32), lambda i, d: layers.conv_transpose(
        i, 24, (2, 2), strides=(2, 2), padding="VALID", dtype=d)),
    ("keypoint deconv 4x4 s2", (4, 14, 14, 16), lambda i, d: layers.conv_transpose(
        i, 5, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), dtype=d)),
    ("dense", (2, 32, 64), lambda i, d: layers.dense(i, 48, dtype=d)),
    ("fc6 over RoI maps", (2, 8, 7, 7, 16), lambda i, d: layers.flatten_dense(
        i, 32, nn.initializers.lecun_normal(), nn.initializers.normal(0.1), d, "fc6")),
]


class _Wrapped(nn.Module):
    make: object

    @nn.compact
    def __call__(self, x):
        return self.make()(x)


def _value_and_grads(make, x, variables=None):
    module = _Wrapped(make)
    if variables is None:
        variables = module.init(jax.random.PRNGKey(0), x)
    probe = jax.random.normal(jax.random.PRNGKey(1), module.apply(variables, x).shape)

    def loss(v, inputs):
        return jnp.sum(module.apply(v, inputs).astype(jnp.float32) * probe)

    y = jax.jit(module.apply)(variables, x)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
    return variables, y, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,x_shape,factory", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_layer_values_and_gradients_agree(name, x_shape, factory, dtype):
    x = jax.random.normal(jax.random.PRNGKey(2), x_shape).astype(dtype)
    v_xla, y_xla, g_xla = _value_and_grads(lambda: factory("xla", dtype), x)
    v_cpu, y_cpu, g_cpu = _value_and_grads(lambda: factory("cpu", dtype), x, None)
    # Same parameter names, shapes and initial values: checkpoints fit either implementation.
    _assert_trees_close(v_cpu, v_xla, 0.0, f"{name} init")
    v_cpu, y_cpu, g_cpu = _value_and_grads(lambda: factory("cpu", dtype), x, v_xla)
    assert y_cpu.dtype == y_xla.dtype == dtype
    tol = TOLERANCE[dtype]
    _assert_trees_close(y_cpu, y_xla, tol, f"{name} output")
    bf16 = dtype == jnp.bfloat16
    _assert_trees_close(g_cpu, g_xla, tol, f"{name} gradient", skip=_is_bias if bf16 else None)
    if bf16:
        _, _, g_f32 = _value_and_grads(lambda: factory("xla", jnp.float32),
                                       x.astype(jnp.float32), v_xla)
        biases = lambda g: {k: v["bias"] for k, v in g[0]["params"].items()  # noqa: E731
                            if "bias" in v}
        for impl, grads in (("cpu", g_cpu), ("xla", g_xla)):
            _assert_trees_close(biases(grads), biases(g_f32), BF16_BIAS_GRAD_TOLERANCE[impl],
                                f"{name} {impl} bias gradient vs float32")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_stem_max_pool_agrees(dtype):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 33, 40, 8)).astype(dtype)
    pool = functools.partial(layers.max_pool, window=(3, 3), strides=(2, 2),
                             pads=((1, 1), (1, 1)))
    # Positive, so no sum of a pixel's gradients cancels to zero in one dtype only.
    probe = jax.random.uniform(jax.random.PRNGKey(4), (2, 17, 20, 8), minval=0.5, maxval=1.5)
    outs = {impl: (pool(impl, x), jax.grad(lambda v, i=impl: jnp.sum(
        pool(i, v).astype(jnp.float32) * probe))(x)) for impl in ("xla", "cpu")}
    # A max selects: both forms return the same element and send its gradient to the same place;
    # where windows overlap, the CPU form sums the gradients in float32, XLA's in the input dtype.
    (y_cpu, d_cpu), (y_xla, d_xla) = [[np.asarray(a, np.float32) for a in outs[impl]]
                                      for impl in ("cpu", "xla")]
    np.testing.assert_array_equal(y_cpu, y_xla)
    np.testing.assert_array_equal(d_cpu != 0, d_xla != 0)
    # Float32 sums a pixel's (up to 4) window gradients in another order.
    np.testing.assert_allclose(d_cpu, d_xla, rtol=1e-6 if dtype == jnp.float32 else 2**-7)


def test_materialized_is_the_identity_computed_once():
    """Under "cpu" the value passes through a conditional (what keeps XLA from recomputing it
    in its consumers), bit for bit; differentiated, and under "xla", nothing is added."""
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 7, 8))
    probe = jax.random.normal(jax.random.PRNGKey(6), x.shape)
    for impl, has_cond in (("cpu", True), ("xla", False)):
        fn = jax.jit(lambda v, i=impl: jax.nn.relu(layers.materialized(i, v * 2.0)))
        np.testing.assert_array_equal(fn(x), jax.nn.relu(x * 2.0))
        assert ("stablehlo.case" in fn.lower(x).as_text()) == has_cond, impl
        grad = jax.jit(jax.grad(lambda v, f=fn: jnp.sum(f(v) * probe)))
        np.testing.assert_array_equal(grad(x), jnp.where(x > 0, 2.0 * probe, 0.0))
        assert "stablehlo.case" not in grad.lower(x).as_text(), impl


def test_unknown_conv_impl_is_refused():
    with pytest.raises(ValueError, match="model.conv_impl='gpu'"):
        layers.resolve_conv_impl("gpu")
    assert layers.resolve_conv_impl("auto") == ("cpu" if jax.default_backend() == "cpu"
                                                else "xla")


# --- The train step under each implementation ------------------------------------------------

def _mrcnn_origin(eqn) -> str | None:
    """The innermost file of this package that traced `eqn` (None when none did)."""
    traceback = eqn.source_info.traceback
    for frame in (traceback.frames if traceback is not None else ()):
        if "/mrcnn_jax/" in frame.file_name:
            return frame.file_name.rsplit("/mrcnn_jax/", 1)[1]
    return None


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _equations(sub)


def _train_step_jaxpr(conv_impl: str, dtype: str):
    from mrcnn_jax import train_lib
    from mrcnn_jax.modeling.losses import train_batch_keys
    from tests.training.train_fixtures import fixed_batch, tiny_config

    config = tiny_config()
    config.model.conv_impl, config.model.dtype = conv_impl, dtype
    config.model.mask_roi_buckets = (8,)  # the slot-bucket switch and its custom VJP
    model = MaskRCNN(config.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    tx = train_lib.make_optimizer(config, variables["params"])
    state = train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1))
    batch = {k: jnp.asarray(v) for k, v in fixed_batch().items()
             if k in train_batch_keys(config.model)}
    return jax.make_jaxpr(train_lib.make_train_step(model, tx))(state, batch).jaxpr


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_xla_train_step_has_no_cpu_kernel(dtype):
    """Under "xla" no equation of the train step comes from mrcnn_jax/cpu/, and the only custom
    VJPs are RoIAlign's and the heads' slot-bucket switch; under "cpu" (traced in float32, the
    control) the kernels are there."""
    origins = {impl: [(eqn.primitive.name, _mrcnn_origin(eqn))
                      for eqn in _equations(_train_step_jaxpr(impl, d))]
               for impl, d in (("xla", dtype), ("cpu", "float32"))}
    from_cpu = {impl: {o for _, o in eqns if o and o.startswith("cpu/")}
                for impl, eqns in origins.items()}
    assert not from_cpu["xla"], from_cpu["xla"]
    assert {"cpu/conv.py", "cpu/layers.py", "cpu/matmul.py"} <= from_cpu["cpu"]
    custom_vjps = {impl: {o for name, o in eqns if name.startswith("custom_vjp")}
                   for impl, eqns in origins.items()}
    # (The switch's custom VJP is differentiated where it is traced, so its rule is inlined.)
    assert "ops/roi_align.py" in custom_vjps["xla"]
    assert custom_vjps["xla"] <= {"ops/roi_align.py", "modeling/losses.py"}, custom_vjps["xla"]
    assert any(o.startswith("cpu/") for o in custom_vjps["cpu"]), custom_vjps["cpu"]


def _model_outputs(conv_impl: str, config, variables, images, rois):
    """Backbone maps, RPN outputs and every RoI head on fixed RoIs, and the gradient of a fixed
    projection of them with respect to the parameters."""
    config = config.copy_and_resolve_references()
    config.conv_impl = conv_impl
    model = MaskRCNN(config)

    def outputs(params):
        v = {**variables, "params": params}
        features = model.apply(v, images, method=MaskRCNN.backbone_features)
        out = {"features": features,
               "rpn": model.apply(v, features, method=MaskRCNN.rpn_head),
               "box": model.apply(v, features, rois, method=MaskRCNN.box_head)}
        if config.mask_head:
            out["mask"] = model.apply(v, features, rois, method=MaskRCNN.mask_head)
        if config.keypoint_head:
            out["keypoint"] = model.apply(v, features, rois, method=MaskRCNN.keypoint_head)
        return out

    def projection(params):
        leaves = jax.tree_util.tree_leaves(outputs(params))
        return sum(jnp.mean(jnp.sin(3.0 * leaf.astype(jnp.float32))) for leaf in leaves)

    return jax.jit(outputs)(variables["params"]), jax.jit(jax.grad(projection))(
        variables["params"])


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_model_outputs_and_gradients_agree(dtype):
    """The whole model (torchvision v2's layers: frozen BatchNorm after the FPN and head convs,
    two RPN convs, the 4conv1fc box head; mask and keypoint heads) under "cpu" and "xla" from
    one set of variables: the same maps, scores, boxes, masks and keypoint heatmaps, and the same
    parameter gradients, to the dtype's tolerance. (TwoMLPHead's fc6: test_box_head.py.)"""
    from mrcnn_jax import train_lib
    from tests.training.train_fixtures import tiny_config

    config = tiny_config().model
    config.dtype = dtype
    config.box_head, config.box_head_conv_dims = "4conv1fc", (16, 16)
    config.fpn_norm = config.head_norm = "frozen_bn"
    config.rpn_conv_depth = 2
    config.keypoint_head, config.keypoint_head_layers, config.num_keypoints = True, (16, 16), 5
    variant = "v2-layers-mask-keypoint"
    variables = train_lib.init_variables(MaskRCNN(config), jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 96, 96, 3))
    rois = jnp.asarray([[[4, 4, 40, 50], [10, 20, 90, 70], [0, 0, 96, 96]],
                        [[30, 30, 60, 60], [5, 50, 45, 95], [50, 2, 94, 40]]], jnp.float32)
    out_xla, grad_xla = _model_outputs("xla", config, variables, images, rois)
    out_cpu, grad_cpu = _model_outputs("cpu", config, variables, images, rois)
    tol = TOLERANCE[jnp.dtype(dtype).type]
    _assert_trees_close(out_cpu, out_xla, 2 * tol, f"{variant} outputs")
    if dtype == "float32":
        _assert_trees_close(grad_cpu, grad_xla, 2 * tol, f"{variant} gradients")
        return
    # bfloat16: each layer's rounding moves the backward of the layers below it (ReLUs switch),
    # so deep gradients differ by several percent between any two bf16 computations. Each is
    # compared as a whole (relative Frobenius norm) with float32's: stock flax's within 25 %
    # (bias gradients, summed in bfloat16 there, excepted), the CPU forms' no further than 2x
    # stock flax's.
    f32 = config.copy_and_resolve_references()
    f32.dtype = "float32"
    _, grad_f32 = _model_outputs("xla", f32, variables, images, rois)

    def norm_errors(grads):
        """{leaf: relative error}; a frozen stage's gradient (exactly 0) must stay 0."""
        return {jax.tree_util.keystr(path): float(jnp.linalg.norm(g - w)
                                                  / max(float(jnp.linalg.norm(w)), 1e-30))
                for (path, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                             jax.tree_util.tree_flatten_with_path(grad_f32)[0])}

    err_xla, err_cpu = norm_errors(grad_xla), norm_errors(grad_cpu)
    for name, err in err_xla.items():
        assert name.endswith("['bias']") or err <= 0.25, (name, err)
        assert err_cpu[name] <= max(2 * err, 0.1), (name, err_cpu[name], err)
