"""Checkpoint loading: errors, streaming, caller-chosen sharding, random and abstract init."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from coserve_jax.models import CheckpointError, ModelConfig, init_abstract, init_random, load_model, param_shapes
from coserve_jax.models import loader as loader_mod
from coserve_jax.lora import LoRAPoolConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"


def _copy_checkpoint(src: pathlib.Path, dst: pathlib.Path, edit=None):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_directory_and_weights(tmp_path, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    src, _ = hf_checkpoint("llama31")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_model(tmp_path / "c")


def test_missing_shard_listed_in_index(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint("llama31", max_shard_size="40KB")
    dst = tmp_path / "c"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(dst)


def test_missing_tensor_is_named(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint("llama31")
    dst = _copy_checkpoint(src, tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(dst)


def test_shape_mismatch_is_named(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint("llama31")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    dst = _copy_checkpoint(src, tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\[8, 64\].*\[16, 64\]"):
        load_model(dst)


def test_non_float_dtype_is_named(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint("llama31")

    def edit(t):
        t["model.norm.weight"] = torch.zeros(64, dtype=torch.int8)

    dst = _copy_checkpoint(src, tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*I8"):
        load_model(dst)


def test_config_for_another_shape_fails_clearly(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint("llama31")
    dst = _copy_checkpoint(src, tmp_path / "c")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight.*but config.json implies"):
        load_model(dst)


def test_streaming_opens_one_shard_at_a_time(monkeypatch, hf_checkpoint):
    src, _ = hf_checkpoint("llama31", max_shard_size="40KB")
    open_now, most = [0], [0]
    real = loader_mod.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)

        def __enter__(self):
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            return self.inner.__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(loader_mod, "safe_open", Spy)
    load_model(src, dtype="float32")
    assert most[0] == 1 and open_now[0] == 0


def test_caller_sharding_is_used_for_every_parameter(hf_checkpoint):
    src, _ = hf_checkpoint("qwen2")
    device = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("tp",))
    seen = {}

    def sharding(name, shape):
        seen[name] = shape
        spec = (None, None, "tp") if name == "layers.q_proj" else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    model = load_model(src, dtype="float32", sharding=sharding, lora=LoRAPoolConfig(max_loras=2, max_lora_rank=4))
    expected = set(param_shapes(model.config)) | {f"lora.{m}.{p}" for m in model.lora.config.target_modules for p in "AB"}
    assert expected <= set(seen)
    assert model.layers.kernel["q_proj"][...].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")


def test_init_random_is_deterministic_and_shaped():
    cfg = ModelConfig.from_hf_dict(
        dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)
    )
    a, b, c = init_random(cfg, 0, dtype="float32"), init_random(cfg, 0, dtype="float32"), init_random(cfg, 1, dtype="float32")
    assert a.layers.kernel["k_proj"][...].shape == (2, 64, 32)
    np.testing.assert_array_equal(a.embed_tokens[...], b.embed_tokens[...])
    assert not np.array_equal(a.embed_tokens[...], c.embed_tokens[...])
    std = float(jnp.std(a.layers.kernel["down_proj"][...]))
    assert 0.015 < std < 0.025
    np.testing.assert_array_equal(a.norm[...], np.ones(64))


def test_init_abstract_at_llama_8b_shape_allocates_nothing():
    cfg = ModelConfig.from_pretrained(CONFIGS / "llama-3.1-8b")
    model = init_abstract(cfg, lora=LoRAPoolConfig(max_loras=4, max_lora_rank=16))
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    base = sum(int(np.prod(x.shape)) for path, x in nnx.to_flat_state(nnx.state(model)) if path[0] != "lora")
    assert base == 8_030_261_248
    assert model.layers.kernel["gate_proj"].get_value().shape == (32, 4096, 14336)
    assert model.lora.A["k_proj"].get_value().shape == (32, 4, 4096, 16)
    assert model.lora.A["k_proj"].get_value().dtype == jnp.bfloat16
