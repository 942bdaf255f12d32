"""Count XLA compilations, so tests and the engine can prove there is no recompilation.

Every request for a backend executable emits the ``/jax/core/compile/backend_compile_duration``
monitoring event (``jax._src.dispatch.BACKEND_COMPILE_EVENT``), whether XLA compiles it or the
persistent compilation cache supplies it; a cache hit also emits
``/jax/compilation_cache/cache_hits``. A :class:`CompileCounter` counts both while it is active:
``count`` is the real compilations (requests minus cache hits), ``requests`` all of them (any of
which means something was traced and lowered).
"""

from __future__ import annotations

import threading

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Context manager counting XLA backend compilations (process-wide) while it is open.

    Example::

        with CompileCounter() as compiles:
            step(...)
        assert compiles.count == 0  # or .requests == 0: nothing traced or lowered either

    Attributes:
        count: compilations XLA ran (executable requests minus persistent-cache hits).
        requests: executable requests (compilations plus cache hits).
        cache_hits: executables loaded from the persistent compilation cache.
        seconds: total time of the requests, in seconds.
    """

    def __init__(self):
        self.requests = 0
        self.cache_hits = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self.requests - self.cache_hits

    def _duration_listener(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.requests += 1
                self.seconds += duration_secs

    def _event_listener(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._duration_listener)
        jax.monitoring.register_event_listener(self._event_listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration_listener)
        jax.monitoring.unregister_event_listener(self._event_listener)
