"""What the bot says back: cached audio, the agent, or a handoff.

``Responder.respond(turn)`` yields reply segments in the order they should play;
each segment carries its source (cache, llm, filler, handoff) and its audio at
the call's sample rate. The call loop plays them and owns cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from intents.types import Action, RouteDecision

from .audio import StreamResampler
from .audio_bank import AudioBank
from .runtime import Runtime
from .timeline import TurnTimeline


@dataclass
class Turn:
    number: int
    text: str
    sample_rate: int
    timeline: TurnTimeline
    decision: RouteDecision | None = None


@dataclass
class ReplySegment:
    source: str  # cache | llm | filler | handoff
    text: str
    audio: AsyncIterator[bytes]  # pcm16 at the call's rate
    entry_id: str | None = None
    event: dict[str, Any] | None = None  # sent to the client before the audio
    info: dict[str, Any] = field(default_factory=dict)


async def _once(pcm16: bytes) -> AsyncIterator[bytes]:
    yield pcm16


async def tts_audio(runtime: Runtime, text: str, rate: int) -> AsyncIterator[bytes]:
    """Stream TTS audio for ``text`` converted to the call's rate."""
    resampler = StreamResampler(runtime.tts.sample_rate, rate)
    async for chunk in runtime.tts.synthesize(text):
        yield resampler.process(chunk)
    tail = resampler.process(b"", last=True)
    if tail:
        yield tail


class Responder:
    def __init__(self, runtime: Runtime, cache_audio: AudioBank | None = None) -> None:
        self._runtime = runtime
        self._cache_audio = cache_audio

    async def respond(self, turn: Turn) -> AsyncIterator[ReplySegment]:
        decision = turn.decision
        if decision is not None and decision.hit and self._cache_audio is not None \
                and decision.entry_id in self._cache_audio:
            clip_key = decision.entry_id
            assert clip_key is not None
            yield ReplySegment(source="cache", text=decision.answer or "",
                               audio=_once(self._cache_audio.audio(clip_key, turn.sample_rate)),
                               entry_id=clip_key)
            return
        reason = "no agent (LLM) is configured"
        if decision is not None and decision.action is Action.HANDOFF:
            reason = f"intent {decision.intent} is routed to a human"
        yield self.handoff(turn, reason)

    def handoff(self, turn: Turn, reason: str) -> ReplySegment:
        prompts = self._runtime.prompts
        if "handoff" in prompts:
            clip = prompts.clip("handoff")
            audio = _once(prompts.audio("handoff", turn.sample_rate))
            text = clip.text
        else:  # a TTS without whole-text rendering: synthesize on the spot
            from .runtime import HANDOFF_TEXT

            text = HANDOFF_TEXT
            audio = tts_audio(self._runtime, text, turn.sample_rate)
        return ReplySegment(source="handoff", text=text, audio=audio,
                            event={"type": "handoff", "reason": reason})
