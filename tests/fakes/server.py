"""Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (own event loop)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

# How long a fake server keeps an idle connection open: past any test (pytest's 300 s). The
# client's pool then ends it (httpx: after 5 s idle), never the server under a request the
# client sends on it as it closes (uvicorn's 5 s met the SDKs' 5 s: "Connection error.").
KEEP_ALIVE_S = 3600


class Arrivals(list):
    """A list a fake server's thread appends to (requests, bytes sent) that a test awaits
    growing: ``await fake.requests.reach(1)`` wakes when the server appends, no polling.
    ``timeout`` only bounds a wait that would otherwise hang (the item never comes)."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = threading.Condition()

    def append(self, item: Any) -> None:
        with self._grew:
            super().append(item)
            self._grew.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` items are in (True), or ``timeout`` s pass (False)."""
        with self._grew:
            return self._grew.wait_for(lambda: len(self) >= count, timeout)

    async def reach(self, count: int, timeout: float = 30.0) -> bool:
        return await asyncio.to_thread(self.wait_for, count, timeout)


class ServerThread:
    """``with ServerThread(app) as srv: srv.url`` — a free port, started and stopped cleanly."""

    def __init__(self, app: Any, *, ws: str = "auto") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", ws=ws,
                                timeout_graceful_shutdown=1, backlog=2048,
                                timeout_keep_alive=KEEP_ALIVE_S)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="fake-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
