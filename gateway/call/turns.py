"""Turn detection: caller audio -> VAD -> speech segments -> STT utterances -> turn ends.

One ``TurnDetector`` per call. It owns the call's VAD state, the segmenter, the
pre-roll and the STT stream, and turns 32 ms windows into ``TurnSignal``s for the
engine: speech started (the engine may barge in) and turn ended (with the final
transcript on its way).

Invariants the engine relies on:
- An utterance is cut from the STT stream the moment its turn ends
  (``STTStream.finalize`` takes the audio synchronously), so audio that follows,
  even while the final is still decoding, belongs to the next utterance.
- The early final decode (``speech_paused``) is armed afresh for every utterance.
- The pre-roll holds all the audio the segmenter needed before it declared speech,
  including the longer barge-in confirmation, so no first word is clipped.

Cancellation: the detector starts no task of its own; ``aclose`` closes the STT
stream, which cancels its decodes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Protocol

import numpy as np

from ..clock import Clock
from ..providers.base import STTStream, Transcript
from ..timeline import TurnTimeline
from ..vad import WINDOW_MS, SegmentEvent, SileroState, SpeechSegmenter

# Start the final decode once a pause is this long: shorter gaps between words would
# only start decodes that the next word throws away.
SPECULATE_AFTER_MS = 96.0
# Pre-roll kept beyond the longest speech confirmation, for the onset the VAD scores low.
_PREROLL_MARGIN_MS = 160.0


class VadScorer(Protocol):
    """Speech probabilities of a call's windows (``gateway.vad.VADBatcher``)."""

    async def score(self, state: SileroState, windows: list[np.ndarray]) -> list[float]: ...


@dataclass(frozen=True)
class TurnSettings:
    vad_threshold: float = 0.5
    min_speech_ms: float = 120.0
    barge_in_min_speech_ms: float = 400.0
    end_of_turn_silence_ms: float = 300.0

    @property
    def preroll_windows(self) -> int:
        longest = max(self.min_speech_ms, self.barge_in_min_speech_ms) + _PREROLL_MARGIN_MS
        return math.ceil(longest / WINDOW_MS)


@dataclass
class SpeechStarted:
    at: float


@dataclass
class TurnEnded:
    timeline: TurnTimeline
    final: Awaitable[Transcript]  # the utterance's final transcript, already cut


TurnSignal = SpeechStarted | TurnEnded


class TurnDetector:
    def __init__(self, settings: TurnSettings, stt: STTStream, clock: Clock) -> None:
        self._settings = settings
        self.stt = stt
        self._clock = clock
        self.vad_state = SileroState()
        self._segmenter = SpeechSegmenter(threshold=settings.vad_threshold,
                                          min_speech_ms=settings.min_speech_ms,
                                          end_silence_ms=settings.end_of_turn_silence_ms)
        self._preroll: deque[bytes] = deque(maxlen=settings.preroll_windows)
        self.in_utterance = False
        self._speech_start_at = 0.0
        self._speech_end_at = 0.0
        self._speculating = False  # an early final decode is running for this pause
        self.turns = 0

    def confirm_speech_slowly(self, slowly: bool) -> None:
        """While the bot talks, speech must last longer to count (barge-in)."""
        self._segmenter.min_speech_ms_override = (
            float(self._settings.barge_in_min_speech_ms) if slowly else None)

    async def push(self, window: bytes, prob: float, at: float) -> list[TurnSignal]:
        """One 32 ms window at 16 kHz with its speech probability, arrived at ``at``."""
        signals: list[TurnSignal] = []
        if self.in_utterance:
            await self.stt.send_audio(window)
        else:
            self._preroll.append(window)
        for event in self._segmenter.push(prob):
            if event is SegmentEvent.SPEECH_START:
                needed = (self._segmenter.min_speech_ms_override
                          or self._settings.min_speech_ms)
                self._speech_start_at = at - needed / 1000.0
                self.in_utterance = True
                self._speculating = False
                signals.append(SpeechStarted(at))
                await self.stt.send_audio(b"".join(self._preroll))
                self._preroll.clear()
            elif event is SegmentEvent.PAUSE:
                self._speech_end_at = at - WINDOW_MS / 1000.0
            elif event is SegmentEvent.RESUME:
                if self._speculating:
                    self._speculating = False
                    self._hint("speech_resumed")
            elif event is SegmentEvent.TURN_END:
                signals.append(self._end_turn(at))
        if self.in_utterance and not self._speculating and \
                self._segmenter.silence_ms >= SPECULATE_AFTER_MS:
            self._speculating = True
            self._hint("speech_paused")
        return signals

    def _end_turn(self, at: float) -> TurnEnded:
        self.in_utterance = False
        self._speculating = False
        self.turns += 1
        tl = TurnTimeline(self.turns, clock=self._clock)
        tl.mark("speech_start", self._speech_start_at)
        tl.mark("speech_end", self._speech_end_at)
        tl.mark("end_of_turn", at)
        tl.info["input"] = "audio"
        # finalize() cuts the utterance now; only the decode is awaited later.
        return TurnEnded(tl, self.stt.finalize())

    def next_turn_number(self) -> int:
        """A turn that skips the detector (a text message) still takes a number."""
        self.turns += 1
        return self.turns

    def _hint(self, name: str) -> None:
        hint = getattr(self.stt, name, None)
        if hint is not None:
            hint()

    async def aclose(self) -> None:
        await self.stt.aclose()
