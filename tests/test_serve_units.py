"""The server's parts that need no running server: the config (YAML, flags, overrides), the
OpenAI -> FinetuneConfig hyperparameter mapping, the built-in byte-level tokenizer."""

from __future__ import annotations

import glob

import pytest

from coserve_jax.configfile import ConfigError, apply_overrides
from coserve_jax.finetune.config import FinetuneConfig
from coserve_jax.models.tiny import byte_level_tokenizer, end_of_turn_ids
from coserve_jax.serve.__main__ import config_from_args
from coserve_jax.serve.config import FinetuneDefaults, load_config
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.jobs import finetune_config
from coserve_jax.serve.protocol import FinetuneJobCreate


def test_byte_level_tokenizer_round_trips_text_and_renders_chat():
    tok = byte_level_tokenizer()
    text = "Grüße, 世界! 🙂\n\ttabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert set(end_of_turn_ids(tok)) == {tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")}


def test_config_precedence_file_then_flags_then_set(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("port: 1234\nhost: 0.0.0.0\nengine: {max_num_seqs: 4, max_num_batched_tokens: 64}\nlimits: {max_n: 3}\n")
    cfg = config_from_args(["--config", str(f), "--port", "99", "--api-key", "k", "--set", "engine.max_num_seqs=8",
                            "--set", "limits.max_n=2", "--set", "engine.token_buckets=[32, 64]"])
    assert (cfg.port, cfg.host, cfg.api_key) == (99, "0.0.0.0", "k")
    assert cfg.engine == {"max_num_seqs": 8, "max_num_batched_tokens": 64, "token_buckets": [32, 64]}
    assert cfg.limits.max_n == 2 and cfg.is_tiny
    assert cfg.engine_kwargs()["max_num_seqs"] == 8 and "finetune_max_seq_len" in cfg.engine_kwargs()  # tiny defaults fill in


def test_vllm_flags_set_the_model_and_engine_keys():
    """vLLM's flag names, generated from the model section and Engine's signature, set the config
    keys they name (values read as YAML); --set still wins; --lora-modules takes NAME=PATH."""
    import inspect

    from coserve_jax.engine import Engine
    from coserve_jax.serve.__main__ import engine_flags

    cfg = config_from_args([
        "--max-model-len", "512", "--dtype", "float32", "--max-num-seqs", "8", "--max-loras", "2", "--max-lora-rank", "8",
        "--tensor-parallel-size", "2", "--token-buckets", "[32, 64]", "--async-scheduling", "false", "--seed", "3",
        "--lora-modules", "sql=/adapters/sql", "chat=/adapters/chat", "--set", "engine.max_num_seqs=4",
    ])
    assert (cfg.model.max_model_len, cfg.model.dtype) == (512, "float32")
    assert {k: cfg.engine[k] for k in ("max_num_seqs", "max_loras", "max_lora_rank", "tensor_parallel_size", "seed")} == dict(
        max_num_seqs=4, max_loras=2, max_lora_rank=8, tensor_parallel_size=2, seed=3)
    assert cfg.engine["token_buckets"] == [32, 64] and cfg.engine["async_scheduling"] is False
    assert cfg.lora_modules == {"sql": "/adapters/sql", "chat": "/adapters/chat"}
    keys = {key for _, key, _ in engine_flags()}
    engine_args = set(inspect.signature(Engine.__init__).parameters) - {"self", "model", "tokenizer", "dtype", "max_model_len"}
    assert {k.removeprefix("engine.") for k in keys if k.startswith("engine.")} == engine_args
    assert config_from_args([]).engine == {}  # unset flags set nothing
    with pytest.raises(ConfigError, match="NAME=PATH"):
        config_from_args(["--lora-modules", "no-equals-sign"])


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("COSERVE_API_KEY", "from-env")
    assert config_from_args([]).api_key == "from-env"
    assert config_from_args(["--api-key", "flag"]).api_key == "flag"


@pytest.mark.parametrize("overrides, needle", [
    (["prot=1"], "unknown keys ['prot']"),
    (["engine.max_num_seq=1"], "unknown engine keys ['max_num_seq']"),
    (["engine.model=x"], "engine keys ['model'] are set in the model section"),
    (["limits.max_tokens=0"], "limits.max_tokens must be an integer >= 1"),
    (["model.pth=x"], "model: unknown keys ['pth']"),
    (["port=70000"], "port must be an integer"),
    (["port"], "expected KEY=VALUE"),
])
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_shipped_serve_configs_parse():
    paths = sorted(glob.glob("configs/serve/*.yaml"))
    assert paths
    for p in paths:
        load_config(p)


def test_overrides_parse_yaml_values_and_copy():
    base = {"a": {"b": 1}}
    out = apply_overrides(base, ["a.c=[1, 2]", "d=null", "a.b=x"])
    assert out == {"a": {"b": "x", "c": [1, 2]}, "d": None} and base == {"a": {"b": 1}}


def _job(**kw) -> FinetuneJobCreate:
    return FinetuneJobCreate(model="m", training_file="file-x", **kw)


def test_openai_hyperparameters_map_onto_finetune_config():
    d = FinetuneDefaults(base_learning_rate=2e-4)
    cfg, reported = finetune_config(_job(hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}, seed=9), d, "/ck")
    assert (cfg.num_train_epochs, cfg.gradient_accumulation_steps, cfg.seed) == (3.0, 4, 9)
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.checkpoint_dir == "/ck" and cfg.resume
    assert reported == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": pytest.approx(0.5)}
    # "auto" keeps our defaults; the method form and extensions work; lora is an extension.
    cfg, _ = finetune_config(_job(method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "auto", "max_steps": 7}}},
                                  lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}), d, "/ck")
    defaults = FinetuneConfig()
    assert cfg.gradient_accumulation_steps == defaults.gradient_accumulation_steps and cfg.max_steps == 7
    assert cfg.learning_rate == pytest.approx(2e-4) and cfg.lora.r == 4 and len(cfg.lora.target_modules) == 7


@pytest.mark.parametrize("kw, param", [
    (dict(hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
    (dict(hyperparameters={"batch_size": 1.5}), "hyperparameters.batch_size"),
    (dict(hyperparameters={"epochs": 2}), "hyperparameters"),
    (dict(hyperparameters={"warmup_steps": -1}), "hyperparameters"),
    (dict(method={"type": "dpo"}), "method.type"),
    (dict(lora={"lora_dropout": 1.5}), "hyperparameters"),
])
def test_bad_hyperparameters_are_400s(kw, param):
    with pytest.raises(APIError) as e:
        finetune_config(_job(**kw), FinetuneDefaults(), "/ck")
    assert e.value.status == 400 and e.value.param == param


def test_project_admission_lets_a_higher_priority_request_past_the_projects_lower_ranked_sequences():
    """A project's sequences in the engine are capped (``limits.max_seqs_per_project``), but a
    request waits only for the project's sequences of its own priority or better: a chat request
    (priority 0) is not held back by the project's RL samples (priority 1), which the engine then
    preempts for it; the samples still count the chat request against the cap."""
    import asyncio
    import types

    from coserve_jax.serve.state import ServerState

    state = types.SimpleNamespace(_admission=None, _event_loop=None, _in_flight={}, _project_of={}, max_seqs_per_project=2)

    async def main():
        await ServerState.admit(state, "p", ["s1", "s2"], priority=1)  # the project's cap, at priority 1
        more = asyncio.ensure_future(ServerState.admit(state, "p", ["s3"], priority=1))
        await asyncio.wait_for(ServerState.admit(state, "p", ["chat"], priority=0), 1.0)  # at once
        await ServerState.admit(state, "q", ["other"], priority=1)  # another project: its own cap
        await asyncio.sleep(0.05)
        assert not more.done()
        ServerState.release(state, ["s1"])  # s2 and chat are still 2 at priority <= 1
        await asyncio.sleep(0.05)
        assert not more.done()
        ServerState.release(state, ["chat"])
        await asyncio.wait_for(more, 1.0)
        assert state._in_flight == {("p", 1): 2, ("q", 1): 1}

    asyncio.run(main())
