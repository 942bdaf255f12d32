"""The scheduling policy in use, the latency model it predicts with, and the measured steps that
refine it (FlexLLM's hybrid token scheduler needs a per-step latency prediction; the model is
fitted by a start-up profile, :mod:`coserve_jax.engine.profile`, and updated online).

The policy itself is host-side and JAX-free (:mod:`coserve_jax.sched.policy`); this module is
the engine's side of it: choosing a policy between steps, fitting the model on first use, and
timing steps on the device (which waits for each measured step).
"""

from __future__ import annotations

import collections
import time

from coserve_jax.engine.config import EngineConfig
from coserve_jax.engine.outputs import StepRecord
from coserve_jax.engine.profile import fitted_latency_model
from coserve_jax.sched.latency_model import LatencyModel
from coserve_jax.sched.outputs import SchedulerOutput
from coserve_jax.sched.policy import POLICY_OPTIONS, make_policy, step_shape
from coserve_jax.sched.scheduler import Scheduler


class PolicyRuntime:
    """Chooses the scheduler's step policy and measures steps for it.

    Args:
        config: the engine's :class:`EngineConfig` (limits, bucket grids, SLOs, cache dir).
        scheduler: the scheduler whose ``policy`` this sets.
        runner: the :class:`~coserve_jax.engine.model_runner.ModelRunner` (profiled for the
            latency model, waited on to time a step).
        publish: ``publish(kind, *args)``: tells multi-host followers to profile too.
    Attributes:
        name: the policy in use (``"fixed"``, ``"hybrid"``, ``"fixed_budget"``, ``"temporal"``).
        latency_model: the fitted :class:`~coserve_jax.sched.latency_model.LatencyModel`
            (``None`` until a policy or ``measure_steps`` needs it).
        latency_model_cached: the model came from the compilation cache's profile (no profiling).
        last_step_ms: the last measured step's device time (ms).
        step_log: one :class:`StepRecord` per measured step, oldest first (the last million).
    """

    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner, publish=lambda kind, *args: None):
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.publish = publish
        self.name = "fixed"
        self.options: dict = {}
        self.latency_model: LatencyModel | None = None
        self.latency_model_cached = False
        self.last_step_ms: float | None = None
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=1_000_000)
        self._last_end: float | None = None  # perf_counter() when the last measured step ended

    @property
    def measures(self) -> bool:
        """Whether every step is timed (``measure_steps``, or the hybrid policy)."""
        return self.config.measure_steps or self.name == "hybrid"

    def ensure_latency_model(self) -> None:
        """Fit the latency model (start-up profile, or its cached result) if not yet fitted."""
        if self.latency_model is None:
            self.publish("ensure_latency_model")
            self.latency_model, self.latency_model_cached = fitted_latency_model(self.runner, self.config.compilation_cache_dir)

    def set(self, name: str, **options) -> None:
        """Choose the policy (see :meth:`Engine.set_scheduling_policy
        <coserve_jax.engine.engine.Engine.set_scheduling_policy>`).

        Raises:
            ValueError: an unknown policy or option, or a bad option value.
        """
        if name not in POLICY_OPTIONS:
            raise ValueError(f"scheduling_policy must be one of {sorted(POLICY_OPTIONS)}, got {name!r}")
        if name == "hybrid" and not options:
            self.ensure_latency_model()
        cfg, ec = self.scheduler.config, self.config
        self.scheduler.policy = make_policy(
            name, options, max_num_batched_tokens=cfg.max_num_batched_tokens, max_finetune_tokens=cfg.max_finetune_tokens,
            latency_model=self.latency_model, slo=ec.slo, buckets=ec.bucket_shapes,
            backward_buckets=ec.backward_buckets,
        )
        self.name, self.options = name, dict(options)

    def measure(self, plan: SchedulerOutput, out, t_dispatch: float) -> None:
        """Time a dispatched step on the device (``t_dispatch``: ``time.perf_counter()`` before
        dispatch), log it, and refine the latency model with it. This waits for the step, so it
        also waits out any overlap."""
        self.runner.wait(out)
        end = time.perf_counter()
        self.last_step_ms = (end - t_dispatch) * 1000.0
        if self._last_end is not None:
            host = (t_dispatch - self._last_end) * 1000.0
            if host < 4 * max(self.last_step_ms, 1.0):  # (longer: the engine was idle, not busy)
                self.latency_model.update_host(host)
        self._last_end = end
        ec = self.config
        shape = step_shape(plan, ec.bucket_shapes, ec.backward_buckets)
        predicted = self.latency_model.predict(shape)
        if plan.train is None:  # (a train step runs only when inference is idle: nothing to learn for planning)
            self.latency_model.update(shape, self.last_step_ms)
        decode = plan.num_decode_tokens
        self.step_log.append(StepRecord(
            end_time=time.monotonic(), bucket_tokens=shape.num_tokens, bucket_seqs=shape.num_seqs,
            prefill_tokens=plan.num_inference_tokens - decode, decode_tokens=decode,
            finetune_tokens=plan.num_finetune_tokens,
            backward_tokens=shape.backward_tokens, backward_layers=shape.backward_layers if shape.backward_tokens else 0,
            attention_work=shape.attention_work, predicted_ms=predicted, measured_ms=self.last_step_ms,
        ))
