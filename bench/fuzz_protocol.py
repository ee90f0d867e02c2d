"""Malformed input on both call endpoints while healthy calls run.

    python bench/fuzz_protocol.py [--messages 20000] [--healthy 4] [--concurrency 16]

A gateway runs in its own process on the example FAQ. Healthy native calls ask FAQ
questions as `text` turns the whole time (each must get a `response` and reply
audio), and a healthy Twilio stream sends μ-law silence (it must stay open). Fuzz
connections, many at once, each send a batch of one kind of malformed input to
`/v1/call` or `/twilio/stream` and go away (often abruptly). Kinds: random bytes,
broken JSON, wrong field types, unknown types, non-objects, deep nesting, huge
integers, oversized messages (before `start`, which closes 1009, and in a call, which
drops them and goes on), odd PCM (dropped, the call goes on), audio before start,
second start, text floods, Twilio bad base64 / unknown events / odd marks / media before start,
abrupt disconnects, slow readers that never read, connections that never start,
raw TCP connections that send nothing.

Printed: messages sent, crashes (the server died or stopped answering /healthz:
must be 0), healthy-call failures (must be 0), every `error` code and close code
seen with counts, the server's memory and pending tasks before, after the fuzz and
after the slow readers were gone. Exits 1 unless crashes and failures are 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from websockets.asyncio.client import connect  # noqa: E402

from bench.gateway_process import GatewayProcess, seed_store  # noqa: E402
from gateway.client import Caller  # noqa: E402

QUESTIONS = ["what time do your branches open on saturday", "where can I find your routing number",
             "how do I reset my online banking password"]
START = json.dumps({"type": "start", "sample_rate": 16000})
Batch = list[str | bytes]


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.codes: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.healthy_turns = 0
        self.healthy_failures: list[str] = []


# ------------------------------------------------------------------ malformed inputs


def native_kinds(rng: random.Random) -> dict[str, Callable[[], Batch]]:
    def n(make: Callable[[], str | bytes], count: int = 50) -> Callable[[], Batch]:
        return lambda: [make() for _ in range(count)]

    return {
        "random_bytes": n(lambda: rng.randbytes(rng.randrange(1, 2000))),
        "random_text": n(lambda: "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(200))),
        "broken_json": n(lambda: START[:rng.randrange(1, len(START))]),
        "wrong_types": lambda: [START] + [json.dumps(m) for m in (
            {"type": "text", "text": 5}, {"type": "text", "text": "x", "final": "yes"},
            {"type": "start", "sample_rate": "16000"}, {"type": 7}, {"type": None},
            {"type": "text"}) * 8],
        "unknown_type": n(lambda: json.dumps({"type": rng.choice(["dial", "hangup", "", "ping"])})),
        "not_an_object": n(lambda: json.dumps(rng.choice([[1, 2], "start", 3.5, None, True]))),
        "deep_nesting": n(lambda: "[" * 30000, 5),
        "huge_integer": n(lambda: '{"type": "start", "sample_rate": 1' + "0" * 5000 + "}", 5),
        "oversized": n(lambda: b"\x00" * (64 * 1024 + 2), 3),
        "near_ws_limit": n(lambda: "x" * (1024 * 1024 - 64), 1),
        "oversized_in_call": lambda: [START] + [b"\x00" * (64 * 1024 + 2),
                                                "x" * (64 * 1024 + 1), b"\x00" * 640] * 3,
        "odd_pcm": lambda: [START] + [b"\x00" * 641, b"\x00" * 640] * 10,
        "audio_before_start": n(lambda: b"\x00" * 640),
        "second_start": lambda: [START] * 40,
        "bad_start_rate": lambda: [json.dumps({"type": "start", "sample_rate": 12345})],
        "text_flood": lambda: [START] + [json.dumps({"type": "text", "text": rng.choice(QUESTIONS)})
                                         for _ in range(300)],
    }


def twilio_kinds(rng: random.Random) -> dict[str, Callable[[], Batch]]:
    start = json.dumps({"event": "start", "streamSid": "MZfuzz",
                        "start": {"streamSid": "MZfuzz", "callSid": "CAfuzz",
                                  "mediaFormat": {"encoding": "audio/x-mulaw",
                                                  "sampleRate": 8000, "channels": 1}}})

    def media(payload: str) -> str:
        return json.dumps({"event": "media", "streamSid": "MZfuzz", "media": {"payload": payload}})

    return {
        "tw_media_before_start": lambda: [media(base64.b64encode(b"\xff" * 160).decode())] * 50,
        "tw_bad_base64": lambda: [start] + [media(rng.choice(["!!!", "abc", "===", "\u00e9"]))
                                            for _ in range(50)],
        "tw_unknown_event": lambda: [json.dumps({"event": rng.choice(["foo", "", 5])})
                                     for _ in range(50)],
        "tw_odd_marks": lambda: [start] + [json.dumps({"event": "mark", "mark": {"name": name}})
                                           for name in ("²:5", "1:", ":", "x" * 500, "9" * 40)] * 10,
        "tw_binary": lambda: [rng.randbytes(100) for _ in range(50)],
        "tw_deep_nesting": lambda: ["[" * 30000] * 5,
        "tw_huge_integer": lambda: ['{"event": 1' + "0" * 5000 + "}"] * 5,
        "tw_bad_start": lambda: [json.dumps({"event": "start", "start": {}})],
    }


# ------------------------------------------------------------------ connections


async def read_codes(ws: Any, tally: Tally) -> None:
    try:
        async for message in ws:
            if isinstance(message, str):
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("type") == "error":
                    tally.codes[str(event.get("code"))] += 1
    except Exception:
        pass


async def fuzz_connection(url: str, batch: Batch, tally: Tally, rng: random.Random) -> None:
    try:
        async with connect(url, max_size=2 ** 21, compression=None, open_timeout=30) as ws:
            reader = asyncio.create_task(read_codes(ws, tally))
            for message in batch:
                await ws.send(message)
                tally.sent += 1
            if rng.random() < 0.3:
                ws.transport.abort()  # gone without a close frame
            else:
                await asyncio.sleep(rng.uniform(0, 0.3))
                await ws.close()
            await asyncio.wait_for(reader, 10)
            tally.closes[str(ws.close_code)] += 1
    except Exception as exc:
        tally.closes[type(exc).__name__] += 1


async def slow_reader(url: str, seconds: float, tally: Tally) -> None:
    """Asks questions and never reads: the server must close it, not buffer for it."""
    outcome = "slow_reader_never_closed"
    try:
        async with connect(url, max_queue=1, compression=None) as ws:
            await ws.send(START)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                await ws.send(json.dumps({"type": "text", "text": random.choice(QUESTIONS)}))
                tally.sent += 1
                await asyncio.sleep(0.05)
    except Exception as exc:
        outcome = f"slow_reader_closed_by_server:{type(exc).__name__}"
    tally.closes[outcome] += 1


async def never_starts(url: str, tally: Tally) -> None:
    try:
        async with connect(url, compression=None) as ws:
            await asyncio.wait_for(ws.wait_closed(), 30)
            tally.closes[f"never_started:{ws.close_code}"] += 1
    except Exception as exc:
        tally.closes[f"never_started:{type(exc).__name__}"] += 1


async def idle_tcp(port: int, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        closed = await asyncio.wait_for(reader.read(), 30) == b""
        tally.closes["idle_tcp_closed" if closed else "idle_tcp_data"] += 1
    except TimeoutError:
        tally.closes["idle_tcp_still_open"] += 1
    finally:
        writer.close()


# ------------------------------------------------------------------ healthy calls


async def healthy_caller(url: str, stop: asyncio.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    try:
        async with Caller(url) as caller:
            while not stop.is_set():
                index = len(caller.events)
                audio_before = len(caller.audio)
                await caller.send_transcript(rng.choice(QUESTIONS), word_interval_s=0.05)
                await caller.wait_for("response", start=index, timeout=30)
                await caller.wait_for("turn_metrics", start=index, timeout=60)
                if len(caller.audio) <= audio_before:
                    tally.healthy_failures.append("a turn without reply audio")
                tally.healthy_turns += 1
    except Exception as exc:
        tally.healthy_failures.append(f"{type(exc).__name__}: {exc}")


async def healthy_twilio(url: str, stop: asyncio.Event, tally: Tally) -> None:
    start = {"event": "start", "streamSid": "MZok", "start": {
        "streamSid": "MZok", "callSid": "CAok", "mediaFormat": {
            "encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    silence = json.dumps({"event": "media", "streamSid": "MZok",
                          "media": {"payload": base64.b64encode(b"\xff" * 160).decode()}})
    try:
        async with connect(url, compression=None) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
            await ws.send(json.dumps(start))
            while not stop.is_set():
                await ws.send(silence)
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZok"}))
    except Exception as exc:
        tally.healthy_failures.append(f"twilio stream: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ run


async def run(gateway: GatewayProcess, messages: int, healthy: int, concurrency: int,
              seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    stop = asyncio.Event()
    healthy_tasks = [asyncio.create_task(healthy_caller(gateway.call_url, stop, tally, i))
                     for i in range(healthy)]
    healthy_tasks.append(asyncio.create_task(healthy_twilio(gateway.twilio_url, stop, tally)))
    kinds: list[tuple[str, Callable[[], Batch]]] = (
        [(gateway.call_url, make) for make in native_kinds(rng).values()]
        + [(gateway.twilio_url, make) for make in twilio_kinds(rng).values()])  # type: ignore
    extras: list[Awaitable[None]] = [slow_reader(gateway.call_url, 20, tally) for _ in range(4)]
    extras += [never_starts(gateway.call_url, tally) for _ in range(50)]
    extras += [never_starts(gateway.twilio_url, tally) for _ in range(10)]
    extras += [idle_tcp(gateway.port, tally) for _ in range(50)]
    side = asyncio.gather(*extras)
    limit = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            url, make = rng.choice(kinds)  # type: ignore[misc]
            await fuzz_connection(url, make(), tally, rng)

    pending: set[asyncio.Task[None]] = set()
    while tally.sent < messages:
        while len(pending) < concurrency * 2:
            pending.add(asyncio.create_task(one()))
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*pending)
    await side
    stop.set()
    await asyncio.gather(*healthy_tasks)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--healthy", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--store", help="an already seeded store of the example FAQ")
    args = parser.parse_args()
    gateway = GatewayProcess(seed_store(args.store)).start()
    try:
        rss0, tasks0 = gateway.rss_mb(), gateway.tasks()
        started = time.monotonic()
        tally = asyncio.run(run(gateway, args.messages, args.healthy, args.concurrency, args.seed))
        elapsed = time.monotonic() - started
        alive = gateway.alive()
        rss1, tasks1 = (gateway.rss_mb(), gateway.tasks()) if alive else (float("nan"), -1)
        time.sleep(6)  # every fuzz connection is gone; timeouts have fired
        rss2, tasks2 = (gateway.rss_mb(), gateway.tasks()) if gateway.alive() else (float("nan"), -1)
    finally:
        gateway.stop()
    crashes = 0 if alive else 1
    print(f"malformed messages sent: {tally.sent} in {elapsed:.0f} s "
          f"({args.concurrency} fuzz connections at once)")
    print(f"crashes: {crashes}")
    print(f"healthy calls: {tally.healthy_turns} turns answered, "
          f"{len(tally.healthy_failures)} failures {tally.healthy_failures[:3]}")
    print("error codes received:")
    for code, count in sorted(tally.codes.items(), key=lambda kv: -kv[1]):
        print(f"  {code:32s} {count:7d}")
    print("connection endings:")
    for code, count in sorted(tally.closes.items(), key=lambda kv: -kv[1]):
        print(f"  {code:32s} {count:7d}")
    print(f"server RSS: before {rss0:.0f} MB, after the fuzz {rss1:.0f} MB, 6 s later {rss2:.0f} MB")
    print(f"server asyncio tasks: before {tasks0}, after the fuzz {tasks1}, 6 s later {tasks2}")
    sys.exit(0 if crashes == 0 and not tally.healthy_failures else 1)


if __name__ == "__main__":
    main()
