"""Automatic prefix caching on a Mooncake workload: hit rate, TTFT and throughput, caching on
against off, on the tiny model or SmolLM2-135M-Instruct (the GGUF in ../shared/data).

The workload: the first ``--num-requests`` requests of the Mooncake FAST'25 conversation
trace's multi-turn sessions (:func:`coserve_jax.bench.workload.multi_turn_sessions`), prompts
built so that their blocks repeat exactly as the trace's ``hash_ids`` do, with 512-token blocks
scaled to ``--block-tokens`` (:func:`~coserve_jax.bench.workload.block_prompts`) and cut to the
preset's longest prompt (SmolLM2: 1,024 tokens, as the CPU's reference attention slows with
context), outputs scaled alike (``ignore_eos``), arrivals the trace's rescaled to ``--rate`` requests/s. The bound is the
hit rate an unbounded cache allows (:func:`~coserve_jax.bench.workload.prefix_hit_bound`).

Two engines, prefix caching on and off, built once; runs interleaved (on, off, on, off, ...),
the cache emptied before each run. ``summary.json``: per variant the median over rounds of the
hit rate (``vllm:prefix_cache_hits / queries``), TTFT p50/p99 (ms), throughput (prompt and
output tokens/s over the makespan), prefill tokens computed, and every run.

    python bench/prefix_cache.py --model tiny --out bench/results/prefix_cache_tiny
    python bench/prefix_cache.py --model smollm2 --out bench/results/prefix_cache_smollm2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "data" / "models" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = {  # per model: requests, block tokens, rate (req/s), most output and prompt tokens, engine knobs
    "tiny": dict(num_requests=66, block_tokens=32, rate=4.0, max_output=32, max_prompt=4000,
                 engine=dict(max_num_seqs=16, max_num_batched_tokens=256, num_kv_pages=1024, max_model_len=4096)),
    "smollm2": dict(num_requests=24, block_tokens=16, rate=0.33, max_output=8, max_prompt=1024,
                    engine=dict(max_num_seqs=8, max_num_batched_tokens=256, num_kv_pages=1024, max_model_len=4096)),
}


def build_engine(model: str, caching: bool, knobs: dict):
    from coserve_jax import Engine

    common = dict(page_size=16, max_loras=0, max_finetune_jobs=0, enable_prefix_caching=caching, **knobs)
    if model == "smollm2":
        if not GGUF.exists():
            sys.exit(f"{GGUF} is absent: this benchmark needs the third-party data in ../shared/data")
        return Engine(str(GGUF), dtype="float32", **common)
    from coserve_jax.models import init_random
    from coserve_jax.models.tiny import tiny_config

    config = tiny_config(512, max_model_len=knobs["max_model_len"], hf_overrides={"max_position_embeddings": knobs["max_model_len"]})
    return Engine(init_random(config, 0, dtype="float32"), **{k: v for k, v in common.items() if k != "max_model_len"})


def replay(engine, prompts, outputs, arrivals) -> dict:
    """Send each request at its arrival (seconds after the start), step until all finish."""
    from coserve_jax import SamplingParams

    kv = engine.scheduler.kv_cache
    q0, h0, pre0 = kv.prefix_cache_queries, kv.prefix_cache_hits, engine.num_preemptions
    prefill0 = engine.num_prefill_tokens
    start = time.monotonic()
    done, i, n = {}, 0, len(prompts)
    while len(done) < n:
        now = time.monotonic() - start
        while i < n and arrivals[i] <= now:
            engine.add_request(prompts[i], SamplingParams(max_tokens=int(outputs[i]), temperature=0, ignore_eos=True),
                               request_id=f"r{i}", arrival_time=start + arrivals[i])
            i += 1
        if engine.has_unfinished or engine.has_step_in_flight:
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o
        elif i < n:
            time.sleep(max(0.0, min(arrivals[i] - now, 0.05)))
    end = max(o.finish_time for o in done.values())
    makespan = end - start
    ttft = np.array([o.ttft_ms for o in done.values()])
    queries, hits = kv.prefix_cache_queries - q0, kv.prefix_cache_hits - h0
    return {
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
        "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "makespan_s": makespan,
        "prompt_tokens_per_s": sum(len(p) for p in prompts) / makespan,
        "output_tokens_per_s": sum(int(x) for x in outputs) / makespan,
        "prefill_tokens_computed": engine.num_prefill_tokens - prefill0,
        "preemptions": engine.num_preemptions - pre0,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--block-tokens", type=int, help="tokens per trace block (a multiple of the 16-token page)")
    ap.add_argument("--rate", type=float, help="mean arrival rate, requests/s")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True, help="output folder (summary.json)")
    args = ap.parse_args(argv)
    preset = PRESETS[args.model]
    n = args.num_requests or preset["num_requests"]
    block = args.block_tokens or preset["block_tokens"]
    rate = args.rate or preset["rate"]
    if block % 16:
        ap.error("--block-tokens must be a multiple of the page size, 16")

    import jax

    from coserve_jax.bench.workload import (
        MOONCAKE_BLOCK_TOKENS, block_prompts, default_data_dir, load_mooncake_prefix_trace, multi_turn_sessions,
        prefix_hit_bound, rescale)

    data = default_data_dir()
    path = None if data is None else data / "traces" / "mooncake_fast25" / "conversation_trace.jsonl"
    if path is None or not path.exists():
        sys.exit("the Mooncake trace is absent: this benchmark needs the third-party data in ../shared/data")
    requests = multi_turn_sessions(load_mooncake_prefix_trace(path), n)
    engines = {True: build_engine(args.model, True, preset["engine"]), False: build_engine(args.model, False, preset["engine"])}
    vocab = engines[True].config.vocab_size
    max_len = engines[True].engine_config.max_model_len
    prompts = block_prompts(requests, block, vocab, seed=0,
                            max_prompt_tokens=min(preset["max_prompt"], max_len - preset["max_output"] - 1))
    outputs = np.clip(np.round([r.output_tokens * block / MOONCAKE_BLOCK_TOKENS for r in requests]), 1, preset["max_output"])
    arrivals = rescale(np.array([r.arrival_s for r in requests]), rate)
    bound = prefix_hit_bound(requests, prompts, block, 16)
    runs = {"on": [], "off": []}
    for r in range(args.rounds):
        for caching in (True, False):
            e = engines[caching]
            e.reset_prefix_cache()
            res = replay(e, prompts, outputs, arrivals)
            runs["on" if caching else "off"].append(res)
            print(f"round {r} caching {'on ' if caching else 'off'}: " + json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)

    def median(variant, key):
        return statistics.median(x[key] for x in runs[variant])

    keys = ("prefix_cache_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "prompt_tokens_per_s", "output_tokens_per_s",
            "prefill_tokens_computed", "preemptions", "makespan_s")
    summary = {
        "command": "python bench/prefix_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "jax": jax.__version__, "model": args.model, "trace": "mooncake_fast25/conversation_trace.jsonl (multi-turn sessions)",
        "num_requests": len(requests), "block_tokens": block, "rate_req_s": rate, "max_prompt_tokens": preset["max_prompt"],
        "prompt_tokens": sum(len(p) for p in prompts), "output_tokens": int(sum(outputs)),
        "prefix_cache_hit_rate_bound": bound,
        "caching_on": {k: median("on", k) for k in keys}, "caching_off": {k: median("off", k) for k in keys},
        "ratios_on_over_off": {k: median("on", k) / median("off", k) for k in ("ttft_p50_ms", "ttft_p99_ms", "prompt_tokens_per_s", "makespan_s")},
        "runs": runs,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
