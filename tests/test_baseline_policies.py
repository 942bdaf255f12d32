"""The co-serving baselines on the simulated clock of test_hybrid_policy: FlexLLM's fixed budget
and temporal sharing do what they say, in the same scheduler as the hybrid policy."""

import pytest
from test_hybrid_policy import make_policy, simulate, training_seq, workload

from coserve_jax.sched.baseline_policies import FixedBudgetPolicy, TemporalPolicy
from coserve_jax.sched.policy import Load, SLOConfig
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig


def test_fixed_budget_every_step():
    slo = SLOConfig(ttft_ms=3000, tpot_ms=20)
    done, _, _, log = simulate(FixedBudgetPolicy(128, 48), workload(rate=4.0, n=30), slo)
    assert len(done) == 30
    assert all(plan.num_tokens <= 128 for _, plan in log)
    assert all(plan.num_finetune_tokens <= 48 for _, plan in log)
    assert max(plan.num_finetune_tokens for _, plan in log) == 48
    # backward work every step: a sequence's 8 layers run in the steps right after its forward
    # ends, one layer a step while inference runs (all that is left when it is idle)
    ends = [i for i, (_, p) in enumerate(log) if p.finetune and p.finetune[-1].start + p.finetune[-1].num_tokens == 400]
    assert len(ends) >= 2
    sliced = 0
    for i in ends[:-1]:
        layers = 0
        for _, p in log[i + 1:]:
            assert p.backward is not None
            assert p.backward.num_layers == 1 or not p.chunks
            sliced += p.backward.num_layers == 1
            layers += p.backward.num_layers
            if layers == 8:
                break
        assert layers == 8
    assert sliced >= 8
    with pytest.raises(ValueError):
        FixedBudgetPolicy(0, 8)


def test_temporal_sharing_alternates_whole_iterations():
    slo = SLOConfig(ttft_ms=3000, tpot_ms=20)
    policy = TemporalPolicy(interval_steps=20, max_tokens=512, sequences_per_iteration=2)
    done, _, stats, log = simulate(policy, workload(rate=4.0, n=40), slo)
    assert len(done) == 40  # nobody starves
    assert stats["seqs"] >= 4
    kinds = []
    for _, plan in log:
        ft = bool(plan.finetune) or plan.backward is not None
        assert not (ft and plan.chunks), "a temporal step is inference's or finetuning's, never both"
        kinds.append("F" if ft else "I")
    runs = "".join(kinds).replace("IF", "I|F").replace("FI", "F|I").split("|")
    ft_runs = [r for r in runs if r[0] == "F"]
    # one iteration = 2 sequences of 400 tokens: a forward in one 512-token step and the whole
    # backward (8 layers) in the next, each
    assert all(len(r) == 4 for r in ft_runs[:-1]), [len(r) for r in ft_runs]
    assert all(p.backward.num_layers == 8 for _, p in log if p.backward is not None)
    # between two iterations, interval_steps inference steps, unless inference went idle
    for r in runs[1:-1]:
        if r[0] == "I":
            assert len(r) <= 20
    assert policy.iterations >= 2


def test_temporal_trains_at_once_when_idle():
    policy = TemporalPolicy(interval_steps=100, max_tokens=512)
    sched = Scheduler(SchedulerConfig(32, 512, 2048, 4, 512), KVCacheManager(600, 16), policy)
    sched.add_training_sequence(training_seq(0))
    plan = sched.schedule(0.0)
    assert plan.num_finetune_tokens == 400
    assert policy.training
    budget = policy.decide(Load(now=0.0, decoding=[(10, 0.0, 1, 20.0)], backward_tokens=400))
    assert not budget.inference and budget.allow_backward  # an iteration is not interrupted


def test_hybrid_gets_more_finetuning_than_temporal_within_slo():
    slo = SLOConfig(ttft_ms=3000, tpot_ms=20)
    _, _, hybrid, _ = simulate(make_policy(slo), workload(rate=4.0, n=40), slo)
    _, _, temporal, _ = simulate(TemporalPolicy(20, 512), workload(rate=4.0, n=40), slo)
    # same simulated device, same requests: token-level co-serving trains faster per second
    assert hybrid["ft_tokens"] / hybrid["time"] > temporal["ft_tokens"] / temporal["time"]
