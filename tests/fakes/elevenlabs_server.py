"""A fake ElevenLabs streaming-synthesis endpoint.

``POST /v1/text-to-speech/{voice_id}/stream?output_format=pcm_16000|pcm_24000`` with
header ``xi-api-key`` and JSON ``{"text", "model_id", ...}`` answers raw 16-bit mono PCM,
streamed in pieces. Errors follow the documented shape ``{"detail": {"status", "message"}}``.
"""

from __future__ import annotations

import asyncio
import math
import struct
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.server import Arrivals

MS_PER_CHAR = 20  # synthetic speech length


class FakeElevenLabs:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: Arrivals = Arrivals()  # a test awaits them: ``requests.reach(n)``
        self.piece_bytes = 3000  # deliberately odd-sized pieces (of 2-byte samples: even count)
        self.piece_delay_s = 0.0
        self.status = 200
        # When set, the stream pauses after its first piece until ``release`` is set:
        # a test can prove the first audio arrived before the synthesis finished.
        self.hold_after_first = threading.Event()
        # Stalls, until ``release`` is set: no answer at all (the request queued), or its
        # headers and then no audio (a stream that hangs before its first byte).
        self.stall_before_response = threading.Event()
        self.stall_before_audio = threading.Event()
        self.release = threading.Event()
        self.silent = False  # answer 200 and a body with no audio at all
        # Refusals to answer before any audio, one a request, in order: (status, detail,
        # headers), e.g. the documented 429 (concurrency or rate limit, maybe a Retry-After).
        self.refusals: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        # Answer 200 with this (content type, body) instead of audio: what stands in front
        # of the voice (a proxy, a captive portal, a wrong base URL) speaking for it.
        self.not_audio: tuple[str, bytes] | None = None
        # Answer 200 with this (content type, body): audio, streamed in pieces as PCM is,
        # but in another encoding than the pcm_* asked for (MP3, Ogg, WAV...), as when
        # the output format never reaches ElevenLabs (a proxy dropping the query, a
        # misconfigured base URL or account) and its default mp3_44100_128 comes back.
        self.other_audio: tuple[str, bytes] | None = None
        # The content type audio is labelled with: ElevenLabs documents none for PCM (its
        # OpenAPI names text/event-stream for every format).
        self.audio_media_type = "audio/pcm"
        self.app = Starlette(routes=[Route("/v1/text-to-speech/{voice_id}/stream", self._stream,
                                           methods=["POST"])])

    async def _stream(self, request: Request) -> Response:
        if request.headers.get("xi-api-key") != self.api_key:
            return JSONResponse({"detail": {"status": "invalid_api_key",
                                            "message": "Invalid API key"}}, status_code=401)
        output_format = request.query_params.get("output_format", "mp3_44100_128")
        if output_format not in ("pcm_16000", "pcm_24000"):
            return JSONResponse({"detail": {"status": "invalid_output_format",
                                            "message": f"fake supports pcm only, not {output_format}"}},
                                status_code=422)
        body = await request.json()
        self.requests.append({"voice_id": request.path_params["voice_id"],
                              "output_format": output_format, **body})
        if self.refusals:
            status, detail, headers = self.refusals.pop(0)
            return JSONResponse({"detail": detail}, status_code=status, headers=headers)
        if self.status != 200:
            return JSONResponse({"detail": {"status": "server_error", "message": "fake failure"}},
                                status_code=self.status)
        if self.not_audio is not None:
            media_type, content = self.not_audio
            return Response(content, media_type=media_type)
        if self.other_audio is not None:
            media_type, content = self.other_audio
            return StreamingResponse(self._pieces(content), media_type=media_type or None)
        rate = int(output_format.split("_")[1])
        pcm = b"" if self.silent else tone(len(body.get("text", "")) * MS_PER_CHAR, rate)
        if self.stall_before_response.is_set():
            await self._until_released()
        return StreamingResponse(self._pieces(pcm), media_type=self.audio_media_type)

    async def _until_released(self) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.01)

    async def _pieces(self, pcm: bytes):
        if self.stall_before_audio.is_set():
            await self._until_released()
        step = self.piece_bytes + 1  # an odd size, as a network may deliver
        for n, offset in enumerate(range(0, len(pcm), step)):
            yield pcm[offset:offset + step]
            if n == 0 and self.hold_after_first.is_set():
                await self._until_released()
            if self.piece_delay_s:
                await asyncio.sleep(self.piece_delay_s)


def tone(ms: int, rate: int, hz: float = 220.0) -> bytes:
    count = rate * ms // 1000
    return struct.pack(f"<{count}h", *(int(8000 * math.sin(2 * math.pi * hz * i / rate))
                                       for i in range(count)))
