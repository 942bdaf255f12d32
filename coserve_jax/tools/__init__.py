"""Command-line tools built on the engine (above the library's layers; nothing imports them).

* :mod:`coserve_jax.tools.parallel_check`: run one fixed co-serving workload and write what it
  produced, to compare tensor-parallel sizes and single- against multi-host set-ups.
"""
