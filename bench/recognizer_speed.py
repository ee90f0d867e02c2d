"""The embedded recognisers side by side: accuracy and CPU per utterance, one thread each.

Banking77 dev questions spoken by Piper and espeak-ng (bench/speech_corpus.py), through an
8 kHz phone band (16k -> 8k -> 16k), decoded whole by: Moonshine base-en with its weights
folded to float (the default), the same given a draft (the token ids of a decode of the
utterance's first 75%, as the call's last partial gives its final: the draft is checked in
one pass, the text is the same), Moonshine running the shipped .ort as it is, and Whisper
tiny.en. Prints WER, wall ms per utterance (median, p90) and CPU s per utterance (for the
drafted row: the final's decode only, not the partial's).

Run: .venv/bin/python bench/recognizer_speed.py [--n 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speech_corpus import Synthesizer, hit_questions, word_errors  # noqa: E402
from gateway.audio import resample_pcm16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    from bench.voice_to_voice import seed_intents

    synth = Synthesizer()
    texts = [t for t, _ in hit_questions(seed_intents(), args.n)]
    clips = [(t, resample_pcm16(resample_pcm16(synth.speak(t, ("piper", "espeak")[i % 2]),
                                               16000, 8000), 8000, 16000))
             for i, t in enumerate(texts)]
    speech_s = sum(len(c) / 32000 for _, c in clips)
    print(f"{len(clips)} utterances, {speech_s:.0f} s, phone band, Piper + espeak-ng")
    from gateway.providers.moonshine_stt import MoonshineRecognizer
    from gateway.providers.whisper_stt import WhisperRecognizer

    cache = tempfile.mkdtemp(prefix="vg-models-")
    folded = MoonshineRecognizer(threads=1, cache_dir=cache)
    drafts = [folded.transcribe_ids(pcm[:len(pcm) * 3 // 4 // 2 * 2])[1] for _, pcm in clips]

    class Drafted:
        """The folded model decoding each clip from its 75% decode's ids."""

        def warm_up(self) -> None:
            folded.warm_up()

        def transcribe(self, pcm: bytes) -> str:
            index = next(i for i, (_, c) in enumerate(clips) if c is pcm)
            return folded.transcribe_ids(pcm, drafts[index])[0]

    recognizers = {
        "moonshine (folded)": lambda: folded,
        "moonshine (folded, draft)": Drafted,
        "moonshine (.ort as shipped)": lambda: MoonshineRecognizer(threads=1, fold=False),
        "whisper tiny.en": lambda: WhisperRecognizer(threads=1, workers=1),
    }
    print(f"{'recogniser':28} {'WER':>6} {'ms p50':>7} {'ms p90':>7} {'CPU s/utt':>9} "
          f"{'RTF':>6}")
    for name, make in recognizers.items():
        model = make()
        model.warm_up()
        walls, cpus, edits, words = [], [], 0, 0
        for text, pcm in clips:
            wall, cpu = time.perf_counter(), time.process_time()
            out = model.transcribe(pcm)
            walls.append((time.perf_counter() - wall) * 1000)
            cpus.append(time.process_time() - cpu)
            e, w = word_errors(text, out)
            edits, words = edits + e, words + w
        walls.sort()
        print(f"{name:28} {edits / words:>6.1%} {statistics.median(walls):>7.0f} "
              f"{walls[int(0.9 * (len(walls) - 1))]:>7.0f} {statistics.mean(cpus):>9.3f} "
              f"{sum(cpus) / speech_s:>6.3f}")


if __name__ == "__main__":
    main()
