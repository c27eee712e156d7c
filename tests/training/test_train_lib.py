"""The train step: one compilation, falling loss, golden step-0 losses, frozen stages, exact
resume from a checkpoint, NaN stop, LR schedule and weight-decay mask, failing fast on config."""

import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import sharding, train_lib
from mrcnn_jax.checkpoints.orbax_train import CheckpointManager
from mrcnn_jax.config_base import base_config
from mrcnn_jax.modeling import losses, remat
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

from tests.reference import REPO_ROOT
from tests.training.train_fixtures import fixed_batch, tiny_config

NUM_STEPS = 5
# Step-0 losses of tiny_config() with init key 0, state key 1, fixed_batch(seed=0) (CPU, f32).
GOLDEN_STEP0 = {
    "loss_rpn_cls": 0.6930, "loss_rpn_loc": 0.4803, "loss_cls": 1.5464,
    "loss_box_reg": 0.2796, "loss_mask": 0.7239,
}
GOLDEN_RTOL = 2e-3  # XLA CPU versions may reorder float32 sums


@pytest.fixture(scope="module")
def run():
    """Compile the step once and run NUM_STEPS steps on one fixed batch."""
    c = tiny_config()
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    tx = train_lib.make_optimizer(c, variables["params"])
    state = train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh()
    states = [jax.device_get(state)]
    step_fn = train_lib.jit_train_step(
        train_lib.make_train_step(model, tx, train_lib.learning_rate(c.train)), mesh, state)
    batch = sharding.shard_batch(fixed_batch(), mesh, losses.TRAIN_BATCH_KEYS)
    state = sharding.replicate(state, mesh)
    metrics = []
    for _ in range(NUM_STEPS):
        state, m = step_fn(state, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        states.append(jax.device_get(state))
    return types.SimpleNamespace(config=c, mesh=mesh, step_fn=step_fn, batch=batch,
                                 states=states, metrics=metrics)


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_loss_is_finite_and_falls_on_a_fixed_batch(run):
    totals = [m["loss"] for m in run.metrics]
    assert all(math.isfinite(v) for m in run.metrics for v in m.values())
    assert totals[-1] < 0.9 * totals[0], totals
    assert run.step_fn._cache_size() == 1  # one compilation for all steps
    # tiny_config: 16 mask slots per image, no smaller bucket -> 32 RoIs per 2-image step.
    assert [m["mask_rois"] for m in run.metrics] == [32.0] * NUM_STEPS
    assert [int(s.step) for s in run.states] == list(range(NUM_STEPS + 1))


def test_golden_step0_losses(run):
    m = run.metrics[0]
    for name, value in GOLDEN_STEP0.items():
        np.testing.assert_allclose(m[name], value, rtol=GOLDEN_RTOL, err_msg=name)
    # What the init implies: RPN logits ~0 (N(0, 0.01) weights) -> log 2; classifier near uniform
    # over K + 1 = 5 classes -> about log 5; mask logits near 0 -> about log 2.
    assert abs(m["loss_rpn_cls"] - math.log(2)) < 0.01
    assert abs(m["loss_cls"] - math.log(5)) < 0.2
    assert abs(m["loss_mask"] - math.log(2)) < 0.1
    np.testing.assert_allclose(m["loss"], sum(GOLDEN_STEP0.values()), rtol=GOLDEN_RTOL)
    np.testing.assert_allclose(m["lr"], 0.02, rtol=1e-6)


def test_frozen_stages_and_frozen_bn_do_not_change(run):
    first, last = run.states[0], run.states[-1]
    body0, body1 = first.params["backbone"]["body"], last.params["backbone"]["body"]
    for name in ("conv1", "layer1"):
        for (path, a), (_, b) in zip(_leaves(body0[name]), _leaves(body1[name])):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}{jax.tree_util.keystr(path)}")
    changed = [not np.array_equal(a, b) for (_, a), (_, b) in
               zip(_leaves(body0["layer2"]), _leaves(body1["layer2"]))]
    assert any(changed)
    for (_, a), (_, b) in zip(_leaves(first.batch_stats), _leaves(last.batch_stats)):
        np.testing.assert_array_equal(a, b)


def test_resume_from_checkpoint_equals_uninterrupted(run, tmp_path):
    resume_at = 2
    manager = CheckpointManager(tmp_path / "ckpt", max_to_keep=2)
    manager.save(resume_at, run.states[resume_at])
    manager.close()
    # A new process would build a fresh state and restore into it.
    manager = CheckpointManager(tmp_path / "ckpt", max_to_keep=2)
    state = manager.restore_latest(run.states[0])
    assert int(state.step) == resume_at
    state = sharding.replicate(state, run.mesh)
    for k in range(resume_at, NUM_STEPS):
        state, m = run.step_fn(state, run.batch)
        assert float(m["loss"]) == run.metrics[k]["loss"]  # bit-exact on CPU
    final = jax.device_get(state)
    for (path, a), (_, b) in zip(_leaves(final), _leaves(run.states[-1])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert run.step_fn._cache_size() == 1  # a restored state compiles nothing new


def test_nan_loss_stops_naming_step_and_term(run):
    batch = dict(run.batch)
    batch["image"] = jnp.full_like(run.batch["image"], jnp.nan)
    state = sharding.replicate(run.states[3], run.mesh)
    _, m = run.step_fn(state, batch)
    with pytest.raises(train_lib.NonFiniteLossError, match=r"step 3: .*loss_\w+=nan"):
        train_lib.check_finite(3, jax.device_get(m))
    train_lib.check_finite(4, run.metrics[-1])  # finite metrics pass


def test_foreground_slot_branch_and_sizes_by_hand():
    fg = np.zeros((2, 16), bool)
    fg[0, :3], fg[1, :5] = True, True
    sizes = (4, 8, 16)
    assert int(losses.foreground_slot_branch(sizes, jnp.asarray(fg))) == 1  # 5 > 4
    fg[1, 5:] = False
    fg[1, :4] = True
    fg[1, 4] = False
    assert int(losses.foreground_slot_branch(sizes, jnp.asarray(fg))) == 0  # exactly 4 fit in 4
    assert int(losses.foreground_slot_branch(sizes, jnp.zeros((2, 16), bool))) == 0
    assert int(losses.foreground_slot_branch(sizes, jnp.ones((2, 16), bool))) == 2
    m = tiny_config().model
    m.num_mask_rois, m.mask_roi_buckets = 16, (8, 32, 4, 8)
    assert losses.mask_slot_sizes(m) == (4, 8, 16)  # sorted, deduplicated, capped
    m.mask_roi_buckets = (0,)
    with pytest.raises(ValueError, match="mask_roi_buckets"):
        losses.mask_slot_sizes(m)
    m.num_keypoint_rois, m.keypoint_roi_buckets = 128, (64, 32, 256)
    assert losses.keypoint_slot_sizes(m) == (32, 64, 128)
    m.keypoint_roi_buckets = (2.5,)
    with pytest.raises(ValueError, match="model.keypoint_roi_buckets"):
        losses.keypoint_slot_sizes(m)


def _losses_grads_and_slots_fn(c, metric):
    """batch -> (losses, parameter gradients, the head's RoIs per batch sown as `metric`) of one
    forward/backward of training_losses with init key 0 and sampler key 3; compiled once for
    all batches of the same shapes."""
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    keys = losses.train_batch_keys(c.model)

    @jax.jit
    def losses_and_grads(params, batch):
        def loss(params):
            out, stats = model.apply({**variables, "params": params}, batch,
                                     jax.random.PRNGKey(3), method=losses.training_losses,
                                     mutable=["intermediates"])
            return sum(out.values()), (out, stats["intermediates"][metric][0])

        return jax.value_and_grad(loss, has_aux=True)(params)

    def run(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in keys}
        (_, (out, slots)), grads = losses_and_grads(variables["params"], batch)
        return out, grads, int(slots)

    return run


def _losses_grads_and_slots(c, batch, metric):
    return _losses_grads_and_slots_fn(c, metric)(batch)


def _assert_same_losses_and_grads(out, grads, base_out, base_grads):
    for name in base_out:
        np.testing.assert_allclose(out[name], base_out[name], rtol=1e-5, err_msg=name)
    for (path, a), (_, b) in zip(_leaves(base_grads), _leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# With init key 0 / sampler key 3: (3, 1) gts give 10 and 1 foreground slots (the full 16
# branch for buckets (4,) and (1, 2, 4, 8)), (1, 1) give 3 and 3 (the 4-slot branch; the full
# one for (2,)).
EXPECTED_SLOTS = {((4,), (3, 1)): 16, ((4,), (1, 1)): 4,
                  ((1, 2, 4, 8), (3, 1)): 16, ((1, 2, 4, 8), (1, 1)): 4,
                  ((2,), (3, 1)): 16, ((2,), (1, 1)): 16}


# (4,) takes both a small branch and the full one, compiling two; (1, 2, 4, 8) (five branches)
# and (2,) (only the full one) are slow-only.
@pytest.mark.parametrize("buckets", [(4,), pytest.param((1, 2, 4, 8), marks=pytest.mark.slow),
                                     pytest.param((2,), marks=pytest.mark.slow)])
def test_mask_roi_buckets_give_the_loss_and_gradients_of_all_slots(buckets):
    """Whichever bucket the step's foreground count picks, loss_mask and every gradient equal the
    ones computed on all num_mask_rois slots (a too-small bucket would drop positives)."""
    all_slots_config, bucketed_config = tiny_config(), tiny_config()
    all_slots_config.model.mask_roi_buckets = ()
    bucketed_config.model.mask_roi_buckets = buckets
    # One compilation each, run on both batches.
    all_slots = _losses_grads_and_slots_fn(all_slots_config, "mask_rois")
    bucketed = _losses_grads_and_slots_fn(bucketed_config, "mask_rois")
    for num_gt in ((3, 1), (1, 1)):
        base_out, base_grads, base_rois = all_slots(fixed_batch(num_gt=num_gt))
        out, grads, mask_rois = bucketed(fixed_batch(num_gt=num_gt))
        assert (base_rois, mask_rois) == (2 * 16, 2 * EXPECTED_SLOTS[buckets, num_gt])
        assert base_out["loss_mask"] > 0
        _assert_same_losses_and_grads(out, grads, base_out, base_grads)


def test_pieces_of_a_branch_weigh_their_means_by_their_positives():
    """losses._in_chunks on a stand-in loss (a mean over the positive slots, as loss_mask): 4
    pieces of 4 slots, the 10 and 1 positives spread 5, 4, 2, 0 over them, give the one-piece
    value and gradients."""
    from mrcnn_jax.ops.targets import RoiTargets

    rng = np.random.default_rng(0)
    b, s = 2, 16
    fg = np.zeros((b, s), bool)
    fg[0, :10] = fg[1, :1] = True
    zeros = np.zeros((b, s), np.int32)
    roi_t = RoiTargets(rois=jnp.asarray(rng.normal(size=(b, s, 4)), jnp.float32), labels=zeros,
                       matched_gt=zeros, regression_targets=jnp.zeros((b, s, 4)),
                       is_foreground=jnp.asarray(fg), valid=jnp.ones((b, s), bool),
                       indices=zeros)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    flat = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)

    def loss_of(head_params, flat, consts):
        _, roi, target = consts
        per_slot = jnp.sum((jnp.tanh(roi.rois @ head_params["w"]) * flat.sum() - target) ** 2,
                           axis=-1)
        w = roi.is_foreground.astype(jnp.float32)
        return jnp.sum(per_slot * w) / jnp.maximum(jnp.sum(w), 1.0)

    consts = ({}, roi_t, jnp.float32(0.3))
    whole = jax.value_and_grad(loss_of, argnums=(0, 1))(params, flat, consts)
    pieces = jax.value_and_grad(losses._in_chunks(loss_of, s, 4), argnums=(0, 1))(
        params, flat, consts)
    np.testing.assert_allclose(pieces[0], whole[0], rtol=1e-6)
    for a, b_ in zip(jax.tree.leaves(pieces[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)
    # An unweighted mean of the pieces' means would differ: the check can fail.
    per_piece = [loss_of(params, flat, ({}, jax.tree.map(lambda x: x[:, k:k + 4], roi_t),
                                        jnp.float32(0.3))) for k in range(0, s, 4)]
    assert abs(float(np.mean(per_piece)) - float(whole[0])) > 1e-3


@pytest.mark.slow
def test_mask_head_in_chunks_gives_the_branch_in_one_piece():
    """model.mask_head_chunk on the model: the 16-slot branch run as 4 pieces of 4 slots, each
    recomputed in the backward, gives loss_mask and every gradient of the branch in one piece
    (tiny_config's default chunk, 32, leaves its 16 slots whole); the (3, 1) batch puts its 10
    and 1 positives unevenly in the pieces (5, 4, 2, 0)."""
    whole_config = tiny_config()
    whole_config.model.mask_roi_buckets = ()
    base_out, base_grads, _ = _losses_grads_and_slots(whole_config, fixed_batch(num_gt=(3, 1)),
                                                      "mask_rois")
    chunked_config = tiny_config()
    chunked_config.model.mask_roi_buckets = ()
    chunked_config.model.mask_head_chunk = 4
    batch = fixed_batch(num_gt=(3, 1))
    out, grads, mask_rois = _losses_grads_and_slots(chunked_config, batch, "mask_rois")
    assert mask_rois == 2 * 16
    _assert_same_losses_and_grads(out, grads, base_out, base_grads)
    # The pieces are a scan of 4 checkpointed calls: without it the equality says nothing.
    model, variables, train_batch = _model_and_train_batch(chunked_config, batch)
    jaxpr = jax.make_jaxpr(lambda v, b: model.apply(v, b, jax.random.PRNGKey(3),
                                                    method=losses.training_losses,
                                                    mutable=["intermediates"]))(
        variables, train_batch)
    assert any(e.primitive.name == "scan" and e.params["length"] == 4
               for e in _equations(jaxpr.jaxpr)), "no 4-piece scan in the chunked step"


def test_remat_gives_the_same_values_and_gradients_and_keeps_less():
    """model.remat over every part (each bottleneck block, the FPN, the RPN head) recomputes them
    in the backward: one checkpointed call per block and part, the same parameter tree, RPN
    outputs and gradients (all backbone stages train) from a compiled program that keeps less;
    the train step asks its jit for the compiler options; a bad part is named."""
    configs = [tiny_config(), tiny_config()]
    for c in configs:
        c.model.trainable_backbone_layers = 5
    configs[1].model.remat = remat.REMAT_PARTS
    batch = fixed_batch(num_gt=(3, 1))
    images = jnp.asarray(batch["image"])
    results = []
    for c in configs:
        model, variables, _ = _model_and_train_batch(c, batch)

        def rpn_outputs_loss(params, model=model, variables=variables):
            v = {**variables, "params": params}
            features = model.apply(v, images, method=MaskRCNN.backbone_features)
            objectness, deltas = model.apply(v, features, method=MaskRCNN.rpn_head)
            return jnp.sum(jnp.tanh(objectness)) + jnp.sum(deltas ** 2)

        # jax.checkpoint's primitive ("remat2" in this jax, "checkpoint" in others); resnet_tiny
        # has 4 blocks, the FPN and the RPN head are one call each.
        jaxpr = jax.make_jaxpr(rpn_outputs_loss)(variables["params"])
        checkpoints = sum(e.primitive.name.startswith(("remat", "checkpoint"))
                          for e in _equations(jaxpr.jaxpr))
        assert checkpoints == (6 if c.model.remat else 0), checkpoints
        compiled = jax.jit(jax.value_and_grad(rpn_outputs_loss),
                           compiler_options=remat.compiler_options(c.model.remat)
                           ).lower(variables["params"]).compile()
        results.append((compiled(variables["params"]),
                        compiled.memory_analysis().temp_size_in_bytes))
    ((base_value, base_grads), base_temp), ((value, grads), temp) = results
    np.testing.assert_allclose(value, base_value, rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
    for (path, a), (_, b) in zip(_leaves(base_grads), _leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # Less than half is kept (3.6 -> 1.7 MB here): without the compiler options XLA:CPU would
    # merge the recomputation into the forward and keep as much as before.
    assert temp < 0.6 * base_temp, (temp, base_temp)
    step = train_lib.make_train_step(MaskRCNN(configs[1].model),
                                     train_lib.make_optimizer(configs[1], {}))
    assert step.compiler_options == {"xla_disable_hlo_passes": "cse_barrier_expander"}

    configs[1].model.remat = ("backbone", "rpn")
    with pytest.raises(ValueError, match="model.remat: unknown part.*'rpn'"):
        _model_and_train_batch(configs[1], batch)


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (conditional branches, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def _model_and_train_batch(c, batch):
    """(MaskRCNN, its variables with init key 0, the batch's train entries as arrays)."""
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    return model, variables, {k: jnp.asarray(v) for k, v in batch.items()
                              if k in losses.train_batch_keys(c.model)}


def _pooled_buffer_shape(model, variables, batch):
    """[rows, C] of the float32 P2..P5 buffer every RoI head pools from."""
    features = jax.eval_shape(lambda: model.apply(variables, batch["image"],
                                                  method=MaskRCNN.backbone_features))
    return sum(math.prod(f.shape[:3]) for f in features[:4]), features[0].shape[-1]


def test_the_pooled_levels_are_concatenated_once_per_step():
    """The box head and the mask head's slot-bucket branches pool from one float32 buffer of
    P2..P5, built outside the conditional (built inside it, XLA:CPU ran the copy slower, and
    once more)."""
    c = tiny_config()
    c.model.mask_roi_buckets = (1, 2, 4, 8)
    model, variables, batch = _model_and_train_batch(c, fixed_batch())
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, batch, jax.random.PRNGKey(3),
                                                 method=losses.training_losses))(variables)
    builds = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "concatenate"
              and eqn.outvars[0].aval.shape == _pooled_buffer_shape(model, variables, batch)]
    assert len(builds) == 1
    assert builds[0].outvars[0].aval.dtype == jnp.float32
    assert any(eqn.primitive.name == "cond" and len(eqn.params["branches"]) == 5
               for eqn in _equations(jaxpr.jaxpr))  # the buckets' switch


@pytest.mark.slow
def test_the_bucket_switch_computes_its_gradient_in_the_taken_branch(monkeypatch):
    """The mask head's slot-bucket switch gives the losses and gradients of autodiff through a
    plain `lax.switch`, but under `jax.grad` its conditional outputs only the taken branch's
    loss and gradients (the heads' parameters and the pooled features), not every branch's
    residuals (autodiff of a switch outputs the union of them all, zero-filled)."""
    c = tiny_config()
    c.model.mask_roi_buckets = (1, 2, 4, 8)
    batch = fixed_batch(num_gt=(1, 1))  # the 4-slot branch
    out, grads, _ = _losses_grads_and_slots(c, batch, "mask_rois")
    with monkeypatch.context() as patch:
        patch.setattr(losses, "_switch_with_gradient",
                      lambda index, branches, params, features, consts:
                      jax.lax.switch(index, branches, params, features, consts))
        base_out, base_grads, _ = _losses_grads_and_slots(c, batch, "mask_rois")
    _assert_same_losses_and_grads(out, grads, base_out, base_grads)
    assert float(jnp.abs(grads["roi_mask_predictor"]["mask_fcn_logits"]["kernel"]).max()) > 0

    model, variables, batch = _model_and_train_batch(c, batch)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: sum(model.apply(
        {**variables, "params": p}, batch, jax.random.PRNGKey(3),
        method=losses.training_losses).values())))(variables["params"])
    switches = [eqn for eqn in _equations(jaxpr.jaxpr)
                if eqn.primitive.name == "cond" and len(eqn.params["branches"]) == 5]
    head_params = [variables["params"][k] for k in ("roi_mask_head", "roi_mask_predictor")]
    # loss, d features [P2..P5 rows, C], d parameters
    want = [(), _pooled_buffer_shape(model, variables, batch),
            *(p.shape for p in jax.tree.leaves(head_params))]
    assert len(switches) == 1
    assert sorted(v.aval.shape for v in switches[0].outvars) == sorted(want)


def _keypoint_batch(num_gt):
    """fixed_batch with 3 keypoints per gt: left and right of the centre (visible) and the centre
    (labelled but not visible, v=1, which torchvision counts as visible too: v > 0)."""
    batch = fixed_batch(num_gt=num_gt)
    boxes = batch["gt_boxes"]
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    w = boxes[..., 2] - boxes[..., 0]
    v = batch["gt_valid"].astype(np.float32)
    batch["gt_keypoints"] = np.stack([
        np.stack([cx - w / 4, cy, 2 * v], -1), np.stack([cx, cy, v], -1),
        np.stack([cx + w / 4, cy, 2 * v], -1)], axis=2).astype(np.float32)
    return batch


@pytest.mark.slow  # the same _on_foreground_slots switch as the mask test above, which CI runs
def test_keypoint_roi_buckets_give_the_loss_and_gradients_of_all_slots():
    """The keypoint head on the smallest slot bucket holding the positives gives the loss and
    gradients of all num_keypoint_rois slots (loss_keypoint is normalised by the visible
    keypoints, which empty slots do not add). One bucket set: the batches take its 4-slot and
    its full branch (the switch itself is the mask test's, parametrised twice; CI time)."""
    buckets = (1, 2, 4, 8)
    for num_gt in ((3, 1), (1, 1)):
        c = tiny_config()
        m = c.model
        m.mask_head, m.keypoint_head = False, True
        m.num_keypoints, m.keypoint_head_layers, m.num_keypoint_rois = 3, (16, 16), 16
        m.keypoint_roi_buckets = ()
        batch = _keypoint_batch(num_gt)
        base_out, base_grads, base_rois = _losses_grads_and_slots(c, batch, "keypoint_rois")
        m.keypoint_roi_buckets = buckets
        out, grads, kp_rois = _losses_grads_and_slots(c, batch, "keypoint_rois")
        assert (base_rois, kp_rois) == (2 * 16, 2 * EXPECTED_SLOTS[buckets, num_gt])
        assert sorted(base_out) == sorted(losses.loss_names(m))
        assert base_out["loss_keypoint"] > 0
        _assert_same_losses_and_grads(out, grads, base_out, base_grads)


def test_learning_rate_schedule_by_hand():
    t = base_config().train  # 0.02 at 16 images, warmup 1000 from 1e-3, steps 60k / 80k
    lr = train_lib.learning_rate(t)
    for step, want in [(0, 0.02 * 1e-3), (500, 0.02 * (1e-3 * 0.5 + 0.5)), (1000, 0.02),
                       (59_999, 0.02), (60_000, 0.002), (80_000, 0.0002), (89_999, 0.0002)]:
        np.testing.assert_allclose(lr(step), want, rtol=1e-6, err_msg=str(step))
    t.global_batch_size = 32
    np.testing.assert_allclose(train_lib.learning_rate(t)(2000), 0.04, rtol=1e-6)


def test_lr_decay_fractions_follow_num_steps_and_bad_entries_fail():
    t = base_config().train  # decays at fractions 2/3 and 8/9 of num_steps
    assert train_lib.lr_decay_boundaries(t) == (60_000, 80_000)
    t.num_steps = 180_000  # a 2x schedule moves its decays with it
    assert train_lib.lr_decay_boundaries(t) == (120_000, 160_000)
    np.testing.assert_allclose(train_lib.learning_rate(t)(119_999), 0.02, rtol=1e-6)
    np.testing.assert_allclose(train_lib.learning_rate(t)(120_000), 0.002, rtol=1e-6)
    t.lr_decay_steps = (0.5, 120_000)  # a fraction and a step mixed
    assert train_lib.lr_decay_boundaries(t) == (90_000, 120_000)
    for bad in [(1.5,), (0.0,), (-3,), (0.9, 0.5), (100, 100)]:
        t.lr_decay_steps = bad
        with pytest.raises(ValueError, match="train.lr_decay_steps"):
            train_lib.learning_rate(t)


def test_weight_decay_skips_norm_and_bias_when_configured():
    c = base_config()
    c.train.weight_decay_norm_and_bias = False
    c.train.warmup_steps = 0
    params = {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "gn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = train_lib.make_optimizer(c, params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.02 * 1e-4, rtol=1e-6)
    for leaf in (updates["head"]["bias"], updates["gn"]["scale"], updates["gn"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_checkpoints_keep_last_n_and_ignore_a_partial_save(tmp_path):
    state = {"w": np.arange(4.0, dtype=np.float32), "step": np.int32(0),
             "rng": np.array([1, 2], np.uint32)}
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        manager.save(step, dict(state, w=state["w"] + step, step=np.int32(step)))
    manager.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
    # A save killed half-way leaves only a temporary directory behind.
    partial = tmp_path / "4.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "garbage").write_text("half written")
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    assert manager.latest_step() == 3
    restored = manager.restore_latest(state)
    np.testing.assert_array_equal(restored["w"], state["w"] + 3)
    np.testing.assert_array_equal(restored["rng"], state["rng"])


def test_missing_dataset_path_fails_before_compiling(tmp_path):
    c = tiny_config()
    c.data.dataset = "coco_format"
    c.data.train_images = str(tmp_path / "no_such_images")
    c.data.train_annotations = str(tmp_path / "no_such.json")
    with pytest.raises(FileNotFoundError, match="data.train_images"):
        train_lib.train_and_evaluate(c, str(tmp_path / "work"))
    c = tiny_config(init_from=str(tmp_path / "resnet50.pth"))
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        train_lib.train_and_evaluate(c, str(tmp_path / "work"))


def test_config_typo_fails_naming_the_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config=configs/fpn_r50.py",
         "--config.train.num_stepz=3", f"--workdir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0
    assert "num_stepz" in proc.stderr
    assert not (pathlib.Path(tmp_path) / "checkpoints").exists()


def _train_process(workdir, num_steps, sleep=0.0):
    cmd = [sys.executable, "-m", "tests.training.train_fixtures", str(workdir), str(num_steps),
           str(sleep)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A run killed with SIGKILL after its step-2 checkpoint and restarted ends where an
    uninterrupted run ends, bit for bit (params, optimizer state, RNG, step and loss)."""
    import json
    import signal
    import time

    num_steps = 6
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _train_process(killed, num_steps, sleep=1.0)
    ckpt = killed / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_metrics.json").exists()
    for workdir in (killed, clean):
        p = _train_process(workdir, num_steps)
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    assert (json.loads((killed / "final_metrics.json").read_text())["loss"]
            == json.loads((clean / "final_metrics.json").read_text())["loss"])
    c = tiny_config()
    model = MaskRCNN(c.model)
    variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
    tx = train_lib.make_optimizer(c, variables["params"])
    target = jax.device_get(train_lib.create_train_state(variables, tx, jax.random.PRNGKey(1)))
    a = CheckpointManager(killed / "checkpoints").restore_latest(target)
    b = CheckpointManager(clean / "checkpoints").restore_latest(target)
    assert int(a.step) == int(b.step) == num_steps
    for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_cpu_malloc_hint_only_without_the_hugepage_tunable(monkeypatch):
    """On the CPU under Linux the run hints at GLIBC_TUNABLES unless the hugepage malloc tunable
    is already in it (with other tunables too); on other platforms / backends it says nothing."""
    monkeypatch.setattr(train_lib.sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    hint = train_lib.cpu_malloc_hint()
    assert hint is not None and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert train_lib.cpu_malloc_hint() == hint
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert train_lib.cpu_malloc_hint() is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(train_lib.sys, "platform", "darwin")
    assert train_lib.cpu_malloc_hint() is None
    monkeypatch.setattr(train_lib.sys, "platform", "linux")
    monkeypatch.setattr(train_lib.jax, "default_backend", lambda: "gpu")
    assert train_lib.cpu_malloc_hint() is None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_os():
    """What the compiler frees stays mapped in glibc's heap until `release_freed_host_memory`:
    100 MB of small blocks (below malloc's mmap threshold), written and freed under a block
    still in use above them (so free() itself cannot shrink the heap), leave the process's RSS
    until the release returns at least 80 MB of it."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(1024) for _ in range(100 * 1024)]
    for b in blocks:
        ctypes.memset(b, 1, 1024)
    pin = libc.malloc(1024)
    for b in blocks:
        libc.free(b)
    held = _rss_mb()
    assert train_lib.release_freed_host_memory()
    assert held - _rss_mb() >= 80
    libc.free(pin)
