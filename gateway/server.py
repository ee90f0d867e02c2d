"""Run a gateway in a background thread of this process (demo, tests, benchmarks)."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from .app import create_app
from .runtime import Runtime
from .settings import Settings


class BackgroundServer:
    """uvicorn on 127.0.0.1 in a thread; ``port=0`` picks a free port."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        from .cli import uvicorn_options

        self.app = create_app(settings, runtime)
        options = uvicorn_options(settings)
        options["log_level"] = "warning"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=settings.host,
                                                     port=settings.port, **options))
        self._thread = threading.Thread(target=self._server.run, name="voicegate-server",
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def call_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/call"

    def start(self, ready_timeout: float = 300.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the gateway failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not start")
            time.sleep(0.02)
        while httpx.get(self.base_url + "/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not become ready")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
