"""A tool webhook: records each POST and answers from ``handler(payload)`` after ``delay_s``.

With ``hold`` set (True: every tool; a set of names: those tools only) it answers only
once ``release`` is set: with ``trickle_s`` too it sends
its headers at once, then a space every ``trickle_s`` until then (each read is quick, the
answer never whole), else nothing at all until then. ``calls`` and ``trickled`` (the spaces
sent) are ``Arrivals`` a test can await.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.server import Arrivals


class FakeWebhook:
    def __init__(self) -> None:
        self.calls: Arrivals = Arrivals()
        self.delay_s = 0.0
        self.status = 200
        self.hold: bool | set[str] = False  # True: every tool; a set: the tools named
        self.release = threading.Event()
        self.trickle_s = 0.0
        self.trickled: Arrivals = Arrivals()
        self.handler: Callable[[dict[str, Any]], Any] = lambda payload: {"ok": True}
        self.app = Starlette(routes=[Route("/tool/{name}", self._endpoint, methods=["POST"])])

    async def _endpoint(self, request: Request) -> Response:
        payload = await request.json()
        self.calls.append(payload)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        held = self.hold is True or (isinstance(self.hold, set) and payload.get("tool") in self.hold)
        if held and self.trickle_s:
            return StreamingResponse(self._trickle(self.handler(payload)), status_code=self.status,
                                     media_type="application/json")
        if held:
            await asyncio.to_thread(self.release.wait)
        return JSONResponse(self.handler(payload), status_code=self.status)

    async def _trickle(self, answer: Any) -> AsyncIterator[bytes]:
        while not self.release.is_set():
            yield b" "
            self.trickled.append(b" ")
            await asyncio.sleep(self.trickle_s)
        yield json.dumps(answer).encode()
