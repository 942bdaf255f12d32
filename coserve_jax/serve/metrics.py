"""Prometheus metrics of the server (``GET /metrics``), with ``prometheus_client``.

vLLM's metrics keep vLLM's names, types and labels (``vllm:`` prefix, a ``model_name`` label,
``finished_reason`` on finished requests), so a vLLM dashboard reads this server as it is; what
vLLM has no metric for (finetuning, the step, HTTP errors) is under ``coserve:``. Every server
has its own registry, so several servers in one process (tests) do not share counters. Request
metrics are recorded when a request finishes and step metrics after every step, in the engine
loop's thread; the queue and KV-cache gauges are read from the scheduler when scraped (always
current).

| metric | type | unit |
|---|---|---|
| ``vllm:time_to_first_token_seconds`` | histogram | s, arrival to first token (TTFT) |
| ``vllm:time_per_output_token_seconds`` | histogram | s, mean over a request's tokens after the first (TPOT) |
| ``vllm:e2e_request_latency_seconds`` | histogram | s, arrival to last token |
| ``vllm:request_queue_time_seconds`` | histogram | s, arrival to first admission into a step |
| ``vllm:request_prompt_tokens``, ``vllm:request_generation_tokens`` | histogram | tokens per finished request |
| ``vllm:request_success_total{finished_reason}`` | counter | finished requests (``stop``, ``length``, ``abort``) |
| ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total`` | counter | tokens of finished requests |
| ``vllm:num_preemptions_total`` | counter | preemptions (recomputation) |
| ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` | gauge | requests |
| ``vllm:kv_cache_usage_perc`` | gauge | used / total KV pages (0 to 1) |
| ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total`` | counter | prompt tokens looked up in the prefix cache at admission, and found there |
| ``coserve:kv_cache_pages_cached`` | gauge | pages the prefix cache can match (held or evictable) |
| ``coserve:kv_cache_pages_used``, ``coserve:kv_cache_pages_total`` | gauge | pages |
| ``coserve:step_time_seconds`` | histogram | s, host time of one engine step |
| ``coserve:finetune_tokens_total`` | counter | training tokens (forward + backward of whole sequences) |
| ``coserve:finetune_tokens_per_second`` | gauge | tokens/s over the last ``window_s`` seconds |
| ``coserve:finetune_job_step{job_id}``, ``coserve:finetune_job_total_steps{job_id}`` | gauge | optimizer steps |
| ``coserve:finetune_job_loss{job_id}`` | gauge | mean token cross-entropy of the last optimizer step (nats) |
| ``coserve:finetune_job_valid_loss{job_id}`` | gauge | mean token cross-entropy on the validation file, last pass (nats) |
| ``coserve:http_errors_total{status}`` | counter | error responses sent |

Every metric carries ``model_name`` (the served base model's name).
"""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

VLLM_METRICS = (
    "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
    "vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
)
"""The vLLM metric families this server exposes (counters without their ``_total`` suffix)."""


class ServerMetrics:
    """The server's metrics in a registry of its own.

    Args:
        model_name: the served base model's name (the ``model_name`` label).
        window_s: the window of ``coserve:finetune_tokens_per_second``, seconds.
    """

    def __init__(self, model_name: str = "", window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.model_name = model_name

        def hist(name, doc, buckets, labels=()):
            return Histogram(name, doc, [*m, *labels], buckets=buckets, registry=r)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token (TTFT), seconds.", LATENCY_BUCKETS).labels(model_name)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Time per output token after the first (TPOT), seconds.", TPOT_BUCKETS).labels(model_name)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last token, seconds.", LATENCY_BUCKETS).labels(model_name)
        self.queue = hist("vllm:request_queue_time_seconds", "Arrival to first admission into a step, seconds.", LATENCY_BUCKETS).labels(model_name)
        self.request_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens of each finished request.", TOKEN_BUCKETS).labels(model_name)
        self.request_generation = hist("vllm:request_generation_tokens", "Generated tokens of each finished request.", TOKEN_BUCKETS).labels(model_name)
        self.requests = Counter("vllm:request_success", "Finished requests by finish reason.", [*m, "finished_reason"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.", m, registry=r).labels(model_name)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions (the request is recomputed later).", m, registry=r).labels(model_name)
        self.running = Gauge("vllm:num_requests_running", "Requests being prefilled or decoded.", m, registry=r).labels(model_name)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for admission.", m, registry=r).labels(model_name)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of the KV cache pages in use (0 to 1).", m, registry=r).labels(model_name)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m,
                                      registry=r).labels(model_name)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m,
                                   registry=r).labels(model_name)
        self.pages_cached = Gauge("coserve:kv_cache_pages_cached", "KV cache pages the prefix cache can match.", m,
                                  registry=r).labels(model_name)
        self.pages_used = Gauge("coserve:kv_cache_pages_used", "KV cache pages in use.", m, registry=r).labels(model_name)
        self.pages_total = Gauge("coserve:kv_cache_pages_total", "KV cache pages that requests can use.", m, registry=r).labels(model_name)
        self.step_time = hist("coserve:step_time_seconds", "Host time of one engine step, seconds.", STEP_BUCKETS).labels(model_name)
        self.ft_tokens = Counter("coserve:finetune_tokens", "Finetuning tokens trained (all jobs).", m, registry=r).labels(model_name)
        self.ft_rate = Gauge("coserve:finetune_tokens_per_second", "Finetuning tokens/s over the recent window.", m, registry=r).labels(model_name)
        self.job_step = Gauge("coserve:finetune_job_step", "Optimizer steps done.", [*m, "job_id"], registry=r)
        self.job_total = Gauge("coserve:finetune_job_total_steps", "Optimizer steps of the job.", [*m, "job_id"], registry=r)
        self.job_loss = Gauge("coserve:finetune_job_loss", "Training loss of the last optimizer step.", [*m, "job_id"], registry=r)
        self.job_valid_loss = Gauge("coserve:finetune_job_valid_loss", "Validation loss of the last validation pass.", [*m, "job_id"], registry=r)
        self.http_errors = Counter("coserve:http_errors", "Error responses by HTTP status.", [*m, "status"], registry=r)
        self._window_s = window_s
        self._trained: dict[str, int] = {}
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)  # (queries, hits) counted so far
        self._samples: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens trained)
        self.ft_rate.set_function(self._finetune_rate)

    def http_error(self, status: int) -> None:
        """Count an error response."""
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def observe_finished(self, num_prompt_tokens: int, num_output_tokens: int, finish_reason: str | None,
                         arrival: float, first_token: float | None, finish: float, first_scheduled: float | None = None) -> None:
        """Record a finished request (times on one clock, seconds)."""
        self.requests.labels(self.model_name, finish_reason or "unknown").inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.request_prompt.observe(num_prompt_tokens)
        self.request_generation.observe(num_output_tokens)
        self.e2e.observe(max(finish - arrival, 0.0))
        if first_scheduled is not None:
            self.queue.observe(max(first_scheduled - arrival, 0.0))
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
        self.pages_cached.set_function(lambda: kv.num_cached_pages)

    def observe_step(self, engine, seconds: float) -> None:
        """After a step: its time, and finetuning progress."""
        self.step_time.observe(seconds)
        preemptions = engine.num_preemptions
        if preemptions > self._preemptions_seen:
            self.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions
        kv = engine.scheduler.kv_cache
        queries, hits = kv.prefix_cache_queries, kv.prefix_cache_hits
        if (queries, hits) != self._prefix_seen:
            self.prefix_queries.inc(queries - self._prefix_seen[0])
            self.prefix_hits.inc(hits - self._prefix_seen[1])
            self._prefix_seen = (queries, hits)
        now = time.monotonic()
        for job in engine.finetuning_jobs:
            before = self._trained.get(job.id)
            if job.eval_history:
                self.job_valid_loss.labels(self.model_name, job.id).set(job.eval_history[-1].loss)
            if before == job.trained_tokens and job.done:
                continue
            self._trained[job.id] = job.trained_tokens
            grown = job.trained_tokens - (before or 0)
            if grown:
                self.ft_tokens.inc(grown)
                self._samples.append((now, grown))
            self.job_step.labels(self.model_name, job.id).set(job.step)
            self.job_total.labels(self.model_name, job.id).set(job.total_steps)
            if job.loss_history:
                self.job_loss.labels(self.model_name, job.id).set(job.loss_history[-1].loss)

    def _finetune_rate(self) -> float:
        """Training tokens per second over the last ``window_s`` seconds (0 when idle); computed
        when scraped."""
        start = time.monotonic() - self._window_s
        while self._samples and self._samples[0][0] < start:
            self._samples.popleft()
        return sum(n for _, n in list(self._samples)) / self._window_s
