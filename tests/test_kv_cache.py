"""KV-cache page manager: unit cases and a hypothesis state machine over admit/grow/finish/preempt."""

import sys

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coserve_jax.sched.kv_cache import KVCacheManager, OutOfPagesError


def test_page_tables_cover_tokens_in_order():
    kv = KVCacheManager(num_pages=10, page_size=16)
    assert kv.capacity == 9 and kv.num_free_pages == 9
    table = kv.admit("a", 33)  # 3 pages
    assert len(table) == 3 and 0 not in table
    assert kv.grow("a", 48) == ()  # still 3 pages
    assert len(kv.grow("a", 49)) == 1
    assert kv.num_used_pages == 4
    assert kv.free("a") == 4 and kv.num_free_pages == 9
    kv.check_invariants()


def test_out_of_pages_allocates_nothing():
    kv = KVCacheManager(num_pages=5, page_size=4)
    kv.admit("a", 12)  # 3 of 4 pages
    with pytest.raises(OutOfPagesError):
        kv.admit("b", 8)
    assert "b" not in kv and kv.num_free_pages == 1
    with pytest.raises(OutOfPagesError):
        kv.grow("a", 20)
    assert kv.page_table("a") and kv.num_tokens("a") == 12 and kv.num_free_pages == 1
    assert kv.can_admit(4) and not kv.can_admit(4, reserve_pages=1)
    kv.check_invariants()


def test_append_page_takes_one_page_for_a_full_sequence():
    kv = KVCacheManager(num_pages=5, page_size=4)  # 4 allocatable
    kv.admit("a", 8)  # 2 full pages
    kv.admit("b", 3)
    assert kv.append_page("b") is None and kv.num_tokens("b") == 3  # its last page has room
    page = kv.append_page("a")  # the last free page
    assert kv.page_table("a")[-1] == page and kv.num_tokens("a") == 9 and kv.num_free_pages == 0
    kv.set_num_tokens(["b"], [4])
    assert kv.append_page("b") is None and kv.page_table("b") and kv.num_tokens("b") == 4  # none free: unchanged
    kv.check_invariants()


def test_bad_calls_are_rejected():
    kv = KVCacheManager(num_pages=4, page_size=4)
    kv.admit("a", 1)
    with pytest.raises(ValueError, match="already holds"):
        kv.admit("a", 1)
    with pytest.raises(ValueError, match="cannot grow"):
        kv.grow("a", 0)
    with pytest.raises(KeyError):
        kv.free("zzz")
    with pytest.raises(ValueError):
        KVCacheManager(num_pages=1, page_size=4)


def test_sched_package_does_not_import_jax():
    import subprocess

    code = "import coserve_jax.sched.kv_cache, sys; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class PagedCacheMachine(RuleBasedStateMachine):
    """Random admit / grow / finish / preempt-then-readmit; every page owned exactly once."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_pages=24, page_size=4)
        self.tokens: dict[int, int] = {}  # running sequences -> their token count (the model)
        self.preempted: dict[int, int] = {}  # preempted sequences -> tokens to recompute
        self.next_id = 0

    @rule(n=st.integers(0, 40))
    def admit(self, n):
        sid, self.next_id = self.next_id, self.next_id + 1
        fits = self.kv.can_admit(n)
        try:
            self.kv.admit(sid, n)
            assert fits
            self.tokens[sid] = n
        except OutOfPagesError:
            assert not fits and sid not in self.kv

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.integers(0, 9))
    def grow(self, data, extra):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        target = self.tokens[sid] + extra
        if self.kv.can_grow(sid, target):
            self.kv.grow(sid, target)
            self.tokens[sid] = target
        else:
            # Preemption by recomputation: free the newest other sequence, as a scheduler would.
            with pytest.raises(OutOfPagesError):
                self.kv.grow(sid, target)
            victims = [s for s in sorted(self.tokens) if s != sid]
            if victims:
                v = victims[-1]
                self.kv.free(v)
                self.preempted[v] = self.tokens.pop(v)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        assert self.kv.free(sid) == self.kv.pages_for(self.tokens.pop(sid))

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def readmit(self, data):
        sid = data.draw(st.sampled_from(sorted(self.preempted)))
        if self.kv.can_admit(self.preempted[sid]):
            self.kv.admit(sid, self.preempted[sid])
            self.tokens[sid] = self.preempted.pop(sid)

    @invariant()
    def every_page_owned_once(self):
        self.kv.check_invariants()
        assert set(self.kv.sequences) == set(self.tokens)
        used = sum(self.kv.pages_for(n) for n in self.tokens.values())
        assert self.kv.num_used_pages == used


TestPagedCache = PagedCacheMachine.TestCase
TestPagedCache.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_invariant_check_catches_double_ownership_and_leaks():
    kv = KVCacheManager(num_pages=8, page_size=4)
    kv.admit("a", 4)
    kv.admit("b", 4)
    kv._tables["a"].append(kv._tables["b"][0])  # corrupt: a page in two tables
    with pytest.raises(AssertionError, match="owned twice"):
        kv.check_invariants()
    kv = KVCacheManager(num_pages=8, page_size=4)
    kv.admit("a", 4)
    kv._free.pop()  # corrupt: a page that nobody owns
    with pytest.raises(AssertionError, match="leaked"):
        kv.check_invariants()
