"""The running requests' per-request step inputs, kept on the host between steps (vLLM v1's
``InputBatch`` / ``BlockTable``).

A plan carries page tables as increments (a chunk's ``new_pages``) and every request's sampling
settings once per chunk: re-copying each request's whole page table and settings from Python
into NumPy every step is the largest host cost of a busy decode step. :class:`InputBatch`
keeps one NumPy row per request (its pages, adapter and sampling settings), written when the
request is admitted and when it gains pages, drops the rows of requests that ended or were
preempted, and gathers a step's rows with one indexing operation per field.
"""

from __future__ import annotations

from typing import Hashable, Iterable

import numpy as np

from coserve_jax.sched.outputs import SchedulerOutput

PADDING_ROW = 0
"""The row never handed out: the padding sequences' settings (no pages, greedy, top-p 1)."""


class InputBatch:
    """Per-request rows of the step's page tables and sampling settings.

    Args:
        max_pages_per_seq: the page-table width (``P``).
        initial_rows: rows allocated at first for requests (grown by doubling when needed).
    Attributes:
        page_table: ``[rows, P]`` int32: row ``r`` holds its request's pages in token order;
            row :data:`PADDING_ROW` holds the padding sequences' values in every field.
        num_pages: pages in each row (a Python list: read and written one row at a time).
        last_page: ``[rows]`` int32: each row's last page (0 while it has none): where a
            decode's token goes, as a decode's position is always in its sequence's last page.
        adapter: ``[rows]`` int32; temperature, top_p, min_p, repetition_penalty: ``[rows]``
            float32; top_k: ``[rows]`` int32; seed: ``[rows]`` uint32: each request's adapter and
            sampling settings.
    """

    FIELDS = (("page_table", np.int32), ("last_page", np.int32), ("adapter", np.int32), ("temperature", np.float32),
              ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32), ("seed", np.uint32),
              ("repetition_penalty", np.float32))

    def __init__(self, max_pages_per_seq: int, initial_rows: int = 64):
        n = max(1, initial_rows) + 1
        self.max_pages_per_seq = max_pages_per_seq
        for name, dtype in self.FIELDS:
            setattr(self, name, np.zeros((n, max_pages_per_seq) if name == "page_table" else n, dtype))
        self.num_pages = [0] * n
        self.top_p[PADDING_ROW] = 1.0  # the padding row: no pages, greedy, top-p and penalty off
        self.repetition_penalty[PADDING_ROW] = 1.0
        self._rows: dict[Hashable, int] = {}
        self._free = list(range(n - 1, 0, -1))

    def __len__(self) -> int:
        return len(self._rows)

    def release(self, request_ids: Iterable[Hashable]) -> None:
        """Drop the rows of these requests (unknown ids are ignored)."""
        for rid in request_ids:
            row = self._rows.pop(rid, None)
            if row is not None:
                self._free.append(row)

    def apply(self, plan: SchedulerOutput) -> np.ndarray:
        """Apply a plan: drop the rows of ended and preempted requests, write the rows of new
        (or readmitted) ones, append new pages. Returns the row of each inference chunk, in
        order (``[num inference chunks]`` intp).

        Raises:
            KeyError: a decode of a request without a row (its first chunk never reached this batch).
            ValueError: a request's pages would exceed the row width.
        """
        self.release(plan.finished)
        self.release(plan.preempted)
        d = plan.decodes
        rows_of = self._rows
        n = len(d.request_ids)
        rows = np.empty(n + len(plan.prefills), np.intp)
        rows[:n] = np.fromiter(map(rows_of.__getitem__, d.request_ids), np.intp, n)  # decodes already have rows
        for i, new in d.new_pages.items():
            self._append_pages(int(rows[i]), d.request_ids[i], new)
        for j, c in enumerate(plan.prefills, n):
            row = rows_of.get(c.request_id)
            if row is None or c.start == 0:  # a new request, or one readmitted (start: its cached prefix): a fresh row
                if row is None:
                    row = rows_of[c.request_id] = self._take()
                self.page_table[row] = 0
                self.num_pages[row] = 0
                self.last_page[row] = 0
                s = c.sampling
                self.adapter[row] = c.adapter_index
                self.temperature[row] = s.temperature
                self.top_k[row] = s.top_k
                self.top_p[row] = s.top_p
                self.min_p[row] = s.min_p
                self.repetition_penalty[row] = s.repetition_penalty
                self.seed[row] = s.seed
            if c.new_pages:
                self._append_pages(row, c.request_id, c.new_pages)
            rows[j] = row
        return rows

    def _append_pages(self, row: int, request_id: Hashable, new: tuple[int, ...]) -> None:
        k = self.num_pages[row]
        m = len(new)
        if k + m > self.max_pages_per_seq:
            raise ValueError(f"request {request_id!r} would hold {k + m} pages; rows hold {self.max_pages_per_seq}")
        if m == 1:  # a decode crossing into a new page: the usual case
            self.page_table[row, k] = new[0]
        else:
            self.page_table[row, k : k + m] = new
        self.num_pages[row] = k + m
        self.last_page[row] = new[-1]

    def _take(self) -> int:
        if not self._free:
            n = len(self.num_pages)
            for name, _ in self.FIELDS:
                a = getattr(self, name)
                setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
            self.num_pages += [0] * n
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()
