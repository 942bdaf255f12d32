"""Compiled executables kept on disk, so a warm start neither traces, lowers nor compiles.

JAX's persistent compilation cache saves the backend compile only: every process still traces
and lowers each function before it can ask the cache (on SmolLM2 with finetuning, minutes of a
2-core machine). An :class:`ExecutableCache` keeps the whole ``jax.stages.Compiled``
(``jax.experimental.serialize_executable``) and its argument and result tree structures, under
a key computed without tracing: the executable's name and static settings, the shapes, dtypes and
shardings of its arguments, and everything else that decides the code (this package's source,
jax and jaxlib versions, the backend and its devices, ``XLA_FLAGS``, numeric jax flags). A hit
loads the executable (about 0.2 s for a step of the tiny test model); a miss lowers and compiles
it and saves it.

A miss compiles with JAX's persistent compilation cache bypassed. On the CPU, an executable that
was itself loaded from that cache serializes without the code of some of its kernels: it loads,
then fails when run (``NOT_FOUND: Function ... fusion not found``). Only freshly compiled
executables are saved, at the cost of a full compile when this cache misses but that one would
have hit (the first start after an upgrade of this package).

Entries are written atomically (a temporary file renamed), so concurrent processes and crashes
leave whole entries or none; an entry that fails to load (truncated, from an incompatible
runtime) is removed and compiled again. The files are pickles, to be trusted as much as the
compilation cache itself: keep the directory private to the user (it is, under ``~/.cache``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import tempfile
import threading
from typing import Any, Sequence

import jax

log = logging.getLogger("coserve_jax.engine")

FORMAT_VERSION = 1
"""Bumped when the layout of an entry changes."""


_PERSISTENT_CACHE_LOCK = threading.Lock()


@contextlib.contextmanager
def _persistent_cache_bypassed():
    """JAX's persistent compilation cache off while in the block (process-wide: other threads'
    compilations in the meantime compile rather than load; none is wrong)."""
    from jax.experimental.compilation_cache import compilation_cache

    with _PERSISTENT_CACHE_LOCK:
        enabled = jax.config.jax_enable_compilation_cache
        if not enabled:
            yield
            return
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()  # (JAX decides once whether the cache is in use)
        try:
            yield
        finally:
            jax.config.update("jax_enable_compilation_cache", True)
            compilation_cache.reset_cache()


@functools.cache
def source_hash() -> str:
    """SHA-256 (hex) over this package's Python sources (paths and contents): any code change
    makes new keys."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def runtime_fingerprint(devices: Sequence[jax.Device]) -> str:
    """What besides the function and its arguments decides a compiled executable: versions,
    the devices it runs on, the XLA flags and the jax flags that change numerics."""
    import jaxlib

    parts = [
        f"format={FORMAT_VERSION}", f"source={source_hash()}", f"jax={jax.__version__}", f"jaxlib={jaxlib.__version__}",
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}",
        f"x64={jax.config.jax_enable_x64}", f"precision={jax.config.jax_default_matmul_precision}",
    ]
    for d in devices:
        parts.append(f"device={d.platform}:{d.device_kind}:{d.id}:{d.process_index}:{d.client.platform_version}")
    return "\n".join(parts)


def abstract_signature(args: Any) -> str:
    """The tree structure, shapes, dtypes and shardings of ``args`` (arrays,
    ``ShapeDtypeStruct`` s, numpy values) as text, without tracing anything."""
    leaves, tree = jax.tree.flatten(args)
    parts = [str(tree)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x).__name__)}:{sharding}")
    return "\n".join(parts)


class ExecutableCache:
    """A directory of serialized compiled executables.

    Args:
        path: the directory (created on first write).
        devices: the devices the executables run on, in the order the engine's mesh uses them
            (their ids and kind enter the key; a hit is loaded onto them).

    Attributes:
        hits, misses: executables loaded from the directory / compiled (and saved) since creation.
    """

    def __init__(self, path: str | os.PathLike, devices: Sequence[jax.Device]):
        self.path = pathlib.Path(path)
        self.devices = list(devices)
        self._fingerprint = runtime_fingerprint(self.devices)
        self.hits = 0
        self.misses = 0

    def key(self, name: str, args: Any) -> str:
        """The entry key (hex SHA-256) of executable ``name`` (its static settings included by
        the caller) on ``args``."""
        h = hashlib.sha256()
        for part in (self._fingerprint, name, abstract_signature(args)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def compile(self, name: str, jitted, *args) -> jax.stages.Compiled:
        """``jitted.lower(*args).compile()``, or the same executable loaded from the directory.

        Args:
            name: says which function ``jitted`` is and every static setting its code depends on
                that the arguments' shapes do not show (bucket, model configuration, options).
            jitted: a ``jax.jit``-wrapped function.
            args: its arguments (arrays or ``ShapeDtypeStruct`` s).
        """
        file = self.path / (self.key(name, args) + ".exe")
        if file.exists():
            try:
                compiled = self._load(file)
                self.hits += 1
                return compiled
            except Exception as e:  # a stale or broken entry: never fatal
                log.warning("executable cache entry %s did not load (%s: %s); compiling again", file.name,
                            type(e).__name__, e)
                file.unlink(missing_ok=True)
        lowered = jitted.lower(*args)
        with _persistent_cache_bypassed():
            compiled = lowered.compile()
        self.misses += 1
        self._save(file, compiled)
        return compiled

    def _load(self, file: pathlib.Path) -> jax.stages.Compiled:
        from jax.experimental.serialize_executable import deserialize_and_load

        with open(file, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        return deserialize_and_load(payload, in_tree, out_tree, backend=self.devices[0].client,
                                    execution_devices=self.devices)

    def _save(self, file: pathlib.Path, compiled: jax.stages.Compiled) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            payload, in_tree, out_tree = serialize(compiled)
            data = pickle.dumps((payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # a backend or executable that cannot be serialized: run uncached
            log.info("executable %s is not cached (%s: %s)", file.name, type(e).__name__, e)
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=".exe")
        except OSError as e:  # a read-only disk costs the next start its compile only
            log.warning("could not save executable %s (%s)", file.name, e)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, file)
        except OSError as e:  # a full disk: no partial entry is left
            log.warning("could not save executable %s (%s)", file.name, e)
            pathlib.Path(tmp).unlink(missing_ok=True)


def compile_ahead(cache: ExecutableCache | None, name: str, jitted, *args) -> jax.stages.Compiled:
    """:meth:`ExecutableCache.compile` through ``cache``, or a plain lower-and-compile without one."""
    if cache is None:
        return jitted.lower(*args).compile()
    return cache.compile(name, jitted, *args)
