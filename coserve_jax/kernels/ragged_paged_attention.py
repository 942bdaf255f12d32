"""Ragged paged attention as a Pallas kernel (Triton-style ``pallas_call``; see docs/kernels.md).

One call computes the attention of every query token of a step: decode tokens and prefill chunks
of many sequences packed back to back in ``q [T, Hq, D]``, over K/V held in pages.

Work split. Each sequence's query tokens are cut into *query blocks* of ``block_q`` tokens; a
program handles one query block against one KV head, i.e. a tile of ``block_q * G`` query rows
(the ``G = Hq / Hkv`` query heads sharing the KV head, padded to a power of two), so K/V pages
are read once per group, not once per query head (GQA as in vLLM's unified Triton attention). The
grid is ``(T // block_q + S, Hkv)``, a static upper bound on the blocks of any batch of that
bucket; programs past the last real block return at once. Inside a program a loop walks the
sequence's pages (one page per iteration) with an online softmax in float32
(FlashAttention-2, Dao 2023, Algorithm 1), stopping at the last key any row of the tile can see,
and applies the causal mask inside the chunk and the KV-length mask.

Layout: ``k_cache, v_cache: [L, P, page_size, Hkv, D]`` (all layers in one buffer, so the fused
step donates and updates a single array per K and V and the kernel takes the layer as a scalar;
see docs/kernels.md for why token-major pages).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def _kernel(
    # scalar-ish metadata (int32 arrays)
    layer_ref,  # [1]
    num_blocks_ref,  # [1]
    block_seq_ref,  # [NB]
    block_start_ref,  # [NB]  first query token of the block (flat index)
    cu_q_ref,  # [S + 1]
    kv_lens_ref,  # [S]
    page_table_ref,  # [S, MP]
    # tensors
    q_ref,  # [Hkv, (T + block_q) * G, D]
    k_ref,  # [L, P, page, Hkv, D]
    v_ref,  # [L, P, page, Hkv, D]
    o_ref,  # [Hkv, (T + block_q) * G, D]
    *,
    block_q: int,
    group: int,
    page_size: int,
    scale: float,
):
    b = pl.program_id(0)
    h = pl.program_id(1)
    rows = block_q * group

    @pl.when(b < num_blocks_ref[0])
    def _():
        layer = layer_ref[0]
        seq = block_seq_ref[b]
        start = block_start_ref[b]
        seq_start = cu_q_ref[seq]
        seq_end = cu_q_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        q_len = seq_end - seq_start
        # Row r of the tile is token start + r // group.
        tok = start + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) // group
        row_valid = tok < seq_end
        q_pos = kv_len - q_len + (tok - seq_start)  # absolute position of each row's token
        last_tok = jnp.minimum(start + block_q, seq_end) - 1
        kv_stop = kv_len - q_len + (last_tok - seq_start) + 1  # keys any row may see
        num_pages = (kv_stop + page_size - 1) // page_size

        qb = plt.load(q_ref.at[h, pl.ds(start * group, rows), :])  # [rows, D]

        def body(j, carry):
            m_i, l_i, acc = carry
            page = page_table_ref[seq, j]
            k = plt.load(k_ref.at[layer, page, :, h, :])  # [page, D]
            v = plt.load(v_ref.at[layer, page, :, h, :])
            s = jax.lax.dot_general(qb, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            kv_pos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
            mask = (kv_pos <= q_pos[:, None]) & (kv_pos < kv_len)
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m_i - m_new)
            l_new = l_i * alpha + jnp.sum(p, axis=1)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return m_new, l_new, acc * alpha[:, None] + pv

        d = qb.shape[-1]
        init = (
            jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32),
        )
        _, l_i, acc = jax.lax.fori_loop(0, num_pages, body, init)
        out = acc / jnp.where(l_i > 0.0, l_i, 1.0)[:, None]
        plt.store(o_ref.at[h, pl.ds(start * group, rows), :], out.astype(o_ref.dtype), mask=row_valid[:, None])


def query_blocks(cu_q_lens: jax.Array, num_seqs: jax.Array, num_blocks_max: int, block_q: int):
    """Map each program of the grid's first axis to ``(sequence, first query token)``.

    Args:
        cu_q_lens: int32 ``[S + 1]`` query offsets (entries past ``num_seqs`` equal the total).
        num_seqs: int32 scalar.
        num_blocks_max: static grid size (``T // block_q + S`` bounds every batch).
    Returns:
        ``(num_blocks [1], block_seq [NB], block_start [NB])``, int32.
    """
    s = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    in_use = jnp.arange(s) < num_seqs
    nb = jnp.where(in_use, (q_lens + block_q - 1) // block_q, 0)
    cu_nb = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(nb).astype(jnp.int32)])
    b = jnp.arange(num_blocks_max, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_nb, b, side="right").astype(jnp.int32) - 1, 0, s - 1)
    start = cu_q_lens[seq] + (b - cu_nb[seq]) * block_q
    return cu_nb[-1:], seq, start.astype(jnp.int32)


TRITON_PARAMS = plt.CompilerParams(num_warps=4, num_stages=2)
"""The kernel's Pallas Triton settings (Triton's defaults, made explicit: they also select the
Triton backend on every jax in the supported range)."""


def default_block_q(group: int) -> int:
    """Query tokens per block: 16 query rows per tile (the smallest Hopper MMA tile height)."""
    return max(1, 16 // pl.next_power_of_2(group))


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "interpret"))
def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    scale: float,
    block_q: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal GQA attention of packed query tokens over paged K/V (this step's K/V already written).

    Same contract as :func:`coserve_jax.kernels.reference.ragged_paged_attention_ref`, over the
    all-layer cache.

    Args:
        q: ``[T, Hq, D]`` (bf16/fp16/fp32).
        k_cache, v_cache: ``[L, P, page_size, Hkv, D]``.
        layer: int32 scalar, the layer whose pages to read.
        kv_lens: int32 ``[S]`` KV length of each sequence after this step.
        page_table: int32 ``[S, max_pages]``.
        cu_q_lens: int32 ``[S + 1]``; sequence ``s``'s queries are ``q[cu_q_lens[s]:cu_q_lens[s+1]]``,
            the last ``q_len`` positions of its ``kv_lens[s]`` tokens.
        num_seqs: int32 scalar, sequences in use; query slots past ``cu_q_lens[num_seqs]`` are padding.
        scale: score multiplier (``D ** -0.5``).
        block_q: query tokens per program (default :func:`default_block_q`).
        interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype; padding slots are zeros.
    """
    t, hq, d = q.shape
    _, _, page_size, hkv, _ = k_cache.shape
    s = page_table.shape[0]
    group = hq // hkv
    gp = pl.next_power_of_2(group)
    bq = block_q or default_block_q(group)
    nb_max = t // bq + s
    # [T, Hkv, G, D] -> pad G to a power of two, pad T by one block so no tile runs off the end,
    # -> [Hkv, (T + bq) * Gp, D]: the rows of a block of tokens are contiguous.
    qg = q.reshape(t, hkv, group, d)
    qg = jnp.pad(qg, ((0, bq), (0, 0), (0, gp - group), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(hkv, (t + bq) * gp, d)
    num_blocks, block_seq, block_start = query_blocks(cu_q_lens, num_seqs, nb_max, bq)
    kernel = functools.partial(_kernel, block_q=bq, group=gp, page_size=page_size, scale=scale)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        grid=(nb_max, hkv),
        interpret=interpret,
        # Explicitly Pallas Triton: without compiler_params, jax <= 0.11.1 picks Mosaic GPU for a
        # GPU lowering, which this kernel's whole-array refs do not fit (its shared memory check
        # fails at any real cache size).
        compiler_params=TRITON_PARAMS,
        name="ragged_paged_attention",
    )(
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        num_blocks,
        block_seq,
        block_start,
        cu_q_lens,
        kv_lens,
        page_table,
        qg,
        k_cache,
        v_cache,
    )
    out = out.reshape(hkv, t + bq, gp, d)[:, :t, :group].transpose(1, 0, 2, 3).reshape(t, hq, d)
    valid = jnp.arange(t) < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], out, jnp.zeros((), q.dtype))
