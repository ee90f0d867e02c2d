"""Draining a replica: stop taking calls, let the running ones finish, then exit.

A balancer (HAProxy, deploy/haproxy.cfg) health-checks ``/readyz``; a replica that
drains answers 503 there, refuses new WebSocket upgrades with HTTP 503 (HAProxy
retries them on another replica) and a ``start`` that still reaches it with
``draining`` (close 1013; a Twilio stream upgraded before the drain is served instead,
and counted by ``active_calls`` until it starts), while the calls it carries go on.
``DrainingServer`` starts the drain on SIGTERM and shuts uvicorn down once nothing is held (no
call, none still closing its socket, no admin seed under way: ``Services.held``) or
``drain_timeout_s`` has passed (uvicorn then closes what remains with 1012 and
waits at most ``SHUTDOWN_GRACE_S`` for it, gateway/server.py). A second SIGTERM
exits at once (uvicorn's force exit); SIGINT shuts down as plain uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Callable

import uvicorn

from . import logs
from .clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("voicegate.drain")

# How often the drain looks at the running calls.
_POLL_S = 0.1


async def wait_until_idle(active_calls: Callable[[], int], timeout_s: float,
                          clock: Clock = SYSTEM_CLOCK, poll_s: float = _POLL_S) -> int:
    """Wait until no call runs or ``timeout_s`` has passed; the calls still running."""
    deadline = clock.now() + timeout_s
    while active_calls() > 0 and clock.now() < deadline:
        await clock.sleep(min(poll_s, max(0.0, deadline - clock.now())))
    return active_calls()


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM drains instead of closing every call at once.

    ``begin_drain`` flips the app into draining (``Services.begin_drain``) and
    ``active_calls`` counts what still runs; both are the app's.
    """

    def __init__(self, config: uvicorn.Config, begin_drain: Callable[[], None],
                 active_calls: Callable[[], int], timeout_s: float) -> None:
        super().__init__(config)
        self._begin_drain = begin_drain
        self._active_calls = active_calls
        self._timeout_s = timeout_s
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._terminated = False

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._terminated and self._loop is not None \
                and not self.should_exit:
            self._terminated = True
        else:
            if self._drain is not None:
                self._drain.cancel()
            if sig == signal.SIGTERM:
                # A second SIGTERM waits no more, for the drain or the connections.
                if self._terminated:
                    self.force_exit = True
                self._terminated = True
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        # A signal handler runs between two bytecodes of the loop's thread: hand over.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._begin_drain()
        logs.event(log, "drain_started", active_calls=self._active_calls(),
                   timeout_s=self._timeout_s)
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit(),
                                                             name="vg-drain")

    async def _drain_then_exit(self) -> None:
        left = await wait_until_idle(self._active_calls, self._timeout_s)
        logs.event(log, "drain_finished", logging.WARNING if left else logging.INFO,
                   calls_cut=left)
        self.should_exit = True
