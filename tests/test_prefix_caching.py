"""Automatic prefix caching and parallel sampling in the engine, on a tiny Llama-3.1 checkpoint.

Outputs (greedy tokens and logprobs, seeded samples) are the same with and without the prefix
cache across shared prefixes, preemption, aborts and adapters; an adapter that took an optimizer
step never reuses pages computed with its older weights (counted in cache hits, with a control
that hits); ``n`` samples equal ``n`` requests seeded ``seed + i``.
"""

import numpy as np
import pytest
from conftest import make_peft_adapter, random_sequences

from coserve_jax import Engine, SamplingParams
from coserve_jax.compile_counter import CompileCounter
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import JobStatus

ENGINE_KW = dict(
    dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, page_size=16, num_kv_pages=22,
    token_buckets=(16, 64), max_loras=2, max_lora_rank=8, compilation_cache_dir=None, max_finetune_jobs=0,
)


@pytest.fixture(scope="module")
def pair(hf_checkpoint, tmp_path_factory):
    """Two engines on the same checkpoint, prefix caching on and off, both with adapter "a"."""
    path, hf = hf_checkpoint("llama31")
    adapter = tmp_path_factory.mktemp("adapter")
    make_peft_adapter(hf, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=2, out_dir=adapter)
    on, off = Engine(path, **ENGINE_KW), Engine(path, **ENGINE_KW, enable_prefix_caching=False)
    for e in (on, off):
        e.load_adapter("a", adapter)
    return on, off, hf.config.vocab_size


def workload(vocab, seed=0):
    """Prompts made of two shared system prefixes (70 and 37 tokens) and short distinct tails;
    some repeated exactly; greedy with logprobs and seeded sampling; base model and adapter."""
    rng = np.random.default_rng(seed)
    systems = random_sequences([70, 37], vocab, seed + 1)
    prompts, params, adapters = [], [], []
    for i in range(14):
        tail = rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist()
        prompts.append(systems[i % 2] + tail)
        if i % 3 == 2:
            prompts.append(list(prompts[-1]))  # the same prompt again
        for _ in range(len(prompts) - len(params)):
            k = len(params)
            params.append(SamplingParams(max_tokens=10, temperature=0, logprobs=2) if k % 2 == 0
                          else SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=k, logprobs=0))
            adapters.append("a" if k % 4 == 1 else None)
    return prompts, params, adapters


def assert_same(outs_on, outs_off):
    for x, y in zip(outs_on, outs_off):
        assert x.token_ids == y.token_ids, (x.request_id, x.token_ids, y.token_ids)
        assert x.finish_reason == y.finish_reason
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)
        if x.top_logprobs:
            for a, b in zip(x.top_logprobs, y.top_logprobs):
                assert a.keys() == b.keys()
                np.testing.assert_allclose(list(a.values()), [b[k] for k in a], atol=1e-5, rtol=0)


def test_outputs_equal_without_caching_across_preemption_and_adapters(pair):
    on, off, vocab = pair
    prompts, params, adapters = workload(vocab)
    kv = on.scheduler.kv_cache
    hits0, pre0 = kv.prefix_cache_hits, on.num_preemptions
    with CompileCounter() as compiles:
        first = on.generate(prompts, params, adapters, use_tqdm=False)
        second = on.generate(prompts, params, adapters, use_tqdm=False)  # now also hits what the first run cached
    assert compiles.requests == 0
    ref = off.generate(prompts, params, adapters, use_tqdm=False)
    assert_same(first, ref)
    assert_same(second, ref)
    assert on.num_preemptions > pre0, "the small page pool was meant to force preemption"
    assert kv.prefix_cache_hits - hits0 >= 16 * len(prompts), "shared prefixes were meant to hit"
    assert off.scheduler.kv_cache.prefix_cache_hits == 0 and off.scheduler.kv_cache.num_cached_pages == 0
    kv.check_invariants()
    assert kv.num_used_pages == 0 and kv.num_cached_pages > 0  # every page back, cached ones kept for reuse


def test_pages_are_not_shared_across_adapters(pair):
    on, _, vocab = pair
    kv = on.scheduler.kv_cache
    [prompt] = random_sequences([50], vocab, seed=9)  # 3 full pages can be shared
    greedy = SamplingParams(max_tokens=4, temperature=0)
    on.generate([prompt], greedy, use_tqdm=False)
    hits = kv.prefix_cache_hits
    on.generate([prompt], greedy, adapter="a", use_tqdm=False)
    assert kv.prefix_cache_hits == hits, "the adapter's request reused base-model pages"
    on.generate([prompt], greedy, adapter="a", use_tqdm=False)
    assert kv.prefix_cache_hits == hits + 48  # (control) its own pages are reused


def test_aborts_leave_the_others_equal_and_every_page_free(pair):
    on, off, vocab = pair
    prompts, params, adapters = workload(vocab, seed=5)
    results = []
    for e in (on, off):
        ids = [e.add_request(p, sp, a) for p, sp, a in zip(prompts, params, adapters)]
        done, aborted = {}, set(ids[1::4])
        for step in range(400):
            if step == 6:
                for rid in aborted:
                    e.abort(rid)
            for o in e.step():
                if o.finished:
                    done[o.request_id] = o
            e.scheduler.kv_cache.check_invariants()
            if not e.has_unfinished and not e.has_step_in_flight:
                break
        results.append([done[r] for r in ids if r not in aborted])
        assert e.scheduler.kv_cache.num_used_pages == 0
    assert_same(*results)


def test_parallel_sampling_equals_seeded_requests_and_shares_the_prompt(pair):
    on, off, vocab = pair
    [prompt] = random_sequences([70], vocab, seed=11)  # 4 full pages
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=100, logprobs=1, n=4)
    kv = on.scheduler.kv_cache
    hits = kv.prefix_cache_hits
    [out] = on.generate([prompt], params, use_tqdm=False)
    assert kv.prefix_cache_hits - hits >= 3 * 64, "the children were meant to share the prompt's pages"
    assert out.finished and len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    single = [SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=100 + i, logprobs=1) for i in range(4)]
    ref = off.generate([prompt] * 4, single, use_tqdm=False)
    for c, r in zip(out.outputs, ref):
        assert c.token_ids == r.token_ids and c.finish_reason == r.finish_reason and c.finished
        np.testing.assert_allclose(c.logprobs, r.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "four seeds gave one sample"
    assert out.token_ids == out.outputs[0].token_ids  # the top-level fields are completion 0's
    # n = 1 keeps its fields, and outputs views them
    [one] = on.generate([prompt], single[0], use_tqdm=False)
    assert one.completions is None and one.outputs[0].token_ids == one.token_ids == ref[0].token_ids
    # streaming and abort of the whole request
    rid = on.add_request(prompt, SamplingParams(max_tokens=50, temperature=1.0, n=3, ignore_eos=True))
    for _ in range(4):
        on.step()
    final = on.abort(rid)
    assert final.finished and all(c.finish_reason == "abort" for c in final.outputs)
    while on.has_unfinished or on.has_step_in_flight:
        on.step()
    assert on.scheduler.kv_cache.num_used_pages == 0
    with pytest.raises(ValueError, match="SamplingParams.n"):
        SamplingParams(n=0)


def training_examples(vocab):
    seqs = random_sequences([40, 60, 30, 50], vocab, seed=21)
    return [TrainingExample(tuple(s), tuple([False] * 5 + [True] * (len(s) - 5)), i + 1) for i, s in enumerate(seqs)]


def test_an_optimizer_step_retires_the_adapters_cached_pages(hf_checkpoint):
    """A request on the adapter being trained reuses its cached prompt pages while the adapter is
    unchanged (control), and reuses none after an optimizer step wrote new weights."""
    path, hf = hf_checkpoint("llama31")
    kw = dict(ENGINE_KW, max_finetune_jobs=1, finetune_max_seq_len=64, max_finetune_tokens=32, finetune_seq_buckets=(64,),
              num_kv_pages=80)
    eng = Engine(path, **kw)
    kv = eng.scheduler.kv_cache
    job = eng.create_finetuning_job(training_examples(hf.config.vocab_size), adapter_name="train", max_steps=20,
                                    learning_rate=5e-2, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})

    def settle():  # pause the job and let its sequences in flight finish
        job.pause()
        for _ in range(60):
            eng.step()
        assert not eng.scheduler.training

    while job.step < 1:
        eng.step()
    settle()
    [prompt] = random_sequences([50], hf.config.vocab_size, seed=3)
    greedy = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    first = eng.generate([prompt], greedy, adapter="train", use_tqdm=False)[0]
    hits = kv.prefix_cache_hits
    again = eng.generate([prompt], greedy, adapter="train", use_tqdm=False)[0]
    assert kv.prefix_cache_hits - hits == 48, "control: the unchanged adapter's pages are reused"
    assert again.token_ids == first.token_ids
    step = job.step
    job.resume()
    while job.step == step:
        eng.step()
    settle()
    hits = kv.prefix_cache_hits
    eng.generate([prompt], greedy, adapter="train", use_tqdm=False)
    assert kv.prefix_cache_hits == hits, "pages computed with the adapter's older weights were reused"
    job.cancel()
    assert job.status is JobStatus.CANCELLED
