"""Twilio's side of a bidirectional Media Stream, as its documentation describes it.

``TwilioLine`` connects to a stream endpoint, sends ``connected`` and ``start``, streams
caller audio as base64 μ-law ``media`` messages in real time (20 ms frames; between what
``say`` sends, silence, as Twilio streams the line without a break), and plays
the server's audio the way Twilio does: in real time, echoing each ``mark`` once the
audio before it has played, and on ``clear`` dropping buffered audio and echoing the
marks that were still pending.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import deque
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect

from gateway.codec import pcm16_to_ulaw

FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
FRAME_S = 0.02


class TwilioLine:
    def __init__(self, url: str, call_sid: str = "CA" + "0" * 32,
                 stream_sid: str = "MZ" + "0" * 32, parameters: dict[str, str] | None = None,
                 echo_marks: bool = True, headers: dict[str, str] | None = None,
                 streams_silence: bool = True) -> None:
        self.url = url
        self.headers = headers or {}  # on the WebSocket upgrade (X-Twilio-Signature)
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.parameters = parameters or {}
        self.echo_marks = echo_marks
        # False: only what `say` sends, as a dead stream (or a client that is not Twilio).
        self.streams_silence = streams_silence
        self._started = False  # `start` sent: media may flow
        self._saying = 0  # `say` calls under way: they send the line's frames meanwhile
        self.received: list[dict[str, Any]] = []  # every server message, in order
        self.media = bytearray()  # every μ-law byte the server sent
        self.played = bytearray()  # what the caller heard
        self.echoed: list[str] = []  # marks echoed because their audio played
        self.echoed_on_clear: list[str] = []  # marks echoed because a clear dropped them
        self.close_code: int | None = None
        self._ws: ClientConnection | None = None
        self._buffer: deque[bytes | str] = deque()  # audio and mark names, in arrival order
        self._seq = 0
        self._chunk = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "TwilioLine":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.hang_up()

    async def connect(self, start: bool = True) -> None:
        self._ws = await connect(self.url, additional_headers=self.headers)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._play())]
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        if start:
            await self.send(self.start_message())

    def start_message(self) -> dict[str, Any]:
        return {"event": "start", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
                "start": {"streamSid": self.stream_sid, "accountSid": "AC" + "0" * 32,
                          "callSid": self.call_sid, "tracks": ["inbound"],
                          "customParameters": self.parameters,
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                          "channels": 1}}}

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        assert self._ws is not None
        if isinstance(message, dict) and message.get("event") == "start":
            self._started = True
        await self._ws.send(json.dumps(message) if isinstance(message, dict) else message)

    async def send_media(self, ulaw: bytes) -> None:
        self._chunk += 1
        await self.send({"event": "media", "sequenceNumber": self._next_seq(),
                         "streamSid": self.stream_sid,
                         "media": {"track": "inbound", "chunk": str(self._chunk),
                                   "timestamp": str(self._chunk * 20),
                                   "payload": base64.b64encode(ulaw).decode()}})

    async def say(self, pcm16_8k: bytes, silence_s: float = 0.0) -> None:
        """Caller audio (pcm16, 8 kHz) as 20 ms μ-law frames in real time, then silence."""
        ulaw = pcm16_to_ulaw(pcm16_8k) + b"\xff" * int(silence_s * 8000)
        loop = asyncio.get_running_loop()
        start = loop.time()
        self._saying += 1
        try:
            for i in range(0, len(ulaw), FRAME_BYTES):
                await self.send_media(ulaw[i:i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff"))
                delay = start + (i // FRAME_BYTES + 1) * FRAME_S - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            self._saying -= 1

    async def hang_up(self) -> None:
        if self._ws is not None and self.close_code is None:
            try:
                await self.send({"event": "stop", "sequenceNumber": self._next_seq(),
                                 "streamSid": self.stream_sid,
                                 "stop": {"accountSid": "AC" + "0" * 32,
                                          "callSid": self.call_sid}})
                await asyncio.wait_for(self.closed(), 10)
            except Exception:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    async def closed(self) -> int | None:
        await self.wait_until(lambda: self.close_code is not None, timeout=10)
        return self.close_code

    def of(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("event") == event]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                self.received.append(message)
                event = message.get("event")
                if event == "media":
                    audio = base64.b64decode(message["media"]["payload"])
                    self.media += audio
                    self._buffer.append(audio)
                elif event == "mark":
                    self._buffer.append(message["mark"]["name"])
                elif event == "clear":
                    names = [item for item in self._buffer if isinstance(item, str)]
                    self._buffer.clear()
                    self.echoed_on_clear += names
                    for name in names:
                        await self._echo(name)
                self._changed.set()
        finally:
            self.close_code = self._ws.close_code if self._ws.close_code is not None else 1006
            self._changed.set()

    async def _play(self) -> None:
        """Every 20 ms, play one frame of buffered audio; echo marks as they are reached."""
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            need = FRAME_BYTES
            while self._buffer and (need > 0 or isinstance(self._buffer[0], str)):
                item = self._buffer[0]
                if isinstance(item, str):
                    self._buffer.popleft()
                    self.echoed.append(item)
                    await self._echo(item)
                    continue
                take = item[:need]
                self.played += take
                need -= len(take)
                if len(take) == len(item):
                    self._buffer.popleft()
                else:
                    self._buffer[0] = item[len(take):]
            self._changed.set()
            if self.streams_silence and self._started and not self._saying \
                    and self.close_code is None:
                try:
                    await self.send_media(b"\xff" * FRAME_BYTES)  # the line's silence
                except Exception:  # closed meanwhile: `_read` records how
                    pass
            tick += FRAME_S
            await asyncio.sleep(max(0.0, tick - loop.time()))

    async def _echo(self, name: str) -> None:
        if self.echo_marks and self.close_code is None:
            await self.send({"event": "mark", "sequenceNumber": self._next_seq(),
                             "streamSid": self.stream_sid, "mark": {"name": name}})
