"""What crosses the host/device line, both ways, as plain data (vLLM v1's ``SchedulerOutput`` /
``ModelRunnerOutput`` are the model).

* :class:`SchedulerOutput` (scheduler -> model runner): one step's plan. Ids, token ids,
  positions, page tables, adapter indices and per-sequence sampling rows; training work as
  chunks of the same kind (:class:`FinetuneChunk`, :class:`BackwardSlice`). No live
  :class:`~coserve_jax.sched.request.Request`, no callbacks: it pickles, so a plan made on one
  process can be run on every process of a multi-host engine.
* :class:`StepResult` (model runner -> scheduler): what the step produced, as Python numbers.

Pure Python; no JAX, no NumPy.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One sequence's sampling settings in a step.

    Attributes:
        temperature: 0 is greedy. top_k: 0 is off. top_p: 1 is off. min_p: 0 is off.
            repetition_penalty: 1 is off.
        seed: the request's seed (the per-token random stream is ``(seed, output_index)``,
            the chunk's ``output_index``).
        num_logprobs: top logprobs to return (``None``: no logprobs; 0: the chosen token's only).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_logprobs: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0


PENDING_TOKEN = -1
"""A token id in a chunk whose value the host does not know yet: the token its request sampled in
the previous step, still on the device (overlapped steps). Only a decode chunk holds one."""

GREEDY = SamplingRow()
"""The row of a sequence whose sampled token nobody reads (a training chunk's)."""


@dataclasses.dataclass(slots=True)
class ScheduledChunk:
    """The tokens of one request in a step.

    Page tables travel as increments (vLLM v1's ``new_block_ids``): a chunk carries only the
    pages this plan added to its request; the first chunk of a request new to the batch (admitted,
    or readmitted after preemption; its ``start`` is 0, or the tokens found in the prefix cache)
    carries its whole table. Whoever keeps the device's page tables
    (:class:`~coserve_jax.engine.input_batch.InputBatch`) applies every plan in order.

    Attributes:
        request_id: the request's id.
        start: position of the first token (= tokens already in the KV cache, shared cached
            pages included).
        token_ids: the tokens to compute, positions ``start .. start + len - 1``.
        new_pages: the pages this step's allocation added to the request's table, in token order.
        sample: whether this chunk reaches the last known token, so a new token is sampled.
        adapter_index: LoRA adapter of its tokens (0: the base model; ``None`` for an entry of
            :class:`DecodeChunks`, whose request's adapter travelled with its first chunk).
        sampling: its :class:`SamplingRow` (one object per request, shared by its chunks;
            ``None`` for an entry of :class:`DecodeChunks`, as ``adapter_index``).
        output_index: tokens the request generated before this step's.
        is_decode: one token of a request that already generated (a decode, not prefill).
    """

    request_id: Hashable
    start: int
    token_ids: list[int]
    new_pages: tuple[int, ...]
    sample: bool
    adapter_index: int | None = 0
    sampling: SamplingRow | None = GREEDY
    output_index: int = 0
    is_decode: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class FinetuneChunk:
    """Forward tokens of one example of a training sequence in a step (they follow the inference
    tokens; each chunk is a sequence of the step). A pack's forward chunk that spans several
    examples is one chunk per example.

    Attributes:
        job_id: the job (or validation pass) the sequence belongs to.
        index, num_restarts: the sequence's counter in its job and its attempt (a restarted
            forward's earlier chunks do not count).
        offset: the chunk's first token in the pack (the sequence's tokens computed before it).
        start: the position of the first token in its example.
        token_ids: the tokens, positions ``start .. start + len - 1``.
        page_table: the example's pages after this step's allocation.
        adapter_index: the job's adapter.
        store_row: the activation-store row of the first token (the others follow; ``-1`` for a
            forward-only chunk, which saves nothing).
        targets, weights: per token of the chunk, the token it predicts and the loss weight.
        dropout_rate, dropout_seed: the example's LoRA dropout.
        forward_only: a validation chunk (loss only, nothing saved for a backward).
        loss_code, sampler_logprobs, clip: the sequence's loss (0: weighted cross-entropy; a
            policy loss's code, the sampler's logprob per token and PPO's clip range: see
            :class:`~coserve_jax.sched.finetune.TrainingSequence`).
        return_logprobs: the step returns every token's target logprob (the loss head runs on
            all of the chunk's tokens).
    """

    job_id: Hashable
    index: int
    num_restarts: int
    offset: int
    start: int
    token_ids: list[int]
    page_table: tuple[int, ...]
    adapter_index: int
    store_row: int
    targets: list[int]
    weights: list[float]
    dropout_rate: float = 0.0
    dropout_seed: int = 0
    forward_only: bool = False
    loss_code: int = 0
    sampler_logprobs: list[float] | None = None
    clip: tuple[float, float] = (0.0, 0.0)
    return_logprobs: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class BackwardSlice:
    """Backward work of one training sequence in a step: layers ``first_layer + num_layers - 1``
    down to ``first_layer``, on the whole sequence (all its examples, attention within each).

    Attributes:
        job_id: the sequence's job; index: its counter in the job.
        first_layer: the lowest layer of the slice; num_layers: layers in the slice.
        num_tokens: the sequence's length; store_row: its first activation-store row.
        grad_row: its job's gradient-accumulator row; adapter_index: the job's adapter.
        segments: each example's length, in order.
        dropout_rate: the job's LoRA dropout rate; dropout_seeds: each example's seed.
    """

    job_id: Hashable
    index: int
    first_layer: int
    num_layers: int
    num_tokens: int
    store_row: int
    grad_row: int
    adapter_index: int
    segments: tuple[int, ...]
    dropout_rate: float = 0.0
    dropout_seeds: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainSequence:
    """A whole training sequence (a pack) run as one train step while inference is idle: its
    forward, loss and backward in one executable, its gradient added into its job's accumulator
    (no token slots, KV pages or activation-store rows).

    Attributes:
        job_id: the sequence's job; index, num_restarts: its counter and attempt.
        token_ids, targets, weights: the pack's tokens, the token each predicts and its loss weight.
        segments: each example's length, in order.
        grad_row: its job's gradient-accumulator row; adapter_index: the job's adapter.
        num_layers: the model's layers (all of which the step runs).
        dropout_rate: the job's LoRA dropout rate; dropout_seeds: each example's seed.
        loss_code, sampler_logprobs, clip, return_logprobs: as :class:`FinetuneChunk`.
    """

    job_id: Hashable
    index: int
    num_restarts: int
    token_ids: list[int]
    targets: list[int]
    weights: list[float]
    segments: tuple[int, ...]
    grad_row: int
    adapter_index: int
    num_layers: int
    dropout_rate: float = 0.0
    dropout_seeds: tuple[int, ...] = ()
    loss_code: int = 0
    sampler_logprobs: list[float] | None = None
    clip: tuple[float, float] = (0.0, 0.0)
    return_logprobs: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def forward_only(self) -> bool:
        """Never: a train step trains (validation runs as forward chunks)."""
        return False


@dataclasses.dataclass(slots=True)
class DecodeChunks:
    """The one-token chunks of running requests in a step, in columns (vLLM v1's
    ``CachedRequestData``; like vLLM's attention backends, a chunk of one query token counts as
    a decode). Each samples a token. Their requests already have rows in the model runner's
    batch (their first chunk made them, with the adapter and sampling settings), so only what
    changes every step travels: the token, its position, the output index, pages only for the
    few that crossed into a new page, and logprob requests only for the requests that ask.

    Almost every entry is a decode of a generated token; an entry with ``output_index == 0`` is
    the last prompt token of a chunked prefill.

    Attributes:
        request_ids: the requests, in batch order.
        token_ids: the token of each (``PENDING_TOKEN`` where still on the device).
        starts: its position (= tokens of the request already in the KV cache).
        output_index: tokens the request generated before this step's.
        new_pages: entry index -> the pages this plan added to that request's table.
        num_logprobs: entry index -> the top logprobs that request asks for (0: the chosen
            token's only), only for the requests that ask.
    """

    request_ids: list[Hashable] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    starts: list[int] = dataclasses.field(default_factory=list)
    output_index: list[int] = dataclasses.field(default_factory=list)
    new_pages: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    num_logprobs: dict[int, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.request_ids)

    def chunk(self, i: int) -> ScheduledChunk:
        """Entry ``i`` as a :class:`ScheduledChunk` (``adapter_index`` and ``sampling`` ``None``)."""
        out = self.output_index[i]
        return ScheduledChunk(
            self.request_ids[i], self.starts[i], [self.token_ids[i]], self.new_pages.get(i, ()), True, None, None, out, out > 0,
        )


@dataclasses.dataclass
class SchedulerOutput:
    """One step's plan: the one-token chunks (``decodes``) first, then the chunks of several
    tokens or of new requests (``prefills``), in batch order; then the finetuning forward chunks
    (after the inference tokens, each a sequence of the step) and at most one backward slice. The inference sequences of a step,
    in order, are ``decodes`` then ``prefills`` (:attr:`chunks` lists them as
    :class:`ScheduledChunk`).

    Attributes:
        decodes: the one-token chunks of running requests, in columns (:class:`DecodeChunks`).
        prefills: the other inference chunks: prompt chunks, and the first chunk of a new or
            readmitted request (whatever its length).
        preempted: ids of the requests preempted while planning.
        finished: ids of the requests that ended (finished, aborted) since the previous plan:
            their page tables can be dropped.
        finetune: the training forward chunks, in order (empty: none). backward: the backward
            slice, if any. train: a whole training sequence's train step, if any (inference idle).
        has_pending_tokens: some decode holds a :data:`PENDING_TOKEN`.
        training_recorded: the scheduler has recorded the training progress of this plan
            (:meth:`~coserve_jax.sched.scheduler.Scheduler.update_training`).
    """

    decodes: DecodeChunks = dataclasses.field(default_factory=DecodeChunks)
    prefills: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    preempted: list[Hashable] = dataclasses.field(default_factory=list)
    finished: list[Hashable] = dataclasses.field(default_factory=list)
    finetune: list[FinetuneChunk] = dataclasses.field(default_factory=list)
    backward: BackwardSlice | None = None
    train: TrainSequence | None = None
    has_pending_tokens: bool = False
    training_recorded: bool = dataclasses.field(default=False, compare=False)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        """Every inference chunk, in batch order, as :class:`ScheduledChunk` (built on each
        call: the step's hot paths read the columns)."""
        d = self.decodes
        return [d.chunk(i) for i in range(len(d))] + self.prefills

    @property
    def request_ids(self) -> list[Hashable]:
        """The request of each inference sequence, in batch order."""
        return self.decodes.request_ids + [c.request_id for c in self.prefills]

    @property
    def num_inference_seqs(self) -> int:
        return len(self.decodes.request_ids) + len(self.prefills)

    @property
    def num_inference_tokens(self) -> int:
        return len(self.decodes.request_ids) + sum(len(c.token_ids) for c in self.prefills)

    @property
    def num_tokens(self) -> int:
        """Token slots the step needs: inference and finetuning forward tokens."""
        return self.num_inference_tokens + self.num_finetune_tokens

    @property
    def num_finetune_tokens(self) -> int:
        """Finetuning forward tokens of the step."""
        return sum(len(c.token_ids) for c in self.finetune)

    @property
    def num_seqs(self) -> int:
        """Sequence slots the step needs (each finetuning chunk takes one)."""
        return self.num_inference_seqs + len(self.finetune)

    @property
    def is_empty(self) -> bool:
        """Nothing to run (``finished`` ids still have to reach the page-table keeper)."""
        return (not self.decodes.request_ids and not self.prefills and not self.finetune and self.backward is None
                and self.train is None)

    @property
    def num_decode_tokens(self) -> int:
        """Tokens that decode a generated token (the last prompt token of a prefill not counted)."""
        out = self.decodes.output_index
        return len(out) - out.count(0) + sum(1 for c in self.prefills if c.is_decode)

    def num_logprobs(self) -> list[int | None]:
        """Per inference sequence, in batch order: the top logprobs it asks for (``None``: no
        logprobs; a chunk that does not sample asks for none)."""
        asks = self.decodes.num_logprobs
        return [asks.get(i) for i in range(len(self.decodes.request_ids))] + [
            c.sampling.num_logprobs if c.sample else None for c in self.prefills
        ]

    @property
    def max_num_logprobs(self) -> int | None:
        """The most top logprobs any sequence asks for (``None``: none asks for logprobs)."""
        asks = list(self.decodes.num_logprobs.values())
        asks += [c.sampling.num_logprobs for c in self.prefills if c.sample and c.sampling.num_logprobs is not None]
        return max(asks) if asks else None


@dataclasses.dataclass
class StepResult:
    """What a step produced, per inference chunk of its plan, in order.

    Attributes:
        sampled: the sampled token id, or ``None`` for a chunk that did not sample.
        logprobs: the sampled token's logprob per chunk (``None`` where not asked).
        top_logprobs: ``{token id: logprob}`` of the top ``num_logprobs`` per chunk (``None``
            where not asked).
        finetune_losses: per finetuning chunk of the plan, its summed weighted cross-entropy
            (nats); ``None`` for a step without one.
    """

    sampled: list[int | None]
    logprobs: list[float | None] | None = None
    top_logprobs: list[dict[int, float] | None] | None = None
    finetune_losses: list[float] | None = None
