"""The hybrid token policy: how much work each step takes so inference meets its SLOs and
finetuning gets the rest (issue 5, part 2).

FlexLLM's public code fixes a token budget offline (../shared/docs/REFERENCE.md section 1). Here
every step is sized from the latency model (:mod:`coserve_jax.sched.latency_model`):

1. **Target step time.** A running request that has produced ``k`` tokens since its first at
   ``t_0`` keeps its mean TPOT within its SLO after the next token if the step ends before
   ``t_0 + k * tpot_slo``; the target is ``margin`` times the tightest such allowance over the
   decoding requests (at most ``2 * tpot_slo``, so banked slack never buys one long stall). With
   nothing decoding the target is ``idle_step_ms`` (finetuning takes the device, in steps short
   enough that a new request waits at most one of them).
2. **Inference first.** The step's token bucket is the largest whose predicted time (decode
   tokens, then prefill, then finetuning in the bucket's remaining slots) meets the target, but
   never smaller than what carries every decode token plus ``min_prefill_tokens`` of prefill (so
   queued requests always progress). A queued request whose TTFT deadline is near (less than
   ``ttft_urgent_fraction`` of its TTFT SLO left) makes the step take the whole token budget for
   inference and none for finetuning.
3. **Finetuning gets the rest**: the bucket's slots that inference leaves (which the device
   computes anyway as padding), and a backward slice if the prediction with it still meets the
   target, or whenever inference is idle (a slice longer than the idle target must still run). At peak load the prediction of inference alone already misses the target, so
   finetuning gets nothing.

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from coserve_jax.sched.latency_model import LatencyModel, StepShape


@dataclasses.dataclass(frozen=True)
class SLOConfig:
    """Default SLOs and the policy's knobs.

    Attributes:
        ttft_ms: default time-to-first-token SLO (ms); a request may carry its own.
        tpot_ms: default time-per-output-token SLO (ms, the mean over a request's tokens after
            the first); a request may carry its own.
        margin: plan steps to this fraction of the allowance (room for model error).
        idle_step_ms: target step time while nothing decodes (default ``tpot_ms``).
        min_prefill_tokens: prefill tokens a step always makes room for when requests wait.
        ttft_urgent_fraction: a queued request with less than this fraction of its TTFT SLO left
            takes the whole step budget.
    """

    ttft_ms: float = 5000.0
    tpot_ms: float = 45.0
    margin: float = 0.9
    idle_step_ms: float | None = None
    min_prefill_tokens: int = 16
    ttft_urgent_fraction: float = 0.25

    def __post_init__(self):
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError("SLOs must be > 0 ms")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """The policy's decision for one step.

    Attributes:
        max_tokens: token budget of the step (inference and finetuning forward).
        max_finetune_tokens: most finetuning forward tokens.
        allow_backward: whether a backward slice may run.
        target_ms: the step time aimed at; predicted_ms: the prediction of the chosen plan.
        inference: whether inference tokens may run (``False``: the step is finetuning's alone,
            as in temporal sharing).
    """

    max_tokens: int
    max_finetune_tokens: int
    allow_backward: bool
    target_ms: float = 0.0
    predicted_ms: float = 0.0
    inference: bool = True


@dataclasses.dataclass(frozen=True)
class Load:
    """What the step could carry, as the scheduler sees it before planning.

    Attributes:
        now: the clock (seconds).
        decoding: per running request with one token to compute: ``(kv_len, first_token_time or
            None, tokens generated, tpot_slo_ms)``.
        prefill_tokens: prompt tokens waiting to be computed (running and queued requests).
        prefill_kv: KV length the next prefill chunk attends to (its start).
        queued_deadlines: per request without a first token: seconds left to its TTFT deadline,
            and its TTFT SLO in seconds.
        num_seqs: sequences the inference part would take.
        finetune_tokens: finetuning forward tokens available (0: none in forward).
        finetune_kv: KV length the finetuning chunk starts at.
        backward_tokens: the length bucket of the backward slice available (0: none).
    """

    now: float
    decoding: Sequence[tuple[int, float | None, int, float]]
    prefill_tokens: int = 0
    prefill_kv: int = 0
    queued_deadlines: Sequence[tuple[float, float]] = ()
    num_seqs: int = 0
    finetune_tokens: int = 0
    finetune_kv: int = 0
    backward_tokens: int = 0


class StepPolicy(Protocol):
    """What the scheduler asks each step (:meth:`Scheduler.schedule
    <coserve_jax.sched.scheduler.Scheduler.schedule>` with the clock): the budget of the next
    step, given its :class:`Load`. A policy may keep state across calls (one call per step)."""

    def decide(self, load: Load) -> StepBudget: ...


def bucket_for(buckets: Sequence[int], n: int) -> int:
    """The smallest bucket holding ``n`` (the largest if none does)."""
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


class HybridPolicy:
    """Sizes each step from a latency model and the requests' SLOs (see the module docstring).

    Args:
        latency: the step latency model (ms).
        slo: SLO defaults and knobs.
        token_buckets, seq_buckets: the engine's compiled step shapes (ascending).
        max_num_batched_tokens: the largest step.
        backward_buckets: the backward slice's compiled lengths (empty: the sequence length).
    """

    def __init__(
        self,
        latency: LatencyModel,
        slo: SLOConfig,
        token_buckets: Sequence[int],
        seq_buckets: Sequence[int],
        max_num_batched_tokens: int,
        backward_buckets: Sequence[int] = (),
    ):
        self.backward_buckets = sorted(backward_buckets)
        self.latency = latency
        self.slo = slo
        self.token_buckets = sorted(b for b in token_buckets if b <= max_num_batched_tokens)
        self.seq_buckets = sorted(seq_buckets)
        self.max_num_batched_tokens = max_num_batched_tokens

    def target_ms(self, load: Load) -> float:
        """The step time that keeps every decoding request within its TPOT SLO."""
        allow = []
        for _, first, k, slo in load.decoding:
            if first is None or k < 1:
                allow.append(slo)
                continue
            banked = first + k * slo / 1000.0 - load.now
            allow.append(min(max(banked * 1000.0, 0.0), 2 * slo))
        if not allow:
            return self.slo.idle_step_ms or self.slo.tpot_ms
        return self.slo.margin * min(allow)

    def shape(self, load: Load, tokens: int, ft: int, backward: bool) -> StepShape:
        """The step shape if ``tokens`` inference tokens and ``ft`` finetuning tokens run."""
        n_dec = len(load.decoding)
        pre = max(tokens - n_dec, 0)
        attn = sum(kv for kv, *_ in load.decoding) + pre * (load.prefill_kv + (pre + 1) // 2)
        attn += ft * (load.finetune_kv + (ft + 1) // 2)
        seqs = load.num_seqs + (1 if ft else 0)
        return StepShape(
            bucket_for(self.token_buckets, tokens + ft) if tokens + ft else 0,
            bucket_for(self.seq_buckets, seqs) if tokens + ft else 0,
            attn,
            (bucket_for(self.backward_buckets, load.backward_tokens) if self.backward_buckets else load.backward_tokens)
            if backward else 0,
        )

    def decide(self, load: Load) -> StepBudget:
        """The budget of the next step."""
        target = self.target_ms(load)
        n_dec = len(load.decoding)
        want_inf = n_dec + load.prefill_tokens
        floor = min(want_inf, n_dec + self.slo.min_prefill_tokens)
        urgent = any(left < self.slo.ttft_urgent_fraction * slo for left, slo in load.queued_deadlines)
        if urgent:
            inf = min(want_inf, self.max_num_batched_tokens)
            pred = self.latency.predict(self.shape(load, inf, 0, False))
            return StepBudget(self.max_num_batched_tokens, 0, False, target, pred)
        best = None
        for t in reversed(self.token_buckets):
            inf = min(want_inf, t)
            if inf < floor:
                break
            ft = min(load.finetune_tokens, t - inf)
            pred = self.latency.predict(self.shape(load, inf, ft, False))
            if pred <= target:
                best = (t, inf, ft, pred)
                break
        if best is None:  # inference alone misses the target: the least it must do, no finetuning
            t = bucket_for(self.token_buckets, floor) if floor else self.token_buckets[0]
            pred = self.latency.predict(self.shape(load, min(want_inf, t), 0, False))
            return StepBudget(t, 0, False, target, pred)
        t, inf, ft, pred = best
        backward = False
        if load.backward_tokens:
            with_bwd = self.latency.predict(self.shape(load, inf, ft, True))
            if with_bwd <= target or not (load.decoding or load.prefill_tokens):
                # fits, or inference is idle: a slice longer than the idle target delays only a
                # request that arrives during it, by one slice (else the job would never train)
                backward, pred = True, with_bwd
            elif ft:  # trade forward tokens for the backward slice (a sequence's forward is useless without it)
                for f in (ft // 2, ft // 4, 0):
                    p = self.latency.predict(self.shape(load, inf, f, True))
                    if p <= target:
                        ft, backward, pred = f, True, p
                        break
        return StepBudget(t, ft, backward, target, pred)


def step_shape(plan, token_buckets: Sequence[int], seq_buckets: Sequence[int], backward_buckets: Sequence[int] = ()) -> StepShape:
    """The :class:`StepShape` a planned step (:class:`~coserve_jax.sched.scheduler.SchedulerOutput`)
    runs at, for the latency model: the buckets it pads to, its attention work (each chunk's
    queries times the mean KV length they attend to) and its backward slice's length bucket."""
    attn = sum(c.num_tokens * (c.start + (c.num_tokens + 1) // 2) for c in plan.chunks)
    if plan.finetune is not None:
        f = plan.finetune
        attn += f.num_tokens * (f.start + (f.num_tokens + 1) // 2)
    n = plan.num_tokens
    bwd = 0
    if plan.backward is not None:
        length = plan.backward.sequence.num_tokens
        bwd = bucket_for(backward_buckets, length) if backward_buckets else length
    return StepShape(
        bucket_for(sorted(token_buckets), n) if n else 0, bucket_for(sorted(seq_buckets), plan.num_seqs) if n else 0, attn, bwd
    )
