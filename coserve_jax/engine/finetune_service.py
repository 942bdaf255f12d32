"""The finetuning jobs of one engine: create, feed, advance, end.

A job (:class:`~coserve_jax.finetune.job.FinetuneJob`) trains inside the serving steps: the
service hands the scheduler the job's training sequences (packs of examples; all those of the
current optimizer step, up to :data:`MAX_IN_FLIGHT`), records the loss of each forward chunk the
step ran, and, when the scheduler reports sequences done, runs the job's optimizer step (on the
:class:`~coserve_jax.engine.model_runner.ModelRunner`) once its accumulation group is complete,
then feeds the next sequences or ends the job. Validation passes
(:meth:`FinetuneService.start_evaluation`) are forward-only sequences of the same kind.

Each job takes one of ``max_finetune_jobs`` gradient-accumulator rows and one adapter slot;
ending a job (success, failure, cancel) frees the row. The activation store's rows are shared:
the scheduler hands them to sequences as their forward starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Sequence

import numpy as np

from coserve_jax.engine.config import EngineConfig
from coserve_jax.engine.model_runner import ModelRunner
from coserve_jax.finetune.checkpoint import JobCheckpointer
from coserve_jax.finetune.config import FinetuneConfig, LoRAConfig
from coserve_jax.finetune.data import TrainingExample, TrainingSet, load_dataset, truncate_examples
from coserve_jax.finetune.evaluation import Evaluation, scoring_examples
from coserve_jax.finetune.job import FinetuneError, FinetuneJob, JobStatus, plan_steps
from coserve_jax.finetune.optim import init_lora, learning_rate_schedule, make_optimizer, make_update_fn, pool_weights
from coserve_jax.finetune.training_run import TrainingRun, make_run_optimizer
from coserve_jax.lora.manager import AdapterError
from coserve_jax.models.config import ModelConfig
from coserve_jax.sched.outputs import SchedulerOutput
from coserve_jax.sched.scheduler import Scheduler

log = logging.getLogger("coserve_jax.engine")

MAX_IN_FLIGHT = 8
"""Most training sequences of one job (or validation pass) handed to the scheduler at once."""


class ChunkLoss:
    """A forward chunk's summed weighted loss: its sequence slot of a step's per-slot losses (or,
    ``slot`` ``None``, a train step's scalar loss), a device array read only when ``float()`` is
    taken (the job sums them at its optimizer step)."""

    __slots__ = ("losses", "slot")

    def __init__(self, losses, slot: int | None):
        self.losses, self.slot = losses, slot

    def __float__(self) -> float:
        host = np.asarray(self.losses)  # (a jax array keeps its host copy)
        return float(host if self.slot is None else host[self.slot])


class ChunkLogprobs:
    """A forward chunk's target logprobs: ``length`` entries from ``start`` of a step's
    per-slot logprobs (a device array, read only when :meth:`numpy` is called)."""

    __slots__ = ("logprobs", "start", "length")

    def __init__(self, logprobs, start: int, length: int):
        self.logprobs, self.start, self.length = logprobs, start, length

    def numpy(self) -> np.ndarray:
        """float32 ``[length]``."""
        return np.asarray(self.logprobs)[self.start:self.start + self.length]


class FinetuneService:
    """Lifecycle of the finetuning jobs and validation passes of an engine.

    Args:
        config: the engine's :class:`EngineConfig` (``config.finetune`` is ``None``: no finetuning).
        model_config: the model's :class:`ModelConfig`.
        runner: the device owner (optimizer steps, adapter slots, accumulator rows).
        scheduler: where training sequences are planned.
        tokenizer: tokenizes training files (``None``: examples must be token ids).
        model_path: the base model's path, recorded in exported adapters.
    """

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, runner: ModelRunner, scheduler: Scheduler,
        tokenizer=None, model_path: str | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.jobs: dict[str, FinetuneJob] = {}
        """Every job, oldest first."""
        self.evaluations: dict[str, Evaluation] = {}  # passes of Engine.evaluate in flight
        self.runs: dict = {}
        """Training runs (:class:`~coserve_jax.finetune.training_run.TrainingRun`) by id."""
        self.adapter_cache = None  # the engine's AdapterCache (set by the engine): parks unused adapters for a new job
        self.publish = None
        """Multi-host (process 0): a callable ``publish(kind, *args)`` that tells the other
        processes of every call made here that they must repeat (job creation and cancel,
        evaluation passes, gathers of a job's weights, checkpoints); ``None`` otherwise."""
        self._free_rows = list(range(config.finetune.max_jobs)) if config.finetune is not None else []

    @property
    def pack_len(self) -> int:
        """The longest pack of examples: ``min(finetune_max_seq_len, max_finetune_tokens)``, so an
        idle step holds a whole pack's forward. (Longer packs trained SmolLM2 alone 5-7% faster,
        in fewer steps, but beside inference requests under the hybrid policy the job trained
        12-18% fewer tokens/s: a layer of a longer sequence's backward is a coarser unit to fit
        into a step's slack.)"""
        return min(self.config.finetune.max_seq_len, self.config.max_finetune_tokens)

    @property
    def num_free_slots(self) -> int:
        """Jobs that can start now (of ``max_finetune_jobs``)."""
        return len(self._free_rows)

    @property
    def has_active_jobs(self) -> bool:
        """A job is unfinished, a training run has calls queued or running, or a validation or
        prompt-logprobs pass has sequences left."""
        return (any(not j.done for j in self.jobs.values()) or any(r.busy for r in self.runs.values() if not r.closed)
                or any(not e.done for e in self.evaluations.values()))

    def _require_finetuning(self) -> None:
        if self.config.finetune is None:
            raise FinetuneError("this engine has no finetuning (max_finetune_jobs=0 or no LoRA pool: max_loras=0)")

    def start_scoring(self, prompts: Sequence[Sequence[int]], adapter: str | None, on_done=None) -> Evaluation | None:
        """Queue a prompt-logprobs pass over ``prompts`` (token ids) with ``adapter``: a
        ``return_logprobs`` validation pass over :func:`~coserve_jax.finetune.evaluation.scoring_examples`
        (see :meth:`start_evaluation` for ``on_done``); read the result with
        :func:`~coserve_jax.finetune.evaluation.prompt_logprobs_of`. Returns ``None`` when no prompt
        has 2 tokens (nothing to score).

        Raises:
            FinetuneError: no finetuning in this engine. AdapterError: unknown adapter.
            ValueError: an empty prompt, or one longer than ``finetune_max_seq_len``.
        """
        self._require_finetuning()
        limit = self.config.finetune.max_seq_len
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens; prompt logprobs are computed for at most "
                                 f"finetune_max_seq_len={limit}")
        examples = scoring_examples(prompts)
        return self.start_evaluation(examples, adapter, None, return_logprobs=True, on_done=on_done) if examples else None

    # ---- creation ------------------------------------------------------------------------
    def create_job(
        self,
        training_data: str | os.PathLike | Sequence[TrainingExample],
        config: FinetuneConfig | None = None,
        *,
        adapter_name: str | None = None,
        job_id: str | None = None,
        eval_dataset: str | os.PathLike | Sequence[TrainingExample] | None = None,
        **settings,
    ) -> FinetuneJob:
        """Start a job (:meth:`coserve_jax.engine.engine.Engine.create_finetuning_job` documents
        the arguments and errors). Multi-host (``publish`` set): the other processes get the same
        resolved config, examples and id."""
        self._require_finetuning()
        cfg = self.resolve_config(config, settings)
        if self.adapter_cache is not None:  # a slot for its adapter, parking an unused one (before publishing it)
            self.adapter_cache.make_room()
        if self.publish is not None:
            training_data = self.examples(training_data, cfg)
            if eval_dataset is not None:
                eval_dataset = self.examples(eval_dataset, cfg)
            job_id = job_id or f"ftjob-{uuid.uuid4().hex[:12]}"
            self.publish("create_job", training_data, cfg, adapter_name, job_id, eval_dataset)
        lora = cfg.lora
        self._check_lora(lora)
        job_id = job_id or f"ftjob-{uuid.uuid4().hex[:12]}"
        if job_id in self.jobs:
            raise FinetuneError(f"a finetuning job with id {job_id!r} exists")
        name = adapter_name or job_id
        self._check_name(name)
        adapters = self.runner.adapters
        layout = self.config.finetune
        examples = self.examples(training_data, cfg)
        eval_examples = self.examples(eval_dataset, cfg) if eval_dataset is not None else None
        if not self._free_rows:
            raise FinetuneError(f"all {layout.max_jobs} finetuning job slots are busy (max_finetune_jobs)")
        _, total_steps = plan_steps(cfg, len(examples))
        tx = make_optimizer(cfg, total_steps)
        schedule = learning_rate_schedule(cfg, total_steps)
        mc = self.model_config
        update = self._update_fn(tx, schedule, lora.r)
        checkpointer = JobCheckpointer(cfg.checkpoint_dir, cfg.save_total_limit) if cfg.checkpoint_dir else None
        row = self._free_rows[0]
        job = FinetuneJob(
            job_id=job_id, adapter_name=name, examples=examples, config=cfg, grad_row=row, adapter_index=0,
            num_layers=mc.num_layers, layers_per_slice=layout.layers_per_slice,
            params=self.runner.place_job_params(init_lora(mc, lora, cfg.seed)), tx=tx,
            checkpointer=checkpointer, base_model_name_or_path=self.model_path, cancel_fn=self.cancel_job,
            pause_fn=self.pause_job, resume_fn=self.resume_job,
            eval_examples=eval_examples, truncated_examples=examples.truncated_examples,
            skipped_examples=examples.skipped_examples, pack_len=self.pack_len,
        )
        if cfg.resume:
            job.restore_latest()
        self.runner.compile_optimizer(job, update)
        self.runner.load_adapter(name, job.lora_weights())
        job.adapter_index = adapters.adapter_index(name)
        self._free_rows.remove(row)
        self.runner.zero_grad_row(row)
        self.jobs[job_id] = job
        if job.complete:
            self.end_job(job, JobStatus.SUCCEEDED)
        else:
            self._feed(job)
        return job

    def _check_lora(self, lora) -> None:
        pool = self.runner.model.lora.config
        if lora.r > pool.max_lora_rank:
            raise AdapterError(f"LoRA rank r={lora.r} exceeds the engine's max_lora_rank={pool.max_lora_rank}")
        missing = [m for m in lora.target_modules if m not in pool.target_modules]
        if missing:
            raise AdapterError(f"target_modules {missing} are not in the engine's LoRA pool {list(pool.target_modules)}")

    def _check_name(self, name: str) -> None:
        names = self.adapter_cache.names if self.adapter_cache is not None else self.runner.adapters.names
        if name in names:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")

    def _update_fn(self, tx, schedule, rank: int):
        """The optimizer step of a trainer of rank ``rank`` (:func:`make_update_fn` for this pool)."""
        pool = self.runner.model.lora.config
        return make_update_fn(tx, schedule, rank, pool.max_lora_rank, self.runner.model.dtype, self._slot_shapes())

    def _slot_shapes(self) -> dict:
        """``{module: (A shape, B shape)}`` of one slot of the engine's LoRA pool."""
        pool = self.runner.model.lora.config
        mc = self.model_config
        shapes = {}
        for m in pool.target_modules:
            d_in, d_out = mc.module_dims(m)
            shapes[m] = ((mc.num_layers, d_in, pool.max_lora_rank), (mc.num_layers, pool.max_lora_rank, d_out))
        return shapes

    def create_run(
        self, *, rank: int, seed: int, target_modules: tuple[str, ...], lora_alpha: float,
        adapter_name: str | None = None, run_id: str | None = None,
    ) -> TrainingRun:
        """Start a Tinker training run (:meth:`coserve_jax.engine.engine.Engine.create_training_run`
        documents the arguments and errors): an adapter slot, a gradient-accumulator row, fresh
        LoRA weights (PEFT's init, seeded) and AdamW state."""
        self._require_finetuning()
        if self.publish is not None:
            raise FinetuneError("training runs are not supported on a multi-host engine yet")
        lora = LoRAConfig(r=rank, lora_alpha=lora_alpha, target_modules=tuple(target_modules))
        self._check_lora(lora)
        if self.adapter_cache is not None:
            self.adapter_cache.make_room()
        run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        if run_id in self.runs or run_id in self.jobs:
            raise FinetuneError(f"a training run or job with id {run_id!r} exists")
        name = adapter_name or run_id
        self._check_name(name)
        if not self._free_rows:
            raise FinetuneError(f"all {self.config.finetune.max_jobs} finetuning slots are busy (max_finetune_jobs)")
        mc = self.model_config
        tx = make_run_optimizer()
        row = self._free_rows[0]
        run = TrainingRun(
            run_id=run_id, adapter_name=name, lora=lora, seed=seed, grad_row=row, adapter_index=0,
            num_layers=mc.num_layers, layers_per_slice=self.config.finetune.layers_per_slice,
            params=self.runner.place_job_params(init_lora(mc, lora, seed)), tx=tx, pack_len=self.pack_len,
            max_seq_len=self.config.finetune.max_seq_len, vocab_size=mc.vocab_size,
            base_model_name_or_path=self.model_path, on_submit=self._submitted, close_fn=self.close_run,
        )
        self.runner.compile_optimizer(run, self._update_fn(tx, lambda step: 0.0, rank))
        self.runner.load_adapter(name, run.lora_weights())
        run.adapter_index = self.runner.adapters.adapter_index(name)
        self._free_rows.remove(row)
        self.runner.zero_grad_row(row)
        self.runs[run_id] = run
        return run

    def load_run_state(self, run: TrainingRun, directory, optimizer: bool) -> None:
        """Load a :meth:`TrainingRun.save_state` checkpoint into ``run`` (after its earlier
        calls: call it from :meth:`TrainingRun.after_previous`) and write the weights into its
        adapter slot, so inference on its adapter sees them.

        Raises:
            RunError: see :meth:`TrainingRun.read_state`.
        """
        run.read_state(directory, optimizer)
        pool = self.runner.model.lora.config
        run.params = self.runner.place_job_params(run.params)
        self.runner.adapters.write_weights(
            run.adapter_index, pool_weights(run.params, run.lora.r, pool.max_lora_rank, self.runner.model.dtype,
                                            self._slot_shapes()))
        self.runner.refresh_state()

    def _submitted(self, run: TrainingRun) -> None:
        self._feed(run)

    def close_run(self, run: TrainingRun) -> None:
        """End a run (what :meth:`TrainingRun.close` calls): its calls fail, its row is freed."""
        self.scheduler.remove_training(run.id)
        self.runner.release_optimizer(run.id)
        run.closed = True
        run.fail_pending(f"training run {run.id} was closed")
        if run.grad_row not in self._free_rows:
            self._free_rows.append(run.grad_row)
            self._free_rows.sort()

    def _advance_runs(self) -> None:
        """Due optimizer steps of the runs, then their next sequences."""
        for run in self.runs.values():
            if run.closed:
                continue
            try:
                run.run_due_barriers()
                while run.optimizer_step_due:
                    run.prepare_optimizer_step()
                    self.runner.optimizer_step(run)
                    run.run_due_barriers()
            except Exception as e:
                run.fail_pending(f"optimizer step failed: {type(e).__name__}: {e}")
            self._feed(run)

    @staticmethod
    def resolve_config(config: FinetuneConfig | None, settings: dict) -> FinetuneConfig:
        """``config`` (default: the defaults) with ``settings`` overriding its fields.

        Raises:
            ValueError: bad settings.
        """
        cfg = config or FinetuneConfig()
        if settings:
            cfg = FinetuneConfig.from_dict({**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **settings})
        return cfg

    def examples(self, data, cfg: FinetuneConfig) -> TrainingSet:
        """A job's training or evaluation examples, fitted to ``finetune_max_seq_len``.

        Raises:
            FinetuneError: a file but no tokenizer. DataValidationError, ValueError: bad data.
        """
        max_len = self.config.finetune.max_seq_len
        vocab = self.model_config.vocab_size
        if isinstance(data, TrainingSet) and data and all(
            len(e.token_ids) <= max_len and all(0 <= t < vocab for t in e.token_ids) for e in data
        ):
            return data  # already read and fitted (by this method: it keeps its truncation counts)
        if isinstance(data, (str, os.PathLike)):
            if self.tokenizer is None:
                raise FinetuneError("this engine has no tokenizer: pass TrainingExample lists")
            return load_dataset(
                data, self.tokenizer, train_on_prompt=cfg.train_on_prompt, columns=cfg.columns,
                max_seq_len=max_len, chat_template=cfg.chat_template, truncation=cfg.truncation,
            )
        examples = list(data)
        if not examples:
            raise ValueError("no training examples")
        fitted = truncate_examples(examples, max_len, cfg.truncation)
        bad = [i for i, e in enumerate(fitted) if any(not 0 <= t < vocab for t in e.token_ids)]
        if bad:
            raise ValueError(f"examples {bad[:5]} hold token ids outside the vocabulary")
        return fitted

    def start_evaluation(self, data, adapter: str | None, config: FinetuneConfig | None, eval_id: str | None = None,
                         *, return_logprobs: bool = False, on_done=None) -> Evaluation:
        """Queue a validation pass of ``adapter`` (``None``: the base model) on ``data``; it runs
        as the engine steps (see :meth:`Engine.evaluate`). With ``return_logprobs`` it keeps every
        token's target logprob (:attr:`Evaluation.logprobs`); with ``on_done(evaluation)`` the
        engine ends the pass when its last sequence finished and then calls it (on the engine's
        thread), else the caller ends it (:meth:`end_evaluation`)."""
        self._require_finetuning()
        if adapter and self.adapter_cache is not None and adapter in self.adapter_cache.parked:
            self.adapter_cache.index(adapter)  # back into a slot (published before the pass is)
        if self.publish is not None:  # the other processes get the same examples and id
            data = self.examples(data, config or FinetuneConfig())
            eval_id = eval_id or f"eval-{uuid.uuid4().hex[:12]}"
            self.publish("start_evaluation", data, adapter, config, eval_id)
        index = self.runner.adapters.adapter_index(adapter) if adapter else 0
        examples = self.examples(data, config or FinetuneConfig())
        ev = Evaluation(eval_id or f"eval-{uuid.uuid4().hex[:12]}", examples, index, self.model_config.num_layers,
                        self.config.finetune.layers_per_slice, pack_len=self.pack_len, return_logprobs=return_logprobs,
                        on_done=on_done)
        self.evaluations[ev.id] = ev
        self._feed(ev)
        return ev

    def end_evaluation(self, ev: Evaluation) -> None:
        """Drop a pass (done or abandoned) and its sequence in flight."""
        if self.publish is not None:
            self.publish("end_evaluation", ev.id)
        self.evaluations.pop(ev.id, None)
        self.scheduler.remove_training(ev.id)

    # ---- a job's state on the host ---------------------------------------------------------
    def adapter_weights(self, job: FinetuneJob):
        """A job's current adapter weights on the host (:meth:`FinetuneJob.lora_weights`; on a
        multi-host engine every process joins the gather)."""
        if self.publish is not None:
            self.publish("fetch_adapter", job.id)
        return job.lora_weights()

    def export_adapter(self, job: FinetuneJob, path: str | os.PathLike) -> None:
        """Write a job's adapter as a PEFT directory (:meth:`FinetuneJob.export`; on a
        multi-host engine every process joins the gather of its weights, process 0 writes)."""
        if self.publish is not None:
            self.publish("fetch_adapter", job.id)
        job.export(path)

    def save_checkpoint(self, job: FinetuneJob) -> None:
        """Checkpoint a job now (:meth:`FinetuneJob.save_checkpoint`; every process of a
        multi-host engine writes its part)."""
        if self.publish is not None:
            self.publish("save_job_checkpoint", job.id)
        job.save_checkpoint()

    # ---- the step --------------------------------------------------------------------------
    def _owner(self, job_id):
        return self.jobs.get(job_id) or self.evaluations.get(job_id) or self.runs.get(job_id)

    def record_forward(self, plan: SchedulerOutput, ft_loss, ft_logprobs=None) -> None:
        """Give the owners of the plan's training chunks their chunks' losses (``ft_loss``: the
        step's per-slot losses, a device array; not synchronised here), and to those returning
        logprobs their chunks' slices of ``ft_logprobs`` (the step's per-finetuning-slot logprobs)."""
        n_inf = plan.num_inference_seqs
        at = 0
        for j, chunk in enumerate(plan.finetune, n_inf):
            owner = self._owner(chunk.job_id)
            if owner is not None:
                owner.add_forward_loss(chunk, ChunkLoss(ft_loss, j))
                if chunk.return_logprobs:
                    owner.add_logprobs(chunk, ChunkLogprobs(ft_logprobs, at, chunk.num_tokens))
            at += chunk.num_tokens

    def record_train(self, train, loss, logprobs=None) -> None:
        """Give the owner of a train step's sequence (:class:`~coserve_jax.sched.outputs.TrainSequence`)
        its loss (a device scalar; not synchronised here) and, if it returns logprobs, its rows'
        logprobs (``[N]`` of its length bucket)."""
        owner = self.jobs.get(train.job_id) or self.runs.get(train.job_id)
        if owner is not None:
            owner.add_forward_loss(train, ChunkLoss(loss, None))
            if train.return_logprobs:
                owner.add_logprobs(train, ChunkLogprobs(logprobs, 0, train.num_tokens))

    def advance(self) -> None:
        """Act on the training sequences the scheduler finished: optimizer steps, next
        sequences, finished jobs. One job's failure (e.g. a full disk at a checkpoint) ends it alone."""
        for seq in self.scheduler.pop_trained():
            run = self.runs.get(seq.job_id)
            if run is not None:
                if not run.closed:
                    run.sequence_done(seq)
                continue
            ev = self.evaluations.get(seq.job_id)
            if ev is not None:
                if not ev.sequence_done(seq):
                    self._feed(ev)
                elif ev.on_done is not None:
                    self.end_evaluation(ev)
                    try:
                        ev.on_done(ev)
                    except Exception:  # a caller's callback never stops the engine
                        log.exception("evaluation %s: on_done failed", ev.id)
                continue
            job = self.jobs.get(seq.job_id)
            if job is None or job.done:
                continue
            try:
                if job.sequence_done(seq):
                    self.runner.optimizer_step(job)
                if job.complete:
                    self.end_job(job, JobStatus.SUCCEEDED)
                else:
                    self._feed(job)
            except Exception as e:
                self.end_job(job, JobStatus.FAILED, f"{type(e).__name__}: {e}")
        if self.runs:
            self._advance_runs()

    def _feed(self, owner: FinetuneJob | Evaluation | TrainingRun) -> None:
        """Hand the scheduler the owner's next sequences, up to :data:`MAX_IN_FLIGHT` in flight."""
        in_flight = len(self.scheduler.training_sequences(owner.id))
        while in_flight < MAX_IN_FLIGHT:
            seq = owner.next_sequence()
            if seq is None:
                return
            self.scheduler.add_training_sequence(seq)
            in_flight += 1

    # ---- ending ----------------------------------------------------------------------------
    def end_job(self, job: FinetuneJob, status: JobStatus, error: str | None = None) -> None:
        """Stop a job's training, record its final status and free its gradient-accumulator row."""
        self.scheduler.remove_training(job.id)
        self.runner.release_optimizer(job.id)
        job.finish(status, error)
        if job.grad_row not in self._free_rows:
            self._free_rows.append(job.grad_row)
            self._free_rows.sort()

    def cancel_job(self, job: FinetuneJob) -> None:
        """End a job as cancelled (what :meth:`FinetuneJob.cancel` calls)."""
        if self.publish is not None:
            self.publish("cancel_job", job.id)
        self.end_job(job, JobStatus.CANCELLED)

    def pause_job(self, job: FinetuneJob) -> None:
        """Pause a running job (what :meth:`FinetuneJob.pause` calls): no further sequence is
        fed; those in flight finish."""
        if self.publish is not None:
            self.publish("pause_job", job.id)
        job.status = JobStatus.PAUSED

    def resume_job(self, job: FinetuneJob) -> None:
        """Resume a paused job (what :meth:`FinetuneJob.resume` calls): its next sequences are fed."""
        if self.publish is not None:
            self.publish("resume_job", job.id)
        job.status = JobStatus.RUNNING
        self._feed(job)

    def training_adapter(self, index: int) -> FinetuneJob | TrainingRun | None:
        """The unfinished job or open training run that trains adapter slot ``index``, if any."""
        for job in self.jobs.values():
            if job.adapter_index == index and not job.done:
                return job
        for run in self.runs.values():
            if run.adapter_index == index and not run.closed:
                return run
        return None
