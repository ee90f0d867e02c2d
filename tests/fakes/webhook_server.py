"""A tool webhook: records each POST and answers from ``handler(payload)`` after ``delay_s``."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class FakeWebhook:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.status = 200
        self.handler: Callable[[dict[str, Any]], Any] = lambda payload: {"ok": True}
        self.app = Starlette(routes=[Route("/tool/{name}", self._endpoint, methods=["POST"])])

    async def _endpoint(self, request: Request) -> JSONResponse:
        payload = await request.json()
        self.calls.append(payload)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return JSONResponse(self.handler(payload), status_code=self.status)
