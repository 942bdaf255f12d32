"""The OpenAI-compatible server (``python -m coserve_jax.serve``): inference and fine-tuning jobs
over one co-serving engine, with Prometheus metrics.

Modules: :mod:`~coserve_jax.serve.config` (YAML config), :mod:`~coserve_jax.serve.model` (the
engine a config describes), :mod:`~coserve_jax.serve.engine_loop` (the engine's own thread),
:mod:`~coserve_jax.serve.app` (the HTTP routes), :mod:`~coserve_jax.serve.protocol` (OpenAI's
shapes), :mod:`~coserve_jax.serve.errors`, :mod:`~coserve_jax.serve.files`,
:mod:`~coserve_jax.serve.jobs`, :mod:`~coserve_jax.serve.metrics`.
"""

from coserve_jax.serve.config import ServeConfig, load_config

__all__ = ["ServeConfig", "load_config"]
