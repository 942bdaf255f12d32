"""Runs one benchmark point on a real engine in real time.

One engine is built per benchmark (its executables compile once) and every policy runs on it:
:meth:`Engine.set_scheduling_policy` switches between steps, so the policies share the same
compiled steps, KV cache, latency model and finetuning machinery and differ only in how they
size steps. Each co-serving run starts a fresh finetuning job (a fresh adapter, the same data
and settings), replays the workload against the wall clock (a request is handed to the engine
at its arrival time; TTFT counts from that arrival even if a step was running), steps the engine
until every request finished, then cancels the job and frees its adapter.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import numpy as np

from coserve_jax.bench.config import BenchConfig
from coserve_jax.bench.workload import BenchRequest, resolve_data_path
from coserve_jax.engine.engine import Engine
from coserve_jax.engine.outputs import StepRecord
from coserve_jax.finetune.data import DataValidationError, TrainingExample, read_records, tokenize_record
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models.config import ModelConfig
from coserve_jax.models.loader import init_random
from coserve_jax.parallel.distributed import initialize_distributed
from coserve_jax.parallel.mesh import make_mesh
from coserve_jax.parallel.rules import ShardingRules
from coserve_jax.engine.step import pick_bucket
from coserve_jax.sched.latency_model import StepShape
from coserve_jax.sched.policy import SLOConfig
from coserve_jax.sched.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request's timings in a run (seconds after the run started, ``nan`` if never reached).

    Attributes:
        request_id, arrival_s, first_token_s, finish_s: identity and times (s).
        prompt_tokens, output_tokens: lengths (tokens generated, which may fall short of
            ``max_tokens`` for an aborted request).
        max_tokens: tokens asked for.
        finished: whether it completed (``False``: aborted at the drain timeout).
    """

    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    finished: bool

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_s - self.arrival_s) * 1000.0

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first (ms); 0 for a one-token output."""
        if self.output_tokens < 2:
            return 0.0
        return (self.finish_s - self.first_token_s) * 1000.0 / (self.output_tokens - 1)

    @property
    def e2e_ms(self) -> float:
        return (self.finish_s - self.arrival_s) * 1000.0


@dataclasses.dataclass
class RunResult:
    """What one ``(policy, rate)`` run measured.

    Attributes:
        policy, rate: the point (rate in requests/s; 0 for finetuning-only).
        requests: per-request records.
        steps: the engine's step log for the run (times relative to the run start in ``end_time``).
        duration_s: from the run's start to its last request's end (or the finetuning-only length).
        finetune_tokens: training tokens whose forward and backward completed during the run.
        num_steps: engine steps taken.
        engine_policy: the engine's scheduling policy during the run.
        eval_loss_after: validation loss of the run's adapter at its end (``None``: no job or
            no ``finetune.eval_data``).
        sample_answers: ``[(question, answer)]`` of the run's adapter (when asked for).
        prefix_cache_queries, prefix_cache_hits: prompt tokens looked up in the prefix cache
            during the run, and found (each run starts with an empty cache).
    """

    policy: str
    rate: float
    requests: list[RequestRecord]
    steps: list[StepRecord]
    duration_s: float
    finetune_tokens: int
    num_steps: int
    engine_policy: str = ""
    eval_loss_after: float | None = None
    sample_answers: list | None = None
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


def training_examples(cfg: BenchConfig, tokenizer, vocab_size: int, max_seq_len: int) -> list[TrainingExample]:
    """The finetuning job's examples: the first ``max_examples`` records of ``finetune.data``
    that fit ``max_seq_len`` tokens, or synthetic ones.

    Raises:
        FileNotFoundError: no data file. ValueError: no tokenizer for text data, or no usable record.
    """
    spec = cfg.finetune
    if spec.data == "synthetic":
        rng = np.random.default_rng(cfg.workload.seed + 7)
        n = min(spec.synthetic_tokens, max_seq_len)
        return [
            TrainingExample(tuple(int(t) for t in rng.integers(0, vocab_size, n)), (False,) + (True,) * (n - 1), i + 1)
            for i in range(spec.max_examples)
        ]
    return _read_examples(spec, spec.data, spec.max_examples, tokenizer, max_seq_len)


def _read_examples(spec, data: str, limit: int, tokenizer, max_seq_len: int) -> list[TrainingExample]:
    if tokenizer is None:
        raise ValueError("finetune data needs a tokenizer (model.tokenizer or a checkpoint's; or use data: synthetic)")
    out = []
    st = spec.settings
    for line, rec in read_records(resolve_data_path(data))[:limit]:
        if isinstance(rec, DataValidationError):
            continue
        ex = tokenize_record(rec, tokenizer, columns=spec.columns, line=line, chat_template=bool(st.get("chat_template")),
                             train_on_prompt=bool(st.get("train_on_prompt")))
        if len(ex.token_ids) <= max_seq_len:
            out.append(ex)
    if not out:
        raise ValueError(f"no record of {data} fits finetune_max_seq_len={max_seq_len}")
    return out


def eval_examples(cfg: BenchConfig, tokenizer, max_seq_len: int) -> list[TrainingExample] | None:
    """The first ``eval_examples`` records of ``finetune.eval_data`` (read as the training data), or ``None``."""
    spec = cfg.finetune
    if spec.eval_data is None:
        return None
    return _read_examples(spec, spec.eval_data, spec.eval_examples, tokenizer, max_seq_len)


def sample_questions(cfg: BenchConfig, tokenizer) -> list[tuple[str, list[int]]]:
    """``num_sample_answers`` questions of ``finetune.eval_data``: ``(question text, prompt ids)``,
    the prompt rendered as the training data is (the chat template when ``settings.chat_template``)."""
    spec = cfg.finetune
    if spec.eval_data is None or not spec.num_sample_answers or tokenizer is None:
        return []
    from coserve_jax.tokenizer import encode_chat

    key = (spec.columns or {}).get("prompt", "prompt")
    out = []
    for _, rec in read_records(resolve_data_path(spec.eval_data))[: spec.num_sample_answers]:
        q = rec.get(key) if isinstance(rec, dict) else None
        if not isinstance(q, str):
            continue
        if spec.settings.get("chat_template"):
            ids = encode_chat(tokenizer, [{"role": "user", "content": q}])
        else:
            ids = list(tokenizer(q)["input_ids"])
        out.append((q, ids))
    return out


def answer(engine: Engine, questions, adapter: str | None, max_tokens: int = 128) -> list[tuple[str, str]]:
    """Greedy answers to ``questions`` (:func:`sample_questions`), by ``adapter`` or the base model."""
    if not questions:
        return []
    outs = engine.generate([ids for _, ids in questions], SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=adapter)
    return [(q, o.text) for (q, _), o in zip(questions, outs)]


def build_engine(cfg: BenchConfig) -> Engine:
    """The benchmark's engine: the configured checkpoint or random weights of the configured
    shape, the adapter pool, step measurement on (every step is timed and logged with the
    latency model's prediction)."""
    initialize_distributed(cfg.engine.get("distributed"))  # before any device is touched
    m = cfg.model
    tokenizer = None
    if m.tokenizer is not None:
        from coserve_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_data_path(m.tokenizer))
    if m.path is not None:  # a real checkpoint: its weights, and its tokenizer unless one is given
        lora = dict(max_loras=cfg.lora.max_loras, max_lora_rank=cfg.lora.max_lora_rank, lora_target_modules=cfg.lora.target_modules)
        return Engine(resolve_data_path(m.path), tokenizer=tokenizer, dtype=m.dtype, max_model_len=m.max_model_len,
                      slo=cfg.slo, measure_steps=True, **lora, **cfg.engine)
    if m.config is not None:
        import json

        hf = json.loads((resolve_data_path(m.config) / "config.json").read_text())
    else:
        hf = dict(m.hf_config)
    if m.vocab_from_tokenizer:
        if tokenizer is None:
            raise ValueError("model.vocab_from_tokenizer needs model.tokenizer")
        hf["vocab_size"] = len(tokenizer)
    config = ModelConfig.from_hf_dict(hf, max_model_len=m.max_model_len)
    pool = LoRAPoolConfig(cfg.lora.max_loras, cfg.lora.max_lora_rank, cfg.lora.target_modules)
    # Generated in place, already split over the tensor-parallel devices (never whole on one).
    rules = ShardingRules(config, make_mesh(cfg.engine.get("tensor_parallel_size", 1)))
    model = init_random(config, m.seed, dtype=m.dtype, lora=pool, sharding=rules.sharding)
    return Engine(model, tokenizer=tokenizer, slo=cfg.slo, measure_steps=True, **cfg.engine)


def resolve_slo(engine: Engine, cfg: BenchConfig) -> tuple[SLOConfig, dict | None]:
    """The run's SLOs: ``cfg.slo``, with ``cfg.relative_slo`` (if set) turned into milliseconds
    from the engine's fitted latency model (:class:`~coserve_jax.bench.config.RelativeSLO`).
    Returns the SLOs and the reference step times they came from (``None`` without
    ``relative_slo``): ``{"decode_step_ms", "prefill_step_ms", "batch_size", "context_tokens"}``.

    Raises:
        ValueError: the engine has no latency model (built without ``measure_steps``).
    """
    rel = cfg.relative_slo
    if rel is None:
        return cfg.slo, None
    model = engine.latency_model
    if model is None:
        raise ValueError("relative_slo needs the engine's latency model (build it with measure_steps=True)")
    ec = engine.engine_config
    b = min(rel.batch_size or ec.max_num_seqs, ec.max_num_seqs, ec.max_num_batched_tokens)
    ctx = min(rel.context_tokens or cfg.workload.max_prompt_tokens, ec.max_model_len)
    dec = pick_bucket(ec.buckets, b, b)
    decode_ms = model.predict(StepShape(dec.num_tokens, dec.num_seqs, b * ctx))
    t = ec.max_num_batched_tokens
    pre = pick_bucket(ec.buckets, t, 1)
    prefill_ms = model.predict(StepShape(pre.num_tokens, pre.num_seqs, t * (t + 1) // 2))
    slo = dataclasses.replace(
        cfg.slo,
        tpot_ms=rel.tpot * decode_ms if rel.tpot is not None else cfg.slo.tpot_ms,
        ttft_ms=rel.ttft * prefill_ms if rel.ttft is not None else cfg.slo.ttft_ms,
    )
    return slo, {"decode_step_ms": decode_ms, "prefill_step_ms": prefill_ms, "batch_size": b, "context_tokens": ctx}


def _job(engine: Engine, cfg: BenchConfig, examples, name: str):
    settings = {"num_train_epochs": 1000, "checkpoint_dir": None, **cfg.finetune.settings}
    return engine.create_finetuning_job(examples, adapter_name=name, job_id=name, **settings)


def _end_job(engine: Engine, job, evals=None, questions=None) -> tuple[float | None, list | None]:
    """Stop the job; its adapter's validation loss on ``evals`` and answers to ``questions``
    (outside the measured run), then unload it."""
    if not job.done:
        job.cancel()
    loss = engine.evaluate(evals, adapter=job.adapter_name) if evals else None
    answers = answer(engine, questions, job.adapter_name) if questions else None
    engine.unload_adapter(job.adapter_name)
    return loss, answers


def replay(
    engine: Engine,
    requests: list[BenchRequest],
    policy: str,
    rate: float,
    *,
    examples: list[TrainingExample] | None,
    cfg: BenchConfig,
    on_step: Callable[[], None] | None = None,
    evals: list[TrainingExample] | None = None,
    questions: list | None = None,
) -> RunResult:
    """Replay ``requests`` against the wall clock under ``policy`` (the engine's policy must be
    set), with a finetuning job on ``examples`` if given. Requests still unfinished
    ``drain_timeout_s`` after the last arrival are aborted. After the run (not timed), the job's
    adapter is evaluated on ``evals`` and answers ``questions``. The prefix cache is emptied first,
    so that no run reuses another's pages."""
    engine.reset_prefix_cache()
    kv = engine.scheduler.kv_cache
    q0, h0 = kv.prefix_cache_queries, kv.prefix_cache_hits
    job = _job(engine, cfg, examples, f"bench-{policy}-{rate:g}") if examples is not None else None
    queue = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
    meta: dict[str, tuple[BenchRequest, float]] = {}
    outputs = {}
    deadline = (queue[-1].arrival_s if queue else 0.0) + cfg.run.drain_timeout_s
    steps0, ft0 = engine.num_steps, (job.trained_tokens if job else 0)
    log0 = len(engine.step_log)
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        while queue and t0 + queue[0].arrival_s <= now:
            r = queue.popleft()
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
            rid = engine.add_request(list(r.prompt_token_ids), params, arrival_time=t0 + r.arrival_s)
            meta[rid] = (r, t0 + r.arrival_s)
        if not queue and not engine.has_unfinished:
            break
        if now - t0 > deadline:
            for rid in list(meta):
                if rid not in outputs:
                    o = engine.abort(rid)
                    if o is not None:
                        outputs[rid] = o
            break
        if engine.has_unfinished or (job is not None and not job.done):
            n = engine.num_steps
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o
            if engine.num_steps == n:  # nothing could run (e.g. no free pages): do not spin
                time.sleep(0.001)
            elif on_step is not None:
                on_step()
        else:
            time.sleep(min(max(t0 + queue[0].arrival_s - now, 0.0), 0.05))
    end = time.monotonic()
    ft_tokens = (job.trained_tokens - ft0) if job else 0
    loss_after, answers = _end_job(engine, job, evals, questions) if job is not None else (None, None)
    nan = float("nan")
    records = []
    for rid, (r, arrival) in meta.items():
        o = outputs.get(rid)
        first = o.first_token_time if o is not None and o.first_token_time is not None else nan
        finish = o.finish_time if o is not None and o.finish_time is not None else nan
        n_out = len(o.token_ids) if o is not None else 0
        done = o is not None and o.finish_reason != "abort"
        records.append(RequestRecord(rid, arrival - t0, first - t0, finish - t0, len(r.prompt_token_ids), n_out, r.max_tokens, done))
    steps = [dataclasses.replace(s, end_time=s.end_time - t0) for s in list(engine.step_log)[log0:]]
    return RunResult(policy, rate, records, steps, end - t0, ft_tokens, engine.num_steps - steps0, engine.scheduling_policy,
                     loss_after, answers, kv.prefix_cache_queries - q0, kv.prefix_cache_hits - h0)


def finetune_only(engine: Engine, cfg: BenchConfig, examples: list[TrainingExample], on_step=None, evals=None) -> RunResult:
    """Peak finetuning throughput: the job alone on the device for ``finetune_only_s`` seconds,
    once with every step's whole token budget its own (``"fixed"``) and once under the hybrid
    policy (idle-sized steps, whose buckets waste less padding); the faster run is returned, with
    its adapter's validation loss on ``evals`` (each run's adapter is kept on the host until the
    faster one is known, so the pool needs one free slot only)."""
    runs = []
    for policy in ("fixed", "hybrid"):
        res, job = _finetune_alone(engine, cfg, examples, policy, on_step)
        runs.append((res, engine.adapter_weights(job) if evals else None))
        engine.unload_adapter(job.adapter_name)
    best, weights = max(runs, key=lambda r: r[0].finetune_tokens / max(r[0].duration_s, 1e-9))
    if evals:
        name = "bench-finetune-only-eval"
        engine.load_adapter(name, weights)
        try:
            best.eval_loss_after = engine.evaluate(evals, adapter=name)
        finally:
            engine.unload_adapter(name)
    return best


def _finetune_alone(engine: Engine, cfg: BenchConfig, examples, policy: str, on_step):
    engine.set_scheduling_policy(policy)
    job = _job(engine, cfg, examples, f"bench-finetune-only-{policy}")
    log0, steps0 = len(engine.step_log), engine.num_steps
    t0 = time.monotonic()
    while time.monotonic() - t0 < cfg.run.finetune_only_s and not job.done:
        engine.step()
        if on_step is not None:
            on_step()
    end = time.monotonic()
    tokens = job.trained_tokens
    job.cancel()  # the adapter stays loaded (finetune_only evaluates the faster run's)
    steps = [dataclasses.replace(s, end_time=s.end_time - t0) for s in list(engine.step_log)[log0:]]
    return RunResult("finetune_only", 0.0, [], steps, end - t0, tokens, engine.num_steps - steps0, policy), job


def run_policy(engine: Engine, cfg: BenchConfig, policy: str, rate: float, requests, examples, on_step=None,
               evals=None, questions=None) -> RunResult:
    """Set ``policy`` (with its config options) on the engine and replay one rate (then evaluate
    the run's adapter on ``evals`` and let it answer ``questions``)."""
    opts = dict(cfg.policies.get(policy) or {})
    if policy == "inference_only":
        engine.set_scheduling_policy(opts.pop("scheduling_policy", "fixed"))
        return replay(engine, requests, policy, rate, examples=None, cfg=cfg, on_step=on_step)
    if policy == "hybrid":
        engine.set_scheduling_policy("hybrid")
    else:
        engine.set_scheduling_policy(policy, **opts)
    return replay(engine, requests, policy, rate, examples=examples, cfg=cfg, on_step=on_step, evals=evals, questions=questions)
