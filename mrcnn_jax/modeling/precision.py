"""`model.dtype`, the compute dtype: "float32", "bfloat16", or "auto" (bfloat16 on a TPU backend,
float32 elsewhere). Parameters stay float32 in every case; the run's workdir/config.json records
the resolved name."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "auto")
# TPUs compute matrix products in bfloat16 at full rate; GPUs and CPUs default to float32.
_AUTO = {"tpu": "bfloat16"}


def resolve_dtype_name(dtype: str, platform: str | None = None) -> str:
    """"float32" or "bfloat16" for `model.dtype` on `platform` (default: jax's backend)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return _AUTO.get(platform or jax.default_backend(), "float32")
    return dtype


def compute_dtype(dtype: str) -> jnp.dtype:
    """The jnp dtype of `model.dtype` (a name of DTYPES) on the backend being traced for."""
    return jnp.dtype(resolve_dtype_name(dtype))
