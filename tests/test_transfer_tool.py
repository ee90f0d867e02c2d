"""The agent's built-in handoff tool: the model transfers a caller by calling it."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import pytest

from gateway.agent import Agent, Handoff, Sentence, ToolStarted, build_agent
from gateway.call import Call
from gateway.clock import ManualClock
from gateway.hedge import HedgedChat
from gateway.providers.base import LLMChunk, ToolCall, ToolSpec
from gateway.providers.openai_llm import OpenAIChat
from gateway.settings import Settings
from gateway.stats import Stats
from gateway.tools import ToolConfigError, load_tools
from tests.call_harness import CallHarness
from tests.fakes.openai_server import STALL, Reply
from tests.test_agent import BALANCE, BalanceRunner, ScriptLLM
from tests.test_twilio import PhoneCallOutput, SlowRestApi

TRANSFER = "transfer_to_person"
ASKED = "the caller asked for a person"


def offered(body: dict[str, Any]) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools") or []]


def system(body: dict[str, Any]) -> str:
    return body["messages"][0]["content"]


def asks_for_a_person(body: dict[str, Any]) -> Reply:
    """A model doing what its prompt says: the tool where it has one, else the words the
    old prompt asked for ("say you will transfer them")."""
    if TRANSFER in offered(body):
        return Reply(text="Of course, one moment.",
                     tool_calls=[(TRANSFER, json.dumps({"reason": ASKED}))])
    return Reply(text="Of course, I'll transfer you to a colleague.")


def real_agent(server, clock: ManualClock, *models: str, tools=(), **agent: Any) -> Agent:
    """The real SDK against the fake server, the hedge on the call's manual clock (its
    timeouts far off: nothing here waits for one)."""
    url = server.url + "/v1"
    chats = [OpenAIChat(m, base_url=url, name=m) for m in models or ("m",)]
    llm = HedgedChat(chats[0], chats[1] if len(chats) > 1 else None, hedge_delay_s=0.0,
                     first_token_timeout_s=600.0, idle_timeout_s=600.0, clock=clock)
    return Agent(llm, list(tools), filler_after_s=None, **agent)


async def until(condition: Callable[[], object], steps: int = 3000) -> bool:
    """Wait (a bound, never a pace) for the fake server's answer to reach the call."""
    for _ in range(steps):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return bool(condition())


async def play(h: CallHarness, events: list[dict[str, Any]], ms: int = 4000) -> None:
    """The reply arrives (real HTTP), then ``ms`` of the call's clock pass (it plays)."""
    assert await until(lambda: [e for e in events if e["type"] == "response"]), events
    for _ in range(ms // 20):
        await h.clock.advance(0.02)


@pytest.mark.parametrize("line", ["native", "twilio"])
async def test_a_model_asked_for_a_person_transfers_the_caller(llm_server, line):
    """Review (stop 63): the system prompt told the model "If the caller asks for a person,
    or you cannot help, say you will transfer them", but the agent had no way to: the model
    said "I'll transfer you to a colleague" and nothing happened (no `handoff` event, no
    Twilio transfer), the caller waiting for a colleague who never came. The model is now
    offered transfer_to_person (no tools file here: it is the only tool); calling it ends
    the turn with the handoff, after the words it said first."""
    fake, server = llm_server
    fake.script = asks_for_a_person
    h = CallHarness()
    h.agent = real_agent(server, h.clock)
    h.responder._agent = h.agent
    api = None
    if line == "twilio":
        api = SlowRestApi(h.clock, answer_s=0.0)
        out = PhoneCallOutput(control=api, account_sid="AC1", call_sid="CA1",  # type: ignore
                              handoff_number="+15551230000")
        h.call = Call(h.deps, out, 8000, call_id="test-call")
        events = out.events
    else:
        events = h.output.events
    await h.start()
    try:
        h.call.feed_text("can I speak to a person please", True)
        await play(h, events)
    finally:
        await h.stop()
        await h.agent.aclose()
    responses = [(e["source"], e["text"]) for e in events if e["type"] == "response"]
    handoffs = [e for e in events if e["type"] == "handoff"]
    assert handoffs and (api is None or api.asked), (
        f"the caller heard {responses}: no handoff event, no transfer")
    assert [s for s, _ in responses] == ["llm", "handoff"], responses
    assert responses[0][1] == "Of course, one moment."
    assert [e["reason"] for e in handoffs] == [f"the agent handed off: {ASKED}"]
    if api is not None:
        assert api.asked == ["transfer"] and api.answered == ["transfer"]
    body = fake.stats.bodies[0]
    assert offered(body) == [TRANSFER]
    assert "say you will transfer them" not in system(body)
    assert TRANSFER in system(body)
    (metrics,) = [e for e in events if e["type"] == "turn_metrics"]
    assert metrics["source"] == "handoff"
    assert h.agent.runner.outcomes[(TRANSFER, "handoff")] == 1
    # The context holds the call and its result: a later turn (a failed transfer) is a
    # valid request, and the model knows it handed the caller off.
    history = h.call.conversation.history
    assert history[-2]["tool_calls"][0]["function"]["name"] == TRANSFER
    assert history[-1]["role"] == "tool"


async def test_a_line_that_cannot_transfer_offers_no_transfer_and_says_so(llm_server):
    """Review (stop 63): a Twilio line with no handoff number cannot put anyone through;
    the model must not promise a transfer there. It is offered no transfer tool, and its
    prompt says it cannot transfer."""
    fake, server = llm_server
    fake.script = lambda body: Reply(text="I can help you with that here.")
    h = CallHarness()
    h.agent = real_agent(server, h.clock)
    h.responder._agent = h.agent
    out = PhoneCallOutput()  # no REST credentials, no handoff number
    h.call = Call(h.deps, out, 8000, call_id="test-call")
    await h.start()
    try:
        h.call.feed_text("can I speak to a person please", True)
        await play(h, out.events)
    finally:
        await h.stop()
        await h.agent.aclose()
    body = fake.stats.bodies[0]
    assert offered(body) == []
    assert "say you will transfer them" not in system(body)
    assert TRANSFER not in system(body) and "cannot transfer" in system(body)
    assert [e["source"] for e in out.events if e["type"] == "response"] == ["llm"]


def respond(agent: Agent, text: str = "I want a person", **kwargs: Any):
    async def events() -> list[Any]:
        conversation = agent.new_conversation()
        got = [e async for e in agent.respond(conversation, text, clock=ManualClock(),
                                              **kwargs)]
        return got, conversation
    return events()


async def test_the_transfer_tool_is_offered_beside_the_operators_until_the_last_round():
    """Every round that offers tools offers transfer_to_person after the operator's; the
    last round still offers none (the model must answer in words). Called after a tool
    round, it hands off after that round's words; the webhook is never asked for it."""
    transfer = ToolCall("c2", TRANSFER, '{"reason": "a refund needs a colleague"}')
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "get_balance", "{}"))],
                    [LLMChunk(text="I see a refund is due. "), LLMChunk(tool_call=transfer)])
    runner = BalanceRunner()
    agent = Agent(llm, [BALANCE], runner=runner, filler_after_s=None)  # type: ignore[arg-type]
    events, conversation = await respond(agent)
    assert [[t.name for t in tools] for tools in llm.requests] == [
        ["get_balance", TRANSFER], ["get_balance", TRANSFER]]
    assert events == [ToolStarted("get_balance", "c1"), Sentence("I see a refund is due."),
                      Handoff("the agent handed off: a refund needs a colleague")]
    assert [c.name for c in runner.calls] == ["get_balance"]  # never a webhook
    assert conversation.history[-1] == {"role": "tool", "tool_call_id": "c2",
                                        "content": json.dumps({"result": "the caller is being "
                                                               "transferred to a person"})}
    # The last round offers nothing, with or without operator tools.
    assert agent._tools_for(agent.max_tool_rounds, True) is None
    alone = Agent(ScriptLLM(), filler_after_s=None)  # type: ignore[arg-type]
    assert [t.name for t in alone._tools_for(0, True)] == [TRANSFER]
    assert alone._tools_for(alone.max_tool_rounds, True) is None
    assert alone._tools_for(0, False) is None  # no tools, a line that cannot transfer
    assert [t.name for t in agent._tools_for(0, False)] == ["get_balance"]


async def test_a_transfer_called_beside_another_tool_runs_no_webhook():
    """The caller is leaving: a tool called in the same round is not run (its filler,
    cued as its call streamed in, before the transfer came, may play first), and the
    context says so."""
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "get_balance", "{}")),
                     LLMChunk(tool_call=ToolCall("c2", TRANSFER, "{}"))])
    runner = BalanceRunner()
    agent = Agent(llm, [BALANCE], runner=runner, filler_after_s=None)  # type: ignore[arg-type]
    events, conversation = await respond(agent)
    assert events == [ToolStarted("get_balance", "c1"), Handoff("the agent handed off")]
    assert runner.calls == []
    results = {m["tool_call_id"]: json.loads(m["content"]) for m in conversation.history
               if m["role"] == "tool"}
    assert "not run" in results["c1"]["error"] and "transferred" in results["c2"]["result"]


async def test_a_line_that_cannot_transfer_is_offered_only_the_operators_tools():
    llm = ScriptLLM([LLMChunk(text="Sorry, I can't put you through on this line.")])
    agent = Agent(llm, [BALANCE], runner=BalanceRunner(),  # type: ignore[arg-type]
                  filler_after_s=None)
    events, conversation = await respond(agent, can_hand_off=False)
    assert [[t.name for t in tools] for tools in llm.requests] == [["get_balance"]]
    assert events == [Sentence("Sorry, I can't put you through on this line.")]
    prompt = conversation.messages()[0]["content"]
    assert "cannot transfer" in prompt and TRANSFER not in prompt


async def test_no_tool_rounds_means_no_transfer_tool_and_a_prompt_that_says_so():
    llm = ScriptLLM([LLMChunk(text="Let me help you here.")])
    agent = Agent(llm, max_tool_rounds=0, filler_after_s=None)  # type: ignore[arg-type]
    events, conversation = await respond(agent)
    assert llm.requests == [None]
    prompt = conversation.messages()[0]["content"]
    assert "cannot transfer" in prompt and TRANSFER not in prompt


async def test_a_transfer_called_in_the_last_round_still_hands_off():
    """The last round offers no tools; a model that calls transfer_to_person anyway on a
    line that can transfer meant it (it may have said "I'll transfer you"): the handoff,
    no `llm_tool_not_offered`."""
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "get_balance", "{}"))],
                    [LLMChunk(text="Let me get you a colleague. "),
                     LLMChunk(tool_call=ToolCall("c2", TRANSFER, "{}"))])
    agent = Agent(llm, [BALANCE], runner=BalanceRunner(), max_tool_rounds=1,  # type: ignore
                  filler_after_s=None)
    events, _ = await respond(agent)
    assert llm.requests[1] is None
    assert events[1:] == [Sentence("Let me get you a colleague."),
                          Handoff("the agent handed off")]


def test_a_tools_file_declaring_the_builtin_transfer_tool_is_refused(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{"name": TRANSFER, "url": "http://127.0.0.1:9/transfer"}]))
    with pytest.raises(ToolConfigError, match="built in"):
        load_tools(str(path))
    with pytest.raises(ValueError, match="built in"):
        Agent(None, [ToolSpec(TRANSFER, "mine", url="http://127.0.0.1:9/t")])


async def test_an_operators_system_prompt_gets_the_transfer_sentence_too(llm_server):
    fake, server = llm_server
    fake.default = Reply(text="Hello.")
    settings = Settings.load({"llm_primary_model": "m", "llm_primary_url": server.url + "/v1",
                              "llm_system_prompt": "You are Bob at Acme Bank."}, environ={})
    agent = build_agent(settings)
    try:
        conversation = agent.new_conversation()
        [e async for e in agent.respond(conversation, "hi", clock=ManualClock())]
        [e async for e in agent.respond(conversation, "hi again", clock=ManualClock(),
                                        can_hand_off=False)]
    finally:
        await agent.aclose()
    first, second = (system(b) for b in fake.stats.bodies)
    assert first.startswith("You are Bob at Acme Bank.\n") and TRANSFER in first
    assert second.startswith("You are Bob at Acme Bank.\n") and "cannot transfer" in second


@pytest.mark.parametrize("winner", ["words", "transfer"])
async def test_only_the_winning_legs_transfer_counts(llm_server, winner):
    """The hedged pair: the leg that answers first is heard; the other's tool call (a
    transfer or not) is never seen."""
    fake, server = llm_server
    words = Reply(text="We open at nine.")
    transfer = Reply(text="", tool_calls=[(TRANSFER, "{}")])
    fast, slow = (words, transfer) if winner == "words" else (transfer, words)
    fake.replies["primary"] = fast
    fake.replies["secondary"] = Reply(text=slow.text, tool_calls=slow.tool_calls, ttft_s=STALL)
    agent = real_agent(server, ManualClock(), "primary", "secondary")
    try:
        events, _ = await respond(agent, "when do you open")
    finally:
        await agent.aclose()
    if winner == "words":
        assert events == [Sentence("We open at nine.")]
    else:
        assert events == [Handoff("the agent handed off")]
    # Counted apart from the webhooks' calls, and only the heard leg's.
    stats = Stats()
    stats.watch_tools(agent.runner)
    counted = {(s.labels["tool"], s.labels["outcome"]): s.value
               for metric in stats.prometheus.registry.collect()
               if metric.name == "voicegate_tool_calls" for s in metric.samples}
    assert counted == ({} if winner == "words" else {(TRANSFER, "handoff"): 1.0})


async def test_a_preemptive_start_is_adopted_on_its_own_line_only():
    """The request (system prompt, tools) differs by whether the line can transfer: a
    start made for one is adopted by a turn on the same line, not by another."""
    for preempt_line, turn_line, adopted in [(True, True, True), (False, False, True),
                                             (True, False, False)]:
        llm = ScriptLLM([LLMChunk(text="Sure.")], [LLMChunk(text="Sure.")])
        agent = Agent(llm, filler_after_s=None)  # type: ignore[arg-type]
        conversation = agent.new_conversation()
        preempt = agent.preempt(conversation, "hello there", can_hand_off=preempt_line)
        assert preempt is not None
        await asyncio.sleep(0)
        events = [e async for e in agent.respond(conversation, "hello there", preempt,
                                                 can_hand_off=turn_line)]
        await preempt.aclose()
        assert events == [Sentence("Sure.")]
        assert preempt.adopted is adopted, (preempt_line, turn_line)
        assert len(llm.requests) == (1 if adopted else 2)
