"""Peak host memory of the real SmolLM2-135M-Instruct (the GGUF in ../shared/data, fp32, reference
attention on this CPU) at ``max_model_len`` 8192 while it prefills one long prompt and decodes a
few tokens: the reference attention gathers the live context's pages, not ``max_model_len``'s.

    python bench/long_context_memory.py --out bench/results/long_context_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "data" / "models" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not GGUF.exists():
        sys.exit(f"needs {GGUF} (../shared/data)")
    import jax

    from coserve_jax.engine import Engine
    from coserve_jax.sched.sampling_params import SamplingParams

    t = time.perf_counter()
    eng = Engine(model=str(GGUF), dtype="float32", max_model_len=args.max_model_len, max_num_seqs=8,
                 max_num_batched_tokens=128, token_buckets=[16, 128], seq_buckets=[8], num_kv_pages=1024,
                 max_finetune_jobs=0, max_loras=0)
    built = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(rss_mb())}
    prompt = list(range(100, 100 + args.prompt_tokens))
    t = time.perf_counter()
    out = eng.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    result = {
        "command": "python bench/long_context_memory.py " + " ".join(sys.argv[1:]), "jax": jax.__version__,
        "model": GGUF.name, "max_model_len": args.max_model_len, "prompt_tokens": args.prompt_tokens,
        "attention": eng.engine_config.attention_impl, "after_build": built,
        "generate_seconds": round(time.perf_counter() - t, 1), "generated": list(out[0].token_ids),
        "peak_rss_mb": round(rss_mb()),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
