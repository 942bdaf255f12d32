"""A host-side broadcast channel between the processes of a multi-host job.

Process 0 publishes pickled messages in order; every other process receives them in the same
order. The messages travel through the key-value store of ``jax.distributed``'s coordination
service (the one every process already joined), not through the devices: a plan is host data,
and a device broadcast would need fixed shapes and a compilation per size.

A multi-host engine uses it to run one program: process 0 schedules and publishes each
:class:`~coserve_jax.sched.outputs.SchedulerOutput` (and every call that changes device state:
adapter loads, job creation), the others run what they receive
(:meth:`coserve_jax.engine.engine.Engine.follow`).
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import jax

KEEP = 4096
"""Messages kept in the store behind the newest (older ones are deleted). Followers trail
process 0 by a step or two (each step's collectives join them), far less than this."""


class ChannelClosed(RuntimeError):
    """The channel's publisher went away (the coordination service is gone)."""


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: a host channel needs a multi-process job")
    return client


class HostChannel:
    """Ordered broadcast from process 0 to every other process.

    Args:
        name: the key prefix (channels of different names are independent).
    Raises:
        RuntimeError: ``jax.distributed`` is not initialized.
    """

    def __init__(self, name: str = "coserve"):
        self._client = _client()
        self.name = name
        self.is_publisher = jax.process_index() == 0
        self.num_processes = jax.process_count()
        self._next = 0

    def _key(self, n: int) -> str:
        return f"{self.name}/msg/{n}"

    def publish(self, message: Any) -> None:
        """Send ``message`` (anything picklable) to every other process (process 0 only).

        Raises:
            RuntimeError: called on another process.
        """
        if not self.is_publisher:
            raise RuntimeError("only process 0 publishes on a host channel")
        self._client.key_value_set_bytes(self._key(self._next), pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        old = self._next - KEEP
        if old >= 0:
            self._client.key_value_delete(self._key(old))
        self._next += 1

    def receive(self, timeout_s: float | None = None, poll_s: float = 1.0) -> Any:
        """The next message (processes other than 0), waiting up to ``timeout_s`` (``None``:
        for ever).

        Raises:
            TimeoutError: nothing came within ``timeout_s``.
            ChannelClosed: the coordination service went away.
        """
        if self.is_publisher:
            raise RuntimeError("process 0 publishes; it does not receive")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        key = self._key(self._next)
        while True:
            wait = poll_s if deadline is None else max(0.001, min(poll_s, deadline - time.monotonic()))
            try:
                data = self._client.blocking_key_value_get_bytes(key, int(wait * 1000))
                break
            except Exception as e:  # a timeout (DEADLINE_EXCEEDED), or the service is gone
                text = str(e)
                if "DEADLINE_EXCEEDED" not in text and "timed out" not in text.lower():
                    raise ChannelClosed(f"host channel {self.name!r}: {text}") from e
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no message {self._next} on host channel {self.name!r} within {timeout_s} s") from None
        self._next += 1
        return pickle.loads(data)
