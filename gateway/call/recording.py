"""Call recording (opt-in, ``VOICEGATE_RECORD_DIR``): one stereo WAV and one JSON per call.

Left channel: the caller, as their audio arrived (a backlog read late fills the gap it
left). Right channel: the bot, each reply frame placed at the moment it was sent, on the
same clock, so the two line up. At a barge-in the bot channel is cut where the caller
stopped hearing it (the interrupt's ``heard_ms``), so what was sent but never heard is not
in the recording: the overlap of the caller's voice and the bot's end shows the barge-in
as the caller lived it.

The JSON holds the call's events with their time from the start (transcripts, routes,
responses, interrupts, turn metrics); keypad keys are left out (they may be a PIN).

Held in memory during the call (both channels: about 4 MB a minute at 16 kHz), written
once at its end on a worker thread, a second at a time; a failed write leaves no file.
Privacy: docs/operations.md, "Recording".
"""

from __future__ import annotations

import itertools
import json
import time
import wave
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..clock import Clock
from ..codec import MULAW, ulaw_to_pcm16

# Events worth keeping with the audio (audio frames and partial transcripts are not).
_KEPT = {"transcript", "route", "response", "interrupt", "resume", "handoff", "hangup",
         "keypad", "error", "turn_metrics"}


class CallRecorder:
    def __init__(self, directory: str | Path, call_id: str, sample_rate: int, encoding: str,
                 clock: Clock) -> None:
        self.directory = Path(directory)
        self.call_id = call_id
        self.sample_rate = sample_rate
        self.encoding = encoding
        self._clock = clock
        self._start = clock.now()
        self._started_at = time.time()
        # The caller (pcm16 at the call's rate): the audio up to the last gap, that gap's
        # silence (not yet written: it may shrink), and the audio since.
        self._caller = bytearray()
        self._gap = 0
        self._since_gap = bytearray()
        self._bot = bytearray()
        self._cursor: int | None = None  # where the current reply's next frame goes
        self._reply_start: int | None = None
        # Where in the reply (ms) its audio since _reply_start begins: a resumed reply is
        # sent again from there, but heard_ms still counts from the reply's start.
        self._replay_from_ms = 0.0
        self.events: list[dict[str, Any]] = []

    def _now_bytes(self) -> int:
        return int((self._clock.now() - self._start) * self.sample_rate) * 2

    def caller_audio(self, pcm16: bytes) -> None:
        """Caller audio that arrived now (it ends now; a gap before it stays silent).

        Audio held up on the way (the network, a busy event loop) arrives late and in a
        burst: its first frame leaves a gap, and the rest was spoken during that gap, not
        after now. What would end after now is taken out of the last gap's silence, so the
        backlog fills the gap and the channel does not run ahead of the clock for the rest
        of the call. (Only audio sent faster than real time with no gap left before it
        runs ahead, until the clock catches up.)"""
        now = self._now_bytes()
        end = self._caller_bytes()
        begin = now - len(pcm16)
        if begin > end:  # a new gap: the last one is final
            self._caller += bytes(self._gap)
            self._caller += self._since_gap
            self._since_gap.clear()
            self._gap, end = begin - end, begin
        self._since_gap += pcm16
        ahead = end + len(pcm16) - now
        if ahead > 0:
            self._gap -= min(ahead, self._gap)

    def bot_audio(self, frame: bytes) -> None:
        pcm = ulaw_to_pcm16(frame) if self.encoding == MULAW else frame
        now = self._now_bytes()
        if self._cursor is None:
            self._cursor = self._reply_start = max(now, len(self._bot))
        self._cursor = max(self._cursor, now)  # a pause in the reply (waiting for TTS)
        if self._cursor > len(self._bot):
            self._bot += bytes(self._cursor - len(self._bot))
        self._bot[self._cursor:self._cursor + len(pcm)] = pcm
        self._cursor += len(pcm)

    def reply_boundary(self, from_ms: float = 0.0) -> None:
        """A reply starts, or resumes from ``from_ms`` into it: its first frame goes
        where the clock is then."""
        self._cursor = self._reply_start = None
        self._replay_from_ms = from_ms

    def interrupted(self, heard_ms: float) -> None:
        """Barge-in: the bot channel ends where the caller stopped hearing it (``heard_ms``
        into the reply, which for a resumed reply began ``from_ms`` before its resume)."""
        if self._reply_start is not None:
            heard_here_ms = heard_ms - self._replay_from_ms
            cut = self._reply_start + int(heard_here_ms * self.sample_rate / 1000) * 2
            del self._bot[max(cut, self._reply_start):]
        self.reply_boundary()

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind not in _KEPT or (kind == "transcript" and not event.get("final")):
            return
        kept = {k: v for k, v in event.items() if not (kind == "keypad" and k == "keys")}
        self.events.append({"t": round(self._clock.now() - self._start, 3), **kept})

    def write(self) -> tuple[Path, Path]:
        """The WAV (caller left, bot right) and the JSON; blocking. A write that fails
        (a full disk) raises and leaves neither file: no WAV cut short, no JSON cut off."""
        self.directory.mkdir(parents=True, exist_ok=True)
        length = max(self._caller_bytes(), len(self._bot)) // 2
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._started_at))
        wav_file, wav_path = _new_file(self.directory, f"{stamp}-{self.call_id}", ".wav")
        json_path = wav_path.with_suffix(".json")
        written = [wav_path]
        try:
            with wav_file, wave.open(wav_file, "wb") as wav:
                wav.setnchannels(2)
                wav.setsampwidth(2)
                wav.setframerate(self.sample_rate)
                wav.setnframes(length)
                # A second at a time: a long call's audio is never copied whole (held in
                # memory already, it would be three times over).
                for begin in range(0, length, self.sample_rate):
                    end = min(begin + self.sample_rate, length)
                    stereo = np.zeros((end - begin, 2), dtype="<i2")
                    left = np.frombuffer(self._caller_pcm(begin * 2, end * 2), dtype="<i2")
                    right = np.frombuffer(bytes(self._bot[begin * 2:end * 2]), dtype="<i2")
                    stereo[:len(left), 0] = left
                    stereo[:len(right), 1] = right
                    wav.writeframes(stereo.tobytes())
            turns = [e for e in self.events if e["type"] == "turn_metrics"]
            written.append(json_path)
            json_path.write_text(json.dumps({
                "call_id": self.call_id, "started_at": self._started_at,
                "sample_rate": self.sample_rate,
                "duration_s": round(length / self.sample_rate, 3),
                "channels": {"left": "caller", "right": "bot"}, "audio": wav_path.name,
                "turns": turns, "events": self.events}, indent=1), encoding="utf-8")
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return wav_path, json_path

    def _caller_bytes(self) -> int:
        return len(self._caller) + self._gap + len(self._since_gap)

    def _caller_pcm(self, begin: int, end: int) -> bytes:
        """Bytes ``begin:end`` of the caller channel: the audio up to the last gap, the
        gap's silence, the audio since (shorter past the channel's end)."""
        head, gap_end = len(self._caller), len(self._caller) + self._gap
        out = bytearray(self._caller[begin:min(end, head)])
        if begin < gap_end and end > head:
            out += bytes(min(end, gap_end) - max(begin, head))
        if end > gap_end:
            out += self._since_gap[max(begin, gap_end) - gap_end:end - gap_end]
        return bytes(out)


def _new_file(directory: Path, name: str, suffix: str) -> tuple[BinaryIO, Path]:
    """``name + suffix`` created, never an existing file replaced: a second call of the same
    id starting in the same second (a Twilio CallSid streamed twice) gets ``name-2``."""
    for n in itertools.count(1):
        path = directory / f"{name if n == 1 else f'{name}-{n}'}{suffix}"
        try:
            return open(path, "xb"), path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class RecordedOutput:
    """A CallOutput that tells the recorder what it sends, then sends it."""

    def __init__(self, inner: Any, recorder: CallRecorder) -> None:
        self._inner = inner
        self._recorder = recorder
        self.encoding = inner.encoding

    async def send_event(self, event: dict[str, Any]) -> None:
        self._recorder.event(event)
        await self._inner.send_event(event)

    async def send_audio(self, frame: bytes) -> None:
        self._recorder.bot_audio(frame)
        await self._inner.send_audio(frame)

    async def interrupt(self, event: dict[str, Any]) -> None:
        self._recorder.interrupted(float(event.get("heard_ms") or 0.0))
        self._recorder.event(event)
        await self._inner.interrupt(event)

    # ConfirmsPlayback: reply boundaries for the recorder, the rest from the transport.
    def reply_started(self, turn: int) -> None:
        self._recorder.reply_boundary()
        if hasattr(self._inner, "reply_started"):
            self._inner.reply_started(turn)

    def reply_resumed(self, from_ms: float) -> None:
        self._recorder.reply_boundary(from_ms)
        if hasattr(self._inner, "reply_resumed"):
            self._inner.reply_resumed(from_ms)

    def reply_ended(self) -> None:
        """The reply is over: an `interrupt` now is of one that sent nothing yet (heard_ms
        0), or of this one's task as it ends (heard_ms all of it), and must not cut this
        one's audio, heard in full."""
        self._recorder.reply_boundary()

    def confirmed_heard_ms(self) -> float | None:
        confirmed = getattr(self._inner, "confirmed_heard_ms", None)
        return confirmed() if confirmed is not None else None

    def __getattr__(self, name: str) -> Any:  # transfer, hang_up: the transport's own
        return getattr(self._inner, name)
