"""A seconds-long run of ``python -m coserve_jax.bench`` (the benchmark itself is not part of CI):
every policy on a tiny engine, and every output it promises."""

import csv
import json

import pytest
import yaml

from coserve_jax.bench.__main__ import main
from coserve_jax.bench.metrics import SUMMARY_KEYS

CONFIG = {
    "name": "smoke",
    "model": {"hf_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128,
                            "max_position_embeddings": 256, "torch_dtype": "float32"}, "dtype": "float32"},
    "lora": {"max_loras": 1, "max_lora_rank": 4, "target_modules": ["q_proj", "v_proj"]},
    "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 64, "token_buckets": [16, 64], "seq_buckets": [4],
               "num_kv_pages": 80, "finetune_max_seq_len": 64, "finetune_seq_buckets": [64]},
    "slo": {"ttft_ms": 2000, "tpot_ms": 200},
    "relative_slo": {"tpot": 4.0, "ttft": None},  # TPOT from this machine's profile; TTFT stays 2000 ms
    "workload": {"trace": None, "arrival": "poisson", "num_requests": 6, "min_prompt_tokens": 4, "max_prompt_tokens": 40,
                 "min_output_tokens": 2, "max_output_tokens": 6},
    "rates": [20.0],
    "finetune": {"data": "synthetic", "synthetic_tokens": 48, "max_examples": 8,
                 "settings": {"lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}},
    "run": {"drain_timeout_s": 30, "finetune_only_s": 0.5},
}


def test_bench_smoke(tmp_path, capsys, monkeypatch):
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    monkeypatch.chdir(tmp_path)  # without --out: a fresh run directory, never bench/results
    assert main(["--config", str(path), "--quiet"]) == 0
    (out,) = (tmp_path / "bench" / "runs").iterdir()
    assert out.name.startswith("smoke-") and not (tmp_path / "bench" / "results").exists()
    rows = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in rows] == ["finetune_only", "inference_only", "temporal", "fixed_budget", "hybrid"]
    for r in rows:
        assert set(SUMMARY_KEYS) <= set(r)
    ft_peak = rows[0]["finetune_tokens_per_s"]
    assert ft_peak > 0 and rows[0]["finetune_progress"] == 1.0
    for r in rows[1:]:
        assert r["rate"] == 20.0 and r["num_requests"] == 6 and r["num_finished"] == 6
        assert 0.0 <= r["slo_attainment"] <= 1.0 and r["ttft_p50_ms"] > 0
        assert r["finetune_progress"] == r["finetune_tokens_per_s"] / ft_peak
    assert rows[1]["finetune_tokens_per_s"] == 0.0  # inference only
    assert rows[4]["finetune_tokens_per_s"] > 0  # hybrid trained beside the requests
    with open(out / "requests.csv") as f:
        reqs = list(csv.DictReader(f))
    assert len(reqs) == 4 * 6
    assert all(float(r["e2e_ms"]) >= float(r["ttft_ms"]) > 0 for r in reqs)
    with open(out / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert {s["policy"] for s in steps} == {r["policy"] for r in rows}
    assert all(float(s["measured_ms"]) > 0 and s["predicted_ms"] != "" for s in steps)
    # decode tokens in the step log = generated tokens after the first, per policy
    for policy in ("inference_only", "hybrid"):
        want = sum(int(r["output_tokens"]) - 1 for r in reqs if r["policy"] == policy)
        assert sum(int(s["decode_tokens"]) for s in steps if s["policy"] == policy) == want
    for png in ("slo_attainment.png", "finetune_throughput.png", "step_time.png"):
        assert (out / png).stat().st_size > 1000
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("python -m coserve_jax.bench --config")
    ref = run["slo"]["reference"]
    assert ref["batch_size"] == 4 and ref["context_tokens"] == 40 and ref["decode_step_ms"] > 0
    assert run["slo"]["tpot_ms"] == pytest.approx(4.0 * ref["decode_step_ms"]) and run["slo"]["ttft_ms"] == 2000
    printed = capsys.readouterr().out
    assert "hybrid" in printed and "SLO att." in printed


@pytest.mark.slow
def test_bench_validation_keys_and_sample_answers(tmp_path):
    """With ``finetune.eval_data``, every row has the base model's validation loss and each
    co-serving run's adapter's; the adapter trained on the same records it is validated on (a
    high learning rate), so its loss is lower; ``summary.md`` shows base vs adapter answers."""
    from conftest import shared_data

    tokenizer = shared_data("tokenizers", "llama2")
    gsm = shared_data("finetune", "gsm8k", "train.jsonl")
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["tokenizer"] = str(tokenizer)
    cfg["model"]["vocab_from_tokenizer"] = True
    cfg["engine"].update(finetune_max_seq_len=256, finetune_seq_buckets=[256], num_kv_pages=120)
    cfg["lora"]["max_loras"] = 2
    cfg["policies"] = {"finetune_only": {}, "hybrid": {}}
    cfg["run"]["finetune_only_s"] = 3
    cfg["finetune"] = {"data": str(gsm), "max_examples": 4, "eval_data": str(gsm), "eval_examples": 4, "num_sample_answers": 2,
                       "columns": {"prompt": "question", "completion": "answer"},
                       "settings": {"learning_rate": 0.05, "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["--config", str(path), "--out", str(out), "--quiet", "--no-plots"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in rows] == ["finetune_only", "hybrid"]
    before = rows[0]["eval_loss_before"]
    assert before > 0 and all(r["eval_loss_before"] == before for r in rows)
    for r in rows:
        assert 0 < r["eval_loss_after"] < before, r
    md = (out / "summary.md").read_text()
    assert "eval loss after" in md and md.count("**Question.**") == 2 and "Adapter:" in md
