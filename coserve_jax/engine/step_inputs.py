"""Host side of the step: turn the scheduler's plan into the padded arrays of a bucket.

Token slots ``[0, n)`` hold the planned chunks back to back in plan order; slots ``[n, T)`` are
padding: token 0 at position 0 with the base model, writing its K/V into the scratch page 0 (never
read), attended by nothing. Sequence slots past the plan have ``kv_len`` 0 and an all-zero page
table row. A finetuning forward chunk, if planned, is the last sequence, after the inference
chunks; its sequence slot samples a token nobody reads.
"""

from __future__ import annotations

import numpy as np

from coserve_jax.engine.sampler import SamplingInputs
from coserve_jax.engine.step import Bucket, StepInputs
from coserve_jax.finetune.fused import FinetuneForward
from coserve_jax.kernels.paged_attention import AttentionMetadata
from coserve_jax.lora.dropout import LoRADropout
from coserve_jax.sched.outputs import ScheduledChunk, SchedulerOutput


def build_step_inputs(
    plan: SchedulerOutput,
    bucket: Bucket,
    page_size: int,
    max_pages_per_seq: int,
    finetune_tokens: int = 0,
    store_rows_per_job: int = 0,
    num_store_rows: int = 0,
) -> StepInputs:
    """NumPy inputs of one step.

    Args:
        plan: the scheduler's output (``plan.num_tokens <= bucket.num_tokens``,
            ``plan.num_seqs <= bucket.num_seqs``).
        bucket: the shapes to pad to.
        page_size: tokens per page.
        max_pages_per_seq: page-table width.
        finetune_tokens: the step's finetuning slots (0: an engine without finetuning; the
            bucket has ``min(T, finetune_tokens)``).
        store_rows_per_job, num_store_rows: activation-store layout
            (:class:`~coserve_jax.finetune.fused.FinetuneLayout`).
    Returns:
        :class:`StepInputs` of NumPy arrays.
    """
    t, s = bucket.num_tokens, bucket.num_seqs
    n_seq = len(plan.chunks)
    # Per-token and per-sequence values are gathered in Python lists (one pass, no small NumPy
    # ops per chunk: most chunks of a busy step are single decode tokens), then copied once.
    tok: list[int] = []
    pos: list[int] = []
    ada: list[int] = []
    slots: list[int] = []
    page_table = np.zeros((s, max_pages_per_seq), np.int32)
    kv_lens = np.zeros(s, np.int32)
    cu = np.zeros(s + 1, np.int32)
    logits_indices = np.zeros(s, np.int32)
    temperature = np.zeros(s, np.float32)
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    seed = np.zeros(s, np.uint32)
    sample_index = np.zeros(s, np.int32)
    seq_kv, seq_cu, seq_temp, seq_k, seq_p, seq_seed, seq_idx = [], [], [], [], [], [], []
    ft = plan.finetune
    chunks = plan.chunks  # not copied on the common path: most steps carry no finetuning chunk
    if ft is not None:
        chunks = [*chunks, ScheduledChunk(ft.job_id, ft.start, ft.token_ids, ft.page_table, False, ft.adapter_index)]
        n_seq += 1
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        table = c.page_table
        tok.extend(c.token_ids)
        ada.extend([c.adapter_index] * n)
        if n == 1:
            pos.append(c.start)
            slots.append(table[c.start // page_size] * page_size + c.start % page_size)
        else:
            r = range(c.start, c.start + n)
            pos.extend(r)
            slots.extend(table[q // page_size] * page_size + q % page_size for q in r)
        page_table[i, : len(table)] = table
        seq_kv.append(c.start + n)
        seq_cu.append(len(tok))
        p = c.sampling
        seq_temp.append(p.temperature)
        seq_k.append(p.top_k)
        seq_p.append(p.top_p)
        seq_seed.append(p.seed)
        seq_idx.append(c.output_index)
    off = len(tok)
    token_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    adapter_ids = np.zeros(t, np.int32)
    slot_mapping = np.zeros(t, np.int32)
    token_ids[:off] = tok
    positions[:off] = pos
    adapter_ids[:off] = ada
    slot_mapping[:off] = slots
    kv_lens[:n_seq] = seq_kv
    cu[1 : n_seq + 1] = seq_cu
    cu[n_seq + 1 :] = off
    logits_indices[:n_seq] = np.asarray(seq_cu, np.int32) - 1
    temperature[:n_seq] = seq_temp
    top_k[:n_seq] = seq_k
    top_p[:n_seq] = seq_p
    seed[:n_seq] = seq_seed
    sample_index[:n_seq] = seq_idx
    dropout = finetune = None
    if finetune_tokens:
        c = min(t, finetune_tokens)
        rate = np.zeros(t, np.float32)
        dseed = np.zeros(t, np.uint32)
        save_slots = np.zeros(c, np.int32)
        dest = np.full(c, num_store_rows, np.int32)
        targets = np.zeros(c, np.int32)
        weights = np.zeros(c, np.float32)
        if ft is not None:
            n = ft.num_tokens
            first = off - n
            rate[first:off] = ft.dropout_rate
            dseed[first:off] = ft.dropout_seed
            save_slots[:n] = np.arange(first, off)
            if not ft.forward_only:  # a validation chunk saves nothing (its rows stay dropped)
                dest[:n] = ft.store_row * store_rows_per_job + np.arange(ft.start, ft.start + n)
            targets[:n] = ft.targets
            weights[:n] = ft.weights
        dropout = LoRADropout(rate, dseed, positions)
        finetune = FinetuneForward(save_slots, dest, targets, weights)
    return StepInputs(
        token_ids=token_ids,
        positions=positions,
        adapter_ids=adapter_ids,
        attn=AttentionMetadata(slot_mapping, kv_lens, page_table, cu, np.int32(n_seq)),
        logits_indices=logits_indices,
        sampling=SamplingInputs(temperature, top_k, top_p, seed, sample_index),
        dropout=dropout,
        finetune=finetune,
    )
