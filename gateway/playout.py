"""Real-time paced playout of reply audio.

Frames go out at the pace they play, a small lead ahead of real time so the
client's jitter buffer never starves, but never far ahead: on a barge-in, what
was sent and not yet played is dropped by the client (``interrupt``/``clear``),
and ``heard_ms`` tells how much the caller really heard.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from .clock import SYSTEM_CLOCK, Clock
from .codec import PCM16, SAMPLE_WIDTH, SILENCE_BYTE

SendFrame = Callable[[bytes], Awaitable[None]]


class Playout:
    def __init__(self, send_frame: SendFrame, sample_rate: int, frame_ms: int = 20,
                 lead_ms: int = 60, encoding: str = PCM16, clock: Clock = SYSTEM_CLOCK) -> None:
        """Audio written here is already in ``encoding`` (pcm16, or μ-law for telephony)."""
        self._send = send_frame
        self._clock = clock
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self._frame_size = sample_rate * frame_ms // 1000 * SAMPLE_WIDTH[encoding]
        self._silence = SILENCE_BYTE[encoding]
        self._lead_s = lead_ms / 1000.0
        self._pending = bytearray()
        self._started_at: float | None = None
        self._sent_frames = 0
        self.first_frame_at: float | None = None

    @property
    def sent_ms(self) -> float:
        return self._sent_frames * self.frame_ms

    def heard_ms(self) -> float:
        """Audio the caller has heard so far: sent, and due by the clock."""
        if self._started_at is None:
            return 0.0
        elapsed = (self._clock.now() - self._started_at) * 1000.0
        return max(0.0, min(self.sent_ms, elapsed))

    async def write(self, audio: bytes) -> None:
        """Queue reply audio (call rate and encoding) and send every complete frame, paced."""
        self._pending += audio
        size = self._frame_size
        while len(self._pending) >= size:
            frame = bytes(self._pending[:size])
            del self._pending[:size]
            await self._send_paced(frame)

    async def flush(self) -> None:
        """Send the last partial frame, padded with silence, then wait until it has played."""
        if self._pending:
            frame = bytes(self._pending) + self._silence * (self._frame_size - len(self._pending))
            self._pending.clear()
            await self._send_paced(frame)
        if self._started_at is not None:
            remaining = self._started_at + self.sent_ms / 1000.0 - self._clock.now()
            if remaining > 0:
                await self._clock.sleep(remaining)

    async def _send_paced(self, frame: bytes) -> None:
        now = self._clock.now()
        if self._started_at is None:
            self._started_at = now
        else:
            # Frame n is due when frame n-1 finishes playing, minus the lead.
            due = self._started_at + self.sent_ms / 1000.0 - self._lead_s
            if due > now:
                await self._clock.sleep(due - now)
            elif now - due > 0.5:
                # The producer fell behind (slow TTS): restart the clock instead of
                # bursting, so the client hears a pause, not a fast-forward.
                self._started_at = now - self.sent_ms / 1000.0 + self._lead_s
        await self._send(frame)
        if self.first_frame_at is None:
            self.first_frame_at = self._clock.now()
        self._sent_frames += 1
