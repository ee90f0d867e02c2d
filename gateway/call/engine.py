"""The per-call engine: composes turn detection, speculation and the reply stage.

A transport session decodes the wire and calls ``feed_audio`` / ``feed_text`` /
``stop``; the call answers through a ``CallOutput``. Every dependency is handed in
(``CallDeps``), so a test drives a whole call with scripted VAD, fake providers and
a manual clock.

A stage failure never ends the call: it is counted (stats and Prometheus), the
client gets an ``error`` event with a specific code, the caller hears a short
apology when a turn could not be answered, and the next turn works. A provider that
fails FAILED_TURNS_BEFORE_HANDOFF turns in a row (dead for the call) gets the caller
handed off instead, where the line can hand off (``_turn_failed``).

Cancellation (``stop``): the loops, the reply, the final decodes and the
speculation are cancelled and awaited; the STT stream is closed. No task of the
call outlives ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import types
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Generator, NamedTuple, Protocol, Sequence

from intents.embedder import normalize_text
from intents.types import Action, RouteDecision

from .. import logs
from ..agent import (HANDOFF_MESSAGE, HANDOFF_UNAVAILABLE_MESSAGE, TRANSFER_FAILED_MESSAGE,
                     Conversation)
from ..audio import StreamResampler
from ..clock import SYSTEM_CLOCK, Clock, Expired, deadline
from ..preemption import Preemption
from ..providers.base import SpeechToText, Transcript
from ..responder import Responder, Turn
from ..settings import KEYPAD_END, Settings
from ..stats import Stats, keyed
from ..timeline import TurnTimeline
from ..tracing import CallTrace
from ..vad import SAMPLE_RATE as VAD_RATE
from ..vad import WINDOW_BYTES, pcm16_windows
from .idle import IdleWatch
from .keypad import Collected, Keypad, Mapped, check_key
from .recording import WRITER, CallRecorder, RecordedOutput
from .reply import CallOutput, HandoffUnavailable, LineEnded, ReplyStage, StageFailed
from .speculation import PARTIAL_COUNTS, RouteFn, Speculation, SpeculationRules
from .end_of_turn import EndOfTurnSettings, lexically_incomplete
from .turns import (SpeechPaused, SpeechResumed, SpeechStarted, TurnDetector, TurnEnded,
                    TurnSettings, VadScorer)

log = logging.getLogger("voicegate.call")

# The same failure is reported to the client at most this often (it is always counted).
_REPORT_EVERY_S = 5.0
# How often an input loop is started again after a bug escaped it, in one call.
LOOP_RESTARTS = 100
# A provider failing the caller's turns this many times in a row (a revoked key, a service
# refusing every reconnect: the apology on every turn, "say that again" for good) hands the
# call to a person instead, where the line can (``_turn_failed``). A turn answered resets it.
FAILED_TURNS_BEFORE_HANDOFF = 3
# The turn failures that are a provider's (speech recognition, the LLM, the voice): not a
# bug of ours (``reply_failed``), a key mapped to nothing, or a caller who said nothing.
_PROVIDER_FAILURES = frozenset({"stt_failed", "llm_failed", "tts_failed"})
# At the call's time limit, the longest the exchange under way (the reply playing, the
# caller's words and the reply to them) may go on, and the message.
TIME_LIMIT_GRACE_S = 30.0
# How long the hang-up at the time limit waits for the replies it stopped to end (their
# LLM streams closing): their metrics go out before `hangup`.
_STOPPED_REPLIES_WAIT_S = 2.0
# Recordings being written after their call's task was cancelled (see Call.run).
_WRITES: set[asyncio.Future[None]] = set()
# A recording whose disk has not taken a block for this long is given up (a stalled NFS or
# EBS volume): the call goes on, and its audio stops piling up in memory behind the write.
RECORDING_STALL_S = 30.0
# How long a call's end waits for its recording's last write before it closes (its slot
# freed); the write goes on meanwhile, and the shutdown waits for it (recordings_written).
RECORDING_END_WAIT_S = 0.5


async def recordings_written(timeout_s: float) -> int:
    """Wait, at most ``timeout_s``, for the recordings still being written after their calls
    ended (the process's shutdown would cancel them half written); how many were not."""
    pending = list(_WRITES)
    if pending and timeout_s > 0:
        await asyncio.wait(pending, timeout=timeout_s)
    return sum(not write.done() for write in pending)


# P(the caller's turn is complete) from the turn's audio (16 kHz PCM16).
TurnModelFn = Callable[[bytes], Awaitable[float]]

# A caller's turn's inputs; the bot's own phrases (greeting, idle) are no caller turns.
_CALLER_INPUTS = ("audio", "text", "dtmf")


class ConversationKeeper(Protocol):
    """Keeps a call's conversation beyond its stream, for the stream that resumes the call
    (a phone call's: gateway/transports/twilio_context.py)."""

    async def restore(self, conversation: Conversation) -> bool:
        """Go on from the conversation kept; False when there is none."""
        ...

    def changed(self, conversation: Conversation) -> None:
        """A turn ended: keep the conversation as it now stands (never blocks)."""
        ...

    async def aclose(self) -> None:
        """Wait for what is being kept."""
        ...


@dataclass
class CallDeps:
    """What a call is handed: shared services, never the process-wide runtime."""

    settings: Settings
    vad: VadScorer
    stt: SpeechToText
    responder: Responder
    router: RouteFn | None
    stats: Stats
    new_conversation: Callable[[], Conversation]
    clock: Clock = SYSTEM_CLOCK
    # P(the caller's turn is complete) from the turn's audio (16 kHz PCM16); None: no model.
    turn_model: TurnModelFn | None = None
    # OpenTelemetry tracer (tests: the SDK's, with an in-memory exporter); None: the global one.
    tracer: Any = None
    # The FAQ cache version serving now: a partial's decision is reused only while the
    # version that made it serves (``Speculation``); None: always.
    cache_version: Callable[[], str | None] | None = None

    def __post_init__(self) -> None:
        # The call feeds its recogniser the VAD's windows, 16 kHz whatever the line's rate;
        # one declared at another rate (DeepgramSTT(sample_rate=8000)) would be sent audio
        # it hears slowed down or sped up, and return garbled words without an error.
        rate = getattr(self.stt, "sample_rate", VAD_RATE)
        if rate != VAD_RATE:
            raise ValueError(f"the recogniser ({getattr(self.stt, 'name', self.stt)!s}) must "
                             f"take {VAD_RATE} Hz audio, what a call sends it (the VAD's "
                             f"windows, whatever the line's rate), not {rate} Hz")


def end_of_turn_settings(settings: Settings) -> EndOfTurnSettings:
    return EndOfTurnSettings(silence_ms=settings.end_of_turn_silence_ms,
                             complete_silence_ms=settings.complete_turn_silence_ms,
                             incomplete_silence_ms=settings.incomplete_turn_silence_ms,
                             needs_finished_words=settings.complete_turn_needs_finished_words,
                             unfinished_words_incomplete=settings.unfinished_words_incomplete,
                             hesitation_ms=settings.hesitation_ms,
                             hesitation_margin_ms=settings.hesitation_margin_ms,
                             complete_threshold=settings.turn_complete_threshold,
                             incomplete_threshold=settings.turn_incomplete_threshold)


class Call:
    def __init__(self, deps: CallDeps, output: CallOutput, sample_rate: int,
                 metadata: dict[str, Any] | None = None, call_id: str | None = None,
                 resumed: bool = False, keeper: ConversationKeeper | None = None,
                 transport: str = "native") -> None:
        """``resumed``: a phone call going on over a new stream (its first was lost, or a
        transfer nobody took): the caller was greeted already, it is no new call in the
        stats, and its conversation is restored from ``keeper``, which keeps it at every
        turn's end. ``transport``: the endpoint the call came in on, for its trace (never
        read from ``metadata``, which is the client's to write)."""
        self.id = call_id or uuid.uuid4().hex[:12]
        self._resumed = resumed
        self._keeper = keeper
        self.sample_rate = sample_rate
        self.metadata = metadata or {}
        settings = deps.settings
        self._settings = settings
        self._deps = deps
        self._clock = deps.clock
        self._stats = deps.stats
        # Opt-in recording: every frame and event sent passes the recorder first.
        self._recorder: CallRecorder | None = None
        if settings.record_dir:
            self._recorder = CallRecorder(settings.record_dir, self.id, sample_rate,
                                          output.encoding, deps.clock)
            output = RecordedOutput(output, self._recorder,  # type: ignore[assignment]
                                    self._spill_recording)
        self._spill: asyncio.Future[None] | None = None  # a block of it being written
        self._spill_at = 0.0  # when that block was handed to its thread
        self._out = output
        self.encoding = output.encoding

        # Inbound audio: appended by the transport (hot path), drained by the audio loop.
        # Bounded: a stalled loop drops the oldest audio instead of growing. The bound is
        # inbound_buffer_ms of backlog plus the largest message the transports accept
        # (max_frame_bytes of pcm16: 4.1 s at 8 kHz), so one such message is never cut.
        self._inbound = bytearray()
        self._inbound_ready = asyncio.Event()
        self._max_inbound = (sample_rate * 2 * settings.inbound_buffer_ms // 1000
                             + settings.max_frame_bytes) // 2 * 2
        self.dropped_audio_bytes = 0
        self._to16k = StreamResampler.live(sample_rate, VAD_RATE)
        self._pending16k = bytearray()
        # Text turns wait here until the call runs: a text sent right after `start` counts.
        self._texts: asyncio.Queue[tuple[str, bool]] = asyncio.Queue(settings.max_queued_texts)
        # A typed message is under way (partials since the last typed final, or since the
        # caller began to speak, which leaves it unfinished): its first partial started an
        # utterance, as speech does (a turn stopped before its final was routed would
        # otherwise leave its settled hit to the next message).
        self._typing = False

        self._turns = TurnDetector(
            TurnSettings(vad_threshold=settings.vad_threshold,
                         vad_onset_probability=settings.vad_onset_probability,
                         min_speech_ms=settings.min_speech_ms,
                         barge_in_min_speech_ms=settings.barge_in_min_speech_ms,
                         continuation_min_speech_ms=settings.continuation_min_speech_ms,
                         end_of_turn=end_of_turn_settings(settings),
                         early_final_after_ms=settings.early_final_after_ms),
            deps.stt.open_stream(), deps.clock)
        self._speculation = Speculation(
            deps.router, SpeculationRules(min_words=settings.route_min_words,
                                          step_words=settings.route_step_words,
                                          settle_after=settings.route_settle_after),
            on_failure=lambda exc: self._count("route_failed"), version=deps.cache_version)
        self._responder = deps.responder
        self._reply = ReplyStage(deps.responder, output, sample_rate, frame_ms=settings.frame_ms,
                                 lead_ms=settings.playout_lead_ms, clock=deps.clock,
                                 chunk_ms=settings.playout_chunk_ms, report=self._report)
        self.conversation = deps.new_conversation()

        self._reply_task: asyncio.Task[None] | None = None
        # Every reply not yet over: the latest, and those it waits for (still closing).
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._reply_tl: TurnTimeline | None = None  # the reply that runs (not one queued)
        self._reply_task_tl: TurnTimeline | None = None  # the latest reply's, run or queued
        # The replies the last barge-in stopped (theirs is no call_end, whenever they end).
        self._barged: tuple[TurnTimeline | None, ...] = ()
        # Finals of utterances the bot never answered (the caller went on talking):
        # they open the next turn's text, so no words are lost.
        self._carry: list[asyncio.Future[Transcript]] = []
        # The carried words are a turn the bot had begun to answer (``_continues``).
        # The first this many carried utterances are a turn that was answered and cut
        # (continued): 0 when the carry continues nothing.
        self._carry_continues = 0
        # The conversation's message the carried turn began, if it got that far (by identity).
        self._carry_exchange: dict[str, Any] | None = None
        # The caller heard some of that exchange's answer (a continued turn's, cut): it stays
        # in the context when the words are superseded (``_supersede_carry``). Not one a
        # continued turn asked again and was stopped before it spoke: nothing of it was heard.
        self._carry_heard = False
        # The carried entries an exchange that stayed in the context asked (a cut answer that
        # called a tool: ``withdraw_exchange`` keeps it): the agent has them, and the turn
        # they open asks it the rest only, though it routes and transcribes the whole.
        self._carry_in_context: frozenset[asyncio.Future[Transcript]] = frozenset()
        # The carried entries that exchange asked (keys among them): superseded, an exchange
        # that stays in the context asked them already (``_supersede_carry``).
        self._carry_asked: frozenset[asyncio.Future[Transcript]] = frozenset()
        # The carried turns that sent no turn_metrics (stopped before they ran, or while
        # their words decoded), each with the partial counts it had when it was stopped:
        # the turn their words open covers them; dropped (``_drop_carry``), they end.
        self._carry_turns: list[TurnTimeline] = []
        self._finals: set[asyncio.Future[Transcript]] = set()
        # The current pause's end-of-turn signals (turn model, early transcript routing).
        self._pause_tasks: list[asyncio.Task[None]] = []
        # The agent's LLM call started at the current pause for its words (a miss that
        # sounds finished), at most one; the turn adopts it or it is cancelled.
        self._preempt: Preemption | None = None
        self._preempt_tasks: set[asyncio.Task[None]] = set()
        # A reply stopped by speech that may yet be noise (false interruption window).
        self._held: asyncio.Task[None] | None = None
        # Resolved when the hold ends: True confirmed (words), False resumed (noise).
        self._hold_over: asyncio.Future[bool] | None = None
        self._hold_timer: asyncio.Task[None] | None = None
        self._hold_settlers: set[asyncio.Task[None]] = set()
        # The final of the latest utterance that ended during the hold: a settler of an
        # earlier one that heard no words leaves the decision to it (``_settle_hold``).
        self._hold_latest: asyncio.Future[Transcript] | None = None
        # The replies the hold stops if words come: the held one and those it waits for.
        self._hold_replies: frozenset[asyncio.Task[None]] = frozenset()
        # Replies words stopped whose cancel may still be on its way down the queue.
        self._stopped_replies: set[asyncio.Task[None]] = set()
        # The replies the caller's speech last stopped (the latest, and those it waits
        # for: its cancel reaches them down the queue), and when that speech began: speech
        # soon after the turn's end continues the turn (``_continues``).
        self._stopped_by_speech: tuple[frozenset[asyncio.Task[None]], float] | None = None
        # A false interruption within that window (an "uh", a breath: the caller holding
        # the floor) restarts it when the reply resumes: the turn and when it restarted.
        self._window_restarted: tuple[TurnTimeline, float] | None = None
        self._reports = logs.Throttle(_REPORT_EVERY_S)  # each failure code's log and error
        self._stopped = asyncio.Event()
        self.turns_answered = 0

        # Keypad presses wait here for the keypad loop (bounded like texts).
        self._keys: asyncio.Queue[str] = asyncio.Queue(settings.max_queued_texts * 4)
        self._keypad = Keypad(settings.keypad, settings.keypad_pause_s)
        # A spoken turn waits here for keys the caller began after its words (``_keys_for``):
        # the keypad loop hands it the collection as it ends, instead of a turn of its own.
        self._keys_awaited: asyncio.Future[Collected | None] | None = None
        # The latest spoken turn that has not yet taken the keys being collected (its words
        # still decoding), what resolves once it has (``_keys_for``) or is over, and its
        # words: keys whose collection ends meanwhile wait for it (``_until_words_take_keys``).
        self._keys_taker: _KeysTaker | None = None
        # The keypad loop waits for that turn (the collection ended); and the keys it
        # carried on with its words when it was stopped meanwhile (``_keys_left``).
        self._keys_ended = False
        self._keys_left_with: tuple[Collected, int] | None = None
        # Replies a key stopped (``_keypad_loop``): a keypad turn among them that never ran
        # is superseded by that key's input, not carried on (``_keys_never_asked``).
        self._stopped_by_key: set[asyncio.Task[None]] = set()
        # Set as each of the caller's spoken turns ends (its reply started): a mapped key
        # pressed mid-sentence waits for it (``_keypad_loop``).
        self._turn_ended = asyncio.Event()
        # Caller silence once the bot has finished: a prompt, then a goodbye.
        self._idle = IdleWatch(deps.clock, settings.idle_prompt_s, busy=self._line_busy)
        # When the call's time limit is up (max_call_s after it began; see _time_limit_loop).
        self._time_limit_at = deps.clock.now() + settings.max_call_s
        self._transferred = False
        # Natively: the handoff message has played and its `handoff` event gone out, and no
        # reply answered the caller since. They wait for the person the client puts them
        # through to (the socket may stay open meanwhile): no idle line (``_line_busy``).
        self._handed_off = False
        # The codes of the caller's turns a provider failed in a row, since the last turn
        # answered (``_turn_failed``): at FAILED_TURNS_BEFORE_HANDOFF, the handoff.
        self._failed_turns: list[str] = []
        # The time-limit message's reply: the caller's input does not stop it (_barge_in).
        self._limit_message: asyncio.Task[None] | None = None
        # The reply whose handoff message has played, while it transfers the call.
        self._transferring: asyncio.Task[None] | None = None
        # The reply of a key mapped to handoff (queued, its message playing, transferring):
        # the handoff key again meanwhile does nothing (``_handing_off``).
        self._handoff_reply: asyncio.Task[None] | None = None
        # The task awaiting a transfer or hang-up request to the phone line (``_ask_line``).
        self._line_request: asyncio.Task[None] | None = None
        # Why the call ended itself (``idle``, ``time_limit``; ``call_over``: a transfer
        # the line answered with the call already over), None while the caller ends it.
        self.ended: str | None = None
        # The call's span (OpenTelemetry) and its turns' child spans.
        self._trace = CallTrace(deps.tracer, deps.clock, {
            "voicegate.call_id": self.id, "voicegate.sample_rate": sample_rate,
            "voicegate.transport": transport})

    # ------------------------------------------------------------------ inbound API

    def feed_audio(self, pcm16: bytes) -> None:
        """Caller audio at the call's rate. Hot path: append, and wake the audio loop only
        once a whole VAD window is there (a 20 ms frame alone never makes a 32 ms one)."""
        if self._recorder is not None:
            self._record(self._recorder, pcm16)
        self._inbound += pcm16
        overflow = len(self._inbound) - self._max_inbound
        if overflow > 0:
            del self._inbound[:overflow]
            self.dropped_audio_bytes += overflow
            self._count("audio_dropped")
        if len(self._inbound) * VAD_RATE // self.sample_rate + len(self._pending16k) \
                >= WINDOW_BYTES:
            self._inbound_ready.set()

    def feed_text(self, text: str, final: bool) -> None:
        """A caller transcript that skips STT (tests, benchmarks, chat channels).

        Raises ``asyncio.QueueFull`` when ``max_queued_texts`` are already waiting.
        """
        self._texts.put_nowait((text, final))

    def feed_dtmf(self, key: str) -> None:
        """A keypad press. Raises ``BadKey`` for a key no keypad has and
        ``asyncio.QueueFull`` when too many presses are waiting."""
        self._keys.put_nowait(check_key(key))

    def stop(self) -> None:
        self._stopped.set()

    @property
    def replying(self) -> bool:
        return self._reply_task is not None and not self._reply_task.done()

    @property
    def speaking(self) -> bool:
        """The bot's reply audio has started, is not finished and is not held."""
        return (self.replying and self._held is None and self._reply_tl is not None
                and self._reply_tl.has("first_audio"))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        logs.bind_call_id(self.id)
        if self._resumed:
            self._stats.call_resumed()
        else:
            self._stats.call_started()
        logs.event(log, "call_started", sample_rate=self.sample_rate, resumed=self._resumed,
                   **({"metadata": _for_log(self.metadata)} if self.metadata else {}))
        inputs = {"audio": self._audio_loop, "partials": self._partials_loop,
                  "texts": self._text_loop, "keypad": self._keypad_loop}
        if self._settings.idle_prompt_s > 0:
            inputs["idle"] = self._idle_loop
        if self._settings.max_call_s > 0:
            inputs["time_limit"] = self._time_limit_loop
        loops: list[asyncio.Task[None]] = []
        try:
            if self._resumed and self._keeper is not None:
                # Before any turn can reach the agent (the caller's audio buffers meanwhile).
                await self._restore_conversation(self._keeper)
            loops.extend(asyncio.create_task(self._supervised(name, loop), name=f"vg-{name}")
                         for name, loop in inputs.items())
            if not self._resumed and self._settings.greeting.strip():
                self._greet()
            else:
                # No greeting (none configured, or a resumed call: the line's own apology,
                # "... I'm back.", was the last thing said): the caller's silence counts from
                # now, as after a reply (only a reply's end started the count: a caller silent
                # from the start was never prompted nor hung up on, the call held for good).
                self._idle.bot_finished()
            await self._stopped.wait()
        finally:
            try:
                await self._close(loops)
            finally:
                # Whatever cut the closing short (the server's cancel at shutdown, again as
                # the call closes), the call is counted ended, traced and recorded.
                self._stats.call_ended()
                logs.event(log, "call_ended", turns=self._turns.turns)
                self._trace.end(**{"voicegate.turns": self.turns_answered,
                                   "voicegate.ended_by": self.ended or "caller"})
                # Detached first: audio the transport feeds until its stream closes (a call
                # that ended itself) is past the call, and must not grow what a thread reads.
                recorder, self._recorder = self._recorder, None
                if recorder is not None:
                    recorder.close()  # reply tasks a cancel left running write no more
                    # Shielded: a cancel ends the call's task, not the recording's write
                    # (held in _WRITES until it ends: the loop keeps no task alive itself).
                    write = asyncio.ensure_future(self._write_recording(recorder))
                    _WRITES.add(write)
                    write.add_done_callback(_WRITES.discard)
                    with contextlib.suppress(Expired):  # a stalled disk never holds the call
                        async with deadline(self._clock, RECORDING_END_WAIT_S):
                            await asyncio.shield(write)

    async def _close(self, loops: list[asyncio.Task[None]]) -> None:
        """Stop every reply not yet over and the input loops, then close the call's stages."""
        # Every reply not yet over (the latest, those it waits for, a held one).
        pending = [*loops, *self._reply_tasks, *self._finals, *self._carry,
                   *self._pause_tasks, *self._hold_settlers,
                   *([self._hold_timer] if self._hold_timer else [])]
        if self._held is not None:
            pending.append(self._held)
        self._drop_preempt()
        pending.extend(self._preempt_tasks)
        # A reply the call's end cuts off is no barge-in (the caller hung up, the stream
        # died, a drain ran out): said in its turn_metrics, kept out of the stats. Not one
        # a barge-in already stopped (held for a false interruption, or still closing).
        for tl in (self._reply_tl, self._reply_task_tl):
            if tl is not None and not any(tl is cut for cut in self._barged):
                tl.info.setdefault("stopped_by", "call_end")
        # A transfer or hang-up request under way is what ended the stream (Twilio's
        # `stop` may come before its answer): its task ends on its own, not cut off.
        for task in pending:
            if task is not self._line_request:
                task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # Turns whose words were carried to a next turn that never came (the caller ended
        # the call first, a queued one among them) end as turns stopped before their
        # reply. Not after the call's own `hangup`: nothing follows it.
        if self.ended is None:
            with contextlib.suppress(Exception):
                await self._end_carried_turns()
        self._carry_turns = []
        await self._speculation.aclose()
        with contextlib.suppress(Exception):
            await self._turns.aclose()
        if self._keeper is not None and (self.ended is None and not self._transferred
                                         and self._transferring is None):
            # A stream lost mid-turn: what the turn got to is kept too, written in the
            # background (a stalled Redis must not hold the call's end). Not a call
            # hung up or transferred by us: never resumed (a transfer nobody takes comes
            # back to its turns' saves, /twilio/dial-ended).
            self._keeper.changed(self.conversation)

    async def _restore_conversation(self, keeper: ConversationKeeper) -> None:
        try:
            restored = await keeper.restore(self.conversation)
        except Exception:  # a bug in keeping: the call goes on afresh, never down
            log.exception("conversation_restore_failed")
            return
        logs.event(log, "conversation_restored" if restored else "conversation_not_kept",
                   messages=len(self.conversation.history))

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the call's input loops. An exception no stage caught (a bug) loses
        what the loop was handling, never the call's ears: reported as ``internal_error``
        and the loop started again, up to ``LOOP_RESTARTS`` times a call (a loop that
        fails on every input stops there rather than spin)."""
        for _ in range(LOOP_RESTARTS):
            try:
                await loop()
                return
            except Exception as exc:
                logs.event(log, "loop_crashed", logging.ERROR, exc_info=exc, loop=name)
                await self._report("internal_error",
                                   f"the call's {name} handling failed: {type(exc).__name__}")
        logs.event(log, "loop_stopped", logging.ERROR, loop=name, restarts=LOOP_RESTARTS)

    def _record(self, recorder: CallRecorder, pcm16: bytes) -> None:
        """The caller's audio into the recording, then what has settled to its file."""
        recorder.caller_audio(pcm16)
        self._spill_recording()

    def _spill_recording(self) -> None:
        """Every few seconds, what of the recording has settled out to its file on a worker
        thread (one block at a time: they go in order). At every frame of the caller's and
        of the bot's: a chat call sends none of the caller's."""
        recorder = self._recorder
        if recorder is None:
            return
        if self._spill is None or self._spill.done():
            block = recorder.take_settled()
            if block is not None:
                self._spill = asyncio.get_running_loop().run_in_executor(
                    WRITER, recorder.append, *block)
                self._spill_at = self._clock.now()
        elif self._clock.now() - self._spill_at > RECORDING_STALL_S:
            self._recorder = None  # nothing more is kept for it; the stuck write ends alone
            recorder.close()
            self._count("recording_failed")
            logs.event(log, "recording_failed", logging.ERROR,
                       detail=f"its disk took no block for {RECORDING_STALL_S:g} s: given up")

    async def _write_recording(self, recorder: CallRecorder) -> None:
        try:
            if self._spill is not None:
                await self._spill  # the block under way first: the rest follows it
            wav, _ = await asyncio.get_running_loop().run_in_executor(WRITER, recorder.write)
        except Exception as exc:  # a full disk loses the recording, never the call
            self._count("recording_failed")
            logs.event(log, "recording_failed", logging.ERROR, detail=str(exc)[:300])
            return
        logs.event(log, "recorded", path=str(wav))

    # ------------------------------------------------------------------ failures

    def _count(self, code: str) -> None:
        self._stats.error(code)

    async def _report(self, code: str, message: str, turn: int | None = None) -> None:
        """Count a failure, log it and tell the client (at most every few seconds per code).

        Once the call hangs up (`hangup` sent) only ``hangup_failed`` reaches the client:
        the caller's audio still flows meanwhile (natively until the call closes, on a
        phone line for the whole hang-up request), and a stage failing on it (VAD, STT,
        the turn model) is counted and logged, never sent after `hangup`."""
        self._count(code)
        if self._reports.admit(code, self._clock.now()) is None:
            return
        after_hangup = self.ended is not None and code != "hangup_failed"
        logs.event(log, "stage_failed", logging.WARNING, code=code, detail=message[:300],
                   turn=turn, **({"after_hangup": True} if after_hangup else {}))
        if after_hangup:
            return
        event: dict[str, Any] = {"type": "error", "code": code, "message": message[:300]}
        if turn is not None:
            event["turn"] = turn
        await self._out.send_event(event)

    # ------------------------------------------------------------------ audio -> turns

    def _windows(self) -> bytes:
        """The inbound audio resampled to 16 kHz, as a block of complete VAD windows.

        Per-frame path: one copy out of the inbound buffer (none at 16 kHz beyond it),
        one out of the pending 16 kHz buffer; the rest stays for the next frame.
        """
        if self._to16k.to_rate == self._to16k.from_rate:
            self._pending16k += self._inbound  # no resampling: no intermediate copy
        else:
            self._pending16k += self._to16k.process(self._inbound)
        self._inbound.clear()
        usable = len(self._pending16k) // WINDOW_BYTES * WINDOW_BYTES
        if not usable:
            return b""
        with memoryview(self._pending16k) as view:
            block = view[:usable].tobytes()
        del self._pending16k[:usable]
        return block

    async def _audio_loop(self) -> None:
        while True:
            await self._inbound_ready.wait()
            self._inbound_ready.clear()
            if not self._inbound:
                continue
            arrived = self._clock.now()
            block = self._windows()
            if not block:
                continue
            probs: Sequence[float | None]
            try:
                probs = await self._deps.vad.score(self._turns.vad_state, pcm16_windows(block))
            except Exception as exc:  # fail open: the windows go on unscored, the call goes on
                await self._report("vad_failed", f"voice activity detection failed: {exc}")
                probs = [None] * (len(block) // WINDOW_BYTES)
            for index, prob in enumerate(probs):
                window = block[index * WINDOW_BYTES:(index + 1) * WINDOW_BYTES]
                speaking = self.speaking
                self._turns.confirm_speech_slowly(speaking, speaking and self._may_continue())
                heard_voice = self._turns.hears_voice
                try:
                    signals = await self._turns.push(window, prob, arrived)
                except Exception as exc:  # a bug in the detector: this window is lost
                    await self._report("stt_failed", f"speech recognition failed: {exc}")
                    continue
                finally:
                    if heard_voice and not self._turns.hears_voice:
                        self._idle.recheck()  # a click, not speech: a prompt held may be due
                refused = self._turns.take_stt_error()
                if refused is not None:  # the detector went on; the turn fails at its final
                    await self._report("stt_failed", f"speech recognition failed: {refused}")
                for signal in signals:
                    if isinstance(signal, SpeechStarted):
                        self._caller_active()
                        self._speculation.new_utterance()
                        # A typed message the caller left unfinished to speak ends here:
                        # the next typed partial starts an utterance of its own.
                        self._typing = False
                        if self.replying and self._held is None:
                            await self._barge_in("speech", signal.speech_at)
                    elif isinstance(signal, SpeechPaused):
                        self._on_pause(signal)
                    elif isinstance(signal, SpeechResumed):
                        self._end_pause()
                    elif isinstance(signal, TurnEnded):
                        self._on_turn_ended(signal)

    # ------------------------------------------------------------------ a pause: end of turn?

    def _on_pause(self, paused: SpeechPaused) -> None:
        """Gather what decides how long this pause may last (``EndOfTurnPolicy``)."""
        self._end_pause()
        if paused.early is not None:
            self._pause_tasks.append(asyncio.create_task(self._route_early(paused),
                                                         name="vg-early-final"))
        elif self._deps.turn_model is not None:  # no early words: the audio model alone
            self._pause_tasks.append(asyncio.create_task(self._judge_turn(paused),
                                                         name="vg-turn-model"))

    def _end_pause(self, turn_ended: bool = False) -> None:
        """Speech resumed or the turn ended: the pause's signals are moot (and, unless
        the turn ended on these words, its preemptive agent start)."""
        if not turn_ended:
            self._drop_preempt()
        current = asyncio.current_task()  # a pause task may end its own turn
        for task in self._pause_tasks:
            if task is not current:
                task.cancel()
        self._pause_tasks = []

    def _on_turn_ended(self, ended: TurnEnded) -> None:
        self._end_pause(turn_ended=True)
        self._start_spoken_turn(ended)
        self._turn_ended.set()

    async def _judge_turn(self, paused: SpeechPaused) -> None:
        assert self._deps.turn_model is not None
        try:
            probability = await self._deps.turn_model(paused.audio)
        except Exception as exc:  # the silence alone decides this pause
            await self._report("turn_model_failed", f"the end-of-turn model failed: {exc}")
            return
        self._turns.note_turn_probability(paused.pause, probability)

    async def _route_early(self, paused: SpeechPaused) -> None:
        """The utterance decoded at the pause is the final-to-be: route it now, so a
        cache hit is decided (and the turn may end sooner) before the turn ends.

        The turn model is asked only when the words and the cache leave the turn open
        (not a hit, not lexically unfinished): it never competes with the early decode
        for the cores, and a cached question's end never waits for it. It is asked once
        the words are in, beside the silence: a busy model (one for every call of the
        process) never holds a finished miss past the open silence."""
        assert paused.early is not None
        judge = False
        try:
            try:
                early = await paused.early
            except Exception:  # no early words (Deepgram did not endpoint in time, or the
                # decode failed: the final will be reported): the audio model alone
                judge = True
                return
            # The whole question: words carried from a stopped turn, then these ("my card
            # number is" ... "four one two seven" reads unfinished as a whole).
            whole = self._with_carried_words(early.text)
            self._turns.note_transcript(paused.pause, whole)
            decision = await self._speculation.settle(whole)
            if decision is not None:
                decision = decision.as_spoken()  # the recogniser's words: the stricter bar
                self._turns.note_route(paused.pause, decision.hit, decision.finished)
            if not (decision and decision.hit) \
                    and normalize_text(early.text) and not lexically_incomplete(early.text):
                self._preempt_agent(early.text, decision)
                judge = True
        finally:  # the silence no longer waits for this pause's words
            self._turns.note_early_done(paused.pause)
            # A cached question's silence has usually passed by now: its turn ends at
            # once, not at the next VAD window. Not when this task is being cancelled:
            # the pause is over, or the call is (a turn started then would outlive it).
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                ended = self._turns.end_turn_if_due(paused.pause, self._clock.now())
                if ended is not None:
                    self._on_turn_ended(ended)
                elif judge and self._deps.turn_model is not None:
                    self._pause_tasks.append(asyncio.create_task(self._judge_turn(paused),
                                                                 name="vg-turn-model"))

    async def _drop_carry(self, tl: TurnTimeline) -> list[asyncio.Future[Transcript]]:
        """Spoken words never answered (their reply stopped before it spoke, by a text
        message or a key) open the next *spoken* turn; a typed or keypad turn (``tl``) comes
        first and supersedes them. Kept, they would be asked with whatever the caller says
        next, however much later: stale words, and a joined text the cache may route wrongly.
        Their turns that sent no metrics (``_carry_turns``) end here, before this one, as
        turns stopped before their reply: nothing was asked, no hit or miss in the stats.

        Keys carried (``_carry_keys``) are no such words: deliberate input (an account
        number), never routed, that their `keypad` event promised the agent. Those named for
        this turn or an earlier one are taken from the carry and returned, in order, for
        ``tl`` to ask before its own text; any named for a later turn (pressed after ``tl``
        took its number, as it waited behind a reply still closing) stay carried for the
        turn they name. All stay carried while the superseded turns end: a cancel meanwhile
        leaves them to the next turn. ``_supersede_carry`` has dropped the words first."""
        await self._end_carried_turns()
        taken, self._carry = _keys_taken_by(self._carry, tl.turn)
        return taken

    def _supersede_carry(self) -> None:
        """The carried words are superseded (``_drop_carry``): dropped, their keys kept.
        The stopped turn may have asked the agent already (it was thinking): that exchange
        is taken back, as a spoken turn takes back the exchange of the words it carries,
        so the words are not asked and the keys are asked once, by the superseding turn.
        One that stays (it called a tool, or the caller heard some of its answer: a
        continued turn, ``_carry_heard``) asked its keys (``_carry_asked``): they are not
        asked again, or they would read as pressed twice. A continued question asked again
        whole and stopped before its answer spoke stays no more than any unanswered words:
        until stop 67 it did, and the agent was asked the superseded words."""
        words = sum(1 for f in self._carry if _carried_keys(f) is None)
        if words:
            logs.event(log, "carried_words_dropped", utterances=words)
        exchange, asked = self._carry_exchange, self._carry_asked
        if exchange is not None and not self._carry_heard \
                and self.conversation.withdraw_exchange(exchange):
            asked = frozenset()
        self._carry_words([f for f in self._carry if _carried_keys(f) is not None
                           and f not in asked and f not in self._carry_in_context], 0, None)

    async def _end_carried_turns(self) -> None:
        """The carried turns that sent no metrics end, one by one, as turns stopped before
        their reply (their words were not asked: no hit or miss). Each leaves the list as
        it ends, so a cancel meanwhile leaves the rest for whatever ends them next."""
        while self._carry_turns:
            await self._unrouted_turn(self._carry_turns.pop(0), counted=False)

    def _carry_words(self, utterances: list[asyncio.Future[Transcript]], continues: int,
                     exchange: dict[str, Any] | None,
                     asked: Sequence[asyncio.Future[Transcript]] = (),
                     heard: bool = False,
                     in_context: frozenset[asyncio.Future[Transcript]] = frozenset()) -> None:
        """Words stopped before their answer open the next spoken turn (``_spoken_turn``):
        ``utterances`` in order, the first ``continues`` of them a question whose reply was
        cut, and ``exchange`` the one their stopped turn wrote, which that turn takes back;
        ``asked``: the utterances (and keys) that exchange asked; ``heard``: the caller heard
        some of its answer (``_carry_heard``); ``in_context``: those an exchange that stayed
        asked (``_carry_in_context``)."""
        self._carry, self._carry_continues, self._carry_exchange = utterances, continues, exchange
        self._carry_asked = frozenset(asked) if exchange is not None else frozenset()
        self._carry_heard = heard and exchange is not None
        self._carry_in_context = in_context

    def _written_since(self, asked_before: dict[str, Any] | None) -> dict[str, Any] | None:
        """The exchange a turn wrote since the caller's message ``asked_before`` was the
        last one asked, if it wrote one."""
        asked = self.conversation.last_user_message()
        return asked if asked is not asked_before else None

    def _carry_unanswered(self, words: asyncio.Future[Transcript], tl: TurnTimeline) -> None:
        """The turn ``tl`` stopped (or dropped) before it ran: its words open the next
        spoken turn, whose metrics cover it. Not once the call is transferred: every later
        turn is dropped too, and they would only be routed joined to what the caller says
        to the person."""
        if self._transferred:
            # Nobody awaits them now: a failed decode is retrieved here, not left to GC.
            words.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        self._carry.append(words)
        self._carry_turns.append(tl)

    def _with_carried_words(self, text: str) -> str:
        """What this utterance's turn will route: the words it carries (a turn cut off
        mid-sentence, or stopped before it spoke), already decoded, before ``text``, as
        ``_spoken_turn`` joins them. The pause is judged on the whole question ("I forgot
        my password for the app, ... how do I reset it?" is a cached question; "how do I
        reset it?" alone is not) and the final then finds its route made. Carried keys
        (``_CarriedKeys``) are no words: never routed."""
        if not self._carry or not normalize_text(text):
            return text
        if not all(f.done() and not f.cancelled() and f.exception() is None
                   for f in self._carry):
            return text  # still decoding: the final routes the whole question
        return _joined([*(f.result().text for f in self._carry if _carried_keys(f) is None),
                        text])

    def _preempt_agent(self, text: str, decision: RouteDecision | None) -> None:
        """A miss whose words sound finished: the agent's LLM call starts now, while the
        silence runs, and the turn adopts it if it ends on these words with the context
        unchanged (gateway/preemption.py). Not while a reply runs or is held, nor with
        unanswered words to carry, nor keys being collected (the turn asks them first):
        that turn's context or text would differ anyway. Nor
        once the call is transferred: its turn is dropped (the call is with a person), and
        the model request would be paid for nothing."""
        self._drop_preempt()
        if not self._settings.preemptive_agent or self.replying or self._held is not None \
                or self._carry or self._transferred or self._keypad.collecting \
                or (decision is not None and decision.action is Action.HANDOFF):
            return
        preempt = self._responder.preempt(self.conversation, text,
                                          can_hand_off=self._can_hand_off())
        if preempt is None:  # no LLM configured: a miss is a handoff
            return
        self._preempt = preempt
        self._preempt_tasks.add(preempt.task)
        preempt.task.add_done_callback(self._preempt_tasks.discard)
        self._stats.preempt("started")

    def _drop_preempt(self) -> None:
        """Cancel the current pause's preemptive start (its task closes the LLM stream)."""
        preempt, self._preempt = self._preempt, None
        if preempt is not None:
            preempt.cancel()
            self._stats.preempt("discarded")

    async def _partials_loop(self) -> None:
        async with contextlib.aclosing(self._turns.stt.partials()) as partials:  # type: ignore
            while True:
                try:
                    partial = await anext(partials)
                except StopAsyncIteration:
                    return
                except Exception as exc:  # no more partials; finals still come from finalize()
                    await self._report("stt_failed", f"partial transcripts stopped: {exc}")
                    return
                # A bug below is no recogniser's failure: it escapes to _supervised, which
                # loses this partial only.
                if not self._turns.in_utterance:
                    continue  # a late partial of an utterance that already ended
                if self.ended is not None:
                    continue  # the call hangs up: nothing may follow `hangup`
                await self._out.send_event({"type": "transcript", "text": partial.text,
                                            "final": False})
                if self._held is not None and normalize_text(partial.text):
                    self._confirm_interruption()  # words: a real barge-in
                # As the final will be asked (``_spoken_turn``): with the words it carries,
                # or the final could never reuse a partial's routing.
                self._speculation.offer(self._with_carried_words(partial.text))

    def _start_spoken_turn(self, ended: TurnEnded) -> None:
        preempt, self._preempt = self._preempt, None  # this turn's, to adopt or cancel
        final = asyncio.ensure_future(ended.final)
        self._finals.add(final)
        final.add_done_callback(self._finals.discard)
        if self.ended is not None:
            # The call hangs up (a phone line's request under way): as a text then, a turn
            # that ends after `hangup` gets no reply, nor the final transcript its reply
            # would send. Its final decodes until the call closes, as any other's; nobody
            # awaits it, so a failure of it is retrieved here.
            final.add_done_callback(lambda f: f.cancelled() or f.exception())
            if preempt is not None:
                self._preempt_over(preempt)
            return
        if self._held is not None:
            self._hold_latest = final
            settler = asyncio.create_task(self._settle_hold(self._held, final, ended.timeline),
                                          name="vg-settle-hold")
            self._hold_settlers.add(settler)
            settler.add_done_callback(self._hold_settlers.discard)
        # Stopped while queued behind the previous reply's cleanup, the turn never took its
        # words: they open the next turn, as when it is stopped before it spoke.
        # The utterance this turn ends: its final forgets only its own partials, not those
        # of one the caller began before it was routed (``Speculation.decide``).
        utterance = self._speculation.utterance
        self._start_reply(ended.timeline,
                          self._spoken_turn(ended.timeline, final, preempt, utterance),
                          if_never_ran=lambda: self._carry_unanswered(final, ended.timeline))
        self._await_keys_taken(ended.timeline, final)
        if preempt is not None:  # whatever became of the turn, nothing of it outlives it
            assert self._reply_task is not None
            self._reply_task.add_done_callback(lambda _: self._preempt_over(preempt))

    def _await_keys_taken(self, tl: TurnTimeline, final: asyncio.Future[Transcript]) -> None:
        """The spoken turn ``tl`` (its reply the latest) will take the keys still being
        collected once its words (``final``) are decoded (``_keys_for``): until it has, or
        is over, a collection that ends (its pause) waits for it (``_until_words_take_keys``)."""
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._keys_taker = _KeysTaker(tl, taken, final)
        assert self._reply_task is not None
        self._reply_task.add_done_callback(lambda _: self._keys_left(tl))

    def _keys_left(self, tl: TurnTimeline) -> None:
        """The spoken turn ``tl`` is over, the keys not taken. Stopped meanwhile (a message,
        a key, speech), its words are carried on: a number that ended as they decoded (the
        keypad loop waits for them) goes on with them, in its place, as carried keys, so a
        message that supersedes the words takes it (``_drop_carry``) and the next spoken
        turn asks it with them; made a turn of its own, it was answered apart, after them.
        Here, as the turn's task ends: before the turn queued behind it takes the carry."""
        taker = self._keys_taker
        if taker is not None and taker.turn is tl and self._keys_ended \
                and self._keypad.collecting and taker.words in self._carry:
            before = self._keys_began_before(tl)
            keys = self._keypad.expire()
            assert keys is not None
            at = self._carry.index(taker.words)
            if before is False:
                at += 1  # begun in the silence after the words: they follow them
            self._carry.insert(at, _keys_said(keys, tl.turn))
            self._keys_left_with = (keys, tl.turn)
        self._keys_taken(tl)

    def _keys_taken(self, tl: TurnTimeline) -> None:
        taker = self._keys_taker
        if taker is not None and taker.turn is tl:
            self._keys_taker = None
            if not taker.taken.done():
                taker.taken.set_result(None)

    async def _until_words_take_keys(self) -> None:
        """The keypad pause ran out while a spoken turn's words were still decoding (a
        busy recogniser): that turn takes the keys, as it would have had the words decoded
        first (``_keys_for``: keys begun before them open the turn, keys begun after follow
        them), not a turn of its own after it, the number answered apart from its words.
        Waited for as long as the turn's final may be (``_final_wait_s``)."""
        taker = self._keys_taker
        if taker is None or not self._keypad.collecting:
            return
        self._keys_ended = True
        try:
            with contextlib.suppress(Expired):
                async with deadline(self._clock, self._final_wait_s(taker.turn)):
                    await asyncio.wait({taker.taken})
        finally:
            self._keys_ended = False
        left, self._keys_left_with = self._keys_left_with, None
        if left is not None and self.ended is None:  # carried on with the words
            await self._out.send_event({"type": "keypad", "turn": left[1],
                                        "keys": left[0].keys, "action": "agent"})

    def _words_take_keys(self) -> bool:
        """The keys being collected began before the words of the latest reply's spoken
        turn ended, and that turn takes them once those words are decoded (``_keys_for``:
        keys first, one reply). Keys begun after are a key pressed while the agent thinks:
        they supersede the words."""
        taker = self._keys_taker
        if taker is None or taker.turn is not self._reply_task_tl or taker.taken.done():
            return False
        return self._keypad.collecting and self._keys_began_before(taker.turn) is True

    def _keys_began_before(self, tl: TurnTimeline) -> bool | None:
        """Whether the keys being collected began before ``tl``'s words ended (they open
        its turn) or after, in the silence that followed (they follow the words); None when
        either moment is unknown."""
        began, spoken = self._keypad.began_at, tl.marks.get("speech_end")
        if began is None or spoken is None:
            return None
        return began <= spoken

    def _preempt_over(self, preempt: Preemption) -> None:
        preempt.cancel()
        self._stats.preempt("used" if preempt.adopted else "discarded")

    async def _keys_for(self, tl: TurnTimeline, words: Transcript
                        ) -> tuple[Collected | None, bool]:
        """Keys still being collected as the caller's ``words`` (the turn's last utterance)
        are decoded, and whether they follow the words. Begun before the words ended ("4 9
        2 1 ... I don't have the rest", before the keypad pause ran out): they open this
        turn, before its words, as keys whose pause runs out mid-utterance do
        (``_carry_keys``); left collecting, they were answered after it, a second reply in
        the reverse order. Begun in the silence after them ("my account number is" ... 4 9
        2 1, a key every half second): the turn waits for the rest (``#`` or the keypad
        pause), and they follow the words; taken as the words' turn ended, the number was
        cut there, asked before the words, and its rest was a turn of its own. The turn's
        input ended with its last key: its timeline counts from there. Not into words-less
        noise (a cough mid-number): the collection goes on. A cancel while waiting (the
        caller speaks, types) leaves the collection going and the words carried."""
        self._keys_taken(tl)  # a pause that ran out as the words decoded waited for this
        if not (self._keypad.collecting and normalize_text(words.text)):
            return None, False
        if self._keys_began_before(tl) is not False:  # before the words, or unknown
            return self._keypad.expire(), False
        self._keys_awaited = asyncio.get_running_loop().create_future()
        try:
            keys = await self._keys_awaited
        finally:
            self._keys_awaited = None
        for stage in ("speech_end", "end_of_turn"):
            tl.mark(stage, overwrite=True)
        return keys, True

    async def _spoken_turn(self, tl: TurnTimeline, final: asyncio.Future[Transcript],
                           preempt: Preemption | None = None,
                           utterance: int | None = None) -> None:
        utterances, self._carry = [*self._carry, final], []
        continuing, self._carry_continues = self._carry_continues, 0
        exchange, self._carry_exchange = self._carry_exchange, None
        exchange_asked, self._carry_asked = self._carry_asked, frozenset()
        exchange_heard, self._carry_heard = self._carry_heard, False
        in_context, self._carry_in_context = self._carry_in_context, frozenset()
        covered, self._carry_turns = self._carry_turns, []
        self._take_counts(tl)  # its utterance is over: later partials are the next turn's
        try:
            # Shielded: a barge-in cancels the reply, not the decode its words may need.
            # Timed: a decode that never ends (a hung recogniser) must not leave the line
            # silent until the caller speaks again; the apology asks them to.
            async with deadline(self._clock, self._final_wait_s(tl)):
                said = [await asyncio.shield(f) for f in utterances]
            keys, keys_last = await self._keys_for(tl, said[-1])
        except asyncio.CancelledError:
            self._carry_words([*utterances, *self._carry], continuing, exchange,
                              exchange_asked, exchange_heard, in_context)
            self._carry_turns = [*covered, tl]
            raise
        except Exception as exc:
            self._keys_taken(tl)  # no words to take them: keys collected go on their own
            # Keys carried into the lost words are no words to say again ("could you say
            # that again?"): their `keypad` event promised them to the agent, so they open
            # the next turn, before anything carried since. Not those an exchange that
            # stays asked (a stopped turn's, nothing took it back): asked again, they
            # would read as pressed twice.
            asked = exchange_asked | in_context
            self._carry = [*(f for f in utterances
                             if _carried_keys(f) is not None and f not in asked),
                           *self._carry]
            _add_counts(tl, covered)
            if isinstance(exc, Expired):
                for late in utterances:
                    late.cancel()  # stops its decode (a slot of the process): nobody reads it
                reason = ("the final transcript did not come within "
                          f"{self._settings.stt_final_timeout_s:g} s of the end of the turn "
                          "(VOICEGATE_STT_FINAL_TIMEOUT_S)")
            else:
                reason = f"the final transcript failed: {exc}"
            await self._unrouted_turn(tl, apology="stt_failed",
                                      first=self._failed_final(tl, reason, utterance),
                                      utterance=utterance)
            return
        _add_counts(tl, covered)  # its metrics cover the carried turns: their partials too
        if keys is not None:
            done = _keys_said(keys, tl.turn)
            # Carried on with the words should this turn be stopped before it speaks.
            at = len(utterances) if keys_last else len(utterances) - 1
            utterances.insert(at, done)
            said.insert(at, done.result())
            await self._out.send_event({"type": "keypad", "turn": tl.turn,
                                        "keys": keys.keys, "action": "agent"})
        if continuing and not any(normalize_text(t.text) for t in said[continuing:]
                                  if not isinstance(t, _CarriedKeys)):
            # What stopped the answer held no words after all (noise outlasting the
            # hold; keys pressed meanwhile are no words): the cut question is not asked
            # again. Words after it (an utterance whose reply was stopped before it
            # spoke) keep it: they continue it. Nor carried on should this turn (keys
            # alone) be stopped before it speaks: the question stays answered.
            said, utterances = said[continuing:], utterances[continuing:]
            continuing = 0
        # Carried words (keys are none): a question the caller went on with.
        carried = _joined([t.text for f, t in zip(utterances, said)
                           if f is not final and not isinstance(t, _CarriedKeys)])
        text = _joined([t.text for t in said if not isinstance(t, _CarriedKeys)])
        # Or keys its stopped exchange asked (a turn of keys alone): asked again here.
        # (``said`` holds ``utterances``' transcripts, in their order.)
        if carried or any(f in exchange_asked and normalize_text(t.text)
                          for f, t in zip(utterances[:-1], said[:-1])):
            # Its exchange, if it got one, is taken back: the agent is asked once, with the
            # whole question (that very exchange: the same words may have been asked and
            # answered before). One that stays (it called a tool: the agent must know what
            # its tools did) holds the words it asked: the agent is asked the rest only.
            if exchange is not None and not self.conversation.withdraw_exchange(exchange):
                in_context = in_context | exchange_asked
            if continuing:
                tl.info["continues"] = True  # counted once it asks them (_finish_metrics)
        # The agent is asked the keys carried into the turn with the words, in the order
        # they came ("the caller pressed 4 9 2 1 uh I don't have the rest"); the transcript,
        # the routing and a missed question hold the caller's words alone (keys may be a PIN).
        asked = _joined([t.text for f, t in zip(utterances, said) if f not in in_context])
        tl.mark("final_transcript")
        await self._out.send_event({"type": "transcript", "text": text, "final": True,
                                    "turn": tl.turn})
        if not normalize_text(asked):
            logs.event(log, "empty_turn", turn=tl.turn)
            # Nothing to answer, but a turn all the same: it ends with its metrics. Noise
            # (a cough over a reply) is no question, so no hit or miss in the stats.
            # ``empty`` says so to a client waiting for its utterance's metrics.
            tl.info["empty"] = True
            # The reset as the final's routing would have: partials may have held words the
            # final did not, and a hit settled on them would skip the next turn's partials.
            await self._unrouted_turn(tl, counted=False,
                                      first=self._speculation.reset(utterance),
                                      utterance=utterance)
            return
        if preempt is not None and normalize_text(asked) != normalize_text(preempt.text):
            preempt.cancel()  # the final is not what was preempted: a fresh call
            preempt = None
        if not normalize_text(text):
            # Keys alone (their utterance held no words): no question the cache answered or
            # missed, a keypad turn in the stats (``stats.keyed``); `input` stays `audio`.
            tl.info["keys_only"] = True
        asked_before = self.conversation.last_user_message()
        try:
            # Keys alone (their utterance held no words): the agent's, nothing to route.
            await self._answer(tl, text, route=bool(normalize_text(text)), preempted=preempt,
                               utterance=utterance, asked=asked)
        except asyncio.CancelledError:
            # Nothing was said, or the caller went on talking right after the turn ended
            # (a pause mid-sentence): the words open the next turn, and the exchange this
            # turn wrote (if it got that far) is the one the next turn takes back.
            written = self._written_since(asked_before)
            # Keys or words carried meanwhile (``_carry_keys``, ``_carry_unanswered``) come
            # after this turn's words, never dropped.
            if not tl.answered:  # nothing said but a filler: the same question goes on
                self._carry_words([*utterances, *self._carry], continuing, written,
                                  utterances, in_context=in_context)
            elif self._continues(tl):  # the caller heard some of the answer
                self._carry_words([*utterances, *self._carry], len(utterances), written,
                                  utterances, heard=True, in_context=in_context)
            raise

    # ------------------------------------------------------------------ text input

    async def _text_loop(self) -> None:
        while True:
            text, final = await self._texts.get()
            await self._on_text(text, final)

    async def _on_text(self, text: str, final: bool) -> None:
        if self.ended is not None:
            # The call hangs up: `hangup` told the client it is over, so nothing may follow
            # it (no transcript, no reply); the call just closes.
            return
        if not self._typing and not normalize_text(text):
            # An empty submit with nothing typed before it says nothing: it stops nothing
            # (a barge-in here left the caller in silence with nothing to answer). Nor does
            # an empty partial: a streaming STT's empty interim result relayed, a chat box
            # cleared; it begins no typed utterance.
            return
        self._caller_active()
        if self.replying:
            await self._barge_in("text")
        await self._out.send_event({"type": "transcript", "text": text, "final": final})
        if not final:
            if not self._typing:  # the first partial after a final: a new typed utterance
                self._typing = True
                self._speculation.new_utterance()
            self._speculation.offer(text)
            self._idle.quiet_unless_busy()  # no reply follows: the silence counts from now
            return
        self._typing = False
        utterance = self._speculation.utterance
        tl = TurnTimeline(self._turns.next_turn_number(), clock=self._clock)
        at = self._clock.now()
        for stage in ("speech_end", "end_of_turn", "final_transcript"):
            tl.mark(stage, at)
        tl.info["input"] = "text"
        if normalize_text(text):
            # Stopped by the caller's speech before it said anything (queued behind a reply
            # still closing, or as the agent thought: ``_typed_turn``), the message is not
            # lost: it opens the next spoken turn, as spoken words stopped before their
            # answer do. A later message supersedes it.
            self._start_reply(tl, self._typed_turn(tl, text, utterance),
                              if_never_ran=lambda: self._carry_unanswered(_said(text), tl))
        else:
            # Partials typed, then an empty final (the words deleted before the submit): a
            # turn all the same, ended with its metrics as a spoken final with no words is
            # (``empty``: a client waiting for this utterance's metrics gets them), its
            # partials' counts and routing its own, not the next turn's.
            logs.event(log, "empty_turn", turn=tl.turn)
            tl.info["empty"] = True
            await self._unrouted_turn(tl, counted=False,
                                      first=self._speculation.reset(utterance),
                                      utterance=utterance)
            self._idle.quiet_unless_busy()  # nothing to answer, as above

    async def _typed_turn(self, tl: TurnTimeline, text: str, utterance: int) -> None:
        """A typed message's turn. Stopped before its reply said anything (the caller spoke
        while it was routed or the agent thought), its words open the next spoken turn, as
        spoken words stopped so do (``_spoken_turn``), and the exchange it wrote is the one
        that turn takes back; a later message or key supersedes them (``_drop_carry``)."""
        wrote: list[dict[str, Any] | None] = []  # the exchange it wrote, if any (``_answer``)
        try:
            await self._answer(tl, text, typed=True, utterance=utterance, wrote=wrote)
        except asyncio.CancelledError:
            if not tl.answered and not self._transferred:
                # After the carried keys it took up (``_answer`` hands them back), which
                # came before it; before anything carried since.
                keys, rest = _keys_taken_by(self._carry, tl.turn)
                said = _said(text)
                self._carry_words([*keys, said, *rest], 0, wrote[0] if wrote else None,
                                  [*keys, said])
            raise

    # ------------------------------------------------------------------ replies

    def _start_reply(self, tl: TurnTimeline, turn: Coroutine[Any, Any, None],
                     if_never_ran: Callable[[], None] | None = None) -> None:
        self._drop_preempt()  # another reply changes the context a preemptive call was for
        previous = self._reply_task
        self._idle.bot_started()
        # Stopped while queued (a barge-in, the call's end), the turn never runs. A caller's
        # turn keeps the partial counts it had when it was stopped (later ones are the next
        # turn's). Spoken or typed words open the next turn (``if_never_ran``), whose
        # metrics cover them (or, superseded, end it: ``_drop_carry``); a caller's turn
        # nothing hands on (keys; any once the reply it waited for moved the call, as
        # ``_carry_unanswered`` carries nothing then) ends as one stopped before its reply:
        # with its metrics, once the reply it waited for is over. It asked nothing: no hit
        # or miss in the stats.
        caller = tl.info.get("input") in _CALLER_INPUTS

        async def after_previous() -> None:
            try:
                await self._wait_for_previous(
                    previous, stopped=(lambda: self._take_counts(tl)) if caller else None)
            except asyncio.CancelledError:
                if caller and (if_never_ran is None or self._transferred):
                    await self._unrouted_turn(tl, counted=False)
                raise
            if self._transferred:
                # Queued behind the transfer (the caller went on during its request): the
                # call is with a person now, and the bot must not talk over them.
                logs.event(log, "reply_after_transfer_dropped", turn=tl.turn)
                if tl.info.get("input") in _CALLER_INPUTS:
                    # Ended as a turn stopped before its reply ends: with its metrics. Its
                    # words were for the person, no question the cache missed: no hit or
                    # miss in the stats.
                    await self._unrouted_turn(tl, counted=False)
                return
            if self._limit_message is not None \
                    and asyncio.current_task() is not self._limit_message:
                # Queued behind the time-limit message (the caller went on over it): the
                # call hangs up after it, and a reply started in the playout lead before the
                # hang-up would be cut a few frames in. Ended with its metrics, as above.
                logs.event(log, "reply_after_time_limit_dropped", turn=tl.turn)
                if caller:
                    await self._unrouted_turn(tl, counted=False)
                return
            self._reply_tl = tl
            await turn

        # Primed: a cancel before the task's first step (the caller went on in the same
        # loop iteration: a second key, a text) lands in its wait, not before its body.
        self._reply_task = asyncio.create_task(_primed(after_previous()),
                                               name=f"vg-turn-{tl.turn}")
        self._reply_task_tl = tl
        self._reply_tasks.add(self._reply_task)
        self._reply_task.add_done_callback(self._reply_tasks.discard)

        def spoke_again(_: asyncio.Task[None]) -> None:
            # After a native handoff the bot answered the caller again (the client kept
            # them with it): their silence counts once more. Noise, an empty turn, keys
            # that led nowhere answer nothing: the caller still waits for the person.
            if tl.answered and "handoff" not in tl.info:
                self._handed_off = False

        self._reply_task.add_done_callback(spoke_again)
        self._reply_task.add_done_callback(self._reply_done)

        # Cancelled while queued behind the previous reply (a barge-in, the call's end),
        # the turn never ran: close it (a no-op once it has run).
        def close_turn(_: asyncio.Task[None]) -> None:
            if if_never_ran is not None and inspect.getcoroutinestate(turn) == \
                    inspect.CORO_CREATED:
                if_never_ran()
            turn.close()

        self._reply_task.add_done_callback(close_turn)

    async def _wait_for_previous(self, previous: asyncio.Task[None] | None,
                                 stopped: Callable[[], None] | None = None) -> None:
        """Wait for the previous reply to end: its cleanup (context cut to the heard words)
        first, and its done callbacks (a turn stopped while queued hands its words back to
        the carry). A reply's task is primed here (``_primed``): its first step, taken when
        the task is made, so a cancel before the task has run still comes here and this
        reply still ends after the previous one. One that is over, callbacks run (out of
        _reply_tasks, its first callback), is not waited for: asyncio.wait on a done task
        still costs two loop iterations, which under load were most of a cache hit's time
        to first audio. Cancelled meanwhile (a barge-in on the reply
        queued behind it), it is cancelled with this one only if it still plays (a resumed
        reply): one already stopped is closing its LLM streams, and cancelled again the
        agent would not write what the caller heard (as in ``_barge_in``). Nor once the call
        hangs up: the goodbye, woken by its hold's end in the instant the caller's speech
        stopped this one, is in its hang-up request, which a cancel would abandon halfway
        (``_barge_in`` refuses that too; the barge-in came just before `hangup`), nor while it
        transfers the call (``_transfer``). Either way this one ends after it, so the reply
        queued next starts on the context it leaves. ``stopped``: called as it is cancelled."""
        try:
            await _first_step()  # where the task is primed: the loop runs it from here
            if previous is not None and previous in self._reply_tasks:
                await asyncio.wait({previous})
        except asyncio.CancelledError:
            if stopped is not None:
                stopped()
            if previous is not None and previous in self._reply_tasks:
                if not previous.cancelling() and self.ended is None \
                        and previous is not self._transferring:
                    previous.cancel()
                await asyncio.wait({previous})  # cancelled again (the call ends): run ends both
            raise

    def _reply_done(self, task: asyncio.Task[None]) -> None:
        self._stopped_replies.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reply_crashed", exc_info=task.exception())
            self._count("internal_error")
        if task is self._reply_task:  # the latest reply is over: the silence starts now
            self._idle.bot_finished()

    async def _answer(self, tl: TurnTimeline, text: str, *, route: bool = True,
                      decision: RouteDecision | None = None,
                      preempted: Preemption | None = None, typed: bool = False,
                      utterance: int | None = None, asked: str | None = None,
                      wrote: list[dict[str, Any] | None] | None = None) -> None:
        """Answer ``text``: routed (a caller's words), or with the ``decision`` given
        (keypad keys: a mapped entry or handoff, else None, the agent). ``preempted``: the
        agent's LLM call already started on these words (adopted if it still fits).
        ``typed``: a text message or keys, which supersede spoken words still carried;
        routed as text (a transcript needs the router's stricter ``spoken_hit``).
        ``utterance``: the speculation's utterance the words end (``Speculation.decide``).
        ``asked``: what the agent is asked when it is not ``text`` alone: the words with
        keys carried into their turn (``_carry_keys``). Only the agent's conversation gets
        it: ``text`` is what is routed and listed as a missed question, and the answer to
        keys is no draft for the FAQ."""
        asked = text if asked is None else asked
        self._take_counts(tl)
        asked_before = self.conversation.last_user_message()
        unasked = False
        keys: list[asyncio.Future[Transcript]] = []  # carried keys it takes up
        try:
            if typed:
                # Keys carried into the words it supersedes are asked with it, first.
                self._supersede_carry()
                # After the superseded words' exchange was taken back: an older message is
                # the last one asked now, and nothing of it this turn's.
                asked_before = self.conversation.last_user_message()
                keys = await self._drop_carry(tl)
                asked = _joined([*(f.result().text for f in keys), asked])
            reused = False
            if route:
                try:
                    decision, reused = await self._speculation.decide(text, utterance)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the agent (or a handoff) answers instead
                    await self._report("route_failed", f"routing failed: {exc}", tl.turn)
                    decision, reused = None, False
                if decision is not None and not typed:  # a transcript: the stricter bar
                    decision = decision.as_spoken()
            elif utterance is not None:  # as the final's routing would have (_unrouted_turn)
                await self._speculation.reset(utterance)
            tl.mark("route_decided")
            tl.info["route_reused"] = reused
            if decision is not None:
                tl.info.update(intent=decision.intent, action=decision.action.value,
                               hit=decision.hit, entry_id=decision.entry_id)
                await self._out.send_event({"type": "route", "turn": tl.turn, "reused": reused,
                                            **decision.as_json()})
            turn = self._turn(tl, asked, decision)
            turn.preempted = preempted
            try:
                await self._reply.play(turn)
            except StageFailed as exc:
                if isinstance(exc, HandoffUnavailable):  # the agent's handoff, nowhere to go
                    self._count("handoff_unavailable")
                    logs.event(log, "handoff_unavailable", logging.WARNING, turn=tl.turn,
                               code=exc.code)
                await self._report(exc.code, str(exc), tl.turn)
                try:
                    released = await self._until_released()
                except asyncio.CancelledError:
                    # Words stopped it under the hold its failure came in: the caller cut it
                    # off where the interrupt said (the reply stage, which marks a reply
                    # cancelled as interrupted, saw this one fail first).
                    heard = self._reply.frozen_heard_ms
                    tl.info.update(interrupted=True,
                                   **({} if heard is None else {"heard_ms": heard}))
                    raise
                if released:  # held: the apology waits as the reply did
                    await self._resume_into_apology(tl.turn)
                await self._turn_failed(tl, text, exc.code)
            else:
                self._failed_turns = []  # answered: the providers work (again)
                if "handoff" in tl.info:
                    await self._transfer(tl)
        except asyncio.CancelledError:
            # A spoken or typed turn stopped before its reply spoke: ``_spoken_turn`` or
            # ``_typed_turn`` carries its words into the next turn, which asks them. This
            # one asked nothing: no hit or miss (nor a missed question of half the words).
            unasked = tl.info.get("input") != "dtmf" and not tl.answered
            if "handoff" in tl.info and not tl.info.get("transferred"):
                # The handoff message was stopped before its transfer: the caller stays
                # with the bot, and a transfer_to_person result must not say otherwise.
                self.conversation.transfer_not_made()
            written = self._written_since(asked_before)
            if wrote is not None:
                wrote.append(written)
            typed_message = tl.info.get("input") == "text"
            if keys and not tl.answered and not self._transferred \
                    and (typed_message or written is None):
                # Nothing said: the keys it took up go on to the next turn, never lost
                # (``_typed_turn`` puts its words after them, as they came). Not those a
                # keypad turn asked: its exchange stays in the context, and nothing takes
                # it back (asked again, they would read as pressed twice).
                self._carry = [*keys, *self._carry]
            raise
        finally:
            self._take_late_counts(tl, utterance)
            self._handoff_unavailable(tl)
            tl.info["preempted"] = preempted is not None and preempted.adopted
            await self._finish_metrics(tl, text, decision, counted=not unasked,
                                       drafted=asked == text)

    def _turn(self, tl: TurnTimeline, text: str, decision: RouteDecision | None) -> Turn:
        return Turn(number=tl.turn, text=text, sample_rate=self.sample_rate, timeline=tl,
                    conversation=self.conversation, decision=decision, encoding=self.encoding,
                    can_hand_off=self._can_hand_off())

    async def _turn_failed(self, tl: TurnTimeline, text: str, code: str) -> None:
        """The turn could not be answered (``code``): the apology, unless a provider has
        failed FAILED_TURNS_BEFORE_HANDOFF of the caller's turns in a row (a revoked key,
        a service refusing every reconnect: "say that again" would go on for good). Then
        the handoff, as a ``handoff`` intent's (its message, its event, the transfer),
        where the line can hand off (``_can_hand_off``); where it cannot, the apology still:
        a call the bot hung up on would be worse."""
        if code not in _PROVIDER_FAILURES:
            await self._apologize(tl, text, code)
            return
        self._failed_turns.append(code)
        if len(self._failed_turns) < FAILED_TURNS_BEFORE_HANDOFF or not self._can_hand_off():
            await self._apologize(tl, text, code)
            return
        failed, self._failed_turns = self._failed_turns, []
        reason = f"repeated provider failure: {', '.join(failed)} on {len(failed)} turns in a row"
        self._count("repeated_failure_handoff")
        logs.event(log, "repeated_failure_handoff", logging.WARNING, turn=tl.turn,
                   codes=",".join(failed))
        self._trace.event("repeated_failure_handoff", turn=tl.turn)
        turn = self._turn(tl, text, None)
        try:
            await self._reply.play_segment(turn, self._responder.handoff(turn, reason))
        except StageFailed as exc:  # not even the handoff message: the apology, as before
            logs.event(log, "handoff_message_failed", logging.ERROR, code=exc.code,
                       detail=str(exc)[:300])
            await self._apologize(tl, text, code)
            return
        if "handoff" in tl.info:
            await self._transfer(tl)

    def _handoff_unavailable(self, tl: TurnTimeline) -> None:
        """The turn asked for a person (a ``handoff`` intent, the handoff key, no LLM to ask)
        on a line that cannot hand off, and the caller heard so instead of the handoff
        message (``ReplyStage``): counted and logged as the failure's is
        (``HandoffUnavailable``), and the agent told, whole (as a failed transfer's message:
        talked over, the fact stands), so the next turn's model knows the caller is still
        with it, and that it cannot put them through."""
        reason = tl.info.get("handoff_unavailable")
        if reason is None:
            return
        self._count("handoff_unavailable")
        logs.event(log, "handoff_unavailable", logging.WARNING, turn=tl.turn,
                   reason=str(reason)[:200])
        self.conversation.add_assistant(HANDOFF_UNAVAILABLE_MESSAGE)

    def _can_hand_off(self) -> bool:
        """Whether a handoff reaches a person: on the native protocol the ``handoff`` event
        is the contract (the client moves the caller); a phone line transfers where it has
        somewhere to (``can_transfer``: Twilio's handoff number and REST credentials)."""
        if getattr(self._out, "transfer", None) is None:
            return True
        return bool(getattr(self._out, "can_transfer", True))

    async def _apologize(self, tl: TurnTimeline, text: str, code: str) -> None:
        turn = self._turn(tl, text, None)
        try:
            await self._reply.play_segment(turn, self._responder.apology(turn, code))
        except StageFailed as exc:  # not even the pre-rendered phrase: say so, stay up
            logs.event(log, "apology_failed", logging.ERROR, code=exc.code, detail=str(exc))
            # Counted under its own code: the reply's failure alone reads as "apologised
            # for", and this caller heard nothing. Sent only when the voice failed: anything
            # else may be the connection itself, which is not to be written to again.
            if exc.code == "tts_failed":
                await self._report("apology_failed", f"the apology failed too: {exc}",
                                   tl.turn)
            else:
                self._count("apology_failed")

    async def _unrouted_turn(self, tl: TurnTimeline, apology: str | None = None,
                             counted: bool = True,
                             first: Awaitable[None] | None = None,
                             utterance: int | None = None) -> None:
        """End a caller's turn that has no route to answer (its final failed or held no
        words, its key named no entry, it came after the transfer or behind the time-limit
        message) as a turn stopped before its reply ends: with its metrics (operators and
        benchmarks count turns from them) and its own partial counts, which would otherwise
        go to the next turn's. ``first``:
        what the turn does before (the speculation's reset, the failure's report), inside
        the turn, so that a barge-in meanwhile still ends it with its metrics. ``apology``:
        the failure it is played for then; its reply stages are the apology's.
        ``counted``: a hit or miss in the stats (``_finish_metrics``). ``utterance``: the
        speculation's utterance a spoken turn ended (``_take_late_counts``)."""
        try:
            if first is not None:
                await first
            self._take_counts(tl)
            if apology is not None:
                await self._turn_failed(tl, "", apology)
        finally:  # cut off too (in ``first``): the turn was taken all the same
            self._take_counts(tl)
            self._take_late_counts(tl, utterance)
            tl.info["preempted"] = False
            await self._finish_metrics(tl, "", None, counted=counted)

    def _take_counts(self, tl: TurnTimeline) -> None:
        """The turn's partial counts, taken once: those after are the next turn's."""
        if PARTIAL_COUNTS[0] not in tl.info:
            tl.info.update(self._speculation.take_counts())

    def _take_late_counts(self, tl: TurnTimeline, utterance: int | None) -> None:
        """The counts of the partials of ``utterance`` (the one the turn ended) and earlier
        ones whose routing ended after the turn took its counts, as its final decoded: its
        routing (or reset) has ended the rest, so none comes later."""
        if utterance is not None:
            for key, count in self._speculation.take_counts(utterance).items():
                tl.info[key] = tl.info.get(key, 0) + count

    def _final_wait_s(self, tl: TurnTimeline) -> float:
        """How much longer the final of the turn ``tl`` may be waited for:
        ``stt_final_timeout_s`` from the turn's end, whoever waits (its reply, which may
        have queued behind a held one; the hold's settling) and whenever they start."""
        ended = tl.marks.get("end_of_turn", self._clock.now())
        return max(0.0, self._settings.stt_final_timeout_s - (self._clock.now() - ended))

    async def _failed_final(self, tl: TurnTimeline, reason: str,
                            utterance: int | None = None) -> None:
        await self._speculation.reset(utterance)  # as the final's routing would have (_answer)
        await self._report("stt_failed", reason, tl.turn)

    async def _finish_metrics(self, tl: TurnTimeline, text: str,
                              decision: RouteDecision | None, counted: bool = True,
                              drafted: bool = True) -> None:
        """Send the turn's metrics. ``counted``: a hit or a miss in the stats (not a turn
        with no words: nothing was asked). ``drafted``: the reply may be a missed question's
        draft answer (not one to keys carried with the words)."""
        metrics = tl.metrics()
        if counted:
            # Keys are no question to add to the FAQ (and may be a PIN): never a "miss" text.
            asked = None if keyed(metrics) else text
            # A reply stopped part-way (a barge-in, the time limit, the call's end) is no
            # draft for the FAQ: a promotion would publish its first sentences as all of it.
            # Nor is one to keys carried with the words: it may read them back, or what they
            # unlocked (an account's details), and answers more than the words listed.
            answer = None if metrics.get("interrupted") or not drafted \
                else self._reply.said_text(tl.turn)
            self._stats.turn_finished(metrics, asked,
                                      route_score=decision.score if decision else None,
                                      answer=answer, call_id=self.id)
            self.turns_answered += 1
            if tl.info.get("continues"):
                # Here, not as the turn opens: one stopped before it asked anything carries
                # the same cut words on, and the next turn would count them again.
                self._stats.continuation()
        logs.event(log, "turn", **metrics)
        self._trace.turn(tl, metrics)
        self.conversation.trim()  # whatever answered: the cache builds no request, which trims
        if self._keeper is not None:
            self._keeper.changed(self.conversation)
        await self._out.send_event({"type": "turn_metrics", **metrics})

    async def _barge_in(self, cause: str, speech_at: float | None = None) -> None:
        """Stop the bot now: no frame leaves after this, the client drops its buffer.

        Speech only holds the reply for ``false_interruption_s``: if no words come of it
        (a cough, a door), the reply resumes where the caller last heard it. ``speech_at``:
        when that speech began."""
        self._drop_preempt()  # the context is about to change
        task = self._reply_task
        if task is None or task.done():
            return
        if self.ended is not None:
            # The call hangs up: the goodbye has played and `hangup` was sent; its task
            # awaits the phone line's hang-up request, which a cancel would abandon halfway.
            return
        if task is self._transferring:
            return  # the handoff message has played, the transfer is under way (_transfer)
        if cause != "time_limit" and self._limit_message is not None \
                and not self._limit_message.done():
            # The time-limit message plays whole: the hang-up follows it whatever the caller
            # does, and stopped it would only leave them cut off, never told why. What they
            # say, type or key meanwhile queues behind it and gets no reply (_start_reply).
            return
        if task.cancelling():
            # Already stopped, still cutting its context to the heard words (its LLM
            # streams closing): cancelled again, the agent would not write what it said.
            if cause != "speech":
                self._stopped_by_speech = None  # the caller typed on: no spoken continuation
            return
        if self._held is not None:  # already stopped; a text message makes it final
            if cause != "speech":
                self._stopped_by_speech = None  # the caller typed on: no spoken continuation
                self._confirm_interruption()
            return
        # Those it waits for too: the one playing may be ahead of it (``task`` is then
        # the empty turn of an "uh" that held it), and the cancel reaches it down the queue.
        # Not one already stopped, still closing (``_wait_for_previous`` leaves it be): this
        # speech did not stop it (a text message or a key may have: no spoken continuation).
        self._stopped_by_speech = (frozenset(t for t in self._reply_tasks
                                             if t is task or not t.cancelling()), speech_at) \
            if speech_at is not None else None
        # Held only with audio to hold: a playout still open (this reply's, or a resumed
        # one it is queued behind), or this reply's own, already played. A reply not yet
        # playing (queued behind a stopped one, its words decoding or being routed) would
        # start an open playout of its own and play over the caller: it is stopped, and
        # its words open the next turn.
        holdable = self._reply.live or (self._reply_task_tl is not None
                                        and self._reply_task_tl.has("first_audio"))
        turn = self._reply_tl.turn if self._reply_tl else self._turns.turns
        # That turn's reply: one over (its task still ending) was heard in full.
        heard, sent = self._reply.freeze(turn)
        window = self._settings.false_interruption_s
        if cause == "speech" and window > 0 and holdable:
            self._held = task
            self._hold_over = asyncio.get_running_loop().create_future()
            self._hold_replies = frozenset(self._reply_tasks)  # ``task`` and those before it
            self._hold_timer = asyncio.create_task(self._expire_hold(task, window),
                                                   name="vg-hold")
        else:
            task.cancel()
        self._barged = (self._reply_tl, self._reply_task_tl)
        if cause == "time_limit" and self._reply_task_tl is not None:
            # The bot stops its own reply: no barge-in of the caller's in the stats.
            self._reply_task_tl.info["stopped_by"] = cause
        await self._out.interrupt({"type": "interrupt", "turn": turn, "cause": cause,
                                   "heard_ms": round(heard, 1), "sent_ms": sent})
        logs.event(log, "barge_in", turn=turn, cause=cause, heard_ms=round(heard, 1))
        self._trace.barge_in(turn, round(heard, 1), cause)

    def _may_continue(self) -> bool:
        """Speech now would continue a turn that was ended early on its words (judged
        complete: a cached question, after the short silence) within
        ``turn_continuation_ms``, so it stops the reply once it is speech, not after the
        barge-in's long confirmation: such a turn is the one a caller most often goes on
        with ("the exchange rate seems wrong ... on my last payment"), and every 100 ms
        more is the bot talking over them. After any other turn a backchannel ("uh-huh")
        must not stop the reply, so the long confirmation stays. A false start costs
        little: the reply is held and resumes where it stopped when no words come."""
        tl = self._reply_tl
        return (tl is not None and self._settings.false_interruption_s > 0
                and tl.info.get("end_of_turn") == "complete"
                and self._within_continuation(tl, self._clock.now()))

    def _within_continuation(self, tl: TurnTimeline, at: float) -> bool:
        """``at`` is within ``turn_continuation_ms`` of the end of the turn ``tl``, or of
        the reply resuming after a false interruption that began within that window
        ("I lost my card. | uh | on the train this morning": the "uh" held the floor, and
        the words after it come a pause after it, not after the turn's end)."""
        window_s = self._settings.turn_continuation_ms / 1000.0
        if window_s <= 0 or not tl.has("end_of_turn"):
            return False
        opened = tl.marks["end_of_turn"]
        restarted = self._window_restarted
        if restarted is not None and restarted[0] is tl:
            opened = max(opened, restarted[1])
        return at - opened <= window_s

    def _continues(self, tl: TurnTimeline) -> bool:
        """This turn's reply (the running task) was stopped by speech that began within
        ``turn_continuation_ms`` of the turn's end: the caller had paused mid-sentence
        after words that sounded finished, and the turn ended too soon."""
        stopped = self._stopped_by_speech
        return stopped is not None and asyncio.current_task() in stopped[0] \
            and self._within_continuation(tl, stopped[1])

    async def _expire_hold(self, task: asyncio.Task[None], window: float) -> None:
        """Still undecided after the window (long noise, no final yet): a real barge-in.
        Not while the caller is quiet and their speech's final is still decoding (a busy
        host: 1-3 s): that final decides, or a cough stopped the reply for good and its
        empty turn left the caller in silence. Speaking again by then, they are held no
        longer than the window (``_settle_hold`` leaves it to that speech)."""
        await self._clock.sleep(window)
        while self._held is task and not self._turns.in_utterance:
            settling = [s for s in self._hold_settlers if not s.done()]
            if not settling:
                break
            await asyncio.wait(settling, return_when=asyncio.FIRST_COMPLETED)
        if self._held is task:
            self._confirm_interruption()

    def _confirm_interruption(self) -> None:
        """Words came: the held reply ends here, cut to what the caller heard. If the
        caller is talking again meanwhile (the utterance that stopped it has ended, its
        final came late), the reply queued behind it, for that utterance and not yet
        heard, is stopped too, so it cannot start over them: its words open the next
        turn (speech during a hold does not barge in: the held reply is stopped already)."""
        task, self._held = self._held, None
        self._cancel_hold_timer()
        if task is not None:
            task.cancel()
            queued = self._reply_task
            if self._turns.in_utterance and queued is not None and queued is not task \
                    and not queued.done():
                queued.cancel()  # it waits behind ``task``, which ends first
        self._stopped_replies.update(t for t in self._hold_replies if not t.done())
        self._end_hold(confirmed=True)

    async def _resume_reply(self, turn: int) -> None:
        """No words came of the barge-in: the reply goes on from the last heard frame."""
        held, self._held = self._held, None
        self._cancel_hold_timer()
        self._end_hold(confirmed=False)
        from_ms = self._reply.resume()
        if from_ms is None:
            return
        self._barged = ()  # no barge-in after all: a call's end under it is call_end
        self._restart_window_if_held_the_floor(held)
        await self._tell_resumed(turn, from_ms)

    async def _resume_into_apology(self, turn: int) -> None:
        """The hold ended with no words, and the reply had failed under it: its playout
        closed, so ``_resume_reply`` had nothing to replay and said nothing. The reply
        goes on with the apology: the client is told, as after any false interruption."""
        from_ms = self._reply.release()
        if from_ms is not None:
            await self._tell_resumed(turn, from_ms)

    async def _tell_resumed(self, turn: int, from_ms: float) -> None:
        self._count("false_interruption")
        logs.event(log, "false_interruption", turn=turn, from_ms=round(from_ms, 1))
        await self._out.send_event({"type": "resume", "turn": turn,
                                    "from_ms": round(from_ms, 1)})

    def _restart_window_if_held_the_floor(self, held: asyncio.Task[None] | None) -> None:
        """The noise that held ``held`` began within its turn's continuation window: the
        window restarts now, as the reply resumes (what the caller says next is measured
        from here). Noise after the window restarts nothing: the turn stays closed. Once a
        turn: on a noisy line every cough would keep it open, and the caller's next
        question would be asked joined to the answered one."""
        tl, stopped = self._reply_tl, self._stopped_by_speech
        if tl is None or (self._window_restarted is not None
                          and self._window_restarted[0] is tl):
            return
        if held is not None and stopped is not None \
                and held in stopped[0] and self._within_continuation(tl, stopped[1]):
            self._window_restarted = (tl, self._clock.now())

    def _end_hold(self, confirmed: bool) -> None:
        if self._hold_over is not None and not self._hold_over.done():
            self._hold_over.set_result(confirmed)
        self._hold_over = None
        self._hold_replies = frozenset()

    async def _until_released(self) -> bool:
        """While a hold is on (this reply held, or a reply queued behind it, which froze
        this one's playout), nothing new is said until the barge-in settles: none let it
        go on (True: it waited for that); words stop it here. Their cancel also reaches it
        down the queue, one reply a loop iteration, which can come after this wakes, or
        after it gets here (its stage failed in the instant the words came: the hold is
        over, the cancel not yet here): either way it stops itself at once."""
        if asyncio.current_task() in self._stopped_replies:
            raise asyncio.CancelledError
        hold_over = self._hold_over
        if self._held is not None and hold_over is not None:
            if await asyncio.shield(hold_over):
                raise asyncio.CancelledError
            return True
        return False

    def _cancel_hold_timer(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    async def _settle_hold(self, held: asyncio.Task[None], final: asyncio.Future[Transcript],
                           tl: TurnTimeline) -> None:
        """The utterance that stopped the bot ended: words confirm the barge-in, none
        resume the reply."""
        try:
            # Timed as the turn's reply times it (``_spoken_turn``), which queues behind
            # the held reply: a final that never comes must not hold the line for good.
            async with deadline(self._clock, self._final_wait_s(tl)):
                text = (await asyncio.shield(final)).text
        except Exception:  # failed or never came: unknown, treated as words
            text = "?"
        if self._held is not held:
            return  # decided meanwhile (words in a partial, a text message, the window)
        if normalize_text(text):
            self._confirm_interruption()
        elif self._turns.in_utterance or final is not self._hold_latest:
            # No words, but the caller is talking again, or has said more since (its final
            # still decoding, a slow host): that utterance decides, not the silence now.
            return
        else:
            turn = self._reply_tl.turn if self._reply_tl else self._turns.turns
            await self._resume_reply(turn)

    # ------------------------------------------------------------------ bot-initiated speech

    def _prompt_turn(self, kind: str) -> TurnTimeline:
        """A timeline for something the bot says unasked (greeting, idle prompt)."""
        tl = TurnTimeline(self._turns.next_turn_number(), clock=self._clock)
        tl.info["input"] = kind
        return tl

    async def _say(self, tl: TurnTimeline, segment_for: Callable[[Turn], Any],
                   record_heard: bool = False, told: bool = False) -> bool:
        """Play one pre-rendered phrase as a reply of its own; True when it played out.
        ``record_heard``: the context holds the phrase, cut to what was heard if stopped.
        ``told``: the context holds it whole, from when it starts (the idle prompt, the
        goodbye): what the caller says next answers it, not the agent's last question."""
        turn = self._turn(tl, "", None)
        segment = segment_for(turn)
        if told:
            # Here, in the reply: one stopped while queued was never said. Not cut to the
            # heard words (record_heard cuts the whole last exchange, the agent's answer too).
            self.conversation.add_assistant(segment.text)
        try:
            await self._reply.play_segment(turn, segment, record_heard=record_heard)
        except StageFailed as exc:  # not even the pre-rendered phrase: say so, stay up
            await self._report(exc.code, str(exc), tl.turn)
            return False
        return True

    def _greet(self) -> None:
        text = self._settings.greeting.strip()
        self.conversation.add_assistant(text)  # the agent knows it has greeted
        if self._keeper is not None:
            self._keeper.changed(self.conversation)  # so does a resumed call's
        tl = self._prompt_turn("greeting")
        self._trace.event("greeting", turn=tl.turn)
        # Cut on a barge-in as any reply is: the agent must not think the caller heard it all.
        self._start_reply(tl, self._say(tl, lambda turn: self._responder.greeting(turn, text),
                                        record_heard=True))

    # ------------------------------------------------------------------ silence

    def _caller_active(self) -> None:
        self._idle.caller_active()

    def _line_busy(self) -> bool:
        """Something goes on: no idle prompt (a reply, a filler or a tool call running,
        the caller speaking (or their voice just begun, not yet confirmed as speech: the
        prompt started then talked over them) or keying, the call handed to a person
        (natively: until the bot answers the caller again), or hanging up: the time limit's
        hang-up request runs in no reply)."""
        return (self.replying or self._held is not None or self._transferred
                or self._handed_off
                or self.ended is not None
                or self._caller_busy())

    def _caller_busy(self) -> bool:
        """The caller speaks (or their voice has just begun) or keys a number: nothing the
        bot says unasked (idle prompt, time-limit message) starts over them."""
        return self._turns.in_utterance or self._turns.hears_voice or self._keypad.collecting

    async def _idle_loop(self) -> None:
        while True:
            step = await self._idle.next()
            logs.event(log, f"idle_{step}", idle_s=self._idle.idle_s)
            self._trace.event(f"idle_{step}")
            tl = self._prompt_turn("idle")
            if step == "prompt":
                # Told to the agent: "yes" after "Are you still there?" is no yes to the
                # question it asked before the silence.
                self._start_reply(tl, self._say(tl, self._responder.idle_prompt, told=True))
            else:
                # No return: the goodbye ends the call, unless the caller talks over it
                # (then the call goes on, and its silence is watched again).
                self._start_reply(tl, self._say_goodbye(tl))

    async def _say_goodbye(self, tl: TurnTimeline) -> None:
        if await self._say(tl, self._responder.goodbye, told=True):  # talked over: known
            # As before a transfer: the far end's jitter buffer may still hold up to the
            # lead we send ahead of the clock, and hanging up would cut the goodbye's end.
            await self._clock.sleep(self._settings.playout_lead_ms / 1000.0)
        # Speech meanwhile (the far end may still be playing the goodbye's end) holds it as
        # any reply: the hang-up waits for that to settle. Words stop the goodbye here and
        # the call goes on; noise lets it hang up. Held past `hangup`, the hold's end would
        # cancel this task in its hang-up request and the call would never close.
        await self._until_released()
        await self._hang_up("idle")

    async def _time_limit_loop(self) -> None:
        """At ``max_call_s`` the exchange under way may finish (at most ``TIME_LIMIT_GRACE_S``
        more): the reply playing, and a caller speaking or keying (as the idle prompt, the
        message never starts over their words, nor mid-number: ``_line_busy``) with the reply
        to their words or keys. Then the bot says the call has reached its limit, whole
        (``_barge_in`` lets nothing the caller does stop it), and hangs up. Run here, not in
        the reply: the hang-up is no reply to stop."""
        # Until a fixed instant: a restarted loop (a bug escaped it) does not wait anew.
        await self._clock.sleep(max(0.0, self._time_limit_at - self._clock.now()))
        logs.event(log, "call_time_limit", limit_s=self._settings.max_call_s)
        self._trace.event("call_time_limit")
        grace_ends = self._clock.now() + TIME_LIMIT_GRACE_S
        # Keys handed over (their pause, `#`) start their reply with no step between: the
        # `keypad` event ``_keypad_turn`` sends first is sent without suspending (every
        # call output's is). Keys handed over mid-utterance wait with the words.
        while (self.replying or self._caller_busy()) and self._clock.now() < grace_ends:
            await self._clock.sleep(0.1)
        if await self._moved_or_ending():
            return
        await self._barge_in("time_limit")  # a reply still going after the grace: stopped
        tl = self._prompt_turn("time_limit")
        self._start_reply(tl, self._say(tl, self._responder.time_limit))
        message = self._limit_message = self._reply_task
        if message is not None:
            with contextlib.suppress(Expired):
                async with deadline(self._clock, TIME_LIMIT_GRACE_S):
                    # Waited on, not awaited: its cancel (words over it) must not end this.
                    await asyncio.wait({message})
        # The far end's jitter buffer may still hold up to the lead sent ahead of the clock.
        await self._clock.sleep(self._settings.playout_lead_ms / 1000.0)
        if await self._moved_or_ending():
            return
        stopping = set(self._reply_tasks)
        await self._barge_in("time_limit")  # a reply to input over the message: not now
        await self._until_stopped(stopping)
        await self._hang_up("time_limit")

    async def _until_stopped(self, replies: set[asyncio.Task[None]]) -> None:
        """The replies the time limit stopped end (their `turn_metrics` sent) before
        `hangup`, which nothing may follow; bounded, should one be slow to close."""
        if not replies:
            return
        with contextlib.suppress(Expired):
            async with deadline(self._clock, _STOPPED_REPLIES_WAIT_S):
                # Waited on, not awaited: their cancels must not end this task.
                await asyncio.wait(replies)

    async def _moved_or_ending(self) -> bool:
        """The call is with a person (a transfer done: the stream may go on until the line
        moves it) or already hanging up: not the bot's to end. A transfer under way is
        waited for: one that fails leaves the caller with the bot, and the limit holds."""
        while self._transferring is not None:
            # Waited on, not awaited: its request must not be cancelled from here.
            await asyncio.wait({self._transferring})
        return self._transferred or self.ended is not None

    async def _hang_up(self, reason: str) -> None:
        """The bot ends the call: the client is told, a phone line is hung up."""
        self.ended = reason
        await self._out.send_event({"type": "hangup", "reason": reason})
        hang_up = getattr(self._out, "hang_up", None)
        if hang_up is not None:
            try:
                await self._ask_line(hang_up(reason))
            except Exception as exc:  # the stream closes anyway, which ends a <Connect>
                await self._report("hangup_failed", f"hanging up failed: {exc}")
        logs.event(log, "hangup", reason=reason)
        self._trace.event("hangup", reason=reason)
        self._stats.hung_up(reason)
        self.stop()

    async def _ask_line(self, request: Awaitable[Any]) -> Any:
        """A transfer or hang-up request to the phone line (bounded by the transport: Twilio's
        by twilio_api_timeout_s). The call's end lets this task finish rather than cancel it
        halfway, which left the call moved or not, unknown."""
        self._line_request = asyncio.current_task()  # type: ignore[assignment]
        try:
            return await request
        finally:
            self._line_request = None

    # ------------------------------------------------------------------ transfer

    async def _transfer(self, tl: TurnTimeline) -> None:
        """The handoff message has played: move a phone call to a person. A transport
        without a transfer (the native protocol) has the ``handoff`` event as its contract."""
        transfer = getattr(self._out, "transfer", None)
        if transfer is None:
            # The client puts the caller through: silence while it does is the caller
            # waiting as asked, not gone. No idle prompt or goodbye until the bot answers
            # the caller again (``_start_reply``).
            self._handed_off = True
            return
        # The message has played: nothing the caller says, types or keys now stops this
        # reply (``_barge_in``). Cancelled in its request, the transfer would be abandoned
        # halfway, the call moved or not and nobody the wiser; their input waits for it.
        self._transferring = asyncio.current_task()
        failed: Exception | None = None
        over = False
        try:
            # By the clock the message has played (the playout waited); the far end's
            # jitter buffer may lag by up to the lead we send ahead, so that much longer.
            await self._clock.sleep(self._settings.playout_lead_ms / 1000.0)
            moved = await self._ask_line(transfer(str(tl.info["handoff"])))
        except LineEnded:
            over = True
        except Exception as exc:
            failed = exc
        finally:
            self._transferring = None
            if self._handoff_reply is asyncio.current_task():
                self._handoff_reply = None  # failed, the handoff is over: a key may ask again
        if over:
            # The caller hung up as the message ended (the line says so): no failure and
            # nobody to apologise to. The call ends here, its stream closed (the
            # transport's record of the transfer decides what Twilio does next).
            self.ended = "call_over"
            logs.event(log, "transfer_found_call_over", turn=tl.turn)
            self._trace.event("transfer_found_call_over", turn=tl.turn)
            self.stop()
            return
        if failed is not None:
            # The caller stays with the bot, and hears so at once: after "I'm going to
            # connect you" a silent line (until they spoke again) was the worst answer.
            # The apology is a reply as any: the caller may talk over it.
            await self._report("transfer_failed", f"the transfer failed: {failed}", tl.turn)
            # The agent is told too, as the caller heard it: the context keeps no handoff
            # message (the call leaves the bot) nor apology ("say that again": the question
            # stays unanswered); here the model must know it promised a colleague, and that
            # the caller is still with it. Whole, before it plays: talked over, the fact
            # stands all the same.
            self.conversation.add_assistant(f"{HANDOFF_MESSAGE} {TRANSFER_FAILED_MESSAGE}")
            await self._apologize(tl, "", "transfer_failed")
            return
        if moved:
            self._transferred = True
            tl.info["transferred"] = True
            logs.event(log, "transferred", turn=tl.turn)
            self._trace.event("transferred", turn=tl.turn)

    # ------------------------------------------------------------------ keypad

    async def _next_key(self, timeout: float | None) -> str | None:
        """The next key pressed, or None when ``timeout`` (clock seconds) passed first."""
        if timeout is None:
            return await self._keys.get()
        getter = asyncio.ensure_future(self._keys.get())
        sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            await asyncio.wait({getter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not getter.done():
                getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None

    async def _keypad_loop(self) -> None:
        while True:
            key = await self._next_key(self._keypad.pause_s if self._keypad.collecting else None)
            if self.ended is not None:
                # The call hangs up: as a text then, a key gets no `keypad` event and no
                # reply; nothing may follow `hangup`, the call just closes.
                continue
            if key is None:
                await self._until_words_take_keys()
                if self.ended is not None:
                    continue  # it hung up meanwhile: no `keypad` event, no reply
                if self._keys_wanted:
                    self._hand_keys(self._keypad.expire())
                    continue
                if self._turns.in_utterance:
                    # The caller speaks: the keys open their turn ("the caller pressed 4
                    # 5, uh, I don't have the rest"), not a reply over their words.
                    await self._carry_keys(self._keypad.expire())
                    continue
                action = self._keypad.expire()
            else:
                self._caller_active()
                if self._keypad.hands_off(key) and self._handing_off():
                    # The handoff key again (impatience, a habit of phone menus) while the
                    # caller is being put through: it would stop the handoff message and
                    # start it over, a second handoff turn and transfer behind it.
                    logs.event(log, "dtmf_ignored", reason="handoff_under_way")
                    self._trace.event("dtmf_ignored")
                    continue
                # A lone `#` does nothing, so it stops nothing either: pressed after a
                # spoken question while the agent thinks, it would cut that reply, whose
                # words then wait for a next spoken turn, and the caller hears nothing.
                # Nor a key of the number a spoken turn waits for (``_keys_for``), or will
                # take once its words are decoded (begun before them: "4 9 ... I do not
                # have the rest"): stopped, its words were superseded by the number. A hold
                # still ends (the reply it holds stops; that turn is left to decode).
                words_take = self._words_take_keys()
                if self.replying and not self._keypad.does_nothing(key) \
                        and not self._keys_wanted and not (self._held is None and words_take):
                    if self._held is None:  # a hold's end stops only the reply it holds
                        self._stopping_by_key()
                    await self._barge_in("dtmf")
                if key == KEYPAD_END and words_take:
                    # The `#` ending that number waits for the words, as its pause does.
                    await self._until_words_take_keys()
                    if self.ended is not None:
                        continue
                # The key itself stays out of logs: it may be part of a PIN.
                logs.event(log, "dtmf")
                self._trace.event("dtmf")
                action = self._keypad.press(key, self._clock.now())
                if isinstance(action, Collected) and self._keys_wanted:
                    self._hand_keys(action)
                    continue
                if isinstance(action, Collected) and self._turns.in_utterance:
                    # Ended by `#` (or the longest number) mid-sentence: carried into the
                    # turn the caller's words end, as a pause that runs out is.
                    await self._carry_keys(action)
                    continue
                if isinstance(action, Mapped) and self._turns.in_utterance:
                    # Not played over the caller's words (their speech began before it, so
                    # nothing would stop it): it acts as they end, and supersedes them, as
                    # a key pressed while the agent thinks does. Keys meanwhile wait. At most
                    # a keypad pause: noise that never ends must not hold the key for good.
                    with contextlib.suppress(Expired):
                        async with deadline(self._clock, self._keypad.pause_s):
                            while self._turns.in_utterance:
                                self._turn_ended.clear()
                                await self._turn_ended.wait()
                    if self.ended is not None:
                        continue
                    if self.replying:
                        await self._barge_in("dtmf")
            if action is not None:
                await self._keypad_turn(action)
            if not self._keypad.collecting:
                self._idle.quiet_unless_busy()  # keys that led to no reply

    @property
    def _keys_wanted(self) -> bool:
        """A spoken turn waits for the keys being collected (``_keys_for``)."""
        return self._keys_awaited is not None and not self._keys_awaited.done()

    def _hand_keys(self, keys: Collected | None) -> None:
        """The collection ended (``#``, the pause) while a spoken turn waits for it: handed
        to that turn, which asks it after its words, not made a turn of its own."""
        assert self._keys_awaited is not None
        self._keys_awaited.set_result(keys)

    def _handing_off(self) -> bool:
        """The caller is being put through: a transfer request runs, or a handoff key's
        reply (queued or its message playing) goes on, not stopped (a barge-in, a hold)."""
        if self._transferring is not None:
            return True
        task = self._handoff_reply
        return (task is not None and not task.done() and not task.cancelling()
                and self._held is None)

    def _stopping_by_key(self) -> None:
        """A key is about to stop the replies under way (a barge-in): those not already
        stopped, the latest and any queued before it that its cancel reaches."""
        stopped = {t for t in self._reply_tasks if t is self._reply_task or not t.cancelling()}
        for task in stopped - self._stopped_by_key:
            self._stopped_by_key.add(task)
            task.add_done_callback(self._stopped_by_key.discard)  # after ``close_turn``

    def _keys_never_asked(self, keys: Collected, tl: TurnTimeline,
                          task: asyncio.Task[None] | None) -> None:
        """The keypad turn ``tl`` was stopped before it ran. By speech or a message, its
        keys open the next turn (``_carry_unanswered``). By another key, that key's input
        supersedes them, as a later number did before: carried, a flood of keys (each
        `MAX_COLLECTED_KEYS`-key number a turn, stopped by the next key before it ran)
        piled up into one prompt of every number, without bound."""
        if task is not None and task in self._stopped_by_key:
            if not self._transferred:  # then its reply's wait has ended it
                self._carry_turns.append(tl)  # ended by what comes next (``_drop_carry``)
            return
        self._carry_unanswered(_keys_said(keys, tl.turn), tl)

    async def _carry_keys(self, keys: Collected | None) -> None:
        """Keys collected while the caller speaks open the turn their words end, as words
        carried from before do (``_spoken_turn`` joins them, before the words, for the
        agent only: as ``_CarriedKeys``, never routed, transcribed or a missed question)."""
        if keys is None:
            return
        # The turn the caller's utterance will end (the detector's next number), unless a
        # message or key takes that number first: then the keys go with it (``_drop_carry``).
        turn = self._turns.turns + 1
        self._carry = [*self._carry, _keys_said(keys, turn)]
        await self._out.send_event({"type": "keypad", "turn": turn,
                                    "keys": keys.keys, "action": "agent"})

    async def _keypad_turn(self, action: Mapped | Collected) -> None:
        tl = TurnTimeline(self._turns.next_turn_number(), clock=self._clock)
        at = self._clock.now()
        for stage in ("speech_end", "end_of_turn", "final_transcript"):
            tl.mark(stage, at)
        tl.info["input"] = "dtmf"
        if isinstance(action, Collected):
            await self._out.send_event({"type": "keypad", "turn": tl.turn, "keys": action.keys,
                                        "action": "agent"})
            # Stopped before it ran (speech while the reply before it closes), the keys
            # open the next turn, as words or a message stopped so do.
            self._start_reply(tl, self._answer(tl, action.text(), route=False, typed=True),
                              if_never_ran=lambda: self._keys_never_asked(action, tl, task))
            task = self._reply_task
            return
        await self._out.send_event({"type": "keypad", "turn": tl.turn, "keys": action.key,
                                    "action": action.action})
        text = f"the caller pressed {action.key}"
        if action.handoff:
            decision = RouteDecision(text=text, intent="keypad", action=Action.HANDOFF,
                                     hit=False, reason=f"key {action.key} is mapped to handoff")
            self._start_reply(tl, self._answer(tl, text, route=False, decision=decision,
                                               typed=True))
            self._handoff_reply = self._reply_task
            return
        cache = self._responder.cache_audio
        clip = None if cache is None else cache.find(action.action)
        if clip is None:
            # The entry, not the key: the message is logged and recorded, and keys never
            # are (docs/protocol.md, "Keypad"); the operator finds the key by the entry.
            await self._report("keypad_unknown_entry",
                               f"a key is mapped to entry {action.action!r}, which the serving "
                               "cache version does not hold (VOICEGATE_KEYPAD)", tl.turn)
            self._start_reply(tl, self._unrouted_turn(tl, apology="keypad_unknown_entry"))
            return
        decision = RouteDecision(text=text, intent=action.action, action=Action.ANSWER, hit=True,
                                 entry_id=action.action, answer=clip.text,
                                 score=1.0, reason=f"key {action.key}")
        self._start_reply(tl, self._answer(tl, text, route=False, decision=decision,
                                           typed=True))


_METADATA_LOGGED_CHARS = 1000  # of a call's `start.metadata`, as compact JSON


def _for_log(metadata: dict[str, Any]) -> str:
    """The client's metadata for ``call_started`` (docs/protocol.md: "anything you want in
    logs"), capped: a message may carry up to a MiB of it."""
    text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), default=str)
    return text[:_METADATA_LOGGED_CHARS]


@types.coroutine
def _first_step() -> Generator[None, None, None]:
    """Where a primed coroutine stops (``_primed``): a bare yield, which a task resumes on
    its first step, as it does ``asyncio.sleep(0)``."""
    yield


def _primed(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    """``coro`` run up to its first ``_first_step()``, to make a task of. A task whose
    coroutine has not started, cancelled before its first step, throws the cancel into the
    coroutine before its first line: no try, except or finally of it runs. Primed, the
    cancel lands at ``_first_step()``, inside them, as any later one would. (Python 3.12's
    eager tasks do as much; 3.11 has none.)"""
    if coro.send(None) is not None:  # pragma: no cover - a coroutine that awaited elsewhere
        raise RuntimeError("a primed coroutine must stop first at _first_step()")
    return coro


def _add_counts(tl: TurnTimeline, carried: list[TurnTimeline]) -> None:
    """The partial counts of the carried turns ``tl``'s metrics cover, added to its own."""
    for other in carried:
        for key in PARTIAL_COUNTS:
            tl.info[key] = tl.info.get(key, 0) + other.info.get(key, 0)


class _KeysTaker(NamedTuple):
    """The spoken turn that will take the keys being collected once its ``words`` are
    decoded, and ``taken``, resolved once it has or is over (``Call._keys_taker``)."""
    turn: TurnTimeline
    taken: asyncio.Future[None]
    words: asyncio.Future[Transcript]


@dataclass(frozen=True)
class _CarriedKeys(Transcript):
    """Keys carried into a spoken turn (``_carry_keys``), in the carry's form: the agent is
    asked them with the words; they are no words, so the turn's transcript, its routing
    (early, partial and final), a missed question and its draft answer leave them out
    (keys may be a PIN or an account number: docs/protocol.md, "Keypad"). ``turn``: the
    turn their `keypad` event named."""

    turn: int = 0


def _carried_keys(carried: asyncio.Future[Transcript]) -> _CarriedKeys | None:
    """A carry's entry as keys (always decoded), or None: words (which may still decode)."""
    if not carried.done() or carried.cancelled() or carried.exception() is not None:
        return None
    said = carried.result()
    return said if isinstance(said, _CarriedKeys) else None


def _keys_taken_by(carry: list[asyncio.Future[Transcript]], turn: int
                   ) -> tuple[list[asyncio.Future[Transcript]], list[asyncio.Future[Transcript]]]:
    """The carry split, each in order, into the keys a turn numbered ``turn`` takes up
    (``_drop_carry``: named for it or an earlier one) and the rest."""
    def taken(carried: asyncio.Future[Transcript]) -> bool:
        keys = _carried_keys(carried)
        return keys is not None and keys.turn <= turn
    return [f for f in carry if taken(f)], [f for f in carry if not taken(f)]


def _keys_said(keys: Collected, turn: int) -> asyncio.Future[Transcript]:
    """Keys for the agent in the carry's form (``_CarriedKeys``), named for ``turn``."""
    return _settled(_CarriedKeys(text=keys.text(), final=True, turn=turn))


def _said(text: str) -> asyncio.Future[Transcript]:
    """Words already known (a typed message) in the carry's form: a decoded final."""
    return _settled(Transcript(text=text, final=True))


def _settled(transcript: Transcript) -> asyncio.Future[Transcript]:
    """``transcript`` as the carry holds utterances: a future already resolved."""
    said: asyncio.Future[Transcript] = asyncio.get_running_loop().create_future()
    said.set_result(transcript)
    return said


def _joined(texts: list[str]) -> str:
    """Utterances as one turn's text (what is routed, early or final, and asked)."""
    return " ".join(t.strip() for t in texts if t.strip())
