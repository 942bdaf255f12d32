"""Finetune-only training throughput: the engine against a plain ``torch`` + ``peft`` loop.

Both sides train the same LoRA (r 16, alpha 32, all linear modules, AdamW lr 1e-4, no dropout)
on the same tokenized examples (GSM8K train as chat, loss on the answer only) of SmolLM2-135M-Instruct
in float32, with the same batch (``--batch`` sequences per optimizer step; the engine's
``gradient_accumulation_steps``, one padded batch on the torch side). Each side's time runs
from its first step to the end of its last optimizer step; tokens are the sequences' real
(unpadded) tokens. Each round runs each side in a fresh process (engine, torch, engine, torch,
...: neither side's threads or allocator state reach into the other's timing), and the ratio is
reported per round and as min / median.

    python bench/finetune_throughput.py --examples 16 --batch 4 --rounds 3 \\
        --out bench/results/finetune_throughput_cpu.json

The engine's build and compile time is reported apart (not counted; its compilation cache makes
later rounds' builds short). With no inference running, the engine runs each training sequence as
one train step (``--token-level`` runs the forward chunks and layer-sliced backward that serve
under inference instead); ``--no-packing`` gives one example per sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data")
GGUF = "models/smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
ENGINE_KW = dict(dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256, token_buckets=(64, 256),
                 seq_buckets=(4,), max_loras=2, max_lora_rank=16, finetune_max_seq_len=512)


def read_examples(path: str) -> list:
    from coserve_jax.finetune.data import TrainingExample

    with open(path) as f:
        return [TrainingExample(tuple(e["ids"]), tuple(e["mask"]), e["line"]) for e in json.load(f)]


def engine_round(gguf: str, examples, batch: int, seed: int, packing: bool, token_level: bool, seq_buckets) -> dict:
    from coserve_jax import Engine

    t = time.perf_counter()
    kw = dict(ENGINE_KW, finetune_idle_train_step=not token_level)
    if seq_buckets:
        kw["finetune_seq_buckets"] = tuple(seq_buckets)
    engine = Engine(gguf, **kw)
    build_s = time.perf_counter() - t
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
    steps = engine.num_steps - steps0
    return {"wall_s": wall, "tokens": job.trained_tokens, "tokens_per_s": job.trained_tokens / wall,
            "engine_steps": steps, "optimizer_steps": job.step, "engine_steps_per_optimizer_step": steps / job.step,
            "losses": [r.loss for r in job.loss_history], "build_s": build_s,
            "backward_buckets": list(engine.engine_config.backward_buckets)}


def torch_round(gguf: str, examples, batch: int, seed: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
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
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "optimizer_steps": len(losses), "losses": losses}


def one_side(args) -> int:
    """Child process: one round of one side; its result as the last line of stdout (JSON)."""
    examples = read_examples(args.examples_file)
    if args.side == "engine":
        out = engine_round(args.gguf, examples, args.batch, args.seed, not args.no_packing, args.token_level, args.seq_buckets)
    else:
        out = torch_round(args.gguf, examples, args.batch, args.seed)
    print(json.dumps(out), flush=True)
    return 0


def run_side(side: str, args, examples_file: str, gguf: str, seed: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--examples-file", examples_file, "--gguf", gguf,
           "--batch", str(args.batch), "--seed", str(seed)]
    if args.no_packing:
        cmd.append("--no-packing")
    if args.token_level:
        cmd.append("--token-level")
    if args.seq_buckets:
        cmd += ["--seq-buckets", *map(str, args.seq_buckets)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the {side} round failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("COSERVE_JAX_DATA_DIR", DATA))
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-packing", action="store_true", help="one example per training sequence")
    p.add_argument("--token-level", action="store_true",
                   help="forward chunks and layer-sliced backward even with no inference (finetune_idle_train_step=False)")
    p.add_argument("--seq-buckets", type=int, nargs="*", help="the engine's finetune_seq_buckets (default: the engine's default)")
    p.add_argument("--out", default=None)
    p.add_argument("--side", choices=("engine", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--examples-file", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        return one_side(args)
    gguf = os.path.abspath(os.path.join(args.data_dir, GGUF))
    train = os.path.join(args.data_dir, "finetune", "gsm8k", "train.jsonl")
    if not (os.path.isfile(gguf) and os.path.isfile(train)):
        print(f"needs {gguf} and {train} (the shared data folder; --data-dir)", file=sys.stderr)
        return 2
    import jax

    from coserve_jax.finetune.data import load_dataset
    from coserve_jax.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subset = os.path.join(tmp, "gsm8k_subset.jsonl")
        with open(train) as f, open(subset, "w") as g:
            for _ in range(args.examples):
                g.write(f.readline())
        examples = load_dataset(subset, load_tokenizer(gguf), columns={"prompt": "question", "completion": "answer"},
                                chat_template=True, max_seq_len=ENGINE_KW["finetune_max_seq_len"])
        examples_file = os.path.join(tmp, "examples.json")
        with open(examples_file, "w") as f:
            json.dump([{"ids": list(e.token_ids), "mask": list(e.loss_mask), "line": e.line} for e in examples], f)
        rounds = []
        for r in range(args.rounds):
            e = run_side("engine", args, examples_file, gguf, seed=r)
            tr = run_side("torch", args, examples_file, gguf, seed=r)
            ratio = e["tokens_per_s"] / tr["tokens_per_s"]
            print(f"round {r + 1}: engine {e['tokens_per_s']:.1f} tokens/s ({e['engine_steps']} steps for "
                  f"{e['optimizer_steps']} optimizer steps, {e['wall_s']:.1f} s; built in {e['build_s']:.1f} s), "
                  f"torch+peft {tr['tokens_per_s']:.1f} tokens/s ({tr['wall_s']:.1f} s): engine/torch {ratio:.3f}", flush=True)
            rounds.append({"engine": e, "torch_peft": tr, "ratio": ratio})
    ratios = [r["ratio"] for r in rounds]
    result = {
        "command": "python bench/finetune_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": GGUF, "dtype": "float32", "examples": args.examples, "batch": args.batch, "lora": LORA,
        "engine": {k: list(v) if isinstance(v, tuple) else v for k, v in ENGINE_KW.items()},
        "packing": not args.no_packing, "idle_train_step": not args.token_level,
        "tokens_per_example_mean": statistics.mean(len(e.token_ids) for e in examples),
        "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "rounds": rounds,
        "jax": jax.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
    }
    print(f"engine/torch+peft tokens/s: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
