"""`model.remat`: the parts of the model whose activations the backward pass recomputes instead of
keeping (`flax.linen.remat`, i.e. `jax.checkpoint`), trading compute for the train step's memory.

- "backbone": each ResNet bottleneck block keeps only its input; its convolutions, norms and
  ReLUs run again in the backward. The backbone's saved activations are the largest part of the
  float32 step's memory (benchmarks/step_memory.py), and a block's inner maps are 1.5x-2x its
  input's bytes, so this is where recomputing pays most.
- "fpn": the pyramid keeps C2..C5 and recomputes its lateral and output convolutions.
- "rpn_head": the RPN head keeps P2..P6 and recomputes its 3x3 convolution over every level
  (256 channels at every anchor position: the largest single activation after the backbone's).

The forward result and the gradients are the same computation (tests/training/test_train_lib.py);
only what is stored between the passes differs. The cost is one more forward of the recomputed
parts in the backward (docs/benchmarks.md, "Train step memory").

`jax.checkpoint` keeps the recomputation apart from the forward with optimisation barriers. XLA
on GPUs and TPUs removes them only after scheduling; XLA:CPU removes them early, and its CSE then
merges the recomputation back into the forward, keeping every activation as if nothing were
rematerialised. `compiler_options` turns that early removal off for a program compiled for the
CPU (the train step's `jax.jit` takes it, `train_lib.jit_train_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import flax.linen as nn
import jax

REMAT_PARTS = ("backbone", "fpn", "rpn_head")

ModuleType = TypeVar("ModuleType", bound=type)


def check_remat(parts: Sequence[str]) -> tuple[str, ...]:
    """`model.remat` as a tuple of part names; ValueError naming an unknown one."""
    if isinstance(parts, str):
        raise ValueError(f"model.remat={parts!r}: expected a tuple of part names, e.g. "
                         f"('backbone',); parts: {', '.join(REMAT_PARTS)}")
    unknown = [p for p in parts if p not in REMAT_PARTS]
    if unknown:
        raise ValueError(f"model.remat: unknown part(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(REMAT_PARTS)}")
    return tuple(parts)


def maybe_remat(module: ModuleType, remat: bool) -> ModuleType:
    """`module` (a linen Module class) recomputed in the backward when `remat`; the parameter
    tree is the same either way (the lifted class keeps its name and scope)."""
    return nn.remat(module) if remat else module


# XLA:CPU's OptimizationBarrierExpander pass, by its HLO pass name.
_CPU_BARRIER_PASS = "cse_barrier_expander"


def compiler_options(parts: Sequence[str], platform: str | None = None) -> dict[str, str]:
    """XLA options a step with `model.remat = parts` needs on `platform` (default: jax's
    backend): on the CPU, keep jax.checkpoint's barriers; elsewhere nothing."""
    if not check_remat(parts) or (platform or jax.default_backend()) != "cpu":
        return {}
    return {"xla_disable_hlo_passes": _CPU_BARRIER_PASS}
