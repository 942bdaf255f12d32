"""Engine end to end against `transformers` generate (greedy) and `peft`, on tiny checkpoints.

32 concurrent prompts of 1..300 tokens run with a 64-token step budget (prompts above it are
prefilled in chunks) and a KV cache of 40 pages of 16 tokens for up to 16 running sequences (it
runs out, so requests are preempted and recomputed), with no compilation after start-up.
"""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_peft_adapter, random_sequences, shared_data

from coserve_jax import Engine, SamplingParams
from coserve_jax.compile_counter import CompileCounter
from coserve_jax.lora.manager import AdapterError

ENGINE_KW = dict(
    dtype="float32", max_num_seqs=16, max_num_batched_tokens=64, page_size=16, num_kv_pages=40,
    token_buckets=(16, 64), seq_buckets=(4, 16), max_loras=2, max_lora_rank=8, compilation_cache_dir=None,
    max_finetune_jobs=0,  # (inference only: no finetuning executables to compile)
)
MAX_TOKENS = 12


def prompts_1_to_300(vocab, seed=0):
    lengths = np.random.default_rng(seed).integers(1, 301, size=32)
    lengths[:2] = [1, 300]
    return random_sequences(lengths, vocab, seed)


def hf_greedy(model, prompt, max_new_tokens=MAX_TOKENS):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def engines(hf_checkpoint):
    cache = {}

    def get(family):
        if family not in cache:
            path, hf = hf_checkpoint(family)
            cache[family] = (Engine(path, **ENGINE_KW), hf)
        return cache[family]

    return get


# Llama-3.1 in the default suite; the other families (Qwen2's q/k/v bias and tied embeddings
# among them, whose logits test_model_vs_hf checks against transformers) in the slow tier.
@pytest.mark.parametrize("family", [f if f == "llama31" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)])
def test_greedy_matches_transformers(engines, family):
    engine, hf = engines(family)
    prompts = prompts_1_to_300(hf.config.vocab_size)
    preempted_before = engine.num_preemptions
    with CompileCounter() as compiles:
        outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2))
    assert compiles.requests == 0, f"{compiles.requests} compilations after warm-up"
    assert engine.num_preemptions > preempted_before, "the page pool was meant to force preemption"
    assert any(o.num_preemptions for o in outs)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p), f"prompt of {len(p)} tokens"
        assert o.finish_reason in ("stop", "length")
    # logprobs of the chosen tokens = log_softmax of transformers' logits at those positions
    for p, o in zip(prompts[:4], outs[:4]):
        with torch.no_grad():
            logits = hf(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1 : -1]
        ref = torch.log_softmax(logits.double(), -1)
        np.testing.assert_allclose(o.logprobs, ref[np.arange(len(o.token_ids)), o.token_ids].numpy(), atol=1e-4)
        assert len(o.top_logprobs) == len(o.token_ids) and all(len(t) == 2 for t in o.top_logprobs)
        assert all(o.token_ids[i] in t for i, t in enumerate(o.top_logprobs))  # greedy: chosen is top-1
    sched = engine.scheduler
    sched.kv_cache.check_invariants()
    assert sched.kv_cache.num_used_pages == 0 and not sched.has_unfinished


def test_repetition_penalty_matches_transformers(engines):
    """``repetition_penalty`` against ``generate(repetition_penalty=...)`` (its
    ``RepetitionPenaltyLogitsProcessor``), greedy, with penalized and plain requests in the same
    steps, prompts prefilled in chunks and preemption (the seen-token mask is rebuilt)."""
    engine, hf = engines("llama31")
    prompts = prompts_1_to_300(hf.config.vocab_size, seed=5)[:16]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.5 if i % 2 == 0 else 1.0, logprobs=0)
              for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    changed = 0
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                              repetition_penalty=params[i].repetition_penalty)[0, len(p):].tolist()
        assert o.token_ids == ref, f"prompt {i} ({len(p)} tokens), penalty {params[i].repetition_penalty}"
        if i % 2 == 0:
            changed += o.token_ids != hf_greedy(hf, p)
    assert changed >= 2, "the penalty was meant to change some greedy outputs"
    # logprobs stay the raw model's (vLLM's raw_logprobs): those of the chosen tokens under the unpenalized logits
    p, o = prompts[0], outs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1 : -1]
    ref = torch.log_softmax(logits.double(), -1)
    np.testing.assert_allclose(o.logprobs, ref[np.arange(len(o.token_ids)), o.token_ids].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


def test_adapters_match_peft(engines, tmp_path_factory):
    """Some requests on adapter a, some on b, the rest on the base model, all in the same steps."""
    engine, hf = engines("llama31")
    specs = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             "b": dict(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], use_rslora=True)}
    peft_models = {}
    for i, (name, spec) in enumerate(specs.items()):
        out = tmp_path_factory.mktemp(f"engine_adapter_{name}")
        peft_models[name] = make_peft_adapter(hf, spec, seed=10 + i, out_dir=out, scale=0.2)
        engine.load_adapter(name, out)
    prompts = prompts_1_to_300(hf.config.vocab_size, seed=1)
    names = [("a", "b", None)[i % 3] for i in range(len(prompts))]
    with CompileCounter() as compiles:
        outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), adapter=names)
    assert compiles.requests == 0
    differs = 0
    for p, n, o in zip(prompts, names, outs):
        ref = hf_greedy(peft_models[n] if n else hf, p)
        assert o.token_ids == ref, f"adapter {n}, prompt of {len(p)} tokens"
        assert o.adapter == n
        differs += n is not None and ref != hf_greedy(hf, p)
    assert differs > 0, "the adapters should change some generations"
    with pytest.raises(AdapterError, match="no adapter named"):
        engine.generate([[1, 2, 3]], adapter="missing")
    assert not engine.has_unfinished
    engine.unload_adapter("a")
    engine.unload_adapter("b")


def test_seeded_sampling_reproduces_whatever_the_batch(engines):
    engine, hf = engines("llama31")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    prompt = random_sequences([37], hf.config.vocab_size, seed=5)[0]
    alone = engine.generate([prompt], params)[0].token_ids
    others = prompts_1_to_300(hf.config.vocab_size, seed=2)[:20]  # a crowd that forces chunking/preemption
    crowd = [SamplingParams(max_tokens=15, temperature=1.0) for _ in others]
    outs = engine.generate(others[:7] + [prompt] + others[7:], crowd[:7] + [params] + crowd[7:])
    assert outs[7].token_ids == alone
    again = engine.generate([prompt], params)[0].token_ids
    assert again == alone
    # vLLM's priority: the last of 21 prompts, at priority 0 (the others at 1), is admitted
    # first (in FCFS order it would wait for the others' prefills) and samples the same tokens
    prios = engine.generate(others + [prompt], crowd + [params], priority=[1] * len(others) + [0])
    assert prios[-1].token_ids == alone
    assert prios[-1].first_scheduled_time <= min(o.first_scheduled_time for o in prios[:-1])
    with pytest.raises(ValueError, match="priorities"):
        engine.generate([prompt], params, priority=[0, 1])
    other_seed = engine.generate([prompt], SamplingParams(**{**params.__dict__, "seed": 4321}))[0].token_ids
    assert other_seed != alone
    # min_p = 1 keeps only the most likely token: sampling at any temperature is then greedy,
    # beside requests without min-p in the same steps
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    mixed = engine.generate([prompt, prompt], [SamplingParams(max_tokens=12, temperature=1.5, min_p=1.0, seed=9),
                                               SamplingParams(max_tokens=12, temperature=1.5, seed=9)])
    assert mixed[0].token_ids == greedy and mixed[1].token_ids != greedy


def test_bad_requests_fail_alone(engines):
    engine, hf = engines("llama31")  # (the engine the parity tests built: bad input is model-independent)
    with pytest.raises(ValueError, match="context length"):
        engine.generate([[1] * 600])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 2, hf.config.vocab_size]])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate(["text"])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    # a batch with one bad prompt queues nothing
    with pytest.raises(ValueError):
        engine.generate([[1, 2], [1] * 600])
    assert not engine.has_unfinished
    assert engine.generate([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids


def test_stream_abort_frees_pages(engines):
    engine, hf = engines("llama31")  # (the engine the parity tests built)
    prompts = random_sequences([50, 5, 120], hf.config.vocab_size, seed=3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    full = engine.generate(prompts, params)
    got = {i: [] for i in range(3)}
    for o in engine.stream(prompts, params):
        got[o.index] += o.delta_token_ids
    assert [got[i] for i in range(3)] == [o.token_ids for o in full]
    it = engine.stream(prompts, params)
    next(it)
    it.close()  # early close aborts the rest
    assert not engine.has_unfinished and engine.scheduler.kv_cache.num_used_pages == 0


@pytest.fixture(scope="module")
def text_engine():
    path = shared_data("models", "llama2_tiny_random")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(path, **{**ENGINE_KW, "max_model_len": 512, "max_loras": 0})
    return engine, hf


def test_chat_renders_the_template_and_generates(text_engine):
    """Engine.chat (vLLM's LLM.chat): one conversation or several, rendered by the tokenizer's
    chat template, generate as the rendered token ids do."""
    engine, hf = text_engine
    tok = engine.tokenizer
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    try:
        conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        [one] = engine.chat(conv, params)
        ids = tok.encode("<system>Be brief.\n<user>Say hi\n<assistant>", add_special_tokens=False)
        assert one.prompt_token_ids == ids and one.token_ids == engine.generate([ids], params)[0].token_ids
        two = engine.chat([conv, conv[1:]], params, add_generation_prompt=False)
        assert two[1].prompt_token_ids == tok.encode("<user>Say hi\n", add_special_tokens=False)
    finally:
        tok.chat_template = saved
    with pytest.raises(ValueError, match="chat template"):
        engine.chat(conv, params)


def test_text_prompts_streaming_and_stop_strings(text_engine):
    engine, hf = text_engine
    tok = engine.tokenizer
    prompts = ["Once upon a time", "The capital of France is", "def fib(n):"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for p, o in zip(prompts, outs):
        ids = tok(p)["input_ids"]
        assert o.prompt_token_ids == ids
        assert o.token_ids == hf_greedy(hf, ids, 24)
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    streamed = {i: "" for i in range(3)}
    for o in engine.stream(prompts, params):
        streamed[o.index] += o.delta_text
    assert [streamed[i] for i in range(3)] == [o.text for o in outs]
    # A stop string taken from the middle of the first output cuts the text before it.
    text = outs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    (o,) = engine.generate([prompts[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "zzzzqqq"]))
    assert o.finish_reason == "stop" and o.text == text[:cut]
    assert len(o.token_ids) < 24
    (o2,) = engine.generate(
        [prompts[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    )
    assert o2.text == text[: cut + len(stop)]
    streamed = "".join(x.delta_text for x in engine.stream([prompts[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])))
    assert streamed == text[:cut]
