"""The attention of the serving step: write this step's K/V into the pages, then attend.

One entry point, :func:`paged_attention`, over the all-layer paged cache
``[L, P, page_size, Hkv, D]``, with the implementation chosen by name:

* ``"reference"``: the pure-JAX oracle (:mod:`coserve_jax.kernels.reference`); the CPU default.
* ``"pallas"``: the Pallas kernel (:mod:`coserve_jax.kernels.ragged_paged_attention`); the GPU default.
* ``"pallas_interpret"``: the same kernel in the Pallas interpreter (CPU tests of the kernel in
  the whole step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from coserve_jax.kernels.ragged_paged_attention import ragged_paged_attention
from coserve_jax.kernels.reference import ragged_paged_attention_ref

IMPLEMENTATIONS = ("reference", "pallas", "pallas_interpret")


class AttentionMetadata(NamedTuple):
    """Per-step attention inputs (int32).

    slot_mapping ``[T]`` (``page * page_size + offset`` of each query token; padding slots point
    into the scratch page 0), kv_lens ``[S]``, page_table ``[S, max_pages]``, cu_q_lens ``[S + 1]``,
    num_seqs (scalar).
    """

    slot_mapping: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array


def default_implementation(platform: str | None = None) -> str:
    """``"pallas"`` on GPU, ``"reference"`` elsewhere."""
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm") else "reference"


def write_kv_layer(cache: jax.Array, new: jax.Array, layer: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatter ``new [T, Hkv, D]`` into layer ``layer`` of ``cache [L, P, page, Hkv, D]`` (in place
    when the cache is a donated loop carry)."""
    page_size = cache.shape[2]
    return cache.at[layer, slot_mapping // page_size, slot_mapping % page_size].set(new.astype(cache.dtype))


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
    impl: str = "reference",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write ``k, v [T, Hkv, D]`` into the caches at ``meta.slot_mapping``, then attend.

    Args:
        q: ``[T, Hq, D]``; k_cache, v_cache: ``[L, P, page_size, Hkv, D]``; layer: int32 scalar.
        impl: one of :data:`IMPLEMENTATIONS`.
    Returns:
        ``(out [T, Hq, D], k_cache, v_cache)``.
    Raises:
        ValueError: unknown ``impl``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    k_cache = write_kv_layer(k_cache, k, layer, meta.slot_mapping)
    v_cache = write_kv_layer(v_cache, v, layer, meta.slot_mapping)
    args = (meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.num_seqs)
    if impl == "reference":
        out = ragged_paged_attention_ref(q, k_cache, v_cache, *args, scale, layer=layer)
    else:
        out = ragged_paged_attention(
            q, k_cache, v_cache, layer, *args, scale=scale, interpret=impl == "pallas_interpret"
        )
    return out, k_cache, v_cache
