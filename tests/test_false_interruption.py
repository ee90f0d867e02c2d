"""A barge-in that turns out to be noise resumes the reply where the caller last heard it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.call import Call
from gateway.clock import ManualClock
from tests.call_harness import (RATE, CallHarness, RecordingOutput, frame_number, frame_numbers,
                                tone, voice_that_fails_on_cue)

NOISE = 77  # a sample value that is no word: the recogniser hears nothing in it


@pytest.mark.parametrize("chunk_ms", [20, 80])
async def test_noise_over_a_cached_answer_resumes_it_at_the_last_heard_frame(chunk_ms):
    # With 80 ms messages the heard frame (the 31st) falls inside one: sent again from it.
    h = await CallHarness(faqs={"opening hours": "hours"},
                          settings={"playout_chunk_ms": chunk_ms}).start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(300)  # the answer plays
    await h.feed(tone(450, NOISE))  # a cough: long enough to barge in
    await h.silence(1600)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    (resume,) = h.output.of("resume")
    assert resume["turn"] == interrupt["turn"] and resume["from_ms"] == interrupt["heard_ms"]
    numbers = frame_numbers([f for _, f in h.output.frames])
    restart = next(i for i in range(1, len(numbers)) if numbers[i] <= numbers[i - 1])
    # Frames sent but not heard were dropped by the client: sent again from the heard one.
    assert numbers[restart] == int(interrupt["heard_ms"] // 20) + 1
    assert numbers[restart:] == list(range(numbers[restart], 51))  # none lost, none twice
    assert numbers[-1] == 50  # and the answer played to its end (1 s, 50 frames)
    assert h.stats.snapshot()["errors"]["false_interruption"] == 1
    assert h.call.turns_answered == 1  # the noise was no turn of its own


async def test_words_over_the_answer_stop_it_for_good():
    # Continuation off: these words would otherwise continue the question (they come
    # 300 ms after the turn ended; tests/test_turn_continuation.py).
    h = await CallHarness(faqs={"opening hours": "hours"},
                          settings={"turn_continuation_ms": 0}).start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(300)
    await h.say("no wait a second", then_silence_ms=1500)
    await h.stop()
    assert h.output.of("interrupt") and not h.output.of("resume")
    (first, second) = h.metrics()
    assert first["interrupted"] is True
    assert h.transcripts()[-1] == "no wait a second"


@pytest.mark.parametrize("words", ["no wait a second", None])
async def test_the_reply_time_of_an_answer_the_caller_stops_ends_at_the_interruption(words):
    """Review (stop 69): reply_ms is first reply frame -> last reply frame played, or the
    interruption (docs/protocol.md), and the turn's trace span ends there too. A barge-in
    by speech holds the reply, and the reply stage marked its end only when the task
    ended: once the caller's words had ended and been recognised (here 750 ms after the
    interrupt), or the window had run out over long noise (2 s): no frame had left since
    the interrupt. Its end is now the interruption: the reply played as long as the caller
    heard it."""
    h = await CallHarness(faqs={"opening hours": "hours"}, answer_ms=3000,
                          settings={"turn_continuation_ms": 0}).start()
    stream = h.stt.streams[0]

    async def send_audio_without_partials(pcm16: bytes) -> None:
        stream._buffer += pcm16  # no partial ready (a remote recogniser): the final decides

    stream.send_audio = send_audio_without_partials  # type: ignore[method-assign]
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(300)
    if words is not None:
        await h.say(words, then_silence_ms=1500)
    else:
        await h.feed(tone(2600, NOISE))  # noise past the window: a real interruption
        await h.silence(1000)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    assert not h.output.of("resume")
    metrics = h.metrics()[0]
    assert metrics["interrupted"] is True
    played = (h.output.interrupted_at[0] - h.output.frames[0][0]) * 1000
    assert metrics["reply_ms"] == pytest.approx(played, abs=1.0), (metrics["reply_ms"], played)
    assert metrics["reply_ms"] == pytest.approx(interrupt["heard_ms"], abs=1.0)


async def test_noise_that_goes_on_past_the_window_is_a_real_interruption():
    h = await CallHarness(faqs={"opening hours": "hours"},
                          settings={"false_interruption_s": 0.5}).start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(300)
    await h.feed(tone(1200, NOISE))  # the window ends before the noise does
    await h.silence(1500)
    await h.stop()
    assert h.output.of("interrupt") and not h.output.of("resume")
    assert h.metrics()[0]["interrupted"] is True


@pytest.mark.parametrize("early_finals", [False, True])
async def test_a_cough_whose_final_decodes_past_the_window_resumes_the_answer(early_finals):
    # A busy host: the cough's final takes 2 s. The cough is over long before the window
    # (2 s from the barge-in) is, but its final is not in yet: the window's end took the
    # undecided hold for a real barge-in, stopped the answer for good, and the cough's
    # turn, empty, said nothing: the caller was left in silence.
    h = CallHarness(decode_s=2.0, early_finals=early_finals)
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(30))
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    assert h.call.speaking
    await h.feed(tone(450, NOISE))  # a cough: held after 400 ms
    (held_at,) = h.output.interrupted_at
    await h.silence(2000)  # the window ends; the cough's final is still decoding
    assert h.call._held is not None
    await h.silence(2000)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    (resume,) = h.output.of("resume")
    assert resume["from_ms"] == interrupt["heard_ms"]
    assert [t for t, _ in h.output.frames if t > held_at + 2.5], "the answer never went on"


async def test_with_the_window_off_any_barge_in_stops_the_reply():
    h = await CallHarness(faqs={"opening hours": "hours"},
                          settings={"false_interruption_s": 0}).start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(300)
    await h.feed(tone(450, NOISE))
    await h.silence(1600)
    await h.stop()
    assert h.output.of("interrupt") and not h.output.of("resume")


async def test_a_text_message_during_the_hold_ends_the_reply():
    h = await CallHarness(faqs={"opening hours": "hours"}).start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(300)
    await h.feed(tone(450, NOISE))
    await h.text("thanks that is all")
    await h.silence(1600)
    await h.stop()
    assert not h.output.of("resume")
    assert h.metrics()[0]["interrupted"] is True


async def _answer_whose_voice_fails_on_cue() -> tuple[CallHarness, asyncio.Event]:
    """A two-sentence answer playing (600 ms in), whose voice fails on the second sentence
    once the returned event is set."""
    h = CallHarness()
    h.llm.reply = "Here is the first part. Then the voice breaks here."
    voice_fails = voice_that_fails_on_cue(h, "Then the voice breaks here.")
    await h.start()
    await h.text("explain my statement")
    await h.wait(600)
    return h, voice_fails


async def test_a_reply_failing_while_the_reply_behind_it_is_held_apologises_when_it_resumes():
    # A reply that fails while a hold is on apologises if the hold resumes
    # (docs/architecture.md). Here the answer's voice fails while a cough holds the reply
    # queued behind it; no words come of the cough, so the hold resumes, and the answer,
    # which has nothing left to play, apologises for what it could not say.
    h, voice_fails = await _answer_whose_voice_fails_on_cue()
    await h.feed(tone(450, NOISE))  # a first cough: held
    await h.silence(400)  # resumed
    assert h.output.of("resume") and h.call._held is None
    await h.feed(tone(450, NOISE))  # a second cough: holds the reply queued behind
    assert len(h.output.interrupted_at) == 2 and h.call._held is not None
    voice_fails.set()
    await h.clock.settle()
    assert h.output.of("error", code="tts_failed") and h.call._held is not None
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm"]  # it waits
    await h.silence(400)  # the cough's final is empty: the hold resumes
    await h.wait(3000)
    await h.stop()
    assert h.call._held is None
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm", "apology"]


@pytest.mark.parametrize("held", ["the failing reply", "the reply behind it"])
async def test_a_reply_that_failed_while_held_is_resumed_into_its_apology(held):
    # The caller coughs over an answer (or over the reply queued behind it), and its
    # voice fails while the hold is on. No words came of the cough: the reply goes on,
    # with the apology, and the client is told so as after any false interruption
    # (docs/protocol.md: `resume`, from the interrupt's heard_ms; counted). The failed
    # reply's playout had closed, so nothing was resumed and no `resume` was sent: the
    # apology followed an `interrupt` that nothing had ended.
    h, voice_fails = await _answer_whose_voice_fails_on_cue()
    if held == "the reply behind it":
        await h.feed(tone(450, NOISE))  # a first cough, resumed: an empty turn queued
        await h.silence(400)
        assert len(h.output.of("resume")) == 1 and h.call._held is None
    await h.feed(tone(450, NOISE))  # the cough the voice fails under: held
    assert h.call._held is not None
    voice_fails.set()
    await h.clock.settle()
    assert h.output.of("error", code="tts_failed") and h.call._held is not None
    await h.silence(400)  # the cough's final is empty: the hold resumes
    await h.wait(2000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm", "apology"]
    kinds = [e["type"] for e in h.output.events if e["type"] in ("interrupt", "resume")
             or (e["type"] == "response" and e["source"] == "apology")]
    assert kinds[-3:] == ["interrupt", "resume", "response"], kinds
    interrupt, resume = h.output.of("interrupt")[-1], h.output.of("resume")[-1]
    assert resume["turn"] == interrupt["turn"] and resume["from_ms"] == interrupt["heard_ms"]
    expected = 2 if held == "the reply behind it" else 1
    assert h.stats.snapshot()["errors"]["false_interruption"] == expected


async def _typed_as_the_answer_resumes() -> CallHarness:
    """A cough holds a cached answer (1 s, numbered frames); its final holds no words, so
    the answer resumes, and in that very loop iteration (before the answer's task has run
    again) the caller types, which stops it. The call has ended."""
    h = CallHarness(faqs={"opening hours": "hours"}, decode_s=0.5)
    h.output = _OrderedOutput(h.clock)
    h.call = Call(h.deps, h.output, RATE, call_id="test-call")
    await h.start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(800)  # the answer plays
    await h.feed(tone(450, NOISE))  # held
    assert h.call._held is not None
    await h.silence(360)  # the cough's turn ends; its final decodes (0.5 s)
    (final,) = [f for f in h.call._finals if not f.done()]
    # The text is taken in the iteration after the final's done callbacks: the settler
    # resumes the answer in it, then the text loop stops it.
    final.add_done_callback(lambda _: h.call.feed_text("hello", True))
    await h.silence(1500)
    await h.stop()
    assert len(h.output.of("resume")) == 1, h.output.events
    return h


async def test_no_frame_of_a_resumed_answer_leaves_after_a_barge_in_as_it_resumes():
    # The answer, woken by the resume, went on as if still open and sent its frames after
    # the interrupt that told the client to drop its audio.
    h = await _typed_as_the_answer_resumes()
    stopped = h.output.log.index(("interrupt", "text"))
    late = [n for kind, n in h.output.log[stopped:] if kind == "frame" and n <= 50]
    assert late == [], f"frames of the stopped answer after its interrupt: {late}"


async def test_an_answer_stopped_as_it_resumes_was_heard_up_to_the_resume():
    # Nothing was replayed between the resume and the stop: the caller heard what they had
    # at the cough. The playout counted the time held as heard, so the second interrupt
    # said all of the audio sent was heard (the client had dropped the lead beyond it),
    # and the context kept words the caller never heard.
    h = await _typed_as_the_answer_resumes()
    cough, typed = h.output.of("interrupt")
    (resume,) = h.output.of("resume")
    assert typed["heard_ms"] == cough["heard_ms"] == resume["from_ms"], (cough, typed)
    assert h.metrics()[0]["heard_ms"] == cough["heard_ms"], h.metrics()[0]


class _OrderedOutput(RecordingOutput):
    """Also logs the order in which interrupts (with their cause) and frames (numbered as
    ``numbered_frames`` makes them) leave."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.log: list[tuple[str, object]] = []

    async def send_audio(self, frame: bytes) -> None:
        self.log.append(("frame", frame_number(frame)))
        await super().send_audio(frame)

    async def interrupt(self, event: dict) -> None:
        self.log.append(("interrupt", event["cause"]))
        await super().interrupt(event)


async def test_a_sentence_whose_audio_comes_during_a_hold_is_not_announced_after_the_interrupt():
    # Review: The first sentence has played; the second's synthesis is late. A cough holds the
    # reply (interrupt). The second sentence's audio then arrives: held, none of it
    # leaves, yet its `response` (announced "with its first audio": what the bot said)
    # went to the client after the interrupt, and words then stopped the reply for good:
    # the client shows a sentence the caller never heard.
    h = CallHarness(settings={"turn_continuation_ms": 0})
    h.llm.reply = "Hello there friend. Second sentence comes late."
    speak = h.tts.synthesize
    cue = asyncio.Event()

    async def synthesize(text: str):
        if text.startswith("Second"):
            await cue.wait()
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize
    await h.start()
    await h.text("tell me")
    await h.wait(600)  # the first sentence (300 ms) has played; the second is not there
    assert [e["text"] for e in h.output.of("response")] == ["Hello there friend."]
    await h.feed(tone(450, 77))  # a cough: held
    assert h.call._held is not None and h.output.of("interrupt")
    cue.set()  # the late sentence's audio arrives while held
    await h.clock.settle()
    events = [e["type"] for e in h.output.events]
    after = events[events.index("interrupt"):]
    await h.stop()
    assert "response" not in after, h.output.events[-3:]


async def test_a_handoff_decided_during_a_hold_is_not_sent_after_the_interrupt():
    # Review: A slow LLM: the filler has played, a cough holds the reply, and meanwhile every LLM
    # fails: the agent hands off. The handoff segment is announced while held: the
    # `handoff` event (on the native protocol the transfer's contract) goes out after the
    # interrupt. The caller's words then stop the reply for good, yet the client was told
    # to transfer the call.
    from gateway.agent import Agent

    h = CallHarness(settings={"turn_continuation_ms": 0}, decode_s=1.5)
    h.responder._agent = Agent(h.llm, filler_after_s=0.3)  # type: ignore[arg-type]
    h.llm.first_token_s = 1.6
    h.llm.fail_next = 1
    await h.start()
    await h.text("help me")
    await h.wait(700)  # the filler (300 ms) has played; the LLM is still thinking
    assert [e["source"] for e in h.output.of("response")] == ["filler"]
    await h.feed(tone(450, 77))  # a cough: held
    assert h.call._held is not None and h.output.of("interrupt")
    await h.wait(500)  # the LLM fails meanwhile (t=1.6 s): the agent hands off
    assert h.call._held is not None  # the cough's final is still decoding
    await h.text("no I want to cancel my card")  # words: the interruption is confirmed
    await h.wait(1500)
    events = [e["type"] for e in h.output.events]
    after = events[events.index("interrupt"):]
    await h.stop()
    assert "resume" not in after
    assert "handoff" not in after, after


async def test_a_resumed_reply_cut_by_the_calls_end_is_no_barge_in():
    """Review (stop 59, of this session's change): a reply a cough held, then resumed, was
    remembered as one a barge-in stopped; the call ending under it (the caller hung up)
    then counted a barge-in, where a reply cut by the call's end is ``call_end``."""
    h = await CallHarness(faqs={"opening hours": "hours"}).start()
    await h.say("what are your opening hours", then_silence_ms=300)
    await h.wait(100)  # the answer plays (1 s)
    await h.feed(tone(450, NOISE))  # a cough: long enough to barge in
    for _ in range(40):
        if h.output.of("resume"):
            break
        await h.silence(20)
    assert h.output.of("resume") and h.call.speaking, "the answer resumed and plays on"
    await h.stop()  # the caller hangs up mid-answer
    metrics = [m for m in h.metrics() if m.get("source") == "cache"]
    assert [m.get("stopped_by") for m in metrics] == ["call_end"], h.metrics()
    assert h.stats.interrupted_turns == 0


async def test_a_hold_whose_final_never_comes_ends_in_the_apology():
    """Review (stop 67): the caller spoke over a reply (held), and that utterance's final
    never came (a decode hung). The hold waited for it, the turn's reply queued behind the
    hold, and the line stayed silent for good. ``stt_final_timeout_s`` after the turn
    ended, the hold is a real barge-in and the turn gets the apology."""
    h = CallHarness(settings={"stt_final_timeout_s": 5.0})
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(30))
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    assert h.call.speaking
    h.stt.decode_s = 3600.0  # the next final hangs
    await h.feed(tone(450, NOISE))  # held after 400 ms; its final never comes
    await h.silence(4000)
    assert h.call._held is not None and not h.output.of("error")  # still waited for
    await h.silence(2000)  # 5 s have passed since the turn ended
    await h.stop()
    (error,) = h.output.of("error")
    assert error["code"] == "stt_failed" and "did not come within 5 s" in error["message"]
    assert h.output.of("interrupt") and not h.output.of("resume")
    assert [e["source"] for e in h.output.of("response")][-1] == "apology"
    assert h.stt.decodes_stopped == 1
