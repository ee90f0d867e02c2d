"""Early finals under load: does a caller's final wait for decodes nobody needs?

Several callers stream spoken Banking77 dev questions and the development set's questions
with pauses mid-sentence (Piper and espeak-ng, 16 kHz) in real time, 20 ms at a time, into
one RedecodingSTT on Moonshine (the embedded default, int8 decoder) with ``--slots`` decode
slots on a thread pool of that size, as the gateway runs it: a partial after every 400 ms
of new audio when a slot is free. Wherever the gateway's VAD would hint a pause inside a
question (its first silent window after speech: between words as well as at the pauses
mid-sentence) the caller hints it (``speech_paused``: an early final starts) and, where the
VAD hears speech again, resumes (that decode is no longer needed). At the end of each question the pause is hinted at the last speech sample and the time until
the early final is ready is measured; then a gap of 0.3-1.2 s and the next question.

Two scheduling policies take turns in one process (rounds alternate which goes first), on
the same questions in the same order with the same gaps:
  run      every decode runs to its end (before)
  stop     a final that finds every slot busy stops a running partial, and a decode nobody
           waits for any more stops, each at its next decoder step (now)
Prints the early final's latency (pause -> transcript) p50/p90/p99/max per policy, the
process's CPU seconds, and the decodes run and stopped. The gateway hints a pause after its
VAD heard 32 ms of silence, so the latency here is the decode's share of a reply's wait.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_contention.py [--callers 4] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.speech_corpus import Clip, build  # noqa: E402
from gateway.providers.redecode import FINAL, PARTIAL, RedecodingSTT  # noqa: E402
from gateway.vad import (WINDOW_BYTES, SegmentEvent, SileroState, SileroVAD,  # noqa: E402
                         SpeechSegmenter)

Pauses = list[tuple[int, int]]  # (pause hinted at, speech resumed at), in bytes

CHUNK = 640  # 20 ms of 16 kHz PCM16


def vad_pauses(vad: SileroVAD, pcm16: bytes) -> Pauses:
    """Where the gateway's VAD (Silero and the speech segmenter, default settings) hints a
    pause inside the question: between words too, not only at the pauses mid-sentence."""
    state, segmenter = SileroState(), SpeechSegmenter()
    hints: Pauses = []
    paused_at = None
    for index, prob in enumerate(vad.probabilities(pcm16, state)):
        for event in segmenter.push(prob):
            at = (index + 1) * WINDOW_BYTES
            if event is SegmentEvent.PAUSE:
                paused_at = at
            elif event is SegmentEvent.RESUME and paused_at is not None:
                hints.append((paused_at, at))
                paused_at = None
    return hints


async def caller(stt: RedecodingSTT, clips: list[tuple[Clip, Pauses]], gaps: list[float],
                 lead: float, latencies: list[float]) -> None:
    stream = stt.open_stream()
    drain = asyncio.create_task(_drain(stream))
    loop = asyncio.get_running_loop()
    await asyncio.sleep(lead)
    try:
        for (clip, pauses), gap in zip(clips, gaps):
            pcm = clip.pcm16[:clip.speech_end * 2]
            start = loop.time()
            for i in range(0, len(pcm), CHUNK):
                await stream.send_audio(pcm[i:i + CHUNK])
                for hint, resume in pauses:
                    if i <= hint < i + CHUNK:
                        stream.speech_paused()
                    if i <= resume < i + CHUNK:
                        stream.speech_resumed()
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


async def one_round(stt: RedecodingSTT,
                    plan: list[tuple[list[tuple[Clip, Pauses]], list[float], float]]
                    ) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(caller(stt, clips, gaps, lead, latencies)
                           for clips, gaps, lead in plan))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--questions", type=int, default=8, help="per caller and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()
    from bench.voice_to_voice import seed_intents
    from gateway.providers.moonshine_stt import MoonshineRecognizer

    n = args.callers * args.questions
    # A quarter pause mid-sentence: the development sample's texts (seed 7).
    clips = build(seed_intents(), n - n // 4, 0, n // 4, seed=7)
    rng = random.Random(0)
    rng.shuffle(clips)
    vad = SileroVAD()
    hinted = [(clip, vad_pauses(vad, clip.pcm16[:clip.speech_end * 2])) for clip in clips]
    print(f"{sum(len(p) for _, p in hinted)} pauses hinted inside {n} questions by the VAD")
    plan = [(hinted[c::args.callers], [rng.uniform(0.3, 1.2) for _ in range(args.questions)],
             rng.uniform(0.0, 1.0)) for c in range(args.callers)]
    recognizer = MoonshineRecognizer(threads=1)  # the int8 decoder from the model cache
    recognizer.warm_up()
    results: dict[str, list[float]] = {"run": [], "stop": []}
    cpu = dict.fromkeys(results, 0.0)
    counts = {name: [0, 0, 0, 0] for name in results}  # finals, partials, stopped x2
    with ThreadPoolExecutor(max_workers=args.slots) as pool:
        for r in range(args.rounds):
            for policy in (["run", "stop"] if r % 2 == 0 else ["stop", "run"]):
                stt = RedecodingSTT(recognizer, pool, slots=args.slots)
                stt.scheduler.stop_decodes = policy == "stop"
                started = time.process_time()
                results[policy] += asyncio.run(one_round(stt, plan))
                cpu[policy] += time.process_time() - started
                done = stt.scheduler
                for k, v in enumerate((done.decodes[FINAL], done.decodes[PARTIAL],
                                       done.partials_stopped, done.abandoned_stopped)):
                    counts[policy][k] += v
                print(f"round {r + 1} {policy:<5} early final p50 "
                      f"{statistics.median(results[policy]):.0f} ms so far", flush=True)
    print(f"\n{args.callers} callers, {args.slots} slots, {args.rounds} rounds of {n} questions "
          f"each ({n // 4} pausing mid-sentence; Moonshine int8, 16 kHz)")
    print("policy | early final ms p50   p90   p99   max | CPU s | decodes: finals partials "
          "| stopped: for a final  abandoned")
    for policy, values in results.items():
        finals, partials, given, abandoned = counts[policy]
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        print(f"{policy:<6} | {p50:19.0f} {p90:5.0f} {p99:5.0f} {max(values):5.0f} | "
              f"{cpu[policy]:5.0f} | "
              f"{finals:16d} {partials:8d} | {given:15d} {abandoned:10d}")


if __name__ == "__main__":
    main()
