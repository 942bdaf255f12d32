"""Serving metrics of a benchmark run: SLO attainment, goodput, latency percentiles, finetuning
throughput and progress, and the latency model's error.

Definitions (as in DistServe, Zhong et al., OSDI 2024, and FlexLLM section 7):

* a request **attains its SLOs** when it finished, its TTFT is within the TTFT SLO and its mean
  TPOT (time per output token after the first) is within the TPOT SLO; **SLO attainment** is
  the share of a run's requests that do;
* **goodput** is SLO-attaining requests per second of the run;
* **finetuning throughput** is training tokens (forward and backward done) per second of the run;
  **finetuning progress** is that over the finetuning-only run's throughput.
"""

from __future__ import annotations

import math

import numpy as np

from coserve_jax.bench.harness import RunResult
from coserve_jax.sched.policy import SLOConfig

SUMMARY_KEYS = (
    "policy", "rate", "slo_attainment", "goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
    "finetune_tokens_per_s", "finetune_progress",
)
"""The keys every ``summary.json`` row has (more follow them)."""


def _pct(values, q) -> float | None:
    v = [x for x in values if math.isfinite(x)]
    return float(np.percentile(v, q)) if v else None


def attains(record, slo: SLOConfig) -> bool:
    """Whether a :class:`~coserve_jax.bench.harness.RequestRecord` met both SLOs."""
    return (
        record.finished and math.isfinite(record.ttft_ms) and record.ttft_ms <= slo.ttft_ms and record.tpot_ms <= slo.tpot_ms
    )


def latency_model_error(steps) -> float | None:
    """Median of ``|predicted - measured| / measured`` over a run's steps (``None``: no step)."""
    errs = [abs(s.predicted_ms - s.measured_ms) / s.measured_ms for s in steps if s.measured_ms > 0]
    return float(np.median(errs)) if errs else None


def summarize(result: RunResult, slo: SLOConfig, finetune_only_tokens_per_s: float | None) -> dict:
    """One ``summary.json`` row: :data:`SUMMARY_KEYS`, then the request and step counts, the
    latency model's median relative error, the mean step time (ms) and the prefix cache's hit
    rate (hit / queried prompt tokens; ``None`` without lookups)."""
    reqs = result.requests
    ok = sum(attains(r, slo) for r in reqs)
    dur = max(result.duration_s, 1e-9)
    ft_tps = result.finetune_tokens / dur
    row = {
        "policy": result.policy,
        "rate": result.rate,
        "slo_attainment": ok / len(reqs) if reqs else None,
        "goodput": ok / dur if reqs else None,
        "ttft_p50_ms": _pct([r.ttft_ms for r in reqs], 50),
        "ttft_p99_ms": _pct([r.ttft_ms for r in reqs], 99),
        "tpot_p50_ms": _pct([r.tpot_ms for r in reqs if r.output_tokens > 1], 50),
        "tpot_p99_ms": _pct([r.tpot_ms for r in reqs if r.output_tokens > 1], 99),
        "finetune_tokens_per_s": ft_tps,
        "finetune_progress": ft_tps / finetune_only_tokens_per_s if finetune_only_tokens_per_s else None,
        "engine_policy": result.engine_policy,
        "num_requests": len(reqs),
        "num_finished": sum(r.finished for r in reqs),
        "duration_s": result.duration_s,
        "num_steps": result.num_steps,
        "finetune_tokens": result.finetune_tokens,
        "mean_step_ms": float(np.mean([s.measured_ms for s in result.steps])) if result.steps else None,
        "latency_model_median_rel_error": latency_model_error(result.steps),
        "prefix_cache_hit_rate": result.prefix_cache_hits / result.prefix_cache_queries if result.prefix_cache_queries else None,
    }
    return row
