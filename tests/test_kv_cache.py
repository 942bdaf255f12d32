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


class PrefixCacheMachine(RuleBasedStateMachine):
    """Prefix caching: sequences built from a few shared prefixes, admitted with the longest
    cached chain, named as they fill pages, grown, freed, under adapter versions that change.
    The model tracks what each page physically holds (the K/V of which tokens, computed with
    which adapter version): a sequence's pages must always hold its own tokens' K/V (a shared
    page is never handed to another sequence or written while referenced, a match is never
    stale), besides every page being owned once (check_invariants)."""

    PAGE = 4
    PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 16]

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_pages=18, page_size=self.PAGE, enable_prefix_caching=True)
        self.seqs: dict[int, tuple[list[int], tuple[int, int]]] = {}  # running: (tokens, adapter key)
        self.content: dict[int, tuple] = {}  # page -> what it holds: (adapter key, tokens 0..end of the page)
        self.version = 0
        self.next_id = 0

    def holds(self, tokens, key, i):
        """What page ``i`` of a sequence holds: the K/V of its tokens up to the page's end, all
        computed with ``key`` (a page's K/V depends on every token before it)."""
        return key, tuple(tokens[: (i + 1) * self.PAGE])

    def names(self, tokens, key, count):
        from coserve_jax.sched.kv_cache import page_hash

        out, parent = [], None
        for i in range(count):
            parent = page_hash(parent, tokens[i * self.PAGE:(i + 1) * self.PAGE], key)
            out.append(parent)
        return out

    def write(self, sid, first):
        """The sequence computes its pages from ``first`` on: it may write only pages it alone
        holds and nobody can match."""
        tokens, key = self.seqs[sid]
        table = self.kv.page_table(sid)
        for i in range(first, len(table)):
            p = table[i]
            assert self.kv._refs[p] == 1 and p not in self.kv._name_of, f"page {p} is written while shared or named"
            self.content[p] = self.holds(tokens, key, i)
        full = len(tokens) // self.PAGE
        self.kv.register(sid, first, self.names(tokens, key, full)[first:full])

    @rule(k=st.integers(0, 2), cut=st.integers(1, 16), tail=st.lists(st.integers(20, 23), max_size=6), adapter=st.integers(0, 1))
    def admit(self, k, cut, tail, adapter):
        tokens = self.PREFIXES[k][:cut] + tail
        key = (adapter, self.version if adapter else 0)
        sid, self.next_id = self.next_id, self.next_id + 1
        cached = self.kv.match(self.names(tokens, key, (len(tokens) - 1) // self.PAGE))
        if not self.kv.can_admit(len(tokens), cached=cached):
            with pytest.raises(OutOfPagesError):
                self.kv.admit(sid, len(tokens), cached)
            return
        for i, p in enumerate(cached):  # the match holds exactly this sequence's K/V
            assert self.content[p] == self.holds(tokens, key, i), "a stale or foreign page was matched"
        table = self.kv.admit(sid, len(tokens), cached)
        assert list(table[: len(cached)]) == cached
        self.seqs[sid] = (tokens, key)
        self.write(sid, len(cached))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), extra=st.lists(st.integers(20, 23), min_size=1, max_size=6))
    def grow(self, data, extra):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, key = self.seqs[sid]
        n = len(tokens) + len(extra)
        if not self.kv.can_grow(sid, n):
            return
        first = len(tokens) // self.PAGE  # its last page if partial (its own), else the first new one
        self.kv.grow(sid, n)
        tokens.extend(extra)
        self.write(sid, first)  # the last partial page (its own) and the new ones

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.kv.free(sid)
        del self.seqs[sid]

    @rule()
    def optimizer_step(self):  # the adapter's weights change: a new version
        self.version += 1

    @invariant()
    def pages_hold_what_their_sequences_need(self):
        self.kv.check_invariants()
        for sid, (tokens, key) in self.seqs.items():
            for i, p in enumerate(self.kv.page_table(sid)):
                assert self.content[p] == self.holds(tokens, key, i), f"page {p} of {sid} was overwritten"
        for p in self.kv._name_of:  # a named page holds the K/V its name says
            assert p in self.content


TestPrefixCache = PrefixCacheMachine.TestCase
TestPrefixCache.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_prefix_cache_shares_evicts_and_forgets():
    from coserve_jax.sched.kv_cache import page_hash

    kv = KVCacheManager(num_pages=7, page_size=2, enable_prefix_caching=True)  # 6 allocatable
    names = [page_hash(None, [1, 2])]
    names.append(page_hash(names[0], [3, 4]))
    kv.admit("a", 5)
    kv.register("a", 0, names)
    assert kv.num_cached_pages == 2 and kv.match(names) == list(kv.page_table("a")[:2])
    assert kv.match([page_hash(None, [1, 2], (1, 7))]) == []  # another adapter (version): no match
    kv.admit("b", 5, kv.match(names))  # shares 2 pages, takes 1
    assert kv.num_used_pages == 4
    with pytest.raises(ValueError, match="leave a token"):
        kv.admit("c", 4, kv.match(names))
    kv.free("a")
    kv.free("b")
    assert kv.num_free_pages == 6 and kv.num_cached_pages == 2  # freed, still matchable
    kv.admit("d", 12)  # takes every page: the cached ones are evicted, last page first
    assert kv.num_cached_pages == 0 and kv.match(names) == []
    kv.check_invariants()
    kv.free("d")
    off = KVCacheManager(num_pages=7, page_size=2)
    off.admit("a", 4)
    off.register("a", 0, names)
    assert off.match(names) == [] and off.num_cached_pages == 0
    kv.count_query(10, 4)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 4)
