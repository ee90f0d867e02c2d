"""Moonshine's empty transcripts: words it drops, and noise it must not turn into words.

Greedy decoding ends a transcript at its first step whenever the end token is the
likeliest one. On speech read with pauses, or cut with little silence after it, Moonshine
sometimes puts a modest probability (0.2-0.7) on the end token there and returns nothing
for seconds of words: in a call the turn goes unanswered (an empty final is no question),
and an empty early transcript is taken for noise and ends the turn at once.
``MoonshineRecognizer(no_speech_threshold=...)`` ends there only when the end token is at
least that likely; this bench counts, for each threshold:

  speech   decodes as the call makes them: each utterance cut where the early final cuts
           it (every pause, 96-320 ms into it) and whole, Banking77 dev questions and the
           paused texts (bench/speech_corpus.py: both voices, 16 kHz and the 8 kHz phone
           band); empty = the words lost
  noise    synthetic bursts (white, pink, mains hum, clicks, decaying cough-like noise;
           0.2-2 s, two levels, 300 ms of silence around): non-empty = words made up
  WER      of the speech decodes (an empty one counts all its words as deleted)

The threshold changes nothing but the first token, so each audio is decoded once plainly
and, only when that comes back empty, again under each threshold.

Run: .venv/bin/python bench/empty_transcripts.py [--hits 40] [--thresholds 0.6,0.7,0.8,0.9]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speech_corpus import (PAUSED_TEXTS, PAUSED_TEXTS_HELDOUT, RATE,  # noqa: E402
                                 VOICES, Synthesizer, hit_questions, join_pieces, phone_band,
                                 word_errors)
from bench.voice_to_voice import seed_intents  # noqa: E402
from gateway.providers.moonshine_stt import MoonshineRecognizer  # noqa: E402

CUTS_MS = (96, 160, 320)  # silence after a pause's last word when the early final decodes
PLAIN = 1.0  # the plain greedy decode


def speech_decodes(hits: int) -> list[tuple[str, bytes]]:
    """(reference words, audio) for every decode an utterance gets in a call."""
    synth = Synthesizer()
    rng = random.Random(11)
    cases: list[tuple[str, bytes]] = []
    utterances: list[tuple[list[str], list[bytes], list[int]]] = []
    for i, (text, _) in enumerate(hit_questions(seed_intents(), hits, seed=7)):
        utterances.append(([text], [synth.speak(text, VOICES[i % 2])], []))
    for i, pieces in enumerate(PAUSED_TEXTS + PAUSED_TEXTS_HELDOUT):
        for voice in VOICES:
            audio = [synth.speak(p + ("," if j < len(pieces) - 1 else "."), voice)
                     for j, p in enumerate(pieces)]
            utterances.append((pieces, audio, [rng.randrange(400, 901, 50)
                                               for _ in pieces[1:]]))
    for pieces, audio, gaps in utterances:
        pcm, bounds = join_pieces(audio, gaps)
        for band in (lambda x: x, phone_band):
            banded = band(pcm + bytes(RATE // 2 * 2))
            for k, (_, end) in enumerate(bounds):
                words = " ".join(pieces[:k + 1])
                for cut in CUTS_MS:
                    cases.append((words, banded[:(end + RATE * cut // 1000) * 2]))
    return cases


def noise_bursts() -> list[bytes]:
    rng = np.random.default_rng(0)
    bursts = []
    for kind in ("white", "pink", "hum", "clicks", "cough"):
        for seconds in (0.2, 0.5, 1.0, 2.0):
            for level in (0.05, 0.3):
                n = int(seconds * RATE)
                t = np.arange(n) / RATE
                if kind == "white":
                    x = rng.normal(0, 1, n)
                elif kind == "pink":
                    spectrum = np.fft.rfft(rng.normal(0, 1, n))
                    x = np.fft.irfft(spectrum / np.sqrt(np.arange(1, len(spectrum) + 1)), n)
                elif kind == "hum":
                    x = np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 150 * t)
                elif kind == "clicks":
                    x = np.zeros(n)
                    x[::RATE // 4] = 1.0
                else:
                    x = rng.normal(0, 1, n) * np.exp(-t / 0.08)
                x = x / np.abs(x).max() * level
                quiet = np.zeros(int(0.3 * RATE))
                audio = np.concatenate([quiet, x, quiet])
                bursts.append((audio * 32767).astype("<i2").tobytes())
    return bursts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=40)
    parser.add_argument("--thresholds", default="0.6,0.7,0.8,0.9")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    models = {t: MoonshineRecognizer(threads=1, no_speech_threshold=t)
              for t in [PLAIN, *thresholds]}

    def transcripts(pcm: bytes) -> dict[float, str]:
        """Each threshold's text; a plain decode with words is every threshold's."""
        text = models[PLAIN].transcribe(pcm)
        return {t: text if text or t == PLAIN else model.transcribe(pcm)
                for t, model in models.items()}

    speech, noise = speech_decodes(args.hits), noise_bursts()
    print(f"{len(speech)} speech decodes, {len(noise)} noise bursts")
    rows: dict[float, dict[str, int]] = {t: {"empty": 0, "edits": 0, "noise_words": 0}
                                         for t in models}
    words = 0
    for reference, pcm in speech:
        words += len(reference.split())
        for t, got in transcripts(pcm).items():
            rows[t]["empty"] += not got.strip()
            rows[t]["edits"] += word_errors(reference, got)[0]
    for pcm in noise:
        for t, got in transcripts(pcm).items():
            rows[t]["noise_words"] += bool(got.strip())
    print(f"{'threshold':>9} | {'speech empty':>12} | {'WER':>6} | {'noise -> words':>14}")
    for t, row in rows.items():
        label = "1.0 plain" if t == PLAIN else f"{t:.2f}"
        print(f"{label:>9} | {row['empty']:>5} {row['empty'] / len(speech):>6.1%} | "
              f"{row['edits'] / words:>6.1%} | {row['noise_words']:>5} of {len(noise)}")


if __name__ == "__main__":
    main()
