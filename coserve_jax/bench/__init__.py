"""The co-serving benchmark (``python -m coserve_jax.bench --config configs/bench/NAME.yaml``).

Modules: :mod:`.config` (the YAML schema), :mod:`.workload` (traces, arrivals, prompts),
:mod:`.harness` (one engine, every policy, real-time replay), :mod:`.metrics` (SLO attainment,
goodput, throughput), :mod:`.report` (CSVs, summary, table, plots).
"""
