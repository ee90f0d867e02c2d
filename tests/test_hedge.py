"""The hedged pair against the real openai SDK and a local fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from gateway.agent import Agent
from gateway.audio_bank import AudioBank
from gateway.clock import ManualClock
from gateway.hedge import AdaptiveDelay, HedgedChat
from gateway.providers.base import LLMChunk, ProviderError
from gateway.responder import Responder, Turn
from gateway.timeline import TurnTimeline
from tests.call_harness import RATE, WordTTS
from gateway.providers.groq_llm import GroqChat
from gateway.providers.openai_llm import OpenAIChat
from tests.fakes.openai_server import STALL, Reply

MESSAGES = [{"role": "user", "content": "What are your opening hours?"}]


def pair(server, primary: str, secondary: str, **kwargs) -> HedgedChat:
    url = server.url + "/v1"
    return HedgedChat(OpenAIChat(primary, base_url=url, name=primary),
                      OpenAIChat(secondary, base_url=url, name=secondary), **kwargs)


async def collect(model) -> str:
    return "".join([chunk.text async for chunk in model.stream(MESSAGES)])


async def test_faster_stream_wins_and_loser_is_closed(llm_server):
    fake, server = llm_server
    fake.replies["slow"] = Reply(text="From the slow one.", ttft_s=STALL)
    fake.replies["fast"] = Reply(text="From the fast one.", after_request_of="slow")
    hedged = pair(server, "slow", "fast", hedge_delay_s=0.0)

    assert await collect(hedged) == "From the fast one."
    assert hedged.stats.secondary_wins == 1 and hedged.stats.extra_requests == 1
    # The loser's HTTP stream was closed: the upstream saw the client go away.
    assert await fake.await_for(lambda s: s.disconnects["slow"] == 1)
    assert fake.stats.completed["fast"] == 1


async def test_primary_wins_when_it_is_faster(llm_server):
    fake, server = llm_server
    fake.replies["fast"] = Reply(text="Primary answer.", after_request_of="slow")
    fake.replies["slow"] = Reply(text="Secondary answer.", ttft_s=STALL)
    hedged = pair(server, "fast", "slow", hedge_delay_s=0.0)
    assert await collect(hedged) == "Primary answer."
    assert hedged.stats.primary_wins == 1
    assert await fake.await_for(lambda s: s.disconnects["slow"] == 1)


async def test_secondary_not_started_when_primary_answers_before_the_delay(llm_server):
    fake, server = llm_server
    hedged = pair(server, "a", "b", hedge_delay_s=30.0)
    await collect(hedged)
    assert hedged.stats.extra_requests == 0 and fake.stats.requests["b"] == 0


@pytest.mark.parametrize("failure", [Reply(status=503), Reply(status=429),
                                     Reply(malformed_at=1), Reply(ttft_s=STALL)],
                         ids=["5xx", "4xx", "malformed", "stall"])
async def test_failure_before_first_token_hands_over_at_once(llm_server, failure):
    fake, server = llm_server
    fake.replies["bad"] = failure
    fake.replies["good"] = Reply(text="Backup answer.")
    # A hedge delay far beyond the test's patience: only the failover can start the secondary.
    # The stall timeout also bounds the backup leg: generous, so a loaded machine still passes.
    hedged = pair(server, "bad", "good", hedge_delay_s=600.0, first_token_timeout_s=3.0)
    assert await collect(hedged) == "Backup answer."
    assert hedged.stats.failovers == 1 and hedged.stats.secondary_wins == 1
    if failure.ttft_s == STALL:
        assert await fake.await_for(lambda s: s.disconnects["bad"] == 1)


async def test_every_leg_failing_raises_provider_error(llm_server):
    fake, server = llm_server
    fake.replies["x"] = Reply(status=500)
    fake.replies["y"] = Reply(status=502)
    hedged = pair(server, "x", "y", hedge_delay_s=600.0)
    with pytest.raises(ProviderError, match="every LLM failed"):
        await collect(hedged)
    assert hedged.stats.all_failed == 1


async def test_failure_after_the_first_token_is_raised_not_retried(llm_server):
    fake, server = llm_server
    fake.replies["p"] = Reply(text="One two three four.", malformed_at=3)
    hedged = pair(server, "p", "s", hedge_delay_s=600.0)
    with pytest.raises(ProviderError, match="malformed"):
        await collect(hedged)
    assert fake.stats.requests["s"] == 0


async def test_cancelling_the_consumer_closes_both_streams(llm_server):
    fake, server = llm_server
    fake.replies["p"] = Reply(ttft_s=STALL)
    fake.replies["s"] = Reply(ttft_s=STALL)
    hedged = pair(server, "p", "s", hedge_delay_s=0.0, first_token_timeout_s=600.0)
    task = asyncio.create_task(collect(hedged))
    assert await fake.await_for(lambda s: s.requests["p"] == 1 and s.requests["s"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.await_for(lambda s: s.disconnects["p"] == 1 and s.disconnects["s"] == 1)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]


async def test_tool_call_is_assembled_from_fragments(llm_server):
    fake, server = llm_server
    fake.replies["t"] = Reply(text="", tool_calls=[("get_order", '{"order_id": "A-17"}'),
                                                    ("get_balance", '{"account": "9"}')])
    model = OpenAIChat("t", base_url=server.url + "/v1")
    calls = [c.tool_call async for c in model.stream(MESSAGES) if c.tool_call]
    assert [(c.name, c.arguments) for c in calls] == [("get_order", '{"order_id": "A-17"}'),
                                                      ("get_balance", '{"account": "9"}')]
    await model.aclose()


async def test_groq_adapter_streams_through_its_own_path(llm_server):
    fake, server = llm_server
    fake.replies["llama"] = Reply(text="Groq says hi.")
    model = GroqChat("llama", api_key="test-key", base_url=server.url)
    assert "".join([c.text async for c in model.stream(MESSAGES)]) == "Groq says hi."
    fake.replies["llama"] = Reply(status=401)
    with pytest.raises(ProviderError, match="HTTP 401"):
        [c async for c in model.stream(MESSAGES)]
    await model.aclose()


def test_adaptive_delay_tracks_a_high_percentile_with_a_floor():
    delay = AdaptiveDelay(percentile=0.9, floor_s=0.05, ceiling_s=2.0, initial_s=0.4, min_samples=10)
    assert delay.delay_s() == 0.4  # too few samples: the initial value
    for n in range(100):
        delay.observe(0.1 + n / 1000)  # 0.100 .. 0.199
    assert 0.185 <= delay.delay_s() <= 0.195
    for _ in range(200):
        delay.observe(0.001)
    assert delay.delay_s() == 0.05  # the floor
    for _ in range(200):
        delay.observe(30.0)
    assert delay.delay_s() == 2.0  # the ceiling


# A barge-in cancels the reply as the LLM's next token arrives: on Python 3.11
# asyncio.wait_for swallowed such a cancel, so the hedged stream went on with nobody
# reading it, the reply's producer blocked on its full queue and the reply (and every
# later turn of the call, queued behind it) never ended. Counted in loop iterations.


class GatedLeg:
    """One LLM leg: a first token at once, then the rest once ``gate`` opens."""

    name = "gated"

    def __init__(self, rest: list[str]) -> None:
        self.gate = asyncio.Event()
        self.rest = rest
        self.opened = self.closed = 0

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        self.opened += 1
        try:
            yield LLMChunk(text="First sentence here. ")
            await self.gate.wait()
            for word in self.rest:
                await asyncio.sleep(0)
                yield LLMChunk(text=word + " ")
        finally:
            self.closed += 1


async def spin(iterations: int) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)


async def until(predicate, iterations: int = 2000) -> bool:
    for _ in range(iterations):
        if predicate():
            return True
        await asyncio.sleep(0)
    return predicate()


async def test_a_cancel_as_a_token_arrives_stops_the_hedged_stream():
    swallowed: list[int] = []
    for n in range(30):  # the cancel lands n loop iterations after the token is released
        leg = GatedLeg(["Second."])
        hedged = HedgedChat(leg, None, hedge_delay_s=0.0)  # type: ignore[arg-type]
        got: list[str] = []

        async def consume() -> None:
            async with contextlib.aclosing(hedged.stream(MESSAGES)) as chunks:
                async for chunk in chunks:
                    got.append(chunk.text)

        task = asyncio.create_task(consume())
        assert await until(lambda: bool(got))
        leg.gate.set()
        await spin(n)
        if task.done():
            break  # the whole stream fitted in n iterations: nothing left to cancel
        task.cancel()
        [result] = await asyncio.gather(task, return_exceptions=True)
        if not isinstance(result, asyncio.CancelledError):
            swallowed.append(n)
        assert leg.closed == leg.opened
    assert not swallowed, f"the cancel was swallowed at iterations {swallowed}"


async def test_a_barge_in_as_a_token_arrives_ends_the_reply_and_closes_the_llm_stream():
    words = " ".join(f"This is sentence number {k} of the answer." for k in range(10)).split()
    for n in range(40):
        leg = GatedLeg(words)
        agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0),  # type: ignore[arg-type]
                      filler_after_s=None)
        responder = Responder(agent, WordTTS(), AudioBank(rates=(RATE,), encoded=()))  # type: ignore[arg-type]
        turn = Turn(number=1, text="where is my order", sample_rate=RATE,
                    timeline=TurnTimeline(1, clock=ManualClock()),
                    conversation=agent.new_conversation())
        playing = asyncio.Event()

        async def play() -> None:  # ReplyStage's loop, reduced: it stays on the first piece
            async with contextlib.aclosing(responder.respond(turn)) as segments:
                async for _segment in segments:
                    playing.set()
                    await asyncio.Event().wait()  # the first sentence playing out

        reply = asyncio.create_task(play())
        assert await until(playing.is_set)
        leg.gate.set()
        await spin(n)
        reply.cancel()  # the barge-in
        ended = await until(reply.done)
        if not ended:
            reply.cancel()  # unstick it so the test can end
        await asyncio.gather(reply, return_exceptions=True)
        assert ended, f"a barge-in {n} iterations after the token: the reply never ended"
        assert leg.closed == leg.opened
