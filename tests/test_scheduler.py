"""The inference scheduler (pure Python): budgets, decode-first order, FCFS, preemption, stops."""

import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import FinishReason, Request, RequestStatus
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig


def make(num_pages=64, page_size=4, max_num_seqs=8, budget=16, max_model_len=64, watermark=0):
    kv = KVCacheManager(num_pages, page_size)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len, watermark), kv)


def req(rid, n, max_tokens=100, priority=0, **kw):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw), eos_token_ids=frozenset({0}),
                   priority=priority)


def run_step(s, token=7):
    plan = s.schedule()
    finished = s.update(plan, [token if c.sample else None for c in plan.chunks])
    return plan, finished


def test_sched_imports_no_jax():
    """coserve_jax.sched is host-side Python: importing it loads neither JAX nor NumPy."""
    code = "import sys, coserve_jax.sched.scheduler; print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_chunked_prefill_then_decode_first():
    s = make(budget=16)
    s.add_request(req("a", 40))
    plan, _ = run_step(s)
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [("a", 0, 16, False)]
    s.add_request(req("b", 5))
    plan, _ = run_step(s)
    # a continues its prefill (16), nothing left for b
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 16)]
    plan, _ = run_step(s)
    # a finishes its prompt (8 tokens, samples) and b is admitted with the rest of the budget
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [("a", 32, 8, True), ("b", 0, 5, True)]
    s.add_request(req("c", 30))
    plan, _ = run_step(s)
    # decodes first (a and b, one token each), then c's first chunk with the remaining 14
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 1), ("c", 14)]
    assert plan.num_tokens == 16


def test_max_num_seqs_and_fcfs():
    s = make(max_num_seqs=2, budget=100)
    for r in ("a", "b", "c"):
        s.add_request(req(r, 3))
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    assert s.num_waiting == 1
    # A big request at the head blocks a small one behind it (no overtaking).
    s2 = make(num_pages=9, page_size=4, budget=100, max_model_len=32)  # 8 allocatable pages
    s2.add_request(req("small0", 20))  # 5 pages
    run_step(s2)
    s2.add_request(req("big", 20))  # needs 5, 3 free (after small0 grows: 2)
    s2.add_request(req("small1", 2))
    plan, _ = run_step(s2)
    assert [c.request_id for c in plan.chunks] == ["small0"]


def test_preemption_frees_pages_and_recomputes():
    # 6 allocatable pages of 4 tokens: a and b each hold 3 pages (12 tokens) after prefill.
    s = make(num_pages=7, page_size=4, budget=64, max_model_len=24)
    s.add_request(req("a", 12))
    s.add_request(req("b", 11))
    plan, _ = run_step(s)
    assert s.kv_cache.num_free_pages == 0
    # Both decode; a needs a 4th page for token 13 -> b (admitted last) is preempted.
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a"]
    assert plan.preempted[0] == "b"
    b = s.requests["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.output_token_ids == [7]  # keeps its generated token, which will be recomputed
    s.kv_cache.check_invariants()
    s.finish("a")
    plan, _ = run_step(s)
    # b re-enters with prompt + its generated token recomputed, and samples its second token.
    (c,) = plan.chunks
    assert (c.request_id, c.start, c.token_ids, c.sample) == ("b", 0, list(range(1, 12)) + [7], True)
    assert s.num_preemptions == 1


def test_priority_orders_the_queue_and_outranked_requests_give_up_their_seats():
    """vLLM's priority scheduling: a lower value is served first, first come first served within
    a priority; a waiting request that outranks running ones takes the seat of the lowest-ranked
    (latest admitted among equals), which is preempted by recomputation and waits at the front
    of its priority class. Equal priorities never preempt."""
    s = make(max_num_seqs=2, budget=100)
    s.add_request(req("rl-a", 5, priority=1))
    s.add_request(req("rl-b", 5, priority=1))
    run_step(s)
    s.add_request(req("chat-1", 3))
    plan, _ = run_step(s)
    assert plan.preempted == ["rl-b"]
    assert [c.request_id for c in plan.chunks] == ["rl-a", "chat-1"]  # admitted in the same step
    assert s.requests["rl-b"].output_token_ids == [7] and s.requests["rl-b"].num_computed_tokens == 0
    s.add_request(req("rl-c", 5, priority=1))
    s.add_request(req("chat-2", 3))  # queued ahead of rl-b and rl-c
    assert [r.request_id for r in s.waiting] == ["chat-2", "rl-b", "rl-c"]
    plan, _ = run_step(s)
    assert plan.preempted == ["rl-a"]
    assert [r.request_id for r in s.waiting] == ["rl-a", "rl-b", "rl-c"]
    s.add_request(req("chat-3", 3))  # both seats are held at its priority: it waits
    plan, _ = run_step(s)
    assert not plan.preempted and {c.request_id for c in plan.chunks} == {"chat-1", "chat-2"}
    s.finish("chat-1")
    s.finish("chat-2")
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["chat-3", "rl-a"]
    assert plan.chunks[1].token_ids == [1, 2, 3, 4, 5, 7, 7]  # its prompt and both tokens it made, recomputed
    # Pages too: a request that outranks the one holding the cache gets its pages.
    s2 = make(num_pages=9, page_size=4, budget=100, max_model_len=32)  # 8 allocatable pages
    s2.add_request(req("rl", 28, priority=1))  # 7 pages
    run_step(s2)
    s2.add_request(req("chat", 10))  # needs 3
    plan, _ = run_step(s2)
    assert plan.preempted == ["rl"] and [c.request_id for c in plan.chunks] == ["chat"]
    s2.kv_cache.check_invariants()


def test_stop_conditions():
    s = make()
    s.add_request(req("eos", 3))
    s.add_request(req("ignore", 3, ignore_eos=True, max_tokens=2))
    s.add_request(req("min", 3, min_tokens=2, max_tokens=5))
    s.add_request(req("stop_id", 3, stop_token_ids=(9,)))
    plan = s.schedule()
    tokens = {"eos": 0, "ignore": 0, "min": 0, "stop_id": 9}
    finished = s.update(plan, [tokens[c.request_id] for c in plan.chunks])
    assert {r.request_id: r.finish_reason for r in finished} == {"eos": FinishReason.STOP, "stop_id": FinishReason.STOP}
    plan = s.schedule()
    finished = s.update(plan, [0 for _ in plan.chunks])
    assert {r.request_id: r.finish_reason for r in finished} == {"ignore": FinishReason.LENGTH, "min": FinishReason.STOP}
    # context length
    s = make(max_model_len=8, page_size=4)
    s.add_request(req("ctx", 6))
    while s.has_unfinished:
        _, fin = run_step(s)
    assert fin[0].finish_reason is FinishReason.LENGTH and fin[0].num_tokens == 8
    s.kv_cache.check_invariants()
    assert s.kv_cache.num_used_pages == 0


def test_bad_requests_rejected():
    s = make(max_model_len=16)
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("e", 0))
    with pytest.raises(ValueError, match="context length"):
        s.add_request(req("long", 16))
    s.add_request(req("x", 3))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("x", 3))
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(4, 16, 64), KVCacheManager(8, 4))  # 7 pages < 16 needed


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps, aborts and stop-string finishes under a tight page pool."""

    def __init__(self):
        super().__init__()
        self.s = make(num_pages=17, page_size=4, max_num_seqs=4, budget=12, max_model_len=40, watermark=1)
        self.n = 0
        self.finished = set()

    @rule(n=st.integers(1, 30), max_tokens=st.integers(1, 12), priority=st.integers(0, 2))
    def arrive(self, n, max_tokens, priority):
        self.s.add_request(req(self.n, n, max_tokens=max_tokens, priority=priority))
        self.n += 1

    @rule(token=st.integers(0, 5))
    def step(self, token):
        s = self.s
        plan = s.schedule()
        assert plan.num_tokens <= s.config.max_num_batched_tokens
        assert plan.num_seqs <= s.config.max_num_seqs
        ids = [c.request_id for c in plan.chunks]
        assert len(ids) == len(set(ids))
        for c in plan.chunks:
            assert s.kv_cache.num_tokens(c.request_id) >= c.start + c.num_tokens
            assert c.token_ids == s.requests[c.request_id].token_ids(c.start, c.start + c.num_tokens)
        for rid in plan.preempted:
            assert rid not in s.kv_cache
        fin = s.update(plan, [token if c.sample else None for c in plan.chunks])
        for r in fin:
            assert r.request_id not in s.kv_cache
            assert 1 <= len(r.output_token_ids) <= r.params.max_tokens
            self.finished.add(r.request_id)

    @rule(data=st.data())
    def abort_or_finish(self, data):
        live = list(self.s.requests)
        if live:
            rid = data.draw(st.sampled_from(live))
            if data.draw(st.booleans()):
                self.s.abort(rid)
            else:
                self.s.finish(rid)
            self.finished.add(rid)

    @invariant()
    def pages_consistent(self):
        s = self.s
        s.kv_cache.check_invariants()
        assert set(s.kv_cache.sequences) == {r.request_id for r in s.running}
        for r in s.running:
            assert s.kv_cache.num_tokens(r.request_id) >= r.num_computed_tokens
        assert len(s.running) <= s.config.max_num_seqs
        assert not (self.finished & set(s.requests))
        waiting = [r.priority for r in s.waiting]
        assert waiting == sorted(waiting)  # the queue is in priority order
        assert s._num_ranked == sum(r.priority != 0 for r in s.requests.values())

    def teardown(self):
        # Whatever is left drains: nothing starves and no page leaks.
        for _ in range(2000):
            if not self.s.has_unfinished:
                break
            run_step(self.s, token=3)
        assert not self.s.has_unfinished
        assert self.s.kv_cache.num_used_pages == 0


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_prefix_caching_shares_within_a_step_and_keys_by_adapter_version():
    kv = KVCacheManager(64, 16, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(8, 256, 512), kv)
    s.adapter_versions = [0, 5]
    prompt = list(range(1, 51))  # 3 full pages before the page of the last token
    s.add_request(Request("a", prompt, SamplingParams(max_tokens=2)))
    s.add_request(Request("b", list(prompt), SamplingParams(max_tokens=2)))  # same step: shares a's pages
    s.add_request(Request("p", list(prompt), SamplingParams(max_tokens=2, repetition_penalty=1.2)))  # never matches
    s.add_request(Request("x", list(prompt), SamplingParams(max_tokens=2), adapter_index=1))  # another adapter
    plan = s.schedule()
    starts = {c.request_id: c.start for c in plan.prefills}
    assert starts == {"a": 0, "b": 48, "p": 0, "x": 0}
    tables = {c.request_id: c.new_pages for c in plan.prefills}
    assert tables["b"][:3] == tables["a"][:3] and set(tables["b"][3:]).isdisjoint(tables["a"])
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (200, 48)
    assert s.num_prefill_tokens == 50 + 2 + 50 + 50
    s.update(plan, [7 if c.sample else None for c in plan.chunks])
    s.add_request(Request("x2", list(prompt), SamplingParams(max_tokens=2), adapter_index=1))
    s.adapter_versions[1] = 6  # the adapter's weights changed: x's pages are not x2's
    s.add_request(Request("a2", prompt + [9] * 30, SamplingParams(max_tokens=2)))  # a longer prompt: a's 3 pages
    plan = s.schedule()
    assert {c.request_id: c.start for c in plan.prefills} == {"x2": 0, "a2": 48}
    kv.check_invariants()
