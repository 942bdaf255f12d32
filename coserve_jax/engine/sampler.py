"""On-device sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Runs inside the jitted step on the last position of each sequence, so only ``[S]`` token ids (and
their logprobs) come back to the host. Every request carries its own settings, so one batch mixes
greedy and sampled requests.

Reproducibility: the key of request ``r``'s ``i``-th generated token is
``fold_in(key(seed_r), i)``, which depends on nothing else in the batch (nor on preemption, since
``i`` counts generated tokens, not steps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingInputs(NamedTuple):
    """Per-sequence sampling settings, each ``[S]``.

    temperature (float32, 0 = greedy), top_k (int32, <= 0 = off), top_p (float32, 1 = off),
    min_p (float32, 0 = off), seed (uint32), sample_index (int32: tokens this request generated
    before this one), repetition_penalty (float32, 1 = off), row (int32: the sequence's row of
    the persistent seen-token mask, :func:`apply_repetition_penalty`; 0 for padding).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    sample_index: jax.Array
    repetition_penalty: jax.Array
    row: jax.Array


class SamplerOutput(NamedTuple):
    """token_ids int32 ``[S]``; logprobs float32 ``[S]`` (of the chosen token under the raw model
    distribution); top_ids int32 ``[S, N]`` and top_logprobs float32 ``[S, N]`` (the ``N`` most
    likely tokens, ``N = max_logprobs``)."""

    token_ids: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside each row's top-k, then outside its top-p nucleus (over the top-k
    renormalised, as vLLM and HF apply them in this order), to ``-inf``. ``[S, V]`` float32."""
    v = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    rank = jnp.arange(v)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]
    keep = rank < k
    masked = jnp.where(keep, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better-ranked tokens
    keep = keep & ((before < top_p[:, None]) | (rank == 0))
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _filter_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Set logits whose probability is below ``min_p`` times the row's largest to ``-inf``
    (min-p sampling, Nguyen et al. 2024; ``transformers``' ``MinPLogitsWarper``): ``p_i >=
    min_p * p_max`` is ``l_i >= l_max + log(min_p)``. ``[S, V]`` float32."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    keep = logits >= top + jnp.log(jnp.maximum(min_p, 1e-30))[:, None]
    return jnp.where(keep | (min_p[:, None] <= 0), logits, -jnp.inf)


def init_seen_mask(num_rows: int, vocab_size: int) -> jax.Array:
    """The persistent seen-token mask: bool ``[num_rows, V]``, row ``r`` the tokens (prompt and
    generated) of the request in input-batch row ``r`` (row 0: padding, a scratch row)."""
    return jnp.zeros((num_rows, vocab_size), jnp.bool_)


def apply_repetition_penalty(
    seen: jax.Array, logits: jax.Array, params: SamplingInputs, token_ids: jax.Array, positions: jax.Array,
    cu_q_lens: jax.Array, num_seqs: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Record the step's tokens in the seen-token mask and penalize the logits of seen tokens.

    For every sequence with ``repetition_penalty != 1``: its row of ``seen`` is cleared when its
    chunk starts at position 0 (a new request, or one recomputed after preemption), then every
    token of its chunk is marked; a seen token's logit ``l`` becomes ``l / p`` if ``l > 0``
    else ``l * p`` (``transformers``' ``RepetitionPenaltyLogitsProcessor``; CTRL, Keskar et al.
    2019, section 4.1). The prompt reaches the mask chunk by chunk before the first token is
    sampled, and each sampled token as the next step's input, so the set is the prompt and every
    token generated before this one. Sequences with penalty 1 map to the scratch row 0.

    Args:
        seen: bool ``[rows, V]`` (donated by the step).
        logits: float32 ``[S, V]``; params: the step's sampling inputs (``repetition_penalty``,
            ``row``); token_ids, positions: int32 ``[T]``; cu_q_lens: int32 ``[S+1]``;
            num_seqs: int32 scalar.
    Returns:
        ``(seen, logits)``: the updated mask and the penalized logits ``[S, V]``.
    """
    pen = params.repetition_penalty
    s, t = pen.shape[0], token_ids.shape[0]
    valid = jnp.arange(s) < num_seqs
    use = valid & (pen != 1.0)
    row = jnp.where(use, params.row, 0)
    fresh = use & (jnp.take(positions, jnp.minimum(cu_q_lens[:-1], t - 1)) == 0)
    seen = seen.at[jnp.where(fresh, row, 0)].set(False)
    seq_of_token = jnp.clip(jnp.searchsorted(cu_q_lens, jnp.arange(t), side="right") - 1, 0, s - 1)
    in_plan = jnp.arange(t) < cu_q_lens[num_seqs]
    token_row = jnp.where(in_plan, jnp.take(row, seq_of_token), 0)
    seen = seen.at[token_row, token_ids].set(True)
    mask = jnp.take(seen, row, axis=0) & use[:, None]
    p = pen[:, None]
    return seen, jnp.where(mask, jnp.where(logits > 0, logits / p, logits * p), logits)


def sample(logits: jax.Array, params: SamplingInputs, max_logprobs: int, processed: jax.Array | None = None) -> SamplerOutput:
    """Pick one token per row.

    Args:
        logits: float32 ``[S, V]``, the last position of each sequence (the raw model's: the
            returned logprobs are of these).
        params: per-row settings.
        max_logprobs: ``N`` of the returned top logprobs (static, >= 1).
        processed: the logits to choose from, when logits processors (the repetition penalty)
            changed them (default ``logits``).
    Returns:
        :class:`SamplerOutput`.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    processed = logits if processed is None else processed
    greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = processed / temp
    v = logits.shape[-1]
    needs_filter = jnp.any(((params.top_k > 0) & (params.top_k < v)) | (params.top_p < 1.0))
    scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled, params.top_k, params.top_p)
    scaled = jax.lax.cond(jnp.any(params.min_p > 0), _filter_min_p, lambda x, _: x, scaled, params.min_p)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(params.seed, params.sample_index)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    tokens = jnp.where(params.temperature > 0, drawn, greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, max_logprobs)
    return SamplerOutput(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
