"""WorkdirCheckpoints: the evaluation's read-only view of a training run's orbax checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_jax.checkpoints.workdir import CHECKPOINT_SUBDIR, WorkdirCheckpoints
from tests.child_env import xla_flags
from tests.reference import REPO_ROOT

_SAVE_ON_8_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mrcnn_jax.checkpoints import orbax_train
from mrcnn_jax.train_lib import TrainState
mesh = Mesh(np.array(jax.devices()), ("data",))
assert len(jax.devices()) == 8
state = TrainState(step=jnp.array(7, jnp.int32), params={"w": jnp.arange(3.0)},
                   batch_stats={"m": jnp.ones(2)}, opt_state=({"mu": jnp.zeros(3)},),
                   rng=jax.random.PRNGKey(0))
state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
manager = orbax_train.CheckpointManager(sys.argv[1], max_to_keep=2)
for step in (5, 7, 9):
    manager.save(step, state)
manager.wait()
"""


def test_workdir_checkpoints_read_training_checkpoints_of_another_topology(tmp_path):
    # train_lib's checkpoints, saved replicated over 8 devices, read back here on one.
    checkpoints = WorkdirCheckpoints(tmp_path)
    assert checkpoints.all_steps() == []
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    subprocess.run([sys.executable, "-c", _SAVE_ON_8_DEVICES,
                    str(tmp_path / CHECKPOINT_SUBDIR)],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert checkpoints.all_steps() == [7, 9]  # keep-last-2 removed step 5
    variables = checkpoints.restore_variables(9)
    assert set(variables) == {"params", "batch_stats"}
    assert isinstance(variables["params"]["w"], np.ndarray)
    np.testing.assert_array_equal(variables["params"]["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(variables["batch_stats"]["m"], [1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="5 does not exist"):
        checkpoints.restore_variables(5)
