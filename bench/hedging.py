"""Hedging on a heavy-tailed upstream: single provider vs hedged pair.

The fake upstream's time to first token is log-normal around 150 ms, and 5% of
requests stall for 2 s before their first token. Every request draws independently,
so the primary and the secondary leg of one turn are independent too.

    PYTHONPATH=. python bench/hedging.py [--turns 600] [--concurrency 10] [--delay-ms -1]

Prints p50/p95/p99 time to first token (measured by the client: call to first chunk)
and the extra requests hedging costs. No assertion: the figures go in the report.
The fake runs in the same process (its own thread and loop), so client and server
share the cores: at high concurrency on a small machine the measured TTFT includes
scheduling overhead on top of the fake's draw.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from gateway.hedge import AdaptiveDelay, HedgedChat
from gateway.providers.base import ChatModel
from gateway.providers.openai_llm import OpenAIChat
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.fakes.server import ServerThread

MESSAGES = [{"role": "user", "content": "When does my contract end?"}]


def heavy_tail(rng: random.Random, median_s: float, sigma: float, stall_p: float, stall_s: float):
    def script(_body: dict) -> Reply:
        if rng.random() < stall_p:
            ttft = stall_s
        else:
            ttft = rng.lognormvariate(0.0, sigma) * median_s
        return Reply(text="Your contract ends in March. Anything else?", ttft_s=ttft)
    return script


async def first_token_times(model: ChatModel, turns: int, concurrency: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []

    async def turn() -> None:
        async with gate:
            started = time.monotonic()
            stream = model.stream(MESSAGES)
            try:
                async for _chunk in stream:
                    times.append(time.monotonic() - started)
                    break
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    await asyncio.gather(*(turn() for _ in range(turns)))
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(label: str, times: list[float]) -> str:
    return (f"{label:<8} n={len(times):4d}  p50={pct(times, .5) * 1000:6.0f} ms  "
            f"p95={pct(times, .95) * 1000:6.0f} ms  p99={pct(times, .99) * 1000:6.0f} ms  "
            f"mean={statistics.fmean(times) * 1000:6.0f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--delay-ms", type=int, default=-1, help="-1: adaptive (the default)")
    parser.add_argument("--median-ms", type=float, default=150.0)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--stall-p", type=float, default=0.05)
    parser.add_argument("--stall-ms", type=float, default=2000.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    fake = FakeOpenAI()
    fake.script = heavy_tail(random.Random(args.seed), args.median_ms / 1000, args.sigma,
                             args.stall_p, args.stall_ms / 1000)
    with ServerThread(fake) as server:
        url = server.url + "/v1"
        single = OpenAIChat("upstream", base_url=url, name="single")
        await first_token_times(single, 20, 10)  # warm the connection pool
        single_times = await first_token_times(single, args.turns, args.concurrency)

        delay = None if args.delay_ms < 0 else args.delay_ms / 1000
        hedged = HedgedChat(OpenAIChat("upstream", base_url=url, name="primary"),
                            OpenAIChat("upstream", base_url=url, name="secondary"),
                            hedge_delay_s=delay, adaptive=AdaptiveDelay())
        hedged_times = await first_token_times(hedged, args.turns, args.concurrency)
        stats = hedged.stats
        for model in (single, hedged.primary, hedged.secondary):
            await model.aclose()  # type: ignore[attr-defined]

    mode = "adaptive" if delay is None else f"fixed {args.delay_ms} ms"
    print(f"upstream: TTFT log-normal median {args.median_ms:.0f} ms sigma {args.sigma}, "
          f"{args.stall_p:.0%} stalls of {args.stall_ms:.0f} ms; {args.turns} turns, "
          f"concurrency {args.concurrency}; hedge delay {mode}")
    print(line("single", single_times))
    print(line("hedged", hedged_times))
    if delay is None:
        print(f"adaptive delay at the end: {hedged.adaptive.delay_s() * 1000:.0f} ms "
              f"(p{hedged.adaptive.percentile * 100:.0f} of the primary's recent TTFT)")
    ratio = pct(hedged_times, .99) / pct(single_times, .99)
    print(f"extra requests: {stats.extra_requests}/{stats.turns} = {stats.extra_requests / stats.turns:.1%} "
          f"(failovers {stats.failovers}, secondary wins {stats.secondary_wins})")
    print(f"hedged p99 / single p99 = {ratio:.2f}  (bar: <= 0.50 with <= 25% extra requests)")


if __name__ == "__main__":
    asyncio.run(main())
