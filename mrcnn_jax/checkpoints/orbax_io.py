"""Save and restore a variables pytree ({"params", "batch_stats"} or any nested dict of arrays)
with orbax, as one standalone checkpoint directory (what `predict.py --weights=DIR` reads).

`model_overrides` (e.g. {"frozen_bn_eps": 0.0} for torchvision's COCO weights) travel with the
weights in `MODEL_OVERRIDES_FILE` inside the directory, so a reader builds the model they need.

Training checkpoints (optimizer state, step, RNG, input position) use orbax's `CheckpointManager`
in the training library; this module is the small exchange format for model weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mrcnn_jax import paths


MODEL_OVERRIDES_FILE = "mrcnn_model_overrides.json"


def save_variables(
    path: str | os.PathLike,
    variables: Any,
    model_overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> None:
    """Write `variables` to the directory `path` (absolute or relative; must not exist unless
    `force`). The write is atomic: orbax finalises a temporary directory by renaming it.
    `model_overrides`: `config.model` fields the weights need, stored beside them."""
    path = paths.resolve(path)
    paths.check_orbax_directory(path)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables, force=force)
    if model_overrides:
        (path / MODEL_OVERRIDES_FILE).write_text(json.dumps(dict(model_overrides), indent=1))


def load_model_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """The `model_overrides` saved with the variables at `path` ({} when none were saved)."""
    f = paths.resolve(path) / MODEL_OVERRIDES_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def restore_variables(path: str | os.PathLike, target: Any = None) -> Any:
    """Read variables saved by `save_variables`.

    Args:
      path: the checkpoint directory.
      target: optional pytree of arrays or `jax.ShapeDtypeStruct`s giving the expected structure,
        shapes and dtypes (e.g. `jax.eval_shape(model.init, ...)`); a mismatch is an error.
    Returns:
      The pytree of numpy/jax arrays (nested dicts).
    Raises:
      FileNotFoundError: `path` does not exist. ValueError: it is not an orbax checkpoint.
    """
    path = paths.resolve(path)
    paths.check_orbax_directory(path)
    if not path.exists():
        raise FileNotFoundError(f"orbax checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not an orbax checkpoint directory")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                return ckptr.restore(path)
            abstract = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target
            )
            return ckptr.restore(path, abstract)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(
            f"{path} is not a readable orbax checkpoint of these variables: {e}"
        ) from e
