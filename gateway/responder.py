"""What the bot says back: cached audio, the agent, or a handoff.

``Responder.respond(turn)`` yields reply segments in the order they should play;
each segment carries its source (cache, llm, filler, handoff) and its audio at
the call's sample rate and output encoding (pcm16, or μ-law for a telephony
transport: cached clips then go out exactly as the AudioBank holds them, with no
per-call conversion). The call loop plays them and owns cancellation: when it
stops iterating (a barge-in), every LLM stream and TTS synthesis is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from intents.types import Action, RouteDecision

from .agent import (FILLER_PHRASES, HOLD_PHRASES, PROMPT_TEXTS, Agent, Conversation, Handoff,
                    Sentence, Slow, StillWorking, ToolStarted)
from .audio import StreamResampler
from .audio_bank import AudioBank
from .clock import SYSTEM_CLOCK, Clock, Expired, Timeouts, deadline
from .codec import PCM16, encode
from .preemption import Preemption
from .providers.base import ProviderError, TextToSpeech
from .providers.synthesis_slots import URGENCY, WANTED
from .sentences import has_words, spoken_text
from .settings import Settings
from .timeline import TurnTimeline, now

# A prefetched sentence may run this far ahead of playback; more would be wasted on a barge-in.
_PREFETCH_SENTENCES = 2
# Settings.tts_gap_timeout_s's default, for a Responder built without it (benchmarks).
DEFAULT_TTS_GAP_TIMEOUT_S: float = Settings.model_fields["tts_gap_timeout_s"].default


@dataclass
class Turn:
    number: int
    text: str
    sample_rate: int
    timeline: TurnTimeline
    conversation: Conversation
    decision: RouteDecision | None = None
    encoding: str = PCM16  # what the call's output sends: every segment's audio is in it
    # The agent's first LLM round, started on these words before the turn ended: the
    # agent adopts it when it still fits, a cached answer or a handoff cancels it.
    preempted: Preemption | None = None
    # The line puts a handoff through (the call's ``_can_hand_off``): where it cannot, the
    # agent's handoff after a failure is the apology instead (``HandoffUnavailable``), and
    # one asked for is "I can't put you through ... on this line" (``handoff_unavailable``);
    # the model is offered no ``transfer_to_person`` there, and told it cannot transfer.
    can_hand_off: bool = True


@dataclass
class ReplySegment:
    source: str  # cache | llm | filler | handoff | apology | greeting | prompt | goodbye
    text: str
    audio: AsyncIterator[bytes]  # at the call's rate, in the turn's encoding
    entry_id: str | None = None
    event: dict[str, Any] | None = None  # sent to the client before the audio
    info: dict[str, Any] = field(default_factory=dict)
    # Bytes of the whole segment's audio once known (synthesis finished), else None: what
    # the caller heard of a sentence cut short is counted against its real length.
    total_bytes: Callable[[], int | None] = lambda: None
    # A stage failure the call reports (counted, an `error` event) as this segment plays:
    # the handoff that answers when every LLM failed still says why.
    error: str | None = None


async def _once(pcm16: bytes) -> AsyncIterator[bytes]:
    yield pcm16


async def tts_audio(tts: TextToSpeech, text: str, rate: int, encoding: str = PCM16, *,
                    clock: Clock = SYSTEM_CLOCK,
                    gap_timeout_s: float = DEFAULT_TTS_GAP_TIMEOUT_S) -> AsyncIterator[bytes]:
    """Stream TTS audio for ``text`` converted to the call's rate and encoding.

    Every voice's synthesis in a call comes through here. One that has sent audio and then
    sends none for ``gap_timeout_s`` (of ``clock``: the call's) while asked for more has
    stalled mid-stream: a ``ProviderError`` then (the turn's ``tts_failed``, the apology),
    not silence until the provider's own read timeout, or for good. The wait for the
    first audio is the provider's where it has a deadline for it (``times_first_audio``:
    ElevenLabs' ``first_audio_timeout_s``), else ``gap_timeout_s`` too (Piper), from the
    request or, for a sentence fetched ahead, from when its reply waits for it
    (``WANTED``); a synthesis of words that ends with no audio at all fails too
    (``ProviderError``). The voice is asked for ``text`` without its emoji, which it would
    read out by name, and for nothing when that leaves no words ("😊", "👍!")."""
    text = spoken_text(text)
    if not text:  # no request (a cloud voice may refuse a text with no words)
        return
    resampler = StreamResampler(tts.sample_rate, rate)
    gaps = Timeouts(clock)
    try:
        async with contextlib.aclosing(tts.synthesize(text)) as chunks:  # type: ignore[type-var]
            if getattr(tts, "times_first_audio", False):
                chunk = await anext(chunks, None)
            else:
                # Piper has no deadline of its own: a sentence queued behind STT decodes
                # on the pool they share, or a voice that hung, would be silence for good.
                try:
                    async with deadline(clock, gap_timeout_s, after=WANTED.get()):
                        chunk = await anext(chunks, None)
                except Expired:
                    raise ProviderError(tts.name, f"no first audio within {gap_timeout_s:g} s "
                                                  "(VOICEGATE_TTS_GAP_TIMEOUT_S)") from None
            if chunk is None and has_words(text):
                # A voice that answers with nothing: silence on the line, and the sentence
                # announced and kept in the context as said. A failure (tts_failed) instead.
                raise ProviderError(tts.name, f"returned no audio for a sentence of "
                                              f"{len(text)} characters")
            while chunk is not None:
                yield encode(resampler.process(chunk), encoding)
                try:
                    chunk = await gaps.within(gap_timeout_s, anext(chunks, None))
                except Expired:
                    raise ProviderError(tts.name, f"no audio for {gap_timeout_s:g} s in the "
                                        "middle of a synthesis "
                                        "(VOICEGATE_TTS_GAP_TIMEOUT_S)") from None
    finally:
        gaps.close()
    tail = resampler.process(b"", last=True)
    if tail:
        yield encode(tail, encoding)


class _Prefetched:
    """TTS for one sentence, started now, played later: synthesis overlaps playback.
    ``place``: the sentence's place in its reply (0 the first), its synthesis's
    ``URGENCY``: a voice with capped syntheses serves first sentences first."""

    def __init__(self, source: AsyncIterator[bytes], place: int = 0) -> None:
        self._chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.started = now()
        self.first_chunk_ms: float | None = None  # TTS time to first audio
        self._bytes = 0
        self._complete = False
        context = contextvars.copy_context()
        context.run(URGENCY.set, place)
        # Set when the reply starts reading this sentence: from then the caller waits.
        self.wanted = asyncio.Event()
        if place > 0:  # the first sentence is waited for from its request
            context.run(WANTED.set, self.wanted)
        self.task = asyncio.create_task(self._fill(source), context=context)
        self.task.add_done_callback(self._cancelled)

    def _cancelled(self, task: "asyncio.Task[None]") -> None:
        """A fill that ended cancelled queued no end: its reader would wait for good. Its
        reply cancels it only once nobody reads; anything else (pool work the executor's
        shutdown cancelled, whose CancelledError reaches this task; a cancel from elsewhere)
        is a failed synthesis to its reader (tts_failed, the apology). Queued after an end
        already there, it is never read."""
        if task.cancelled():
            self._chunks.put_nowait(RuntimeError("the synthesis was cancelled before its "
                                                 "audio ended"))

    def total_bytes(self) -> int | None:
        return self._bytes if self._complete else None

    async def _fill(self, source: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in source:
                if self.first_chunk_ms is None:
                    self.first_chunk_ms = (now() - self.started) * 1000.0
                self._bytes += len(chunk)
                await self._chunks.put(chunk)
            self._complete = True
            await self._chunks.put(None)
        except Exception as exc:  # handed to the player, which decides
            await self._chunks.put(exc)
        finally:
            await source.aclose()  # type: ignore[attr-defined]

    async def audio(self) -> AsyncIterator[bytes]:
        self.wanted.set()
        while True:
            item = await self._chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def audio_timed(self, tl: TurnTimeline) -> AsyncIterator[bytes]:
        """The audio, noting the TTS's time to first audio in the turn's timeline."""
        async with contextlib.aclosing(self.audio()) as chunks:
            async for chunk in chunks:
                if "tts_first_audio_ms" not in tl.info and self.first_chunk_ms is not None:
                    tl.info["tts_first_audio_ms"] = round(self.first_chunk_ms, 3)
                yield chunk


# What ``_next_segment`` returns when its ``until`` passed first: nothing to play yet.
_QUIET = object()


async def _next_segment(queue: "asyncio.Queue[ReplySegment]", producer: "asyncio.Task[None]",
                        clock: Clock = SYSTEM_CLOCK, until: float | None = None) -> Any:
    """The producer's next segment; None once it has finished (its failure is raised);
    ``_QUIET`` when ``until`` (a time of ``clock``) passes before either."""
    if queue.empty() and not producer.done():
        getter = asyncio.ensure_future(queue.get())
        waits: set[asyncio.Future[Any]] = {getter, producer}
        timer = None if until is None else asyncio.ensure_future(
            clock.sleep(until - clock.now()))
        if timer is not None:
            waits.add(timer)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
            if timer is not None:
                timer.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        if timer is not None and timer.done() and queue.empty() and not producer.done():
            return _QUIET
    if not queue.empty():
        return queue.get_nowait()
    producer.result()  # raises the producer's failure, if any
    return None


class Responder:
    """Shared by every call. Given what it needs, not the runtime: the agent, the voice,
    the pre-rendered prompts (fillers, handoff, apology) and the cache's clips."""

    def __init__(self, agent: Agent, tts: TextToSpeech, prompts: AudioBank,
                 cache_audio: AudioBank | None = None, *,
                 tts_gap_timeout_s: float = DEFAULT_TTS_GAP_TIMEOUT_S) -> None:
        self._agent = agent
        self._tts = tts
        self._tts_gap_timeout_s = tts_gap_timeout_s
        self._prompts = prompts
        self.cache_audio = cache_audio

    def preempt(self, conversation: Conversation, text: str, *,
                can_hand_off: bool = True) -> Preemption | None:
        """Start the agent's LLM call for a miss's words before the turn ends (None: no
        LLM configured). Nothing is said until a turn adopts it (``Turn.preempted``).
        ``can_hand_off``: the line's, as the turn's will be (``Turn.can_hand_off``)."""
        return self._agent.preempt(conversation, text, can_hand_off=can_hand_off)

    async def respond(self, turn: Turn) -> AsyncIterator[ReplySegment]:
        decision = turn.decision
        cached = None
        if decision is not None and decision.hit and self.cache_audio is not None \
                and decision.entry_id is not None:
            cached = self.cache_audio.take(decision.entry_id, turn.sample_rate, turn.encoding)
        if turn.preempted is not None and decision is not None and (
                cached is not None or decision.action is Action.HANDOFF):
            turn.preempted.cancel()  # not the agent's turn after all
        if cached is not None:
            # The clip's own text, not decision.answer: a version swapped in since the turn
            # was routed holds the entry's new answer, and that is the clip the caller hears,
            # so it is what the reply event and the agent's context record.
            clip, audio = cached
            turn.conversation.add_user(turn.text)
            turn.conversation.add_assistant(clip.text)
            yield ReplySegment(source="cache", text=clip.text, audio=_once(audio),
                               entry_id=clip.key, total_bytes=lambda: len(audio))
            return
        if decision is not None and decision.action is Action.HANDOFF:
            turn.conversation.add_user(turn.text)
            yield self.handoff(turn, f"intent {decision.intent} is routed to a human")
            return
        async with contextlib.aclosing(self._agent_reply(turn)) as segments:
            async for segment in segments:
                yield segment

    async def _agent_reply(self, turn: Turn) -> AsyncIterator[ReplySegment]:
        """Agent events -> segments. Sentences are synthesized ahead of playback; a filler
        covers a tool call or a slow first token, at most once a turn and never after the
        answer has begun, so it cannot overlap or interrupt it.

        A stall once the answer has begun (a sentence said, then no new one: no token,
        or tokens that make no sentence yet) is held here, where the caller's silence is
        known: when the caller has heard every segment so far (the reply waits for the
        next) and ``hold_after_s`` of that silence passed, a hold phrase plays, then one
        every ``hold_after_s`` after the last for as long as it lasts; between segments
        only, never over a sentence. A tool call after words is the agent's to hold
        (``StillWorking``), as before any words.

        Either way a hold phrase never plays back to back with the filler or the hold
        before it: one the agent cues while that one is still queued or playing is
        skipped (the agent cues the next ``hold_after_s`` later), and a stall's next one
        is due at the first multiple of ``hold_after_s`` after the last began that comes
        once the caller has heard it out. A phrase longer than ``hold_after_s`` (an Agent
        built with a short one: ``llm_hold_after_ms`` is at least 3 s) would otherwise
        play behind the last for as long as the quiet lasts."""
        # One place fewer than the sentences ahead: the producer starts the next sentence's
        # synthesis before it waits for room, so that one is ahead too.
        queue: asyncio.Queue[ReplySegment] = asyncio.Queue(max(1, _PREFETCH_SENTENCES - 1))
        prefetches: list[_Prefetched] = []
        tl = turn.timeline
        clock = tl.clock
        hold_after_s = self._agent.hold_after_s or None  # 0 or None: never (llm_hold_after_ms)
        holds = 0  # hold phrases played this turn (the agent's and the stall's: in turn)
        # The answer has begun and the agent holds no quiet of its own (no tool call since
        # its last sentence): a stall is this loop's to hold. Cleared by a tool call.
        answering = False
        # Since the last sentence played: when the caller's silence began, and when its
        # last hold phrase did (None: not yet).
        quiet_since: float | None = None
        held_at: float | None = None
        # A filler or hold phrase is queued or playing (the caller has not heard it out).
        cue_unheard = False

        async def produce() -> None:
            # Never puts an end marker: the consumer watches this task itself, so a
            # producer never blocks on a full queue nobody reads (a barge-in).
            nonlocal holds, answering, cue_unheard
            filler_played = spoke = False
            sentences = 0  # sentences of the reply so far
            # The filler cue (Slow) is timed on the call's clock, as the rest of the turn.
            # The line's handoff decides whether the model may transfer (and is told so).
            # ``first_token``: the model's first token, not its first whole sentence.
            events = self._agent.respond(turn.conversation, turn.text, turn.preempted,
                                         clock=tl.clock, can_hand_off=turn.can_hand_off,
                                         on_first_token=lambda: tl.mark("first_token"))
            try:
                async for event in events:
                    if isinstance(event, Slow):
                        if not filler_played and not spoke:
                            filler_played = cue_unheard = True
                            await queue.put(self.filler(turn))
                        continue
                    if isinstance(event, Sentence):
                        spoke = answering = True
                        fetch = _Prefetched(self._synthesize(turn, event.text), sentences)
                        sentences += 1
                        prefetches.append(fetch)
                        await queue.put(ReplySegment(source="llm", text=event.text,
                                                     audio=fetch.audio_timed(tl),
                                                     total_bytes=fetch.total_bytes))
                    elif isinstance(event, ToolStarted):
                        answering = False  # the agent holds a tool's quiet (StillWorking)
                        if not filler_played and not spoke:
                            filler_played = cue_unheard = True
                            await queue.put(self.filler(turn, tool=event.name))
                    elif isinstance(event, StillWorking):
                        # The agent cues it only while nothing has been said since the
                        # tool call: it never cuts into an answer. Nor does it play the
                        # moment the last filler or hold phrase ends: skipped then.
                        if cue_unheard:
                            continue
                        cue_unheard = True
                        await queue.put(self.hold(turn, holds, event.waited_s))
                        holds += 1
                    elif isinstance(event, Handoff):
                        segment = self.handoff(turn, event.reason)
                        segment.error = event.error  # its code (Handoff.error), or None
                        await queue.put(segment)
            finally:
                # Closed before this task ends: the agent writes what it said to the
                # conversation, so the call can cut it to what the caller heard.
                await events.aclose()  # type: ignore[attr-defined]

        producer = asyncio.create_task(produce(), name="vg-agent-reply")
        try:
            while True:
                # Asked for the next segment, the reply has played every one so far
                # (but its lead): from now the caller hears nothing until one comes.
                until = None
                if answering and hold_after_s is not None and queue.empty() \
                        and not producer.done():
                    now = clock.now()
                    quiet_since = now if quiet_since is None else quiet_since
                    # Every hold_after_s after the last one began; a time that passed
                    # while it played is skipped, not taken the moment it ended.
                    until = quiet_since + hold_after_s if held_at is None else held_at + \
                        hold_after_s * (math.floor((now - held_at) / hold_after_s) + 1)
                segment = await _next_segment(queue, producer, clock, until)
                if segment is None:
                    break
                if segment is _QUIET:
                    assert quiet_since is not None
                    held_at = clock.now()
                    segment = self.hold(turn, holds, round(held_at - quiet_since, 3))
                    holds += 1
                    cue_unheard = True
                elif segment.source == "llm":  # words again: a stall after them is new
                    quiet_since = held_at = None
                yield segment
                if segment.source == "filler":
                    cue_unheard = False  # asked for the next: the caller heard it out
        finally:
            producer.cancel()
            for fetch in prefetches:
                fetch.task.cancel()
            tasks = [producer, *(f.task for f in prefetches)]
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            except asyncio.CancelledError:
                # The reply was cancelled meanwhile (a barge-in in this very step): its
                # tasks still end first (the agent writes its message before the call
                # cuts it to the heard words), then the cancel goes on. Swallowed, the
                # reply would play on into a playout the barge-in froze, for good.
                await asyncio.wait(tasks)
                raise

    def filler(self, turn: Turn, tool: str | None = None) -> ReplySegment:
        key = f"filler:{random.randrange(len(FILLER_PHRASES))}"  # varied from turn to turn
        return self._prompt(turn, key, "filler", {"tool": tool} if tool else {})

    def hold(self, turn: Turn, index: int, waited_s: float) -> ReplySegment:
        """The turn's ``index``-th hold phrase (0-based; the phrases in turn): a tool, or a
        stall (after the filler, or mid-answer), keeps the line quiet. A filler to every
        metric and to the client."""
        key = f"hold:{index % len(HOLD_PHRASES)}"
        return self._prompt(turn, key, "filler", {"hold": True, "waited_s": waited_s})

    def apology(self, turn: Turn, code: str) -> ReplySegment:
        """What the caller hears when a stage of the reply failed (the call goes on); a
        failed transfer has its own ("I couldn't put you through"), not "say that again",
        and so has a handoff asked for on a line that cannot transfer
        (``handoff_unavailable``: "I can't put you through ... on this line")."""
        key = code if code in ("transfer_failed", "handoff_unavailable") else "apology"
        return self._prompt(turn, key, "apology", {"code": code})

    def handoff(self, turn: Turn, reason: str) -> ReplySegment:
        segment = self._prompt(turn, "handoff", "handoff", {"reason": reason})
        segment.event = {"type": "handoff", "reason": reason}
        return segment

    def greeting(self, turn: Turn, text: str) -> ReplySegment:
        """The configured greeting, at the start of a call (pre-rendered when it matches)."""
        return self._prompt(turn, "greeting", "greeting", {}, text)

    def idle_prompt(self, turn: Turn) -> ReplySegment:
        """The caller has been silent since the bot finished: "are you still there?"."""
        return self._prompt(turn, "idle", "prompt", {})

    def goodbye(self, turn: Turn) -> ReplySegment:
        """Still silent after the idle prompt: said before the call ends."""
        return self._prompt(turn, "goodbye", "goodbye", {})

    def time_limit(self, turn: Turn) -> ReplySegment:
        """The call reached its time limit: said before it ends."""
        return self._prompt(turn, "time_limit", "goodbye", {"time_limit": True})

    def _prompt(self, turn: Turn, key: str, source: str, info: dict[str, Any],
                text: str | None = None) -> ReplySegment:
        prompts = self._prompts
        if key in prompts and (text is None or prompts.clip(key).text == text):
            clip = prompts.audio(key, turn.sample_rate, turn.encoding)
            return ReplySegment(source=source, text=prompts.clip(key).text, audio=_once(clip),
                                info=info, total_bytes=lambda: len(clip))
        # Prompts not rendered (a bare runtime in a benchmark): synthesize now.
        text = text if text is not None else PROMPT_TEXTS.get(key, FILLER_PHRASES[0])
        return ReplySegment(source=source, text=text, info=info,
                            audio=self._synthesize(turn, text))

    def _synthesize(self, turn: Turn, text: str) -> AsyncIterator[bytes]:
        """``text`` in the call's voice, rate and encoding; a stall timed on its clock."""
        return tts_audio(self._tts, text, turn.sample_rate, turn.encoding,
                         clock=turn.timeline.clock, gap_timeout_s=self._tts_gap_timeout_s)

