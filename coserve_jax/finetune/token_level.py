"""Token-level LoRA finetuning: a training sequence's forward in chunks, its backward in layer slices.

The mechanics that let finetuning ride inside serving steps (FlexLLM, NSDI 2026, section 4), as pure functions that a step can call:

* **Forward in chunks.** A training sequence is consumed ``chunk`` tokens at a time, like a
  prefill: each chunk attends to the K/V that earlier chunks left in the paged KV cache. What the
  backward needs is saved per layer: the layer's *input* residual stream ``h_l`` of each token
  (``[L, N, H]`` in all), and the final hidden state. Nothing else (no attention
  probabilities, no MLP intermediates, no inputs of frozen linears): the backward recomputes a
  layer from ``h_l`` (activation checkpointing at layer boundaries).
* **Backward in layer slices.** First the loss head gives ``dL/dh_L``. Then each slice of
  ``layers_per_slice`` layers, top down, recomputes its layers on the whole sequence from the
  saved inputs (dense causal attention: exactly what the chunked forward computed) and takes
  their VJP with respect to the residual stream and *the job's LoRA A/B only* (base weights are
  closed-over constants: no base-weight gradients exist). The gradient at the slice boundary,
  ``[N, H]``, is all that carries over to the next slice.

The result is the gradient of the whole-sequence loss, whatever the chunk size and slice size
(:mod:`coserve_jax.finetune.reference` holds the oracles the tests compare with: the token-level
way in one function, and ``jax.grad`` of the production whole-sequence forward).

Loss: token cross-entropy summed over the target tokens (``loss_mask``), divided by
``normalizer`` (the number of target tokens in the optimizer step's accumulation group, so that
accumulating sequence gradients gives the mean over all target tokens of the group).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from coserve_jax.kernels.paged_attention import AttentionMetadata, paged_attention
from coserve_jax.lora import dropout as lora_dropout
from coserve_jax.models import rope
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.config import ModelConfig
from coserve_jax.models.decoder import decoder_layer, rms_norm

LoRAParams = dict  # {module: {"A": [L, in, R], "B": [L, R, out]}}: one adapter's trainable weights


class BaseWeights(NamedTuple):
    """The frozen base model as plain arrays (from a :class:`CausalLM`)."""

    embed: jax.Array  # [V, H]
    layers: dict  # DecoderLayers.arrays(): stacked [L, ...]
    norm: jax.Array  # [H]
    lm_head: jax.Array  # [H, V]


def base_weights(model) -> BaseWeights:
    """The frozen arrays of a :class:`~coserve_jax.models.decoder.CausalLM`."""
    embed = model.embed_tokens[...]
    head = embed.T if model.lm_head is None else model.lm_head[...]
    return BaseWeights(embed, model.layers.arrays(), model.norm[...], head)


def _layer_lora(lora: LoRAParams, scaling: dict, layer) -> dict:
    """One layer's adapter in the pool layout ``{m: (A [1,in,R], B [1,R,out], scaling [1])}``."""
    return {
        m: (w["A"][layer][None], w["B"][layer][None], jnp.reshape(scaling[m][layer], (1,)))
        for m, w in lora.items()
    }


def _layer_params(base: BaseWeights, layer) -> dict:
    return jax.tree.map(lambda x: x[layer], base.layers)


def forward_chunk(
    config: ModelConfig,
    base: BaseWeights,
    lora: LoRAParams,
    scaling: dict,
    tokens: jax.Array,
    positions: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    meta: AttentionMetadata,
    *,
    impl: str = "reference",
    dropout_rate=0.0,
    dropout_seed=0,
):
    """Forward of one chunk of a training sequence over the paged KV cache, saving layer inputs.

    Args:
        tokens, positions: int32 ``[c]``, the chunk (positions continue the sequence).
        k_cache, v_cache: ``[L, P, page_size, Hkv, D]``; the chunk's K/V are written into them.
        meta: attention metadata of the one-sequence batch.
        lora, scaling: the job's adapter (``scaling[m]``: float32 ``[L]``).
        dropout_rate, dropout_seed: LoRA dropout of the sequence (:mod:`coserve_jax.lora.dropout`).
    Returns:
        ``(layer_inputs [L, c, H], final_hidden [c, H] (before the final norm), k_cache, v_cache)``.
    """
    h = jnp.take(base.embed, tokens, axis=0)
    cos, sin = rope.cos_sin(config, positions, h.dtype)
    onehot = jnp.ones((tokens.shape[0], 1), jnp.float32)
    scale = config.head_dim ** -0.5
    n = tokens.shape[0]
    drop = lora_dropout.LoRADropout(
        jnp.full((n,), dropout_rate, jnp.float32), jnp.full((n,), dropout_seed, jnp.uint32), positions
    )

    def body(carry, layer):
        h, kc, vc = carry
        box = [kc, vc]

        def attend(q, k, v):
            out, box[0], box[1] = paged_attention(q, k, v, box[0], box[1], layer, meta, scale=scale, impl=impl)
            return out

        out = decoder_layer(
            config, _layer_params(base, layer), _layer_lora(lora, scaling, layer), h, cos, sin, onehot, attend,
            drop.at_layer(layer),
        )
        return (out, box[0], box[1]), h

    (h, k_cache, v_cache), inputs = jax.lax.scan(
        body, (h, k_cache, v_cache), jnp.arange(config.num_layers, dtype=jnp.int32)
    )
    return inputs, h, k_cache, v_cache


def token_losses(config: ModelConfig, base: BaseWeights, final_hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of predicting ``targets [N]`` from ``final_hidden [N, H]`` (pre-norm), float32 ``[N]``."""
    x = rms_norm(final_hidden, base.norm, config.rms_norm_eps)
    logits = (x @ base.lm_head).astype(jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]


def head_backward(config, base, final_hidden, targets, weights):
    """Loss ``sum(weights * CE)`` and its gradient w.r.t. the final hidden state ``[N, H]``."""
    loss, vjp = jax.vjp(lambda h: jnp.sum(weights * token_losses(config, base, h, targets)), final_hidden)
    (dh,) = vjp(jnp.ones_like(loss))
    return loss, dh


def backward_layers(
    config: ModelConfig,
    layers: dict,
    lora: LoRAParams,
    scaling: dict,
    layer_inputs: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    dh: jax.Array,
    first_layer: jax.Array,
    num_layers: jax.Array | int,
    grads: dict,
    drop: lora_dropout.LoRADropout,
    tp=None,
):
    """VJP of layers ``first_layer + num_layers - 1`` down to ``first_layer`` on a packed batch
    of whole sequences, adding each layer's LoRA gradient into ``grads``.

    ``num_layers`` may be traced (a ``lax.fori_loop`` with a dynamic trip count): one compiled
    backward runs any number of layers, so a step can take as many layers as its time allows.

    Args:
        layers: the frozen decoder layers, :meth:`DecoderLayers.arrays` (``BaseWeights.layers``).
        lora: the adapter ``{m: {"A": [L, in, R], "B": [L, R, out]}}``; scaling ``{m: [L]}``.
        layer_inputs: ``[L, N, H]`` saved by the chunked forward.
        positions: int32 ``[N]``: each token's position in its sequence.
        segment_ids: int32 ``[N]``: each token's sequence in the pack (attention stays within a
            sequence, TRL's packing); negative for padding rows, which see nothing and are seen
            by nothing.
        dh: ``[N, H]``: gradient w.r.t. the output of layer ``first_layer + num_layers - 1``
            (zero on padding rows).
        first_layer: int32 scalar: the lowest layer to run.
        num_layers: layers to run (int32 scalar, traced or static).
        grads: ``{m: {"A": [L, in, R], "B": [L, R, out]}}`` float32 accumulators (all layers);
            layer ``l``'s gradient is added at index ``l``.
        drop: the batch's LoRA dropout (per-token rate, seed and position; the forward's masks).
        tp: run as one device's shard inside ``jax.shard_map``
            (:class:`~coserve_jax.parallel.rules.TensorParallel`; ``layers``, ``lora`` and
            ``grads`` are then this device's shards). The input gradient is all-reduced per
            layer as Megatron's backward does; the gradients of replicated LoRA weights are
            *not*: each device adds its partial sum (summed once per optimizer step).
    Returns:
        ``(dh [N, H] w.r.t. the input of layer first_layer, grads)``.
    """
    n = positions.shape[0]
    cos, sin = rope.cos_sin(config, positions, layer_inputs.dtype)
    mask = packed_causal_mask(segment_ids, positions)
    scale = config.head_dim ** -0.5
    onehot = jnp.ones((n, 1), jnp.float32)
    top = first_layer + num_layers - 1

    def body(i, carry):
        dh, grads = carry
        layer = top - i
        h_in = jax.lax.dynamic_index_in_dim(layer_inputs, layer, keepdims=False)
        ab = {m: (w["A"][layer], w["B"][layer]) for m, w in lora.items()}
        if tp is not None:
            ab = {m: (tp.varying_lora(m, "A", a), tp.varying_lora(m, "B", b)) for m, (a, b) in ab.items()}
        p = jax.tree.map(lambda x: x[layer], layers)

        def f(h, ab):
            lora_layer = {m: (a[None], b[None], jnp.reshape(scaling[m][layer], (1,))) for m, (a, b) in ab.items()}
            return decoder_layer(
                config, p, lora_layer, h, cos, sin, onehot,
                lambda q, k, v: dense_attention(q, k, v, mask, scale), drop.at_layer(layer), tp,
            )

        _, vjp = jax.vjp(f, h_in, ab)
        dh_in, dab = vjp(dh.astype(h_in.dtype))
        grads = {
            m: {"A": g["A"].at[layer].add(dab[m][0].astype(jnp.float32)), "B": g["B"].at[layer].add(dab[m][1].astype(jnp.float32))}
            for m, g in grads.items()
        }
        return dh_in.astype(dh.dtype), grads

    return jax.lax.fori_loop(0, num_layers, body, (dh, grads))


def slice_backward(
    config: ModelConfig,
    layers: dict,
    lora: LoRAParams,
    scaling: dict,
    layer_inputs: jax.Array,
    positions: jax.Array,
    dh: jax.Array,
    first_layer: jax.Array,
    num_layers: int,
    dropout_rate=0.0,
    dropout_seed=0,
    tp=None,
):
    """VJP of layers ``first_layer .. first_layer + num_layers - 1`` on one whole sequence
    (:func:`backward_layers` with a static slice size, its gradients returned apart).

    Args:
        layers, lora, scaling, layer_inputs, dh, tp: as :func:`backward_layers`.
        positions: int32 ``[N]`` (one sequence).
        first_layer: int32 scalar; num_layers: static slice size.
        dropout_rate, dropout_seed: the sequence's LoRA dropout (same masks as its forward).
    Returns:
        ``(dh [N, H] w.r.t. the slice's input, grads)`` where ``grads`` is
        ``{m: {"A": [num_layers, in, R], "B": [num_layers, R, out]}}``, float32, the gradients of
        the slice's layers (``grads[m]["A"][i]`` belongs to layer ``first_layer + i``).
    """
    n = positions.shape[0]
    drop = lora_dropout.LoRADropout(
        jnp.full((n,), dropout_rate, jnp.float32), jnp.full((n,), dropout_seed, jnp.uint32), positions
    )

    def varying(x):  # every LoRA gradient is device-varying under tp (a shard or a partial sum)
        return x if tp is None else jax.lax.pcast(x, tp.axis, to="varying")

    acc = {m: {k: varying(jnp.zeros(w[k].shape, jnp.float32)) for k in ("A", "B")} for m, w in lora.items()}
    dh, acc = backward_layers(
        config, layers, lora, scaling, layer_inputs, positions, jnp.zeros((n,), jnp.int32), dh, first_layer, num_layers,
        acc, drop, tp,
    )
    grads = jax.tree.map(lambda g: jax.lax.dynamic_slice_in_dim(g, first_layer, num_layers, axis=0), acc)
    return dh, grads
