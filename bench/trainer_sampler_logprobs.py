"""Trainer/sampler consistency of a training run: the per-token logprobs a sampled completion
carries (an ordinary request on the run's adapter) against what the run's ``forward`` computes for
the same tokens with the same weights, in float32 and bfloat16.

RL loops divide by the sampler's probabilities (importance sampling, PPO); a sampler whose
numerics differ from the trainer's biases those ratios. Here both are the same model definition
and weights, but different executables: the fused serving step's paged attention and sampler
against the finetuning forward's loss head.

    python bench/trainer_sampler_logprobs.py --model smollm2 --out bench/results/trainer_sampler_logprobs_smollm2.json

Per dtype: an engine on the model, a run (rank 8, attention and MLP) given one optimizer step of
supervised training on GSM8K answers (so the adapter is not zero), ``--samples`` completions of
GSM8K questions (ChatML template, temperature 1, seeded), then ``forward`` on prompt +
completion; reports the max and mean absolute difference over the completion tokens.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from coserve_jax import Engine, SamplingParams
from coserve_jax.finetune.training_run import AdamParams, Datum
from coserve_jax.tokenizer import encode_chat

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GGUF = DATA / "models" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = DATA / "finetune" / "gsm8k" / "test.jsonl"


def engine_for(model: str, dtype: str) -> Engine:
    common = dict(
        dtype=dtype, max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(16, 64), num_kv_pages=256,
        max_loras=2, max_lora_rank=8, max_finetune_jobs=1, finetune_max_seq_len=256, finetune_seq_buckets=(256,),
        max_finetune_tokens=64, max_model_len=512, compilation_cache_dir=None,
    )
    if model == "smollm2":
        return Engine(str(GGUF), **common)
    from coserve_jax.models import ModelConfig, init_random
    from coserve_jax.models.config import LINEAR_MODULES
    from coserve_jax.models.lora_pool import LoRAPoolConfig

    config = ModelConfig.from_hf_dict(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=512,
        num_attention_heads=4, num_key_value_heads=2, model_type="llama", torch_dtype=dtype))
    common.pop("max_model_len")
    return Engine(init_random(config, 0, dtype=dtype, lora=LoRAPoolConfig(2, 8, LINEAR_MODULES)), **common)


def prompts_and_answers(engine: Engine, n: int) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    out = []
    for r in rows:
        if engine.tokenizer is None:  # the tiny random model: random tokens
            rng = np.random.default_rng(len(out))
            out.append((rng.integers(0, 256, 40).tolist(), rng.integers(0, 256, 30).tolist()))
            continue
        prompt = encode_chat(engine.tokenizer, [{"role": "user", "content": r["question"]}], add_generation_prompt=True)
        answer = engine.tokenizer.encode(r["answer"], add_special_tokens=False)[:60]
        out.append((prompt, answer))
    return out


def measure(model: str, dtype: str, samples: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    engine = engine_for(model, dtype)
    ready = time.perf_counter() - t0
    run = engine.create_training_run(rank=8, seed=0, lora_alpha=16.0)
    pairs = prompts_and_answers(engine, samples)
    sft = []
    for prompt, answer in pairs:
        tokens = prompt + answer
        sft.append(Datum(tokens[:-1], {"target_tokens": tokens[1:],
                                       "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer)}))
    run.forward_backward(sft)
    opt = run.optim_step(AdamParams(learning_rate=1e-3))
    while not opt.done:
        engine.step()
    sp = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, logprobs=0) for i in range(samples)]
    outs = engine.generate([p for p, _ in pairs], sp, run.adapter_name, use_tqdm=False)
    probes, spans = [], []
    for (prompt, _), out in zip(pairs, outs):
        tokens = list(prompt) + list(out.token_ids)
        probes.append(Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)}))
        spans.append((len(prompt) - 1, np.asarray(out.logprobs, np.float64)))
    fwd = run.forward(probes)
    while not fwd.done:
        engine.step()
    diffs = []
    for res, (start, sampled) in zip(fwd.result().loss_fn_outputs, spans):
        trained = np.asarray(res["logprobs"][start:], np.float64)
        diffs.append(np.abs(trained - sampled))
    d = np.concatenate(diffs)
    return {"model": model, "dtype": dtype, "completions": samples, "tokens_compared": int(d.size),
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "mean_sampled_logprob": float(np.mean(np.concatenate([s for _, s in spans]))),
            "engine_ready_s": round(ready, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()
    if args.model == "smollm2" and not GGUF.exists():
        raise SystemExit(f"{GGUF} is missing (../shared/data)")
    rows = [measure(args.model, d, args.samples, args.max_tokens) for d in args.dtypes]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python bench/trainer_sampler_logprobs.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None)
        args.out.write_text(json.dumps({"command": cmd, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
