"""The step-policy interface: what the scheduler asks before every step, and how a policy is chosen.

A policy sees the step's :class:`Load` (plain data the scheduler builds) and answers a
:class:`StepBudget`. The concrete policies are :class:`~coserve_jax.sched.hybrid_policy.HybridPolicy`
(SLO-driven, from the latency model) and the baselines of :mod:`coserve_jax.sched.baseline_policies`;
:func:`make_policy` builds one by name (the names ``Engine(scheduling_policy=...)`` takes).

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from coserve_jax.sched.latency_model import LatencyModel, StepShape, head_tokens

POLICY_NAMES = ("fixed", "hybrid", "fixed_budget", "temporal")
"""Names :func:`make_policy` takes."""

POLICY_OPTIONS = {
    "fixed": (),
    "hybrid": (),
    "fixed_budget": ("max_tokens", "max_finetune_tokens"),
    "temporal": ("interval_steps", "sequences_per_iteration"),
}
"""The options each policy takes."""


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
        slack_cap: the most one step may take, in TPOT SLOs, when a decoding request has banked
            slack (earlier tokens faster than its SLO): 1 spends no banked slack.
        slack_ramp_tokens: a request with ``r`` tokens left may spend ``1 + (slack_cap - 1) *
            min(1, (r - 1) / slack_ramp_tokens)`` SLOs: less of its banked slack near its end,
            one SLO for its last token (an overshoot there has no later step to absorb it); 0
            turns this off.
    """

    ttft_ms: float = 5000.0
    tpot_ms: float = 45.0
    margin: float = 0.9
    idle_step_ms: float | None = None
    min_prefill_tokens: int = 16
    ttft_urgent_fraction: float = 0.25
    slack_cap: float = 2.0
    slack_ramp_tokens: int = 8

    def __post_init__(self):
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError("SLOs must be > 0 ms")
        if self.slack_cap < 1:
            raise ValueError(f"slack_cap must be >= 1, got {self.slack_cap}")
        if self.slack_ramp_tokens < 0:
            raise ValueError(f"slack_ramp_tokens must be >= 0, got {self.slack_ramp_tokens}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """The policy's decision for one step.

    Attributes:
        max_tokens: token budget of the step (inference and finetuning forward).
        max_finetune_tokens: most finetuning forward tokens.
        allow_backward: whether backward work may run.
        backward_layers: how many backward layers may run (0: the scheduler's default, its
            sequence's ``layers_per_slice`` while inference runs and every remaining layer when
            inference is idle).
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
    backward_layers: int = 0


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
        finetune_kv: KV length the first finetuning chunk starts at.
        backward_tokens: the length of the training sequence whose backward is next (0: none).
        backward_layers: its backward layers left.
        finetune_target_fraction: the share of the next finetuning forward tokens that carry a
            loss weight (the loss head runs on those).
        trained_examples: examples whose training sequence is done, since the scheduler started
            (a counter; a pack counts each of its examples).
        decoding_tokens_left: per entry of ``decoding``, the most tokens it may still generate
            (``max_tokens`` or the context, less what it has; empty: not known).
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
    backward_layers: int = 0
    finetune_target_fraction: float = 1.0
    trained_examples: int = 0
    decoding_tokens_left: Sequence[int] = ()


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


def fit_bucket(buckets: Sequence[tuple[int, int]], num_tokens: int, num_seqs: int) -> tuple[int, int]:
    """The compiled step shape ``(T, S)`` a step of ``num_tokens`` tokens and ``num_seqs``
    sequences pads to: the fewest token slots, then the fewest sequence slots, that hold it (the
    engine's choice); the largest shape if none does. ``(0, 0)`` for an empty step.

    Args:
        buckets: the compiled ``(T, S)`` pairs, in any order.
    """
    if not num_tokens:
        return 0, 0
    ordered = sorted(buckets)
    for t, s in ordered:
        if t >= num_tokens and s >= num_seqs:
            return t, s
    return ordered[-1]


def step_shape(plan, buckets: Sequence[tuple[int, int]], backward_buckets: Sequence[int] = ()) -> StepShape:
    """The :class:`StepShape` a planned step (:class:`~coserve_jax.sched.outputs.SchedulerOutput`)
    runs at, for the latency model: the compiled ``(T, S)`` shape it pads to (of ``buckets``,
    :func:`fit_bucket`), its attention work (each chunk's queries times the mean KV length they
    attend to) and its backward's length bucket and layers."""
    d = plan.decodes
    attn = sum(d.starts) + len(d.starts)  # a decode's query attends to start + 1 keys
    attn += sum(c.num_tokens * (c.start + (c.num_tokens + 1) // 2) for c in plan.prefills)
    weighted = 0
    for f in plan.finetune:
        attn += f.num_tokens * (f.start + (f.num_tokens + 1) // 2)
        weighted += sum(1 for w in f.weights if w)
    n = plan.num_tokens
    bwd = layers = 0
    if plan.backward is not None:
        length = plan.backward.num_tokens
        bwd = bucket_for(backward_buckets, length) if backward_buckets else length
        layers = plan.backward.num_layers
    elif plan.train is not None:  # (priced as a whole backward of its length)
        length = plan.train.num_tokens
        bwd = bucket_for(backward_buckets, length) if backward_buckets else length
        layers = plan.train.num_layers
    return StepShape(*fit_bucket(buckets, n, plan.num_seqs), attn, bwd, layers, head_tokens(weighted))


def make_policy(
    name: str,
    options: dict | None = None,
    *,
    max_num_batched_tokens: int,
    max_finetune_tokens: int,
    latency_model: LatencyModel | None = None,
    slo: SLOConfig | None = None,
    buckets: Sequence[tuple[int, int]] = (),
    backward_buckets: Sequence[int] = (),
) -> StepPolicy | None:
    """The policy called ``name`` with its ``options`` (``None`` for ``"fixed"``: the
    scheduler's own budgets every step).

    Args:
        name: ``"fixed"``, ``"hybrid"`` (:class:`~coserve_jax.sched.hybrid_policy.HybridPolicy`;
            needs ``latency_model``), ``"fixed_budget"``
            (:class:`~coserve_jax.sched.baseline_policies.FixedBudgetPolicy`; options
            ``max_tokens``, ``max_finetune_tokens``, default the engine's) or ``"temporal"``
            (:class:`~coserve_jax.sched.baseline_policies.TemporalPolicy`; options
            ``interval_steps`` (default 64), ``sequences_per_iteration`` (default 1)).
        options: the policy's options, as above.
        max_num_batched_tokens, max_finetune_tokens: the engine's step budgets (tokens).
        latency_model, slo, buckets, backward_buckets: what ``"hybrid"`` plans with (the
            compiled ``(T, S)`` step shapes and backward lengths).
    Raises:
        ValueError: an unknown policy or option, a bad option value, or ``"hybrid"`` without a
            latency model.
    """
    from coserve_jax.sched.baseline_policies import FixedBudgetPolicy, TemporalPolicy
    from coserve_jax.sched.hybrid_policy import HybridPolicy

    options = dict(options or {})
    if name not in POLICY_OPTIONS:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICY_OPTIONS)}, got {name!r}")
    unknown = sorted(set(options) - set(POLICY_OPTIONS[name]))
    if unknown:
        raise ValueError(f"unknown options {unknown} for scheduling policy {name!r} (takes {list(POLICY_OPTIONS[name])})")
    if name == "fixed":
        return None
    if name == "fixed_budget":
        return FixedBudgetPolicy(
            min(options.get("max_tokens", max_num_batched_tokens), max_num_batched_tokens),
            options.get("max_finetune_tokens", max_finetune_tokens),
        )
    if name == "temporal":
        return TemporalPolicy(options.get("interval_steps", 64), max_num_batched_tokens, options.get("sequences_per_iteration", 1))
    if latency_model is None:
        raise ValueError("the 'hybrid' policy needs a latency model")
    return HybridPolicy(latency_model, slo or SLOConfig(), buckets, max_num_batched_tokens, backward_buckets)
