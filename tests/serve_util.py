"""Start the real server (``python -m coserve_jax.serve``) as a subprocess on a loopback port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time


class ServerProcess:
    """``python -m coserve_jax.serve ARGS --port 0``; :attr:`url` once it printed that it is ready.

    Args:
        args: extra command-line arguments.
        timeout: seconds to wait for the ready line.
    Raises:
        RuntimeError: the server exited or was not ready in time (with its output).
    """

    def __init__(self, args: list[str], timeout: float = 300.0, env: dict | None = None, wait_ready: bool = True):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coserve_jax.serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self._ready = threading.Event()
        self.url = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready and (not self._ready.wait(timeout) or self.url is None):
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + self.output)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1.*ready", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    @classmethod
    def spawn(cls, args: list[str], env: dict | None = None) -> "ServerProcess":
        """Start the server without waiting for a ready line (a multi-host follower prints none)."""
        return cls(args, env=env, wait_ready=False)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; returns its exit code (kills it after ``timeout``)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig=None, timeout: float = 120.0) -> int:
        """Send ``sig`` (default SIGTERM) and wait; returns the exit code."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        return self.wait(timeout)


def wait_until(pred, timeout: float = 60.0, interval: float = 0.2):
    """Poll ``pred()`` until truthy; returns its value. Raises AssertionError on timeout."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
