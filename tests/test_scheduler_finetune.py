"""Finetuning work in the scheduler (pure Python): leftover budget, pages, backward slices,
inference priority, round robin between jobs."""

import subprocess
import sys

import pytest

from coserve_jax.sched.finetune import TrainingPhase, TrainingSequence
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig


def make(num_pages=64, page_size=4, max_num_seqs=8, budget=16, max_model_len=200, watermark=0, ft=8):
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len, watermark, ft), KVCacheManager(num_pages, page_size))


def seq(job, n, row=0, layers=4, per_slice=2):
    ids = list(range(1, n + 1))
    return TrainingSequence(job, row, row + 1, ids, ids[1:] + [0], [1.0] * (n - 1) + [0.0], 0.0, 0, layers, per_slice)


def req(rid, n, max_tokens=100):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset({0}))


def run(s):
    plan = s.schedule()
    s.update(plan, [7 if c.sample else None for c in plan.chunks])
    return plan


def test_sched_finetune_imports_no_jax():
    code = "import sys, coserve_jax.sched.finetune; print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_forward_takes_leftover_budget_then_backward_slices_top_down():
    s = make(budget=16, ft=8)
    s.add_request(req("a", 10))
    t = seq("job", 20)
    s.add_training_sequence(t)
    plan = run(s)  # prefill of 10 leaves 6 tokens
    assert plan.finetune.num_tokens == 6 and plan.finetune.start == 0 and plan.backward is None
    assert plan.num_tokens == 16 and plan.num_seqs == 2
    plan = run(s)  # one decode token leaves 15, capped at 8
    assert plan.finetune.start == 6 and plan.finetune.num_tokens == 8
    plan = run(s)
    assert plan.finetune.token_ids == list(range(15, 21)) and t.phase is TrainingPhase.BACKWARD
    assert ("finetune", "job") not in s.kv_cache, "a finished forward frees its pages"
    layers = []
    while t.phase is TrainingPhase.BACKWARD:
        plan = run(s)
        assert plan.finetune is None
        layers.append(plan.backward.first_layer)
    assert layers == [2, 0]
    assert s.pop_trained() == [t] and not s.training
    with pytest.raises(ValueError, match="in flight"):
        s.add_training_sequence(seq("j2", 5))
        s.add_training_sequence(seq("j2", 5))


def test_inference_preempts_training_before_requests():
    # 12 pages of 4 tokens; a request growing into the training sequence's pages takes them back.
    s = make(num_pages=13, page_size=4, budget=32, ft=32, max_model_len=48)
    s.add_request(req("a", 20, max_tokens=30))
    t = seq("job", 40)
    s.add_training_sequence(t)
    run(s)
    assert t.num_computed == 12  # 20 prompt tokens + 12 training tokens = 8 pages
    for _ in range(40):
        run(s)
        if not s.running:
            break
    assert s.num_preemptions == 0, "no request was preempted"
    assert t.num_restarts >= 1


def test_watermark_and_sequence_slots_hold_back_finetuning():
    s = make(num_pages=11, page_size=4, budget=32, ft=32, watermark=6, max_model_len=40)
    t = seq("job", 24)
    s.add_training_sequence(t)
    plan = run(s)
    assert plan.finetune is None  # 6 pages needed + 6 kept free > 10
    s = make(max_num_seqs=2, budget=32)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    s.add_training_sequence(seq("job", 10))
    assert run(s).finetune is None  # both sequence slots taken by inference


def test_round_robin_between_jobs():
    s = make(budget=8, ft=8)
    a, b = seq("a", 16, row=0), seq("b", 16, row=1)
    s.add_training_sequence(a)
    s.add_training_sequence(b)
    plans = [run(s) for _ in range(7)]
    assert [p.finetune.job_id for p in plans[:4]] == ["a", "b", "a", "b"]
    # a's forward ends in step 3, b's in step 4: their backward slices alternate from step 4
    assert [p.backward and p.backward.job_id for p in plans] == [None, None, None, "a", "b", "a", "b"]


def test_remove_training_frees_pages():
    s = make()
    s.add_training_sequence(seq("job", 30))
    run(s)
    assert s.kv_cache.num_used_pages > 0
    s.remove_training("job")
    assert s.kv_cache.num_used_pages == 0 and not s.training


def test_scheduler_output_is_plain_data_that_pickles():
    """A plan holds ids, tokens, pages and sampling rows, never a live Request or TrainingSequence,
    and survives pickling unchanged (what multi-host serving broadcasts)."""
    import dataclasses
    import pickle

    from coserve_jax.sched.outputs import SchedulerOutput, StepResult

    s = make(budget=16, ft=8)
    s.add_training_sequence(seq("job", 10))
    s.add_request(Request("r", list(range(1, 6)), SamplingParams(max_tokens=4, temperature=0.7, top_k=5, seed=3, logprobs=2), seed=3))
    plans = []
    for _ in range(8):
        plan = s.schedule()
        plans.append(plan)
        s.update(plan, StepResult([7 if c.sample else None for c in plan.chunks]))
    assert any(p.finetune for p in plans) and any(p.backward for p in plans) and any(p.chunks for p in plans)
    first = next(p for p in plans if p.chunks).chunks[0]
    assert (first.sampling.temperature, first.sampling.top_k, first.sampling.seed, first.sampling.num_logprobs) == (0.7, 5, 3, 2)

    def leaves(x):
        if dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                yield from leaves(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from leaves(y)
        elif isinstance(x, dict):
            for k, y in x.items():
                yield k
                yield from leaves(y)
        else:
            yield x

    for plan in plans:
        assert all(isinstance(v, (int, float, str, bool, type(None))) for v in leaves(plan)), plan
        again = pickle.loads(pickle.dumps(plan))
        assert isinstance(again, SchedulerOutput) and again == plan
