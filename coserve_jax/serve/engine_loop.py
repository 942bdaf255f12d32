"""The engine loop: one thread that owns the :class:`~coserve_jax.engine.Engine` and steps it,
apart from the HTTP event loop.

The engine is not thread-safe, so nothing else touches it: HTTP handlers hand the loop commands
(:meth:`EngineLoop.call`: add requests, abort, load an adapter, start a job ...) that run in the
loop thread between two steps, and await their results. Each step's outputs are copied into
:class:`Delta` s and handed to the waiting handlers' ``asyncio.Queue`` s through
``loop.call_soon_threadsafe``, so no handler ever waits on a step and no step waits on a handler.
When there is nothing to do the thread sleeps until a command arrives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

from coserve_jax.engine import Engine

log = logging.getLogger("coserve_jax.serve")


@dataclasses.dataclass
class Delta:
    """What one step added to one request (a copy: the engine's outputs are live objects).

    Attributes:
        request_id: the engine's request id.
        token_ids: new token ids.
        text: new text (may lag the tokens by a few characters: incomplete UTF-8, stop-string holdback).
        logprobs: log-probability of each new token (``None`` unless asked for).
        tokens: the text of each new token, decoded alone (with ``logprobs``, else ``None``).
        top_logprobs: per new token, ``(token text, logprob)`` of the most likely tokens, most
            likely first (``None`` unless asked for).
        finished: whether the request ended with this delta.
        finish_reason: ``"stop"``, ``"length"`` or ``"abort"`` once finished.
        num_prompt_tokens, num_output_tokens: token counts so far (for ``usage``).
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    tokens: list[str] | None
    top_logprobs: list[list[tuple[str, float]]] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


class _Stream:
    __slots__ = ("loop", "queue", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
        self.loop = loop
        self.queue = q
        self.sent = 0  # output tokens already delivered


class EngineLoop:
    """Runs an engine in a thread of its own.

    Args:
        engine: the engine; from :meth:`start` on only this loop's thread may use it.
        on_step: called in the loop thread after every step with ``(engine, outputs, seconds)``
            (metrics, job bookkeeping); its exceptions are logged, never raised.
        on_idle: called in the loop thread when there is nothing to step (starting queued
            jobs); returns whether it gave the engine work.
        on_finished: called in the loop thread with every finished (or aborted)
            :class:`~coserve_jax.engine.outputs.RequestOutput` (metrics).
    """

    def __init__(self, engine: Engine, on_step: Callable | None = None, on_idle: Callable | None = None,
                 on_finished: Callable | None = None):
        self.engine = engine
        self._on_step = on_step
        self._on_idle = on_idle
        self._on_finished = on_finished
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coserve-engine-loop", daemon=True)
        self.error: BaseException | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self, before_exit: Callable[[Engine], Any] | None = None, timeout: float = 60.0) -> None:
        """Run ``before_exit(engine)`` in the loop thread (e.g. checkpoint jobs), abort every
        open request (its handler gets a ``finish_reason="abort"`` delta), and end the thread."""
        if not self._thread.is_alive():
            return

        def _final(engine: Engine):
            try:
                if before_exit is not None:
                    before_exit(engine)
            finally:
                for rid in list(self._streams):
                    self._abort(rid)
                self._stop.set()

        fut = self.submit(_final)
        try:
            fut.result(timeout)
        finally:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout)

    # ---- commands ----------------------------------------------------------------------------
    def submit(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Queue ``fn(engine)`` to run in the loop thread before the next step."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("the engine loop has stopped"))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` in the loop thread and return its result (or raise its exception)."""
        return await asyncio.wrap_future(self.submit(fn))

    async def add(self, add_fn: Callable[[Engine], list[str]], q: asyncio.Queue | None = None) -> asyncio.Queue:
        """Run ``add_fn(engine)``, which queues requests and returns their ids, and register one
        output queue for all of them, atomically (no step runs in between).

        Args:
            q: the queue to deliver to (default: a new one).
        Returns:
            an ``asyncio.Queue`` that receives every :class:`Delta` of those requests; each
            request's last one has ``finished=True``.
        """
        loop = asyncio.get_running_loop()
        if q is None:
            q = asyncio.Queue()

        def _add(engine: Engine) -> asyncio.Queue:
            for rid in add_fn(engine):
                self._streams[rid] = _Stream(loop, q)
            return q

        return await self.call(_add)

    def abort(self, request_ids) -> None:
        """Abort requests (a client went away): frees their KV pages before the next step.
        Safe to call for requests that already finished."""
        ids = list(request_ids)

        def _abort_all(engine: Engine) -> None:
            for rid in ids:
                self._abort(rid)

        if not self._stop.is_set():
            self.submit(_abort_all)

    def abort_all(self) -> None:
        """Abort every open request (shutdown): each handler gets its ``finish_reason="abort"``
        delta, so a stream ends with a final chunk and ``[DONE]`` and a waiting request answers 503."""
        def _abort_everything(engine: Engine) -> None:
            for rid in list(self._streams):
                self._abort(rid)

        if not self._stop.is_set():
            self.submit(_abort_everything)

    def _abort(self, rid: str) -> None:
        out = self.engine.abort(rid)
        s = self._streams.pop(rid, None)
        if out is not None:
            if s is not None:
                self._deliver(s, out)
            self._finished(out)

    def _finished(self, o) -> None:
        if self._on_finished is not None:
            try:
                self._on_finished(o)
            except Exception:
                log.exception("on_finished hook failed")

    # ---- the thread ----------------------------------------------------------------------------
    def _drain(self, run: bool = True) -> None:
        """Run the queued commands (``run=False``: fail them, the loop has stopped)."""
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            if not run:
                fut.set_exception(RuntimeError("the engine loop has stopped"))
                continue
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # the command's error goes to its caller
                fut.set_exception(e)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._drain()
                if self._stop.is_set():
                    break
                if not (engine.has_unfinished or engine.has_active_jobs):
                    if self._on_idle is not None and self._on_idle(engine):
                        continue
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                outputs = engine.step()
                seconds = time.perf_counter() - t0
                for o in outputs:
                    s = self._streams.get(o.request_id)
                    if s is not None:
                        self._deliver(s, o)
                        if o.finished:
                            del self._streams[o.request_id]
                    if o.finished:
                        self._finished(o)
                if self._on_step is not None:
                    try:
                        self._on_step(engine, outputs, seconds)
                    except Exception:
                        log.exception("on_step hook failed")
        except BaseException as e:  # pragma: no cover - a bug in the engine: fail every waiter
            self.error = e
            log.exception("the engine loop died")
            for rid, s in list(self._streams.items()):
                s.loop.call_soon_threadsafe(s.queue.put_nowait, Delta(rid, [], "", None, None, None, True, "abort", 0, 0))
            self._streams.clear()
        finally:
            self._stop.set()
            self._drain(run=False)

    def _deliver(self, s: _Stream, o) -> None:
        n = len(o.token_ids)
        k = s.sent
        s.sent = n
        new = o.token_ids[k:n]
        tokens = top = None
        if o.logprobs is not None:
            decode = self._token_text
            tokens = [decode(t) for t in new]
            if o.top_logprobs is not None:
                top = [[(decode(t), v) for t, v in sorted(d.items(), key=lambda kv: -kv[1])] for d in o.top_logprobs[k:n]]
        d = Delta(
            request_id=o.request_id, token_ids=list(new), text=o.delta_text,
            logprobs=None if o.logprobs is None else list(o.logprobs[k:n]), tokens=tokens, top_logprobs=top,
            finished=o.finished, finish_reason=o.finish_reason,
            num_prompt_tokens=len(o.prompt_token_ids), num_output_tokens=n,
        )
        s.loop.call_soon_threadsafe(s.queue.put_nowait, d)

    def _token_text(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return str(token_id) if tok is None else tok.decode([token_id], skip_special_tokens=False)
