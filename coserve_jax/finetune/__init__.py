"""LoRA finetuning: training data, and (issue 4) token-level finetuning fused into the serving step."""
