"""The Tinker training API's server state: sessions, training runs (Tinker's "models"), futures,
sampler weights and sampling sessions, over the engine loop.

Each Tinker model is a :class:`~coserve_jax.finetune.training_run.TrainingRun` in the engine
(an adapter slot and a gradient row, trained inside the serving steps); its calls are submitted
in the client's ``seq_id`` order (the client numbers every ordered call of a training client and
may send them concurrently) and answered with a future id at once; ``retrieve_future`` long-polls
the result. ``save_weights_for_sampler`` writes the run's adapter as a PEFT directory under the
output directory and loads it as a servable adapter named by its ``tinker://`` path, which the
OpenAI routes serve too (to the same project). Sampling runs as ordinary engine requests.

Results are the official client's formats (:mod:`coserve_jax.serve.tinker_wire` for the two
protobuf ones). Everything a project makes is visible to that project only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import logging
import os
import pathlib
import secrets
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select

from coserve_jax.finetune.job import FinetuneError
from coserve_jax.finetune.training_run import AdamParams, RunError, RunFuture
from coserve_jax.lora.manager import AdapterError
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.serve import tinker_wire
from coserve_jax.serve.db import schema
from coserve_jax.serve.errors import APIError

log = logging.getLogger("coserve_jax.serve")

RETRIEVE_WAIT_S = 20.0
"""How long ``retrieve_future`` waits for a result before answering ``try_again`` (the client
polls again at once), seconds."""

SEQ_GAP_WAIT_S = 10.0
"""How long a call waits for the calls its ``seq_id`` says come first, seconds; after that it
runs anyway (a client that lost a call must not hang)."""

SESSION_TIMEOUT_S = 60.0
"""A session without a heartbeat for this long ends: its training runs are closed (their queued
calls fail, their finetuning slots are freed; saved weights stay). The client beats every 10 s."""

URL_TTL_S = 3600
"""How long a signed download URL is valid, seconds."""

DOWNLOAD_PREFIX = "/api/v1/weights_download/"
"""Where signed URLs point (served without an API key: the signature is the authorization)."""

LORA_ALPHA = 32.0
"""The alpha of every training run's LoRA (the scaling is ``alpha / rank``)."""


@dataclasses.dataclass
class _Future:
    project: str
    kind: str
    event: asyncio.Event
    content_type: str = "application/json"
    payload: Any = None  # bytes (protobuf) or a JSON-able dict
    error: str | None = None
    category: str = "user"


@dataclasses.dataclass
class _Model:
    model_id: str
    project: str
    session_id: str
    base_model: str
    rank: int
    train_attn: bool
    train_mlp: bool
    seed: int
    next_seq: int = 1
    order: asyncio.Condition | None = None
    sampler_saves: int = 0


def _iso(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def _user_error(message: str, status: int = 400) -> APIError:
    return APIError(status, message, None, "invalid_request_error")


class TinkerService:
    """Sessions, training runs, futures and sampling sessions of the Tinker routes.

    Args:
        state: the server's :class:`~coserve_jax.serve.state.ServerState` (engine loop, model
            name, adapter owners, output directory).
    """

    def __init__(self, state):
        self.state = state
        self.dir = os.path.join(os.path.abspath(state.config.output_dir), "tinker")
        self.sessions: dict[str, dict] = {}
        self.models: dict[str, _Model] = {}
        self.futures: dict[str, _Future] = {}
        self.samplers: dict[str, tuple[str, str | None]] = {}  # sampling session -> (project, adapter)
        self._reaper: asyncio.Task | None = None
        self.db = state.db
        with self.db.transaction() as s:  # runs of a previous process: their engine state is gone
            for row in s.scalars(select(schema.TinkerRun).where(schema.TinkerRun.closed_at.is_(None))):
                row.closed_at = int(time.time())

    def start(self) -> None:
        """Start ending sessions whose heartbeats stopped (call on the server's event loop)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_sessions())

    async def _reap_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, SESSION_TIMEOUT_S / 2))
            now = time.time()
            for sid, s in list(self.sessions.items()):
                if now - s["heartbeat"] > SESSION_TIMEOUT_S:
                    await self.end_session(sid)

    async def end_session(self, session_id: str) -> None:
        """End a session: close its training runs (their adapters stay servable)."""
        self.sessions.pop(session_id, None)
        for m in [m for m in self.models.values() if m.session_id == session_id]:
            await self.unload_model(m.project, m.model_id)

    async def unload_model(self, project: str, model_id: str) -> None:
        """Close a training run: its queued calls fail and its finetuning slot is freed."""
        m = self._model(project, model_id)

        def close(engine):
            run = engine.finetuning.runs.get(m.model_id)
            if run is not None:
                run.close()

        await self.state.loop.call(close)
        del self.models[model_id]
        await asyncio.to_thread(self._touch, model_id, True)

    def _touch(self, model_id: str, closed: bool = False) -> None:
        with self.db.transaction() as s:
            row = s.get(schema.TinkerRun, model_id)
            if row is not None:
                row.last_request_at = int(time.time())
                if closed:
                    row.closed_at = row.last_request_at

    # ---- sessions ------------------------------------------------------------------------------
    def create_session(self, project: str, tags: list[str], user_metadata: dict | None) -> str:
        sid = f"session-{uuid.uuid4().hex[:16]}"
        now = time.time()
        self.sessions[sid] = {"project": project, "created": now, "heartbeat": now, "tags": list(tags),
                              "user_metadata": user_metadata}
        return sid

    def heartbeat(self, project: str, session_id: str) -> None:
        s = self._session(project, session_id)
        s["heartbeat"] = time.time()

    def _session(self, project: str, session_id: str) -> dict:
        s = self.sessions.get(session_id)
        if s is None or s["project"] != project:
            raise _user_error(f"no session {session_id!r}", 404)
        return s

    def _model(self, project: str, model_id: str) -> _Model:
        m = self.models.get(model_id)
        if m is None or m.project != project:
            raise _user_error(f"no model {model_id!r}", 404)
        return m

    # ---- futures -------------------------------------------------------------------------------
    def _new_future(self, project: str, kind: str) -> tuple[str, _Future]:
        rid = f"req-{uuid.uuid4().hex[:20]}"
        fut = _Future(project, kind, asyncio.Event())
        self.futures[rid] = fut
        return rid, fut

    def _resolve(self, fut: _Future, payload: Any = None, content_type: str = "application/json",
                 error: str | None = None, category: str = "user") -> None:
        fut.payload, fut.content_type, fut.error, fut.category = payload, content_type, error, category
        fut.event.set()

    def _bridge(self, fut: _Future, convert) -> Any:
        """A :class:`RunFuture` callback (engine thread) that resolves ``fut`` on the event loop
        with ``convert(result)`` -> ``(payload, content_type)``."""
        loop = asyncio.get_running_loop()

        def done(rf: RunFuture) -> None:
            if rf.error is not None:
                loop.call_soon_threadsafe(self._resolve, fut, None, "application/json", rf.error, "user")
                return
            try:
                payload, ctype = convert(rf.result())
            except Exception as e:  # a bug converting a result fails that future alone
                log.exception("converting a Tinker result failed")
                loop.call_soon_threadsafe(self._resolve, fut, None, "application/json", f"{type(e).__name__}: {e}", "server")
                return
            loop.call_soon_threadsafe(self._resolve, fut, payload, ctype)
        return done

    async def retrieve(self, project: str, request_id: str, wait_s: float = RETRIEVE_WAIT_S) -> Response:
        """The future's result, an error record, or ``try_again`` if it is not done within ``wait_s``."""
        fut = self.futures.get(request_id)
        if fut is None or fut.project != project:
            raise _user_error(f"no future {request_id!r}", 404)
        try:
            await asyncio.wait_for(fut.event.wait(), wait_s)
        except asyncio.TimeoutError:
            return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        if fut.error is not None:
            return JSONResponse({"error": fut.error, "category": fut.category})
        if isinstance(fut.payload, bytes):
            return Response(fut.payload, media_type=fut.content_type)
        return JSONResponse(fut.payload)

    # ---- training runs ----------------------------------------------------------------------------
    def _insert(self, row) -> None:
        with self.db.transaction() as s:
            s.merge(row)

    async def create_model(self, project: str, session_id: str, base_model: str, lora: dict | None,
                           user_metadata: dict | None = None, model_seq_id: int | None = None) -> dict:
        """Start a training run; returns the untyped future (already resolved with the model id).

        Raises:
            APIError: 404 unknown session or base model, 400 a LoRA the engine cannot train.
        """
        self._session(project, session_id)
        if base_model != self.state.model_name:
            raise _user_error(f"base_model {base_model!r} is not served here; this server trains "
                              f"{self.state.model_name!r}", 404)
        lora = lora or {}
        rank = int(lora.get("rank", 32))
        seed = lora.get("seed")
        seed = int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little")
        train_attn, train_mlp = bool(lora.get("train_attn", True)), bool(lora.get("train_mlp", True))
        train_unembed = bool(lora.get("train_unembed", True))
        # the id the client derives itself when it creates a run by loading weights
        model_id = f"{session_id}:train:{model_seq_id}" if model_seq_id is not None else f"run-{uuid.uuid4().hex[:12]}"
        if model_id in self.models:
            raise _user_error(f"model {model_id!r} exists (model_seq_id {model_seq_id} was used)", 409)

        def create(engine):
            return engine.create_training_run(
                rank=rank, seed=seed, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed,
                lora_alpha=LORA_ALPHA, adapter_name=model_id, run_id=model_id)

        try:
            await self.state.loop.call(create)
        except (FinetuneError, AdapterError, ValueError) as e:
            raise _user_error(str(e)) from None
        now = int(time.time())
        row = schema.TinkerRun(id=model_id, project=project, session_id=session_id, base_model=base_model, rank=rank,
                               seed=seed, train_attn=train_attn, train_mlp=train_mlp, user_metadata=user_metadata,
                               created_at=now, last_request_at=now)
        await asyncio.to_thread(self._insert, row)
        self.state.owners[model_id] = project
        self.models[model_id] = _Model(model_id, project, session_id, base_model, rank, train_attn, train_mlp, seed,
                                       order=asyncio.Condition())
        rid, fut = self._new_future(project, "create_model")
        self._resolve(fut, {"model_id": model_id, "type": "create_model"})
        return {"request_id": rid, "model_id": model_id}

    def get_info(self, project: str, model_id: str) -> dict:
        m = self._model(project, model_id)
        return {"type": "get_info", "model_id": model_id, "model_name": m.base_model, "is_lora": True,
                "lora_rank": m.rank, "model_data": {"arch": "llama", "model_name": m.base_model,
                                                    "tokenizer_id": m.base_model}}

    async def _in_order(self, m: _Model, seq_id: int | None, submit) -> Any:
        """Run ``submit()`` (an engine-loop call) when every call before ``seq_id`` was submitted."""
        if not seq_id:
            return await submit()
        async with m.order:
            try:
                await asyncio.wait_for(m.order.wait_for(lambda: m.next_seq >= seq_id), SEQ_GAP_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("model %s: call %d ran before calls %d..%d arrived", m.model_id, seq_id, m.next_seq, seq_id - 1)
            try:
                return await submit()
            finally:
                m.next_seq = max(m.next_seq, seq_id + 1)
                m.order.notify_all()

    async def _queue(self, m: _Model, seq_id: int | None, rid: str, submit) -> dict:
        """Run ``submit(engine)`` on the engine loop in ``seq_id`` order; returns the untyped
        future of ``rid``. A call the run refuses (bad data, a closed run) drops the future and
        is a 400."""
        try:
            await self._in_order(m, seq_id, lambda: self.state.loop.call(submit))
        except (ValueError, TypeError, RunError) as e:
            del self.futures[rid]
            raise _user_error(str(e)) from None
        return {"request_id": rid, "model_id": m.model_id}

    async def forward_backward(self, project: str, req: dict) -> dict:
        """Queue a ``forward`` or ``forward_backward`` call (``req`` from
        :func:`~coserve_jax.serve.tinker_wire.parse_forward_backward`).

        Raises:
            APIError: 404 unknown model, 400 bad data (nothing is queued).
        """
        m = self._model(project, req["model_id"])
        rid, fut = self._new_future(project, "forward" if req["forward_only"] else "forward_backward")

        def convert(out):
            return tinker_wire.forward_backward_output(out.loss_fn_outputs, out.metrics), tinker_wire.PROTO_CONTENT_TYPE

        done = self._bridge(fut, convert)

        def submit(engine):
            run = engine.finetuning.runs[m.model_id]
            call = run.forward if req["forward_only"] else run.forward_backward
            call(req["data"], req["loss_fn"], req["loss_fn_config"]).add_done_callback(done)

        return await self._queue(m, req["seq_id"], rid, submit)

    async def optim_step(self, project: str, model_id: str, seq_id: int | None, adam: dict) -> dict:
        """Queue an ``optim_step`` with Tinker's ``AdamParams`` fields.

        Raises:
            APIError: 404 unknown model, 400 bad parameters.
        """
        m = self._model(project, model_id)
        try:
            params = AdamParams(**{k: float(v) for k, v in adam.items() if k != "type"})
        except (TypeError, ValueError) as e:
            raise _user_error(f"adam_params: {e}") from None
        rid, fut = self._new_future(project, "optim_step")
        done = self._bridge(fut, lambda out: ({"type": "optim_step", "metrics": out.metrics}, "application/json"))

        def submit(engine):
            engine.finetuning.runs[m.model_id].optim_step(params).add_done_callback(done)

        return await self._queue(m, seq_id, rid, submit)

    async def save_weights(self, project: str, model_id: str, seq_id: int | None, name: str | None, kind: str,
                           sampling_session: bool = False) -> dict:
        """After every earlier call of the run, write its adapter as a PEFT directory under the
        output directory: ``kind`` ``"sampler_weights"`` (``save_weights_for_sampler``; also
        loaded as a servable adapter named by its ``tinker://<model>/sampler_weights/<name>``
        path), ``"external_weights"`` (``save_weights_external``: downloadable by signed URLs) or
        ``"weights"`` (``save_state``: an orbax checkpoint of the weights, AdamW's state and the
        step, which ``load_weights`` takes).
        ``sampling_session`` (sampler weights saved without a name, as
        ``save_weights_and_get_sampling_client`` does): the result also names a new sampling
        session on them.

        Raises:
            APIError: 404 unknown model, 400 a bad name.
        """
        m = self._model(project, model_id)
        m.sampler_saves += 1
        name = name or f"{m.sampler_saves:06d}"
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
            raise _user_error(f"path {name!r}: use letters, digits, '-', '_' and '.'")
        path = f"tinker://{model_id}/{kind}/{name}"
        directory = self.checkpoint_dir(model_id, kind, name)
        rid, fut = self._new_future(project, f"save_{kind}")
        loop = asyncio.get_running_loop()

        def export(run):  # the engine thread, between two steps, after the run's earlier calls
            if kind == "weights":
                run.save_state(directory)
            else:
                run.export(directory)
            return directory

        def exported(rf: RunFuture) -> None:
            if kind == "sampler_weights":
                loop.call_soon_threadsafe(
                    lambda: loop.create_task(self._load_sampler(fut, rf, path, project, m.session_id if sampling_session else None)))
            else:
                loop.call_soon_threadsafe(lambda: loop.create_task(self._record_saved(fut, rf, path)))

        def submit(engine):
            engine.finetuning.runs[m.model_id].after_previous(export).add_done_callback(exported)

        return await self._queue(m, seq_id, rid, submit)

    async def _record_saved(self, fut: _Future, rf: RunFuture, path: str) -> None:
        if rf.error is not None:
            self._resolve(fut, error=rf.error, category="server")
            return
        run_id, kind, name = path.removeprefix("tinker://").split("/")
        size = await asyncio.to_thread(self._record_checkpoint, run_id, kind, name, rf.result())
        if kind == "weights":
            self._resolve(fut, {"path": path, "type": "save_weights"})
        else:
            self._resolve(fut, {"path": path, "size_bytes": size, "type": "save_weights_external"})

    def _record_checkpoint(self, model_id: str, kind: str, name: str, directory: str) -> int:
        """Record saved weights in the database (any thread); returns their size in bytes."""
        size = sum(f.stat().st_size for f in pathlib.Path(directory).rglob("*") if f.is_file())
        now = int(time.time())
        with self.db.transaction() as s:
            s.merge(schema.TinkerCheckpoint(run_id=model_id, kind=kind, name=name, path=directory, size_bytes=size,
                                            created_at=now))
            row = s.get(schema.TinkerRun, model_id)
            if row is not None:
                row.last_request_at = now
        return size

    def checkpoint_dir(self, model_id: str, kind: str, name: str) -> str:
        """Where a run's saved weights of ``kind`` named ``name`` live."""
        return os.path.join(self.dir, model_id, kind, name)

    # ---- listing (the RestClient's training runs and checkpoints) -----------------------------------
    _TYPES = {"sampler_weights": "sampler", "external_weights": "external", "weights": "training"}


    def _checkpoint_json(self, c) -> dict:
        return {"checkpoint_id": f"{c.kind}/{c.name}", "checkpoint_type": self._TYPES[c.kind],
                "time": _iso(c.created_at), "tinker_path": f"tinker://{c.run_id}/{c.kind}/{c.name}",
                "size_bytes": c.size_bytes, "public": False}

    def _run_json(self, s, run) -> dict:
        ckpts = list(s.scalars(select(schema.TinkerCheckpoint).where(schema.TinkerCheckpoint.run_id == run.id)
                               .order_by(schema.TinkerCheckpoint.created_at)))
        sampler = [c for c in ckpts if c.kind == "sampler_weights"]
        return {"training_run_id": run.id, "base_model": run.base_model, "model_owner": run.project, "is_lora": True,
                "corrupted": False, "lora_rank": run.rank, "last_request_time": _iso(run.last_request_at),
                "last_checkpoint": self._checkpoint_json(ckpts[-1]) if ckpts else None,
                "last_sampler_checkpoint": self._checkpoint_json(sampler[-1]) if sampler else None,
                "user_metadata": run.user_metadata}

    def list_runs(self, project: str, limit: int, offset: int) -> dict:
        """The project's training runs, newest first (Tinker's ``TrainingRunsResponse``)."""
        with self.db.session() as s:
            q = select(schema.TinkerRun).where(schema.TinkerRun.project == project)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(schema.TinkerRun.created_at.desc(), schema.TinkerRun.id).offset(offset).limit(limit))
            runs = [self._run_json(s, r) for r in rows]
        return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    def get_run(self, project: str, run_id: str) -> dict:
        """One run (Tinker's ``TrainingRun``). Raises APIError 404 for another project's."""
        with self.db.session() as s:
            run = s.get(schema.TinkerRun, run_id)
            if run is None or run.project != project:
                raise _user_error(f"no training run {run_id!r}", 404)
            return self._run_json(s, run)

    def list_checkpoints(self, project: str, run_id: str) -> dict:
        """A run's saved weights, oldest first (Tinker's ``CheckpointsListResponse``)."""
        with self.db.session() as s:
            run = s.get(schema.TinkerRun, run_id)
            if run is None or run.project != project:
                raise _user_error(f"no training run {run_id!r}", 404)
            rows = list(s.scalars(select(schema.TinkerCheckpoint).where(schema.TinkerCheckpoint.run_id == run_id)
                                  .order_by(schema.TinkerCheckpoint.created_at)))
            return {"checkpoints": [self._checkpoint_json(c) for c in rows]}

    # ---- downloads -----------------------------------------------------------------------------------
    def _secret(self) -> bytes:
        path = pathlib.Path(self.dir) / "url-signing-key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return path.read_bytes()

    def _signature(self, rel: str, expires: int) -> str:
        return hmac.new(self._secret(), f"{rel}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def external_urls(self, project: str, model_id: str, name: str, base_url: str) -> dict:
        """Signed download URLs (valid :data:`URL_TTL_S`) of every file of saved external weights
        (``GET /api/v1/training_runs/{model}/checkpoints/external_weights/{name}/external_weights_urls``).

        Raises:
            APIError: 404 another project's run or no such weights.
        """
        with self.db.session() as s:
            run = s.get(schema.TinkerRun, model_id)
            ckpt = s.get(schema.TinkerCheckpoint, (model_id, "external_weights", name))
        if run is None or run.project != project:
            raise _user_error(f"no training run {model_id!r}", 404)
        if ckpt is None or not pathlib.Path(ckpt.path).is_dir():
            raise _user_error(f"no external weights tinker://{model_id}/external_weights/{name}", 404)
        root = pathlib.Path(ckpt.path)
        expires = int(time.time() + URL_TTL_S)
        urls = {}
        for f in sorted(root.rglob("*")):
            if f.is_file():
                rel = f"{model_id}/external_weights/{name}/{f.relative_to(root).as_posix()}"
                urls[f.relative_to(root).as_posix()] = (
                    f"{base_url.rstrip('/')}{DOWNLOAD_PREFIX}{rel}?expires={expires}&signature={self._signature(rel, expires)}")
        return {"urls": urls, "expires": _iso(expires)}

    def download_path(self, rel: str, expires: int, signature: str) -> str:
        """The file a signed URL names.

        Raises:
            APIError: 403 a bad or expired signature, 404 no such file.
        """
        if expires < time.time() or not hmac.compare_digest(signature, self._signature(rel, expires)):
            raise APIError(403, "the download URL is invalid or expired", None, "forbidden")
        root = pathlib.Path(self.dir).resolve()
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            raise _user_error("no such file", 404)
        return str(path)

    async def load_weights(self, project: str, path: str, optimizer: bool, model_id: str | None, seq_id: int | None,
                           session_id: str | None, model_seq_id: int | None, user_metadata: dict | None) -> dict:
        """Tinker's ``load_state`` (into ``model_id``'s run, after its earlier calls) or
        create-via-load (a new run of ``session_id`` / ``model_seq_id`` with the checkpoint's
        LoRA shape): the weights of a ``save_state`` checkpoint, with ``optimizer`` also AdamW's
        state and step.

        Raises:
            APIError: 404 no such checkpoint (or another project's), 400 a bad path or a shape
                that does not match.
        """
        try:
            src_run, kind, name = path.removeprefix("tinker://").split("/")
        except ValueError:
            raise _user_error(f"path {path!r} is not tinker://<run>/weights/<name>") from None
        if not path.startswith("tinker://") or kind != "weights":
            raise _user_error(f"path {path!r}: load_weights takes a save_state checkpoint (tinker://<run>/weights/<name>)")
        with self.db.session() as s:
            src = s.get(schema.TinkerRun, src_run)
            ckpt = s.get(schema.TinkerCheckpoint, (src_run, kind, name))
            src = None if src is None else (src.project, src.base_model, src.rank, src.train_attn, src.train_mlp, src.seed)
        if src is None or src[0] != project or ckpt is None:
            raise _user_error(f"no checkpoint {path!r}", 404)
        directory = ckpt.path
        if model_id is None:  # create-via-load: a new run shaped like the checkpoint's
            if session_id is None or model_seq_id is None:
                raise _user_error("load_weights needs model_id, or session_id and model_seq_id")
            created = await self.create_model(project, session_id, src[1], {
                "rank": src[2], "seed": src[5], "train_attn": src[3], "train_mlp": src[4], "train_unembed": False},
                user_metadata, model_seq_id)
            model_id = created["model_id"]
            seq_id = None
        m = self._model(project, model_id)
        rid, fut = self._new_future(project, "load_weights")
        done = self._bridge(fut, lambda _: ({"path": path, "model_id": m.model_id, "type": "load_weights"}, "application/json"))

        def submit(engine):
            run = engine.finetuning.runs[m.model_id]
            run.after_previous(lambda r: engine.finetuning.load_run_state(r, directory, optimizer)).add_done_callback(done)

        return await self._queue(m, seq_id, rid, submit)

    async def _load_sampler(self, fut: _Future, rf: RunFuture, path: str, project: str, session: str | None) -> None:
        """Load exported sampler weights as the adapter ``path`` (replacing an older save of the
        same name) and resolve the save's future (with a new sampling session of ``session`` on
        them, if given)."""
        if rf.error is not None:
            self._resolve(fut, error=rf.error, category="server")
            return
        directory = rf.result()

        def load(engine):
            if path in engine.list_adapters():
                engine.unload_adapter(path)
            engine.load_adapter(path, directory)

        try:
            await self.state.loop.call(load)
        except Exception as e:  # (no slot can be freed: every adapter is in use)
            self._resolve(fut, error=f"{type(e).__name__}: {e}", category="server")
            return
        self.state.remember_adapter(path, directory, project)
        run_id, _, name = path.removeprefix("tinker://").split("/")
        await asyncio.to_thread(self._record_checkpoint, run_id, "sampler_weights", name, directory)
        result = {"path": path, "type": "save_weights_for_sampler"}
        if session is not None:
            sid = f"sampler-{uuid.uuid4().hex[:16]}"
            self.samplers[sid] = (project, path)
            result["sampling_session_id"] = sid
        self._resolve(fut, result)

    # ---- sampling ----------------------------------------------------------------------------------
    def _adapter_for(self, project: str, model_path: str | None, base_model: str | None) -> str | None:
        if model_path:
            if model_path not in self.state.owners or self.state.owners[model_path] != project:
                raise _user_error(f"no sampler weights at {model_path!r}", 404)
            return model_path
        if base_model not in (None, self.state.model_name):
            raise _user_error(f"base_model {base_model!r} is not served here", 404)
        return None

    def sampler(self, project: str, sampler_id: str) -> dict:
        """Tinker's ``GetSamplerResponse`` of a sampling session."""
        owner, adapter = self.samplers.get(sampler_id, (None, None))
        if owner != project:
            raise _user_error(f"no sampling session {sampler_id!r}", 404)
        return {"sampler_id": sampler_id, "base_model": self.state.model_name, "model_path": adapter}

    async def _score(self, tokens: list[int], adapter: str | None) -> asyncio.Future:
        """Start a prompt-logprobs pass of ``tokens`` on ``adapter`` (``None``: the base model) in
        the engine; returns a future of its :func:`~coserve_jax.finetune.evaluation.prompt_logprobs_of`
        list (resolved on this event loop when the pass is done).

        Raises:
            APIError: 400 a prompt the pass cannot take (too long, no finetuning in this engine).
        """
        from coserve_jax.finetune.evaluation import prompt_logprobs_of

        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        if len(tokens) < 2:
            done.set_result([[None] * len(tokens)])
            return done

        def finished(ev) -> None:  # on the engine's thread
            result = prompt_logprobs_of([tokens], ev)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        def start(engine) -> None:
            engine.finetuning.start_scoring([tokens], adapter, on_done=finished)

        try:
            await self.state.loop.call(start)
        except (ValueError, FinetuneError, AdapterError) as e:
            raise _user_error(f"prompt_logprobs: {e}") from None
        return done

    def create_sampling_session(self, project: str, session_id: str, model_path: str | None, base_model: str | None) -> str:
        self._session(project, session_id)
        adapter = self._adapter_for(project, model_path, base_model)
        sid = f"sampler-{uuid.uuid4().hex[:16]}"
        self.samplers[sid] = (project, adapter)
        return sid

    async def sample(self, project: str, req: dict) -> dict:
        """Queue ``num_samples`` completions of the prompt (Tinker's ``asample``) as engine
        requests on the sampler's adapter; each sampled token's logprob is returned. With
        ``prompt_logprobs`` (``compute_logprobs``) the prompt is also scored by a forward-only
        pass on the same adapter in the same steps (``Engine.prompt_logprobs``); with
        ``prompt_logprobs_last_n`` the entries before the last N are ``None``.

        Raises:
            APIError: 404 unknown sampler or weights, 400 bad parameters.
        """
        from coserve_jax.serve.generate import submit

        sid = req.get("sampling_session_id")
        if sid:
            owner, adapter = self.samplers.get(sid, (None, None))
            if owner != project:
                raise _user_error(f"no sampling session {sid!r}", 404)
        else:
            adapter = self._adapter_for(project, req.get("model_path"), req.get("base_model"))
        tokens: list[int] = []
        for chunk in req["prompt"]["chunks"]:
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise _user_error("only text (encoded_text) prompt chunks are supported")
            tokens += [int(t) for t in chunk["tokens"]]
        if req.get("topk_prompt_logprobs") or req.get("target_prompt_logprobs") is not None:
            raise _user_error("topk_prompt_logprobs and target_prompt_logprobs are not supported: use prompt_logprobs, "
                              "or a forward call of a training client")
        last_n = req.get("prompt_logprobs_last_n")
        if last_n is not None and not (isinstance(last_n, int) and 1 <= last_n <= len(tokens) - 1):
            raise _user_error(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {len(tokens) - 1}")
        scored = await self._score(tokens, adapter) if req.get("prompt_logprobs") else None
        sp = req["sampling_params"]
        n = int(req.get("num_samples", 1))
        seed = sp.get("seed")
        stop = sp.get("stop")
        stop_ids = [int(x) for x in stop] if isinstance(stop, list) and stop and isinstance(stop[0], int) else None
        stop_str = [stop] if isinstance(stop, str) else (stop if isinstance(stop, list) and stop_ids is None else None)
        try:
            params = [SamplingParams(
                max_tokens=int(sp.get("max_tokens") or 16), temperature=float(sp.get("temperature", 1.0)),
                top_p=float(sp.get("top_p", 1.0)), top_k=int(sp.get("top_k", -1)) if sp.get("top_k", -1) > 0 else 0,
                seed=None if seed is None else int(seed) + i, logprobs=0, stop=stop_str or None,
                stop_token_ids=stop_ids) for i in range(n)]
        except (TypeError, ValueError) as e:
            raise _user_error(f"sampling_params: {e}") from None
        rid, fut = self._new_future(project, "sample")
        q, index = await submit(self.state, rid, [tokens], [params], adapter, time.monotonic(), project,
                                self.state.config.finetune.sample_priority)

        async def collect():
            outs: dict[int, list] = {i: [[], [], None] for i in index.values()}
            pending = set(index)
            while pending:
                d = await q.get()
                o = outs[index[d.request_id]]
                o[0] += d.token_ids
                o[1] += d.logprobs or []
                if d.finished:
                    o[2] = "stop" if d.finish_reason == "stop" else "length"
                    pending.discard(d.request_id)
            seqs = [tuple(outs[i]) for i in sorted(outs)]
            prompt_lp = None
            if scored is not None:
                prompt_lp = (await scored)[0]
                if last_n is not None:
                    prompt_lp = [None] * (len(tokens) - last_n) + prompt_lp[len(tokens) - last_n:]
            if any(s[2] is None for s in seqs):
                self._resolve(fut, error="sampling was aborted", category="server")
            else:
                self._resolve(fut, tinker_wire.sample_response(seqs, prompt_lp), tinker_wire.PROTO_CONTENT_TYPE)

        asyncio.get_running_loop().create_task(collect())
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}-seq-{i}" for i in range(n)]}
