"""Model layer: Hugging Face Llama / Qwen2 / Mistral checkpoints as one Flax NNX decoder.

The decoder's multi-LoRA adapter pool (:mod:`coserve_jax.models.lora_pool`) lives here; adapter
files and slot management, which build on it, are :mod:`coserve_jax.lora`. Names are imported
lazily (PEP 562), so importing one submodule does not load the checkpoint readers.
"""

import importlib

_EXPORTS = {
    "PackedBatch": "batch",
    "pack_sequences": "batch",
    "LINEAR_MODULES": "config",
    "ModelConfig": "config",
    "RopeScaling": "config",
    "UnsupportedConfigError": "config",
    "CausalLM": "decoder",
    "param_shapes": "decoder",
    "LoRAPool": "lora_pool",
    "LoRAPoolConfig": "lora_pool",
    "CheckpointError": "loader",
    "init_abstract": "loader",
    "init_random": "loader",
    "load_model": "loader",
    "load_weights": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"coserve_jax.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'coserve_jax.models' has no attribute {name!r}")
