"""``python -m coserve_jax.tools.parallel_check``: run one fixed co-serving workload and write what it
produced, to compare tensor-parallel sizes and single- against multi-host set-ups.

The workload is deterministic and small: a random model (8 attention heads, 2 KV heads, so
``tensor_parallel_size`` 1, 2, 4 or 8), a random LoRA adapter, greedy generation for prompts on
the base model and on the adapter, and a LoRA finetuning job (SGD, dropout, two optimizer steps)
training inside the same steps. Every process drives the engine the same way (what multi-host
JAX needs) and writes the same JSON: generated tokens, their logprobs, the job's losses and
gradient norms, and its final adapter weights' checksums.

Example, two hosts of 4 GPUs (run on each, with its own ``--process-id``)::

    python -m coserve_jax.tools.parallel_check --tensor-parallel-size 8 --out tp8.json \\
        --coordinator-address host0:1234 --num-processes 2 --process-id 0
"""

from __future__ import annotations

import argparse
import json
import sys

from coserve_jax.parallel.distributed import DistributedConfig, initialize_distributed


def check_config():
    """The workload's model: the tiny model with 8 attention heads and 2 KV heads, vocab 256."""
    from coserve_jax.models.config import ModelConfig
    from coserve_jax.models.tiny import TINY_HF_CONFIG

    return ModelConfig.from_hf_dict(dict(TINY_HF_CONFIG, num_attention_heads=8, num_key_value_heads=2, vocab_size=256))


def run(tensor_parallel_size: int, distributed: DistributedConfig | None = None, seed: int = 0, lead: bool = False) -> dict:
    """Build the engine and run the workload (see the module docstring). Returns the outputs.

    With ``lead`` (multi-host), only process 0 runs the workload, publishing its plans; the
    other processes follow (:meth:`~coserve_jax.engine.engine.Engine.follow`) and return the
    number of steps they ran.

    Raises:
        ValueError: a tensor-parallel size the devices or the model's heads do not allow.
    """
    initialize_distributed(distributed)
    import jax
    import numpy as np

    from coserve_jax import Engine, SamplingParams
    from coserve_jax.finetune.config import LoRAConfig
    from coserve_jax.finetune.data import TrainingExample
    from coserve_jax.lora.peft_io import LoRAModule, LoRAWeights
    from coserve_jax.models.lora_pool import LoRAPoolConfig
    from coserve_jax.models.config import LINEAR_MODULES
    from coserve_jax.models.loader import init_random
    from coserve_jax.parallel.mesh import make_mesh
    from coserve_jax.parallel.rules import ShardingRules

    config = check_config()
    rules = ShardingRules(config, make_mesh(tensor_parallel_size))
    model = init_random(config, seed, dtype="float32", lora=LoRAPoolConfig(2, 8), sharding=rules.sharding)
    engine = Engine(
        model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, num_kv_pages=64, token_buckets=(16, 32),
        seq_buckets=(4,), compilation_cache_dir=None, max_finetune_jobs=1, finetune_max_seq_len=64,
        finetune_seq_buckets=(64,), max_finetune_tokens=16, tensor_parallel_size=tensor_parallel_size,
    )
    if lead and jax.process_index() != 0:
        steps = engine.follow(timeout_s=600)
        return {"tensor_parallel_size": tensor_parallel_size, "process_index": jax.process_index(),
                "process_count": jax.process_count(), "followed_steps": steps}
    if lead:
        engine.lead()
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(config.num_layers):
        for m in LINEAR_MODULES:
            d_in, d_out = config.module_dims(m)
            modules[(layer, m)] = LoRAModule(
                rng.normal(0, 0.2, (d_in, 4)).astype(np.float32), rng.normal(0, 0.2, (4, d_out)).astype(np.float32), 8.0
            )
    engine.load_adapter("random", LoRAWeights(modules))
    examples = [
        TrainingExample(tuple(rng.integers(0, 256, n).tolist()), tuple([False] * 4 + [True] * (n - 4)), i + 1)
        for i, n in enumerate((40, 23, 60, 31))
    ]
    job = engine.create_finetuning_job(
        examples, lora=LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1), optimizer="sgd",
        learning_rate=0.5, gradient_accumulation_steps=2, max_steps=2, shuffle=False, max_grad_norm=None,
    )
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 30, 9)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, logprobs=1), [None, "random", None, "random"])
    engine.wait_for(job)
    weights = engine.adapter_weights(job)
    if lead:
        engine.stop_followers()
    return {
        "tensor_parallel_size": tensor_parallel_size,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "tokens": [o.token_ids for o in outs],
        "logprobs": [o.logprobs for o in outs],
        "job_status": job.status.value,
        "losses": [r.loss for r in job.loss_history],
        "grad_norms": [r.grad_norm for r in job.loss_history],
        "adapter_sums": {f"{layer}.{m}": [float(np.abs(w.a).sum()), float(np.abs(w.b).sum())] for (layer, m), w in sorted(weights.modules.items())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coserve_jax.tools.parallel_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write (each process writes its own: give each a path)")
    p.add_argument("--coordinator-address", help="host:port of process 0 (multi-host)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lead", action="store_true",
                   help="multi-host: process 0 runs the workload and publishes its plans; the others follow")
    args = p.parse_args(argv)
    dist = None
    if args.coordinator_address:
        dist = DistributedConfig(args.coordinator_address, args.num_processes, args.process_id)
    result = run(args.tensor_parallel_size, dist, args.seed, args.lead)
    with open(args.out, "w") as f:
        json.dump(result, f)
    what = f"followed {result['followed_steps']} steps" if "followed_steps" in result else f"job {result['job_status']}, losses {result['losses']}"
    print(f"process {result['process_index']}/{result['process_count']}: tp={args.tensor_parallel_size}, {what}; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
