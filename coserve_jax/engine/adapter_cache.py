"""Adapters by name over the pool's ``max_loras`` device slots, with a host tier (vLLM's
``max_cpu_loras``; S-LoRA, Sheng et al., MLSys 2024, section 4: adapters live in host memory and
are brought into the device's pool when a batch needs them).

An adapter is either in a slot (servable at once) or parked on the host (its weights read back
from its slot). When a slot is needed and none is free, the least recently used adapter whose
slot is not pinned (no unfinished request uses it, no running job trains it, no evaluation reads
it) is parked; a request for a parked adapter brings it back, parking another. So finished
jobs' adapters never exhaust the slots: only ``max_loras`` adapters *in use at once* are a limit.

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
    """

    def __init__(self, runner, pinned: Callable[[int], bool], publish: Callable = lambda kind, *args: None):
        self.runner = runner
        self.slots = runner.adapters
        self.pinned = pinned
        self.publish = publish
        self.parked: collections.OrderedDict[str, LoRAWeights] = collections.OrderedDict()
        self._used: dict[str, int] = {}
        self._clock = itertools.count()

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
            weights = self.parked.pop(name)
            self.publish("load_adapter", name, weights)
            self.runner.load_adapter(name, weights)
        index = self.slots.adapter_index(name)
        self._used[name] = next(self._clock)
        return index

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

    def unload(self, name: str) -> None:
        """Forget an adapter (free its slot, or drop it from the host tier).

        Raises:
            AdapterError: unknown name.
        """
        self._used.pop(name, None)
        if self.parked.pop(name, None) is not None:
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
