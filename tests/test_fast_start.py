"""Fast start. The on-disk cache of compiled executables: a second process with the same engine
neither traces nor compiles (every executable loads), produces the same tokens and losses, and a
broken entry is compiled again instead of failing. Background compilation: serving starts with
the largest shapes and gives the same results while the rest compile."""

import json
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_data

from coserve_jax import Engine, SamplingParams
from coserve_jax.compile_counter import CompileCounter
from coserve_jax.engine.model_runner import ModelRunner
from coserve_jax.executable_cache import ExecutableCache, abstract_signature
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import JobStatus

CHILD = r"""
import json, sys, time
from coserve_jax import Engine, SamplingParams
from coserve_jax.compile_counter import CompileCounter
kind, cache = sys.argv[1], sys.argv[2]
if kind == "tiny":
    from coserve_jax.models import ModelConfig, init_random
    from coserve_jax.models.lora_pool import LoRAPoolConfig
    cfg = ModelConfig.from_hf_dict(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=256, max_position_embeddings=256, torch_dtype="float32"))
    model = init_random(cfg, seed=0, dtype="float32", lora=LoRAPoolConfig(2, 8))
with CompileCounter() as c:
    if kind == "tiny":
        e = Engine(model, max_num_seqs=4, max_num_batched_tokens=32, token_buckets=(32,), seq_buckets=(4,), num_kv_pages=32,
                   compilation_cache_dir=cache, max_finetune_jobs=1, finetune_seq_buckets=(64,), finetune_max_seq_len=64)
        prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    else:
        e = Engine(kind, dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, token_buckets=(16,),
                   seq_buckets=(4,), max_loras=0, max_finetune_jobs=0, compilation_cache_dir=cache)
        prompts = [e.tokenizer.encode("The capital of France is"), e.tokenizer.encode("1, 2, 3,")]
    outs = e.generate(prompts, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
losses = []
if kind == "tiny":  # a job's backward, train step and accumulator reset from the loaded executables
    from coserve_jax.finetune.data import TrainingExample
    exs = [TrainingExample(tuple(range(1 + i, 30 + 7 * i)), tuple([False] * 3 + [True] * (26 + 6 * i)), i) for i in range(4)]
    job = e.create_finetuning_job(exs, learning_rate=1e-2, max_steps=2, gradient_accumulation_steps=2, shuffle=False,
                                  lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    e.wait_for(job)
    losses = [r.loss for r in job.loss_history]
x = e.runner.executable_cache
print(json.dumps(dict(requests=c.requests, compiles=c.count, hits=x.hits, misses=x.misses, tokens=[o.token_ids for o in outs],
                      losses=losses)))
"""


def _run(kind: str, cache: str, hash_seed: int) -> dict:
    # a different string-hash seed in each process: set and dict orders that depend on it would
    # change the keys (or the lowered programs) and show here as misses
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    out = subprocess.run([sys.executable, "-c", CHILD, kind, cache], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_two_processes(kind: str, cache: str) -> tuple[dict, dict]:
    cold = _run(kind, cache, 1)
    assert cold["misses"] > 0 and cold["hits"] == 0 and cold["compiles"] > 0
    warm = _run(kind, cache, 2)
    # every executable loaded: no XLA compilation, and no persistent-cache miss either
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"]
    assert warm["compiles"] == 0
    assert warm["tokens"] == cold["tokens"]
    assert warm["losses"] == cold["losses"]
    return cold, warm


def test_second_process_loads_every_executable(tmp_path):
    """The tiny model with finetuning (step, backward, train step, accumulator reset, adapter
    writer); a job trains with the loaded executables to the same losses."""
    cold, _ = _check_two_processes("tiny", str(tmp_path))
    assert len(cold["losses"]) == 2


def test_second_process_loads_every_executable_real_model(tmp_path):
    """SmolLM2-135M from its GGUF file: two fresh processes, the second compiles nothing."""
    path = shared_data("models", "smollm2_135m_instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    _check_two_processes(str(path), str(tmp_path))


def _add(x, y):
    return x + y


def test_key_follows_shapes_and_names(tmp_path):
    cache = ExecutableCache(tmp_path, jax.devices()[:1])
    a = jax.ShapeDtypeStruct((4,), jnp.float32)
    b = jax.ShapeDtypeStruct((8,), jnp.float32)
    c = jax.ShapeDtypeStruct((4,), jnp.int32)
    keys = {cache.key("add", (a, a)), cache.key("add", (b, b)), cache.key("add", (c, c)), cache.key("sub", (a, a))}
    assert len(keys) == 4
    placed = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert cache.key("add", (placed, placed)) == cache.key("add", (jnp.zeros(4), jnp.ones(4)))  # values do not count
    assert cache.key("add", (a, a)) != cache.key("add", (placed, placed))  # placements do
    assert abstract_signature((a, a)) != abstract_signature([a, a])  # the tree structure counts


def test_broken_entry_is_compiled_again(tmp_path, caplog):
    jitted = jax.jit(_add)
    x = jnp.arange(4.0)
    first = ExecutableCache(tmp_path, jax.devices()[:1])
    first.compile("add", jitted, x, x)
    [entry] = [p for p in tmp_path.iterdir() if p.suffix == ".exe"]
    again = ExecutableCache(tmp_path, jax.devices()[:1])
    np.testing.assert_array_equal(again.compile("add", jitted, x, x)(x, x), 2 * np.arange(4.0))
    assert (again.hits, again.misses) == (1, 0)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated (a crash cannot do this: writes are renamed into place)
    broken = ExecutableCache(tmp_path, jax.devices()[:1])
    np.testing.assert_array_equal(broken.compile("add", jitted, x, x)(x, x), 2 * np.arange(4.0))
    assert (broken.hits, broken.misses) == (0, 1)
    assert "did not load" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_unwritable_directory_still_compiles(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = ExecutableCache(blocker / "sub", jax.devices()[:1])  # its parent is a file: nothing can be written
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(cache.compile("add", jax.jit(_add), x, x)(x, x), 2 * np.arange(3.0))
    assert cache.misses == 1 and not os.path.isdir(blocker / "sub")


# ---- compile_in_background ---------------------------------------------------------------------

BG_KW = dict(
    dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, token_buckets=(16, 32, 64), seq_buckets=(4, 8),
    num_kv_pages=64, max_loras=2, max_lora_rank=8, compilation_cache_dir=None, finetune_max_seq_len=128,
    finetune_seq_buckets=(64, 128), max_finetune_tokens=32,
)


def _job(engine, wait=True):
    exs = [TrainingExample(tuple(range(1 + i, 30 + 9 * i)), tuple([False] * 3 + [True] * (26 + 9 * i)), i) for i in range(4)]
    job = engine.create_finetuning_job(exs, learning_rate=1e-2, max_steps=2, gradient_accumulation_steps=2, shuffle=False,
                                       lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, seed=3)
    if wait:
        engine.wait_for(job)
    return job


def test_background_compilation(hf_checkpoint, monkeypatch):
    """Serving starts with the largest shapes only: requests run padded into them with the same
    tokens, a job trains token-level until the idle train step is compiled; once the background
    thread is done every shape is there and nothing compiles any more."""
    path, hf = hf_checkpoint("llama31")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 50))]
    params = SamplingParams(max_tokens=8, temperature=0)
    full = Engine(path, **BG_KW)
    want = [o.token_ids for o in full.generate(prompts, params, use_tqdm=False)]
    want_losses = [r.loss for r in _job(full).loss_history]

    gate = threading.Event()
    rest = ModelRunner._compile_rest
    monkeypatch.setattr(ModelRunner, "_compile_rest", lambda self, tasks, t0: (gate.wait(), rest(self, tasks, t0)))
    eng = Engine(path, compile_in_background=True, **BG_KW)
    assert eng.runner.compiling
    assert eng.runner.step_fn.ready == (eng.buckets[-1],)  # the largest: it holds every plan
    assert not eng.scheduler.config.idle_train_step and not eng.runner.train
    assert [o.token_ids for o in eng.generate(prompts, params, use_tqdm=False)] == want
    job = _job(eng)
    assert job.status is JobStatus.SUCCEEDED
    np.testing.assert_allclose([r.loss for r in job.loss_history], want_losses, rtol=1e-5)
    assert not eng.wait_compiled(timeout=0.01)  # still held

    gate.set()
    assert eng.wait_compiled()
    assert eng.runner.step_fn.ready == tuple(eng.buckets)
    assert set(eng.runner.train) == set(eng.runner.backward) == {64, 128}
    assert eng.scheduler.config.idle_train_step
    job = _job(eng, wait=False)  # (a job compiles its optimizer step when created)
    with CompileCounter() as compiles:
        assert [o.token_ids for o in eng.generate(prompts, params, use_tqdm=False)] == want
        eng.wait_for(job)
    assert compiles.requests == 0
    assert job.status is JobStatus.SUCCEEDED


def test_background_compilation_failure_keeps_serving(hf_checkpoint, monkeypatch, caplog):
    path, _ = hf_checkpoint("llama31")

    def broken(self, length):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(ModelRunner, "_compile_train", broken)
    eng = Engine(path, compile_in_background=True, **BG_KW)
    assert not eng.wait_compiled()
    assert "simulated" in str(eng.runner.background_error) and "background compilation failed" in caplog.text
    assert not eng.scheduler.config.idle_train_step  # never compiled: training stays token-level
    [out] = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out.token_ids) == 4
    assert _job(eng).status is JobStatus.SUCCEEDED


def test_gguf_tokenizer_cache_gives_the_same_tokenizer(tmp_path):
    """The converted tokenizer of a GGUF file is saved once and loaded after that: the same ids,
    text, special tokens and chat template as converting the file again."""
    from coserve_jax.tokenizer import load_tokenizer, render_chat

    path = shared_data("models", "smollm2_135m_instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    direct = load_tokenizer(path)
    first = load_tokenizer(path, cache_dir=tmp_path)
    [entry] = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert (entry / "tokenizer_config.json").is_file()
    again = load_tokenizer(path, cache_dir=tmp_path)  # from the saved entry
    texts = ["Hello, world!", "  leading spaces\tand\nnewlines", "Ünïcödé 字符 🤖", "<|im_start|>user\nhi<|im_end|>", ""]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    for tok in (first, again):
        assert [tok.encode(t) for t in texts] == [direct.encode(t) for t in texts]
        ids = direct.encode(texts[2] + texts[3])
        assert tok.decode(ids) == direct.decode(ids)
        assert render_chat(tok, chat) == render_chat(direct, chat)
        assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, len(tok)) == (
            direct.eos_token_id, direct.bos_token_id, direct.pad_token_id, len(direct))
        assert tok.all_special_tokens == direct.all_special_tokens
    (entry / "tokenizer.json").write_text("{broken")  # a damaged entry: converted again
    assert load_tokenizer(path, cache_dir=tmp_path).encode(texts[0]) == direct.encode(texts[0])


def test_stop_compiling_keeps_what_is_compiled(hf_checkpoint, monkeypatch):
    path, _ = hf_checkpoint("llama31")
    gate = threading.Event()
    rest = ModelRunner._compile_rest
    monkeypatch.setattr(ModelRunner, "_compile_rest", lambda self, tasks, t0: (gate.wait(), rest(self, tasks, t0)))
    eng = Engine(path, compile_in_background=True, **BG_KW)
    eng.runner._stop.set()  # (stop_compiling would wait for the held thread)
    gate.set()
    eng.runner.stop_compiling()
    assert not eng.runner.compiling and eng.runner.step_fn.ready == (eng.buckets[-1],)
    [out] = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out.token_ids) == 4


EXIT_WHILE_COMPILING = r"""
from coserve_jax import Engine
from coserve_jax.models import ModelConfig, init_random
from coserve_jax.models.lora_pool import LoRAPoolConfig
cfg = ModelConfig.from_hf_dict(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, vocab_size=256, max_position_embeddings=512, torch_dtype="float32"))
e = Engine(init_random(cfg, seed=0, dtype="float32", lora=LoRAPoolConfig(2, 8)), max_num_seqs=8, max_num_batched_tokens=64,
           num_kv_pages=64, compilation_cache_dir=None, compile_in_background=True)
print("compiling at exit:", e.runner.compiling)
"""


def test_process_exits_cleanly_while_compiling():
    """The interpreter's exit stops and joins the background thread (a daemon thread killed
    inside XLA's compiler aborted a server's shutdown: 'terminate called ...', status -6)."""
    out = subprocess.run([sys.executable, "-c", EXIT_WHILE_COMPILING], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiling at exit: True" in out.stdout


RESET_ROW = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from coserve_jax.engine.step import configure_compilation_cache
from coserve_jax.executable_cache import ExecutableCache
from coserve_jax.finetune import fused
configure_compilation_cache(sys.argv[1] + "/xla")
grads = {"q_proj": {"A": jnp.ones((2, 1, 4, 64, 8)), "B": jnp.ones((2, 1, 4, 8, 64))}}
cache = ExecutableCache(sys.argv[1] + "/executables", jax.devices()[:1])
out = cache.compile("zero_row", fused.zero_row, grads, jax.ShapeDtypeStruct((), jnp.int32))(grads, np.int32(1))
print(cache.hits, cache.misses, float(out["q_proj"]["A"].sum()))
"""


def test_entry_saved_after_a_persistent_cache_hit_runs(tmp_path):
    """The executable cache misses while JAX's persistent cache would hit (its entries deleted,
    as after an upgrade): an executable loaded from the persistent cache re-serializes without
    some kernels on the CPU (it then fails when run: 'Function ... fusion not found'), so a miss
    compiles afresh and the saved entry runs in the next process."""
    def run():
        out = subprocess.run([sys.executable, "-c", RESET_ROW, str(tmp_path)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    assert run() == ["0", "1", "2048.0"]  # (row 1 of 2 zeroed)
    for p in (tmp_path / "executables").iterdir():
        p.unlink()
    assert run() == ["0", "1", "2048.0"]
    assert run() == ["1", "0", "2048.0"]


def test_persistent_compilation_cache(hf_checkpoint, tmp_path):
    """A second engine with the same model and buckets loads its step from the cache directory."""
    from tests.test_engine import ENGINE_KW

    path, _ = hf_checkpoint("qwen2")
    kw = {**ENGINE_KW, "max_num_batched_tokens": 16, "max_num_seqs": 4, "token_buckets": (16,), "seq_buckets": (4,),
          "finetune_max_seq_len": 64, "finetune_seq_buckets": (64,),
          "compilation_cache_dir": tmp_path / "xla"}
    Engine(path, **kw)
    assert any((tmp_path / "xla").iterdir()), "nothing was written to the compilation cache"
    with CompileCounter() as compiles:
        engine = Engine(path, **kw)
    # every executable (step buckets, backward slices of finetuning) is a cache hit
    assert compiles.count == 0 and compiles.cache_hits == compiles.requests >= len(engine.buckets) + len(engine.runner.backward)
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
