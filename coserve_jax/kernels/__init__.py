"""Attention kernels of coserve-jax, installed as ``coserve_jax.kernels``.

This folder sits at the repository's top level (the design's layout) but is packaged under
``coserve_jax`` (``[tool.setuptools] package-dir`` in ``pyproject.toml``), because a top-level
``kernels`` import name would clash with the Hugging Face ``kernels`` package on PyPI.

The ragged paged attention kernel and its pure-JAX reference serve the inference
engine; whole-sequence attention without a KV cache is
``coserve_jax.models.attention``.
"""
