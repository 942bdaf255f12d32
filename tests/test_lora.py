"""Multi-LoRA against `peft`: three adapters in one batch, export round-trip, no recompilation."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, make_peft_adapter, our_logits, random_sequences, rel_err
from flax import nnx
from peft import PeftModel

from coserve_jax.compile_counter import CompileCounter
from coserve_jax.lora import LoRAPoolConfig
from coserve_jax.lora.manager import AdapterError, AdapterManager
from coserve_jax.lora.peft_io import AdapterFormatError, read_peft
from coserve_jax.models import load_model, pack_sequences

# Three adapters with different ranks, alphas, target modules, per-module patterns and rsLoRA.
ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp_rs": dict(r=8, lora_alpha=16, target_modules=["o_proj", "gate_proj", "down_proj"], use_rslora=True),
    "all": dict(
        r=2,
        lora_alpha=3,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.up_proj": 6},
        alpha_pattern={"k_proj": 5},
    ),
}


@pytest.fixture(scope="module")
def setup(hf_checkpoint, tmp_path_factory):
    """Base checkpoint + three PEFT adapters saved by `peft`, each with random non-zero B."""
    path, base = hf_checkpoint("llama31")
    adapters = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        out = tmp_path_factory.mktemp(f"adapter_{name}")
        adapters[name] = (out, make_peft_adapter(base, spec, seed=100 + i, out_dir=out))
    return path, base, adapters


def make_pool_model(path, **kw):
    return load_model(path, dtype="float32", lora=LoRAPoolConfig(**{"max_loras": 4, "max_lora_rank": 8, **kw}))


def test_three_adapters_in_one_batch_match_peft(setup):
    path, base, adapters = setup
    model = make_pool_model(path)
    manager = AdapterManager(model)
    index = {name: manager.load(name, d) for name, (d, _) in adapters.items()}
    assert sorted(index.values()) == [1, 2, 3]
    names = ["qv", "mlp_rs", "all", None, "qv"]
    seqs = random_sequences([13, 29, 7, 21, 4], base.config.vocab_size, seed=11)
    ours = our_logits(model, seqs, [manager.adapter_index(n) for n in names], pad_to=96)
    for name, seq, o in zip(names, seqs, ours):
        ref_model = base if name is None else adapters[name][1]
        ref = hf_logits(ref_model, [seq])[0]
        assert rel_err(o, ref) <= 1e-4, name
        if name is not None:  # the adapter really changes the output
            assert rel_err(o, hf_logits(base, [seq])[0]) > 1e-2


def test_export_round_trips_through_peft(setup, tmp_path):
    path, base, adapters = setup
    model = make_pool_model(path)
    manager = AdapterManager(model)
    seqs = random_sequences([17], base.config.vocab_size, seed=12)
    for name, (src, peft_model) in adapters.items():
        manager.load(name, src)
        out = tmp_path / name
        manager.export(name, out, base_model_name_or_path="tiny-llama")
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
        original, exported = read_peft(src), read_peft(out)
        assert original.modules.keys() == exported.modules.keys()
        for key, m in original.modules.items():
            np.testing.assert_array_equal(m.a, exported.modules[key].a)
            np.testing.assert_array_equal(m.b, exported.modules[key].b)
            assert original.scaling(key) == pytest.approx(exported.scaling(key))
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        assert rel_err(hf_logits(reloaded, seqs)[0], hf_logits(peft_model, seqs)[0]) <= 1e-6


def test_load_unload_never_recompiles_the_forward(setup):
    path, base, adapters = setup
    model = make_pool_model(path)
    manager = AdapterManager(model)
    graphdef, _ = nnx.split(model)
    forward = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    seqs = random_sequences([9, 6], base.config.vocab_size, seed=13)
    batch = pack_sequences(seqs, [1, 2], pad_to=16)
    forward(nnx.state(model), *batch.arrays()).block_until_ready()  # warm-up
    manager.load("qv", adapters["qv"][0])  # warm the slot writer too
    manager.unload("qv")
    with CompileCounter() as compiles:
        for name, (src, _) in adapters.items():
            manager.load(name, src)
            out = forward(nnx.state(model), *batch.arrays())
        manager.unload("qv")
        manager.load("qv_again", adapters["qv"][0])
        out = np.asarray(forward(nnx.state(model), *batch.arrays()))
    assert compiles.requests == 0
    # Slot 1 was freed and reused: "qv_again" serves index 1 and "mlp_rs" index 2.
    assert manager.adapter_index("qv_again") == 1
    ref = [hf_logits(adapters["qv"][1], [seqs[0]])[0], hf_logits(adapters["mlp_rs"][1], [seqs[1]])[0]]
    for o, r in zip(batch.unpack(out), ref):
        assert rel_err(o, r) <= 1e-4


def test_unload_restores_base_model(setup):
    path, base, adapters = setup
    model = make_pool_model(path)
    manager = AdapterManager(model)
    idx = manager.load("all", adapters["all"][0])
    manager.unload("all")
    seqs = random_sequences([10], base.config.vocab_size, seed=14)
    assert rel_err(our_logits(model, seqs, [idx])[0], hf_logits(base, seqs)[0]) <= 1e-4
    with pytest.raises(AdapterError, match="no adapter named 'all'"):
        manager.adapter_index("all")


def test_bad_adapters_fail_clearly_and_leave_pool_untouched(setup, tmp_path):
    path, base, adapters = setup
    model = make_pool_model(path, max_lora_rank=4, target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    manager = AdapterManager(model)
    before = jax.tree.map(np.asarray, nnx.state(model.lora))
    with pytest.raises(AdapterError, match="rank 8 exceeds max_lora_rank=4"):
        manager.load("big", adapters["mlp_rs"][0])
    with pytest.raises(AdapterError, match="no stack for 'k_proj'"):
        manager.load("all", adapters["all"][0])
    after = jax.tree.map(np.asarray, nnx.state(model.lora))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    assert manager.names == []
    manager.load("qv", adapters["qv"][0])
    with pytest.raises(AdapterError, match="already loaded"):
        manager.load("qv", adapters["qv"][0])
    for i in range(3):
        manager.load(f"more{i}", adapters["qv"][0])
    with pytest.raises(AdapterError, match="max_loras"):
        manager.load("one_too_many", adapters["qv"][0])


def test_unsupported_peft_features_are_named(setup, tmp_path):
    _, _, adapters = setup
    src = adapters["qv"][0]
    cfg = json.loads((src / "adapter_config.json").read_text())
    for field, value in [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"), ("peft_type", "IA3")]:
        d = tmp_path / field
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(AdapterFormatError, match=f"'{field}'"):
            read_peft(d)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft(tmp_path / "absent")


def test_bf16_model_with_adapters_runs(setup):
    path, base, adapters = setup
    model = load_model(path, dtype="bfloat16", lora=LoRAPoolConfig(max_loras=2, max_lora_rank=8))
    manager = AdapterManager(model)
    manager.load("mlp_rs", adapters["mlp_rs"][0])
    seqs = random_sequences([12], base.config.vocab_size, seed=15)
    out = our_logits(model, seqs, [1])[0]
    assert model.lora.A["down_proj"][...].dtype == jnp.bfloat16
    assert rel_err(out, hf_logits(adapters["mlp_rs"][1], seqs)[0]) <= 5e-2
