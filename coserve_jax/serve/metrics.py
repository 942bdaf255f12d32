"""Prometheus metrics of the server (``GET /metrics``), with ``prometheus_client``.

Names follow vLLM's where one exists (``vllm:time_to_first_token_seconds`` is
``coserve_time_to_first_token_seconds`` here). Every server has its own registry, so several
servers in one process (tests) do not share counters. Request metrics are recorded when a
request finishes and step metrics after every step, in the engine loop's thread; the queue and
KV-cache gauges are read from the scheduler when scraped (always current).

| metric | type | unit |
|---|---|---|
| ``coserve_time_to_first_token_seconds`` | histogram | s, arrival to first token |
| ``coserve_time_per_output_token_seconds`` | histogram | s, mean over a request's tokens after the first (TPOT) |
| ``coserve_e2e_request_latency_seconds`` | histogram | s, arrival to last token |
| ``coserve_request_success_total{finish_reason}`` | counter | requests |
| ``coserve_prompt_tokens_total``, ``coserve_generation_tokens_total`` | counter | tokens |
| ``coserve_num_requests_running``, ``coserve_num_requests_waiting`` | gauge | requests |
| ``coserve_kv_cache_pages_used``, ``coserve_kv_cache_pages_total`` | gauge | pages |
| ``coserve_kv_cache_usage_ratio`` | gauge | used / total pages |
| ``coserve_step_time_seconds`` | histogram | s, host time of one engine step |
| ``coserve_finetune_tokens_total`` | counter | training tokens (forward + backward of whole sequences) |
| ``coserve_finetune_tokens_per_second`` | gauge | tokens/s over the last ``window_s`` seconds |
| ``coserve_finetune_job_step{job_id}``, ``coserve_finetune_job_total_steps{job_id}`` | gauge | optimizer steps |
| ``coserve_finetune_job_loss{job_id}`` | gauge | mean token cross-entropy of the last optimizer step (nats) |
| ``coserve_finetune_job_valid_loss{job_id}`` | gauge | mean token cross-entropy on the validation file, last pass (nats) |
| ``coserve_http_errors_total{status}`` | counter | error responses sent |
"""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    """The server's metrics in a registry of its own.

    Args:
        window_s: the window of ``coserve_finetune_tokens_per_second``, seconds.
    """

    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("coserve_time_to_first_token_seconds", "Time to first token (TTFT), seconds.", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("coserve_time_per_output_token_seconds", "Time per output token after the first (TPOT), seconds.", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("coserve_e2e_request_latency_seconds", "Arrival to last token, seconds.", buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("coserve_request_success", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("coserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("coserve_generation_tokens", "Generated tokens of finished requests.", registry=r)
        self.running = Gauge("coserve_num_requests_running", "Requests being prefilled or decoded.", registry=r)
        self.waiting = Gauge("coserve_num_requests_waiting", "Requests waiting for admission.", registry=r)
        self.pages_used = Gauge("coserve_kv_cache_pages_used", "KV cache pages in use.", registry=r)
        self.pages_total = Gauge("coserve_kv_cache_pages_total", "KV cache pages that requests can use.", registry=r)
        self.kv_usage = Gauge("coserve_kv_cache_usage_ratio", "Fraction of the KV cache pages in use.", registry=r)
        self.step_time = Histogram("coserve_step_time_seconds", "Host time of one engine step, seconds.", buckets=STEP_BUCKETS, registry=r)
        self.ft_tokens = Counter("coserve_finetune_tokens", "Finetuning tokens trained (all jobs).", registry=r)
        self.ft_rate = Gauge("coserve_finetune_tokens_per_second", "Finetuning tokens/s over the recent window.", registry=r)
        self.job_step = Gauge("coserve_finetune_job_step", "Optimizer steps done.", ["job_id"], registry=r)
        self.job_total = Gauge("coserve_finetune_job_total_steps", "Optimizer steps of the job.", ["job_id"], registry=r)
        self.job_loss = Gauge("coserve_finetune_job_loss", "Training loss of the last optimizer step.", ["job_id"], registry=r)
        self.job_valid_loss = Gauge("coserve_finetune_job_valid_loss", "Validation loss of the last validation pass.", ["job_id"], registry=r)
        self.http_errors = Counter("coserve_http_errors", "Error responses by HTTP status.", ["status"], registry=r)
        self._window_s = window_s
        self._trained: dict[str, int] = {}
        self._samples: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens trained)
        self.ft_rate.set_function(self._finetune_rate)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def observe_finished(self, num_prompt_tokens: int, num_output_tokens: int, finish_reason: str | None,
                         arrival: float, first_token: float | None, finish: float) -> None:
        """Record a finished request (times on one clock, seconds)."""
        self.requests.labels(finish_reason or "unknown").inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.e2e.observe(max(finish - arrival, 0.0))
        if first_token is not None:
            self.ttft.observe(max(first_token - arrival, 0.0))
            if num_output_tokens >= 2:
                self.tpot.observe(max(finish - first_token, 0.0) / (num_output_tokens - 1))

    def watch(self, engine) -> None:
        """Read the queue and KV-cache gauges from ``engine``'s scheduler when scraped (plain
        integer reads, so always current, also after an abort between steps)."""
        sched = engine.scheduler
        kv = sched.kv_cache
        self.running.set_function(lambda: sched.num_running)
        self.waiting.set_function(lambda: sched.num_waiting)
        self.pages_used.set_function(lambda: kv.num_used_pages)
        self.pages_total.set_function(lambda: kv.capacity)
        self.kv_usage.set_function(lambda: kv.num_used_pages / max(kv.capacity, 1))

    def observe_step(self, engine, seconds: float) -> None:
        """After a step: its time, and finetuning progress."""
        self.step_time.observe(seconds)
        now = time.monotonic()
        for job in engine.finetuning_jobs:
            before = self._trained.get(job.id)
            if job.eval_history:
                self.job_valid_loss.labels(job.id).set(job.eval_history[-1].loss)
            if before == job.trained_tokens and job.done:
                continue
            self._trained[job.id] = job.trained_tokens
            grown = job.trained_tokens - (before or 0)
            if grown:
                self.ft_tokens.inc(grown)
                self._samples.append((now, grown))
            self.job_step.labels(job.id).set(job.step)
            self.job_total.labels(job.id).set(job.total_steps)
            if job.loss_history:
                self.job_loss.labels(job.id).set(job.loss_history[-1].loss)

    def _finetune_rate(self) -> float:
        """Training tokens per second over the last ``window_s`` seconds (0 when idle); computed
        when scraped."""
        start = time.monotonic() - self._window_s
        while self._samples and self._samples[0][0] < start:
            self._samples.popleft()
        return sum(n for _, n in list(self._samples)) / self._window_s
