"""Adapters by name over the pool's ``max_loras`` device slots, with a host tier (vLLM's
``max_cpu_loras``; S-LoRA, Sheng et al., MLSys 2024, section 4: adapters live in host memory and
are brought into the device's pool when a batch needs them).

An adapter is either in a slot (servable at once) or parked on the host (its weights read back
from its slot). When a slot is needed and none is free, the least recently used adapter whose
slot is not pinned (no unfinished request uses it, no running job trains it, no evaluation reads
it) is parked; a request for a parked adapter brings it back, parking another. So finished
jobs' adapters never exhaust the slots: only ``max_loras`` adapters *in use at once* are a limit,
and a request whose adapter finds every slot pinned waits for one (the engine places it between
steps, :meth:`AdapterCache.try_index`) instead of failing.

The host tier holds at most ``max_cpu_loras`` adapters' weights (``None``: no limit). Beyond
that, the least recently used parked adapter that has a directory on disk (it was loaded from
one, or :meth:`AdapterCache.set_source` named its export) drops its host copy and is read back
from the directory when needed; an adapter with no copy on disk is never dropped, so nothing a
user trained is lost to the cap.

Multi-host: every eviction and reload is published as the ``unload_adapter`` / ``load_adapter``
call it is, so the other processes' slots stay the same as process 0's.
"""

from __future__ import annotations

import collections
import itertools
import os
from typing import Callable

from coserve_jax.lora.manager import AdapterError
from coserve_jax.lora.peft_io import LoRAWeights, read_peft


class AdapterCache:
    """Names of loaded adapters -> device slots, parking the least recently used unpinned one
    on the host when a slot is needed.

    Args:
        runner: the :class:`~coserve_jax.engine.model_runner.ModelRunner` (its ``adapters``
            slot manager writes the slots).
        pinned: ``pinned(adapter_index)``: whether that slot is in use and must stay.
        publish: ``publish(kind, *args)`` of a multi-host leader (a no-op otherwise).
        max_cpu_loras: most adapters whose weights the host tier holds (vLLM's
            ``max_cpu_loras``; ``None``: no limit).
    Raises:
        ValueError: ``max_cpu_loras`` below 0.
    """

    def __init__(self, runner, pinned: Callable[[int], bool], publish: Callable = lambda kind, *args: None,
                 max_cpu_loras: int | None = None):
        if max_cpu_loras is not None and max_cpu_loras < 0:
            raise ValueError(f"max_cpu_loras must be >= 0 or None, got {max_cpu_loras}")
        self.runner = runner
        self.slots = runner.adapters
        self.pinned = pinned
        self.publish = publish
        self.max_cpu_loras = max_cpu_loras
        self.parked: collections.OrderedDict[str, LoRAWeights | None] = collections.OrderedDict()
        """Adapters off the device, least recently parked first: their weights, or ``None`` when
        only their directory on disk holds them."""
        self.sources: dict[str, str] = {}
        """Adapter name -> the PEFT directory that holds its weights (loaded from it, or an export)."""
        self._used: dict[str, int] = {}
        self._clock = itertools.count()

    @property
    def num_free_slots(self) -> int:
        """Device slots that are free now or hold an adapter nothing uses (could be freed)."""
        free = self.slots.pool_config.max_loras - len(self.slots.names)
        return free + sum(1 for n in self.slots.names if not self.pinned(self.slots.adapter_index(n)))

    @property
    def num_cpu_loras(self) -> int:
        """Adapters whose weights the host tier holds now."""
        return sum(1 for w in self.parked.values() if w is not None)

    @property
    def names(self) -> list[str]:
        """Every loaded adapter: in a slot (by slot) then parked (oldest first)."""
        return self.slots.names + list(self.parked)

    def index(self, name: str) -> int:
        """The adapter index of ``name`` for a new request, bringing a parked adapter back into
        a slot (parking another) first.

        Raises:
            AdapterError: unknown name, or every slot is pinned.
        """
        if name in self.parked:
            self.make_room()
            weights = self.parked[name]
            if weights is None:  # dropped from the host tier: read back from its directory
                weights = read_peft(self.sources[name])
            del self.parked[name]
            self.publish("load_adapter", name, weights)
            self.runner.load_adapter(name, weights)
        index = self.slots.adapter_index(name)
        self._used[name] = next(self._clock)
        return index

    def try_index(self, name: str) -> int | None:
        """:meth:`index`, or ``None`` when every slot is pinned now (the caller waits).

        Raises:
            AdapterError: unknown name.
        """
        if name in self.parked and self.num_free_slots == 0:
            return None
        return self.index(name)

    def set_source(self, name: str, path: str | os.PathLike) -> None:
        """Record that the PEFT directory ``path`` holds adapter ``name``'s current weights (a
        finished job's export), so the host tier may drop its copy under ``max_cpu_loras``.

        Raises:
            AdapterError: unknown name.
        """
        if name not in self.names:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        self.sources[name] = os.fspath(path)
        self._trim()

    def load(self, name: str, source: str | os.PathLike | LoRAWeights) -> None:
        """Load an adapter under ``name`` (a PEFT directory or :class:`LoRAWeights`), into a
        slot, parking the least recently used unpinned adapter if none is free.

        Raises:
            AdapterError: the name is taken, every slot is pinned, or the adapter does not fit
                the pool (nothing changed then).
            FileNotFoundError, AdapterFormatError: from reading the directory.
        """
        if name in self.names:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        weights = source if isinstance(source, LoRAWeights) else read_peft(source)
        self.slots.check(weights)  # before anything is parked for it
        self.make_room()
        self.publish("load_adapter", name, weights)
        self.runner.load_adapter(name, weights)
        self._used[name] = next(self._clock)
        if not isinstance(source, LoRAWeights):
            self.sources[name] = os.fspath(source)

    def unload(self, name: str) -> None:
        """Forget an adapter (free its slot, or drop it from the host tier).

        Raises:
            AdapterError: unknown name.
        """
        self._used.pop(name, None)
        self.sources.pop(name, None)
        if name in self.parked:
            del self.parked[name]
            return
        self.slots.adapter_index(name)  # raises for an unknown name
        self.publish("unload_adapter", name)
        self.runner.unload_adapter(name)

    def make_room(self) -> None:
        """Free a slot if none is free, by parking the least recently used unpinned adapter.

        Raises:
            AdapterError: every slot holds a pinned adapter.
        """
        if len(self.slots.names) < self.slots.pool_config.max_loras:
            return
        victims = [n for n in self.slots.names if not self.pinned(self.slots.adapter_index(n))]
        if not victims:
            raise AdapterError(
                f"all {self.slots.pool_config.max_loras} adapter slots are in use by unfinished requests or "
                "running jobs (max_loras); try again when one ends"
            )
        victim = min(victims, key=lambda n: self._used.get(n, -1))
        self.parked[victim] = self.slots.get(victim)
        self.publish("unload_adapter", victim)
        self.runner.unload_adapter(victim)
        self._trim()

    def _trim(self) -> None:
        """Drop host copies beyond ``max_cpu_loras``, least recently used first, of adapters
        whose directory on disk holds them."""
        if self.max_cpu_loras is None:
            return
        excess = self.num_cpu_loras - self.max_cpu_loras
        droppable = sorted((n for n, w in self.parked.items() if w is not None and n in self.sources),
                           key=lambda n: self._used.get(n, -1))
        for name in droppable[:max(excess, 0)]:
            self.parked[name] = None
