"""The loop that does not wait: batches prefetched to the devices in order, errors surfaced, the
input-wait fraction of a deliberately slow input near its share of the wall time, the
input-bound hint in the log, and a non-finite loss named at its step with no checkpoint of a
later state."""

import logging
import re
import time

import jax
import numpy as np
import pytest

from mrcnn_jax import train_lib
from mrcnn_jax.checkpoints.orbax_train import CheckpointManager
from mrcnn_jax.data.prefetch import DevicePrefetcher
from tests.training.train_fixtures import synthetic_iterator, tiny_config


def test_prefetcher_keeps_the_order_and_places_every_batch():
    placed = []

    def place(b):
        placed.append(b)
        return jax.device_put(np.asarray(b))

    with DevicePrefetcher(iter(range(7)), place, size=2) as batches:
        got = [int(b) for b in batches]
    assert got == list(range(7)) and placed == list(range(7))


def test_prefetcher_raises_the_iterators_error_at_its_batch():
    def broken():
        yield 0
        yield 1
        raise OSError("disk gone")

    batches = DevicePrefetcher(broken(), lambda b: b)
    assert [next(batches), next(batches)] == [0, 1]
    with pytest.raises(OSError, match="disk gone"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()


def test_prefetcher_warns_while_the_input_is_stalled(caplog):
    def stalled():
        yield 0
        time.sleep(0.5)
        yield 1

    with caplog.at_level(logging.WARNING, "mrcnn_jax.data.prefetch"), DevicePrefetcher(
            stalled(), lambda b: b, stall_warning_s=0.1) as batches:
        assert [next(batches), next(batches)] == [0, 1]
    assert any("no input batch for" in r.getMessage() for r in caplog.records)


def _wait_fraction(produce_s, step_s, steps=24):
    """A loop with `step_s` of work per step fed by an iterator taking `produce_s` per batch."""
    def slow():
        i = 0
        while True:
            time.sleep(produce_s)
            yield i
            i += 1

    throughput = train_lib.Throughput()
    with DevicePrefetcher(slow(), lambda b: b, size=2) as batches:
        next(batches)  # the first batch (the compiling step's) is not timed
        throughput.start(time.perf_counter(), batches.wait_seconds)
        for _ in range(steps):
            next(batches)
            time.sleep(step_s)
            throughput.step()
        return throughput.end(time.perf_counter(), batches.wait_seconds, batch_size=2)


def test_input_wait_fraction_is_the_slow_inputs_share():
    # Input 80 ms per batch, step 40 ms: each step waits ~40 ms of its ~80 ms.
    slow = _wait_fraction(0.08, 0.04)
    assert abs(slow["input_wait_fraction"] - 0.5) < 0.12, slow
    assert abs(slow["step_time"] - 0.08) < 0.02 and abs(slow["img_per_sec"] - 25) < 6, slow
    assert train_lib.input_bound_hint(slow["input_wait_fraction"], 24).startswith("input-bound")
    # Input 10 ms, step 40 ms: the prefetched batches are ready, the step never waits.
    fast = _wait_fraction(0.01, 0.04)
    assert fast["input_wait_fraction"] < 0.08, fast
    assert train_lib.input_bound_hint(fast["input_wait_fraction"], 24) is None


INPUT_S = 0.4  # per batch: several times the tiny step on the CPU


def test_training_loop_reports_input_wait_and_stops_at_the_nan_step(tmp_path, caplog):
    """Through `train_and_evaluate`: a slow input shows as its share of the wall time with the
    hint; a NaN image at step 17 (metrics fetched every 5 steps) stops the run naming step 17,
    and the checkpoints hold step 15 only (none of a later state)."""
    bad_step = 17

    def slow_with_nan(start):
        for step, batch in enumerate(synthetic_iterator(start), start):
            time.sleep(INPUT_S)
            if step == bad_step:
                batch["image"] = np.full_like(batch["image"], np.nan)
            yield batch

    c = tiny_config(num_steps=20, log_every_steps=5, checkpoint_every_steps=15)
    with caplog.at_level(logging.INFO, "mrcnn_jax.train_lib"), pytest.raises(
            train_lib.NonFiniteLossError, match=rf"step {bad_step}: .*loss_\w+=nan"):
        train_lib.train_and_evaluate(c, str(tmp_path), slow_with_nan, evaluate=False)
    lines = [r.getMessage() for r in caplog.records]
    progress = [line for line in lines if re.match(r"step \d+/20 ", line)]
    assert [line.split()[1] for line in progress] == ["5/20", "10/20", "15/20"]
    # Steps 10..14 (the first intervals hold the batches made during the compilation and the
    # first TensorBoard write, no checkpoint save): each step waits for its input, 2 images per
    # INPUT_S.
    rate, wait = re.search(r"([\d.]+) img/s, input wait (\d+)%", progress[2]).groups()
    assert abs(float(rate) - 2 / INPUT_S) < 0.25 * 2 / INPUT_S, progress[2]
    assert int(wait) >= 60, progress[2]
    assert any(line.startswith("input-bound: ") for line in lines)
    assert CheckpointManager(tmp_path / "checkpoints").all_steps() == [15]


def test_a_checkpoint_save_leaves_the_state_donatable(tmp_path):
    """The loop saves the state and then donates it to the next step. On the CPU a buffer that
    a host array still views cannot be donated, and XLA then allocates the whole new state
    beside the old one (+params +momentum at the step's peak); a save must leave no view."""
    def fresh():
        return {"step": jax.numpy.zeros((), jax.numpy.int32),
                "params": {"w": jax.numpy.arange(4096.0) + 0.0}}

    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)

    state = fresh()
    CheckpointManager(tmp_path / "checkpoints").save(3, state)
    pointer = state["params"]["w"].unsafe_buffer_pointer()
    state = step(state)
    assert state["params"]["w"].unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(4096.0) + 1)

    # The check sees a view: one held across the step defeats the donation.
    state = fresh()
    view = jax.device_get(state["params"]["w"])
    pointer = state["params"]["w"].unsafe_buffer_pointer()
    state = step(state)
    assert state["params"]["w"].unsafe_buffer_pointer() != pointer
    np.testing.assert_array_equal(view, np.arange(4096.0))


def test_an_evaluation_during_training_leaves_the_state_donatable(tmp_path):
    """The evaluation keeps the variables it predicted with (`data_parallel_predict_fn` places
    them on the devices once per tree); what the loop hands it must not hold the state's
    buffers from the host, or every later step would allocate a new state beside them."""
    import jax.numpy as jnp

    class KeepsVariables:  # the part of CocoEvaluation the loop's evaluation goes through
        split = "val"

        def run(self, variables, output_dir=None, on_images=None):
            self.kept = variables
            return {"bbox/AP": float(jnp.sum(variables["params"]["w"]))}

    w = np.arange(4096.0, dtype=np.float32)
    state = train_lib.TrainState(step=jnp.asarray(5), params={"w": jnp.asarray(w)},
                                 batch_stats={}, opt_state=(), rng=jax.random.PRNGKey(0))
    evaluation = KeepsVariables()
    metrics = train_lib._evaluate(evaluation, tiny_config(), state, str(tmp_path))
    assert metrics["bbox/AP"] == float(w.sum())
    pointer = state.params["w"].unsafe_buffer_pointer()
    step = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda x: x + 1, s.params)),
                   donate_argnums=0)
    state = step(state)
    assert state.params["w"].unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(np.asarray(state.params["w"]), w + 1)
