"""Finetune-only training throughput: the engine against a plain ``torch`` + ``peft`` loop.

Both sides train the same LoRA (r 16, alpha 32, all linear modules, AdamW lr 1e-4, no dropout)
on the same tokenized examples (GSM8K train as chat, loss on the answer only) of SmolLM2-135M-Instruct
in float32, with the same batch (``--batch`` sequences per optimizer step; the engine's
``gradient_accumulation_steps``, one padded batch on the torch side). Each side's time runs
from its first step to the end of its last optimizer step; tokens are the sequences' real
(unpadded) tokens. The sides run interleaved (engine, torch, engine, torch, ...) and the ratio
is reported per round and as min / median.

    python bench/finetune_throughput.py --examples 16 --batch 4 --rounds 2 \\
        --out bench/results/finetune_throughput_cpu.json

The engine is built once (its compile time is reported apart, not counted); each engine round is
a fresh job. With no inference running, the engine runs a training sequence's whole backward in
one step and packs short examples (``--no-packing`` turns that off);
``--layers-per-slice`` only matters while inference runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data")
GGUF = "models/smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}


def engine_round(engine, examples, batch: int, seed: int, packing: bool = True) -> dict:
    job = engine.create_finetuning_job(
        examples, lora=LORA, learning_rate=1e-4, gradient_accumulation_steps=batch, max_steps=len(examples) // batch,
        lr_scheduler_type="constant", max_grad_norm=None, shuffle=False, seed=seed, adapter_name=f"bench-{seed}",
        packing=packing,
    )
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    engine.wait_for(job, use_tqdm=False)
    wall = time.perf_counter() - t0
    assert job.status.value == "succeeded", job.error
    out = {"wall_s": wall, "tokens": job.trained_tokens, "tokens_per_s": job.trained_tokens / wall,
           "engine_steps": engine.num_steps - steps0, "optimizer_steps": job.step,
           "engine_steps_per_optimizer_step": (engine.num_steps - steps0) / job.step,
           "losses": [r.loss for r in job.loss_history]}
    engine.unload_adapter(job.adapter_name)
    return out


def torch_round(model_dir, gguf_file, examples, batch: int, seed: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, torch_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], target_modules="all-linear",
                                            lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    losses, tokens = [], 0
    t0 = time.perf_counter()
    for s in range(len(examples) // batch):
        group = examples[s * batch:(s + 1) * batch]
        n = max(len(e.token_ids) for e in group)
        ids = torch.zeros((len(group), n), dtype=torch.long)
        mask = torch.zeros((len(group), n), dtype=torch.long)
        labels = torch.full((len(group), n), -100, dtype=torch.long)
        for i, e in enumerate(group):
            k = len(e.token_ids)
            ids[i, :k] = torch.tensor(e.token_ids)
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor([t if m else -100 for t, m in zip(e.token_ids, e.loss_mask)])
            tokens += k
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "optimizer_steps": len(losses), "losses": losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("COSERVE_JAX_DATA_DIR", DATA))
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers-per-slice", type=int, default=1)
    p.add_argument("--no-packing", action="store_true", help="one example per training sequence")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gguf = os.path.join(args.data_dir, GGUF)
    train = os.path.join(args.data_dir, "finetune", "gsm8k", "train.jsonl")
    if not (os.path.isfile(gguf) and os.path.isfile(train)):
        print(f"needs {gguf} and {train} (the shared data folder; --data-dir)", file=sys.stderr)
        return 2
    import jax

    from coserve_jax import Engine

    t = time.perf_counter()
    engine = Engine(gguf, dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256,
                    token_buckets=(64, 256), seq_buckets=(4,), max_loras=2, max_lora_rank=16, finetune_max_seq_len=512,
                    finetune_layers_per_slice=args.layers_per_slice)
    build_s = time.perf_counter() - t
    subset = os.path.join(os.path.dirname(os.path.abspath(args.out or "x")), ".gsm8k_subset.jsonl")
    with open(train) as f, open(subset, "w") as g:
        for _ in range(args.examples):
            g.write(f.readline())
    from coserve_jax.finetune.config import FinetuneConfig

    examples = list(engine.finetuning.examples(subset, FinetuneConfig(columns={"prompt": "question", "completion": "answer"},
                                                                      chat_template=True)))
    os.remove(subset)
    rounds = []
    for r in range(args.rounds):
        e = engine_round(engine, examples, args.batch, seed=r, packing=not args.no_packing)
        tr = torch_round(os.path.dirname(gguf), os.path.basename(gguf), examples, args.batch, seed=r)
        ratio = e["tokens_per_s"] / tr["tokens_per_s"]
        print(f"round {r + 1}: engine {e['tokens_per_s']:.1f} tokens/s ({e['engine_steps']} steps for "
              f"{e['optimizer_steps']} optimizer steps, {e['wall_s']:.1f} s), torch+peft {tr['tokens_per_s']:.1f} tokens/s "
              f"({tr['wall_s']:.1f} s): engine/torch {ratio:.3f}", flush=True)
        rounds.append({"engine": e, "torch_peft": tr, "ratio": ratio})
    ratios = [r["ratio"] for r in rounds]
    result = {
        "command": "python bench/finetune_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": GGUF, "dtype": "float32", "examples": args.examples, "batch": args.batch, "lora": LORA,
        "layers_per_slice": args.layers_per_slice, "packing": not args.no_packing,
        "backward_buckets": list(engine.engine_config.backward_buckets), "engine_build_s": build_s,
        "tokens_per_example_mean": statistics.mean(len(e.token_ids) for e in examples),
        "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "rounds": rounds,
        "jax": jax.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
    }
    print(f"engine/torch+peft tokens/s: min {min(ratios):.3f}, median {statistics.median(ratios):.3f} "
          f"(engine built in {build_s:.1f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
