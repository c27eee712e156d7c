"""Training checkpoints with orbax: periodic, keep the last N, atomic, and an exact resume.

A checkpoint holds the whole `TrainState` (params, FrozenBN constants, optimizer state, step, base
RNG key) plus a small JSON record of the input position. The input pipeline is a pure function of
(seed, step) (see data/input_pipeline.py), so the step is the input position: a run resumed from
step k reads exactly the batches k, k+1, ... an uninterrupted run would have read, and its
parameters and losses are bit-identical on CPU.

Atomicity is orbax's: a step is written to a temporary directory and renamed when complete, so a
process killed mid-save leaves the previous checkpoints intact and the partial one is ignored
(and removed) when the manager reopens the directory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mrcnn_jax import paths

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and (for jax arrays) sharding of a restore target leaf."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


class CheckpointManager:
    """`orbax.checkpoint.CheckpointManager` for a TrainState-like pytree with a `step` field."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 save_interval_steps: int = 1):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.fspath(paths.resolve(directory))  # gs://... stays a URL
        paths.check_orbax_directory(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            cleanup_tmp_directories=True,  # partial saves of a killed run
            # Synchronous: the state's buffers are donated to the next step right after a save.
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(STATE_ITEM, META_ITEM))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, input_position: int | None = None) -> bool:
        """Save `state` as step `step`; `input_position` (default `step`) = batches consumed."""
        meta = {"step": int(step),
                "input_position": int(step if input_position is None else input_position)}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                       META_ITEM: ocp.args.JsonSave(meta)}),
        )
        if saved:
            logger.info("checkpoint saved: step %d in %s", step, self.directory)
        return saved

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """(state, meta) of `step`, with `target`'s structure, dtypes and shardings."""
        abstract = jax.tree_util.tree_map(_abstract, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                       META_ITEM: ocp.args.JsonRestore()}),
        )
        return out[STATE_ITEM], dict(out[META_ITEM])

    def restore_latest(self, target: Any) -> Any:
        """The latest saved state, or `target` unchanged when there is none."""
        step = self.latest_step()
        if step is None:
            return target
        state, meta = self.restore(step, target)
        if meta.get("input_position", step) != step:
            raise ValueError(f"checkpoint {step} in {self.directory}: input_position "
                             f"{meta['input_position']} != step; this run cannot resume it")
        logger.info("restored checkpoint step %d from %s", step, self.directory)
        return state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
