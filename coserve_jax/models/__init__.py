"""Model layer: Hugging Face Llama / Qwen2 / Mistral checkpoints as one Flax NNX decoder."""

from coserve_jax.models.batch import PackedBatch, pack_sequences
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig, RopeScaling, UnsupportedConfigError
from coserve_jax.models.decoder import CausalLM, param_shapes
from coserve_jax.models.loader import CheckpointError, init_abstract, init_random, load_model, load_weights

__all__ = [
    "LINEAR_MODULES",
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "PackedBatch",
    "RopeScaling",
    "UnsupportedConfigError",
    "init_abstract",
    "init_random",
    "load_model",
    "load_weights",
    "pack_sequences",
    "param_shapes",
]
