"""`mrcnn_jax.distributed.initialize`: where the settings come from and when it starts nothing.

The multi-process runtime itself is exercised by test_multiprocess.py (2 processes over gloo);
these checks never start it (jax allows one initialisation per process).
"""

from __future__ import annotations

import pytest

from mrcnn_jax import distributed

CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize",
                        lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.config, "update", lambda *a: calls.append(a))
    return calls


def test_one_process_without_settings_starts_nothing(clean_env):
    assert distributed.initialize() is False
    assert distributed.initialize(mode="off", coordinator_address="h:1") is False
    assert clean_env == []


def test_explicit_arguments_reach_jax_with_gloo_first(clean_env):
    assert distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=2) is True
    assert clean_env[0] == ("jax_cpu_collectives_implementation", "gloo")
    assert clean_env[1] == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                process_id=2, local_device_ids=None)


def test_environment_settings(clean_env, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "coord:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
    monkeypatch.setenv("JAX_PROCESS_ID", "7")
    assert distributed.initialize(cpu_collectives="none") is True
    assert clean_env == [dict(coordinator_address="coord:8476", num_processes=8, process_id=7,
                              local_device_ids=None)]


def test_detected_cluster_lets_jax_fill_in(clean_env, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3")
    assert distributed.initialize() is True
    assert clean_env[-1] == dict(coordinator_address=None, num_processes=None, process_id=None,
                                 local_device_ids=None)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    clean_env.clear()
    assert distributed.initialize() is False and clean_env == []


def test_half_given_settings_and_bad_values_fail_naming_them(clean_env, monkeypatch):
    with pytest.raises(ValueError, match=r"\['num_processes', 'process_id'\]"):
        distributed.initialize("h:1")
    with pytest.raises(ValueError, match="mode must be one of"):
        distributed.initialize(mode="yes")
    with pytest.raises(ValueError, match="cpu_collectives must be one of"):
        distributed.initialize(cpu_collectives="nccl")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.initialize("h:1")
    assert clean_env == []
