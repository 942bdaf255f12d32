"""Multi-host followers: the processes other than 0 run what process 0's engine publishes.

Process 0 (:meth:`~coserve_jax.engine.engine.Engine.lead`) publishes every plan and every call
that changes device state on a :class:`~coserve_jax.parallel.channel.HostChannel`; a follower
applies each to its own engine (built with the same arguments), so the two run the same
compiled steps in the same order and the steps' collectives join them.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("coserve_jax.engine")


def follow(engine, timeout_s: float | None = None) -> int:
    """Run what process 0 publishes on ``engine`` until it publishes ``stop``. Returns the steps run.

    Raises:
        RuntimeError: on process 0, or a single-process job.
        TimeoutError: nothing published for ``timeout_s`` seconds.
    """
    from coserve_jax.parallel.channel import HostChannel

    if jax.process_count() < 2 or jax.process_index() == 0:
        raise RuntimeError("follow() is for processes other than 0 of a multi-process engine")
    channel = HostChannel()
    service = engine.finetuning
    evaluations: dict[str, object] = {}
    handlers = {
        "step": engine.step,
        "ensure_latency_model": engine.policy.ensure_latency_model,
        "load_adapter": engine.runner.load_adapter,
        "unload_adapter": engine.runner.unload_adapter,
        "create_job": lambda data, cfg, name, job_id, ev: service.create_job(data, cfg, adapter_name=name, job_id=job_id, eval_dataset=ev),
        "cancel_job": lambda job_id: service.cancel_job(service.jobs[job_id]),
        "pause_job": lambda job_id: service.pause_job(service.jobs[job_id]),
        "resume_job": lambda job_id: service.resume_job(service.jobs[job_id]),
        "fetch_adapter": lambda job_id: service.jobs[job_id].lora_weights(),  # joins the gather; process 0 writes
        "save_job_checkpoint": lambda job_id: service.jobs[job_id].save_checkpoint(),
        "start_evaluation": lambda data, adapter, cfg, eval_id: evaluations.__setitem__(
            eval_id, service.start_evaluation(data, adapter, cfg, eval_id)),
        "end_evaluation": lambda eval_id: service.end_evaluation(evaluations.pop(eval_id)),
    }
    steps = 0
    while True:
        kind, args = channel.receive(timeout_s)
        if kind == "stop":
            return steps
        try:
            handlers[kind](*args)
        except Exception as e:  # process 0 met the same error (it ran the same call)
            log.warning("follower: %s failed as on process 0: %s: %s", kind, type(e).__name__, e)
        steps += kind == "step"
