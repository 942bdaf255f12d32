"""Pure-JAX ragged paged attention: the oracle the Pallas kernel is tested against.

Layout (one layer): ``k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]``.
Sequence ``s`` owns pages ``page_table[s, :]`` in token order; its KV length after this step is
``kv_lens[s]`` (tokens already cached plus this step's query tokens). Its query tokens are
``q[cu_q_lens[s]:cu_q_lens[s+1]]``, the last ``q_len`` tokens of the sequence (one decode token
or a prefill chunk). Slots past ``cu_q_lens[num_seqs]`` are padding and return zeros.

Runs everywhere: it gathers each sequence's pages up to a width that covers the step's live
context, the longest ``kv_lens`` rounded up to one of :func:`page_width_buckets` (widths a factor
4 apart, from 512 tokens to the page table's width; a ``lax.switch``), so a step's memory and
work follow the context in use, not ``max_model_len`` (memory ``O(S * live_kv_len)``), and
multiplies each sequence's query rows with its own keys
(``jax.lax.ragged_dot``, a grouped matmul; for decode-like shapes, ``T <= 2 S``, each token's
keys are indexed instead, ``O(T * max_kv_len)``, which is faster there), so it is for tests and CPU
runs, not for speed. XLA's CPU ``ragged_dot`` costs a dense product per group, used or not, so
the grouped form runs over only the first ``g`` sequence slots, ``g`` the smallest power of two
(or ``S``) holding the step's sequences (a ``lax.switch``): a step of one long prefill or
training chunk in a bucket of many sequence slots pays for one group, not ``S``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into their pages.

    Args:
        k_pages, v_pages: ``[P, page_size, Hkv, D]``.
        k, v: ``[T, Hkv, D]``, the new tokens' keys and values.
        slot_mapping: int32 ``[T]``, ``page * page_size + offset`` of each token (padding slots point
            into the reserved scratch page 0).
    Returns:
        The updated ``(k_pages, v_pages)``.
    """
    p, page, h, d = k_pages.shape
    kf = k_pages.reshape(p * page, h, d).at[slot_mapping].set(k.astype(k_pages.dtype))
    vf = v_pages.reshape(p * page, h, d).at[slot_mapping].set(v.astype(v_pages.dtype))
    return kf.reshape(p, page, h, d), vf.reshape(p, page, h, d)


def ragged_paged_attention_ref(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    scale: float,
    layer: jax.Array | None = None,
) -> jax.Array:
    """Causal GQA attention of packed query tokens over paged K/V (K/V of this step already written).

    Args:
        q: ``[T, Hq, D]``.
        k_pages, v_pages: ``[P, page_size, Hkv, D]``.
        kv_lens: int32 ``[S]``; page_table: int32 ``[S, max_pages]``; cu_q_lens: int32 ``[S + 1]``.
        num_seqs: int32 scalar, sequences in use (``<= S``).
        scale: score multiplier (``D ** -0.5``).
        layer: with the all-layer cache ``[L, P, page_size, Hkv, D]``, the layer to read (int32
            scalar); its pages are gathered directly, without copying the layer out first.
    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype; softmax in float32; padding slots are zeros.
    """
    t, hq, d = q.shape
    s_max, max_pages = page_table.shape
    page = k_pages.shape[-3]

    def attend(table: jax.Array) -> jax.Array:  # over the first table.shape[1] pages of each sequence
        if t <= 2 * s_max:  # decode-like buckets: indexing the keys per token costs little, and is faster there
            qg, k_seq, v_seq, seq, mask = gather_inputs(q, k_pages, v_pages, kv_lens, table, cu_q_lens, num_seqs, layer)
            return attend_per_token(qg, k_seq, v_seq, seq, mask, scale)

        def first(g: int):  # the grouped form over the first g sequence slots (num_seqs <= g)
            def run():
                qg, k_seq, v_seq, _, mask = gather_inputs(
                    q, k_pages, v_pages, kv_lens[:g], table[:g], cu_q_lens[: g + 1], num_seqs, layer)
                return attend_grouped(qg, k_seq, v_seq, cu_q_lens[: g + 1], mask, scale)
            return run

        sizes = [1 << i for i in range(s_max.bit_length()) if 1 << i < s_max] + [s_max]
        branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), num_seqs, side="left")
        return jax.lax.switch(jnp.minimum(branch, len(sizes) - 1), [first(g) for g in sizes])

    widths = page_width_buckets(max_pages, page)
    if len(widths) == 1:
        out = attend(page_table)
    else:
        live = jnp.where(jnp.arange(s_max) < num_seqs, kv_lens, 0)
        live_pages = (jnp.max(live) + page - 1) // page
        branch = jnp.searchsorted(jnp.asarray(widths, jnp.int32), live_pages, side="left")
        out = jax.lax.switch(jnp.minimum(branch, len(widths) - 1), [lambda w=w: attend(page_table[:, :w]) for w in widths])
    return out.reshape(t, hq, d)


MIN_GATHER_TOKENS = 512
"""The narrowest gather width of :func:`page_width_buckets`, in tokens."""


def page_width_buckets(max_pages: int, page_size: int, factor: int = 4) -> tuple[int, ...]:
    """The page-table widths the reference attention is compiled for, ascending: ``max_pages``,
    then ``max_pages / factor``, ``/ factor**2`` ... (rounded up) while a width holds at least
    :data:`MIN_GATHER_TOKENS` tokens. A step gathers the smallest width holding its longest live
    sequence: at most ``factor`` times the pages in use (or 512 tokens' worth).

    Example: 131072 tokens of pages of 16 (8192 pages) -> ``(32, 128, 512, 2048, 8192)``.
    """
    widths = [max_pages]
    floor = -(-MIN_GATHER_TOKENS // page_size)
    while widths[-1] // factor >= floor and widths[-1] > floor:
        widths.append(-(-widths[-1] // factor))
    return tuple(sorted(set(widths)))


def scratch_bytes(num_tokens: int, num_seqs: int, width: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  itemsize: int) -> int:
    """Bytes of the temporaries one layer's reference attention makes for a step of
    ``num_tokens`` token and ``num_seqs`` sequence slots gathering ``width`` tokens of context:
    each sequence's K and V pages (``[S, W, Hkv, D]`` twice), for decode-like shapes
    (``T <= 2 S``) each token's K and V (``[T, W, Hkv, D]`` twice), the float32 scores and
    probabilities (``[T, Hq, W]`` twice) and the mask (``[T, W]``). The layers run one after
    another (a scan), so this is the step's attention scratch, not per layer times layers.
    """
    kv = 2 * num_seqs * width * num_kv_heads * head_dim * itemsize
    if num_tokens <= 2 * num_seqs:
        kv += 2 * num_tokens * width * num_kv_heads * head_dim * itemsize
    return kv + 2 * num_tokens * num_heads * width * 4 + num_tokens * width


def gather_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, layer=None):
    """What both attention formulations take (arguments as :func:`ragged_paged_attention_ref`).

    Returns:
        ``qg [T, Hkv, G, D]``, ``k_seq, v_seq [S, KV, Hkv, D]`` (each sequence's pages, KV =
        ``max_pages * page_size``), ``seq [T]`` (each query token's sequence) and the causal /
        KV-length / padding ``mask [T, KV]``.
    """
    t, hq, d = q.shape
    page, hkv = k_pages.shape[-3], k_pages.shape[-2]
    s_max, max_pages = page_table.shape
    kv_width = max_pages * page
    tok = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, tok, side="right") - 1, 0, s_max - 1)
    valid = tok < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (tok - cu_q_lens[seq])  # absolute position of each query
    if layer is None:
        k_seq, v_seq = k_pages[page_table], v_pages[page_table]
    else:
        k_seq, v_seq = k_pages[layer, page_table], v_pages[layer, page_table]
    k_seq = k_seq.reshape(s_max, kv_width, hkv, d)
    v_seq = v_seq.reshape(s_max, kv_width, hkv, d)
    kv_pos = jnp.arange(kv_width)
    mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_lens[seq][:, None]) & valid[:, None]
    return q.reshape(t, hkv, hq // hkv, d), k_seq, v_seq, seq, mask


def _softmax(scores, mask, dtype):
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0).astype(dtype)


def attend_per_token(qg, k_seq, v_seq, seq, mask, scale):
    """Attention with each query token's keys indexed by its sequence (a ``[T, KV, Hkv, D]``
    copy): ``qg [T, Hkv, G, D]``, ``k_seq, v_seq [S, KV, Hkv, D]``, ``seq [T]``, ``mask [T, KV]``
    -> ``[T, Hkv, G, D]``."""
    scores = jnp.einsum("thgd,tkhd->thgk", qg, k_seq[seq], preferred_element_type=jnp.float32) * scale
    probs = _softmax(scores, mask[:, None, None, :], qg.dtype)
    return jnp.einsum("thgk,tkhd->thgd", probs, v_seq[seq], preferred_element_type=jnp.float32).astype(qg.dtype)


def attend_grouped(qg, k_seq, v_seq, cu_q_lens, mask, scale):
    """The same as :func:`attend_per_token` as a grouped matmul (``jax.lax.ragged_dot``): the
    query rows of sequence ``s`` (contiguous, ``cu_q_lens[s]..cu_q_lens[s+1]``) times sequence
    ``s``'s K or V, so no per-token copy of the keys is made. Rows past the last group (padding
    slots) come out zero."""
    t, hkv, g, d = qg.shape
    kv_width = k_seq.shape[1]
    rows = jnp.clip(cu_q_lens[1:] - cu_q_lens[:-1], 0, t).astype(jnp.int32) * g  # [S] rows per group
    outs = []
    for h in range(hkv):
        lhs = qg[:, h].reshape(t * g, d)
        scores = jax.lax.ragged_dot(lhs, jnp.swapaxes(k_seq[:, :, h], 1, 2), rows, preferred_element_type=jnp.float32)
        probs = _softmax(scores.reshape(t, g, kv_width) * scale, mask[:, None, :], qg.dtype)
        out = jax.lax.ragged_dot(probs.reshape(t * g, kv_width), v_seq[:, :, h], rows, preferred_element_type=jnp.float32)
        outs.append(out.reshape(t, g, d).astype(qg.dtype))
    return jnp.stack(outs, axis=1)
