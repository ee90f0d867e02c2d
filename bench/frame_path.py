"""Gateway CPU per inbound audio frame, two source trees compared in the same run.

    python bench/frame_path.py --tree after=. --tree before=/tmp/voicegate-before \
        [--calls 100] [--seconds 20] [--rounds 3]

For each round and each tree (alternating, so a change in the machine's load hits both),
a gateway from that tree runs in its own process; ``--calls`` callers start a call and
stream 20 ms frames of low-level noise (the line between words: VAD runs on every
window, nothing is recognised) at real pace. Reported: the gateway's CPU time per frame
(user + system, over the steady part of the window) and how late the load generator's
own ticks were (when it lags, the gateway saw fewer frames, which the per-frame figure
already accounts for). A "before" tree is e.g. ``git archive main | tar -x -C DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from bench.gateway_process import GatewayProcess, seed_store  # noqa: E402

RATE = 16000
FRAME_MS = 20


def noise_frames(count: int = 16, seed: int = 3) -> list[bytes]:
    """Frames of faint noise (about -60 dBFS): what a line carries between words."""
    rng = np.random.default_rng(seed)
    samples = RATE * FRAME_MS // 1000
    return [rng.normal(0, 30, samples).astype("<i2").tobytes() for _ in range(count)]


async def stream(url: str, calls: int, seconds: float, warmup_s: float,
                 gateway: GatewayProcess) -> tuple[float, int, float]:
    sockets = []
    for _ in range(calls):
        ws = await connect(url, compression=None, max_size=2 ** 20)
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm16"}))
        while json.loads(await ws.recv()).get("type") != "ready":
            pass
        sockets.append(ws)

    async def drain(ws) -> None:
        try:
            async for _ in ws:
                pass
        except Exception:
            pass

    readers = [asyncio.create_task(drain(ws)) for ws in sockets]
    frames = noise_frames()
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick, sent, counted, late = 0, 0, 0, []
    cpu0, counted_from = None, 0
    while loop.time() - start < warmup_s + seconds:
        if cpu0 is None and loop.time() - start >= warmup_s:
            cpu0, counted_from = gateway.cpu_s(), sent
        frame = frames[tick % len(frames)]
        for ws in sockets:
            await ws.send(frame)
        sent += len(sockets)
        tick += 1
        due = start + tick * FRAME_MS / 1000.0
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            late.append((now - due) * 1000.0)
    if cpu0 is None:
        raise RuntimeError("the load generator never got past the warm-up (a send blocked: "
                           "the gateway stopped reading?)")
    cpu = gateway.cpu_s() - cpu0
    counted = sent - counted_from
    for ws in sockets:
        await ws.close()
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return cpu, counted, (max(late) if late else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", help="an already seeded store of the example FAQ")
    args = parser.parse_args()
    trees = [item.split("=", 1) for item in args.tree]
    store = seed_store(args.store)
    results: dict[str, list[float]] = {label: [] for label, _ in trees}
    print(f"{args.calls} calls streaming noise frames, {args.seconds:g} s a run; load avg "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    for round_ in range(args.rounds):
        for label, tree in trees:
            gateway = GatewayProcess(store, {"VOICEGATE_MAX_CALLS": "2000"}, tree=tree).start()
            try:
                cpu, frames, worst_tick = asyncio.run(
                    stream(gateway.call_url, args.calls, args.seconds, args.warmup_s, gateway))
            finally:
                gateway.stop()
            per_frame_us = cpu / frames * 1e6
            results[label].append(per_frame_us)
            print(f"round {round_ + 1} {label:8s}: {per_frame_us:6.1f} us CPU per frame "
                  f"({frames} frames, gateway {cpu / args.seconds * 100:5.1f}% of a core, "
                  f"generator worst tick late {worst_tick:5.0f} ms, load avg "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    for label, values in results.items():
        print(f"{label:8s}: median {statistics.median(values):6.1f} us per frame "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
