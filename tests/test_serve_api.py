"""The OpenAI-compatible server, end to end: the real server (``python -m coserve_jax.serve``) on a
loopback port, driven with the official ``openai`` client and raw HTTP.

The server runs the built-in tiny model with Llama 3's tokenizer and its real Llama-3.1 chat
template (../shared/data/tokenizers/llama3), an API key, and small limits.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time

import httpx
import pytest

from tests.conftest import shared_data
from tests.serve_util import ServerProcess, wait_until

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

KEY = "test-key-123"
BASE = "coserve-tiny"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def tokenizer_dir():
    return shared_data("tokenizers", "llama3")


@pytest.fixture(scope="module")
def server(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-out")
    from coserve_jax.__main__ import _random_adapter
    from coserve_jax.lora.peft_io import write_peft
    from coserve_jax.models.tiny import tiny_config

    config = tiny_config(vocab_size=128256)
    preloaded = tmp_path_factory.mktemp("adapters") / "preloaded"
    write_peft(_random_adapter(config, 4, ("q_proj", "o_proj"), seed=8), preloaded, config.num_layers)
    srv = ServerProcess([
        "--tokenizer", str(tokenizer_dir), "--api-key", KEY, "--output-dir", str(out),
        "--lora-modules", f"preloaded={preloaded}", "--max-loras", "2", "--max-cpu-loras", "3",
        "--set", f"limits.max_body_bytes={MAX_BODY}", "--set", "limits.max_tokens=256", "--set", "limits.max_n=4",
        "--set", "log_stats_interval_s=1",
    ], env={"COSERVE_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("xla"))})
    srv.out_dir = out
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def metric(http, name: str, **labels) -> float:
    """A sample's value from /metrics (parsed by prometheus_client's parser); 0 if absent."""
    text = http.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three prime numbers."}]


# ---- inference ----------------------------------------------------------------------------------
def test_models_lists_the_base_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE


def test_completion_counts_tokens_with_the_real_tokenizer(client, hf_tokenizer):
    prompt = "The capital of France is"
    r = client.completions.create(model=BASE, prompt=prompt, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.prompt_tokens == len(hf_tokenizer(prompt)["input_ids"])  # BOS + the text's tokens
    assert r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"
    again = client.completions.create(model=BASE, prompt=prompt, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    # Token-id prompts and n choices with a seed: reproducible, and the n samples differ.
    ids = hf_tokenizer(prompt)["input_ids"]
    a = client.completions.create(model=BASE, prompt=ids, max_tokens=12, temperature=1.0, n=3, seed=7, extra_body={"ignore_eos": True})
    b = client.completions.create(model=BASE, prompt=ids, max_tokens=12, temperature=1.0, n=3, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 36 and a.usage.prompt_tokens == len(ids)


def test_chat_renders_the_llama3_template(client, hf_tokenizer):
    r = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=5, temperature=0)
    expected = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert r.usage.prompt_tokens == len(expected)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 5


def test_chat_logprobs_greedy_picks_the_top_token(client):
    r = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert math.isclose(entry.logprob, lps[0], abs_tol=1e-5)  # greedy: the chosen token is the most likely
        assert entry.token == entry.top_logprobs[0].token


def test_streaming_matches_non_streaming(client):
    kw = dict(model=BASE, messages=CHAT, max_tokens=20, temperature=0.9, top_p=0.95, seed=11, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # Legacy completions stream too.
    ckw = dict(model=BASE, prompt="Once upon a time", max_tokens=15, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**ckw).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **ckw)) == whole


def test_stop_string_cuts_the_text(client):
    kw = dict(model=BASE, prompt="Count: one two", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip() and "\ufffd" not in text[i:i + 3])
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_lora_modules_flag_preloads_an_adapter(client, server):
    """vLLM's --lora-modules NAME=PATH: the adapter is served from the start, under NAME."""
    assert "LoRA adapter 'preloaded' loaded from" in server.output
    assert "preloaded" in [m.id for m in client.models.list().data]
    kw = dict(messages=CHAT, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    base = client.chat.completions.create(model=BASE, **kw).choices[0].logprobs.content[0]
    tuned = client.chat.completions.create(model="preloaded", **kw).choices[0].logprobs.content[0]
    assert [t.logprob for t in base.top_logprobs] != pytest.approx([t.logprob for t in tuned.top_logprobs], abs=1e-4)


def test_adapter_loads_serves_by_name_and_unloads(client, http, tmp_path):
    from coserve_jax.__main__ import _random_adapter
    from coserve_jax.lora.peft_io import write_peft
    from coserve_jax.models.tiny import tiny_config

    config = tiny_config(vocab_size=128256)
    path = tmp_path / "my-adapter"
    write_peft(_random_adapter(config, 8, ("q_proj", "v_proj", "down_proj"), seed=5), path, config.num_layers)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "my-adapter", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    assert "my-adapter" in [m.id for m in client.models.list().data]
    kw = dict(messages=CHAT, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    base = client.chat.completions.create(model=BASE, **kw).choices[0].logprobs.content[0]
    tuned = client.chat.completions.create(model="my-adapter", **kw).choices[0].logprobs.content[0]
    assert [t.logprob for t in base.top_logprobs] != pytest.approx([t.logprob for t in tuned.top_logprobs], abs=1e-4)
    # Loading the same name twice, or a directory that is not an adapter, is a 400.
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "my-adapter", "lora_path": str(path)}).status_code == 400
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "missing")})
    assert bad.status_code == 400 and "missing" in bad.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "my-adapter"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="my-adapter", **kw)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "my-adapter"}).status_code == 404


# ---- fine-tuning ------------------------------------------------------------------------------
def gsm8k_chat_file(path, n: int) -> str:
    """The first ``n`` GSM8K training problems as OpenAI chat fine-tuning records."""
    src = shared_data("finetune", "gsm8k", "train.jsonl")
    with open(src) as f, open(path, "w") as out:
        for line in list(f)[:n]:
            rec = json.loads(line)
            msgs = [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["answer"]}]
            out.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def test_finetuning_job_trains_while_serving_and_its_adapter_answers(client, http, tmp_path):
    with open(gsm8k_chat_file(tmp_path / "gsm8k.jsonl", 24), "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.purpose == "fine-tune" and uploaded.bytes > 0
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=uploaded.id, suffix="gsm8k", seed=3,
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 100},
        extra_body={"lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"]}},
    )
    assert job.status in ("queued", "running") and job.fine_tuned_model.startswith(f"ft:{BASE}:gsm8k:")
    assert job.model_extra["total_steps"] == 24  # 2 epochs x 24 examples / batch 2

    # Chat requests are served while the job trains, including on the job's own adapter.
    results, errors = [], []

    def chat(model):
        try:
            results.append(client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] >= 1, timeout=120)
    threads = [threading.Thread(target=chat, args=(m,)) for m in (BASE, job.fine_tuned_model, BASE, job.fine_tuned_model)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    during = client.fine_tuning.jobs.retrieve(job.id)
    assert during.status == "running" and during.model_extra["step"] < 24, "the job ended before the chats: make it longer"
    assert during.estimated_finish is not None and during.estimated_finish >= during.created_at  # from its measured pace

    done = wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                      timeout=600, interval=0.5)
    assert done.status == "succeeded", done.error
    assert done.trained_tokens > 0 and done.finished_at is not None and done.estimated_finish is None
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(24, 0, -1))  # newest first
    assert all(e.data["total_steps"] == 24 and math.isfinite(e.data["train_loss"]) and e.data["train_loss"] > 0 for e in metrics)
    assert "successfully completed" in events[0].message
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and ckpts[0].step_number == 24
    with open(os.path.join(done.model_extra["adapter_path"], "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == BASE  # the built-in model: its served name
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]

    # The trained adapter answers, and answers differently from the base model.
    kw = dict(messages=CHAT, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    base = client.chat.completions.create(model=BASE, **kw).choices[0].logprobs.content[0]
    tuned = client.chat.completions.create(model=done.fine_tuned_model, **kw).choices[0].logprobs.content[0]
    assert [t.logprob for t in base.top_logprobs] != pytest.approx([t.logprob for t in tuned.top_logprobs], abs=1e-4)
    # A finished job cannot be cancelled.
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    # Its model can be deleted (the slot is freed; the job's record stays); the base model cannot.
    assert client.models.delete(done.fine_tuned_model).deleted
    assert done.fine_tuned_model not in [m.id for m in client.models.list().data]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    with pytest.raises(openai.NotFoundError):
        client.models.delete(done.fine_tuned_model)
    with pytest.raises(openai.BadRequestError):
        client.models.delete(BASE)


def test_ten_jobs_in_a_row_on_two_adapter_slots_all_succeed_and_answer(client, tmp_path):
    """Ten queued jobs on a server with ``--max-loras 2 --max-cpu-loras 3``: each starts when a
    slot can be had (finished jobs' adapters are parked on the host, or dropped to their exported
    directory past three), all succeed, and all ten models answer at once, with their own
    weights, though only two fit the device at a time."""
    with open(gsm8k_chat_file(tmp_path / "two.jsonl", 2), "rb") as f:
        fid = client.files.create(file=f, purpose="fine-tune").id
    jobs = [client.fine_tuning.jobs.create(model=BASE, training_file=fid, suffix=f"row{k}", seed=k,
                                           hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 100},
                                           extra_body={"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
            for k in range(10)]
    def all_ended():
        now = [client.fine_tuning.jobs.retrieve(job.id) for job in jobs]
        return all(j.status in ("succeeded", "failed", "cancelled") for j in now) and now

    done = wait_until(all_ended, timeout=600, interval=1.0)
    assert [d.status for d in done] == ["succeeded"] * 10, [d.error for d in done]
    models = [d.fine_tuned_model for d in done]
    assert set(models) <= {m.id for m in client.models.list().data}
    answers, errors = {}, []

    def ask(model):
        try:
            r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, temperature=0, logprobs=True, top_logprobs=5)
            answers[model] = tuple(t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(m,)) for m in models]  # ten adapters at once on two slots
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(answers) == 10
    assert len(set(answers.values())) == 10  # each its own weights
    again = {}
    for m in models[:3]:  # one at a time: the same answers as in the crowd
        r = client.chat.completions.create(model=m, messages=CHAT, max_tokens=2, temperature=0, logprobs=True, top_logprobs=5)
        again[m] = tuple(t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs)
    for m in models[:3]:
        assert again[m] == pytest.approx(answers[m], abs=1e-4)
    for m in models:
        assert client.models.delete(m).deleted


def test_long_records_are_truncated_and_validation_loss_is_reported(client, http, tmp_path):
    """A 64-record Alpaca-as-chat file with 2 records over finetune_max_seq_len (512) trains, the
    2 truncated and counted (``truncation: error`` refuses it, naming their lines); a validation
    file gives valid_loss events every eval_steps steps and at the end, checkpoint metrics and a
    Prometheus gauge."""
    rows = []
    for i in range(64):
        long = i in (10, 40)
        out = " ".join(f"word{j}" for j in range(900)) if long else f"The answer is {i}."
        rows.append({"messages": [{"role": "user", "content": f"Instruction {i}: repeat after me."},
                                  {"role": "assistant", "content": out}]})
    train = tmp_path / "alpaca_chat.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    valid = tmp_path / "valid.jsonl"
    valid.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Instruction {i}: repeat after me."},
                                                          {"role": "assistant", "content": f"The answer is {i}."}]})
                                for i in range(100, 108)) + "\n")
    with open(train, "rb") as f:
        tid = client.files.create(file=f, purpose="fine-tune").id
    with open(valid, "rb") as f:
        vid = client.files.create(file=f, purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file=tid, hyperparameters={"truncation": "error"})
    assert "line 11" in str(e.value) and "line 41" in str(e.value) and "above max_seq_len=512" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file=tid, validation_file="file-nope")
    assert "validation_file" in str(e.value)
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=tid, validation_file=vid,
        hyperparameters={"max_steps": 4, "eval_steps": 2, "learning_rate_multiplier": 100},
    )
    assert job.validation_file == vid and job.model_extra["truncated_examples"] == 2
    done = wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                      timeout=600, interval=0.5)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any("2 training example(s) were longer than 512 tokens and were truncated" in e.message for e in events)
    valid_events = [e for e in events if e.type == "metrics" and "valid_loss" in (e.data or {})]
    assert [e.data["step"] for e in valid_events] == [4, 2]  # newest first
    assert all(math.isfinite(e.data["valid_loss"]) and e.data["valid_loss"] > 0 for e in valid_events)
    assert done.model_extra["valid_loss"] == valid_events[0].data["valid_loss"]
    ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert ckpt.step_number == 4 and ckpt.metrics.valid_loss == valid_events[0].data["valid_loss"]
    assert metric(http, "coserve:finetune_job_valid_loss", job_id=job.id) == pytest.approx(valid_events[0].data["valid_loss"])


@pytest.mark.slow  # the routes over job.pause()/resume(), whose semantics test_finetune_job.py checks in the default tier
def test_a_job_pauses_and_resumes(client, tmp_path):
    """OpenAI's jobs.pause / jobs.resume: a paused job trains nothing until resumed, then finishes."""
    with open(gsm8k_chat_file(tmp_path / "gsm8k.jsonl", 8), "rb") as f:
        tid = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=BASE, training_file=tid, hyperparameters={"max_steps": 6, "batch_size": 1})
    wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] >= 1, timeout=300)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)
    def settled():  # the sequence in flight finishes (at most one more optimizer step), then nothing
        before = client.fine_tuning.jobs.retrieve(job.id).model_extra["step"]
        time.sleep(2)
        return before == client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] and before + 1

    step = wait_until(settled, timeout=120) - 1
    time.sleep(3)
    still = client.fine_tuning.jobs.retrieve(job.id)
    assert still.status == "paused" and still.model_extra["step"] == step < 6
    assert client.fine_tuning.jobs.resume(job.id).status == "running"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)
    done = wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                      timeout=600, interval=0.5)
    assert done.status == "succeeded" and done.model_extra["step"] == 6
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert "The job was paused" in messages and "The job was resumed" in messages
    client.models.delete(done.fine_tuned_model)  # frees its adapter slot


# ---- bad input ----------------------------------------------------------------------------------
def _post(http, path, body, **kw):
    return http.post(path, content=body if isinstance(body, (str, bytes)) else json.dumps(body),
                     headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", '{"model": "coserve-tiny", "messages": [', 400, None),
    "messages not a list": ("/v1/chat/completions", {"model": BASE, "messages": "hi"}, 400, "messages"),
    "max_tokens a string": ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    "negative max_tokens": ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    "max_tokens over the limit": ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 257}, 400, "max_tokens"),
    "temperature out of range": ("/v1/completions", {"model": BASE, "prompt": "hi", "temperature": 7}, 400, "temperature"),
    "top_p zero": ("/v1/chat/completions", {"model": BASE, "messages": CHAT, "top_p": 0}, 400, "top_p"),
    "n over the limit": ("/v1/completions", {"model": BASE, "prompt": "hi", "n": 5}, 400, "n"),
    "unknown model": ("/v1/chat/completions", {"model": "gpt-17", "messages": CHAT}, 404, "model"),
    "oversize prompt": ("/v1/completions", {"model": BASE, "prompt": [1000] * 1100, "max_tokens": 1}, 400, "prompt"),
    "prompt + max_tokens over the context": ("/v1/completions", {"model": BASE, "prompt": [1000] * 900, "max_tokens": 200}, 400, "max_tokens"),
    "token id outside the vocabulary": ("/v1/completions", {"model": BASE, "prompt": [10**7]}, 400, "prompt"),
    "unsupported penalty": ("/v1/completions", {"model": BASE, "prompt": "hi", "presence_penalty": 1.0}, 400, "presence_penalty"),
    "image content": ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content.0"),
    "body over the size limit": ("/v1/completions", {"model": BASE, "prompt": "x" * (MAX_BODY + 10)}, 413, None),
    "unknown fine-tuning job": ("/v1/fine_tuning/jobs/ftjob-nope/cancel", {}, 404, None),
    "fine-tuning from an unknown file": ("/v1/fine_tuning/jobs", {"model": BASE, "training_file": "file-nope"}, 400, "training_file"),
    "fine-tuning an unknown model": ("/v1/fine_tuning/jobs", {"model": "gpt-17", "training_file": "file-nope"}, 404, "model"),
    "tokenize with neither prompt nor messages": ("/tokenize", {"model": BASE}, 400, "prompt"),
    "tokenize with both prompt and messages": ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
    "detokenize outside the vocabulary": ("/detokenize", {"tokens": [1, 10**7]}, 400, "tokens"),
    "detokenize without tokens": ("/detokenize", {"model": BASE}, 400, None),
    "tokenize for an unknown model": ("/tokenize", {"model": "gpt-17", "prompt": "a"}, 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_carries_on(http, case):
    path, body, status, param = BAD_REQUESTS[case]
    r = _post(http, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    ok = _post(http, "/v1/completions", {"model": BASE, "prompt": "still here?", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_files_list_pages_orders_and_filters(client, tmp_path):
    for i in range(3):
        p = tmp_path / f"doc{i}.jsonl"
        p.write_text(json.dumps({"text": f"document {i}"}) + "\n")
        with open(p, "rb") as f:
            client.files.create(file=f, purpose="fine-tune")
    newest_first = [f.id for f in client.files.list().data]
    assert len(newest_first) >= 3
    first = client.files.list(limit=1)
    assert [f.id for f in first.data] == newest_first[:1] and first.has_more
    walked = [f.id for f in client.files.list(limit=2)]  # the client follows `after` page by page
    assert walked == newest_first
    assert [f.id for f in client.files.list(order="asc")] == newest_first[::-1]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == newest_first
    assert client.files.list(purpose="batch").data == []
    with pytest.raises(openai.BadRequestError):
        client.files.list(order="sideways")


def test_completions_max_tokens_omitted_or_null_is_openais_16(http):
    for extra in ({}, {"max_tokens": None}):
        r = http.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "ignore_eos": True, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
    nulls = {k: None for k in ("n", "stream", "logprobs", "top_logprobs", "temperature", "top_p", "stop", "seed",
                                "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "user")}
    r = http.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 3, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text  # null is OpenAI's default for each
    assert http.post("/v1/chat/completions", json={"model": None, "messages": CHAT}).status_code == 400  # required


def test_unknown_sampling_fields_are_400_and_min_p_and_repetition_penalty_work(client, http):
    """A sampling option the server does not implement is a 400 naming it, never silently ignored."""
    for extra in ({"guided_json": {"type": "object"}}, {"use_beam_search": True}, {"repetition_penalty": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=2, extra_body=extra)
        assert next(iter(extra)) in str(e.value)
    kw = dict(model=BASE, messages=CHAT, max_tokens=6, temperature=1.5, seed=4)
    greedy = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=6, temperature=0).choices[0].message.content
    # min_p = 1 keeps only the most likely token: greedy at any temperature
    assert client.chat.completions.create(**kw, extra_body={"min_p": 1.0}).choices[0].message.content == greedy
    r = client.chat.completions.create(**kw, extra_body={"repetition_penalty": 1.0}, metadata={"k": "v"})  # no-ops accepted
    assert r.choices[0].finish_reason in ("stop", "length")
    # a penalty far below 1 favours seen tokens so strongly (their positive logits x 1e6) that
    # greedy decoding picks only tokens of the prompt or of the answer so far; without it, the
    # random tiny model picks others
    prompt_ids = http.post("/tokenize", json={"model": BASE, "messages": CHAT}).json()["tokens"]
    seen = {http.post("/detokenize", json={"model": BASE, "tokens": [i]}).json()["prompt"] for i in set(prompt_ids)}
    long = dict(model=BASE, messages=CHAT, max_tokens=8, temperature=0, logprobs=True)
    plain = [t.token for t in client.chat.completions.create(**long).choices[0].logprobs.content]
    favoured = [t.token for t in client.chat.completions.create(**long, extra_body={"repetition_penalty": 1e-6}).choices[0].logprobs.content]
    assert not set(plain) <= seen
    assert all(t in seen or t in favoured[:i] for i, t in enumerate(favoured)), (favoured, seen)


def test_tokenize_and_detokenize_agree_with_the_tokenizer(http, hf_tokenizer):
    """vLLM's /tokenize (a prompt, or chat messages through the template) and /detokenize."""
    text = "Tokenize me, please: 12345."
    r = _post(http, "/tokenize", {"model": BASE, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    got = r.json()
    want = hf_tokenizer.encode(text)  # special tokens added, as vLLM's default
    assert got["tokens"] == want and got["count"] == len(want) and got["max_model_len"] > 0
    assert got["token_strs"] == hf_tokenizer.convert_ids_to_tokens(want)
    bare = _post(http, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False) != want
    chat = _post(http, "/tokenize", {"messages": CHAT}).json()
    rendered = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == hf_tokenizer.encode(rendered, add_special_tokens=False)
    back = _post(http, "/detokenize", {"model": BASE, "tokens": bare["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_api_key_is_required_everywhere_but_health(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as bare:
        assert bare.get("/health").status_code == 200
        assert bare.get("/ping").status_code == 200 and bare.post("/ping").status_code == 200
        assert bare.get("/version").json()["version"]
        for path in ("/v1/models", "/metrics"):
            r = bare.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = bare.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert client.models.list().data


def test_broken_training_files_are_rejected_with_line_numbers(client, http, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"messages": []}\n{"messages": [oops\n\n[1, 2]\n')
    with open(bad_json, "rb") as f, pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=f, purpose="fine-tune")
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    assert "line 2" in msg and "line 4" in msg
    # Valid JSON of no known format fails at job creation, naming the record's line.
    bad_records = tmp_path / "records.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad_records.write_text("\n".join(json.dumps(r) for r in (good, good, {"question": "q", "answer": "a"}, good)) + "\n")
    with open(bad_records, "rb") as f:
        fid = client.files.create(file=f, purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file=fid)
    assert "line 3" in str(e.value)
    # ... unless the fields are mapped (an extension hyperparameter); bad values are a 400 too.
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file=fid, hyperparameters={"n_epochs": -1})
    assert "n_epochs" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file=fid, extra_body={"lora": {"r": 64}})
    assert "max_lora_rank" in str(e.value)
    assert http.get("/health").status_code == 200


# ---- metrics and disconnects ---------------------------------------------------------------------
def test_metrics_parse_and_move_with_traffic(http, client):
    gen0 = metric(http, "vllm:generation_tokens_total")
    ttft0 = metric(http, "vllm:time_to_first_token_seconds_count")
    e404 = metric(http, "coserve:http_errors_total", status="404")
    client.completions.create(model=BASE, prompt="metrics", max_tokens=7, extra_body={"ignore_eos": True})
    assert metric(http, "vllm:generation_tokens_total") == gen0 + 7
    assert metric(http, "vllm:time_to_first_token_seconds_count") == ttft0 + 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert metric(http, "coserve:http_errors_total", status="404") == e404 + 1
    names = {f.name for f in text_string_to_metric_families(http.get("/metrics").text)}
    for n in ("vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:num_requests_running",
              "vllm:num_requests_waiting", "coserve:kv_cache_pages_used", "coserve:step_time_seconds",
              "coserve:finetune_tokens_per_second", "coserve:finetune_job_loss", "coserve:finetune_job_step"):
        assert n in names, n
    # vLLM's names, types and labels (its docs' metrics list), so a vLLM dashboard works
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    vllm = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
            "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
            "vllm:num_preemptions": "counter", "vllm:time_to_first_token_seconds": "histogram",
            "vllm:time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
            "vllm:request_queue_time_seconds": "histogram", "vllm:request_prompt_tokens": "histogram",
            "vllm:request_generation_tokens": "histogram"}
    for name, kind in vllm.items():
        assert families[name].type == kind, name
        assert families[name].samples and all(x.labels.get("model_name") == BASE for x in families[name].samples), name
    assert metric(http, "vllm:request_success_total", finished_reason="length", model_name=BASE) >= 1
    assert metric(http, "vllm:request_queue_time_seconds_count") >= 1


def test_n_choices_share_the_prompt_pages_in_the_prefix_cache(http, client, hf_tokenizer):
    """The n choices of a request are n sequences seeded seed + i that share the prompt's full KV
    pages; the hits show in vLLM's prefix-cache counters."""
    q0, h0 = metric(http, "vllm:prefix_cache_queries_total"), metric(http, "vllm:prefix_cache_hits_total")
    prompt = "Prefix caching test: " + " ".join(f"item{i}" for i in range(30))
    n_tok = len(hf_tokenizer(prompt)["input_ids"])
    shared = (n_tok - 1) // 16 * 16  # the full 16-token pages before the page of the last token
    assert shared >= 32
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=5, n=3, seed=11, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices) == 3
    # (the counters move after the step that admitted the choices)
    wait_until(lambda: metric(http, "vllm:prefix_cache_queries_total") - q0 == 3 * n_tok, timeout=10)
    assert metric(http, "vllm:prefix_cache_hits_total") - h0 == 2 * shared  # choices 1 and 2 reuse choice 0's pages
    assert "coserve:kv_cache_pages_cached" in {f.name for f in text_string_to_metric_families(http.get("/metrics").text)}
    # the same as three requests seeded 11, 12, 13
    alone = [client.completions.create(model=BASE, prompt=prompt, max_tokens=5, seed=11 + i, temperature=1.0,
                                       extra_body={"ignore_eos": True}).choices[0].text for i in range(3)]
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == alone


def test_client_disconnect_aborts_the_request_and_frees_its_pages(server, http):
    aborted0 = metric(http, "vllm:request_success_total", finished_reason="abort")
    body = {"model": BASE, "prompt": "a long story", "max_tokens": 256, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
        # leaving the block closes the connection mid-stream
    wait_until(lambda: metric(http, "vllm:request_success_total", finished_reason="abort") == aborted0 + 1, timeout=30)
    wait_until(lambda: metric(http, "vllm:num_requests_running") == 0 and metric(http, "coserve:kv_cache_pages_used") == 0, timeout=30)


def test_non_streaming_client_that_gives_up_is_aborted(server, http):
    aborted0 = metric(http, "vllm:request_success_total", finished_reason="abort")
    body = {"model": BASE, "prompt": "a long story", "max_tokens": 256, "n": 4, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post("/v1/completions", json=body)  # the client times out and closes its connection
    wait_until(lambda: metric(http, "vllm:request_success_total", finished_reason="abort") == aborted0 + 4, timeout=30)
    wait_until(lambda: metric(http, "vllm:num_requests_running") == 0 and metric(http, "coserve:kv_cache_pages_used") == 0, timeout=30)


# ---- shutdown (last: stops the server) --------------------------------------------------------------
def test_the_log_shows_start_up_requests_jobs_and_stats(server, client):
    """Runs late in this module (before the server is stopped): the server's log then holds the start-up compile progress, an
    access line per request, the finetuning job's lifecycle and the periodic stats line."""
    client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=2)
    wait_until(lambda: "Avg generation throughput" in server.output, timeout=30)
    out = server.output
    assert re.search(r"\[coserve_jax\.engine\] compiled step shape 1/\d+ \(T=\d+, S=\d+\) in [\d.]+ s", out), out[:3000]
    assert re.search(r'\[uvicorn\.access\] 127\.0\.0\.1:\d+ "POST /v1/chat/completions HTTP/1\.1" 200', out)
    job_lines = re.findall(r"\[coserve_jax\.serve\.jobs\] job (ftjob-\w+): (.*)", out)
    finished = {j for j, msg in job_lines if msg == "The job has successfully completed"}
    assert finished and all(any(m.startswith("Fine-tuning job started") for j2, m in job_lines if j2 == j) for j in finished)
    assert re.search(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
                     r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%", out)


def test_sigterm_checkpoints_running_jobs_and_exits_cleanly(server, client, tmp_path):
    with open(gsm8k_chat_file(tmp_path / "long.jsonl", 8), "rb") as f:
        fid = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=BASE, training_file=fid, hyperparameters={"max_steps": 100000})
    wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] >= 2, timeout=120)
    assert server.stop() == 0, server.output
    ckpt_dir = server.out_dir / "jobs" / job.id / "checkpoints"
    assert f"checkpoint written to {ckpt_dir}" in server.output
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 2

