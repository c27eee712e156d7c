"""Multi-process (multi-host) start-up: one call before anything else touches jax devices.

    from mrcnn_jax import distributed
    distributed.initialize()                    # from the environment (or a no-op on one host)
    distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=i)  # explicit

Every process of a run calls it with the same coordinator; afterwards `jax.devices()` lists the
devices of all processes, `jax.process_index()` names this one, and the rest of the code
(`sharding.make_mesh`, `shard_batch`, the input pipeline's per-host split, orbax checkpoints,
the evaluation's inference loop) works on the global mesh unchanged.

Where the settings come from, first found wins:
  1. the arguments (train.py / eval.py pass their `--coordinator_address`, `--num_processes`,
     `--process_id` flags, see `define_flags`);
  2. the environment: `JAX_COORDINATOR_ADDRESS` (read by jax itself), `JAX_NUM_PROCESSES`,
     `JAX_PROCESS_ID` (read here);
  3. jax's cluster auto-detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes JobSet)
     when `mode="on"`, or when `mode="auto"` and such a multi-process cluster is visible in the
     environment (`SLURM_NTASKS` > 1, `OMPI_COMM_WORLD_SIZE` > 1, `TPU_WORKER_HOSTNAMES` with
     several hosts, or `MEGASCALE_COORDINATOR_ADDRESS`).
With none of these, `mode="auto"` is a no-op: a single process with its local devices.

CPU-only multi-process runs (tests, debugging) need cross-process collectives on the host:
`cpu_collectives="gloo"` (the default) selects them before the runtime starts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
CPU_COLLECTIVES = ("gloo", "mpi", "none")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _cluster_in_environment() -> str | None:
    """The name of a multi-process cluster jax can auto-detect, when the environment shows one."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "Cloud TPU pod slice"
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU multislice"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto",
               cpu_collectives: str = "gloo",
               local_device_ids: list[int] | None = None) -> bool:
    """Start jax's multi-process runtime when the run has several processes.

    Args:
      coordinator_address: "host:port" of process 0 (reachable by every process); default
        `$JAX_COORDINATOR_ADDRESS`.
      num_processes: processes in the run; default `$JAX_NUM_PROCESSES`.
      process_id: this process, 0..num_processes-1; default `$JAX_PROCESS_ID`.
      mode: "auto" (initialise when settings or a cluster are found), "on" (always; jax detects
        what is not given) or "off" (never).
      cpu_collectives: cross-process collectives of the CPU backend (gloo | mpi | none).
      local_device_ids: the accelerators this process drives (e.g. one GPU per process).

    Returns:
      True when a multi-process runtime was started (or already running), False otherwise.
    Raises:
      ValueError: an unknown mode or collectives name, or settings that are only half given.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(f"cpu_collectives must be one of {CPU_COLLECTIVES}, got "
                         f"{cpu_collectives!r}")
    if mode == "off":
        return False
    if is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    explicit = (coordinator_address, num_processes, process_id)
    cluster = _cluster_in_environment()
    if mode == "auto" and all(v is None for v in explicit) and cluster is None:
        return False  # one process: nothing to start
    if mode == "auto" and cluster is None and None in explicit:
        names = ("coordinator_address", "num_processes", "process_id")
        missing = [n for n, v in zip(names, explicit) if v is None]
        raise ValueError(f"multi-process settings are incomplete: {missing} not given (flags or "
                         f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); give all "
                         f"three, or let jax detect the cluster: mode='on' (--distributed=on)")
    if cpu_collectives != "none":
        # Must precede the backend's creation; harmless on GPU/TPU (CPU backend only).
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    logger.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s%s)",
                coordinator_address, num_processes, process_id,
                f", cluster={cluster}" if cluster else "")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    logger.info("process %d of %d: %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_initialized() -> bool:
    """Whether `jax.distributed.initialize` has run in this process."""
    return jax.distributed.is_initialized()


def is_primary() -> bool:
    """True on the process that writes logs, TensorBoard scalars, pictures and json files."""
    return jax.process_index() == 0


def quiet_non_primary_logging() -> None:
    """Keep INFO logs on process 0 only; other processes report warnings and errors."""
    if not is_primary():
        logging.getLogger().setLevel(logging.WARNING)
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.WARNING)
        except ImportError:
            pass


# --- Flags for the entry points ----------------------------------------------------------------

def define_flags() -> None:
    """Define --coordinator_address, --num_processes, --process_id, --distributed,
    --cpu_collectives (absl) for train.py / eval.py."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None,
                        f"host:port of process 0 for a multi-process run (default "
                        f"${ENV_COORDINATOR}).")
    flags.DEFINE_integer("num_processes", None,
                         f"Processes in a multi-process run (default ${ENV_NUM_PROCESSES}).")
    flags.DEFINE_integer("process_id", None,
                         f"This process, 0..num_processes-1 (default ${ENV_PROCESS_ID}).")
    flags.DEFINE_enum("distributed", "auto", list(MODES),
                      "auto: start the multi-process runtime when the flags/environment give a "
                      "coordinator or a cluster (TPU pod, SLURM, MPI) is detected; on: always "
                      "(jax detects missing settings); off: never.")
    flags.DEFINE_enum("cpu_collectives", "gloo", list(CPU_COLLECTIVES),
                      "Cross-process collectives of the CPU backend (CPU-only multi-process).")


def initialize_from_flags(flag_values: Any = None) -> bool:
    """`initialize` with the values of `define_flags`' flags, then quiet non-primary logs."""
    if flag_values is None:
        from absl import flags

        flag_values = flags.FLAGS
    started = initialize(flag_values.coordinator_address, flag_values.num_processes,
                         flag_values.process_id, mode=flag_values.distributed,
                         cpu_collectives=flag_values.cpu_collectives)
    quiet_non_primary_logging()
    return started


__all__ = ["MODES", "define_flags", "initialize", "initialize_from_flags", "is_initialized",
           "is_primary", "quiet_non_primary_logging"]
