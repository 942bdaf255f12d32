"""Activation memory of token-level finetuning vs a naive ``jax.grad``, at Llama-3.1-8B shape.

Compile-only (no weights are allocated: shapes only), so it runs on a CPU:

* naive: ``jax.jit(jax.grad(loss))`` of the whole-sequence loss through the same LoRA model
  (a ``lax.scan`` over layers, dense attention), w.r.t. the LoRA A/B only; XLA keeps what the
  backward needs. Its temporary buffer size (``memory_analysis().temp_size_in_bytes``) is the
  activation memory (weights and LoRA are arguments, not temporaries).
* ours: what persists between serving steps for a sequence under training, the saved layer inputs
  ``[L, N, H]`` (model dtype) and the slice-boundary gradient ``[N, H]`` (float32) of the fused
  design's activation store (:mod:`coserve_jax.finetune.fused`; the loss head's backward runs in
  the forward step, so no final hidden state is kept), counted; and the peak temporary memory of
  one backward layer slice (compiled, ``memory_analysis``), which is transient within one step.

    python bench/activation_memory.py --out bench/results/activation_memory_8b.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

from coserve_jax.finetune.token_level import BaseWeights, slice_backward, token_losses
from coserve_jax.models import ModelConfig
from coserve_jax.models.decoder import param_shapes
from coserve_jax.models import rope
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.decoder import decoder_layer

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def abstract_lora(config, rank, dtype):
    L = config.num_layers
    lora, scaling = {}, {}
    for m in MODULES:
        d_in, d_out = config.module_dims(m)
        lora[m] = {"A": jax.ShapeDtypeStruct((L, d_in, rank), dtype), "B": jax.ShapeDtypeStruct((L, rank, d_out), dtype)}
        scaling[m] = jax.ShapeDtypeStruct((L,), jnp.float32)
    return lora, scaling


def naive_loss(config, base, lora, scaling, tokens):
    n = tokens.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    mask = packed_causal_mask(jnp.zeros((n,), jnp.int32), pos)
    h = jnp.take(base.embed, tokens, axis=0)
    cos, sin = rope.cos_sin(config, pos, h.dtype)
    onehot = jnp.ones((n, 1), jnp.float32)

    def body(h, xs):
        p, ab, sc = xs
        lo = {m: (ab[m]["A"][None], ab[m]["B"][None], jnp.reshape(sc[m], (1,))) for m in ab}
        att = lambda q, k, v: dense_attention(q, k, v, mask, config.head_dim ** -0.5)  # noqa: E731
        return decoder_layer(config, p, lo, h, cos, sin, onehot, att), None

    h, _ = jax.lax.scan(body, h, (base.layers, lora, scaling))
    return jnp.mean(token_losses(config, base, h, jnp.roll(tokens, -1)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "configs/models/llama-3.1-8b"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="float32 (the CPU's native type) or bfloat16")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    config = ModelConfig.from_pretrained(args.model)
    dtype = jnp.dtype(args.dtype)
    shapes = param_shapes(config)
    sds = lambda name: jax.ShapeDtypeStruct(shapes[name], dtype)  # noqa: E731
    base = BaseWeights(
        embed=sds("embed_tokens"),
        layers={"input_norm": sds("layers.input_norm"), "post_norm": sds("layers.post_norm"),
                "kernel": {m: sds(f"layers.{m}") for m in MODULES},
                "bias": {k[len("layers."):-len("_bias")]: sds(k) for k in shapes if k.endswith("_bias")}},
        norm=sds("norm"),
        lm_head=jax.ShapeDtypeStruct((config.hidden_size, config.vocab_size), dtype),
    )
    lora, scaling = abstract_lora(config, args.rank, dtype)
    item = jnp.dtype(dtype).itemsize
    rows = []
    for n in args.tokens:
        toks = jax.ShapeDtypeStruct((n,), jnp.int32)
        naive = jax.jit(jax.grad(lambda lo, b, sc, t: naive_loss(config, b, lo, sc, t))).lower(lora, base, scaling, toks).compile()
        naive_tmp = naive.memory_analysis().temp_size_in_bytes
        saved = config.num_layers * n * config.hidden_size * item + n * config.hidden_size * 4  # layer inputs + dh
        sl = jax.jit(
            lambda lo, b, sc, li, pos, dh, first: slice_backward(config, b.layers, lo, sc, li, pos, dh, first, 1)
        ).lower(
            lora, base, scaling, jax.ShapeDtypeStruct((config.num_layers, n, config.hidden_size), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n, config.hidden_size), dtype),
            jax.ShapeDtypeStruct((), jnp.int32),
        ).compile()
        slice_tmp = sl.memory_analysis().temp_size_in_bytes
        row = {
            "tokens": n,
            "naive_activation_bytes_per_token": naive_tmp / n,
            "ours_saved_bytes_per_token": saved / n,
            "ours_one_slice_transient_bytes_per_token": slice_tmp / n,
            "reduction_saved": naive_tmp / saved,
            "reduction_saved_plus_slice_peak": naive_tmp / (saved + slice_tmp),
        }
        rows.append(row)
        print(json.dumps(row))
    result = {
        "command": "python bench/activation_memory.py " + " ".join(sys.argv[1:]),
        "model": pathlib.Path(args.model).name, "dtype": args.dtype, "lora_rank": args.rank,
        "lora_targets": list(MODULES), "jax": jax.__version__, "backend": jax.default_backend(), "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
