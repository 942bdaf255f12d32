"""Job settings: validation, the learning-rate schedules against transformers', LoRA
initialisation as peft draws it, step planning."""

import math

import numpy as np
import pytest
import torch
import transformers

from coserve_jax.finetune.config import FinetuneConfig, LoRAConfig
from coserve_jax.finetune.job import plan_steps
from coserve_jax.finetune.optim import init_lora, learning_rate_schedule
from coserve_jax.models import ModelConfig


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_match_transformers(kind):
    cfg = FinetuneConfig(learning_rate=3e-4, warmup_steps=5, lr_scheduler_type=kind)
    total = 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=total)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = learning_rate_schedule(cfg, total)
    np.testing.assert_allclose([float(ours(k)) for k in range(total)], ref, rtol=1e-5, atol=1e-12)


def test_lora_init_follows_peft():
    config = ModelConfig.from_hf_dict(dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    k = init_lora(config, LoRAConfig(r=8, target_modules=("q_proj", "down_proj")), seed=0)
    for m, d_in in (("q_proj", 256), ("down_proj", 512)):
        a = np.asarray(k[m]["A"])
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
        assert a.shape == (2, d_in, 8) and np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound
        assert not np.asarray(k[m]["B"]).any()
    g = np.asarray(init_lora(config, LoRAConfig(r=8, init_lora_weights="gaussian"), seed=0)["q_proj"]["A"])
    assert abs(g.std() - 1 / 8) < 0.01
    peft_layer = __import__("peft").LoraConfig(r=8)
    assert (peft_layer.r, peft_layer.lora_alpha, peft_layer.lora_dropout) == (LoRAConfig().r, LoRAConfig().lora_alpha, LoRAConfig().lora_dropout)


def test_validation_and_from_dict():
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRAConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig(target_modules=("lm_head",))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        FinetuneConfig(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneConfig(optimizer="lion")
    with pytest.raises(ValueError, match="unknown LoRA setting"):
        FinetuneConfig.from_dict({"lora": {"rank": 4}})
    cfg = FinetuneConfig.from_dict({"lora": {"r": 4, "target_modules": "all-linear", "use_rslora": True}, "max_steps": 3})
    assert cfg.lora.target_modules[-1] == "down_proj" and len(cfg.lora.target_modules) == 7
    assert cfg.lora.scaling == pytest.approx(cfg.lora.lora_alpha / 2)


def test_plan_steps_epochs_and_max_steps():
    assert plan_steps(FinetuneConfig(num_train_epochs=2, gradient_accumulation_steps=3), 10) == (20, 7)
    assert plan_steps(FinetuneConfig(num_train_epochs=0.5), 9) == (5, 5)
    assert plan_steps(FinetuneConfig(max_steps=4, gradient_accumulation_steps=2), 3) == (8, 4)
