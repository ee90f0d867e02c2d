"""Turn detection: caller audio -> VAD -> speech segments -> STT utterances -> turn ends.

One ``TurnDetector`` per call. It owns the call's VAD state, the segmenter, the
pre-roll, the STT stream and the end-of-turn policy, and turns 32 ms windows into
``TurnSignal``s for the engine: speech started (the engine may barge in), speech
paused (the early final is decoding; the engine gathers end-of-turn signals), speech
resumed, and turn ended (with the final transcript on its way).

The silence that ends a turn is asked of the ``EndOfTurnPolicy`` on every window, so
a turn judged complete ends after a short pause and one judged incomplete waits.

Invariants the engine relies on:
- An utterance is cut from the STT stream the moment its turn ends
  (``STTStream.finalize`` takes the audio synchronously), so audio that follows,
  even while the final is still decoding, belongs to the next utterance.
- The early final decode (``speech_paused``) is armed afresh for every pause; a pause's
  signals carry its number, and a note about an older pause is ignored.
- The pre-roll holds all the audio the segmenter needed before it declared speech,
  including the longer barge-in confirmation, so no first word is clipped.

Cancellation: the detector starts no task of its own; ``aclose`` closes the STT
stream, which cancels its decodes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol

import numpy as np

from ..clock import Clock
from ..providers.base import STTStream, Transcript
from ..timeline import TurnTimeline
from ..vad import SAMPLE_RATE, WINDOW_MS, SegmentEvent, SileroState, SpeechSegmenter
from .end_of_turn import EndOfTurnPolicy, EndOfTurnSettings

# Pre-roll kept beyond the longest speech confirmation, for the onset the VAD scores low.
_PREROLL_MARGIN_MS = 160.0
# The turn model looks at the last 8 s of the turn; the detector keeps that much.
TURN_AUDIO_BYTES = 8 * SAMPLE_RATE * 2
# A run of windows the VAD failed to score this long mid-utterance ends the turn: the VAD
# is out (a broken model session), and unscored windows never count as silence, so the
# turn would otherwise stay open, the caller unanswered, until max_call_s. Far past a
# turn's longest silence and a failed batch or two: a short failure ends no turn.
UNSCORED_TURN_END_MS = 10_000.0


class VadScorer(Protocol):
    """Speech probabilities of a call's windows (``gateway.vad.VADBatcher``)."""

    async def score(self, state: SileroState, windows: list[np.ndarray]) -> list[float]: ...


@dataclass(frozen=True)
class TurnSettings:
    vad_threshold: float = 0.5
    # A window this likely speech (below vad_threshold) does not end a turn: the next does.
    vad_onset_probability: float = 0.15
    min_speech_ms: float = 120.0
    barge_in_min_speech_ms: float = 400.0
    # ... except just after the caller's own turn ended: going on is continuing it.
    continuation_min_speech_ms: float = 160.0
    end_of_turn: EndOfTurnSettings = EndOfTurnSettings()
    # Decode the final once a pause is this long: shorter gaps between words would only
    # start decodes that the next word throws away.
    early_final_after_ms: float = 64.0

    @property
    def preroll_windows(self) -> int:
        """Windows kept before speech is confirmed: the longest confirmation's span plus
        the margin. A candidate survives one-window dips, so its N voiced windows may
        span up to 2N - 1 (voiced, unvoiced, voiced, ...): sized for that, no first word
        is cut however the speech dips while it is confirmed."""
        return 2 * math.ceil(self._longest_ms / WINDOW_MS) - 1 + _margin_windows()

    @property
    def preroll_sent_windows(self) -> int:
        """At least this much of the pre-roll goes to the recogniser when speech starts:
        the longest confirmation and the margin (what every turn has always been decoded
        with; a soft first syllable can sit below the VAD's threshold)."""
        return math.ceil((self._longest_ms + _PREROLL_MARGIN_MS) / WINDOW_MS)

    @property
    def _longest_ms(self) -> float:
        return max(self.min_speech_ms, self.barge_in_min_speech_ms,
                   self.continuation_min_speech_ms)


def _margin_windows() -> int:
    return math.ceil(_PREROLL_MARGIN_MS / WINDOW_MS)


@dataclass
class SpeechStarted:
    at: float  # when the segmenter was sure (the speech's confirmation time later)
    speech_at: float  # when the speech itself began (estimated)


@dataclass
class SpeechPaused:
    """The caller went quiet mid-turn; ``early`` is the utterance so far, decoding."""

    pause: int  # the pause's number, for notes about it
    early: Awaitable[Transcript] | None  # None: the STT has no early decode
    audio: bytes  # the turn's audio so far (its last 8 s), for the turn model


@dataclass
class SpeechResumed:
    pause: int


@dataclass
class TurnEnded:
    timeline: TurnTimeline
    final: Awaitable[Transcript]  # the utterance's final transcript, already cut


TurnSignal = SpeechStarted | SpeechPaused | SpeechResumed | TurnEnded


class TurnDetector:
    def __init__(self, settings: TurnSettings, stt: STTStream, clock: Clock) -> None:
        self._settings = settings
        self.stt = stt
        self._clock = clock
        self.vad_state = SileroState()
        self.policy = EndOfTurnPolicy(settings.end_of_turn)
        self._segmenter = SpeechSegmenter(threshold=settings.vad_threshold,
                                          min_speech_ms=settings.min_speech_ms,
                                          end_silence_ms=settings.end_of_turn.silence_ms,
                                          onset_probability=settings.vad_onset_probability)
        self._preroll: deque[bytes] = deque(maxlen=settings.preroll_windows)
        self._windows = 0  # windows pushed so far
        self._candidate_from = 0  # the window the speech being confirmed began on
        self._audio = bytearray()  # the turn's audio (last 8 s), for the turn model
        self.in_utterance = False
        self._speech_start_at = 0.0
        self._speech_end_at = 0.0
        self._scored_at = 0.0  # arrival of the newest window pushed (scored or not)
        self._unscored_ms = 0.0  # the run of windows the VAD failed to score, up to now
        self._paused = False  # SpeechPaused was signalled for the current pause
        self._noted: dict[str, float] = {}  # when each signal of this pause arrived
        self.pause = 0  # number of the current (or last) pause
        self.turns = 0
        self.stt_error: Exception | None = None  # a refusal the engine has not reported

    @property
    def hears_voice(self) -> bool:
        """Voice has begun that may be the caller starting to speak, not yet confirmed as
        speech (``min_speech_ms``) nor rejected: the bot should not start talking unasked."""
        return not self.in_utterance and self._segmenter.in_candidate

    def confirm_speech_slowly(self, slowly: bool, continuing: bool = False) -> None:
        """While the bot talks, speech must last longer to count (barge-in), unless the
        caller is ``continuing`` the turn that just ended (continuation_min_speech_ms)."""
        s = self._settings
        self._segmenter.min_speech_ms_override = (
            None if not slowly else
            float(s.continuation_min_speech_ms if continuing else s.barge_in_min_speech_ms))

    async def push(self, window: bytes, prob: float | None, at: float) -> list[TurnSignal]:
        """One 32 ms window at 16 kHz with its speech probability, arrived at ``at``.

        ``prob`` None: the VAD failed to score it. The window still goes where any window
        goes (to the recogniser mid-utterance, else the pre-roll), so no caller audio is
        lost, and the segmenter holds still: a window of unknown voice neither confirms
        speech (no barge-in) nor counts as silence (no turn end, here or in
        ``end_turn_if_due``), up to ``UNSCORED_TURN_END_MS`` of them in a row
        mid-utterance: the VAD is out, and the turn ends there. Mid-pause, such a window
        ends the pause as speech resuming would (``_unscored_in_pause``)."""
        signals: list[TurnSignal] = []
        self._windows += 1
        if self.in_utterance:
            await self._send(window)
            self._keep_audio(window)
        else:
            self._preroll.append(window)
        # What is known about this pause decides how much silence ends the turn.
        self._segmenter.end_silence_ms = self.policy.required_silence_ms()
        self._scored_at = at
        silence_before_ms = self._segmenter.silence_ms  # the pause this window may end
        # Unscored: the segmenter holds (no event), its silence and voiced time unchanged.
        events = self._segmenter.push(prob) if prob is not None else []
        self._unscored_ms = self._unscored_ms + WINDOW_MS if prob is None else 0.0
        if prob is None and self.in_utterance and self._paused:
            signals.append(self._unscored_in_pause())
        if self.in_utterance and self._unscored_ms >= UNSCORED_TURN_END_MS:
            if not self._paused:  # speaking when the VAD failed: their end is unknown
                self._speech_end_at = at
            self._segmenter.end_turn()
            signals.append(self._end_turn(at))
        for event in events:
            if event is SegmentEvent.CANDIDATE:
                self._candidate_from = self._windows
            elif event is SegmentEvent.SPEECH_START:
                # The candidate's whole span, dips included, not only its voiced windows.
                span = self._windows - self._candidate_from + 1
                self._speech_start_at = at - span * WINDOW_MS / 1000.0
                self.in_utterance = True
                self._paused = False
                self.policy.new_utterance()
                self._noted = {}
                signals.append(SpeechStarted(at, self._speech_start_at))
                kept = max(span + _margin_windows(), self._settings.preroll_sent_windows)
                preroll = b"".join(list(self._preroll)[-kept:])
                self._preroll.clear()
                self._audio = bytearray()
                self._keep_audio(preroll)
                await self._send(preroll)
            elif event is SegmentEvent.PAUSE:
                self._speech_end_at = at - WINDOW_MS / 1000.0
            elif event is SegmentEvent.RESUME:
                self.policy.reset()
                self.policy.note_resumed_pause(silence_before_ms)
                self._noted = {}
                if self._paused:
                    self._paused = False
                    self._hint("speech_resumed")
                    signals.append(SpeechResumed(self.pause))
            elif event is SegmentEvent.TURN_END:
                signals.append(self._end_turn(at))
        if self.in_utterance and not self._paused and prob is not None and \
                self._segmenter.silence_ms >= self._settings.early_final_after_ms:
            self._paused = True
            self.pause += 1
            early = self._hint("speech_paused")
            self.policy.awaiting_early = early is not None
            signals.append(SpeechPaused(self.pause, early, bytes(self._audio)))
        return signals

    def _unscored_in_pause(self) -> SpeechResumed:
        """A window the VAD could not score mid-pause may be the caller's next words, which
        the pause's early decode (the final-to-be: the embedded recognisers') never heard:
        the pause is over as if speech resumed, its signals stale. It is armed afresh, its
        early decode reading all the audio, once the VAD scores a window again."""
        self.policy.reset()
        self._noted = {}
        self._paused = False
        self._hint("speech_resumed")
        return SpeechResumed(self.pause)

    async def _send(self, pcm16: bytes) -> None:
        """Audio for the recogniser. One that refuses it (a remote socket gone) must not stop
        the turn machine: the refusal is kept for the engine to report (``take_stt_error``),
        turns still start and end, and a turn whose words are lost fails at its final."""
        try:
            await self.stt.send_audio(pcm16)
        except Exception as exc:  # noqa: BLE001 - any refusal; reported by the engine
            self.stt_error = exc

    def take_stt_error(self) -> Exception | None:
        """The recogniser's latest refusal since the last call, if any."""
        error, self.stt_error = self.stt_error, None
        return error

    def _keep_audio(self, pcm16: bytes) -> None:
        self._audio += pcm16
        if len(self._audio) > TURN_AUDIO_BYTES:
            del self._audio[:len(self._audio) - TURN_AUDIO_BYTES]

    # ---- notes about a pause, from the engine (ignored once that pause is over)

    def note_turn_probability(self, pause: int, probability: float) -> None:
        if self._current(pause, "turn_model"):
            self.policy.turn_probability = probability

    def note_transcript(self, pause: int, text: str) -> None:
        if self._current(pause, "early_transcript"):
            self.policy.transcript = text

    def note_route(self, pause: int, cache_hit: bool, words_finished: bool = True) -> None:
        if self._current(pause, "early_route"):
            self.policy.cache_hit = cache_hit
            self.policy.words_finished = words_finished

    def note_early_done(self, pause: int) -> None:
        """The early transcript was decoded and routed, or could not be."""
        if self._current(pause, "early_done"):
            self.policy.awaiting_early = False

    def end_turn_if_due(self, pause: int, at: float) -> TurnEnded | None:
        """The pause's last signal arrived at ``at``: if the silence since the last word
        already ends the turn as now judged, end it now. Otherwise the next window would,
        up to a window (32 ms) plus the VAD's batching later, for nothing: a cached
        question's turn waits for its early route, which usually comes after the short
        silence has passed. The silence counts the windows scored and the time since the
        newest window arrived (one the VAD failed to score is no silence; audio not scored
        yet is taken as still quiet: speech in it opens the next turn, as any speech just
        after a turn's end does)."""
        if not (self.in_utterance and self._paused and pause == self.pause):
            return None
        unscored_ms = max(0.0, at - self._scored_at) * 1000
        silence_ms = self._segmenter.silence_ms + unscored_ms
        if silence_ms < self.policy.required_silence_ms():
            return None
        if self._segmenter.hears_onset and unscored_ms < self._segmenter.onset_budget_ms:
            self._segmenter.defer_onset()  # one of the deferrals: the next window decides
            return None
        self._segmenter.end_turn()
        return self._end_turn(at)

    def _current(self, pause: int, signal: str) -> bool:
        """The note is about the pause under way; when so, its arrival (ms after the
        last speech) goes in the turn's metrics, to see which signal came late."""
        if not (self.in_utterance and self._paused and pause == self.pause):
            return False
        self._noted[f"{signal}_ms"] = round((self._clock.now() - self._speech_end_at) * 1000, 1)
        return True

    def _end_turn(self, at: float) -> TurnEnded:
        self.in_utterance = False
        self._paused = False
        self.turns += 1
        tl = TurnTimeline(self.turns, clock=self._clock)
        tl.mark("speech_start", self._speech_start_at)
        tl.mark("speech_end", self._speech_end_at)
        tl.mark("end_of_turn", at)
        tl.info["input"] = "audio"
        policy = self.policy
        tl.info["end_of_turn"] = policy.judge().value
        if policy.turn_probability is not None:
            tl.info["turn_probability"] = round(policy.turn_probability, 3)
        if policy.words_finished is not None:
            tl.info["words_finished"] = policy.words_finished
        if policy.hesitated:
            tl.info["hesitation_ms"] = round(policy.longest_resumed_pause_ms)
        tl.info.update(self._noted)
        self._noted = {}
        self.policy.new_utterance()
        self._audio = bytearray()
        # finalize() cuts the utterance now; only the decode is awaited later.
        try:
            final = self.stt.finalize()
        except Exception as exc:  # noqa: BLE001 - the turn fails at its final, the call goes on
            final = _failed(exc)
        return TurnEnded(tl, final)

    def next_turn_number(self) -> int:
        """A turn that skips the detector (a text message) still takes a number."""
        self.turns += 1
        return self.turns

    def _hint(self, name: str) -> Any:
        """An optional STT hint (an STT without early finals ignores pauses); one that
        fails gives no early words (the silence alone decides that pause)."""
        hint = getattr(self.stt, name, None)
        if hint is None:
            return None
        try:
            return hint()
        except Exception as exc:  # noqa: BLE001 - reported like a refused window
            self.stt_error = exc
            return None

    async def aclose(self) -> None:
        await self.stt.aclose()


async def _failed(exc: Exception) -> Transcript:
    """A final that could not even be asked for: the turn's final raises it."""
    raise exc
