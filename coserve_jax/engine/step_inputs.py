"""Host side of the step: turn the scheduler's plan into the padded arrays of a bucket.

Token slots ``[0, n)`` hold the planned chunks back to back in plan order; slots ``[n, T)`` are
padding: token 0 at position 0 with the base model, writing its K/V into the scratch page 0 (never
read), attended by nothing. Sequence slots past the plan have ``kv_len`` 0 and an all-zero page
table row.
"""

from __future__ import annotations

import numpy as np

from coserve_jax.engine.sampler import SamplingInputs
from coserve_jax.engine.step import Bucket, StepInputs
from coserve_jax.kernels.paged_attention import AttentionMetadata
from coserve_jax.sched.scheduler import SchedulerOutput


def build_step_inputs(plan: SchedulerOutput, bucket: Bucket, page_size: int, max_pages_per_seq: int) -> StepInputs:
    """NumPy inputs of one step.

    Args:
        plan: the scheduler's output (``plan.num_tokens <= bucket.num_tokens``,
            ``plan.num_seqs <= bucket.num_seqs``).
        bucket: the shapes to pad to.
        page_size: tokens per page.
        max_pages_per_seq: page-table width.
    Returns:
        :class:`StepInputs` of NumPy arrays.
    """
    t, s = bucket.num_tokens, bucket.num_seqs
    token_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    adapter_ids = np.zeros(t, np.int32)
    slot_mapping = np.zeros(t, np.int32)
    kv_lens = np.zeros(s, np.int32)
    page_table = np.zeros((s, max_pages_per_seq), np.int32)
    cu = np.zeros(s + 1, np.int32)
    logits_indices = np.zeros(s, np.int32)
    temperature = np.zeros(s, np.float32)
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    seed = np.zeros(s, np.uint32)
    sample_index = np.zeros(s, np.int32)
    off = 0
    for i, c in enumerate(plan.chunks):
        n = c.num_tokens
        end = off + n
        req = c.request
        token_ids[off:end] = c.token_ids
        pos = np.arange(c.start, c.start + n, dtype=np.int32)
        positions[off:end] = pos
        adapter_ids[off:end] = req.adapter_index
        table = np.asarray(c.page_table, np.int32)
        slot_mapping[off:end] = table[pos // page_size] * page_size + pos % page_size
        page_table[i, : len(table)] = table
        kv_lens[i] = c.start + n
        cu[i + 1] = end
        logits_indices[i] = end - 1
        p = req.params
        temperature[i] = p.temperature
        top_k[i] = p.top_k
        top_p[i] = p.top_p
        seed[i] = req.seed
        sample_index[i] = len(req.output_token_ids)
        off = end
    cu[len(plan.chunks) + 1 :] = off
    return StepInputs(
        token_ids=token_ids,
        positions=positions,
        adapter_ids=adapter_ids,
        attn=AttentionMetadata(slot_mapping, kv_lens, page_table, cu, np.int32(len(plan.chunks))),
        logits_indices=logits_indices,
        sampling=SamplingInputs(temperature, top_k, top_p, seed, sample_index),
    )
