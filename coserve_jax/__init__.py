"""coserve-jax: LLM inference and LoRA finetuning co-served in one fused JAX/XLA step.

``from coserve_jax import Engine, SamplingParams, FinetuneConfig, LoRAConfig`` is the notebook API. The names are imported
lazily, so ``coserve_jax.sched`` (pure Python) can be used without importing JAX. Log lines go to
stdout (:mod:`coserve_jax.logging_config`; ``COSERVE_JAX_CONFIGURE_LOGGING=0`` turns that off).
"""

__version__ = "0.1.0"

from coserve_jax.logging_config import configure_library_logging as _configure_logging  # noqa: E402 (stdlib only)

_configure_logging()  # the coserve_jax logger to stdout at INFO, unless COSERVE_JAX_CONFIGURE_LOGGING=0

__all__ = ["Engine", "FinetuneConfig", "FinetuneJob", "LoRAConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name):
    if name in ("Engine", "RequestOutput"):
        from coserve_jax import engine

        return getattr(engine, name)
    if name in ("FinetuneConfig", "LoRAConfig"):
        from coserve_jax.finetune import config

        return getattr(config, name)
    if name == "FinetuneJob":
        from coserve_jax.finetune.job import FinetuneJob

        return FinetuneJob
    if name == "SamplingParams":
        from coserve_jax.sched.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'coserve_jax' has no attribute {name!r}")
