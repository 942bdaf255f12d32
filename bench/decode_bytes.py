"""Bytes and FLOPs of the Llama-3.1-8B decode step: the model (what any decode step must read
and compute) against what the compiled and lowered steps do.

Compile-only (abstract weights, bf16, one device, no finetuning, no LoRA pool), the decode bucket
``T = S = batch`` with every sequence at ``context`` tokens.

* ``model``: the weights the step reads (the embedding table is gathered, ``T`` rows, unless
  tied to the LM head), K and V of every live token of every layer, and the floor: their sum over
  the GPU's memory bandwidth (``--bandwidth``; H200 HBM3e 4.8 TB/s). FLOPs: ``2 x`` the read
  weights per token plus attention (``4 x context x Hq x D`` per token and layer).
* ``compiled_flops``: ``compiled.cost_analysis()`` of the step compiled for this CPU with the
  attention replaced by zeros (the K/V writes stay), at 1 and 2 layers (the scan unrolled):
  the slope is one layer, the rest the LM head and sampling; the whole step is
  ``rest + layers x slope``, plus the attention's FLOPs.
* ``cpu_cost_analysis_bytes``: the same compiles' "bytes accessed". Not a GPU figure: XLA's CPU
  backend converts bf16 weights to f32 for its matmuls (a write and a read of twice the bytes)
  and counts the whole operand of a fusion that slices it.
* ``reference``: what the pure-JAX reference attention (the CPU path) adds: it reads the live
  pages, writes each gathered copy and reads it again (the gathers at the live width, from the
  lowered step: the pages of every sequence, and for decode buckets each token's keys and values).
* ``pallas``: the kernel reads each live page of K and V once per KV head (a GQA group shares it),
  plus ``q`` and the output; no K/V gather or copy outside it (``tests/test_gpu_lowering.py``
  checks the lowered step). What it moves on a GPU is to be measured on one.

    python bench/decode_bytes.py --out bench/results/decode_bytes_8b.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import pathlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def unrolled_scans():
    """``jax.lax.scan`` fully unrolled while tracing (for whole-step cost analysis)."""
    orig = jax.lax.scan
    with mock.patch.object(jax.lax, "scan", functools.partial(orig, unroll=True)):
        yield


def step_cost(model, knobs: dict, batch: int, kernel_as_zeros: bool = False, seqs: int | None = None) -> dict:
    """``cost_analysis()`` (flops, bytes accessed) of the bucket ``(batch, seqs)`` (default
    ``seqs = batch``: a decode bucket)."""
    seqs = batch if seqs is None else seqs
    from coserve_jax.engine.config import EngineConfig
    from coserve_jax.engine.model_runner import ModelRunner
    from coserve_jax.engine.step import Bucket, abstract, make_step_fn
    from coserve_jax.engine.step_inputs import abstract_inputs
    from coserve_jax.kernels import paged_attention
    from coserve_jax.parallel.mesh import make_mesh
    from coserve_jax.parallel.rules import ShardingRules

    rules = ShardingRules(model.config, make_mesh(1))
    config = EngineConfig.resolve(
        model.config, has_lora_pool=False, kv_cache_heads=rules.kv_cache_heads,
        dtype_itemsize=jnp.dtype(model.dtype).itemsize, token_buckets=[batch], seq_buckets=[seqs],
        max_num_batched_tokens=batch, max_num_seqs=seqs, max_finetune_jobs=0, **knobs,
    )
    runner = ModelRunner(model, rules, config, abstract_only=True)
    step = make_step_fn(runner.step_fn.graphdef, scale=model.config.head_dim ** -0.5, impl=config.attention_impl,
                        max_logprobs=config.max_logprobs)
    args = abstract((runner.state, runner.k_cache, runner.v_cache, runner.ft_buffers, runner.seen))
    prev = jax.ShapeDtypeStruct((seqs,), jnp.int32)
    zeros = lambda q, *a, **k: jnp.zeros_like(q)  # noqa: E731
    patch = mock.patch.object(paged_attention, "ragged_paged_attention", zeros) if kernel_as_zeros else contextlib.nullcontext()
    with patch, unrolled_scans():
        compiled = jax.jit(step).lower(*args, prev, abstract_inputs(runner.step_fn.dims(Bucket(batch, seqs)))).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


def reference_gather_bytes(model, knobs: dict, batch: int, context: int) -> int:
    """Bytes of one layer's attention gathers in the reference step's branch of width
    ``context`` (the result types of the lowered module's gathers with a ``context``-token or
    ``context / page_size``-page axis)."""
    import re

    from coserve_jax.engine.config import EngineConfig
    from coserve_jax.engine.model_runner import ModelRunner
    from coserve_jax.engine.step import Bucket, abstract
    from coserve_jax.engine.step_inputs import abstract_inputs
    from coserve_jax.parallel.mesh import make_mesh
    from coserve_jax.parallel.rules import ShardingRules

    rules = ShardingRules(model.config, make_mesh(1))
    config = EngineConfig.resolve(
        model.config, has_lora_pool=False, kv_cache_heads=rules.kv_cache_heads, dtype_itemsize=2,
        token_buckets=[batch], seq_buckets=[batch], max_num_batched_tokens=batch, max_num_seqs=batch,
        max_finetune_jobs=0, attention_impl="reference", **knobs,
    )
    runner = ModelRunner(model, rules, config, abstract_only=True)
    args = abstract((runner.state, runner.k_cache, runner.v_cache, runner.ft_buffers, runner.seen))
    text = runner.step_fn._jitted.lower(*args, jax.ShapeDtypeStruct((batch,), jnp.int32),
                                        abstract_inputs(runner.step_fn.dims(Bucket(batch, seqs)))).as_text()
    sizes = {"bf16": 2, "f32": 4}
    wide = {str(context), str(context // config.page_size)}
    total = 0
    for t in re.findall(r"stablehlo\.gather\b.*?-> tensor<([^>]*)>", text):
        *dims, dt = t.split("x")
        if dt in sizes and wide & set(dims):
            total += int(np.prod([int(d) for d in dims])) * sizes[dt]
    return total


def model_bytes(model, batch: int, context: int) -> dict:
    """What a decode step must read: weights, and K/V of ``batch x context`` tokens (bytes)."""
    from flax import nnx

    mc = model.config
    item = jnp.dtype(model.dtype).itemsize
    params = nnx.state(model, nnx.Param)
    sizes = {"/".join(map(str, k)): int(np.prod(v.shape)) for k, v in nnx.to_flat_state(params)}
    embed = sum(n for k, n in sizes.items() if "embed" in k)
    total = sum(sizes.values())
    tied = bool(getattr(mc, "tie_word_embeddings", False))
    read = total - (0 if tied else embed)  # the embedding table is gathered (T rows), unless it is the LM head
    kv = 2 * mc.num_layers * batch * context * mc.num_kv_heads * mc.head_dim * item
    matmul_params = read  # every weight read is a matmul weight except the norms (negligible)
    flops = 2 * batch * matmul_params + 4 * batch * context * mc.num_heads * mc.head_dim * mc.num_layers
    return {"params": total, "weight_bytes": read * item, "kv_bytes": kv, "bytes": read * item + kv, "flops": flops}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (H200 HBM3e: 4.8e12)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from coserve_jax.models import ModelConfig, init_abstract

    cfg = ModelConfig.from_hf_dict(json.loads((ROOT / "configs" / "models" / "llama-3.1-8b" / "config.json").read_text()))
    model = init_abstract(cfg, dtype="bfloat16")
    mc = model.config
    knobs = dict(max_model_len=args.context, num_kv_pages=args.batch * args.context // 16 + 1)
    floor = model_bytes(model, args.batch, args.context)
    small_pool = dict(knobs, num_kv_pages=args.context // 16 + 1, attention_impl="pallas")
    per = {n: step_cost(init_abstract(dataclasses.replace(cfg, num_layers=n), dtype="bfloat16"), small_pool, args.batch,
                        kernel_as_zeros=True) for n in (1, 2)}
    layer = {k: per[2][k] - per[1][k] for k in per[1]}
    rest = {k: per[1][k] - layer[k] for k in per[1]}
    item = jnp.dtype(model.dtype).itemsize
    q_out = 2 * mc.num_layers * args.batch * mc.num_heads * mc.head_dim * item
    attn_flops = 4 * args.batch * args.context * mc.num_heads * mc.head_dim * mc.num_layers
    layer_weights = sum(mc.module_dims(m)[0] * mc.module_dims(m)[1] for m in
                        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    compiled_flops = {
        "per_layer": layer["flops"], "per_layer_model": 2 * args.batch * layer_weights,
        "lm_head_and_sampling": rest["flops"], "lm_head_model": 2 * args.batch * mc.hidden_size * mc.vocab_size,
        "step": rest["flops"] + mc.num_layers * layer["flops"] + attn_flops,
    }
    gathered = reference_gather_bytes(model, knobs, args.batch, args.context)
    ref_bytes = floor["bytes"] + 2 * mc.num_layers * gathered + q_out
    pallas_bytes = floor["bytes"] + q_out
    ms = lambda b: round(1e3 * b / args.bandwidth, 3)  # noqa: E731
    result = {
        "command": "python bench/decode_bytes.py " + " ".join(sys.argv[1:]), "jax": jax.__version__,
        "batch": args.batch, "context": args.context, "bandwidth_bytes_per_s": args.bandwidth,
        "model": dict(floor, floor_ms=ms(floor["bytes"])),
        "compiled_flops": compiled_flops,
        "cpu_cost_analysis_bytes": {"per_layer": layer["bytes_accessed"], "lm_head_and_sampling": rest["bytes_accessed"],
                                    "per_layer_weights": layer_weights * item},
        "reference": {"gathered_bytes_per_layer": gathered, "bytes": ref_bytes, "ms_at_bandwidth": ms(ref_bytes),
                      "bytes_over_model": round(ref_bytes / floor["bytes"], 3)},
        "pallas": {"bytes": pallas_bytes, "ms_at_bandwidth": ms(pallas_bytes),
                   "bytes_over_model": round(pallas_bytes / floor["bytes"], 3)},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
