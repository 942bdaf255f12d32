"""Shared fixtures: tiny random Hugging Face checkpoints written by `transformers` itself."""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# In-process tests read the library's log records with caplog (through the root logger), so the
# package does not give its logger a handler of its own here; servers the tests start configure
# their logging themselves.
os.environ.setdefault("COSERVE_JAX_CONFIGURE_LOGGING", "0")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Eight CPU devices for the tensor-parallel tests (read when jax first starts, so set before any
# test module imports it); single-device engines use the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests compile far more than they run (tiny models, many step shapes): without LLVM's
# backend optimizations an engine of test_engine.py built in 24.9 s instead of 33.5 s and its
# 8-request generation took 1.0 s instead of 0.5 s, with the same tokens. (HLO-level passes, which
# decide the numerics, are unchanged.) Servers and tools the tests start inherit the setting.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# One persistent XLA compilation cache for the whole run: every test process (pytest-xdist
# workers, and the servers and tools tests start, through $COSERVE_JAX_CACHE_DIR) compiles an
# executable once and loads it after that. Tests that check the cache itself use their own
# directory; the zero-recompilation checks count cache loads too (CompileCounter.requests).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("COSERVE_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"coserve-jax-test-xla-{_RUN}"))
from coserve_jax.engine.step import configure_compilation_cache  # noqa: E402  (after XLA_FLAGS)

configure_compilation_cache(os.environ["COSERVE_JAX_CACHE_DIR"])

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> pathlib.Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the third-party data in ../shared/data")
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=512)

FAMILIES = {
    # Llama 3.1: GQA 4:1, llama3 RoPE scaling. head_dim 16 with original context 64 puts RoPE frequencies
    # in all three llama3 bands (kept, interpolated, divided by `factor`).
    "llama31": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
        ),
        tie_word_embeddings=False,
    ),
    # Llama 3.2: tied embeddings with llama3 RoPE scaling and GQA.
    "llama32": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
        ),
        tie_word_embeddings=True,
    ),
    # Qwen2: q/k/v bias, tied embeddings, GQA 2:1.
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Mistral: GQA, no sliding window in use.
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None, head_dim=16),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised `transformers` model of a tiny config of the family (fp32, eval mode)."""
    import torch
    import transformers

    spec = {**TINY, **FAMILIES[family], **overrides}
    model_type = spec.pop("model_type")
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[
        model_type
    ]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[model_type]
    torch.manual_seed(seed)
    config = cfg_cls(**spec)
    model = model_cls(config).eval()
    # HF initialises biases and norms to constants; randomise them so the test can see mistakes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_peft_adapter(base, spec: dict, seed: int, out_dir, scale: float = 0.1):
    """A `peft` LoRA on a copy of `base` with random non-zero A and B, saved to `out_dir`; returns it (eval mode)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**spec, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: save a tiny model of `family` with `save_pretrained`, return (dir, torch model)."""
    cache: dict = {}

    def make(family: str, **save_kwargs):
        key = (family, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            model = make_hf_model(family)
            path = tmp_path_factory.mktemp(f"{family}_ckpt")
            model.save_pretrained(path, **save_kwargs)
            cache[key] = (path, model)
        return cache[key]

    return make


def hf_logits(model, sequences, **kwargs) -> list[np.ndarray]:
    """`transformers` logits for each sequence, run as one right-padded batch with an attention mask."""
    import torch

    n = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), n), dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kwargs).logits.float().numpy()
    return [out[i, : len(s)] for i, s in enumerate(sequences)]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def random_sequences(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def our_logits(model, sequences, adapter_ids=None, pad_to=None) -> list[np.ndarray]:
    """Our logits for each sequence, run as one packed batch (eager forward)."""
    import jax.numpy as jnp

    from coserve_jax.models import pack_sequences

    batch = pack_sequences(sequences, adapter_ids, pad_to=pad_to)
    return batch.unpack(np.asarray(model(*(jnp.asarray(a) for a in batch.arrays()))))
