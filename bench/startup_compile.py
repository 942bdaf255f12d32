"""Start-up compile time of the engine with and without finetuning (cold compilation cache).

Tiny Llama-3.1-style model (2 layers, hidden 64), budget 64 tokens, 8 sequences: the default
power-of-two step buckets, and with finetuning the backward-slice executables of the default
sequence buckets. Each configuration runs in a fresh process so nothing is cached in memory.

    python bench/startup_compile.py --out bench/results/startup_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax
from coserve_jax.engine import Engine
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models import ModelConfig, init_random
cfg = ModelConfig.from_hf_dict(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, vocab_size=256, max_position_embeddings=512, torch_dtype="float32"))
model = init_random(cfg, seed=0, dtype="float32", lora=LoRAPoolConfig(2, 8))
jobs = int(sys.argv[1])
t0 = time.perf_counter()
e = Engine(model, max_num_seqs=8, max_num_batched_tokens=64, num_kv_pages=64, compilation_cache_dir=None, max_finetune_jobs=jobs)
print(json.dumps({"max_finetune_jobs": jobs, "step_buckets": len(e.buckets), "backward_buckets": len(e.runner.backward),
                  "startup_s": round(time.perf_counter() - t0, 2), "jax": jax.__version__, "backend": jax.default_backend()}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for jobs in (0, 1):
        out = subprocess.run([sys.executable, "-c", CHILD, str(jobs)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python bench/startup_compile.py " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
