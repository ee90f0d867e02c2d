"""The native protocol over WebSocket: JSON control messages + binary PCM16 frames.

See docs/protocol.md. This module only translates between the wire and a ``Call``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import logs
from ..call import Call
from ..codec import PCM16
from ..protocol import (CLOSE_INTERNAL_ERROR, CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER, ProtocolError,
                        StartMessage, StopMessage, TextMessage, check_audio_frame,
                        parse_text_frame)
from ..services import Services

log = logging.getLogger("voicegate.native")

_SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)


class NativeOutput:
    """Sends events and audio; a vanished client turns every later send into a no-op."""

    encoding = PCM16

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self.closed = False

    async def send_event(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            await self._ws.send_text(json.dumps(event))
        except _SEND_ERRORS:
            self.closed = True

    async def send_audio(self, frame: bytes) -> None:
        if self.closed:
            return
        try:
            await self._ws.send_bytes(frame)
        except _SEND_ERRORS:
            self.closed = True

    async def interrupt(self, event: dict[str, Any]) -> None:
        await self.send_event(event)

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._ws.close(code=code, reason=reason[:120])
        except _SEND_ERRORS:
            pass


async def native_call(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    await websocket.accept()
    output = NativeOutput(websocket)
    if not services.ready:
        await output.send_event({"type": "error", "code": "not_ready",
                                 "message": "models are still loading; retry shortly"})
        await output.close(CLOSE_TRY_AGAIN_LATER, "not ready")
        return
    settings = services.settings
    call: Call | None = None
    call_task: asyncio.Task[None] | None = None
    close_code = CLOSE_NORMAL
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                output.closed = True
                break
            try:
                data = message.get("bytes")
                if data is not None:
                    check_audio_frame(data, settings.max_frame_bytes)
                    if call is None:
                        raise ProtocolError("audio_before_start",
                                            "send a `start` message before audio frames")
                    call.feed_audio(data)
                    continue
                parsed = parse_text_frame(message.get("text") or "", settings.max_frame_bytes)
                if isinstance(parsed, StartMessage):
                    if call is not None:
                        raise ProtocolError("already_started", "this call has already started")
                    call = services.new_call(output, parsed)
                    call_task = asyncio.create_task(call.run())
                    call_task.add_done_callback(
                        lambda t: _on_call_done(t, output, websocket.app.state))
                    await output.send_event({"type": "ready", "call_id": call.id,
                                             "sample_rate": parsed.sample_rate,
                                             "encoding": "pcm16",
                                             "frame_ms": settings.frame_ms})
                elif isinstance(parsed, TextMessage):
                    if call is None:
                        raise ProtocolError("not_started", "send a `start` message first")
                    call.feed_text(parsed.text, parsed.final)
                elif isinstance(parsed, StopMessage):
                    break
            except ProtocolError as exc:
                services.runtime.stats.error(exc.code)
                logs.event(log, "protocol_error", logging.WARNING, code=exc.code,
                           call_id=call.id if call else None)
                await output.send_event(exc.event())
                if exc.close_code is not None:
                    close_code = exc.close_code
                    break
            if output.closed:
                break
    finally:
        if call is not None:
            call.stop()
            if call_task is not None:
                await asyncio.gather(call_task, return_exceptions=True)
        await output.close(close_code)


def _on_call_done(task: asyncio.Task[None], output: NativeOutput, state: Any) -> None:
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.error("call_failed", exc_info=exc)

    async def report() -> None:
        await output.send_event({"type": "error", "code": "internal_error",
                                 "message": "the call failed inside the gateway"})
        await output.close(CLOSE_INTERNAL_ERROR, "internal error")

    asyncio.get_running_loop().create_task(report())
