"""uvicorn's httptools protocol, with a deadline for the first request on a connection.

uvicorn arms its keep-alive timer only after a response, so a TCP connection that
never sends a request is held forever (each costs a file descriptor: thousands can
be opened by one client). This protocol arms the same timer when the connection is
made; the first bytes of a request disarm it, as they do between requests.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class IdleTimeoutHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)
