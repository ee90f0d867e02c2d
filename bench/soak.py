"""Many calls doing turns for minutes: memory, latency and leaks over time.

    python bench/soak.py [--calls 50] [--minutes 10]

A gateway runs in its own process on the example FAQ. Each simulated caller loops:
FAQ questions as text turns (usually word by word as partials, then the final),
every sixth turn a spoken question (Piper speech, rendered once, streamed in real
time on a line that carries silence the rest of the time), and every fifth turn
a barge-in (the next question arrives while the reply plays). After eight turns a
caller hangs up and a new one dials in, so calls end all the time.

Printed per minute: the server's RSS, turns completed, latency p50/p99 measured
by the client (final text sent, or last speech sample sent -> first reply audio)
and the server's `first_audio_ms`, and failed turns. At the end: the server's
pending asyncio tasks once every call has hung up, against the count before the
first call. Exits 1 when more than 0.5% of turns failed or tasks were left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.gateway_process import FAQ_PARAPHRASES, GatewayProcess, seed_store  # noqa: E402
from gateway.client import Caller  # noqa: E402

# FAQ paraphrases, and one question only the agent answers (a handoff without an LLM).
QUESTIONS = [*FAQ_PARAPHRASES[:5], "how much money is in my checking account"]
SPOKEN = ["What time do your branches open on Saturday?",
          "How do I reset my online banking password?"]
TURNS_PER_CALL = 8
RATE = 16000


@dataclass
class Minute:
    turns: int = 0
    failures: int = 0
    client_ms: list[float] = field(default_factory=list)  # text turns
    server_ms: list[float] = field(default_factory=list)  # text turns
    spoken_client_ms: list[float] = field(default_factory=list)
    spoken_server_ms: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, started: float) -> None:
        self.started = started
        self.minutes: dict[int, Minute] = {}
        self.failures: list[str] = []

    def minute(self) -> Minute:
        return self.minutes.setdefault(int((time.monotonic() - self.started) // 60), Minute())


def render_speech() -> list[bytes]:
    """The spoken questions, once, with the project's own voice at 16 kHz."""
    from gateway.audio import resample_pcm16
    from gateway.providers.piper_tts import PiperTTS

    from concurrent.futures import ThreadPoolExecutor

    tts = PiperTTS(ThreadPoolExecutor(1))
    return [resample_pcm16(tts.synthesize_all(text), tts.sample_rate, RATE) for text in SPOKEN]


async def text_turn(caller: Caller, rng: random.Random, soak: Soak, barge: bool) -> None:
    index = len(caller.events)
    audio_before = len(caller.audio)
    partials = rng.random() < 0.8
    await caller.send_transcript(rng.choice(QUESTIONS), partial_words=partials,
                                 word_interval_s=0.15)
    sent = time.monotonic()
    await caller.wait_for("response", start=index, timeout=60)
    while len(caller.audio) <= audio_before:  # first reply audio
        await asyncio.sleep(0.005)
    client_ms = (time.monotonic() - sent) * 1000.0
    if barge:  # the next question cuts the reply short
        await caller.send_json({"type": "text", "text": "wait", "final": False})
    metrics = await caller.wait_for("turn_metrics", start=index, timeout=120)
    record(soak, client_ms, metrics)


async def spoken_turn(caller: Caller, speech: bytes, soak: Soak) -> None:
    index = len(caller.events)
    audio_before = len(caller.audio)
    await caller.stream_audio(speech)  # returns once the last speech frame is sent
    spoken = time.monotonic()
    deadline = spoken + 60
    while len(caller.audio) <= audio_before:
        if time.monotonic() > deadline:
            raise RuntimeError("a spoken turn without reply audio")
        await asyncio.sleep(0.005)
    client_ms = (time.monotonic() - spoken) * 1000.0
    metrics = await caller.wait_for_answered_turn(start=index, timeout=120)
    record(soak, client_ms, metrics)


def record(soak: Soak, client_ms: float, metrics: dict) -> None:
    minute = soak.minute()
    minute.turns += 1
    spoken = metrics.get("input") == "audio"
    (minute.spoken_client_ms if spoken else minute.client_ms).append(client_ms)
    if metrics.get("first_audio_ms") is not None:
        (minute.spoken_server_ms if spoken else minute.server_ms).append(metrics["first_audio_ms"])


async def caller_loop(url: str, deadline: float, seed: int, speech: list[bytes], soak: Soak) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(rng.uniform(0, 3))
    while time.monotonic() < deadline:
        try:
            async with Caller(url) as caller:
                for turn in range(TURNS_PER_CALL):
                    if time.monotonic() >= deadline:
                        break
                    if turn % 6 == 5:
                        await spoken_turn(caller, rng.choice(speech), soak)
                    else:
                        await text_turn(caller, rng, soak, barge=turn % 5 == 4)
                    await asyncio.sleep(rng.uniform(0.5, 2.0))  # the caller listens, thinks
        except Exception as exc:
            soak.minute().failures += 1
            soak.failures.append(f"{type(exc).__name__}: {exc}")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(gateway: GatewayProcess, calls: int, minutes: float, speech: list[bytes]) -> Soak:
    started = time.monotonic()
    soak = Soak(started)
    deadline = started + minutes * 60
    report = asyncio.create_task(report_minutes(gateway, soak, deadline))
    await asyncio.gather(*(caller_loop(gateway.call_url, deadline, i, speech, soak)
                           for i in range(calls)))
    report.cancel()
    return soak


async def report_minutes(gateway: GatewayProcess, soak: Soak, deadline: float) -> None:
    shown = -1
    while True:
        await asyncio.sleep(1)
        current = int((time.monotonic() - soak.started) // 60)
        for m in range(shown + 1, current):
            print_minute(m, soak.minutes.get(m, Minute()), gateway.rss_mb())
            shown = m


def print_minute(m: int, minute: Minute, rss: float) -> None:
    print(f"  minute {m + 1:3d}: RSS {rss:7.0f} MB | turns {minute.turns:5d} failed "
          f"{minute.failures:3d} | text: client first audio p50 {pct(minute.client_ms, 50):6.1f}"
          f" p99 {pct(minute.client_ms, 99):7.1f} ms, server p50 {pct(minute.server_ms, 50):6.2f}"
          f" p99 {pct(minute.server_ms, 99):7.2f} | spoken ({len(minute.spoken_client_ms)}): "
          f"client p50 {pct(minute.spoken_client_ms, 50):6.0f} p99 "
          f"{pct(minute.spoken_client_ms, 99):6.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--store", help="an already seeded store of the example FAQ")
    args = parser.parse_args()
    speech = render_speech()
    gateway = GatewayProcess(seed_store(args.store)).start()
    try:
        tasks_before = gateway.tasks()
        rss_before = gateway.rss_mb()
        print(f"soak: {args.calls} calls for {args.minutes:g} min; server RSS {rss_before:.0f} MB, "
              f"{tasks_before} asyncio tasks before the first call", flush=True)
        soak = asyncio.run(run(gateway, args.calls, args.minutes, speech))
        last = max(soak.minutes, default=0)
        print_minute(last, soak.minutes.get(last, Minute()), gateway.rss_mb())
        time.sleep(8)  # every call has hung up; the server ends them
        tasks_after = gateway.tasks()
        alive = gateway.alive()
        rss_after = gateway.rss_mb()
    finally:
        gateway.stop()
    turns = sum(m.turns for m in soak.minutes.values())
    failed = sum(m.failures for m in soak.minutes.values())
    def every(name: str) -> list[float]:
        return [v for m in soak.minutes.values() for v in getattr(m, name)]

    print(f"total: {turns} turns, {failed} failed ({failed / max(1, turns + failed):.2%}) "
          f"{soak.failures[:3]}")
    print(f"text turns ({len(every('client_ms'))}): client first audio p50 "
          f"{pct(every('client_ms'), 50):.1f} p99 {pct(every('client_ms'), 99):.1f} ms; server "
          f"first_audio_ms p50 {pct(every('server_ms'), 50):.2f} p99 "
          f"{pct(every('server_ms'), 99):.2f}")
    print(f"spoken turns ({len(every('spoken_client_ms'))}): client last speech -> first audio "
          f"p50 {pct(every('spoken_client_ms'), 50):.0f} p99 "
          f"{pct(every('spoken_client_ms'), 99):.0f} ms; server first_audio_ms p50 "
          f"{pct(every('spoken_server_ms'), 50):.0f} p99 {pct(every('spoken_server_ms'), 99):.0f}")
    print(f"server alive: {alive}; RSS {rss_before:.0f} -> {rss_after:.0f} MB; asyncio tasks "
          f"before {tasks_before}, after every call hung up {tasks_after}")
    ok = alive and failed <= 0.005 * max(1, turns) and tasks_after <= tasks_before
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
