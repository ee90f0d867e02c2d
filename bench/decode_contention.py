"""Early finals under load: does a caller's final wait for other callers' partials?

Several callers stream spoken Banking77 dev questions (Piper and espeak-ng, 16 kHz) in real
time, 20 ms at a time, into one RedecodingSTT on Moonshine (the embedded default, int8
decoder) with ``--slots`` decode slots on a thread pool of that size, as the gateway runs it:
a partial after every 400 ms of new audio when a slot is free. At the end of each question
the caller pauses (``speech_paused``: the early final) and the time until that transcript is
ready is measured; then a gap of 0.3-1.2 s and the next question.

Two scheduling policies take turns in one process (rounds alternate which goes first), on
the same questions in the same order with the same gaps:
  wait     a final that finds every slot busy waits for a running partial to finish
  preempt  it stops a running partial, which gives up its slot at its next decoder step
Prints the early final's latency (pause -> transcript) p50/p90/p99/max per policy, and the
partials decoded and stopped. The pause is hinted here at the last speech sample; the
gateway hints it after its VAD heard some silence, so this is the decode's share only.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_contention.py [--callers 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speech_corpus import Synthesizer, hit_questions  # noqa: E402
from gateway.providers.redecode import PARTIAL, RedecodingSTT  # noqa: E402

CHUNK = 640  # 20 ms of 16 kHz PCM16


async def caller(stt: RedecodingSTT, clips: list[bytes], gaps: list[float], lead: float,
                 latencies: list[float]) -> None:
    stream = stt.open_stream()
    drain = asyncio.create_task(_drain(stream))
    loop = asyncio.get_running_loop()
    await asyncio.sleep(lead)
    try:
        for pcm, gap in zip(clips, gaps):
            start = loop.time()
            for i in range(0, len(pcm), CHUNK):
                await stream.send_audio(pcm[i:i + CHUNK])
                await asyncio.sleep(max(0.0, start + (i // CHUNK + 1) * 0.02 - loop.time()))
            paused = time.perf_counter()
            await stream.speech_paused()
            latencies.append((time.perf_counter() - paused) * 1000)
            await stream.finalize()
            await asyncio.sleep(gap)
    finally:
        drain.cancel()
        await stream.aclose()


async def _drain(stream) -> None:  # type: ignore[no-untyped-def]
    async for _ in stream.partials():
        pass


async def one_round(stt: RedecodingSTT, plan: list[tuple[list[bytes], list[float], float]]
                    ) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(caller(stt, clips, gaps, lead, latencies)
                           for clips, gaps, lead in plan))
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--questions", type=int, default=8, help="per caller and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()
    from bench.voice_to_voice import seed_intents
    from gateway.providers.moonshine_stt import MoonshineRecognizer

    synth = Synthesizer()
    texts = [t for t, _ in hit_questions(seed_intents(), args.callers * args.questions)]
    clips = [synth.speak(t, ("piper", "espeak")[i % 2]) for i, t in enumerate(texts)]
    rng = random.Random(0)
    plan = [(clips[c::args.callers], [rng.uniform(0.3, 1.2) for _ in range(args.questions)],
             rng.uniform(0.0, 1.0)) for c in range(args.callers)]
    recognizer = MoonshineRecognizer(threads=1, cache_dir=tempfile.mkdtemp(prefix="vg-models-"))
    recognizer.warm_up()
    results: dict[str, list[float]] = {"wait": [], "preempt": []}
    counts = {name: [0, 0] for name in results}  # partials decoded, stopped
    with ThreadPoolExecutor(max_workers=args.slots) as pool:
        for r in range(args.rounds):
            order = ["wait", "preempt"] if r % 2 == 0 else ["preempt", "wait"]
            for policy in order:
                stt = RedecodingSTT(recognizer, pool, slots=args.slots)
                stt.scheduler.preempt_partials = policy == "preempt"
                results[policy] += asyncio.run(one_round(stt, plan))
                counts[policy][0] += stt.scheduler.decodes[PARTIAL]
                counts[policy][1] += stt.scheduler.partials_stopped
                print(f"round {r + 1} {policy:<8} early final p50 "
                      f"{statistics.median(results[policy]):.0f} ms so far", flush=True)
    print(f"\n{args.callers} callers, {args.slots} slots, {args.rounds} rounds of "
          f"{args.callers * args.questions} questions each (Moonshine int8, 16 kHz)")
    print("policy   | early final ms p50   p90   p99   max | partials decoded  stopped")
    for policy, values in results.items():
        decoded, stopped = counts[policy]
        print(f"{policy:<8} | {pct(values, 0.5):19.0f} {pct(values, 0.9):5.0f} "
              f"{pct(values, 0.99):5.0f} {max(values):5.0f} | {decoded:16d} {stopped:8d}")


if __name__ == "__main__":
    main()
