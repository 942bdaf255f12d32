"""The real model, SmolLM2-135M-Instruct as a Q4_1 GGUF file (../shared/data/models/): our
loader and engine against `transformers` loading the same file (logits, greedy generation), and
the tokenizer and chat template against the file's own metadata."""

import os

import jinja2
import pytest
import torch
from conftest import our_logits, rel_err, shared_data

from coserve_jax import Engine, SamplingParams
from coserve_jax.tokenizer import render_chat

GGUF = ("models", "smollm2_135m_instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "84."},
     {"role": "user", "content": "And 13 times 7?"}],
]


@pytest.fixture(scope="module")
def path():
    return shared_data(*GGUF)


@pytest.fixture(scope="module")
def engine(path):
    # A 16-token step budget: every prompt (35-60 tokens) is prefilled in chunks, all four at once.
    return Engine(path, dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=16,
                  token_buckets=(16,), seq_buckets=(4,), max_loras=0, max_finetune_jobs=0, compilation_cache_dir=None)


@pytest.fixture(scope="module")
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(render_chat(engine.tokenizer, c), add_special_tokens=False) for c in CONVERSATIONS]


def test_config_from_metadata(engine):
    c = engine.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.rope_theta == 100000.0
    assert engine.eos_token_ids == frozenset({2})


def test_logits_match_transformers(engine, hf_model, prompts):
    ours = our_logits(engine.model, prompts, pad_to=256)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0].numpy()
        assert rel_err(o, ref) <= 1e-4


def test_greedy_generation_matches_transformers(engine, hf_model, prompts):
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert o.token_ids == ref[0, len(p):].tolist()
    assert "Paris" in outs[0].text
    assert any(o.finish_reason == "stop" for o in outs)


def _metadata(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: r.fields[k].contents() for k in ("tokenizer.chat_template", "tokenizer.ggml.tokens",
                                                 "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")}


def _bytes_to_unicode():
    """GPT-2's byte <-> printable-character table (openai/gpt-2 ``encoder.py``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_tokenizer_and_template_follow_the_file(engine, path):
    """Rendering = the file's Jinja template rendered by jinja2 itself (as transformers' sandbox
    sets it up); the token ids, spelled with the file's own vocabulary, give back the text."""
    meta = _metadata(path)
    tok = engine.tokenizer
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    template = env.from_string(meta["tokenizer.chat_template"])
    vocab = meta["tokenizer.ggml.tokens"]
    assert len(tok) == len(vocab) == 49152
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    special = {vocab[meta["tokenizer.ggml.bos_token_id"]], vocab[meta["tokenizer.ggml.eos_token_id"]]}
    assert special == {"<|im_start|>", "<|im_end|>"}
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = render_chat(tok, conv, add_generation_prompt=gen)
            assert ours == template.render(messages=conv, add_generation_prompt=gen, bos_token="<|im_start|>", eos_token="<|im_end|>")
        ids = tok.encode(ours, add_special_tokens=False)
        spelled = b"".join(vocab[i].encode() if vocab[i] in special else bytes(byte_of[ch] for ch in vocab[i]) for i in ids)
        assert spelled.decode() == ours
        assert ids.count(meta["tokenizer.ggml.bos_token_id"]) == ours.count("<|im_start|>")
    assert "You are a helpful AI assistant named SmolLM" in render_chat(tok, CONVERSATIONS[0])


def test_digits_are_single_tokens(engine):
    """llama.cpp's ``smollm`` pre-tokenizer splits digits one by one; so does the conversion."""
    tok = engine.tokenizer
    ids = tok.encode("is 1234 and 7.5", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["is", " ", "1", "2", "3", "4", " and", " ", "7", ".", "5"]
