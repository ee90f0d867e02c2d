"""Streaming recognition from a batch recogniser (Moonshine, Whisper): re-decode the utterance.

Neither embedded model streams, so a call's stream keeps the utterance's audio and
decodes it again when that is worth it:

- The early final: when the caller pauses, the turn detector hints ``speech_paused()``
  and the whole utterance is decoded at once. If the turn then ends with no new speech,
  that decode *is* the final (audio after the pause is silence), so the final is usually
  ready when the turn ends, and its routing can start before it.
- Splits: an utterance is cut at a long pause the caller spoke on after
  (``split_pause_ms``): the early decode started at that pause is kept as the utterance's
  first segment, and later decodes read only the audio after it (``RedecodingStream``).
- Long utterances: a tail that reaches ``max_utterance_s`` (a caller who talks on without
  a pause that ends the turn) is split off as a segment the same way, decoded once, and
  its audio let go: the buffer stays bounded and no audio goes undecoded.
- Partials: after every ``partial_interval_ms`` of new audio, but only when a decode
  slot of the process is free and none of this call's decodes is running. Under load a
  caller gets fewer partials, never a later final. A partial still running when the
  caller paused is dropped when it ends: the pause's early decode read more audio.

``DecodeScheduler`` is shared by every call of the process: at most ``slots`` decodes run
at once on the model executor, and finals (early or not) are taken before partials. A
final that finds every slot busy stops a running partial, which gives up its slot at its
next decoder step (Moonshine; a recogniser without steps finishes its partial): partials
use whatever the finals leave idle, and a final never waits out a partial's decode. A
running decode nobody waits for any more (the caller spoke on after the pause that started
an early final; the utterance was cut) is stopped the same way instead of running to its end.

Each decode hands the recogniser the token ids of the utterance's previous decode as a
draft (when it takes one: Moonshine). The model checks the whole draft in one pass and
decodes step by step only past the first token it disagrees with, so a final that the
partials mostly heard costs about a third of a fresh decode, with the same text (with
Moonshine's int8 decoder, the default, but for a rare near-tie: providers/moonshine_int8.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Protocol, Sequence

from .. import logs
from ..clock import SYSTEM_CLOCK, Clock
from ..executors import ExecutorShutDown, shut_down, submit
from .base import Transcript, drop_queued_partials, strip_stray_quotes

SAMPLE_RATE = 16000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000
# Audio shorter than this is not decoded (a click, a breath): the text is empty.
MIN_DECODE_BYTES = 2 * SAMPLE_RATE // 10
log = logging.getLogger("voicegate.stt")

FINAL, PARTIAL = 0, 1  # decode priorities: lower runs first
# A stream's failed partials after its first (logged with its traceback): a line this often
# at most, counting those held back (a broken recogniser fails every one, several a second).
PARTIAL_FAILURE_LOG_EVERY_S = 10.0
# A decode's text and token ids (no ids: the recogniser takes no drafts).
Decoded = tuple[str, list[int]]
# (audio, draft, stop): a decode that can stop early checks ``stop`` between its steps.
DecodeFn = Callable[[bytes, Sequence[int], threading.Event], Decoded]


class DecodeStopped(Exception):
    """A decode stopped before its end: a final wanted its slot, or nobody waited for it."""


class BatchRecognizer(Protocol):
    """A model that transcribes a whole utterance (blocking, thread-safe)."""

    name: str

    def transcribe(self, pcm16: bytes) -> str:
        """16-bit mono PCM at 16 kHz -> text; runs on a worker thread."""

    def warm_up(self) -> None: ...


def decode_fn(recognizer: BatchRecognizer) -> DecodeFn:
    """The recogniser's stoppable decode with a draft when it has one
    (``transcribe_ids(pcm16, draft, stop)``), else its plain ``transcribe``; its text
    without stray quote marks at its ends (``strip_stray_quotes``: Moonshine can start
    one with the token '▁"\''), its ids as they were (the next decode's draft)."""
    with_draft = getattr(recognizer, "transcribe_ids", None)
    if with_draft is not None:
        def decode(pcm16: bytes, draft: Sequence[int], stop: threading.Event) -> Decoded:
            text, ids = with_draft(pcm16, draft, stop)
            return strip_stray_quotes(text), ids
        return decode
    return lambda pcm16, draft, stop: (strip_stray_quotes(recognizer.transcribe(pcm16)), [])


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    pcm16: bytes = field(compare=False)
    draft: Sequence[int] = field(compare=False)
    future: asyncio.Future[Decoded] = field(compare=False)
    stop: threading.Event = field(compare=False, default_factory=threading.Event)


class DecodeScheduler:
    """Runs decodes on the model executor, ``slots`` at a time, finals first."""

    def __init__(self, transcribe: DecodeFn, executor: Executor, slots: int) -> None:
        self._transcribe = transcribe
        self._executor = executor
        self.slots = max(1, slots)
        self._queue: list[_Job] = []
        self._seq = itertools.count()
        self.running = 0
        self.decodes = {FINAL: 0, PARTIAL: 0}
        self.partials_stopped = 0  # gave their slot to a final
        self.abandoned_stopped = 0  # running when their caller stopped waiting for them
        # False: every decode runs to its end, as before stopping existed (for
        # bench/decode_contention.py, which compares the two).
        self.stop_decodes = True
        self._running: dict[int, _Job] = {}  # by seq

    @property
    def has_free_slot(self) -> bool:
        return self.running + len(self._queue) < self.slots

    async def decode(self, pcm16: bytes, priority: int, draft: Sequence[int] = ()) -> Decoded:
        if len(pcm16) < MIN_DECODE_BYTES:
            return "", []
        future: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
        job = _Job(priority, next(self._seq), pcm16, draft, future)
        heapq.heappush(self._queue, job)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled while queued: the job is skipped. While running: it stops at its
            # next step (or, not stoppable, finishes), and its result is dropped.
            if self.stop_decodes and job.seq in self._running and not job.stop.is_set():
                job.stop.set()
                self.abandoned_stopped += 1
            raise

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running < self.slots and self._queue:
            job = heapq.heappop(self._queue)
            if job.future.done():
                continue
            try:
                work = submit(self._executor, "STT", self._transcribe, job.pcm16, job.draft,
                              job.stop)
            except ExecutorShutDown as exc:  # asked after Runtime.aclose: no slot taken
                job.future.set_exception(exc)
                continue
            self.running += 1
            self.decodes[job.priority] += 1
            self._running[job.seq] = job
            done = asyncio.wrap_future(work, loop=loop)
            done.add_done_callback(lambda f, job=job: self._finished(job, f))
        if self.stop_decodes:
            self._stop_partials_for_finals()

    def _stop_partials_for_finals(self) -> None:
        """Every final still queued gets a running partial asked to stop (one each)."""
        waiting = sum(1 for job in self._queue if job.priority == FINAL and not job.future.done())
        if not waiting:
            return
        # A running decode already asked to stop frees its slot soon: it counts as given.
        stopping = sum(1 for job in self._running.values() if job.stop.is_set())
        for job in self._running.values():
            if stopping >= waiting:
                break
            if job.priority == PARTIAL and not job.stop.is_set():
                job.stop.set()
                stopping += 1
                self.partials_stopped += 1

    def _finished(self, job: _Job, result: asyncio.Future[Decoded]) -> None:
        self.running -= 1
        self._running.pop(job.seq, None)
        # Read even when nobody waits (a stopped decode's DecodeStopped), or asyncio
        # reports the exception as never retrieved.
        error = None if result.cancelled() else result.exception()
        if not job.future.done():
            if result.cancelled():
                # Only the executor's shutdown cancels the work (``cancel_futures``, before a
                # thread took it); a cancel of the waiting task reached job.future already.
                # As a cancel, the final would look withdrawn and nothing would report it.
                job.future.set_exception(shut_down("STT"))
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result.result())
        self._dispatch()


class RedecodingSTT:
    """A batch recogniser served as streaming STT. ``open_stream()`` per call."""

    sample_rate = SAMPLE_RATE

    def __init__(self, recognizer: BatchRecognizer, executor: Executor, slots: int,
                 partial_interval_ms: int = 400, max_utterance_s: float = 30.0,
                 split_pause_ms: int = 0, min_segment_ms: int = 1000,
                 early_pad_ms: int = 0, clock: Clock = SYSTEM_CLOCK) -> None:
        """``split_pause_ms``: a pause that lasted this long after its early decode
        started, and that the caller then spoke on after, splits the utterance there
        (0: never); only when the part before it is ``min_segment_ms`` long or more.
        ``early_pad_ms``: the early decode reads the utterance's last this many ms (the
        pause's silence) once more at its end, as if the pause had gone on that long.
        ``clock``: what spaces a stream's lines for its failed partials (a test's
        ``ManualClock``)."""
        self.recognizer = recognizer
        self.name = recognizer.name
        self.scheduler = DecodeScheduler(decode_fn(recognizer), executor, slots)
        self.partial_interval_bytes = partial_interval_ms * BYTES_PER_MS
        self.max_utterance_bytes = int(max_utterance_s * SAMPLE_RATE) * 2
        self.split_pause_bytes = split_pause_ms * BYTES_PER_MS
        self.min_segment_bytes = min_segment_ms * BYTES_PER_MS
        self.early_pad_bytes = early_pad_ms * BYTES_PER_MS
        self.clock = clock

    def transcribe(self, pcm16: bytes) -> str:
        return strip_stray_quotes(self.recognizer.transcribe(pcm16))

    def warm_up(self) -> None:
        self.recognizer.warm_up()

    def open_stream(self) -> "RedecodingStream":
        return RedecodingStream(self.scheduler, self.partial_interval_bytes,
                                self.max_utterance_bytes, self.split_pause_bytes,
                                self.min_segment_bytes, self.early_pad_bytes, self.clock)

    async def aclose(self) -> None:
        return None


class RedecodingStream:
    """One caller's utterance buffer, partial decodes and (early) final decode.

    With ``split_pause_bytes``, an utterance is cut at a long pause the caller spoke on
    after (numbers read in groups, a second sentence): the decode started at that pause
    goes on and becomes the utterance's first *segment*; later decodes (partials, early
    and final) read only the audio after it and are joined to its text. A decode's
    cost grows with the audio it reads (Moonshine's encoder attends to all of it), so
    the final of a long question that paused costs what its last part costs.
    """

    def __init__(self, scheduler: DecodeScheduler, partial_interval_bytes: int,
                 max_utterance_bytes: int, split_pause_bytes: int = 0,
                 min_segment_bytes: int = 0, early_pad_bytes: int = 0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._scheduler = scheduler
        self._clock = clock
        self._partial_interval = partial_interval_bytes
        self._max_bytes = max_utterance_bytes
        self._split_pause = split_pause_bytes  # 0: never split
        self._min_segment = max(min_segment_bytes, MIN_DECODE_BYTES)
        self._early_pad = early_pad_bytes
        self._buffer = bytearray()
        self._received = 0  # bytes of this utterance, including any trimmed off
        self._partials: asyncio.Queue[Transcript] = asyncio.Queue()
        self._partial_task: asyncio.Task[None] | None = None
        self._partial_at = 0  # _received when the last partial decode started
        self._last_partial_text = ""
        self._draft: list[int] = []  # token ids of the newest decode of the tail
        self._early: asyncio.Task[Decoded] | None = None
        self._paused_at: int | None = None  # len(_buffer) when the current pause began
        self._pauses = 0  # pauses hinted so far: a partial started before one is stale
        # Decodes of the audio before ``_tail`` (split off at pauses), in order: the
        # utterance's text is theirs joined with the tail's.
        self._segments: list[asyncio.Task[Decoded]] = []
        self._tail = 0
        self._whole = True  # _buffer still holds the utterance's first audio
        self._generation = 0
        self._closed = False
        self.partials_skipped = 0  # due, but the process had no free decode slot
        self.partials_failed = 0  # their decode raised (a broken recogniser)
        self._failure_logs = logs.Throttle(PARTIAL_FAILURE_LOG_EVERY_S)
        self.splits = 0  # segments split off (tests read it)

    async def send_audio(self, pcm16: bytes) -> None:
        self._buffer += pcm16
        self._received += len(pcm16)
        if len(self._buffer) - self._tail >= self._max_bytes and self._early is None:
            self._split_long()
        # Only audio a segment holds is let go: the tail is never dropped undecoded.
        overflow = min(len(self._buffer) - self._max_bytes, self._tail)
        if overflow > 0:
            del self._buffer[:overflow]
            self._tail -= overflow
            self._whole = False
            if self._paused_at is not None:
                self._paused_at = max(0, self._paused_at - overflow)
        if self._received - self._partial_at < self._partial_interval:
            return
        if self._early is not None or (self._partial_task and not self._partial_task.done()):
            return  # this call's own decode runs: a partial now would only delay it
        if not self._scheduler.has_free_slot:
            self.partials_skipped += 1
            return
        self._partial_at = self._received
        self._partial_task = asyncio.create_task(self._decode_partial(self._tail_audio()),
                                                 name="vg-stt-partial")

    def _split_long(self) -> None:
        """The tail is ``max_utterance_bytes`` long (the caller talks on without a
        pause that ends the turn): it is split off as a segment, decoded once (the cut may
        fall inside a word), so that its audio can be let go without going unheard; later
        decodes read what follows. Not while a pause's decode runs: that one reads it."""
        self._segments.append(asyncio.create_task(
            self._scheduler.decode(self._tail_audio(), FINAL, self._draft),
            name="vg-stt-long-segment"))
        self._tail, self._draft = len(self._buffer), []
        self.splits += 1

    def _tail_audio(self) -> bytes:
        with memoryview(self._buffer) as view:
            return bytes(view[self._tail:])

    async def _decode_partial(self, snapshot: bytes) -> None:
        generation, segments, pauses = self._generation, list(self._segments), self._pauses
        try:
            text, ids = await self._scheduler.decode(snapshot, PARTIAL, self._draft)
            text = await _joined(segments, text)
        except DecodeStopped:  # a final took its slot: the next partial is due as usual
            return
        except Exception as exc:  # a failed partial is not fatal: the final decides
            self._partial_failed(exc)
            return
        # A partial of an utterance that has since ended must not leak into the next one;
        # nor one of audio that has since been split off (its words would be said twice);
        # nor one started before a pause: the early decode read more audio, and this
        # partial, finishing after it, would take words back and replace its draft.
        if generation == self._generation and segments == self._segments \
                and pauses == self._pauses and not self._closed:
            self._draft = ids
            self._offer_partial(text)

    def _partial_failed(self, exc: Exception) -> None:
        """Log a failed partial: the stream's first with its traceback, then a line every
        ``PARTIAL_FAILURE_LOG_EVERY_S`` of its clock at most, ``held_back`` counting the
        failures not logged since (every partial of a broken recogniser fails)."""
        self.partials_failed += 1
        held = self._failure_logs.admit("partial", self._clock.now())
        if held is not None:
            logs.event(log, "stt_partial_failed", logging.WARNING,
                       exc_info=exc if self.partials_failed == 1 else None,
                       error=f"{type(exc).__name__}: {exc}"[:300], held_back=held)

    def _offer_partial(self, text: str) -> None:
        if text and text != self._last_partial_text:
            self._last_partial_text = text
            self._partials.put_nowait(Transcript(text=text, final=False))

    def speech_paused(self) -> Awaitable[Transcript]:
        """The caller went quiet: decode the utterance so far now, as the final-to-be.

        Returns the early transcript; it is also offered as a partial.
        """
        self._cancel_early()
        self._pauses += 1
        self._paused_at = len(self._buffer)
        self._early = asyncio.create_task(
            self._scheduler.decode(self._padded(self._tail_audio()), FINAL, self._draft),
            name="vg-stt-early-final")
        # A task, not a bare coroutine: a pause that ends before anyone awaits it (the
        # caller spoke on at once) leaves nothing un-awaited behind.
        transcript = asyncio.ensure_future(self._early_transcript(
            self._early, self._generation, list(self._segments)))
        transcript.add_done_callback(lambda t: t.cancelled() or t.exception())
        return transcript

    def _padded(self, audio: bytes) -> bytes:
        """The early decode starts after only a short silence; Moonshine, read a few ms
        after a last word, can drop that word. Its end, which the turn detector heard as
        silence, is read again in place of the silence still to come."""
        pad = self._early_pad
        if not pad or len(audio) < 2 * pad:
            return audio
        return audio + audio[-pad:]

    async def _early_transcript(self, early: asyncio.Task[Decoded], generation: int,
                                segments: list[asyncio.Task[Decoded]]) -> Transcript:
        text, ids = await asyncio.shield(early)
        text = await _joined(segments, text)
        # Split off since (the caller spoke on): later partials carry its words, and one
        # offered now could come after them and take words back.
        if generation == self._generation and not self._closed and early is self._early:
            self._draft = ids
            self._offer_partial(text)
        return Transcript(text=text, final=False)

    def speech_resumed(self) -> None:
        """The caller went on. After a long enough pause the decode started at it is
        kept as a segment (``split_pause_bytes``); otherwise it is thrown away."""
        if self._splits_here():
            assert self._early is not None and self._paused_at is not None
            self._segments.append(self._early)
            self._tail, self._draft, self._early = self._paused_at, [], None
            self.splits += 1
        else:
            self._cancel_early()
        self._paused_at = None

    def _splits_here(self) -> bool:
        early, paused_at = self._early, self._paused_at
        if not self._split_pause or early is None or paused_at is None:
            return False
        if early.done() and (early.cancelled() or early.exception() is not None):
            return False
        return (len(self._buffer) - paused_at >= self._split_pause
                and paused_at - self._tail >= self._min_segment)

    def _cancel_early(self) -> None:
        if self._early is not None and not self._early.done():
            self._early.cancel()
        self._early = None

    def finalize(self) -> Awaitable[Transcript]:
        """Cut the utterance now; the returned awaitable decodes it.

        Audio sent after this call belongs to the next utterance, even while the final
        is still decoding (the caller went on talking).
        """
        # No speech since the pause (a resume cancels it): the early decode stands.
        early, self._early = self._early, None
        segments = self._segments
        self._segments = []
        tail, draft = self._tail_audio(), self._draft
        whole = bytes(self._buffer) if segments and self._whole else b""
        self._start_utterance()
        return self._final(early, segments, tail, draft, whole)

    async def _final(self, early: asyncio.Task[Decoded] | None,
                     segments: list[asyncio.Task[Decoded]], tail: bytes,
                     draft: list[int], whole: bytes) -> Transcript:
        try:
            if early is not None:
                text, _ = await early
            else:
                text, _ = await self._scheduler.decode(tail, FINAL, draft)
            try:
                return Transcript(text=await _joined(segments, text), final=True)
            except Exception:  # a segment's decode failed: the utterance is decoded whole
                log.warning("stt_segment_failed", exc_info=True)
                _stop(segments)
                if not whole:  # its start let go (a long one): words of it are lost
                    raise
                text, _ = await self._scheduler.decode(whole, FINAL)
                return Transcript(text=text, final=True)
        except BaseException:
            # Nobody else holds the segments once the utterance is cut: a final cancelled
            # (the call ended) or failed stops their decodes, which would otherwise keep a
            # process-wide decode slot, and a failure of theirs would go unretrieved.
            _stop(segments)
            raise

    async def partials(self) -> AsyncIterator[Transcript]:  # type: ignore[override]
        while True:
            yield await self._partials.get()

    async def reset(self) -> None:
        self._cancel_early()
        _stop(self._segments)
        self._segments = []
        self._start_utterance()

    def _start_utterance(self) -> None:
        self._generation += 1
        self._buffer.clear()
        self._received = self._partial_at = self._tail = 0
        self._whole = True
        self._paused_at = None
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._partial_task = None
        self._last_partial_text = ""
        self._draft = []
        drop_queued_partials(self._partials)

    async def aclose(self) -> None:
        self._closed = True
        await self.reset()


def _stop(segments: Sequence[asyncio.Task[Decoded]]) -> None:
    """Cancel the segments' decodes still running (cancelling a finished one does nothing);
    a cancelled decode frees its slot and can no longer fail unseen."""
    for segment in segments:
        segment.cancel()


async def _joined(segments: Sequence[asyncio.Task[Decoded]], text: str) -> str:
    """The split-off segments' texts, then ``text``: one utterance. Shielded: whoever stops
    waiting for this utterance's text does not stop the segments' decodes."""
    parts = [(await asyncio.shield(segment))[0] for segment in segments]
    return " ".join(part for part in (*parts, text) if part)
