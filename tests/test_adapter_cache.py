"""Adapter slots as a cache: unused adapters are parked on the host (LRU) when a slot is needed
and come back when a request names them, with the same outputs; slots in use are never taken;
finished jobs' adapters never exhaust the slots.

"The same outputs": the same tokens and logprobs to 1e-6 (float32 rounding: the reference
attention's grouped product runs over as many sequence slots as the step uses, so a request's
numbers move in the last bits with how many others share its step)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_sequences

from coserve_jax import Engine, SamplingParams
from coserve_jax.__main__ import _random_adapter
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import JobStatus
from coserve_jax.lora.manager import AdapterError
from coserve_jax.lora.peft_io import write_peft

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
    assert outs[0].token_ids == first.token_ids
    np.testing.assert_allclose(outs[0].logprobs, first.logprobs, rtol=1e-6, atol=1e-6)
    assert outs[1].token_ids != outs[0].token_ids or outs[1].logprobs != outs[0].logprobs
    again = eng.generate([prompt], GREEDY, adapter="b", use_tqdm=False)[0]  # "b" back, parking "a" (used before "c")
    assert list(eng.adapter_cache.parked) == ["a"] and again.token_ids
    for name in "abc":
        eng.unload_adapter(name)
    assert eng.list_adapters() == []


def test_adapters_in_use_are_never_parked_and_a_request_waits_for_a_slot(engine):
    eng, hf = engine
    for i, name in enumerate(("x", "y", "z")):
        eng.load_adapter(name, _random_adapter(eng.config, 4, ("q_proj",), seed=30 + i))
    prompt = random_sequences([9], hf.config.vocab_size, seed=6)[0]
    alone = eng.generate([prompt], GREEDY, adapter="x", use_tqdm=False)[0]
    long = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [eng.add_request(prompt, long, adapter=a) for a in ("y", "z")]  # "x" parked, both slots pinned
    assert "x" in eng.adapter_cache.parked
    waiting = eng.add_request(prompt, GREEDY, adapter="x")  # no error: it waits for a slot
    finished = {}
    steps_before_x = 0
    while eng.has_unfinished:
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
        if waiting not in finished and "x" in eng.adapter_cache.parked:
            steps_before_x += 1
            assert sorted(eng.adapters.names) == ["y", "z"]  # neither pinned adapter was parked for it
    assert steps_before_x >= 10  # it waited for a request on "y" or "z" to finish
    assert all(len(finished[r].token_ids) == 12 for r in ids)
    out = finished[waiting]
    assert out.token_ids == alone.token_ids
    np.testing.assert_allclose(out.logprobs, alone.logprobs, rtol=1e-6, atol=1e-6)
    with pytest.raises(AdapterError, match="no adapter named|unknown|not loaded"):
        eng.add_request(prompt, GREEDY, adapter="nope")  # an unknown name is still an error
    for name in ("x", "y", "z"):
        eng.unload_adapter(name)


def test_a_waiting_request_pins_its_adapter_name_and_can_be_aborted(engine):
    eng, hf = engine
    for i, name in enumerate(("p", "q", "r")):
        eng.load_adapter(name, _random_adapter(eng.config, 4, ("q_proj",), seed=40 + i))
    prompt = random_sequences([9], hf.config.vocab_size, seed=7)[0]
    ids = [eng.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True), adapter=a) for a in ("q", "r")]
    waiting = eng.add_request(prompt, GREEDY, adapter="p")
    with pytest.raises(AdapterError, match="in use by 1 unfinished"):
        eng.unload_adapter("p")  # parked, but a request waits for it
    assert eng.abort(waiting).finish_reason == "abort"
    eng.unload_adapter("p")
    while eng.has_unfinished:
        eng.step()
    for rid in ids:
        assert eng.scheduler.abort(rid) is None
    for name in ("q", "r"):
        eng.unload_adapter(name)


def test_max_cpu_loras_drops_host_copies_that_are_on_disk(engine, tmp_path):
    eng, hf = engine
    prompt = random_sequences([11], hf.config.vocab_size, seed=9)[0]
    firsts = {}
    eng.adapter_cache.max_cpu_loras = 1
    try:
        for i, name in enumerate("defg"):
            path = tmp_path / name
            write_peft(_random_adapter(eng.config, 4, ("q_proj", "o_proj"), seed=50 + i), path, eng.config.num_layers)
            eng.load_adapter(name, path)
            firsts[name] = eng.generate([prompt], GREEDY, adapter=name, use_tqdm=False)[0]
        # two in slots, two parked: one host copy kept (the most recently used), one on disk only
        assert list(eng.adapter_cache.parked) == ["d", "e"]
        assert eng.adapter_cache.parked["d"] is None and eng.adapter_cache.parked["e"] is not None
        assert eng.adapter_cache.num_cpu_loras == 1
        # an adapter with no directory is never dropped
        eng.load_adapter("mem", _random_adapter(eng.config, 4, ("q_proj",), seed=59))
        assert all(w is not None for n, w in eng.adapter_cache.parked.items() if n not in eng.adapter_cache.sources)
        for name in "defg":  # each back from host or disk, answering as before
            out = eng.generate([prompt], GREEDY, adapter=name, use_tqdm=False)[0]
            assert out.token_ids == firsts[name].token_ids, name
            np.testing.assert_allclose(out.logprobs, firsts[name].logprobs, rtol=1e-6, atol=1e-6, err_msg=name)
    finally:
        eng.adapter_cache.max_cpu_loras = None
        for name in list(eng.list_adapters()):
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
    outs = [eng.generate([prompt], GREEDY, adapter=f"job{k}", use_tqdm=False)[0] for k in range(5)]
    assert all(len(o.token_ids) == 5 for o in outs)
    # each answers with its own trained weights (greedy logprobs differ between jobs)
    assert len({tuple(o.logprobs) for o in outs}) == 5
    # three adapters at once on two slots: the third request waits for a slot, then answers the same
    batch = eng.generate([prompt] * 3, GREEDY, adapter=["job0", "job1", "job2"], use_tqdm=False)
    np.testing.assert_allclose([o.logprobs for o in batch], [o.logprobs for o in outs[:3]], rtol=1e-6, atol=1e-6)
