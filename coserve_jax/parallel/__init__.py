"""Tensor parallelism: the device mesh, the sharding rules, multi-host start-up.

* :mod:`.mesh`: the ``(data, tp)`` device :class:`~jax.sharding.Mesh`.
* :mod:`.rules`: every array's placement, base layers Megatron-style and LoRA derived from them
  by one rule (FlexLLM's dependent parallelization), plus the in-layer collectives.
* :mod:`.distributed`: ``jax.distributed.initialize`` from a config, so one engine spans hosts.
"""

from coserve_jax.parallel.distributed import DistributedConfig, initialize_distributed
from coserve_jax.parallel.mesh import DATA_AXIS, TENSOR_AXIS, make_mesh
from coserve_jax.parallel.rules import ShardingRules, TensorParallel

__all__ = [
    "DATA_AXIS", "TENSOR_AXIS", "DistributedConfig", "ShardingRules", "TensorParallel", "initialize_distributed", "make_mesh",
]
