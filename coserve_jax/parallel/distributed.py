"""Multi-host start-up: one engine whose mesh spans the devices of several processes.

JAX runs multi-host programs SPMD, one controller per host: every process calls the same
compiled steps in the same order, and XLA's collectives (NCCL on GPUs, Gloo on CPUs) join the
processes inside each step. The engine gets there in one of two ways: every process drives it
identically (the same calls on the same requests), or process 0 alone takes requests, plans each
step and publishes it, and the others run what it publishes
(:meth:`coserve_jax.engine.engine.Engine.lead` / :meth:`~coserve_jax.engine.engine.Engine.follow`,
over :class:`coserve_jax.parallel.channel.HostChannel`): the server and the benchmark do that.
:func:`initialize_distributed` must run before anything touches a device.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Arguments of ``jax.distributed.initialize``.

    Attributes:
        coordinator_address: ``host:port`` of process 0's coordination service (every process
            gives the same).
        num_processes: processes in the job.
        process_id: this process's rank, ``0 .. num_processes - 1``.
        local_device_ids: the local devices this process uses (default: all).
        initialization_timeout: seconds to wait for all processes to join.
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: Sequence[int] | None = None
    initialization_timeout: int = 300

    def __post_init__(self):
        if not self.coordinator_address or ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address must be 'host:port', got {self.coordinator_address!r}")
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")


def initialize_distributed(config: DistributedConfig | dict | None) -> bool:
    """Join the multi-process job described by ``config`` (``None``: single process, nothing to do).

    Safe to call twice with the same config (the second call does nothing).

    Returns:
        Whether this process is part of a multi-process job.
    Raises:
        ValueError: a bad config.
        RuntimeError: from ``jax.distributed.initialize`` (e.g. the coordinator is unreachable
            before ``initialization_timeout``), or JAX's backends already started.
    """
    if config is None:
        return False
    if isinstance(config, dict):
        config = DistributedConfig(**config)
    if jax.distributed.is_initialized():
        return True
    kwargs = dict(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        initialization_timeout=config.initialization_timeout,
    )
    if config.local_device_ids is not None:
        kwargs["local_device_ids"] = list(config.local_device_ids)
    jax.distributed.initialize(**kwargs)
    return True


def check_distributed(value) -> None:
    """Validate a config file's ``engine.distributed`` value (``None``: single process).

    Raises:
        ValueError: not a mapping of :class:`DistributedConfig` fields, or bad field values.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of coordinator_address, num_processes, process_id")
    try:
        DistributedConfig(**value)
    except TypeError as e:
        raise ValueError(str(e)) from None
