"""uvicorn's httptools protocol, with deadlines for a request's start and its headers.

uvicorn arms its keep-alive timer only after a response, so a TCP connection that
never sends a request is held forever (each costs a file descriptor: thousands can
be opened by one client). This protocol arms the same timer when the connection is
made; the first bytes of a request disarm it, as they do between requests. From
then on the request's headers must be complete within ``HEADERS_TIMEOUT_S``, or
the connection gets 408 and is closed (a client that sends a request line and then
nothing, slowloris, would hold it forever too). Bytes of a body that come after its
request was answered (a 413 or a 401 sent before the body was read) cancel the keep-alive
timer, as any byte does in uvicorn, yet start no request: the timer is armed again.

A connection upgraded to a WebSocket (a call) gets a small kernel send buffer,
``WS_SEND_BUFFER_BYTES``: left to autotuning it grows to tcp_wmem's maximum (4 MiB, two
minutes of 16 kHz reply audio), which took every byte for a client that had stopped
reading, so the call's sends never waited and ``client_not_reading`` never fired.
Once the app is done with it, such a connection is let go: uvicorn closes a transport
by flushing it first, which a client whose receive window stays shut never allows, so
``BoundedCloseWebSocketProtocol`` aborts one still open ``WS_CLOSE_GRACE_S`` later.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# From the first byte of a request to the end of its headers.
HEADERS_TIMEOUT_S = 10.0
# A call's kernel send buffer (Linux doubles it: 128 KiB, 4 s of 16 kHz pcm16). Replies are
# paced in real time with a lead of a few hundred ms, so a reading client never fills it;
# one that stops reading fills it in seconds, and the outbox's send timeout then sees it.
WS_SEND_BUFFER_BYTES = 64 * 1024
# From the end of a call's handler to the connection's forced end: a client that reads
# takes its last messages and the close frame well within it.
WS_CLOSE_GRACE_S = 5.0


class IdleTimeoutHttpToolsProtocol(HttpToolsProtocol):
    _headers_deadline: asyncio.TimerHandle | None = None
    _upgraded = False  # a WebSocket now: its own protocol times it

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (not self._upgraded and self.timeout_keep_alive_task is None
                and self._headers_deadline is None and not self.pipeline
                and self.cycle is not None and self.cycle.response_complete
                and not self.transport.is_closing()):
            # The rest of an answered request's body: idle between requests still.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True
        cap_send_buffer(self.transport)
        super().handle_websocket_upgrade()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_headers_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_deadline is None:
            self._headers_deadline = self.loop.call_later(HEADERS_TIMEOUT_S,
                                                          self._headers_timed_out)

    def on_headers_complete(self) -> None:
        self._disarm_headers_deadline()
        super().on_headers_complete()

    def _disarm_headers_deadline(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _headers_timed_out(self) -> None:
        self._headers_deadline = None
        if self.transport.is_closing():
            return
        content = [b"HTTP/1.1 408 Request Timeout\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(b"content-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.write(b"".join(content))
        self.transport.close()


def cap_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Fix the socket's send buffer at ``WS_SEND_BUFFER_BYTES`` (no autotuning past it)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WS_SEND_BUFFER_BYTES)
    except OSError:  # not a TCP socket (a test's pipe): nothing to cap
        pass


class BoundedCloseWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, whose connection ends at most
    ``WS_CLOSE_GRACE_S`` after the app's handler: its ``transport.close()`` waits for the
    unsent bytes to go out, for ever if the client never reads (its window stays shut),
    holding the socket and a file descriptor while the client can go on sending."""

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            self.loop.call_later(WS_CLOSE_GRACE_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()
