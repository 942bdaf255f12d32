"""uvicorn's h11 HTTP protocol with a header-read timeout.

uvicorn closes a keep-alive connection that sends nothing for ``timeout_keep_alive`` seconds, but
any byte cancels that timer, and a new connection has no timer at all: a client that opens a
connection (or sends half a request line) and stops holds it forever (a slowloris). Here every
connection must deliver a complete request line and headers within ``timeout_header_s`` of
connecting, and again after each response; a request whose headers arrived is not timed (its
body and response take as long as they take).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def h11_with_header_timeout(timeout_header_s: float) -> type[H11Protocol]:
    """An :class:`~uvicorn.protocols.http.h11_impl.H11Protocol` subclass that closes a
    connection whose request headers are not complete ``timeout_header_s`` seconds after it
    connected or its last response ended (pass it as ``uvicorn.Config(http=...)``)."""

    class H11HeaderTimeout(H11Protocol):
        header_timeout = timeout_header_s

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            awaiting_headers = self.cycle is None or self.cycle.response_complete
            if awaiting_headers and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive within %.0f s", self.header_timeout)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            if not self.transport.is_closing():
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return H11HeaderTimeout
