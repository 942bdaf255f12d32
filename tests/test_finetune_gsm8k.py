"""Real data: a tiny model with the real Llama-3 tokenizer and chat template finetunes on GSM8K
(../shared/data) while the same engine serves chat requests, and the training loss falls."""

import itertools
import json

import numpy as np
import pytest
from conftest import FAMILIES, TINY, shared_data

from coserve_jax import Engine, SamplingParams
from coserve_jax.finetune.data import DataValidationError
from coserve_jax.finetune.job import JobStatus
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models import ModelConfig, init_random
from coserve_jax.tokenizer import encode_chat, load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok_dir = shared_data("tokenizers", "llama3")
    train = shared_data("finetune", "gsm8k", "train.jsonl")
    tok = load_tokenizer(tok_dir)
    spec = {**TINY, **FAMILIES["llama32"], "vocab_size": len(tok), "max_position_embeddings": 1024, "initializer_range": 0.2,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "torch_dtype": "float32"}
    model = init_random(ModelConfig.from_hf_dict(spec), seed=0, dtype="float32", lora=LoRAPoolConfig(2, 8))
    engine = Engine(
        model, tokenizer=tok_dir, max_num_seqs=8, max_num_batched_tokens=128, num_kv_pages=160,
        token_buckets=(32, 128), seq_buckets=(8,), compilation_cache_dir=None,
        finetune_max_seq_len=512, finetune_seq_buckets=(256, 512),
    )
    tmp = tmp_path_factory.mktemp("gsm8k")
    subset = tmp / "train.jsonl"
    with open(train) as f:
        subset.write_text("".join(itertools.islice(f, 48)))
    return engine, tok, subset, tmp


def test_gsm8k_loss_falls_while_serving(setup):
    engine, tok, subset, _ = setup
    job = engine.create_finetuning_job(
        subset, columns={"prompt": "question", "completion": "answer"}, chat_template=True,
        lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, learning_rate=2e-2, warmup_steps=3,
        max_steps=36, gradient_accumulation_steps=1, adapter_name="gsm8k",
    )
    assert len(job.examples) == 48
    first = job.examples[0]
    text = tok.decode([t for t, m in zip(first.token_ids, first.loss_mask) if m])
    assert text.startswith("Natalia sold 48/2") or "####" in text  # loss on the assistant answer only
    questions = [json.loads(line)["question"] for line in subset.read_text().splitlines()[:12]]
    served, pending, on_adapter = 0, [], 0
    params = SamplingParams(max_tokens=12, temperature=0)
    while not job.done:
        if len(pending) < 3 and questions:
            adapter = "gsm8k" if len(questions) % 2 else None  # half of them use the adapter under training
            on_adapter += adapter is not None
            pending.append(engine.add_request(encode_chat(tok, [{"role": "user", "content": questions.pop()}]), params, adapter))
        for o in engine.step():
            if o.finished:
                pending.remove(o.request_id)
                served += 1
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert served >= 10 and on_adapter >= 5, "requests (some on the job's adapter) were served while the job trained"
    losses = np.array([r.loss for r in job.loss_history])
    assert len(losses) == 36 and np.isfinite(losses).all()
    assert losses[-6:].mean() < losses[:6].mean() - 0.5, losses
    # the adapter under training is served by name
    [out] = engine.generate([encode_chat(tok, [{"role": "user", "content": "What is 2 + 3?"}])], params, adapter="gsm8k")
    assert len(out.token_ids) == 12
    assert job.tokens_per_s > 0


def test_bad_training_file_fails_up_front_with_line_numbers(setup):
    engine, _, subset, tmp = setup
    lines = subset.read_text().splitlines()[:3]
    bad = tmp / "bad.jsonl"
    bad.write_text("\n".join([lines[0], '{"question": "no answer"}', "{not json", lines[1], '{"question": 1, "answer": "x"}']) + "\n")
    before = (engine.list_adapters(), engine.finetuning_jobs)
    with pytest.raises(DataValidationError) as e:
        engine.create_finetuning_job(bad, columns={"prompt": "question", "completion": "answer"}, chat_template=True)
    assert [line for line, _ in e.value.errors] == [2, 3, 5]
    assert (engine.list_adapters(), engine.finetuning_jobs) == before
