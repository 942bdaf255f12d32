"""Count XLA compilations, so tests and the engine can prove there is no recompilation.

Every backend compilation in the process emits the ``/jax/core/compile/backend_compile_duration``
monitoring event (``jax._src.dispatch.BACKEND_COMPILE_EVENT``); a persistent-cache hit does not
compile and is not counted. A :class:`CompileCounter` counts those events while it is active.
"""

from __future__ import annotations

import threading

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Context manager counting XLA backend compilations (process-wide) while it is open.

    Example::

        with CompileCounter() as compiles:
            step(...)
        assert compiles.count == 0

    Attributes:
        count: compilations seen so far.
        seconds: their total compile time, in seconds.
    """

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _listener(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration_secs

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
