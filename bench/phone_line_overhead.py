"""What the phone-line features cost the per-frame and per-turn paths, measured on this machine.

    python bench/phone_line_overhead.py [--frames 200000] [--turns 20000]

- Recording (``VOICEGATE_RECORD_DIR``): per 20 ms frame at 16 kHz, the caller side
  (``CallRecorder.caller_audio``) and the bot side (``bot_audio``), against the bare
  append the call's inbound buffer does anyway. Reported as µs per frame, p50/p99 over
  batches of 1000 frames (so the timer's resolution does not dominate).
- Traces: per finished turn, ``CallTrace.turn`` with the OpenTelemetry API's no-op
  tracer (OTEL_EXPORTER_OTLP_ENDPOINT unset) and with the SDK's tracer and a batch
  processor whose exporter drops the spans (the cost up to the export).

Both implementations of each pair are measured in the same run, interleaved by batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SpanExporter,  # noqa: E402
                                            SpanExportResult)

from gateway.call.recording import CallRecorder  # noqa: E402
from gateway.clock import ManualClock  # noqa: E402
from gateway.timeline import TurnTimeline  # noqa: E402
from gateway.tracing import CallTrace  # noqa: E402

FRAME = bytes(range(256)) * 2 + bytes(128)  # 640 bytes: 20 ms at 16 kHz
BATCH = 1000


class DropExporter(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def percentiles(samples: list[float]) -> str:
    return (f"p50 {np.percentile(samples, 50):7.3f}  p99 {np.percentile(samples, 99):7.3f}  "
            f"(n={len(samples)} batches)")


def bench_recording(frames: int) -> None:
    clock = ManualClock()
    bare = bytearray()
    recorder = CallRecorder("/nonexistent", "bench", 16000, "pcm16", clock)
    base, caller, bot = [], [], []
    for _ in range(frames // BATCH):
        start = time.perf_counter()
        for _ in range(BATCH):
            bare.extend(FRAME)
        base.append((time.perf_counter() - start) / BATCH * 1e6)
        del bare[:]
        start = time.perf_counter()
        for _ in range(BATCH):
            clock._now += 0.02  # noqa: SLF001 (a clock that moves 20 ms a frame)
            recorder.caller_audio(FRAME)
        caller.append((time.perf_counter() - start) / BATCH * 1e6)
        start = time.perf_counter()
        for _ in range(BATCH):
            recorder.bot_audio(FRAME)
        bot.append((time.perf_counter() - start) / BATCH * 1e6)
    print(f"recording, µs per 20 ms frame ({frames} frames, "
          f"{frames * 0.02 / 60:.0f} min of call):")
    print(f"  bare append (baseline)  {percentiles(base)}")
    print(f"  caller_audio            {percentiles(caller)}")
    print(f"  bot_audio               {percentiles(bot)}")


def bench_tracing(turns: int) -> None:
    clock = ManualClock()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=65536))
    traces = {"no-op tracer (default)": CallTrace(trace.NoOpTracer(), clock, {}),
              "SDK tracer, batch export": CallTrace(provider.get_tracer("bench"), clock, {})}
    results: dict[str, list[float]] = {name: [] for name in traces}
    per_batch = 100
    for _ in range(turns // per_batch):
        for name, call in traces.items():
            timelines = []
            for n in range(per_batch):
                tl = TurnTimeline(n, clock=clock)
                for stage in ("speech_start", "speech_end", "end_of_turn", "final_transcript",
                              "route_decided", "first_token", "first_audio", "reply_end"):
                    clock._now += 0.05  # noqa: SLF001
                    tl.mark(stage)
                timelines.append(tl)
            metrics = {"source": "llm", "intent": "x", "hit": False, "interrupted": False}
            start = time.perf_counter()
            for tl in timelines:
                call.turn(tl, metrics)
            results[name].append((time.perf_counter() - start) / per_batch * 1e6)
    print(f"traces, µs per finished turn ({turns} turns, batches of {per_batch}):")
    for name, samples in results.items():
        print(f"  {name:26s}{percentiles(samples)}")
    provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=20_000)
    args = parser.parse_args()
    bench_recording(args.frames)
    bench_tracing(args.turns)


if __name__ == "__main__":
    main()
