"""The reply stage: one turn's answer from the responder, paced out to the caller.

``ReplyStage.play(turn)`` iterates the responder's segments, sends each segment's
events, then its audio through a real-time ``Playout``. It knows, at any moment,
how much of the reply the caller has heard, so a barge-in leaves the agent's
context with exactly the words that were played.

Cancellation (a barge-in or the end of the call): the responder's generator and
the segment being played are closed first (the agent's streams close and it writes
what it said), then the conversation is cut to the heard words, then
``CancelledError`` propagates. Nothing of the reply outlives ``play``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

from ..clock import Clock
from ..codec import SAMPLE_WIDTH
from ..playout import Playout
from ..providers.base import ProviderError
from ..responder import ReplySegment, Responder, Turn


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
    figure replaces it on barge-in. Optional: ``reply_audio_sent()``, called where the
    audio sent stops for now (a segment's end, the reply's last frame), so the far end
    can confirm all of it (Twilio: a mark there).
    """

    def reply_started(self, turn: int) -> None:
        """Reply frames sent from now on belong to ``turn``; its playback starts at 0 ms.
        A turn may start a second reply (the apology after one that failed mid-way)."""

    def confirmed_heard_ms(self) -> float | None:
        """Audio of the current reply the far end confirmed played; None: it cannot tell."""

    def reply_resumed(self, from_ms: float) -> None:
        """After a ``clear``, the reply is sent again from ``from_ms``."""


class LineEnded(Exception):
    """A phone line's transfer found the call already over (the caller hung up as the
    handoff message ended): no failure, nobody to put through or apologise to."""


class StageFailed(Exception):
    """A stage of the reply failed; ``code`` names it for the client and the counters."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HandoffUnavailable(StageFailed):
    """The agent handed off after a failure (every LLM failed: ``code``) on a line that
    cannot hand off (``Turn.can_hand_off``): the turn failed, and gets the apology, not a
    handoff message promising a colleague the line cannot reach. A handoff asked for there
    (no failure) is no failed turn: ``ReplyStage`` plays "I can't put you through ... on
    this line" in its place (``handoff_unavailable``)."""


# Reports a stage failure that did not stop the reply: (code, message, turn).
ReportFn = Callable[[str, str, int], Awaitable[None]]

# What the assistant said, where: (spoken text, start ms, end ms) within the reply audio.
Spoken = tuple[str, float, float]
# The sources whose words the agent's context holds: a barge-in cuts them to the heard ones.
_SAID = ("llm", "cache", "greeting")


class ReplyStage:
    def __init__(self, responder: Responder, output: CallOutput, sample_rate: int, *,
                 frame_ms: int, lead_ms: int, clock: Clock, chunk_ms: int | None = None,
                 report: ReportFn | None = None) -> None:
        self._responder = responder
        self._report = report
        self._out = output
        self._confirms = output if isinstance(output, ConfirmsPlayback) else None
        self._sample_rate = sample_rate
        self._frame_ms = frame_ms
        self._lead_ms = lead_ms
        self._chunk_ms = chunk_ms
        self._clock = clock
        self._playout: Playout | None = None
        self._frozen_heard_ms: float | None = None  # set by freeze() at a barge-in
        self._frozen_at = 0.0  # when (the clock's time): no frame left after it
        # (turn, playout) of the last reply that ended unstopped (played out, or failed),
        # until the next begins: its task may still run (metrics, a transfer, the apology's
        # wait), and a barge-in then stops a reply the caller heard, not one not begun.
        self._ended: tuple[int, Playout] | None = None
        # The assistant's words (agent or cache) of the latest reply, by turn: the draft
        # answer when a missed question is promoted to a FAQ entry.
        self._said: tuple[int, list[str]] = (0, [])

    def said_text(self, turn: int) -> str:
        """What the assistant said (in full) in ``turn``'s reply; empty when nothing, or
        when the reply failed part-way (half an answer)."""
        said_turn, texts = self._said
        return " ".join(texts) if said_turn == turn else ""

    def _stopped_by(self, turn: int | None) -> Playout | None:
        """The reply a barge-in on ``turn`` stops: the one playing, else ``turn``'s last,
        over while its task ends. None: none playing, and ``turn``'s has not begun (not
        the last one's)."""
        if self._playout is not None:
            return self._playout
        ended = self._ended
        return ended[1] if ended is not None and ended[0] == turn else None

    def heard_ms(self, turn: int | None = None) -> float:
        """What the caller heard of the current reply (or of ``turn``'s, over): confirmed
        by the far end when it reports playback, else the playout clock's estimate."""
        playout = self._stopped_by(turn)
        if playout is None:
            return 0.0
        if self._frozen_heard_ms is not None:
            return self._frozen_heard_ms
        if self._confirms is not None:
            confirmed = self._confirms.confirmed_heard_ms()
            if confirmed is not None:
                return min(confirmed, playout.sent_ms)
        return playout.heard_ms()

    def freeze(self, turn: int | None = None) -> tuple[float, float]:
        """A barge-in on ``turn``'s reply: no frame leaves after this; what was heard is
        fixed now. Returns (heard_ms, sent_ms) of the reply it stops."""
        self._frozen_heard_ms = round(self.heard_ms(turn), 1)  # as the interrupt event says
        self._frozen_at = self._clock.now()
        if self._playout is not None:
            self._playout.hold()
        stopped = self._stopped_by(turn)
        return self._frozen_heard_ms, stopped.sent_ms if stopped is not None else 0.0

    @property
    def held(self) -> bool:
        return self._frozen_heard_ms is not None

    @property
    def frozen_heard_ms(self) -> float | None:
        """What the caller heard of the reply a barge-in froze (the interrupt's heard_ms),
        until the freeze is lifted or the next reply begins; None: nothing frozen."""
        return self._frozen_heard_ms

    @property
    def live(self) -> bool:
        """A reply's playout is open: a barge-in now has audio to hold."""
        return self._playout is not None and self._frozen_heard_ms is None

    def resume(self) -> float | None:
        """The barge-in was noise: play on from the frame the caller last heard.

        Returns that position (ms), or None when there is no held reply. A reply that
        had sent its last frame when the barge-in held it (its task still ending) has
        nothing to play on: the hold ends, and the caller heard ``heard`` of it, as the
        interrupt said. Not one that failed under the hold: ``release`` ends that hold,
        and the apology plays afresh."""
        playout, heard = self._playout, self._frozen_heard_ms
        if heard is None:
            return None
        if playout is None:
            if self._ended is None:  # closed under the hold (it failed): ``release``
                return None
            self._frozen_heard_ms = None
            return heard
        self._frozen_heard_ms = None
        replay_from = playout.resume_from(heard)
        if self._confirms is not None:  # marks count from where the replay starts
            self._confirms.reply_resumed(replay_from)
        return heard

    def release(self) -> float | None:
        """A hold on a reply whose playout has closed (it failed meanwhile) ended with no
        words: nothing to replay, what it says next (the apology) plays afresh. Returns
        what the caller had heard (the interrupt's heard_ms), None when nothing is held."""
        if self._playout is not None:  # one still open is resumed (``resume``), not this
            return None
        heard, self._frozen_heard_ms = self._frozen_heard_ms, None
        return heard

    async def play(self, turn: Turn) -> None:
        """Play the responder's reply to ``turn``. Raises the failure of any stage."""
        await self._play_segments(turn, self._responder.respond(turn), record_heard=True)

    async def play_segment(self, turn: Turn, segment: ReplySegment, *,
                           record_heard: bool = False) -> None:
        """Play one pre-rendered segment (an apology) as a reply of its own.
        ``record_heard``: the context holds its words (the greeting), cut as a reply's are."""
        async def one() -> Any:
            yield segment

        await self._play_segments(turn, one(), record_heard=record_heard)

    async def _play_segments(self, turn: Turn, segments: Any, record_heard: bool) -> None:
        tl = turn.timeline

        async def send_frame(frame: bytes) -> None:
            if not tl.answered:
                if not tl.has("first_audio"):
                    tl.mark("first_audio")
                if playing is not None and playing.source != "filler":
                    tl.answered = True
            await self._out.send_audio(frame)

        encoding = turn.encoding
        playout = Playout(send_frame, self._sample_rate, self._frame_ms, self._lead_ms,
                          encoding, clock=self._clock, chunk_ms=self._chunk_ms)
        self._playout, self._frozen_heard_ms, self._ended = playout, None, None
        if self._confirms is not None:
            self._confirms.reply_started(tl.turn)
        # Optional (Twilio's): the audio sent so far is all out, more may not follow soon
        # (a segment's end, the last frame): the far end is asked to confirm it whole.
        all_sent = getattr(self._confirms, "reply_audio_sent", None)
        spoken: list[Spoken] = []
        # Not rate // 1000: at 22050 Hz a ms is 44.1 bytes (44 read a sentence 0.23% long).
        bytes_per_ms = self._sample_rate * SAMPLE_WIDTH[encoding] / 1000
        playing: ReplySegment | None = None
        try:
            async with contextlib.aclosing(segments) as replies:
                async for segment in replies:
                    if segment.source == "handoff" and not turn.can_hand_off:
                        reason = segment.info.get("reason", "")
                        if segment.error is not None:
                            raise HandoffUnavailable(segment.error,
                                                     f"{reason} (the line cannot hand off)")
                        # A handoff asked for (a ``handoff`` intent, the handoff key, no LLM
                        # to ask) promises a colleague the line cannot reach too: the caller
                        # hears so instead, no `handoff` event, no transfer. The call counts
                        # it (tl.info's ``handoff_unavailable``, ``Call._answer``).
                        tl.info["handoff_unavailable"] = reason
                        segment = self._responder.apology(turn, "handoff_unavailable")
                    if segment.error is not None and self._report is not None:
                        # Reported before its audio: counted even if the caller cuts it off.
                        await self._report(segment.error, segment.info.get("reason", ""), tl.turn)
                    async with contextlib.aclosing(segment.audio) as audio:  # type: ignore
                        # Announced with its first audio: a sentence whose synthesis
                        # fails is never announced as said.
                        chunk = await _tts(anext(audio, None))
                        # Not while held: words may yet stop this reply, and then this
                        # segment was never said (nor a handoff it carries decided).
                        await playout.wait_until_open()
                        await self._announce(turn, segment)
                        # Filler, handoff and apology phrases are not the assistant's
                        # words; the greeting is (the context holds it, to be cut).
                        said = segment.text if segment.source in _SAID else ""
                        if said:
                            self._note_said(tl.turn, said)
                        spoken.append((said, playout.sent_ms, float("inf")))
                        playing = segment
                        while chunk is not None:
                            await playout.write(chunk)
                            chunk = await _tts(anext(audio, None))
                    spoken[-1] = (said, spoken[-1][1], playout.sent_ms)
                    if all_sent is not None:
                        all_sent()
            await playout.flush(all_sent)
        except Exception as exc:
            # Half an answer is no draft for the FAQ (a promotion would publish it as is).
            self._unsay(tl.turn)
            # The agent wrote every sentence it made; the caller gets what was sent before
            # the failure (then the apology): the context keeps only that. Failed under a
            # hold, what the interrupt said was heard: the client dropped the rest, and
            # nothing of this reply is played again (words stop it; noise resumes into the
            # apology).
            if record_heard:
                sent = playout.sent_ms
                heard = sent if self._frozen_heard_ms is None else min(self._frozen_heard_ms,
                                                                       sent)
                _end_cut_sentence(spoken, playing, bytes_per_ms)
                if spoken and spoken[-1][2] == float("inf"):  # its length unknown (streamed):
                    spoken[-1] = ("", spoken[-1][1], sent)  # not said, not kept
                turn.conversation.record_heard(heard_text(spoken, heard, sent))
            if isinstance(exc, StageFailed):
                raise
            if isinstance(exc, ProviderError):  # the LLM broke off an answer under way
                raise StageFailed("llm_failed", f"the LLM failed mid-reply: {exc}") from exc
            # the responder itself (agent, tools) broke
            raise StageFailed("reply_failed", f"the reply failed: {type(exc).__name__}: "
                                              f"{exc}") from exc
        except asyncio.CancelledError:
            # The generators above are closed by now, so the agent has written its
            # message; cut it to what the caller heard.
            heard_ms = self.heard_ms()
            tl.info.update(interrupted=True, heard_ms=round(heard_ms, 1))
            _end_cut_sentence(spoken, playing, bytes_per_ms)
            if record_heard:
                turn.conversation.record_heard(heard_text(spoken, heard_ms, playout.sent_ms))
            raise
        finally:
            # The turn's last reply ends it: the apology after a failed one (whose end,
            # marked first, came before the apology's first frame) overwrites that. One
            # that ends frozen (a barge-in; a failure under its hold) played its last frame
            # at the freeze, not now: words confirming a hold end it seconds later, the
            # agent's streams closing a moment later.
            tl.mark("reply_end", None if self._frozen_heard_ms is None else self._frozen_at,
                    overwrite=True)
            # The turn's replies together (an answer that failed, then its apology).
            info = tl.info
            info["frames_sent"] = info.get("frames_sent", 0) + playout.frames_sent
            info["frames_late"] = info.get("frames_late", 0) + playout.frames_late
            info["frame_lag_max_ms"] = max(info.get("frame_lag_max_ms", 0.0),
                                           round(playout.max_lag_ms, 1))
            self._playout = None
            if self._frozen_heard_ms is None:  # not stopped: a barge-in now stops all of it
                self._ended = (tl.turn, playout)
            # Optional (the recorder's): a barge-in from now on stops a reply not begun,
            # and cuts nothing of this one.
            ended = getattr(self._confirms, "reply_ended", None)
            if ended is not None:
                ended()
        tl.info.setdefault("interrupted", False)

    def _note_said(self, turn: int, text: str) -> None:
        if self._said[0] != turn:
            self._said = (turn, [])
        self._said[1].append(text)

    def _unsay(self, turn: int) -> None:
        if self._said[0] == turn:
            self._said = (turn, [])

    async def _announce(self, turn: Turn, segment: ReplySegment) -> None:
        tl = turn.timeline
        # The turn's source is what answered it; a filler only bridged the wait.
        if segment.source != "filler" or "source" not in tl.info:
            tl.info["source"] = segment.source
        if segment.event:
            if segment.event.get("type") == "handoff":  # the call transfers once it played
                tl.info["handoff"] = segment.event.get("reason", "")
            await self._out.send_event({**segment.event, "turn": tl.turn})
        await self._out.send_event({"type": "response", "turn": tl.turn,
                                    "source": segment.source, "text": segment.text,
                                    "entry_id": segment.entry_id})


async def _tts(next_chunk: Awaitable[bytes | None]) -> bytes | None:
    """The next chunk of a segment's audio; a synthesis failure is a ``tts_failed``."""
    try:
        return await next_chunk
    except Exception as exc:
        raise StageFailed("tts_failed", f"text to speech failed: {exc}") from exc


def _end_cut_sentence(spoken: list[Spoken], playing: ReplySegment | None,
                      bytes_per_ms: float) -> None:
    """The sentence cut short (end still ``inf``): its words spread over its whole audio,
    as far as it is known, so only the words of the part sent count as said."""
    total = playing.total_bytes() if playing is not None else None
    if spoken and spoken[-1][2] == float("inf") and total is not None:
        spoken[-1] = (spoken[-1][0], spoken[-1][1], spoken[-1][1] + total / bytes_per_ms)


def heard_text(segments: list[Spoken], heard_ms: float, sent_ms: float) -> str:
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
