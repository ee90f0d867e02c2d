"""A final decode on one thread against the same decode on every core (wide), idle machine.

Moonshine base-en (int8 decoder, the default) decodes spoken Banking77 dev questions
(Piper and espeak-ng alternating, 16 kHz) on its one-thread sessions and on its wide
sessions (``moonshine_final_threads``), each plain and with a draft (the ids of a decode of
the clip's first 75%, as the last partial gives the early final). Rows take turns on every
clip, the order rotating, each clip twice. Prints wall ms p50/p90, CPU ms p50, and on how
many decodes the wide sessions gave the one-thread token ids.

Run: .venv/bin/python bench/final_threads.py [--n 20] [--threads 2] [--sample-seed 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speech_corpus import Synthesizer, hit_questions  # noqa: E402
from bench.voice_to_voice import seed_intents  # noqa: E402
from gateway.providers.moonshine_stt import MoonshineRecognizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-seed", type=int, default=9)
    args = parser.parse_args()
    synth = Synthesizer()
    texts = [t for t, _ in hit_questions(seed_intents(), args.n, args.sample_seed)]
    clips = [synth.speak(t, ("piper", "espeak")[i % 2]) for i, t in enumerate(texts)]
    model = MoonshineRecognizer(threads=1, wide_threads=args.threads)
    model.warm_up()
    drafts = [model.transcribe_ids(c[:len(c) * 3 // 4 // 2 * 2])[1] for c in clips]
    wide = f"{args.threads} threads"
    rows = {
        "1 thread": lambda i: model.transcribe_ids(clips[i]),
        wide: lambda i: model.transcribe_ids(clips[i], wide=True),
        "1 thread, draft": lambda i: model.transcribe_ids(clips[i], drafts[i]),
        f"{wide}, draft": lambda i: model.transcribe_ids(clips[i], drafts[i], wide=True),
    }
    names = list(rows)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    same = 0
    for rep in range(2):
        for i in range(len(clips)):
            ids = {}
            for name in names[i % len(names):] + names[:i % len(names)]:
                started, cpu_started = time.perf_counter(), time.process_time()
                ids[name] = rows[name](i)[1]
                wall[name].append((time.perf_counter() - started) * 1000)
                cpu[name].append((time.process_time() - cpu_started) * 1000)
            same += ids["1 thread"] == ids[wide]
    print(f"{len(clips)} spoken questions, each decoded twice per row (sample seed "
          f"{args.sample_seed})")
    for name in names:
        ms = sorted(wall[name])
        print(f"  {name:20s} p50 {statistics.median(ms):6.1f}  p90 "
              f"{ms[int(len(ms) * 0.9)]:6.1f} ms   CPU p50 {statistics.median(cpu[name]):6.1f} ms")
    print(f"  same token ids, 1 thread vs {wide}: {same} of {2 * len(clips)}")


if __name__ == "__main__":
    main()
