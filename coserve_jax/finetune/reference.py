"""Oracles of token-level finetuning, for tests and baselines (not used by the engine).

* :func:`whole_sequence_loss`: the loss of one sequence under one adapter, computed by the
  production whole-sequence forward (:meth:`CausalLM.hidden_states
  <coserve_jax.models.decoder.CausalLM.hidden_states>` with dense causal attention, the adapter
  in a one-slot :class:`~coserve_jax.models.lora_pool.LoRAPool`). ``jax.grad`` of it is the
  gradient the chunked forward and sliced backward must reproduce.
* :func:`sequence_gradient`: the token-level way in one jitted function (forward in chunks over
  the paged KV cache, backward in layer slices), as the fused step runs it across serving steps.

Loss: token cross-entropy summed over the target tokens (``loss_mask``) divided by
``normalizer``, as in :mod:`coserve_jax.finetune.token_level`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from coserve_jax.finetune.token_level import BaseWeights, LoRAParams, forward_chunk, head_backward, slice_backward
from coserve_jax.kernels.paged_attention import AttentionMetadata
from coserve_jax.lora import dropout as lora_dropout
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.config import ModelConfig
from coserve_jax.models.decoder import CausalLM
from coserve_jax.models.lora_pool import LoRAPool, LoRAPoolConfig


def whole_sequence_loss(
    model: CausalLM, lora: LoRAParams, scaling: dict, tokens, loss_mask, normalizer, dropout_rate=0.0, dropout_seed=0,
):
    """One sequence's loss by the production whole-sequence forward (differentiate with ``jax.grad``).

    Args:
        model: the base model (its own LoRA pool, if any, is not used).
        lora: the adapter ``{module: {"A": [L, in, r], "B": [L, r, out]}}`` (any float dtype);
            scaling: ``{module: float32 [L]}``.
        tokens: int32 ``[N]``; loss_mask: bool ``[N]`` (token ``t`` is a target predicted from
            ``tokens[:t]``); normalizer: the summed loss is divided by it.
        dropout_rate, dropout_seed: LoRA dropout (:mod:`coserve_jax.lora.dropout`).
    Returns:
        float32 scalar.
    """
    config = model.config
    L, dtype = config.num_layers, model.dtype
    rank = max(int(w["A"].shape[-1]) for w in lora.values())
    arrays = {}
    for m, w in lora.items():
        d_in, d_out = config.module_dims(m)
        r = int(w["A"].shape[-1])
        arrays[f"lora.{m}.A"] = jnp.zeros((L, 1, d_in, rank), dtype).at[:, 0, :, :r].set(w["A"].astype(dtype))
        arrays[f"lora.{m}.B"] = jnp.zeros((L, 1, rank, d_out), dtype).at[:, 0, :r, :].set(w["B"].astype(dtype))
        arrays[f"lora.{m}.scaling"] = jnp.reshape(jnp.asarray(scaling[m], jnp.float32), (L, 1))
    graphdef, state = nnx.split(model)
    ref = nnx.merge(graphdef, state)  # a separate module tree over the same arrays
    ref.lora = nnx.data(LoRAPool(config, LoRAPoolConfig(1, rank, tuple(lora)), dtype, lambda name, shape, dt: arrays[name]))
    n = tokens.shape[0]
    positions = jnp.arange(n, dtype=jnp.int32)
    mask = packed_causal_mask(jnp.zeros((n,), jnp.int32), positions)
    scale = config.head_dim ** -0.5
    hidden = ref.hidden_states(
        tokens, positions, jnp.ones((n,), jnp.int32), lambda q, k, v: dense_attention(q, k, v, mask, scale),
        dropout=lora_dropout.constant(n, dropout_rate, dropout_seed),
    )
    logits = ref.logits(hidden)
    targets = jnp.roll(tokens, -1)  # position t predicts token t + 1
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
    weights = jnp.roll(loss_mask, -1).at[-1].set(False).astype(jnp.float32) / normalizer
    return jnp.sum(weights * ce)


@functools.partial(jax.jit, static_argnames=("config", "chunk", "layers_per_slice", "impl"))
def sequence_gradient(
    config: ModelConfig,
    base: BaseWeights,
    lora: LoRAParams,
    scaling: dict,
    tokens: jax.Array,
    loss_mask: jax.Array,
    normalizer: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    page_table: jax.Array,
    *,
    chunk: int,
    layers_per_slice: int,
    impl: str = "reference",
    dropout_rate=0.0,
    dropout_seed=0,
):
    """Loss and LoRA gradient of one sequence, computed the token-level way (for tests and the
    finetuning-only baseline): forward in ``chunk``-token pieces over the paged cache, then the
    backward in slices of ``layers_per_slice`` layers.

    Args:
        tokens: int32 ``[N]``; loss_mask: bool ``[N]`` (token ``t`` is a target predicted from
            ``tokens[:t]``); normalizer: float32 scalar the summed loss is divided by.
        k_cache, v_cache: ``[L, P, page_size, Hkv, D]`` scratch caches; page_table: int32
            ``[1, max_pages]`` holding the sequence's pages.
        chunk: tokens per forward piece (``N`` need not be a multiple: the last piece is padded).
        layers_per_slice: layers per backward slice (must divide ``num_layers``).
        dropout_rate, dropout_seed: LoRA dropout (:mod:`coserve_jax.lora.dropout`).
    Returns:
        ``(loss, grads)``: float32 scalar and a pytree like ``lora``.
    Raises:
        ValueError: ``layers_per_slice`` does not divide the number of layers.
    """
    L, n = config.num_layers, tokens.shape[0]
    if L % layers_per_slice:
        raise ValueError(f"layers_per_slice={layers_per_slice} must divide num_layers={L}")
    page_size = k_cache.shape[2]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    toks = jnp.pad(tokens, (0, pad))
    pos_all = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    h_dim = config.hidden_size
    dtype = base.embed.dtype
    inputs = jnp.zeros((L, n_chunks * chunk, h_dim), dtype)
    final = jnp.zeros((n_chunks * chunk, h_dim), dtype)

    def fwd(i, carry):
        inputs, final, kc, vc = carry
        start = i * chunk
        t = jax.lax.dynamic_slice_in_dim(toks, start, chunk)
        pos = jax.lax.dynamic_slice_in_dim(pos_all, start, chunk)
        q_len = jnp.minimum(chunk, n - start)
        valid = jnp.arange(chunk) < q_len
        slots = page_table[0, pos // page_size] * page_size + pos % page_size
        meta = AttentionMetadata(
            slot_mapping=jnp.where(valid, slots, 0).astype(jnp.int32),  # padding -> scratch page 0
            kv_lens=jnp.reshape(start + q_len, (1,)).astype(jnp.int32),
            page_table=page_table,
            cu_q_lens=jnp.stack([0, q_len]).astype(jnp.int32),
            num_seqs=jnp.int32(1),
        )
        li, h, kc, vc = forward_chunk(
            config, base, lora, scaling, t, pos, kc, vc, meta, impl=impl, dropout_rate=dropout_rate, dropout_seed=dropout_seed
        )
        inputs = jax.lax.dynamic_update_slice_in_dim(inputs, li, start, axis=1)
        final = jax.lax.dynamic_update_slice_in_dim(final, h, start, axis=0)
        return inputs, final, kc, vc

    inputs, final, _, _ = jax.lax.fori_loop(0, n_chunks, fwd, (inputs, final, k_cache, v_cache))
    inputs, final = inputs[:, :n], final[:n]
    targets = jnp.roll(tokens, -1)  # position t predicts token t + 1
    weights = jnp.roll(loss_mask, -1).at[-1].set(False).astype(jnp.float32) / normalizer
    loss, dh = head_backward(config, base, final, targets, weights)
    positions = jnp.arange(n, dtype=jnp.int32)
    parts = []
    for s in reversed(range(L // layers_per_slice)):  # one slice per serving step when fused
        dh, g = slice_backward(
            config, base.layers, lora, scaling, inputs, positions, dh, jnp.int32(s * layers_per_slice), layers_per_slice,
            dropout_rate, dropout_seed,
        )
        parts.append(g)
    grads = jax.tree.map(lambda *gs: jnp.concatenate(gs[::-1], axis=0), *parts)  # slices top-down -> layers
    return loss, grads
