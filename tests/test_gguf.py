"""GGUF checkpoints: synthetic files of every supported tensor type against `transformers` (which
loads GGUF with its own name mapping and Q/K un-permutation) and `gguf.quants.dequantize`; the
bad-file errors; llama.cpp's rope_freqs form of Llama 3.1 RoPE scaling."""

import math
import os

import numpy as np
import pytest
import torch
from conftest import make_hf_model, our_logits, random_sequences, rel_err
from gguf_util import Q, write_gguf

import gguf
from coserve_jax.models import CheckpointError, UnsupportedConfigError, load_model
from coserve_jax.models import gguf as gguf_mod
from coserve_jax.models.loader import load_config

SHAPE = dict(hidden_size=256, intermediate_size=512, vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
"""Rows of 256 elements: the block size of the K-quants."""

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K]
LENGTHS = [37, 5, 20]


def _model(arch: str, **kw):
    family = {"llama": "llama31", "qwen2": "qwen2"}[arch]
    over = dict(SHAPE, **kw)
    if arch == "llama":
        over.setdefault("rope_scaling", None)
    return make_hf_model(family, **over)


@pytest.fixture(scope="module")
def hf_models():
    return {arch: _model(arch) for arch in ("llama", "qwen2")}


def _transformers_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def _ref_logits(model, seqs):
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float().numpy() for s in seqs]


# Every type on llama; on qwen2 (no Q/K permutation, q/k/v biases, tied head) a float, a block and a K-quant type.
CASES = [("llama", t) for t in TYPES] + [("qwen2", t) for t in (Q.F32, Q.BF16, Q.Q8_0, Q.Q4_1, Q.Q6_K)]


@pytest.mark.parametrize("arch,qtype", CASES, ids=lambda c: c if isinstance(c, str) else c.name)
def test_every_type_matches_transformers_and_gguf_dequantize(tmp_path, hf_models, arch, qtype):
    path = tmp_path / f"{arch}-{qtype.name}.gguf"
    stored = write_gguf(path, hf_models[arch], arch, qtype)
    reader = gguf.GGUFReader(str(path))
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.ffn_down.weight"] == qtype
    model = load_model(path, dtype="float32")
    # Each weight is gguf's own dequantization, moved to our layout (K rows back in HF order for llama).
    t = {t.name: t for t in reader.tensors}["blk.1.attn_k.weight"]
    deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(stored["blk.1.attn_k.weight"].shape)
    if arch == "llama":
        deq = gguf_mod._unpermute(deq, model.config.num_kv_heads)
    np.testing.assert_array_equal(np.asarray(model.layers.kernel["k_proj"][1]), deq.T)
    # The whole model against transformers loading the same file.
    seqs = random_sequences(LENGTHS, SHAPE["vocab_size"], seed=3)
    ours = our_logits(model, seqs, pad_to=64)
    for o, r in zip(ours, _ref_logits(_transformers_from_gguf(path), seqs)):
        assert rel_err(o, r) <= 1e-4


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", {"attention_bias": True}), ("qwen2", {})], ids=["llama", "llama-bias", "qwen2"])
def test_f32_file_equals_the_original_model(tmp_path, arch, kw):
    """A lossless file gives the logits of the model it was written from (permuted biases too)."""
    hf = _model(arch, **kw)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, arch, Q.F32)
    model = load_model(path, dtype="float32")
    assert model.config.qkv_bias == (arch == "qwen2" or bool(kw))
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    seqs = random_sequences(LENGTHS, SHAPE["vocab_size"], seed=4)
    for o, r in zip(our_logits(model, seqs, pad_to=64), _ref_logits(hf, seqs)):
        assert rel_err(o, r) <= 1e-4


def test_unpermuting_is_needed_to_match(tmp_path, hf_models, monkeypatch):
    """Control: without undoing llama.cpp's Q/K permutation the logits are wrong."""
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_models["llama"], "llama", Q.F32)
    monkeypatch.setattr(gguf_mod, "_unpermute", lambda w, heads: w)
    model = load_model(path, dtype="float32")
    seqs = random_sequences(LENGTHS, SHAPE["vocab_size"], seed=4)
    errs = [rel_err(o, r) for o, r in zip(our_logits(model, seqs, pad_to=64), _ref_logits(hf_models["llama"], seqs))]
    assert max(errs) > 1e-3


def _llama3_rope_factors(theta, dim, factor, low, high, old_len):
    """``rope_freqs`` as llama.cpp's converter computes it (``LlamaModel.generate_extra_tensors``)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def test_rope_freqs_tensor_gives_llama3_scaling(tmp_path):
    """A Llama 3.1-style model written as llama.cpp writes it (no scaling metadata, a rope_freqs
    tensor) computes what transformers computes from the original llama3 ``rope_scaling``."""
    rs = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf = _model("llama", rope_scaling=rs, rope_theta=500000.0)
    factors = _llama3_rope_factors(500000.0, 64, 8.0, 1.0, 4.0, 64)
    assert len(set(np.round(factors, 3))) > 2  # all three bands are present
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, "llama", Q.F32, extra_tensors={"rope_freqs.weight": (factors, Q.F32)})
    model = load_model(path, dtype="float32")
    assert model.config.rope_scaling.rope_type == "freq_factors"
    seqs = random_sequences([90, 12], SHAPE["vocab_size"], seed=5)
    errs = [rel_err(o, r) for o, r in zip(our_logits(model, seqs, pad_to=128), _ref_logits(hf, seqs))]
    assert max(errs) <= 1e-4
    # Control: the same file without the factors does not match.
    plain = tmp_path / "plain.gguf"
    write_gguf(plain, hf, "llama", Q.F32)
    errs = [rel_err(o, r) for o, r in zip(our_logits(load_model(plain, dtype="float32"), seqs, pad_to=128), _ref_logits(hf, seqs))]
    assert max(errs) > 1e-3


def test_config_and_dtype_from_metadata(tmp_path, hf_models):
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_models["qwen2"], "qwen2", Q.F16, extra_metadata={"general.file_type": 1})
    cfg = load_config(path, max_model_len=128)
    hc = hf_models["qwen2"].config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("qwen2", 2, 256, 512)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 64, 512)
    assert cfg.rms_norm_eps == pytest.approx(hc.rms_norm_eps) and cfg.max_model_len == 128
    assert cfg.dtype == "float16"  # all-F16 file: "auto" keeps float16
    assert load_model(path).dtype == np.float16


# ---- bad files ---------------------------------------------------------------------------


def test_unsupported_architecture_is_named(tmp_path, hf_models):
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_models["llama"], "gemma2", Q.F32)
    with pytest.raises(UnsupportedConfigError, match=r"general\.architecture.*'gemma2' is not supported"):
        load_model(path)


def test_unsupported_type_names_type_and_tensor(tmp_path, hf_models):
    path = tmp_path / "m.gguf"
    hf = hf_models["llama"]
    down = hf.model.layers[1].mlp.down_proj.weight.detach().numpy()
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((down.shape[0], down.shape[1] // block * size), np.uint8)
    write_gguf(path, hf, "llama", Q.F32, drop=("blk.1.ffn_down.weight",), extra_tensors={"blk.1.ffn_down.weight": (raw, Q.Q8_1)})
    with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_down\.weight'.*Q8_1"):
        load_model(path)


def test_missing_and_unknown_tensors_are_named(tmp_path, hf_models):
    path = tmp_path / "missing.gguf"
    write_gguf(path, hf_models["llama"], "llama", Q.F32, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): blk\.1\.ffn_up\.weight"):
        load_model(path)
    path = tmp_path / "moe.gguf"
    experts = np.zeros((4, 512, 256), np.float32)
    write_gguf(path, hf_models["llama"], "llama", Q.F32, extra_tensors={"blk.0.ffn_gate_exps.weight": (experts, Q.F32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        load_model(path)


def test_bad_metadata_is_named(tmp_path, hf_models):
    path = tmp_path / "nokey.gguf"
    write_gguf(path, hf_models["llama"], "llama", Q.F32, extra_metadata={"llama.embedding_length": None})
    with pytest.raises(UnsupportedConfigError, match=r"llama\.embedding_length"):
        load_model(path)
    path = tmp_path / "yarn.gguf"
    write_gguf(path, hf_models["llama"], "llama", Q.F32, extra_metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(UnsupportedConfigError, match=r"rope\.scaling\.type.*yarn"):
        load_model(path)
    path = tmp_path / "shape.gguf"
    write_gguf(path, hf_models["llama"], "llama", Q.F32, extra_metadata={"llama.feed_forward_length": 384})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_(gate|up|down)\.weight.*shape"):
        load_model(path)
    path = tmp_path / "long.gguf"
    write_gguf(path, hf_models["llama"], "llama", Q.F32)
    with pytest.raises(UnsupportedConfigError, match=r"llama\.context_length"):
        load_model(path, max_model_len=100_000)


def test_not_a_gguf_file(tmp_path, hf_models):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.gguf is not a readable GGUF file"):
        load_model(bad)
    good = tmp_path / "m.gguf"
    write_gguf(good, hf_models["llama"], "llama", Q.F32)
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        load_model(cut)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.gguf")
