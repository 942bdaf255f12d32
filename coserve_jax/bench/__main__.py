"""``python -m coserve_jax.bench --config configs/bench/NAME.yaml [--out DIR]``: the co-serving
benchmark. Sweeps the config's request rates and policies on one engine, and writes
``requests.csv``, ``steps.csv``, ``summary.json``, ``summary.md``, ``run.json`` and the plots to ``DIR``
(default: a fresh ``bench/runs/<name>-<date>-<time>``, so committed results are never
overwritten); prints the summary table. Data files (traces, datasets, the real model) are looked
up under ``--data-dir`` (default ``$COSERVE_JAX_DATA_DIR``, else the nearest ``shared/data``)."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

from coserve_jax.bench.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coserve_jax.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="bench config YAML (configs/bench/*.yaml)")
    parser.add_argument("--out", help="output folder (default: a fresh bench/runs/<config name>-<date>-<time>)")
    parser.add_argument("--data-dir", help="the shared data folder (default $COSERVE_JAX_DATA_DIR, else the nearest shared/data)")
    parser.add_argument("--rates", type=float, nargs="+", help="override the config's request rates (requests/s)")
    parser.add_argument("--policies", nargs="+", help="run only these of the config's policies")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.data_dir:
        import os

        os.environ["COSERVE_JAX_DATA_DIR"] = os.path.abspath(args.data_dir)  # read where data paths resolve
    cfg = load_config(args.config)
    policies = cfg.policy_names
    if args.policies:
        unknown = sorted(set(args.policies) - set(policies))
        if unknown:
            parser.error(f"--policies {unknown} are not in the config (it has {policies})")
        policies = [p for p in policies if p in args.policies]
    rates = tuple(args.rates) if args.rates else cfg.rates

    import jax

    from coserve_jax.bench import harness, report

    out = report.ensure_out(args.out or time.strftime(f"bench/runs/{cfg.name}-%Y%m%d-%H%M%S"))
    t_start = time.perf_counter()
    engine = harness.build_engine(cfg)
    if jax.process_count() > 1:  # multi-host: process 0 runs the benchmark; the others run its steps
        if jax.process_index() != 0:
            print(f"process {jax.process_index()}: following process 0", flush=True)
            engine.follow()
            return 0
        engine.lead()
    try:
        return _run(args, argv, cfg, engine, policies, rates, out, t_start)
    finally:
        if jax.process_count() > 1:
            engine.stop_followers()


def _run(args, argv, cfg, engine, policies, rates, out, t_start) -> int:
    """The sweep on a built engine (process 0 of a multi-host one)."""
    import jax
    from tqdm import tqdm

    from coserve_jax.bench import harness, metrics, report
    from coserve_jax.bench.workload import build_workload

    layout = engine.finetune_layout
    examples = None
    if any(p != "inference_only" for p in policies):
        if layout is None:
            raise SystemExit("the co-serving policies need finetuning: set engine.max_finetune_jobs >= 1 and lora.max_loras >= 1")
        examples = harness.training_examples(cfg, engine.tokenizer, engine.config.vocab_size, layout.max_seq_len)
    evals = harness.eval_examples(cfg, engine.tokenizer, layout.max_seq_len) if layout is not None else None
    questions = harness.sample_questions(cfg, engine.tokenizer) if evals else []
    loss_before = base_answers = None
    if evals:
        t_eval = time.perf_counter()
        loss_before = engine.evaluate(evals)
        base_answers = harness.answer(engine, questions, None)
        print(f"base model: validation loss {loss_before:.4f} on {len(evals)} examples of {cfg.finetune.eval_data} "
              f"({time.perf_counter() - t_eval:.1f} s with {len(questions)} sample answers)", flush=True)
    slo, reference = harness.resolve_slo(engine, cfg)
    if reference is not None:  # SLOs relative to this machine's profiled step times
        cfg = dataclasses.replace(cfg, slo=slo)
        engine.set_slo(slo)
        rel = cfg.relative_slo
        parts = ([f"TPOT {rel.tpot} x {reference['decode_step_ms']:.2f} ms (decode step of {reference['batch_size']} "
                  f"sequences at {reference['context_tokens']} tokens)"] if rel.tpot is not None else [])
        parts += ([f"TTFT {rel.ttft} x {reference['prefill_step_ms']:.2f} ms (prefill step of "
                   f"{engine.engine_config.max_num_batched_tokens} tokens)"] if rel.ttft is not None else [])
        print("relative SLOs: " + ", ".join(parts), flush=True)
    hybrid_rates = [r for r in rates if "hybrid" in policies]
    print(
        f"{cfg.name}: {engine.config.num_params():,} parameters on {jax.devices()[0].device_kind}; "
        f"{len(engine.buckets)} step buckets; start-up {time.perf_counter() - t_start:.1f} s "
        f"(latency model {'cached' if engine.latency_model_cached else 'profiled'}); "
        f"SLOs TTFT {cfg.slo.ttft_ms:g} ms, TPOT {cfg.slo.tpot_ms:g} ms",
        flush=True,
    )
    runs = [("finetune_only", 0.0)] if "finetune_only" in policies else []
    runs += [(p, r) for r in rates for p in policies if p != "finetune_only"]
    results, rows, ft_peak = [], [], None
    bar = tqdm(total=len(runs), unit="run", disable=args.quiet, dynamic_ncols=True, mininterval=1.0)
    steps = [0]

    def tick():
        steps[0] += 1
        bar.set_postfix_str(f"{steps[0]} steps", refresh=False)
        bar.update(0)  # redraws at most every mininterval

    for policy, rate in runs:
        bar.set_description(f"{policy} @ {rate:g}/s" if rate else policy)
        steps[0] = 0
        if policy == "finetune_only":
            res = harness.finetune_only(engine, cfg, examples, on_step=tick, evals=evals)
            ft_peak = res.finetune_tokens / max(res.duration_s, 1e-9)
        else:
            requests = build_workload(cfg.workload, rate, engine.config.vocab_size, engine.tokenizer)
            q = questions if policy == "hybrid" and rate == hybrid_rates[-1] else None  # the last hybrid run answers
            res = harness.run_policy(engine, cfg, policy, rate, requests, examples, on_step=tick, evals=evals, questions=q)
        results.append(res)
        row = metrics.summarize(res, cfg.slo, ft_peak)
        if evals:
            row["eval_loss_before"] = loss_before
            row["eval_loss_after"] = res.eval_loss_after
        rows.append(row)
        bar.update(1)
    bar.close()
    report.write_csvs(results, out)
    meta = {
        "command": " ".join(["python -m coserve_jax.bench"] + (sys.argv[1:] if argv is None else list(argv))),
        "config": args.config, "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "platform": platform.platform(), "python": platform.python_version(), "wall_s": time.perf_counter() - t_start,
        "latency_model_cached": engine.latency_model_cached,
        "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms,
                **({"relative": dataclasses.asdict(cfg.relative_slo), "reference": reference} if reference else {})},
    }
    report.write_summary(rows, meta, out)
    tuned = next((r for r in results if r.sample_answers), None)
    report.write_markdown(
        rows, meta, out, cfg.name,
        samples=(base_answers, tuned.sample_answers, f"{tuned.policy} @ {tuned.rate:g} req/s") if tuned and base_answers else None,
        eval_note=f"{len(evals)} examples of {cfg.finetune.eval_data}" if evals else None,
    )
    files = [] if args.no_plots else report.plot(rows, results, out, cfg.name)
    print(report.format_table(rows))
    print(f"wrote {out}/: requests.csv steps.csv summary.json summary.md run.json " + " ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
