"""Host memory while loading a sharded checkpoint: does the loader stream?

Writes a random Llama-shaped bf16 checkpoint (transformers `save_pretrained`, sharded) into a
temporary directory, then loads it with `coserve_jax.models.load_model` in a fresh process and
reads the process's peak resident memory (VmHWM) against its resident memory after loading
(VmRSS). On a CPU backend the loaded model itself lives in host memory, so the figure of
interest is the transient: peak minus after, against the shard size and the model size.

Usage: python bench/load_memory.py [--layers 12] [--hidden 1024] [--shard-mb 100] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child(path: str) -> None:
    import jax

    from coserve_jax.models import load_model

    jax.numpy.zeros(1).block_until_ready()  # initialise the backend before the baseline
    before = _status_kb("VmRSS")
    model = load_model(path)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, model.embed_tokens[...])))
    after = _status_kb("VmRSS")
    peak = _status_kb("VmHWM")
    print(json.dumps({"rss_before_mb": before / 1024, "rss_after_mb": after / 1024, "peak_mb": peak / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 256,
        vocab_size=32000,
    )
    with tempfile.TemporaryDirectory() as d:
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(d, max_shard_size=f"{args.shard_mb}MB")
        del model
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        sizes = [os.path.getsize(os.path.join(d, f)) / 2**20 for f in files]
        out = subprocess.run([sys.executable, __file__, "--child", d], capture_output=True, text=True, check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "command": "python " + " ".join(sys.argv),
        "checkpoint_mb": round(sum(sizes), 1),
        "shards": len(files),
        "largest_shard_mb": round(max(sizes), 1),
        **{k: round(v, 1) for k, v in mem.items()},
        "transient_mb": round(mem["peak_mb"] - mem["rss_after_mb"], 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
