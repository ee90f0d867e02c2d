import asyncio

import numpy as np
import pytest

from gateway.clock import ManualClock

from gateway.playout import Playout
from gateway.settings import SUPPORTED_SAMPLE_RATES, Settings
from gateway.call import heard_text
from gateway.call.reply import ReplyStage
from gateway.responder import ReplySegment, Turn
from gateway.timeline import TurnTimeline
from tests.call_harness import RecordingOutput, frame_numbers, numbered_frames


async def test_frames_are_paced_and_padded():
    sent: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()

    async def send(frame: bytes) -> None:
        sent.append((loop.time(), len(frame)))

    playout = Playout(send, 8000, frame_ms=20, lead_ms=0)
    await playout.write(b"\x01\x00" * 1000)  # 125 ms -> 6 whole frames now
    await playout.flush()  # + 1 padded frame
    assert [n for _, n in sent] == [320] * 7
    span = sent[-1][0] - sent[0][0]
    assert span >= 0.11  # 6 frame periods: real time, not a burst
    assert playout.sent_ms == 140


async def test_the_lead_is_sent_at_once_then_frames_follow_the_clock():
    clock = ManualClock()
    sent: list[float] = []

    async def send(frame: bytes) -> None:
        sent.append(round(clock.now() - start, 3))

    start = clock.now()
    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock)
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 10))  # 200 ms
    await clock.advance(0.0)
    # frame 0 at once, frames 1-3 are the 60 ms lead: all four go out at t=0
    assert sent == [0.0] * 4
    assert playout.heard_ms() == 0.0
    await clock.advance(0.05)
    assert playout.heard_ms() == pytest.approx(50.0)
    await clock.advance(0.2)
    await writing
    assert sent == [0.0, 0.0, 0.0, 0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12]
    assert playout.heard_ms() == playout.sent_ms == 200  # never more than was sent


def test_heard_text_cuts_the_segment_being_played():
    segments = [("Our branches open at nine.", 0.0, 1000.0), ("On Saturdays at ten.", 1000.0,
                                                                      float("inf"))]
    assert heard_text(segments, 500.0, 2000.0) == "Our branches"
    assert heard_text(segments, 1500.0, 2000.0) == "Our branches open at nine. On Saturdays"


def chunked_playout() -> tuple[ManualClock, list[tuple[float, int]], Playout]:
    """16 kHz, 20 ms frames, 60 ms lead, 100 ms messages; ``sent`` records (seconds since
    the start, frames in the message) of every message."""
    clock = ManualClock()
    start = clock.now()
    sent: list[tuple[float, int]] = []

    async def send(message: bytes) -> None:
        sent.append((round(clock.now() - start, 3), len(message) // 640))

    return clock, sent, Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock,
                                chunk_ms=100)


async def test_frames_due_together_leave_in_one_message():
    clock, sent, playout = chunked_playout()
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 25))  # 500 ms
    await clock.advance(0.0)
    assert sent == [(0.0, 5)]  # the first chunk at once
    await clock.advance(0.6)
    await writing
    # Each next chunk when its first frame is due (it plays at 100, 200, ... ms) minus
    # the 60 ms lead: the client holds between 60 and 160 ms ahead, never less.
    assert sent == [(0.0, 5), (0.04, 5), (0.14, 5), (0.24, 5), (0.34, 5)]
    assert playout.frames_sent == 25 and playout.heard_ms() == playout.sent_ms == 500


async def test_a_chunk_never_waits_for_audio_that_is_not_there_yet():
    clock, sent, playout = chunked_playout()
    await playout.write(b"\x00" * 640 * 2 + b"\x00" * 100)  # streaming TTS: 2 frames and a bit
    assert sent == [(0.0, 2)]  # the first reply audio goes now, not when 5 frames are in
    await clock.advance(0.03)
    await playout.write(b"\x00" * 540)  # completes the third frame
    assert sent == [(0.0, 2), (0.03, 1)]
    flushing = asyncio.ensure_future(playout.flush())
    await clock.advance(0.1)
    await flushing
    assert playout.frames_sent == 3


async def test_a_hold_and_resume_while_the_producer_is_away_still_replays():
    # The reply waits on its next sentence's synthesis while a cough holds it and the
    # hold ends: the client dropped what it had not played, so the next audio written
    # first sends that again, from the heard frame.
    clock = ManualClock()
    sent: list[bytes] = []

    async def send(message: bytes) -> None:
        sent.append(message)

    audio = numbered_frames(300)  # frames 1..15
    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock, chunk_ms=100)
    writing = asyncio.ensure_future(playout.write(audio[:640 * 10]))
    await clock.advance(0.05)
    await writing  # frames 1-10 sent; the producer is away
    assert playout.hold() == pytest.approx(50.0)  # heard: frames 1, 2 and part of 3
    await clock.advance(0.05)
    assert playout.resume_from(50.0) == 40.0  # the replay starts at frame 3
    writing = asyncio.ensure_future(playout.write(audio[640 * 10:]))
    await clock.advance(0.5)
    await writing
    numbers = frame_numbers(sent)
    assert numbers == list(range(1, 11)) + list(range(3, 16))
    assert playout.sent_ms == 300


async def test_the_lead_sent_at_the_start_is_not_late():
    clock = ManualClock()

    async def send(frame: bytes) -> None:
        pass

    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock)
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 10))
    await clock.advance(0.3)
    await writing
    assert playout.frames_late == 0 and playout.max_lag_ms < 1.0



async def test_a_resume_before_the_flush_replays_at_once_all_the_caller_has_not_heard():
    clock = ManualClock()
    sent: list[int] = []

    async def send(message: bytes) -> None:
        sent.append(len(message) // 640)

    # A 5 s lead: all 150 frames (3 s) leave at once, in 100 ms messages.
    playout = Playout(send, 16000, frame_ms=20, lead_ms=5000, clock=clock, chunk_ms=100)
    await playout.write(b"\x00" * 640 * 150)
    assert playout.hold() == 0.0  # nothing played yet
    # All 150 frames are kept (the lead and two messages' worth, more than 100): the replay
    # starts at frame 0. (Review, stop 69: only the last 100 were, and the caller never
    # heard frames 0-49, a second of the reply.)
    assert playout.resume_from(0.0) == 0.0
    sent.clear()
    flushing = asyncio.ensure_future(playout.flush())
    await clock.advance(0.0)
    assert sum(sent) == 150  # replayed now, not once the old end would have played
    await clock.advance(3.0)  # frames 0-149 play from now: 3 s
    await flushing
    assert playout.sent_ms == 3000


async def test_after_a_stalled_producer_the_caller_has_heard_everything_and_gets_a_lead_again():
    # The TTS stalled for a second mid-reply: the client played all it had and waited.
    # Playout restarts from that silence: what was sent counts as heard (a barge-in now
    # must cut the reply at its real end, not 60 ms earlier), and the new audio is paced
    # as at the start, its lead at once so the client's buffer is not empty again.
    clock = ManualClock()
    sent: list[float] = []

    async def send(frame: bytes) -> None:
        sent.append(round(clock.now() - start, 3))

    start = clock.now()
    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock)
    await playout.write(b"\x00" * 640 * 4)  # 80 ms: all of it leaves at t=0 (frame + lead)
    await clock.advance(1.0)  # the producer stalls; the caller hears the 80 ms, then silence
    assert playout.heard_ms() == pytest.approx(80.0)
    sent.clear()
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 6))  # 120 ms more
    await clock.advance(0.0)
    assert playout.heard_ms() == pytest.approx(80.0)  # never less than before the restart
    assert sent == [1.0] * 4  # the next frame and its 60 ms lead at once
    assert playout.frames_late == 0
    await clock.advance(0.2)
    await writing
    assert sent == [1.0, 1.0, 1.0, 1.0, 1.02, 1.04]
    assert playout.heard_ms() == playout.sent_ms == 200


async def test_a_producer_late_by_less_than_half_a_second_is_not_heard_through_its_gap():
    # The TTS of the next sentence comes 0.4 s late: the client played the 100 ms it had
    # (by t=0.1 s) and then waited in silence. At t=0.4 s the next 200 ms arrive and start
    # playing only now: the caller has heard 100 ms, not 300 (a barge-in now must not
    # keep in the context words the caller never heard).
    clock = ManualClock()

    async def send(frame: bytes) -> None:
        pass

    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock)
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 5))  # 100 ms
    await clock.advance(0.4)
    await writing
    assert playout.heard_ms() == pytest.approx(100.0)  # all of it, then silence
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 10))  # 200 ms, late
    await clock.advance(0.0)
    # Nothing of the new audio has played yet: the caller heard the first 100 ms.
    assert playout.heard_ms() == pytest.approx(100.0)
    writing.cancel()


async def test_an_event_loop_stall_in_a_frames_wait_restarts_the_clock_without_a_burst():
    """Review (stop 67): the event loop stalled (or the clock jumped) while the playout slept
    until a message's time, longer than the lead: the client played all it had and waited in
    silence, as after a late producer. The clock restarts there: one message goes, not two at
    once, and heard_ms counts no silence."""
    clock = ManualClock()
    start = clock.now()
    sent: list[tuple[float, int]] = []

    async def send(message: bytes) -> None:
        sent.append((round(clock.now() - start, 3), len(message) // 640))

    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock, chunk_ms=200)
    writing = asyncio.ensure_future(playout.write(b"\x00" * 640 * 100))  # 2 s
    await clock.advance(0.5)  # messages at 0, 0.14, 0.34; the next is due at 0.54
    assert sent == [(0.0, 10), (0.14, 10), (0.34, 10)]
    clock._now += 1.0  # the loop is blocked for a second: the client plays 600 ms, then waits
    await clock.advance(0.0)  # the sleep ends, at 1.5 s
    assert sent[3:] == [(1.5, 10)], "frames 30-39 and no burst behind them"
    assert playout.heard_ms() == pytest.approx(600.0)  # nothing of them has played yet
    assert playout.frames_late > 0  # the stall is still noted
    await clock.advance(0.1)
    assert playout.heard_ms() == pytest.approx(700.0)
    await clock.advance(0.04)  # 1.64: the next message, the lead ahead of their end
    assert sent[4:] == [(1.64, 10)]
    writing.cancel()


async def test_a_sentence_cut_at_22050_hz_keeps_the_words_the_caller_heard():
    """Review (stop 67): at 22050 Hz a ms of pcm16 is 44.1 bytes, not 44: a sentence cut by
    a barge-in was measured 0.23% longer than its audio, and the context kept fewer words
    than the caller heard (89 of a 10 s, 100-word sentence after 9 s, not 90)."""
    clock = ManualClock()
    rate = 22050
    words = " ".join(f"w{n}" for n in range(100))
    audio = bytes(rate * 2 * 10)  # 10 s: a word every 100 ms

    class OneClip:
        def respond(self, turn: Turn):
            async def once():
                yield audio

            async def segments():
                yield ReplySegment(source="cache", text=words, audio=once(),
                                   total_bytes=lambda: len(audio))
            return segments()

    class Context:
        heard = ""

        def record_heard(self, text: str) -> None:
            self.heard = text

    context = Context()
    stage = ReplyStage(OneClip(), RecordingOutput(clock), rate,  # type: ignore[arg-type]
                       frame_ms=20, lead_ms=60, clock=clock, chunk_ms=200)
    turn = Turn(number=1, text="q", sample_rate=rate, timeline=TurnTimeline(1, clock=clock),
                conversation=context)  # type: ignore[arg-type]
    playing = asyncio.ensure_future(stage.play(turn))
    await clock.advance(9.0)
    assert stage.freeze() == (9000.0, pytest.approx(9200.0, abs=60))  # the barge-in
    playing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await playing
    assert context.heard.split() == words.split()[:90]


async def _play_long_reply(rate: int, frame_ms: int, seconds: float
                           ) -> tuple[list[tuple[float, int]], Playout, float]:
    """Play ``seconds`` of pcm16 at ``rate`` through a Playout with the default lead and
    chunk; returns (seconds since start, bytes) of every message, the playout, and the
    clock time at which the playout said it was done."""
    clock = ManualClock()
    start = clock.now()
    sent: list[tuple[float, int]] = []

    async def send(message: bytes) -> None:
        sent.append((clock.now() - start, len(message)))

    playout = Playout(send, rate, frame_ms=frame_ms, lead_ms=60, clock=clock, chunk_ms=200)
    audio = b"\x01\x00" * int(rate * seconds)
    playing = asyncio.ensure_future(playout.write(audio))
    await clock.advance(seconds + 1.0)
    await playing
    return sent, playout, clock.now() - start


@pytest.mark.parametrize("frame_ms, seconds", [(10, 60.0), (30, 120.0)])
async def test_playout_at_22050_hz_keeps_real_time_over_a_long_reply(frame_ms, seconds):
    # Review: 22050 Hz is a supported native rate and 10/30 ms are allowed frame_ms
    # values, but a frame of them is not a whole number of samples (220.5, 661.5): the
    # playout cut each frame to 220 (661) samples yet paced and counted it as a full
    # frame_ms. Over a 60 s
    # reply (10 ms frames; 120 s with 30 ms) the client is sent ~136 ms (~91 ms) less
    # audio than the time the playout lets pass:
    # once the 60 ms lead is used up it runs dry (the caller hears gaps), and heard_ms
    # says the caller heard audio that does not exist.
    rate = 22050
    assert rate in SUPPORTED_SAMPLE_RATES
    assert frame_ms in Settings.model_fields["frame_ms"].annotation.__args__
    sent, playout, _ = await _play_long_reply(rate, frame_ms, seconds)
    # The client plays from the first message on, back to back: before each message
    # arrives it must still have audio left (lead), never a deficit.
    first_at = sent[0][0]
    received_ms = 0.0
    worst_buffer_ms = float("inf")
    for at, nbytes in sent:
        played_ms = (at - first_at) * 1000.0
        worst_buffer_ms = min(worst_buffer_ms, received_ms - played_ms)
        received_ms += nbytes / 2 / rate * 1000.0
    assert worst_buffer_ms >= 0.0, (
        f"the client ran dry: {-worst_buffer_ms:.1f} ms short of audio before a message")


async def test_playout_sent_ms_is_the_audio_actually_sent_at_22050_hz():
    # sent_ms (and heard_ms, capped by it) decide which words the agent's context keeps
    # on a barge-in: they must measure the audio that left, not frames x frame_ms.
    rate = 22050
    sent, playout, _ = await _play_long_reply(rate, 10, 30.0)
    actual_ms = sum(n for _, n in sent) / 2 / rate * 1000.0
    assert playout.sent_ms == pytest.approx(actual_ms, abs=1.0)
    assert playout.heard_ms() == pytest.approx(actual_ms, abs=1.0)


async def test_a_resume_during_the_last_frames_wait_replays_at_once():
    # Review: a noise barge-in holds the reply while its end plays (flush waits for it);
    # the hold ends with no words shortly after. The replay should leave at the resume, as
    # it does for a resume before the flush, but flush was still sleeping until
    # the *old* end would have played (up to lead + chunk = 260 ms), and only then
    # replays: dead air on the line after the resume, heard_ms frozen meanwhile.
    clock = ManualClock()
    start = clock.now()
    sent: list[tuple[float, list[int]]] = []

    async def send(message: bytes) -> None:
        sent.append((round(clock.now() - start, 3), frame_numbers([message])))

    playout = Playout(send, 16000, frame_ms=20, lead_ms=60, clock=clock, chunk_ms=200)
    async def reply() -> None:
        await playout.write(numbered_frames(1000))  # 1 s: 200 ms messages, paced
        await playout.flush()

    flushing = asyncio.ensure_future(reply())
    await clock.advance(0.75)  # the last message (frames 41-50) left at 0.74
    assert sent[-1] == (0.74, list(range(41, 51)))
    assert playout.hold() == pytest.approx(750.0)  # a cough: frames up to 38 heard
    await clock.advance(0.05)
    resumed_at = round(clock.now() - start, 3)
    assert playout.resume_from(750.0) == 740.0  # the replay starts at frame 38
    await clock.advance(0.0)
    replays = [at for at, numbers in sent if numbers and numbers[0] == 38]
    await clock.advance(1.0)
    await flushing
    assert replays == [resumed_at], (
        f"resumed at {resumed_at} s, replay left at "
        f"{[at for at, numbers in sent if numbers and numbers[0] == 38]}")


async def test_a_resume_replays_from_the_heard_frame_with_short_frames_in_long_messages():
    """Review (stop 69): a resume replays what was sent after the heard frame from the
    sent messages the playout keeps: the last 100 frames, "far more than the lead plus a
    late producer's catch-up". Not with settings the gateway takes: 10 ms frames in 1 s
    messages (up to 106 frames sent ahead of the ear), or a lead of 2 s or more (see
    test_a_resume_before_the_flush_replays_at_once_all_the_caller_has_not_heard). The
    frames after the heard one that were no longer kept were never played again (the
    caller missed 50 ms here), and the replay started later than the `resume` event's
    from_ms said. The playout now keeps the lead and two messages' worth, at least 100
    frames."""
    clock = ManualClock()
    sent: list[bytes] = []

    async def send(message: bytes) -> None:
        sent.append(message)

    frame_ms = 10
    size = 16000 * frame_ms // 1000  # samples a frame
    count = 300
    audio = np.repeat(np.arange(1, count + 1, dtype="<i2"), size).tobytes()  # numbered frames
    playout = Playout(send, 16000, frame_ms=frame_ms, lead_ms=60, clock=clock, chunk_ms=1000)
    writing = asyncio.ensure_future(playout.write(audio))
    await clock.advance(0.95)  # the second message (frames 101-200) left at 0.94
    heard = playout.hold()
    first_unheard = int(heard // frame_ms)  # the frame playing, its number first_unheard + 1
    assert playout.frames_sent - first_unheard > 100  # more sent ahead than 100 frames
    assert playout.resume_from(heard) == first_unheard * frame_ms
    sent.clear()
    await clock.advance(10.0)
    await writing
    replayed = [int(n) for m in sent for n in np.frombuffer(m, dtype="<i2")[::size]]
    assert replayed[:3] == [first_unheard + 1, first_unheard + 2, first_unheard + 3]
