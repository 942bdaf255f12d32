"""Compiled FLOPs of a decode step at Llama-3.1-8B shape: what finetuning costs a step that
carries no training chunk.

Compile-only (abstract weights, :func:`coserve_jax.engine.model_runner.compile_abstract`'s
runner), bf16, one bucket of ``T`` token slots and ``S`` sequences (default the issue's batch-64
decode: ``T = S = 64``), the engine's default finetuning layout (``max_finetune_tokens`` 64):

* ``finetuning_off``: the step of an engine without finetuning;
* ``finetuning_on_all_branches``: the same bucket with finetuning on, as ``cost_analysis()``
  reports it. XLA's cost analysis takes the most expensive branch of every conditional, so this
  counts the loss head over all ``C`` slots and the store's scatter, whether or not a step runs
  them;
* ``finetuning_on_no_chunk``: the same step lowered with what a step without a training chunk
  passes (no weighted slot: ``head_bucket = 0``; no chunk: every ``seq`` = ``S``) as constants,
  so XLA folds the conditionals to the branches such a step takes: the work it executes.

    python bench/step_flops.py --out bench/results/step_flops_8b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def step_flops(model, knobs: dict, tokens: int, seqs: int, no_chunk: bool = False) -> float:
    """FLOPs (``cost_analysis``) of the step bucket ``(tokens, seqs)`` of an engine with ``knobs``."""
    from coserve_jax.engine.config import EngineConfig
    from coserve_jax.engine.model_runner import ModelRunner
    from coserve_jax.engine.step import Bucket, abstract, make_step_fn
    from coserve_jax.engine.step_inputs import abstract_inputs
    from coserve_jax.parallel.mesh import make_mesh
    from coserve_jax.parallel.rules import ShardingRules

    rules = ShardingRules(model.config, make_mesh(1))
    pool = model.lora.config if model.lora is not None else None
    lora = {} if pool is None else dict(max_loras=pool.max_loras, max_lora_rank=pool.max_lora_rank,
                                        lora_target_modules=pool.target_modules)
    config = EngineConfig.resolve(
        model.config, has_lora_pool=pool is not None, kv_cache_heads=rules.kv_cache_heads,
        dtype_itemsize=jnp.dtype(model.dtype).itemsize, **lora,
        token_buckets=[tokens], seq_buckets=[seqs], max_num_batched_tokens=tokens, max_num_seqs=seqs, **knobs,
    )
    runner = ModelRunner(model, rules, config, abstract_only=True)
    step = make_step_fn(runner.step_fn.graphdef, scale=model.config.head_dim ** -0.5, impl=config.attention_impl,
                        max_logprobs=config.max_logprobs, lora_groups=config.lora_groups)

    def fn(state, k, v, ft, seen, prev, inputs):
        f = inputs.finetune
        if no_chunk and f is not None:
            f = f._replace(head_bucket=jnp.int32(0), seq=jnp.full(f.seq.shape, seqs, jnp.int32))
            inputs = dataclasses.replace(inputs, finetune=f)
        return step(state, k, v, ft, seen, prev, inputs)

    bucket = Bucket(tokens, seqs)
    args = abstract((runner.state, runner.k_cache, runner.v_cache, runner.ft_buffers, runner.seen))
    prev = jax.ShapeDtypeStruct((seqs,), jnp.int32)
    compiled = jax.jit(fn).lower(*args, prev, abstract_inputs(runner.step_fn.dims(bucket))).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from coserve_jax.models import ModelConfig, init_abstract
    from coserve_jax.models.lora_pool import LoRAPoolConfig

    cfg = ModelConfig.from_hf_dict(json.loads((ROOT / "configs" / "models" / "llama-3.1-8b" / "config.json").read_text()))
    model = init_abstract(cfg, dtype="bfloat16", lora=LoRAPoolConfig(4, 16))
    base = dict(max_model_len=args.max_model_len, num_kv_pages=1024)
    ft = dict(base, max_finetune_jobs=1, finetune_max_seq_len=2048, max_finetune_tokens=64)
    rows = {
        "finetuning_off": step_flops(model, dict(base, max_finetune_jobs=0), args.tokens, args.seqs),
        "finetuning_on_all_branches": step_flops(model, ft, args.tokens, args.seqs),
        "finetuning_on_no_chunk": step_flops(model, ft, args.tokens, args.seqs, no_chunk=True),
    }
    off = rows["finetuning_off"]
    result = {
        "command": "python bench/step_flops.py " + " ".join(sys.argv[1:]), "jax": jax.__version__,
        "bucket": {"tokens": args.tokens, "seqs": args.seqs}, "max_model_len": args.max_model_len,
        "flops": rows, "relative_to_off": {k: round(v / off, 5) for k, v in rows.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
