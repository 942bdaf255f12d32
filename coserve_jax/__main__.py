"""``python -m coserve_jax``: the inference engine end to end on a built-in default or a local checkpoint.

With no arguments it builds a tiny Llama-3-style model with random weights (no download), loads
two random LoRA adapters, starts a LoRA finetuning job on a built-in synthetic dataset, and
serves 24 concurrent requests of 1 to 200 tokens (greedy and sampled, on the base model and both
adapters) while the job trains in the same steps: continuous batching, chunked prefill, paged KV
cache, the compiled step buckets, token-level finetuning. It prints the engine's figures, a few
outputs and the job's loss curve. With ``--model DIR`` it loads a local Hugging Face checkpoint and its tokenizer and
streams a greedy continuation of ``--prompt``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from coserve_jax.compile_counter import CompileCounter
from coserve_jax.engine import Engine
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.lora import LoRAPoolConfig
from coserve_jax.lora.peft_io import LoRAModule, LoRAWeights
from coserve_jax.models import ModelConfig, init_random
from coserve_jax.models.tiny import tiny_config
from coserve_jax.sched.sampling_params import SamplingParams

TINY = tiny_config(vocab_size=512)


def _random_adapter(config: ModelConfig, rank: int, modules: tuple[str, ...], seed: int) -> LoRAWeights:
    rng = np.random.default_rng(seed)
    mods = {}
    for layer in range(config.num_layers):
        for m in modules:
            d_in, d_out = config.module_dims(m)
            mods[(layer, m)] = LoRAModule(
                rng.normal(0, 0.1, (d_in, rank)).astype(np.float32),
                rng.normal(0, 0.1, (rank, d_out)).astype(np.float32),
                alpha=2.0 * rank,
            )
    return LoRAWeights(mods)


CYCLE = (7, 77, 177, 277, 377, 477, 17, 117)


def _synthetic_examples(vocab: int, n: int, seed: int) -> list[TrainingExample]:
    """A random 8-token prompt, then :data:`CYCLE` repeated from a random phase, with the loss on
    the cycle: a pattern a LoRA on a random model picks up in a few steps."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(0, vocab, 8).tolist()
        phase, length = int(rng.integers(0, len(CYCLE))), int(rng.integers(40, 89))
        ids = tuple(prompt + [CYCLE[(phase + j) % len(CYCLE)] for j in range(length)])
        out.append(TrainingExample(ids, (False,) * 8 + (True,) * length, i + 1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coserve_jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face checkpoint directory (default: built-in tiny model)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--prompt", default="The capital of France is", help="prompt for --model")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--finetune-steps", type=int, default=12, help="optimizer steps of the demo finetuning job")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {len(jax.devices())} device(s)")

    if args.model:
        engine = Engine(args.model, dtype=args.dtype, max_num_seqs=8, max_model_len=4096)
        print(args.prompt, end="", flush=True)
        for out in engine.stream(args.prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0)):
            print(out.delta_text, end="", flush=True)
        print()
        return

    t0 = time.perf_counter()
    model = init_random(TINY, seed=0, dtype=args.dtype, lora=LoRAPoolConfig(max_loras=3, max_lora_rank=8))
    engine = Engine(
        model, max_num_seqs=16, max_num_batched_tokens=128, num_kv_pages=96, token_buckets=(32, 128), seq_buckets=(8, 16),
        finetune_max_seq_len=128, finetune_seq_buckets=(128,), max_finetune_tokens=64,
    )
    engine.load_adapter("attn-r4", _random_adapter(TINY, 4, ("q_proj", "v_proj"), seed=1))
    engine.load_adapter("mlp-r8", _random_adapter(TINY, 8, ("gate_proj", "up_proj", "down_proj"), seed=2))
    print(
        f"tiny {TINY.model_type} model: {TINY.num_params():,} parameters; adapters {engine.list_adapters()}; "
        f"{len(engine.buckets)} step buckets compiled; start-up {time.perf_counter() - t0:.1f} s"
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY.vocab_size, int(n)).tolist() for n in rng.integers(1, 201, 24)]
    names = [(None, "attn-r4", "mlp-r8")[i % 3] for i in range(24)]
    params = [
        SamplingParams(max_tokens=args.max_tokens, temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.95, seed=i, ignore_eos=True)
        for i in range(24)
    ]
    job = engine.create_finetuning_job(
        _synthetic_examples(TINY.vocab_size, 32, seed=3), adapter_name="tuned", max_steps=args.finetune_steps,
        gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=2,
        lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    )
    print(f"finetuning job {job.id}: LoRA r=8 on all linear modules, {job.total_steps} optimizer steps, adapter 'tuned'")
    with CompileCounter() as compiles:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params, adapter=names)
        wall = time.perf_counter() - t0
        trained_beside = job.trained_tokens
        engine.wait_for(job)
    n_out = sum(len(o.token_ids) for o in outs)
    print(
        f"24 requests ({sum(map(len, prompts))} prompt tokens) -> {n_out} generated tokens in {engine.num_steps} steps, "
        f"{wall:.2f} s ({n_out / wall:.0f} tokens/s); preemptions {engine.num_preemptions}; "
        f"compilations after start-up {compiles.requests}"
    )
    losses = [r.loss for r in job.loss_history]
    print(
        f"finetuning {job.status.value}: {job.trained_tokens} training tokens ({trained_beside} while the requests ran), "
        f"{job.tokens_per_s:.0f} tokens/s; loss by step: " + " ".join(f"{x:.3f}" for x in losses)
    )
    for o, n, p in list(zip(outs, names, params))[:3]:
        mode = "greedy" if p.temperature == 0 else f"T={p.temperature}"
        print(f"  request {o.index:2d} adapter {n or 'base':8s} {mode:6s} prompt {len(o.prompt_token_ids):3d} tokens -> {o.token_ids[:8]} ...")
    # Same prompt on the three models: the adapters change the greedy continuation.
    same = engine.generate([prompts[0]] * 3, SamplingParams(max_tokens=4, temperature=0), adapter=[None, "attn-r4", "mlp-r8"])
    for n, o in zip(("base", "attn-r4", "mlp-r8"), same):
        print(f"  adapter {n:8s} -> greedy tokens {o.token_ids}")
    # The adapter the job trained continues the cycle it was trained on.
    prompt = prompts[1][:8] + list(CYCLE[:3])
    base, tuned = engine.generate([prompt] * 2, SamplingParams(max_tokens=6, temperature=0), adapter=[None, "tuned"])
    print(f"  prompt ...{prompt[-3:]}: base -> {base.token_ids}; adapter 'tuned' -> {tuned.token_ids}")


if __name__ == "__main__":
    main()
