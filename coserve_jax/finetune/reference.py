"""Oracles of token-level finetuning, for tests and baselines (not used by the engine).

* :func:`whole_sequence_loss`: the loss of one sequence under one adapter, computed by the
  production whole-sequence forward (:meth:`CausalLM.hidden_states
  <coserve_jax.models.decoder.CausalLM.hidden_states>` with dense causal attention, the adapter
  in a one-slot :class:`~coserve_jax.models.lora_pool.LoRAPool`). ``jax.grad`` of it is the
  gradient the chunked forward and sliced backward must reproduce.
* :func:`sequence_gradient`: the token-level way in one jitted function (forward in chunks over
  the paged KV cache, backward in layer slices), as the fused step runs it across serving steps.
* :func:`pack_gradient`: the backward of a pack of examples (attention within each) run in
  pieces of any layer counts by the engine's backward (:func:`~coserve_jax.finetune.token_level.backward_layers`,
  a traced count), after a dense forward that saves the layer inputs.

Loss: token cross-entropy summed over the target tokens (``loss_mask``) divided by
``normalizer``, as in :mod:`coserve_jax.finetune.token_level`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from coserve_jax.finetune.token_level import (
    BaseWeights, LoRAParams, _layer_lora, _layer_params, backward_layers, forward_chunk, head_backward, slice_backward,
)
from coserve_jax.models import rope
from coserve_jax.models.decoder import decoder_layer
from coserve_jax.kernels.paged_attention import AttentionMetadata
from coserve_jax.lora import dropout as lora_dropout
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.config import ModelConfig
from coserve_jax.models.decoder import CausalLM
from coserve_jax.models.lora_pool import LoRAPool, LoRAPoolConfig


def whole_sequence_logprobs(
    model: CausalLM, lora: LoRAParams, scaling: dict, tokens, targets, dropout_rate=0.0, dropout_seed=0,
):
    """Each position's log-probability of its target by the production whole-sequence forward
    (differentiate with ``jax.grad``).

    Args:
        model: the base model (its own LoRA pool, if any, is not used).
        lora: the adapter ``{module: {"A": [L, in, r], "B": [L, r, out]}}`` (any float dtype);
            scaling: ``{module: float32 [L]}``.
        tokens: int32 ``[N]``; targets: int32 ``[N]``: the token position ``t`` predicts.
        dropout_rate, dropout_seed: LoRA dropout (:mod:`coserve_jax.lora.dropout`).
    Returns:
        float32 ``[N]``: ``log p(targets[t] | tokens[:t + 1])``.
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
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.asarray(targets)[:, None], axis=-1)[:, 0]


def whole_sequence_loss(
    model: CausalLM, lora: LoRAParams, scaling: dict, tokens, loss_mask, normalizer, dropout_rate=0.0, dropout_seed=0,
):
    """One sequence's loss by the production whole-sequence forward (differentiate with ``jax.grad``).

    Args:
        model, lora, scaling, dropout_rate, dropout_seed: as :func:`whole_sequence_logprobs`.
        tokens: int32 ``[N]``; loss_mask: bool ``[N]`` (token ``t`` is a target predicted from
            ``tokens[:t]``); normalizer: the summed loss is divided by it.
    Returns:
        float32 scalar.
    """
    targets = jnp.roll(tokens, -1)  # position t predicts token t + 1
    ce = -whole_sequence_logprobs(model, lora, scaling, tokens, targets, dropout_rate, dropout_seed)
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


@functools.partial(jax.jit, static_argnames=("config", "segments"))
def pack_gradient(
    config: ModelConfig,
    base: BaseWeights,
    lora: LoRAParams,
    scaling: dict,
    tokens: jax.Array,
    loss_mask: jax.Array,
    normalizer: jax.Array,
    *,
    segments: tuple[int, ...],
    layer_counts: jax.Array,
    dropout_rate=0.0,
    dropout_seeds: jax.Array | None = None,
):
    """Loss and LoRA gradient of a pack of examples, with the engine's backward run in pieces.

    Args:
        tokens: int32 ``[N]``: the examples back to back; loss_mask: bool ``[N]`` (token ``t`` is
            a target predicted from the tokens before it in its example); normalizer: the summed
            loss is divided by it.
        segments: each example's length (adding up to ``N``).
        layer_counts: int32 ``[pieces]``: the layers of each backward piece, top down (adding up
            to ``num_layers``); traced, so each piece runs :func:`backward_layers` with a dynamic
            trip count as the engine's backward does.
        dropout_rate: LoRA dropout rate; dropout_seeds: uint32 ``[len(segments)]``, each example's seed.
    Returns:
        ``(loss, grads)``: float32 scalar and ``{m: {"A": [L, in, R], "B": [L, R, out]}}`` float32.
    Raises:
        ValueError: segments that do not add up to the tokens.
    """
    n, L = tokens.shape[0], config.num_layers
    if sum(segments) != n:
        raise ValueError(f"segments {segments} must add up to {n}")
    seg = jnp.concatenate([jnp.full((k,), i, jnp.int32) for i, k in enumerate(segments)])
    positions = jnp.concatenate([jnp.arange(k, dtype=jnp.int32) for k in segments])
    seeds = jnp.zeros((len(segments),), jnp.uint32) if dropout_seeds is None else jnp.asarray(dropout_seeds, jnp.uint32)
    drop = lora_dropout.LoRADropout(jnp.full((n,), dropout_rate, jnp.float32), seeds[seg], positions)
    mask = packed_causal_mask(seg, positions)
    scale = config.head_dim ** -0.5
    h = jnp.take(base.embed, tokens, axis=0)
    cos, sin = rope.cos_sin(config, positions, h.dtype)
    onehot = jnp.ones((n, 1), jnp.float32)

    def body(h, layer):
        out = decoder_layer(
            config, _layer_params(base, layer), _layer_lora(lora, scaling, layer), h, cos, sin, onehot,
            lambda q, k, v: dense_attention(q, k, v, mask, scale), drop.at_layer(layer),
        )
        return out, h

    final, inputs = jax.lax.scan(body, h, jnp.arange(L, dtype=jnp.int32))
    last = jnp.cumsum(jnp.asarray(segments)) - 1
    targets = jnp.roll(tokens, -1)  # token t predicts the next one of its example
    weights = jnp.roll(loss_mask, -1).astype(jnp.float32).at[last].set(0.0) / normalizer
    loss, dh = head_backward(config, base, final, targets, weights)
    grads = {m: {k: jnp.zeros(w[k].shape, jnp.float32) for k in ("A", "B")} for m, w in lora.items()}
    top = jnp.int32(L)
    for i in range(layer_counts.shape[0]):
        count = layer_counts[i]
        top = top - count
        dh, grads = backward_layers(config, base.layers, lora, scaling, inputs, positions, seg, dh, top, count, grads, drop)
    return loss, grads
