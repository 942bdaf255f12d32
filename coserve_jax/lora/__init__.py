"""Multi-LoRA: PEFT adapter files and slot management over the model's fixed-shape adapter pool
(:mod:`coserve_jax.models.lora_pool`, re-exported here)."""

from coserve_jax.models.lora_pool import (
    LoRAPool, LoRAPoolConfig, LoRASegments, adapter_onehot, group_stacks, lora_delta, lora_segments, segmented_lora_delta,
)

__all__ = [
    "LoRAPool", "LoRAPoolConfig", "LoRASegments", "adapter_onehot", "group_stacks", "lora_delta", "lora_segments", "segmented_lora_delta",
]
