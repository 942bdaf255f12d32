"""The benchmark's workloads (real Azure / Mooncake traces, synthetic arrivals, ShareGPT prompts),
config validation and metrics."""

import math
import pathlib

import numpy as np
import pytest
import yaml
from conftest import shared_data

from coserve_jax.bench.config import ConfigError, load_config, parse_config
from coserve_jax.bench.harness import RequestRecord, RunResult
from coserve_jax.bench.metrics import SUMMARY_KEYS, attains, summarize
from coserve_jax.bench.workload import (
    WorkloadConfig, build_workload, load_azure_trace, load_mooncake_trace, load_trace, rescale, synthetic_arrivals,
)
from coserve_jax.sched.policy import SLOConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_azure_trace():
    data = shared_data("traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    trace = load_azure_trace(data)
    assert len(trace) == 19366  # the dataset's README: conv 19,366 requests over 58 minutes
    arrivals = np.array([r.arrival_s for r in trace])
    assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
    assert 55 * 60 < arrivals[-1] < 60 * 60
    assert (trace[0].prompt_tokens, trace[0].output_tokens) == (374, 44)  # the file's first row


def test_mooncake_trace():
    trace = load_mooncake_trace(shared_data("traces/mooncake_fast25/conversation_trace.jsonl"))
    assert len(trace) == 12031
    assert (trace[0].prompt_tokens, trace[0].output_tokens) == (6758, 500)
    assert trace[-1].arrival_s > 50 * 60  # 59 minutes of ms timestamps


def test_bad_trace_rows_name_their_line(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:47.0,ten,5\n")
    with pytest.raises(ValueError, match="line 3"):
        load_azure_trace(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_trace(str(tmp_path / "missing.jsonl"))


def test_rescale_keeps_bursts_and_hits_the_rate():
    a = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 10.0])
    r = rescale(a, rate=2.0)
    assert r[-1] == pytest.approx(5 / 2.0)  # 5 gaps at 2 requests/s
    assert np.allclose(np.diff(r) / np.diff(a), np.diff(r)[0] / np.diff(a)[0])  # one scale for all gaps


@pytest.mark.parametrize("kind,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_synthetic_arrivals(kind, cv):
    a = synthetic_arrivals(20000, 5.0, kind, cv, np.random.default_rng(0))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_build_workload_from_the_trace():
    shared_data("traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    cfg = WorkloadConfig(trace="azure_conv", num_requests=50, length_scale=0.5, max_prompt_tokens=300, max_output_tokens=64)
    reqs = build_workload(cfg, rate=4.0, vocab_size=1000, data_dir=shared_data())
    assert len(reqs) == 50
    assert reqs[-1].arrival_s == pytest.approx(49 / 4.0)
    assert len(reqs[0].prompt_token_ids) == 187 and reqs[0].max_tokens == 22  # 374 and 44, halved
    assert all(len(r.prompt_token_ids) <= 300 and 1 <= r.max_tokens <= 64 for r in reqs)
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    again = build_workload(cfg, rate=4.0, vocab_size=1000, data_dir=shared_data())
    assert again == reqs  # seeded


def test_sharegpt_prompts():
    from coserve_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_data("tokenizers/llama2"))
    shared_data("prompts/sharegpt_prompts/ShareGPT_V3_filtered_500.json")
    cfg = WorkloadConfig(trace=None, arrival="poisson", num_requests=5, prompts="sharegpt", min_prompt_tokens=20, max_prompt_tokens=40)
    reqs = build_workload(cfg, rate=1.0, vocab_size=len(tok), tokenizer=tok, data_dir=shared_data())
    text = tok.decode(list(reqs[0].prompt_token_ids))
    assert "automatic updates" in text  # the file's first prompt: "How to stop automatic updates from the WSUS ..."
    assert all(20 <= len(r.prompt_token_ids) <= 40 for r in reqs)
    with pytest.raises(ValueError, match="tokenizer"):
        build_workload(cfg, rate=1.0, vocab_size=100, data_dir=shared_data())


def test_shipped_configs_parse():
    names = sorted(p.stem for p in (ROOT / "configs" / "bench").glob("*.yaml"))
    assert {"cpu-smoke", "llama-3.1-8b", "qwen2.5-14b"} <= set(names)
    for n in names:
        cfg = load_config(ROOT / "configs" / "bench" / f"{n}.yaml")
        assert cfg.name == n and cfg.rates
    assert load_config(ROOT / "configs/bench/llama-3.1-8b.yaml").slo.tpot_ms == 45
    assert load_config(ROOT / "configs/bench/qwen2.5-14b.yaml").slo.tpot_ms == 75


@pytest.mark.parametrize("patch,match", [
    ({"rates": []}, "rates"),
    ({"modle": {}}, "unknown top-level"),
    ({"workload": {"arrivals": "poisson"}}, "workload: unknown keys"),
    ({"policies": {"hybrid": {}, "finetune_only": {}, "temporal": {"every": 3}}}, "unknown options"),
    ({"policies": {"hybird": {}}}, "unknown policy"),
    ({"policies": {"hybrid": {}}}, "finetune_only"),
    ({"engine": {"scheduling_policy": "hybrid"}}, "set by the benchmark"),
    ({"slo": {"tpot_ms": -1}}, "SLOs must be > 0"),
])
def test_config_errors(patch, match):
    base = yaml.safe_load((ROOT / "configs/bench/cpu-smoke.yaml").read_text())
    with pytest.raises(ConfigError, match=match):
        parse_config({**base, **patch})


def _rec(i, ttft_ms, tpot_ms, n=11, finished=True):
    first = 1.0 + ttft_ms / 1000
    return RequestRecord(f"r{i}", 1.0, first, first + tpot_ms * (n - 1) / 1000, 10, n, n, finished)


def test_summary_metrics():
    slo = SLOConfig(ttft_ms=100, tpot_ms=20)
    reqs = [_rec(0, 50, 10), _rec(1, 150, 10), _rec(2, 50, 30), _rec(3, 50, 19.9), _rec(4, 50, 10, finished=False)]
    assert [attains(r, slo) for r in reqs] == [True, False, False, True, False]
    never = RequestRecord("r5", 1.0, math.nan, math.nan, 10, 0, 5, False)
    res = RunResult("hybrid", 2.0, reqs + [never], [], 4.0, 1000, 10)
    row = summarize(res, slo, finetune_only_tokens_per_s=500.0)
    assert list(row)[:len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    assert row["slo_attainment"] == pytest.approx(2 / 6)
    assert row["goodput"] == pytest.approx(2 / 4.0)
    assert row["finetune_tokens_per_s"] == 250.0 and row["finetune_progress"] == 0.5
    assert row["ttft_p50_ms"] == pytest.approx(50.0)


def test_the_shared_data_folder_is_found_from_inside_a_checkout(tmp_path, monkeypatch):
    """No $COSERVE_JAX_DATA_DIR: the nearest shared/data above the working directory; set: it."""
    from coserve_jax.bench.workload import default_data_dir, resolve_data_path

    (tmp_path / "shared" / "data" / "traces").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "traces" / "t.csv").write_text("x\n")
    deep = tmp_path / "main" / "bench" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.delenv("COSERVE_JAX_DATA_DIR", raising=False)
    assert default_data_dir() == tmp_path / "shared" / "data"
    assert resolve_data_path("traces/t.csv") == tmp_path / "shared" / "data" / "traces" / "t.csv"
    monkeypatch.setenv("COSERVE_JAX_DATA_DIR", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        resolve_data_path("traces/t.csv")


def test_relative_slo_config_is_checked():
    from coserve_jax.bench.config import parse_config
    from coserve_jax.configfile import ConfigError

    base = {"name": "x", "model": {"hf_config": {}}, "rates": [1.0], "policies": {"inference_only": {}}}
    assert parse_config(base).relative_slo is None
    cfg = parse_config({**base, "relative_slo": {}})
    assert (cfg.relative_slo.tpot, cfg.relative_slo.ttft) == (3.0, 10.0)
    for bad in ({"tpot": 0}, {"ttft": "fast"}, {"batch_size": 0}, {"tpot_ms": 3}):
        with pytest.raises(ConfigError, match="relative_slo"):
            parse_config({**base, "relative_slo": bad})


def test_mooncake_block_prompts_repeat_as_the_hash_ids_and_the_bound_counts_whole_blocks():
    from coserve_jax.bench.workload import PrefixRequest, block_prompts, multi_turn_sessions, prefix_hit_bound

    reqs = [
        PrefixRequest(0.0, 1024, 10, (0, 1)),        # system block 0, session 1
        PrefixRequest(1.0, 1536, 10, (0, 1, 2)),     # session 1, turn 2: reuses blocks 0, 1
        PrefixRequest(2.0, 700, 10, (0, 5)),         # another session: reuses block 0
        PrefixRequest(3.0, 1300, 10, (0, 1, 2, 3)),  # cut to 1300 / 16 = 81 tokens of 4 blocks of 32
    ]
    prompts = block_prompts(reqs, 32, vocab_size=100, seed=1)
    assert [len(p) for p in prompts] == [64, 96, 44, 81]  # 700 x 32 / 512 = 43.75 -> 44
    assert prompts[1][:64] == prompts[0] and prompts[3] == prompts[1][:81]
    assert prompts[2][:32] == prompts[0][:32] and prompts[2][32:44] != prompts[1][32:44]
    assert all(1 <= t < 100 for p in prompts for t in p)
    # hits: 0; 64 (blocks 0, 1); 32 (block 0); 80 (blocks 0, 1, 2 = 96 tokens, capped at the 5 full
    # pages before the last token)
    assert abs(prefix_hit_bound(reqs, prompts, 32, 16) - (0 + 64 + 32 + 80) / (64 + 96 + 44 + 81)) < 1e-12
    sessions = multi_turn_sessions(reqs, 10, min_turns=2)
    assert sessions == [reqs[0], reqs[1], reqs[3]]  # session 1 has three turns; session 5 only one
