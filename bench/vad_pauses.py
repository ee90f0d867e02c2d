"""Which pauses the VAD's silence alone cuts, and what the onset rule costs finished turns.

    .venv/bin/python bench/vad_pauses.py [--paused-set dev] [--draws 10] [--questions 80]

The paused set's clips (bench/speech_corpus.py: both voices, 16 kHz and the 8 kHz phone
band) are scored by Silero window by window as the gateway scores them (quiet windows
skipped at the gateway's vad_quiet_dbfs) and run through the gateway's own SpeechSegmenter at a fixed
required silence. Each of ``--draws`` draws gives every clip new pause lengths (400-900
ms, as the voice-to-voice bench draws them), so a rule is judged on many pauses, not on
one bench sample. Printed per configuration: the clips whose turn the silence ended
before their last word. Words, the cache and the turn model are left out: this is the
open silence (nothing known about the words) and the VAD alone.

Then the cost: Banking77 *train* questions spoken whole, each turn ended at the short
(160 ms) and the open (900 ms) silence: how many ends the onset rule moved, and by how
much on average (an end that moved because the caller's words went on after a 160 ms
gap is counted too).

Configurations: the onset rule at its default (``onset_probability`` 0.15), off (1.0),
and the open silence at 1000 ms without it. Choose on the development set (``dev``);
the other sets are for reporting.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import speech_corpus as sc  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.vad import (WINDOW_MS, WINDOW_SAMPLES, SegmentEvent, SileroState,  # noqa: E402
                         SileroVAD, SpeechSegmenter, VADBatcher, pcm16_windows)

_TAIL = bytes(sc.RATE * 2 * 2)  # 2 s of silence after the clip: every turn ends
_DEFAULTS = Settings.model_fields  # the gateway's own VAD and segmenter defaults


class Scorer:
    """Speech probabilities of a clip's windows, from the gateway's own VADBatcher (quiet
    windows skipped as the gateway skips them), a window at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1)
        self._batcher = VADBatcher(SileroVAD(), self._pool,
                                   quiet_dbfs=_DEFAULTS["vad_quiet_dbfs"].default)
        self._loop = asyncio.new_event_loop()
        self._cache: dict[bytes, list[float]] = {}

    def __call__(self, pcm16: bytes) -> list[float]:
        if pcm16 not in self._cache:
            self._cache[pcm16] = self._loop.run_until_complete(self._score(pcm16))
        return self._cache[pcm16]

    async def _score(self, pcm16: bytes) -> list[float]:
        state, probs = SileroState(), []
        for window in pcm16_windows(pcm16):
            probs.extend(await self._batcher.score(state, [window]))
        return probs


def turn_end(probs: list[float], silence_ms: float, onset_probability: float) -> int | None:
    """The window on which the first turn ends, if one does."""
    segmenter = SpeechSegmenter(threshold=_DEFAULTS["vad_threshold"].default,
                                min_speech_ms=_DEFAULTS["min_speech_ms"].default,
                                end_silence_ms=silence_ms, onset_probability=onset_probability)
    for index, prob in enumerate(probs):
        if SegmentEvent.TURN_END in segmenter.push(prob):
            return index
    return None


CONFIGS = {"onset rule (0.15), 900 ms": (900.0, 0.15), "no onset rule, 900 ms": (900.0, 1.0),
           "no onset rule, 1000 ms": (1000.0, 1.0)}


def cut_offs(score: Scorer, paused_set: str, draws: int) -> None:
    synth = sc.Synthesizer()
    cut = {name: 0 for name in CONFIGS}
    clips = 0
    for draw in range(draws):
        rng = random.Random(1000 + draw)
        for pieces in sc.PAUSED_SETS[paused_set]:
            for voice in sc.VOICES:
                clip = sc.paused_clip(synth, pieces, voice, rng)
                for rate in (16000, 8000):
                    pcm = clip.pcm16 if rate == 16000 else sc.phone_band(clip.pcm16)
                    probs = score(pcm + _TAIL)
                    clips += 1
                    for name, (silence, onset) in CONFIGS.items():
                        end = turn_end(probs, silence, onset)
                        if end is not None and end * WINDOW_SAMPLES < clip.speech_end:
                            cut[name] += 1
    print(f"paused set {paused_set!r}, {draws} draws of pause lengths: {clips} clips")
    for name, count in cut.items():
        print(f"  {name:<28} cut off {count:4d} ({count / clips:.1%})")


def cost(score: Scorer, questions: int) -> None:
    rows = list(csv.DictReader((sc.DATA / "banking77" / "train.csv").open(encoding="utf-8")))
    random.Random(5).shuffle(rows)
    texts = [r["text"].strip() for r in rows if sc._speakable(r["text"].strip())][:questions]
    synth = sc.Synthesizer()
    print(f"\ncost on {len(texts)} Banking77 train questions x 2 voices x 2 rates, spoken whole")
    for silence in (160.0, 900.0):
        total, delays, inside = 0, [], 0
        for text in texts:
            for voice in sc.VOICES:
                pcm0 = synth.speak(text, voice)
                for rate in (16000, 8000):
                    probs = score((pcm0 if rate == 16000 else sc.phone_band(pcm0)) + _TAIL)
                    before, after = turn_end(probs, silence, 1.0), turn_end(probs, silence, 0.15)
                    total += 1
                    if before is None or after is None or after == before:
                        continue
                    if before * WINDOW_SAMPLES < sc.speech_bounds(pcm0)[1]:
                        inside += 1  # it ended inside the question: the rule let it go on
                    else:
                        delays.append((after - before) * WINDOW_MS)
        print(f"  {silence:4.0f} ms silence, {total} turns: {len(delays)} ends later by "
              f"{', '.join(f'{d:.0f}' for d in sorted(delays)) or '-'} ms; {inside} that "
              f"ended inside the question without the rule now end after it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paused-set", default="dev", choices=sorted(sc.PAUSED_SETS))
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--questions", type=int, default=80)
    args = parser.parse_args()
    score = Scorer()
    cut_offs(score, args.paused_set, args.draws)
    if args.questions:
        cost(score, args.questions)


if __name__ == "__main__":
    main()
