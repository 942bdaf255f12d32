"""The device mesh: a ``data`` axis (model replicas; size 1 for now) by a ``tp`` axis (tensor
parallelism: one model's layers split over these devices).

Devices are taken in ``jax.devices()`` order (process by process, then by id), so with several
hosts (:mod:`coserve_jax.parallel.distributed`) a ``tp`` group spans hosts exactly as it spans
local devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"
"""Mesh axis of model replicas (reserved for data-parallel serving; size 1)."""

TENSOR_AXIS = "tp"
"""Mesh axis of tensor parallelism (Megatron-LM, Shoeybi et al. 2019)."""


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, tp)`` mesh of ``data_parallel_size x tensor_parallel_size`` devices.

    Args:
        tensor_parallel_size: devices one model is split over.
        data_parallel_size: model replicas (1: the engine serves one replica).
        devices: the devices to use, in order (default ``jax.devices()``, all processes').
    Returns:
        A :class:`jax.sharding.Mesh` with axes ``("data", "tp")``.
    Raises:
        ValueError: a size below 1, or more devices asked for than exist.
    """
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size and data_parallel_size must be >= 1, got {tensor_parallel_size} and {data_parallel_size}"
        )
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if need > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} needs {need} "
            f"devices; {len(devices)} are visible ({jax.process_count()} process(es), backend {jax.default_backend()!r})"
        )
    grid = np.array(devices[:need], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, (DATA_AXIS, TENSOR_AXIS))
