"""Tensor parallelism on 8 CPU devices: greedy generation and token-level finetuning
gradients at tp = 2, 4, 8 equal the single-device run; LoRA adds no collective to the forward
and reduces its gradients once per optimizer step; two processes on loopback equal one."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, make_peft_adapter, random_sequences, rel_err

from coserve_jax import Engine, SamplingParams
from coserve_jax.finetune.config import LoRAConfig
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.reference import whole_sequence_loss
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig
from coserve_jax.parallel.mesh import make_mesh
from coserve_jax.parallel.rules import ShardingRules

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)"
)

# llama31 with 8 query / 2 KV heads: tp=2 splits KV heads, tp=4 and 8 replicate them (2 and 4
# devices per head). qwen2 (q/k/v bias, tied embeddings, 4 / 2 heads): bias shards and a
# replicated embedding used as the LM head.
VARIANTS = {"llama31": dict(num_attention_heads=8, num_key_value_heads=2), "qwen2": {}}
# Default suite: llama31 at tp=8 (KV heads replicated, two devices per head); the other cases
# (qwen2 at tp=2: KV heads split, bias shards) in the slow tier.
CASES = [pytest.param("llama31", 2, marks=pytest.mark.slow), pytest.param("llama31", 4, marks=pytest.mark.slow),
         ("llama31", 8), pytest.param("qwen2", 2, marks=pytest.mark.slow), pytest.param("qwen2", 4, marks=pytest.mark.slow)]
ENGINE_KW = dict(
    dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, page_size=16, num_kv_pages=64,
    token_buckets=(16, 32), seq_buckets=(4,), max_loras=2, max_lora_rank=8, compilation_cache_dir=None,
    max_finetune_jobs=1, finetune_max_seq_len=64, finetune_seq_buckets=(64,), max_finetune_tokens=16,
)
LORA = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """HF checkpoints (random, with random biases and norms) and a PEFT adapter for each variant."""
    out = {}
    for family, overrides in VARIANTS.items():
        hf = make_hf_model(family, **overrides)
        path = tmp_path_factory.mktemp(f"tp_{family}")
        hf.save_pretrained(path)
        adapter = tmp_path_factory.mktemp(f"tp_{family}_lora")
        make_peft_adapter(hf, dict(r=4, lora_alpha=8, target_modules=list(LINEAR_MODULES)), 3, adapter, scale=0.2)
        out[family] = (path, adapter, hf.config.vocab_size)
    return out


def examples(vocab: int) -> list[TrainingExample]:
    seqs = random_sequences((40, 23, 60), vocab, seed=5)
    return [TrainingExample(tuple(s), tuple([False] * 4 + [True] * (len(s) - 4)), i + 1) for i, s in enumerate(seqs)]


def run_workload(family: str, tp: int, checkpoints) -> dict:
    """Greedy generation on the base model and an adapter, beside a finetuning job (SGD with
    momentum, dropout, all linear modules) whose accumulated gradient is captured at its second optimizer
    step (at the first, B = 0 gives A no gradient), with the weights it was taken at."""
    path, adapter, vocab = checkpoints[family]
    engine = Engine(path, tensor_parallel_size=tp, **ENGINE_KW)
    engine.load_adapter("a", adapter)
    job = engine.create_finetuning_job(
        examples(vocab), lora=LORA, optimizer="sgd", momentum=0.9, learning_rate=0.5, gradient_accumulation_steps=3, max_steps=2,
        shuffle=False, max_grad_norm=None, seed=4,
    )
    captured = {}
    original = engine.runner.optimizer_step

    def spy(j):
        row = j.grad_row
        grads_acc = engine.runner.ft_buffers.grads
        captured["partials"] = {m: {w: np.asarray(g[row]) for w, g in d.items()} for m, d in grads_acc.items()}
        captured["params"] = jax.tree.map(np.asarray, j.params)
        return original(j)

    engine.runner.optimizer_step = spy
    prompts = random_sequences((5, 17, 30, 9), vocab, seed=8)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True), [None, "a", None, "a"])
    engine.wait_for(job)
    assert job.status.value == "succeeded", job.error
    return dict(
        engine=engine, job=job, tokens=[o.token_ids for o in outs], logprobs=np.array([o.logprobs for o in outs]),
        grads={m: {w: p.sum(axis=0) for w, p in d.items()} for m, d in captured["partials"].items()},
        partials=captured["partials"], params=captured["params"],
    )


@pytest.fixture(scope="module")
def single(checkpoints):
    return {family: run_workload(family, 1, checkpoints) for family in VARIANTS}


@pytest.mark.parametrize("family,tp", CASES)
def test_generation_and_finetuning_gradients_equal_single_device(family, tp, checkpoints, single):
    ref = single[family]
    ours = run_workload(family, tp, checkpoints)
    assert ours["tokens"] == ref["tokens"]
    assert rel_err(ours["logprobs"], ref["logprobs"]) <= 1e-5
    assert ref["tokens"][1] != ref["tokens"][0] or ref["logprobs"][1].tolist() != ref["logprobs"][0].tolist()

    # The accumulated gradient equals the single-device one and jax.grad of the whole-sequence loss.
    eng = single[family]["engine"]
    config = eng.config
    params = jax.tree.map(jnp.asarray, ours["params"])  # the weights after step 1
    assert rel_err(ours["params"]["q_proj"]["B"], ref["params"]["q_proj"]["B"]) <= 1e-5
    scaling = {m: jnp.full((config.num_layers,), LORA.scaling, jnp.float32) for m in params}
    exs = examples(config.vocab_size)
    norm = float(sum(e.num_targets for e in exs))
    job = ours["job"]
    want = jax.tree.map(jnp.zeros_like, params)
    # jitted for speed at one padded length (causal attention; pads are no targets and dropout
    # masks are keyed by position, so trailing pads change nothing)
    grad_fn = jax.jit(jax.grad(lambda p, tokens, mask, seed: whole_sequence_loss(eng.model, p, scaling, tokens, mask, norm, 0.1, seed)))
    pad_to = max(len(e.token_ids) for e in exs)
    for k in range(3, 6):  # the second optimizer step's sequences (an epoch is 3)
        e = exs[k % 3]
        pad = pad_to - len(e.token_ids)
        tokens = jnp.asarray(list(e.token_ids) + [0] * pad, jnp.int32)
        mask = jnp.asarray(list(e.loss_mask) + [False] * pad)
        g = grad_fn(params, tokens, mask, jnp.uint32(job.dropout_seed(k)))
        want = jax.tree.map(jnp.add, want, g)
    r = LORA.r
    for m in want:
        for w, got in (("A", ours["grads"][m]["A"][:, :, :r]), ("B", ours["grads"][m]["B"][:, :r, :])):
            assert np.abs(np.asarray(want[m][w])).max() > 0
            assert rel_err(got, np.asarray(want[m][w], np.float64)) <= 1e-5, (m, w)
            single_dev = ref["grads"][m][w][:, :, :r] if w == "A" else ref["grads"][m][w][:, :r, :]
            assert rel_err(got, single_dev) <= 1e-5, (m, w)

    # Replicated LoRA weights keep one partial sum per device until the optimizer step: they differ.
    rules = ours["engine"].rules
    for m, w in (("q_proj", "A"), ("o_proj", "B")):
        partials = ours["partials"][m][w]
        assert partials.shape[0] == tp == rules.grad_partials(m, w)
        assert not np.allclose(partials[0], partials[1])

    # Master weights and the momentum are placed by the same rule as the adapter pool.
    mu = job.opt_state[0].trace
    for m in LINEAR_MODULES:
        for w in ("A", "B"):
            spec = rules.job_lora_spec(m, w)
            assert job.params[m][w].sharding.is_equivalent_to(rules.named(spec), 3), (m, w)
            assert mu[m][w].sharding.is_equivalent_to(rules.named(spec), 3), (m, w)


def count_collectives(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in OPS}


def test_lora_adds_no_forward_collective_and_reduces_gradients_once_per_optimizer_step(checkpoints):
    path, _, vocab = checkpoints["llama31"]
    kw = dict(ENGINE_KW, token_buckets=(32,))
    plain = Engine(path, tensor_parallel_size=4, **dict(kw, max_loras=0, max_finetune_jobs=0))
    pooled = Engine(path, tensor_parallel_size=4, **dict(kw, max_finetune_jobs=0))
    bucket = plain.buckets[0]
    without = count_collectives(plain.runner.step_fn._compiled[bucket].as_text())
    with_lora = count_collectives(pooled.runner.step_fn._compiled[bucket].as_text())
    assert without == with_lora
    assert without["all-reduce"] >= 2  # the layer scan's o_proj and down_proj reductions

    # The backward slice all-reduces only activation gradients [N, H] (Megatron's backward),
    # however many modules carry LoRA; the LoRA gradients' reduction is in the optimizer step.
    counts = {}
    for modules in (("down_proj",), LINEAR_MODULES):
        eng = Engine(path, tensor_parallel_size=4, **dict(kw, lora_target_modules=modules))
        hlo = eng.runner.backward[64].as_text()
        counts[modules] = count_collectives(hlo)
        shapes = set(re.findall(r"= f32\[([\d,]+)\][^=]*? all-reduce(?:-start)?\(", hlo))
        assert shapes == {f"64,{eng.config.hidden_size}"}, shapes
        job = eng.create_finetuning_job(examples(vocab), lora=LoRAConfig(r=4, target_modules=list(modules)), max_steps=1)
        update = count_collectives(eng.runner.optimizers[job.id].as_text())
        assert update["all-reduce"] >= 1, update
    assert counts[("down_proj",)] == counts[LINEAR_MODULES]


def test_two_processes_on_loopback_equal_one_process(tmp_path):
    """`python -m coserve_jax.tools.parallel_check` at tp=8: one process of 8 CPU devices, then two
    processes of 4 joined by jax.distributed (Gloo collectives on loopback)."""
    # (57 s on 2 cores; the same equality over HTTP, test_multihost_serve.py, is in the slow suite)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def launch(devices: int, out, extra=()):
        cmd = [sys.executable, "-m", "coserve_jax.tools.parallel_check", "--tensor-parallel-size", "8", "--out", str(out), *extra]
        e = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    one = launch(8, tmp_path / "one.json")
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        launch(4, tmp_path / f"p{i}.json", ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)])
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    ref = json.loads((tmp_path / "one.json").read_text())
    p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    assert (p0["process_count"], p0["process_index"], p1["process_index"]) == (2, 0, 1)
    for key in ("tokens", "logprobs", "losses", "grad_norms", "adapter_sums"):
        assert p0[key] == p1[key], key  # the processes ran one program
    assert p0["tokens"] == ref["tokens"] and p0["job_status"] == ref["job_status"] == "succeeded"
    for key in ("logprobs", "losses", "grad_norms"):
        assert rel_err(np.array(p0[key]), np.array(ref[key])) <= 1e-5, key
    sums = np.array(list(ref["adapter_sums"].values()))
    assert rel_err(np.array(list(p0["adapter_sums"].values())), sums) <= 1e-5


def test_rules_table_and_bad_sizes():
    config = ModelConfig.from_hf_dict(dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=250, max_position_embeddings=128,
    ))
    P = jax.sharding.PartitionSpec
    rules = ShardingRules(config, make_mesh(2))
    assert rules.lora_axes("q_proj") == {"A": (None, None), "B": (None, "tp")}
    assert rules.lora_axes("down_proj") == {"A": ("tp", None), "B": (None, None)}
    assert rules.spec("layers.o_proj") == P(None, "tp", None)
    assert rules.spec("lora.k_proj.B") == P(None, None, None, "tp")
    assert rules.spec("lora.o_proj.A") == P(None, None, "tp", None)
    assert rules.spec("lm_head") == P(None, "tp") and rules.kv_cache_heads == 2
    rules4 = ShardingRules(config, make_mesh(4))
    assert rules4.spec("lm_head") == P()  # 250 rows do not split in 4
    assert rules4.kernel_axes("k_proj") == (None, None) and rules4.kv_cache_heads == 4 and rules4.kv_replicas == 2
    assert rules4.lora_axes("v_proj") == {"A": (None, None), "B": (None, None)}
    assert rules4.grad_partials("v_proj", "B") == 4 and rules4.grad_partials("o_proj", "A") == 1
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=8, num_key_value_heads=2"):
        ShardingRules(config, make_mesh(3))
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(16)
    with pytest.raises(KeyError, match="no sharding rule"):
        rules.spec("layers.nonsense")


@pytest.mark.slow  # the server's tensor_parallel_size and distributed config also run in test_multihost_serve.py (slow)
def test_server_and_benchmark_configs_take_tensor_parallel_size():
    """`engine.tensor_parallel_size` builds a split engine from a server config and from a bench
    config; both take a multi-host `engine.distributed` and refuse a malformed one with the reason."""
    import yaml

    from coserve_jax.bench import harness
    from coserve_jax.bench.config import parse_config as parse_bench
    from coserve_jax.configfile import ConfigError
    from coserve_jax.serve.config import load_config
    from coserve_jax.serve.model import build_engine

    small = ["engine.max_num_seqs=4", "engine.max_num_batched_tokens=32", "engine.token_buckets=[32]",
             "engine.seq_buckets=[4]", "engine.max_finetune_jobs=0", "engine.compilation_cache_dir=null"]
    outs = []
    for tp in (1, 2):
        engine, _ = build_engine(load_config(None, small + [f"engine.tensor_parallel_size={tp}"]))
        down = engine.model.layers.kernel["down_proj"][...]
        assert engine.rules.size == tp and down.sharding.is_equivalent_to(engine.rules.sharding("layers.down_proj"), 3)
        assert down.addressable_shards[0].data.shape[1] == engine.config.intermediate_size // tp
        outs.append(engine.generate("Hello there", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids)
    assert outs[0] == outs[1]
    dist = "engine.distributed={coordinator_address: 'host0:1234', num_processes: 2, process_id: 0}"
    assert load_config(None, [dist]).engine["distributed"]["num_processes"] == 2  # multi-host serving is accepted
    with pytest.raises(ConfigError, match="process_id"):
        load_config(None, ["engine.distributed={coordinator_address: 'host0:1234', num_processes: 2, process_id: 5}"])

    data = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "bench", "cpu-smoke.yaml")))
    data["model"].pop("tokenizer")
    data["model"]["vocab_from_tokenizer"] = False
    data["model"]["hf_config"]["vocab_size"] = 256
    data["engine"] = dict(max_num_seqs=4, max_num_batched_tokens=32, token_buckets=[32], seq_buckets=[4], num_kv_pages=100,
                          finetune_max_seq_len=64, finetune_seq_buckets=[64], compilation_cache_dir=None, tensor_parallel_size=2)
    cfg = parse_bench(data, "bench")
    engine = harness.build_engine(cfg)
    assert engine.rules.size == 2 and engine.rules.kv_replicas == 2  # 1 KV head on 2 devices
    assert engine.model.lora.B["v_proj"][...].sharding.is_fully_replicated
    assert not engine.model.lora.B["q_proj"][...].sharding.is_fully_replicated
    data["engine"]["distributed"] = dict(coordinator_address="host0:1234", num_processes=2, process_id=0)
    assert parse_bench(data, "bench").engine["distributed"]["process_id"] == 0  # and by the benchmark
    data["engine"]["distributed"] = dict(coordinator_address="host0", num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match="host:port"):
        parse_bench(data, "bench")
