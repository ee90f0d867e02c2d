"""The per-call loop: VAD, streaming STT, speculative routing, turn taking, replies, barge-in.

A transport (native WebSocket, Twilio) decodes the wire format and calls
``feed_audio`` / ``feed_text`` / ``stop``; the call answers through a
``CallOutput``. All per-call state lives here, and all of its tasks live in one
task group, so a failing call never touches another.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import deque
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

from intents.types import RouteDecision

from . import logs
from .audio import StreamResampler
from .playout import Playout
from .responder import Responder, Turn
from .runtime import Runtime
from .timeline import TurnTimeline, now
from .vad import SAMPLE_RATE as VAD_RATE
from .vad import (WINDOW_BYTES, WINDOW_MS, SegmentEvent, SileroState, SpeechSegmenter,
                  pcm16_windows)

log = logging.getLogger("voicegate.call")

_PREROLL_WINDOWS = 10  # 320 ms of audio before the speech decision goes to STT too
# Start the final decode once a pause is this long: shorter gaps between words would
# only start decodes that the next word throws away.
_SPECULATE_AFTER_MS = 96.0
# route(text, urgent) -> decision; urgent for a final the caller is waiting on.
RouteFn = Callable[[str, bool], Awaitable[RouteDecision]]


class CallOutput(Protocol):
    """What a transport offers the call: events, reply audio frames and a buffer flush.

    ``encoding`` is what ``send_audio`` takes (``pcm16``, or ``mulaw`` for telephony): the
    call asks its responder for reply audio already in it, so pre-rendered clips go out as
    the AudioBank holds them and the transport never converts a frame.
    """

    encoding: str

    async def send_event(self, event: dict[str, Any]) -> None: ...

    async def send_audio(self, frame: bytes) -> None: ...

    async def interrupt(self, event: dict[str, Any]) -> None:
        """The caller barged in: drop buffered reply audio on the client, then send ``event``."""


@runtime_checkable
class ConfirmsPlayback(Protocol):
    """Optional for a CallOutput whose far end reports what it has played (Twilio marks).

    The call's own figure for what the caller heard is a clock estimate; a confirmed
    figure replaces it on barge-in.
    """

    def reply_started(self, turn: int) -> None:
        """Reply frames sent from now on belong to ``turn``; its playback starts at 0 ms."""

    def confirmed_heard_ms(self) -> float | None:
        """Audio of the current reply the far end confirmed played; None: it cannot tell."""


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s']", " ", text.lower())).strip()


class Call:
    def __init__(self, runtime: Runtime, output: CallOutput, sample_rate: int,
                 responder: Responder, router: RouteFn | None = None,
                 metadata: dict[str, Any] | None = None, call_id: str | None = None) -> None:
        self.id = call_id or uuid.uuid4().hex[:12]
        self.sample_rate = sample_rate
        self.metadata = metadata or {}
        self._rt = runtime
        self._settings = runtime.settings
        self._out = output
        self.encoding = output.encoding
        self._confirms = output if isinstance(output, ConfirmsPlayback) else None
        self._responder = responder
        self._router = router
        self._loop = asyncio.get_running_loop()

        # inbound audio: filled by the transport (hot path), drained by _audio_loop
        self._inbound = bytearray()
        self._inbound_ready = asyncio.Event()
        self._to16k = StreamResampler(sample_rate, VAD_RATE)
        self._pending16k = bytearray()
        self._vad_state = SileroState()
        self._segmenter = SpeechSegmenter(threshold=self._settings.vad_threshold,
                                          min_speech_ms=self._settings.min_speech_ms,
                                          end_silence_ms=self._settings.end_of_turn_silence_ms)
        self._preroll: deque[bytes] = deque(maxlen=_PREROLL_WINDOWS)
        self._in_utterance = False
        self._speech_start_at = 0.0
        self._speech_end_at = 0.0
        self._speculating = False  # a final decode was started at a pause
        self._stt = runtime.stt.open_stream()

        # routing speculation: the newest partial wins, one routing in flight
        self._latest_text = ""
        self._routed: RouteDecision | None = None
        self._route_task: asyncio.Task[None] | None = None

        # replies
        self._turns = 0
        self._reply_task: asyncio.Task[None] | None = None
        self._playout: Playout | None = None
        self.conversation = runtime.agent.new_conversation()

        self._stopped = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None

    # ------------------------------------------------------------------ inbound API

    def feed_audio(self, pcm16: bytes) -> None:
        """Caller audio at the call's rate. Hot path: append and wake the audio loop."""
        self._inbound += pcm16
        self._inbound_ready.set()

    def feed_text(self, text: str, final: bool) -> None:
        """A caller transcript that skips STT (tests, benchmarks, chat channels)."""
        self._spawn(self._on_text(text, final))

    def stop(self) -> None:
        self._stopped.set()

    @property
    def replying(self) -> bool:
        return self._reply_task is not None and not self._reply_task.done()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self._rt.stats.call_started()
        logs.event(log, "call_started", call_id=self.id, sample_rate=self.sample_rate)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                audio = group.create_task(self._audio_loop())
                partials = group.create_task(self._partials_loop())
                await self._stopped.wait()
                for task in (audio, partials, self._reply_task, self._route_task):
                    if task is not None:
                        task.cancel()
        finally:
            self._group = None
            await self._stt.aclose()
            self._rt.stats.call_ended()
            logs.event(log, "call_ended", call_id=self.id, turns=self._turns)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None] | None:
        if self._group is None or self._stopped.is_set():
            coro.close()  # type: ignore[attr-defined]
            return None
        return self._group.create_task(coro)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ audio -> VAD -> STT

    def _windows(self, pcm: bytes) -> list[bytes]:
        """Resample to 16 kHz and cut complete VAD windows (cheap: stays on the loop)."""
        self._pending16k += self._to16k.process(pcm)
        count = len(self._pending16k) // WINDOW_BYTES
        usable = bytes(self._pending16k[:count * WINDOW_BYTES])
        del self._pending16k[:count * WINDOW_BYTES]
        return [usable[i * WINDOW_BYTES:(i + 1) * WINDOW_BYTES] for i in range(count)]

    async def _audio_loop(self) -> None:
        batcher = self._rt.vad_batcher
        while True:
            await self._inbound_ready.wait()
            self._inbound_ready.clear()
            if not self._inbound:
                continue
            chunk = bytes(self._inbound)
            self._inbound.clear()
            arrived = now()
            windows = self._windows(chunk)
            if not windows:
                continue
            probs = await batcher.score(self._vad_state, pcm16_windows(b"".join(windows)))
            for window, prob in zip(windows, probs):
                await self._on_window(window, prob, arrived)

    async def _on_window(self, window: bytes, prob: float, at: float) -> None:
        self._segmenter.min_speech_ms_override = (
            float(self._settings.barge_in_min_speech_ms) if self.replying else None)
        if self._in_utterance:
            await self._stt.send_audio(window)
        else:
            self._preroll.append(window)
        for event in self._segmenter.push(prob):
            if event is SegmentEvent.SPEECH_START:
                if self.replying:
                    await self._barge_in("speech")
                self._in_utterance = True
                voiced = self._segmenter.min_speech_ms_override or self._settings.min_speech_ms
                self._speech_start_at = at - voiced / 1000.0
                await self._stt.send_audio(b"".join(self._preroll))
                self._preroll.clear()
            elif event is SegmentEvent.PAUSE:
                self._speech_end_at = at - WINDOW_MS / 1000.0
            elif event is SegmentEvent.RESUME:
                if self._speculating:
                    self._speculating = False
                    hint = getattr(self._stt, "speech_resumed", None)
                    if hint:
                        hint()
            elif event is SegmentEvent.TURN_END:
                self._in_utterance = False
                self._turns += 1
                tl = TurnTimeline(self._turns)
                tl.mark("speech_start", self._speech_start_at)
                tl.mark("speech_end", self._speech_end_at)
                tl.mark("end_of_turn", at)
                tl.info["input"] = "audio"
                self._start_reply(self._finish_spoken_turn(tl))
        if self._in_utterance and not self._speculating and \
                self._segmenter.silence_ms >= _SPECULATE_AFTER_MS:
            self._speculating = True
            hint = getattr(self._stt, "speech_paused", None)
            if hint:
                hint()

    async def _partials_loop(self) -> None:
        async for partial in self._stt.partials():
            if not self._in_utterance:
                continue  # a late partial of an utterance that already ended
            await self._out.send_event({"type": "transcript", "text": partial.text,
                                        "final": False})
            self._speculate(partial.text)

    async def _finish_spoken_turn(self, tl: TurnTimeline) -> None:
        transcript = await self._stt.finalize()
        tl.mark("final_transcript")
        await self._out.send_event({"type": "transcript", "text": transcript.text,
                                    "final": True, "turn": tl.turn})
        if not normalize_text(transcript.text):
            logs.event(log, "empty_turn", call_id=self.id, turn=tl.turn)
            return
        await self._reply(tl, transcript.text)

    # ------------------------------------------------------------------ text input

    async def _on_text(self, text: str, final: bool) -> None:
        if self.replying:
            await self._barge_in("text")
        await self._out.send_event({"type": "transcript", "text": text, "final": final})
        if not final:
            self._speculate(text)
            return
        self._turns += 1
        tl = TurnTimeline(self._turns)
        at = now()
        for stage in ("speech_end", "end_of_turn", "final_transcript"):
            tl.mark(stage, at)
        tl.info["input"] = "text"
        if normalize_text(text):
            self._start_reply(self._reply(tl, text))

    # ------------------------------------------------------------------ routing

    def _speculate(self, text: str) -> None:
        # One or two words ("I", "how do") never settle an intent: not worth a routing.
        if self._router is None or len(text.split()) < self._settings.route_min_words:
            return
        self._latest_text = text
        if self._route_task is None or self._route_task.done():
            self._route_task = self._spawn(self._route_latest())

    async def _route_latest(self) -> None:
        assert self._router is not None
        # Normalized: another call's identical text may have been routed in its spelling.
        while self._routed is None or \
                normalize_text(self._routed.text) != normalize_text(self._latest_text):
            text = self._latest_text
            self._routed = await self._router(text, False)

    async def _decide(self, text: str) -> tuple[RouteDecision | None, bool]:
        """The decision for the final text and whether the partials had it already.

        The speculation's decision when it routed this text; otherwise one urgent
        routing, ahead of every call's partials, which takes along this text's
        partial routing if that is still queued or running (never routed twice).
        """
        if self._router is None:
            return None, False
        wanted = normalize_text(text)
        routed = self._routed
        speculating = normalize_text(self._latest_text) == wanted
        self._routed, self._latest_text = None, ""
        if self._route_task is not None and not self._route_task.done():
            # Older partials are not worth routing now; this text's routing is joined below.
            self._route_task.cancel()
        self._route_task = None
        if routed is not None and normalize_text(routed.text) == wanted:
            return routed, True
        return await self._router(text, True), speculating

    # ------------------------------------------------------------------ replies

    def _start_reply(self, coro: Awaitable[None]) -> None:
        self._reply_task = self._spawn(coro)

    async def _reply(self, tl: TurnTimeline, text: str) -> None:
        decision, reused = await self._decide(text)
        tl.mark("route_decided")
        tl.info["route_reused"] = reused
        if decision is not None:
            tl.info.update(intent=decision.intent, action=decision.action.value,
                           hit=decision.hit, entry_id=decision.entry_id)
            await self._out.send_event({"type": "route", "turn": tl.turn, "reused": reused,
                                        **decision.as_json()})
        turn = Turn(number=tl.turn, text=text, sample_rate=self.sample_rate, timeline=tl,
                    conversation=self.conversation, decision=decision, encoding=self.encoding)

        async def send_frame(frame: bytes) -> None:
            if not tl.has("first_audio"):
                tl.mark("first_audio")
            await self._out.send_audio(frame)

        playout = Playout(send_frame, self.sample_rate, self._settings.frame_ms,
                          self._settings.playout_lead_ms, self.encoding)
        self._playout = playout
        if self._confirms is not None:
            self._confirms.reply_started(tl.turn)
        segments: list[tuple[str, float, float]] = []  # text, start ms, end ms in the reply
        try:
            async for segment in self._responder.respond(turn):
                # the turn's source is what answered it; a filler only bridged the wait
                if segment.source != "filler" or "source" not in tl.info:
                    tl.info["source"] = segment.source
                if segment.event:
                    await self._out.send_event({**segment.event, "turn": tl.turn})
                await self._out.send_event({"type": "response", "turn": tl.turn,
                                            "source": segment.source, "text": segment.text,
                                            "entry_id": segment.entry_id})
                # Filler and handoff phrases take time but are not the assistant's words.
                said = segment.text if segment.source in ("llm", "cache") else ""
                segments.append((said, playout.sent_ms, float("inf")))
                async for chunk in segment.audio:
                    await playout.write(chunk)
                segments[-1] = (said, segments[-1][1], playout.sent_ms)
            await playout.flush()
            tl.mark("reply_end")
            tl.info["interrupted"] = False
        except asyncio.CancelledError:
            heard_ms = self._heard_ms(playout)
            tl.mark("reply_end")
            tl.info.update(interrupted=True, heard_ms=round(heard_ms, 1))
            # The agent's context keeps only what the caller heard of its own words.
            self.conversation.record_heard(heard_text(segments, heard_ms, playout.sent_ms))
            await self._finish_metrics(tl, text, decision)
            raise
        await self._finish_metrics(tl, text, decision)

    async def _finish_metrics(self, tl: TurnTimeline, text: str,
                              decision: RouteDecision | None) -> None:
        metrics = tl.metrics()
        self._rt.stats.turn_finished(metrics, text,
                                     route_score=decision.score if decision else None)
        logs.event(log, "turn", call_id=self.id, **metrics)
        await self._out.send_event({"type": "turn_metrics", **metrics})

    async def _barge_in(self, cause: str) -> None:
        """Stop the bot now: no frame leaves after this, the client drops its buffer."""
        task = self._reply_task
        if task is None or task.done():
            return
        playout = self._playout
        heard = self._heard_ms(playout) if playout else 0.0
        sent = playout.sent_ms if playout else 0.0
        task.cancel()
        await self._out.interrupt({"type": "interrupt", "turn": self._turns, "cause": cause,
                                   "heard_ms": round(heard, 1), "sent_ms": sent})
        logs.event(log, "barge_in", call_id=self.id, turn=self._turns, heard_ms=round(heard, 1))

    def _heard_ms(self, playout: Playout) -> float:
        """What the caller heard of the reply: confirmed by the far end when it reports
        playback, else the playout clock's estimate."""
        if self._confirms is not None:
            confirmed = self._confirms.confirmed_heard_ms()
            if confirmed is not None:
                return min(confirmed, playout.sent_ms)
        return playout.heard_ms()


def heard_text(segments: list[tuple[str, float, float]], heard_ms: float,
               sent_ms: float) -> str:
    """The words the caller heard, assuming words are spread evenly over each segment.

    A segment still being sent has end ``inf``; its audio so far ends at ``sent_ms``.
    """
    words: list[str] = []
    for text, start, end in segments:
        end = min(end, sent_ms) if end == float("inf") else end
        if heard_ms >= end:
            words.extend(text.split())
        elif heard_ms > start and end > start:
            parts = text.split()
            words.extend(parts[:int(len(parts) * (heard_ms - start) / (end - start))])
    return " ".join(words)
