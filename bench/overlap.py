"""Steady-state step wall time with and without overlapped steps (``async_scheduling``).

Two engines over the same model, one synchronous and one overlapped, each keeping ``N`` requests
decoding (prompts of 64-127 tokens, greedy, EOS ignored; a finished request is replaced at once).
After a warm-up, rounds of ``--steps`` steps alternate between the two engines (A, B, A, B: the
machine is noisy), and the median wall time of one :meth:`Engine.step` is reported for each,
with the synchronous engine's split into host time and device time (device: how long the host
waits for a dispatched step; host: the rest). Without overlap a step costs host + device; with
it, ideally max(host, device).

    python bench/overlap.py --out bench/results/overlap_cpu.json
    python bench/overlap.py --model ../shared/data/models/smollm2_135m_instruct --out ...

``--model`` takes a checkpoint directory or a ``.gguf`` file (a directory holding one ``.gguf``
file is read as that file); without it, the built-in tiny model with random weights is used.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

from coserve_jax import Engine, SamplingParams
from coserve_jax.models import init_random
from coserve_jax.models.tiny import tiny_config


def build(model_arg: str | None, async_scheduling: bool, args) -> Engine:
    kw = dict(
        max_num_seqs=args.running, max_num_batched_tokens=max(64, args.running), max_model_len=args.max_model_len,
        max_loras=0, max_finetune_jobs=0, async_scheduling=async_scheduling,
    )
    if model_arg is None:
        model = init_random(tiny_config(vocab_size=512, max_model_len=args.max_model_len), seed=0)
        return Engine(model, compilation_cache_dir=None, **kw)
    path = pathlib.Path(model_arg)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    return Engine(path, dtype="float32", **kw)


class Driver:
    """Keeps ``running`` requests decoding on one engine and times its steps."""

    def __init__(self, engine: Engine, running: int, seed: int):
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        self.vocab = engine.config.vocab_size
        self.waits: list[float] = []
        runner, execute = engine.runner, engine.runner.execute

        def timed(plan):  # how long the host waits for the step it just dispatched (sync engine)
            out = execute(plan)
            if not engine.engine_config.async_scheduling:
                t = time.perf_counter()
                jax.block_until_ready(out)
                self.waits.append(time.perf_counter() - t)
            return out

        runner.execute = timed
        self.limit = engine.max_model_len - 8
        for _ in range(running):
            self.add()

    def add(self):
        n = int(self.rng.integers(64, 128))
        self.engine.add_request(self.rng.integers(0, self.vocab, n).tolist(), self.params)

    def steps(self, k: int) -> list[float]:
        times = []
        for _ in range(k):
            for r in list(self.engine.scheduler.running):  # keep the batch steady: retire long ones
                if r.num_tokens >= self.limit:
                    self.engine.abort(r.request_id)
                    self.add()
            t0 = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - t0)
        return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory or .gguf (default: the built-in tiny model)")
    ap.add_argument("--running", type=int, default=32, help="requests decoding at once")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="steps per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per engine, interleaved")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    engines = {mode: build(args.model, mode, args) for mode in (False, True)}
    startup = time.perf_counter() - t0
    drivers = {mode: Driver(e, args.running, seed=1) for mode, e in engines.items()}
    for d in drivers.values():
        d.steps(3 * args.steps // 2)  # prefill everything, warm up
        d.waits.clear()
    walls = {False: [], True: []}
    sync_walls_for_split = []
    for _ in range(args.rounds):
        for mode in (False, True):
            d = drivers[mode]
            n_wait = len(d.waits)
            t = d.steps(args.steps)
            walls[mode].extend(t)
            if not mode:
                sync_walls_for_split.append((t, d.waits[n_wait:]))
    ms = lambda xs: 1000.0 * statistics.median(xs)  # noqa: E731
    step_waits = [w for _, ws in sync_walls_for_split for w in ws]
    sync_ms, async_ms = ms(walls[False]), ms(walls[True])
    device_ms = ms(step_waits)
    host_ms = sync_ms - device_ms
    result = {
        "command": "python bench/overlap.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, Python {platform.python_version()}, jax {jax.__version__}",
        "model": args.model or "built-in tiny (2 layers, hidden 64, vocab 512, random weights)",
        "settings": {"running_requests": args.running, "max_model_len": args.max_model_len, "steps_per_round": args.steps,
                     "rounds": args.rounds, "attention_impl": engines[False].attention_impl},
        "engine_startup_s": round(startup, 1),
        "sync_step_ms": round(sync_ms, 3),
        "async_step_ms": round(async_ms, 3),
        "async_over_sync": round(async_ms / sync_ms, 3),
        "sync_split": {"host_ms": round(host_ms, 3), "device_ms": round(device_ms, 3),
                       "host_plus_device_ms": round(host_ms + device_ms, 3), "max_host_device_ms": round(max(host_ms, device_ms), 3)},
        "per_round_median_ms": {
            "sync": [round(ms(walls[False][i * args.steps:(i + 1) * args.steps]), 3) for i in range(args.rounds)],
            "async": [round(ms(walls[True][i * args.steps:(i + 1) * args.steps]), 3) for i in range(args.rounds)],
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
