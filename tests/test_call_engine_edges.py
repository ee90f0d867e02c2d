"""Call-engine state a review found broken (gateway/call/engine.py, turns.py, reply.py,
agent.py), each driven on the deterministic harness (scripted VAD, word-coded audio, a
manual clock). Every test here failed before its fix; the comments say what went wrong."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import pytest

from gateway.call import Call
from gateway.providers.base import LLMChunk, ProviderError, Transcript
from tests.call_harness import (RATE, WORD_SAMPLES, CallHarness, RecordingOutput,
                                assert_a_stalled_voice_fails_the_turn, tone,
                                voice_that_fails_on_cue)

NOISE = 77  # a sample value that is no word: the recogniser hears nothing in it
LONG_REPLY = " ".join(f"Sentence {i} of a long answer." for i in range(30))


def agent_slow_after_its_first_sentence(h: CallHarness, gap_s: float) -> None:
    """The agent says "Here is the first part.", is silent for ``gap_s``, then says a
    sentence the harness's voice fails to synthesize ("FAIL ...": tts_failed)."""
    llm = h.llm

    async def gap_stream(messages: list[dict[str, Any]],
                         tools: Any = None) -> AsyncIterator[LLMChunk]:
        llm.requests.append([dict(m) for m in messages])
        for word in "Here is the first part.".split():
            await asyncio.sleep(0)
            yield LLMChunk(text=word + " ")
        await h.clock.sleep(gap_s)  # the model is slow to go on
        for word in "FAIL this sentence breaks the voice.".split():
            await asyncio.sleep(0)
            yield LLMChunk(text=word + " ")

    llm.stream = gap_stream  # type: ignore[method-assign]


async def held_answer_then_slow_final(*, words: str | None) -> tuple[CallHarness, float, float]:
    """A long answer plays; the caller barges in (noise, or ``words`` the recogniser
    gives no partial for), stops, and their utterance's final takes 500 ms to decode.
    Before it is decoded they start talking again ("tell me about fees").

    Returns the harness and the clock span of that second utterance's audio."""
    h = CallHarness(decode_s=0.5)
    h.llm.reply = LONG_REPLY
    await h.start()
    stream = h.stt.streams[0]

    async def send_audio_without_partials(pcm16: bytes) -> None:
        stream._buffer += pcm16  # a recogniser that had no partial ready (busy, or remote)

    stream.send_audio = send_audio_without_partials  # type: ignore[method-assign]
    await h.text("tell me everything")
    await h.wait(800)
    assert h.call.speaking
    if words is None:
        await h.feed(tone(450, NOISE))  # a cough, long enough to barge in
    else:
        await h.feed(h.vocabulary.audio(words))
    assert h.output.of("interrupt") and h.call._held is not None  # held, not stopped
    await h.silence(360)  # the utterance's turn ends (300 ms); its final decodes 500 ms
    assert h.call._turns.turns >= 2 and not h.call._turns.in_utterance
    h.llm.reply = "Okay."
    talk_from = h.clock.now()
    await h.say("tell me about fees", then_silence_ms=0)  # 800 ms of words
    talk_to = h.clock.now()
    await h.silence(3000)
    await h.stop()
    return h, talk_from, talk_to


async def test_a_held_answer_is_not_resumed_over_the_caller_who_has_started_talking_again():
    # The cough's final comes back empty while the caller is speaking again: the hold
    # "resumes" the answer into their speech. Their new speech never barged in (its
    # SpeechStarted came while the answer was held: engine.py:337 skips the barge-in),
    # and _settle_hold / _resume_reply (engine.py:780-794, 763-773) do not look at
    # whether the caller is in an utterance now.
    h, talk_from, talk_to = await held_answer_then_slow_final(words=None)
    # 200 ms into the new speech the VAD has long confirmed it (120 ms): no frame after.
    over = [t for t, _ in h.output.frames if talk_from + 0.2 <= t <= talk_to]
    assert over == [], f"{len(over)} reply messages sent while the caller was talking"


async def test_words_said_over_a_held_answer_are_not_answered_over_the_callers_next_words():
    # "no wait please" stops the held answer once its (slow) final arrives: the turn's
    # reply, queued behind the held answer since the turn ended (engine.py:481), then
    # plays while the caller is saying "tell me about fees": that speech's SpeechStarted
    # came while the old answer was held, so nothing barged in on the queued reply.
    h, talk_from, talk_to = await held_answer_then_slow_final(words="no wait please")
    over = [t for t, _ in h.output.frames if talk_from + 0.2 <= t <= talk_to]
    assert over == [], f"{len(over)} reply messages sent while the caller was talking"


async def test_words_said_over_a_held_answer_open_the_next_turn_when_the_caller_goes_on():
    # The bot said nothing in reply to "no wait please" before the caller went on:
    # as everywhere else (docs/architecture.md, "If the caller talks on before the bot
    # has said anything, the unanswered utterance's words open the next turn"), both
    # utterances are one turn, asked once.
    h, _, _ = await held_answer_then_slow_final(words="no wait please")
    assert h.transcripts() == ["no wait please tell me about fees"]


async def test_an_empty_slow_final_does_not_resume_the_answer_over_words_said_after_it():
    # A cough holds the answer; its final takes 1 s (a busy host: no partials either).
    # Before it is in, the caller asks "fees please" and stops. The cough's final then
    # comes back empty: _settle_hold saw the caller silent (not in an utterance) and
    # resumed the old answer, although the question's own final, still decoding, was
    # the one to decide. The answer played on over the question (its settler found the
    # hold over and did nothing), which waited behind the whole rest of it.
    h = CallHarness(decode_s=1.0)
    h.llm.reply = LONG_REPLY
    await h.start()
    stream = h.stt.streams[0]

    async def send_audio_without_partials(pcm16: bytes) -> None:
        stream._buffer += pcm16  # a recogniser that had no partial ready (busy)

    stream.send_audio = send_audio_without_partials  # type: ignore[method-assign]
    await h.text("tell me everything")
    await h.wait(1500)
    assert h.call.speaking
    await h.feed(tone(450, NOISE))  # a cough, long enough to barge in: held
    assert h.call._held is not None
    await h.silence(360)  # its turn ends (300 ms); its final decodes 1 s
    h.llm.reply = "Okay."
    await h.say("fees please", then_silence_ms=400)  # its turn ends before the cough's final
    assert not h.call._turns.in_utterance and h.call._held is not None
    said = len(h.output.of("response"))
    await h.silence(3000)
    await h.stop()
    assert h.output.of("resume") == []
    assert h.transcripts()[-1] == "fees please", h.transcripts()
    assert [e["text"] for e in h.output.of("response")[said:]] == ["Okay."]


async def test_a_stage_failure_while_the_answer_is_held_does_not_play_over_the_caller():
    # The agent's second sentence comes late (a slow LLM); the caller coughs in the gap
    # and the answer is held (its playout open, reply.py:127). The second sentence's
    # synthesis then fails: the apology starts a new playout (reply.py:165 clears the
    # freeze) and plays although the reply is held and the caller is still making noise.
    h = CallHarness()
    agent_slow_after_its_first_sentence(h, 1.0)
    await h.start()
    await h.text("explain my statement")
    await h.wait(600)  # the first sentence (500 ms) has played; the model is silent
    assert h.call.replying and h.output.frames
    await h.feed(tone(800, NOISE))  # a cough in the gap: held after 400 ms
    noise_to = h.clock.now()
    assert h.output.of("interrupt")
    held_at = h.output.interrupted_at[0]
    await h.silence(2000)
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["tts_failed"]  # the failure came
    over = [t for t, _ in h.output.frames if held_at < t <= noise_to]
    assert over == [], f"{len(over)} messages sent while the reply was held"


async def test_a_repeated_question_carried_on_does_not_withdraw_the_answered_one():
    # "when do you open" is asked and answered in full. The caller asks it again; its
    # reply is stopped while the final decodes (before the agent saw it), and the caller
    # goes on "on sunday". The carried words never had an exchange of their own, but
    # Conversation.withdraw_turn(carried) (engine.py:509-512, agent.py:173-184) matches
    # the last exchange by its text alone: the first, fully heard exchange is taken back.
    h = CallHarness(decode_s=0.5)
    h.llm.reply = "We open at nine."
    await h.start()
    await h.say("when do you open", then_silence_ms=1500)
    await h.wait(1500)  # answered in full
    assert [m["content"] for m in h.call.conversation.history] == \
        ["when do you open", "We open at nine."]
    h.llm.reply = "On sunday at ten."
    await h.say("when do you open", then_silence_ms=400)  # the turn ends; final decoding
    await h.say("on sunday", then_silence_ms=2000)  # stops that reply before it ran
    await h.wait(1500)
    await h.stop()
    assert h.transcripts()[-1] == "when do you open on sunday"
    contents = [m["content"] for m in h.call.conversation.history]
    assert contents[:2] == ["when do you open", "We open at nine."], contents


async def test_a_recogniser_that_stops_taking_audio_does_not_freeze_turn_detection():
    # A remote recogniser whose socket died refuses every window (DeepgramStream._check
    # raises its sticky error). TurnDetector.push sends the window before it feeds the
    # segmenter (turns.py:132-133), so the first refused window inside an utterance (or
    # the pre-roll at its start, turns.py:154, after in_utterance was set) leaves the
    # detector in an utterance for good: no turn ever ends, no apology, no barge-in, and
    # the idle watch (busy while in_utterance, engine.py:829-830) never prompts or hangs up.
    h = CallHarness(settings={"idle_prompt_s": 4})
    h.llm.reply = "Okay."
    await h.start()
    await h.say("hello there", then_silence_ms=1500)
    await h.wait(500)
    assert [e["source"] for e in h.output.of("response")] == ["llm"]
    stream = h.stt.streams[0]

    async def refused(pcm16: bytes) -> None:
        raise ProviderError("word-stt", "the live socket was closed by the server")

    def refused_final() -> Any:
        raise ProviderError("word-stt", "the live socket was closed by the server")

    stream.send_audio = refused  # type: ignore[method-assign]
    stream.finalize = refused_final  # type: ignore[method-assign]  # sticky, as Deepgram's
    await h.say("are you still there", then_silence_ms=0)
    await h.wait(12000)  # twelve seconds of silence
    await h.stop()
    assert h.stats.errors["stt_failed"] >= 1  # the failure was seen
    assert not h.call._turns.in_utterance, "the detector is stuck in an utterance"
    sources = [e["source"] for e in h.output.of("response")]
    # the lost turn is apologised for, and the line is watched again (no silent call)
    assert sources == ["llm", "apology", "prompt", "goodbye"], sources


async def test_a_tts_failure_leaves_the_context_with_the_words_the_caller_heard():
    # The second sentence's synthesis fails: the caller hears the first sentence, then
    # the apology. The agent's context keeps all three sentences it generated
    # (agent.py:321 writes every sentence emitted; reply.py:195-205 cuts the context to
    # the heard words only on cancellation, not on StageFailed, reply.py:190-194).
    h = CallHarness()
    h.llm.reply = "Here is the first part. FAIL this sentence breaks the voice. " \
        "And a third sentence here."
    await h.start()
    await h.text("explain my statement")
    await h.wait(3000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response")] == ["llm", "apology"]
    assistant = [m["content"] for m in h.call.conversation.history if m["role"] == "assistant"]
    assert assistant == ["Here is the first part."], assistant


FIRST_OF_TEN = "One two three four five six seven eight nine ten."


async def answer_failing_under_the_words_that_stop_it() -> tuple[CallHarness, dict[str, Any]]:
    """The caller's words hold the answer near the end of its first sentence (ten words,
    1 s), all of it sent (the lead, 300 ms here, runs ahead of the ear); under the hold the
    voice fails on the second sentence; the words are recognised and confirm the hold.
    Returns the harness (the call over) and the `interrupt` event."""
    h = CallHarness(settings={"playout_lead_ms": 300, "turn_continuation_ms": 0})
    h.llm.reply = f"{FIRST_OF_TEN} Then the voice breaks here."
    voice_fails = voice_that_fails_on_cue(h, "Then the voice breaks here.")
    await h.start()
    stream = h.stt.streams[0]

    async def send_audio_without_partials(pcm16: bytes) -> None:
        stream._buffer += pcm16  # no partial ready (a remote recogniser): the final decides

    stream.send_audio = send_audio_without_partials  # type: ignore[method-assign]
    await h.text("explain my statement")
    await h.wait(400)  # the first sentence plays, all of it sent by 700 ms
    await h.feed(h.vocabulary.audio("no wait please"))  # held 400 ms in: the sentence plays on
    (interrupt,) = h.output.of("interrupt")
    assert h.call._held is not None and interrupt["sent_ms"] == 1000
    voice_fails.set()  # the second sentence fails while the answer is held
    await h.clock.settle()
    h.llm.reply = "Okay."
    await h.silence(1500)  # the words end and are recognised: the hold is confirmed
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["tts_failed"]
    assert not h.output.of("resume") and not h.output.of("response", source="apology")
    return h, interrupt


async def test_a_reply_failing_under_a_hold_keeps_only_the_words_the_interrupt_says_were_heard():
    """Review (stop 69): the voice failed while the caller's words held the answer: the
    reply stage cut the agent's context to what was *sent* (all ten words of the first
    sentence), as for a failure the caller hears up to its end. But the client dropped
    what it had not played at the interrupt, and nothing of this reply is played again
    (the words stop it; noise would resume into the apology): the caller heard what the
    interrupt's heard_ms says (seven words), and the context kept three words they never
    heard. Now it keeps those the interrupt says were heard."""
    from tests.call_harness import TTS_MS_PER_WORD

    h, interrupt = await answer_failing_under_the_words_that_stop_it()
    heard_words = int(interrupt["heard_ms"] // TTS_MS_PER_WORD)
    assert 0 < heard_words < 10, interrupt
    assistant = [m["content"] for m in h.call.conversation.history if m["role"] == "assistant"]
    assert assistant[0] == " ".join(FIRST_OF_TEN.split()[:heard_words]), (assistant, interrupt)


async def test_a_reply_failing_under_a_hold_the_words_confirm_is_counted_as_cut_off():
    """Review (stop 69): the same call's first turn was cut off by the caller (an
    `interrupt`, then words), but its turn_metrics had no `interrupted` nor `heard_ms`
    and the stats counted no barge-in: the reply stage marks an interruption only when
    its reply is cancelled, and this one had ended (failed) under the hold before the
    words stopped it, in the apology's wait. It is a barge-in, heard as far as the
    interrupt said."""
    h, interrupt = await answer_failing_under_the_words_that_stop_it()
    first = h.metrics()[0]
    assert first["turn"] == interrupt["turn"] == 1
    assert first.get("interrupted") is True, first
    assert first.get("heard_ms") == interrupt["heard_ms"], first
    assert h.stats.snapshot()["interrupted_turns"] == 1


async def resumed_after_two_coughs() -> CallHarness:
    """A long answer plays; the caller coughs (held), and coughs again before the first
    cough's final is in: the reply queued behind the held answer is cancelled
    (_stop_reply_queued_behind_hold) and, cancelled while the answer is held, it does not
    cancel it (_wait_for_previous) but waits for it. Both finals are empty: the answer
    resumes, with that cancelled reply still waiting behind it and the second cough's
    reply queued behind that one."""
    h = CallHarness(decode_s=0.3)
    h.llm.reply = LONG_REPLY
    await h.start()
    await h.text("tell me everything")
    await h.wait(800)
    assert h.call.speaking
    await h.feed(tone(450, NOISE))  # a cough: held
    assert h.call._held is not None
    await h.silence(360)  # its turn ends; its final decodes (300 ms)
    await h.feed(tone(200, NOISE))  # a second cough before that final is in
    await h.silence(900)  # both finals empty: the answer resumes
    assert h.output.of("resume") and h.call._held is None and h.call.speaking
    await h.wait(500)
    h.llm.reply = "Okay."
    return h


async def test_words_after_a_resumed_answer_stop_it_and_are_answered():
    # The caller then says "stop please" over the resumed answer: the barge-in holds the
    # latest reply (the second cough's, queued), freezes the answer's playout, and the
    # words cancel that reply. _wait_for_previous does not cancel the reply before it
    # (already cancelling: the first cough's), and that one never cancels the answer it
    # waits for: the answer stays frozen for good, every reply queued behind it with it.
    h = await resumed_after_two_coughs()
    before = len(h.output.frames)
    await h.say("stop please", then_silence_ms=600)
    await h.wait(4000)
    stuck = [t.get_name() for t in h.call._reply_tasks]
    await h.stop()
    assert "stop please" in h.transcripts()[-1:], h.transcripts()
    assert [e["text"] for e in h.output.of("response")][-1] == "Okay."
    assert stuck == [], f"replies never over: {stuck}"
    assert len(h.output.frames) > before


async def test_a_text_after_a_resumed_answer_is_answered():
    # The same with a text message: the answer is frozen by _barge_in and never cancelled.
    h = await resumed_after_two_coughs()
    await h.text("cancel that")
    await h.wait(3000)
    stuck = [t.get_name() for t in h.call._reply_tasks]
    await h.stop()
    assert [e["text"] for e in h.output.of("response")][-1] == "Okay.", stuck
    assert stuck == [], f"replies never over: {stuck}"


async def test_a_stage_failure_while_the_reply_queued_behind_it_is_held_does_not_play_over_the_caller():
    # As test_a_stage_failure_while_the_answer_is_held_..., but after one false
    # interruption: the first cough's (empty) turn is queued behind the resumed answer,
    # so the second cough's barge-in holds that queued reply (_barge_in: task is
    # _reply_task), not the answer. The answer's next sentence then fails to synthesize:
    # _until_released (engine.py) waits only when the failing reply is itself _held, so
    # the apology starts a fresh playout (reply.py clears the freeze) and plays over the
    # caller's second cough.
    h = CallHarness()
    agent_slow_after_its_first_sentence(h, 2.0)
    await h.start()
    await h.text("explain my statement")
    await h.wait(600)  # the first sentence (500 ms) has played; the model is silent
    await h.feed(tone(450, NOISE))  # a first cough: held
    await h.silence(400)  # its final is empty: the answer goes on (nothing to play yet)
    assert h.output.of("resume") and h.call._held is None
    await h.feed(tone(800, NOISE))  # a second cough: held again after 400 ms
    noise_to = h.clock.now()
    assert len(h.output.interrupted_at) == 2
    held_at = h.output.interrupted_at[1]
    await h.silence(2000)
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["tts_failed"]  # the failure came
    over = [t for t, _ in h.output.frames if held_at < t <= noise_to]
    assert over == [], f"{len(over)} messages sent while the reply was held"


async def test_a_tts_failure_mid_sentence_keeps_only_the_words_sent_of_that_sentence():
    # The voice fails after the first word of the second sentence (a socket dropped
    # mid-stream): the caller hears "Second" and then the apology. reply.py's StageFailed
    # branch cuts the context at heard = sent = playout.sent_ms, but the failing sentence
    # still has end = inf in `spoken`, which heard_text caps at sent_ms: heard >= end, so
    # the whole sentence counts as heard (the cancel branch spreads its words over its
    # audio; this one does not).
    import numpy as np

    from tests.call_harness import RATE

    h = CallHarness()
    h.llm.reply = "Here is the first part. Second sentence has many words in it here."

    async def synthesize(text: str) -> AsyncIterator[bytes]:
        for index, _ in enumerate(text.split()):
            if text.startswith("Second") and index == 1:
                raise ProviderError("word-tts", "the voice socket dropped mid-sentence")
            yield np.full(RATE // 10, 1000, dtype="<i2").tobytes()

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    await h.start()
    await h.text("explain my statement")
    await h.wait(3000)
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["tts_failed"]
    assistant = [m["content"] for m in h.call.conversation.history if m["role"] == "assistant"]
    assert assistant in (["Here is the first part."], ["Here is the first part. Second"]), \
        assistant


async def test_words_that_confirm_a_held_continuation_are_not_dropped_by_noise_after_them():
    # "i lost my card" is answered (a cached clip); within turn_continuation_ms the caller
    # goes on "while i was abroad" (no partial ready: a remote recogniser), which holds
    # the answer. Their turn ends; its final decodes 500 ms and, before it is in, the
    # caller coughs. The final's words confirm the hold while the caller is in the cough:
    # _confirm_interruption cancels the answer (its words carried, as a continuation,
    # _carry_continues = True) and the reply queued behind it (if_never_ran appends
    # "while i was abroad" to the carry). The cough's turn then joins [cut question,
    # "while i was abroad", ""] and _spoken_turn's noise rule ("continuing and the last
    # utterance has no words: texts = texts[-1:]") keeps only the cough: both the
    # question and the words that went on with it are lost, and the bot says nothing.
    h = CallHarness(decode_s=0.5, faqs={"lost my card": "lost_card"})
    await h.start()
    stream = h.stt.streams[0]

    async def send_audio_without_partials(pcm16: bytes) -> None:
        stream._buffer += pcm16

    stream.send_audio = send_audio_without_partials  # type: ignore[method-assign]
    await h.say("i lost my card", then_silence_ms=850)  # turn ends; answer plays ~+0.5 s
    assert h.call.speaking
    await h.feed(h.vocabulary.audio("while i was abroad"))  # holds the answer
    assert h.output.of("interrupt") and h.call._held is not None
    await h.silence(360)  # its turn ends; its final decodes (500 ms)
    await h.feed(tone(450, NOISE))  # a cough, in an utterance when that final comes
    await h.silence(2500)
    await h.stop()
    asked = " ".join(t for t in h.transcripts())
    assert "while i was abroad" in asked, h.transcripts()


async def test_words_after_three_false_interruptions_cancel_a_failed_answer_before_its_apology():
    # Three coughs, each held and resumed, leave three empty turns' replies queued behind
    # the answer (R1 <- R2 <- R3). Over "stop please now thanks" the answer's next sentence
    # fails to synthesize while R3 is held: the answer waits in _until_released. The words
    # confirm the hold: R3 is cancelled at once and the answer only three links down the
    # queue (R3 -> R2 -> R1 -> answer, one loop step each), but _end_hold releases the
    # answer's wait (shield callback, then its wakeup) in two: it runs _apologize first,
    # announcing the apology and sending its lead frames (no interrupt after them) before
    # R1's cancel reaches it.
    h = CallHarness()
    agent_slow_after_its_first_sentence(h, 3.7)
    await h.start()
    stream = h.stt.streams[0]

    async def send_audio_without_partials(pcm16: bytes) -> None:
        stream._buffer += pcm16

    stream.send_audio = send_audio_without_partials  # type: ignore[method-assign]
    await h.text("explain my statement")
    await h.wait(600)
    for _ in range(3):
        await h.feed(tone(450, NOISE))  # a cough: held
        await h.silence(400)  # its final is empty: resumed
    assert len(h.output.of("resume")) == 3 and h.call._held is None
    await h.say("stop please now thanks", then_silence_ms=0)  # held; the voice fails meanwhile
    errors = [e["code"] for e in h.output.of("error")]
    held = h.call._held is not None
    await h.silence(2000)
    await h.stop()
    assert errors == ["tts_failed"] and held, (errors, held)
    sources = [e["source"] for e in h.output.of("response")]
    assert "apology" not in sources, sources


async def answer_held_behind_a_resumed_cough() -> tuple[CallHarness, Callable[[int], None]]:
    """The answer's first sentence has played and the voice has not yet answered for its
    second. A first cough is held and resumed, which leaves its empty turn's reply queued
    behind the answer; a second barge-in, "stop please now" (no partial: a remote
    recogniser that has none ready), holds that queued reply, which freezes the answer.

    Returns the harness and ``recognise(lag)``: from the caller's next audio frame on, the
    recogniser gives partials; with that frame the voice's error response for the second
    sentence arrives, ``lag`` event-loop steps before the words' first partial."""
    h = CallHarness()
    h.llm.reply = "Here is the first part. Then the voice breaks here."
    voice_fails = voice_that_fails_on_cue(h, "Then the voice breaks here.")
    await h.start()
    stream = h.stt.streams[0]
    partials_from = stream.send_audio
    lags: list[int] = []

    async def send_audio(pcm16: bytes) -> None:
        if not lags:
            stream._buffer += pcm16  # no partial ready
            return
        if not voice_fails.is_set():
            voice_fails.set()
            for _ in range(lags[0]):
                await asyncio.sleep(0)
        await partials_from(pcm16)

    stream.send_audio = send_audio  # type: ignore[method-assign]
    await h.text("explain my statement")
    await h.wait(600)  # the first sentence (400 ms) has played; the second is pending
    await h.feed(tone(450, NOISE))  # a first cough: held
    await h.silence(400)  # its final is empty: the answer goes on (nothing to play yet)
    assert h.output.of("resume") and h.call._held is None
    await h.say("stop please now", then_silence_ms=0)  # holds the cough's queued reply
    assert len(h.output.interrupted_at) == 2 and h.call._held is not None
    h.llm.reply = "Okay."
    return h, lags.append


async def test_a_reply_failing_as_words_confirm_the_hold_on_the_reply_behind_it_sends_no_apology():
    # The answer's voice fails in about the instant the caller's words confirm the hold
    # on the reply queued behind it (their first partial, a few loop steps after the
    # voice's error response). The words cancel the held reply; its cancel reaches the
    # answer one loop step later, down the queue (_wait_for_previous). If the answer's
    # failure reaches _answer in that step, the hold is already over, so _until_released
    # lets it go: _apologize announces the apology and sends its lead frames (80 ms) after
    # the `interrupt`, then the cancel cuts them, with no second `interrupt` to drop them
    # (docs/architecture.md: a reply that fails while a hold is on apologises only if the
    # hold resumes). Tried at every lag of the partial behind the voice's error, 0 to 11
    # loop steps: before the fix, 2 steps sent 4 frames; at the others the cancel came
    # first (0, 1: the failure is never seen) or the answer waited in _until_released.
    failures_seen = 0
    for lag in range(12):
        h, recognise = await answer_held_behind_a_resumed_cough()
        interrupted_at = h.output.interrupted_at[-1]
        recognise(lag)
        await h.say("thanks", then_silence_ms=0)  # the first partial confirms the hold
        over = [t for t, _ in h.output.frames if t >= interrupted_at]
        answer = [e["source"] for e in h.output.of("response", turn=1)]
        failures_seen += bool(h.output.of("error", code="tts_failed"))
        await h.silence(1500)  # the words are answered
        await h.stop()
        assert over == [], f"lag {lag}: {len(over)} messages sent over the caller's words"
        assert answer == ["llm"], (lag, answer)
        assert [e["text"] for e in h.output.of("response", turn=3)] == ["Okay."], lag
        assert h.transcripts()[-1] == "stop please now thanks", (lag, h.transcripts())
    assert failures_seen, "the voice never failed before the answer was cancelled"


async def test_spoken_words_stopped_by_a_typed_message_are_not_asked_with_later_speech():
    # "where is my parcel" ends its turn; while its final decodes (no reply yet) the caller
    # types "hello", which stops that reply before it spoke: its words were carried. The
    # typed turn was answered on its own and the carry stayed, so the next spoken question,
    # seconds later, was asked as "where is my parcel what are your hours" (stale words,
    # a joined text the cache may route wrongly). A typed turn supersedes them.
    h = CallHarness(decode_s=0.5)
    h.llm.reply = "Okay."
    await h.start()
    await h.say("where is my parcel", then_silence_ms=400)  # the turn ends; final decoding
    await h.text("hello")
    await h.wait(3000)
    await h.say("what are your hours", then_silence_ms=1500)
    await h.wait(1500)
    await h.stop()
    asked = [request[-1]["content"] for request in h.llm.requests]
    assert asked == ["hello", "what are your hours"], asked


async def test_spoken_words_stopped_by_a_key_are_not_asked_with_later_speech():
    h = CallHarness(decode_s=0.5, settings={"keypad_pause_s": 1})
    h.llm.reply = "Okay."
    await h.start()
    await h.say("where is my parcel", then_silence_ms=400)
    h.call.feed_dtmf("5")
    h.call.feed_dtmf("#")
    await h.wait(3000)
    await h.say("what are your hours", then_silence_ms=1500)
    await h.wait(1500)
    await h.stop()
    asked = [request[-1]["content"] for request in h.llm.requests]
    assert asked == ["the caller pressed 5", "what are your hours"], asked


async def test_keys_a_stopped_turn_asked_are_not_asked_again_by_the_key_that_stops_it():
    """Review (stop 66): keys asked once were asked twice. The caller keys 4 while saying
    "my account number is": the keys go into that turn, and the agent is asked "the caller
    pressed 4 my account number is" (the exchange written). Before it says a word the caller
    keys 2 and #: the key stops that reply and its keys turn took the carried 4 up again,
    asking "the caller pressed 4 the caller pressed 2" while the stopped exchange, which
    asked the 4 already, stayed in the context: the model read 4 pressed twice (an account
    number 4 4 2). Wanted: the superseded words' exchange is taken back (they are not
    asked, as the docs say), so every key reaches the agent once, in the order pressed."""
    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Okay."
    h.llm.first_token_s = 2.0  # the agent thinks while the caller keys on
    await h.start()
    await h.feed(h.vocabulary.audio("my account"))
    h.call.feed_dtmf("4")
    await h.say("number is", then_silence_ms=600)  # the turn ends; the agent is asked
    assert [r[-1]["content"] for r in h.llm.requests] == [
        "the caller pressed 4 my account number is"]
    h.call.feed_dtmf("2")  # stops the reply before it spoke
    h.call.feed_dtmf("#")
    await h.wait(4000)
    await h.stop()
    asked = [m["content"] for m in h.llm.requests[-1] if m["role"] == "user"]
    assert asked == ["the caller pressed 4 the caller pressed 2"], asked
    assert [e["source"] for e in h.output.of("response")] == ["llm"]


async def test_carried_keys_a_stopped_keypad_turn_asked_are_not_asked_again_by_speech():
    """Review (stop 66), with the test above: a keypad turn that took carried keys up and
    asked them, stopped by the caller's speech before it spoke, handed them back to the
    carry while its exchange, which asked them, stayed in the context: the spoken turn
    asked them again ("the caller pressed 4 the caller pressed 5", then "the caller pressed
    4 hello there"). Wanted: keys a stopped keypad turn asked stay asked, once."""
    h = CallHarness(decode_s=1.0, settings={"keypad_pause_s": 0.5, "idle_prompt_s": 0})
    h.llm.reply = "Okay."
    h.llm.first_token_s = 2.0  # the agent thinks while the caller goes on
    await h.start()
    await h.feed(h.vocabulary.audio("my account"))
    h.call.feed_dtmf("4")  # its pause runs out mid-utterance: carried into the turn
    await h.say("number is one of these", then_silence_ms=500)
    h.call.feed_dtmf("5")  # stops that reply while its final decodes (nothing asked yet)
    await h.wait(800)  # 5's pause runs out: its turn asks the 4 and the 5
    assert [r[-1]["content"] for r in h.llm.requests] == [
        "the caller pressed 4 the caller pressed 5"]
    await h.say("hello there", then_silence_ms=3000)  # stops it before it spoke
    await h.wait(3000)
    await h.stop()
    asked = [m["content"] for m in h.llm.requests[-1] if m["role"] == "user"]
    said = " ".join(asked)
    assert said.count("pressed 4") == 1 and said.count("pressed 5") == 1, asked
    assert asked[-1] == "hello there", asked
    assert [e["source"] for e in h.output.of("response")] == ["llm"]


async def _an_agent_reply(reply: str) -> tuple[CallHarness, AsyncIterator[Any]]:
    """A started call and the responder's segments of one agent turn that says ``reply``
    (nothing plays them: the test takes them itself)."""
    from gateway.timeline import TurnTimeline

    h = CallHarness()
    h.llm.reply = reply
    await h.start()
    turn = h.call._turn(TurnTimeline(99, clock=h.clock), "hello", None)
    return h, h.call._responder._agent_reply(turn)


async def test_a_cancel_while_the_agent_reply_closes_goes_through():
    # Closing the agent's reply cancels its producer and TTS prefetches and awaits them.
    # A cancel of the reply in that very step (a barge-in) was swallowed there
    # (contextlib.suppress around the gather in responder.py): the reply played on, into
    # a playout the barge-in had frozen, for good.
    h, replies = await _an_agent_reply("One sentence here. And another one.")
    await replies.__anext__()  # the first sentence; the producer and its prefetch run on
    closing = asyncio.ensure_future(replies.aclose())
    await asyncio.sleep(0)  # aclose runs into the generator's cleanup, awaiting its tasks
    closing.cancel()  # the reply is cancelled meanwhile
    try:
        await closing
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the cancel was swallowed: the reply would play on")
    assert closing.cancelled()
    await h.stop()


async def test_a_voice_that_stalls_mid_sentence_fails_the_turn_at_the_gap_timeout():
    # The voice sends the sentence's first 100 ms, then nothing, its stream open (a
    # provider stalled mid-stream). Nothing timed that gap: the caller heard silence until
    # the provider's read timeout (ElevenLabs: 30 s) or for good (a voice with none). Now
    # the turn fails when tts_gap_timeout_s (4 s, on the call's clock) passes without
    # audio: tts_failed, the apology then; the stalled stream is closed and the call goes on.
    import numpy as np

    from tests.call_harness import RATE

    h = CallHarness()
    assert h.settings.tts_gap_timeout_s == 4.0
    h.llm.reply = "Our branches open at nine."
    stalled_at: list[float] = []
    closed: list[str] = []

    async def synthesize(text: str) -> AsyncIterator[bytes]:
        try:
            for index, _ in enumerate(text.split()):
                if "nine" in text and index == 1:
                    stalled_at.append(h.clock.now())
                    await asyncio.Event().wait()  # stalled, the connection open
                yield np.full(RATE // 10, 1000, dtype="<i2").tobytes()
        finally:
            closed.append(text)

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    await h.start()
    try:
        await h.text("when do you open")
        assert len(stalled_at) == 1 and h.output.frames  # the first 100 ms went out
        await assert_a_stalled_voice_fails_the_turn(
            h, stalled_at[0], "no audio for 4 s in the middle of a synthesis",
            ["llm", "apology"], meanwhile=lambda: closed == [])  # the stream still open
        assert closed == ["Our branches open at nine."]

        h.llm.reply = "On Saturdays we open at ten."
        await h.wait(1000)
        await h.text("and on saturday")
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["llm", "apology", "llm"]
        assert len(h.output.of("error")) == 1
    finally:
        await h.stop()


async def test_a_voice_that_never_sends_its_first_audio_fails_the_turn_at_the_gap_timeout():
    """Review (stop 60): only a gap after a first chunk was timed (tts_gap_timeout_s); the
    first chunk's wait was the provider's, and Piper (its pool shared with STT decodes)
    has none: a first sentence whose synthesis never started or hung left the caller in
    silence for good, the turn never over. Now the turn fails tts_gap_timeout_s after the
    request: tts_failed, the apology, the stream closed, the call goes on."""
    h = CallHarness()
    h.llm.reply = "Our branches open at nine."
    speak = h.tts.synthesize
    stalled_at: list[float] = []
    closed: list[str] = []

    async def synthesize(text: str) -> AsyncIterator[bytes]:
        if "nine" in text and not stalled_at:
            try:
                stalled_at.append(h.clock.now())
                await asyncio.Event().wait()  # queued behind the pool's decodes, or hung
            finally:
                closed.append(text)
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    await h.start()
    try:
        await h.text("when do you open")
        assert len(stalled_at) == 1 and not h.output.frames
        await assert_a_stalled_voice_fails_the_turn(
            h, stalled_at[0], "no first audio within 4 s", ["apology"],
            meanwhile=lambda: closed == [])
        assert closed == ["Our branches open at nine."]

        await h.wait(1000)
        await h.text("and on saturday")
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
    finally:
        await h.stop()


async def test_a_sentence_whose_synthesis_is_cancelled_by_its_pool_fails_the_turn():
    """Review (stop 60): gateway/responder.py _Prefetched._fill caught ``Exception`` only. A
    sentence's synthesis awaiting pool work that the pool's shutdown cancelled
    (``cancel_futures``: Piper awaited ``run_in_executor`` on the executor STT shares) gets
    a CancelledError nobody sent its task: the fill task ended cancelled with nothing
    queued, and ``audio()`` waited on the queue for good. The reply hung, silent, its turn
    never over. Now it fails as a synthesis does: tts_failed, the apology, the call goes
    on."""
    h = CallHarness()
    h.llm.reply = "Our branches open at nine."
    speak = h.tts.synthesize
    pool_work: list[asyncio.Future[bytes]] = []

    async def synthesize(text: str) -> AsyncIterator[bytes]:
        if "nine" in text and not pool_work:
            work: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            pool_work.append(work)
            yield await work  # as a wrapped pool future: cancelled by the pool, not by us
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    await h.start()
    try:
        await h.text("when do you open")
        assert len(pool_work) == 1 and not h.output.of("response")
        pool_work[0].cancel()  # the pool's shutdown cancels the queued work
        await h.wait(1000)
        errors = h.output.of("error")
        assert [(e["code"], e["turn"]) for e in errors] == [("tts_failed", 1)], \
            f"the reply hung on a cancelled synthesis: {errors}"
        assert [e["source"] for e in h.output.of("response")] == ["apology"]
        assert len(h.metrics()) == 1  # the turn ended

        await h.text("and on saturday")  # the call goes on
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
    finally:
        await h.stop()


async def test_a_prefetched_sentence_whose_fill_is_cancelled_from_outside_fails_its_reader():
    """Review (stop 60): a sentence's fill task cancelled by anything but its reply (which
    cancels it only once it no longer reads) left ``audio()`` waiting for good; its reader
    now gets a failure (tts_failed), as from a synthesis that broke."""
    from gateway.responder import _Prefetched

    async def never() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()
        yield b""

    fetch = _Prefetched(never())
    reader = asyncio.ensure_future(anext(fetch.audio()))
    for _ in range(3):
        await asyncio.sleep(0)
    fetch.task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        assert reader.done(), "the reader waits for good on a cancelled fill"
        with pytest.raises(RuntimeError, match="synthesis was cancelled"):
            reader.result()
    finally:
        reader.cancel()


async def test_a_barge_in_on_a_reply_not_begun_reports_none_of_it_heard():
    # "no wait" stops the answer (its `interrupt` says what was heard of it); their turn
    # ends and its final decodes, nothing of its reply sent, when the caller types. That
    # second `interrupt` said heard_ms of the stopped answer again (the reply stage kept
    # the freeze once that reply was over): more heard than sent (sent_ms 0), in the
    # event, the log and the trace.
    h = CallHarness(decode_s=0.5)
    h.llm.reply = LONG_REPLY
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    await h.say("no wait", then_silence_ms=400)  # the answer stopped; the final decodes
    assert h.call.replying and h.output.of("interrupt")[0]["heard_ms"] > 0
    await h.text("hello")  # stops the reply that has not begun
    second = h.output.of("interrupt")[1]
    assert (second["turn"], second["sent_ms"], second["heard_ms"]) == (2, 0, 0), second
    await h.stop()


class _SlowMetricsOutput(RecordingOutput):
    """turn_metrics recorded at once, then ``drain_s`` of the clock to drain (a socket's
    send)."""

    def __init__(self, clock: Any, drain_s: float = 0.1) -> None:
        super().__init__(clock)
        self._drain_s = drain_s

    async def send_event(self, event: dict[str, Any]) -> None:
        await super().send_event(event)
        if event["type"] == "turn_metrics":
            await self._clock.sleep(self._drain_s)


async def test_a_barge_in_after_the_last_frame_reports_the_whole_reply_heard():
    # The answer plays to its end; its task still runs (its turn_metrics drain) when the
    # caller types. The reply stage had closed that reply's playout, so the `interrupt`
    # said heard_ms 0 (and sent_ms 0) of a reply the caller had heard in full.
    h = CallHarness()
    h.output = _SlowMetricsOutput(h.clock)
    h.call = Call(h.deps, h.output, RATE, call_id="test-call")
    h.llm.reply = "Our branches open at nine."  # 500 ms of speech
    await h.start()
    try:
        await h.text("when do you open")
        for _ in range(100):
            if h.output.of("turn_metrics", turn=1):
                break
            await h.wait(20)
        assert h.call.replying and not h.output.of("turn_metrics", turn=1)[0]["interrupted"]
        await h.text("hello")
        (interrupt,) = h.output.of("interrupt")
        assert (interrupt["turn"], interrupt["heard_ms"], interrupt["sent_ms"]) == \
            (1, 500, 500), interrupt
        await h.wait(1000)
    finally:
        await h.stop()


async def test_noise_that_holds_a_reply_after_its_last_frame_is_resumed():
    # A cough begins as the answer's last frames play; it is confirmed as speech (400 ms)
    # once they have all been sent, the reply's task still ending (its turn_metrics
    # drain): the reply is held, `interrupt` sent. The cough's final holds no words, but
    # ReplyStage.resume found no playout (closed once its last frame played) and
    # _resume_reply said nothing: the client never got its `resume` (client.py counted the
    # answer cut by the caller, the page showed it stopped), and the reply stage stayed
    # frozen until the next reply.
    h = CallHarness()
    h.output = _SlowMetricsOutput(h.clock, drain_s=1.0)
    h.call = Call(h.deps, h.output, RATE, call_id="test-call")
    h.llm.reply = "Our branches open at nine."  # 500 ms of speech
    await h.start()
    try:
        await h.text("when do you open")
        await h.wait(300)
        assert h.call.speaking and not h.output.of("turn_metrics", turn=1)
        await h.feed(tone(450, NOISE))  # confirmed 400 ms in: after the last frame
        (interrupt,) = h.output.of("interrupt")
        assert h.output.of("turn_metrics", turn=1)  # the reply had played out, task ending
        assert h.call._held is not None and (interrupt["turn"], interrupt["sent_ms"]) == \
            (1, 500), interrupt
        await h.silence(600)  # the cough's turn ends; its final holds no words
        assert h.call._held is None
        (resume,) = h.output.of("resume")
        assert (resume["turn"], resume["from_ms"]) == (1, interrupt["heard_ms"]), resume
        assert h.output.events.index(resume) > h.output.events.index(interrupt)
        assert not h.call._reply.held and h.call._reply.heard_ms() == 0.0
        assert h.stats.snapshot()["errors"]["false_interruption"] == 1
        frames = len(h.output.frames)
        await h.wait(1500)
        assert len(h.output.frames) == frames  # nothing of the reply is sent again
        h.llm.reply = "Hello there."
        await h.text("thanks")
        await h.wait(1500)
        assert h.output.of("response", turn=3) and h.output.of("interrupt") == [interrupt]
    finally:
        await h.stop()


async def _harness_whose_next_final(final: str) -> CallHarness:
    """A started call (two cached questions, a partial routed every word) whose next final
    transcript fails (``final`` "failed": stt_failed) or holds no words ("no words")."""
    h = CallHarness(faqs={"opening hours": "hours", "lost card": "card"},
                    settings={"route_step_words": 1})
    await h.start()
    if final == "failed":
        h.stt.fail_finals = 1
    else:
        stream = h.stt.streams[0]
        decode = stream._final

        async def no_words_once(early: Any, snapshot: bytes) -> Transcript:
            stream._final = decode  # type: ignore[method-assign]
            return Transcript(text="", final=True)

        stream._final = no_words_once  # type: ignore[method-assign]
    return h


@pytest.mark.parametrize("final", ["failed", "no words"])
async def test_a_turn_that_never_routes_its_final_leaves_the_next_turns_partials_routed(final):
    # "opening hours please" settles on a cache hit while the caller speaks (two equal hits
    # in a row), then its final transcript fails (stt_failed, the apology) or holds no
    # words (a recogniser's final may drop what its partials heard): the turn never routed
    # a final, where the speculation is reset, so it stayed settled. The next question's
    # partials were all skipped as settled: its routing waited for the end of the turn
    # (route_reused false) instead of being decided while the caller spoke.
    h = await _harness_whose_next_final(final)
    await h.say("opening hours please", then_silence_ms=1500)
    assert [e["code"] for e in h.output.of("error")] == (["stt_failed"] if final == "failed"
                                                          else [])
    assert [text for text, _ in h.router.calls] == ["opening hours", "opening hours please"]
    await h.say("about my lost card", then_silence_ms=1500)
    await h.stop()
    partials = [text for text, urgent in h.router.calls[2:] if not urgent]
    assert partials == ["about my", "about my lost", "about my lost card"], h.router.calls
    _, metrics = h.metrics()  # the first turn's are the next test's
    assert (metrics["entry_id"], metrics["route_reused"]) == ("card", True), metrics


async def test_a_turn_stopped_before_it_routed_its_final_leaves_the_next_partials_routed():
    # "opening hours please" settles on a cache hit while the caller speaks; the turn
    # ends, and while its final decodes the caller talks on: that stops its reply before
    # it routed the final (where the speculation was reset), its words carried. The
    # settled hit stayed, and every partial of the new utterance was skipped as settled.
    h = CallHarness(faqs={"opening hours": "hours", "lost card": "card"}, decode_s=0.5,
                    settings={"route_step_words": 1})
    await h.start()
    await h.say("opening hours please", then_silence_ms=400)  # the turn ended; decoding
    assert h.call.replying and not h.output.of("route")
    assert [text for text, _ in h.router.calls] == ["opening hours", "opening hours please"]
    await h.say("about my lost card", then_silence_ms=1500)
    await h.stop()
    # Routed with the carried words once they are decoded: they open this turn.
    partials = [text.removeprefix("opening hours please ")
                for text, urgent in h.router.calls[2:] if not urgent]
    assert partials == ["about my", "about my lost", "about my lost card"], h.router.calls


async def test_the_partials_of_a_turn_carrying_unanswered_words_are_routed_with_them():
    # The caller goes on while the first question's final decodes: its reply is stopped
    # before it was routed, and its words open the next turn, whose final is routed with
    # them. Its partials were routed without them, so the final never matched one and
    # needed a routing of its own (urgent, cold) as the caller waited. They carry the
    # same words now, and the final reuses the last one's routing.
    h = CallHarness(faqs={"opening hours": "hours"}, decode_s=0.5,
                    settings={"route_step_words": 1, "route_settle_after": 0})
    await h.start()
    await h.say("what are your opening hours", then_silence_ms=400)  # ended; decoding
    assert h.call.replying and not h.output.of("route")
    await h.say("on sunday please", then_silence_ms=1500)
    await h.stop()
    whole = "what are your opening hours on sunday please"
    assert h.transcripts() == [whole]
    (route,) = h.output.of("route")
    assert route["hit"] and route["reused"] is True, (route, h.router.calls)
    assert (whole, False) in h.router.calls and (whole, True) not in h.router.calls
    assert [e["source"] for e in h.output.of("response")] == ["cache"]


async def test_a_typed_message_stopped_before_it_was_routed_leaves_the_next_one_unsettled():
    # Typed partials never started an utterance (only speech did): a message whose turn
    # was stopped before its final was routed (the caller typed on at once) left the hit
    # its partials had settled on, and every partial of the next message was skipped as
    # settled, its final routed at the end. A typed message's first partial starts one.
    h = CallHarness(faqs={"opening hours": "hours"},
                    settings={"route_step_words": 1, "route_settle_after": 2})
    await h.start()
    for partial in ("what are your opening hours", "what are your opening hours please"):
        await h.text(partial, final=False)
    assert h.call._speculation.settled  # two equal hits in a row
    h.call.feed_text("what are your opening hours please", True)
    h.call.feed_text("is it", False)  # stops that turn before it ran: never routed
    await h.clock.settle()
    assert h.output.of("interrupt") and not h.output.of("route")
    for partial in ("is it open", "is it open today"):
        await h.text(partial, final=False)
    await h.text("is it open today")
    await h.wait(500)
    await h.stop()
    partials = [text for text, urgent in h.router.calls[2:] if not urgent]
    assert partials == ["is it", "is it open", "is it open today"], h.router.calls
    (route,) = h.output.of("route")
    assert route["reused"] is True, route


async def test_a_typed_partial_after_a_spoken_turn_starts_an_utterance_of_its_own():
    # A typed message left without its final (the caller spoke instead) left _typing set:
    # only a typed final cleared it. The next typed partial, after a spoken turn stopped
    # before its final was routed (the caller typed on at once), joined the spoken
    # utterance, whose settled hit skipped every partial of the typed message.
    h = CallHarness(faqs={"opening hours": "hours", "lost card": "card"}, decode_s=0.5,
                    settings={"route_step_words": 1, "route_settle_after": 2})
    await h.start()
    await h.text("hello there", final=False)  # never finished: the caller speaks instead
    await h.say("opening hours please", then_silence_ms=400)  # the turn ended; decoding
    assert h.call._speculation.settled and not h.output.of("route")
    for partial in ("about my", "about my lost", "about my lost card"):
        await h.text(partial, final=False)
    await h.text("about my lost card")
    await h.wait(500)
    await h.stop()
    partials = [text for text, urgent in h.router.calls if not urgent]
    assert partials[-3:] == ["about my", "about my lost", "about my lost card"], h.router.calls


def counts(metrics: dict[str, Any]) -> tuple[int, int, int]:
    return (metrics["partials_routed"], metrics["partials_skipped"], metrics["partials_shed"])


@pytest.mark.parametrize("final", ["failed", "no words"])
async def test_a_turn_that_never_routes_its_final_ends_with_its_own_metrics(final):
    # A turn whose final transcript failed (stt_failed: the apology) or held no words (an
    # empty turn) sent no turn_metrics (operators and bench/capacity.py count turns from
    # them), and its partial counts went to the next turn's metrics.
    h = await _harness_whose_next_final(final)
    await h.say("opening hours please", then_silence_ms=1500)
    assert [m["turn"] for m in h.metrics()] == [1], h.metrics()
    first = h.metrics()[0]
    assert first["input"] == "audio" and first["preempted"] is False, first
    assert first["end_of_turn_ms"] is not None and first["route_decided_ms"] is None, first
    assert "intent" not in first and "hit" not in first, first
    # "opening" too short to route, the next two routed, then settled: its own partials.
    assert counts(first) == (2, 1, 0), first
    if final == "failed":  # no transcript, and the apology is its reply
        assert first["final_transcript_ms"] is None and first["source"] == "apology", first
        assert first["first_audio_ms"] is not None and first["reply_ms"] is not None, first
        assert first["interrupted"] is False, first
    else:  # a transcript (empty) and no reply
        assert first["final_transcript_ms"] is not None and "source" not in first, first
        assert first["first_audio_ms"] is None and first["reply_ms"] is None, first
        assert first["empty"] is True, first  # a client waiting for its answer skips it
    await h.say("about my lost card", then_silence_ms=1500)
    await h.stop()
    assert [m["turn"] for m in h.metrics()] == [1, 2], h.metrics()
    second = h.metrics()[1]
    assert second["entry_id"] == "card" and counts(second) == (3, 1, 0), second
    assert "empty" not in second, second
    # Every partial routing is counted once, in the turn it belongs to.
    partials = [text for text, urgent in h.router.calls if not urgent]
    assert sum(m["partials_routed"] for m in h.metrics()) == len(partials), h.router.calls
    # A failed final was a question (a miss, the apology); no words were none.
    assert h.stats.turns == (2 if final == "failed" else 1), h.stats.snapshot()


@pytest.mark.parametrize("final", ["failed", "no words"])
async def test_a_turn_cut_off_before_it_ends_unrouted_still_sends_its_metrics(final):
    # A failed or empty final first resets the speculation, which waits for a partial's
    # routing still under way: the caller going on meanwhile cancels the turn. It still
    # ends with its own metrics (it sent none, and its partial counts went to the next).
    h = await _harness_whose_next_final(final)
    speculation = h.call._speculation
    reset = speculation.reset
    routing_ends = asyncio.Event()
    held: list[bool] = []

    async def reset_after_a_routing_under_way(utterance: int | None = None) -> None:
        if not held:  # the turn's own reset: a routing under way holds it
            held.append(True)
            await routing_ends.wait()
        await reset(utterance)

    speculation.reset = reset_after_a_routing_under_way  # type: ignore[method-assign]
    await h.say("opening hours please", then_silence_ms=1500)
    assert held, "the turn never reset its speculation"
    await h.text("about my lost card")  # the caller goes on while the turn ends
    routing_ends.set()
    await h.wait(1500)
    await h.stop()
    assert [m["turn"] for m in h.metrics()] == [1, 2], h.metrics()
    first, second = h.metrics()
    assert counts(first) == (2, 1, 0) and counts(second)[0] == 0, (first, second)


async def test_a_partial_routing_that_ends_while_the_final_decodes_counts_in_its_turn():
    # The last partial's routing is slow (a busy router) and ends after the turn ended,
    # while its final decodes; the final then reuses it. The turn had taken its partial
    # counts as it began (later partials are the next turn's), so that routing counted in
    # the next turn's metrics, or in none when no turn came (the caller hung up).
    h = CallHarness(faqs={"parcel": "parcel"}, decode_s=0.5)
    router = h.router

    async def busy_for_partials(text: str, urgent: bool) -> Any:
        if not urgent:
            await h.clock.sleep(0.45)
        return await router(text, urgent)

    h.deps.router = busy_for_partials
    h.call = Call(h.deps, h.output, RATE, call_id="test-call")
    await h.start()
    await h.say("where is my parcel", then_silence_ms=1500)
    await h.stop()
    partials = [text for text, urgent in router.calls if not urgent]
    assert partials == ["where is", "where is my parcel"], router.calls
    (metrics,) = h.metrics()
    assert (metrics["entry_id"], metrics["route_reused"]) == ("parcel", True), metrics
    # "where" too short, "where is my" one word on: skipped; both routings its own.
    assert counts(metrics) == (2, 2, 0), metrics


async def test_a_call_cancelled_again_as_it_closes_still_ends_counted_traced_and_recorded(
        tmp_path):
    # At shutdown the server cancels what is left of a connection's handler: a call whose
    # end was under way (its reply tasks being stopped, its recogniser closing) was cut
    # off there, and what came after never ran: the active-calls gauge stayed up for good
    # (`/admin/stats`, Prometheus), the call's trace never ended, its recording was lost.
    h = CallHarness(settings={"record_dir": str(tmp_path)})
    h.llm.reply = "Our branches open at nine."
    await h.start()
    await h.text("when do you open")
    await h.wait(1500)
    closing = asyncio.Event()
    close = h.call._turns.aclose

    async def slow_close() -> None:  # the recogniser's socket, slow to close
        closing.set()
        await asyncio.Event().wait()
        await close()

    h.call._turns.aclose = slow_close
    assert h.deps.stats.active_calls == 1
    h.call.stop()
    await asyncio.wait_for(closing.wait(), 5)
    h._task.cancel()  # the server's cancel, as the call closes
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(h._task, 5)
    for _ in range(500):  # the recording is written on a worker thread
        if list(tmp_path.glob("*.json")):
            break
        await asyncio.sleep(0.01)
    assert h.deps.stats.active_calls == 0
    (wav,) = tmp_path.glob("*.wav")
    assert list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.part"))


async def test_no_more_sentences_are_synthesized_ahead_than_the_prefetch_bound():
    # Review: responder.py says "A prefetched sentence may run this far ahead of playback"
    # (2), but the producer started the next synthesis before it waited for room in a
    # queue of two: three ran ahead, a capped voice's slot and a sentence's cost wasted.
    h, replies = await _an_agent_reply(
        "One is here. Two is here. Three is here. Four is here. Five is here.")
    first = await replies.__anext__()  # the sentence playing; the player stalls on it
    await h.clock.settle(200)
    assert first.text.startswith("One")
    ahead = [t for t in h.tts.spoken if not t.startswith("One")]
    await replies.aclose()
    await h.stop()
    assert len(ahead) <= 2, ahead


async def test_a_partial_queued_before_a_turns_end_is_not_the_next_utterances():
    # Review: the partials loop's only guard was ``self._turns.in_utterance``. Partials
    # of utterance 1 still queued when one audio pass ends its turn and starts the next
    # utterance (a client sending audio in larger chunks, a loaded loop) were read with
    # in_utterance True again: sent to the client as what the caller says now, after the
    # `interrupt` the new speech caused, and offered to the speculation as the new
    # utterance's partials (routed as its speculation).
    h = await CallHarness(faqs={"open": "opening_hours"},
                          settings={"route_step_words": 1}).start()
    asked: list[tuple[str, bool, int]] = []
    h.router.fail = lambda text, urgent: bool(asked.append((text, urgent, len(h.output.events))))
    try:
        first = h.vocabulary.audio("what time do you open")
        gap = bytes(RATE * 1200 // 1000 * 2)  # past turn_continuation_ms: a new utterance
        onset = h.vocabulary.audio("and")[:int(WORD_SAMPLES * 0.8) * 2]  # speech, no word yet
        h.call.feed_audio(first + gap + onset)  # one audio pass
        await h.clock.settle()
        interrupt = next(i for i, e in enumerate(h.output.events) if e["type"] == "interrupt")
        stale_events = [e["text"] for e in h.output.events[interrupt:]
                        if e["type"] == "transcript" and not e["final"]]
        stale_routings = [(t, at) for t, urgent, at in asked if not urgent and at > interrupt]
        assert stale_events == [], f"utterance 1's partials sent after the barge-in: {stale_events}"
        assert stale_routings == [], f"routed as utterance 2's partials: {stale_routings}"
    finally:
        await h.stop()


async def test_a_reply_cut_by_the_end_of_the_call_is_no_barge_in() -> None:
    """Review (stop 59): ``voicegate_barge_ins_total`` is "replies cut off by the caller"
    (docs/operations.md), the rate an operator tunes barge_in_min_speech_ms and
    false_interruption_s by; the bot stopping its own reply (time_limit) is kept out of it
    with ``stopped_by``. A reply still playing when the call ends is cancelled by
    ``Call._close``, and ``ReplyStage`` marks any cancel ``interrupted``: every call that
    ends mid-answer (a caller hanging up, a Twilio stream gone silent, a drain's timeout
    cutting every call) counts as a barge-in, with no `interrupt` ever sent."""
    from tests.call_harness import CallHarness

    h = CallHarness()
    h.llm.reply = " ".join(["word"] * 40)  # 4 s of speech
    await h.start()
    await h.text("tell me everything about my account")
    await h.wait(1000)
    assert h.call.speaking
    await h.stop()  # the caller hangs up mid-answer
    assert h.output.of("interrupt") == [], "no barge-in happened"
    (metrics,) = h.metrics()
    barge_ins = h.stats.prometheus.registry.get_sample_value("voicegate_barge_ins_total")
    assert (h.stats.interrupted_turns, barge_ins) == (0, 0.0), (
        f"the call's end counted as a barge-in: interrupted_turns="
        f"{h.stats.interrupted_turns}, voicegate_barge_ins_total={barge_ins}; "
        f"turn_metrics interrupted={metrics.get('interrupted')} "
        f"stopped_by={metrics.get('stopped_by')}")


async def test_a_callers_barge_in_is_not_recounted_as_the_calls_end_while_its_reply_closes(
) -> None:
    """Review (stop 59, of this session's change): engine.py Call._close: ``stopped_by =
    "call_end"`` is set on ``_reply_tl`` whatever stopped that reply. A reply the caller cut
    off (an ``interrupt`` with cause ``dtmf`` went out) whose task is still closing (its LLM
    stream's teardown: ``close_s``) when the call ends, the caller hanging up right after
    the key, is then no barge-in in turn_metrics nor in voicegate_barge_ins_total /
    interrupted_turns (stats.barged_in). Only a reply not yet stopped (no barge-in under
    way: ``_reply.live``, not already frozen/cancelling) should be marked."""
    from tests.call_harness import CallHarness

    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "This is one sentence of many. " * 10  # 6 s of speech
    h.llm.close_s = 1.0  # an HTTP stream's teardown after a cancel
    await h.start()
    await h.text("tell me everything about my account")
    await h.wait(1000)
    assert h.call.speaking
    h.call.feed_dtmf("1")  # the caller cuts the reply off with a key
    await h.clock.settle()
    assert [e.get("cause") for e in h.output.of("interrupt")] == ["dtmf"]
    await h.stop()  # and hangs up while the cut reply's LLM stream still closes
    first = [m for m in h.metrics() if m.get("turn") == 1]
    barge_ins = h.stats.prometheus.registry.get_sample_value("voicegate_barge_ins_total")
    assert first and first[0].get("interrupted") is True, first
    assert (h.stats.interrupted_turns, barge_ins) == (1, 1.0), (
        f"the caller's barge-in (interrupt cause dtmf sent) was counted as the call's end: "
        f"interrupted_turns={h.stats.interrupted_turns}, voicegate_barge_ins_total="
        f"{barge_ins}; turn 1 stopped_by={first[0].get('stopped_by')}")


async def test_keys_pressed_again_before_the_agent_answered_the_first_are_no_barge_in(
) -> None:
    """Review (stop 66): ``voicegate_barge_ins_total`` and ``interrupted_turns`` are "replies
    cut off by the caller". Keys collected for the agent (``1234#``) whose reply is still
    being thought (the LLM's first token not in) when the caller presses more keys make a
    keypad turn whose reply never played a frame; ``ReplyStage`` marks any cancel
    ``interrupted``, and a keypad turn is counted even when stopped (its keys were asked),
    so it was counted as a barge-in though the caller cut nothing off (`interrupt` heard_ms
    0, sent_ms 0). A question stopped so is no turn in the stats at all, so no barge-in
    either: only keypad (and apology) turns inflated the figure. A barge-in is a reply the
    caller cut off once its audio had begun (``first_audio_ms``)."""
    from tests.call_harness import CallHarness

    h = CallHarness(settings={"idle_prompt_s": 0, "keypad_pause_s": 1})
    h.llm.reply = "Thanks, one moment."
    h.llm.first_token_s = 2.0  # the agent thinks
    await h.start()
    for key in "1234#":
        h.call.feed_dtmf(key)
    await h.wait(500)
    for key in "5#":  # more keys before the agent said a word
        h.call.feed_dtmf(key)
    await h.wait(5000)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    assert (interrupt["cause"], interrupt["heard_ms"], interrupt["sent_ms"]) == \
        ("dtmf", 0.0, 0.0), interrupt
    first, second = h.metrics()
    assert first.get("first_audio_ms") is None and first.get("frames_sent") == 0, first
    assert second.get("source") == "llm" and second.get("interrupted") is False, second
    barge_ins = h.stats.prometheus.registry.get_sample_value("voicegate_barge_ins_total")
    assert h.stats.keypad_turns == 2  # the first keys were asked all the same
    assert (h.stats.interrupted_turns, barge_ins) == (0, 0.0), (
        f"a reply that never played was counted as cut off by the caller: "
        f"interrupted_turns={h.stats.interrupted_turns}, voicegate_barge_ins_total="
        f"{barge_ins}; turn 1 interrupted={first.get('interrupted')}")


async def test_an_apology_that_fails_too_is_counted_under_its_own_code() -> None:
    """Review (stop 60): engine.py Call._apologize: when the apology itself fails (prompts
    not pre-rendered and the voice down), it was only logged (``apology_failed``): nothing in
    voicegate_errors_total or /admin/stats said that a caller was left in silence, only the
    reply's tts_failed, which normally comes with an apology. It is counted (and sent, as
    other failures are) under its own code; the call goes on."""
    from gateway.agent import APOLOGY_MESSAGE
    from gateway.audio_bank import AudioBank

    h = CallHarness()
    h.responder._prompts = AudioBank(rates=(RATE,), encoded=())  # nothing pre-rendered
    speak = h.tts.synthesize

    async def voice_down_for_the_apology(text: str) -> AsyncIterator[bytes]:
        if text == APOLOGY_MESSAGE:
            raise ProviderError("word-tts", "the voice service is down")
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = voice_down_for_the_apology  # type: ignore[method-assign]
    h.llm.reply = "FAIL this sentence breaks the voice."
    await h.start()
    await h.text("explain my statement")
    await h.wait(2000)
    h.llm.reply = "Okay."
    await h.text("hello again")
    await h.wait(2000)
    await h.stop()
    assert "apology" not in [e["source"] for e in h.output.of("response")]  # nothing heard
    assert h.stats.errors["tts_failed"] == 1
    counted = h.stats.prometheus.registry.get_sample_value(
        "voicegate_errors_total", {"code": "apology_failed"})
    assert (h.stats.errors["apology_failed"], counted) == (1, 1.0), dict(h.stats.errors)
    assert [(e["code"], e.get("turn")) for e in h.output.of("error")] == \
        [("tts_failed", 1), ("apology_failed", 1)]
    assert h.output.of("response")[-1]["text"] == "Okay."  # the call goes on


async def test_an_apology_the_output_fails_is_counted_and_nothing_more_is_sent() -> None:
    """Review (stop 60), with the test above: an apology that failed in the output (the
    connection) rather than in the voice is counted as apology_failed, and no error event
    is written to that output again."""
    h = CallHarness()
    send_event = h.output.send_event
    failed: list[dict[str, Any]] = []

    async def broken_after_the_failure(event: dict[str, Any]) -> None:
        if failed or event.get("source") == "apology":
            failed.append(event)
            raise ConnectionResetError("the client's connection is gone")
        await send_event(event)

    h.output.send_event = broken_after_the_failure  # type: ignore[method-assign]
    h.llm.reply = "FAIL this sentence breaks the voice."
    await h.start()
    await h.text("explain my statement")
    await h.wait(2000)
    await h.stop()
    assert h.stats.errors["apology_failed"] == 1, dict(h.stats.errors)
    assert [e["code"] for e in h.output.of("error")] == ["tts_failed"]
    assert failed[0]["source"] == "apology", failed
    assert [e for e in failed if e.get("type") == "error"] == [], failed  # none tried


async def test_a_handoff_message_the_caller_stops_leaves_no_transfer_claim_in_the_context():
    """Review (stop 64): the model called transfer_to_person; the caller talked over the
    handoff message ("actually never mind ..."), which stopped it before the transfer was
    made, and the call went on with the bot. The agent's context still answered the call
    with "the caller is being transferred to a person": the next turn's model believed a
    transfer under way (it would tell the caller to hold for a colleague nobody was
    calling). The tool's result now says the transfer was not made."""
    from gateway.providers.base import ToolCall
    h = CallHarness()
    h.llm.tool_calls = [ToolCall("c1", "transfer_to_person", '{"reason": "asked"}')]
    await h.start()
    await h.text("can I talk to a person")
    await h.wait(100)  # the handoff message plays (300 ms)
    assert [e["source"] for e in h.output.of("response")] == ["handoff"]
    h.llm.reply = "Sure."
    await h.text("actually never mind, what are your hours")
    await h.wait(1500)
    await h.stop()
    assert h.output.of("interrupt"), "the handoff message was not stopped"
    request = h.llm.requests[-1]
    results = [m["content"] for m in request if m["role"] == "tool"]
    assert len(results) == 1, request
    assert "being transferred" not in results[0], results
    assert "not transferred" in results[0], results


@pytest.mark.parametrize("first_token_s", [0.0, 1.0])
async def test_keys_pressed_after_the_words_end_follow_them_whole(first_token_s):
    """Review (stop 68): the caller says "my account number is" and keys the number in the
    silence after it, a key every half second. The words read unfinished, so their turn
    ended after the long silence (1.2 s), with two keys pressed: those went with the words,
    before them ("the caller pressed 4 9 my account number is"), the agent answered
    that, the next key stopped the answer, and the rest of the number was a turn of its own
    ("the caller pressed 2 1 7 7 8 8"): the number split in two, the words asked after
    keys pressed after them (a slow agent: the words dropped, the two halves asked as
    two). Keys begun after the words' turn fell silent are waited for: one turn, the words
    then the whole number, one reply."""
    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0}, early_finals=True)
    h.llm.first_token_s = first_token_s
    h.llm.reply = "Thank you."
    await h.start()
    await h.say("my account number is", then_silence_ms=400)
    for key in "49217788":
        h.call.feed_dtmf(key)
        await h.wait(500)
    await h.wait(5000)
    await h.stop()
    asked = [[m["content"] for m in r if m["role"] == "user"][-1] for r in h.llm.requests]
    assert asked == ["my account number is the caller pressed 4 9 2 1 7 7 8 8"], asked
    assert [(e["keys"], e["turn"]) for e in h.output.of("keypad")] == [("49217788", 1)]
    assert h.output.of("interrupt") == []
    assert [e["source"] for e in h.output.of("response")] == ["llm"]
    # The keys stay the agent's alone: the turn's transcript and routing hold the words.
    assert h.transcripts() == ["my account number is"]
    assert not any("pressed" in text for text, _ in h.router.calls), h.router.calls


async def test_keys_whose_pause_runs_out_as_the_words_after_them_decode_open_their_turn():
    """Review (stop 70): the caller keys "4 9", then says "I do not have the rest". Keys still
    being collected as those words' turn ends go with the words, keys first, one reply
    (``_keys_for``). But with a slow final (a busy recogniser: 2 s) the keypad pause ran out
    while the words were still decoding: the keys became a turn of their own, queued behind
    the words' turn, so the caller heard the answer to "I do not have the rest" and then a
    second answer to "the caller pressed 4 9", the number asked apart from the words it was
    for. The keys now wait for the turn whose words are decoding, and open it."""
    h = CallHarness(decode_s=2.0, settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Thank you."
    await h.start()
    h.call.feed_dtmf("4")
    h.call.feed_dtmf("9")
    await h.wait(500)
    await h.say("i do not have the rest", then_silence_ms=6000)
    await h.stop()
    asked = [[m["content"] for m in r if m["role"] == "user"][-1] for r in h.llm.requests]
    assert asked == ["the caller pressed 4 9 i do not have the rest"], asked
    [keypad] = h.output.of("keypad")
    assert (keypad["keys"], keypad["turn"]) == ("49", 1), keypad
    assert [(e["source"], e["turn"]) for e in h.output.of("response")] == [("llm", 1)]
    assert h.transcripts() == ["i do not have the rest"]
    assert [m["turn"] for m in h.metrics()] == [1], h.metrics()



@pytest.mark.parametrize("more", ["#", "21#"])
async def test_a_number_begun_before_the_words_and_ended_as_they_decode_keeps_them(more):
    """Review (stop 70): the caller keys "4 9", says "I do not have the rest", and presses
    `#` (or "2 1 #") while those words are still decoding (0.6 s a final). Keys begun before
    the words go with them, keys first, one reply (``_keys_for``), but that turn only takes
    them once its words are decoded: the key pressed before stopped the turn as a key
    pressed while the agent thinks does (a barge-in), its words were carried, and the number,
    a keypad turn of its own, superseded them: the agent was asked "the caller pressed 4 9"
    alone, and the caller's words were never heard, nor transcribed. Such a key stops
    nothing now, and the `#` waits for the words, as the pause does."""
    h = CallHarness(decode_s=0.6, settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Thank you."
    await h.start()
    h.call.feed_dtmf("4")
    h.call.feed_dtmf("9")
    await h.wait(500)
    await h.say("i do not have the rest", then_silence_ms=400)
    assert h.call.replying and not h.call._turns.in_utterance  # its words decoding
    for key in more:
        h.call.feed_dtmf(key)
        await h.wait(50)
    await h.wait(5000)
    await h.stop()
    keys = "49" + more.rstrip("#")
    asked = [[m["content"] for m in r if m["role"] == "user"][-1] for r in h.llm.requests]
    assert asked == [f"the caller pressed {' '.join(keys)} i do not have the rest"], asked
    assert [(e["keys"], e["turn"]) for e in h.output.of("keypad")] == [(keys, 1)]
    assert h.output.of("interrupt") == []
    assert [e["source"] for e in h.output.of("response")] == ["llm"]
    assert h.transcripts() == ["i do not have the rest"]


async def test_keys_whose_turn_speech_stops_before_it_runs_open_the_next_turn():
    """Review (stop 70): the caller keys "4 9 2 1 #" over an answer (the first key stops it;
    the agent's stream takes a moment to close) and says "is that right" at once. Their
    speech stopped the keys' turn, queued behind the closing answer, before it ran, and the
    number was dropped: never asked, nor carried, though spoken words or a typed message
    stopped so open the next turn. The agent was asked "is that right" alone. The keys now
    open the next spoken turn, before its words, as keys carried into it do."""
    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = LONG_REPLY
    h.llm.close_s = 0.5  # the stopped answer's LLM stream takes this long to close
    await h.start()
    await h.text("tell me everything")
    await h.wait(1000)
    assert h.call.speaking
    for key in "4921#":
        h.call.feed_dtmf(key)
    await h.clock.settle()
    assert [(e["keys"], e["turn"]) for e in h.output.of("keypad")] == [("4921", 2)]
    h.llm.close_s = 0.0  # later streams close at once (the stopped one is closing)
    await h.say("is that right", then_silence_ms=1500)
    await h.wait(2000)
    await h.stop()
    asked = [[m["content"] for m in r if m["role"] == "user"][-1] for r in h.llm.requests]
    assert asked[-1] == "the caller pressed 4 9 2 1 is that right", asked
    assert h.transcripts()[-1] == "is that right"
    assert sorted(m["turn"] for m in h.metrics()) == [1, 3], h.metrics()


@pytest.mark.parametrize("then", ["text", "speech"])
@pytest.mark.parametrize("end", ["#", "pause"])
async def test_a_number_ended_as_the_words_decode_goes_on_with_them_when_they_are_stopped(
        end, then):
    """Review (stop 70): the caller keys "4 9", says "I do not have the rest", and the
    number ends (`#`, or its pause runs out) while those words are still decoding: it waits
    for their turn, which takes it, keys first. But the caller typed a message (or spoke
    on) before those words were decoded: their turn was stopped, its words superseded by
    the message (or carried into the next spoken turn), and the number, left collected,
    became a turn of its own after it: the caller heard the answer to "what is my balance",
    then a second answer to "the caller pressed 4 9". The number goes on with the words it
    waited for, in its place: the message takes it (keys first), as it takes keys carried
    in the words it supersedes, or the next spoken turn asks it before the words."""
    h = CallHarness(decode_s=2.0, settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Thank you."
    await h.start()
    h.call.feed_dtmf("4")
    h.call.feed_dtmf("9")
    await h.wait(500)
    await h.say("i do not have the rest", then_silence_ms=400)
    if end == "#":
        h.call.feed_dtmf("#")
        await h.wait(100)
    else:
        await h.wait(1200)  # the pause ran out; the words decode until 2 s after their end
    assert h.call.replying and h.llm.requests == []  # their turn waits for its words
    if then == "text":
        await h.text("what is my balance")
        await h.wait(6000)
        expected = "the caller pressed 4 9 what is my balance"
    else:
        await h.say("and my name is john", then_silence_ms=6000)
        expected = "the caller pressed 4 9 i do not have the rest and my name is john"
    await h.stop()
    asked = [[m["content"] for m in r if m["role"] == "user"][-1] for r in h.llm.requests]
    assert asked == [expected], asked
    assert [(e["keys"], e["turn"]) for e in h.output.of("keypad")] == [("49", 1)]
    assert [(e["source"], e["turn"]) for e in h.output.of("response")] == [("llm", 2)]
