"""Engine.prompt_logprobs (Tinker's compute_logprobs) on SmolLM2-135M-Instruct (the GGUF file, fp32)
against transformers' log-softmax of the same file, one GSM8K-like sentence.

    python bench/prompt_logprobs_smollm2.py   # writes bench/results/prompt_logprobs_smollm2.json
"""
import json
import pathlib
import numpy as np, torch
from transformers import AutoModelForCausalLM
from coserve_jax import Engine
d = "../shared/data/models/smollm2_135m_instruct"; f = "SmolLM2-135M-Instruct.Q4_1.gguf"
eng = Engine(f"{d}/{f}", dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, token_buckets=(64,), seq_buckets=(4,),
             num_kv_pages=128, max_loras=2, max_lora_rank=8, max_finetune_jobs=1, finetune_max_seq_len=128,
             finetune_seq_buckets=(128,), max_finetune_tokens=64, max_model_len=512, compilation_cache_dir=None)
text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
(got,) = eng.prompt_logprobs([text])
ids = eng.tokenizer(text)["input_ids"]
hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
with torch.no_grad():
    lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
ref = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
out = {"tokens": len(ids), "first_entry": got[0], "max_abs_diff": float(np.abs(np.array(got[1:]) - ref).max()),
       "mean_abs_diff": float(np.abs(np.array(got[1:]) - ref).mean()), "command": "python bench/prompt_logprobs_smollm2.py"}
print(json.dumps(out))
pathlib.Path("bench/results/prompt_logprobs_smollm2.json").write_text(json.dumps(out, indent=1) + "\n")
