"""Paged KV-cache bookkeeping on the host: pages, page tables, admission, release.

The device holds the K/V of all sequences in fixed-size pages (PagedAttention, Kwon et al.,
SOSP 2023, section 4.2); this module decides which page holds which tokens. A sequence of ``n``
tokens owns ``ceil(n / page_size)`` pages listed in its page table, in token order: token ``i``
lives in page ``table[i // page_size]`` at offset ``i % page_size``.

Pure Python over plain data (no JAX), so the scheduler can plan a step without touching the
device. Preemption is by recomputation (vLLM's default): the scheduler calls :meth:`free` on the
victim, and later re-admits it with all its tokens, which the next prefill recomputes.

The first ``num_reserved`` pages are never handed out: page 0 is the scratch page that padding
slots of a step write their K/V to, so the kernel needs no branch for them.

Automatic prefix caching (vLLM's ``enable_prefix_caching``; SGLang's RadixAttention does the same
with a tree): a full page is named by a hash chain, :func:`page_hash` of (its parent page's hash,
its token ids, the key of the adapter that computed it: adapter index and that slot's version).
:meth:`KVCacheManager.match` finds the longest chain of a new sequence's full pages already in the
cache, :meth:`KVCacheManager.admit` shares them (a reference count per page), and
:meth:`KVCacheManager.register` names the pages a sequence has filled. A page whose count drops to
0 stays cached on an LRU list and is evicted (its name forgotten) only when a fresh page is needed
and no never-cached page is free. The adapter's version changes with every write to its slot (a
load, an unload, an optimizer step), so K/V computed with older weights is never matched again.
A shared page is only read: a sequence writes only into pages past its matched prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Hashable, Iterable, Sequence


class OutOfPagesError(RuntimeError):
    """Not enough free pages for an allocation; nothing was allocated."""


def page_hash(parent: bytes | None, token_ids: Sequence[int], adapter_key: tuple[int, int] = (0, 0)) -> bytes:
    """The name of a full page: SHA-256 over its parent page's name (``None`` for the first
    page), its ``page_size`` token ids and ``adapter_key`` (adapter index, slot version; ``(0, 0)``
    for the base model). 32 bytes; equal names mean the same K/V up to floating-point
    reassociation (vLLM's ``hash_block_tokens`` with ``sha256``)."""
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", adapter_key).tobytes())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheManager:
    """Page allocator and per-sequence page tables.

    Args:
        num_pages: pages in the device KV cache (reserved ones included).
        page_size: tokens per page.
        num_reserved: leading pages never allocated (default 1: the scratch page 0).
        enable_prefix_caching: keep named full pages for reuse (see the module docstring);
            off: :meth:`match` finds nothing and :meth:`register` names nothing.
    Attributes:
        prefix_cache_queries, prefix_cache_hits: tokens looked up by :meth:`match` and tokens
            found (vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits`` counters).
    Raises:
        ValueError: sizes that leave no allocatable page.
    """

    def __init__(self, num_pages: int, page_size: int, num_reserved: int = 1, enable_prefix_caching: bool = False):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages <= num_reserved:
            raise ValueError(f"num_pages={num_pages} leaves no page after {num_reserved} reserved")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_reserved = num_reserved
        self.enable_prefix_caching = enable_prefix_caching
        # A stack of unnamed free pages: pop() hands out the lowest free page first, freed pages
        # are reused first.
        self._free: list[int] = list(range(num_pages - 1, num_reserved - 1, -1))
        self._evictable: dict[int, None] = {}  # named pages nobody holds, least recently freed first
        self._refs: dict[int, int] = {}  # page -> sequences holding it (held pages only)
        self._name_of: dict[int, bytes] = {}  # named page -> its name
        self._page_of: dict[bytes, int] = {}  # name -> page
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Allocatable pages (``num_pages - num_reserved``)."""
        return self.num_pages - self.num_reserved

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: unnamed free pages plus cached pages nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        """Pages held by at least one sequence."""
        return self.capacity - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        """Named pages (held or evictable): what the prefix cache can match."""
        return len(self._page_of)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)

    def page_table(self, seq_id: Hashable) -> tuple[int, ...]:
        """The pages of ``seq_id`` in token order. Raises ``KeyError`` for an unknown sequence."""
        return tuple(self._tables[seq_id])

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens the sequence's pages are sized for."""
        return self._tokens[seq_id]

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def match(self, names: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of ``names`` (a sequence's full pages' names,
        :func:`page_hash`, in order). Changes nothing: pass the pages to :meth:`admit` to share
        them."""
        pages = []
        if self.enable_prefix_caching:
            for name in names:
                page = self._page_of.get(name)
                if page is None:
                    break
                pages.append(page)
        return pages

    def count_query(self, num_tokens: int, hit_tokens: int) -> None:
        """Count an admitted sequence's lookup: ``num_tokens`` queried, ``hit_tokens`` found
        (:attr:`prefix_cache_queries`, :attr:`prefix_cache_hits`; nothing with caching off)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += hit_tokens

    def can_admit(self, num_tokens: int, reserve_pages: int = 0, cached: Sequence[int] = ()) -> bool:
        """Whether a new sequence of ``num_tokens`` (its first ``len(cached)`` pages shared from
        the cache) fits and still leaves ``reserve_pages`` free (a watermark that keeps room for
        running sequences to grow)."""
        taken = sum(1 for p in cached if p in self._evictable)  # (a shared page nobody held leaves the free count)
        return self.pages_for(num_tokens) - len(cached) + reserve_pages + taken <= self.num_free_pages

    def can_grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether ``seq_id`` can be extended to ``num_tokens`` tokens."""
        return self.pages_for(num_tokens) - len(self._tables[seq_id]) <= self.num_free_pages

    def _take(self, n: int) -> list[int]:
        """``n`` fresh pages: unnamed free ones first, then the least recently freed cached ones
        (evicted: their names are forgotten). The caller checked that ``n`` are free."""
        out = []
        free, refs = self._free, self._refs
        for _ in range(n):
            if free:
                page = free.pop()
            else:
                page = next(iter(self._evictable))
                del self._evictable[page]
                del self._page_of[self._name_of.pop(page)]
            refs[page] = 1
            out.append(page)
        return out

    # ---- updates -------------------------------------------------------------------------
    def admit(self, seq_id: Hashable, num_tokens: int, cached: Sequence[int] = ()) -> tuple[int, ...]:
        """Give a new sequence pages for ``num_tokens`` tokens: first the shared ``cached``
        pages (from :meth:`match`: they hold its first ``len(cached) * page_size`` tokens'
        K/V), then fresh ones.

        Returns:
            Its page table.
        Raises:
            ValueError: ``seq_id`` already holds pages, ``num_tokens < 0``, or ``cached`` pages
                that are not cached or do not leave room for at least one token to compute.
            OutOfPagesError: not enough free pages (nothing allocated).
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds pages")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if cached and (len(cached) * self.page_size >= num_tokens or any(p not in self._name_of for p in cached)):
            raise ValueError(f"sequence {seq_id!r}: shared pages must be cached and leave a token to compute")
        if not self.can_admit(num_tokens, cached=cached):
            raise OutOfPagesError(f"sequence {seq_id!r} needs {self.pages_for(num_tokens) - len(cached)} pages, "
                                  f"{self.num_free_pages} are free")
        refs = self._refs
        for p in cached:
            if p in self._evictable:
                del self._evictable[p]
                refs[p] = 1
            else:
                refs[p] += 1
        self._tables[seq_id] = list(cached) + self._take(self.pages_for(num_tokens) - len(cached))
        self._tokens[seq_id] = num_tokens
        return tuple(self._tables[seq_id])

    def register(self, seq_id: Hashable, first: int, names: Sequence[bytes]) -> None:
        """Name the pages ``first, first + 1, ...`` of ``seq_id``'s table ``names`` (in order):
        their K/V is computed by steps already planned, so later sequences may share them. A
        name already cached (another page holds the same K/V) or a page already named is left
        as it is. Nothing happens with prefix caching off.

        Raises:
            KeyError: unknown sequence. IndexError: pages past its table.
        """
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        if first + len(names) > len(table):
            raise IndexError(f"sequence {seq_id!r} holds {len(table)} pages; cannot name pages up to {first + len(names)}")
        for page, name in zip(table[first:], names):
            if name not in self._page_of and page not in self._name_of:
                self._page_of[name] = page
                self._name_of[page] = name

    def grow(self, seq_id: Hashable, num_tokens: int) -> tuple[int, ...]:
        """Extend ``seq_id`` to hold ``num_tokens`` tokens (never shrinks).

        Returns:
            The pages newly added (possibly none).
        Raises:
            KeyError: unknown sequence.
            ValueError: ``num_tokens`` below the current count.
            OutOfPagesError: not enough free pages (nothing allocated).
        """
        table = self._tables[seq_id]
        if num_tokens < self._tokens[seq_id]:
            raise ValueError(f"sequence {seq_id!r} holds {self._tokens[seq_id]} tokens; cannot grow to {num_tokens}")
        if num_tokens <= len(table) * self.page_size:  # the common case: the last page has room
            self._tokens[seq_id] = num_tokens
            return ()
        need = self.pages_for(num_tokens) - len(table)
        if need > self.num_free_pages:
            raise OutOfPagesError(f"sequence {seq_id!r} needs {need} more pages, {self.num_free_pages} are free")
        new = self._take(need)
        table.extend(new)
        self._tokens[seq_id] = num_tokens
        return tuple(new)

    def append_page(self, seq_id: Hashable) -> int | None:
        """Give ``seq_id``, whose pages are full, one more page for its next token (a decode
        crossing into a new page: the allocation of a busy decode step). Returns the page, or
        ``None`` (nothing changed) when no page is free or its last page still has room: the
        caller then takes the general path (:meth:`grow`, preempting while none is free).

        Raises:
            KeyError: unknown sequence.
        """
        table = self._tables[seq_id]
        n = self._tokens[seq_id]
        if n != len(table) * self.page_size:
            return None
        if self._free:  # (the hot path)
            page = self._free.pop()
            self._refs[page] = 1
        elif self._evictable:
            page = self._take(1)[0]
        else:
            return None
        table.append(page)
        self._tokens[seq_id] = n + 1
        return page

    def set_num_tokens(self, seq_ids: Iterable[Hashable], num_tokens: Iterable[int]) -> None:
        """Record the token counts of sequences whose pages already hold them (decode tokens
        that land in their last page's free slots): no allocation, and no per-sequence check, as
        this is the hot path of a decode step (:meth:`check_invariants` catches misuse).
        ``seq_ids`` and ``num_tokens`` pair up in order."""
        self._tokens.update(zip(seq_ids, num_tokens))

    def free(self, seq_id: Hashable) -> int:
        """Release every page of ``seq_id`` (it finished, was aborted, or is preempted). A page
        other sequences share stays theirs; a named page nobody holds any more stays cached (the
        sequence's last pages first in line for eviction, vLLM's order).

        Returns:
            The number of pages in its table.
        Raises:
            KeyError: unknown sequence.
        """
        table = self._tables.pop(seq_id)
        del self._tokens[seq_id]
        refs, named = self._refs, self._name_of
        for page in reversed(table):
            r = refs[page] - 1
            if r:
                refs[page] = r
                continue
            del refs[page]
            if page in named:
                self._evictable[page] = None
            else:
                self._free.append(page)
        return len(table)

    def reset_prefix_cache(self) -> int:
        """Forget every cached page nobody holds (vLLM's ``reset_prefix_cache``) and the names
        of held ones. Returns the number of pages forgotten."""
        n = len(self._page_of)
        self._free.extend(sorted(self._evictable, reverse=True))
        self._evictable.clear()
        self._page_of.clear()
        self._name_of.clear()
        return n

    def check_invariants(self) -> None:
        """Assert that every allocatable page is owned exactly once (by a sequence or the free list).

        Raises:
            AssertionError: a page owned twice, leaked, reserved-but-handed-out, or a table of the
                wrong length.
        """
        held: dict[int, int] = {}
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"a page is owned twice (table of {seq_id!r})"
            for p in table:
                held[p] = held.get(p, 0) + 1
        shared = [p for p, n in held.items() if n > 1]
        assert all(p in self._name_of for p in shared), "a page is owned twice"  # (only cached pages are shared)
        assert held == self._refs, "a page's reference count is wrong"
        owned = list(held) + self._free + list(self._evictable)
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert set(owned) == set(range(self.num_reserved, self.num_pages)), "a page is leaked or out of range"
        assert all(p in self._name_of for p in self._evictable), "an unnamed page is on the cached list"
        assert len(self._name_of) == len(self._page_of) and all(self._page_of[n] == p for p, n in self._name_of.items()), \
            "page names are not one-to-one"
        assert all(p in held or p in self._evictable for p in self._name_of), "a named page is on the free stack"
        for seq_id, table in self._tables.items():
            assert len(table) == self.pages_for(self._tokens[seq_id]), f"table of {seq_id!r} has the wrong length"
