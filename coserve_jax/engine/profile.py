"""Start-up profile of the compiled executables, to fit the step latency model.

Every step bucket runs a synthetic batch (its ``S`` sequences share its ``T`` tokens, once
attending to almost nothing and once to a long KV, and, with finetuning, once as a training
chunk of ``T`` weighted tokens, for the loss head) and every backward bucket runs one layer and
all of them; the
median of a few timed runs of each, after a warm-up run, is a ``(StepShape, ms)`` sample for
:meth:`coserve_jax.sched.latency_model.LatencyModel.fit`. The synthetic batches write their
K/V only into the scratch page 0 and their activations nowhere (the finetuning scatter drops
them), so profiling leaves the engine's state untouched.

The fitted model is cached as JSON, keyed by the model, the device, the buckets and the jax
version, next to the compilation cache; a restart loads it instead of profiling again, and
rescales it to the device's speed of the day by timing two step buckets (:func:`calibrate`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time

import jax

from coserve_jax.sched.outputs import BackwardSlice, FinetuneChunk, ScheduledChunk, SchedulerOutput
from coserve_jax.sched.policy import step_shape
from coserve_jax.sched.latency_model import LatencyModel, StepShape

log = logging.getLogger("coserve_jax.engine")


def profile_key(runner) -> str:
    """A digest of what step times depend on: model, dtype, device, buckets, attention, jax."""
    dev = jax.devices()[0]
    cfg = runner.config
    layout = cfg.finetune
    desc = {
        "model": repr(runner.model.config), "dtype": str(runner.model.dtype), "device": f"{dev.platform}:{dev.device_kind}",
        "num_devices": len(jax.devices()), "tensor_parallel_size": cfg.tensor_parallel_size,
        "buckets": [(b.num_tokens, b.num_seqs) for b in cfg.buckets],
        "finetune": None if layout is None else [layout.max_jobs, layout.max_seq_len, layout.layers_per_slice, list(layout.seq_buckets)],
        "attention": cfg.attention_impl, "page_size": cfg.page_size, "jax": jax.__version__, "version": 4,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def profile_samples(runner, repeats: int = 3, buckets=None, backward: bool = True) -> list[tuple[StepShape, float]]:
    """Time every compiled step bucket (two KV lengths) and backward bucket of a
    :class:`~coserve_jax.engine.model_runner.ModelRunner`. Returns ``(shape, median ms)`` samples.

    Args:
        buckets: the step buckets to time (default: all of them).
        backward: also time the backward buckets.
    """
    samples = []
    cfg = runner.config
    shapes = cfg.bucket_shapes
    layout = cfg.finetune
    for bucket in cfg.buckets if buckets is None else buckets:
        t, s = bucket.num_tokens, min(bucket.num_seqs, bucket.num_tokens)
        q = t // s
        last = t - q * (s - 1)
        for kv in (0, max(0, min(cfg.max_model_len - last - 1, 1024))):
            chunks = []
            for i in range(s):
                n = q if i < s - 1 else last
                pages = (0,) * (-(-(kv + n) // cfg.page_size))
                chunks.append(ScheduledChunk(i, kv, [0] * n, pages, True))
            plan = SchedulerOutput(prefills=chunks)

            def run(plan=plan):
                jax.block_until_ready(runner.execute(plan))
                runner.input_batch.release(plan.request_ids)

            samples.append((step_shape(plan, shapes), _time(run, repeats)))
        if layout is not None and t <= cfg.max_finetune_tokens:  # the loss head on a whole bucket of weighted tokens
            chunk = FinetuneChunk("profile", 0, 0, 0, 0, [0] * t, (0,) * -(-t // cfg.page_size), 1, -1, [0] * t, [1.0] * t)
            plan = SchedulerOutput(finetune=[chunk])
            samples.append((step_shape(plan, shapes), _time(lambda plan=plan: jax.block_until_ready(runner.execute(plan)), repeats)))
    if layout is not None and backward:
        num_layers = runner.model.config.num_layers
        for length in layout.seq_buckets:
            for layers in sorted({1, num_layers}):
                backward = BackwardSlice("profile", 0, num_layers - layers, layers, length, 0, 0, 1, (length,), 0.0, (0,))
                plan = SchedulerOutput(backward=backward)

                def run_bwd(backward=backward):
                    runner.run_backward(backward)
                    runner.wait()

                samples.append((step_shape(plan, shapes, layout.seq_buckets), _time(run_bwd, repeats)))
        runner.zero_grad_row(0)  # the profile's backward added into row 0's accumulator
    return samples


def calibrate(model: LatencyModel, runner, repeats: int = 7) -> float:
    """Rescale a loaded latency model to the device as it is now: time the smallest compiled and
    the largest step bucket at two KV lengths each, as the profile does (the largest alone in a
    multi-process engine, whose processes must run the same steps), and set the model's global
    ratio to the median of measured / predicted (clamped to [1/4, 4], as online updates
    are). A cached model was fitted on another day: the same machine under other load, clocks or
    co-tenants runs the same steps at another speed, and whatever is planned or derived from the
    model's predictions before the first measured steps (the benchmark's relative SLOs) should
    see today's speed. Returns the ratio."""
    largest = runner.config.buckets[-1]  # compiled before serving starts, in every process
    ready = runner.step_fn.ready
    picked = sorted({ready[0], largest}) if ready and jax.process_count() == 1 else [largest]
    ratios = []
    for shape, ms in profile_samples(runner, repeats, buckets=picked, backward=False):
        base = model.base(shape)
        if base > 0.0 and ms > 0.0:
            ratios.append(ms / base)
    if ratios:
        model.global_ratio = min(4.0, max(0.25, statistics.median(ratios)))
    return model.global_ratio


def fitted_latency_model(runner, cache_dir: str | os.PathLike | None, repeats: int = 3) -> tuple[LatencyModel, bool]:
    """The runner's step latency model: loaded from ``cache_dir/latency/<key>.json`` if present
    (and rescaled to the device's speed now, :func:`calibrate`), else profiled, fitted and saved
    there. Returns ``(model, loaded_from_cache)``."""
    path = None
    if cache_dir is not None:
        path = os.path.join(os.fspath(cache_dir), "latency", profile_key(runner) + ".json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    model = LatencyModel.from_json(f.read())
            except (ValueError, KeyError, json.JSONDecodeError):
                model = None  # a stale or damaged file: profile again
            if model is not None:
                ratio = calibrate(model, runner)
                log.info("latency model loaded from %s; steps now take %.2fx its predictions", path, ratio)
                return model, True
    if not runner.wait_compiled():  # the profile times every shape
        raise RuntimeError(f"the start-up profile needs every executable; compilation failed: {runner.background_error!r}")
    model = LatencyModel().fit(profile_samples(runner, repeats))
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(model.to_json())
        os.replace(tmp, path)
    return model, False
