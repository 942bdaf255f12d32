"""What the HTTP handlers share: :class:`ServerState` (config, database, keys, engine loop,
tokenizers, files, jobs, adapter owners, per-project admission, metrics), reached from a handler
through :func:`server_state`; who sent a request through :func:`principal`."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
from typing import Any

import jax
import numpy as np
from fastapi import Request
from sqlalchemy import select

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
    """What the handlers share: config, database, keys, engine loop, tokenizer copies, files, jobs,
    adapter owners, per-project admission, metrics. Building it opens (and migrates) the database
    and restores every job and API-loaded adapter it holds (:meth:`_restore`).

    Args:
        config: the server config.
        engine: a built engine; from :meth:`start` on only the engine loop's thread uses it.
        served_model_name: the base model's name in the API.
    Raises:
        ConfigError, FileNotFoundError: a bad ``api_keys_file``; sqlalchemy errors: the database
        cannot be opened.
    """

    def __init__(self, config: ServeConfig, engine: Engine, served_model_name: str):
        self.config = config
        self.engine = engine
        self.model_name = served_model_name
        from coserve_jax.serve import protocol

        protocol._Body.max_messages = config.limits.max_messages  # checked before the messages are validated
        self.max_model_len = engine.max_model_len
        self.max_prompt_tokens = min(config.limits.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
        self.vocab_size = engine.config.vocab_size
        self.memory_context_limit = memory_context_limit(engine, config.limits.step_memory_bytes)
        """With the reference attention: the longest prompt + completion (tokens) whose steps'
        attention scratch fits the memory budget (``None``: no such limit)."""
        self.max_logprobs = engine.max_logprobs
        # The engine thread detokenizes with engine.tokenizer; handlers' worker threads encode
        # with copies of it, one request at a time each (a Rust tokenizer must not be used from
        # two threads at once), so one slow request holds one copy, not every request.
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self._tokenizers: asyncio.Queue | None = None
        self._tokenizer_copies = [self.tokenizer] + [copy.deepcopy(self.tokenizer) for _ in range(config.tokenizer_workers - 1)] \
            if self.tokenizer is not None else []
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
        self.tinker = None
        """The Tinker training API's state (:class:`~coserve_jax.serve.tinker_service.TinkerService`),
        ``None`` on an engine without finetuning."""
        if engine.finetune_layout is not None:
            from coserve_jax.serve.tinker_service import TinkerService

            self.tinker = TinkerService(self)
        self.restored_adapters = self._restore()
        self.stats = None if config.disable_log_stats else StatLogger(config.log_stats_interval_s)
        self.loop = EngineLoop(engine, on_step=self._on_step, on_idle=self.jobs.start_queued, on_finished=self._on_finished)
        self.shutting_down = False
        self._in_flight: dict[tuple[str, int], int] = {}  # (project, priority) -> its sequences in the engine
        self._project_of: dict[str, tuple[str, int]] = {}  # engine request id -> (project, priority)
        self._admission: asyncio.Condition | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def _file_path(self, file_id: str) -> tuple[str, str]:
        obj = self.files.get(file_id)
        return self.files.path(file_id), obj["filename"]

    def _restore(self) -> list[str]:
        """Bring back what the database holds (before the engine loop starts): every job, the
        adapters of ended jobs and the adapters loaded through the API. Returns the adapter
        names loaded; one that cannot be loaded is logged and skipped."""
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

    # ---- per-project admission ---------------------------------------------------------------------
    @property
    def max_seqs_per_project(self) -> int:
        """Most sequences one project has in the engine at once (``limits.max_seqs_per_project``,
        default the engine's ``max_num_seqs``): the rest of its requests wait here, so another
        project's request queues in the engine behind at most this many, not behind all of them."""
        return self.config.limits.max_seqs_per_project or self.engine.engine_config.max_num_seqs

    async def admit(self, project: str, request_ids: list[str], priority: int = 0) -> None:
        """Wait until ``project`` may put ``len(request_ids)`` more sequences of ``priority``
        into the engine (always, when it has none there at this priority or a better one: its
        lower-ranked sequences do not hold back a higher-ranked request, which the engine's
        scheduler lets preempt them), then count them as in flight until each finishes."""
        if self._admission is None:
            self._admission = asyncio.Condition()
            self._event_loop = asyncio.get_running_loop()
        k, cap = len(request_ids), self.max_seqs_per_project
        async with self._admission:
            def room() -> bool:
                n = sum(c for (p, prio), c in self._in_flight.items() if p == project and prio <= priority)
                return n == 0 or n + k <= cap

            await self._admission.wait_for(room)
            key = (project, priority)
            self._in_flight[key] = self._in_flight.get(key, 0) + k
            for rid in request_ids:
                self._project_of[rid] = key

    def release(self, request_ids) -> None:
        """Sequences that finished or never reached the engine (any thread)."""
        projects = [self._project_of.pop(rid, None) for rid in request_ids]
        projects = [p for p in projects if p is not None]
        if not projects or self._event_loop is None:
            return

        async def _release():
            async with self._admission:
                for p in projects:
                    self._in_flight[p] -= 1
                    if self._in_flight[p] <= 0:
                        del self._in_flight[p]
                self._admission.notify_all()

        asyncio.run_coroutine_threadsafe(_release(), self._event_loop)

    def _on_finished(self, o) -> None:
        self.release([o.request_id])
        self.metrics.observe_finished(
            len(o.prompt_token_ids), len(o.token_ids), o.finish_reason, o.arrival_time, o.first_token_time,
            o.finish_time or o.arrival_time, o.first_scheduled_time,
        )

    def start(self) -> None:
        self.loop.start()
        if self.tinker is not None:
            self.tinker.start()
        if self.stats is not None:
            self.stats.start(self.engine)

    def begin_shutdown(self, grace_s: float) -> None:
        """A stop signal arrived: refuse new requests (503) at once, and abort what is still open
        shortly before uvicorn's grace period ends (``grace_s - 1``, or half of a shorter one), so
        every open request ends cleanly (streams: a final chunk and ``[DONE]``; others: a 503 in
        OpenAI's error shape) rather than being cut off. Thread-safe; later calls do nothing."""
        if self.shutting_down:
            return
        self.shutting_down = True
        delay = grace_s - 1.0 if grace_s >= 2.0 else grace_s / 2
        t = threading.Timer(max(0.0, delay), self.loop.abort_all)
        t.daemon = True
        t.start()

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
    async def encode(self, fn) -> Any:
        """Run ``fn(tokenizer)`` in a worker thread on one of ``tokenizer_workers`` tokenizer
        copies (waiting for a free one).

        Raises:
            APIError: 400 when the server has no tokenizer.
        """
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send prompts as token ids", "prompt", "no_tokenizer")
        if self._tokenizers is None:  # made on the event loop's thread
            self._tokenizers = asyncio.Queue()
            for t in self._tokenizer_copies:
                self._tokenizers.put_nowait(t)
        tok = await self._tokenizers.get()
        try:
            return await asyncio.to_thread(fn, tok)
        finally:
            self._tokenizers.put_nowait(tok)

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


def memory_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (bytes), or ``None`` where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_context_limit(engine: Engine, budget: int | None = None) -> int | None:
    """The longest context (tokens) a request may reach so that every step's reference-attention
    scratch (:func:`~coserve_jax.kernels.reference.scratch_bytes` at the largest step bucket)
    fits ``budget`` bytes (default: half of :func:`memory_available_bytes`). A step gathers the
    smallest width bucket holding its longest sequence, so the limit is a bucket width. ``None``:
    not the reference attention, every width fits, or nothing is known of the memory."""
    from coserve_jax.kernels.reference import page_width_buckets, scratch_bytes

    ec, mc = engine.engine_config, engine.config
    if ec.attention_impl != "reference":
        return None
    if budget is None:
        free = memory_available_bytes()
        if free is None:
            return None
        budget = free // 2
    t, s = max(b.num_tokens for b in ec.buckets), max(b.num_seqs for b in ec.buckets)
    item = np.dtype(engine.model.dtype).itemsize
    widths = [w * ec.page_size for w in page_width_buckets(ec.max_pages_per_seq, ec.page_size)]
    fits = [w for w in widths if scratch_bytes(t, s, w, mc.num_heads, mc.num_kv_heads, mc.head_dim, item) <= budget]
    if fits and fits[-1] == widths[-1]:
        return None
    if not fits:
        log.warning("even the narrowest attention gather (%d tokens) of the largest step needs more than the %d-byte "
                    "budget (limits.step_memory_bytes); requests up to it are served anyway", widths[0], budget)
    limit = min(fits[-1] if fits else widths[0], ec.max_model_len)
    log.info("attention scratch budget %d bytes: requests up to %d tokens of context (of %d)", budget, limit, ec.max_model_len)
    return limit


def principal(request: Request) -> Principal:
    """Who sent the request (a FastAPI dependency: ``who = Depends(principal)``), as the guard
    middleware authenticated it."""
    return getattr(request.state, "principal", OPEN)


def server_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a FastAPI dependency: ``state = Depends(server_state)``)."""
    return request.app.state.server
