"""Segmented (grouped-GEMM) multi-LoRA against the one-hot reference: compiled FLOPs at
Llama-3.1-8B shape and CPU time of a forward, at 1, 4, 16 and 64 adapter slots.

1. ``flops_8b``: ``cost_analysis()`` FLOPs of the serving step (compile-only, abstract weights in
   bf16 and in fp32, no finetuning), bucket ``T = S = 64`` (a batch-64 decode), for a model without a
   LoRA pool and for pools of 1, 4, 16 and 64 slots (rank 16, all seven linear modules) under
   ``lora_impl="onehot"`` and ``"segmented"`` (``max_loras_per_batch`` at its default,
   ``min(slots, 4)``). XLA's cost analysis counts the body of the scan over layers once, so these
   are "one decoder layer + embedding, LM head and sampler" figures; the LoRA share of a whole
   step is about ``num_layers`` times larger than what they show. In bf16, XLA's CPU backend
   converts gathered bf16 operands inside the gather's fusion, and the cost analysis counts that
   convert over the whole pool (every slot) though only the gathered slots are computed (the
   compiled temporary memory does not grow with the slots); fp32 has no such convert.
2. ``cpu_forward``: wall time of the jitted forward (``CausalLM.hidden_states``, dense attention,
   float32) of a 4-layer model of SmolLM2-135M's width (hidden 576, MLP 1536, 9/3 heads) on
   ``--tokens`` tokens: base-only, and with 4 live adapters spread over the tokens, one-hot and
   segmented, at each slot count; the variants run interleaved (A, B, A, B ...), ``--rounds``
   rounds, median and min in ms, and the ratio segmented / one-hot.

    python bench/lora_segmented.py --out bench/results/lora_segmented_cpu.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SLOTS = (1, 4, 16, 64)


def flops_8b(tokens: int, seqs: int, dtype: str) -> dict:
    from step_flops import step_flops

    from coserve_jax.models import ModelConfig, init_abstract
    from coserve_jax.models.lora_pool import LoRAPoolConfig

    cfg = ModelConfig.from_hf_dict(json.loads((ROOT / "configs" / "models" / "llama-3.1-8b" / "config.json").read_text()))
    knobs = dict(max_model_len=2048, num_kv_pages=1024, max_finetune_jobs=0)
    rows = {}
    # "no pool": the smallest pool under the one-hot path with no token on an adapter would still
    # count its GEMMs, so the baseline is a model built without a pool.
    rows["no_pool"] = step_flops(init_abstract(cfg, dtype=dtype, lora=None), knobs, tokens, seqs)
    for slots in SLOTS:
        model = init_abstract(cfg, dtype=dtype, lora=LoRAPoolConfig(slots, 16))
        for impl in ("onehot", "segmented"):
            rows[f"{impl}_slots{slots}"] = step_flops(model, dict(knobs, lora_impl=impl), tokens, seqs)
            print(f"{dtype} {impl} slots={slots}: {rows[f'{impl}_slots{slots}']:.4g} FLOPs "
                  f"({rows[f'{impl}_slots{slots}'] / rows['no_pool']:.4f}x no pool)", flush=True)
    return {"bucket": {"tokens": tokens, "seqs": seqs}, "flops": rows,
            "relative_to_no_pool": {k: round(v / rows["no_pool"], 5) for k, v in rows.items()}}


def cpu_forward(tokens: int, rounds: int) -> dict:
    from coserve_jax.models import ModelConfig, init_random
    from coserve_jax.models.attention import dense_attention, packed_causal_mask
    from coserve_jax.models.lora_pool import LoRAPoolConfig

    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
        num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3, vocab_size=4096, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    ))
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, tokens), jnp.int32)
    seg = np.repeat(np.arange(8), tokens // 8)
    pos = jnp.asarray(np.concatenate([np.arange(tokens // 8)] * 8), jnp.int32)
    mask = packed_causal_mask(jnp.asarray(seg, jnp.int32), pos)
    scale = cfg.head_dim ** -0.5

    def attend(q, k, v):
        return dense_attention(q, k, v, mask, scale)

    out: dict = {"tokens": tokens, "rounds": rounds, "model": "4 layers, hidden 576, MLP 1536, 9/3 heads, fp32", "slots": {}}
    for slots in SLOTS:
        model = init_random(cfg, seed=0, dtype="float32", lora=LoRAPoolConfig(slots, 16))
        live = np.linspace(1, slots, min(4, slots)).astype(np.int32)  # 4 live adapters (fewer with fewer slots)
        with_lora = jnp.asarray(live[np.arange(tokens) % len(live)] * (np.arange(tokens) % 5 != 0), jnp.int32)
        base = jnp.zeros((tokens,), jnp.int32)
        fns = {}
        for impl, groups in (("onehot", 0), ("segmented", min(slots, 4))):
            fns[impl] = jax.jit(lambda ids, g=groups: model.hidden_states(tok, pos, ids, attend, lora_groups=g))
        cases = [(f"{impl}_{name}", fns[impl], ids) for impl in fns for name, ids in (("base", base), ("4_live", with_lora))]
        for _, f, ids in cases:
            f(ids).block_until_ready()  # compile
        ref = np.asarray(fns["onehot"](with_lora))
        seg_out = np.asarray(fns["segmented"](with_lora))
        times = {name: [] for name, _, _ in cases}
        for _ in range(rounds):
            for name, f, ids in cases:
                t = time.perf_counter()
                f(ids).block_until_ready()
                times[name].append((time.perf_counter() - t) * 1e3)
        row = {name: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3)} for name, v in times.items()}
        for case in ("base", "4_live"):
            row[f"segmented_over_onehot_{case}"] = round(
                statistics.median(times[f"segmented_{case}"]) / statistics.median(times[f"onehot_{case}"]), 3)
        row["max_abs_diff_4_live"] = float(np.max(np.abs(seg_out - ref)))
        out["slots"][slots] = row
        print(f"slots={slots}: {json.dumps(row)}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="bucket T = S of the 8B step")
    ap.add_argument("--cpu-tokens", type=int, default=256, help="tokens of the CPU forward")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result = {"command": "python bench/lora_segmented.py " + " ".join(sys.argv[1:]), "jax": jax.__version__}
    if not args.skip_8b:
        result["flops_8b"] = {dt: flops_8b(args.tokens, args.tokens, dt) for dt in ("bfloat16", "float32")}
    result["cpu_forward"] = cpu_forward(args.cpu_tokens, args.rounds)
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
