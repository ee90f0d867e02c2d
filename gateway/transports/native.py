"""The native protocol over WebSocket: JSON control messages + binary PCM16 frames.

See docs/protocol.md. This module only translates between the wire and a call;
admission, bounds, timeouts and failures are the shared ``CallSession``'s.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.websockets import WebSocket

from ..call.session import (CallSession, presented_token, refuse_before_accept,
                            refuse_while_unavailable)
from ..credentials import token_matches
from ..codec import PCM16
from ..protocol import (DtmfMessage, ProtocolError, StartMessage,
                        StopMessage, TextMessage, check_audio_frame, check_frame_size,
                        parse_text_frame)
from ..services import Services


class NativeOutput:
    """Events as JSON text, audio as binary frames, through the session's bounded outbox."""

    encoding = PCM16

    def __init__(self, session: CallSession) -> None:
        self._outbox = session.outbox

    def send_json(self, event: dict[str, Any]) -> None:
        self._outbox.send_text(json.dumps(event))

    async def send_event(self, event: dict[str, Any]) -> None:
        self.send_json(event)

    async def send_audio(self, frame: bytes) -> None:
        self._outbox.send_bytes(frame)

    async def interrupt(self, event: dict[str, Any]) -> None:
        await self.send_event(event)


async def native_call(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    settings = services.settings
    if not token_matches(presented_token(websocket), settings.call_token):
        await refuse_before_accept(websocket, "missing or wrong call token", services.stats,
                                   "unauthorized")
        return
    if await refuse_while_unavailable(websocket, services.stats):
        return
    await websocket.accept()
    session = services.open_session(websocket, "native")
    output = NativeOutput(session)
    session.send_error = output.send_json
    try:
        while (message := await session.receive()) is not None:
            try:
                if not _handle(message, session, output, services):
                    break
            except ProtocolError as exc:
                session.bad_input(exc, message)  # its bytes count too: it was read whole
                if exc.close_code is not None:
                    break
    except ProtocolError as exc:  # a start timeout, or messages too fast (session.receive)
        session.bad_input(exc)
    except Exception as exc:  # the gateway's own failure (building the call): 1011, not 1000
        session.failed(exc)
    finally:
        await session.close()


def _handle(message: dict[str, Any], session: CallSession, output: NativeOutput,
            services: Services) -> bool:
    """One message; False when the client asked to stop."""
    settings = services.settings
    data = message.get("bytes")
    if data is not None:
        if session.call is None:  # an oversized one still closes: there is no call to keep
            check_frame_size(data, settings.max_frame_bytes)
            raise ProtocolError("audio_before_start", "send a `start` message before audio frames")
        check_audio_frame(data, settings.max_frame_bytes)
        session.feed_audio(data)
        return True
    # A second `start` is refused before its fields are read: one with a bad rate must not
    # close the running call as if it were the first.
    parsed = parse_text_frame(message.get("text") or "", settings.max_frame_bytes,
                              started=session.call is not None)
    if isinstance(parsed, StartMessage):
        call = session.start_call(lambda: services.new_call(output, parsed))
        output.send_json({"type": "ready", "call_id": call.id, "sample_rate": parsed.sample_rate,
                          "encoding": "pcm16", "frame_ms": settings.frame_ms})
    elif isinstance(parsed, TextMessage):
        if session.call is None:
            raise ProtocolError("not_started", "send a `start` message first")
        session.feed_text(parsed.text, parsed.final)
    elif isinstance(parsed, DtmfMessage):
        if session.call is None:
            raise ProtocolError("not_started", "send a `start` message first")
        session.feed_dtmf(parsed.digit)
    elif isinstance(parsed, StopMessage):
        return False
    return True
