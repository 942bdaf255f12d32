"""Run one finetuning job in a process of its own (for the kill-and-restart test).

Usage: python finetune_worker.py MODEL_DIR CHECKPOINT_DIR; prints ``step N`` after each optimizer
step (its checkpoint is already on disk then) and ``done`` at the end.
"""

import sys

from test_finetune_job import ENGINE_KW, RESUME_JOB, examples

from coserve_jax import Engine

if __name__ == "__main__":
    model_dir, ckpt = sys.argv[1], sys.argv[2]
    engine = Engine(model_dir, **ENGINE_KW)
    job = engine.create_finetuning_job(examples(engine.config.vocab_size), checkpoint_dir=ckpt, **RESUME_JOB)
    last = job.step
    while not job.done:
        engine.step()
        if job.step != last:
            last = job.step
            print(f"step {last}", flush=True)
    print("done", flush=True)
