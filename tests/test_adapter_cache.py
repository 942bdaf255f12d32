"""Adapter slots as a cache: unused adapters are parked on the host (LRU) when a slot is needed
and come back when a request names them, with the same outputs; slots in use are never taken;
finished jobs' adapters never exhaust the slots."""

from __future__ import annotations

import pytest
from conftest import random_sequences

from coserve_jax import Engine, SamplingParams
from coserve_jax.__main__ import _random_adapter
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import JobStatus
from coserve_jax.lora.manager import AdapterError

KW = dict(
    dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, page_size=16, num_kv_pages=64, token_buckets=(32,),
    seq_buckets=(4,), max_loras=2, max_lora_rank=4, compilation_cache_dir=None, finetune_max_seq_len=64,
    max_finetune_tokens=16, finetune_seq_buckets=(64,),
)
GREEDY = SamplingParams(max_tokens=5, temperature=0, logprobs=2)


@pytest.fixture(scope="module")
def engine(hf_checkpoint):
    path, hf = hf_checkpoint("llama31")
    return Engine(path, **KW), hf


def test_parked_adapters_come_back_with_the_same_outputs(engine):
    eng, hf = engine
    prompt = random_sequences([21], hf.config.vocab_size, seed=4)[0]
    for i, name in enumerate("abc"):
        eng.load_adapter(name, _random_adapter(eng.config, 4, ("q_proj", "v_proj"), seed=20 + i))
        if name == "a":
            first = eng.generate([prompt], GREEDY, adapter="a", use_tqdm=False)[0]
    # two slots, three adapters: "a" (least recently used) was parked when "c" came
    assert sorted(eng.list_adapters()) == ["a", "b", "c"] and list(eng.adapter_cache.parked) == ["a"]
    outs = eng.generate([prompt] * 3, GREEDY, adapter=["a", "c", None], use_tqdm=False)  # "a" back, "b" parked
    assert list(eng.adapter_cache.parked) == ["b"]
    assert outs[0].token_ids == first.token_ids and outs[0].logprobs == first.logprobs
    assert outs[1].token_ids != outs[0].token_ids or outs[1].logprobs != outs[0].logprobs
    again = eng.generate([prompt], GREEDY, adapter="b", use_tqdm=False)[0]  # "b" back, parking "a" (used before "c")
    assert list(eng.adapter_cache.parked) == ["a"] and again.token_ids
    for name in "abc":
        eng.unload_adapter(name)
    assert eng.list_adapters() == []


def test_adapters_in_use_are_never_parked(engine):
    eng, hf = engine
    for i, name in enumerate(("x", "y", "z")):
        eng.load_adapter(name, _random_adapter(eng.config, 4, ("q_proj",), seed=30 + i))
    prompt = random_sequences([9], hf.config.vocab_size, seed=6)[0]
    ids = [eng.add_request(prompt, SamplingParams(max_tokens=30, ignore_eos=True), adapter=a) for a in ("y", "z")]
    with pytest.raises(AdapterError, match="in use by unfinished requests"):  # both slots pinned
        eng.add_request(prompt, SamplingParams(max_tokens=2), adapter="x")
    for rid in ids:
        eng.abort(rid)
    eng.add_request(prompt, SamplingParams(max_tokens=2), adapter="x")  # now it can come back
    while eng.has_unfinished:
        eng.step()
    for name in ("x", "y", "z"):
        eng.unload_adapter(name)


def test_more_jobs_than_slots_all_succeed_and_answer(engine):
    eng, hf = engine
    exs = [TrainingExample(tuple(ids), (False,) + (True,) * (len(ids) - 1), 1)
           for ids in random_sequences([30, 45], hf.config.vocab_size, seed=2)]
    jobs = []
    for k in range(5):  # five jobs in a row on two slots
        job = eng.create_finetuning_job(exs, adapter_name=f"job{k}", max_steps=1, seed=k, lora={"r": 4, "target_modules": ["q_proj"]})
        eng.wait_for(job, use_tqdm=False)
        assert job.status is JobStatus.SUCCEEDED
        jobs.append(job)
    assert sorted(eng.list_adapters()) == [f"job{k}" for k in range(5)]
    prompt = random_sequences([12], hf.config.vocab_size, seed=8)[0]
    # one at a time: a batch naming more parked adapters than there are slots is refused (below)
    outs = [eng.generate([prompt], GREEDY, adapter=f"job{k}", use_tqdm=False)[0] for k in range(5)]
    assert all(len(o.token_ids) == 5 for o in outs)
    # each answers with its own trained weights (greedy logprobs differ between jobs)
    assert len({tuple(o.logprobs) for o in outs}) == 5
    with pytest.raises(AdapterError, match="in use"):  # three adapters at once on two slots
        eng.generate([prompt] * 3, GREEDY, adapter=["job0", "job1", "job2"], use_tqdm=False)
    assert not eng.has_unfinished  # all or nothing
