"""``python -m coserve_jax``: run the model core end to end on a built-in default or a local checkpoint.

With no arguments it builds a tiny Llama-3-style model with random weights (no download), loads
two random LoRA adapters into the pool, and runs one packed batch in which every sequence uses a
different adapter (or the base model), printing per-sequence greedy next tokens and timings.
With ``--model DIR`` it loads a local Hugging Face checkpoint (and its tokenizer) instead and
greedily continues ``--prompt`` (whole-sequence recompute per token: a smoke test of the model
layer, not the serving engine).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coserve_jax.lora import LoRAPoolConfig
from coserve_jax.lora.manager import AdapterManager
from coserve_jax.lora.peft_io import LoRAModule, LoRAWeights
from coserve_jax.models import ModelConfig, init_random, load_model, pack_sequences

TINY = ModelConfig.from_hf_dict(
    dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=512,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=128
        ),
        torch_dtype="float32",
    )
)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coserve_jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face checkpoint directory (default: built-in tiny model)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--prompt", default="The capital of France is", help="prompt for --model")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens to generate for --model")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {len(jax.devices())} device(s)")

    if args.model:
        from coserve_jax.tokenizer import load_tokenizer

        model = load_model(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
        ids = tokenizer.encode(args.prompt)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
        for _ in range(args.max_tokens):
            batch = pack_sequences([ids])
            logits = forward(state, *batch.arrays())
            ids.append(int(jnp.argmax(logits[len(ids) - 1])))
        print(tokenizer.decode(ids))
        return

    t0 = time.perf_counter()
    model = init_random(TINY, seed=0, dtype=args.dtype, lora=LoRAPoolConfig(max_loras=2, max_lora_rank=8))
    manager = AdapterManager(model)
    manager.load("attn-r4", _random_adapter(TINY, 4, ("q_proj", "v_proj"), seed=1))
    manager.load("mlp-r8", _random_adapter(TINY, 8, ("gate_proj", "up_proj", "down_proj"), seed=2))
    print(f"tiny {TINY.model_type} model: {TINY.num_params():,} parameters, adapters {manager.names} "
          f"({time.perf_counter() - t0:.2f} s to build)")

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, TINY.vocab_size, 24).tolist()
    names = [None, "attn-r4", "mlp-r8"]
    batch = pack_sequences([prompt] * 3, [manager.adapter_index(n) for n in names], pad_to=128)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    t0 = time.perf_counter()
    logits = np.asarray(forward(state, *batch.arrays()))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.asarray(forward(state, *batch.arrays()))
    run_ms = (time.perf_counter() - t0) * 1e3
    print(f"one packed batch of {len(batch.tokens)} token slots: compile {compile_s:.2f} s, run {run_ms:.2f} ms")
    for name, rows in zip(names, batch.unpack(logits)):
        print(f"  adapter {name or 'base':8s} -> greedy next token {int(rows[-1].argmax()):4d}")


if __name__ == "__main__":
    main()
