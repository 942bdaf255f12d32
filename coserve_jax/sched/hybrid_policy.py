"""The hybrid token policy: how much work each step takes so inference meets its SLOs and
finetuning gets the rest.

FlexLLM's public code fixes a token budget offline (FlexLLM, NSDI 2026; its released
scheduler). Here every step is sized from the latency model (:mod:`coserve_jax.sched.latency_model`):

1. **Target step time.** A running request that has produced ``k`` tokens since its first at
   ``t_0`` keeps its mean TPOT within its SLO after the next token if the step ends before
   ``t_0 + k * tpot_slo``; the target is ``margin`` times the tightest such allowance over the
   decoding requests (at most ``slack_cap * tpot_slo``, default 2, so banked slack never buys
   one long stall; less for a request within ``slack_ramp_tokens`` of its ``max_tokens``, and
   one SLO for its last token, which no later step can make up for), less the host's time
   between steps that the latency model has learnt, divided by the 90th percentile of its
   recent measured / predicted ratios (so a plan at the target ends within it about 9 times in
   10, whatever the model's error). With nothing decoding the target is ``idle_step_ms``
   (finetuning takes the device, in steps short enough that a new request waits at most one of
   them).
2. **Inference first.** The step's token bucket is the largest whose predicted time (decode
   tokens, then prefill, then finetuning in the bucket's remaining slots) meets the target, but
   never smaller than what carries every decode token plus ``min_prefill_tokens`` of prefill (so
   queued requests always progress). A queued request whose TTFT deadline is near (less than
   ``ttft_urgent_fraction`` of its TTFT SLO left) makes the step take the whole token budget for
   inference and none for finetuning.
3. **Finetuning gets the rest**: the bucket's slots that inference leaves (which the device
   computes anyway as padding), and as many backward layers as the prediction allows within the
   target (the latency model prices each layer); when inference is idle, the whole remaining
   backward of a sequence in one step (a request that arrives meanwhile waits one step). When
   not even one layer fits, forward tokens are traded for it. At peak load the prediction of
   inference alone already misses the target, so finetuning gets nothing.

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

from typing import Sequence

from coserve_jax.sched.latency_model import LatencyModel, StepShape, head_tokens
from coserve_jax.sched.policy import Load, SLOConfig, StepBudget, bucket_for, fit_bucket


class HybridPolicy:
    """Sizes each step from a latency model and the requests' SLOs (see the module docstring).

    Args:
        latency: the step latency model (ms).
        slo: SLO defaults and knobs.
        buckets: the engine's compiled step shapes, ``(T, S)`` pairs.
        max_num_batched_tokens: the largest step.
        backward_buckets: the backward slice's compiled lengths (empty: the sequence length).
    """

    def __init__(
        self,
        latency: LatencyModel,
        slo: SLOConfig,
        buckets: Sequence[tuple[int, int]],
        max_num_batched_tokens: int,
        backward_buckets: Sequence[int] = (),
    ):
        self.backward_buckets = sorted(backward_buckets)
        self.latency = latency
        self.slo = slo
        self.buckets = sorted((int(t), int(s)) for t, s in buckets)
        self.token_buckets = sorted({t for t, _ in self.buckets if t <= max_num_batched_tokens})
        self.max_num_batched_tokens = max_num_batched_tokens

    def target_ms(self, load: Load) -> float:
        """The device time of a step that keeps every decoding request within its TPOT SLO: the
        tightest allowance times ``margin``, less the host's time between steps (a request's
        token waits for both)."""
        allow = []
        left = load.decoding_tokens_left or [None] * len(load.decoding)
        ramp = self.slo.slack_ramp_tokens
        for (_, first, k, slo), r in zip(load.decoding, left):
            if first is None or k < 1:
                allow.append(slo)
                continue
            banked = first + k * slo / 1000.0 - load.now
            cap = self.slo.slack_cap
            if ramp and r is not None:  # near its end a request cannot absorb an overshoot later
                cap = 1.0 + (cap - 1.0) * min(1.0, max(r - 1, 0) / ramp)
            allow.append(min(max(banked * 1000.0, 0.0), cap * slo))
        if not allow:
            return self.slo.idle_step_ms or self.slo.tpot_ms
        # planned against the model's recent error: a step predicted at the target then ends
        # within it about 9 times in 10
        return max(self.slo.margin * min(allow) - self.latency.host_ms, 0.0) / self.latency.error_quantile(0.9)

    def shape(self, load: Load, tokens: int, ft: int, backward: int) -> StepShape:
        """The step shape if ``tokens`` inference tokens, ``ft`` finetuning tokens and
        ``backward`` backward layers run."""
        n_dec = len(load.decoding)
        pre = max(tokens - n_dec, 0)
        attn = sum(kv for kv, *_ in load.decoding) + pre * (load.prefill_kv + (pre + 1) // 2)
        attn += ft * (load.finetune_kv + (ft + 1) // 2)
        seqs = load.num_seqs + (1 if ft else 0)
        return StepShape(
            *fit_bucket(self.buckets, tokens + ft, seqs),
            attn,
            (bucket_for(self.backward_buckets, load.backward_tokens) if self.backward_buckets else load.backward_tokens)
            if backward else 0,
            max(backward, 1),
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
            pred = self.latency.predict(self.shape(load, inf, 0, 0))
            return StepBudget(self.max_num_batched_tokens, 0, False, target, pred)
        best = None
        for t in reversed(self.token_buckets):
            inf = min(want_inf, t)
            if inf < floor:
                break
            ft = min(load.finetune_tokens, t - inf)
            pred = self.latency.predict(self.shape(load, inf, ft, 0))
            if pred <= target:
                best = (t, inf, ft, pred)
                break
        if best is None and not want_inf and load.finetune_tokens:
            # inference is idle and even the smallest finetuning step misses the target (a slow
            # device): nothing to protect, so finetune at full size rather than never
            t = self.token_buckets[-1]
            ft = min(load.finetune_tokens, t)
            best = (t, 0, ft, self.latency.predict(self.shape(load, 0, ft, 0)))
        if best is None:  # inference alone misses the target: the least it must do, no finetuning
            t = bucket_for(self.token_buckets, floor) if floor else self.token_buckets[0]
            pred = self.latency.predict(self.shape(load, min(want_inf, t), 0, 0))
            return StepBudget(t, 0, False, target, pred)
        t, inf, ft, pred = best
        layers = 0
        left = load.backward_layers or (1 if load.backward_tokens else 0)
        if left:
            if not (load.decoding or load.prefill_tokens):
                # inference is idle: the whole backward now (a request arriving meanwhile waits
                # for this one step; else a job would never train faster than one layer a step)
                layers = left
            else:
                layers = self.latency.backward_layers_within(self.shape(load, inf, ft, 1), target, left)
                if not layers and ft:  # trade forward tokens for a layer (a forward is useless without its backward)
                    for f in (ft // 2, ft // 4, 0):
                        if self.latency.predict(self.shape(load, inf, f, 1)) <= target:
                            ft, layers = f, 1
                            break
            if layers:
                pred = self.latency.predict(self.shape(load, inf, ft, layers))
        return StepBudget(t, ft, layers > 0, target, pred, backward_layers=layers)
