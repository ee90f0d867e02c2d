"""A misbehaving network between a client and Redis, for the Redis failure tests."""

from __future__ import annotations

import socket
import threading

import redis

from tests.test_redis import free_port


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = False  # a silently dead path: bytes are lost both ways, no RST, no FIN


class FlakyProxy:
    """A TCP proxy in front of Redis that can misbehave like a network:

    - ``kill_existing_silently()``: every open connection becomes a black hole (what a
      failover, a NAT/LB reset or a vanished host looks like to a client: no RST, no FIN);
      new connections work.
    - ``stall()`` / ``resume()``: nothing gets through, either way, until ``resume()``; then
      everything held is delivered in order (a Redis that stops answering for a while, e.g.
      stuck behind a slow command or a fork, and then works off its queue).
    """

    def __init__(self, upstream_url: str) -> None:
        parts = redis.connection.parse_url(upstream_url)
        self.upstream = (parts.get("host", "127.0.0.1"), int(parts.get("port", 6379)))
        self.db = int(parts.get("db", 0))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{self.db}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, client, True),
                             daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket,
              is_reply: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if link.dead:
                    continue  # lost on the way
                self._flowing.wait()
                if link.dead:
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            if not link.dead:
                for s in (source, target):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def kill_existing_silently(self) -> None:
        with self._lock:
            for link in self._links:
                link.dead = True

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for link in self._links:
                for s in (link.client, link.upstream):
                    try:
                        s.close()
                    except OSError:
                        pass
