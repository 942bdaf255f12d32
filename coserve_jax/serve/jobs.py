"""Fine-tuning jobs of the API (``/v1/fine_tuning/jobs``): OpenAI's job objects, events and
checkpoints over the engine's :class:`~coserve_jax.finetune.job.FinetuneJob` s.

A created job is validated whole before it is accepted (its file tokenized with the job's
settings; bad records come back as a 400 with their line numbers), then queued; the engine loop
starts queued jobs, oldest first, as the engine's job slots (``max_finetune_jobs``) free up.
Its adapter is loaded under the job's ``fine_tuned_model`` name from the start, so it is
servable while it trains (the latest optimizer step's weights) and after.

OpenAI's hyperparameters map to :class:`~coserve_jax.finetune.config.FinetuneConfig`:

| OpenAI | ours |
|---|---|
| ``n_epochs`` | ``num_train_epochs`` |
| ``batch_size`` | ``gradient_accumulation_steps`` (a micro-batch is one sequence) |
| ``learning_rate_multiplier`` | ``learning_rate = multiplier x base_learning_rate`` |
| ``seed`` | ``seed`` |

``"auto"`` keeps our default. Extensions: any other ``FinetuneConfig`` field in
``hyperparameters`` (``learning_rate``, ``max_steps``, ``warmup_steps``, ``lr_scheduler_type``,
``columns``, ``chat_template``, ``truncation``, ``eval_steps`` ...) and a top-level ``lora`` object
(``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``).

Records longer than the engine's ``finetune_max_seq_len`` are truncated (keeping the start) as
OpenAI's fine-tuning does; the job object's ``truncated_examples`` counts them and an event says
so (``hyperparameters.truncation = "error"`` rejects such a file instead). A ``validation_file``
(read like the training file) gives the validation loss every ``eval_steps`` optimizer steps
(default: at the end only) and at the end, as ``metrics`` events with ``valid_loss`` in their
data, in the checkpoints' ``metrics`` and in Prometheus.

Durability: every job, its events and checkpoints are rows of the server's database
(:mod:`coserve_jax.serve.db`), written in one transaction whenever they change. At start-up
(:meth:`JobManager.restore`) every job comes back: succeeded, failed and cancelled jobs as they
were (their exported adapters are loaded again by the server), queued, running and paused jobs
queued again; a job that had checkpoints resumes from its newest one (its optimizer state, data
order and loss history), a ``resumed`` event says so, and a paused job is paused again.

Threads: records are created by HTTP handlers and advanced by the engine loop (:meth:`JobManager.sync`);
a lock guards the record table, and handlers read records as plain data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

from sqlalchemy import delete, select

from coserve_jax.finetune.config import FinetuneConfig
from coserve_jax.finetune.data import DataValidationError, TrainingExample, load_dataset
from coserve_jax.finetune.job import FinetuneJob, JobStatus
from coserve_jax.serve.config import FinetuneDefaults
from coserve_jax.serve.db import Database
from coserve_jax.serve.db import schema as db
from coserve_jax.serve.errors import APIError
from coserve_jax.serve.auth import DEFAULT_PROJECT
from coserve_jax.serve.protocol import FinetuneJobCreate, new_id

log = logging.getLogger("coserve_jax.serve")
jobs_log = logging.getLogger("coserve_jax.serve.jobs")

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
EXTENSION_HYPERPARAMETERS = tuple(
    f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in ("lora", "checkpoint_dir", "resume", "seed")
)


def finetune_config(body: FinetuneJobCreate, defaults: FinetuneDefaults, checkpoint_dir: str) -> tuple[FinetuneConfig, dict]:
    """The job's :class:`FinetuneConfig` and the ``hyperparameters`` object it reports.

    Raises:
        APIError: 400 for an unknown or bad hyperparameter, an unsupported method.
    """
    hp = dict(body.hyperparameters or {})
    method = body.method or {"type": "supervised"}
    if method.get("type", "supervised") != "supervised":
        raise APIError(400, f"method type {method.get('type')!r} is not supported (only 'supervised')", "method.type", "unsupported_parameter")
    inner = (method.get("supervised") or {}).get("hyperparameters") or {}
    if not isinstance(inner, dict):
        raise APIError(400, "method.supervised.hyperparameters must be an object", "method", "invalid_value")
    hp.update(inner)
    unknown = sorted(set(hp) - set(OPENAI_HYPERPARAMETERS) - set(EXTENSION_HYPERPARAMETERS))
    if unknown:
        raise APIError(400, f"unknown hyperparameters {unknown}; known: {list(OPENAI_HYPERPARAMETERS)} and the extensions "
                       f"{list(EXTENSION_HYPERPARAMETERS)}", "hyperparameters", "invalid_value")
    settings: dict[str, Any] = {k: v for k, v in hp.items() if k in EXTENSION_HYPERPARAMETERS}

    def given(name):
        v = hp.get(name, "auto")
        return None if v == "auto" or v is None else v

    def number(name, kind):
        v = given(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or v <= 0):
            raise APIError(400, f"hyperparameters.{name} must be 'auto' or a positive {kind.__name__}, got {v!r}", f"hyperparameters.{name}", "invalid_value")
        return v

    if (n := number("n_epochs", int)) is not None:
        settings.setdefault("num_train_epochs", float(n))
    if (b := number("batch_size", int)) is not None:
        settings.setdefault("gradient_accumulation_steps", int(b))
    if (m := number("learning_rate_multiplier", float)) is not None:
        settings.setdefault("learning_rate", float(m) * defaults.base_learning_rate)
    settings.setdefault("learning_rate", defaults.base_learning_rate)
    if defaults.save_steps is not None:
        settings.setdefault("save_steps", defaults.save_steps)
    if body.seed is not None:
        settings["seed"] = int(body.seed) % 2**32
    lora = {k: v for k, v in (body.lora.model_dump() if body.lora else {}).items() if v is not None}
    if isinstance(lora.get("target_modules"), list):
        lora["target_modules"] = tuple(lora["target_modules"])
    try:
        cfg = FinetuneConfig.from_dict({**settings, "lora": lora, "checkpoint_dir": checkpoint_dir, "resume": True})
    except (TypeError, ValueError) as e:
        raise APIError(400, f"bad fine-tuning settings: {e}", "hyperparameters", "invalid_value") from None
    reported = {
        "n_epochs": _plain(cfg.num_train_epochs) if cfg.max_steps is None else "auto",
        "batch_size": cfg.gradient_accumulation_steps,
        "learning_rate_multiplier": cfg.learning_rate / defaults.base_learning_rate,
        **{k: v for k, v in hp.items() if k in EXTENSION_HYPERPARAMETERS},
    }
    return cfg, reported


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


@dataclasses.dataclass
class JobRecord:
    """One API job: what OpenAI's job object reports, and the engine job once started."""

    id: str
    model: str
    training_file: str
    fine_tuned_model: str
    config: FinetuneConfig
    hyperparameters: dict
    seed: int
    suffix: str | None
    metadata: dict | None
    created_at: int
    examples: list[TrainingExample] | None
    validation_file: str | None = None
    eval_examples: list[TrainingExample] | None = None
    truncated_examples: int = 0
    skipped_examples: int = 0
    status: str = "queued"
    engine_job: FinetuneJob | None = None
    error: dict | None = None
    finished_at: int | None = None
    adapter_path: str | None = None
    events: list[dict] = dataclasses.field(default_factory=list)
    project: str = DEFAULT_PROJECT
    # progress as last saved (what the job object reports when no engine job is attached)
    trained_tokens: int = 0
    step: int = 0
    total_steps: int | None = None
    tokens_per_second: float = 0.0
    valid_loss: float | None = None
    pause_on_start: bool = False
    _metrics_seen: int = 0
    _evals_seen: int = 0
    _events_saved: int = 0
    _checkpoints_saved: tuple[int, ...] = ()
    _checkpoint_evals: int = 0

    def event(self, message: str, level: str = "info", type_: str = "message", data: Any = None, t: float | None = None) -> None:
        """Add an event to the job's list (``GET .../events``) and log it (``coserve_jax.serve.jobs``)."""
        jobs_log.log({"warn": logging.WARNING, "error": logging.ERROR}.get(level, logging.INFO), "job %s: %s", self.id, message)
        self.events.append({
            "object": "fine_tuning.job.event", "id": f"ftevent-{self.id.removeprefix('ftjob-')}-{len(self.events)}",
            "created_at": int(t or time.time()), "level": level, "message": message, "data": data, "type": type_,
        })

    @property
    def shown_status(self) -> str:
        """The status the API reports: a job paused before a restart and not started since is ``paused``."""
        return "paused" if self.status == "queued" and self.pause_on_start else self.status

    def progress(self) -> None:
        """Copy the engine job's progress into the record (what is saved and reported)."""
        job = self.engine_job
        if job is None:
            return
        self.trained_tokens, self.step, self.total_steps = job.trained_tokens, job.step, job.total_steps
        self.tokens_per_second = job.tokens_per_s
        self.valid_loss = job.eval_history[-1].loss if job.eval_history else None

    def to_openai(self) -> dict:
        self.progress()
        job = self.engine_job
        return {
            "object": "fine_tuning.job", "id": self.id, "model": self.model, "created_at": self.created_at,
            "finished_at": self.finished_at, "fine_tuned_model": self.fine_tuned_model,
            "organization_id": "org-coserve", "result_files": [], "status": self.shown_status,
            "validation_file": self.validation_file, "training_file": self.training_file, "hyperparameters": self.hyperparameters,
            "method": {"type": "supervised", "supervised": {"hyperparameters": self.hyperparameters}},
            "trained_tokens": self.trained_tokens, "error": self.error, "seed": self.seed,
            "metadata": self.metadata, "integrations": [],
            "estimated_finish": int(job.estimated_finish) if job is not None and job.estimated_finish is not None else None,
            # extensions
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens_per_second": self.tokens_per_second,
            "adapter_path": self.adapter_path,
            "lora": dataclasses.asdict(self.config.lora),
            "truncated_examples": self.truncated_examples,
            "skipped_examples": self.skipped_examples,
            "valid_loss": self.valid_loss,
        }

    def to_row(self) -> db.Job:
        """The record as a :class:`~coserve_jax.serve.db.schema.Job` row."""
        self.progress()
        return db.Job(
            id=self.id, project=self.project, model=self.model, training_file=self.training_file,
            validation_file=self.validation_file, fine_tuned_model=self.fine_tuned_model, status=self.shown_status,
            config=_config_json(self.config), hyperparameters=self.hyperparameters, seed=self.seed, suffix=self.suffix,
            user_metadata=self.metadata, created_at=self.created_at, finished_at=self.finished_at, error=self.error,
            adapter_path=self.adapter_path, trained_tokens=int(self.trained_tokens), step=int(self.step),
            total_steps=self.total_steps, tokens_per_second=float(self.tokens_per_second), valid_loss=self.valid_loss,
            truncated_examples=self.truncated_examples, skipped_examples=self.skipped_examples,
        )

    @classmethod
    def from_row(cls, row: db.Job, events: list[db.JobEvent]) -> "JobRecord":
        """A record from its row and events (no examples, no engine job)."""
        rec = cls(
            id=row.id, model=row.model, training_file=row.training_file, fine_tuned_model=row.fine_tuned_model,
            config=FinetuneConfig.from_dict(row.config), hyperparameters=dict(row.hyperparameters), seed=row.seed,
            suffix=row.suffix, metadata=row.user_metadata, created_at=row.created_at, examples=None,
            validation_file=row.validation_file, truncated_examples=row.truncated_examples,
            skipped_examples=row.skipped_examples, status=row.status, error=row.error, finished_at=row.finished_at,
            adapter_path=row.adapter_path, project=row.project, trained_tokens=row.trained_tokens, step=row.step,
            total_steps=row.total_steps, tokens_per_second=row.tokens_per_second, valid_loss=row.valid_loss,
        )
        rec.events = [{
            "object": "fine_tuning.job.event", "id": f"ftevent-{row.id.removeprefix('ftjob-')}-{e.seq}",
            "created_at": e.created_at, "level": e.level, "message": e.message, "data": e.data, "type": e.type,
        } for e in events]
        rec._events_saved = len(rec.events)
        return rec


def _config_json(cfg: FinetuneConfig) -> dict:
    """``cfg`` as JSON-able data that :meth:`FinetuneConfig.from_dict` reads back."""
    d = dataclasses.asdict(cfg)
    d["lora"]["target_modules"] = list(cfg.lora.target_modules)
    if d.get("checkpoint_dir") is not None:
        d["checkpoint_dir"] = os.fspath(d["checkpoint_dir"])
    if d.get("columns") is not None:
        d["columns"] = dict(d["columns"])
    return json.loads(json.dumps(d))


class JobManager:
    """The API's fine-tuning jobs, queued and started on one engine.

    Args:
        base_model: the served base model name (the only ``model`` a job may start from).
        output_dir: jobs write ``output_dir/<job_id>/checkpoints`` and ``.../adapter``.
        defaults: the server's :class:`FinetuneDefaults`.
        tokenizer: a tokenizer for training files (not the engine thread's; tokenizing runs in
            worker threads).
        max_seq_len: the engine's ``finetune_max_seq_len`` (0: the engine cannot finetune).
        lora_pool: the engine's :class:`~coserve_jax.models.lora_pool.LoRAPoolConfig` (a job's adapter
            must fit it: rank, target modules).
        db: the server's :class:`~coserve_jax.serve.db.Database` (jobs, events, checkpoints).
    """

    def __init__(self, base_model: str, output_dir: str, defaults: FinetuneDefaults, tokenizer, max_seq_len: int,
                 lora_pool=None, db: Database | None = None):
        self.db = db
        self.base_model = base_model
        self.lora_pool = lora_pool
        self.output_dir = os.path.abspath(output_dir)
        self.defaults = defaults
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}

    # ---- handlers' side ----------------------------------------------------------------------------
    def prepare(self, body: FinetuneJobCreate, data_path: str, filename: str,
                validation: tuple[str, str] | None = None, project: str = DEFAULT_PROJECT) -> JobRecord:
        """Validate and tokenize a job (blocking: run it in a worker thread); not yet queued.

        Args:
            data_path, filename: the training file's local path and uploaded name.
            validation: ``(local path, uploaded name)`` of the validation file, if any.
        Raises:
            APIError: 400 for bad settings or training / validation records (with line numbers).
        """
        if self.max_seq_len == 0:
            raise APIError(400, "this server has no finetuning (max_finetune_jobs=0 or max_loras=0)", None, "finetuning_disabled")
        job_id = new_id("ftjob")
        cfg, reported = finetune_config(body, self.defaults, os.path.join(self.output_dir, job_id, "checkpoints"))
        pool = self.lora_pool
        if pool is not None and cfg.lora.r > pool.max_lora_rank:
            raise APIError(400, f"LoRA rank r={cfg.lora.r} exceeds this server's max_lora_rank={pool.max_lora_rank}", "lora.r", "invalid_value")
        missing = [m for m in cfg.lora.target_modules if pool is not None and m not in pool.target_modules]
        if missing:
            raise APIError(400, f"target_modules {missing} are not in this server's LoRA pool {list(pool.target_modules)}",
                           "lora.target_modules", "invalid_value")
        examples = self._read(cfg, data_path, filename, "training")
        eval_examples = self._read(cfg, *validation, "validation") if validation is not None else None
        suffix = body.suffix
        name = f"ft:{self.base_model}:{suffix + ':' if suffix else ''}{job_id}"
        return JobRecord(
            id=job_id, model=body.model, training_file=body.training_file, fine_tuned_model=name, config=cfg,
            hyperparameters=reported, seed=cfg.seed, suffix=suffix, metadata=body.metadata,
            created_at=int(time.time()), examples=examples, validation_file=body.validation_file,
            eval_examples=eval_examples, truncated_examples=examples.truncated_examples,
            skipped_examples=examples.skipped_examples, project=project,
        )

    def _read(self, cfg: FinetuneConfig, path: str, name: str, what: str):
        """Tokenize a training or validation file with the job's settings.

        Raises:
            APIError: 400 naming the uploaded file and every bad record's line.
        """
        try:
            with self._tokenizer_lock:
                return load_dataset(
                    path, self.tokenizer, train_on_prompt=cfg.train_on_prompt, columns=cfg.columns,
                    max_seq_len=self.max_seq_len, chat_template=cfg.chat_template, truncation=cfg.truncation,
                )
        except DataValidationError as e:  # the same message, naming the uploaded file rather than our copy
            raise APIError(400, f"{what} file {DataValidationError(name, e.errors)}", f"{what}_file", f"invalid_{what}_file") from None
        except RecursionError:
            raise APIError(400, f"{what} file {name}: a record is nested too deeply", f"{what}_file", f"invalid_{what}_file") from None

    # ---- the database ------------------------------------------------------------------------------
    def _save(self, rec: JobRecord, checkpoints: bool = False) -> None:
        """Write the job's row, its new events and (``checkpoints``) its checkpoint rows, in one transaction."""
        if self.db is None:
            return
        new_events = rec.events[rec._events_saved:]
        steps, evals = rec._checkpoints_saved, rec._checkpoint_evals
        job = rec.engine_job
        if checkpoints and job is not None and job.checkpointer is not None:
            steps, evals = tuple(job.checkpointer.all_steps()), len(job.eval_history)
        with self.db.transaction() as s:
            s.merge(rec.to_row())
            for i, e in enumerate(new_events, start=rec._events_saved):
                s.add(db.JobEvent(job_id=rec.id, seq=i, created_at=e["created_at"], level=e["level"], type=e["type"],
                                  message=e["message"], data=e["data"]))
            if (steps, evals) != (rec._checkpoints_saved, rec._checkpoint_evals):
                # a step's validation loss may come after its checkpoint: every row is rewritten
                losses = {r.step: r for r in job.loss_history}
                valid = {r.step: r.loss for r in job.eval_history}
                s.execute(delete(db.Checkpoint).where(db.Checkpoint.job_id == rec.id, db.Checkpoint.step.not_in(steps)))
                for step in steps:
                    r = losses.get(step)
                    s.merge(db.Checkpoint(job_id=rec.id, step=step, created_at=int(r.time) if r else int(time.time()),
                                          train_loss=r.loss if r else None, valid_loss=valid.get(step),
                                          path=os.path.join(job.checkpointer.directory, str(step))))
        rec._events_saved += len(new_events)
        rec._checkpoints_saved, rec._checkpoint_evals = steps, evals

    def restore(self, file_path) -> list[tuple[str, str]]:
        """Bring back every job of the database (at start-up, before the engine loop runs).

        Args:
            file_path: ``file_id -> (local path, uploaded name)`` of a stored file, raising
                :class:`APIError` for a file that no longer exists.
        Returns:
            ``(fine_tuned_model, adapter directory)`` of every ended job whose exported adapter
            is on disk, for the server to load again.
        """
        if self.db is None:
            return []
        with self.db.session() as s:
            rows = list(s.scalars(select(db.Job).order_by(db.Job.created_at, db.Job.id)))
            events = {}
            for e in s.scalars(select(db.JobEvent).order_by(db.JobEvent.job_id, db.JobEvent.seq)):
                events.setdefault(e.job_id, []).append(e)
            ckpts = {}
            for c in s.scalars(select(db.Checkpoint)):
                ckpts.setdefault(c.job_id, []).append(c.step)
        adapters = []
        for row in rows:
            try:
                rec = JobRecord.from_row(row, events.get(row.id, []))
            except (TypeError, ValueError) as e:  # settings an older version wrote that this one rejects
                log.error("job %s cannot be restored: %s", row.id, e)
                continue
            rec._checkpoints_saved = tuple(sorted(ckpts.get(row.id, [])))
            with self._lock:
                self._jobs[rec.id] = rec
            if rec.status in ("queued", "running", "paused"):
                was = rec.status
                try:
                    rec.examples = self._read(rec.config, *file_path(rec.training_file), "training")
                    if rec.validation_file:
                        rec.eval_examples = self._read(rec.config, *file_path(rec.validation_file), "validation")
                except APIError as e:
                    self._finish(rec, "failed", {"code": "resume_failed", "message": f"cannot resume: {e.message}", "param": None})
                else:
                    rec.status = "queued"
                    rec.pause_on_start = was == "paused"
                    rec.event(f"The server restarted; the {was} job was resumed and waits for a job slot",
                              type_="message", data={"event": "resumed", "status_before": was, "step": rec.step})
                self._save(rec)
            elif rec.status in ("succeeded", "cancelled") and rec.adapter_path and os.path.isdir(rec.adapter_path):
                adapters.append((rec.fine_tuned_model, rec.adapter_path))
        return adapters

    def add(self, rec: JobRecord) -> None:
        with self._lock:
            self._jobs[rec.id] = rec
        rec.event(f"Created fine-tuning job: {rec.id} ({len(rec.examples or ())} examples"
                  + (f", {len(rec.eval_examples)} validation examples)" if rec.eval_examples else ")"))
        if rec.truncated_examples or rec.skipped_examples:
            limit = self.max_seq_len
            rec.event(
                f"{rec.truncated_examples} training example(s) were longer than {limit} tokens and were truncated"
                + (f"; {rec.skipped_examples} had no trainable token left and were skipped" if rec.skipped_examples else ""),
                level="warn", data={"truncated_examples": rec.truncated_examples, "skipped_examples": rec.skipped_examples,
                                    "max_seq_len": limit},
            )

    def get(self, job_id: str, project: str | None = None) -> JobRecord:
        """A job (``project``: only that project's; ``None``: any).

        Raises:
            APIError: 404 for an unknown id or another project's job.
        """
        with self._lock:
            rec = self._jobs.get(job_id)
        if rec is None or (project is not None and rec.project != project):
            raise APIError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found")
        return rec

    def project_of_model(self, name: str) -> str | None:
        """The project of the job whose ``fine_tuned_model`` is ``name`` (``None``: no such job)."""
        with self._lock:
            for r in self._jobs.values():
                if r.fine_tuned_model == name:
                    return r.project
        return None

    def list(self, project: str | None = None) -> list[JobRecord]:
        """Every job of ``project`` (``None``: all), newest first."""
        with self._lock:
            recs = [r for r in self._jobs.values() if project is None or r.project == project]
        return sorted(recs, key=lambda r: (r.created_at, r.id), reverse=True)

    # ---- engine loop's side ------------------------------------------------------------------------
    def start_queued(self, engine) -> bool:
        """Start the oldest queued job if the engine has a free job row and an adapter slot it
        can have (a job waits while every slot is pinned by requests, jobs or evaluations).
        Returns whether it did."""
        with self._lock:
            queued = [r for r in self._jobs.values() if r.status == "queued"]
        if not queued or engine.num_free_finetune_slots == 0:
            return False
        rec = min(queued, key=lambda r: (r.created_at, r.id))
        self._start(engine, rec)
        return True

    def _start(self, engine, rec: JobRecord) -> None:
        try:
            rec.engine_job = engine.create_finetuning_job(rec.examples, rec.config, adapter_name=rec.fine_tuned_model, job_id=rec.id,
                                                          eval_dataset=rec.eval_examples or None)
        except Exception as e:  # a job that cannot start fails alone
            self._finish(rec, "failed", {"code": "start_failed", "message": f"{type(e).__name__}: {e}", "param": None})
            return
        rec.examples = rec.eval_examples = None
        rec.status = "running"
        job = rec.engine_job
        rec._metrics_seen, rec._evals_seen = len(job.loss_history), len(job.eval_history)  # (a resumed job's are reported)
        if job.base_model_name_or_path is None:  # a model built in code: its exports name the served model
            job.base_model_name_or_path = self.base_model
        if job.resumed_from_step:
            rec.event(f"Fine-tuning job resumed from the checkpoint of step {job.resumed_from_step}: {job.total_steps} "
                      f"optimizer steps, adapter {rec.fine_tuned_model}", data={"event": "resumed", "step": job.resumed_from_step})
        else:
            rec.event(f"Fine-tuning job started: {job.total_steps} optimizer steps, adapter {rec.fine_tuned_model}")
        if rec.pause_on_start and not job.done:
            job.pause()
            rec.status = "paused"
            rec.event("The job was paused (as it was before the restart)")
        rec.pause_on_start = False
        self._save(rec, checkpoints=True)
        if job.done:
            self.sync_one(engine, rec)

    def cancel(self, engine, job_id: str) -> JobRecord:
        """Cancel a queued or running job (engine thread). The adapter keeps the last optimizer
        step's weights and stays servable.

        Raises:
            APIError: 404 unknown id; 400 a job that already ended.
        """
        rec = self.get(job_id)
        if rec.status not in ("queued", "running", "paused"):
            raise APIError(400, f"job {job_id} has already {rec.status}", "fine_tuning_job_id", "job_finished")
        if rec.engine_job is not None:
            rec.engine_job.cancel()
            self.sync_one(engine, rec)
        else:
            self._finish(rec, "cancelled", None)
        return rec

    def pause(self, engine, job_id: str) -> JobRecord:
        """Pause a running job (engine thread; OpenAI's ``jobs.pause``): it trains no further
        sequence until resumed; its adapter keeps serving the last optimizer step's weights.

        Raises:
            APIError: 404 unknown id; 400 a job that is not running.
        """
        return self._switch(job_id, "running", "paused", "pause")

    def resume(self, engine, job_id: str) -> JobRecord:
        """Resume a paused job (engine thread; OpenAI's ``jobs.resume``).

        Raises:
            APIError: 404 unknown id; 400 a job that is not paused.
        """
        return self._switch(job_id, "paused", "running", "resume")

    def _switch(self, job_id: str, current: str, new: str, verb: str) -> JobRecord:
        rec = self.get(job_id)
        if rec.shown_status != current:
            raise APIError(400, f"job {job_id} is {rec.shown_status}: only a {current} job can be {verb}d",
                           "fine_tuning_job_id", "invalid_state")
        if rec.engine_job is not None:
            getattr(rec.engine_job, verb)()
            rec.status = new
        else:  # paused before a restart and not started since: it now starts unpaused
            rec.pause_on_start = False
        rec.event(f"The job was {verb}d")
        self._save(rec)
        return rec

    def sync(self, engine) -> None:
        """After a step: record new optimizer steps as metrics events and ended jobs' status."""
        with self._lock:
            running = [r for r in self._jobs.values() if r.status in ("running", "paused")]
        for rec in running:
            self.sync_one(engine, rec)

    def sync_one(self, engine, rec: JobRecord) -> None:
        """Record one job's new optimizer steps and validation losses; export it when it succeeded."""
        job = rec.engine_job
        history = job.loss_history
        for r in history[rec._metrics_seen:]:
            rec.event(
                f"Step {r.step}/{job.total_steps}: training loss={r.loss:.4f}", type_="metrics", t=r.time,
                data={"step": r.step, "train_loss": r.loss, "total_steps": job.total_steps, "learning_rate": r.learning_rate,
                      "grad_norm": r.grad_norm, "tokens": r.tokens},
            )
        rec._metrics_seen = len(history)
        for r in job.eval_history[rec._evals_seen:]:
            rec.event(
                f"Step {r.step}/{job.total_steps}: validation loss={r.loss:.4f}", type_="metrics", t=r.time,
                data={"step": r.step, "valid_loss": r.loss, "total_steps": job.total_steps, "valid_tokens": r.tokens},
            )
        rec._evals_seen = len(job.eval_history)
        if not job.done:
            if rec.events[rec._events_saved:] or job.step != rec.step or len(job.eval_history) != rec._checkpoint_evals:
                self._save(rec, checkpoints=True)
            return
        if job.status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED) and self.defaults.export_adapter:
            path = os.path.join(self.output_dir, rec.id, "adapter")
            try:
                engine.export_adapter(job, path)
                rec.adapter_path = path
            except OSError as e:
                rec.event(f"Could not export the adapter to {path}: {e}", level="warn")
        if job.status is JobStatus.SUCCEEDED:
            self._finish(rec, "succeeded", None)
        elif job.status is JobStatus.CANCELLED:
            self._finish(rec, "cancelled", None)
        else:
            self._finish(rec, "failed", {"code": "training_failed", "message": job.error or "failed", "param": None})

    def _finish(self, rec: JobRecord, status: str, error: dict | None) -> None:
        rec.status = status
        rec.error = error
        rec.finished_at = int(time.time())
        message = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled"}.get(
            status, f"The job failed: {error['message'] if error else ''}"
        )
        rec.event(message, level="error" if status == "failed" else "info")
        self._save(rec, checkpoints=True)

    def checkpoint_running(self, engine) -> list[str]:
        """Write a checkpoint of every running job (engine thread; at shutdown). Returns the
        checkpoint directories written."""
        written = []
        with self._lock:
            running = [r for r in self._jobs.values() if r.status in ("running", "paused")]
        for rec in running:
            job = rec.engine_job
            try:
                engine.save_job_checkpoint(job)
                written.append(job.checkpointer.directory)
                rec.event(f"Checkpoint of step {job.step} written at shutdown to {job.checkpointer.directory}")
                self._save(rec, checkpoints=True)
                log.info("job %s: checkpoint of step %d written to %s", rec.id, job.step, job.checkpointer.directory)
            except Exception as e:
                log.error("job %s: checkpoint at shutdown failed: %s", rec.id, e)
        return written

    def checkpoints(self, rec: JobRecord) -> list[dict]:
        """OpenAI checkpoint objects of the job's saved checkpoints, newest first (from the database)."""
        if self.db is None:
            return []
        with self.db.session() as s:
            rows = list(s.scalars(select(db.Checkpoint).where(db.Checkpoint.job_id == rec.id).order_by(db.Checkpoint.step.desc())))
        return [{
            "object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{rec.id.removeprefix('ftjob-')}-{c.step}",
            "created_at": c.created_at, "fine_tuning_job_id": rec.id, "step_number": c.step,
            "fine_tuned_model_checkpoint": f"{rec.fine_tuned_model}:ckpt-step-{c.step}",
            "metrics": {"step": c.step, "train_loss": c.train_loss, "valid_loss": c.valid_loss},
            "path": c.path,
        } for c in rows]
