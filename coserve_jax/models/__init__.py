"""Model layer: Hugging Face Llama / Qwen2 / Mistral checkpoints as one Flax NNX decoder.

Names are imported lazily (PEP 562) so that ``coserve_jax.lora`` and ``coserve_jax.models``
can import each other's submodules without an import cycle.
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
