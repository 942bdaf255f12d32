"""Benchmark outputs: per-request and per-step CSVs, ``summary.json``, the printed table and the
plots (matplotlib, headless)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib

from coserve_jax.bench.harness import RunResult

REQUEST_COLUMNS = ("policy", "rate", "request_id", "arrival_s", "ttft_ms", "tpot_ms", "e2e_ms", "prompt_tokens", "output_tokens", "max_tokens", "finished")
STEP_COLUMNS = (
    "policy", "rate", "end_time_s", "bucket_tokens", "bucket_seqs", "prefill_tokens", "decode_tokens", "finetune_tokens",
    "backward_tokens", "backward_layers", "attention_work", "predicted_ms", "measured_ms",
)


def _num(x):
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else (round(x, 4) if isinstance(x, float) else x)


def write_csvs(results: list[RunResult], out: pathlib.Path) -> None:
    """``requests.csv`` (one row per request of every run) and ``steps.csv`` (one per step)."""
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REQUEST_COLUMNS)
        for res in results:
            for r in res.requests:
                w.writerow([res.policy, res.rate, r.request_id, _num(r.arrival_s), _num(r.ttft_ms), _num(r.tpot_ms),
                            _num(r.e2e_ms), r.prompt_tokens, r.output_tokens, r.max_tokens, int(r.finished)])
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STEP_COLUMNS)
        for res in results:
            for s in res.steps:
                d = dataclasses.asdict(s)
                w.writerow([res.policy, res.rate, _num(d.pop("end_time"))] + [_num(d[c]) for c in STEP_COLUMNS[3:]])


def write_summary(rows: list[dict], meta: dict, out: pathlib.Path) -> None:
    """``summary.json``: the list of rows; ``run.json``: the command, config and machine."""
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "run.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")


def write_markdown(rows: list[dict], meta: dict, out: pathlib.Path, title: str, samples=None, eval_note: str | None = None) -> None:
    """``summary.md``: the command, the summary table (with the validation losses when measured)
    and, given ``samples = (base answers, adapter answers, which run)``, the sample answers."""
    has_eval = any("eval_loss_before" in r for r in rows)
    cols = [("policy", "policy", "{}"), ("rate", "rate (req/s)", "{:g}"), ("slo_attainment", "SLO attainment", "{:.1%}"),
            ("goodput", "goodput (req/s)", "{:.2f}"), ("ttft_p50_ms", "TTFT p50 (ms)", "{:.0f}"),
            ("ttft_p99_ms", "TTFT p99 (ms)", "{:.0f}"), ("tpot_p50_ms", "TPOT p50 (ms)", "{:.1f}"),
            ("tpot_p99_ms", "TPOT p99 (ms)", "{:.1f}"), ("finetune_tokens_per_s", "ft tokens/s", "{:.0f}"),
            ("finetune_progress", "ft progress", "{:.1%}")]
    if has_eval:
        cols += [("eval_loss_before", "eval loss before", "{:.4f}"), ("eval_loss_after", "eval loss after", "{:.4f}")]
    lines = [f"# {title}", "", f"`{meta.get('command', '')}` on {meta.get('device', '?')} (jax {meta.get('jax', '?')}), "
             f"{meta.get('wall_s', 0.0):.0f} s wall.", ""]
    if eval_note:
        lines += [f"Validation loss (mean per-token cross-entropy, nats, on {eval_note}): *before* is the base model, "
                  "*after* the run's adapter when the run ended.", ""]
    lines += ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    if samples:
        base, tuned, which = samples
        lines += ["", f"## Sample answers (greedy): base model vs the adapter of the {which} run", ""]
        for (q, a), (_, b) in zip(base, tuned):
            lines += [f"**Question.** {q}", "", "Base model:", "", "```", a.strip(), "```", "", "Adapter:", "", "```", b.strip(), "```", ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def format_table(rows: list[dict]) -> str:
    """The summary as a fixed-width text table."""
    cols = [("policy", "{}", 15), ("rate", "{:g}", 6), ("slo_attainment", "{:.1%}", 9), ("goodput", "{:.2f}", 8),
            ("ttft_p50_ms", "{:.0f}", 8), ("ttft_p99_ms", "{:.0f}", 8), ("tpot_p50_ms", "{:.1f}", 8), ("tpot_p99_ms", "{:.1f}", 8),
            ("finetune_tokens_per_s", "{:.0f}", 9), ("finetune_progress", "{:.1%}", 9), ("latency_model_median_rel_error", "{:.1%}", 9)]
    heads = ["policy", "rate", "SLO att.", "goodput", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ft tok/s", "ft prog.", "LM err"]
    lines = ["  ".join(h.rjust(wd) if i else h.ljust(wd) for i, (h, (_, _, wd)) in enumerate(zip(heads, cols)))]
    for row in rows:
        cells = []
        for i, (key, fmt, wd) in enumerate(cols):
            v = row.get(key)
            s = "-" if v is None else fmt.format(v)
            cells.append(s.ljust(wd) if i == 0 else s.rjust(wd))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], results: list[RunResult], out: pathlib.Path, title: str) -> list[str]:
    """``slo_attainment.png``, ``finetune_throughput.png`` (one line per policy against rate) and
    ``step_time.png`` (predicted against measured step time). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, fname, ylabel in (
        ("slo_attainment", "slo_attainment.png", "SLO attainment"),
        ("finetune_tokens_per_s", "finetune_throughput.png", "finetuning throughput (tokens/s)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["rate"], r[key]) for r in rows if r["policy"] == policy and r[key] is not None)
            if policy == "finetune_only" and pts:
                ax.axhline(pts[0][1], ls="--", color="gray", label="finetune_only")
            elif pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(ylabel)
        if key == "slo_attainment":
            ax.axhline(0.95, ls=":", color="k", lw=0.8)
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    top = 0.0
    for res in results:
        if res.steps:
            m = [s.measured_ms for s in res.steps]
            p = [s.predicted_ms for s in res.steps]
            top = max(top, max(m), max(p))
            ax.scatter(m, p, s=3, alpha=0.3, label=f"{res.policy} @ {res.rate:g}" if res.rate else res.policy)
    ax.plot([0, top], [0, top], color="k", lw=0.8)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title("latency model")
    ax.legend(fontsize=6, markerscale=3, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close(fig)
    written.append("step_time.png")
    return written


def ensure_out(path: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out

