"""Multi-LoRA: the fixed-shape adapter pool, PEFT adapter files, and slot management."""

from coserve_jax.lora.pool import LoRAPool, LoRAPoolConfig, adapter_onehot, lora_delta

__all__ = ["LoRAPool", "LoRAPoolConfig", "adapter_onehot", "lora_delta"]
