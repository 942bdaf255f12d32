"""config.json parsing: every family's fields, both transformers layouts, and errors naming the field."""

import pathlib

import pytest

from coserve_jax.models import ModelConfig, RopeScaling, UnsupportedConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"

BASE = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=100,
    max_position_embeddings=256,
)


def test_llama31_config_old_layout():
    c = ModelConfig.from_pretrained(CONFIGS / "llama-3.1-8b")
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009)
    # Llama-3.1-8B has 8,030,261,248 parameters (model card: 8.03B).
    assert c.num_params() == 8_030_261_248


def test_rope_parameters_layout_of_transformers_5():
    d = dict(BASE, rope_parameters={"rope_theta": 123.0, "rope_type": "linear", "factor": 2.0})
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_theta == 123.0 and c.rope_scaling == RopeScaling("linear", 2.0)


def test_qwen2_has_qkv_bias_and_head_dim_default():
    c = ModelConfig.from_hf_dict(dict(BASE, model_type="qwen2", tie_word_embeddings=True))
    assert c.qkv_bias and not c.o_bias and c.tie_word_embeddings and c.head_dim == 16 and c.num_kv_heads == 4


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1.0}}, "rope_parameters.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": None}, "vocab_size"),
        ({"model_type": "mistral", "sliding_window": 128}, "sliding_window"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ({"model_type": "qwen2", "layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ],
)
def test_unsupported_fields_are_named(patch, field):
    with pytest.raises(UnsupportedConfigError) as e:
        ModelConfig.from_hf_dict({**BASE, **patch})
    assert e.value.field == field
    assert repr(field) in str(e.value)


def test_sliding_window_that_never_applies_is_accepted():
    # Mistral-7B-v0.1 style: the window is accepted when every sequence fits inside it.
    c = ModelConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": 128}, max_model_len=128)
    assert c.max_model_len == 128
    assert ModelConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": 4096}).max_model_len == 256


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_reference_attention_caps_the_default_context(caplog):
    """With the reference attention (CPU) the engine's default context is at most 2048 tokens,
    with a warning; an explicit max_model_len, or another implementation, keeps what was asked."""
    from coserve_jax.engine.config import REFERENCE_DEFAULT_MAX_MODEL_LEN, EngineConfig

    mc = ModelConfig.from_hf_dict({**BASE, "max_position_embeddings": 8192})
    kw = dict(has_lora_pool=False, kv_cache_heads=4, dtype_itemsize=4, max_finetune_jobs=0, num_kv_pages=2000)
    with caplog.at_level("WARNING", logger="coserve_jax.engine"):
        assert EngineConfig.resolve(mc, attention_impl="reference", **kw).max_model_len == REFERENCE_DEFAULT_MAX_MODEL_LEN == 2048
    assert "8192" in caplog.text and "max_model_len" in caplog.text
    assert EngineConfig.resolve(mc, attention_impl="reference", max_model_len=4096, **kw).max_model_len == 4096
    assert EngineConfig.resolve(mc, attention_impl="pallas", **kw).max_model_len == 8192


def test_engine_passes_every_knob_to_engine_config():
    """Engine hands its keyword arguments to EngineConfig.resolve by name: the two signatures
    must list the same knobs, with the same defaults."""
    import inspect

    from coserve_jax.engine.config import EngineConfig
    from coserve_jax.engine.engine import Engine

    engine = {k: p.default for k, p in inspect.signature(Engine).parameters.items()
              if k not in ("model", "tokenizer", "dtype", "distributed")}
    resolve = {k: p.default for k, p in inspect.signature(EngineConfig.resolve).parameters.items()
               if k not in ("model_config", "has_lora_pool", "kv_cache_heads", "dtype_itemsize", "device_memory")}
    assert engine.keys() == resolve.keys()
    differ = {k for k in engine if engine[k] != resolve[k]}
    assert differ == {"compilation_cache_dir"}  # the engine's default is the user cache directory


@pytest.mark.parametrize("max_len", [64, 100, 512, 700, 2048, 8192])
def test_finetune_length_buckets_bound_padding(max_len):
    from coserve_jax.engine.config import finetune_length_buckets

    b = finetune_length_buckets(max_len)
    assert b == sorted(set(b)) and b[-1] == max_len and b[0] == min(64, max_len)
    for n in range(b[0] + 1, max_len + 1):  # every length pads to at most 1.25x (1.5x above 512)
        pad = next(x for x in b if x >= n)
        assert pad <= (1.25 if n <= 512 else 1.5) * n, (n, pad)
    assert len(b) <= 4 * 3 + 2 * max(0, (max_len - 1).bit_length() - 9) + 1
    with pytest.raises(ValueError):
        finetune_length_buckets(0)
