"""A TCP door on 127.0.0.1 in front of a fake server that drops connections on request.

``DroppingDoor(target_port)``: each connection it accepts takes the next of ``drops``
(a list, in order) or, none left, is passed on to ``target_port`` both ways, byte for byte.

- ``"close"``: the request is read whole, then the socket closed (FIN) with no response,
  as a server or a load balancer dropping an idle keep-alive connection does (httpx:
  ``RemoteProtocolError``, "Server disconnected without sending a response").
- ``"reset"``: the request is read whole, then the connection reset (RST, SO_LINGER 0)
  with no response (httpx: ``ReadError``, "Connection reset by peer").
- ``("cut", n)``: passed on, but the response is cut (FIN) after its first ``n`` bytes,
  headers included: a connection lost mid-answer, after some audio.
- ``"headers"``: passed on, but the response is cut (FIN) right after its headers (a 200),
  before any byte of its body: a connection lost once answered, before the first audio
  (httpx: ``RemoteProtocolError``, "peer closed connection without sending complete
  message body").

``connections`` records each connection's treatment (None: passed on whole).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Union

from tests.fakes.server import Arrivals

Drop = Union[str, tuple[str, int]]


class DroppingDoor:
    def __init__(self, target_port: int) -> None:
        self.drops: list[Drop] = []
        self.connections: Arrivals = Arrivals()
        self._target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="dropping-door")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "DroppingDoor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # shutdown first: on Linux, close alone does not wake an accept() blocked in the
        # door's thread (its join waited out its whole timeout, and the thread stayed).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _close(sock)
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed: the test is over
            with self._lock:
                drop = self.drops.pop(0) if self.drops else None
                self._open.append(client)
            self.connections.append(drop)
            threading.Thread(target=self._serve, args=(client, drop), daemon=True).start()

    def _serve(self, client: socket.socket, drop: Drop | None) -> None:
        if drop in ("close", "reset"):
            _read_request(client)  # whole: unread bytes would turn a close into a reset
            if drop == "reset":  # closed at once, no shutdown (a FIN) first: an RST
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            else:
                _close(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self._target_port))
        with self._lock:
            self._open.append(upstream)
        limit = drop[1] if isinstance(drop, tuple) else None
        threading.Thread(target=_pump, args=(client, upstream, None), daemon=True).start()
        if drop == "headers":
            _pump_headers(upstream, client)
        else:
            _pump(upstream, client, limit)


def read_head(sock: socket.socket) -> bytes:
    """What ``sock`` sends until an HTTP message's head is whole (its blank line; the
    bytes after it too, as they came), or all it sent before it closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def _read_request(sock: socket.socket) -> None:
    head, found, body = read_head(sock).partition(b"\r\n\r\n")
    if not found:
        return
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            return
        body += piece


def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
    """Bytes from ``source`` to ``sink`` until either ends; with ``limit``, only that many,
    then both closed (the answer cut)."""
    sent = 0
    try:
        while limit is None or sent < limit:
            piece = source.recv(65536)
            if not piece:
                break
            if limit is not None:
                piece = piece[:limit - sent]
            sink.sendall(piece)
            sent += len(piece)
    except OSError:
        pass
    _close(sink)
    _close(source)


def _pump_headers(source: socket.socket, sink: socket.socket) -> None:
    """The response's headers from ``source`` to ``sink``, none of its body, then both
    closed (the answer cut before its first byte)."""
    try:
        head, found, _ = read_head(source).partition(b"\r\n\r\n")
        sink.sendall(head + found)
    except OSError:
        pass
    _close(sink)
    _close(source)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
