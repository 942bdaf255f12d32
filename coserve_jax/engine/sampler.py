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
    before this one).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    sample_index: jax.Array


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


def sample(logits: jax.Array, params: SamplingInputs, max_logprobs: int) -> SamplerOutput:
    """Pick one token per row.

    Args:
        logits: float32 ``[S, V]``, the last position of each sequence.
        params: per-row settings.
        max_logprobs: ``N`` of the returned top logprobs (static, >= 1).
    Returns:
        :class:`SamplerOutput`.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temp
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
