"""bf16 compute (`model.dtype="bfloat16"`): convolutions and matmuls in bfloat16, parameters,
gradients, optimizer state, losses and box decoding in float32.

On fixed weights and one fixed batch the bf16 losses stay within BF16_LOSS_RTOL = 1 % of
float32's. bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 % per operation); the
losses average over many anchors, RoIs and pixels, so they move far less. Measured on
fixed_batch(seed=0) with the init of tiny_config (CPU, jax 0.10): largest relative difference
5.3e-4 (loss_cls), then 7e-5 (loss_mask), 5e-5 (loss_box_reg), < 3e-6 (RPN losses): the bound
leaves ~20x room for other XLA versions and backends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import train_lib
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from tests.training.train_fixtures import fixed_batch, tiny_config

BF16_LOSS_RTOL = 1e-2


@pytest.fixture(scope="module")
def runs():
    out = {}
    batch = {k: jnp.asarray(v) for k, v in fixed_batch(seed=0).items()
             if k in train_lib.TRAIN_BATCH_KEYS}
    config = tiny_config()
    variables = train_lib.init_variables(MaskRCNN(config.model), jax.random.PRNGKey(0))
    for dtype in ("float32", "bfloat16"):
        c = tiny_config()
        c.model.dtype = dtype
        model = MaskRCNN(c.model)
        tx = train_lib.make_optimizer(c, variables["params"])
        state = train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1))
        step = jax.jit(train_lib.make_train_step(model, tx))
        new_state, metrics = step(state, batch)
        out[dtype] = (jax.device_get(metrics), jax.device_get(new_state), jax.device_get(state))
    return out


def test_bf16_losses_stay_close_to_float32(runs):
    f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
    for name in (*train_lib.LOSS_NAMES, "loss"):
        assert np.isfinite(bf16[name]), name
        np.testing.assert_allclose(bf16[name], f32[name], rtol=BF16_LOSS_RTOL, err_msg=name)
    # ... and bf16 did compute in bf16: the losses are not bit-identical to float32's.
    assert any(bf16[k] != f32[k] for k in train_lib.LOSS_NAMES)


def test_bf16_keeps_params_and_optimizer_state_in_float32(runs):
    _, new_state, old_state = runs["bfloat16"]
    for tree in (new_state.params, new_state.opt_state, new_state.batch_stats):
        dtypes = {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(tree)
                  if np.issubdtype(np.asarray(x).dtype, np.floating)}
        assert dtypes == {np.dtype(np.float32)}, dtypes
    # The update is a real float32 update: parameters moved, by amounts bf16 could not hold.
    moved = [np.asarray(a) - np.asarray(b) for a, b in
             zip(jax.tree_util.tree_leaves(new_state.params),
                 jax.tree_util.tree_leaves(old_state.params))]
    assert max(float(np.abs(d).max()) for d in moved) > 0


def test_bf16_gradient_norm_close_to_float32(runs):
    f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
    np.testing.assert_allclose(bf16["grad_norm"], f32["grad_norm"], rtol=0.1)


def test_bf16_features_are_computed_in_bf16():
    """The backbone convolutions run in bf16 (their outputs are rounded to bf16 values) and the
    features reach the RPN, RoI pooling and losses as float32."""
    c = tiny_config()
    c.model.dtype = "bfloat16"
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    images = jnp.asarray(fixed_batch(seed=0)["image"])
    features = jax.jit(lambda v, x: model.apply(v, x, method=MaskRCNN.backbone_features))(
        variables, images)
    for f in features:
        assert f.dtype == jnp.float32
        np.testing.assert_array_equal(f, f.astype(jnp.bfloat16).astype(jnp.float32))
    objectness, deltas = jax.jit(lambda v, x: model.apply(
        v, model.apply(v, x, method=MaskRCNN.backbone_features), method=MaskRCNN.rpn_head))(
        variables, images)
    assert objectness.dtype == deltas.dtype == jnp.float32


@pytest.mark.slow
def test_bf16_shapes_demo_still_reaches_its_mask_ap(tmp_path):
    """`python -m mrcnn_jax.demo` (configs/shapes.py, its whole schedule) with bf16 compute
    reaches the float32 demo's bar: segm AP@[.5:.95] >= 0.5 (tests/test_demo.py)."""
    import os
    import re
    import subprocess
    import sys

    from tests.reference import REPO_ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "mrcnn_jax.demo", f"--workdir={tmp_path / 'work'}",
         f"--config={REPO_ROOT / 'configs' / 'shapes.py'}:root={tmp_path / 'shapes'}",
         "--config.model.dtype=bfloat16"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=5400,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.match(r"^demo: bbox_AP=(\d+\.\d{4}) segm_AP=(\d+\.\d{4}) seconds=(\d+)$", last)
    assert match, last
    assert float(match.group(2)) >= 0.5, last
