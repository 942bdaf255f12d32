"""A finetuning job on the real model against what a PEFT user runs: SmolLM2-135M-Instruct (fp32),
16 GSM8K chat examples, LoRA r 8 on q/v, AdamW lr 1e-4 (no weight decay, no clipping, constant),
4 examples an optimizer step, the job's initial A/B copied into a ``peft`` model trained by a
plain ``torch`` loop (one padded batch of 4 a step, Hugging Face's mean token loss).

Losses agree to 1e-4. The adapters' changes after 4 steps agree to 2e-2 (Frobenius, relative):
AdamW divides each update by the root of its second moment, so fp32 noise on near-zero gradient
entries becomes a full-size step of either sign, and two fp32 implementations drift apart by more
than their gradients do."""

import itertools

import jax
import numpy as np
import pytest
import torch
from conftest import shared_data

from coserve_jax import Engine

GGUF = ("models", "smollm2_135m_instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
MODULES = ("q_proj", "v_proj")


@pytest.mark.slow
def test_job_matches_peft_and_torch_adamw(tmp_path):
    path = shared_data(*GGUF)
    train = shared_data("finetune", "gsm8k", "train.jsonl")
    subset = tmp_path / "train.jsonl"
    with open(train) as f:
        subset.write_text("".join(itertools.islice(f, 16)))
    engine = Engine(path, dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(64,),
                    seq_buckets=(4,), max_loras=2, max_lora_rank=8, compilation_cache_dir=None, finetune_max_seq_len=512,
                    finetune_seq_buckets=(256, 512))
    job = engine.create_finetuning_job(
        subset, columns={"prompt": "question", "completion": "answer"}, chat_template=True,
        lora={"r": 8, "lora_alpha": 16, "target_modules": list(MODULES), "lora_dropout": 0.0},
        optimizer="adamw", learning_rate=1e-4, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=None,
        gradient_accumulation_steps=4, max_steps=4, shuffle=False, seed=5,
    )
    init = jax.tree.map(np.asarray, job.params)  # {module: {"A": [L, in, r], "B": [L, r, out]}}
    examples = list(job.examples)
    engine.wait_for(job, use_tqdm=False)
    ours_losses = [r.loss for r in job.loss_history]
    ours = jax.tree.map(np.asarray, job.params)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(MODULES), lora_dropout=0.0))
    layers = model.base_model.model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for m in MODULES:
                lin = getattr(layer.self_attn, m)
                lin.lora_A["default"].weight.copy_(torch.from_numpy(init[m]["A"][i].T.copy()))
                lin.lora_B["default"].weight.copy_(torch.from_numpy(init[m]["B"][i].T.copy()))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    torch_losses = []
    for s in range(4):
        group = examples[4 * s:4 * s + 4]
        n = max(len(e.token_ids) for e in group)
        ids = torch.zeros((4, n), dtype=torch.long)
        mask = torch.zeros((4, n), dtype=torch.long)
        labels = torch.full((4, n), -100, dtype=torch.long)
        for i, e in enumerate(group):
            k = len(e.token_ids)
            ids[i, :k] = torch.tensor(e.token_ids)
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor([t if w else -100 for t, w in zip(e.token_ids, e.loss_mask)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch_losses.append(loss.item())

    np.testing.assert_allclose(ours_losses, torch_losses, rtol=1e-4)
    ours_delta, torch_delta = [], []
    for i, layer in enumerate(layers):
        for m in MODULES:
            lin = getattr(layer.self_attn, m)
            a = lin.lora_A["default"].weight.detach().numpy().T
            b = lin.lora_B["default"].weight.detach().numpy().T
            ours_delta += [ours[m]["A"][i] - init[m]["A"][i], ours[m]["B"][i] - init[m]["B"][i]]
            torch_delta += [a - init[m]["A"][i], b - init[m]["B"][i]]
    ours_delta = np.concatenate([d.ravel() for d in ours_delta]).astype(np.float64)
    torch_delta = np.concatenate([d.ravel() for d in torch_delta]).astype(np.float64)
    assert np.linalg.norm(torch_delta) > 0
    rel = np.linalg.norm(ours_delta - torch_delta) / np.linalg.norm(torch_delta)
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours_losses, torch_losses))
    print(f"losses ours {ours_losses} torch {torch_losses}: max relative difference {loss_err:.2e}; "
          f"adapter change: relative Frobenius difference {rel:.2e}")
    assert rel <= 2e-2, rel
