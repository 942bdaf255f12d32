"""Host-side state of the training sequences that finetuning jobs feed into serving steps.

Token-level finetuning (FlexLLM, NSDI 2026, section 4) spreads each training sequence over
serving steps in two phases:

1. **Forward** (``FORWARD``): the sequence is consumed in chunks, like a prefill, in the token
   slots the step's inference work leaves free. Its K/V live in KV-cache pages it owns until its
   forward is done; its layer inputs go to its rows of the device **activation store**.
2. **Backward** (``BACKWARD``): layers top down, as many per step as the step's policy allows
   (all of them when inference is idle), recomputed from the saved layer inputs (no KV pages).

After its last layer the sequence is ``DONE``; its job runs the optimizer step when its
accumulation group is complete.

A sequence is a **pack** (TRL's ``packing``): one or more examples back to back
(``segments``), each with its own positions, KV pages and LoRA dropout seed; attention stays
within each example, so a pack's gradient is the sum of its examples' gradients. Packing fills a
step's finetuning slots and a backward's length bucket with real tokens instead of padding.

Several sequences of a job may be in flight at once (the forward of one in the steps where
another runs its backward): within an accumulation group the adapter does not change. The
activation store is a pool of token rows shared by all sequences (:class:`StoreAllocator`), so
its size is a byte budget, not one sequence per job.

A **forward-only** sequence (validation: the loss of an adapter on held-out examples) has the
forward phase alone: it is ``DONE`` after its last chunk, and its layer inputs are not saved.

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from typing import Hashable


class TrainingPhase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    DONE = "done"


@dataclasses.dataclass(eq=False)
class TrainingSequence:
    """One training sequence (a pack of one or more examples) of a finetuning job, in flight.

    Attributes:
        job_id: the job's id.
        grad_row: the job's row of the gradient accumulator (``0..max_finetune_jobs-1``).
        adapter_index: the job's adapter index in the LoRA pool (what its tokens carry).
        token_ids: the pack's tokens, its examples back to back.
        targets: ``targets[t]`` is the token position ``t`` predicts (the next token of its
            example; 0 at an example's last token).
        weights: ``weights[t]`` is the loss weight of that prediction (``1 / normalizer`` for a
            target token, else 0).
        dropout_rate: the job's LoRA dropout rate.
        dropout_seed: the first example's LoRA dropout seed (``dropout_seeds`` gives one per
            example; default: this one for every example).
        num_layers: decoder layers (the backward's length).
        layers_per_slice: backward layers per step while inference runs, when the step's policy
            does not size the backward itself.
        index: the job's counter of this sequence (its first example's counter across epochs).
        num_computed: forward tokens done.
        layers_done: backward layers done (top down).
        num_restarts: times the forward was restarted because inference needed its pages.
        forward_only: a validation sequence: its chunks compute the loss only (no saved layer
            inputs, no backward).
        segments: each example's length, in order (default: one example of all the tokens).
        dropout_seeds: each example's LoRA dropout seed (default: ``dropout_seed`` for each).
        num_examples: examples of the job's data the pack holds (for its accumulation group).
        store_start: its first row in the activation store (``None`` until the scheduler gives
            it rows, and always for a forward-only sequence).
        loss_code: the loss of its tokens (0: cross-entropy weighted by ``weights``; 1
            importance sampling, 2 PPO, with ``weights`` the advantages: Tinker's losses, see
            :mod:`coserve_jax.finetune.policy_losses`).
        sampler_logprobs: a policy loss's sampler logprob per token (``None`` for 0).
        clip: PPO's clip thresholds (low, high).
        return_logprobs: the steps return every token's target logprob (else only the
            weighted tokens' are computed).
    Raises:
        ValueError: fewer than 2 tokens, lists of different lengths, segments that do not add
            up to the tokens, or a slice size that does not divide the layers.
    """

    job_id: Hashable
    grad_row: int
    adapter_index: int
    token_ids: list[int]
    targets: list[int]
    weights: list[float]
    dropout_rate: float
    dropout_seed: int
    num_layers: int
    layers_per_slice: int
    index: int = 0
    num_computed: int = 0
    layers_done: int = 0
    num_restarts: int = 0
    forward_only: bool = False
    segments: tuple[int, ...] = ()
    dropout_seeds: tuple[int, ...] = ()
    num_examples: int = 1
    store_start: int | None = None
    loss_code: int = 0
    sampler_logprobs: list[float] | None = None
    clip: tuple[float, float] = (0.0, 0.0)
    return_logprobs: bool = False

    def __post_init__(self):
        n = len(self.token_ids)
        if n < 2 and not self.return_logprobs:
            raise ValueError("a training sequence needs at least 2 tokens")
        if n < 1:
            raise ValueError("a sequence needs at least 1 token")
        if len(self.targets) != n or len(self.weights) != n:
            raise ValueError("token_ids, targets and weights must have the same length")
        if self.loss_code and (self.sampler_logprobs is None or len(self.sampler_logprobs) != n):
            raise ValueError("a policy loss needs one sampler logprob per token")
        if self.layers_per_slice < 1 or self.num_layers % self.layers_per_slice:
            raise ValueError(f"layers_per_slice={self.layers_per_slice} must divide num_layers={self.num_layers}")
        self.segments = tuple(self.segments) or (n,)
        if sum(self.segments) != n or min(self.segments) < 1:
            raise ValueError(f"segments {self.segments} must be positive and add up to the {n} tokens")
        self.dropout_seeds = tuple(self.dropout_seeds) or (self.dropout_seed,) * len(self.segments)
        if len(self.dropout_seeds) != len(self.segments):
            raise ValueError("one dropout seed per segment")
        self._starts = [0]
        for length in self.segments[:-1]:
            self._starts.append(self._starts[-1] + length)
        self._weighted_after = [0] * (n + 1)  # weighted tokens from position t on
        for t in range(n - 1, -1, -1):
            self._weighted_after[t] = self._weighted_after[t + 1] + (self.weights[t] != 0)

    def kv_id(self, segment: int) -> tuple:
        """The id of example ``segment``'s pages in the KV-cache manager."""
        return ("finetune", self.job_id, self.index, segment)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def segment_starts(self) -> list[int]:
        """Each example's first token in the pack."""
        return self._starts

    def segment_of(self, t: int) -> int:
        """The example that token ``t`` of the pack belongs to."""
        return bisect.bisect_right(self._starts, t) - 1

    @property
    def phase(self) -> TrainingPhase:
        if self.num_computed < self.num_tokens:
            return TrainingPhase.FORWARD
        if not self.forward_only and self.layers_done < self.num_layers:
            return TrainingPhase.BACKWARD
        return TrainingPhase.DONE

    @property
    def target_fraction(self) -> float:
        """The share of the forward tokens still to compute that carry a loss weight."""
        rest = self.num_tokens - self.num_computed
        return self._weighted_after[self.num_computed] / rest if rest > 0 else 0.0

    @property
    def layers_left(self) -> int:
        """Backward layers still to run."""
        return 0 if self.forward_only else self.num_layers - self.layers_done


class StoreAllocator:
    """Rows of the activation store, handed out as contiguous ranges (first fit).

    Args:
        capacity: rows (tokens) of the store.
    Raises:
        ValueError: a capacity below 1.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the activation store needs at least 1 row, got {capacity}")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), by start

    @property
    def num_free(self) -> int:
        return sum(n for _, n in self._free)

    def allocate(self, n: int) -> int | None:
        """The first row of ``n`` contiguous free rows (now taken), or ``None`` if no range fits."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def allocate_at(self, start: int, n: int) -> None:
        """Take rows ``start .. start + n - 1`` (a follower copying its leader's allocation).

        Raises:
            ValueError: some of those rows are not free.
        """
        for i, (s, length) in enumerate(self._free):
            if s <= start and start + n <= s + length:
                rest = [(s, start - s), (start + n, s + length - start - n)]
                self._free[i:i + 1] = [r for r in rest if r[1] > 0]
                return
        raise ValueError(f"rows {start}..{start + n - 1} of the activation store are not free")

    def free(self, start: int, n: int) -> None:
        """Give back rows ``start .. start + n - 1`` (merged with free neighbours).

        Raises:
            ValueError: rows outside the store or already free.
        """
        if start < 0 or start + n > self.capacity:
            raise ValueError(f"rows {start}..{start + n - 1} are outside the store of {self.capacity}")
        i = bisect.bisect_left(self._free, (start, 0))
        if (i > 0 and sum(self._free[i - 1]) > start) or (i < len(self._free) and self._free[i][0] < start + n):
            raise ValueError(f"rows {start}..{start + n - 1} are already free")
        self._free.insert(i, (start, n))
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i] = (start, n + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and sum(self._free[i - 1]) == start:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
