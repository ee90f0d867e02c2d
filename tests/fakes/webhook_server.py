"""A tool webhook: records each POST and answers from ``handler(payload)`` after ``delay_s``.

With ``trickle_s`` set it sends its headers at once, then ``trickle_bytes`` spaces one every
``trickle_s`` before the JSON: each read is quick, the whole answer is slow.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class FakeWebhook:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.status = 200
        self.trickle_s = 0.0
        self.trickle_bytes = 30
        self.handler: Callable[[dict[str, Any]], Any] = lambda payload: {"ok": True}
        self.app = Starlette(routes=[Route("/tool/{name}", self._endpoint, methods=["POST"])])

    async def _endpoint(self, request: Request) -> Response:
        payload = await request.json()
        self.calls.append(payload)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.trickle_s:
            return StreamingResponse(self._trickle(self.handler(payload)), status_code=self.status,
                                     media_type="application/json")
        return JSONResponse(self.handler(payload), status_code=self.status)

    async def _trickle(self, answer: Any) -> AsyncIterator[bytes]:
        for _ in range(self.trickle_bytes):
            yield b" "
            await asyncio.sleep(self.trickle_s)
        yield json.dumps(answer).encode()
