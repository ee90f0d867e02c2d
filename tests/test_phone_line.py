"""The phone line on the call engine (ManualClock harness): greeting, idle prompts and
hang-up, keypad (DTMF) and the transfer after a handoff."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, AsyncIterator

import pytest

from gateway.call.keypad import BadKey, Collected, Keypad, Mapped
from gateway.providers.base import LLMChunk, ProviderError, ToolSpec
from gateway.audio_bank import Clip
from gateway.agent import (GOODBYE_MESSAGE, HANDOFF_MESSAGE, HANDOFF_UNAVAILABLE_MESSAGE,
                           IDLE_PROMPT_MESSAGE, TIME_LIMIT_MESSAGE, TRANSFER_FAILED_MESSAGE)
from intents.types import Action, RouteDecision
from tests.call_harness import CallHarness, RecordingOutput, ScriptedRouter, tone

GREETING = "Hello, you are through to the bank."


class TimedOutput(RecordingOutput):
    """Events stamped with the manual clock; a phone line that transfers and hangs up."""

    def __init__(self, clock, fail_transfer: bool = False, hang_up_s: float = 0.0,
                 transfer_s: float = 0.0) -> None:
        super().__init__(clock)
        self.times: list[float] = []
        self.transfers: list[tuple[float, str]] = []  # each transfer request, when it began
        self.transfer_s = transfer_s  # how long one takes (a REST round trip, as a hang-up)
        self.transfers_done = 0
        self.transfers_abandoned = 0  # cancelled before they were answered
        self.hangups: list[tuple[float, str]] = []  # each hang-up request, when it began
        self.fail_transfer = fail_transfer
        # How long a hang-up request (Twilio's REST API: an HTTP round trip) takes.
        self.hang_up_s = hang_up_s
        self.hangups_done = 0
        self.hangups_abandoned = 0  # cancelled before they were answered

    async def send_event(self, event: dict[str, Any]) -> None:
        self.times.append(self._clock.now())
        await super().send_event(event)

    async def interrupt(self, event: dict[str, Any]) -> None:
        self.times.append(self._clock.now())
        await super().interrupt(event)

    async def transfer(self, reason: str) -> bool:
        self.transfers.append((self._clock.now(), reason))
        if self.transfer_s:
            try:
                await self._clock.sleep(self.transfer_s)
            except asyncio.CancelledError:
                self.transfers_abandoned += 1
                raise
        self.transfers_done += 1
        if self.fail_transfer:
            raise RuntimeError("HTTP 500 from the phone company")
        return True

    async def hang_up(self, reason: str) -> None:
        self.hangups.append((self._clock.now(), reason))
        try:
            await self._clock.sleep(self.hang_up_s)
        except asyncio.CancelledError:
            self.hangups_abandoned += 1
            raise
        self.hangups_done += 1

    def at(self, kind: str, **match: Any) -> list[float]:
        return [t for t, e in zip(self.times, self.events) if e["type"] == kind
                and all(e.get(k) == v for k, v in match.items())]


def harness(settings: dict[str, Any] | None = None, faqs: dict[str, str] | None = None,
            fail_transfer: bool = False, hang_up_s: float = 0.0,
            turn_model: bool = False, transfer_s: float = 0.0) -> CallHarness:
    h = CallHarness(settings=settings, faqs=faqs, turn_model=turn_model)
    h.output = TimedOutput(h.clock, fail_transfer, hang_up_s, transfer_s)
    from gateway.call import Call

    h.call = Call(h.deps, h.output, 16000, call_id="test-call")
    return h


async def _keyed_4921(h: CallHarness) -> None:
    """The call starts and the caller keys 4 9 2 1, then a second passes."""
    await h.start()
    for key in "4921":
        h.call.feed_dtmf(key)
    await h.wait(1000)


def _last_asked(h: CallHarness) -> list[str]:
    """The caller's last message in each of the agent's requests, in order."""
    return [[m["content"] for m in r if m["role"] == "user"][-1] for r in h.llm.requests]


def sources(h: CallHarness) -> list[str]:
    return [e["source"] for e in h.output.of("response")]


async def ended(h: CallHarness) -> bool:
    await h.clock.settle()
    return h._task is not None and h._task.done()


# ---------------------------------------------------------------------- greeting


async def test_the_greeting_plays_when_the_call_starts():
    h = await harness({"greeting": GREETING}).start()
    await h.wait(3000)
    (response,) = h.output.of("response")
    assert response["source"] == "greeting" and response["text"] == GREETING
    assert h.output.frames and h.output.frames[0][0] == pytest.approx(1000.0)
    assert h.tts.spoken == []  # pre-rendered, not synthesized per call
    await h.stop()


@pytest.mark.parametrize("configured", [f"{GREETING}\n", f"  {GREETING} "])
async def test_a_greeting_configured_with_surrounding_whitespace_is_still_pre_rendered(
        configured):
    """Review (stop 66): the greeting was pre-rendered with its text as configured, a
    trailing newline included (a YAML block scalar, an env file), but the call asks for
    it stripped: the two never matched, so every call synthesized its greeting live (a
    voice request per call start, its latency before the first word) and, with the voice
    down, the call began in silence where the pre-rendered greeting would have played."""
    h = harness({"greeting": configured})

    async def down(text: str) -> AsyncIterator[bytes]:
        raise ProviderError("word-tts", "voice service unavailable")
        yield b""  # pragma: no cover

    h.tts.synthesize = down  # type: ignore[method-assign]
    await h.start()
    await h.wait(3000)
    (response,) = h.output.of("response")
    assert response["source"] == "greeting" and response["text"] == GREETING
    assert h.output.of("error") == []
    assert h.output.frames and h.output.frames[0][0] == pytest.approx(1000.0)
    await h.stop()


async def test_no_greeting_when_it_is_empty():
    h = await harness({"greeting": ""}).start()
    await h.wait(2000)
    await h.stop()
    assert h.output.of("response") == [] and h.output.frames == []


async def test_the_caller_can_barge_in_over_the_greeting():
    h = harness({"greeting": GREETING, "false_interruption_s": 0})
    h.responder._prompts.add(Clip("greeting", GREETING, tone(5000, 700), 16000))  # 5 s long
    h.llm.reply = "Sure."
    await h.start()
    await h.wait(300)
    assert h.call.speaking
    await h.say("cancel my card please", then_silence_ms=1500)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    assert interrupt["turn"] == h.output.of("response", source="greeting")[0]["turn"]
    assert h.transcripts() == ["cancel my card please"]
    assert sources(h) == ["greeting", "llm"]


async def test_a_greeting_cut_short_stays_in_the_context_only_as_far_as_it_was_heard():
    """Review (stop 60): the greeting went into the context whole before it played, and
    its reply was never cut on a barge-in (``record_heard``), unlike every other reply the
    agent's context holds: the model was told the caller heard words they talked over."""
    h = harness({"greeting": GREETING, "false_interruption_s": 0})
    h.responder._prompts.add(Clip("greeting", GREETING, tone(5000, 700), 16000))  # 5 s long
    h.llm.reply = "Sure."
    await h.start()
    await h.wait(2500)
    await h.say("cancel my card please", then_silence_ms=1500)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    words = GREETING.split()  # spread evenly over the clip's 5 s
    heard = words[:int(len(words) * interrupt["heard_ms"] / 5000)]
    assert 0 < len(heard) < len(words), interrupt
    request = h.llm.requests[-1]
    assert [(m["role"], m["content"]) for m in request[1:]] == [
        ("assistant", " ".join(heard)), ("user", "cancel my card please")]


# ---------------------------------------------------------------------- silence


async def test_silence_gets_a_prompt_then_a_goodbye_and_the_call_ends():
    h = harness({"idle_prompt_s": 8})
    h.llm.reply = "Okay."
    await h.start()
    await h.text("hello there")
    await h.wait(1000)
    reply_end = h.output.frames[-1][0]
    await h.wait(8500)
    assert sources(h) == ["llm", "prompt"]
    (prompt_at,) = h.output.at("response", source="prompt")
    assert 8.0 <= prompt_at - reply_end <= 8.1  # from the end of the last frame heard
    assert not await ended(h)
    await h.wait(9000)
    assert sources(h) == ["llm", "prompt", "goodbye"]
    (goodbye_at,) = h.output.at("response", source="goodbye")
    prompt_end = max(t for t, _ in h.output.frames if t < goodbye_at)
    assert 8.0 <= goodbye_at - prompt_end <= 8.1
    assert [e["reason"] for e in h.output.of("hangup")] == ["idle"]
    assert [r for _, r in h.output.hangups] == ["idle"]  # the phone line was hung up
    assert h.output.hangups[0][0] >= h.output.frames[-1][0]  # after the goodbye played
    assert await ended(h) and h.call.ended == "idle"


async def test_a_caller_who_answers_the_prompt_is_not_hung_up_on():
    h = harness({"idle_prompt_s": 8})
    await h.start()
    await h.text("hello there")
    await h.wait(9500)
    assert sources(h) == ["llm", "prompt"]
    await h.say("yes I am here", then_silence_ms=1500)
    await h.wait(7000)  # 8.5 s after the answer's reply ended: a new first prompt
    assert sources(h) == ["llm", "prompt", "llm", "prompt"]
    assert h.output.of("hangup") == []
    await h.stop()


@pytest.mark.parametrize("typed, final", [("where is", False), ("", True)])
async def test_a_typed_message_that_gets_no_reply_leaves_the_silence_watched(typed, final):
    # A partial no final follows is the caller's activity (the count stops) but starts no
    # reply, and only a reply's end started the count again: a caller who then went silent
    # was never prompted nor hung up on, the call held for good. An empty message with
    # nothing typed before it says nothing: the count goes on from the reply's end.
    h = harness({"idle_prompt_s": 8})
    await h.start()
    await h.text("hello there")
    await h.wait(3000)
    await h.text(typed, final)
    typed_at = h.clock.now()
    await h.wait(8500)
    assert sources(h) == ["llm", "prompt"]
    (prompt_at,) = h.output.at("response", source="prompt")
    if typed:
        assert 8.0 <= prompt_at - typed_at <= 8.1
    else:
        assert 4.0 < prompt_at - typed_at < 8.0
    await h.stop()


@pytest.mark.parametrize("resumed", [True, False])
async def test_a_call_with_no_greeting_whose_caller_stays_silent_is_prompted_and_hung_up_on(
        resumed):
    # No greeting: none is configured (the default), or a resumed stream, whose last words
    # were the phone line's own apology ("... I'm back."). The silence count only ever
    # started at the end of a reply, so a caller who said nothing was never prompted nor
    # hung up on: the call held for good.
    from gateway.call import Call

    h = harness({"idle_prompt_s": 1})
    h.call = Call(h.deps, h.output, 16000, call_id="test-call", resumed=resumed)
    started = h.clock.now()
    await h.start()
    await h.wait(1100)
    assert sources(h) == ["prompt"]
    (prompt_at,) = h.output.at("response", source="prompt")
    assert 1.0 <= prompt_at - started <= 1.05
    await h.wait(1600)
    assert sources(h) == ["prompt", "goodbye"]
    assert await ended(h) and h.call.ended == "idle"


async def test_a_caller_who_talks_over_the_goodbye_is_still_watched_for_silence():
    # The goodbye was the idle watch's last step: cut short by the caller, the call goes
    # on, and silence after it must still be prompted (and at last hung up on).
    h = harness({"idle_prompt_s": 8})
    await h.start()
    await h.text("hello there")
    while not h.output.of("response", source="goodbye"):
        await h.wait(20)
    await h.text("sorry I am still here")  # a barge-in on the goodbye
    await h.wait(9000)
    assert sources(h) == ["llm", "prompt", "goodbye", "llm", "prompt"]
    assert h.output.of("hangup") == [] and not await ended(h)
    await h.wait(9000)
    assert sources(h)[-1] == "goodbye" and await ended(h) and h.call.ended == "idle"


@pytest.mark.parametrize("answered", ["prompt", "goodbye"])
async def test_the_agent_knows_the_idle_prompt_or_goodbye_the_caller_answers(answered):
    """Review (stop 60): the idle prompt and the goodbye never reached the agent's context.
    The agent asks "Shall I block your card?", the caller goes quiet, the bot asks "Are you
    still there?" and the caller says "yes": the agent saw its own question, then "yes", and
    took it for the go-ahead to block the card. Talking over the goodbye ("no wait, I'm
    here") read as an answer to the last question too."""
    h = harness({"idle_prompt_s": 8})
    h.llm.reply = "Shall I block your card?"
    await h.start()
    await h.text("I lost my card")
    await h.wait(1500)
    while not h.output.of("response", source=answered):
        await h.wait(20)
    await h.wait(100)
    await h.text("yes" if answered == "prompt" else "no wait I am here")
    await h.wait(1500)
    await h.stop()
    assert h.output.of("hangup") == []
    said = [m["content"] for m in h.llm.requests[-1] if m["role"] == "assistant"]
    expected = [IDLE_PROMPT_MESSAGE] + ([GOODBYE_MESSAGE] if answered == "goodbye" else [])
    assert said == ["Shall I block your card?", *expected], said


async def _silent_until_the_prompt_is_due_but(h: CallHarness, ms: int) -> float:
    """The call answers one message, then the caller stays silent until ``ms`` before the
    idle prompt is due (8 s after the reply's last frame); returns when it is due."""
    h.responder._prompts.add(Clip("idle", IDLE_PROMPT_MESSAGE, tone(2000, 700), 16000))
    await h.start()
    await h.text("hello there")
    await h.wait(1000)
    due = h.output.frames[-1][0] + 0.02 + 8
    await h.wait(round((due - h.clock.now()) * 1000) - ms)
    return due


async def test_a_caller_whose_voice_began_just_before_the_idle_prompt_is_not_talked_over():
    """Review (stop 67): the prompt came while the caller's first 120 ms of voice were still
    being confirmed as speech: nothing counted as speaking, so "Are you still there?" began
    over them, and with the bot talking their speech then needed 400 ms to stop it. Voice
    being confirmed holds the prompt as speech does; their words get the reply."""
    h = harness({"idle_prompt_s": 8, "false_interruption_s": 0})
    h.llm.reply = "Okay."
    await _silent_until_the_prompt_is_due_but(h, 40)
    await h.say("I want to block my card", then_silence_ms=1500)
    assert sources(h) == ["llm", "llm"]  # their words answered, no prompt over them
    assert h.output.of("interrupt") == []
    await h.stop()


async def test_a_click_just_before_the_idle_prompt_still_lets_it_come():
    """Review (stop 67): voice too short to be speech (a click, rejected after two quiet
    windows) held the prompt only while it was being confirmed: the prompt comes at once
    after, not never."""
    h = harness({"idle_prompt_s": 8})
    due = await _silent_until_the_prompt_is_due_but(h, 40)
    await h.feed(tone(40, 12345))
    await h.wait(400)
    (prompt_at,) = h.output.at("response", source="prompt")
    assert due <= prompt_at <= due + 0.2
    await h.stop()


async def test_a_lone_hash_pressed_during_a_click_still_leaves_the_silence_watched():
    """Review (stop 67): a key that leads nowhere (a lone `#`) stops the count and starts it
    again only if the line is quiet; pressed while a click was being confirmed as speech,
    the count must start when the click is rejected, or no prompt or goodbye ever came."""
    h = harness({"idle_prompt_s": 8})
    await _silent_until_the_prompt_is_due_but(h, 4000)
    await h.feed(tone(40, 12345))
    assert h.call._turns.hears_voice
    h.call.feed_dtmf("#")
    pressed_at = h.clock.now()
    await h.wait(8500)
    (prompt_at,) = h.output.at("response", source="prompt")
    assert 8.0 <= prompt_at - pressed_at <= 8.2
    await h.stop()


async def test_a_key_or_text_while_the_call_hangs_up_does_not_stop_the_hang_up():
    # `hangup` tells the client the call is over: the hang-up request under way then (an
    # HTTP round trip to Twilio) is not abandoned by a key or a text, and the call ends.
    h = harness({"idle_prompt_s": 8}, hang_up_s=0.5)
    await h.start()
    await h.text("hello there")
    while not h.output.of("hangup"):
        await h.wait(20)
    assert h.output.hangups and not h.output.hangups_done  # the request is under way
    h.call.feed_dtmf("5")
    h.call.feed_text("wait, I am still here", True)
    await h.wait(3000)
    assert (h.output.hangups_done, h.output.hangups_abandoned) == (1, 0)
    assert h.output.of("interrupt") == []
    assert await ended(h) and h.call.ended == "idle"


class TextAtHangUp(TimedOutput):
    """A caller's text arrives just as `hangup` goes out, before the call has stopped."""

    call: Any = None

    async def send_event(self, event: dict[str, Any]) -> None:
        await super().send_event(event)
        if event["type"] == "hangup":
            self.call.feed_text("wait, I am still here", True)


async def hung_up_when_idle(h: CallHarness, output: type[TimedOutput], phone_line: bool,
                            **output_fields: Any) -> CallHarness:
    """A call through ``output`` (0.5 s hang-up request; none natively) that answers "hello
    there" and is hung up when idle, with nothing after `hangup`."""
    h.output = output(h.clock, hang_up_s=0.5)
    for name, value in output_fields.items():
        setattr(h.output, name, value)
    if not phone_line:
        h.output.hang_up = None  # type: ignore[assignment,method-assign]
    from gateway.call import Call

    h.call = h.output.call = Call(h.deps, h.output, 16000, call_id="test-call")  # type: ignore[attr-defined]
    h.llm.reply = "Okay."
    await h.start()
    await h.text("hello there")
    await h.wait(20000)
    assert await ended(h) and h.call.ended == "idle"
    types = [e["type"] for e in h.output.events]
    assert types[types.index("hangup") + 1:] == []
    return h


@pytest.mark.parametrize("phone_line", [False, True])
async def test_a_text_while_the_call_hangs_up_gets_no_transcript_or_reply(phone_line):
    # After `hangup` the client holds a call that is over: a text then is neither echoed
    # as a transcript nor answered; the call just ends. Native: `hangup` is the whole
    # hang-up; a phone line's request takes 0.5 s more.
    h = await hung_up_when_idle(harness({"idle_prompt_s": 8}), TextAtHangUp, phone_line)
    assert [e["text"] for e in h.output.of("transcript")] == ["hello there"]
    assert sources(h) == ["llm", "prompt", "goodbye"]


class AtHangUp(TimedOutput):
    """Notes what was sent and which reply ran as `hangup` goes out; the caller's ``keys``
    arrive just then, before the call has stopped."""

    call: Any = None
    keys = ""

    async def send_event(self, event: dict[str, Any]) -> None:
        await super().send_event(event)
        if event["type"] == "hangup":
            self.frames_at_hangup = len(self.frames)
            self.reply_at_hangup = self.call._reply_task  # the goodbye, hanging up
            for key in self.keys:
                self.call.feed_dtmf(key)


@pytest.mark.parametrize("keys, phone_line", [
    ("1", False), ("1", True),  # a mapped key
    ("45#", True),  # keys collected until `#` (natively the call closes before the `#`)
])
async def test_a_key_while_the_call_hangs_up_gets_no_keypad_event_or_reply(keys, phone_line):
    # As a text: after `hangup` keys are neither acknowledged (`keypad`) nor answered (a
    # mapped entry, or the agent for collected keys); no reply starts, the call just ends.
    h = await hung_up_when_idle(harness({"idle_prompt_s": 8, "keypad": {"1": "hours"}},
                                        faqs={"opening hours": "hours"}),
                                AtHangUp, phone_line, keys=keys)
    assert len(h.output.frames) == h.output.frames_at_hangup  # no reply audio either
    assert h.call._reply_task is h.output.reply_at_hangup  # no reply was started
    assert len(h.llm.requests) == 1  # "hello there"; the keys never reached the agent
    assert sources(h) == ["llm", "prompt", "goodbye"]


@pytest.mark.parametrize("begins, final_fails", [
    ("after", False),
    ("before", False),  # too short yet to be speech over the goodbye when `hangup` goes out
    ("after", True),  # nobody awaits that final: its failure must not go unretrieved
])
async def test_speech_while_a_phone_line_hangs_up_gets_no_transcript_or_reply(
        begins, final_fails, caplog):
    # A phone line's hang-up request (an HTTP round trip, here a slow one: 3 s) leaves the
    # caller's audio flowing after `hangup`: a turn that ends then is neither transcribed
    # (partial or final) nor answered, and barges in on nothing; the call just ends.
    h = harness({"idle_prompt_s": 8})
    h.stt.fail_finals = int(final_fails)
    h.output = AtHangUp(h.clock, hang_up_s=3.0)
    from gateway.call import Call

    h.call = h.output.call = Call(h.deps, h.output, 16000, call_id="test-call")
    h.llm.reply = "Okay."
    await h.start()
    await h.text("hello there")
    if begins == "after":
        while not h.output.of("hangup"):
            await h.wait(20)
    else:
        while not h.output.of("response", source="goodbye"):
            await h.wait(20)
        await h.wait(200)  # the goodbye (300 ms) nearly played: `hangup` comes 140 ms on
        assert not h.output.of("hangup")
    await h.say("wait I am still here", then_silence_ms=1000)  # a turn, ended and decoded
    assert not await ended(h)  # within the hang-up request
    await h.wait(3000)
    assert await ended(h) and h.call.ended == "idle"
    types = [e["type"] for e in h.output.events]
    assert types[types.index("hangup") + 1:] == []
    assert len(h.output.frames) == h.output.frames_at_hangup  # no reply audio either
    assert h.call._reply_task is h.output.reply_at_hangup  # no reply was started
    assert len(h.llm.requests) == 1  # "hello there"; the speech never reached the agent
    assert (h.output.hangups_done, h.output.hangups_abandoned) == (1, 0)
    assert h.stt.decodes == 1 and h.stt.fail_finals == 0  # its final ran (and failed, if so)
    gc.collect()
    assert "never retrieved" not in caplog.text


class StageFailsAtHangUp(AtHangUp):
    """As `hangup` goes out, a stage working on the caller's audio breaks (``fail``) and the
    caller's speech arrives, before the call has stopped: natively the call stops right
    after `hangup`, so the failure lands in that very loop iteration; on a phone line the
    audio flows on for the whole hang-up request."""

    fail: Any = None
    call_words = b""

    async def send_event(self, event: dict[str, Any]) -> None:
        await super().send_event(event)
        if event["type"] == "hangup":
            self.fail()
            # Words, then the pause after them (the turn model judges the audio there).
            self.call.feed_audio(self.call_words + bytes(16000 * 2 * 200 // 1000))


def refuse_audio(h: CallHarness) -> None:
    async def refused(pcm16: bytes) -> None:
        raise ProviderError("word-stt", "the live socket was closed by the server")

    h.call._turns.stt.send_audio = refused  # type: ignore[method-assign]


BREAK_STAGE = {
    "vad_failed": lambda h: setattr(h.vad, "fail_next", 1),
    "stt_failed": refuse_audio,
    "turn_model_failed": lambda h: setattr(h.turn_model, "fail", True),
}


@pytest.mark.parametrize("code, phone_line", [
    ("vad_failed", False), ("vad_failed", True),
    ("stt_failed", False), ("stt_failed", True),
    # Natively the call closes before the turn model has answered: nothing to report.
    ("turn_model_failed", True),
])
async def test_a_stage_failing_on_the_callers_audio_after_hangup_is_counted_not_sent(
        code, phone_line, caplog):
    # Nothing but `hangup_failed` follows `hangup`: the client holds a call that is over.
    # The caller's audio still reaches the stages meanwhile; one that fails on it then
    # (VAD, STT, the turn model) is counted and logged, and no `error` event is sent.
    h = harness({"idle_prompt_s": 8}, turn_model=True)
    h = await hung_up_when_idle(h, StageFailsAtHangUp, phone_line,
                                fail=lambda: BREAK_STAGE[code](h),
                                call_words=h.vocabulary.audio("wait I am still here"))
    assert h.stats.errors[code] >= 1  # the failure happened after `hangup`, and counted
    assert h.output.of("error") == []
    assert any(getattr(r, "fields", {}).get("code") == code
               and r.fields.get("after_hangup") for r in caplog.records), "not logged"
    assert sources(h) == ["llm", "prompt", "goodbye"]


class RefusesHangUp(TimedOutput):
    async def hang_up(self, reason: str) -> None:
        raise RuntimeError("HTTP 500 from the phone company")


async def test_a_refused_hang_up_is_the_one_error_sent_after_hangup():
    # `hangup_failed` is about the hang-up itself: it still follows `hangup`, alone.
    h = harness({"idle_prompt_s": 8})
    h.output = RefusesHangUp(h.clock)
    from gateway.call import Call

    h.call = Call(h.deps, h.output, 16000, call_id="test-call")
    await h.start()
    await h.text("hello there")
    await h.wait(20000)
    assert await ended(h) and h.call.ended == "idle"
    types = [e["type"] for e in h.output.events]
    assert types[types.index("hangup") + 1:] == ["error"]
    assert [e["code"] for e in h.output.of("error")] == ["hangup_failed"]
    assert h.stats.errors["hangup_failed"] == 1


async def _goodbye_playing():
    """A call whose idle goodbye (2 s) has begun; its hang-up request is slow (1.5 s:
    longer than a 1 s hold)."""
    h = harness({"idle_prompt_s": 8, "false_interruption_s": 1.0}, hang_up_s=1.5)
    h.responder._prompts.add(Clip("goodbye", "Goodbye.", tone(2000, 700), 16000))  # 2 s
    await h.start()
    await h.text("hello there")
    while not h.output.of("response", source="goodbye"):
        await h.wait(20)
    return h


@pytest.mark.parametrize("sound, goes_on", [
    ("noise", False),  # no words in it: the goodbye resumes (nothing left), the call hangs up
    ("long noise", True),  # outlasting the hold: a barge-in, as over any reply
    ("words", True),  # the caller talked over the goodbye
])
async def test_speech_just_after_the_goodbye_is_settled_before_the_hang_up(sound, goes_on):
    # Speech confirmed once the goodbye has played, in the playout lead the far end may
    # still be playing, holds it as any reply. The hang-up waits for that to settle: hung
    # up while held, the hold's end cancelled the hang-up request halfway (here a slow
    # one, 1.5 s: longer than the 1 s hold), the call never closed, and words in it were
    # transcribed and answered after `hangup`.
    h = await _goodbye_playing()
    await h.wait(1600)  # confirmed over the bot after 400 ms: just after the goodbye played
    noise = tone(400 if sound == "words" else 600 if sound == "noise" else 1600, 12345)
    await h.feed(noise + (h.vocabulary.audio("wait I am still here") if sound == "words"
                          else b""))
    await h.wait(3000)
    (interrupt_at,) = h.output.at("interrupt")
    goodbye_end = max(t for t, _ in h.output.frames if t <= interrupt_at) + 0.02
    assert interrupt_at > goodbye_end  # the goodbye's last frame had played
    assert h.output.hangups_abandoned == 0  # no hang-up request was cut off halfway
    if goes_on:
        assert h.output.of("hangup") == [] and h.output.hangups == []
        assert not await ended(h) and h.call.ended is None
        await h.stop()
    else:
        types = [e["type"] for e in h.output.events]
        # The client is told the interrupt is taken back (nothing follows), then `hangup`.
        assert types[types.index("interrupt") + 1:] == ["resume", "hangup"]
        assert (h.output.hangups_done, h.output.hangups_abandoned) == (1, 0)
        assert await ended(h) and h.call.ended == "idle"
    assert sources(h) == ["llm", "prompt", "goodbye"] + (["llm"] if sound == "words" else [])


async def test_speech_stopping_the_reply_queued_behind_the_goodbye_as_its_hold_ends():
    # Noise held the goodbye once it had played; its utterance ended, its reply was queued
    # behind the goodbye, and its final (no words) resumed it: the goodbye wakes from that
    # hold two loop iterations later and hangs up. In the same instant the caller's next
    # speech arrives (a burst: audio or a VAD batch that came late) and is confirmed in
    # the iteration between: not holdable (the goodbye's playout is over, the queued reply
    # never played), it stops the queued reply, whose task passes the cancel on to the
    # goodbye one iteration later, once the goodbye has begun its hang-up request. That
    # cancel abandoned the request halfway and the call never closed (`hangup` sent, the
    # phone line not hung up, `stop` never reached).
    h = await _goodbye_playing()
    burst = h.vocabulary.audio("wait I am still here")
    resume = h.call._resume_reply

    async def speech_arrives_as_the_hold_ends(turn: int) -> None:
        await resume(turn)  # no await inside: the hold's end and the audio, one instant
        for i in range(0, len(burst), 640):
            h.call.feed_audio(burst[i:i + 640])

    h.call._resume_reply = speech_arrives_as_the_hold_ends  # type: ignore[method-assign]
    await h.wait(1600)  # confirmed over the bot after 400 ms: just after the goodbye played
    await h.feed(tone(600, 12345))  # noise: no words
    await h.wait(3000)
    types = [e["type"] for e in h.output.events]
    first = types.index("interrupt")
    # The noise's hold ended (`resume`, nothing left to play); the speech was confirmed
    # before `hangup` went out (the race happened) ...
    assert types[first + 1:] == ["resume", "interrupt", "hangup"]
    # ... and the hang-up it raced still ran to its end: the call closed.
    assert (h.output.hangups_done, h.output.hangups_abandoned) == (1, 0)
    assert await ended(h) and h.call.ended == "idle"
    assert sources(h) == ["llm", "prompt", "goodbye"]


async def test_the_hang_up_waits_until_the_goodbye_has_played_at_the_far_end():
    # As the transfer does: the goodbye played by the clock, plus the lead the far end may
    # still be buffering, so its last word is not cut off.
    h = harness({"idle_prompt_s": 8, "playout_lead_ms": 60})
    await h.start()
    await h.text("hello there")
    while not h.output.hangups:
        await h.wait(20)
    await h.stop()
    (goodbye_at,) = h.output.at("response", source="goodbye")
    goodbye_frames = [t for t, _ in h.output.frames if t >= goodbye_at]
    message_s = len(goodbye_frames) * 0.02  # 20 ms frames
    ((hung_up_at, _),) = h.output.hangups
    assert hung_up_at >= goodbye_frames[0] + message_s + 0.06 - 1e-9
    (hangup_event_at,) = h.output.at("hangup")
    assert hangup_event_at >= goodbye_frames[0] + message_s + 0.06 - 1e-9


class SlowToolLLM:
    """A chat model that takes ``wait_s`` of the manual clock (a tool call) to answer."""

    name = "slow"

    def __init__(self, clock, wait_s: float, reply: str) -> None:
        self.clock, self.wait_s, self.reply = clock, wait_s, reply

    async def stream(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        if "balance" not in messages[-1]["content"]:
            yield LLMChunk(text="Okay.")
            return
        await self.clock.sleep(self.wait_s)
        yield LLMChunk(text=self.reply)


async def test_no_prompt_while_a_tool_call_runs_or_the_bot_speaks():
    h = harness({"idle_prompt_s": 8})
    long_reply = " ".join(["This answer is long and goes on."] * 20)  # 14 s of speech
    h.agent.llm = SlowToolLLM(h.clock, 20.0, long_reply)  # type: ignore[assignment]
    await h.start()
    await h.text("hello")
    await h.wait(5000)  # answered; 5 s of the 8 s idle pass
    await h.text("what is my balance")
    await h.wait(20000)  # the tool call: nothing for 20 s
    assert sources(h) == ["llm"]
    await h.wait(14000)  # the reply plays
    assert set(sources(h)) == {"llm"}  # one response per sentence, and no prompt
    reply_end = h.output.frames[-1][0]
    await h.wait(9000)
    (prompt_at,) = h.output.at("response", source="prompt")
    assert 8.0 <= prompt_at - reply_end <= 8.1
    await h.stop()


async def test_idle_prompts_are_off_at_zero():
    h = harness({"idle_prompt_s": 0})
    await h.start()
    await h.text("hello there")
    await h.wait(20000)
    await h.stop()
    assert sources(h) == ["llm"]


# ---------------------------------------------------------------------- keypad


def test_keypad_collects_until_hash_and_maps_a_first_key():
    keypad = Keypad({"0": "handoff", "1": "hours"}, pause_s=3)
    assert keypad.press("1") == Mapped("1", "hours")
    assert keypad.press("4") is None and keypad.press("0") is None  # 0 inside: a digit
    assert keypad.press("*") is None
    assert keypad.press("#") == Collected("40*")
    assert Collected("40*").text() == "the caller pressed 4 0 star"
    assert keypad.press("#") is None and keypad.expire() is None
    for bad in ("10", "a", "", " ", "５", None, 5):
        with pytest.raises(BadKey):
            keypad.press(bad)  # type: ignore[arg-type]


async def test_a_mapped_key_plays_its_cached_answer():
    h = harness({"keypad": {"1": "hours"}}, faqs={"opening hours": "hours"})
    await h.start()
    h.call.feed_dtmf("1")
    await h.wait(1500)
    await h.stop()
    (response,) = h.output.of("response")
    assert response["source"] == "cache" and response["entry_id"] == "hours"
    assert h.output.of("keypad")[0]["action"] == "hours"
    assert h.router.calls == []  # nothing was routed: the key named the answer
    assert h.stats.missed_questions() == []


async def test_other_keys_reach_the_agent_after_a_pause_or_hash():
    h = harness({"keypad": {"0": "handoff"}, "keypad_pause_s": 3})
    await h.start()
    for key in "4567":
        h.call.feed_dtmf(key)
        await h.wait(500)
    await h.wait(2000)
    assert h.llm.requests == []  # 2.5 s after the last key: still collecting
    await h.wait(1000)
    assert h.llm.requests[-1][-1] == {"role": "user", "content": "the caller pressed 4 5 6 7"}
    for key in "90#":
        h.call.feed_dtmf(key)
    await h.wait(100)  # `#` sends at once
    assert h.llm.requests[-1][-1]["content"] == "the caller pressed 9 0"
    await h.wait(1500)
    await h.stop()
    assert [e["keys"] for e in h.output.of("keypad")] == ["4567", "90"]
    assert h.stats.missed_questions() == []  # keys (maybe a PIN) never listed as misses


async def test_a_key_interrupts_the_bot():
    h = harness()
    h.llm.reply = " ".join(["Sentence of a long answer."] * 20)
    await h.start()
    await h.text("tell me everything")
    await h.wait(800)
    assert h.call.speaking
    h.call.feed_dtmf("5")
    await h.wait(100)
    (interrupt,) = h.output.of("interrupt")
    assert interrupt["cause"] == "dtmf"
    assert not h.call.speaking
    await h.stop()


async def test_a_lone_hash_does_not_stop_the_reply():
    # A lone `#` does nothing (docs/protocol.md), yet it barged in: pressed after a spoken
    # question (as callers used to other phone menus do) while the agent was still
    # thinking, it stopped the reply, whose words waited for a next spoken turn; the
    # caller, waiting for the answer, heard nothing.
    h = harness()
    h.llm.first_token_s = 1.0
    await h.start()
    await h.say("where is my parcel", then_silence_ms=600)
    assert h.call.replying and not h.call.speaking  # the agent is thinking
    h.call.feed_dtmf("#")
    await h.wait(1500)
    await h.stop()
    assert h.output.of("interrupt") == []
    assert sources(h) == ["llm"]


async def test_a_key_mapped_to_a_missing_entry_is_a_clear_error():
    h = harness({"keypad": {"2": "gone_entry"}})
    await h.start()
    h.call.feed_dtmf("2")
    await h.wait(1500)
    await h.stop()
    (error,) = h.output.of("error")
    assert error["code"] == "keypad_unknown_entry" and "gone_entry" in error["message"]
    assert sources(h) == ["apology"]
    assert h.stats.errors["keypad_unknown_entry"] == 1



@pytest.mark.parametrize("heard", ["whole", "cut off"])
async def test_a_key_mapped_to_a_missing_entry_ends_its_turn_with_metrics(heard):
    # The apology answered the key, but the turn sent no turn_metrics (operators and
    # bench/capacity.py count turns from them), and the partial counts of what the caller
    # had typed before went to the next turn's. Cut off, it ends with them too.
    h = harness({"keypad": {"2": "gone_entry"}})
    await h.start()
    await h.text("when do you", final=False)  # begun typing, then pressed a key instead
    h.call.feed_dtmf("2")
    await h.wait(100 if heard == "cut off" else 1500)
    if heard == "cut off":
        assert h.call.speaking  # the apology (300 ms) plays
    await h.text("tell me about fees")
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["apology", "llm"]
    assert [m["turn"] for m in h.metrics()] == [1, 2], h.metrics()
    key, typed = h.metrics()
    assert key["input"] == "dtmf" and key["source"] == "apology", key
    assert key["first_audio_ms"] is not None and key["route_decided_ms"] is None, key
    assert key["interrupted"] is (heard == "cut off") and key["preempted"] is False, key
    assert "intent" not in key and "hit" not in key, key
    assert (key["partials_routed"], typed["partials_routed"]) == (1, 0), h.metrics()
    # Keys are never a missed question (they may be a PIN).
    assert [q.text for q in h.stats.missed_questions()] == ["tell me about fees"]


async def _long_answer_closing_slowly(h) -> None:  # type: ignore[no-untyped-def]
    """The caller asks for a long answer, 1.5 s of which plays; stopped, its LLM stream takes
    2 s to close, so a reply asked for meanwhile queues behind it."""
    h.llm.reply = " ".join(f"Part {i} of the answer is here." for i in range(1, 11))
    h.llm.close_s = 2.0
    await h.text("tell me everything")
    await h.wait(1500)


@pytest.mark.parametrize("goes_on", ["key", "text", "speech", "call ends"])
async def test_a_key_stopped_while_queued_behind_a_reply_ends_its_turn_with_metrics(goes_on):
    # The caller types over a long answer (stopping it; its LLM stream takes 2 s to close)
    # and presses a mapped key: the key's reply queues behind the closing answer. Before it
    # runs they press another key, type, speak, or the call ends: the key's turn was
    # cancelled unrun and sent no turn_metrics (operators and bench/capacity.py count turns
    # from them), unlike a key's turn stopped once it ran, and the partial counts of what
    # they had typed went to the next turn's.
    h = harness({"keypad": {"1": "hours"}}, faqs={"opening hours": "hours"})
    await h.start()
    await _long_answer_closing_slowly(h)
    await h.text("when do you", final=False)  # stops the answer; this partial is routed
    h.call.feed_dtmf("1")
    await h.wait(100)
    assert h.llm.open_streams == 1 and h.call.replying  # the key's reply is queued
    assert [e["turn"] for e in h.output.of("keypad")] == [2]
    h.llm.reply, h.llm.close_s = "Okay.", 0.0  # the next turn's answer
    if goes_on == "key":
        h.call.feed_dtmf("1")
    elif goes_on == "text":
        await h.text("tell me about fees")
    elif goes_on == "speech":
        await h.say("tell me about fees", then_silence_ms=0)
    if goes_on != "call ends":
        await h.wait(4000)
    await h.stop()
    turns = [m["turn"] for m in h.metrics()]
    assert turns == ([1, 2] if goes_on == "call ends" else [1, 2, 3]), h.metrics()
    key = h.metrics()[1]
    # As a turn stopped before its reply: no source, no route or reply stages.
    assert key["input"] == "dtmf" and "source" not in key, key
    assert key["route_decided_ms"] is None and key["first_audio_ms"] is None, key
    assert key["reply_ms"] is None and key["preempted"] is False, key
    assert key["partials_routed"] == 1, h.metrics()
    # Its reply never played: the answer, then the next turn's reply (none at the end).
    replies = sorted({(e["turn"], e["source"]) for e in h.output.of("response")})
    expected = {"key": [(1, "llm"), (3, "cache")], "text": [(1, "llm"), (3, "llm")],
                "speech": [(1, "llm"), (3, "llm")], "call ends": [(1, "llm")]}[goes_on]
    assert replies == expected, replies
    if goes_on in ("key", "text"):
        assert h.metrics()[2]["partials_routed"] == 0, h.metrics()
    elif goes_on == "speech":  # its partials, spoken while the key waited, are its own
        assert h.metrics()[2]["partials_routed"] >= 1, h.metrics()
    # Nothing was asked or answered in it: no hit or miss in the stats.
    # (A key's turn after it is a keypad turn: no hit or miss either.)
    assert (h.stats.turns, h.stats.keypad_turns) == {
        "key": (1, 1), "text": (2, 0), "speech": (2, 0), "call ends": (1, 0)}[goes_on]


@pytest.mark.parametrize("playing", [False, True])
async def test_a_key_stopped_before_its_reply_task_ran_ends_its_turn_with_metrics(playing):
    # Two keys handled in one loop iteration: the first key's reply task is cancelled by the
    # second before its first step. A cancel there skipped the task's whole body: the turn
    # sent no turn_metrics, and it never waited for the reply before it, so the second key's
    # reply started while that reply still closed (its LLM stream open, its context not yet
    # cut to the heard words) and, were it still playing, over it.
    h = harness({"keypad": {"1": "hours", "2": "fees"}},
                faqs={"opening hours": "hours", "what are the fees": "fees"})
    await h.start()
    if playing:  # a long answer playing, whose LLM stream takes 2 s to close
        await _long_answer_closing_slowly(h)
        assert h.call.speaking
    stopped_at = h.clock.now()
    h.call.feed_dtmf("1")
    h.call.feed_dtmf("2")
    await h.wait(4000)
    await h.stop()
    first = 2 if playing else 1
    assert [e["turn"] for e in h.output.of("keypad")] == [first, first + 1]
    # Only the second key was answered, once the answer it stopped had closed.
    replies = sorted({(e["turn"], e["source"]) for e in h.output.of("response")})
    assert replies == ([(1, "llm")] if playing else []) + [(first + 1, "cache")], replies
    if playing:
        started = h.output.at("response", turn=first + 1)
        assert started >= [stopped_at + 2.0], (stopped_at, started)
    turns = [m["turn"] for m in h.metrics()]
    assert turns == list(range(1, first + 2)), h.metrics()
    key = h.metrics()[first - 1]
    assert key["input"] == "dtmf" and "source" not in key, key
    assert key["route_decided_ms"] is None and key["first_audio_ms"] is None, key
    # The second key's is a keypad turn (no hit or miss); the stopped one is in neither.
    assert (h.stats.turns, h.stats.keypad_turns) == (1 if playing else 0, 1), h.stats.outcomes


@pytest.mark.parametrize("how", ["text", "speech"])
async def test_a_turn_still_carried_when_the_call_ends_ends_with_its_metrics(how):
    # The caller types or speaks while a stopped answer still closes (its LLM stream takes
    # 2 s): their turn's reply queues behind it. The call ends first: stopped unrun, the
    # turn's words were carried to a next turn that never came, and no turn_metrics ever
    # covered it (a key's turn there ends with its own). It ends as the call does.
    h = harness({"keypad": {"1": "hours"}}, faqs={"opening hours": "hours"})
    await h.start()
    await _long_answer_closing_slowly(h)
    if how == "text":
        await h.text("what are the fees")
        await h.wait(100)
    else:
        await h.say("tell me about fees", then_silence_ms=400)
    assert h.llm.open_streams == 1 and h.call.replying  # the turn's reply is queued
    await h.stop()
    assert [m["turn"] for m in h.metrics()] == [1, 2], h.metrics()
    carried = h.metrics()[1]
    assert "source" not in carried and carried["first_audio_ms"] is None, carried
    assert h.stats.turns == 1, dict(h.stats.outcomes)  # it asked nothing: no hit or miss


@pytest.mark.parametrize("next_turn", ["text", "key", "speech"])
async def test_spoken_words_superseded_by_a_typed_turn_end_their_turn_with_metrics(next_turn):
    # The caller speaks over a long answer (stopping it; its LLM stream takes 2 s to close):
    # their turn's reply queues behind the closing answer. Before it runs they type a
    # message or press a key, which stops it: its words were carried, and the typed turn
    # dropped them (_drop_carry): no turn_metrics ever covered them (operators and
    # bench/capacity.py count turns from them). Speech instead takes them up: its metrics
    # cover both turns, their partial counts too.
    h = harness({"keypad": {"1": "hours"}}, faqs={"opening hours": "hours"})
    await h.start()
    await _long_answer_closing_slowly(h)
    await h.say("tell me about fees", then_silence_ms=400)
    assert h.llm.open_streams == 1 and h.call.replying  # the spoken turn's reply is queued
    assert h.transcripts() == [] and h.metrics() == []  # neither has ended
    h.llm.reply, h.llm.close_s = "Okay.", 0.0  # the next turn's answer
    if next_turn == "text":
        await h.text("what are your opening hours")
    elif next_turn == "key":
        h.call.feed_dtmf("1")
    else:
        await h.say("and your opening hours")
    await h.wait(4000)
    await h.stop()
    turns = [m["turn"] for m in h.metrics()]
    if next_turn == "speech":
        assert turns == [1, 3], h.metrics()
        assert h.transcripts() == ["tell me about fees and your opening hours"]
        covering = h.metrics()[1]
        counted = sum(covering[f"partials_{k}"] for k in ("routed", "skipped", "shed"))
        assert counted == len(h.output.of("transcript", final=False)), covering
        return
    assert turns == [1, 2, 3], h.metrics()
    spoken = h.metrics()[1]
    # As a turn stopped before its reply: no source, no route or reply stages; its words
    # were not asked (superseded), so no hit or miss in the stats.
    assert spoken["input"] == "audio" and "source" not in spoken, spoken
    assert spoken["route_decided_ms"] is None and spoken["first_audio_ms"] is None, spoken
    assert spoken["partials_routed"] >= 1, spoken  # its own partials, not the next turn's
    assert h.metrics()[2]["partials_routed"] == 0, h.metrics()
    assert sorted({(e["turn"], e["source"]) for e in h.output.of("response")}) == \
        [(1, "llm"), (3, "cache")]
    assert "fees" not in " ".join(h.transcripts())
    assert (h.stats.turns, h.stats.keypad_turns) == {"text": (2, 0), "key": (1, 1)}[next_turn]


async def test_a_key_is_answered_from_one_lookup_of_the_audio_bank():
    # Reloads swap the audio bank on another thread: one that lands between "is the entry
    # held?" and "read its clip" raised KeyError in the keypad path.
    h = harness({"keypad": {"1": "hours"}}, faqs={"opening hours": "hours"})
    await h.start()
    bank = h.call._responder.cache_audio
    assert bank is not None and "hours" in bank
    held = bank._held

    class SwappedAfterTheCheck(dict):  # a reload lands right after the membership test
        def __contains__(self, key: object) -> bool:
            bank._held = {}
            return dict.__contains__(self, key)

    bank._held = SwappedAfterTheCheck(held)
    h.call.feed_dtmf("1")
    await h.wait(1500)
    await h.stop()
    # One lookup: the key is answered from the version it found (here the one before the
    # swap, which the fixed path never triggers), with no error.
    assert h.output.of("error") == [] and h.stats.errors == {}
    assert sources(h) == ["cache"]


async def test_keypad_turns_are_no_hit_or_miss_in_the_stats():
    """Review (stop 61): keypad turns counted in the cache's hit rate. A key mapped to an
    entry was a hit (and an entry hit, with an end of turn of 0 ms in the hits' latencies),
    keys collected for the agent and the handoff key were misses: a caller who keys through
    a menu moved the FAQ hit rate the operators watch, though no question was asked that
    the cache could have answered or missed. Keypad turns are counted on their own
    (``keypad_turns``, ``voicegate_keypad_turns_total`` by source)."""
    h = harness({"keypad": {"0": "handoff", "1": "hours"}}, faqs={"opening hours": "hours"})
    await h.start()
    await h.text("what are your opening hours")  # a question: the cache answers it
    await h.wait(1500)
    h.call.feed_dtmf("1")  # the same answer, by key
    await h.wait(1500)
    for key in "45#":  # keys for the agent
        h.call.feed_dtmf(key)
    await h.wait(1500)
    h.call.feed_dtmf("0")  # a person
    await h.wait(2000)
    await h.stop()
    assert sources(h) == ["cache", "cache", "llm", "handoff"]
    assert [m["input"] for m in h.metrics()] == ["text", "dtmf", "dtmf", "dtmf"]
    snapshot = h.stats.snapshot()
    assert (snapshot["turns"], snapshot["hits"], snapshot["misses"]) == (1, 1, 0), snapshot
    assert snapshot["hit_rate"] == 1.0 and snapshot["hit_rate_5m"] == 1.0, snapshot
    assert sum(p["hits"] + p["misses"] for p in snapshot["series"]["points"]) == 1
    assert snapshot["entry_hits"] == {"hours": 1} and snapshot["intents"] == {"hours": 1}
    assert snapshot["sources"] == {"cache": 1}
    # Only the typed question is in the latencies (and not in the spoken-only end of turn).
    assert snapshot["latency_ms"]["hit"]["first_audio"]["n"] == 1
    assert "end_of_turn" not in snapshot["latency_ms"]["hit"], snapshot["latency_ms"]
    assert "miss" not in snapshot["latency_ms"], snapshot["latency_ms"]
    assert snapshot["keypad_turns"] == 3
    registry = h.stats.prometheus.registry
    assert registry.get_sample_value("voicegate_turns_total",
                                     {"outcome": "hit", "source": "cache"}) == 1
    assert registry.get_sample_value("voicegate_turns_total",
                                     {"outcome": "miss", "source": "llm"}) is None
    assert {source: registry.get_sample_value("voicegate_keypad_turns_total",
                                              {"source": source})
            for source in ("cache", "llm", "handoff")} == {"cache": 1, "llm": 1, "handoff": 1}


async def test_a_bad_key_is_refused():
    h = harness()
    with pytest.raises(BadKey, match="not a keypad key"):
        h.call.feed_dtmf("x")


# ---------------------------------------------------------------------- transfer


async def test_a_handoff_transfers_the_call_after_its_message_played():
    h = harness({"keypad": {"0": "handoff"}})
    await h.start()
    h.call.feed_dtmf("0")
    await h.wait(2000)
    await h.stop()
    assert sources(h) == ["handoff"] and h.output.of("handoff")
    ((at, reason),) = h.output.transfers
    first_frame = h.output.frames[0][0]
    message_s = len(h.output.frames) * 0.02  # the handoff message, 20 ms frames
    # played to its end by the clock, plus the lead the far end may still be buffering
    assert at >= first_frame + message_s + 0.06 - 1e-9
    assert "keypad" in reason
    assert h.metrics()[0]["transferred"] is True


@pytest.mark.parametrize("native", [False, True])
async def test_the_handoff_key_again_while_its_message_plays_does_not_restart_it(native):
    """Review (stop 61): a caller who pressed 0 (handoff) and pressed it again while "let me
    put you through" played barged in on their own handoff: the message stopped (an
    `interrupt`, cause dtmf) and a second handoff turn started it over, with a second
    `handoff` event (and on a phone line the transfer after it). The same handoff key while
    that handoff is under way does nothing: no barge-in, no second turn or transfer."""
    h = harness({"keypad": {"0": "handoff"}})
    if native:  # no transfer: the `handoff` event is the contract
        h.output.transfer = None  # type: ignore[assignment]
    h.responder._prompts.add(Clip("handoff", HANDOFF_MESSAGE, tone(2000, 700), 16000))
    await h.start()
    h.call.feed_dtmf("0")
    await h.wait(800)
    assert h.call.speaking and sources(h) == ["handoff"]
    h.call.feed_dtmf("0")
    await h.wait(100)
    h.call.feed_dtmf("0")
    await h.wait(3000)
    await h.stop()
    assert h.output.of("interrupt") == []
    assert sources(h) == ["handoff"] and len(h.output.of("handoff")) == 1
    assert [e["turn"] for e in h.output.of("keypad")] == [1]
    assert [m["turn"] for m in h.metrics()] == [1], h.metrics()
    assert h.metrics()[0]["interrupted"] is False, h.metrics()
    message_s = len(h.output.frames) * 0.02
    assert message_s == pytest.approx(2.0)  # played once, whole
    if not native:
        assert len(h.output.transfers) == 1 and h.metrics()[0]["transferred"] is True


async def test_the_handoff_key_again_during_the_transfer_request_does_nothing():
    """Review (stop 61): the handoff key pressed again while the transfer request runs
    queued a second handoff turn behind it (dropped once the call moved; after a failed
    transfer, a second handoff message and transfer). It does nothing: one turn."""
    h = harness({"keypad": {"0": "handoff"}}, transfer_s=1.5)
    await h.start()
    h.call.feed_dtmf("0")
    while not h.output.transfers:
        await h.wait(20)
    h.call.feed_dtmf("0")
    await h.wait(2000)
    await h.stop()
    assert h.output.transfers_done == 1 and len(h.output.transfers) == 1
    assert [e["turn"] for e in h.output.of("keypad")] == [1]
    assert [m["turn"] for m in h.metrics()] == [1], h.metrics()
    assert h.metrics()[0]["transferred"] is True


async def test_the_handoff_key_after_a_failed_transfer_asks_again():
    # The guard above ends with the handoff: once the transfer failed (the apology
    # playing), the handoff key stops the apology and asks for a person again.
    h = harness({"keypad": {"0": "handoff"}}, fail_transfer=True)
    h.responder._prompts.add(Clip("transfer_failed", TRANSFER_FAILED_MESSAGE,
                                  tone(2000, 700), 16000))
    await h.start()
    h.call.feed_dtmf("0")
    while not h.output.transfers:
        await h.wait(20)
    await h.wait(500)
    assert sources(h) == ["handoff", "apology"] and h.call.speaking
    h.call.feed_dtmf("0")
    await h.wait(2000)
    await h.stop()
    assert [e["cause"] for e in h.output.of("interrupt")] == ["dtmf"]
    assert sources(h) == ["handoff", "apology", "handoff", "apology"]
    assert len(h.output.transfers) == 2


async def _go_on_during_the_transfer_request(h: CallHarness, goes_on: str) -> None:
    """Key 0 (the handoff), then once its transfer request is under way the caller speaks,
    types or presses a key (``goes_on``)."""
    h.call.feed_dtmf("0")
    while not h.output.transfers:
        await h.wait(20)
    await _caller_goes_on(h, goes_on, "yes okay thank you")


async def _caller_goes_on(h: CallHarness, how: str, words: str) -> None:
    """The caller says or types ``words`` (``how``: speech, text), or presses key 5."""
    if how == "speech":
        await h.say(words, then_silence_ms=0)
    elif how == "text":
        await h.text(words)
    else:
        h.call.feed_dtmf("5")


@pytest.mark.parametrize("goes_on", ["speech", "text", "key"])
async def test_the_caller_going_on_during_the_transfer_request_does_not_abandon_it(goes_on):
    # The handoff message has played and the transfer request (Twilio's REST API, an HTTP
    # round trip) is under way when the caller says "yes okay thank you", types or presses a
    # key. That barged in on the reply whose task made the request: its cancel abandoned the
    # request halfway, the call moved or not, and the turn said it was not transferred.
    h = harness({"keypad": {"0": "handoff"}}, transfer_s=1.5)
    h.llm.reply = "Okay."
    await h.start()
    await _go_on_during_the_transfer_request(h, goes_on)
    await h.wait(2000)
    assert (h.output.transfers_done, h.output.transfers_abandoned) == (1, 0)
    assert h.metrics()[0]["transferred"] is True
    assert len(h.output.transfers) == 1
    # The call is with a person now: what the caller said meanwhile gets no bot reply.
    assert sources(h) == ["handoff"]
    await h.stop()


@pytest.mark.parametrize("goes_on", ["speech", "text", "key"])
async def test_input_dropped_behind_a_transfer_ends_its_turn_and_leaves_no_words(goes_on):
    # The caller goes on during the transfer request, as above; the call is moved and
    # their turn is dropped (reply_after_transfer_dropped). It sent no turn_metrics
    # (operators and benchmarks count turns from them), and its words stayed in the carry:
    # the next pause's words were routed joined to them.
    h = harness({"keypad": {"0": "handoff"}, "keypad_pause_s": 1}, transfer_s=1.5)
    h.stt.early_finals = True  # a pause's words are routed (with any carried before them)
    await h.start()
    await _go_on_during_the_transfer_request(h, goes_on)
    await h.wait(3000)
    assert h.output.transfers_done == 1 and sources(h) == ["handoff"]
    assert [m["turn"] for m in h.metrics()] == [1, 2], h.metrics()
    # As a turn stopped before its reply: no source, no reply stages.
    dropped = h.metrics()[1]
    assert dropped["input"] == {"speech": "audio", "text": "text", "key": "dtmf"}[goes_on]
    assert "source" not in dropped and dropped["first_audio_ms"] is None, dropped
    assert dropped["reply_ms"] is None and dropped["preempted"] is False, dropped
    # Its words were for the person: no question the cache missed (the handoff key's turn,
    # a keypad turn, is the only one counted).
    assert (h.stats.turns, h.stats.keypad_turns) == (0, 1), dict(h.stats.outcomes)
    routed = len(h.router.calls)
    await h.say("and one more thing", then_silence_ms=1500)
    later = [text for text, _ in h.router.calls[routed:]]
    assert later and not [text for text in later if "thank" in text], later
    assert [m["turn"] for m in h.metrics()] == [1, 2, 3]
    assert sources(h) == ["handoff"]
    await h.stop()


@pytest.mark.parametrize("then", ["speech", "text", "key"])
async def test_a_spoken_turn_stopped_while_queued_behind_a_transfer_ends_with_metrics(then):
    # The caller speaks during the transfer request: their turn queues behind it. Before the
    # request is answered they go on (speak, type or press a key), which stops that turn
    # unrun: its words would open the next turn (_carry_unanswered), but once the call is
    # moved nothing is carried, and the turn sent no turn_metrics at all (operators and
    # bench/capacity.py count turns from them), unlike the one dropped behind the transfer.
    h = harness({"keypad": {"0": "handoff"}, "keypad_pause_s": 1}, transfer_s=3.0)
    await h.start()
    await _go_on_during_the_transfer_request(h, "speech")
    await h.wait(400)  # the turn ends, its reply queued behind the transfer
    assert h.output.transfers_done == 0 and h.call.replying
    await _caller_goes_on(h, then, "are you there")
    await h.wait(4000)
    assert h.output.transfers_done == 1 and sources(h) == ["handoff"]
    assert [m["turn"] for m in h.metrics()] == [1, 2, 3], h.metrics()
    stopped = h.metrics()[1]
    # As a turn stopped before its reply: no source, no reply stages; its words were for
    # the person, no question the cache missed.
    assert stopped["input"] == "audio" and "source" not in stopped, stopped
    assert stopped["first_audio_ms"] is None and stopped["preempted"] is False, stopped
    assert h.metrics()[2]["input"] == {"speech": "audio", "text": "text", "key": "dtmf"}[then]
    # The handoff key's turn is a keypad turn, no hit or miss (nor is the stopped one).
    assert (h.stats.turns, h.stats.keypad_turns) == (0, 1), dict(h.stats.outcomes)
    await h.stop()


async def test_no_preemptive_agent_call_starts_once_the_call_is_transferred():
    """Review (stop 61): after the transfer (the call is with a person) the caller's words
    still reached ``_route_early`` and, with ``preemptive_agent`` on (the default), a miss
    that sounded finished started the agent's speculative LLM call at its pause
    (``_preempt_agent``): a paid model request whose answer could never play, the turn it
    was for dropped behind the transfer. Once transferred, none starts."""
    h = harness({"keypad": {"0": "handoff"}, "idle_prompt_s": 0})
    h.stt.early_finals = True  # a pause's words are routed, and a miss preempted
    await h.start()
    h.call.feed_dtmf("0")
    await h.wait(2000)
    assert h.output.transfers_done == 1 and h.metrics()[0]["transferred"] is True
    assert h.llm.requests == []  # the handoff key asks no model
    await h.say("where is my parcel", then_silence_ms=2500)
    await h.stop()
    assert sources(h) == ["handoff"]
    assert h.llm.requests == [], h.llm.requests
    assert h.stats.preempts == {}, h.stats.preempts


async def test_a_failed_transfer_is_reported_and_the_call_goes_on():
    h = harness({"keypad": {"0": "handoff"}}, fail_transfer=True)
    await h.start()
    h.call.feed_dtmf("0")
    await h.wait(2000)
    (error,) = h.output.of("error")
    assert error["code"] == "transfer_failed" and "HTTP 500" in error["message"]
    assert h.stats.errors["transfer_failed"] == 1
    await h.text("are you still there")
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["handoff", "apology", "llm"]
    assert not await ended(h) or h.call.ended is None


async def test_a_failed_transfer_is_followed_by_an_apology_not_dead_air():
    """Review (stop 60): the caller heard "I'm going to connect you with a colleague", the
    transfer request failed, and then nothing: no word until they spoke again (or the
    idle prompt, if any). They hear at once that they were not put through, and the bot
    goes on with the call."""
    h = harness({"keypad": {"0": "handoff"}, "idle_prompt_s": 0}, fail_transfer=True)
    await h.start()
    h.call.feed_dtmf("0")
    while not h.output.transfers:
        await h.wait(20)
    frames_before = len(h.output.frames)
    await h.wait(2000)
    assert sources(h) == ["handoff", "apology"]
    apology = h.output.of("response")[-1]
    assert apology["text"] == TRANSFER_FAILED_MESSAGE and apology["turn"] == 1
    ((failed_at, _),) = h.output.transfers
    after = h.output.frames[frames_before:]
    assert after and after[0][0] - failed_at < 0.2  # at once, not after a silence
    assert h.stats.errors["transfer_failed"] == 1
    (metrics,) = h.metrics()  # the handoff's turn, ended by the apology, not transferred
    assert metrics["handoff"] and metrics["source"] == "apology" and "transferred" not in metrics
    await h.text("are you still there")
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["handoff", "apology", "llm"]
    assert h.call.ended is None


class PersonRouter(ScriptedRouter):
    """Words asking for a person are routed to a human (an intent whose action is handoff)."""

    async def __call__(self, text: str, urgent: bool) -> RouteDecision:
        decision = await super().__call__(text, urgent)
        if "person" not in text:
            return decision
        return RouteDecision(text=text, intent="speak_to_person", action=Action.HANDOFF,
                             hit=False)


@pytest.mark.parametrize("handoff", ["intent", "key", "agent"])
async def test_the_agent_is_told_a_failed_transfer_left_the_caller_with_the_bot(handoff):
    """Review (stop 60): after a handoff whose transfer failed the context held the caller's
    words and nothing else: not the handoff message, not the apology. On the next turn the
    model, never told it had promised a colleague nor that the transfer failed, answered
    as if nothing had happened (or as if the caller were with a person). It reads what
    the caller heard: the handoff message, then that they were not put through."""
    h = harness({"keypad": {"0": "handoff"}, "idle_prompt_s": 0}, fail_transfer=True)
    from gateway.call import Call

    h.router = PersonRouter()
    h.deps.router = h.router
    h.call = Call(h.deps, h.output, 16000, call_id="test-call")
    await h.start()
    if handoff == "intent":
        await h.text("I want a person please")
    elif handoff == "key":
        h.call.feed_dtmf("0")
    else:
        h.llm.fail_next = 1  # every LLM failed before a word: a person takes over
        await h.text("tell me about loans")
    await h.wait(3000)
    assert sources(h) == ["handoff", "apology"]
    asked = len(h.llm.requests)
    await h.text("hello are you there")
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["handoff", "apology", "llm"]
    (request,) = h.llm.requests[asked:]
    assert [m["content"] for m in request if m["role"] == "assistant"] == [
        f"{HANDOFF_MESSAGE} {TRANSFER_FAILED_MESSAGE}"], request
    assert request[-2]["role"] == "assistant"
    assert request[-1] == {"role": "user", "content": "hello are you there"}


@pytest.mark.parametrize("env, message", [
    ({"VOICEGATE_KEYPAD": "[1]"}, "keypad: must be a JSON object"),
    ({"VOICEGATE_KEYPAD": "{nope"}, "keypad: must be a JSON object such as"),
    ({"VOICEGATE_KEYPAD": '{"#": "handoff"}'}, "key '#' is not a keypad key"),
    ({"VOICEGATE_KEYPAD": '{"12": "handoff"}'}, "key '12' is not a keypad key"),
    ({"VOICEGATE_KEYPAD": '{"5": "two words"}'}, "expected \"handoff\" or a cache entry id"),
    ({"VOICEGATE_KEYPAD": '{"5": 7}'}, "keypad.5"),
    ({"VOICEGATE_HANDOFF_NUMBER": "555-1234", "VOICEGATE_TWILIO_AUTH_TOKEN": "t"},
     "handoff_number: must be an E.164 phone number"),
    ({"VOICEGATE_HANDOFF_NUMBER": "+15551230000"}, "handoff_number needs twilio_auth_token"),
    ({"VOICEGATE_IDLE_PROMPT_S": "0.2"}, "idle_prompt_s: must be 0 (no idle prompt) or at least"),
    ({"VOICEGATE_IDLE_PROMPT_S": "-1"}, "idle_prompt_s"),
    ({"VOICEGATE_KEYPAD_PAUSE_S": "0"}, "keypad_pause_s"),
    ({"VOICEGATE_GREETING": "x" * 601}, "greeting"),
])
def test_bad_phone_line_settings_are_named(env, message):
    from gateway.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=None) as info:
        Settings.load(environ=env)
    assert message in str(info.value)


def test_phone_line_settings_from_the_environment():
    from gateway.settings import Settings

    s = Settings.load(environ={"VOICEGATE_KEYPAD": '{"0": "handoff", "*": "opening_hours"}',
                               "VOICEGATE_HANDOFF_NUMBER": "sip:desk@pbx.example.com",
                               "VOICEGATE_TWILIO_AUTH_TOKEN": "t",
                               "VOICEGATE_GREETING": "Hello.", "VOICEGATE_IDLE_PROMPT_S": "0"})
    assert s.keypad == {"0": "handoff", "*": "opening_hours"}
    assert s.handoff_number == "sip:desk@pbx.example.com"
    assert (s.greeting, s.idle_prompt_s) == ("Hello.", 0.0)


class _SlowMetricsOutput(TimedOutput):
    """turn_metrics written at once, then 100 ms of the clock to drain (a socket's send)."""

    async def send_event(self, event):  # type: ignore[no-untyped-def, override]
        await super().send_event(event)
        if event["type"] == "turn_metrics":
            await self._clock.sleep(0.1)


async def test_dropped_turns_stopped_while_ending_still_end_with_their_metrics():
    # Two spoken turns are carried (each stopped unrun behind a closing answer), a typed
    # message drops them and ends them one by one; a key stops the typed turn while the
    # first one's metrics drain. The one not yet ended was emptied from the carry before
    # the loop and never sent its metrics; now it stays carried and ends later (here, as
    # the caller ends the call).
    from gateway.call import Call

    h = harness({"keypad": {"1": "hours"}}, faqs={"opening hours": "hours"})
    h.output = _SlowMetricsOutput(h.clock)
    h.call = Call(h.deps, h.output, 16000, call_id="test-call")
    await h.start()
    await _long_answer_closing_slowly(h)
    await h.say("tell me about fees", then_silence_ms=400)  # turn 2, queued
    await h.say("and the charges", then_silence_ms=400)  # stops 2; turn 3 queued
    h.llm.reply, h.llm.close_s = "Okay.", 0.0
    await h.text("what are your opening hours")  # stops 3; turn 4 drops both
    for _ in range(300):
        if any(m["turn"] == 2 for m in h.metrics()):
            break
        await h.wait(20)
    h.call.feed_dtmf("1")  # while turn 2's metrics drain, inside turn 4's drop
    await h.wait(3000)
    await h.stop()
    assert sorted(m["turn"] for m in h.metrics()) == [1, 2, 3, 4, 5], h.metrics()


# ---------------------------------------------------------------------- time limit


async def test_at_its_time_limit_the_call_finishes_its_reply_says_so_and_hangs_up():
    # A line left open to a television, a caller who never stops, a bot calling the bot:
    # nothing ended a call that kept talking, and every turn of it costs LLM and voice.
    h = harness({"max_call_s": 20, "idle_prompt_s": 0})
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(8))  # ~5 s
    start = h.clock.now()
    await h.start()
    await h.wait(16000)
    await h.text("tell me everything")
    reply_started = h.output.at("response", source="llm")[0]
    await h.wait(12000)
    (limit_at,) = h.output.at("response", source="goodbye")
    llm_frames = [t for t, _ in h.output.frames if t < limit_at]
    # the answer went past the limit and played out first, uncut
    assert reply_started < start + 20.0 < llm_frames[-1]
    assert limit_at >= llm_frames[-1] and h.output.of("interrupt") == []
    (said,) = h.output.of("response", source="goodbye")
    assert said["text"] == TIME_LIMIT_MESSAGE
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert [r for _, r in h.output.hangups] == ["time_limit"]
    assert h.output.hangups[0][0] >= h.output.frames[-1][0]  # after the message played
    assert await ended(h) and h.call.ended == "time_limit"
    registry = h.deps.stats.prometheus.registry
    assert registry.get_sample_value("voicegate_hangups_total", {"reason": "time_limit"}) == 1


async def test_a_caller_talking_over_the_time_limit_message_is_still_hung_up_on():
    h = harness({"max_call_s": 10, "idle_prompt_s": 0, "false_interruption_s": 0})
    h.llm.reply = "Okay."
    await h.start()
    await h.wait(10200)
    assert sources(h) == ["goodbye"]  # nothing playing at the limit: said at once
    await h.say("wait wait one more thing", then_silence_ms=2000)
    await h.wait(6000)
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert await ended(h) and h.call.ended == "time_limit"


async def test_a_reply_that_will_not_end_gets_the_time_limit_after_a_grace():
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    h.llm.reply = " ".join(f"Sentence {i} of a very long answer." for i in range(200))
    start = h.clock.now()
    await h.start()
    await h.text("read me the terms")
    await h.wait(10000 + 30000 + 8000)
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    (limit_at,) = h.output.at("response", source="goodbye")
    assert start + 10.0 + 30.0 <= limit_at <= start + 10.0 + 30.0 + 0.5
    (cut,) = h.output.of("interrupt")  # the reply, stopped as by a barge-in
    assert cut["cause"] == "time_limit" and cut["heard_ms"] > 29_000
    assert await ended(h)


async def test_no_time_limit_when_it_is_0():
    h = harness({"max_call_s": 0, "idle_prompt_s": 0})
    await h.start()
    await h.wait(30000)
    assert h.output.of("hangup") == [] and not await ended(h)
    await h.stop()


@pytest.mark.parametrize("transfer_s", [0.0, 3.0], ids=["moved", "moving-at-the-limit"])
async def test_a_call_moved_to_a_person_is_not_hung_up_at_the_time_limit(transfer_s):
    # The stream may go on after a transfer (Twilio moves the call; the stream's end
    # comes later): the time limit is the bot's, and must not hang up on the person.
    h = harness({"keypad": {"0": "handoff"}, "max_call_s": 5, "idle_prompt_s": 0},
                transfer_s=transfer_s)
    await h.start()
    await h.wait(4000 - int(transfer_s * 500))
    h.call.feed_dtmf("0")
    await h.wait(40000)
    assert len(h.output.transfers) == 1 and h.metrics()[0]["transferred"] is True
    assert sources(h) == ["handoff"] and h.output.of("hangup") == []
    assert h.output.hangups == [] and h.output.of("interrupt") == []
    await h.stop()


async def test_no_idle_prompt_or_goodbye_while_the_time_limit_hangs_up():
    # The time limit hangs up from its own loop, not from a reply: while its hang-up
    # request was under way (a slow REST round trip) the line looked idle, and the idle
    # prompt, then a goodbye and a second hang-up, went out after `hangup`.
    h = harness({"max_call_s": 10, "idle_prompt_s": 8}, hang_up_s=9.0)
    h.llm.reply = "Okay."
    await h.start()
    await h.text("hello there")
    await h.wait(5000)
    await h.text("and one more thing")
    await h.wait(5000 + 15000)
    assert sources(h) == ["llm", "llm", "goodbye"]
    types = [e["type"] for e in h.output.events]
    assert types[types.index("hangup") + 1:] == []
    assert [r for _, r in h.output.hangups] == ["time_limit"]
    assert (h.output.hangups_done, h.output.hangups_abandoned) == (1, 0)
    assert await ended(h) and h.call.ended == "time_limit"


async def test_a_transfer_that_fails_after_the_time_limit_still_ends_the_call():
    # A transfer request still under way when the grace ran out (a slow phone company,
    # twilio_api_timeout_s up to 60 s) made the time limit give up for good: when the
    # transfer then failed, the caller stayed with the bot and the call had no limit.
    h = harness({"keypad": {"0": "handoff"}, "max_call_s": 5, "idle_prompt_s": 0},
                transfer_s=40.0, fail_transfer=True)
    await h.start()
    await h.wait(4000)
    h.call.feed_dtmf("0")
    await h.wait(60000)
    assert len(h.output.transfers) == 1 and h.output.transfers_abandoned == 0
    assert [e["code"] for e in h.output.of("error")] == ["transfer_failed"]
    # The caller hears that they were not put through, then the time-limit message.
    assert sources(h) == ["handoff", "apology", "goodbye"]
    assert [r for _, r in h.output.hangups] == ["time_limit"]
    assert await ended(h) and h.call.ended == "time_limit"


async def test_a_time_limit_loop_restarted_after_a_bug_does_not_wait_the_limit_again():
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    barge_in = h.call._barge_in
    failed: list[str] = []

    async def fails_once(cause: str, speech_at: float | None = None) -> None:
        if cause == "time_limit" and not failed:
            failed.append(cause)
            raise RuntimeError("a bug")
        await barge_in(cause, speech_at)

    h.call._barge_in = fails_once  # type: ignore[method-assign]
    start = h.clock.now()
    await h.start()
    await h.wait(16000)
    assert failed and [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    (limit_at,) = h.output.at("response", source="goodbye")
    assert limit_at < start + 10.5



_LIMIT_CLIP_MS = 5000  # the time-limit message, as long as a real one (~5 s)


def _long_time_limit_message(h: CallHarness) -> None:
    h.responder._prompts.add(Clip("time_limit", TIME_LIMIT_MESSAGE,
                                  tone(_LIMIT_CLIP_MS, 700), 16000))


def _message_frames(h: CallHarness) -> list[float]:
    """When each frame of the time-limit message went out."""
    (said_at,) = h.output.at("response", source="goodbye")
    later = [t for t, e in zip(h.output.times, h.output.events)
             if t >= said_at and e["type"] == "response" and e.get("source") != "goodbye"]
    return _frames_between(h, said_at, min(later, default=float("inf")))


def _assert_answered_then_the_whole_message(h: CallHarness, limit_at: float,
                                            speech_from: float, speech_to: float) -> None:
    """The caller spoke across the time limit (``limit_at``): nothing played over their
    words, which were answered, then the limit's message, heard whole, never interrupted."""
    assert speech_from < limit_at < speech_to
    _assert_nothing_played_between(h, speech_from, speech_to)
    assert sources(h) == ["llm", "goodbye"]  # their words answered, then the message
    assert h.output.of("interrupt") == []
    assert len(_message_frames(h)) == _LIMIT_CLIP_MS // 20  # heard whole


async def test_the_time_limit_waits_for_a_caller_speaking_at_it_and_answers_them_first():
    """Review (stop 61): the time limit came while the caller was mid-sentence (the VAD
    voiced): nothing was replying, so the message started at once, over their words, and
    nothing stopped it (their speech began before it): the caller talked through most of
    "this call has reached its time limit" and was hung up on. The idle prompt never starts
    while the caller speaks (``_line_busy``); the time limit now waits for their words too
    (within its grace), lets their turn's reply play out as it does the one under way, then
    says the message, whole, and hangs up."""
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    _long_time_limit_message(h)
    h.llm.reply = "Okay."
    start = h.clock.now()
    await h.start()
    await h.wait(8000)
    speech_from = h.clock.now()
    words = " ".join(f"word{i}" for i in range(20))  # 4 s, across the limit at 10 s
    await h.feed(h.vocabulary.audio(words))
    speech_to = h.clock.now()
    await h.silence(10000)
    _assert_answered_then_the_whole_message(h, start + 10.0, speech_from, speech_to)
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert h.output.hangups[0][0] >= h.output.frames[-1][0]
    assert await ended(h) and h.call.ended == "time_limit"


async def test_the_time_limit_waits_for_a_caller_whose_voice_began_just_before_it():
    """Review (stop 67): the caller's voice began 40 ms before the limit, still being
    confirmed as speech (120 ms): nothing counted as speaking, so the message started over
    them, and nothing stops it. Voice being confirmed is waited for as speech is: their words
    are answered, then the message, whole, and the hang-up."""
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    _long_time_limit_message(h)
    h.llm.reply = "Okay."
    start = h.clock.now()
    await h.start()
    await h.wait(10000 - 40)
    speech_from = h.clock.now()
    await h.feed(h.vocabulary.audio("I want to block my card"))
    speech_to = h.clock.now()
    await h.silence(10000)
    _assert_answered_then_the_whole_message(h, start + 10.0, speech_from, speech_to)
    assert await ended(h) and h.call.ended == "time_limit"


async def test_the_time_limit_waits_for_a_caller_keying_at_it_and_answers_the_keys_first():
    """Review (stop 62): the grace before the time-limit message waited for a caller who
    was speaking, but not for one keying a number (an account number, a PIN: each key
    within the keypad pause of the last): the message started at once, mid-number, and the
    keys, handed over as their pause ran out, were queued behind it and dropped
    (``reply_after_time_limit_dropped``): the caller keyed the rest for nothing, never
    answered. The idle prompt waits for keys being collected (``_line_busy``); the time
    limit now does too, within the same grace, answers them, then says the message."""
    h = harness({"max_call_s": 10, "idle_prompt_s": 0, "keypad_pause_s": 3})
    _long_time_limit_message(h)
    h.llm.reply = "Thank you, I have found your account."
    start = h.clock.now()
    await h.start()
    await h.wait(8500)
    keyed_from = h.clock.now()
    for key in "4921":  # one a second, across the limit at 10 s
        h.call.feed_dtmf(key)
        await h.wait(1000)
    keyed_to = h.clock.now()
    await h.wait(12000)
    assert keyed_from < start + 10.0 < keyed_to
    _assert_nothing_played_between(h, keyed_from, keyed_to)
    assert _last_asked(h)[-1] == "the caller pressed 4 9 2 1"
    assert sources(h) == ["llm", "goodbye"]  # the keys answered, then the message
    (limit_at,) = h.output.at("response", source="goodbye")
    assert limit_at >= max(t for t, _ in h.output.frames if t < limit_at)
    assert h.output.of("interrupt") == []
    assert len(_message_frames(h)) == _LIMIT_CLIP_MS // 20  # heard whole
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert await ended(h) and h.call.ended == "time_limit"


async def test_a_caller_who_keys_on_and_on_still_gets_the_time_limit_after_the_grace():
    """Review (stop 62), with the test above: waiting for keys being collected is bounded
    as waiting for speech is (``TIME_LIMIT_GRACE_S``): a key every two seconds, never a
    keypad pause, holds no call open past its grace (a collection hands over at most
    ``MAX_COLLECTED_KEYS`` keys, 64 s of them here)."""
    h = harness({"max_call_s": 10, "idle_prompt_s": 0, "keypad_pause_s": 3})
    _long_time_limit_message(h)
    start = h.clock.now()
    await h.start()
    await h.wait(9000)
    while h.clock.now() < start + 10 + 30 + 10 and h.call.ended is None:
        h.call.feed_dtmf("4")
        await h.wait(2000)
    (limit_at,) = h.output.at("response", source="goodbye")
    assert start + 10.0 + 30.0 <= limit_at <= start + 10.0 + 30.0 + 0.5
    assert len(_message_frames(h)) == _LIMIT_CLIP_MS // 20  # heard whole
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert await ended(h) and h.call.ended == "time_limit"


@pytest.mark.parametrize("how", ["speech", "text", "key"])
async def test_the_time_limit_message_is_heard_whole_whatever_the_caller_does_over_it(how):
    """Review (stop 61): the caller who spoke (typed, keyed) over the time-limit message
    stopped it, as a barge-in, and the hang-up followed anyway: cut off mid-sentence,
    never told why the call ended (a caller who had paused mid-sentence as it began heard
    next to nothing of it). Nothing the caller does keeps the call now, so nothing they do
    stops the message: it plays whole. Their turn, queued behind it, gets no reply: one
    started after the message (a cache hit at once) played a few frames in the playout lead
    before the hang-up stopped it. It ends with its metrics before `hangup`."""
    h = harness({"max_call_s": 10, "idle_prompt_s": 0, "keypad_pause_s": 1},
                faqs={"wait wait one more thing": "one_more_thing"})
    _long_time_limit_message(h)
    await h.start()
    await h.wait(10500)
    assert sources(h) == ["goodbye"]
    await _caller_goes_on(h, how, "wait wait one more thing")
    await h.wait(8000)
    assert h.output.of("interrupt") == []
    assert len(_message_frames(h)) == _LIMIT_CLIP_MS // 20  # heard whole
    assert sources(h) == ["goodbye"]  # nothing after it: not a frame of an answer
    assert [m["turn"] for m in h.metrics()] == [2]  # their turn ended, with metrics
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert h.output.hangups[0][0] >= h.output.frames[-1][0]
    types = [e["type"] for e in h.output.events]
    assert types[types.index("hangup") + 1:] == [], types
    assert await ended(h) and h.call.ended == "time_limit"


async def test_a_caller_who_never_stops_still_hears_the_whole_time_limit_message():
    """Review (stop 61): a caller who keeps talking (or a television), sentence after
    sentence: after the grace the message plays over them, and their next sentence stopped
    it as a barge-in, the call hung up with the message barely begun. It plays whole."""
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    _long_time_limit_message(h)
    h.llm.reply = "Okay."
    start = h.clock.now()
    await h.start()
    await h.wait(9000)
    while h.clock.now() < start + 10 + 30 + 10 and h.call.ended is None:
        await h.say("and another thing about my card", then_silence_ms=400)
    await h.wait(3000)
    (said_at,) = h.output.at("response", source="goodbye")
    assert start + 10 + 30 <= said_at <= start + 10 + 30 + 1.0  # the grace ran out
    assert len(_message_frames(h)) == _LIMIT_CLIP_MS // 20  # heard whole
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    assert await ended(h) and h.call.ended == "time_limit"


# ---------------------------------------------------------------------- review 2026-11-28


def _frames_between(h: CallHarness, start: float, end: float) -> list[float]:
    return [t for t, _ in h.output.frames if start <= t < end]


def _assert_nothing_played_between(h: CallHarness, start: float, end: float) -> None:
    """No reply frame left in [start, end) (while the caller spoke)."""
    over_caller = _frames_between(h, start, end)
    assert over_caller == [], (
        f"{len(over_caller)} reply frames played while the caller spoke "
        f"({start:.2f}-{end:.2f} s); responses {sources(h)}")


async def test_collected_keys_are_not_answered_over_a_caller_who_is_speaking():
    # The caller keys two digits, then starts talking ("uh, I don't have my account
    # number, can I give you my name instead"). The keypad pause runs out while they
    # speak: the agent's answer to "the caller pressed 4 5" plays over them, and no
    # barge-in stops it (their speech began before it).
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Thank you, let me look that up for you now."
    await h.start()
    h.call.feed_dtmf("4")
    h.call.feed_dtmf("5")
    await h.wait(1000)
    speech_from = h.clock.now()
    words = "uh I do not have my account number can I give you my name instead please"
    await h.feed(h.vocabulary.audio(words))  # 3.2 s of speech: the 3 s pause ends inside
    speech_to = h.clock.now()
    await h.silence(2000)
    await h.stop()
    _assert_nothing_played_between(h, speech_from, speech_to)
    # The keys open the turn the caller's words end: one reply, to both.
    [keypad] = h.output.of("keypad")
    [final] = [e for e in h.output.of("transcript") if e["final"]]
    assert keypad["keys"] == "45" and keypad["turn"] == final["turn"]
    assert h.llm.requests[-1][-1]["content"] == f"the caller pressed 4 5 {words}"
    assert final["text"] == words  # the keys are the agent's alone (review, stop 61)
    assert sources(h) == ["llm"]


async def test_nothing_follows_hangup_when_the_time_limit_stops_a_reply_to_words_over_its_message():
    # At the limit the message plays; the caller types over it ("wait, one more thing"):
    # the message stopped and their turn's reply was being prepared (the agent thinking)
    # when the time limit stopped it and hung up. That turn's metrics went out after
    # `hangup`. (Since review stop 61 the message plays whole and the turn queued behind it
    # gets no reply: its metrics still come before `hangup`.)
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    h.llm.first_token_s = 2.0
    await h.start()
    await h.wait(10100)
    assert sources(h) == ["goodbye"]
    await h.text("wait one more thing")
    await h.wait(3000)
    assert [e["reason"] for e in h.output.of("hangup")] == ["time_limit"]
    types = [e["type"] for e in h.output.events]
    assert types[types.index("hangup") + 1:] == [], types


async def test_a_reply_the_time_limit_stops_is_not_counted_as_a_callers_barge_in():
    # voicegate_barge_ins_total / interrupted_turns are "replies cut off by the caller"
    # (docs/operations.md). A reply still going after the time limit's grace is stopped by
    # the bot itself (`interrupt` cause time_limit): the caller never barged in.
    h = harness({"max_call_s": 10, "idle_prompt_s": 0})
    h.llm.reply = " ".join(f"Sentence {i} of a very long answer." for i in range(200))
    await h.start()
    await h.text("read me the terms")
    await h.wait(10000 + 30000 + 8000)
    (cut,) = h.output.of("interrupt")
    assert cut["cause"] == "time_limit"
    registry = h.deps.stats.prometheus.registry
    assert (h.stats.interrupted_turns,
            registry.get_sample_value("voicegate_barge_ins_total")) == (0, 0.0)


async def test_keys_ended_by_hash_while_the_caller_speaks_are_not_answered_over_them() -> None:
    """Review (stop 59): A caller reads out and keys their account number ("it's four five ... hash,
    and I also want to ask ..."): the `#` lands while they speak. ``_keypad_loop`` carries
    keys into the caller's turn only when the *pause* runs out during speech
    (``_carry_keys``); a `#` (or the 32nd key) goes straight to ``_keypad_turn``, whose
    reply starts while the caller is mid-utterance. Their speech began before it, so no
    barge-in stops it: the bot talks over the caller, the very thing
    tests/test_phone_line.py::test_collected_keys_are_not_answered_over_a_caller_who_is_speaking
    rules out for the pause."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Thank you, let me look that up for you now."
    await h.start()
    h.call.feed_dtmf("4")
    h.call.feed_dtmf("5")
    await h.wait(500)
    speech_from = h.clock.now()
    first = "uh that is my account number and"
    rest = "I also want to ask about my card please"
    await h.feed(h.vocabulary.audio(first))
    assert h.call._turns.in_utterance
    h.call.feed_dtmf("#")  # the end of the number, pressed mid-sentence
    await h.feed(h.vocabulary.audio(rest))
    speech_to = h.clock.now()
    await h.silence(2000)
    await h.stop()
    _assert_nothing_played_between(h, speech_from, speech_to)


@pytest.mark.parametrize("key, source", [("1", "cache"), ("0", "handoff")])
async def test_a_mapped_key_pressed_while_the_caller_speaks_is_not_answered_over_them(
        key, source):
    """Review (stop 60): keys whose pause runs out (or `#`) while the caller speaks are
    carried into their turn, but a mapped key pressed mid-sentence ("uh I want to know [1]
    when you are open on sunday") played its cached answer (or the handoff message) at once,
    over the caller's words, and no barge-in stopped it (their speech began before it). It
    acts as their words end, and supersedes them, as a key pressed while the agent thinks
    does: one reply, the key's."""
    h = harness({"keypad": {"0": "handoff", "1": "hours"}, "idle_prompt_s": 0},
                faqs={"opening hours": "hours"})
    h.llm.reply = "Okay."
    await h.start()
    speech_from = h.clock.now()
    await h.feed(h.vocabulary.audio("uh I want to know"))
    assert h.call._turns.in_utterance
    h.call.feed_dtmf(key)
    await h.feed(h.vocabulary.audio("when you are open on sunday please"))
    speech_to = h.clock.now()
    await h.silence(3000)
    await h.stop()
    _assert_nothing_played_between(h, speech_from, speech_to)
    assert sources(h) == [source], sources(h)
    assert [e["action"] for e in h.output.of("keypad")] == [{"1": "hours", "0": "handoff"}[key]]
    assert h.llm.requests == []  # the words the key superseded were not asked
    assert sorted(m["turn"] for m in h.metrics()) == [1, 2], h.metrics()


async def test_a_mapped_key_pressed_over_noise_that_never_ends_still_acts():
    """Review (stop 60), with the test above: the key waits for the caller's words to end,
    but a line whose noise never ends (a television) must not hold it for good: it acts a
    keypad pause later."""
    h = harness({"keypad": {"1": "hours"}, "keypad_pause_s": 2, "idle_prompt_s": 0},
                faqs={"opening hours": "hours"})
    await h.start()
    await h.feed(tone(1000))
    pressed = h.clock.now()
    h.call.feed_dtmf("1")
    await h.feed(tone(4000))
    assert h.call._turns.in_utterance  # the noise goes on
    await h.stop()
    (started,) = h.output.at("response", source="cache")
    assert pressed + 2.0 <= started <= pressed + 2.1, started - pressed


# ---------------------------------------------------------------------- review (stop 61)

# The caller keys their account number, then talks; the keypad pause (3 s) runs out 2 s into
# their words, so the keys open the turn those words end ("the caller pressed 4 9 2 1").
_SPOKEN = "uh I do not have my account number can I give you my name instead please"


async def _keys_then_words(h: CallHarness, end: str = "pause") -> None:
    """Keys, then words the keys are carried into: their pause runs out mid-utterance
    (``pause``), or the caller presses `#` mid-utterance (``hash``)."""
    await _keyed_4921(h)
    words = _SPOKEN.split()
    if end == "hash":
        await h.feed(h.vocabulary.audio(" ".join(words[:6])))
        assert h.call._turns.in_utterance
        h.call.feed_dtmf("#")
        await h.feed(h.vocabulary.audio(" ".join(words[6:])))
    else:
        await h.feed(h.vocabulary.audio(_SPOKEN))  # 3.2 s: the 3 s pause ends inside
    await h.silence(2000)
    await h.stop()
    [keypad] = h.output.of("keypad")
    assert keypad["keys"] == "4921" and keypad["action"] == "agent", keypad
    # The agent is still asked the keys with the words: that is why they are carried.
    asked = _last_asked(h)[-1]
    assert asked == f"the caller pressed 4 9 2 1 {_SPOKEN}", asked


def _holds_keys(text: object) -> bool:
    return "pressed" in str(text) or "4 9 2 1" in str(text) or "4921" in str(text)


@pytest.mark.parametrize("end", ["pause", "hash"])
async def test_keys_carried_into_a_spoken_turn_are_no_missed_question(end):
    """Review (stop 61): docs/protocol.md promises collected keys are never listed as missed
    questions (they may be a PIN or an account number), but keys collected while the caller
    speaks are joined into the words of their turn (``_carry_keys``, ``_spoken_turn``), and
    that joined text was the turn's missed question on /admin/misses: "the caller pressed 4 9
    2 1 uh I do not have my account number ...", which an operator can promote into the cache
    as a seed question. The words alone are the missed question."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    await _keys_then_words(h, end)
    assert [q.text for q in h.stats.missed_questions()] == [_SPOKEN]


async def test_the_answer_to_keys_carried_into_a_spoken_turn_is_no_draft_answer():
    """Review (stop 61): a missed question keeps the agent's answer as the draft a promotion
    publishes (``draft_answer``). Asked with the caller's keys, that answer is about them (it
    may read them back, or what they unlocked): no FAQ answer to the words alone, and the
    keys would reach the cache through it. A turn that carried keys leaves no draft."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.reply = "Thank you, I have found account 4 9 2 1 for you."
    await _keys_then_words(h)
    [missed] = h.stats.missed_questions()
    assert missed.answer is None, missed


@pytest.mark.parametrize("early_finals", [False, True])
@pytest.mark.parametrize("end", ["pause", "hash"])
async def test_keys_carried_into_a_spoken_turn_are_not_routed(end, early_finals):
    """Review (stop 61): keys carried into a spoken turn were routed against the FAQ cache as
    if spoken: the final's routing, the early final's at the pause (``_route_early``) and the
    partials' (``_with_carried_words``) all took "the caller pressed 4 9 2 1 ..." (a cached
    question the keys happen to precede may be missed, a number matched to an entry), and the
    `route` event (kept in a recording) carried the keys as its text. The cache routes the
    caller's words only."""
    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0},
                    early_finals=early_finals)
    await _keys_then_words(h, end)
    routed = [text for text, _ in h.router.calls]
    assert routed and not any(_holds_keys(text) for text in routed), routed
    [route] = h.output.of("route")
    assert route["text"] == _SPOKEN, route
    [final] = [e for e in h.output.of("transcript") if e["final"]]
    assert final["text"] == _SPOKEN, final


async def _keys_then_noise() -> CallHarness:
    """A call that keys 4921, then makes noise the recogniser hears no word in."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    await _keyed_4921(h)
    await h.feed(tone(3200, value=77))  # no word: the recogniser hears nothing in it
    await h.silence(2000)
    return h


async def test_keys_carried_into_a_turn_of_noise_still_reach_the_agent():
    """Review (stop 61), with the tests above: keys carried into an utterance that held no
    words (noise on the line, the keypad's own tones heard as speech) were routed as the
    turn's text ("the caller pressed 4 9 2 1") and listed as its missed question. They are
    still the agent's to answer, not an empty turn: the turn asks them, unrouted, with an
    empty transcript, and lists no missed question."""
    h = await _keys_then_noise()
    await h.stop()
    [keypad] = h.output.of("keypad")
    assert keypad["turn"] == 1, keypad
    assert _last_asked(h)[-1] == "the caller pressed 4 9 2 1"
    assert sources(h) == ["llm"]
    assert h.router.calls == [] and h.output.of("route") == []
    assert [e["text"] for e in h.output.of("transcript") if e["final"]] == [""]
    assert h.stats.missed_questions() == []


async def test_keys_carried_into_a_turn_of_noise_are_a_keypad_turn_in_the_stats():
    """Review (stop 62): keys carried into an utterance that held no words (noise) make a
    turn that asks the agent the keys alone, but its metrics say `input` `audio`, so
    ``stats.keyed`` did not know it: it was counted as a question, a miss (`turns`,
    `misses`, the hit rate, `voicegate_turns_total{outcome="miss"}`), though no question was
    asked that the cache could answer or miss. It is a keypad turn (``keys_only``): counted
    in `keypad_turns`, as the same keys pressed without the noise are; `input` stays `audio`
    (a client waits for its utterance's metrics by it)."""
    h = await _keys_then_noise()
    for key in "45#":  # the same without noise: a keypad turn
        h.call.feed_dtmf(key)
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["llm", "llm"]
    noise, keys = h.metrics()
    assert (noise["input"], noise.get("keys_only"), noise.get("empty")) == ("audio", True, None)
    assert keys["input"] == "dtmf" and "keys_only" not in keys
    snapshot = h.stats.snapshot()
    assert (snapshot["turns"], snapshot["hits"], snapshot["misses"],
            snapshot["keypad_turns"]) == (0, 0, 0, 2), snapshot
    assert snapshot["sources"] == {} and "miss" not in snapshot["latency_ms"], snapshot
    registry = h.stats.prometheus.registry
    assert registry.get_sample_value("voicegate_turns_total",
                                     {"outcome": "miss", "source": "llm"}) is None
    assert registry.get_sample_value("voicegate_keypad_turns_total", {"source": "llm"}) == 2


# Keys carried into a spoken turn (``_carry_keys``), then a typed message or a key that comes
# first: the carried *words* it supersedes are not asked (``_drop_carry``), but the keys are
# deliberate input their `keypad` event promised the agent: they go with that turn.

def _user_messages(h: CallHarness) -> list[str]:
    """Every caller message the agent's context held, over all its requests, in order."""
    seen: list[str] = []
    for request in h.llm.requests:
        for m in request:
            if m["role"] == "user" and m["content"] not in seen:
                seen.append(m["content"])
    return seen


def _nothing_else_holds_keys(h: CallHarness) -> None:
    """Keys carried with another turn stay the agent's alone (the previous fix). (A mapped
    key's own `route` says "the caller pressed 1", as ever: the carried keys are 4 9 2 1.)"""
    def carried(text: object) -> bool:
        return "4 9 2 1" in str(text) or "4921" in str(text)
    routed = [text for text, _ in h.router.calls]
    assert not any(carried(text) for text in routed), routed
    for kind in ("route", "transcript"):
        assert not any(carried(e.get("text")) for e in h.output.of(kind)), h.output.of(kind)
    assert not any(carried(q.text) or carried(q.answer)
                   for q in h.stats.missed_questions()), h.stats.missed_questions()


async def test_keys_carried_into_a_spoken_turn_go_with_a_message_typed_before_it_ends():
    """Review (stop 61): keys whose pause runs out while the caller speaks are carried into
    the turn their words end, and their `keypad` event names that turn; a `text` message
    typed before those words end (the caller types their question as they talk) is a turn
    of its own, whose ``_answer`` ran ``_drop_carry``: the carry's keys were thrown away
    with any carried words. The account number the caller keyed never reached the agent,
    and nothing told the client. They go with the typed turn, before its text, to the agent
    alone; that turn took the number the `keypad` event named."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    await _keyed_4921(h)
    words = _SPOKEN.split()
    await h.feed(h.vocabulary.audio(" ".join(words[:12])))  # the 3 s pause runs out in it
    assert h.call._turns.in_utterance
    [keypad] = h.output.of("keypad")
    assert keypad["keys"] == "4921" and keypad["action"] == "agent", keypad
    await h.text("what is my balance")
    await h.feed(h.vocabulary.audio(" ".join(words[12:])))
    await h.silence(2000)
    await h.stop()
    asked = _user_messages(h)
    assert "the caller pressed 4 9 2 1 what is my balance" in asked, asked
    [typed] = [m for m in h.metrics() if m.get("input") == "text"]
    assert typed["turn"] == keypad["turn"], (typed, keypad)
    _nothing_else_holds_keys(h)
    assert [q.text for q in h.stats.missed_questions()] == ["what is my balance", _SPOKEN]


async def test_keys_carried_with_words_a_typed_message_supersedes_go_with_the_message():
    """Review (stop 61), with the test above: the caller keys their number, talks, and types
    while the agent thinks about it. The message stops that spoken turn before it said
    anything and supersedes its words (not asked: ``_drop_carry``), and the keys carried in
    them were dropped too. The keys go with the message."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.first_token_s = 2.0
    await _keyed_4921(h)
    await h.feed(h.vocabulary.audio(_SPOKEN))
    await h.silence(600)  # the turn ended; the agent thinks
    assert h.output.of("response") == []
    await h.text("sorry what is my balance")
    await h.wait(4000)
    await h.stop()
    asked = _user_messages(h)
    assert asked[-1] == "the caller pressed 4 9 2 1 sorry what is my balance", asked
    assert not any(_SPOKEN in m and m.endswith("balance") for m in asked), asked
    _nothing_else_holds_keys(h)


async def test_keys_carried_into_words_a_mapped_key_supersedes_go_with_the_key():
    """Review (stop 61), with the tests above: keys carried into the caller's words, then a
    mapped key pressed before those words end: it acts as they end and supersedes them, and
    the carried keys were dropped with them. They go with the mapped key's turn: the agent's
    context holds them (asked the next time, here after a typed message)."""
    h = harness({"keypad": {"1": "hours"}, "keypad_pause_s": 3, "idle_prompt_s": 0},
                faqs={"opening hours": "hours"})
    await _keyed_4921(h)
    words = _SPOKEN.split()
    await h.feed(h.vocabulary.audio(" ".join(words[:12])))
    assert h.call._turns.in_utterance and h.output.of("keypad")
    h.call.feed_dtmf("1")
    await h.feed(h.vocabulary.audio(" ".join(words[12:])))
    await h.silence(3000)
    await h.text("thanks and one more thing")
    await h.wait(2000)
    await h.stop()
    assert sources(h) == ["cache", "llm"], sources(h)
    asked = _user_messages(h)
    assert "the caller pressed 4 9 2 1 the caller pressed 1" in asked, asked
    _nothing_else_holds_keys(h)


async def test_keys_carried_after_a_message_took_its_turn_stay_with_the_turn_they_name():
    """Review (stop 61), with the tests above: a message typed while the caller talks over a
    reply still closing (its LLM stream's teardown) takes its turn number at once but is
    asked only once that reply is over; keys whose pause runs out meanwhile are named for
    the turn after it (the caller's words). They were dropped by the message's turn as it
    began; taken up by it, they would reach the agent before the message, out of order, in
    a turn their `keypad` event did not name. They stay carried for the turn they name."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0, "false_interruption_s": 0})
    h.llm.first_token_s = 1.5
    h.llm.close_s = 2.0
    await _keyed_4921(h)
    await h.text("hello there")  # turn 1: the agent thinks
    words = _SPOKEN.split()
    await h.feed(h.vocabulary.audio(" ".join(words[:4])))  # talked over: turn 1 stops
    assert h.call._turns.in_utterance and h.output.of("keypad") == []
    await h.text("what is my balance")  # turn 2, behind turn 1's stream closing
    await h.feed(h.vocabulary.audio(" ".join(words[4:])))  # the keys' pause runs out
    await h.silence(2000)
    await h.wait(6000)
    await h.stop()
    [keypad] = h.output.of("keypad")
    assert keypad["turn"] == 3, keypad
    assert [m["turn"] for m in h.metrics() if m.get("input") == "text"] == [1, 2]
    asked = _last_asked(h)
    assert asked == ["hello there", "what is my balance",
                     f"the caller pressed 4 9 2 1 {_SPOKEN}"], asked
    _nothing_else_holds_keys(h)


async def test_keys_a_message_took_up_go_on_with_it_when_the_caller_talks_over_it():
    """Review (stop 61), with the tests above: a message that took up carried keys and is
    then talked over before its reply says anything hands its words on to the next spoken
    turn (``_typed_turn``); the keys go on with them, before them, not lost with its reply."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0, "false_interruption_s": 0})
    h.llm.first_token_s = 2.0
    await _keyed_4921(h)
    await h.feed(h.vocabulary.audio(_SPOKEN))
    await h.silence(600)  # the turn ended; the agent thinks
    await h.text("sorry what is my balance")  # supersedes the words, takes the keys
    await h.wait(500)
    assert h.output.of("response") == []
    await h.say("and my savings too")  # talked over before its reply said anything
    await h.wait(4000)
    await h.stop()
    asked = _last_asked(h)
    assert asked[-1] == "the caller pressed 4 9 2 1 sorry what is my balance and my savings " \
        "too", asked
    _nothing_else_holds_keys(h)


# ---------------------------------------------------------------------- review (stop 62)


async def test_a_provider_dead_for_the_call_hands_off_after_three_failed_turns():
    """Review (stop 62): a provider dead for the rest of the call (Deepgram refusing every
    reconnect after a key rotation, a revoked LLM or voice key) failed every turn, and
    every turn got the apology ("could you say that again"): the caller repeated themselves
    for good, never reaching anyone who could help. The third turn in a row a provider
    fails is handed off as a ``handoff`` intent is: its message, its event, the transfer."""
    h = await harness().start()
    h.stt.fail_finals = 10_000  # speech recognition is gone for the rest of the call
    for words in ("my card was stolen", "my card was stolen", "please my card"):
        await h.say(words, then_silence_ms=1500)
    await h.wait(1000)
    assert sources(h) == ["apology", "apology", "handoff"]
    (handoff,) = h.output.of("handoff")
    assert "repeated provider failure" in handoff["reason"] and "stt_failed" in handoff["reason"]
    assert [reason for _, reason in h.output.transfers] == [handoff["reason"]]
    assert h.stats.errors["repeated_failure_handoff"] == 1
    assert h.metrics()[-1]["transferred"] is True
    await h.stop()


async def test_an_answered_turn_starts_the_count_of_failed_turns_again():
    h = harness()
    h.llm.reply = "FAIL the voice is gone."  # every LLM sentence fails its synthesis
    await h.start()
    for words in ("where is my card", "where is my card"):
        await h.text(words)
        await h.wait(1500)
    h.llm.reply = "It is on its way."  # answered: the count starts again
    await h.text("where is my card")
    await h.wait(1500)
    h.llm.reply = "FAIL the voice is gone again."
    for words in ("and my pin", "and my pin"):
        await h.text(words)
        await h.wait(1500)
    await h.stop()
    assert sources(h) == ["apology", "apology", "llm", "apology", "apology"]
    assert h.output.transfers == [] and h.output.of("handoff") == []


async def test_a_line_that_cannot_hand_off_keeps_apologising_and_stays_up():
    # A phone line with nowhere to transfer to (no handoff number): the apology, as
    # before, not a handoff message promising a colleague, and never a hang-up.
    h = harness()
    h.output.can_transfer = False  # type: ignore[attr-defined]
    h.llm.reply = "FAIL the voice is gone."
    await h.start()
    for _ in range(4):
        await h.text("where is my card")
        await h.wait(1500)
    await h.stop()
    assert sources(h) == ["apology"] * 4
    assert h.output.transfers == [] and h.output.hangups == []
    assert h.call.ended is None and "repeated_failure_handoff" not in h.stats.errors


async def test_on_the_native_protocol_the_repeated_failure_is_the_handoff_event():
    h = CallHarness()  # no transfer: the `handoff` event is the contract
    h.llm.reply = "FAIL the voice is gone."
    await h.start()
    for _ in range(3):
        await h.text("where is my card")
        await h.wait(1500)
    await h.stop()
    assert sources(h) == ["apology", "apology", "handoff"]
    (handoff,) = h.output.of("handoff")
    assert handoff["turn"] == 3 and "tts_failed" in handoff["reason"]


async def test_a_line_that_cannot_hand_off_apologises_when_every_llm_failed():
    """Review (stop 62): on a phone line with nowhere to transfer to (no handoff number or
    no REST credentials), every LLM failing made the agent hand off: the caller heard "I'm
    going to connect you with a colleague ... stay on the line", then "I couldn't put you
    through", every turn, a promise the line could never keep. Where the line cannot hand
    off, a handoff that comes from a failure is the ordinary apology: no handoff message,
    no transfer attempted, counted as ``handoff_unavailable``, and the call goes on."""
    h = harness()
    h.output.can_transfer = False  # type: ignore[attr-defined]
    await h.start()
    for _ in range(3):
        h.llm.fail_next = 1  # every LLM failed before a word
        await h.text("tell me about loans")
        await h.wait(1500)
    h.llm.reply = "Loans start at five percent."
    await h.text("tell me about loans")
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["apology", "apology", "apology", "llm"]
    assert h.output.of("handoff") == [] and h.output.transfers == []
    assert [e["code"] for e in h.output.of("error")] == ["llm_failed"]  # sent once, rate-limited
    assert h.stats.errors["llm_failed"] == 3 and h.stats.errors["handoff_unavailable"] == 3
    assert "transfer_failed" not in h.stats.errors
    assert h.call.ended is None and h.output.hangups == []


# ---------------------------------------------------------------------- review (stop 63)


def _person_line(settings: dict[str, Any] | None = None, *,
                 can_transfer: bool | None = False) -> CallHarness:
    """A call whose router sends words asking for a person to a ``handoff`` intent, with
    the handoff key 0: a phone line that cannot transfer (``can_transfer`` False: no
    handoff number or no REST credentials), or (None) the native protocol, no transfer."""
    from gateway.call import Call

    # As TwilioOutput.transfer with no number: a transfer tried anyway fails.
    h = harness({"keypad": {"0": "handoff"}, "idle_prompt_s": 0, **(settings or {})},
                fail_transfer=can_transfer is False)
    if can_transfer is None:
        h.output = RecordingOutput(h.clock)  # native: the `handoff` event is the contract
    else:
        h.output.can_transfer = can_transfer  # type: ignore[attr-defined]
    h.router = PersonRouter()
    h.deps.router = h.router
    h.call = Call(h.deps, h.output, 16000, call_id="test-call")
    return h


async def _ask_for_a_person(h: CallHarness, how: str) -> None:
    if how == "intent":  # a FAQ entry whose action is handoff
        await h.text("I want a person please")
    elif how == "key":
        h.call.feed_dtmf("0")
    else:  # the agent's own handoff: no LLM configured, a miss is a handoff
        await h.text("tell me about loans")
    await h.wait(3000)


@pytest.mark.parametrize("how", ["intent", "key", "no_llm"])
async def test_a_line_that_cannot_transfer_never_promises_a_colleague(how):
    """Review (stop 63): on a phone line that cannot transfer (no handoff number or no
    REST credentials: ``can_transfer`` False) a handoff asked for (a ``handoff`` intent, the
    handoff key, the agent handing off with no LLM to ask) still played "I'm going to
    connect you with a colleague ... please stay on the line", sent its `handoff` event
    and tried a transfer bound to fail, then "I couldn't put you through": a promise the
    line could never keep. Only a handoff after a failure was spared it (stop 62). Where
    the line cannot hand off, no handoff plays its message: the caller hears that they
    cannot be put through on this line and that the bot goes on helping, nothing is
    transferred, it is counted and logged as ``handoff_unavailable``, the call stays up, and
    the agent's next turn knows what the caller heard."""
    h = _person_line()
    if how == "no_llm":
        h.agent.llm = None
    await h.start()
    await _ask_for_a_person(h, how)
    texts = [e["text"] for e in h.output.of("response")]
    assert HANDOFF_MESSAGE not in texts and TRANSFER_FAILED_MESSAGE not in texts, texts
    assert texts == [HANDOFF_UNAVAILABLE_MESSAGE] and sources(h) == ["apology"], texts
    assert h.output.of("handoff") == [] and h.output.transfers == []
    assert h.output.of("error") == []  # nothing failed: counted and logged only
    assert h.stats.errors["handoff_unavailable"] == 1
    assert "transfer_failed" not in h.stats.errors
    (metrics,) = h.metrics()  # no handoff, no transfer: a turn the bot answered itself
    assert "handoff" not in metrics and "transferred" not in metrics
    assert metrics["source"] == "apology" and metrics["handoff_unavailable"]
    if how == "no_llm":
        await h.stop()
        return
    asked = len(h.llm.requests)
    await h.text("hello are you there")
    await h.wait(1500)
    await h.stop()
    assert sources(h) == ["apology", "llm"]
    assert h.call.ended is None and h.output.hangups == []
    (request,) = h.llm.requests[asked:]
    assert [m["content"] for m in request if m["role"] == "assistant"] == [
        HANDOFF_UNAVAILABLE_MESSAGE], request
    assert request[-1] == {"role": "user", "content": "hello are you there"}


@pytest.mark.parametrize("how", ["intent", "key"])
async def test_on_the_native_protocol_a_handoff_asked_for_is_still_the_handoff(how):
    # Natively the client moves the caller (the `handoff` event): always able to hand off.
    h = _person_line(can_transfer=None)
    await h.start()
    await _ask_for_a_person(h, how)
    await h.stop()
    assert sources(h) == ["handoff"] and len(h.output.of("handoff")) == 1
    assert h.output.of("response")[0]["text"] == HANDOFF_MESSAGE
    assert "handoff_unavailable" not in h.stats.errors


# ---------------------------------------------------------------------- review (stop 64)

_SHORT = "I do not have the rest"  # 1.2 s: the caller stops before the keys' 3 s pause ends


@pytest.mark.parametrize("early_finals", [False, True])
async def test_keys_then_a_short_sentence_are_one_turn_keys_first(early_finals):
    """Review (stop 64): keys, then words that end before the keypad pause runs out (the
    caller keys 4 9 2 1 and says "I do not have the rest" in a second): the words' turn was
    answered on its own, the agent asked "I do not have the rest" with no keys before it,
    and the keys' pause ran out after that reply, a second turn and reply behind it, the
    agent asked "the caller pressed 4 9 2 1" last: two replies, in the reverse of the order
    the caller acted. Only keys whose pause ran out mid-utterance went with the words. Keys
    still being collected when the caller's words are decoded now open that turn too: one
    reply, the agent asked the keys before the words; the keys stay out of its transcript
    and routing."""
    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0},
                    early_finals=early_finals)
    await _keyed_4921(h)
    await h.say(_SHORT, then_silence_ms=4000)
    await h.stop()
    assert _last_asked(h) == [f"the caller pressed 4 9 2 1 {_SHORT}"], _last_asked(h)
    assert sources(h) == ["llm"], sources(h)
    [keypad] = h.output.of("keypad")
    [final] = [e for e in h.output.of("transcript") if e["final"]]
    assert keypad["keys"] == "4921" and keypad["action"] == "agent", keypad
    assert keypad["turn"] == final["turn"] and final["text"] == _SHORT, (keypad, final)
    assert not any(_holds_keys(text) for text, _ in h.router.calls), h.router.calls
    assert [m["turn"] for m in h.metrics()] == [final["turn"]], h.metrics()


async def test_keys_pressed_around_noise_that_ends_stay_one_number():
    """Review (stop 64), with the test above: noise that ends while keys are collected (a
    cough, the keypad's own tones heard as speech) has no words to go with: the collection
    goes on, and the keys pressed after it are the same number."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    await h.start()
    for key in "49":
        h.call.feed_dtmf(key)
    await h.feed(tone(400, value=77))  # no word: the recogniser hears nothing in it
    await h.silence(500)
    for key in "21":
        h.call.feed_dtmf(key)
    await h.wait(4000)
    await h.stop()
    assert [e["keys"] for e in h.output.of("keypad")] == ["4921"]
    assert _last_asked(h) == ["the caller pressed 4 9 2 1"], _last_asked(h)


async def test_keys_then_words_stopped_before_their_reply_spoke_go_on_with_the_next_words():
    """Review (stop 64), with the tests above: the keys the words' turn took up are carried
    with those words when the caller talks on before its reply says anything: the next
    turn asks them all, in order, once."""
    h = CallHarness(settings={"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.first_token_s = 2.0  # the agent thinks while the caller goes on
    await _keyed_4921(h)
    await h.say(_SHORT, then_silence_ms=600)
    await h.say("but here is my name", then_silence_ms=4000)
    await h.stop()
    answered = [r for r in _last_asked(h)]
    assert answered[-1] == f"the caller pressed 4 9 2 1 {_SHORT} but here is my name", answered
    assert sources(h) == ["llm"], sources(h)
    assert [e["keys"] for e in h.output.of("keypad")] == ["4921"]


@pytest.mark.parametrize("how", ["intent", "key"])
async def test_a_native_caller_waiting_for_a_person_is_not_hung_up_as_idle(how):
    """Review (stop 64): on the native protocol the `handoff` event is the contract (the
    client puts the caller through), but only a Twilio transfer stopped the idle count. A
    caller told "I'm going to connect you with a colleague ... stay on the line" who then
    waited in silence (as asked; the client connecting the person with the socket still
    open) heard "Are you still there?" after idle_prompt_s, then the goodbye, and `hangup`
    closed the call on them, the person never reached. After a handoff the silence is the
    caller waiting, not gone: no prompt, no goodbye, no hang-up. Once the caller acts again
    (the client kept them with the bot) the bot answers and its silence is watched again."""
    h = _person_line({"idle_prompt_s": 8}, can_transfer=None)
    await h.start()
    await _ask_for_a_person(h, how)
    assert sources(h) == ["handoff"] and len(h.output.of("handoff")) == 1
    await h.silence(10000)  # the client streams the line while it connects the person
    await h.feed(tone(400, value=77))  # a cough: no words, no reply, still waiting
    await h.silence(30000)
    assert sources(h) == ["handoff"], sources(h)
    assert h.output.of("hangup") == [] and h.call.ended is None
    # The caller is back with the bot: answered, then the idle watch as before.
    h.llm.reply = "Sure."
    await h.text("hello is anyone there")
    await h.wait(2000)
    assert sources(h)[-1] in ("llm", "handoff"), sources(h)
    after = len(sources(h))
    await h.wait(20000)
    assert sources(h)[after:] == ["prompt", "goodbye"], sources(h)
    assert [e["reason"] for e in h.output.of("hangup")] == ["idle"]
    await h.stop()


async def test_keys_carried_into_words_that_fail_to_decode_go_on_to_the_next_turn():
    """Review (stop 70): the caller keys 4 9 2 1, then talks; the keypad pause runs out
    mid-utterance, so the keys are carried into the turn those words end (their `keypad`
    event names it, promising them to the agent). The recogniser fails on those words: the
    turn is `stt_failed`, the caller hears "could you say that again?", and the keys went
    with the lost words, though they were never the recogniser's: the words said again
    reached the agent without them. Keys are no words to say again: they open the next
    turn, before its words."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.stt.fail_finals = 1
    await _keyed_4921(h)
    await h.feed(h.vocabulary.audio(_SPOKEN))  # 3.2 s: the 3 s pause ends inside
    await h.silence(2000)
    assert [(e["code"], e["turn"]) for e in h.output.of("error")] == [("stt_failed", 1)]
    assert sources(h) == ["apology"]
    await h.say("my name is john", then_silence_ms=1500)
    await h.wait(1000)
    await h.stop()
    assert _last_asked(h) == ["the caller pressed 4 9 2 1 my name is john"], _last_asked(h)
    [keypad] = h.output.of("keypad")
    assert (keypad["keys"], keypad["turn"]) == ("4921", 1), keypad
    _nothing_else_holds_keys(h)


async def test_keys_an_exchange_asked_are_not_asked_again_after_words_that_fail_to_decode():
    """Review (stop 70): the caller keys 4 9 2 1 and says a short sentence; the agent is
    asked both and thinks. The caller talks on before it says anything: that turn is
    stopped, its question (keys and words) carried on, its exchange still in the agent's
    context for the next turn to take back. The recogniser fails on the words said next
    (`stt_failed`, "could you say that again?"): nothing took that exchange back, and the
    keys were carried on all the same (those of failed words open the next turn): the
    agent read the number twice, as if pressed twice. Keys an exchange that stays asked
    are not asked again."""
    h = harness({"keypad_pause_s": 3, "idle_prompt_s": 0})
    h.llm.first_token_s = 2.0  # the agent thinks while the caller goes on
    await _keyed_4921(h)
    await h.say(_SHORT, then_silence_ms=600)
    assert _last_asked(h) == [f"the caller pressed 4 9 2 1 {_SHORT}"], _last_asked(h)
    h.stt.fail_finals = 1
    await h.say("but here is my name", then_silence_ms=1500)
    assert [e["code"] for e in h.output.of("error")] == ["stt_failed"]
    await h.say("my name is john", then_silence_ms=4000)
    await h.stop()
    last = [str(m["content"]) for m in h.llm.requests[-1] if m["role"] == "user"]
    assert sum("4 9 2 1" in m for m in last) == 1, last
    assert last[-1].endswith("my name is john"), last
    _nothing_else_holds_keys(h)
