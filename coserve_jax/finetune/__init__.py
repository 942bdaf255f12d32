"""LoRA finetuning: training data, and token-level finetuning fused into the serving step."""
