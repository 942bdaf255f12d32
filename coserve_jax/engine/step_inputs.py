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
and an all-zero page-table row. Finetuning forward chunks, if planned, are the last sequences,
after the inference chunks; their sequence slots sample tokens nobody reads.

A token the scheduler planned before its value was known (:data:`~coserve_jax.sched.outputs.PENDING_TOKEN`,
overlapped steps) is read on the device from the previous step's sampled tokens: ``prev_index``
names its sequence slot there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable, Mapping, Sequence

import jax
import numpy as np

from coserve_jax.engine.input_batch import InputBatch
from coserve_jax.engine.sampler import SamplingInputs
from coserve_jax.finetune.fused import FinetuneForward
from coserve_jax.kernels.paged_attention import AttentionMetadata
from coserve_jax.lora.dropout import LoRADropout
from coserve_jax.sched.outputs import PENDING_TOKEN, DecodeChunks, SchedulerOutput


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
    "sampling.min_p": FieldSpec(("S",), "float32"),
    "sampling.seed": FieldSpec(("S",), "uint32"),
    "sampling.sample_index": FieldSpec(("S",), "int32"),
    "sampling.repetition_penalty": FieldSpec(("S",), "float32", 1.0),
    "sampling.row": FieldSpec(("S",), "int32"),
    "dropout.rate": FieldSpec(("T",), "float32"),
    "dropout.seed": FieldSpec(("T",), "uint32"),
    "dropout.position": FieldSpec(("T",), "int32"),
    "finetune.save_slots": FieldSpec(("C",), "int32"),
    "finetune.dest": FieldSpec(("C",), "int32", "R"),
    "finetune.targets": FieldSpec(("C",), "int32"),
    "finetune.weights": FieldSpec(("C",), "float32"),
    "finetune.loss_code": FieldSpec(("C",), "int32"),
    "finetune.loss_params": FieldSpec(("C", "3"), "float32"),
    "finetune.seq": FieldSpec(("C",), "int32", "S"),
    "finetune.head_index": FieldSpec(("C",), "int32", "C"),
    "finetune.head_bucket": FieldSpec((), "int32"),
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
    sampling: SamplingInputs  # [S] each: temperature, top_k, top_p, min_p, seed, sample_index, repetition_penalty, row
    dropout: LoRADropout | None = None  # [T] each: rate, seed, position (finetuning tokens only)
    finetune: FinetuneForward | None = None  # [C] each: save_slots, dest, targets, weights, loss_code, loss_params [C, 3], seq, head_index; head_bucket []
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
            "C": min(t, self.finetune_tokens), "R": self.num_store_rows, "3": 3,
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


_GATHERED = {  # per-sequence fields read from the batch's rows (row 0: the padding row)
    "attn.page_table": "page_table", "sampling.temperature": "temperature", "sampling.top_k": "top_k",
    "sampling.top_p": "top_p", "sampling.min_p": "min_p", "sampling.seed": "seed",
    "sampling.repetition_penalty": "repetition_penalty",
}


_Fields = list[tuple[str, np.ndarray, str | None]]  # (field, padding array, InputBatch field gathered into it)


@functools.lru_cache(maxsize=64)
def _padding_template(dims: StepDims) -> tuple[_Fields, list[tuple[str, type, _Fields]]]:
    """A bucket's all-padding arrays, as the top-level fields and the groups' fields (a
    constructor call per group is cheaper than ``jax.tree.unflatten``)."""
    x = make_inputs(dims, lambda shape, dtype, fill: np.full(shape, fill, dtype))

    def fields(obj, group: str | None) -> _Fields:
        names = obj._fields if isinstance(obj, tuple) else [f.name for f in dataclasses.fields(obj)]  # NamedTuple or dataclass
        return [(n, getattr(obj, n), _GATHERED.get(f"{group}.{n}" if group else n))
                for n in names if isinstance(getattr(obj, n), np.ndarray)]

    groups = [(g, cls, fields(getattr(x, g), g)) for g, cls in _GROUPS.items() if getattr(x, g) is not None]
    return fields(x, None), groups


@functools.lru_cache(maxsize=16)
def _arange_upto(n: int) -> np.ndarray:
    a = np.arange(n, dtype=np.int32)
    a.flags.writeable = False
    return a


def _arange(n: int) -> np.ndarray:
    """``np.arange(n, dtype=int32)``, read-only, from a cached array."""
    size = 1 << max(n - 1, 0).bit_length()
    return _arange_upto(size)[:n]


def _padding(dims: StepDims, batch: InputBatch, rows: Sequence[int]) -> tuple[StepInputs, np.ndarray]:
    """Fresh NumPy inputs of a bucket: copies of a cached template holding only padding (a
    copy is cheaper than filling every array anew), except the per-sequence fields kept in
    ``batch``, gathered at once for ``rows`` followed by the batch's padding row. Returns the
    inputs and those rows (``[S]`` intp)."""
    top, groups = _padding_template(dims)
    r = np.zeros(dims.bucket.num_seqs, np.intp)
    r[: len(rows)] = rows

    def fresh(fields: _Fields) -> dict[str, np.ndarray]:
        return {name: a.copy() if g is None else getattr(batch, g).take(r, axis=0) for name, a, g in fields}

    kw = fresh(top)
    for g, cls, fields in groups:
        kw[g] = cls(**fresh(fields))
    kw["sampling"].row[:] = r  # each sequence's row: where its seen-token mask lives on the device
    return StepInputs(**kw, bucket=dims.bucket), r


def build_step_inputs(
    plan: SchedulerOutput,
    dims: StepDims,
    page_size: int,
    batch: InputBatch,
    rows: Sequence[int],
    prev_slots: Mapping[Hashable, int] | None = None,
) -> StepInputs:
    """NumPy inputs of one step.

    Args:
        plan: the scheduler's output (``plan.num_tokens <= T``, ``plan.num_seqs <= S``).
        dims: the bucket and layout (:class:`StepDims`).
        page_size: tokens per page.
        batch: the requests' persistent rows (:class:`~coserve_jax.engine.input_batch.InputBatch`),
            the plan already applied.
        rows: the row of ``batch`` of each inference chunk, in order (what :meth:`InputBatch.apply` returns).
        prev_slots: request id -> its sequence slot in the previous step, for chunks that hold a
            :data:`~coserve_jax.sched.outputs.PENDING_TOKEN`.
    Returns:
        :class:`StepInputs` of NumPy arrays.
    Raises:
        KeyError: a pending token of a request that did not sample in the previous step.
    """
    x, r = _padding(dims, batch, rows)
    # Per sequence only what changes every step travels (tokens, start, length, output index);
    # per-request settings and page tables are gathered from the batch's rows.
    d, pre = plan.decodes, plan.prefills
    n_dec = len(d.request_ids)
    n_inf = n_dec + len(pre)
    ft = plan.finetune
    n_seq = n_inf + len(ft)
    if not n_seq:
        return x
    positions = x.positions
    if not pre and not ft:  # decodes only (a busy server's usual step): one token each
        return _decodes_only(x, r[:n_dec], d, page_size, prev_slots, plan.has_pending_tokens, batch)
    tok = list(d.token_ids)
    for c in pre:
        tok.extend(c.token_ids)
    starts = d.starts + [c.start for c in pre]
    lens = [1] * n_dec + [len(c.token_ids) for c in pre]
    out_idx = d.output_index + [c.output_index for c in pre]
    for c in ft:  # the training chunks are the last sequences; their tables travel whole
        tok.extend(c.token_ids)
        starts.append(c.start)
        lens.append(c.num_tokens)
        out_idx.append(0)
    n_tok = len(tok)
    start = np.asarray(starts, np.int32)
    n = np.asarray(lens, np.int32)
    cu = np.cumsum(n, dtype=np.int32)
    tok_seq = np.repeat(_arange(n_seq), n)
    positions[:n_tok] = start[tok_seq] + _arange(n_tok) - (cu - n)[tok_seq]
    x.token_ids[:n_tok] = tok
    if plan.has_pending_tokens:  # only decodes hold pending tokens
        _link_pending(x, d, prev_slots)
    page_table = x.attn.page_table
    x.sampling.sample_index[:n_seq] = out_idx
    adapter = np.empty(n_seq, np.int32)
    adapter[:n_inf] = batch.adapter[r[:n_inf]]
    for j, c in enumerate(ft, n_inf):
        page_table[j, : len(c.page_table)] = c.page_table
        adapter[j] = c.adapter_index
    x.adapter_ids[:n_tok] = adapter[tok_seq]
    p_tok = positions[:n_tok]
    x.attn.slot_mapping[:n_tok] = page_table[tok_seq, p_tok // page_size] * page_size + p_tok % page_size
    x.attn.kv_lens[:n_seq] = start + n
    cq = x.attn.cu_q_lens
    cq[1 : n_seq + 1] = cu
    cq[n_seq + 1 :] = n_tok
    x.logits_indices[:n_seq] = cu - 1
    x.attn.num_seqs[...] = n_seq
    if x.dropout is not None:
        x.dropout.position[:] = positions
        if ft:
            f = x.finetune
            off = n_inf_tok = n_tok - plan.num_finetune_tokens
            for j, c in enumerate(ft, n_inf):
                k = c.num_tokens
                x.dropout.rate[off:off + k] = c.dropout_rate
                x.dropout.seed[off:off + k] = c.dropout_seed
                i = off - n_inf_tok
                if c.store_row >= 0:  # a validation chunk saves nothing (its rows stay dropped)
                    f.dest[i:i + k] = np.arange(c.store_row, c.store_row + k)
                f.targets[i:i + k] = c.targets
                f.weights[i:i + k] = c.weights
                if c.loss_code:  # a policy loss: the sampler's logprobs and the clip range
                    f.loss_code[i:i + k] = c.loss_code
                    f.loss_params[i:i + k, 0] = c.sampler_logprobs
                    f.loss_params[i:i + k, 1:] = c.clip
                f.seq[i:i + k] = j
                off += k
            f.save_slots[: off - n_inf_tok] = np.arange(n_inf_tok, off)
            head = f.weights != 0  # the loss head runs on the weighted tokens, and those whose logprobs are asked
            at = 0
            for c in ft:
                if c.return_logprobs:
                    head[at:at + c.num_tokens] = True
                at += c.num_tokens
            heads = np.flatnonzero(head)
            f.head_index[: len(heads)] = heads
            f.head_bucket[...] = head_bucket(len(heads), len(f.weights))
    return x


def head_sizes(c: int) -> tuple[int, ...]:
    """The loss head's compiled sizes for ``C`` finetuning slots: powers of two from 16 below
    ``C``, then ``C``."""
    out, n = [], 16
    while n < c:
        out.append(n)
        n *= 2
    return tuple(out) + (c,) if c else ()


def head_bucket(n: int, c: int) -> int:
    """The branch of the loss head for ``n`` weighted tokens of ``C = c`` slots: 0 (no head) for
    none, else 1 + the index of the smallest of :func:`head_sizes` holding ``n``."""
    if n == 0:
        return 0
    for i, size in enumerate(head_sizes(c), 1):
        if size >= n:
            return i
    raise ValueError(f"{n} weighted tokens exceed the {c} finetuning slots")


def _link_pending(x: StepInputs, d: DecodeChunks, prev_slots: Mapping[Hashable, int]) -> None:
    """Point each decode that holds a :data:`PENDING_TOKEN` at its request's sequence slot in
    the previous step (``prev_index``); its token id becomes 0 until the step reads the token.

    Raises:
        KeyError: a request that did not sample in the previous step.
    """
    slots = np.flatnonzero(x.token_ids[: len(d.request_ids)] == PENDING_TOKEN)
    ids = d.request_ids
    x.prev_index[slots] = [prev_slots[ids[i]] for i in slots.tolist()]
    x.token_ids[slots] = 0


def _decodes_only(
    x: StepInputs, rows: np.ndarray, d: DecodeChunks, page_size: int, prev_slots, pending: bool, batch: InputBatch
) -> StepInputs:
    """The rest of :func:`build_step_inputs` for a step of decodes only: sequence ``i`` is
    token ``i``, so every per-token field is a per-sequence one and needs no index arithmetic."""
    n = len(d.request_ids)
    start = np.asarray(d.starts, np.int32)
    seq = _arange(n + 1)
    x.positions[:n] = start
    x.token_ids[:n] = d.token_ids
    if pending:
        _link_pending(x, d, prev_slots)
    x.sampling.sample_index[:n] = d.output_index
    x.adapter_ids[:n] = batch.adapter.take(rows)
    # a decode's position is in its sequence's last page (tables hold exactly the pages of their tokens)
    x.attn.slot_mapping[:n] = batch.last_page.take(rows) * page_size + start % page_size
    x.attn.kv_lens[:n] = start + 1
    cq = x.attn.cu_q_lens
    cq[: n + 1] = seq
    cq[n + 1 :] = n
    x.logits_indices[:n] = seq[:n]
    x.attn.num_seqs[...] = n
    if x.dropout is not None:
        x.dropout.position[:] = x.positions
    return x
