"""Our fp32 logits against `transformers` on tiny random checkpoints of every family."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, our_logits, random_sequences, rel_err, shared_data

from coserve_jax.models import load_model, pack_sequences

LENGTHS = [37, 5, 64, 1, 20]  # different lengths in one packed batch, plus padding slots


@pytest.mark.parametrize("family", ["llama31", "llama32", "qwen2", "mistral"])
def test_logits_match_transformers(family, hf_checkpoint):
    path, hf_model = hf_checkpoint(family)
    model = load_model(path, dtype="float32")
    seqs = random_sequences(LENGTHS, hf_model.config.vocab_size, seed=1)
    ours = our_logits(model, seqs, pad_to=160)
    refs = hf_logits(hf_model, seqs)
    for o, r in zip(ours, refs):
        assert o.shape == r.shape
        assert rel_err(o, r) <= 1e-4


def test_family_features_present(hf_checkpoint):
    """The checkpoints really exercise GQA 4:1, llama3 RoPE, q/k/v bias and tied embeddings."""
    llama = load_model(hf_checkpoint("llama31")[0], dtype="float32").config
    assert llama.num_heads == 4 * llama.num_kv_heads and llama.rope_scaling.rope_type == "llama3"
    qwen = load_model(hf_checkpoint("qwen2")[0], dtype="float32")
    assert qwen.config.qkv_bias and qwen.config.tie_word_embeddings and qwen.lm_head is None


def test_llama3_rope_scaling_is_needed_to_match(hf_checkpoint):
    """Control: the same weights without llama3 scaling do not match, so the test above can fail."""
    path, hf_model = hf_checkpoint("llama31")
    model = load_model(path, dtype="float32")
    model.config = dataclasses.replace(model.config, rope_scaling=None)
    seqs = random_sequences([64], hf_model.config.vocab_size, seed=2)
    assert rel_err(our_logits(model, seqs)[0], hf_logits(hf_model, seqs)[0]) > 1e-3


def test_jitted_forward_matches(hf_checkpoint):
    from flax import nnx

    path, hf_model = hf_checkpoint("qwen2")
    model = load_model(path, dtype="float32")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    seqs = random_sequences([9, 3], hf_model.config.vocab_size, seed=3)
    batch = pack_sequences(seqs, pad_to=16)
    out = batch.unpack(np.asarray(fwd(state, *batch.arrays())))
    for o, r in zip(out, hf_logits(hf_model, seqs)):
        assert rel_err(o, r) <= 1e-4


def test_sharded_checkpoint_matches(hf_checkpoint):
    path, hf_model = hf_checkpoint("llama31", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    model = load_model(path, dtype="float32")
    seqs = random_sequences([12, 30], hf_model.config.vocab_size, seed=4)
    for o, r in zip(our_logits(model, seqs), hf_logits(hf_model, seqs)):
        assert rel_err(o, r) <= 1e-4


def test_bf16_checkpoint(tmp_path, hf_checkpoint):
    """A bf16 checkpoint loads (as bf16 by default, or upcast to fp32) and matches transformers."""
    import torch
    import transformers

    src, _ = hf_checkpoint("mistral")
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path)
    assert load_model(tmp_path).dtype == jnp.bfloat16
    model = load_model(tmp_path, dtype="float32")
    hf_fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    seqs = random_sequences([15, 6], model.config.vocab_size, seed=5)
    for o, r in zip(our_logits(model, seqs), hf_logits(hf_fp32, seqs)):
        assert rel_err(o, r) <= 1e-4
    # bf16 compute stays close to fp32 compute of the same weights.
    bf16 = load_model(tmp_path)
    for o, r in zip(our_logits(bf16, seqs), hf_logits(hf_fp32, seqs)):
        assert rel_err(o, r) <= 5e-2


def test_shared_llama2_tiny_random_matches_transformers():
    """A checkpoint nobody here made (stas/tiny-random-llama-2, via ollama)."""
    import torch
    import transformers

    path = shared_data("models", "llama2_tiny_random")
    model = load_model(path, dtype="float32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = random_sequences([11, 40, 3], model.config.vocab_size, seed=6)
    for o, r in zip(our_logits(model, seqs, pad_to=64), hf_logits(hf_model, seqs)):
        assert rel_err(o, r) <= 1e-4
