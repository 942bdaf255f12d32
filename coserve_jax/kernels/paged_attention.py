"""The attention of the serving step: write this step's K/V into the pages, then attend.

One entry point, :func:`paged_attention`, over the all-layer paged cache
``[L, P, page_size, Hkv, D]``, with the implementation chosen by name:

* ``"reference"``: the pure-JAX oracle (:mod:`coserve_jax.kernels.reference`); the CPU default.
* ``"pallas"``: the Pallas kernel (:mod:`coserve_jax.kernels.ragged_paged_attention`); the GPU default.
* ``"pallas_interpret"``: the same kernel in the Pallas interpreter (CPU tests of the kernel in
  the whole step).
"""

from __future__ import annotations

import dataclasses

import jax

from coserve_jax.kernels.ragged_paged_attention import ragged_paged_attention
from coserve_jax.kernels.reference import ragged_paged_attention_ref

IMPLEMENTATIONS = ("reference", "pallas", "pallas_interpret")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, all int32 and all data (traced) fields; a pytree
    (tpu-inference's ``AttentionMetadata`` is the model).

    The shapes of a step's copy are in :data:`coserve_jax.engine.step_inputs.STEP_INPUT_TABLE`.
    """

    slot_mapping: jax.Array  # [T]: page * page_size + offset of each query token; padding -> scratch page 0
    kv_lens: jax.Array  # [S]: tokens in the cache after this step, per sequence (0: an empty slot)
    page_table: jax.Array  # [S, max_pages_per_seq]: each sequence's pages in token order (0-padded)
    cu_q_lens: jax.Array  # [S + 1]: cumulative query tokens; sequence i has slots cu[i] .. cu[i+1]-1
    num_seqs: jax.Array  # []: sequences in use


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
