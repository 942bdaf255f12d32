"""Finetuning work in the scheduler (pure Python): leftover budget, pages, backward layers
(sliced while inference runs, whole when it is idle), inference priority, round robin between
jobs, packs of examples, several sequences in flight, the activation store's rows."""

import subprocess
import sys

import pytest

from coserve_jax.sched.finetune import StoreAllocator, TrainingPhase, TrainingSequence
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig


def make(num_pages=64, page_size=4, max_num_seqs=8, budget=16, max_model_len=200, watermark=0, ft=8, store=1 << 20):
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len, watermark, ft, store), KVCacheManager(num_pages, page_size))


def seq(job, n, row=0, layers=4, per_slice=2, index=0, segments=()):
    ids = list(range(1, n + 1))
    return TrainingSequence(job, row, row + 1, ids, ids[1:] + [0], [1.0] * (n - 1) + [0.0], 0.0, 0, layers, per_slice,
                            index=index, segments=segments, num_examples=max(1, len(segments)))


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
    s.add_request(req("a", 10, max_tokens=1000))  # decodes all along: the backward is sliced
    t = seq("job", 20)
    s.add_training_sequence(t)
    plan = run(s)  # prefill of 10 leaves 6 tokens
    [c] = plan.finetune
    assert c.num_tokens == 6 and c.start == 0 and plan.backward is None
    assert plan.num_tokens == 16 and plan.num_seqs == 2
    plan = run(s)  # one decode token leaves 15, capped at 8
    [c] = plan.finetune
    assert c.start == 6 and c.num_tokens == 8
    plan = run(s)
    assert plan.finetune[0].token_ids == list(range(15, 21)) and t.phase is TrainingPhase.BACKWARD
    assert t.kv_id(0) not in s.kv_cache, "a finished forward frees its pages"
    layers = []
    while t.phase is TrainingPhase.BACKWARD:
        plan = run(s)
        assert not plan.finetune
        layers.append((plan.backward.first_layer, plan.backward.num_layers))
    assert layers == [(2, 2), (0, 2)]
    assert s.pop_trained() == [t] and not s.training
    with pytest.raises(ValueError, match="in flight"):
        s.add_training_sequence(seq("j2", 5))
        s.add_training_sequence(seq("j2", 5))


def test_idle_inference_runs_the_whole_backward_in_one_step():
    s = make(budget=16, ft=16)
    t = seq("job", 12, layers=6, per_slice=1)
    s.add_training_sequence(t)
    plan = run(s)
    assert plan.finetune[0].num_tokens == 12 and plan.backward is None
    plan = run(s)
    assert (plan.backward.first_layer, plan.backward.num_layers) == (0, 6)
    assert t.phase is TrainingPhase.DONE and s.pop_trained() == [t]
    # a request arriving mid-backward: the rest is sliced again
    t2 = seq("job", 12, layers=6, per_slice=2, index=1)
    s.add_training_sequence(t2)
    run(s)
    s.add_request(req("a", 4, max_tokens=1000))
    plan = run(s)
    assert plan.chunks and (plan.backward.first_layer, plan.backward.num_layers) == (4, 2)


def test_a_pack_runs_one_example_per_sequence_slot_and_frees_each_examples_pages():
    s = make(budget=16, ft=16, page_size=4)
    t = seq("job", 20, segments=(5, 9, 6))
    s.add_training_sequence(t)
    plan = run(s)  # 16 tokens: example 0 whole, example 1 whole, 2 tokens of example 2
    rows = t.store_start
    assert [(c.offset, c.start, c.num_tokens) for c in plan.finetune] == [(0, 0, 5), (5, 0, 9), (14, 0, 2)]
    assert plan.num_seqs == 3
    assert [c.store_row - c.offset for c in plan.finetune] == [rows] * 3
    assert t.kv_id(0) not in s.kv_cache and t.kv_id(1) not in s.kv_cache and t.kv_id(2) in s.kv_cache
    assert len(plan.finetune[1].page_table) == 3  # 9 tokens in pages of 4
    plan = run(s)
    [c] = plan.finetune
    assert (c.offset, c.start, c.num_tokens) == (16, 2, 4) and t.phase is TrainingPhase.BACKWARD
    plan = run(s)
    assert plan.backward.segments == (5, 9, 6) and plan.backward.store_row == rows
    assert s.kv_cache.num_used_pages == 0
    [done] = s.pop_trained()
    assert done is t and s.num_trained == 3 and s.store.num_free == s.store.capacity


def test_several_sequences_in_flight_share_a_step_and_wait_for_store_rows():
    s = make(budget=16, ft=16, store=20)
    a, b, c = seq("job", 10, index=0), seq("job", 10, index=1), seq("job", 10, index=2)
    for t in (a, b, c):
        s.add_training_sequence(t)
    plan = run(s)  # a and 6 tokens of b; c has no store rows yet (20 rows: a and b)
    assert [(f.index, f.num_tokens) for f in plan.finetune] == [(0, 10), (1, 6)]
    assert c.store_start is None and s.store.num_free == 0
    plan = run(s)  # b's rest beside a's whole backward (inference is idle)
    assert [(f.index, f.num_tokens) for f in plan.finetune] == [(1, 4)]
    assert plan.backward.index == 0 and plan.backward.num_layers == 4
    assert s.pop_trained() == [a]
    plan = run(s)  # a's rows came back: c starts beside b's backward
    assert [(f.index, f.num_tokens) for f in plan.finetune] == [(2, 10)] and plan.backward.index == 1
    assert c.store_start == 0  # first fit: the rows a gave back


def test_store_allocator_first_fit_and_merge():
    st = StoreAllocator(10)
    assert st.allocate(4) == 0 and st.allocate(4) == 4 and st.allocate(4) is None
    st.free(0, 4)
    assert st.allocate(3) == 0 and st.allocate(2) == 8 and st.num_free == 1
    st.free(4, 4)
    st.free(0, 3)
    with pytest.raises(ValueError, match="already free"):
        st.free(1, 2)
    assert st.allocate(8) == 0 and st.num_free == 0
    st.free(0, 8)
    st.allocate_at(2, 3)
    assert st.allocate(3) == 5 and st.allocate(2) == 0
    with pytest.raises(ValueError, match="not free"):
        st.allocate_at(0, 1)


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
    assert not plan.finetune  # 6 pages needed + 6 kept free > 10
    s = make(max_num_seqs=2, budget=32)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    s.add_training_sequence(seq("job", 10))
    assert not run(s).finetune  # both sequence slots taken by inference


def test_round_robin_between_jobs():
    s = make(budget=9, ft=8)
    s.add_request(req("r", 1, max_tokens=1000))  # one inference token a step: the backward is sliced
    a, b = seq("a", 16, row=0), seq("b", 16, row=1)
    s.add_training_sequence(a)
    s.add_training_sequence(b)
    plans = [run(s) for _ in range(7)]
    assert [p.finetune[0].job_id for p in plans[:4]] == ["a", "b", "a", "b"]
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


def test_target_fraction_follows_the_forward():
    ids = list(range(1, 11))
    t = TrainingSequence("j", 0, 1, ids, ids[1:] + [0], [0.0] * 4 + [1.0] * 5 + [0.0], 0.0, 0, 4, 2)
    assert t.target_fraction == 0.5
    t.num_computed = 4
    assert t.target_fraction == 5 / 6
    t.num_computed = 10
    assert t.target_fraction == 0.0
