"""Banking77 *train* questions as a phone line would hand them to the router: spoken,
sent through an 8 kHz channel and transcribed by the embedded recogniser.

dev_spoken.csv (the held-out set the router's spoken bar is measured on) is dev after
TTS, a phone channel and ASR. Anything about transcripts that the router chooses must be
chosen on train, so this builds the same kind of set from train with the project's own
stack: Piper and espeak-ng (alternating; scripts/ensure-espeak.sh), ``phone_band``,
Moonshine base-en (the embedded default), one decode of the whole utterance.

A stratified sample (``per_intent`` questions of every intent, fixed seed) keeps it to
minutes. Rows are cached in .cache/spoken-train/<sample>.csv (text, category, asr_text,
voice, as dev_spoken.csv plus the voice); a rerun only does what is missing.

Run: .venv/bin/python bench/spoken_train.py [--per-intent 26] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speech_corpus import DATA, ROOT, VOICES, Synthesizer, phone_band, word_errors  # noqa: E402

CACHE = ROOT / ".cache" / "spoken-train"
FIELDS = ["text", "category", "asr_text", "voice"]


def sample(per_intent: int, seed: int = 0) -> list[tuple[str, str]]:
    """``per_intent`` train questions of every intent (all of an intent that has fewer)."""
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    by_intent: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        by_intent.setdefault(row[1], []).append(row)
    rng = random.Random(seed)
    picked: list[tuple[str, str]] = []
    for intent in sorted(by_intent):
        picked += rng.sample(by_intent[intent], min(per_intent, len(by_intent[intent])))
    return picked


_worker: tuple[Synthesizer, object] | None = None


def _transcribe(job: tuple[str, str]) -> str:
    """One text in one voice -> transcript (runs in a worker process: one model each)."""
    global _worker
    if _worker is None:
        from gateway.providers.moonshine_stt import MoonshineRecognizer

        _worker = (Synthesizer(), MoonshineRecognizer(threads=1))
    synth, recognizer = _worker
    text, voice = job
    return recognizer.transcribe(phone_band(synth.speak(text, voice))).strip()  # type: ignore[attr-defined]


def load(per_intent: int = 26, seed: int = 0, workers: int = 2,
         progress: bool = False) -> list[dict[str, str]]:
    """The sample's rows with transcripts, building what the cache lacks."""
    path = CACHE / f"banking77-train-{per_intent}-per-intent-seed{seed}.csv"
    done: dict[str, dict[str, str]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            done = {r["text"]: r for r in csv.DictReader(f)}
    wanted = sample(per_intent, seed)
    jobs = [(text, intent, VOICES[i % len(VOICES)]) for i, (text, intent) in enumerate(wanted)
            if text not in done]
    if jobs:
        CACHE.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        start = time.monotonic()
        with path.open("a", newline="", encoding="utf-8") as f, \
                ProcessPoolExecutor(workers) as pool:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            results = pool.map(_transcribe, [(t, v) for t, _, v in jobs], chunksize=8)
            for n, ((text, intent, voice), heard) in enumerate(zip(jobs, results), 1):
                row = {"text": text, "category": intent, "asr_text": heard, "voice": voice}
                writer.writerow(row)
                done[text] = row
                if progress and n % 100 == 0:
                    f.flush()
                    print(f"  {n}/{len(jobs)} transcribed, {time.monotonic() - start:.0f} s",
                          flush=True)
    return [done[text] for text, _ in wanted]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-intent", type=int, default=26)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    rows = load(args.per_intent, args.seed, args.workers, progress=True)
    for voice in VOICES:
        mine = [r for r in rows if r["voice"] == voice]
        errors = sum(word_errors(r["text"], r["asr_text"])[0] for r in mine)
        words = sum(word_errors(r["text"], r["asr_text"])[1] for r in mine)
        print(f"{voice}: {len(mine)} questions, WER {errors / max(words, 1):.1%}")


if __name__ == "__main__":
    main()
