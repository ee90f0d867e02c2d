"""A turn that ended too soon: the caller paused mid-sentence after words that sounded
finished, the bot began to answer, and the caller went on. Their speech stops the reply
and the earlier words open the new turn, which is answered once, whole. Whole calls on
the deterministic harness (manual clock, word-coded audio)."""

from __future__ import annotations

import pytest

from gateway.agent import Agent, Conversation
from gateway.providers.base import ToolCall, ToolSpec
from tests.call_harness import CallHarness, tone

NOISE = 77  # a sample value that is no word (see test_false_interruption)


def user_texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


async def cut_short(h: CallHarness, first: str, rest: str, gap_ms: int) -> None:
    """``first``; the turn ends (300 ms of silence in the harness) and the answer begins;
    ``gap_ms`` after the end of the words the caller says ``rest``."""
    await h.say(first, then_silence_ms=gap_ms)
    await h.say(rest, then_silence_ms=1500)


async def test_words_soon_after_the_turn_ended_continue_it():
    # The router tries its phrases in order: the whole question names the other entry.
    h = await CallHarness(faqs={"abroad": "card_abroad", "lost my card": "lost_card"}).start()
    await cut_short(h, "i lost my card", "while i was abroad", gap_ms=600)
    await h.stop()
    first, second = h.metrics()
    assert first["interrupted"] is True and "continues" not in first
    assert second["continues"] is True
    assert h.transcripts() == ["i lost my card", "i lost my card while i was abroad"]
    # The whole question is routed and answered: the entry it names, not the prefix's.
    assert h.router.calls[-1][0] == "i lost my card while i was abroad"
    assert second["entry_id"] == "card_abroad"
    assert h.stats.snapshot()["continuations"] == 1
    # The agent's context holds the whole question once, not the prefix and its answer.
    assert user_texts(h.call.conversation.history) == ["i lost my card while i was abroad"]


async def test_a_continued_turn_stopped_before_its_answer_is_one_continuation():
    # "i lost my card" is answered and cut by "on the train" (a continuation). That whole
    # question is a miss and the agent is slow; before it says a word the caller goes on
    # "and my wallet": the continued turn's words are carried again into the third turn.
    # _spoken_turn counted a continuation each time a turn opened with the cut words, so
    # the one cut answer counted twice (voicegate_turn_continuations_total).
    h = CallHarness(faqs={"lost my card": "lost_card"})
    h.router.typed_only = lambda text: "train" in text  # the whole question: no spoken hit
    h.llm.reply = "Okay."
    h.llm.first_token_s = 1.5
    await h.start()
    await cut_short(h, "i lost my card", "on the train", gap_ms=600)  # the agent thinks
    await h.say("and my wallet", then_silence_ms=3000)
    await h.stop()
    assert h.transcripts()[-1] == "i lost my card on the train and my wallet"
    assert [e["source"] for e in h.output.of("response")] == ["cache", "llm"]
    assert h.stats.snapshot()["continuations"] == 1


async def test_a_continued_cached_question_ends_on_the_short_silence():
    # "forgot password" is answered at the pause; the caller goes on "how do I reset it".
    # Those words alone are no cached question, the whole is: the pause after them is
    # judged on the whole (early words routed with the carried ones), so the turn ends
    # after the short silence, not the open one (300 ms in the harness).
    h = await CallHarness(faqs={"forgot password": "reset_password"},
                          early_finals=True).start()
    await cut_short(h, "forgot password", "how do i reset it", gap_ms=400)
    await h.stop()
    first, second = h.metrics()
    assert first["end_of_turn"] == "complete" and second["continues"] is True
    assert second["end_of_turn"] == "complete" and second["end_of_turn_ms"] < 250
    assert h.transcripts()[-1] == "forgot password how do i reset it"
    assert second["entry_id"] == "reset_password"
    # Routed once, at the pause; the final found its route made.
    assert [text for text, _ in h.router.calls].count("forgot password how do i reset it") == 1


async def stopped_after_ms(settings: dict, early_finals: bool = True) -> float:
    """How long the caller going on talks over the answer before it stops."""
    h = await CallHarness(faqs={"abroad": "card_abroad", "lost my card": "lost_card"},
                          settings=settings, early_finals=early_finals).start()
    await h.say("i lost my card", then_silence_ms=600)
    assert h.call.speaking  # the answer is playing
    began = h.clock.now()
    await h.say("while i was abroad", then_silence_ms=1500)
    await h.stop()
    first, second = h.metrics()
    assert first["end_of_turn"] == ("complete" if early_finals else "unknown")
    assert second["continues"] is True
    return (h.output.interrupted_at[0] - began) * 1000


async def test_going_on_after_a_turn_ended_early_stops_the_answer_sooner():
    # A turn ended early on its words (a cached question, the short silence) is the one
    # a caller goes on with: the answer stops once it is speech
    # (continuation_min_speech_ms), not after barge_in_min_speech_ms.
    # (The harness delivers a 20 ms frame as it begins: the VAD is sure 40 ms early.)
    soon = await stopped_after_ms({})
    assert 100 <= soon < 200
    slow = await stopped_after_ms({"continuation_min_speech_ms": 400})
    assert 360 <= slow < 460
    # Without a hold to resume from, a false start would lose the answer: the long one.
    assert await stopped_after_ms({"false_interruption_s": 0}) >= 360
    # A turn that ended on the open silence: speech may be a backchannel, the long one.
    assert await stopped_after_ms({}, early_finals=False) >= 360


async def test_a_backchannel_soon_after_an_open_turn_does_not_stop_the_answer():
    h = await CallHarness(faqs={"lost my card": "lost_card"}).start()
    await h.say("i lost my card", then_silence_ms=600)  # ended on the open silence
    assert h.call.speaking
    await h.say("mhm", then_silence_ms=1500)  # 200 ms: shorter than a barge-in
    await h.stop()
    assert not h.output.of("interrupt")
    assert h.metrics()[0]["interrupted"] is False


async def test_the_agent_is_asked_once_with_the_whole_question():
    h = CallHarness(faqs={"lost my card": "lost_card"})
    h.llm.reply = "Which card was it?"
    await h.start()
    await h.say("i lost my card", then_silence_ms=600)
    h.router.faqs.clear()  # the whole question is no FAQ: the agent answers it
    await h.say("and my passport", then_silence_ms=1500)
    await h.stop()
    assert h.metrics()[1]["source"] == "llm"
    (request,) = h.llm.requests
    assert user_texts(request) == ["i lost my card and my passport"]
    assert [m["role"] for m in request] == ["system", "user"]  # the cut answer withdrawn


async def test_speech_after_the_window_is_a_turn_of_its_own():
    h = await CallHarness(faqs={"lost my card": "lost_card"},
                          settings={"turn_continuation_ms": 200}).start()
    await cut_short(h, "i lost my card", "no wait a second", gap_ms=600)
    await h.stop()
    first, second = h.metrics()
    assert first["interrupted"] is True and "continues" not in second
    assert h.transcripts() == ["i lost my card", "no wait a second"]
    assert h.stats.snapshot()["continuations"] == 0


async def test_with_continuation_off_words_start_a_new_turn():
    h = await CallHarness(faqs={"lost my card": "lost_card"},
                          settings={"turn_continuation_ms": 0}).start()
    await cut_short(h, "i lost my card", "while i was abroad", gap_ms=600)
    await h.stop()
    assert h.transcripts() == ["i lost my card", "while i was abroad"]


async def test_noise_soon_after_the_turn_resumes_the_answer_and_carries_nothing():
    h = await CallHarness(faqs={"lost my card": "lost_card", "hours": "hours"}).start()
    await h.say("i lost my card", then_silence_ms=600)
    await h.feed(tone(450, NOISE))  # a cough: held, then resumed
    await h.silence(2500)
    await h.say("what are your hours", then_silence_ms=1500)
    await h.stop()
    assert h.output.of("resume")
    assert h.transcripts()[-1] == "what are your hours"
    assert "continues" not in h.metrics()[-1]
    assert h.stats.snapshot()["continuations"] == 0


async def test_a_text_message_never_continues_a_spoken_turn():
    h = await CallHarness(faqs={"lost my card": "lost_card"}).start()
    await h.say("i lost my card", then_silence_ms=600)
    await h.text("while i was abroad")
    await h.silence(1500)
    await h.stop()
    assert h.metrics()[0]["interrupted"] is True
    assert h.router.calls[-1][0] == "while i was abroad"
    assert "continues" not in h.metrics()[-1]


def test_withdrawing_a_turn_keeps_exchanges_that_called_a_tool():
    conversation = Conversation()
    conversation.add_user("what is my balance")
    asked = conversation.last_user_message()
    conversation.add_assistant("", [ToolCall(id="c1", name="balance", arguments="{}")])
    conversation.add_tool_result(ToolCall(id="c1", name="balance", arguments="{}"), "{}")
    conversation.add_assistant("Your balance")
    before = list(conversation.history)
    assert asked is not None and conversation.withdraw_exchange(asked) is False
    assert conversation.history == before  # the agent must know what its tools did
    conversation.add_user("i lost my card")
    lost = conversation.last_user_message()
    conversation.add_assistant("Sorry to hear")
    assert conversation.withdraw_exchange(asked) is False  # not the last exchange
    # the same words asked again are another exchange: only the one given is taken back
    conversation.add_user("i lost my card")
    again = conversation.last_user_message()
    assert lost is not None and conversation.withdraw_exchange(lost) is False
    assert again is not None and conversation.withdraw_exchange(again) is True
    assert [m["content"] for m in conversation.history][-2:] == ["i lost my card",
                                                                "Sorry to hear"]


async def test_noise_that_outlasts_the_hold_does_not_ask_the_question_again():
    h = await CallHarness(faqs={"lost my card": "lost_card"},
                          settings={"false_interruption_s": 0.5}).start()
    await h.say("i lost my card", then_silence_ms=600)
    await h.feed(tone(1200, NOISE))  # the hold expires: a real interruption, but no words
    await h.silence(1500)
    await h.stop()
    assert h.output.of("interrupt") and not h.output.of("resume")
    assert len(h.output.of("response")) == 1  # the answer is not started over
    assert [text for text, _ in h.router.calls].count("i lost my card") <= 2  # partial + final
    assert h.stats.snapshot()["continuations"] == 0
    assert user_texts(h.call.conversation.history) == ["i lost my card"]


async def test_a_text_message_over_a_held_answer_does_not_carry_the_spoken_turn():
    h = await CallHarness(faqs={"lost my card": "lost_card", "abroad": "card_abroad"}).start()
    await h.say("i lost my card", then_silence_ms=600)
    await h.feed(tone(450, NOISE))  # held
    await h.text("while i was abroad")  # typed: the hold ends, a text turn of its own
    await h.silence(1500)
    await h.stop()
    assert [e.get("entry_id") for e in h.output.of("response")] == ["lost_card", "card_abroad"]
    assert h.stats.snapshot()["continuations"] == 0


async def test_speech_held_then_overtaken_by_a_typed_message_continues_nothing():
    # The speech that stopped the answer goes on into words after the caller typed: those
    # words are a turn of their own, not the spoken question's continuation.
    h = await CallHarness(faqs={"lost my card": "lost_card"}).start()
    await h.say("i lost my card", then_silence_ms=600)
    await h.feed(tone(450, NOISE))  # held
    await h.text("while i was abroad")
    await h.say("at the airport", then_silence_ms=1500)
    await h.stop()
    assert h.router.calls[-1][0] == "at the airport"
    assert "continues" not in h.metrics()[-1]
    assert h.stats.snapshot()["continuations"] == 0


async def _caller_goes_on_while_the_agent_thinks() -> CallHarness:
    h = CallHarness(settings={"turn_continuation_ms": 200})
    h.llm.first_token_s = 3.0
    await h.start()
    await h.say("where is my parcel", then_silence_ms=1000)
    await h.say("and my letter", then_silence_ms=4000)
    await h.stop()
    return h


async def test_words_before_any_answer_are_carried_but_are_no_continuation():
    # The older carry: the bot had said nothing yet (a slow agent), whenever the caller
    # went on. The question is asked once, whole; it is not counted as an early end.
    h = await _caller_goes_on_while_the_agent_thinks()
    assert h.transcripts()[-1] == "where is my parcel and my letter"
    assert "continues" not in h.metrics()[-1]
    assert h.stats.snapshot()["continuations"] == 0
    assert user_texts(h.llm.requests[-1]) == ["where is my parcel and my letter"]


async def test_a_turn_stopped_before_its_answer_spoke_is_no_hit_or_miss():
    # The caller goes on while the agent thinks: the turn ends with its metrics (no
    # source, no reply stages) and its words open the next turn, which asks them. It
    # asked nothing itself: no hit or miss in the stats, nor a missed question of its
    # half of the words (docs/protocol.md: carried words were not asked).
    h = await _caller_goes_on_while_the_agent_thinks()
    first, second = h.metrics()
    assert "source" not in first and first["first_audio_ms"] is None, first
    assert second["source"] == "llm", second
    assert (h.stats.turns, dict(h.stats.outcomes)) == (1, {"miss": 1})
    assert [q.text for q in h.stats.missed_questions()] == \
        ["where is my parcel and my letter"]


async def cut_short_behind_a_filler(uh_ms: int = 400, gap_ms: int = 600,
                                    uhs: int = 1) -> CallHarness:
    """"i lost my card"; the turn ends on its words and the 3 s answer begins; the
    caller's "uh" (``uh_ms`` of noise to the recogniser: no words) comes 0.24 s after
    the turn's end, holds the answer, and it resumes; ``gap_ms`` after the "uh" the
    caller goes on: with the defaults 1.26 s after the turn's end, past the 1 s window,
    0.46 s after the answer resumed. ``uhs``: that many "uh"s, each ``gap_ms`` apart."""
    h = await CallHarness(faqs={"abroad": "card_abroad", "lost my card": "lost_card"},
                          early_finals=True, answer_ms=3000).start()
    await h.say("i lost my card", then_silence_ms=400)
    if uh_ms:
        for _ in range(uhs):
            await h.feed(tone(uh_ms, NOISE))
            await h.silence(gap_ms)
        assert len(h.output.of("resume")) == uhs
    else:
        await h.silence(gap_ms)
    assert h.call.speaking
    began = h.clock.now()
    await h.say("while i was abroad", then_silence_ms=1500)
    await h.stop()
    h.stopped_after_ms = (h.output.interrupted_at[-1] - began) * 1000  # type: ignore
    return h


async def test_a_false_interruption_in_the_window_restarts_it():
    h = await cut_short_behind_a_filler()
    first, second = h.metrics()
    assert first["end_of_turn"] == "complete" and first["interrupted"] is True
    # It stopped the answer once it was speech (continuation_min_speech_ms), as in the
    # window, not after barge_in_min_speech_ms.
    assert h.stopped_after_ms < 200  # type: ignore
    assert second["continues"] is True
    assert h.transcripts()[-1] == "i lost my card while i was abroad"
    assert second["entry_id"] == "card_abroad"
    assert h.stats.snapshot()["continuations"] == 1
    assert user_texts(h.call.conversation.history) == ["i lost my card while i was abroad"]


@pytest.mark.parametrize("uh_ms, gap_ms, uhs", [(0, 1000, 1), (400, 1200, 1), (400, 600, 2)])
async def test_words_past_the_window_or_its_restart_are_a_turn_of_their_own(uh_ms, gap_ms, uhs):
    # As late with no "uh" before them (1.26 s after the turn's end); or 1.06 s after
    # the answer resumed: the restarted window is no longer than the first; or 0.46 s
    # after a second "uh": the window restarts once a turn (on a noisy line every cough
    # would keep it open).
    h = await cut_short_behind_a_filler(uh_ms, gap_ms, uhs)
    assert h.stopped_after_ms > 350  # type: ignore  # the long confirmation
    assert "continues" not in h.metrics()[-1]
    assert h.transcripts()[-1] == "while i was abroad"
    assert h.stats.snapshot()["continuations"] == 0


async def test_speech_after_a_typed_message_does_not_continue_the_turn_the_message_stopped():
    # "tell me about my card" is answered; the caller types "hello", which stops the answer
    # (its LLM stream takes 1 s to close) and queues the typed turn behind it. Speech 0.16 s
    # later, within the spoken turn's window, stops the typed turn. The speech did not stop
    # the answer (the message did: the caller typed on), yet the answer, still closing, was
    # counted among the replies the speech stopped, and the spoken words were asked as
    # "tell me about my card where is my parcel", the answer's exchange withdrawn.
    h = CallHarness()
    h.llm.reply = " ".join(f"Part {i} of the answer is here." for i in range(1, 11))
    h.llm.close_s = 1.0
    await h.start()
    await h.say("tell me about my card", then_silence_ms=400)
    await h.wait(100)
    assert h.call.speaking
    h.llm.reply = "Okay."
    await h.text("hello")
    await h.say("where is my parcel", then_silence_ms=1500)
    await h.wait(3000)
    await h.stop()
    assert [e["cause"] for e in h.output.of("interrupt")] == ["text", "speech"]
    # The message, stopped before it ran, opens the spoken turn (it was never answered:
    # dropped before, nothing was ever said to it).
    assert h.transcripts() == ["tell me about my card", "hello where is my parcel"]
    assert "continues" not in h.metrics()[-1]
    assert h.stats.snapshot()["continuations"] == 0
    assert user_texts(h.llm.requests[-1]) == ["tell me about my card",
                                              "hello where is my parcel"]


async def test_a_typed_message_talked_over_while_the_agent_thinks_opens_the_spoken_turn():
    # As above, but the typed turn had begun (routed, its LLM thinking) when the caller
    # spoke: stopped before it said anything, its words were lost, neither answered nor
    # asked with the speech, as spoken words stopped so are (they open the next turn).
    # A cough over it left the line silent for good.
    h = CallHarness()
    h.llm.first_token_s = 1.0
    await h.start()
    await h.text("hello")
    await h.wait(200)
    assert h.call.replying and h.output.of("route")  # it ran: routed, the agent thinking
    await h.say("where is my parcel", then_silence_ms=1500)
    await h.wait(1000)
    await h.stop()
    assert [e["cause"] for e in h.output.of("interrupt")] == ["speech"]
    assert h.transcripts() == ["hello where is my parcel"]
    assert user_texts(h.llm.requests[-1]) == ["hello where is my parcel"]
    assert user_texts(h.call.conversation.history) == ["hello where is my parcel"]
    # The stopped message asked nothing: no hit or miss of its own.
    assert h.stats.snapshot()["turns"] == 1


async def test_the_pause_after_carried_words_is_judged_lexically_on_the_whole_question():
    # Review (stop 59). "my card number is" waits the long silence (it reads unfinished) and
    # the slow agent is asked; the caller reads "four one two seven" over it, which stops it
    # before it said anything: those words open the next turn, carrying "my card number is".
    # The pause after the first group of digits is judged on the early words alone
    # (TurnDetector.note_transcript gets early.text, not _with_carried_words), and "four one
    # two seven" has no number noun: the open silence (300 ms here), not the long one (1200
    # ms) that "my card number is four one two seven" gets. The turn ends between the groups;
    # the agent is asked with half a card number and the caller, going on with "eight eight
    # three one", must barge in again (with a faster LLM the bot talks over a caller reading
    # out digits). docs: "the pause after them is judged ... with the carried words before
    # them (the whole question)".
    h = CallHarness(early_finals=True)
    h.llm.first_token_s = 3.0
    await h.start()
    await h.say("my card number is", then_silence_ms=1500)  # its turn ends (incomplete)
    await h.say("four one two seven", then_silence_ms=700)  # a reader's pause
    await h.say("eight eight three one", then_silence_ms=2000)
    await h.wait(4000)
    await h.stop()
    second = h.metrics()[1]
    assert second["end_of_turn"] == "incomplete", second
    assert "my card number is four one two seven" not in h.transcripts(), h.transcripts()
    assert h.transcripts()[-1] == "my card number is four one two seven eight eight three one"


async def test_keys_carried_while_a_stopped_reply_closes_are_not_lost():
    # Review (stop 59). "where is my parcel" is a miss; the agent thinks. The caller starts
    # "my order ..." (the reply is held, then stopped by the words) and, still speaking, keys
    # "123#": the keys are carried into the turn the caller's words end (`keypad` event, turn
    # 2). The stopped reply was still closing its LLM stream (close_s): its cancel handling in
    # _spoken_turn then calls _carry_words([its final], ...), which replaces self._carry and
    # drops the keys. Turn 2 is asked without them although the client was told they belong to
    # it. (_typed_turn keeps the carry: [_said(text), *self._carry].)
    h = CallHarness(settings={"turn_continuation_ms": 200})
    h.llm.first_token_s = 3.0
    h.llm.close_s = 1.0  # an HTTP stream's teardown
    await h.start()
    await h.say("where is my parcel", then_silence_ms=1000)
    await h.feed(h.vocabulary.audio("my order"))  # held, then stopped by the words
    for key in "123#":
        h.call.feed_dtmf(key)
        await h.clock.settle()
    await h.feed(h.vocabulary.audio("number is"))
    await h.wait(8000)
    await h.stop()
    assert [(e["turn"], e["keys"]) for e in h.output.of("keypad")] == [(2, "123")]
    asked = user_texts(h.llm.requests[-1])[-1]
    assert "the caller pressed 1 2 3" in asked, asked
    # The keys are the agent's alone: the transcript holds the words (review, stop 61).
    assert h.transcripts()[-1] == "where is my parcel my order number is", h.transcripts()


async def test_words_after_a_filler_alone_open_the_next_turn():
    # Review (stop 59). The agent is slow: the filler ("Let me check that for you.") plays, no
    # answer yet. The caller goes on ("and my letter"). Without the filler the words of the
    # turn are carried (nothing was said: tests/test_turn_continuation.py,
    # test_words_before_any_answer_are_carried_but_are_no_continuation) and the question is
    # asked once, whole. A filler is no answer (reply.py: "Filler, handoff and apology phrases
    # are not the assistant's words"), yet _spoken_turn decides on tl.has("first_audio"),
    # which the filler set: the first half is dropped as a question of its own (a miss, a
    # missed question "where is my parcel"), the second half is routed alone (a cache may hit
    # a fragment: the wrong answer), and the agent gets two user messages in a row.
    h = CallHarness(settings={"turn_continuation_ms": 200})
    h.responder._agent = Agent(h.llm, filler_after_s=0.3)  # type: ignore[arg-type]
    h.llm.first_token_s = 3.0
    await h.start()
    await h.say("where is my parcel", then_silence_ms=1000)
    assert [e["source"] for e in h.output.of("response")] == ["filler"]
    await h.say("and my letter", then_silence_ms=4000)
    await h.stop()
    assert h.transcripts()[-1] == "where is my parcel and my letter", h.transcripts()
    assert user_texts(h.llm.requests[-1]) == ["where is my parcel and my letter"]
    assert [q.text for q in h.stats.missed_questions()] == \
        ["where is my parcel and my letter"]


async def test_a_continued_question_superseded_before_its_answer_leaves_no_exchange():
    """Review (stop 67): a continued turn stopped while the agent thinks, then superseded by
    a typed message, leaves no exchange of its words: the agent is asked the message alone,
    as after any words a message supersedes."""
    # "i lost my card" is answered from the cache and cut by "on the train" (a
    # continuation: that exchange is withdrawn). The whole question is a miss and the agent
    # thinks; the caller types "what are your hours" before it says anything. The words
    # are superseded, but the continued turn's exchange ("i lost my card on the train",
    # asked, nothing heard) was kept as if it held an answer the caller heard: the agent
    # got two user messages in a row, the superseded words among them.
    h = CallHarness(faqs={"lost my card": "lost_card"})
    h.router.typed_only = lambda text: "train" in text  # the whole question: no spoken hit
    h.llm.first_token_s = 1.5
    await h.start()
    await cut_short(h, "i lost my card", "on the train", gap_ms=600)
    assert h.llm.requests and not h.output.of("response", turn=2)  # asked, thinking
    await h.text("what are your hours")
    await h.wait(3000)
    await h.stop()
    assert user_texts(h.llm.requests[-1]) == ["what are your hours"]
    assert user_texts(h.call.conversation.history) == ["what are your hours"]


class _Balance:
    """A tool runner whose every call answers at once."""

    async def run(self, call: ToolCall, clock: object = None) -> tuple[str, bool]:
        return '{"balance": 5}', True


async def test_a_continued_answer_that_called_a_tool_is_not_asked_again():
    """Review (stop 67): a cut answer that called a tool stays in the context (the agent must
    know what its tools did), so the turn that continues it asks the agent the new words
    only: the cut question is not said to it twice. The transcript and routing keep the
    whole question."""
    # Before, the exchange stayed and the whole question was asked after it too: the agent
    # read "what is my balance" twice, the second time as a new question.
    h = CallHarness()
    tools = [ToolSpec("balance", "the caller's balance")]
    h.responder._agent = Agent(h.llm, tools, runner=_Balance(),  # type: ignore[arg-type]
                               filler_after_s=None)
    h.llm.tool_calls = [ToolCall("c1", "balance", "{}")]
    h.llm.reply = "Your balance is five pounds and that is all for now, thank you."
    await h.start()
    await cut_short(h, "what is my balance", "on my savings account", gap_ms=700)
    await h.wait(2000)
    await h.stop()
    assert [e["cause"] for e in h.output.of("interrupt")] == ["speech"]
    assert h.metrics()[-1]["continues"] is True
    assert h.transcripts()[-1] == "what is my balance on my savings account"
    assert h.router.calls[-1][0] == "what is my balance on my savings account"
    assert user_texts(h.llm.requests[-1]) == ["what is my balance", "on my savings account"]
    assert user_texts(h.call.conversation.history) == ["what is my balance",
                                                      "on my savings account"]


async def _keys_over_noise_that_cut_an_answer(h: CallHarness) -> None:
    """A cached question answered, then noise that stops the answer (held, the window runs
    out mid-noise) with "12#" pressed over it."""
    await h.say("i lost my card", then_silence_ms=600)
    await h.feed(tone(900, NOISE))  # held, then stopped: the window ran out mid-noise
    assert h.call._held is None and h.call._turns.in_utterance
    for key in "12#":
        h.call.feed_dtmf(key)
        await h.clock.settle()
    await h.feed(tone(500, NOISE))


async def test_keys_over_noise_that_cut_an_answer_do_not_ask_the_cut_question_again():
    """Review (stop 67): keys pressed during noise that stopped an answer soon after its
    turn ended are no words: the cut question is not asked (nor answered) again, its heard
    exchange stays, and the keys alone are the turn's, asked of the agent."""
    # The noise outlasts the hold (a real stop) and began within the continuation window,
    # so the cut question is carried; "12#" mid-noise is carried into the noise's turn.
    # The keys' text counted as words after the cut question: "i lost my card" was asked
    # again with the keys, answered from the cache a second time (the keys never reached
    # the agent), counted as a continuation, and the heard answer withdrawn.
    h = CallHarness(faqs={"lost my card": "lost_card"}, settings={"false_interruption_s": 0.5})
    await h.start()
    await _keys_over_noise_that_cut_an_answer(h)
    await h.wait(2000)
    await h.stop()
    assert [(e["turn"], e["keys"]) for e in h.output.of("keypad")] == [(2, "12")]
    assert [e["source"] for e in h.output.of("response")] == ["cache", "llm"]
    assert user_texts(h.llm.requests[-1]) == ["i lost my card", "the caller pressed 1 2"]
    assert h.stats.snapshot()["continuations"] == 0
    assert "continues" not in h.metrics()[-1]


async def test_words_after_a_keys_only_turn_stopped_while_thinking_ask_the_keys_once():
    """Review (stop 67): keys pressed over noise are a turn of their own (keys alone),
    asked of the agent; stopped by the caller's words before it answered, its exchange
    is taken back and the next turn asks the keys once, with the words."""
    # The keys' exchange was kept since carried keys stopped counting as carried words
    # (1f3a97d): the agent was asked "the caller pressed 1 2" twice, two user messages.
    h = CallHarness(settings={"turn_continuation_ms": 200})
    h.llm.first_token_s = 3.0
    await h.start()
    await h.feed(tone(300, NOISE))
    for key in "12#":
        h.call.feed_dtmf(key)
        await h.clock.settle()
    await h.feed(tone(300, NOISE))
    await h.wait(1000)  # the keys' turn asked the agent; it thinks
    assert h.llm.requests and not h.output.of("response")
    await h.say("my account", then_silence_ms=4000)
    await h.stop()
    assert [(e["turn"], e["keys"]) for e in h.output.of("keypad")] == [(1, "12")]
    assert user_texts(h.llm.requests[-1]) == ["the caller pressed 1 2 my account"]
    assert user_texts(h.call.conversation.history) == ["the caller pressed 1 2 my account"]


async def test_keys_over_noise_that_cut_an_answer_then_stopped_leave_it_answered():
    """Review (stop 67): the keys' turn after noise that cut an answer (the cut question
    stays answered) is stopped by the caller's words while the agent thinks: the next turn
    asks the keys and the words, not the cut question again, and continues nothing."""
    # The keys' turn dropped the cut question from what it asked, but carried it on when
    # stopped, still counted as continued: "i lost my card" came back before the keys.
    h = CallHarness(faqs={"lost my card": "lost_card"},
                    settings={"false_interruption_s": 0.5})
    h.llm.first_token_s = 3.0
    await h.start()
    await _keys_over_noise_that_cut_an_answer(h)
    await h.wait(1000)  # the keys' turn asked the agent; it thinks
    assert h.llm.requests and [e["source"] for e in h.output.of("response")] == ["cache"]
    await h.say("my account", then_silence_ms=4000)
    await h.stop()
    assert user_texts(h.llm.requests[-1]) == ["i lost my card",
                                              "the caller pressed 1 2 my account"]
    assert h.transcripts()[-1] == "my account", h.transcripts()
    assert h.stats.snapshot()["continuations"] == 0
    assert [e["source"] for e in h.output.of("response")] == ["cache", "llm"]
