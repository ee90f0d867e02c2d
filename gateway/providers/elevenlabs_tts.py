"""Streaming synthesis through the official ``elevenlabs`` SDK.

``POST /v1/text-to-speech/{voice_id}/stream?output_format=pcm_16000`` answers raw
16-bit little-endian mono PCM, streamed; chunks are passed on as they arrive.

A stream with no audio ``first_audio_timeout_s`` after the request (the request queued,
the connection hung) fails then (``ProviderError``: the call's ``tts_failed`` and the
apology), not at httpx's read timeout (30 s) after as long a silence on the line. A 200
whose body is JSON or text (``Content-Type``), not audio, fails as well: read as PCM it
would be loud noise.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError

from gateway.clock import SYSTEM_CLOCK, Clock, Expired, deadline
from gateway.providers.base import ProviderError
from gateway.settings import Settings

SAMPLE_RATES = (16000, 24000)


class ElevenLabsTTS:
    """``TextToSpeech``; one HTTP connection pool shared by every call."""

    name = "elevenlabs"

    def __init__(self, api_key: str, *, voice_id: str, model_id: str = "eleven_flash_v2_5",
                 sample_rate: int = 16000, base_url: str = "", timeout_s: float = 30.0,
                 chunk_bytes: int = 1024, first_audio_timeout_s: float = 4.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if not api_key:
            raise ProviderError(self.name, "no API key (set VOICEGATE_ELEVENLABS_API_KEY)")
        if sample_rate not in SAMPLE_RATES:
            raise ProviderError(self.name, f"sample rate {sample_rate} is not one of {SAMPLE_RATES}")
        self.sample_rate = sample_rate
        self.voice_id = voice_id
        self.model_id = model_id
        self._chunk_bytes = chunk_bytes  # 1024 bytes = 32 ms at 16 kHz: small enough to start at once
        self._first_audio_timeout_s = first_audio_timeout_s
        self._clock = clock  # the first-audio deadline's (a test's ManualClock)
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._client = AsyncElevenLabs(api_key=api_key, base_url=base_url or None, httpx_client=self._http)

    @property
    def audio_id(self) -> str:
        """Names everything here that changes the audio (voice, model, output format) in the
        seed's audio key: a re-seed after changing any of them renders the answers again."""
        return f"{self.name}:{self.voice_id}:{self.model_id}:pcm_{self.sample_rate}"

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> "ElevenLabsTTS":
        return cls(settings.elevenlabs_api_key, voice_id=settings.elevenlabs_voice_id,
                   model_id=settings.elevenlabs_model_id, sample_rate=settings.elevenlabs_sample_rate,
                   base_url=settings.elevenlabs_base_url,
                   first_audio_timeout_s=settings.elevenlabs_first_audio_timeout_s, clock=clock)

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        stream = self._audio(text)
        chunks = aiter(stream)
        carry = b""  # keep chunks sample-aligned: an odd byte waits for the next chunk
        try:
            chunk = await self._first_audio(chunks)
            while chunk is not None:
                if carry:
                    chunk, carry = carry + chunk, b""
                if len(chunk) % 2:
                    chunk, carry = chunk[:-1], chunk[-1:]
                if chunk:
                    yield chunk
                chunk = await anext(chunks, None)
        except ApiError as exc:
            # Never str(exc): it renders headers. Status and body only.
            raise ProviderError(self.name, f"HTTP {exc.status_code}: {_detail(exc.body)}") from exc
        except httpx.TimeoutException as exc:
            raise ProviderError(self.name, "synthesis timed out") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(self.name, f"cannot reach the synthesis endpoint: {type(exc).__name__}") from exc
        finally:
            await stream.aclose()  # closes the HTTP response on barge-in too

    async def _audio(self, text: str) -> AsyncIterator[bytes]:
        """The synthesis' body, if it is audio. A 200 whose body is JSON or text (a gateway's
        error, a proxy's or captive portal's page, a wrong base URL) is no PCM: played, it
        is loud noise on the line (seeded, in the cache). A ``ProviderError`` instead."""
        async with self._client.text_to_speech.with_raw_response.stream(
                self.voice_id, text=text, model_id=self.model_id,
                output_format=f"pcm_{self.sample_rate}",
                request_options={"chunk_size": self._chunk_bytes}) as response:
            kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind == "application/json" or kind.startswith("text/"):
                body = b""
                async for piece in response.data:
                    body += piece
                    if len(body) >= 4096:
                        break
                raise ProviderError(self.name, f"answered {kind} instead of audio: "
                                               f"{_detail(_parsed(body))}")
            async for chunk in response.data:
                yield chunk

    async def _first_audio(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The stream's first bytes (None: it ended without any), within
        ``first_audio_timeout_s`` of the request, else a ``ProviderError``."""
        limit = self._first_audio_timeout_s
        try:
            async with deadline(self._clock, limit):
                return await anext(chunks, None)
        except Expired:
            raise ProviderError(self.name, f"no audio within {limit:g} s of the request "
                                           "(VOICEGATE_ELEVENLABS_FIRST_AUDIO_TIMEOUT_S)") from None

    async def aclose(self) -> None:
        await self._http.aclose()


def _parsed(body: bytes) -> Any:
    """A body as JSON when it is, else as text."""
    text = body.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _detail(body: Any) -> str:
    """ElevenLabs errors look like {"detail": {"status": ..., "message": ...}}."""
    if isinstance(body, dict):
        detail = body.get("detail", body)
        if isinstance(detail, dict):
            return str(detail.get("message") or detail.get("status") or detail)[:300]
        return str(detail)[:300]
    return str(body)[:300]
