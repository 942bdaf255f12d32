"""One Flax NNX decoder for the Llama / Qwen2 / Mistral families, with per-token multi-LoRA.

The architecture is ``transformers``' ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` and
``MistralForCausalLM`` differ only in configuration: q/k/v bias, tied embeddings, GQA, RoPE
scaling): pre-norm decoder layers of RMSNorm -> GQA self-attention with RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual, then a final RMSNorm and the LM head.

Layout choices, made for what the serving step and token-level finetuning need:

* Tokens are a flat batch ``[T]`` (sequences packed back to back, each token with its own
  position, sequence id and adapter index), the form the fused step fills with inference and
  finetuning tokens alike.
* The weights of all decoder layers are stacked on a leading layer axis and run with
  ``jax.lax.scan``: one layer is compiled, not ``num_layers`` copies (start-up compile time for
  many shape buckets), and a slice of layers is a slice of arrays (layer-sliced backward).
* Linear weights are stored ``[in, out]`` (``y = x @ W``), the transpose of PyTorch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from coserve_jax.models.lora_pool import (
    LoRAPool, LoRAPoolConfig, LoRASegments, ParamInit, adapter_onehot, group_stacks, lora_delta, lora_segments,
    segmented_lora_delta,
)
from coserve_jax.models import rope
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig

if TYPE_CHECKING:
    from coserve_jax.parallel.rules import ShardingRules, TensorParallel

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""``(q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D]) -> [T,Hq,D]``: the attention of one layer."""

CachedAttend = Callable[[jax.Array, jax.Array, jax.Array, Any, jax.Array, Any], tuple[jax.Array, Any]]
"""``(q, k, v, cache, layer, attend_inputs) -> (out [T,Hq,D], cache)``: attention that also
reads and writes a KV cache (any pytree, e.g. the all-layer paged K/V) for layer ``layer`` (int32
scalar); ``attend_inputs`` is what the caller passed to :meth:`CausalLM.hidden_states` (e.g. the
attention metadata), handed through explicitly so that it crosses a ``shard_map`` boundary."""

BIASES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "mlp": ("gate_proj", "up_proj", "down_proj")}


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every base-model parameter of :class:`CausalLM` by name, with its (stacked) shape.

    Names: ``embed_tokens [V,H]``, ``layers.input_norm [L,H]``, ``layers.post_norm [L,H]``,
    ``layers.{module} [L,in,out]``, ``layers.{module}_bias [L,out]`` (when the config has that
    bias), ``norm [H]``, ``lm_head [H,V]`` (untied only).
    """
    L, H, V = config.num_layers, config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (V, H), "layers.input_norm": (L, H), "layers.post_norm": (L, H)}
    for m in LINEAR_MODULES:
        d_in, d_out = config.module_dims(m)
        shapes[f"layers.{m}"] = (L, d_in, d_out)
    for m in _biased_modules(config):
        shapes[f"layers.{m}_bias"] = (L, config.module_dims(m)[1])
    shapes["norm"] = (H,)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (H, V)
    return shapes


def _biased_modules(config: ModelConfig) -> tuple[str, ...]:
    out: tuple[str, ...] = ()
    if config.qkv_bias:
        out += BIASES["qkv"]
    if config.o_bias:
        out += BIASES["o"]
    if config.mlp_bias:
        out += BIASES["mlp"]
    return out


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading layer axis (see :func:`param_shapes`)."""

    def __init__(self, config: ModelConfig, dtype, param_init: ParamInit):
        shapes = param_shapes(config)
        self.input_norm = nnx.Param(param_init("layers.input_norm", shapes["layers.input_norm"], dtype))
        self.post_norm = nnx.Param(param_init("layers.post_norm", shapes["layers.post_norm"], dtype))
        self.kernel = nnx.Dict()
        self.bias = nnx.Dict()
        for m in LINEAR_MODULES:
            self.kernel[m] = nnx.Param(param_init(f"layers.{m}", shapes[f"layers.{m}"], dtype))
        for m in _biased_modules(config):
            self.bias[m] = nnx.Param(param_init(f"layers.{m}_bias", shapes[f"layers.{m}_bias"], dtype))

    def arrays(self) -> dict:
        """The stacked arrays as a plain pytree ``{input_norm, post_norm, kernel: {...}, bias: {...}}``."""
        return {
            "input_norm": self.input_norm[...],
            "post_norm": self.post_norm[...],
            "kernel": {m: v[...] for m, v in self.kernel.items()},
            "bias": {m: v[...] for m, v in self.bias.items()},
        }


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``LlamaRMSNorm``: normalise in float32, cast back, then scale. ``x [T,H]``, ``weight [H]``."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def decoder_layer(
    config: ModelConfig,
    p: dict,
    lora: dict,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    onehot: jax.Array | LoRASegments | None,
    attend: Attend,
    drop: Callable[..., jax.Array] | None = None,
    tp: "TensorParallel | None" = None,
) -> jax.Array:
    """One decoder layer (``LlamaDecoderLayer.forward``) on a flat token batch.

    Args:
        p: one layer's slice of :meth:`DecoderLayers.arrays` (this device's shard under ``tp``).
        lora: ``{module: (A [S,in,R], B [S,R,out], scaling [S])}`` for this layer (may be empty);
            with :class:`~coserve_jax.models.lora_pool.LoRASegments` the step's ``G`` groups' slices
            (``[G, ...]``, :func:`~coserve_jax.models.lora_pool.group_stacks`) instead of all slots.
        h: residual stream ``[T, H]`` (replicated under ``tp``).
        cos, sin: RoPE tables ``[T, head_dim]``.
        onehot: the adapter selector: a one-hot ``[T, S]`` (:func:`~coserve_jax.models.lora_pool.adapter_onehot`),
            the step's :class:`~coserve_jax.models.lora_pool.LoRASegments` (grouped GEMMs), or
            ``None`` when there is no pool.
        attend: the attention implementation (called with this device's heads under ``tp``).
        drop: optional LoRA dropout ``(x, module, feature_offset) -> dropout(x)`` applied to the
            LoRA branch's input only (PEFT ``lora.Linear``); see :mod:`coserve_jax.lora.dropout`.
        tp: run as one device's shard inside ``jax.shard_map`` (Megatron column / row parallel
            layers, :mod:`coserve_jax.parallel.rules`): two all-reduces per layer, after
            ``o_proj`` and ``down_proj``, with each LoRA bypass added before them.
    Returns:
        The new residual stream ``[T, H]``.
    """

    def linear(x: jax.Array, m: str) -> jax.Array:
        y = x @ p["kernel"][m]
        if m in lora and onehot is not None:
            xd = x
            if drop is not None:
                xd = drop(x, m, 0 if tp is None else tp.feature_offset(m, x.shape[-1]))
            if isinstance(onehot, LoRASegments):
                y = y + segmented_lora_delta(xd, *lora[m], onehot)
            else:
                y = y + lora_delta(xd, *lora[m], onehot)
        if tp is not None and m in tp.row_modules:
            y = tp.reduce(y)  # partial sums of base and bypass together: one all-reduce
        if m in p["bias"]:
            y = y + p["bias"][m]
        return y

    t, d = h.shape[0], config.head_dim
    x = rms_norm(h, p["input_norm"], config.rms_norm_eps)
    if tp is not None:
        x = tp.enter(x)
    q = linear(x, "q_proj").reshape(t, -1, d)
    k = linear(x, "k_proj").reshape(t, -1, d)
    v = linear(x, "v_proj").reshape(t, -1, d)
    if tp is not None:
        k, v = tp.local_kv(k), tp.local_kv(v)
    q = rope.apply_rope(q, cos, sin)
    k = rope.apply_rope(k, cos, sin)
    attn = attend(q, k, v).reshape(t, -1)
    h = h + linear(attn, "o_proj")
    x = rms_norm(h, p["post_norm"], config.rms_norm_eps)
    if tp is not None:
        x = tp.enter(x)
    mlp = jax.nn.silu(linear(x, "gate_proj")) * linear(x, "up_proj")
    return h + linear(mlp, "down_proj")


class CausalLM(nnx.Module):
    """Decoder-only language model (``LlamaForCausalLM`` and family) with an optional LoRA pool.

    Build it with :func:`coserve_jax.models.loader.load_model` (weights from a checkpoint) or
    :func:`coserve_jax.models.loader.init_random` (real shapes, random weights); the constructor
    takes a ``param_init(name, shape, dtype)`` callback that supplies every parameter.

    Args:
        config: the model's :class:`ModelConfig`.
        dtype: parameter and activation dtype (``jnp.float32``, ``jnp.bfloat16`` ...).
        param_init: supplies each parameter (names from :func:`param_shapes` and ``lora.*``).
        lora: pool shape, or ``None`` for a model without adapters.
    """

    def __init__(self, config: ModelConfig, *, dtype, param_init: ParamInit, lora: LoRAPoolConfig | None = None):
        self.config = config
        shapes = param_shapes(config)
        self.embed_tokens = nnx.Param(param_init("embed_tokens", shapes["embed_tokens"], dtype))
        self.layers = DecoderLayers(config, dtype, param_init)
        self.norm = nnx.Param(param_init("norm", shapes["norm"], dtype))
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(param_init("lm_head", shapes["lm_head"], dtype))
        self.lora = None if lora is None else LoRAPool(config, lora, dtype, param_init)

    @property
    def dtype(self):
        """The parameters' dtype."""
        return self.embed_tokens.get_raw_value().dtype  # (also of an abstract model's ShapeDtypeStruct)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        adapter_ids: jax.Array,
        attend: Attend | CachedAttend,
        cache: Any = None,
        *,
        save_indices: jax.Array | None = None,
        dropout: Any = None,
        parallel: "ShardingRules | None" = None,
        attend_inputs: Any = None,
        lora_groups: int = 0,
    ):
        """Run embeddings, all decoder layers and the final norm.

        Args:
            tokens, positions, adapter_ids: int32 ``[T]``.
            attend: the attention of every layer. Without ``cache`` an :data:`Attend`; with one a
                :data:`CachedAttend`, called with the cache and the layer index and returning the
                updated cache, which is carried through the scan over layers (so a donated cache
                is updated in place).
            cache: optional KV cache pytree.
            save_indices: optional int32 ``[C]`` token slots whose activations token-level
                finetuning keeps (:mod:`coserve_jax.finetune.token_level`).
            dropout: optional :class:`~coserve_jax.lora.dropout.LoRADropout` of the batch.
            attend_inputs: a pytree handed to a :data:`CachedAttend` at every layer (replicated
                under ``parallel``).
            lora_groups: ``G > 0``: apply the adapters as grouped GEMMs over at most ``G``
                distinct adapters of the batch (:func:`~coserve_jax.models.lora_pool.segmented_lora_delta`);
                0: the one-hot reference over every slot (:func:`~coserve_jax.models.lora_pool.lora_delta`).
            parallel: run the decoder layers tensor-parallel on ``parallel.mesh`` (one
                ``jax.shard_map`` around the scan over layers; ``attend`` then sees each device's
                heads and its shard of a cache laid out by
                :meth:`~coserve_jax.parallel.rules.ShardingRules.kv_cache_spec`).
        Returns:
            ``[T, H]`` final-normed hidden states in the model dtype; with ``cache``, the pair
            ``(hidden, cache)``. With ``save_indices`` one more element is appended: the pair
            ``(layer_inputs [L, C, H], final_hidden [C, H])`` of the chosen slots, the residual
            stream entering every layer and leaving the last one (before the final norm).
        """
        config = self.config
        h = jnp.take(self.embed_tokens[...], tokens, axis=0)
        cos, sin = rope.cos_sin(config, positions, h.dtype)
        args = {"h": h, "cos": cos, "sin": sin, "layers": self.layers.arrays(), "lora": {}}
        if self.lora is not None:
            slots = self.lora.config.max_loras
            if lora_groups > 0:  # the layers read the step's G adapters' weights only
                args["onehot"] = seg = lora_segments(adapter_ids, slots, min(lora_groups, slots))
                args["lora"] = group_stacks(self.lora.layer_arrays(), seg)
            else:
                args["onehot"] = adapter_onehot(adapter_ids, slots, jnp.float32)
                args["lora"] = self.lora.layer_arrays()
        for key, value in (("cache", cache), ("save", save_indices), ("dropout", dropout), ("attend_inputs", attend_inputs)):
            if value is not None:
                args[key] = value
        tp = None if parallel is None else parallel.tensor_parallel

        def run_layers(a: dict) -> dict:
            def body(carry, xs):
                h, cache = carry
                p, lora, layer = xs
                box = [cache]

                def attend_layer(q, k, v):
                    if "cache" not in a:
                        return attend(q, k, v)
                    out, box[0] = attend(q, k, v, box[0], layer, a.get("attend_inputs"))
                    return out

                saved = jnp.take(h, a["save"], axis=0) if "save" in a else None
                drop = a["dropout"].at_layer(layer) if "dropout" in a else None
                h = decoder_layer(config, p, lora, h, a["cos"], a["sin"], a.get("onehot"), attend_layer, drop, tp)
                return (h, box[0]), saved

            layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
            (h, cache), saved = jax.lax.scan(body, (a["h"], a.get("cache")), (a["layers"], a["lora"], layer_ids))
            out = {"h": h}
            if "cache" in a:
                out["cache"] = cache
            if "save" in a:
                out["saved"] = saved
            return out

        if parallel is None:
            out = run_layers(args)
        else:
            rep = jax.sharding.PartitionSpec()
            specs = {k: rep for k in args}
            specs["layers"] = parallel.layer_specs(args["layers"])
            specs["lora"] = parallel.pool_specs(args["lora"])
            if "cache" in args:
                specs["cache"] = jax.tree.map(lambda _: parallel.kv_cache_spec(), args["cache"])
            out_specs = {"h": rep}
            if "cache" in args:
                out_specs["cache"] = specs["cache"]
            if "save" in args:
                out_specs["saved"] = rep
            # check_vma=False: this forward is never differentiated (the finetuning backward
            # recomputes layers itself), and Pallas kernels' out_shapes carry no varying-axes type.
            out = jax.shard_map(run_layers, mesh=parallel.mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)(args)
        h = out["h"]
        final = jnp.take(h, save_indices, axis=0) if save_indices is not None else None
        h = rms_norm(h, self.norm[...], config.rms_norm_eps)
        result = (h, out["cache"]) if cache is not None else (h,)
        if save_indices is not None:
            result = result + ((out["saved"], final),)
        return result if len(result) > 1 else result[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: ``[T, H]`` -> float32 ``[T, V]`` (computed in the model dtype, as HF does)."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return (hidden @ w).astype(jnp.float32)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, adapter_ids: jax.Array
    ) -> jax.Array:
        """Whole-sequence forward of a packed batch with dense causal attention (no KV cache).

        Args:
            tokens: int32 ``[T]`` token ids.
            positions: int32 ``[T]`` position of each token in its sequence (0-based).
            segment_ids: int32 ``[T]`` sequence of each token; ``-1`` marks a padding slot.
            adapter_ids: int32 ``[T]`` adapter index per token (0 = base model).
        Returns:
            float32 logits ``[T, vocab_size]`` (rows of padding slots are meaningless).
        """
        mask = packed_causal_mask(segment_ids, positions)
        scale = self.config.head_dim ** -0.5

        def attend(q, k, v):
            return dense_attention(q, k, v, mask, scale)

        return self.logits(self.hidden_states(tokens, positions, adapter_ids, attend))
