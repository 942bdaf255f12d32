"""The inference engine: the fused jitted step per shape bucket, on-device sampling, and the
notebook API (:class:`Engine`) that drives it with the host-side scheduler of ``coserve_jax.sched``."""

from coserve_jax.engine.engine import Engine
from coserve_jax.engine.outputs import RequestOutput

__all__ = ["Engine", "RequestOutput"]
