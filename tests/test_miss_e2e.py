"""Cache misses end to end: gateway -> hedged LLM (real openai SDK -> local fake) -> Piper -> client."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.agent import Agent
from gateway.client import Caller
from gateway.hedge import HedgedChat
from gateway.providers.base import ToolSpec
from gateway.providers.openai_llm import OpenAIChat
from gateway.server import BackgroundServer
from tests.fakes.openai_server import STALL, Reply

pytestmark = pytest.mark.slow

BALANCE = ToolSpec(name="get_balance", description="The caller's account balance.",
                   parameters={"type": "object", "properties": {"account": {"type": "string"}},
                               "required": ["account"]})


@pytest.fixture
def agent_gateway(settings, runtime, llm_server, webhook):
    """A gateway sharing the session's warm models, with an agent on the fake LLM."""
    fake, llm = llm_server
    hook, hook_server = webhook
    tool = dataclasses.replace(BALANCE, url=hook_server.url + "/tool/get_balance", timeout_s=5.0)
    chats = [OpenAIChat(m, base_url=llm.url + "/v1", name=m) for m in ("primary", "secondary")]
    agent = Agent(HedgedChat(chats[0], chats[1], hedge_delay_s=0.0), [tool], filler_after_s=None)
    rt = dataclasses.replace(runtime, agent=agent)
    server = BackgroundServer(settings, rt).start()
    yield server, fake, hook
    server.stop()


def long_answer(fake, sentences: int, **reply) -> str:
    """The primary answers ``sentences`` sentences (seconds of speech each), set on ``fake``;
    the secondary stalls. The primary answers once the secondary's request has reached the
    server, or the loser may be cancelled while still connecting, never seen (a CI run,
    stop 65). For a reply still playing when a loaded machine's barge-in comes."""
    text = " ".join(f"Sentence number {i} of a long answer." for i in range(1, sentences + 1))
    fake.replies["primary"] = Reply(text=text, after_request_of="secondary", **reply)
    fake.replies["secondary"] = Reply(text=text, ttft_s=STALL, **reply)
    return text


def sources(turn) -> list[str]:
    return [e["source"] for e in turn.events if e["type"] == "response"]


async def test_llm_reply_streams_sentences_to_audio(agent_gateway):
    server, fake, _ = agent_gateway
    # The primary answers once the secondary's request has reached the server: on a loaded
    # machine the loser could otherwise be cancelled while still connecting, its request
    # never seen, and no disconnect to count (a CI run, stop 64).
    fake.replies["primary"] = Reply(text="Our branches open at nine. On Saturdays they open at ten.",
                                    after_request_of="secondary")
    fake.replies["secondary"] = Reply(text="Secondary answer.", ttft_s=STALL)
    async with Caller(server.call_url) as caller:
        turn = await caller.say_text("when do you open")
    assert sources(turn) == ["llm", "llm"]
    texts = [e["text"] for e in turn.events if e["type"] == "response"]
    assert texts == ["Our branches open at nine.", "On Saturdays they open at ten."]
    metrics = turn.metrics
    assert metrics["source"] == "llm" and metrics["first_token_ms"] is not None
    assert metrics["first_audio_ms"] is not None and len(turn.audio) > 16000
    # the hedge's loser was closed, not left streaming
    assert await fake.await_for(lambda s: s.disconnects["secondary"] == 1)


async def test_tool_call_plays_filler_first_then_the_answer(agent_gateway):
    server, fake, hook = agent_gateway

    def script(body):
        if any(m.get("role") == "tool" for m in body["messages"]):
            return Reply(text="Your balance is twelve dollars.")
        return Reply(text="", tool_calls=[("get_balance", '{"account": "42"}')])
    fake.script = script
    async with Caller(server.call_url) as caller:
        turn = await caller.say_text("what is my balance")
    assert sources(turn) == ["filler", "llm"]
    assert turn.first("response", source="llm")["text"] == "Your balance is twelve dollars."
    assert turn.metrics["source"] == "llm"
    assert hook.calls and hook.calls[0]["tool"] == "get_balance"
    assert hook.calls[0]["arguments"] == {"account": "42"}


async def test_every_llm_failing_hands_off_with_audio(agent_gateway):
    server, fake, _ = agent_gateway
    fake.default = Reply(status=503)
    fake.replies.clear()
    async with Caller(server.call_url) as caller:
        turn = await caller.say_text("can you help me")
    assert sources(turn) == ["handoff"]
    assert turn.first("handoff") is not None and len(turn.audio) > 16000


async def test_barge_in_cancels_the_streams_and_trims_the_context(agent_gateway):
    server, fake, _ = agent_gateway
    answer = long_answer(fake, 39, token_delay_s=0.05)
    async with Caller(server.call_url) as caller:
        index = len(caller.events)
        await caller.send_json({"type": "text", "text": "tell me everything", "final": True})
        await caller.wait_for("response", start=index, source="llm")
        # A second of the answer has reached the caller (counted in audio received, not in
        # time slept: on a loaded machine the reply may start late).
        async with asyncio.timeout(30):
            while len(caller.audio) < caller.sample_rate * 2:
                await asyncio.sleep(0.02)
        await caller.send_json({"type": "text", "text": "stop", "final": False})
        interrupt = await caller.wait_for("interrupt", start=index)
        # both LLM streams are closed by the barge-in (the loser earlier, at the first token)
        assert await fake.await_for(lambda s: s.disconnects["primary"] >= 1
                                    and s.disconnects["secondary"] >= 1)
        # The cut turn ends (its metrics) once its context is cut to the heard words; on a
        # loaded machine that is after the disconnects, and say_text would take the cut
        # turn's metrics for its own and read the requests before the next one is sent.
        await caller.wait_for("turn_metrics", start=index, turn=interrupt["turn"])
        fake.replies["primary"] = Reply(text="Okay.")
        turn = await caller.say_text("what did you just say")
    assert interrupt["heard_ms"] > 0
    assert turn.number > interrupt["turn"]
    last_request = fake.stats.bodies[-1]["messages"]
    assistant = [m for m in last_request if m["role"] == "assistant"]
    assert assistant, ("no assistant message in the last request: roles per request "
                       f"{[[m['role'] for m in b['messages']] for b in fake.stats.bodies]}, "
                       f"interrupt {interrupt}")
    heard = assistant[0]["content"]
    # the context keeps what the caller heard, not the whole long answer
    assert heard and answer.startswith(heard) and len(heard) < len(answer) / 2
    assert sources(turn) == ["llm"]
