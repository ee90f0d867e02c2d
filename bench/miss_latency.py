"""End of turn -> first reply audio on a cache miss, and the gateway's own share of it.

    python bench/miss_latency.py [--turns 40]

A fake OpenAI-compatible upstream (tests/fakes, in its own process) answers with a
100 ms time to first token; the gateway, in a process of its own (bench/gateway_process.py:
embedded Piper TTS, real openai SDK, hedged pair with the default adaptive delay, no filler)
answers text turns from a native-protocol client in this one.
Per turn, from the server's ``turn_metrics``:

    first_audio_ms      end of turn -> first reply audio frame sent
    upstream            the fake's configured 100 ms to first token
    tts_first_audio_ms  Piper's time to the first audio of the first sentence
    gateway share       first_audio_ms - upstream - tts_first_audio_ms

The share is everything voicegate itself adds: routing the final, building the
request, the SDK and HTTP parsing, hedging, sentence chunking, resampling, playout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.gateway_process import GatewayProcess, free_port, seed_store  # noqa: E402
from gateway.client import Caller  # noqa: E402

UPSTREAM_TTFT_S = 0.100
FAKE = f"""
import sys, uvicorn
sys.path.insert(0, {str(ROOT)!r})
from tests.fakes.openai_server import FakeOpenAI, Reply
fake = FakeOpenAI()
fake.default = Reply(text="Sure, I can help with that. Let me explain the details.",
                     ttft_s={UPSTREAM_TTFT_S})
uvicorn.run(fake, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def run_turns(url: str, turns: int) -> list[dict]:
    metrics = []
    async with Caller(url) as caller:
        for i in range(turns):
            turn = await caller.say_text(f"question number {i} about something uncached")
            metrics.append(turn.metrics)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=40)
    args = parser.parse_args()

    port = free_port()
    fake = subprocess.Popen([sys.executable, "-c", FAKE, str(port)])
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        upstream = f"http://127.0.0.1:{port}/v1"
        server = GatewayProcess(seed_store(), {
            "VOICEGATE_LLM_PRIMARY_URL": upstream, "VOICEGATE_LLM_PRIMARY_MODEL": "primary",
            "VOICEGATE_LLM_SECONDARY_URL": upstream, "VOICEGATE_LLM_SECONDARY_MODEL": "secondary",
            "VOICEGATE_LLM_FILLER_AFTER_MS": "0"}).start()
        try:
            asyncio.run(run_turns(server.call_url, 3))  # warm the HTTP pools
            metrics = asyncio.run(run_turns(server.call_url, args.turns))
        finally:
            server.stop()
    finally:
        fake.terminate()
        fake.wait()

    first_audio = [m["first_audio_ms"] for m in metrics]
    tts = [m["tts_first_audio_ms"] for m in metrics]
    share = [m["first_audio_ms"] - UPSTREAM_TTFT_S * 1000 - m["tts_first_audio_ms"]
             for m in metrics]
    print(f"cache miss, {len(metrics)} turns, upstream time to first token "
          f"{UPSTREAM_TTFT_S * 1000:.0f} ms, local Piper TTS:")
    for name, values in (("end of turn -> first audio", first_audio),
                         ("  Piper time to first audio", tts),
                         ("  gateway's own share", share)):
        print(f"  {name:28s} p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms")


if __name__ == "__main__":
    main()
