"""Tensor parallelism on CPU host devices: the collectives of the compiled executables, and how
far tp = 2, 4, 8 drift from the single-device run.

* Collectives: counted in the compiled HLO text of the serving step (one bucket), with and without
  a LoRA pool and with finetuning; of the backward slice with LoRA on ``down_proj`` only and on all
  seven modules (with each all-reduce's operand shape); and of a job's optimizer step.
* Drift: ``coserve_jax.tools.parallel_check.run`` (greedy generation on the base model and an adapter,
  a finetuning job of two SGD steps with dropout) at each size, against tp = 1.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/tp_collectives.py \\
        --out bench/results/tp_collectives_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from coserve_jax import Engine  # noqa: E402
from coserve_jax.finetune.config import LoRAConfig  # noqa: E402
from coserve_jax.finetune.data import TrainingExample  # noqa: E402
from coserve_jax.models.lora_pool import LoRAPoolConfig  # noqa: E402
from coserve_jax.models.config import LINEAR_MODULES  # noqa: E402
from coserve_jax.models.loader import init_random  # noqa: E402
from coserve_jax.parallel import check  # noqa: E402

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in OPS}


def all_reduce_shapes(hlo: str) -> list[str]:
    """The result types of the all-reduces (a tuple when XLA combined several into one)."""
    hlo = re.sub(r"/\*index=\d+\*/", "", hlo)  # long tuples number their elements
    types = re.findall(r"= (\([^=()]*?\)|\w+\[[\d,]*\])\S* all-reduce(?:-start)?\(", hlo)
    return sorted({re.sub(r"\{[\d,]*\}", "", t) for t in types})


def engine(tp: int, pool: bool, jobs: int, modules=LINEAR_MODULES) -> Engine:
    config = check.check_config()
    model = init_random(config, 0, dtype="float32", lora=LoRAPoolConfig(2, 8, tuple(modules)) if pool else None)
    return Engine(
        model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, num_kv_pages=64, token_buckets=(32,),
        seq_buckets=(4,), compilation_cache_dir=None, max_loras=2 if pool else 0, max_finetune_jobs=jobs,
        finetune_max_seq_len=64, finetune_seq_buckets=(64,), tensor_parallel_size=tp,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    step = []
    for tp in (2, 4, 8):
        for pool, jobs in ((False, 0), (True, 0), (True, 1)):
            e = engine(tp, pool, jobs)
            step.append({"tp": tp, "lora_pool": pool, "finetuning": bool(jobs), **count(e.runner.step_fn._compiled[e.buckets[0]].as_text())})
            print(step[-1], flush=True)
    backward = []
    for modules in (("down_proj",), LINEAR_MODULES):
        e = engine(4, True, 1, modules)
        hlo = e.runner.backward[64].as_text()
        job = e.create_finetuning_job(
            [TrainingExample(tuple(range(1, 40)), (False,) + (True,) * 38, 1)],
            lora=LoRAConfig(r=4, target_modules=list(modules)), max_steps=1,
        )
        upd = job._update.as_text()
        backward.append({
            "tp": 4, "lora_modules": list(modules), "backward_slice": count(hlo), "backward_all_reduce_shapes": all_reduce_shapes(hlo),
            "optimizer_step": count(upd), "optimizer_step_all_reduce_shapes": all_reduce_shapes(upd),
        })
        print(backward[-1], flush=True)
    runs = {tp: check.run(tp) for tp in (1, 2, 4, 8)}
    ref = runs[1]

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    drift = [
        {
            "tp": tp, "same_greedy_tokens": r["tokens"] == ref["tokens"],
            "max_abs_logprob_diff": float(np.max(np.abs(np.array(r["logprobs"]) - np.array(ref["logprobs"])))),
            "loss_rel_err": rel(r["losses"], ref["losses"]), "grad_norm_rel_err": rel(r["grad_norms"], ref["grad_norms"]),
            "adapter_abs_sum_rel_err": rel(list(r["adapter_sums"].values()), list(ref["adapter_sums"].values())),
        }
        for tp, r in runs.items() if tp > 1
    ]
    for d in drift:
        print(d, flush=True)
    result = {
        "command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/tp_collectives.py --out " + args.out,
        "jax": jax.__version__, "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
        "model": "tiny Llama: 2 layers, hidden 64, 8 query / 2 KV heads, vocab 256, float32; step bucket 32 tokens x 4 sequences",
        "step": step, "backward": backward, "drift_vs_tp1": drift,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
