"""The hybrid SLO policy on a simulated clock with a latency model that is right about the device:
SLOs held, finetuning gets the slack, nothing starves; a fixed budget (control) misses the SLO."""

import random

import pytest

from coserve_jax.sched.finetune import TrainingSequence
from coserve_jax.sched.hybrid_policy import HybridPolicy
from coserve_jax.sched.policy import Load, SLOConfig, step_shape
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.latency_model import LatencyModel
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig

TOKENS = [16, 32, 64, 128, 256, 512]
SEQS = [4, 8, 16, 32]
BUCKETS = sorted({(t, s) for t in TOKENS for s in SEQS if s <= t} | {(t, min(t, 32)) for t in TOKENS})  # the engine's grid
BWD = [128, 256, 512]
# ms: 2 fixed, 40 per 1024 token slots, 2 per 64 sequence slots, 4 per 1e6 attention work,
# 30 per 1024 backward tokens, 10 per 1024^2 (a 512-token layer: 17.5 ms), 0 for the loss head.
DEVICE = LatencyModel([2.0, 40.0, 2.0, 4.0, 30.0, 10.0, 0.0])


def shape_of(plan):
    return step_shape(plan, BUCKETS, BWD)


def training_seq(k, n=400):
    ids = [(7 * j + k) % 100 + 1 for j in range(n)]
    return TrainingSequence("job", 0, 1, ids, ids[1:] + [0], [1.0] * (n - 1) + [0.0], 0.0, 0, 8, 1, index=k)


def simulate(policy, arrivals, slo, finetune=True, max_ft=512):
    """Run the scheduler on a simulated clock; returns (requests, finetune stats, step log)."""
    sched = Scheduler(SchedulerConfig(32, 512, 2048, 4, max_ft if finetune else 0), KVCacheManager(600, 16), policy)
    now, pending, done, log = 0.0, sorted(arrivals, key=lambda a: a[0]), [], []
    k, ft_tokens, slices, seqs_done = 0, 0, 0, 0
    if finetune:
        sched.add_training_sequence(training_seq(k))
    token_times = {}
    while pending or sched.has_unfinished:
        while pending and pending[0][0] <= now:
            t, req = pending.pop(0)
            req.arrival_time = t
            sched.add_request(req)
        if not sched.has_unfinished and pending and not sched.training:
            now = pending[0][0]
            continue
        plan = sched.schedule(now)
        if plan.is_empty:
            now = pending[0][0] if pending else now + 0.001
            continue
        dt = DEVICE.predict(shape_of(plan)) / 1000.0  # the model is right about the device
        now += dt
        log.append((dt, plan))
        ft_tokens += plan.num_finetune_tokens
        slices += 1 if plan.backward else 0
        finished = sched.update(plan, [1 if c.sample else None for c in plan.chunks], now)
        for c in plan.chunks:
            if c.sample:
                token_times.setdefault(c.request_id, []).append(now)
        done.extend(finished)
        for s in sched.pop_trained():
            seqs_done += 1
            k += 1
            sched.add_training_sequence(training_seq(k))
        if now > 600:
            raise AssertionError("simulation did not finish")
    stats = dict(ft_tokens=ft_tokens, slices=slices, seqs=seqs_done, time=now)
    return done, token_times, stats, log


def workload(rate, n=60, seed=0, tpot=None):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        r = Request(f"r{i}", [rng.randint(1, 99) for _ in range(rng.randint(50, 400))], SamplingParams(max_tokens=rng.randint(20, 80), ignore_eos=True))
        r.tpot_slo_ms = tpot
        out.append((t, r))
    return out


def slo_report(done, times, slo):
    ttft, tpot = [], []
    for r in done:
        ts = times[r.request_id]
        ttft.append((ts[0] - r.arrival_time) * 1000)
        if len(ts) > 1:
            tpot.append((ts[-1] - ts[0]) * 1000 / (len(ts) - 1))
    ok = sum(1 for r, a in zip(done, ttft) if a <= slo.ttft_ms)
    return ttft, tpot, ok


def make_policy(slo):
    return HybridPolicy(DEVICE, slo, BUCKETS, 512, BWD)


def test_slos_held_and_finetuning_gets_the_slack():
    slo = SLOConfig(ttft_ms=3000, tpot_ms=20)
    arrivals = workload(rate=4.0)
    done, times, stats, log = simulate(make_policy(slo), arrivals, slo)
    assert len(done) == 60
    ttft, tpot, ok = slo_report(done, times, slo)
    assert max(tpot) <= slo.tpot_ms, max(tpot)
    assert max(ttft) <= slo.ttft_ms, max(ttft)
    assert stats["ft_tokens"] > 5000 and stats["slices"] > 20 and stats["seqs"] >= 3
    # Control: the same load with a fixed budget (all leftover tokens to finetuning, a slice every
    # step, FlexLLM's public-code policy) breaks the TPOT SLO.
    done_f, times_f, stats_f, _ = simulate(None, workload(rate=4.0), slo)
    _, tpot_f, _ = slo_report(done_f, times_f, slo)
    assert max(tpot_f) > slo.tpot_ms


def test_finetuning_takes_the_device_when_inference_is_idle():
    slo = SLOConfig(ttft_ms=3000, tpot_ms=30, idle_step_ms=40)
    policy = make_policy(slo)
    sched = Scheduler(SchedulerConfig(32, 512, 2048, 4, 512), KVCacheManager(600, 16), policy)
    sched.add_training_sequence(training_seq(0))
    plan = sched.schedule(0.0)
    assert plan.num_finetune_tokens >= 256  # the largest bucket under 40 * 0.9 ms
    assert DEVICE.predict(shape_of(plan)) <= 40 * 0.9


def test_finetuning_runs_when_idle_even_if_every_step_misses_the_target():
    """A slow device (every finetuning step is predicted above the idle target): with no
    inference to protect, the forward still runs, at the largest bucket, and then the backward.
    (SmolLM2 on a 2-core CPU under the hybrid policy once stalled here: millions of empty steps.)"""
    slo = SLOConfig(ttft_ms=3000, tpot_ms=1)
    sched = Scheduler(SchedulerConfig(32, 512, 2048, 4, 512), KVCacheManager(600, 16), make_policy(slo))
    seq = training_seq(0)
    sched.add_training_sequence(seq)
    plan = sched.schedule(0.0)
    assert plan.num_finetune_tokens == 400 or plan.train is not None  # the whole forward in one step
    assert sched.last_budget.predicted_ms > 1
    busy = Load(now=0.0, decoding=[(100, None, 0, 1.0)], num_seqs=1, finetune_tokens=400)
    assert make_policy(slo).decide(busy).max_finetune_tokens == 0  # with a request decoding it must fit


def test_finetuning_backs_off_to_zero_at_peak_load():
    slo = SLOConfig(ttft_ms=3000, tpot_ms=10)
    sched = Scheduler(SchedulerConfig(32, 512, 2048, 4, 512), KVCacheManager(4000, 16), make_policy(slo))
    for i in range(32):  # 32 long decodes: decode alone is predicted above the target
        r = Request(f"r{i}", [1] * 1500, SamplingParams(max_tokens=100, ignore_eos=True))
        r.output_token_ids.append(1)
        r.first_token_time = 0.0
        sched.add_request(r)
    while sched.waiting or any(r.num_tokens - r.num_computed_tokens > 1 for r in sched.running):  # prefill them
        p = sched.schedule()
        sched.update(p, [1 if c.sample else None for c in p.chunks], 0.0)
    sched.add_training_sequence(training_seq(0))
    plan = sched.schedule(1.0)  # a second after their first tokens: every request is behind its TPOT SLO
    assert sched.last_budget.target_ms == 0.0
    assert not plan.finetune and plan.backward is None and len(plan.chunks) == 32
    assert sched.last_budget.max_finetune_tokens == 0


def test_queued_requests_do_not_starve_behind_finetuning():
    slo = SLOConfig(ttft_ms=500, tpot_ms=30)
    arrivals = workload(rate=1.0, n=8, seed=3)
    done, times, stats, _ = simulate(make_policy(slo), arrivals, slo)
    ttft, _, ok = slo_report(done, times, slo)
    assert len(done) == 8 and max(ttft) <= slo.ttft_ms
    assert stats["ft_tokens"] > 0


def test_backward_slice_runs_when_idle_even_above_the_idle_target():
    # a 512-token slice takes 17.5 ms on DEVICE: above a 10 ms idle target, but nothing else runs
    slo = SLOConfig(ttft_ms=3000, tpot_ms=10)
    load = Load(now=0.0, decoding=[], backward_tokens=512)
    budget = make_policy(slo).decide(load)
    assert budget.allow_backward and budget.predicted_ms > 10
    busy = Load(now=0.0, decoding=[(100, None, 0, 10.0)], num_seqs=1, backward_tokens=512)
    assert not make_policy(slo).decide(busy).allow_backward  # with a request decoding it must fit


def test_backward_takes_as_many_layers_as_the_target_allows():
    """While requests decode, the backward gets the most layers whose predicted step time meets
    the target (the latency model prices each layer); idle, the whole remaining backward."""
    slo = SLOConfig(ttft_ms=3000, tpot_ms=40)
    policy = make_policy(slo)
    decoding = [(100, None, 0, 40.0)] * 4
    busy = Load(now=0.0, decoding=decoding, num_seqs=4, backward_tokens=256, backward_layers=8)
    budget = policy.decide(busy)
    target = budget.target_ms
    assert 1 <= budget.backward_layers < 8 and budget.predicted_ms <= target

    def with_layers(k):
        return DEVICE.predict(policy.shape(busy, 4, budget.max_finetune_tokens, k))

    assert with_layers(budget.backward_layers) <= target < with_layers(budget.backward_layers + 1)
    idle = Load(now=0.0, decoding=[], backward_tokens=256, backward_layers=5)
    assert policy.decide(idle).backward_layers == 5
    tight = Load(now=0.0, decoding=[(100, None, 0, 5.0)] * 4, num_seqs=4, backward_tokens=512, backward_layers=8)
    assert policy.decide(tight).backward_layers == 0


def test_slack_cap_bounds_what_banked_slack_buys():
    """A request far ahead of its TPOT SLO (banked slack) lets a step take up to ``slack_cap``
    SLOs (default 2), never more; ``slack_cap=1`` spends none."""
    ahead = Load(now=1.0, decoding=[(100, 0.0, 50, 40.0)], num_seqs=1)  # 50 tokens in 1 s: 1 s banked
    for cap in (2.0, 1.0, 1.5):
        policy = make_policy(SLOConfig(ttft_ms=3000, tpot_ms=40, slack_cap=cap, margin=1.0))
        assert abs(policy.target_ms(ahead) - cap * 40.0) < 1e-9
    behind = Load(now=10.0, decoding=[(100, 9.99, 1, 40.0)], num_seqs=1)  # 30 ms of its 40 ms left
    assert abs(make_policy(SLOConfig(ttft_ms=3000, tpot_ms=40, margin=1.0)).target_ms(behind) - 30.0) < 1e-6
    with pytest.raises(ValueError, match="slack_cap"):
        SLOConfig(slack_cap=0.5)
    with pytest.raises(ValueError, match="slack_ramp_tokens"):
        SLOConfig(slack_ramp_tokens=-1)


def test_slack_ramp_spends_less_banked_slack_near_a_requests_end():
    """With ``slack_ramp_tokens`` R, a request with ``r`` tokens left may take ``1 + (cap - 1) *
    min(1, (r - 1) / R)`` SLOs of banked slack: its last token none."""
    policy = make_policy(SLOConfig(ttft_ms=3000, tpot_ms=40, margin=1.0, slack_ramp_tokens=8))
    for r, want in ((1, 40.0), (5, 60.0), (9, 80.0), (100, 80.0)):
        ahead = Load(now=1.0, decoding=[(100, 0.0, 50, 40.0)], num_seqs=1, decoding_tokens_left=[r])
        assert abs(policy.target_ms(ahead) - want) < 1e-9, r
    unknown = Load(now=1.0, decoding=[(100, 0.0, 50, 40.0)], num_seqs=1)  # tokens left not given: the cap
    assert abs(policy.target_ms(unknown) - 80.0) < 1e-9


def test_scheduler_reports_tokens_left_of_decoding_requests():
    sched = Scheduler(SchedulerConfig(8, 256, 128, 4, 0), KVCacheManager(64, 16), None)
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=10)))
    sched.add_request(Request("b", list(range(1, 121)), SamplingParams(max_tokens=100)))  # the context binds
    now = 0.0
    for _ in range(3):
        plan = sched.schedule(now)
        now += 0.01
        sched.update(plan, [1 if c.sample else None for c in plan.chunks], now)
    load = sched.load(now)
    left = dict(zip([kv for kv, *_ in load.decoding], load.decoding_tokens_left))
    assert len(load.decoding) == 2
    assert sorted(left.values()) == sorted([10 - 3, 128 - (120 + 3)])
