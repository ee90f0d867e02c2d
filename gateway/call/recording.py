"""Call recording (opt-in, ``VOICEGATE_RECORD_DIR``): one stereo WAV and one JSON per call.

Left channel: the caller, as their audio arrived (a backlog read late fills the gap it
left). Right channel: the bot, each reply frame placed at the moment it was sent, on the
same clock, so the two line up. At a barge-in the bot channel is cut where the caller
stopped hearing it (the interrupt's ``heard_ms``), so what was sent but never heard is not
in the recording: the overlap of the caller's voice and the bot's end shows the barge-in
as the caller lived it.

The JSON holds the call's events with their time from the start (transcripts, routes,
responses, interrupts, turn metrics); keypad keys are left out (they may be a PIN), and so
are the `text` and `reason` of a mapped key's `route`, which name the key.

Written during the call: audio no later frame can change (the caller's before their last
gap, the bot's before the reply under way) goes to ``<name>.wav.part`` on a worker thread in
blocks of ``SPILL_S``, so a call holds seconds of audio in memory, not all of it. A caller
who has sent no audio for ``SILENCE_SETTLES_S`` (a chat call's text turns) is silent up to
then for good, so the bot's audio goes out as the call goes too; silence past both channels'
audio is written only once audio follows it (a call's file ends where its audio ends). At the
call's end the rest follows, the part is renamed ``<name>.wav`` (its first free ``-n``,
claimed then: never a recording another call of the id finished meanwhile) and the JSON
written. The part's WAV header is brought up to date after every block: a process that
dies mid-call leaves a playable ``.wav.part`` of the call up to its last block (and no
JSON). A write that fails (a full disk) stops the recording and leaves no file.
Files are created 0600 and a missing directory 0700 (the gateway's user only).
Privacy: docs/operations.md, "Recording".
"""

from __future__ import annotations

import itertools
import json
import os
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from ..clock import Clock
from ..codec import MULAW, ulaw_to_pcm16

# Settled audio goes to the file once there is this much of it (per channel).
SPILL_S = 5.0
# The recordings' disk writes, on threads of their own: a stalled disk (a hung NFS or EBS
# volume) holds these, never the event loop's default executor (the cache's refresh, the
# admin API's seeds and edits run there).
WRITER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vg-record")
# Caller audio flowing this long since its last gap has caught up with the clock: that gap
# can no longer shrink (a backlog read late fills it within moments), so it is final.
GAP_SETTLES_S = 5.0
# A caller who has sent no audio this long (a chat call's text turns, or audio not begun) is
# silent up to then for good: audio they send later leaves a gap its backlog fills by about
# GAP_SETTLES_S at most (then that gap settles); twice that leaves room to spare.
SILENCE_SETTLES_S = 2 * GAP_SETTLES_S
# A recording is personal data: its files are the gateway's user's alone (0600), and so is
# a directory the gateway creates for them (0700); one that exists keeps its mode.
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
# Events worth keeping with the audio (audio frames and partial transcripts are not).
_KEPT = {"transcript", "route", "response", "interrupt", "resume", "handoff", "hangup",
         "keypad", "error", "turn_metrics"}


class CallRecorder:
    """One call's recording. Positions are byte offsets of one mono channel from the call's
    start; what is still in memory starts at ``_flushed`` (the rest is in the file)."""

    def __init__(self, directory: str | Path, call_id: str, sample_rate: int, encoding: str,
                 clock: Clock) -> None:
        self.directory = Path(directory)
        self.call_id = call_id
        self.sample_rate = sample_rate
        self.encoding = encoding
        self._clock = clock
        self._start = clock.now()
        self._started_at = time.time()
        self._spill_bytes = int(SPILL_S * sample_rate) * 2
        self._gap_settles_bytes = int(GAP_SETTLES_S * sample_rate) * 2
        self._silence_settles_bytes = int(SILENCE_SETTLES_S * sample_rate) * 2
        self._flushed = 0  # bytes of each channel written to the file
        # Of those, the last ones that are silence past both channels' audio, not yet in the
        # file: written before the next block (audio follows), never if the call ends first.
        self._silence = 0
        # The caller (pcm16 at the call's rate): the audio up to the last gap, that gap's
        # silence (not yet written: it may shrink), and the audio since.
        self._caller = bytearray()
        self._gap = 0
        self._since_gap = bytearray()
        self._bot = bytearray()
        self._cursor: int | None = None  # where the current reply's next frame goes
        self._reply_start: int | None = None
        # The current reply's stretches of audio between pauses (a voice late with its next
        # sentence): (bytes of the reply's audio before it, where it starts in the channel).
        # The caller hears no pause in ``heard_ms``: a cut is found through these.
        self._stretches: list[tuple[int, int]] = []
        self._placed = 0  # bytes of the current reply's audio placed
        # Where in the reply (ms) its audio since _reply_start begins: a resumed reply is
        # sent again from there, but heard_ms still counts from the reply's start.
        self._replay_from_ms = 0.0
        self.events: list[dict[str, Any]] = []
        # Turns of a mapped key (their `keypad` event's action an entry or handoff): their
        # `route` names the key ("the caller pressed 1", "key 1"), kept without those.
        self._keyed_turns: set[Any] = set()
        # The file (opened at the first block, on the writing thread) and a failed write.
        self._file: BinaryIO | None = None
        self._wav: wave.Wave_write | None = None
        self._name = ""  # the recording's name: its start time and call id
        self._part_path: Path | None = None
        self._wav_path: Path | None = None  # set once its name is claimed, at the end
        self._failed: Exception | None = None
        self.closed = False  # the call is over: nothing more is taken in (see ``close``)

    def close(self) -> None:
        """The call is over: what its tasks still send (a reply being cancelled, a stream
        not yet closed) is past the call, and must not change what a thread writes."""
        self.closed = True

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
        if self.closed:
            return
        now = self._now_bytes()
        end = self._caller_bytes()
        begin = now - len(pcm16)
        if begin > end:  # a new gap: the last one is final
            self._settle_gap()
            self._gap, end = begin - end, begin
        self._since_gap += pcm16
        ahead = end + len(pcm16) - now
        if ahead > 0:
            self._gap -= min(ahead, self._gap)

    def _settle_gap(self) -> None:
        self._caller += bytes(self._gap)
        self._caller += self._since_gap
        self._since_gap.clear()
        self._gap = 0

    def bot_audio(self, frame: bytes) -> None:
        if self.closed:
            return
        pcm = ulaw_to_pcm16(frame) if self.encoding == MULAW else frame
        now = self._now_bytes()
        if self._cursor is None:
            self._cursor = self._reply_start = max(now, self._flushed + len(self._bot))
            self._stretches, self._placed = [(0, self._cursor)], 0
        elif now > self._cursor:  # a pause in the reply (waiting for TTS)
            self._cursor = now
            self._stretches.append((self._placed, now))
        at = self._cursor - self._flushed
        if at > len(self._bot):
            self._bot += bytes(at - len(self._bot))
        self._bot[at:at + len(pcm)] = pcm
        self._cursor += len(pcm)
        self._placed += len(pcm)

    def reply_boundary(self, from_ms: float = 0.0) -> None:
        """A reply starts, or resumes from ``from_ms`` into it: its first frame goes
        where the clock is then."""
        if self.closed:
            return
        self._cursor = self._reply_start = None
        self._replay_from_ms = from_ms

    def interrupted(self, heard_ms: float) -> None:
        """Barge-in: the bot channel ends where the caller stopped hearing it (``heard_ms``
        into the reply, which for a resumed reply began ``from_ms`` before its resume)."""
        if self.closed:
            return
        if self._reply_start is not None:
            heard = int((heard_ms - self._replay_from_ms) * self.sample_rate / 1000) * 2
            cut = self._reply_start
            for before, start in self._stretches:  # the stretch the caller stopped in
                if before > heard:
                    break
                cut = start + heard - before
            del self._bot[max(cut, self._reply_start) - self._flushed:]
        self.reply_boundary()

    def event(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        kind = event.get("type")
        if kind not in _KEPT or (kind == "transcript" and not event.get("final")):
            return
        left_out: set[str] = set()
        if kind == "keypad":
            left_out = {"keys"}
            # A mapped key's own turn. Keys for the agent ("agent") are never routed: their
            # turn has no `route`, or the one of the words they were carried into.
            if event.get("action") != "agent":
                self._keyed_turns.add(event.get("turn"))
        elif kind == "route" and event.get("turn") in self._keyed_turns:
            left_out = {"text", "reason"}  # the decision stays: intent, entry, hit
        kept = {k: v for k, v in event.items() if k not in left_out}
        self.events.append({"t": round(self._clock.now() - self._start, 3), **kept})

    # ---- during the call: settled audio to the file (the engine hands it to a thread)

    @property
    def held_bytes(self) -> int:
        """Audio held in memory, both channels (the rest is in the file)."""
        return len(self._caller) + len(self._since_gap) + len(self._bot)

    def _settled(self) -> int:
        """Where the audio no later frame can change ends: the caller's up to their last
        gap (one settles once ``GAP_SETTLES_S`` of audio followed it; with no audio for
        ``SILENCE_SETTLES_S``, up to then), the bot's up to the reply under way (a barge-in
        cuts only that one; with none, up to now)."""
        if len(self._since_gap) >= self._gap_settles_bytes:
            self._settle_gap()
        caller = self._flushed + len(self._caller)
        silent_since = self._now_bytes() - self._silence_settles_bytes
        if self._caller_bytes() <= silent_since:
            # No caller audio for a while (a chat call): without this, a call with none kept
            # the bot's audio in memory to its end. Their last gap is final too (a frame
            # now starts a new one).
            self._settle_gap()
            caller = silent_since
        if self._reply_start is not None:
            bot = self._reply_start
        else:
            bot = max(self._flushed + len(self._bot), self._now_bytes())
        return min(caller, bot)

    def take_settled(self) -> tuple[bytes, bytes, int] | None:
        """Settled audio, once there is ``SPILL_S`` of it, out of memory: (caller, bot,
        the silence before them), the first two equally long; None while there is less, or
        when it is all silence past both channels' audio (counted, not held: it goes before
        the next block). Hand it to ``append`` (a worker thread)."""
        size = self._settled() - self._flushed
        if size < self._spill_bytes:
            return None
        # Past the channels' audio only silence has settled: the file must not grow by it
        # unless audio follows (the file ends where its audio ends, as it always did).
        audio = min(size, self._audio_end() - self._flushed)
        caller = bytes(self._caller[:audio]).ljust(audio, b"\0")
        del self._caller[:size]
        bot = bytes(self._bot[:audio])
        del self._bot[:size]
        self._flushed += size
        silence, self._silence = (self._silence, 0) if audio else (0, self._silence)
        self._silence += size - audio
        return (caller, bot, silence) if audio else None

    def append(self, caller: bytes, bot: bytes, silence: int = 0) -> None:
        """Write one block of ``take_settled`` (blocking; one at a time, in order). A write
        that fails ends the recording: its file is deleted, ``write`` raises the error."""
        if self._failed is not None:
            return
        try:
            self._write_silence(silence)
            self._write_block(caller, bot)
        except Exception as exc:
            self._failed = exc
            self._discard()

    # ---- at the end

    def write(self) -> tuple[Path, Path]:
        """The rest of the audio, then the WAV renamed from its part and the JSON; blocking.
        A write that fails (a full disk), now or during the call, raises and leaves no
        file: no WAV cut short, no JSON cut off."""
        if self._failed is not None:
            raise self._failed
        json_path: Path | None = None
        try:
            remaining = self._audio_end() - self._flushed
            second = self.sample_rate * 2
            if remaining:  # audio follows the silence settled before it
                self._write_silence(self._silence)
            # A second at a time: a long call's audio is never copied whole.
            for begin in range(0, remaining, second):
                end = min(begin + second, remaining)
                self._write_block(self._caller_pcm(begin, end), bytes(self._bot[begin:end]),
                                  end - begin)
            if self._wav is None:  # a call with no audio: an empty WAV
                self._open()
            assert self._wav is not None and self._file is not None
            self._wav.close()
            self._file.close()
            frames = self._wav.getnframes()
            assert self._part_path is not None
            # The name is claimed now, not when the part was opened: another call of this id
            # may have finished since and taken it.
            self._wav_path = _claim_name(self.directory, self._name)
            os.replace(self._part_path, self._wav_path)  # over its own empty claim
            self._part_path = None
            json_path = self._wav_path.with_suffix(".json")
            turns = [e for e in self.events if e["type"] == "turn_metrics"]
            _write_private(json_path, json.dumps({
                "call_id": self.call_id, "started_at": self._started_at,
                "sample_rate": self.sample_rate,
                "duration_s": round(frames / self.sample_rate, 3),
                "channels": {"left": "caller", "right": "bot"},
                "audio": self._wav_path.name,
                "turns": turns, "events": self.events}, indent=1))
        except BaseException:
            self._discard()
            for path in (self._wav_path, json_path):
                if path is not None:
                    path.unlink(missing_ok=True)
            raise
        return self._wav_path, json_path

    def _write_block(self, caller: bytes, bot: bytes, size: int | None = None) -> None:
        """Both channels, interleaved, at the end of the file (opened if need be); each
        shorter one padded with silence to ``size`` (default: the caller's length)."""
        if self._wav is None:
            self._open()
        assert self._wav is not None
        size = len(caller) if size is None else size
        stereo = np.zeros((size // 2, 2), dtype="<i2")
        left = np.frombuffer(caller, dtype="<i2")
        right = np.frombuffer(bot, dtype="<i2")
        stereo[:len(left), 0] = left
        stereo[:len(right), 1] = right
        # The wave module brings the header's sizes up to date after every write (the
        # frame count is never set ahead): the part is a whole WAV after each block.
        self._wav.writeframes(stereo.tobytes())

    def _write_silence(self, size: int) -> None:
        """``size`` bytes of silence on both channels, a second at a time (it may be hours)."""
        second = self.sample_rate * 2
        for begin in range(0, size, second):
            self._write_block(b"", b"", min(second, size - begin))

    def _open(self) -> None:
        make_private_dir(self.directory)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._started_at))
        self._name = f"{stamp}-{self.call_id}"
        self._file, self._part_path = _new_part(self.directory, self._name)
        self._wav = wave.open(self._file, "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(self.sample_rate)

    def _discard(self) -> None:
        """Close and delete the part file (a failed write)."""
        if self._wav is not None:
            try:  # it lets go of the file even when its last header update fails
                self._wav.close()
            except (OSError, ValueError):
                pass
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        if self._part_path is not None:
            self._part_path.unlink(missing_ok=True)
        self._wav = None

    def _caller_bytes(self) -> int:
        return self._flushed + len(self._caller) + self._gap + len(self._since_gap)

    def _audio_end(self) -> int:
        """Where the later of the two channels' audio ends (bytes from the call's start)."""
        return max(self._caller_bytes(), self._flushed + len(self._bot))

    def _caller_pcm(self, begin: int, end: int) -> bytes:
        """Bytes ``begin:end`` (from ``_flushed``) of the caller channel: the audio up to
        the last gap, the gap's silence, the audio since (shorter past the channel's end)."""
        head, gap_end = len(self._caller), len(self._caller) + self._gap
        out = bytearray(self._caller[begin:min(end, head)])
        if begin < gap_end and end > head:
            out += bytes(min(end, gap_end) - max(begin, head))
        if end > gap_end:
            out += self._since_gap[max(begin, gap_end) - gap_end:end - gap_end]
        return bytes(out)


def make_private_dir(directory: Path) -> None:
    """``directory`` and its missing parents, each created ``DIRECTORY_MODE`` (``mkdir``'s
    ``parents`` would make the parents with the default mode); existing ones are left as
    they are."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:  # made meanwhile (another call): as it was made
            if not path.is_dir():
                raise


def _create(path: Path) -> BinaryIO:
    """``path`` created (never opened if it exists: ``FileExistsError``), ``FILE_MODE``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 FILE_MODE)
    return os.fdopen(fd, "wb")


def _write_private(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, created ``FILE_MODE``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                 FILE_MODE)
    with os.fdopen(fd, "wb") as file:
        file.write(text.encode("utf-8"))


def _stems(name: str) -> Iterator[str]:
    """``name``, then ``name-2``, ``name-3``... (a second call of the same id starting in
    the same second: a Twilio CallSid streamed twice)."""
    yield name
    for n in itertools.count(2):
        yield f"{name}-{n}"


def _new_part(directory: Path, name: str) -> tuple[BinaryIO, Path]:
    """A part file of ``name``'s created to write in (``name.wav.part``, or the next free
    ``-n``); created at once, never one another call writes."""
    for stem in _stems(name):
        part_path = directory / f"{stem}.wav.part"
        if (directory / f"{stem}.wav").exists():
            continue  # mostly to keep a part's name beside its WAV's; _claim_name decides
        try:
            return _create(part_path), part_path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _claim_name(directory: Path, name: str) -> Path:
    """The first free ``name.wav`` (or ``-n``), claimed by creating it empty in one step:
    a finished recording never replaces another, whatever finished in between."""
    for stem in _stems(name):
        wav_path = directory / f"{stem}.wav"
        if wav_path.with_suffix(".json").exists():
            continue
        try:
            _create(wav_path).close()
        except FileExistsError:
            continue
        return wav_path
    raise AssertionError("unreachable")


class RecordedOutput:
    """A CallOutput that tells the recorder what it sends, then sends it."""

    def __init__(self, inner: Any, recorder: CallRecorder,
                 spill: Callable[[], None] | None = None) -> None:
        self._inner = inner
        self._recorder = recorder
        self._spill = spill  # settled audio out to the file (the call's, on its thread)
        self.encoding = inner.encoding

    async def send_event(self, event: dict[str, Any]) -> None:
        self._recorder.event(event)
        await self._inner.send_event(event)

    async def send_audio(self, frame: bytes) -> None:
        if self._spill is not None:
            # Before the frame: a reply's first one fills the bot channel with silence up
            # to now, which after a long quiet spell in a chat call would all be held.
            self._spill()
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
