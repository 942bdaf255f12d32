"""The step's inputs: their types, one shape table, and the host-side builder.

:data:`STEP_INPUT_TABLE` gives the shape (in named dimensions), dtype and padding value of every
array the fused step takes. Both the abstract inputs the step is compiled for
(:func:`abstract_inputs`) and the real ones of each step (:func:`build_step_inputs`) are made from
it by :func:`make_inputs`, so the two cannot disagree. (tpu-inference's
``layers/common/attention_metadata.py`` is the model: typed step inputs as registered pytree
dataclasses with explicit data and static fields.)

Dimensions: ``T`` token slots and ``S`` sequence slots of the bucket, ``P`` the page-table width
(``max_pages_per_seq``), ``C`` the step's finetuning slots (``min(T, max_finetune_tokens)``),
``M`` the sequence slots of the largest bucket (``max_num_seqs``; the width of the previous
step's sampled tokens), ``R`` the activation-store rows (a padding destination the scatter drops).

Layout of a step: token slots ``[0, n)`` hold the planned chunks back to back in plan order;
slots ``[n, T)`` are padding: token 0 at position 0 with the base model, writing its K/V into the
scratch page 0 (never read), attended by nothing. Sequence slots past the plan have ``kv_len`` 0
and an all-zero page-table row. A finetuning forward chunk, if planned, is the last sequence,
after the inference chunks; its sequence slot samples a token nobody reads.

A token the scheduler planned before its value was known (:data:`~coserve_jax.sched.outputs.PENDING_TOKEN`,
overlapped steps) is read on the device from the previous step's sampled tokens: ``prev_index``
names its sequence slot there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Mapping, Sequence

import jax
import numpy as np

from coserve_jax.engine.input_batch import InputBatch
from coserve_jax.engine.sampler import SamplingInputs
from coserve_jax.finetune.fused import FinetuneForward
from coserve_jax.kernels.paged_attention import AttentionMetadata
from coserve_jax.lora.dropout import LoRADropout
from coserve_jax.sched.outputs import PENDING_TOKEN, SchedulerOutput


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """A compiled step shape: ``num_tokens`` token slots (``T``), ``num_seqs`` sequence slots (``S``)."""

    num_tokens: int
    num_seqs: int


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One input array: its named dimensions, NumPy dtype name and padding value (a number, or
    the name of a dimension whose size is the padding value)."""

    dims: tuple[str, ...]
    dtype: str
    fill: float | int | str = 0


STEP_INPUT_TABLE: dict[str, FieldSpec] = {
    "token_ids": FieldSpec(("T",), "int32"),
    "positions": FieldSpec(("T",), "int32"),
    "adapter_ids": FieldSpec(("T",), "int32"),
    "prev_index": FieldSpec(("T",), "int32", -1),
    "logits_indices": FieldSpec(("S",), "int32"),
    "attn.slot_mapping": FieldSpec(("T",), "int32"),
    "attn.kv_lens": FieldSpec(("S",), "int32"),
    "attn.page_table": FieldSpec(("S", "P"), "int32"),
    "attn.cu_q_lens": FieldSpec(("S+1",), "int32"),
    "attn.num_seqs": FieldSpec((), "int32"),
    "sampling.temperature": FieldSpec(("S",), "float32"),
    "sampling.top_k": FieldSpec(("S",), "int32"),
    "sampling.top_p": FieldSpec(("S",), "float32", 1.0),
    "sampling.seed": FieldSpec(("S",), "uint32"),
    "sampling.sample_index": FieldSpec(("S",), "int32"),
    "dropout.rate": FieldSpec(("T",), "float32"),
    "dropout.seed": FieldSpec(("T",), "uint32"),
    "dropout.position": FieldSpec(("T",), "int32"),
    "finetune.save_slots": FieldSpec(("C",), "int32"),
    "finetune.dest": FieldSpec(("C",), "int32", "R"),
    "finetune.targets": FieldSpec(("C",), "int32"),
    "finetune.weights": FieldSpec(("C",), "float32"),
}
"""Every array of :class:`StepInputs`, by dotted field name (``group.field``)."""

_GROUPS = {"attn": AttentionMetadata, "sampling": SamplingInputs, "dropout": LoRADropout, "finetune": FinetuneForward}
_FINETUNE_GROUPS = ("dropout", "finetune")  # present only on an engine with finetuning


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's flat batch; shapes and dtypes in :data:`STEP_INPUT_TABLE`.

    ``bucket`` is the one static (meta) field: the compiled shape. Every other field is data.
    ``dropout`` and ``finetune`` are ``None`` on an engine without finetuning.
    """

    token_ids: jax.Array  # [T] int32: the token of each slot (padding: 0)
    positions: jax.Array  # [T] int32: its position in its sequence
    adapter_ids: jax.Array  # [T] int32: its LoRA adapter (0: the base model)
    prev_index: jax.Array  # [T] int32: slot in the previous step's sampled tokens to read, or -1
    attn: AttentionMetadata  # slot mapping [T], kv_lens [S], page_table [S, P], cu_q_lens [S+1], num_seqs []
    logits_indices: jax.Array  # [S] int32: the token slot of each sequence's last token
    sampling: SamplingInputs  # [S] each: temperature, top_k, top_p, seed, sample_index
    dropout: LoRADropout | None = None  # [T] each: rate, seed, position (finetuning tokens only)
    finetune: FinetuneForward | None = None  # [C] each: save_slots, dest, targets, weights
    bucket: Bucket = dataclasses.field(default=Bucket(0, 0), metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class StepDims:
    """Sizes of the named dimensions of :data:`STEP_INPUT_TABLE` for one bucket.

    Attributes:
        bucket: ``T`` and ``S``. max_pages_per_seq: ``P``. max_num_seqs: ``M``.
        finetune_tokens: the engine's ``max_finetune_tokens`` (0: no finetuning groups);
            ``C = min(T, finetune_tokens)``. num_store_rows: ``R``.
    """

    bucket: Bucket
    max_pages_per_seq: int
    max_num_seqs: int = 0
    finetune_tokens: int = 0
    num_store_rows: int = 0

    def size(self, dim: str) -> int:
        t, s = self.bucket.num_tokens, self.bucket.num_seqs
        return {
            "T": t, "S": s, "S+1": s + 1, "P": self.max_pages_per_seq, "M": self.max_num_seqs,
            "C": min(t, self.finetune_tokens), "R": self.num_store_rows,
        }[dim]


def make_inputs(dims: StepDims, leaf: Callable[[tuple[int, ...], np.dtype, float | int], object]) -> StepInputs:
    """Build a :class:`StepInputs` whose every array is ``leaf(shape, dtype, fill)`` of its row of
    :data:`STEP_INPUT_TABLE` (e.g. ``np.full`` for real inputs, a ``ShapeDtypeStruct`` for
    compilation)."""
    top: dict[str, object] = {}
    groups: dict[str, dict[str, object]] = {g: {} for g in _GROUPS}
    for name, spec in STEP_INPUT_TABLE.items():
        group, _, field = name.rpartition(".")
        if group in _FINETUNE_GROUPS and not dims.finetune_tokens:
            continue
        fill = dims.size(spec.fill) if isinstance(spec.fill, str) else spec.fill
        value = leaf(tuple(dims.size(d) for d in spec.dims), np.dtype(spec.dtype), fill)
        (groups[group] if group else top)[field] = value
    for group, cls in _GROUPS.items():
        top[group] = cls(**groups[group]) if groups[group] else None
    return StepInputs(**top, bucket=dims.bucket)


def abstract_inputs(dims: StepDims, sharding: jax.sharding.Sharding | None = None) -> StepInputs:
    """``ShapeDtypeStruct`` inputs of a bucket, for ahead-of-time lowering (``sharding``: where the
    inputs are placed, default unspecified)."""
    return make_inputs(dims, lambda shape, dtype, fill: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))


def build_step_inputs(
    plan: SchedulerOutput,
    dims: StepDims,
    page_size: int,
    batch: InputBatch,
    rows: Sequence[int],
    store_rows_per_job: int = 0,
    prev_slots: Mapping[Hashable, int] | None = None,
) -> StepInputs:
    """NumPy inputs of one step.

    Args:
        plan: the scheduler's output (``plan.num_tokens <= T``, ``plan.num_seqs <= S``).
        dims: the bucket and layout (:class:`StepDims`).
        page_size: tokens per page.
        batch: the requests' persistent rows (:class:`~coserve_jax.engine.input_batch.InputBatch`),
            the plan already applied.
        rows: the row of ``batch`` of each inference chunk, in order.
        store_rows_per_job: activation-store rows of one job (its ``max_seq_len``).
        prev_slots: request id -> its sequence slot in the previous step, for chunks that hold a
            :data:`~coserve_jax.sched.outputs.PENDING_TOKEN`.
    Returns:
        :class:`StepInputs` of NumPy arrays.
    Raises:
        KeyError: a pending token of a request that did not sample in the previous step.
    """
    x = make_inputs(dims, lambda shape, dtype, fill: np.full(shape, fill, dtype))
    chunks = plan.chunks
    n_inf = len(chunks)
    # Per chunk only what changes every step is read in Python (tokens, start, length, output
    # index); per-request settings and page tables are gathered from the batch's rows.
    tok: list[int] = []
    starts: list[int] = []
    lens: list[int] = []
    out_idx: list[int] = []
    pending: list[tuple[int, int]] = []  # (token slot, previous sequence slot)
    for c in chunks:
        ids = c.token_ids
        if len(ids) == 1:
            t = ids[0]
            if t == PENDING_TOKEN:
                pending.append((len(tok), prev_slots[c.request_id]))
                t = 0
            tok.append(t)
        else:
            tok.extend(ids)
        starts.append(c.start)
        lens.append(len(ids))
        out_idx.append(c.output_index)
    ft = plan.finetune
    n_seq = n_inf + (ft is not None)
    if ft is not None:  # the training chunk is the last sequence; its table travels whole
        tok.extend(ft.token_ids)
        starts.append(ft.start)
        lens.append(ft.num_tokens)
        out_idx.append(0)
    n_tok = len(tok)
    if not n_seq:
        return x
    start = np.asarray(starts, np.int32)
    n = np.asarray(lens, np.int32)
    cu = np.cumsum(n, dtype=np.int32)
    tok_seq = np.repeat(np.arange(n_seq, dtype=np.int32), n)  # the sequence slot of each token
    positions = x.positions
    positions[:n_tok] = start[tok_seq] + np.arange(n_tok, dtype=np.int32) - (cu - n)[tok_seq]
    x.token_ids[:n_tok] = tok
    r = np.asarray(rows, np.intp)
    page_table = x.attn.page_table
    page_table[:n_inf] = batch.page_table[r]
    s = x.sampling
    s.temperature[:n_inf] = batch.temperature[r]
    s.top_k[:n_inf] = batch.top_k[r]
    s.top_p[:n_inf] = batch.top_p[r]
    s.seed[:n_inf] = batch.seed[r]
    s.sample_index[:n_seq] = out_idx
    adapter = np.empty(n_seq, np.int32)
    adapter[:n_inf] = batch.adapter[r]
    if ft is not None:
        page_table[n_inf, : len(ft.page_table)] = ft.page_table
        adapter[n_inf] = ft.adapter_index
    x.adapter_ids[:n_tok] = adapter[tok_seq]
    p_tok = positions[:n_tok]
    x.attn.slot_mapping[:n_tok] = page_table[tok_seq, p_tok // page_size] * page_size + p_tok % page_size
    for slot, prev in pending:
        x.prev_index[slot] = prev
    x.attn.kv_lens[:n_seq] = start + n
    cq = x.attn.cu_q_lens
    cq[1 : n_seq + 1] = cu
    cq[n_seq + 1 :] = n_tok
    x.logits_indices[:n_seq] = cu - 1
    x.attn.num_seqs[...] = n_seq
    if x.dropout is not None:
        x.dropout.position[:] = positions
        if ft is not None:
            k = ft.num_tokens
            off = n_tok - k
            x.dropout.rate[off:n_tok] = ft.dropout_rate
            x.dropout.seed[off:n_tok] = ft.dropout_seed
            f = x.finetune
            f.save_slots[:k] = np.arange(off, n_tok)
            if not ft.forward_only:  # a validation chunk saves nothing (its rows stay dropped)
                f.dest[:k] = ft.store_row * store_rows_per_job + np.arange(ft.start, ft.start + k)
            f.targets[:k] = ft.targets
            f.weights[:k] = ft.weights
    return x
