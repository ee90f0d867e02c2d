"""The agent's own share of a cache miss, up to the first Sentence for TTS.

A fake upstream answers with its first token after 100 ms (then all tokens at once).
Per turn we time ``Agent.respond()`` to its first ``Sentence`` and subtract the
upstream's 100 ms: what is left is our code (context, hedge, SDK request and SSE
parsing, chunking) plus loopback HTTP and the in-process fake's scheduling.
TTS and playout are not included (they belong to the call loop). For scale, the
same measurement with bare httpx (POST, read SSE lines to the first content) is
printed as a baseline: the loopback and fake's share that is not our code.

    PYTHONPATH=. python bench/agent_overhead.py [--turns 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from gateway.agent import Agent, Sentence
from gateway.hedge import HedgedChat
from gateway.providers.openai_llm import OpenAIChat
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.fakes.server import ServerThread

UPSTREAM_TTFT_S = 0.100


async def bare_http(url: str, turns: int) -> list[float]:
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "When does my contract end?"}]}
    times = []
    async with httpx.AsyncClient() as client:
        for n in range(turns + 10):
            started = time.perf_counter()
            async with client.stream("POST", url, json=body) as response:
                async for line in response.aiter_lines():
                    if '"content": "Your"' in line:
                        break
            if n >= 10:
                times.append(time.perf_counter() - started - UPSTREAM_TTFT_S)
    return sorted(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()

    fake = FakeOpenAI()
    fake.default = Reply(text="Your contract ends in March, on the thirty-first. Anything else?",
                         ttft_s=UPSTREAM_TTFT_S)
    with ServerThread(fake) as server:
        url = server.url + "/v1"
        llm = HedgedChat(OpenAIChat("a", base_url=url), OpenAIChat("b", base_url=url))
        agent = Agent(llm, filler_after_s=None)
        conversation = agent.new_conversation()
        overheads = []
        for n in range(args.turns + 10):
            started = time.perf_counter()
            events = agent.respond(conversation, "When does my contract end?")
            async for event in events:
                if isinstance(event, Sentence):
                    if n >= 10:  # the first turns warm connections
                        overheads.append(time.perf_counter() - started - UPSTREAM_TTFT_S)
                    break
            await events.aclose()  # as a barge-in would: closes both LLM streams now
        await agent.aclose()
        baseline = await bare_http(server.url + "/v1/chat/completions", args.turns)

    print(f"baseline: bare httpx to the first content line minus {UPSTREAM_TTFT_S * 1000:.0f} ms: "
          f"p50={baseline[len(baseline) // 2] * 1000:.1f} ms  p95={baseline[int(len(baseline) * .95)] * 1000:.1f} ms")

    overheads.sort()
    ms = [x * 1000 for x in overheads]
    print(f"agent: respond() -> first Sentence minus {UPSTREAM_TTFT_S * 1000:.0f} ms upstream TTFT, "
          f"{len(ms)} sequential turns (hedged pair, adaptive delay)")
    print(f"p50={ms[len(ms) // 2]:.1f} ms  p95={ms[int(len(ms) * .95)]:.1f} ms  "
          f"max={ms[-1]:.1f} ms  (the issue's target for the gateway's whole share: <= 15 ms)")


if __name__ == "__main__":
    asyncio.run(main())
