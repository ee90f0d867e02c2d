"""The agent: tools with filler, handoff, cancellation, context and barge-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any, AsyncIterator

import httpx
import pytest
from prometheus_client import generate_latest

from gateway.agent import (APOLOGY_MESSAGE, DEFAULT_SYSTEM_PROMPT, HOLD_PHRASES, Agent,
                           Conversation, Handoff, Sentence, Slow, StillWorking, ToolStarted)
from gateway.clock import Clock, ManualClock
from gateway.hedge import HedgedChat
from gateway.providers.base import LLMChunk, ProviderError, ToolCall, ToolSpec
from gateway.providers.openai_llm import OpenAIChat
from gateway.sentences import SentenceChunker
from gateway.settings import Settings
from gateway.tools import MAX_RESULT_CHARS, ToolConfigError, ToolRunner, load_tools
from gateway.agent import build_agent
from gateway.audio_bank import Clip
from tests.call_harness import FRAME_MS, RATE, CallHarness, ScriptedLLM, frame_number, tone
from tests.fakes.openai_server import STALL, Reply

BALANCE = ToolSpec(name="get_balance", description="The caller's account balance.",
                   parameters={"type": "object", "properties": {"account": {"type": "string"}},
                               "required": ["account"]})


def tool_script(answer: str = "Your balance is twelve dollars. Anything else?"):
    """First request: call the tool. Once a tool result is in the context: answer."""
    def script(body):
        if any(m.get("role") == "tool" for m in body["messages"]):
            return Reply(text=answer)
        return Reply(text="", tool_calls=[("get_balance", '{"account": "42"}')])
    return script


def make_agent(server, *models: str, tools=(), webhook_url: str = "", timeout_s: float = 5.0,
               **hedge) -> Agent:
    """The hedge on a manual clock unless ``hedge`` gives one: no hedge delay or LLM timeout
    passes unless the test advances it, so no outcome depends on how fast a loaded machine
    answers (as tests/test_hedge.py's ``pair``)."""
    hedge.setdefault("clock", ManualClock())
    url = server.url + "/v1"
    specs = [ToolSpec(t.name, t.description, t.parameters, url=webhook_url + "/tool/" + t.name,
                      timeout_s=timeout_s) for t in tools]
    chats = [OpenAIChat(m, base_url=url, name=m) for m in models]
    llm = HedgedChat(chats[0], chats[1] if len(chats) > 1 else None, **hedge)
    return Agent(llm, specs, filler_after_s=None)


async def run(agent: Agent, text: str, conversation: Conversation | None = None,
              clock: ManualClock | None = None):
    """The turn's events, on ``clock`` (a ManualClock of its own unless given): no tool's
    timeout_s passes unless the test advances it, however slowly the webhook answers."""
    conversation = conversation or agent.new_conversation()
    events = agent.respond(conversation, text, clock=clock or ManualClock())
    return [event async for event in events], conversation


async def test_tool_call_plays_filler_before_the_answer_and_result_reaches_model(llm_server, webhook):
    fake, server = llm_server
    hook, hook_server = webhook
    hook.handler = lambda payload: {"balance": "12.00", "currency": "USD"}
    fake.script = tool_script()
    agent = make_agent(server, "m", tools=[BALANCE], webhook_url=hook_server.url)

    events, conversation = await run(agent, "What's my balance?")

    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ToolStarted" and events[0].name == "get_balance"
    assert [e.text for e in events if isinstance(e, Sentence)] == [
        "Your balance is twelve dollars.", "Anything else?"]
    assert hook.calls == [{"tool": "get_balance", "call_id": events[0].call_id,
                           "arguments": {"account": "42"}}]
    second = fake.stats.bodies[-1]["messages"]
    tool_messages = [m for m in second if m["role"] == "tool"]
    assert json.loads(tool_messages[0]["content"]) == {"balance": "12.00", "currency": "USD"}
    assert second[-2]["tool_calls"][0]["function"]["name"] == "get_balance"
    await agent.aclose()


async def test_tool_timeout_goes_back_to_the_model_as_an_error(llm_server, webhook):
    # timeout_s passes on the turn's clock (a manual one): the webhook holds its answer
    # until the test releases it, after the timeout, when it comes too late.
    fake, server = llm_server
    hook, hook_server = webhook
    hook.hold = True
    fake.script = tool_script("Sorry, I can't reach your account right now.")
    agent = make_agent(server, "m", tools=[BALANCE], webhook_url=hook_server.url, timeout_s=30.0)
    clock = ManualClock()
    turn = asyncio.create_task(run(agent, "What's my balance?", clock=clock))
    try:
        assert await hook.calls.reach(1), "the tool was never called"
        await clock.advance(29.9)
        assert not turn.done()  # waiting for the tool, within its timeout
        await clock.advance(0.1)
        hook.release.set()  # the answer, now too late
        events, _ = await turn
    finally:
        turn.cancel()
        await agent.aclose()

    assert isinstance(events[0], ToolStarted)
    assert any(isinstance(e, Sentence) and "can't reach" in e.text for e in events)
    tool_message = [m for m in fake.stats.bodies[-1]["messages"] if m["role"] == "tool"][0]
    assert json.loads(tool_message["content"]) == {
        "error": "get_balance did not answer within 30 seconds"}


async def test_a_trickling_webhook_is_cut_off_at_the_tool_timeout(webhook):
    # Every byte comes well within timeout_s (a space every 10 ms), the whole answer only
    # once the test releases it, after timeout_s of the runner's clock (a manual one):
    # timeout_s bounds the call, not each read.
    hook, hook_server = webhook
    hook.hold, hook.trickle_s = True, 0.01
    hook.handler = lambda payload: {"balance": "12.00"}
    runner = ToolRunner([ToolSpec("get_balance", "", url=hook_server.url + "/tool/get_balance",
                                  timeout_s=30.0)])
    clock = ManualClock()
    call = asyncio.create_task(runner.run(ToolCall("call_1", "get_balance", "{}"), clock))
    try:
        assert await hook.trickled.reach(3), "the webhook never began its answer"
        await clock.advance(29.9)
        assert not call.done()  # still reading, within the timeout
        await clock.advance(0.1)
        hook.release.set()  # the rest of the answer, now too late
        content, ok = await call
    finally:
        call.cancel()
        await runner.aclose()
    assert not ok
    assert json.loads(content) == {"error": "get_balance did not answer within 30 seconds"}


async def test_no_llm_configured_is_a_handoff():
    agent = build_agent(Settings())
    events, _ = await run(agent, "hello")
    assert events == [Handoff("no LLM configured")]
    await agent.aclose()


async def test_every_llm_failing_is_a_handoff_never_silence(llm_server):
    fake, server = llm_server
    fake.replies["a"] = Reply(status=500)
    fake.replies["b"] = Reply(malformed_at=1)
    agent = make_agent(server, "a", "b", hedge_delay_s=0.0)
    events, _ = await run(agent, "hello")
    assert len(events) == 1 and isinstance(events[0], Handoff) and events[0].failed
    assert "every LLM failed" in events[0].reason
    await agent.aclose()


async def test_every_llm_failing_is_counted_as_llm_failed():
    """Both LLM providers are down. The caller hears the handoff message (good), but the
    operator sees nothing: no ``voicegate_errors_total{code="llm_failed"}``, no ``error``
    event to the client; the only trace is a rising share of ``source="handoff"`` turns,
    which intent-routed handoffs also produce (HedgeStats' all_failed / leg_failures are
    kept but never exported). A total LLM outage must be counted as ``llm_failed``, as the
    architecture promises for every stage failure, while the handoff still plays."""
    h = CallHarness()
    primary, secondary = ScriptedLLM(), ScriptedLLM()
    primary.fail_next = secondary.fail_next = 100  # down for good
    h.agent.llm = HedgedChat(primary, secondary, hedge_delay_s=0.0)  # type: ignore[arg-type]
    await h.start()
    await h.text("can you help me with my mortgage")
    await h.wait(3000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["handoff"]
    assert h.agent.llm.stats.all_failed >= 1  # type: ignore[union-attr]
    assert h.stats.errors["llm_failed"] == 1, (
        f"every LLM failed, yet errors counted are {dict(h.stats.errors)} and the client got "
        f"error events {h.output.of('error')}")
    assert [e["code"] for e in h.output.of("error", turn=1)] == ["llm_failed"]
    # The hedge's own counters are exported beside the errors (Services wires them so).
    h.stats.watch_hedge(h.agent.llm.stats)  # type: ignore[union-attr]
    exposed = generate_latest(h.stats.prometheus.registry).decode()
    assert "voicegate_llm_all_failed_total 1.0" in exposed
    assert "voicegate_llm_leg_failures_total 2.0" in exposed


async def test_winner_breaking_after_its_first_token_is_retried_not_handed_off(llm_server):
    """The winning provider streams its first token ("Sure,") and then its stream breaks
    (a malformed chunk, a reset connection) before a single sentence was said. The other
    provider was cancelled at that first token and is never asked: the agent hands the
    caller to a human ("every LLM failed" is what Handoff documents, but only one request
    failed, and nothing had been said). A transient mid-stream blip of one provider thus
    transfers callers a retry would have answered. Nothing was said: the round should be
    asked again (the hedged pair), and the caller hear the answer."""
    fake, server = llm_server
    requests: list[str] = []

    def script(body: dict[str, Any]) -> Reply:
        requests.append(body["model"])
        if len(requests) == 1:  # the first request's stream breaks after "Sure,"
            return Reply(text="Sure, your balance is twelve dollars.", malformed_at=2)
        return Reply(text="Your balance is twelve dollars.")

    fake.script = script
    url = server.url + "/v1"
    llm = HedgedChat(OpenAIChat("primary", base_url=url, name="primary"),
                     OpenAIChat("secondary", base_url=url, name="secondary"),
                     hedge_delay_s=600.0, clock=ManualClock())  # no hedge or timeout passes
    agent = Agent(llm, filler_after_s=None)
    try:
        events = [e async for e in agent.respond(agent.new_conversation(), "what's my balance")]
    finally:
        await agent.aclose()
    assert llm.stats.primary_wins >= 1  # "Sure," won the race
    assert not any(isinstance(e, Handoff) for e in events) and \
        Sentence("Your balance is twelve dollars.") in events, (
            f"events {events}; requests made {requests}")


async def test_a_winner_breaking_again_on_the_retry_is_handed_off():
    # Asked again once a turn, not for ever: the second break is an outage (a handoff).
    broken = [LLMChunk(text="Sure"), ProviderError("openai:primary", "connection reset")]
    llm = ScriptLLM(list(broken), list(broken))
    agent = Agent(llm, filler_after_s=None)  # type: ignore[arg-type]
    events, conversation = await run(agent, "what's my balance")
    assert len(events) == 1 and isinstance(events[0], Handoff) and events[0].failed
    assert llm.scripts == [] and conversation.history[-1]["role"] == "user"


@pytest.mark.parametrize("again", ["answers", "breaks-too"])
async def test_a_round_after_a_tool_whose_winner_breaks_is_asked_again_too(again):
    """Review (stop 69): the round after a tool call, its preface ("Let me check that for
    you.") said in the round before, won by a stream that broke after its first token
    before the round said a word, was never asked again, though the docs say a round
    broken so is ("before the round said or called anything"): the turn had spoken, so
    the agent raised at once, and the caller heard the apology and was asked to say it
    all again, the tool already run and its result one request away. Asked again once;
    broken again, the apology as before."""
    call = ToolCall("call_1", "get_balance", "{}")
    broken = [LLMChunk(text="Your"), ProviderError("openai:primary", "connection reset")]
    retry = [LLMChunk(text="Your balance is twelve dollars.")] if again == "answers" \
        else list(broken)
    llm = ScriptLLM([LLMChunk(text="Let me check that for you. "), LLMChunk(tool_call=call)],
                    list(broken), retry)
    runner = BalanceRunner()
    agent = Agent(llm, [BALANCE], runner=runner, filler_after_s=None)  # type: ignore[arg-type]
    conversation = agent.new_conversation()
    seen: list = []
    with contextlib.suppress(ProviderError) if again == "breaks-too" else contextlib.nullcontext():
        async for event in agent.respond(conversation, "what is my balance", clock=ManualClock()):
            seen.append(event)
    assert llm.scripts == [] and len(runner.calls) == 1  # asked again once; the tool ran once
    said = [Sentence("Let me check that for you."), ToolStarted("get_balance", "call_1")]
    if again == "answers":
        assert seen == [*said, Sentence("Your balance is twelve dollars.")], seen
        assert conversation.history[-1] == {"role": "assistant",
                                            "content": "Your balance is twelve dollars."}
    else:  # raised: the call reports llm_failed and apologises after the preface
        assert seen == said and conversation.history[-1]["role"] == "tool"


async def test_an_empty_reply_after_a_tool_result_is_asked_again(llm_server, webhook):
    """The model answers the round after a tool result with nothing (no text, no tool
    call), as small models often do. The hedge took that for a failed leg: the caller
    heard the filler, then the handoff, counted as an LLM outage. The round is asked
    again once; the second answer is the reply."""
    fake, server = llm_server
    hook, hook_server = webhook
    hook.handler = lambda payload: {"balance": "12.00"}
    after_tool: list[int] = []

    def script(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["role"] == "tool":
            after_tool.append(1)
            return Reply(text="" if len(after_tool) == 1 else "Your balance is twelve dollars.")
        return Reply(text="", tool_calls=[("get_balance", '{"account": "42"}')])

    fake.script = script
    agent = make_agent(server, "m", tools=[BALANCE], webhook_url=hook_server.url)
    try:
        events, conversation = await run(agent, "What's my balance?")
    finally:
        await agent.aclose()
    assert [type(e).__name__ for e in events] == ["ToolStarted", "Sentence"], events
    assert events[1] == Sentence("Your balance is twelve dollars.")
    assert len(after_tool) == 2 and len(hook.calls) == 1  # asked again; the tool ran once
    assert agent.llm.stats.empty_replies == 1 and agent.llm.stats.all_failed == 0  # type: ignore[union-attr]
    assert conversation.history[-1] == {"role": "assistant",
                                        "content": "Your balance is twelve dollars."}


async def test_an_empty_reply_twice_hands_off_as_no_outage():
    """Empty again when asked again: a person takes over (never silence, even after a
    preface), reported as llm_empty_reply, not as llm_failed (no LLM is down)."""
    h = CallHarness()
    llm = ScriptLLM([LLMChunk(text="Let me check that for you. "),
                     LLMChunk(tool_call=ToolCall("call_1", "get_balance", "{}"))], [], [])
    h.agent = Agent(HedgedChat(llm, None, clock=h.clock),  # type: ignore[arg-type]
                    [BALANCE], runner=BalanceRunner(), filler_after_s=None)  # type: ignore[arg-type]
    h.responder._agent = h.agent
    await h.start()
    await h.text("what is my balance")
    await h.wait(3000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm", "handoff"]
    assert h.output.of("handoff")[0]["reason"] == "the LLM returned an empty reply twice"
    assert [e["code"] for e in h.output.of("error", turn=1)] == ["llm_empty_reply"]
    assert h.stats.errors == {"llm_empty_reply": 1}
    assert len(llm.requests) == 3  # the round after the tool, asked again once
    stats = h.agent.llm.stats  # type: ignore[union-attr]
    assert stats.empty_replies == 2 and stats.all_failed == 0
    h.stats.watch_hedge(stats)
    exposed = generate_latest(h.stats.prometheus.registry).decode()
    assert "voicegate_llm_empty_replies_total 2.0" in exposed
    assert 'voicegate_errors_total{code="llm_empty_reply"} 1.0' in exposed


async def test_failure_after_a_tool_filler_is_still_a_handoff(llm_server, webhook):
    fake, server = llm_server
    hook, hook_server = webhook

    def script(body):
        if any(m.get("role") == "tool" for m in body["messages"]):
            return Reply(status=503)
        return Reply(text="", tool_calls=[("get_balance", '{"account": "1"}')])
    fake.script = script
    agent = make_agent(server, "m", tools=[BALANCE], webhook_url=hook_server.url)
    events, _ = await run(agent, "balance?")
    assert isinstance(events[0], ToolStarted) and isinstance(events[-1], Handoff)
    await agent.aclose()


async def test_barge_in_cancellation_closes_both_llm_streams(llm_server):
    fake, server = llm_server
    fake.replies["p"] = Reply(ttft_s=STALL)
    fake.replies["s"] = Reply(ttft_s=STALL)
    agent = make_agent(server, "p", "s", hedge_delay_s=0.0, first_token_timeout_s=600.0)
    consumer = asyncio.create_task(run(agent, "tell me a story"))
    assert await fake.await_for(lambda s: s.requests["p"] == 1 and s.requests["s"] == 1)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert await fake.await_for(lambda s: s.disconnects["p"] == 1 and s.disconnects["s"] == 1)
    await agent.aclose()


async def test_closing_the_event_stream_mid_answer_closes_the_llm_stream(llm_server):
    fake, server = llm_server
    fake.replies["p"] = Reply(text="First sentence here. " + "and then more words " * 50,
                              token_delay_s=0.02)
    agent = make_agent(server, "p")
    conversation = agent.new_conversation()
    events = agent.respond(conversation, "hi")
    first = await events.__anext__()
    assert first == Sentence("First sentence here.")
    await events.aclose()
    assert await fake.await_for(lambda s: s.disconnects["p"] == 1)
    # The context holds what was emitted, and then only what the caller heard.
    assert conversation.history[-1]["content"].startswith("First sentence here.")
    conversation.record_heard("First sentence")
    assert conversation.history[-1] == {"role": "assistant", "content": "First sentence"}
    await agent.aclose()


async def collect(events, clock: ManualClock, seconds: float, timed: bool = False) -> list:
    """The events ``events`` emits while ``seconds`` of ``clock`` pass, to its end; with
    ``timed``, each as (seconds of the clock since the collect began, event)."""
    out: list = []
    start = clock.now()

    async def read() -> None:
        async for event in events:
            out.append((clock.now() - start, event) if timed else event)

    reader = asyncio.create_task(read())
    await clock.advance(seconds)
    assert reader.done(), f"the turn had not ended after {seconds} s of the clock: {out}"
    await reader
    return out


async def test_slow_first_token_emits_slow_once_before_the_answer():
    """On the call's clock (a ManualClock here): the cue at filler_after_s (0.05 s), once,
    though the first token takes a whole second of it."""
    clock = ManualClock()
    leg = ScriptedLLM(clock)
    leg.reply, leg.first_token_s = "Here you go.", 1.0
    agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0, clock=clock),  # type: ignore[arg-type]
                  filler_after_s=0.05)
    events = agent.respond(agent.new_conversation(), "hi", clock=clock)
    assert await collect(events, clock, 1.0) == [Slow(0.05), Sentence("Here you go.")]
    assert leg.first_tokens == [clock.now()]  # the answer came at 1 s of the clock


async def test_the_filler_cue_comes_when_the_calls_clock_passes_filler_after_s():
    """The cue (Slow: "let me check that") was timed on the event loop's time, real time,
    while the rest of the call (hedge, TTS stalls, playout) runs on the call's Clock: a
    ManualClock moved past filler_after_s brought no cue until real time passed too. It
    comes at the clock's threshold exactly, with no real time elapsing."""
    clock = ManualClock()
    leg = ScriptedLLM(clock)
    leg.reply, leg.first_token_s = "Here you go.", 2.0
    agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0, clock=clock),  # type: ignore[arg-type]
                  filler_after_s=0.5)
    start = clock.now()
    events = agent.respond(agent.new_conversation(), "hi", clock=clock)
    first = asyncio.create_task(events.__anext__())
    try:
        await clock.advance(0.375)
        assert not first.done(), f"cued after 0.375 s of 0.5: {first.result()!r}"
        await clock.advance(0.125)  # exactly filler_after_s since the turn began
        assert first.done(), "the clock passed filler_after_s and no filler cue came"
        assert first.result() == Slow(0.5) and clock.now() == start + 0.5
        rest = await collect(events, clock, 1.5)
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()
    assert rest == [Sentence("Here you go.")]


async def test_a_turns_filler_plays_when_the_calls_clock_passes_filler_after_s():
    """The same through a whole call: the responder hands the agent the call's clock."""
    h = CallHarness()
    h.agent.filler_after_s = 0.5
    h.llm.reply, h.llm.first_token_s = "Your balance is twelve dollars.", 2.0
    await h.start()
    await h.text("what is my balance")
    start = h.clock.now()
    await h.clock.advance(0.375)
    assert h.output.of("response", turn=1) == []
    await h.clock.advance(0.125)
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["filler"], (
        "the call's clock passed filler_after_s and no filler played")
    assert h.clock.now() == start + 0.5
    await h.wait(3000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["filler", "llm"]


class StallsAfterFirstToken:
    """An LLM leg that streams ``first`` ("Sure") at once, then nothing (until closed).
    With a ``clock``, closing its stream takes ``close_s`` of it (an HTTP teardown)."""

    name = "stalling"

    def __init__(self, first: str = "Sure", clock: ManualClock | None = None,
                 close_s: float = 0.0) -> None:
        self.first = first
        self.clock = clock
        self.close_s = close_s
        self.closing = 0  # closes begun
        self.closed = 0

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        try:
            yield LLMChunk(text=self.first)
            await asyncio.Event().wait()
            yield LLMChunk(text=", never.")
        finally:
            self.closing += 1
            if self.clock is not None and self.close_s:
                await self.clock.sleep(self.close_s)
            self.closed += 1


async def test_a_stall_after_the_first_token_still_gets_a_filler():
    """The provider sends its first token and then stalls. Slow (the filler cue) is only
    armed until the first *chunk*, and a lone "Sure" is no sentence, so nothing is spoken:
    the caller hears dead air for up to llm_idle_timeout_s (10 s by default), then the
    handoff. The filler exists to bridge silence; it should be cued when nothing speakable
    has come after filler_after_s, whatever tokens arrived."""
    clock = ManualClock()
    leg = StallsAfterFirstToken()
    agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0, idle_timeout_s=600.0,  # type: ignore[arg-type]
                             clock=clock), filler_after_s=0.05)
    events = agent.respond(agent.new_conversation(), "what's my balance", clock=clock)
    next_event = asyncio.create_task(events.__anext__())
    try:
        await clock.advance(5.0)
        first = next_event.result() if next_event.done() else None
    finally:
        next_event.cancel()
        await asyncio.gather(next_event, return_exceptions=True)
        await events.aclose()
    assert leg.closed == 1
    assert isinstance(first, Slow), (
        f"5 s after a first token and no sentence, the agent had emitted {first!r}: the "
        "caller hears nothing at all")


async def test_a_stall_after_the_filler_gets_hold_phrases_not_silence():
    """Review (stop 60): the winner sends "Sure" and stalls. The filler plays at
    filler_after_s, and then nothing did until llm_idle_timeout_s (10 s) failed the round
    and the retry's own first-token wait began: many seconds of dead air after "let me
    check that", which hold phrases cover for a slow tool. A stall is held the same way:
    every hold_after_s of silence since the filler, until something is said."""
    clock = ManualClock()
    leg = StallsAfterFirstToken()
    agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0, idle_timeout_s=600.0,  # type: ignore[arg-type]
                             clock=clock), filler_after_s=0.9, hold_after_s=4.0)
    events = agent.respond(agent.new_conversation(), "what's my balance", clock=clock)
    seen: list = []
    start = clock.now()

    async def read() -> None:
        async for event in events:
            seen.append((round(clock.now() - start, 3), event))

    reader = asyncio.create_task(read())
    try:
        await clock.advance(10.0)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await events.aclose()
    assert seen == [(0.9, Slow(0.9)), (4.9, StillWorking(4.0)), (8.9, StillWorking(8.0))], seen


async def test_a_second_cancel_while_the_llm_stream_closes_keeps_what_was_said():
    """A barge-in cancels the reply as the responder waits to queue its next segment; the
    agent's events are closed, and its LLM stream's close takes a second (an HTTP
    teardown). A second cancel meanwhile (the call ending) cut that close short, and the
    round's add_assistant after it with it: the context lost the sentence the caller had
    heard, and the next turn's model did not know it had said it."""
    clock = ManualClock()
    leg = StallsAfterFirstToken("Your balance is twelve dollars. ", clock, close_s=1.0)
    # A filler delay: the stream is read by a task of its own, whose end the close awaits.
    agent = Agent(leg, filler_after_s=0.9)  # type: ignore[arg-type]
    conversation = agent.new_conversation()
    got: list = []

    async def produce() -> None:  # as the responder's producer
        events = agent.respond(conversation, "what's my balance", clock=clock)
        try:
            async for event in events:
                got.append(event)
                await asyncio.Event().wait()  # its queue full: the barge-in lands here
        finally:
            await events.aclose()

    producer = asyncio.create_task(produce())
    await clock.settle()
    assert got == [Sentence("Your balance is twelve dollars.")]
    producer.cancel()  # the barge-in
    await clock.settle()
    assert leg.closing == 1 and leg.closed == 0  # its close under way, 1 s of the clock
    producer.cancel()  # and a second cancel, during it
    with pytest.raises(asyncio.CancelledError):
        await producer
    assert conversation.history[-1] == {"role": "assistant",
                                        "content": "Your balance is twelve dollars."}
    await clock.settle()
    assert clock.sleeping == 0  # the close was cut short, nothing left waiting


def test_context_is_trimmed_by_whole_exchanges_keeping_the_latest():
    conversation = Conversation("system", budget_chars=600)
    for n in range(20):
        conversation.add_user(f"question {n} " + "x" * 50)
        conversation.add_assistant(f"answer {n} " + "y" * 50)
    conversation.add_user("the latest question")
    messages = conversation.messages()
    assert messages[0] == {"role": "system", "content": "system"}
    assert messages[1]["role"] == "user"  # never starts mid-exchange
    assert messages[-1]["content"] == "the latest question"
    assert sum(len(json.dumps(m)) for m in messages[1:]) <= 600
    assert len(messages) < 41


def test_trimming_measures_each_message_once(monkeypatch):
    """Conversation.trim measured the whole history again for every exchange it dropped:
    quadratic in the call's length, on the event loop, at every LLM round of a long call."""
    conversation = Conversation("system", budget_chars=600)
    # A long history restored whole (a resumed call's snapshot): since stop 60 the call
    # trims at every turn's end, so only restore leaves trim this much to drop at once.
    long_call = [message for n in range(300) for message in (
        {"role": "user", "content": f"question {n} " + "x" * 50},
        {"role": "assistant", "content": f"answer {n} " + "y" * 50})]
    conversation.restore(long_call + [{"role": "user", "content": "the latest question"}])
    measured = len(conversation.history)
    assert measured == 601
    real_dumps = json.dumps
    calls = 0

    def counting_dumps(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(json, "dumps", counting_dumps)
    messages = conversation.messages()
    monkeypatch.undo()
    assert messages[-1]["content"] == "the latest question" and len(messages) < 20
    assert calls <= 2 * measured, f"{calls} measurements of a history of {measured} messages"


def big_result(tag: str) -> str:
    return json.dumps({"tag": tag, "rows": "x" * MAX_RESULT_CHARS})[:MAX_RESULT_CHARS]


def test_an_oversized_exchange_is_cut_not_the_conversation_before_it():
    """Two tool results of MAX_RESULT_CHARS (4,000) in one exchange are more than the
    default budget (8,000 characters, the system prompt included): trimming dropped every
    earlier exchange, and the agent forgot who the caller was and what they had said. The
    oversized exchange's tool results are cut instead (each says so); the system prompt and
    the caller's latest words always stay."""
    conversation = Conversation()  # the default prompt and budget
    conversation.add_user("Hi, my name is Ana Lopez and my card ending 4411 was stolen.")
    conversation.add_assistant("I'm sorry, Ana. I can block that card for you now.")
    conversation.add_user("Yes, block it, and read me my last payments.")
    calls = [ToolCall("c1", "block_card", '{"card": "4411"}'),
             ToolCall("c2", "get_history", '{"account": "42"}')]
    conversation.add_assistant("", calls)
    for call in calls:
        conversation.add_tool_result(call, big_result(call.name))

    def size(messages):
        return sum(len(json.dumps(m, ensure_ascii=False)) for m in messages)

    peek = conversation.messages_for("and my balance?")  # a preemptive start changes nothing
    assert "Ana Lopez" in peek[1]["content"] and peek[-1]["content"] == "and my balance?"
    assert [m["content"] for m in conversation.history[-2:]] == [big_result("block_card"),
                                                                  big_result("get_history")]
    messages = conversation.messages()
    assert messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert "Ana Lopez" in messages[1]["content"], [m["content"] for m in messages]
    assert size(messages) <= 8000
    results = [m for m in messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == ["c1", "c2"]
    for result, call in zip(results, calls):
        assert result["content"].startswith(big_result(call.name)[:1500])  # most of it kept
        assert result["content"].endswith("[the rest of this result was cut to fit the "
                                          "conversation]")

    # The next turn: the earlier exchanges stay, the caller's latest words whole.
    conversation.add_assistant("Your card is blocked. Your last payment was to a cafe.")
    conversation.add_user("thanks, and can you send me a new card?")
    messages = conversation.messages()
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["Hi, my name is Ana Lopez and my card ending 4411 was stolen.",
                     "Yes, block it, and read me my last payments.",
                     "thanks, and can you send me a new card?"]
    assert size(messages) <= 8000
    assert conversation.messages() == messages  # cut once: the same request each round


def test_the_latest_turn_stays_whole_when_nothing_can_be_cut():
    # No tool result to cut (a long typed message): earlier exchanges go, the turn stays.
    conversation = Conversation("system", budget_chars=300)
    conversation.add_user("my name is Ana")
    conversation.add_assistant("Hello Ana.")
    conversation.add_user("y" * 500)
    assert conversation.messages() == [{"role": "system", "content": "system"},
                                       {"role": "user", "content": "y" * 500}]


def test_record_heard_cuts_what_the_caller_did_not_hear():
    conversation = Conversation()
    conversation.add_user("where is my order?")
    call = ToolCall("c1", "get_order", "{}")
    conversation.add_assistant("Let me check.", [call])
    conversation.add_tool_result(call, '{"status": "shipped"}')
    conversation.add_assistant("It shipped on Monday. It should arrive by Friday.")
    conversation.record_heard("Let me check.  It shipped on")
    history = conversation.history
    assert history[1]["content"] == "Let me check." and history[1]["tool_calls"]
    assert history[3]["content"] == "It shipped on"

    conversation.record_heard("")  # heard nothing: text gone, the tool call (and its result) kept
    assert conversation.history[1]["content"] is None and len(conversation.history) == 3


def test_chunker_emits_early_clauses_and_whole_sentences():
    chunker = SentenceChunker(min_clause_chars=40, first_min_clause_chars=20)
    pieces = []
    text = ("Sure, Dr. Smith, your appointment is on the 3.5 mark, and after that, we will call you. "
            "**Anything** else? ")
    for token in text.split(" "):
        pieces += chunker.feed(token + " ")
    tail = chunker.flush()
    pieces += [tail] if tail else []
    # The first piece ends at the first clause boundary past 20 chars (not "Sure," nor "Dr.");
    # later pieces need 40 chars for a clause cut, so "and after that," waits for the period.
    assert pieces == ["Sure, Dr. Smith, your appointment is on the 3.5 mark,",
                      "and after that, we will call you.", "Anything else?"]


def chunk_as_fed(text: str, tokens: str = "word") -> list[tuple[str, str]]:
    """The pieces the chunker makes of ``text`` streamed word by word, char by char
    ("char") or as one token ("whole"), each with the text fed when it came out (all of it
    for the flush's)."""
    chunker = SentenceChunker()
    parts = ([w + " " for w in text.split(" ")] if tokens == "word"
             else [text] if tokens == "whole" else list(text))
    fed = ""
    pieces: list[tuple[str, str]] = []
    for part in parts:
        fed += part
        pieces += [(fed, piece) for piece in chunker.feed(part)]
    tail = chunker.flush()
    return pieces + ([(fed, tail)] if tail else [])


def chunk_all(text: str, tokens: str = "word") -> list[str]:
    """The pieces the chunker makes of ``text`` streamed word by word (or char by char)."""
    return [piece for _, piece in chunk_as_fed(text, tokens)]


@pytest.mark.parametrize("tokens", ["word", "char"])
def test_numbered_list_markers_are_not_spoken_as_sentences(tokens):
    """An LLM answers with a numbered list despite the prompt (common for "how do I ...").
    The chunker treats each marker's period as a sentence end, so the marker is cut off
    before speakable() can strip it (its list-marker rule needs whitespace after the
    period, which is never in the piece): the caller hears "To reset it: one." / "Open
    the app." / "two." / ... or "Open the app two." / "Tap Settings three.", each marker
    also a TTS request of its own. A list marker should be stripped, never spoken or
    glued to the previous item."""
    for text in ("To reset it:\n1. Open the app.\n2. Tap Settings.\n3. Choose Reset password.",
                 "Here is how to reset it:\n\n1. Open the app\n2. Tap Settings\n3. Choose Reset"):
        pieces = chunk_all(text, tokens)
        spoken_markers = [p for p in pieces if re.search(r"(^|\s)\d\.$", p)]
        assert spoken_markers == [], f"{text!r} was spoken as {pieces}"
        assert pieces[1:] in (["Open the app.", "Tap Settings.", "Choose Reset password."],
                              ["Open the app", "Tap Settings", "Choose Reset"]), pieces


@pytest.mark.parametrize("tokens", ["word", "char", "whole"])
@pytest.mark.parametrize("marker", ["- ", "* ", "• ", ""], ids=["dash", "star", "bullet", "none"])
def test_each_line_of_a_bulleted_list_is_a_piece_of_its_own(tokens, marker):
    """Review (stop 64): a numbered list's items were pieces of their own, but a bulleted
    one's (markdown's "- ", "* ", "• ": the list LLMs write most, items with no period) or
    plain lines ("Our hours" / "Monday to Friday 9 to 5") were joined into one piece: the
    bullets stripped, the caller heard "To reset it: Open the app Tap Settings Choose Reset
    password" in one breath, and nothing of it before the whole list was written (or
    max_chars). A line break ends a piece, as a numbered item's does."""
    text = (f"To reset it:\n{marker}Open the app\n{marker}Tap Settings\n"
            f"{marker}Choose Reset password")
    assert chunk_all(text, tokens) == ["To reset it:", "Open the app", "Tap Settings",
                                       "Choose Reset password"]
    # Each line goes out once the next one starts, not at the end of the reply.
    (fed, first), (fed_2, second), *_ = chunk_as_fed(text, "char")
    assert first == "To reset it:" and fed == f"To reset it:\n{marker[:1] or 'O'}"
    assert second == "Open the app" and fed_2.endswith("Open the app\n" + (marker[:1] or "T"))


@pytest.mark.parametrize("tokens", ["word", "char"])
def test_a_number_after_a_clause_cut_is_spoken_not_stripped_as_a_list_marker(tokens):
    """Streamed, the first piece is cut at the colon (a clause boundary past 24 chars), so
    the buffer opens with " 48213. Keep it handy." The list-marker rule took the number for
    an item's "1." (it opened the buffer), and speakable() stripped it: the caller heard
    "Your confirmation number for this booking is:" then "Keep it handy.", never the
    number. After a clause cut the buffer opens mid-sentence: no list item starts there."""
    text = "Your confirmation number for this booking is: 48213. Keep it handy."
    pieces = chunk_all(text, tokens)
    assert pieces == ["Your confirmation number for this booking is:", "48213.",
                      "Keep it handy."], pieces


@pytest.mark.parametrize("text", [
    "Transfers to the U.K. take two working days to arrive.",
    "Payments to the U.S.A. need the full routing number.",
    "Our adviser has a Ph.D. in tax law and can call you back.",
])
def test_dotted_abbreviations_do_not_end_a_sentence(text):
    """"U.S." is known not to end a sentence, but any other dotted abbreviation ("U.K.",
    "U.S.A.", "Ph.D.") is taken as one: "Transfers to the U.K." is synthesized and played
    as a sentence of its own (falling tone, a pause), then "take two working days to
    arrive." The rule that keeps "U.S." whole should cover every letter-dot-letter token."""
    assert chunk_all(text) == [text]


@pytest.mark.parametrize("tokens", ["word", "char"])
def test_a_dotted_abbreviation_ends_a_sentence_before_an_opener_not_before_a_name(tokens):
    """"U.S." never ended a sentence: "We only ship within the U.S. Do you ..." was one
    piece, the caller waiting for the question to be written too. And "a.m." ended one
    before any capitalized word but a day, a month or a zone: "9 a.m." was cut from its
    "New York time". An opener after a dotted abbreviation ends the sentence, a name
    goes on with it."""
    text = ("We only ship within the U.S. Do you need anything else? "
            "We open at 9 a.m. New York time.")
    as_fed = chunk_as_fed(text, tokens)
    assert [piece for _, piece in as_fed] == [
        "We only ship within the U.S.", "Do you need anything else?",
        "We open at 9 a.m. New York time."], as_fed
    assert as_fed[0][0].rstrip() == "We only ship within the U.S. Do"  # out once "Do" came

@pytest.mark.parametrize("tokens", ["word", "char"])
def test_no_ends_a_sentence_unless_a_number_follows(tokens):
    """"No." was always an abbreviation ("No. 5"): an answer opening "No. We're closed on
    Sundays." held its first piece to the next sentence's end, and the caller waited for
    both to be written and synthesized before hearing anything."""
    text = "No. We're closed on Sundays. The answer is no. Ask for form No. 5 at the desk."
    assert chunk_all(text, tokens) == ["No.", "We're closed on Sundays.", "The answer is no.",
                                      "Ask for form No. 5 at the desk."]


@pytest.mark.parametrize("tokens", ["word", "char"])
def test_a_m_and_p_m_end_a_sentence_when_a_new_one_follows(tokens):
    """"a.m." and "p.m." were abbreviations, never a sentence end: "We open at 9 a.m. Our
    branch closes at 5 p.m. Anything else?" was one piece, and the caller heard nothing
    until all of it was written. A capitalized word after them opens a sentence, and the
    piece before it goes out as soon as that word has come."""
    text = "We open at 9 a.m. Our branch closes at 5 p.m. Anything else?"
    as_fed = chunk_as_fed(text, tokens)
    assert [piece for _, piece in as_fed] == [
        "We open at 9 a.m.", "Our branch closes at 5 p.m.", "Anything else?"], as_fed
    assert [fed.rstrip() for fed, _ in as_fed[:2]] == [
        "We open at 9 a.m. Our", "We open at 9 a.m. Our branch closes at 5 p.m. Anything"]


@pytest.mark.parametrize("text", [
    "We're open 9 a.m. Monday to Friday and until 1 p.m. on Saturdays.",
    "The branch opens at 9 a.m. Eastern time on weekdays.",
    "Payments made after 5 p.m. are processed the next working day.",
])
def test_a_m_and_p_m_before_a_day_a_zone_or_a_lowercase_word_end_nothing(text):
    for tokens in ("word", "char"):
        assert chunk_all(text, tokens) == [text], tokens


@pytest.mark.parametrize("tokens", ["word", "char"])
def test_a_capital_letter_ends_a_sentence_before_an_opener_not_before_a_name(tokens):
    """A capital letter and a period was always an initial: "Choose plan B. It costs
    less." was one piece. Before a pronoun or an opener ("It", "You", "Your") it ends the
    sentence; before a name it stays an initial ("J. R. Smith", "John F. Kennedy"): a
    name cut there would be read "Jay.", a pause, then the rest. After a bracket or a
    quote, an initial or an abbreviation is one too ("(K." and "“Dr." were cut after)."""
    text = ("Choose plan B. It costs less. Your payment to J. R. Smith went out. "
            "Ask for John F. Kennedy (or “Dr. K. Lee”).")
    as_fed = chunk_as_fed(text, tokens)
    assert [piece for _, piece in as_fed] == [
        "Choose plan B.", "It costs less.", "Your payment to J. R. Smith went out.",
        "Ask for John F. Kennedy (or “Dr. K. Lee”)."], as_fed
    assert as_fed[0][0].rstrip() == "Choose plan B. It"  # out as soon as "It" came


@pytest.mark.parametrize("tokens", ["word", "char"])
def test_a_run_on_answer_with_no_punctuation_starts_speaking_after_a_few_words(tokens):
    """Review (stop 64): a reply with no punctuation at all (small models write run-on
    answers; the system prompt asks for no markdown, some drop the commas too) had no cut
    before max_chars (240): the caller heard nothing of it until about 50 words were
    written (seconds of a slower model, the filler and a hold phrase meanwhile), and a
    shorter one not until the stream ended. The first piece now ends at the last space
    before ``first_max_chars`` (100); the pieces after it keep the 240-character limit."""
    text = ("sure so what you want to do is open the app and tap settings then scroll down "
            "to the bottom where it says account and tap that and then you will see the "
            "option for closing your account so tap that and confirm with your pin and "
            "after that we will send you an email within two business days to let you "
            "know that the account is closed and any money left in it is sent to the "
            "account you named when you opened it")
    pieces = chunk_as_fed(text, tokens)
    (fed, first), *rest = pieces
    # Out while the model is still writing, after no more than 100 characters of it.
    assert len(fed) <= 110 and fed != text, pieces
    assert first == "sure so what you want to do is open the app and tap settings then scroll " \
                    "down to the bottom where"  # at the last space before 100
    assert " ".join(piece for _, piece in pieces) == text
    assert [len(piece) > 100 for _, piece in rest] == [True, False]  # 240 after the first
    assert all(len(piece) <= 240 for _, piece in rest)


def test_a_sentence_ending_inside_a_closing_quote_or_bracket_is_its_own_piece():
    text = ('The status says "shipped." It left the warehouse (on Monday.) Did you get my '
            "note, 'where is it?' Dr. Smith said “yes.” \"Mr.\" Jones signed (e.g.) for it. ")
    # Word by word, and character by character (a closer at the end of the buffer waits).
    for tokens in ([word + " " for word in text.split(" ")], list(text)):
        chunker = SentenceChunker()
        pieces = []
        for token in tokens:
            pieces += chunker.feed(token)
        tail = chunker.flush()
        pieces += [tail] if tail else []
        # The cut comes after the closer, once whitespace follows it; "Dr.", "Mr." and
        # "e.g." inside quotes or brackets still end nothing.
        assert pieces == ['The status says "shipped."', "It left the warehouse (on Monday.)",
                          "Did you get my note, 'where is it?'", "Dr. Smith said “yes.”",
                          '"Mr." Jones signed (e.g.) for it.'], tokens[:2]


def test_a_tool_call_cut_off_by_a_barge_in_still_gets_a_result():
    conversation = Conversation()
    conversation.add_user("where is my order?")
    conversation.add_assistant("", [ToolCall("c1", "get_order", "{}"), ToolCall("c2", "get_eta", "{}")])
    conversation.add_tool_result(ToolCall("c1", "get_order", "{}"), '{"status": "shipped"}')
    conversation.add_user("never mind")  # the webhook for c2 was cancelled
    messages = conversation.messages()
    roles = [(m["role"], m.get("tool_call_id")) for m in messages]
    assert roles == [("system", None), ("user", None), ("assistant", None), ("tool", "c1"),
                     ("tool", "c2"), ("user", None)]
    assert "interrupted" in messages[4]["content"]


async def test_build_agent_from_settings_with_a_tools_file(llm_server, webhook, tmp_path):
    fake, server = llm_server
    hook, hook_server = webhook
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([{
        "name": "get_balance", "description": "The caller's balance.",
        "parameters": BALANCE.parameters, "url": hook_server.url + "/tool/get_balance", "timeout_s": 2}]))
    fake.script = tool_script()
    settings = Settings.load(environ={
        "VOICEGATE_LLM_PRIMARY_URL": server.url + "/v1", "VOICEGATE_LLM_PRIMARY_MODEL": "p",
        "VOICEGATE_LLM_SECONDARY_URL": server.url + "/v1", "VOICEGATE_LLM_SECONDARY_MODEL": "s",
        "VOICEGATE_LLM_HEDGE_DELAY_MS": "0", "VOICEGATE_LLM_TOOLS_FILE": str(tools_file)})
    agent = build_agent(settings)
    assert isinstance(agent.llm, HedgedChat) and agent.llm.fixed_delay_s == 0.0
    events, _ = await run(agent, "balance please")
    assert isinstance(events[0], ToolStarted) and isinstance(events[-1], Sentence)
    # Delay 0: both legs start in each of the two rounds (a loser may be cancelled
    # before its request even reaches the server, so count legs, not server requests).
    assert hook.calls and agent.llm.stats.requests == 4 and agent.llm.stats.extra_requests == 2
    await agent.aclose()


def test_tools_file_errors_are_specific(tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ToolConfigError, match="needs at least a name and a url"):
        load_tools(str(bad))
    bad.write_text(json.dumps([{"name": "x", "url": "http://h", "colour": "red"}]))
    with pytest.raises(ToolConfigError, match="unknown keys"):
        load_tools(str(bad))
    with pytest.raises(ToolConfigError, match="cannot read"):
        load_tools(str(tmp_path / "missing.json"))
    # A url httpx cannot parse is refused at start-up, not found out by every call of the tool.
    for url, problem in [("http://127.0.0.1:8o80/tool", "Invalid port"),
                         ("ftp://h/tool", "expected http:// or https://"),
                         ("tool", "expected http:// or https://"),
                         ("http:///tool", "no host")]:
        bad.write_text(json.dumps([{"name": "get_balance", "url": url}]))
        with pytest.raises(ToolConfigError, match=f"tool 'get_balance' has a bad url "
                                                  f"'{re.escape(url)}': {problem}"):
            load_tools(str(bad))


BAD_TIMEOUT = "tool 'get_balance' has a bad timeout_s {}: expected seconds above zero"


@pytest.mark.parametrize("tools, problem", [
    ([{"name": "get balance"}], "tool 'get balance' has a bad name: use letters, digits, '_' "
                                "and '-', at most 64"),
    ([{"name": "x" * 65}], f"tool '{'x' * 65}' has a bad name"),
    ([{"name": "get_balance"}, {"name": "get_balance"}], "tool 'get_balance' is declared twice"),
    ([{"name": "get_balance", "timeout_s": 0}], BAD_TIMEOUT.format(0)),
    ([{"name": "get_balance", "timeout_s": -1}], BAD_TIMEOUT.format(-1)),
    ([{"name": "get_balance", "timeout_s": "5s"}], BAD_TIMEOUT.format("'5s'")),
    ([{"name": "get_balance", "timeout_s": True}], BAD_TIMEOUT.format(True)),
    ([{"name": "get_balance", "timeout_s": float("inf")}], BAD_TIMEOUT.format("inf")),
    ([{"name": "get_balance", "timeout_s": float("nan")}], BAD_TIMEOUT.format("nan")),
    ([{"name": "get_balance", "parameters": ["account"]}],
     "tool 'get_balance' has bad parameters: expected a JSON schema object"),
], ids=["space", "too-long", "twice", "zero", "negative", "text", "bool", "infinite", "nan",
        "parameters"])
def test_a_tools_file_the_chat_api_or_the_runner_cannot_use_stops_the_start_up(
        tmp_path, tools, problem):
    """Each of these was taken as is. A name OpenAI's API refuses (^[a-zA-Z0-9_-]{1,64}$:
    'get balance') failed every request that offered the tools (HTTP 400): every miss a
    handoff with llm_failed. A timeout_s of 0 or less failed every
    call of the tool at once ("did not answer within 0 seconds"); an infinite one (JSON's
    Infinity) let a hung webhook hold the turn in silence for good; "5s" stopped the
    start-up with a bare ValueError naming neither the file nor the tool, after every
    model had loaded. Two tools of one name: the runner kept the last. Each now stops the
    start-up with an error naming the tool."""
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps([{"url": "http://127.0.0.1:9/tool", **t} for t in tools]))
    with pytest.raises(ToolConfigError, match=f"tools file {re.escape(str(bad))}: "
                                              f"{re.escape(problem)}"):
        load_tools(str(bad))
    bad.write_text(json.dumps([{"name": "get-balance_2", "url": "http://127.0.0.1:9/tool",
                                "timeout_s": 2}]))
    assert load_tools(str(bad))[0].timeout_s == 2.0  # an integer is seconds too


async def test_a_tool_url_httpx_cannot_parse_goes_back_to_the_model_as_an_error():
    # A ToolSpec built in code skips load_tools' check: the call still gets its error string.
    runner = ToolRunner([ToolSpec("get_balance", "", url="http://127.0.0.1:8o80/tool")])
    try:
        content, ok = await runner.run(ToolCall("call_1", "get_balance", "{}"))
    finally:
        await runner.aclose()
    assert not ok and json.loads(content) == {"error": "get_balance could not be reached"}


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts the response body bytes the client actually pulls off the connection."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.read = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        inner_stream = response.stream
        transport = self

        class Counted(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for part in inner_stream:  # type: ignore[union-attr]
                    transport.read += len(part)
                    yield part

            async def aclose(self) -> None:
                await inner_stream.aclose()  # type: ignore[union-attr]

        return httpx.Response(response.status_code, headers=response.headers,
                              stream=Counted(), extensions=response.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_huge_tool_answer_is_not_read_whole(webhook):
    """A webhook answers a large body (an account's whole transaction history: 8 MB here).
    Only MAX_RESULT_CHARS (4000) of it ever reaches the model, but ToolRunner reads the
    whole body into memory first (twice: bytes, then the decoded text) before slicing:
    memory per call is whatever the webhook sends, and a body that cannot arrive within
    timeout_s turns a good answer into "did not answer". The runner should stop reading
    once it has what it keeps (stream the response, read a bounded amount)."""
    hook, hook_server = webhook
    rows = [{"id": n, "amount": "12.50", "memo": "coffee shop " + "x" * 60} for n in range(90_000)]
    hook.handler = lambda payload: {"transactions": rows}
    transport = CountingTransport()
    runner = ToolRunner([ToolSpec("get_history", "", url=hook_server.url + "/tool/get_history",
                                  timeout_s=60.0)], http=httpx.AsyncClient(transport=transport))
    try:
        # On a clock that stands still: the 60 s never pass, however slowly 8 MB come.
        content, ok = await runner.run(ToolCall("c1", "get_history", "{}"), ManualClock())
    finally:
        await transport.aclose()
    assert ok and len(content) <= MAX_RESULT_CHARS
    assert transport.read <= 1_000_000, (
        f"kept {len(content)} characters, read {transport.read:,} bytes of the answer")


async def test_a_tool_call_the_runner_cannot_send_goes_back_as_an_error(webhook):
    """The model calls two tools at once; one's arguments parse (a JSON object holding a
    lone surrogate) but cannot be sent (httpx refuses it: UnicodeEncodeError).
    ToolRunner.run raises instead of returning the error string its docstring promises
    ("whatever happens, the model gets a string back"), asyncio.gather raises it out of
    the agent: the caller hears the filler, then the apology (reply_failed) for a question
    the model could have answered, and the other tool's webhook call is left running as
    an orphan task (gather does not cancel its siblings). The bad call should come back
    to the model as an error, and no tool task outlive the turn."""
    hook, hook_server = webhook
    # The good call is held at the webhook until it has arrived: by then the bad one has
    # failed (httpx refuses it while building the request, before any I/O), so the good
    # one is still running when it does, with no real time waited.
    hook.hold = True
    hook.handler = lambda payload: {"status": "shipped"}

    async def release_once_the_good_call_arrived() -> None:
        await hook.calls.reach(1)
        hook.release.set()

    releaser = asyncio.create_task(release_once_the_good_call_arrived())
    order = ToolSpec("get_order", "", url=hook_server.url + "/tool/get_order", timeout_s=10.0)
    balance = ToolSpec("get_balance", "", url=hook_server.url + "/tool/get_balance",
                       timeout_s=10.0)
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "get_order", '{"id": "A-17"}')),
                     LLMChunk(tool_call=ToolCall("c2", "get_balance", '{"note": "\\ud800"}'))],
                    [LLMChunk(text="Your order shipped. I could not get your balance.")])
    agent = Agent(llm, [order, balance], filler_after_s=None)  # type: ignore[arg-type]
    events: list[Any] = []
    error: BaseException | None = None
    try:
        # On a clock that stands still: the held webhook never reaches the 10 s timeout.
        async for event in agent.respond(agent.new_conversation(), "order and balance?",
                                         clock=ManualClock()):
            events.append(event)
    except Exception as exc:  # noqa: BLE001 - the defect under test
        error = exc
    releaser.cancel()
    await asyncio.gather(releaser, return_exceptions=True)
    leaked = [t for t in asyncio.all_tasks()
              if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "ToolRunner.run"]
    for task in leaked:  # tidy up before asserting
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    await agent.aclose()
    assert error is None and not leaked, (
        f"the reply raised {error!r} after {events}; tool calls left running: {len(leaked)}")
    assert Sentence("I could not get your balance.") in events


async def test_a_tool_runner_raising_cancels_the_other_tool_calls():
    # ToolRunner never raises; another runner may. Its siblings do not outlive the turn.
    class Runner:
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        async def run(self, call: ToolCall, clock: Clock) -> tuple[str, bool]:
            if call.id == "c2":
                raise RuntimeError("runner bug")
            try:
                await asyncio.sleep(600)
            except asyncio.CancelledError:
                self.cancelled.append(call.id)
                raise
            return "{}", True

        async def aclose(self) -> None:
            return None

    runner = Runner()
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "get_order", "{}")),
                     LLMChunk(tool_call=ToolCall("c2", "get_balance", "{}"))])
    agent = Agent(llm, [BALANCE], runner=runner, filler_after_s=None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="runner bug"):
        await run(agent, "order and balance?")
    assert runner.cancelled == ["c1"]


TICKET = ToolSpec(name="create_ticket", description="Open a support ticket.",
                  parameters={"type": "object", "properties": {"summary": {"type": "string"}}})


class FinishRecordingRunner(ToolRunner):
    """The real runner, telling the test when each call has come back."""

    def __init__(self, tools: list[ToolSpec]) -> None:
        super().__init__(tools)
        self.finished: dict[str, asyncio.Event] = {t.name: asyncio.Event() for t in tools}

    async def run(self, call: ToolCall, clock: Clock) -> tuple[str, bool]:  # type: ignore[override]
        result = await super().run(call, clock)
        self.finished[call.name].set()
        return result


async def test_a_barge_in_during_tool_calls_keeps_the_results_that_came_back(llm_server, webhook):
    """The model opens a ticket and looks up a balance at once; the ticket's webhook answers
    (the ticket exists), the balance's is still running when the caller barges in. The
    cancel threw the ticket's result away: the next round was told both calls were
    "interrupted by the caller before the result", and a model believing no ticket was
    opened opens a second one. Every result that came back stays in the context; a call
    that did not finish says so, and that whether it happened is unknown."""
    fake, server = llm_server
    hook, hook_server = webhook
    hook.hold = {"get_balance"}  # the balance's webhook answers only after the barge-in
    hook.handler = lambda payload: ({"ticket": "T-1001", "status": "opened"}
                                    if payload["tool"] == "create_ticket" else {"balance": "12"})

    def script(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["role"] == "user" and body["messages"][-1]["content"] == "hello?":
            return Reply(text="Your ticket T-1001 is open.")
        return Reply(text="", tool_calls=[("create_ticket", '{"summary": "card lost"}'),
                                          ("get_balance", '{"account": "42"}')])

    fake.script = script
    url = hook_server.url + "/tool/"
    specs = [ToolSpec(t.name, t.description, t.parameters, url=url + t.name, timeout_s=30.0)
             for t in (TICKET, BALANCE)]
    runner = FinishRecordingRunner(specs)
    llm = HedgedChat(OpenAIChat("m", base_url=server.url + "/v1", name="m"), None,
                     clock=ManualClock())
    agent = Agent(llm, specs, runner=runner, filler_after_s=None)
    conversation = agent.new_conversation()
    clock = ManualClock()  # stands still: no tool's timeout_s passes
    turn = asyncio.create_task(run(agent, "I lost my card, and what's my balance?",
                                   conversation, clock))
    try:
        await asyncio.wait_for(runner.finished["create_ticket"].wait(), 30)
        assert await hook.calls.reach(2) and not turn.done()  # the balance still running
        turn.cancel()  # the barge-in
        with pytest.raises(asyncio.CancelledError):
            await turn
        conversation.record_heard("")  # the filler alone was heard
        hook.release.set()
        events, _ = await run(agent, "hello?", conversation, clock)
    finally:
        turn.cancel()
        await agent.aclose()
    assert events == [Sentence("Your ticket T-1001 is open.")]
    assert len([c for c in hook.calls if c["tool"] == "create_ticket"]) == 1
    results = {m["tool_call_id"]: json.loads(m["content"])
               for m in fake.stats.bodies[-1]["messages"] if m["role"] == "tool"}
    calls = {c["function"]["name"]: c["id"] for m in fake.stats.bodies[-1]["messages"]
             for c in m.get("tool_calls") or ()}
    assert results[calls["create_ticket"]] == {"ticket": "T-1001", "status": "opened"}, results
    unknown = results[calls["get_balance"]]["error"]
    assert "get_balance" in unknown and "did not finish" in unknown and "unknown" in unknown


@pytest.mark.parametrize("name", ["pay_bill", "transfer_to_person"])
async def test_a_call_a_barge_in_stopped_before_it_ran_is_said_not_to_have_run(name):
    """Review (stop 69): the model called a tool (announced: ToolStarted, the filler) and
    was still writing its round (a second call, the finish) when the caller barged in. The
    call was never sent: tools run only once the round's stream has ended. Yet the context
    said what it says of a webhook cancelled mid-request: "did not finish ... it is unknown
    whether it was carried out; check, or ask the caller, before doing it again", so the
    next turn's model told the caller it could not say whether their payment went through
    (or that a transfer might be under way), and hesitated to make the call they asked
    for. A call the round made but never ran says so."""
    clock = ManualClock()
    call = ToolCall("call_1", name, '{"amount": "12"}')
    llm = ScriptLLM([LLMChunk(tool_call=call), 60.0, LLMChunk(text="More.")], clock=clock)
    runner = BalanceRunner()
    agent = Agent(llm, [ToolSpec("pay_bill", "Pay the bill.")],  # type: ignore[arg-type]
                  runner=runner, filler_after_s=None)  # type: ignore[arg-type]
    conversation = agent.new_conversation()
    events = agent.respond(conversation, "pay my bill", clock=clock)
    if name == "pay_bill":
        assert await events.__anext__() == ToolStarted("pay_bill", "call_1")
    else:  # the handoff has no ToolStarted: the round stops as it writes on
        waiting = asyncio.ensure_future(events.__anext__())
        await clock.settle()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    await events.aclose()  # the barge-in, the round still streaming
    assert runner.calls == []
    (result,) = [m for m in conversation.messages() if m["role"] == "tool"]
    assert result["tool_call_id"] == "call_1"
    error = json.loads(result["content"])["error"]
    assert f"{name} was not run" in error and "unknown" not in error, error


def test_a_tool_call_left_without_a_result_is_said_to_be_of_unknown_outcome():
    # A call with no result in the context (one the agent wrote none for) is never said to
    # have not happened.
    conversation = Conversation("system")
    conversation.add_user("pay my bill")
    conversation.add_assistant("", [ToolCall("c1", "pay_bill", "{}")])
    conversation.add_user("hello?")
    filled = [m for m in conversation.messages() if m["role"] == "tool"]
    assert len(filled) == 1 and filled[0]["tool_call_id"] == "c1"
    error = json.loads(filled[0]["content"])["error"]
    assert "pay_bill" in error and "unknown whether" in error


def test_the_results_written_for_unanswered_tool_calls_count_against_the_budget():
    """Review (stop 60): a tool call left without a result (the turn stopped before it
    ran) gets one written as the request is built (``_answer_every_tool_call``), after the
    trim: each such call sent a couple of hundred characters past ``budget_chars``."""
    conversation = Conversation("system", budget_chars=600)
    conversation.add_user("pay my bill")
    conversation.add_assistant("", [ToolCall("c1", "pay_bill", "{}")])
    conversation.add_user("hello?")
    conversation.add_assistant("y" * 200)
    conversation.add_user("are you there?")
    sent = conversation.messages()
    assert sum(len(json.dumps(m)) for m in sent) <= 600, [m["role"] for m in sent]
    assert sent[-1]["content"] == "are you there?"
    # No call is left unanswered by the trim: each one sent keeps its result.
    calls = {c["id"] for m in sent for c in m.get("tool_calls", [])}
    assert calls == {m["tool_call_id"] for m in sent if m["role"] == "tool"}


def test_openai_without_url_or_key_fails_at_start_up():
    from gateway.settings import SettingsError
    with pytest.raises(SettingsError, match="OPENAI_API_KEY"):
        build_agent(Settings(llm_primary_model="gpt-4o-mini"))


# An LLM that fails once the reply has begun: before, the turn ended quietly (no error, no
# apology), so the caller heard "Let me check that for you." or half an answer, then
# silence. Now the call reports llm_failed and apologises after what was sent, and the
# context keeps only what was said.


class ScriptLLM:
    """A chat model answering request n with ``scripts[n]`` (chunks; an exception raises;
    a float: that many seconds of ``clock`` pass, a model still writing)."""

    name = "script"

    def __init__(self, *scripts: list, clock: ManualClock | None = None) -> None:
        self.scripts = list(scripts)
        self.clock = clock
        self.requests: list[list[ToolSpec] | None] = []  # the tools offered, per request

    async def stream(self, messages, tools=None):
        self.requests.append(tools)
        script = self.scripts.pop(0) if self.scripts else [LLMChunk(text="All good now.")]
        for item in script:
            if isinstance(item, float):
                assert self.clock is not None
                await self.clock.sleep(item)
                continue
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item


class BalanceRunner:
    """A tool runner that answers at once and keeps the calls it ran."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    async def run(self, call: ToolCall, clock: Clock) -> tuple[str, bool]:
        self.calls.append(call)
        return json.dumps({"balance": "12.00"}), True

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("scripts, heard", [
    (([LLMChunk(text="Let me check that for you. "),
       LLMChunk(tool_call=ToolCall("call_1", "get_balance", "{}"))],
      [ProviderError("hedged(a, b)", "every LLM failed: HTTP 503")]),
     ["Let me check that for you."]),
    (([LLMChunk(text="Your balance is twelve dollars. "), LLMChunk(text="Your last payment "),
       ProviderError("openai:primary", "stream stalled for 10 s")],),
     ["Your balance is twelve dollars."]),
    # A preface with no sentence end is spoken once the tool call comes (394e4bb): the
    # stream breaking after it is then a failure after words, apologised for, not a
    # silent retry that would say the preface twice.
    (([LLMChunk(text="Sure, let me look that up"),
       LLMChunk(tool_call=ToolCall("call_1", "get_balance", "{}")),
       ProviderError("openai:primary", "connection reset")],),
     ["Sure, let me look that up"]),
], ids=["after-a-preface-and-a-tool", "mid-answer", "preface-without-a-period"])
async def test_an_llm_failure_after_the_reply_began_is_reported_and_apologised_for(scripts,
                                                                                   heard):
    h = CallHarness()
    h.agent = Agent(ScriptLLM(*scripts),  # type: ignore[arg-type]
                    [ToolSpec(name="get_balance", description="The balance.")],
                    runner=BalanceRunner(), filler_after_s=None)  # type: ignore[arg-type]
    h.responder._agent = h.agent
    await h.start()
    await h.text("what is my balance")
    await h.wait(3000)
    responses = h.output.of("response", turn=1)
    assert [e["text"] for e in responses if e["source"] == "llm"] == heard
    assert responses[-1]["source"] == "apology"
    assert [e["code"] for e in h.output.of("error", turn=1)] == ["llm_failed"]
    assert h.stats.errors["llm_failed"] == 1
    # The next turn works (the script is spent: the LLM answers again).
    await h.text("and now?")
    await h.wait(3000)
    await h.stop()
    assert [e["text"] for e in h.output.of("response", turn=2)] == ["All good now."]


async def test_a_tool_call_in_the_last_round_does_not_end_the_turn_in_silence():
    """The last round offers no tools, but a model (or an OpenAI-compatible server) answers
    it with a tool call anyway. The agent runs that tool (one it did not offer: a side
    effect the model was no longer allowed), then its round loop simply ends: no sentence,
    no handoff, no error. The caller hears "Let me check that for you." and then nothing;
    the turn ends as answered. The turn must end with words: a handoff (or an apology),
    and a tool not offered must not run."""
    h = CallHarness()
    call_1 = ToolCall("call_1", "get_balance", '{"account": "42"}')
    call_2 = ToolCall("call_2", "get_balance", '{"account": "42"}')
    llm = ScriptLLM([LLMChunk(tool_call=call_1)], [LLMChunk(tool_call=call_2)])
    runner = BalanceRunner()
    h.agent = Agent(llm, [BALANCE], runner=runner, max_tool_rounds=1,  # type: ignore[arg-type]
                    filler_after_s=None)
    h.responder._agent = h.agent
    await h.start()
    await h.text("what is my balance")
    await h.wait(3000)
    await h.stop()
    assert llm.requests[1] is None  # the last round offered no tools
    sources = [e["source"] for e in h.output.of("response", turn=1)]
    assert sources[-1] != "filler" and len(runner.calls) == 1, (
        f"the caller heard {sources} and the tools run were {runner.calls}")
    assert sources == ["filler", "handoff"]
    assert h.output.of("handoff")[0]["reason"] == \
        "the LLM called get_balance, a tool it was not offered"
    # Reported, as an empty reply is: the operator sees a model (or a compatible server)
    # that ignores the tools it is offered, not only a handoff.
    assert [(e["code"], e["turn"]) for e in h.output.of("error")] == [
        ("llm_tool_not_offered", 1)]
    assert h.stats.errors["llm_tool_not_offered"] == 1


@pytest.mark.parametrize("arguments", ['{"account": "42"', '["42"]', '{"account": NaN}'],
                         ids=["cut-short", "not-an-object", "nan"])
async def test_a_tool_call_with_malformed_arguments_does_not_poison_the_context(
        llm_server, webhook, arguments):
    """A model streams a tool call whose arguments are no JSON object (cut short, an
    array, NaN: small local models do). The runner answers the model with an error, but
    the call's arguments went into the context as streamed, and an OpenAI-compatible
    server that decodes them (Ollama: 400 "invalid tool call arguments") then refused the
    next request, and every later one of the call: the caller heard the filler, then the
    handoff, and the handoff again at every later question the cache missed. The context
    keeps arguments a server can read; the tool result says what was wrong."""
    fake, server = llm_server
    hook, hook_server = webhook
    fake.strict_tool_arguments = True

    def script(body: dict[str, Any]) -> Reply:
        last = body["messages"][-1]
        if last["role"] == "tool":
            return Reply(text="Sorry, which account is that?")
        if last["content"] == "the savings one":
            return Reply(text="Your savings balance is twelve dollars.")
        return Reply(text="", tool_calls=[("get_balance", arguments)])

    fake.script = script
    agent = make_agent(server, "m", tools=[BALANCE], webhook_url=hook_server.url)
    try:
        first, conversation = await run(agent, "What's my balance?")
        second, _ = await run(agent, "the savings one", conversation)
    finally:
        await agent.aclose()
    assert isinstance(first[0], ToolStarted) and first[1:] == [
        Sentence("Sorry, which account is that?")], first
    assert second == [Sentence("Your savings balance is twelve dollars.")], second
    assert hook.calls == []  # never sent to the webhook
    tool_message = [m for m in fake.stats.bodies[1]["messages"] if m["role"] == "tool"][0]
    assert json.loads(tool_message["content"]) == {
        "error": "the arguments for get_balance were not a JSON object"}


@pytest.mark.parametrize("name", ["multi_tool_use.parallel", "functions.get_balance",
                                  "get balance", "get_balance_" + "x" * 60],
                         ids=["gpt-4o-wrapper", "namespaced", "a-space", "past-64"])
async def test_a_tool_call_named_as_no_chat_api_takes_does_not_poison_the_context(
        llm_server, webhook, name):
    """Review (stop 66): a model calls a tool by a name no chat API takes back: GPT-4o's
    leaked parallel wrapper ``multi_tool_use.parallel`` (a known OpenAI bug, now and
    then), a namespaced ``functions.get_balance`` (small models do), a space, or past 64
    characters. The runner rightly answers "there is no tool named ...", but the context
    kept the call's name as streamed, and OpenAI refuses a request whose history holds one
    (400 "Invalid 'messages[2].tool_calls[0].function.name': string does not match
    pattern"): the round after the tool failed (the caller heard the filler, then the
    handoff), and so did every later question of the call the cache missed. The context
    keeps a name the API takes; the tool's result names what the model called."""
    fake, server = llm_server
    hook, hook_server = webhook
    fake.strict_tool_names = True

    def script(body: dict[str, Any]) -> Reply:
        last = body["messages"][-1]
        if last["role"] == "tool":
            return Reply(text="Sorry, I could not look that up.")
        if last["content"] == "and my savings?":
            return Reply(text="Your savings balance is twelve dollars.")
        return Reply(text="", tool_calls=[(name, '{"account": "42"}')])

    fake.script = script
    agent = make_agent(server, "m", tools=[BALANCE], webhook_url=hook_server.url)
    try:
        first, conversation = await run(agent, "What's my balance?")
        second, _ = await run(agent, "and my savings?", conversation)
    finally:
        await agent.aclose()
    assert isinstance(first[0], ToolStarted) and first[1:] == [
        Sentence("Sorry, I could not look that up.")], first
    assert second == [Sentence("Your savings balance is twelve dollars.")], second
    assert hook.calls == []  # no webhook has that name
    tool_message = [m for m in fake.stats.bodies[1]["messages"] if m["role"] == "tool"][0]
    assert json.loads(tool_message["content"]) == {"error": f"there is no tool named {name}"}


@pytest.mark.parametrize("name", [5, ["get_balance"]], ids=["a-number", "a-list"])
async def test_a_tool_call_whose_name_is_no_text_is_the_legs_malformed_chunk(llm_server, name):
    """Review (stop 66): a leg streams a tool call whose ``function.name`` is no string (a
    number, a list: the SDKs build chunks unchecked, as for ``delta.content``). The call
    was assembled as is and its first fragment won the race: a list crashed the agent
    (unhashable, out of ``respond``: the apology), a number went to the runner ("no tool
    named 5") and into the context, which OpenAI then refused (400, the name is no string)
    at the next round and every later miss of the call. It is this leg's malformed chunk,
    before its first token: the other leg answers, nothing of it reaches the context."""
    fake, server = llm_server
    fake.strict_tool_names = True
    fake.replies["bad"] = Reply(text="", tool_calls=[(name, '{"account": "42"}')])
    fake.replies["good"] = Reply(text="Your balance is twelve dollars.")
    # A hedge delay the clock never reaches: only the failover can start the secondary.
    agent = make_agent(server, "bad", "good", tools=[BALANCE], hedge_delay_s=600.0)
    try:
        events, conversation = await run(agent, "What's my balance?")
    finally:
        await agent.aclose()
    assert events == [Sentence("Your balance is twelve dollars.")], events
    assert isinstance(agent.llm, HedgedChat) and agent.llm.stats.failovers == 1
    assert [m for m in conversation.messages() if m.get("tool_calls")] == []


class SlowTool:
    """A tool runner whose every call takes ``seconds`` of the call's clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self, call: ToolCall, clock=None) -> tuple[str, bool]:
        await clock.sleep(self.seconds)
        return '{"status": "shipped"}', True

    async def aclose(self) -> None:
        pass


def held_agent(clock: ManualClock, tool_s: float, first_token_s: float = 0.0,
               hold_after_s: float | None = 4.0) -> Agent:
    leg = ScriptedLLM(clock)
    leg.tool_calls = [ToolCall("c1", "get_order", "{}")]
    leg.reply, leg.first_token_s = "It shipped on Monday.", first_token_s
    return Agent(HedgedChat(leg, None, hedge_delay_s=0.0, idle_timeout_s=600.0,  # type: ignore[arg-type]
                            first_token_timeout_s=600.0, clock=clock),
                 [ToolSpec("get_order", "The caller's order.")], runner=SlowTool(tool_s),
                 filler_after_s=0.9, hold_after_s=hold_after_s)


async def test_a_slow_tool_gets_hold_phrases_not_silence():
    """The filler plays once, at the tool call; a webhook that then takes 9 s left the
    caller in silence for all of it (a silent line is worse than a slow one). Every
    hold_after_s of silence since (4 s of the call's clock) the agent cues a hold phrase;
    the answer still comes when the tool returns."""
    clock = ManualClock()
    agent = held_agent(clock, tool_s=9.0)
    events = agent.respond(agent.new_conversation(), "where is my order", clock=clock)
    assert await collect(events, clock, 12.0) == [
        ToolStarted("get_order", "c1"), StillWorking(4.0), StillWorking(8.0),
        Sentence("It shipped on Monday.")]


async def test_a_tool_slower_than_two_hold_phrases_is_held_until_it_answers():
    """Review (stop 58, left alone then): hold phrases stopped after two a turn, while a
    tool's timeout_s has no cap: a 30 s webhook left the caller 22 s in silence after the
    second. Every hold_after_s of the quiet gets one, for as long as it lasts."""
    clock = ManualClock()
    agent = held_agent(clock, tool_s=21.0)
    events = agent.respond(agent.new_conversation(), "where is my order", clock=clock)
    assert await collect(events, clock, 30.0) == [
        ToolStarted("get_order", "c1"), StillWorking(4.0), StillWorking(8.0),
        StillWorking(12.0), StillWorking(16.0), StillWorking(20.0),
        Sentence("It shipped on Monday.")]


async def test_a_consumer_that_stalls_gets_no_burst_of_hold_phrases():
    """Review (stop 59, of the uncapped holds): the responder reads the agent's events as it
    plays them; one that stalls (a playout frozen by a barge-in held for a false
    interruption) for 9 s after the first hold read every phrase it missed back to back on
    resume ("Still checking ... Thanks for holding ...") where the cap of two had bounded
    it. The next one is never sooner than hold_after_s after the last."""
    clock = ManualClock()
    agent = held_agent(clock, tool_s=30.0)
    events = agent.respond(agent.new_conversation(), "where is my order", clock=clock)
    seen = []

    async def read() -> None:
        async for event in events:
            seen.append((clock.now(), event))
            if isinstance(event, StillWorking) and len(seen) == 2:
                await clock.sleep(9.0)  # the consumer stalls after the first hold

    reader = asyncio.create_task(read())
    await clock.advance(20.0)
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    holds = [at for at, event in seen if isinstance(event, StillWorking)]
    assert all(later - earlier >= 4.0 for earlier, later in zip(holds, holds[1:])), seen


async def test_the_round_after_a_tool_is_held_too_and_a_quick_tool_is_not():
    """The silence after a tool call lasts until the next round's first words: a tool of
    3 s and a model that takes 3 s more to answer get one hold phrase, 4 s after the
    tool call (the first round's own slow start got the filler cue). A tool that answers
    and a model that speaks within 4 s get none."""
    clock = ManualClock()
    agent = held_agent(clock, tool_s=3.0, first_token_s=3.0)
    events = agent.respond(agent.new_conversation(), "where is my order", clock=clock)
    assert await collect(events, clock, 12.0) == [
        Slow(0.9), ToolStarted("get_order", "c1"), StillWorking(4.0),
        Sentence("It shipped on Monday.")]

    clock = ManualClock()
    agent = held_agent(clock, tool_s=2.0, first_token_s=1.0)
    events = agent.respond(agent.new_conversation(), "where is my order", clock=clock)
    assert await collect(events, clock, 12.0) == [
        Slow(0.9), ToolStarted("get_order", "c1"), Sentence("It shipped on Monday.")]


@pytest.mark.parametrize("tool_s, phrases", [(9.0, [0, 1]), (13.0, [0, 1, 0])],
                         ids=["two-holds", "phrases-in-turn"])
async def test_a_call_holds_a_slow_tool_with_spoken_phrases_then_answers(tool_s, phrases):
    """Through a whole call: the filler at the tool call, then a hold phrase as a filler
    segment every 4 s of the call's clock, the phrases in turn (a 13 s tool: the third is
    the first again), then the answer."""
    h = CallHarness()
    h.agent.tools = [ToolSpec("get_order", "The caller's order.")]
    h.agent.runner = SlowTool(tool_s)
    h.agent.hold_after_s = 4.0
    h.llm.tool_calls = [ToolCall("c1", "get_order", "{}")]
    h.llm.reply = "It shipped on Monday."
    await h.start()
    await h.text("where is my order")
    await h.wait(3900)
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["filler"]
    await h.wait(int(tool_s * 1000) + 7000)
    await h.stop()
    responses = h.output.of("response", turn=1)
    assert [(e["source"], e["text"]) for e in responses[1:]] == [
        *[("filler", HOLD_PHRASES[i]) for i in phrases], ("llm", "It shipped on Monday.")]


async def test_a_second_tool_after_words_is_held_after_hold_after_s_not_twice_that():
    """A turn's first tool got its hold phrase at 4 s, then the answer began ("It shipped
    on Monday.") and the model called a second tool of 7 s. The next hold was timed as
    the turn's second one from the new call: 8 s after it, so the caller heard 7 s of
    silence (the filler plays once a turn). Each quiet stretch is held hold_after_s
    after its tool call."""
    class Runner:
        async def run(self, call: ToolCall, clock: Clock) -> tuple[str, bool]:
            await clock.sleep({"get_order": 5.0, "get_refund": 7.0}[call.name])
            return "{}", True

        async def aclose(self) -> None:
            return None

    clock = ManualClock()
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "get_order", "{}"))],
                    [LLMChunk(text="It shipped on Monday. "),
                     LLMChunk(tool_call=ToolCall("c2", "get_refund", "{}"))],
                    [LLMChunk(text="Your refund is on its way.")])
    agent = Agent(HedgedChat(llm, None, first_token_timeout_s=600.0,  # type: ignore[arg-type]
                             idle_timeout_s=600.0, clock=clock),
                  [ToolSpec("get_order", "The order."), ToolSpec("get_refund", "The refund.")],
                  runner=Runner(), filler_after_s=0.9, hold_after_s=4.0)  # type: ignore[arg-type]
    events = agent.respond(agent.new_conversation(), "my order, and my refund?", clock=clock)
    assert await collect(events, clock, 20.0) == [
        ToolStarted("get_order", "c1"), StillWorking(4.0), Sentence("It shipped on Monday."),
        ToolStarted("get_refund", "c2"), StillWorking(4.0),
        Sentence("Your refund is on its way.")]


def stalled_mid_answer(script: list, **hedge: Any) -> CallHarness:
    """A call whose agent streams ``script`` (chunks; a float: that many seconds of the
    call's clock pass with nothing) through the hedge, holding after 4 s."""
    h = CallHarness()
    llm = HedgedChat(ScriptLLM(script, clock=h.clock), None,  # type: ignore[arg-type]
                     hedge_delay_s=0.0, clock=h.clock, **hedge)
    h.agent = Agent(llm, filler_after_s=0.9, hold_after_s=4.0)
    h.responder._agent = h.agent
    return h


def longest_silence(h: CallHarness) -> float:
    """The longest stretch (s of the call's clock) with no reply frame sent, from the
    call's first frame to its last."""
    times = [at for at, _ in h.output.frames]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


async def test_a_stall_after_the_answer_began_gets_hold_phrases_then_the_answer_goes_on():
    """Review (stop 61): the model said "Your balance is twelve dollars." and then sent no
    token for 9 s before going on. The agent cued hold phrases only while nothing had been
    said (a tool call, a stall after the filler): once a sentence was out, the caller heard
    it and then silence until the stream went on, or until llm_idle_timeout_s (10 s) failed
    the turn. Once the caller has heard everything said so far, every hold_after_s (4 s)
    of silence is held as a stall after the filler is; the answer then goes on."""
    h = stalled_mid_answer([LLMChunk(text="Your balance is twelve dollars. "), 9.0,
                            LLMChunk(text="Anything else?")], idle_timeout_s=600.0)
    await h.start()
    await h.text("what is my balance")
    await h.wait(12000)
    await h.stop()
    responses = [(e["source"], e["text"]) for e in h.output.of("response", turn=1)]
    assert responses == [("llm", "Your balance is twelve dollars."),
                         ("filler", HOLD_PHRASES[0]), ("filler", HOLD_PHRASES[1]),
                         ("llm", "Anything else?")], responses
    assert h.output.of("error") == []
    # The sentence's half second, then at most hold_after_s of silence at a time.
    assert longest_silence(h) <= 4.0 + 0.1, longest_silence(h)


async def test_a_stall_after_the_answer_began_is_held_until_the_idle_timeout_fails_it():
    """Review (stop 61): the same stall, never ending: the caller heard the first sentence
    and then 6 s of silence (llm_idle_timeout_s here), then the apology. A hold phrase
    covers the silence; the timeout still fails the turn (llm_failed, the apology)."""
    h = stalled_mid_answer([LLMChunk(text="Your balance is twelve dollars. "), 600.0,
                            LLMChunk(text="Anything else?")], idle_timeout_s=6.0)
    await h.start()
    await h.text("what is my balance")
    await h.wait(9000)
    await h.stop()
    responses = [(e["source"], e["text"]) for e in h.output.of("response", turn=1)]
    assert responses == [("llm", "Your balance is twelve dollars."),
                         ("filler", HOLD_PHRASES[0]), ("apology", APOLOGY_MESSAGE)], responses
    assert [e["code"] for e in h.output.of("error", turn=1)] == ["llm_failed"]
    assert longest_silence(h) <= 4.0 + 0.1, longest_silence(h)


async def test_a_pause_mid_answer_the_caller_never_hears_gets_no_hold_phrase():
    """The hold phrase is for the caller's silence, not the model's: a pause of 5 s after
    a first sentence 4 s long (40 words) leaves the caller 1 s of silence, and no phrase
    cuts into the answer; nor does one ever play over a sentence under way."""
    first = " ".join(["word"] * 39) + " end. "
    h = stalled_mid_answer([LLMChunk(text=first), 5.0, LLMChunk(text="Anything else?")],
                           idle_timeout_s=600.0)
    await h.start()
    await h.text("what is my balance")
    await h.wait(8000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm", "llm"]


async def test_a_hold_delay_of_zero_is_no_hold_phrase_not_a_tight_loop_of_them():
    """Review (stop 62): build_agent maps llm_hold_after_ms 0 to None (never), and the
    responder reads a hold_after_s of 0 as never too; but an Agent built (or set) directly
    with hold_after_s=0.0 timed every hold phrase at the tool call itself (held_since +
    n * 0): the due time never advanced, and StillWorking came in a tight loop for as long
    as the tool ran. 0 is never, as in the settings; a negative delay is refused."""
    clock = ManualClock()
    agent = held_agent(clock, tool_s=9.0, hold_after_s=0.0)
    events = agent.respond(agent.new_conversation(), "where is my order", clock=clock)
    seen = await collect(events, clock, 12.0)
    assert seen == [ToolStarted("get_order", "c1"), Sentence("It shipped on Monday.")], \
        f"{sum(isinstance(e, StillWorking) for e in seen)} hold cues: {seen[:4]}"
    assert agent.hold_after_s is None
    agent.hold_after_s = 0  # set, as tests/call_harness.py's calls do: the same
    assert agent.hold_after_s is None
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="hold_after_s"):
            Agent(None, hold_after_s=bad)
        with pytest.raises(ValueError, match="hold_after_s"):
            agent.hold_after_s = bad


async def test_a_filler_delay_of_zero_is_no_filler_as_in_the_settings():
    """Review (stop 62): llm_filler_after_ms 0 is never (build_agent maps it to None), but
    an Agent built directly with filler_after_s=0.0 cued the filler at once, Slow(0.0) as
    the turn began, and a negative delay the same. Read as the settings read it: 0 is never;
    a negative delay is refused."""
    clock = ManualClock()
    leg = ScriptedLLM(clock)
    leg.reply, leg.first_token_s = "Here you go.", 1.0
    agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0, clock=clock),  # type: ignore[arg-type]
                  filler_after_s=0.0)
    assert agent.filler_after_s is None
    events = agent.respond(agent.new_conversation(), "hi", clock=clock)
    assert await collect(events, clock, 2.0) == [Sentence("Here you go.")]
    with pytest.raises(ValueError, match="filler_after_s"):
        Agent(None, filler_after_s=-0.5)


HOLD_TONE = 900  # the hold phrases' samples, below: told apart from every other segment's


def with_long_hold_phrases(h: CallHarness, ms: int = 2500) -> CallHarness:
    """``h`` whose hold phrases take ``ms`` to say (a real voice's: the longest, 2.4 s in
    the shipped Piper voice), not the harness's 300 ms."""
    for i, text in enumerate(HOLD_PHRASES):
        h.responder._prompts.add(Clip(f"hold:{i}", text, tone(ms, HOLD_TONE), RATE))
    return h


def hold_phrase_runs(h: CallHarness) -> list[int]:
    """The hold phrases as heard: the frames of each stretch of their audio with no break
    (no silence, no other segment) in it."""
    runs: list[int] = []
    last: tuple[float, bool] | None = None  # the frame before: when, and whether a hold's
    for at, frame in h.output.frames:
        hold = frame_number(frame) == HOLD_TONE
        if hold:
            if last is not None and last[1] and at - last[0] <= FRAME_MS / 1000 + 1e-6:
                runs[-1] += 1
            else:
                runs.append(1)
        last = (at, hold)
    return runs


def slow_tool_call(tool_s: float) -> CallHarness:
    h = CallHarness()
    h.agent.tools = [ToolSpec("get_order", "The caller's order.")]
    h.agent.runner = SlowTool(tool_s)  # type: ignore[assignment]
    h.llm.tool_calls = [ToolCall("c1", "get_order", "{}")]
    h.llm.reply = "It shipped on Monday."
    return h


@pytest.mark.parametrize("quiet", ["tool", "stall-mid-answer"])
async def test_hold_phrases_longer_than_hold_after_s_never_play_back_to_back(quiet):
    """Review (stop 62): hold phrases are timed from the start of the last one (the agent's
    StillWorking every hold_after_s since the tool call; the responder's stall holds every
    hold_after_s after the last one began), while they take a voice 2 to 2.5 s to say. A
    hold_after_s shorter than that (an Agent built directly, or llm_hold_after_ms, which
    nothing bounded) queued each phrase behind the one still playing: the caller heard
    them back to back for as long as the tool (or the stall) lasted, never a moment of
    quiet. A phrase is never queued behind another nor started as it ends: a hold due
    while the last one plays is skipped, the next comes hold_after_s later."""
    if quiet == "tool":
        h = slow_tool_call(12.0)
    else:
        h = stalled_mid_answer([LLMChunk(text="Your balance is twelve dollars. "), 12.0,
                                LLMChunk(text="Anything else?")], idle_timeout_s=600.0)
    h.agent.hold_after_s = 1.0
    with_long_hold_phrases(h, 2500)
    await h.start()
    await h.text("where is my order")
    await h.wait(16000)
    await h.stop()
    responses = h.output.of("response", turn=1)
    holds = [e for e in responses if e["source"] == "filler" and e["text"] in HOLD_PHRASES]
    assert len(holds) >= 3, responses  # the quiet is still held, all along
    assert responses[-1]["source"] == "llm", responses  # and the answer comes
    # Each phrase heard whole (2.5 s: 125 frames) and alone, silence before the next.
    assert hold_phrase_runs(h) == [125] * len(holds), hold_phrase_runs(h)


PREFACED_CALL = ToolCall("c1", "get_balance", "{}")


@pytest.mark.parametrize("first_round, called", [
    ([LLMChunk(text="Sure, let me look that up", tool_call=PREFACED_CALL)], 0.0),
    # As the OpenAI-style providers stream it: the words, then the call's fragments while
    # its arguments are written (2 s here), then the whole call.
    ([LLMChunk(text="Sure, let me "), LLMChunk(text="look that up"),
      LLMChunk(tool_call_fragment=True), 2.0, LLMChunk(tool_call=PREFACED_CALL)], 2.0),
], ids=["in-the-tool-calls-chunk", "arguments-streamed"])
async def test_a_preface_before_a_tool_call_is_spoken_before_the_tool_starts(first_round,
                                                                             called):
    """The model writes a preface with no sentence end ("Sure, let me look that up"),
    then calls a tool. The preface stayed in the sentence chunker until the round's
    stream ended: ToolStarted (the filler) came first, or the filler cue at
    filler_after_s while the arguments were written, and the preface only after it; its
    late flush also reset the quiet stretch, so a slow tool got no hold phrase. The tool
    call ends the preface: it is spoken at once, then ToolStarted, and the tool's silence
    is held hold_after_s after the call, as after any words."""
    clock = ManualClock()
    llm = ScriptLLM(first_round, [LLMChunk(text="Your balance is twelve dollars.")],
                    clock=clock)
    agent = Agent(llm, [BALANCE], runner=SlowTool(5.0),  # type: ignore[arg-type]
                  filler_after_s=0.9, hold_after_s=4.0)
    events = agent.respond(agent.new_conversation(), "what's my balance", clock=clock)
    assert await collect(events, clock, 10.0, timed=True) == [
        (0.0, Sentence("Sure, let me look that up")),
        (called, ToolStarted("get_balance", "c1")),
        (called + 4.0, StillWorking(4.0)),
        (called + 5.0, Sentence("Your balance is twelve dollars."))]


async def test_a_call_plays_the_preface_before_a_tool_and_no_filler_after_it():
    """Through a whole call: the caller heard the filler, then the preface ("Let me check
    that for you." "Sure, let me look that up"). The preface comes first, and stands in for
    the filler (the responder plays none once words were said)."""
    h = CallHarness()
    h.agent = Agent(ScriptLLM([LLMChunk(text="Sure, let me look that up",  # type: ignore[arg-type]
                                        tool_call=PREFACED_CALL)],
                              [LLMChunk(text="Your balance is twelve dollars.")]),
                    [BALANCE], runner=BalanceRunner(), filler_after_s=None)  # type: ignore[arg-type]
    h.responder._agent = h.agent
    await h.start()
    await h.text("what is my balance")
    await h.wait(3000)
    await h.stop()
    assert [(e["source"], e["text"]) for e in h.output.of("response", turn=1)] == [
        ("llm", "Sure, let me look that up"), ("llm", "Your balance is twelve dollars.")]


@pytest.mark.parametrize("tokens", ["word", "char"])
@pytest.mark.parametrize("text, number", [
    # A number read back as a sentence of its own, after a sentence cut.
    ("Here is your confirmation number. 48213. Please keep it handy.", "48213"),
    # The reply opens with the number (the buffer opens with it).
    ("48213. That is your new reference number.", "48213"),
])
def test_a_number_said_as_a_sentence_of_its_own_is_spoken(tokens, text, number):
    """Review (stop 59): the list-marker rule took any number opening the buffer for a list
    item's "2." (the clause-cut case was fixed, the sentence-cut case not): speakable()
    stripped it and the caller never heard the confirmation number, nor did the context
    keep it. A marker is "1." to "99."."""
    pieces = chunk_all(text, tokens)
    assert number in " ".join(pieces), pieces
    whole = SentenceChunker()
    assert number in " ".join([*whole.feed(text), whole.flush()])


@pytest.mark.parametrize("tokens", ["word", "char", "whole"])
def test_a_small_number_said_as_a_sentence_is_spoken_not_taken_for_a_list_item(tokens):
    """Review (stop 64): "N." opening the buffer after a sentence's end was taken for an
    inline list's item ("Open the app. 2. Tap Settings.") whatever N was, and speakable()
    stripped it: "How many cards can I have? 3. One of them virtual." was heard as "How
    many cards can I have?" / "One of them virtual.", never the answer. Inline, a number
    is an item's only as a list's first ("1.") or the item after the last one."""
    assert chunk_all("How many cards can I have? 3. One of them virtual.", tokens) == [
        "How many cards can I have?", "3.", "One of them virtual."]
    # An inline list still loses its markers, a number after it that is no next item not.
    assert chunk_all("Here is how. 1. Open the app. 2. Tap Settings. 3. Choose Reset. "
                     "It takes 5. Minutes, that is.", tokens) == [
        "Here is how.", "Open the app.", "Tap Settings.", "Choose Reset.", "It takes 5.",
        "Minutes, that is."]


# A body held open after the model's finish: the round's last piece waited out the body's grace.


class HeldOpenLLM(ScriptLLM):
    """``ScriptLLM`` whose every body stays open after its last item (a proxy holding the
    connection after the ``finish_reason``); ``closed`` counts the streams torn down."""

    def __init__(self, *scripts: list, clock: ManualClock) -> None:
        super().__init__(*scripts, clock=clock)
        self.closed = 0

    async def stream(self, messages, tools=None):
        try:
            async for chunk in super().stream(messages, tools):
                yield chunk
            await asyncio.Event().wait()  # no [DONE], no end of the response
        finally:
            self.closed += 1


class TimedRunner(BalanceRunner):
    """``BalanceRunner`` that also notes when (clock time) each call ran."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.ran_at: list[float] = []

    async def run(self, call: ToolCall, clock: Clock) -> tuple[str, bool]:
        self.ran_at.append(self.clock.now())
        return await super().run(call, clock)


async def test_the_last_piece_is_said_at_the_models_finish_not_after_the_bodys_grace():
    """Review (stop 64): the hedge ended its stream only after the winner's body ended or
    its grace (``FINISH_GRACE_S``, 0.2 s) passed, though the model had finished; the agent
    speaks a round's last piece (the chunker's tail) and runs its tool calls at the
    stream's end. Behind a proxy holding the connection open after the finish, every
    round waited out the grace: the tool ran 0.2 s late and the answer's last sentence (a
    one-sentence answer: all of it) reached TTS 0.2 s after the model had finished, the
    caller in silence meanwhile. Both now happen at the finish; the body is still cut at
    its grace, after it, and a shutdown waits for that."""
    clock = ManualClock()
    llm = HeldOpenLLM(
        [LLMChunk(tool_call=ToolCall("call_1", "get_balance", '{"account": "42"}')),
         LLMChunk(finished=True)],
        [LLMChunk(text="Your balance is twelve dollars"), LLMChunk(finished=True)],
        clock=clock)
    runner = TimedRunner(clock)
    agent = Agent(HedgedChat(llm, None, hedge_delay_s=0.0, first_token_timeout_s=600.0,  # type: ignore[arg-type]
                             idle_timeout_s=600.0, clock=clock),
                  [BALANCE], runner=runner, filler_after_s=None, hold_after_s=None)  # type: ignore[arg-type]
    start = clock.now()
    events = agent.respond(agent.new_conversation(), "what is my balance", clock=clock)
    try:
        assert await collect(events, clock, 1.0, timed=True) == [
            (0.0, ToolStarted("get_balance", "call_1")),
            (0.0, Sentence("Your balance is twelve dollars"))]
        assert runner.ran_at == [start]  # the tool ran at the first round's finish
        assert llm.closed == 2  # each body still cut at its grace
    finally:
        await agent.aclose()


@pytest.mark.parametrize("writes", ["a sentence", "a tool call"])
async def test_first_token_ms_is_the_models_first_token_not_its_first_whole_sentence(writes):
    """Review (stop 64): ``first_token_ms`` (and ``voicegate_stage_seconds{stage=
    "first_token"}``, the admin stats' ``first_token`` p50/p99) is documented as speech end
    -> the agent's first token: what an operator reads as the model's time to first token.
    It was stamped at the first whole sentence (or whole tool call) instead: a model that
    answered "Sure," 0.2 s in and took 0.8 s more to end the sentence showed 1000 ms; one
    writing a tool call's arguments for 3 s showed 3 s, though its first token came at once.
    """
    h = CallHarness()
    if writes == "a sentence":
        llm = ScriptLLM([0.2, LLMChunk(text="Sure, "), 0.8,
                         LLMChunk(text="your card ships today.")], clock=h.clock)
        h.agent = Agent(llm, filler_after_s=None)  # type: ignore[arg-type]
    else:
        llm = ScriptLLM([0.2, LLMChunk(tool_call_fragment=True), 0.8,
                         LLMChunk(tool_call=ToolCall("call_1", "get_balance", "{}"))],
                        [LLMChunk(text="Twelve dollars.")], clock=h.clock)
        h.agent = Agent(llm, [BALANCE], runner=BalanceRunner(),  # type: ignore[arg-type]
                        filler_after_s=None)
    h.responder._agent = h.agent
    await h.start()
    await h.text("when does my card arrive")
    await h.wait(3000)
    await h.stop()
    [metrics] = h.metrics()
    assert metrics["source"] == "llm"
    assert metrics["first_token_ms"] == pytest.approx(200, abs=25), (
        f"the model's first token came 200 ms in, first_token_ms says "
        f"{metrics['first_token_ms']} ms (its first whole {writes} came at 1000 ms)")
    # A typed turn's is in no aggregate measured from speech end (stop 65: it has no
    # end-of-turn wait); tests/test_admin_units.py has a spoken turn's in them.
    assert "first_token_ms" not in h.stats.latencies["miss"]


async def test_a_reply_of_emoji_alone_is_an_empty_reply_never_silence():
    """Review (stop 66): the voice is asked for a sentence without its emoji (a voice reads
    them by name), and for nothing when that leaves nothing to say. A reply of emoji alone
    ("👍" to "thanks") was then a reply said in silence: the turn ended with the caller
    hearing nothing. Such a piece is no words: the round said nothing, so it is asked
    again, as an empty reply is, and the second answer is the reply."""
    llm = ScriptLLM([LLMChunk(text="👍")], [LLMChunk(text="You're welcome. 😊")])
    agent = Agent(HedgedChat(llm, None, clock=ManualClock()),  # type: ignore[arg-type]
                  [], filler_after_s=None)
    events, conversation = await run(agent, "thanks")
    assert events == [Sentence("You're welcome.")], events
    assert len(llm.requests) == 2  # asked again once
    assert conversation.history[-1] == {"role": "assistant", "content": "You're welcome."}


async def test_emoji_alone_twice_hands_off():
    """Review (stop 66): emoji alone when asked again too: a person takes over, as for an
    empty reply, never a turn said in silence."""
    llm = ScriptLLM([LLMChunk(text="👍🙂")], [LLMChunk(text=" 😊 ")])
    agent = Agent(HedgedChat(llm, None, clock=ManualClock()),  # type: ignore[arg-type]
                  [], filler_after_s=None)
    events, _ = await run(agent, "thanks")
    assert len(events) == 1 and isinstance(events[0], Handoff), events
    assert events[0].reason == "the LLM returned an empty reply twice"


def test_a_restored_tool_call_name_is_one_the_chat_api_takes():
    """Review (stop 66): a snapshot written before tool names were made ones the chat API
    takes back (a call resumed on another replica mid-deploy) kept "multi_tool_use.parallel"
    as written: every later request of that call would be refused (HTTP 400)."""
    conversation = Conversation("system")
    conversation.restore([
        {"role": "user", "content": "what's my balance"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "multi_tool_use.parallel", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"error\": \"no such tool\"}"}])
    call = conversation.history[-2]["tool_calls"][0]
    assert call["function"]["name"] == "multi_tool_use_parallel", call


@pytest.mark.parametrize("reply", ["👍!", "😊.", "👍 :)"])
async def test_emoji_with_punctuation_alone_is_an_empty_reply_too(reply):
    """Review (stop 66, second look): "👍!" was a piece with something left once its emoji
    went ("!"), so it counted as said while the voice had no words for it: a silent turn."""
    llm = ScriptLLM([LLMChunk(text=reply)], [LLMChunk(text="You're welcome.")])
    agent = Agent(HedgedChat(llm, None, clock=ManualClock()),  # type: ignore[arg-type]
                  [], filler_after_s=None)
    events, _ = await run(agent, "thanks")
    assert events == [Sentence("You're welcome.")], events
