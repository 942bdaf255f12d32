"""What the HTTP handlers share: :class:`ServerState` (config, engine loop, tokenizer, files,
jobs, metrics), reached from a handler through :func:`server_state`."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from typing import Any

import jax
from fastapi import Request

from coserve_jax.engine import Engine
from coserve_jax.serve.auth import DEFAULT_PROJECT, OPEN, SHARED, KeyRing, Principal, hash_key, read_keys_file
from coserve_jax.serve.config import ServeConfig
from coserve_jax.serve.db import Database, schema
from coserve_jax.serve.engine_loop import EngineLoop
from coserve_jax.serve.errors import APIError, model_not_found
from coserve_jax.serve.files import FileStore
from coserve_jax.serve.jobs import JobManager
from coserve_jax.serve.metrics import ServerMetrics
from coserve_jax.serve.stat_logger import StatLogger

log = logging.getLogger("coserve_jax.serve")


class ServerState:
    """What the handlers share: config, engine loop, a tokenizer of their own, files, jobs, metrics.

    Args:
        config: the server config.
        engine: a built engine; from :meth:`start` on only the engine loop's thread uses it.
        served_model_name: the base model's name in the API.
    """

    def __init__(self, config: ServeConfig, engine: Engine, served_model_name: str):
        self.config = config
        self.engine = engine
        self.model_name = served_model_name
        self.max_model_len = engine.max_model_len
        self.max_prompt_tokens = min(config.limits.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
        self.vocab_size = engine.config.vocab_size
        self.max_logprobs = engine.max_logprobs
        # The engine thread detokenizes with engine.tokenizer; handlers' worker threads encode
        # with this copy (one Rust tokenizer must not be used from two threads at once).
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self._tok_lock = asyncio.Lock()
        self.metrics = ServerMetrics(served_model_name)
        self.metrics.watch(engine)
        out = os.path.abspath(config.output_dir)
        self.db = Database(config.database())
        static = read_keys_file(config.api_keys_file) if config.api_keys_file else {}
        if config.api_key:
            static[hash_key(config.api_key)] = Principal(DEFAULT_PROJECT, admin=True, key_id="api-key")
        self.keys = KeyRing(static, self.db)
        self.peft_limits = None
        """What an adapter loaded through the API must fit (checked before its tensors are read)."""
        if engine.model.lora is not None:
            from coserve_jax.lora.peft_io import PeftLimits

            mc, pool = engine.model.config, engine.model.lora.config
            self.peft_limits = PeftLimits(pool.max_lora_rank, mc.num_layers, {m: mc.module_dims(m) for m in pool.target_modules})
        self.owners: dict[str, str] = {name: SHARED for name in (config.lora_modules or {})}
        """Adapter name -> the project that loaded it (:data:`~coserve_jax.serve.auth.SHARED`: every
        project's); a fine-tuning job's model belongs to the job's project."""
        self.files = FileStore(os.path.join(out, "files"), self.db)
        layout = engine.finetune_layout
        self.jobs = JobManager(
            served_model_name, os.path.join(out, "jobs"), config.finetune,
            copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None,
            layout.max_seq_len if layout is not None and engine.tokenizer is not None else 0,
            engine.model.lora.config if engine.model.lora is not None else None,
            db=self.db,
        )
        self.restored_adapters = self._restore()
        self.stats = None if config.disable_log_stats else StatLogger(config.log_stats_interval_s)
        self.loop = EngineLoop(engine, on_step=self._on_step, on_idle=self.jobs.start_queued, on_finished=self._on_finished)
        self.shutting_down = False

    def _file_path(self, file_id: str) -> tuple[str, str]:
        obj = self.files.get(file_id)
        return self.files.path(file_id), obj["filename"]

    def _restore(self) -> list[str]:
        """Bring back what the database holds (before the engine loop starts): every job, the
        adapters of ended jobs and the adapters loaded through the API. Returns the adapter
        names loaded; one that cannot be loaded is logged and skipped."""
        from sqlalchemy import select

        from coserve_jax.lora.manager import AdapterError
        from coserve_jax.lora.peft_io import AdapterFormatError

        pending = self.jobs.restore(self._file_path) if self.engine.model.lora is not None else []
        with self.db.session() as s:
            for a in s.scalars(select(schema.Adapter).order_by(schema.Adapter.created_at)):
                pending.append((a.name, a.path))
                self.owners[a.name] = a.project
        loaded = []
        for name, path in pending:
            if name in self.engine.list_adapters():
                continue
            try:
                self.engine.load_adapter(name, path)
                loaded.append(name)
            except (AdapterError, AdapterFormatError, OSError, ValueError) as e:
                log.error("adapter %r from %s was not loaded again: %s", name, path, e)
        return loaded

    def remember_adapter(self, name: str, path: str, owner: str = SHARED) -> None:
        """Record an adapter loaded through the API by ``owner`` (a project, or
        :data:`~coserve_jax.serve.auth.SHARED`), loaded again after a restart."""
        import time

        self.owners[name] = owner
        with self.db.transaction() as s:
            s.merge(schema.Adapter(name=name, project=owner, path=os.path.abspath(path), created_at=int(time.time())))

    def forget_adapter(self, name: str) -> None:
        """Drop an unloaded adapter's record (an ended job's adapter stays with its job)."""
        self.owners.pop(name, None)
        with self.db.transaction() as s:
            row = s.get(schema.Adapter, name)
            if row is not None:
                s.delete(row)

    def _on_step(self, engine: Engine, outputs, seconds: float) -> None:
        self.metrics.observe_step(engine, seconds)
        if self.stats is not None:
            self.stats.observe(engine, outputs)
        self.jobs.sync(engine)
        self.jobs.start_queued(engine)

    def _on_finished(self, o) -> None:
        self.metrics.observe_finished(
            len(o.prompt_token_ids), len(o.token_ids), o.finish_reason, o.arrival_time, o.first_token_time,
            o.finish_time or o.arrival_time, o.first_scheduled_time,
        )

    def start(self) -> None:
        self.loop.start()
        if self.stats is not None:
            self.stats.start(self.engine)

    def stop(self) -> list[str]:
        """Checkpoint running jobs, abort open requests, stop the engine loop. Returns the
        checkpoint directories written."""
        self.shutting_down = True
        if self.stats is not None:
            self.stats.stop()
        written: list[str] = []

        def before_exit(engine):
            try:
                written.extend(self.jobs.checkpoint_running(engine))
            finally:
                if jax.process_count() > 1:
                    engine.stop_followers()

        self.loop.stop(before_exit)
        return written

    # ---- shared request helpers ------------------------------------------------------------------
    async def encode(self, fn, *args) -> Any:
        """Run a tokenizer function in a worker thread (one at a time on this tokenizer)."""
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send prompts as token ids", "prompt", "no_tokenizer")
        async with self._tok_lock:
            return await asyncio.to_thread(fn, *args)

    def owner_of(self, name: str) -> str:
        """The project an adapter belongs to (:data:`~coserve_jax.serve.auth.SHARED`: every project's)."""
        if name in self.owners:
            return self.owners[name]
        project = self.jobs.project_of_model(name)
        return project if project is not None else SHARED

    async def visible_adapters(self, who: Principal) -> list[str]:
        """The loaded adapters ``who`` may see and use, in the engine's order."""
        names = await self.loop.call(lambda e: e.list_adapters())
        return [n for n in names if who.sees(self.owner_of(n))]

    async def resolve_adapter(self, model: str, who: Principal = OPEN) -> str | None:
        """``None`` for the base model, else the adapter name.

        Raises:
            APIError: 404 for an unknown model, or another project's.
        """
        if model == self.model_name:
            return None
        if model in await self.visible_adapters(who):
            return model
        raise model_not_found(model)


def principal(request: Request) -> Principal:
    """Who sent the request (a FastAPI dependency: ``who = Depends(principal)``), as the guard
    middleware authenticated it."""
    return getattr(request.state, "principal", OPEN)


def server_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a FastAPI dependency: ``state = Depends(server_state)``)."""
    return request.app.state.server
