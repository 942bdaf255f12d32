"""Padding waste of the bucketed step on a real request-length mix (Azure LLM inference trace, conv).

Replays the trace's arrivals (``TIMESTAMP``) and lengths (``ContextTokens`` prompt tokens,
``GeneratedTokens`` output tokens, forced with ``ignore_eos``) through the real scheduler, with a
stand-in device whose every step takes ``--step-ms`` of simulated time. For each step the batch
is padded to the smallest bucket that fits; the waste is the share of padded token slots
(``sum(T_bucket - tokens) / sum(T_bucket)``), and likewise for sequence slots. Several bucket
ladders are compared, including a single bucket (no bucketing).

    python bench/padding_waste.py --out bench/results/padding_waste_azure_conv.json
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import pathlib
import sys

from coserve_jax.engine.step import make_buckets, pick_bucket, powers_of_two
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig

TRACE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"


def load_trace(path, limit, max_len):
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            t = dt.datetime.fromisoformat(r["TIMESTAMP"][:26])
            p, g = int(r["ContextTokens"]), int(r["GeneratedTokens"])
            if p >= 1 and g >= 1 and p + g <= max_len:
                rows.append((t, p, g))
            if len(rows) == limit:
                break
    t0 = rows[0][0]
    return [((t - t0).total_seconds(), p, g) for t, p, g in rows]


def replay(trace, step_s, budget, max_seqs, num_pages, page, max_len):
    sched = Scheduler(SchedulerConfig(max_seqs, budget, max_len, watermark_pages=num_pages // 100), KVCacheManager(num_pages, page))
    steps, clock, i = [], 0.0, 0
    while i < len(trace) or sched.has_unfinished:
        while i < len(trace) and trace[i][0] <= clock:
            _, p, g = trace[i]
            sched.add_request(Request(i, [1] * p, SamplingParams(max_tokens=g, ignore_eos=True)))
            i += 1
        if not sched.has_unfinished:
            clock = trace[i][0]
            continue
        plan = sched.schedule()
        sched.update(plan, [1] * len(plan.decodes) + [1 if c.sample else None for c in plan.prefills])
        if plan.num_inference_seqs:
            steps.append((plan.num_tokens, plan.num_seqs))
        clock += step_s
    return steps, sched.num_preemptions


def waste(steps, buckets):
    tok_slots = seq_slots = toks = seqs = 0
    for n, s in steps:
        b = pick_bucket(buckets, n, s)
        tok_slots += b.num_tokens
        seq_slots += b.num_seqs
        toks += n
        seqs += s
    return {"padded_token_slots_pct": 100 * (1 - toks / tok_slots), "padded_seq_slots_pct": 100 * (1 - seqs / seq_slots), "num_buckets": len(buckets)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--requests", type=int, default=2000, help="first N requests of the trace")
    ap.add_argument("--step-ms", type=float, default=30.0, help="simulated time of one step")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--num-kv-pages", type=int, default=40000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not pathlib.Path(args.trace).exists():
        sys.exit(f"{args.trace} is absent: this benchmark needs ../shared/data")
    page, max_len = 16, 8192
    trace = load_trace(args.trace, args.requests, max_len)
    steps, preemptions = replay(trace, args.step_ms / 1e3, args.max_num_batched_tokens, args.max_num_seqs, args.num_kv_pages, page, max_len)
    B, S = args.max_num_batched_tokens, args.max_num_seqs
    ladders = {
        "pow2 (default: tokens 16.., seqs 4..)": make_buckets(B, S),
        "pow2 tokens 16.., seqs = min(T, max)": make_buckets(B, S, seq_buckets=[S]),
        "x1.5 tokens 16.., pow2 seqs": make_buckets(B, S, token_buckets=sorted({min(B, int(16 * 1.5**k)) for k in range(30)})),
        "pow2 tokens 64.., pow2 seqs 16..": make_buckets(B, S, powers_of_two(64, B), powers_of_two(16, S)),
        "single bucket (no bucketing)": make_buckets(B, S, [B], [S]),
    }
    result = {
        "command": "python bench/padding_waste.py " + " ".join(sys.argv[1:]),
        "trace": pathlib.Path(args.trace).name,
        "requests": len(trace),
        "trace_seconds": trace[-1][0],
        "settings": vars(args) | {"page_size": page, "max_model_len": max_len},
        "steps": len(steps),
        "preemptions": preemptions,
        "mean_tokens_per_step": sum(n for n, _ in steps) / len(steps),
        "mean_seqs_per_step": sum(s for _, s in steps) / len(steps),
        "ladders": {name: waste(steps, b) for name, b in ladders.items()},
    }
    print(f"{len(trace)} requests over {trace[-1][0]:.0f} s -> {len(steps)} steps, "
          f"{result['mean_tokens_per_step']:.1f} tokens and {result['mean_seqs_per_step']:.1f} sequences per step")
    for name, w in result["ladders"].items():
        print(f"  {name:40s} {w['num_buckets']:3d} buckets: {w['padded_token_slots_pct']:5.1f}% token slots, "
              f"{w['padded_seq_slots_pct']:5.1f}% sequence slots padded")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
