"""Run a gateway in a background thread of this process (demo, tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

from . import logs
from .app import create_app
from .http_idle import BoundedCloseWebSocketProtocol, IdleTimeoutHttpToolsProtocol
from .runtime import Runtime
from .settings import Settings

# After a drain (or on SIGINT), how long uvicorn waits for what is left (calls it closed
# with 1012, requests still running) before cancelling it: never forever.
SHUTDOWN_GRACE_S = 5.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn, as uvicorn binds its own (SO_REUSEADDR; IPv6 when
    the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class NotListening(RuntimeError):
    """The gateway has no listening socket: not started yet, or stopped (its sockets are
    closed once it shuts down, a start-up that could not succeed included)."""


class BackgroundServer:
    """uvicorn on 127.0.0.1 in a thread; ``port=0`` picks a free port."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.app = create_app(settings, runtime)
        services = self.app.state.services
        options = uvicorn_options(settings)
        options["log_level"] = "warning"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=settings.host,
                                                     port=settings.port, **options))
        self._thread = threading.Thread(target=self._server.run, name="voicegate-server",
                                        daemon=True)
        # A model that does not load stops the server; start() says why.
        services.on_fatal = lambda reason: setattr(self._server, "should_exit", True)

    @property
    def listening_port(self) -> int | None:
        """The port the gateway listens on; None while it has no socket (before uvicorn
        has bound one, after it closed them)."""
        for server in getattr(self._server, "servers", ()):  # set by uvicorn's startup
            for sock in server.sockets or ():
                return int(sock.getsockname()[1])
        return None

    @property
    def port(self) -> int:
        port = self.listening_port
        if port is None:
            raise NotListening("the gateway has no listening socket: not started, or stopped")
        return port

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
                raise self._failed()
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not start")
            time.sleep(0.02)
        if self.listening_port is None:  # started, and its sockets are closed already: it stopped
            raise self._failed()
        ready_url = self.base_url + "/readyz"
        while True:
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                # A start-up that cannot succeed stops the server (should_exit): its sockets
                # close before its thread ends, and that is the failure to report.
                if self._thread.is_alive() and not self._server.should_exit:
                    raise
            if not self._thread.is_alive():  # stopped by a start-up that cannot succeed
                raise self._failed()
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not become ready")
            time.sleep(0.1)

    def _failed(self) -> RuntimeError:
        why = self.app.state.services.fatal_error
        return RuntimeError("the gateway failed to start" + (f": {why}" if why else ""))

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """uvloop + httptools + the sans-I/O websockets implementation: the cheapest frame path.

    No permessage-deflate: audio does not compress and events are tiny, yet deflating
    every frame cost ~20% of the event loop's CPU with 200 calls (py-spy).
    """
    logs.redact_server_logs()  # uvicorn logs each upgrade's query: the page's ?token= too
    logs.quiet_invalid_utf8()  # text not UTF-8: uvicorn's traceback; the session logs it
    logs.quiet_denial_handshake_error()  # its spurious ERROR after each 503 refusal
    # httptools, plus a deadline for connections that never send a request; a WebSocket
    # connection ends at most WS_CLOSE_GRACE_S after its handler (gateway/http_idle.py).
    return {"loop": "uvloop", "http": IdleTimeoutHttpToolsProtocol,
            "ws": BoundedCloseWebSocketProtocol,
            "ws_per_message_deflate": False,
            "ws_max_size": settings.ws_max_size, "log_level": settings.log_level,
            "ws_ping_interval": 20.0, "ws_ping_timeout": 20.0,
            "timeout_graceful_shutdown": SHUTDOWN_GRACE_S}
