"""Streaming synthesis through the official ``elevenlabs`` SDK.

``POST /v1/text-to-speech/{voice_id}/stream?output_format=pcm_16000`` answers raw
16-bit little-endian mono PCM, streamed; chunks are passed on as they arrive.

A stream with no audio ``first_audio_timeout_s`` after the request (the request queued,
the connection hung) fails then (``ProviderError``: the call's ``tts_failed`` and the
apology), not at httpx's read timeout (30 s) after as long a silence on the line. A 200
whose body is JSON or text, not audio, fails as well (read as PCM it would be loud noise):
told by its ``Content-Type`` where that is surely no audio, else by its first bytes. So
does one whose body is audio in another encoding than the PCM asked for (MP3, as the
default mp3_44100_128 comes back when the output format never reaches ElevenLabs; Ogg,
WAV, FLAC, mu-law, WebM): told by a label that is such a type, else by a signature in its
first bytes.

A 429 (the account's concurrency or rate limit: routine and short-lived at call-center
scale) is asked again, up to ``max_retries`` times, after ``retry_backoff_s`` doubling
(jittered) or the Retry-After ElevenLabs gives, waited on ``clock``, and only while the
wait ends inside the first-audio budget (what is left of its deadline, which starts at
the first request, or as said below for a wait for a slot): the line is never silent
longer than that deadline. The SDK's own retries (``max_retries`` in its
request options) apply only to its non-streaming requests: its ``stream`` sends once.
A 500, 502, 503 or 504 before any audio (an overloaded or restarting service) is asked
again the same way. So is a connection that failed before any response (refused, or
closed or reset unanswered: httpx's ConnectError, ReadError, WriteError or
RemoteProtocolError, which the SDK lets through as raised), logged with the error's name
instead of a status; one failing every time ends as "cannot reach the synthesis endpoint:
<error> (asked N times)". So is a 200 whose connection failed the same ways after its
headers, before the SDK handed on any audio byte (logged with status 200 and the error's
name; failing every time: "answered 200, then the connection dropped before any audio:
<error> (asked N times)"). Once any audio came, nothing is asked again: the caller would
hear it twice. Any other refusal (400, 401, 422, a 429 naming a quota) fails at once.
Asking again may bill the text's characters twice: a request refused before it was taken
is not charged, but one whose connection dropped may have reached ElevenLabs (and a 200
dropped before its audio surely did: its synthesis may be charged although none of it
came). Only a retry that ends in audio is heard; at most ``max_retries`` extra times.

With ``max_concurrent`` (the account's concurrency limit, shared out among the replicas),
no more syntheses than that run at once; a freed slot goes to the most urgent waiter
(a reply's first sentence before sentences fetched ahead, those before a seed's answers:
``synthesis_slots``). The wait for a slot counts in the first-audio budget, except a
seed's (nobody listens: it waits its turn behind the callers, however long).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from typing import Any, AsyncIterator

import httpx
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError

from gateway import logs
from gateway.clock import SYSTEM_CLOCK, Clock, Deadline, Expired, deadline
from gateway.providers.base import ProviderError, without_key
from gateway.providers.rate_limits import retry_after_s, retry_wait
from gateway.providers.synthesis_slots import SEEDING, URGENCY, WANTED, SynthesisSlots
from gateway.settings import Settings

SAMPLE_RATES = (16000, 24000)
# A server error before any audio (the service or a gateway in front of it overloaded or
# restarting) is usually gone a moment later: asked again as a 429 is. The text is the same,
# nothing was said yet, so asking again is safe.
_PASSING_5XX = frozenset({500, 502, 503, 504})
# A connection that failed before any response was read (refused; closed or reset unanswered,
# as a restarting service or a load balancer dropping a kept-alive connection does; a read
# or write cut short), which the SDK lets through as httpx raised it: asked again as a
# passing 5xx is. The request may never have arrived, and nothing was said yet. A timeout
# is not among them: httpx's (30 s) is far past the first-audio budget. The same errors
# reading a 200's body before its first byte are asked again too: nothing was said yet.
_DROPPED = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
# Content types that are never PCM. text/event-stream is not among them: see ``_audio``.
_NOT_AUDIO_TYPES = frozenset({"application/json", "application/problem+json", "text/html",
                              "text/plain", "text/xml", "application/xml"})
# A body whose first bytes (what the first read brought, at least 16, at most 64 judged)
# are all printable text (UTF-8) is a message, not audio: 16-bit PCM of speech or of
# silence is about never 16 bytes of printable text in a row (silence is bytes 0x00, 0xff).
_MIN_JUDGED_BYTES = 16
_SNIFF_BYTES = 64
# Audio types that are surely not the raw PCM asked for (ElevenLabs' other output formats,
# what a proxy or another service may hand on): refused by their label alone.
_OTHER_AUDIO_TYPES = {
    "audio/mpeg": "MP3", "audio/mp3": "MP3", "audio/mpeg3": "MP3", "audio/x-mpeg": "MP3",
    "audio/ogg": "Ogg", "application/ogg": "Ogg", "audio/opus": "Opus",
    "audio/wav": "WAV", "audio/x-wav": "WAV", "audio/wave": "WAV", "audio/vnd.wave": "WAV",
    "audio/flac": "FLAC", "audio/x-flac": "FLAC",
    "audio/basic": "mu-law", "audio/x-mulaw": "mu-law", "audio/mulaw": "mu-law",
    "audio/pcmu": "mu-law", "audio/alaw": "A-law", "audio/x-alaw": "A-law",
    "audio/pcma": "A-law", "audio/webm": "WebM", "video/webm": "WebM",
    "audio/aac": "AAC", "audio/mp4": "MP4", "audio/x-m4a": "MP4",
}
# MPEG audio Layer III (MP3): kbit/s by a header's bitrate index (MPEG-1; MPEG-2 and 2.5)
# and sample rates by its rate index (MPEG-1, MPEG-2, MPEG-2.5: version bits 3, 2, 0).
_MP3_KBPS = {3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
             2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}

log = logging.getLogger("voicegate.elevenlabs")


class ElevenLabsTTS:
    """``TextToSpeech``; one HTTP connection pool shared by every call."""

    name = "elevenlabs"
    # Its first audio has a deadline of its own (``first_audio_timeout_s``, a slot's wait
    # and a 429's retries in it): responder.tts_audio times only the gaps after it.
    times_first_audio = True

    def __init__(self, api_key: str, *, voice_id: str, model_id: str = "eleven_flash_v2_5",
                 sample_rate: int = 16000, base_url: str = "", timeout_s: float = 30.0,
                 chunk_bytes: int = 1024, first_audio_timeout_s: float = 4.0,
                 max_retries: int = 3, retry_backoff_s: float = 0.1,
                 max_concurrent: int = 0, clock: Clock = SYSTEM_CLOCK) -> None:
        if not api_key:
            raise ProviderError(self.name, "no API key (set VOICEGATE_ELEVENLABS_API_KEY)")
        if sample_rate not in SAMPLE_RATES:
            raise ProviderError(self.name, f"sample rate {sample_rate} is not one of {SAMPLE_RATES}")
        self.sample_rate = sample_rate
        self.voice_id = voice_id
        self.model_id = model_id
        self._chunk_bytes = chunk_bytes  # 1024 bytes = 32 ms at 16 kHz: small enough to start at once
        self._first_audio_timeout_s = first_audio_timeout_s
        self._max_retries = max_retries  # of a 429, 5xx, dropped connection: waits 0.1, 0.2, 0.4 s
        self._retry_backoff_s = retry_backoff_s
        self._clock = clock  # the first-audio deadline's and a retry's wait (a test's ManualClock)
        # At most this many syntheses at once (0: no cap), the most urgent first.
        self.slots = SynthesisSlots(max_concurrent) if max_concurrent else None
        self._api_key = api_key
        self._http = httpx.AsyncClient(timeout=timeout_s)
        # The SDK sends its own timeout (240 s unless told) with every request, over the
        # client's: both are ours.
        self._client = AsyncElevenLabs(api_key=api_key, base_url=base_url or None,
                                       httpx_client=self._http, timeout=timeout_s)

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
                   first_audio_timeout_s=settings.elevenlabs_first_audio_timeout_s,
                   max_concurrent=settings.elevenlabs_max_concurrent, clock=clock)

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        budget = _Budget()
        stream = self._audio(text, budget)
        chunks = aiter(stream)
        carry = b""  # keep chunks sample-aligned: an odd byte waits for the next chunk
        try:
            chunk = await self._first_audio(chunks, budget)
            while chunk is not None:
                if carry:
                    chunk, carry = carry + chunk, b""
                if len(chunk) % 2:
                    chunk, carry = chunk[:-1], chunk[-1:]
                if chunk:
                    yield chunk
                chunk = await anext(chunks, None)
        except ApiError as exc:
            raise ProviderError(self.name, self._redacted(_refusal(exc))) from exc
        except ProviderError as exc:  # what the endpoint said may echo the key: never shown
            if self._api_key in str(exc):
                raise ProviderError(self.name, self._redacted(
                    str(exc).removeprefix(f"{self.name}: "))) from exc
            raise
        except httpx.TimeoutException as exc:
            raise ProviderError(self.name, "synthesis timed out") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(self.name, _unreachable(exc)) from exc
        finally:
            await stream.aclose()  # closes the HTTP response on barge-in too

    async def _audio(self, text: str, budget: "_Budget") -> AsyncIterator[bytes]:
        """The synthesis' body, if it is the PCM asked for. A 200 whose body is JSON or text
        (a gateway's error, a proxy's or captive portal's page, a wrong base URL), or audio
        in another encoding (MP3, Ogg, WAV...), is no PCM: played, it is loud noise on the
        line (seeded, in the cache). A ``ProviderError`` instead."""
        async with contextlib.AsyncExitStack() as stack:
            if self.slots is not None:
                await stack.enter_async_context(self.slots.slot())
            budget.slot.set()
            response, pieces, first = await self._accepted(stack, text, budget)
            # ElevenLabs documents no content type for a PCM stream: its published OpenAPI
            # names text/event-stream for every output format, while the SDK reads the body
            # as raw bytes whatever the label. So a label refuses only what is surely no
            # audio (JSON, a page, plain text) or surely other audio (audio/mpeg...); any
            # other body is judged by its first bytes.
            kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            head = first or b""
            while first is not None and len(head) < _MIN_JUDGED_BYTES:  # what came first
                piece = await anext(pieces, None)
                if piece is None:
                    break
                head += piece
            if kind in _NOT_AUDIO_TYPES or _reads_as_text(head):
                body = head
                async for piece in pieces:
                    if len(body) >= 4096:
                        break
                    body += piece
                raise ProviderError(self.name, f"answered {kind or 'no content type'} instead "
                                               f"of audio: {_detail(_parsed(body[:4096]))}")
            other: str | None = None  # audio, but surely not the PCM asked for
            if kind in _OTHER_AUDIO_TYPES:
                other = f"{kind} ({_OTHER_AUDIO_TYPES[kind]})"
            elif encoding := _encoding(head):
                other = f"{encoding} (by its first bytes; labelled {kind or 'no content type'})"
            if other:
                raise ProviderError(self.name, f"answered {other} instead of the "
                                               f"pcm_{self.sample_rate} asked for")
            if head:
                yield head
            async for chunk in pieces:
                yield chunk

    async def _accepted(self, stack: contextlib.AsyncExitStack, text: str, budget: "_Budget"
                        ) -> tuple[Any, AsyncIterator[bytes], bytes | None]:
        """The synthesis' response (open on ``stack``) once ElevenLabs takes the request,
        its body's pieces and the first of them (None: a body with none). A 429, a passing
        5xx, or a connection failed before any response or before the body's first piece
        is asked again (``_retry_wait``), any other refusal raised (``ApiError``).
        ``budget``: the first-audio budget, whose deadline a wait must end inside."""
        for retry in range(1, self._max_retries + 2):
            # The attempt's response, closed at once when it is asked again, else with ``stack``.
            attempt = await stack.enter_async_context(contextlib.AsyncExitStack())
            status: int | None = None  # the response's, once its headers came
            try:
                response = await attempt.enter_async_context(
                    self._client.text_to_speech.with_raw_response.stream(
                        self.voice_id, text=text, model_id=self.model_id,
                        output_format=f"pcm_{self.sample_rate}",
                        request_options={"chunk_size": self._chunk_bytes}))
                status = response.status_code
                pieces = aiter(response.data)
                return response, pieces, await anext(pieces, None)
            except (ApiError, *_DROPPED) as exc:
                await attempt.aclose()
                left = budget.left_s(self._clock, self._first_audio_timeout_s)
                wait = self._retry_wait(exc, retry, left)
                if wait is None:
                    if retry == 1 and status is None:
                        raise
                    asked = f" (asked {retry} times)" if retry > 1 else ""
                    raise ProviderError(self.name, f"{_failure(exc, status)}{asked}") from exc
                logs.event(log, "elevenlabs_retry", logging.WARNING, **_retried(exc, status),
                           retry=retry, wait_s=round(wait, 3))
                await self._clock.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retry_wait(self, exc: ApiError | httpx.HTTPError, retry: int,
                    left_s: float) -> float | None:
        """How long to wait before asking again after ``exc`` (the ``retry``-th refusal),
        ``left_s`` of the first-audio budget left; None: not again. A 429 that is not
        about a quota: ElevenLabs documents its 429s as its concurrency or rate limit
        (``code`` concurrent_limit_exceeded or rate_limit_exceeded; the legacy ``status``
        too_many_concurrent_requests or system_busy), which clear in moments; an exhausted
        quota (a 400/401 ``quota_exceeded``) does not. And a 500, 502, 503 or 504
        (``_PASSING_5XX``), or a connection failed before any response or any audio
        (``_DROPPED``: the backoff, no Retry-After to read). A wait that would end past the
        budget is not taken: the caller would hear silence and then the apology anyway."""
        if isinstance(exc, ApiError):
            passing = exc.status_code in _PASSING_5XX or (exc.status_code == 429
                                                           and "quota" not in _code(exc.body))
            asked = retry_after_s(exc.headers or {})
        else:
            passing, asked = isinstance(exc, _DROPPED), None
        if not passing or retry > self._max_retries:
            return None
        return retry_wait(asked, retry - 1, self._retry_backoff_s, left_s)

    async def _first_audio(self, chunks: AsyncIterator[bytes],
                           budget: "_Budget") -> bytes | None:
        """The stream's first bytes (None: it ended without any), within
        ``first_audio_timeout_s`` of the request, else a ``ProviderError`` (saying so when
        the time went waiting for a slot: ``budget.slot`` never set)."""
        limit = self._first_audio_timeout_s
        wanted = WANTED.get()
        slot = budget.slot
        # A seed's budget starts at its slot; a sentence fetched ahead's at its slot or
        # once its reply waits for it, whichever comes first; anyone else's at once.
        after = slot if _patient() else None if wanted is None else (slot, wanted)
        try:
            async with deadline(self._clock, limit, after=after) as running:
                budget.deadline = running  # the retries before the first audio wait inside it
                return await anext(chunks, None)
        except Expired:
            slots = self.slots  # an unset ``slot`` is only ever a capped voice's wait
            waited = ("" if slots is None or slot.is_set() else
                      f": all of it waiting for one of the {slots.limit} synthesis slots, "
                      "none free (VOICEGATE_ELEVENLABS_MAX_CONCURRENT)")
            raise ProviderError(self.name, f"no audio within {limit:g} s of the request "
                                           "(VOICEGATE_ELEVENLABS_FIRST_AUDIO_TIMEOUT_S)"
                                           f"{waited}") from None

    def _redacted(self, message: str) -> str:
        return without_key(message, self._api_key)  # a proxy at elevenlabs_base_url may echo it

    async def aclose(self) -> None:
        await self._http.aclose()


class _Budget:
    """One synthesis' first-audio budget: ``slot`` set once it holds a synthesis slot (or
    the voice has no cap), ``deadline`` the first-audio deadline once ``_first_audio`` runs
    it. A retry before the first audio (``_accepted``) waits only inside what is left of
    that very deadline, wherever it started: the request, the slot (a seed's), or the slot
    or the reply waiting, whichever came first (a sentence fetched ahead's)."""

    def __init__(self) -> None:
        self.slot = asyncio.Event()
        self.deadline: Deadline | None = None

    def left_s(self, clock: Clock, limit_s: float) -> float:
        """Seconds of the budget left; all of them while its deadline has not started."""
        started = self.deadline.started_at if self.deadline is not None else None
        return limit_s if started is None else limit_s - (clock.now() - started)


def _patient() -> bool:
    """A synthesis nobody waits for in silence (a seed's answer): its wait for a slot is
    its turn behind the callers, not a stall, and its first-audio budget starts once it
    holds one."""
    return URGENCY.get() >= SEEDING


def _reads_as_text(head: bytes) -> bool:
    """The body's first bytes are a message (JSON, a page, an event stream of text) rather
    than audio: printable UTF-8 (a BOM, an en dash in a page's title are text too; audio's
    silence is NUL bytes, which are not). A whole body shorter than 16 bytes (no speech
    either way) is not judged."""
    if len(head) < _MIN_JUDGED_BYTES:
        return False
    sniffed = head[:_SNIFF_BYTES].removeprefix(codecs.BOM_UTF8)
    # The sniff may end inside a character: decode what is whole.
    text = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        decoded = text.decode(sniffed)
    except UnicodeDecodeError:
        return False
    return bool(decoded) and all(ch.isprintable() or ch in "\t\n\r" for ch in decoded)


def _encoding(head: bytes) -> str | None:
    """The encoding other than raw PCM that the body's first bytes surely are (None: none
    known). PCM is any bytes, so only signatures 16-bit PCM about never starts with count:
    RIFF....WAVE (8 bytes), OggS and version 0, fLaC and its STREAMINFO block's header,
    EBML's 4-byte magic (WebM), an ID3v2 tag's 10-byte header, or two MP3 frame headers,
    one where the first one's length says (``_mp3_frames``). A body under 16 bytes is not
    judged (no speech either way)."""
    if len(head) < _MIN_JUDGED_BYTES:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV"
    if head[:5] == b"OggS\x00":
        return "Ogg"
    if head[:4] == b"fLaC" and head[4] & 0x7F == 0 and head[5:8] == b"\x00\x00\x22":
        return "FLAC"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM"
    if (head[:3] == b"ID3" and 2 <= head[3] <= 4 and head[4] == 0 and head[5] & 0x0F == 0
            and all(b < 0x80 for b in head[6:10])):
        return "MP3"
    return "MP3" if _mp3_frames(head) else None


def _mp3_frames(head: bytes) -> bool:
    """``head`` starts with an MP3 (MPEG audio Layer III) frame whose next frame's header
    follows where its length says, alike (version, sample rate). One header alone is not
    enough: 0xFF 0xFB (a first sample of -1025) is a frame sync and Layer III's bits. For
    two, PCM's first sample must be one of six values (-1025, -1281, -3073, -3329, -7169,
    -7425: a header's first two bytes, which silence near zero never is), its next byte
    a valid bitrate and rate, and 3 bytes hundreds of bytes on match a header again: about
    1 in 10^5 even then. Judged on what came first only: a frame longer than that (320
    kbit/s at 44.1 kHz is 1044 bytes, over the SDK's 1024-byte chunks) is not told."""
    first = _mp3_frame(head, 0)
    if first is None:
        return False
    return (_mp3_frame(head, first) is not None
            and head[first + 1] & 0x18 == head[1] & 0x18
            and head[first + 2] & 0x0C == head[2] & 0x0C)


def _mp3_frame(head: bytes, at: int) -> int | None:
    """The length of the MP3 frame whose 4-byte header starts at ``at`` in ``head``; None:
    no valid Layer III header there (free-format bitrate too: its length is unknown)."""
    header = head[at:at + 4]
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE6 != 0xE2:  # sync, Layer III
        return None
    version, bitrate, rate = (header[1] >> 3) & 3, header[2] >> 4, (header[2] >> 2) & 3
    if version == 1 or bitrate in (0, 15) or rate == 3:  # reserved, free or bad
        return None
    kbps = _MP3_KBPS[3 if version == 3 else 2][bitrate]
    return ((144 if version == 3 else 72) * kbps * 1000 // _MP3_RATES[version][rate]
            + ((header[2] >> 1) & 1))


def _failure(exc: ApiError | httpx.HTTPError, status: int | None = None) -> str:
    """What failed a request: ElevenLabs' refusal, or the connection's error (after a
    response with ``status``, before its first audio byte, when that came)."""
    if isinstance(exc, ApiError):
        return _refusal(exc)
    if status is not None:
        return (f"answered {status}, then the connection dropped before any audio: "
                f"{type(exc).__name__}")
    return _unreachable(exc)


def _unreachable(exc: httpx.HTTPError) -> str:
    """A connection's failure, by its error's name (httpx's message may be empty)."""
    return f"cannot reach the synthesis endpoint: {type(exc).__name__}"


def _retried(exc: ApiError | httpx.HTTPError, status: int | None = None) -> dict[str, Any]:
    """What ``elevenlabs_retry`` logs of the failure asked again: the status and ElevenLabs'
    code, or the connection error's name (and the status of the response it cut before its
    first audio byte, when one came). Never the key, the text or a header."""
    if isinstance(exc, ApiError):
        return {"status": exc.status_code, "code": _code(exc.body)}
    cut = {} if status is None else {"status": status}
    return {**cut, "error": type(exc).__name__}


def _refusal(exc: ApiError) -> str:
    """What ElevenLabs refused with. Never str(exc): it renders headers. Status and body only."""
    return f"HTTP {exc.status_code}: {_detail(exc.body)}"


def _code(body: Any) -> str:
    """An error's machine-readable name: its ``code``, else the legacy ``status``; "" if none."""
    detail = body.get("detail", body) if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("code") or detail.get("status") or "")
    return ""


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
