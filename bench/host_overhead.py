"""Host time per step spent outside the device: scheduling, building the step's arrays, updating.

Drives the real scheduler (``coserve_jax.sched``), the runner's persistent page tables
(``coserve_jax.engine.input_batch``) and the real input builder (``coserve_jax.engine.step_inputs``) with a stand-in for the device that returns a token per
sequence, so only host work is timed. ``N`` requests are first prefilled, then every step is a
decode step of all ``N`` (the steady state of a busy server); a second series adds a 512-token
prefill chunk of a newly arriving request to each step.

    python bench/host_overhead.py --steps 300 --rounds 5 --out bench/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from coserve_jax.engine.input_batch import InputBatch
from coserve_jax.engine.step import make_buckets, pick_bucket
from coserve_jax.engine.step_inputs import StepDims, build_step_inputs
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig

PAGE, MAX_LEN, BUDGET = 16, 8192, 2048


def run(n: int, steps: int, with_prefill: bool) -> dict:
    max_seqs = n + 1
    kv = KVCacheManager(num_pages=n * (MAX_LEN // PAGE) // 4 + 1024, page_size=PAGE)
    sched = Scheduler(SchedulerConfig(max_seqs, BUDGET, MAX_LEN), kv)
    buckets = make_buckets(BUDGET, max_seqs)
    max_pages = MAX_LEN // PAGE
    tables = InputBatch(max_pages, 2 * max_seqs)
    params = SamplingParams(max_tokens=10_000, temperature=0.8, top_p=0.9, ignore_eos=True)
    for i in range(n):
        sched.add_request(Request(i, list(range(1000, 1000 + 1024)), params, seed=i))
    while any(r.num_computed_tokens < r.num_tokens - 1 or not r.output_token_ids for r in sched.running) or sched.waiting:
        plan = sched.schedule()
        tables.apply(plan)
        sched.update(plan, [1] * len(plan.decodes) + [1 if c.sample else None for c in plan.prefills])
    times = {"schedule": [], "build_inputs": [], "update": [], "total": []}
    next_id = n
    for _ in range(steps):
        if with_prefill and not sched.waiting:
            sched.add_request(Request(next_id, list(range(5000)), params, seed=next_id))
            next_id += 1
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        bucket = pick_bucket(buckets, plan.num_tokens, plan.num_seqs)
        rows = tables.apply(plan)
        build_step_inputs(plan, StepDims(bucket, max_pages, max_seqs), PAGE, tables, rows)
        t2 = time.perf_counter()
        sched.update(plan, [7] * len(plan.decodes) + [7 if c.sample else None for c in plan.prefills])
        t3 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            times[k].append(v * 1e6)
        if with_prefill:  # keep the running set at n: retire the newcomer once it decodes
            for r in list(sched.running):
                if r.request_id >= n and r.output_token_ids:
                    sched.finish(r.request_id)
    return {
        k: {"mean_us": statistics.fmean(v), "p50_us": statistics.median(v), "p99_us": sorted(v)[int(0.99 * len(v)) - 1]}
        for k, v in times.items()
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="timed steps of each series in each round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, each running every series once (interleaved, so a noisy spell hits all series alike)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result = {
        "command": "python bench/host_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "settings": {"page_size": PAGE, "max_model_len": MAX_LEN, "max_num_batched_tokens": BUDGET, "prompt_tokens": 1024,
                     "steps": args.steps, "rounds": args.rounds},
        "runs": [],
    }
    series = [(n, with_prefill) for n in (64, 256) for with_prefill in (False, True)]
    rounds = {key: [] for key in series}
    for _ in range(args.rounds):
        for n, with_prefill in series:
            rounds[n, with_prefill].append(run(n, args.steps, with_prefill))
    for (n, with_prefill), rs in rounds.items():
        # per stage: the median over rounds of each round's mean / p50 / p99
        summary = {k: {s: statistics.median(r[k][s] for r in rs) for s in rs[0][k]} for k in rs[0]}
        result["runs"].append({"running_requests": n, "plus_prefill_chunk": with_prefill, **summary,
                               "rounds_total_p50_us": [r["total"]["p50_us"] for r in rs]})
        print(f"{n:4d} running{' + prefill chunk' if with_prefill else '':16s}: " + ", ".join(
            f"{k} {v['p50_us']:.0f} us" for k, v in summary.items()) + " (p50, median of rounds)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
