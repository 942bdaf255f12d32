"""Median wall time of a synchronous decode step (16 running requests, no training chunk) on the
cpu-smoke shape (hidden 64, 2 layers, 32,000-token vocabulary) with finetuning enabled: what a
step pays for finetuning when no job is scheduled in it. Run it in two checkouts, interleaved:

    for i in 1 2 3; do (cd OLD && PYTHONPATH=. python bench/decode_step_finetune_engine.py old); \\
                       (cd NEW && PYTHONPATH=. python bench/decode_step_finetune_engine.py new); done
"""
import statistics, sys, time
import jax
from coserve_jax import Engine, SamplingParams
from coserve_jax.models.config import ModelConfig
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models.loader import init_random
hf = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=1, vocab_size=32000, max_position_embeddings=1024, torch_dtype="float32")
cfg = ModelConfig.from_hf_dict(hf)
model = init_random(cfg, 0, dtype="float32", lora=LoRAPoolConfig(2, 8, ("q_proj", "v_proj")))
eng = Engine(model, max_num_seqs=16, max_num_batched_tokens=256, token_buckets=(16, 32, 64, 128, 256), seq_buckets=(4, 8, 16),
             num_kv_pages=600, finetune_max_seq_len=512, finetune_seq_buckets=(128, 256, 512), async_scheduling=False,
             compilation_cache_dir=None)
for i in range(16):
    eng.add_request(list(range(10 + i, 60 + i)), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
for _ in range(5):
    eng.step()
ts = []
for _ in range(200):
    t = time.perf_counter(); eng.step(); jax.block_until_ready(eng.runner.k_cache); ts.append((time.perf_counter() - t) * 1e3)
print(f"{sys.argv[1]} decode step median {statistics.median(ts):.3f} ms")
