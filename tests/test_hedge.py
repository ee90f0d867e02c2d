"""The hedged pair against the real openai SDK and a local fake upstream."""

from __future__ import annotations

import asyncio

import pytest

from gateway.hedge import AdaptiveDelay, HedgedChat
from gateway.providers.base import ProviderError
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
