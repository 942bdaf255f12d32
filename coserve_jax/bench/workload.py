"""Inference workloads for the co-serving benchmark: arrivals and lengths.

* **Trace replay.** The Azure LLM inference traces (Patel et al., *Splitwise*, ISCA 2024;
  ``AzureLLMInferenceTrace_{conv,code}.csv``: ``TIMESTAMP,ContextTokens,GeneratedTokens``) and
  the Mooncake traces (Qin et al., FAST 2025; jsonl with ``timestamp`` in ms, ``input_length``,
  ``output_length``). A window of the trace keeps its burstiness; its inter-arrival times are
  scaled so that its mean rate is the target rate.
* **Synthetic arrivals.** Poisson (exponential gaps) and Gamma gaps with a coefficient of
  variation ``cv`` (shape ``1/cv^2``; ``cv=1`` is Poisson, ``cv>1`` burstier), with the lengths of
  the trace's requests in order, or uniform lengths when no trace is named.
* **Prompts.** Synthetic token ids of the trace's prompt lengths (the default: exact lengths, no
  tokenizer), or real ShareGPT prompts (``../shared/data/prompts/``) tokenized and cut or
  repeated to the trace's length, or (``chat_template: true``) rendered as a user message with
  the tokenizer's chat template, the message cut so that the prompt fits the trace's length
  (never repeated: a short ShareGPT prompt stays short). Outputs run for the trace's length
  (``ignore_eos``).

Lengths may be scaled (``length_scale``) and clipped to fit a small model's context: the CPU
benchmark uses the shape of the traffic, not its absolute sizes.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import pathlib
from typing import Sequence

import numpy as np

TRACES = {
    "azure_conv": "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "azure_code": "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv",
    "mooncake": "traces/mooncake_fast25/conversation_trace.jsonl",
    "mooncake_synthetic": "traces/mooncake_fast25/synthetic_trace.jsonl",
}
"""Trace names, relative to the shared data folder."""

def default_data_dir() -> pathlib.Path | None:
    """The shared data folder: ``$COSERVE_JAX_DATA_DIR`` if set, else the first ``shared/data``
    found in the working directory or a parent of it, or beside a parent of this package (so a
    checkout next to ``../shared/data`` finds it from anywhere inside); ``None`` if none."""
    env = os.environ.get("COSERVE_JAX_DATA_DIR")
    if env:
        return pathlib.Path(env)
    here, pkg = pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parent
    for d in (here, *here.parents, pkg, *pkg.parents):
        if (d / "shared" / "data").is_dir():
            return d / "shared" / "data"
    return None


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a trace.

    Attributes:
        arrival_s: arrival time in seconds after the trace's first request.
        prompt_tokens: prompt (context) length in tokens.
        output_tokens: generated length in tokens.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """A request as the benchmark sends it.

    Attributes:
        arrival_s: seconds after the run starts.
        prompt_token_ids: the prompt.
        max_tokens: tokens to generate (with ``ignore_eos``, exactly this many).
    """

    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """What requests a run sends (the ``workload:`` section of a bench config).

    Attributes:
        trace: a name of :data:`TRACES`, a path to a trace file (``.csv`` Azure format or
            ``.jsonl`` Mooncake format), or ``None`` for uniform synthetic lengths.
        arrival: ``"trace"`` (the trace's own arrival times, rescaled), ``"poisson"`` or ``"gamma"``.
        cv: coefficient of variation of the Gamma gaps.
        num_requests: requests per run.
        start: index of the first trace request used (a window of the trace).
        length_scale: factor on the trace's prompt and output lengths.
        min_prompt_tokens, max_prompt_tokens, min_output_tokens, max_output_tokens: clip range
            (also the uniform range without a trace).
        prompts: ``"synthetic"`` (random token ids) or ``"sharegpt"`` (a path or the default
            ShareGPT file, tokenized; needs a tokenizer).
        sharegpt_path: the ShareGPT json file for ``prompts: sharegpt``.
        chat_template: render ShareGPT prompts with the tokenizer's chat template (see the
            module docstring).
        seed: seeds the synthetic arrivals, lengths and token ids.
    """

    trace: str | None = "azure_conv"
    arrival: str = "trace"
    cv: float = 1.0
    num_requests: int = 100
    start: int = 0
    length_scale: float = 1.0
    min_prompt_tokens: int = 1
    max_prompt_tokens: int = 4096
    min_output_tokens: int = 1
    max_output_tokens: int = 1024
    prompts: str = "synthetic"
    sharegpt_path: str = "prompts/sharegpt_prompts/ShareGPT_V3_filtered_500.json"
    chat_template: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.arrival not in ("trace", "poisson", "gamma"):
            raise ValueError(f"workload.arrival must be 'trace', 'poisson' or 'gamma', got {self.arrival!r}")
        if self.arrival == "trace" and self.trace is None:
            raise ValueError("workload.arrival 'trace' needs a workload.trace")
        if self.prompts not in ("synthetic", "sharegpt"):
            raise ValueError(f"workload.prompts must be 'synthetic' or 'sharegpt', got {self.prompts!r}")
        if self.chat_template and self.prompts != "sharegpt":
            raise ValueError("workload.chat_template renders ShareGPT prompts: set workload.prompts to 'sharegpt'")
        if self.num_requests < 1 or self.cv <= 0 or self.length_scale <= 0:
            raise ValueError("workload.num_requests, cv and length_scale must be > 0")
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens or not 1 <= self.min_output_tokens <= self.max_output_tokens:
            raise ValueError("workload length ranges must satisfy 1 <= min <= max")


def resolve_data_path(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``path`` itself if it exists, else ``path`` under the shared data folder (``data_dir``,
    default :func:`default_data_dir`).

    Raises:
        FileNotFoundError: neither exists (the message names both and the data folder's README).
    """
    p = pathlib.Path(path)
    if p.exists():
        return p
    data_dir = data_dir if data_dir is not None else default_data_dir()
    if data_dir is not None and (pathlib.Path(data_dir) / path).exists():
        return pathlib.Path(data_dir) / path
    where = f"the data folder {os.fspath(data_dir)!r}" if data_dir is not None else "any shared/data folder above here"
    raise FileNotFoundError(
        f"{os.fspath(path)!r} not found (also not under {where}; pass --data-dir DIR or set COSERVE_JAX_DATA_DIR)"
    )


def load_azure_trace(path: str | os.PathLike) -> list[TraceRequest]:
    """Read an Azure LLM inference trace csv (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Raises:
        ValueError: a missing column or an unparsable row (with its line number).
    """
    out, t0 = [], None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{os.fspath(path)}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, 2):
            try:
                ts = row["TIMESTAMP"]
                # 7 fractional digits: more than datetime parses; keep microseconds
                head, _, frac = ts.partition(".")
                t = datetime.datetime.fromisoformat(head).timestamp() + float("0." + (frac or "0"))
                t0 = t if t0 is None else t0
                out.append(TraceRequest(t - t0, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{os.fspath(path)} line {line}: {e}") from None
    return out


def load_mooncake_trace(path: str | os.PathLike) -> list[TraceRequest]:
    """Read a Mooncake trace jsonl (``timestamp`` ms, ``input_length``, ``output_length``).

    Raises:
        ValueError: a malformed line (with its number).
    """
    return [TraceRequest(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in load_mooncake_prefix_trace(path)]


def load_trace(name_or_path: str, data_dir: str | os.PathLike | None = None) -> list[TraceRequest]:
    """A trace by :data:`TRACES` name or path (``.csv``: Azure format, ``.jsonl``: Mooncake)."""
    path = resolve_data_path(TRACES.get(name_or_path, name_or_path), data_dir)
    return load_azure_trace(path) if path.suffix == ".csv" else load_mooncake_trace(path)


def rescale(arrivals: np.ndarray, rate: float) -> np.ndarray:
    """Scale arrival times (s, ascending, first at 0) so that the mean rate is ``rate`` req/s:
    ``n - 1`` gaps span ``(n - 1) / rate`` seconds, the burst structure kept."""
    a = np.asarray(arrivals, np.float64) - arrivals[0]
    if len(a) < 2 or a[-1] <= 0:
        return np.arange(len(a)) / rate
    return a * ((len(a) - 1) / rate / a[-1])


def synthetic_arrivals(n: int, rate: float, kind: str, cv: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times (s, the first at 0) with Poisson or Gamma(cv) gaps of mean ``1/rate``."""
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n - 1)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _sharegpt_texts(path: pathlib.Path) -> list[str]:
    data = json.loads(path.read_text())
    out = []
    for rec in data:
        if "conversations" in rec:  # ShareGPT: the first human turn
            turns = [t["value"] for t in rec["conversations"] if t.get("from") == "human"]
            text = turns[0] if turns else None
        else:
            text = rec.get("prompt")
        if text and text.strip():
            out.append(text)
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def _sharegpt_token_ids(path: pathlib.Path, tokenizer) -> list[list[int]]:
    out = [ids for ids in (list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _sharegpt_texts(path)) if ids]
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def _chat_prompt(tokenizer, text: str, max_tokens: int) -> tuple[int, ...]:
    """``text`` as a user message rendered with the chat template, the message cut (at a token
    boundary) so that the whole prompt has at most ``max_tokens`` tokens (at least one content token)."""
    from coserve_jax.tokenizer import encode_chat

    overhead = len(encode_chat(tokenizer, [{"role": "user", "content": ""}]))
    content = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    keep = max(1, max_tokens - overhead)
    if len(content) > keep:
        text = tokenizer.decode(content[:keep])
    return tuple(encode_chat(tokenizer, [{"role": "user", "content": text}]))


def build_workload(
    cfg: WorkloadConfig, rate: float, vocab_size: int, tokenizer=None, data_dir: str | os.PathLike | None = None
) -> list[BenchRequest]:
    """The requests of one run at ``rate`` requests/s (see the module docstring).

    Raises:
        FileNotFoundError: a missing trace or prompt file.
        ValueError: a rate <= 0, a trace shorter than the window, ShareGPT prompts without a
            tokenizer.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    if cfg.trace is not None:
        trace = load_trace(cfg.trace, data_dir)[cfg.start:cfg.start + n]
        if len(trace) < n:
            raise ValueError(f"trace {cfg.trace!r} has {len(trace)} requests from index {cfg.start}; {n} asked")
        prompt_len = np.array([r.prompt_tokens for r in trace], np.float64)
        output_len = np.array([r.output_tokens for r in trace], np.float64)
        trace_arrivals = np.array([r.arrival_s for r in trace])
    else:
        prompt_len = rng.integers(cfg.min_prompt_tokens, cfg.max_prompt_tokens + 1, n).astype(np.float64)
        output_len = rng.integers(cfg.min_output_tokens, cfg.max_output_tokens + 1, n).astype(np.float64)
        trace_arrivals = None
    if cfg.arrival == "trace":
        arrivals = rescale(trace_arrivals, rate)
    else:
        arrivals = synthetic_arrivals(n, rate, cfg.arrival, cfg.cv, np.random.default_rng(cfg.seed + 1))
    scale = cfg.length_scale if cfg.trace is not None else 1.0
    prompt_len = np.clip(np.round(prompt_len * scale), cfg.min_prompt_tokens, cfg.max_prompt_tokens).astype(int)
    output_len = np.clip(np.round(output_len * scale), cfg.min_output_tokens, cfg.max_output_tokens).astype(int)
    if cfg.prompts == "sharegpt":
        if tokenizer is None:
            raise ValueError("workload.prompts 'sharegpt' needs a tokenizer (model.tokenizer)")
        sharegpt = resolve_data_path(cfg.sharegpt_path, data_dir)
        if cfg.chat_template:
            texts = _sharegpt_texts(sharegpt)
            prompts = [_chat_prompt(tokenizer, texts[i % len(texts)], int(m)) for i, m in enumerate(prompt_len)]
        else:
            pool = _sharegpt_token_ids(sharegpt, tokenizer)
            prompts = []
            for i, m in enumerate(prompt_len):
                ids = pool[i % len(pool)]
                prompts.append(tuple((ids * (-(-m // len(ids))))[:m]))
    else:
        prompts = [tuple(int(t) for t in rng.integers(0, vocab_size, m)) for m in prompt_len]
    return [BenchRequest(float(a), p, int(o)) for a, p, o in zip(arrivals, prompts, output_len)]


MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per ``hash_ids`` block in the Mooncake traces."""


@dataclasses.dataclass(frozen=True)
class PrefixRequest:
    """A Mooncake request with its prefix blocks (``hash_ids``: equal ids, equal 512-token
    blocks, and a block's id names its whole prefix).

    Attributes:
        arrival_s: seconds after the trace's first request.
        prompt_tokens, output_tokens: lengths in tokens.
        hash_ids: the prompt's blocks, in order.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]


def load_mooncake_prefix_trace(path: str | os.PathLike) -> list[PrefixRequest]:
    """A Mooncake trace with its ``hash_ids`` (empty where a line has none), by arrival.

    Raises:
        ValueError: a malformed line (with its number).
    """
    out = []
    with open(path) as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
                out.append(PrefixRequest(float(rec["timestamp"]) / 1000.0, int(rec["input_length"]), int(rec["output_length"]),
                                         tuple(int(h) for h in rec.get("hash_ids", ()))))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{os.fspath(path)} line {line}: {e!r}") from None
    t0 = min((r.arrival_s for r in out), default=0.0)
    return sorted((dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in out), key=lambda r: r.arrival_s)


def multi_turn_sessions(trace: Sequence[PrefixRequest], num_requests: int, min_turns: int = 3) -> list[PrefixRequest]:
    """The first ``num_requests`` requests (by arrival) of the trace's multi-turn sessions: a
    session is the requests whose second block (the first after the shared system prompt) is
    the same, kept when it has at least ``min_turns`` requests, taken whole in order of its first
    request until ``num_requests`` are gathered. A short window of the trace alone shares little
    beyond the system prompt, its conversations' turns being minutes apart; this keeps the
    trace's sharing structure, sessions and arrival order."""
    sessions: dict[int, list[int]] = {}
    for i, r in enumerate(trace):
        if len(r.hash_ids) > 1:
            sessions.setdefault(r.hash_ids[1], []).append(i)
    chosen: list[int] = []
    for members in sorted(sessions.values(), key=lambda m: m[0]):
        if len(members) >= min_turns:
            chosen += members
        if len(chosen) >= num_requests:
            break
    return [trace[i] for i in sorted(chosen)[:num_requests]]


def block_prompts(requests: Sequence[PrefixRequest], block_tokens: int, vocab_size: int, seed: int = 0,
                  max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompts whose blocks repeat exactly as the ``hash_ids`` do: block id ``h`` is the same
    ``block_tokens`` random token ids wherever it appears (ids ``>= 1``), the prompt is the
    request's blocks cut to its length scaled by ``block_tokens / 512`` (and to
    ``max_prompt_tokens``)."""
    cache: dict[int, list[int]] = {}

    def block(h: int) -> list[int]:
        if h not in cache:
            cache[h] = np.random.default_rng([seed, h]).integers(1, vocab_size, block_tokens).tolist()
        return cache[h]

    out = []
    for r in requests:
        n = max(1, round(r.prompt_tokens * block_tokens / MOONCAKE_BLOCK_TOKENS))
        n = min(n, len(r.hash_ids) * block_tokens, max_prompt_tokens or n)
        ids = [t for h in r.hash_ids[: -(-n // block_tokens)] for t in block(h)]
        out.append(ids[:n])
    return out


def prefix_hit_bound(requests: Sequence[PrefixRequest], prompts: Sequence[Sequence[int]], block_tokens: int,
                     page_size: int) -> float:
    """The prefix-cache hit rate an unbounded cache allows, in prompt tokens: request ``i``
    can reuse its leading blocks that an earlier request's prompt held whole, up to the full
    pages before its last token (which is always computed). Returns hit tokens / prompt tokens."""
    whole: set[int] = set()
    hit = total = 0
    for r, p in zip(requests, prompts):
        m = 0
        while m < len(r.hash_ids) and r.hash_ids[m] in whole:
            m += 1
        hit += min(m * block_tokens, (len(p) - 1) // page_size * page_size)
        total += len(p)
        whole.update(r.hash_ids[: len(p) // block_tokens])
    return hit / max(total, 1)
