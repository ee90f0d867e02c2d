"""Real-time paced playout of reply audio.

Frames go out at the pace they play, a small lead ahead of real time so the
client's jitter buffer never starves, but never far ahead: on a barge-in, what
was sent and not yet played is dropped by the client (``interrupt``/``clear``),
and ``heard_ms`` tells how much the caller really heard.

A barge-in first *holds* the playout (no frame leaves). If the interruption turns out
to be noise, ``resume`` goes on from the frame the caller last heard: the frames sent
after it, which the client dropped, are sent again.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Awaitable, Callable

from .clock import SYSTEM_CLOCK, Clock
from .codec import PCM16, SAMPLE_WIDTH, SILENCE_BYTE

SendFrame = Callable[[bytes], Awaitable[None]]
# Sent frames kept for a resume, at least: what was sent but not yet heard is at most the
# lead and one message (a message leaves when its first frame is due, minus the lead), which
# a playout keeps twice over when that is more (a long lead, long messages of short frames).
_KEPT_FRAMES = 100
# A frame that leaves this much after its time counts as late (bench/capacity.py's bar:
# the lead absorbs less, and the caller hears a gap).
LATE_FRAME_MS = 20.0


class Playout:
    def __init__(self, send_frame: SendFrame, sample_rate: int, frame_ms: int = 20,
                 lead_ms: int = 60, encoding: str = PCM16, clock: Clock = SYSTEM_CLOCK,
                 chunk_ms: int | None = None) -> None:
        """Audio written here is already in ``encoding`` (pcm16, or μ-law for telephony).
        ``frame_ms`` is the unit of pacing and of what the caller heard; ``chunk_ms`` (a
        whole number of frames, default one) is the most audio one message carries."""
        self._send = send_frame
        self._clock = clock
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        samples = sample_rate * frame_ms // 1000
        self._frame_size = samples * SAMPLE_WIDTH[encoding]
        # What a frame holds, which is what it is paced and counted heard by: at 22050 Hz
        # 10 ms is 220.5 samples, so 220 (9.977 ms); paced as 10, the client ran dry.
        self._frame_duration_ms = samples * 1000 / sample_rate
        self._silence = SILENCE_BYTE[encoding]
        self._lead_s = lead_ms / 1000.0
        self._pending = bytearray()
        self._started_at: float | None = None
        # When pacing last (re)started (the first frame, a resume, a restart after a
        # stall): audio due before it is the lead the client needs at once, never late.
        self._paced_from = 0.0
        self._sent_frames = 0
        self.first_frame_at: float | None = None
        self._frames_per_send = max(1, (chunk_ms or frame_ms) // frame_ms)
        # (index of the first frame, the message) of what was sent lately, for a resume:
        # at least _kept_frames frames, whatever the messages' sizes.
        self._kept_frames = max(_KEPT_FRAMES,
                                2 * (math.ceil(lead_ms / frame_ms) + self._frames_per_send))
        self._recent: deque[tuple[int, bytes]] = deque()
        self._open = asyncio.Event()
        self._open.set()
        self._held_heard_ms = 0.0
        self._resume_frame = 0  # the frame a resume replays from
        # Holds begun and holds replayed: a hold and its resume may both fall while the
        # producer is away (waiting on TTS); the next frame must still replay.
        self._holds = 0
        self._replayed = 0
        # Set by a resume, cleared once it is replayed: a wait for a frame's time (or the
        # last frame's end) ends at it, so the replay leaves at the resume, not after.
        self._resumed = asyncio.Event()
        # How late frames left against their due time (an overloaded event loop shows here).
        self.frames_late = 0  # more than LATE_FRAME_MS
        self.max_lag_ms = 0.0

    @property
    def held(self) -> bool:
        return not self._open.is_set()

    def hold(self) -> float:
        """Stop sending now (a barge-in); returns what the caller heard."""
        if not self.held:
            self._held_heard_ms = self.heard_ms()
            self._holds += 1
            self._open.clear()
        return self._held_heard_ms

    def resume_from(self, heard_ms: float) -> float:
        """The interruption was noise: play on from the frame heard at ``heard_ms``.
        Returns where the replay starts (ms): that frame's start, or the oldest frame
        still kept when the caller heard less than that."""
        first = int(min(heard_ms, self.sent_ms) // self._frame_duration_ms)
        if self._recent:  # older audio than was kept cannot be sent again
            first = max(first, min(self._recent[0][0], self._sent_frames))
        self._resume_frame = first
        self._open.set()
        if self._replayed != self._holds:  # a hold to replay
            self._resumed.set()
        return first * self._frame_duration_ms

    async def wait_until_open(self) -> None:
        """Return once nothing holds the playout (at once when nothing does): what is
        announced with its audio waits here until that audio may leave."""
        while not self._open.is_set():
            await self._open.wait()

    async def _wait_if_held(self) -> None:
        if self._open.is_set() and self._replayed == self._holds:
            return
        # Held again before this task woke from the resume (a barge-in in the loop
        # iteration the reply resumed): Event.wait() returns all the same, so look again.
        while not self._open.is_set():
            await self._open.wait()
        self._replayed = self._holds
        self._resumed.clear()
        # The client dropped what it had not played: from the heard frame on, what was
        # sent goes back in front of what is pending, and is sent again at its time.
        first = self._resume_frame
        size = self._frame_size
        replay = bytearray()
        for index, sent in self._recent:
            end = index + len(sent) // size
            if end > first:
                replay += sent[max(0, first - index) * size:]
        self._recent.clear()
        self._pending[:0] = replay
        self._sent_frames = min(first, self._sent_frames)
        self._paced_from = self._clock.now()
        self._started_at = self._paced_from - self.sent_ms / 1000.0

    @property
    def frames_sent(self) -> int:
        return self._sent_frames

    @property
    def sent_ms(self) -> float:
        return self._sent_frames * self._frame_duration_ms

    def heard_ms(self) -> float:
        """Audio the caller has heard so far: sent, and due by the clock."""
        if self._started_at is None:
            return 0.0
        if self._replayed != self._holds:
            # Held, or resumed with nothing replayed yet: the client dropped what it had
            # not played at the hold, and nothing was sent since.
            return self._held_heard_ms
        elapsed = (self._clock.now() - self._started_at) * 1000.0
        return max(0.0, min(self.sent_ms, elapsed))

    def _note_lag(self, lag_s: float, frames: int) -> None:
        """A message of ``frames`` left ``lag_s`` after its first frame's time; the frames
        after the first were due a frame later each, so fewer of them are late."""
        lag_ms = lag_s * 1000.0
        if lag_ms > self.max_lag_ms:
            self.max_lag_ms = lag_ms
        if lag_ms > LATE_FRAME_MS:
            self.frames_late += min(frames, math.ceil((lag_ms - LATE_FRAME_MS) /
                                                        self._frame_duration_ms))

    async def write(self, audio: bytes) -> None:
        """Queue reply audio (call rate and encoding) and send every complete frame, paced."""
        self._pending += audio
        while len(self._pending) >= self._frame_size:
            await self._send_next()

    async def flush(self, sent: Callable[[], None] | None = None) -> None:
        """Send the last partial frame, padded with silence, then wait until it has played.
        ``sent``: called once the last frame has gone out (again after a replay)."""
        while self._started_at is not None or self._pending:
            await self._wait_if_held()  # a hold since the last frame: replay first
            self._pending += self._silence * (-len(self._pending) % self._frame_size)
            while self._pending:
                await self._send_next()
            if sent is not None:
                sent()
            remaining = self._started_at + self.sent_ms / 1000.0 - self._clock.now()
            if remaining > 0:
                await self._sleep_unless_resumed(remaining)
            if self._replayed == self._holds:
                return
            await self._wait_if_held()  # held while the end played: replay, then wait again

    async def _sleep_unless_resumed(self, seconds: float) -> None:
        """Sleep ``seconds`` of the clock, or until a hold since is resumed (the last
        frame's end: up to lead + chunk, once a reply)."""
        if self._resumed.is_set():  # set only while a hold waits to be replayed
            return
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        resumed = asyncio.ensure_future(self._resumed.wait())
        try:
            await asyncio.wait((timer, resumed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            resumed.cancel()

    def _restart(self, now: float) -> None:
        """The client has played all it was sent and waits: the next frame plays ``now``."""
        self._started_at = now - self.sent_ms / 1000.0
        self._paced_from = now

    async def _send_next(self) -> None:
        """Send the next whole frames of ``_pending`` when the first of them is due: as
        many as are ready, up to ``chunk_ms``, in one message."""
        await self._wait_if_held()
        now = self._clock.now()
        if self._started_at is None:
            self._started_at = self._paced_from = now
            lag_s = None
        else:
            # Frame n is due when frame n-1 finishes playing, minus the lead; the lead
            # owed when pacing (re)started goes at once and is not late.
            due = max(self._started_at + self.sent_ms / 1000.0 - self._lead_s,
                      self._paced_from)
            if due > now:
                # A plain sleep (at most chunk - lead): a race with the resume here would
                # cost two futures a message on every call's hot path.
                await self._clock.sleep(due - now)
                now = self._clock.now()
                lag_s = now - due
            elif now - due > 0.5:
                # The producer fell behind (slow TTS): restart the clock instead of
                # bursting, so the client hears a pause, not a fast-forward. It has played
                # all it was sent: the next frame plays now, and its lead goes at once,
                # as at the start (heard_ms counts all that was sent as heard).
                self._restart(now)
                lag_s = None
            else:
                lag_s = now - due
            if lag_s is not None and lag_s > self._lead_s:
                # Later than the lead (a late producer, or the loop stalled in the sleep):
                # the client played all it had and has waited in silence since. Its clock
                # restarts here (heard_ms counts no silence, and the frames that waited go
                # paced, not in a burst); the lateness is still noted.
                self._restart(now)
            if self._replayed != self._holds:  # held (and maybe resumed) while these
                return  # frames waited: the caller goes round again, waits, replays first
        frames = min(len(self._pending) // self._frame_size, self._frames_per_send)
        nbytes = frames * self._frame_size
        with memoryview(self._pending) as view:
            data = bytes(view[:nbytes])
        del self._pending[:nbytes]
        if lag_s is not None:
            self._note_lag(lag_s, frames)
        await self._send(data)
        if self.first_frame_at is None:
            self.first_frame_at = self._clock.now()
        self._recent.append((self._sent_frames, data))
        self._sent_frames += frames
        # Messages are contiguous: drop the oldest while the rest hold _kept_frames.
        while len(self._recent) > 1 and \
                self._sent_frames - self._recent[1][0] >= self._kept_frames:
            self._recent.popleft()
