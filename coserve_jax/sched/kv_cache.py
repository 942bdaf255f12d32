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
"""

from __future__ import annotations

from typing import Hashable, Iterable


class OutOfPagesError(RuntimeError):
    """Not enough free pages for an allocation; nothing was allocated."""


class KVCacheManager:
    """Page allocator and per-sequence page tables.

    Args:
        num_pages: pages in the device KV cache (reserved ones included).
        page_size: tokens per page.
        num_reserved: leading pages never allocated (default 1: the scratch page 0).
    Raises:
        ValueError: sizes that leave no allocatable page.
    """

    def __init__(self, num_pages: int, page_size: int, num_reserved: int = 1):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages <= num_reserved:
            raise ValueError(f"num_pages={num_pages} leaves no page after {num_reserved} reserved")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_reserved = num_reserved
        # A stack: pop() hands out the lowest free page first, freed pages are reused first.
        self._free: list[int] = list(range(num_pages - 1, num_reserved - 1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Allocatable pages (``num_pages - num_reserved``)."""
        return self.num_pages - self.num_reserved

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.capacity - len(self._free)

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

    def can_admit(self, num_tokens: int, reserve_pages: int = 0) -> bool:
        """Whether a new sequence of ``num_tokens`` fits and still leaves ``reserve_pages`` free
        (a watermark that keeps room for running sequences to grow)."""
        return self.pages_for(num_tokens) + reserve_pages <= len(self._free)

    def can_grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether ``seq_id`` can be extended to ``num_tokens`` tokens."""
        return self.pages_for(num_tokens) - len(self._tables[seq_id]) <= len(self._free)

    # ---- updates -------------------------------------------------------------------------
    def admit(self, seq_id: Hashable, num_tokens: int) -> tuple[int, ...]:
        """Give a new sequence pages for ``num_tokens`` tokens.

        Returns:
            Its page table.
        Raises:
            ValueError: ``seq_id`` already holds pages, or ``num_tokens < 0``.
            OutOfPagesError: not enough free pages (nothing allocated).
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds pages")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.pages_for(num_tokens)
        if need > len(self._free):
            raise OutOfPagesError(f"sequence {seq_id!r} needs {need} pages, {len(self._free)} are free")
        self._tables[seq_id] = [self._free.pop() for _ in range(need)]
        self._tokens[seq_id] = num_tokens
        return tuple(self._tables[seq_id])

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
        if need > len(self._free):
            raise OutOfPagesError(f"sequence {seq_id!r} needs {need} more pages, {len(self._free)} are free")
        new = [self._free.pop() for _ in range(need)]
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
        if not self._free or n != len(table) * self.page_size:
            return None
        page = self._free.pop()
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
        """Release every page of ``seq_id`` (it finished, was aborted, or is preempted).

        Returns:
            The number of pages released.
        Raises:
            KeyError: unknown sequence.
        """
        table = self._tables.pop(seq_id)
        del self._tokens[seq_id]
        self._free.extend(reversed(table))
        return len(table)

    def check_invariants(self) -> None:
        """Assert that every allocatable page is owned exactly once (by a sequence or the free list).

        Raises:
            AssertionError: a page owned twice, leaked, reserved-but-handed-out, or a table of the
                wrong length.
        """
        owned = [p for t in self._tables.values() for p in t] + self._free
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert set(owned) == set(range(self.num_reserved, self.num_pages)), "a page is leaked or out of range"
        for seq_id, table in self._tables.items():
            assert len(table) == self.pages_for(self._tokens[seq_id]), f"table of {seq_id!r} has the wrong length"
