"""Figures for the embedded speech stack (issue: foundation).

    python bench/speech_stack.py [--seconds 20]

Prints: model load times; the embedded recogniser's real-time factor (VOICEGATE_STT_PROVIDER); Piper time to first
audio; the CPU cost of one second of inbound call audio through the call loop
(VAD alone, then VAD + STT partials + finals), and what that means in calls per
core. CPU is measured as this process's CPU time (time.process_time), so other
load on the machine does not inflate it; wall-clock figures do vary with load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from gateway.audio import frame_bytes, resample_pcm16  # noqa: E402
from gateway.call import Call, CallDeps  # noqa: E402
from gateway.responder import Responder  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402
from gateway.settings import Settings  # noqa: E402

UTTERANCES = [
    "Hi, what time do your branches open on Saturday?",
    "How do I reset my online banking password?",
    "I would like to know how much money is in my checking account.",
    "My card was declined at the grocery store this morning, can you tell me why?",
    "Can I order a new debit card?",
    "What is the interest rate on your savings account?",
]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class NullOutput:
    encoding = "pcm16"

    async def send_event(self, event: dict[str, Any]) -> None:
        return None

    async def send_audio(self, frame: bytes) -> None:
        return None

    async def interrupt(self, event: dict[str, Any]) -> None:
        return None


def bench_stt(runtime: Runtime, speech: list[bytes]) -> None:
    stt = runtime.stt
    ratios = []
    for _ in range(2):
        for pcm in speech:
            start = time.perf_counter()
            stt.transcribe(pcm)  # type: ignore[attr-defined]
            ratios.append((time.perf_counter() - start) / (len(pcm) / 32000))
    print(f"STT  {stt.name} (whole utterance, no draft): real-time factor "
          f"median {statistics.median(ratios):.3f}, p99 {pct(ratios, 99):.3f} "
          f"(decode time / audio time, {len(ratios)} utterances of 1.5-4.5 s)")


async def bench_tts(runtime: Runtime) -> None:
    firsts, totals = [], []
    for _ in range(3):
        for text in UTTERANCES:
            reply = text + " Let me explain how that works in a little more detail."
            start = time.perf_counter()
            first = None
            async for _chunk in runtime.tts.synthesize(reply):
                first = first or time.perf_counter() - start
            firsts.append(first * 1000)
            totals.append((time.perf_counter() - start) * 1000)
    print(f"TTS  piper joe-medium: time to first audio median {statistics.median(firsts):.0f} ms, "
          f"p99 {pct(firsts, 99):.0f} ms; whole two-sentence reply median "
          f"{statistics.median(totals):.0f} ms")


async def harness_cost(seconds: float) -> float:
    """CPU per second of the feeding loop alone (pacing 50 frames a second), to subtract."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(int(seconds * 50)):
        delay = wall0 + i * 0.02 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.sleep(1.0)
    return (time.process_time() - cpu0) / seconds


async def inbound_cost(runtime: Runtime, line: bytes, rate: int, with_stt: bool,
                       calls: int = 1) -> float:
    """CPU seconds per second of inbound audio per call, ``calls`` calls in real time
    (the feeding loop's own cost included; the caller subtracts it)."""
    responder = Responder(runtime.agent, runtime.tts, runtime.prompts)
    # VAD only: speech is never confirmed, so STT never runs.
    settings = runtime.settings if with_stt else runtime.settings.replace(
        min_speech_ms=10 ** 6, barge_in_min_speech_ms=10 ** 6)
    deps = CallDeps(settings=settings, vad=runtime.vad_batcher, stt=runtime.stt,
                    responder=responder, router=None, stats=runtime.stats,
                    new_conversation=runtime.agent.new_conversation)
    group = [Call(deps, NullOutput(), rate) for _ in range(calls)]
    runs = [asyncio.create_task(call.run()) for call in group]
    size = frame_bytes(rate, 20)
    frames = [line[i:i + size] for i in range(0, len(line) - size + 1, size)]
    await asyncio.sleep(0.1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, frame in enumerate(frames):
        delay = wall0 + i * 0.02 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for call in group:
            call.feed_audio(frame)
    await asyncio.sleep(1.0)  # let the last final decode finish
    cpu = time.process_time() - cpu0
    for call in group:
        call.stop()
    await asyncio.gather(*runs)
    return cpu / (len(frames) * 0.02) / calls


async def main_async(seconds: float) -> None:
    settings = Settings.load({"port": 0})
    start = time.perf_counter()
    runtime = Runtime.load(settings)
    print("load (cold process): " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                               runtime.load_times_s.items())
          + f"; total {time.perf_counter() - start:.2f} s")
    render = runtime.tts.synthesize_all  # type: ignore[attr-defined]
    speech16 = [resample_pcm16(render(t), runtime.tts.sample_rate, 16000) for t in UTTERANCES]
    bench_stt(runtime, speech16)
    await bench_tts(runtime)

    # a caller line: utterances separated by 1.2 s pauses, repeated to ``seconds``
    pause = b"\x00" * frame_bytes(16000, 1200)
    line = b""
    while len(line) < seconds * 32000:
        for pcm in speech16:
            line += pcm + pause
    line = line[: int(seconds * 32000)]
    speech_share = sum(len(p) for p in speech16) / (sum(len(p) for p in speech16)
                                                    + len(pause) * len(speech16))
    harness = await harness_cost(seconds)
    vad = await inbound_cost(runtime, line, 16000, with_stt=False) - harness
    vad50 = (await inbound_cost(runtime, line, 16000, with_stt=False, calls=50) - harness / 50)
    full = await inbound_cost(runtime, line, 16000, with_stt=True) - harness
    line8 = resample_pcm16(line, 16000, 8000)
    full8 = await inbound_cost(runtime, line8, 8000, with_stt=True) - harness
    print(f"CPU per second of inbound call audio ({seconds:.0f} s line, {speech_share:.0%} speech, "
          f"partials every {settings.partial_interval_ms} ms; the feeding loop's own "
          f"{harness * 1000:.1f} ms/s subtracted):")
    print(f"  VAD only (16 kHz):           {vad * 1000:6.1f} ms/s -> {1 / vad:7.0f} calls per core")
    print(f"  VAD only, 50 calls at once:  {vad50 * 1000:6.1f} ms/s -> {1 / vad50:7.0f} calls per core"
          f" (batched: {runtime.vad_batcher.windows / max(1, runtime.vad_batcher.batches):.1f} "
          "windows per model run)")
    print(f"  VAD + STT (16 kHz):          {full * 1000:6.1f} ms/s -> {1 / full:7.1f} calls per core")
    print(f"  VAD + STT (8 kHz, resampled): {full8 * 1000:5.1f} ms/s -> {1 / full8:7.1f} calls "
          "per core")
    await runtime.aclose()


if __name__ == "__main__":
    import uvloop  # the server runs on uvloop; measure on the same loop

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    uvloop.run(main_async(parser.parse_args().seconds))
