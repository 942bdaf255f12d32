"""Dense causal attention over a packed (flat) batch of sequences, without a KV cache.

The oracle-grade path used for whole-sequence forwards (tests against ``transformers``, the
naive-gradient reference for finetuning). Serving uses the ragged paged attention of
``coserve_jax.kernels`` instead; both take queries laid out as ``[T, num_heads, head_dim]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_causal_mask(segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Boolean ``[T, T]``: query ``t`` may see key ``s`` iff same sequence and ``pos[s] <= pos[t]``.

    Args:
        segment_ids: int32 ``[T]``, the sequence each token belongs to; negative = padding slot
            (sees nothing, is seen by nothing).
        positions: int32 ``[T]``, position of each token inside its sequence.
    """
    same = segment_ids[:, None] == segment_ids[None, :]
    causal = positions[None, :] <= positions[:, None]
    valid = (segment_ids >= 0)[:, None] & (segment_ids >= 0)[None, :]
    return same & causal & valid


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query softmax attention (``transformers`` ``eager_attention_forward``).

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0``.
        mask: bool ``[T, T]`` from :func:`packed_causal_mask`.
        scale: score multiplier, normally ``D ** -0.5``.
    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype; softmax is taken in float32. Rows with no visible key
        (padding slots) are zeros.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(t, hkv, hq // hkv, d)
    scores = jnp.einsum("thgd,shd->hgts", qg, k).astype(jnp.float32) * scale
    # A finite floor (not -inf) keeps fully masked rows free of NaN, in values and in gradients.
    scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[None, None], probs, 0.0).astype(q.dtype)
    out = jnp.einsum("hgts,shd->thgd", probs, v)
    return out.reshape(t, hq, d)
