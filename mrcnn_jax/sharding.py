"""Data parallelism: the one mesh, and how batches and replicated trees are placed on it.

Training, evaluation and prediction all split the batch over a 1-D `data` axis of every device
(every process's devices in a multi-host run) and replicate the variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices) with the `data` axis."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a tree every device holds whole (variables, train state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: its leading axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree` on every device of the mesh (the sharding a jitted step expects: an input with
    another sharding would cost a second compilation)."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """This host's part of the batch (numpy, leading axis = this host's examples) -> global
    arrays split over the `data` axis; `keys` selects entries (default: all)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in (batch.keys() if keys is None else keys)}
