"""The training checkpoints of a workdir, read-only: which steps exist, and their model variables.

The evaluation (`eval.py`, `--watch`, the notebook) reads what the trainer writes through this one
class, so the layout (`<workdir>/checkpoints`, an orbax `CheckpointManager` directory holding the
TrainState pytree, `orbax_train.py`) is known in one place on the reading side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mrcnn_jax import paths

# The workdir subfolder of the training checkpoints (train_lib's).
CHECKPOINT_SUBDIR = "checkpoints"
# The run's config, `model.conv_impl` resolved (train_lib.save_config).
CONFIG_FILENAME = "config.json"


class WorkdirCheckpoints:
    """The training checkpoints of a workdir, read-only: their steps and their model variables.

    Reads the orbax `CheckpointManager` directory `<workdir>/checkpoints` that
    `checkpoints/orbax_train.py` writes (a `state` item holding the TrainState pytree). Arrays are
    restored as host numpy, so a checkpoint saved on any device topology (8 GPUs, a TPU pod)
    can be evaluated on another (1 GPU, a CPU).
    """

    def __init__(self, workdir: str | os.PathLike):
        import orbax.checkpoint as ocp

        self.directory = paths.resolve(workdir) / CHECKPOINT_SUBDIR
        paths.check_orbax_directory(self.directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))

    def all_steps(self) -> list[int]:
        """The steps saved so far (re-read from disk on every call)."""
        if not self.directory.is_dir():
            return []
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def restore_variables(self, step: int) -> dict[str, Any]:
        """{"params", "batch_stats"} (numpy) of the checkpoint at `step`.

        Raises FileNotFoundError when the step is gone (the trainer keeps the last N only),
        ValueError when no item of the checkpoint holds model `params`.
        """
        import jax
        import orbax.checkpoint as ocp

        from mrcnn_jax.checkpoints import orbax_train

        step_dir = self.directory / str(int(step))
        if not step_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {step_dir} does not exist")
        # The item with the train state first (orbax_train's name), then any other item.
        items = sorted((p for p in step_dir.iterdir() if p.is_dir()),
                       key=lambda p: p.name != orbax_train.STATE_ITEM)
        checkpointer = ocp.PyTreeCheckpointer()
        for item in items:
            try:
                tree = checkpointer.metadata(item).item_metadata
            except (FileNotFoundError, ValueError, AttributeError):
                continue  # not a pytree item (e.g. the json metadata)
            tree = getattr(tree, "tree", tree)
            if not isinstance(tree, Mapping) or "params" not in tree:
                continue
            as_numpy = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
                restore_args=as_numpy))
            variables = {"params": restored["params"]}
            if restored.get("batch_stats") is not None:
                variables["batch_stats"] = restored["batch_stats"]
            return variables
        raise ValueError(f"checkpoint {step_dir} holds no item with model 'params' "
                         f"(items: {[p.name for p in items]})")
