"""Where a `--weights` path points: a training run, exported variables, or a torchvision file.

    source = locate("ckpt/mine")            # WeightsSource(kind="training", step=<latest>, ...)
    locate("ckpt/mine/checkpoints")         # the same
    locate("ckpt/mine/checkpoints/600")     # that step
    locate("exported/")                     # orbax variables (`orbax_io.save_variables`)
    locate("maskrcnn_resnet50_fpn.pth")     # torchvision state_dict (.pth/.pt/.safetensors/.npz)

A training source also knows its run's config (`WORKDIR/config.json`, the model the weights
were trained as) and label map (`WORKDIR/label_map.json`); exported variables carry a
`label_map.json` of their own when the exporter wrote one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from mrcnn_jax import paths
from mrcnn_jax.checkpoints.workdir import CHECKPOINT_SUBDIR, CONFIG_FILENAME, WorkdirCheckpoints
from mrcnn_jax.data.label_map import LABEL_MAP_FILE, LabelMap

TRAINING = "training"
VARIABLES = "variables"
TORCHVISION = "torchvision"
TORCHVISION_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    kind: str  # TRAINING, VARIABLES or TORCHVISION
    path: pathlib.Path  # the weights: a training run's workdir, a variables dir or a file
    step: int | None = None  # TRAINING: the checkpoint step

    def describe(self) -> str:
        if self.kind == TRAINING:
            return f"training run {self.path}, checkpoint step {self.step}"
        return f"{self.kind} weights {self.path}"

    def label_map(self) -> LabelMap | None:
        """The label map that travels with the weights, or None (torchvision files)."""
        if self.kind == TORCHVISION or not (self.path / LABEL_MAP_FILE).is_file():
            return None
        return LabelMap.load(self.path / LABEL_MAP_FILE)

    def model_config(self) -> dict[str, Any] | None:
        """The `model` section of the training run's config.json, or None."""
        record = self.path / CONFIG_FILENAME
        if self.kind != TRAINING or not record.is_file():
            return None
        try:
            return dict(json.loads(record.read_text())["model"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{record}: not a training config record ({e})") from e

    def restore_variables(self) -> dict[str, Any]:
        """{"params", "batch_stats"} of a training checkpoint (host numpy)."""
        if self.kind != TRAINING:
            raise ValueError(f"{self.describe()}: not a training checkpoint")
        return WorkdirCheckpoints(self.path).restore_variables(self.step)


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and path.is_dir()


def _latest_step(workdir: pathlib.Path) -> int:
    steps = WorkdirCheckpoints(workdir).all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir / CHECKPOINT_SUBDIR}: no checkpoint saved yet")
    return steps[-1]


def locate(path: str | os.PathLike) -> WeightsSource:
    """What `path` holds (see the module docstring). Raises FileNotFoundError naming the path when
    it does not exist or a training run has no checkpoint, ValueError for a file of another
    kind."""
    path = paths.resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if not path.is_dir():
        if path.suffix not in TORCHVISION_SUFFIXES:
            raise ValueError(f"{path}: weights must be a torchvision state_dict "
                             f"({', '.join(TORCHVISION_SUFFIXES)}), a training workdir (or its "
                             f"checkpoints/ or one step of them) or an exported variables folder")
        return WeightsSource(TORCHVISION, path)
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return WeightsSource(TRAINING, path, _latest_step(path))
    if path.name == CHECKPOINT_SUBDIR or any(map(_is_step_dir, path.iterdir())):
        return WeightsSource(TRAINING, path.parent, _latest_step(path.parent))
    if _is_step_dir(path) and path.parent.name == CHECKPOINT_SUBDIR:
        workdir = path.parent.parent
        step = int(path.name)
        if step not in WorkdirCheckpoints(workdir).all_steps():
            raise FileNotFoundError(f"{path}: not a complete checkpoint of {workdir}")
        return WeightsSource(TRAINING, workdir, step)
    return WeightsSource(VARIABLES, path)
