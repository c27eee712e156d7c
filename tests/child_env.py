"""XLA_FLAGS for the child processes the tests start (CLIs, forced device counts, multi-process
runs): the suite's own flags (`MRCNN_TEST_XLA_FLAGS`, set by conftest.py) plus what the child
needs."""

from __future__ import annotations

import os


def xla_flags(num_cpu_devices: int | None = None) -> str:
    """The suite's XLA flags, with `num_cpu_devices` forced host devices when given (otherwise
    one CPU device, whatever the parent process forced)."""
    flags = os.environ.get("MRCNN_TEST_XLA_FLAGS", "").split()
    if num_cpu_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={num_cpu_devices}")
    return " ".join(flags)
