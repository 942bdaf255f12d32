"""Host-side state of the training sequences that finetuning jobs feed into serving steps.

A finetuning job trains one sequence at a time (FlexLLM's token-level finetuning, NSDI 2026,
section 4). Each sequence goes through two phases, both
spread over serving steps:

1. **Forward** (``FORWARD``): the sequence is consumed in chunks, like a prefill, in the token
   slots the step's inference work leaves free. Its K/V live in KV-cache pages it owns until its
   last chunk; its layer inputs go to the job's row of the device activation store.
2. **Backward** (``BACKWARD``): one slice of ``layers_per_slice`` decoder layers per step, top
   down, recomputed from the saved layer inputs (no KV pages needed).

After the last slice the sequence is ``DONE`` and the engine hands its job the next one (and
runs the optimizer step when an accumulation group is complete).

A **forward-only** sequence (validation: the loss of an adapter on held-out examples) has the
forward phase alone: it is ``DONE`` after its last chunk, and its layer inputs are not saved.

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Hashable


class TrainingPhase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    DONE = "done"


@dataclasses.dataclass(eq=False)
class TrainingSequence:
    """One training sequence of a finetuning job, in flight.

    Attributes:
        job_id: the job's id.
        store_row: the job's row of the activation store (``0..max_finetune_jobs-1``).
        adapter_index: the job's adapter index in the LoRA pool (what its tokens carry).
        token_ids: the sequence.
        targets: ``targets[t]`` is the token position ``t`` predicts (``token_ids[t + 1]``; the
            last is 0).
        weights: ``weights[t]`` is the loss weight of that prediction (``1 / normalizer`` for a
            target token, else 0).
        dropout_rate, dropout_seed: the sequence's LoRA dropout.
        num_layers, layers_per_slice: the backward's slicing.
        index: the job's running sequence counter (across epochs).
        num_computed: forward tokens done.
        slices_done: backward slices done.
        num_restarts: times the forward was restarted because inference needed its pages.
        forward_only: a validation sequence: its chunks compute the loss only (no saved layer
            inputs, no backward).
    """

    job_id: Hashable
    store_row: int
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
    slices_done: int = 0
    num_restarts: int = 0
    forward_only: bool = False

    def __post_init__(self):
        n = len(self.token_ids)
        if n < 2:
            raise ValueError("a training sequence needs at least 2 tokens")
        if len(self.targets) != n or len(self.weights) != n:
            raise ValueError("token_ids, targets and weights must have the same length")
        if self.layers_per_slice < 1 or self.num_layers % self.layers_per_slice:
            raise ValueError(f"layers_per_slice={self.layers_per_slice} must divide num_layers={self.num_layers}")

    @property
    def kv_id(self) -> tuple[str, Hashable]:
        """The sequence's id in the KV-cache manager."""
        return ("finetune", self.job_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_slices(self) -> int:
        return self.num_layers // self.layers_per_slice

    @property
    def phase(self) -> TrainingPhase:
        if self.num_computed < self.num_tokens:
            return TrainingPhase.FORWARD
        if not self.forward_only and self.slices_done < self.num_slices:
            return TrainingPhase.BACKWARD
        return TrainingPhase.DONE

    @property
    def next_first_layer(self) -> int:
        """First layer of the next backward slice (slices go top down)."""
        return (self.num_slices - 1 - self.slices_done) * self.layers_per_slice
