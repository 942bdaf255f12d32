"""coserve-jax: LLM inference and LoRA finetuning co-served in one fused JAX/XLA step."""

__version__ = "0.1.0"
