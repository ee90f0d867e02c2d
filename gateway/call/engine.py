"""The per-call engine: composes turn detection, speculation and the reply stage.

A transport session decodes the wire and calls ``feed_audio`` / ``feed_text`` /
``stop``; the call answers through a ``CallOutput``. Every dependency is handed in
(``CallDeps``), so a test drives a whole call with scripted VAD, fake providers and
a manual clock.

A stage failure never ends the call: it is counted (stats and Prometheus), the
client gets an ``error`` event with a specific code, the caller hears a short
apology when a turn could not be answered, and the next turn works.

Cancellation (``stop``): the loops, the reply, the final decodes and the
speculation are cancelled and awaited; the STT stream is closed. No task of the
call outlives ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

from intents.embedder import normalize_text
from intents.types import RouteDecision

from .. import logs
from ..agent import Conversation
from ..audio import StreamResampler
from ..clock import SYSTEM_CLOCK, Clock
from ..providers.base import SpeechToText, Transcript
from ..responder import Responder, Turn
from ..settings import Settings
from ..stats import Stats
from ..timeline import TurnTimeline
from ..vad import SAMPLE_RATE as VAD_RATE
from ..vad import WINDOW_BYTES, pcm16_windows
from .reply import CallOutput, ReplyStage, StageFailed
from .speculation import RouteFn, Speculation
from .turns import SpeechStarted, TurnDetector, TurnEnded, TurnSettings, VadScorer

log = logging.getLogger("voicegate.call")

# The same failure is reported to the client at most this often (it is always counted).
_REPORT_EVERY_S = 5.0


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


class Call:
    def __init__(self, deps: CallDeps, output: CallOutput, sample_rate: int,
                 metadata: dict[str, Any] | None = None, call_id: str | None = None) -> None:
        self.id = call_id or uuid.uuid4().hex[:12]
        self.sample_rate = sample_rate
        self.metadata = metadata or {}
        settings = deps.settings
        self._settings = settings
        self._deps = deps
        self._clock = deps.clock
        self._stats = deps.stats
        self._out = output
        self.encoding = output.encoding

        # Inbound audio: appended by the transport (hot path), drained by the audio loop.
        # Bounded: a stalled loop drops the oldest audio instead of growing.
        self._inbound = bytearray()
        self._inbound_ready = asyncio.Event()
        self._max_inbound = sample_rate * 2 * settings.inbound_buffer_ms // 1000 // 2 * 2
        self.dropped_audio_bytes = 0
        self._to16k = StreamResampler(sample_rate, VAD_RATE)
        self._pending16k = bytearray()
        # Text turns wait here until the call runs: a text sent right after `start` counts.
        self._texts: asyncio.Queue[tuple[str, bool]] = asyncio.Queue(settings.max_queued_texts)

        self._turns = TurnDetector(
            TurnSettings(vad_threshold=settings.vad_threshold,
                         min_speech_ms=settings.min_speech_ms,
                         barge_in_min_speech_ms=settings.barge_in_min_speech_ms,
                         end_of_turn_silence_ms=settings.end_of_turn_silence_ms),
            deps.stt.open_stream(), deps.clock)
        self._speculation = Speculation(deps.router, settings.route_min_words,
                                        on_failure=lambda exc: self._count("route_failed"))
        self._responder = deps.responder
        self._reply = ReplyStage(deps.responder, output, sample_rate, frame_ms=settings.frame_ms,
                                 lead_ms=settings.playout_lead_ms, clock=deps.clock)
        self.conversation = deps.new_conversation()

        self._reply_task: asyncio.Task[None] | None = None
        self._reply_tl: TurnTimeline | None = None
        # Finals of utterances the bot never answered (the caller went on talking):
        # they open the next turn's text, so no words are lost.
        self._carry: list[asyncio.Future[Transcript]] = []
        self._finals: set[asyncio.Future[Transcript]] = set()
        self._last_report: dict[str, float] = {}
        self._stopped = asyncio.Event()
        self.turns_answered = 0

    # ------------------------------------------------------------------ inbound API

    def feed_audio(self, pcm16: bytes) -> None:
        """Caller audio at the call's rate. Hot path: append and wake the audio loop."""
        self._inbound += pcm16
        overflow = len(self._inbound) - self._max_inbound
        if overflow > 0:
            del self._inbound[:overflow]
            self.dropped_audio_bytes += overflow
            self._count("audio_dropped")
        self._inbound_ready.set()

    def feed_text(self, text: str, final: bool) -> None:
        """A caller transcript that skips STT (tests, benchmarks, chat channels).

        Raises ``asyncio.QueueFull`` when ``max_queued_texts`` are already waiting.
        """
        self._texts.put_nowait((text, final))

    def stop(self) -> None:
        self._stopped.set()

    @property
    def replying(self) -> bool:
        return self._reply_task is not None and not self._reply_task.done()

    @property
    def speaking(self) -> bool:
        """The bot's reply audio has started and is not finished."""
        return self.replying and self._reply_tl is not None and self._reply_tl.has("first_audio")

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        logs.bind_call_id(self.id)
        self._stats.call_started()
        logs.event(log, "call_started", sample_rate=self.sample_rate)
        loops = [asyncio.create_task(self._audio_loop(), name="vg-audio"),
                 asyncio.create_task(self._partials_loop(), name="vg-partials"),
                 asyncio.create_task(self._text_loop(), name="vg-texts")]
        try:
            await self._stopped.wait()
        finally:
            reply = self._reply_task
            pending = [*loops, *([reply] if reply else []), *self._finals, *self._carry]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._speculation.aclose()
            with contextlib.suppress(Exception):
                await self._turns.aclose()
            self._stats.call_ended()
            logs.event(log, "call_ended", turns=self._turns.turns)

    # ------------------------------------------------------------------ failures

    def _count(self, code: str) -> None:
        self._stats.error(code)

    async def _report(self, code: str, message: str, turn: int | None = None) -> None:
        """Count a failure, log it and tell the client (at most every few seconds per code)."""
        self._count(code)
        now = self._clock.now()
        last = self._last_report.get(code)
        if last is not None and now - last < _REPORT_EVERY_S:
            return
        self._last_report[code] = now
        logs.event(log, "stage_failed", logging.WARNING, code=code, detail=message[:300],
                   turn=turn)
        event: dict[str, Any] = {"type": "error", "code": code, "message": message[:300]}
        if turn is not None:
            event["turn"] = turn
        await self._out.send_event(event)

    # ------------------------------------------------------------------ audio -> turns

    def _windows(self, pcm: bytes) -> list[bytes]:
        """Resample to 16 kHz and cut complete VAD windows (cheap: stays on the loop)."""
        self._pending16k += self._to16k.process(pcm)
        count = len(self._pending16k) // WINDOW_BYTES
        usable = bytes(self._pending16k[:count * WINDOW_BYTES])
        del self._pending16k[:count * WINDOW_BYTES]
        return [usable[i * WINDOW_BYTES:(i + 1) * WINDOW_BYTES] for i in range(count)]

    async def _audio_loop(self) -> None:
        while True:
            await self._inbound_ready.wait()
            self._inbound_ready.clear()
            if not self._inbound:
                continue
            chunk = bytes(self._inbound)
            self._inbound.clear()
            arrived = self._clock.now()
            windows = self._windows(chunk)
            if not windows:
                continue
            try:
                probs = await self._deps.vad.score(self._turns.vad_state,
                                                   pcm16_windows(b"".join(windows)))
            except Exception as exc:  # this chunk is lost, the call goes on
                await self._report("vad_failed", f"voice activity detection failed: {exc}")
                continue
            for window, prob in zip(windows, probs):
                self._turns.confirm_speech_slowly(self.speaking)
                try:
                    signals = await self._turns.push(window, prob, arrived)
                except Exception as exc:  # an STT stream refusing audio
                    await self._report("stt_failed", f"speech recognition failed: {exc}")
                    continue
                for signal in signals:
                    if isinstance(signal, SpeechStarted):
                        if self.replying:
                            await self._barge_in("speech")
                    elif isinstance(signal, TurnEnded):
                        self._start_spoken_turn(signal)

    async def _partials_loop(self) -> None:
        try:
            async with contextlib.aclosing(self._turns.stt.partials()) as partials:  # type: ignore
                async for partial in partials:
                    if not self._turns.in_utterance:
                        continue  # a late partial of an utterance that already ended
                    await self._out.send_event({"type": "transcript", "text": partial.text,
                                                "final": False})
                    self._speculation.offer(partial.text)
        except Exception as exc:  # no more partials; finals still come from finalize()
            await self._report("stt_failed", f"partial transcripts stopped: {exc}")

    def _start_spoken_turn(self, ended: TurnEnded) -> None:
        final = asyncio.ensure_future(ended.final)
        self._finals.add(final)
        final.add_done_callback(self._finals.discard)
        self._start_reply(ended.timeline, self._spoken_turn(ended.timeline, final))

    async def _spoken_turn(self, tl: TurnTimeline, final: asyncio.Future[Transcript]) -> None:
        utterances, self._carry = [*self._carry, final], []
        try:
            # Shielded: a barge-in cancels the reply, not the decode its words may need.
            texts = [(await asyncio.shield(f)).text for f in utterances]
        except asyncio.CancelledError:
            self._carry = utterances
            raise
        except Exception as exc:
            await self._report("stt_failed", f"the final transcript failed: {exc}", tl.turn)
            await self._apologize(tl, "", "stt_failed")
            return
        text = " ".join(t.strip() for t in texts if t.strip())
        tl.mark("final_transcript")
        await self._out.send_event({"type": "transcript", "text": text, "final": True,
                                    "turn": tl.turn})
        if not normalize_text(text):
            logs.event(log, "empty_turn", turn=tl.turn)
            return
        try:
            await self._answer(tl, text)
        except asyncio.CancelledError:
            if not tl.has("first_audio"):
                self._carry = utterances  # nothing was said: the words open the next turn
            raise

    # ------------------------------------------------------------------ text input

    async def _text_loop(self) -> None:
        while True:
            text, final = await self._texts.get()
            await self._on_text(text, final)

    async def _on_text(self, text: str, final: bool) -> None:
        if self.replying:
            await self._barge_in("text")
        await self._out.send_event({"type": "transcript", "text": text, "final": final})
        if not final:
            self._speculation.offer(text)
            return
        tl = TurnTimeline(self._turns.next_turn_number(), clock=self._clock)
        at = self._clock.now()
        for stage in ("speech_end", "end_of_turn", "final_transcript"):
            tl.mark(stage, at)
        tl.info["input"] = "text"
        if normalize_text(text):
            self._start_reply(tl, self._answer(tl, text))

    # ------------------------------------------------------------------ replies

    def _start_reply(self, tl: TurnTimeline, turn: Coroutine[Any, Any, None]) -> None:
        previous = self._reply_task

        async def after_previous() -> None:
            if previous is not None:  # its cleanup (context cut to the heard words) first
                await asyncio.gather(previous, return_exceptions=True)
            self._reply_tl = tl
            await turn

        self._reply_task = asyncio.create_task(after_previous(), name=f"vg-turn-{tl.turn}")
        self._reply_task.add_done_callback(self._reply_done)

    def _reply_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("reply_crashed", exc_info=task.exception())
            self._count("internal_error")

    async def _answer(self, tl: TurnTimeline, text: str) -> None:
        decision: RouteDecision | None = None
        try:
            try:
                decision, reused = await self._speculation.decide(text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the agent (or a handoff) answers instead
                await self._report("route_failed", f"routing failed: {exc}", tl.turn)
                decision, reused = None, False
            tl.mark("route_decided")
            tl.info["route_reused"] = reused
            if decision is not None:
                tl.info.update(intent=decision.intent, action=decision.action.value,
                               hit=decision.hit, entry_id=decision.entry_id)
                await self._out.send_event({"type": "route", "turn": tl.turn, "reused": reused,
                                            **decision.as_json()})
            turn = self._turn(tl, text, decision)
            try:
                await self._reply.play(turn)
            except StageFailed as exc:
                await self._report(exc.code, str(exc), tl.turn)
                await self._apologize(tl, text, exc.code)
        finally:
            await self._finish_metrics(tl, text, decision)

    def _turn(self, tl: TurnTimeline, text: str, decision: RouteDecision | None) -> Turn:
        return Turn(number=tl.turn, text=text, sample_rate=self.sample_rate, timeline=tl,
                    conversation=self.conversation, decision=decision, encoding=self.encoding)

    async def _apologize(self, tl: TurnTimeline, text: str, code: str) -> None:
        turn = self._turn(tl, text, None)
        try:
            await self._reply.play_segment(turn, self._responder.apology(turn, code))
        except StageFailed as exc:  # not even the pre-rendered phrase: say so, stay up
            logs.event(log, "apology_failed", logging.ERROR, code=exc.code, detail=str(exc))

    async def _finish_metrics(self, tl: TurnTimeline, text: str,
                              decision: RouteDecision | None) -> None:
        metrics = tl.metrics()
        self._stats.turn_finished(metrics, text,
                                  route_score=decision.score if decision else None)
        logs.event(log, "turn", **metrics)
        self.turns_answered += 1
        await self._out.send_event({"type": "turn_metrics", **metrics})

    async def _barge_in(self, cause: str) -> None:
        """Stop the bot now: no frame leaves after this, the client drops its buffer."""
        task = self._reply_task
        if task is None or task.done():
            return
        heard = self._reply.freeze()
        sent = self._reply.sent_ms
        task.cancel()
        turn = self._reply_tl.turn if self._reply_tl else self._turns.turns
        await self._out.interrupt({"type": "interrupt", "turn": turn, "cause": cause,
                                   "heard_ms": round(heard, 1), "sent_ms": sent})
        logs.event(log, "barge_in", turn=turn, cause=cause, heard_ms=round(heard, 1))

