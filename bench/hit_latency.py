"""Server-side ``first_audio_ms`` for FAQ cache hits with 1, 50 and 200 concurrent calls.

    python bench/hit_latency.py [--calls 1 50 200] [--turns-total 200]

A gateway runs in its own process on the example bank FAQ (seeded into a temporary
store with the real voice). Each simulated caller sends FAQ paraphrases word by word
as partial ``text`` messages at speaking pace (150 ms a word), then the final text,
and waits for the reply's first audio; the next question's first words interrupt the
reply (a barge-in), which also ends the turn and brings its ``turn_metrics``.
Reported: p50/p99 of the server's ``first_audio_ms`` (end of turn -> first reply
frame sent) over the hit turns, the share of hits, and how many decisions were
already made on partials (``route_reused``).

The eight questions repeat, so after the first turns every partial's vector is in
the gateway's embedding LRU; ``--embedder-cache-size 0`` measures callers whose
every wording is new (each partial costs a MiniLM forward pass).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.gateway_process import FAQ_PARAPHRASES, GatewayProcess, seed_store  # noqa: E402
from gateway.client import Caller  # noqa: E402

QUESTIONS = FAQ_PARAPHRASES
WORD_S = 0.150


async def one_caller(url: str, turns: int, results: list[dict], start_delay: float) -> None:
    await asyncio.sleep(start_delay)  # callers do not all start on the same tick
    rng = random.Random(start_delay)
    async with Caller(url) as caller:
        for _ in range(turns):
            question = rng.choice(QUESTIONS)
            index = len(caller.events)
            await caller.send_transcript(question, word_interval_s=WORD_S)
            await caller.wait_for("response", start=index, timeout=60)
            # The caller cuts in ("okay") as soon as the answer starts: the turn ends at
            # once and its metrics arrive, without waiting seconds of playback.
            await caller.send_json({"type": "text", "text": "okay", "final": False})
            metrics = await caller.wait_for("turn_metrics", start=index, timeout=60)
            results.append(metrics)


async def run_level(url: str, calls: int, turns: int) -> list[dict]:
    results: list[dict] = []
    spread = WORD_S * 8
    await asyncio.gather(*(one_caller(url, turns, results, spread * i / calls)
                           for i in range(calls)))
    return results


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--turns-total", type=int, default=200,
                        help="turns per level, spread over its calls (at least 2 per call)")
    parser.add_argument("--store", help="an already seeded store of the example FAQ "
                        "(default: seed a temporary one)")
    parser.add_argument("--embedder-cache-size", type=int, default=None,
                        help="the gateway's embedding LRU (0: embed every partial, as if no "
                             "caller ever repeated a phrasing; default: the gateway's)")
    args = parser.parse_args()

    env = {}
    if args.embedder_cache_size is not None:
        env["VOICEGATE_EMBEDDER_CACHE_SIZE"] = str(args.embedder_cache_size)
    store = seed_store(args.store)
    print(f"cache hits: server-side first_audio_ms (end of turn -> first reply frame), "
          f"words every {WORD_S * 1000:.0f} ms; a gateway of its own per level (cold caches)")
    for calls in args.calls:
        gateway = GatewayProcess(store, env).start()
        try:
            turns = max(2, args.turns_total // calls)
            metrics = asyncio.run(run_level(gateway.call_url, calls, turns))
            hits = [m for m in metrics if m.get("source") == "cache"]
            first = [m["first_audio_ms"] for m in hits]
            # Each caller's first turn meets a cold embedding cache while every other caller
            # starts too: reported apart as well, never left out of the headline figure.
            later = [m["first_audio_ms"] for m in hits if m.get("turn", 1) > 1]
            reused = sum(1 for m in hits if m.get("route_reused"))
            print(f"  {calls:4d} concurrent calls, {len(metrics):4d} turns: hits "
                  f"{len(hits) / len(metrics):6.1%}, decided on partials {reused / max(1, len(hits)):6.1%}"
                  f" | first_audio_ms p50 {pct(first, 50):7.2f}  p99 {pct(first, 99):7.2f}  "
                  f"max {max(first) if first else float('nan'):7.2f}"
                  f" | after each caller's first turn ({len(later)}): p50 {pct(later, 50):7.2f}  "
                  f"p99 {pct(later, 99):7.2f}")
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
