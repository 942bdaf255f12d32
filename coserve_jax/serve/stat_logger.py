"""The server's periodic stats line (vLLM's ``LoggingStatLogger``), every ``interval_s`` seconds
while there is work::

    INFO 12-01 23:30:10 [coserve_jax.serve.stats] Avg prompt throughput: 412.3 tokens/s, Avg generation
    throughput: 95.1 tokens/s, Running: 8 reqs, Waiting: 0 reqs, KV cache usage: 12.5%, Preemptions: 0,
    Finetuning: 310.4 tokens/s (ftjob-1a2b step 3/12, loss 2.3101)

Prompt throughput counts the prompt tokens of requests that got their first token in the
window, generation throughput the tokens generated in it, finetuning throughput the training
tokens trained in it.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("coserve_jax.serve.stats")


class StatLogger:
    """Counts what the steps did and logs one line per ``interval_s`` seconds that saw work.

    :meth:`observe` runs in the engine loop's thread after each step; :meth:`flush` in a timer
    thread of its own (:meth:`start`), so a window is closed on time even when the engine then
    goes idle. The gauges it reads (running and waiting requests, pages, the jobs' progress)
    are plain attribute reads, as the metrics endpoint's.

    Args:
        interval_s: seconds between lines (vLLM logs every 10 s).
        clock: the time source (seconds), ``time.monotonic`` by default.
    """

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._prompt = self._generated = self._trained_window = 0
        self._trained: dict[str, int] = {}
        self._seen: set[str] = set()  # requests whose prompt is already counted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, engine, outputs) -> None:
        """Count a step's outputs (prompt tokens once per request, generated tokens) and the
        jobs' newly trained tokens."""
        prompt = generated = trained = 0
        for o in outputs:
            if o.request_id not in self._seen and o.token_ids:
                self._seen.add(o.request_id)
                prompt += len(o.prompt_token_ids)
            generated += len(o.delta_token_ids)
            if o.finished:
                self._seen.discard(o.request_id)
        for job in engine.finetuning_jobs:
            before = self._trained.get(job.id, 0)
            if job.trained_tokens != before:
                trained += job.trained_tokens - before
                self._trained[job.id] = job.trained_tokens
        with self._lock:
            self._prompt += prompt
            self._generated += generated
            self._trained_window += trained

    def flush(self, engine) -> str | None:
        """Close the window: log (and return) its line if it saw work or requests are queued."""
        now = self._clock()
        with self._lock:
            elapsed = max(now - self._start, 1e-9)
            prompt, generated, trained = self._prompt, self._generated, self._trained_window
            self._start, self._prompt, self._generated, self._trained_window = now, 0, 0, 0
        sched = engine.scheduler
        if not (prompt or generated or trained or sched.num_running or sched.num_waiting):
            return None
        kv = sched.kv_cache
        line = (f"Avg prompt throughput: {prompt / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {generated / elapsed:.1f} tokens/s, "
                f"Running: {sched.num_running} reqs, Waiting: {sched.num_waiting} reqs, "
                f"KV cache usage: {100.0 * kv.num_used_pages / max(kv.capacity, 1):.1f}%, "
                f"Preemptions: {sched.num_preemptions}")
        if kv.prefix_cache_queries:
            line += f", Prefix cache hit rate: {100.0 * kv.prefix_cache_hits / kv.prefix_cache_queries:.1f}%"
        active = [j for j in engine.finetuning_jobs if not j.done]
        if active or trained:
            line += f", Finetuning: {trained / elapsed:.1f} tokens/s"
            if active:
                j = active[0]
                loss = f", loss {j.loss_history[-1].loss:.4f}" if j.loss_history else ""
                more = f" and {len(active) - 1} more" if len(active) > 1 else ""
                line += f" ({j.id} step {j.step}/{j.total_steps}{loss}{more})"
        log.info("%s", line)
        return line

    def start(self, engine) -> None:
        """Flush every ``interval_s`` seconds in a daemon thread until :meth:`stop`."""
        def run():
            while not self._stop.wait(self.interval_s):
                try:
                    self.flush(engine)
                except Exception:  # never take the server down for a log line
                    log.exception("stats line failed")

        self._thread = threading.Thread(target=run, name="coserve-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
