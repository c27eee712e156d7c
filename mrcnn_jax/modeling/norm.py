"""Normalisation layers: FrozenBatchNorm (torchvision's default) and GroupNorm.

FrozenBatchNorm keeps all four torchvision buffers (`weight`, `bias`, `running_mean`,
`running_var`) as constants in the `batch_stats` collection, never in `params`: an optimizer built
over `params` cannot touch them, and `model.apply({"params": p, "batch_stats": s}, x)` reads them
without `mutable=`. GroupNorm (the paper's follow-ups) is an ordinary trainable layer in `params`.

Use `make_norm(config.model)` to get the factory every backbone layer calls as `norm(name=...)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.precision import compute_dtype

# The collection that holds FrozenBatchNorm constants (flax's usual name for BN statistics).
FROZEN_COLLECTION = "batch_stats"

# torchvision's FrozenBatchNorm2d / nn.GroupNorm default eps.
TORCH_NORM_EPS = 1e-5

NORMS = ("frozen_bn", "group_norm")
# Norms after the FPN and RoI head convs: "" = none (torchvision v1), "frozen_bn" = BatchNorm with
# its statistics and affine as constants (torchvision v2's BatchNorm2d in eval mode),
# "group_norm" (detectron2's GN configs).
OPTIONAL_NORMS = ("", "frozen_bn", "group_norm")


class FrozenBatchNorm(nn.Module):
    """y = (x - running_mean) * weight / sqrt(running_var + eps) + bias over the last axis.

    Evaluated in torchvision's order (scale = weight * rsqrt(var + eps); shift = bias - mean *
    scale; y = x * scale + shift) so float32 results agree with `FrozenBatchNorm2d` to rounding.
    `eps = 0` reproduces torchvision's COCO Mask R-CNN checkpoint, whose builder sets it so.

    The affine map runs in float32 with the float32 constants and is rounded once to `dtype`:
    torchvision's under bf16 autocast also computes it in float32 (its float32 buffers promote
    the bf16 input), where bf16 arithmetic would round the constants and both operations.

    x: [..., C] -> [..., C] in `dtype` (the constants stay float32).
    """

    eps: float = TORCH_NORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        # Initial values are torchvision's: the identity transform (up to eps).
        weight = self.variable(FROZEN_COLLECTION, "scale", lambda: jnp.ones((c,), jnp.float32))
        bias = self.variable(FROZEN_COLLECTION, "bias", lambda: jnp.zeros((c,), jnp.float32))
        mean = self.variable(FROZEN_COLLECTION, "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable(FROZEN_COLLECTION, "var", lambda: jnp.ones((c,), jnp.float32))
        scale = weight.value * jax.lax.rsqrt(var.value + self.eps)
        shift = bias.value - mean.value * scale
        return (x.astype(jnp.float32) * scale + shift).astype(self.dtype)


def make_norm(model_config: Any, dtype: Any = None) -> Callable[..., nn.Module]:
    """The norm-layer factory selected by `model_config.norm` ("frozen_bn" | "group_norm").

    Reads `frozen_bn_eps`, `group_norm_groups` and `dtype` from `model_config` (a ConfigDict
    or any object with those attributes). Returns a callable used as `norm(name="bn1")(x)`.
    """
    kind = model_config.norm
    dtype = compute_dtype(model_config.dtype if dtype is None else dtype)
    return norm_factory(kind, frozen_bn_eps=model_config.frozen_bn_eps,
                        group_norm_groups=model_config.group_norm_groups, dtype=dtype)


def norm_factory(kind: str, frozen_bn_eps: float = TORCH_NORM_EPS, group_norm_groups: int = 32,
                 dtype: Any = jnp.float32) -> Callable[..., nn.Module]:
    """Same as `make_norm` with the fields given one by one."""
    if kind == "frozen_bn":
        return functools.partial(FrozenBatchNorm, eps=float(frozen_bn_eps), dtype=dtype)
    if kind == "group_norm":
        return functools.partial(nn.GroupNorm, num_groups=int(group_norm_groups),
                                 epsilon=TORCH_NORM_EPS, dtype=dtype, param_dtype=jnp.float32)
    raise ValueError(f"norm: unknown normalisation {kind!r}; expected one of {NORMS}")


def optional_norm(model_config: Any, kind: str, dtype: Any = None
                  ) -> Callable[..., nn.Module] | None:
    """The factory for `model_config.fpn_norm` / `.head_norm`: None for "" (convs with bias and
    no norm, torchvision v1), FrozenBatchNorm with `frozen_bn_eps` for "frozen_bn" (torchvision
    v2's BatchNorm2d at inference; trained from scratch it stays the identity, so it is for
    weights that bring their statistics), GroupNorm of `group_norm_groups` groups for
    "group_norm"."""
    if kind not in OPTIONAL_NORMS:
        raise ValueError(f"fpn_norm/head_norm: unknown normalisation {kind!r}; expected one of "
                         f"{OPTIONAL_NORMS}")
    if not kind:
        return None
    dtype = compute_dtype(model_config.dtype if dtype is None else dtype)
    return norm_factory(kind, frozen_bn_eps=model_config.frozen_bn_eps,
                        group_norm_groups=model_config.group_norm_groups, dtype=dtype)
