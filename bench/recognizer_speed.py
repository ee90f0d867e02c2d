"""The embedded recognisers side by side: accuracy and CPU per utterance, one thread each.

Banking77 dev questions spoken by Piper and espeak-ng (bench/speech_corpus.py), through an
8 kHz phone band (16k -> 8k -> 16k), decoded whole by: Moonshine base-en with its decoder's
weights in int8 blocks (the default, gateway/providers/moonshine_int8.py) and with its
weights folded to float, each also given a draft (the token ids of a decode of the
utterance's first 75%, as the call's last partial gives its final: the draft is checked in
one pass), Moonshine running the shipped .ort as it is, and Whisper tiny.en.

The recognisers take turns on each utterance (the order rotates), so a load that comes and
goes on the machine weighs on all of them alike. Prints WER, wall ms per utterance (median,
p90), CPU s per utterance (for a drafted row: the final's decode only, not the partial's);
for Moonshine also the median ms of the encoder, of the decoder over an utterance and of
one decoder step, and on how many utterances the token ids are those of the float decoder
without a draft.

Run: .venv/bin/python bench/recognizer_speed.py [--n 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speech_corpus import Synthesizer, hit_questions, phone_band, word_errors  # noqa: E402


class TimedSession:
    """An onnxruntime session that notes how long each run took (ms) and what it was,
    under the row being measured (``runs[None]`` when none is)."""

    row: str | None = None

    def __init__(self, session: Any, runs: dict[str | None, list[tuple[str, float]]]) -> None:
        self._session, self._runs = session, runs

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        start = time.perf_counter()
        out = self._session.run(names, feeds)
        step = "use_cache_branch" in feeds and bool(feeds["use_cache_branch"][0])
        kind = "step" if step else ("first" if "input_ids" in feeds else "encoder")
        self._runs.setdefault(TimedSession.row, []).append(
            (kind, (time.perf_counter() - start) * 1000))
        return out

    def get_outputs(self) -> Any:
        return self._session.get_outputs()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--voices", default="piper,espeak",
                        help="the voices that speak the questions, in turn (piper, espeak)")
    args = parser.parse_args()
    from bench.voice_to_voice import seed_intents

    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    if not voices:
        parser.error("--voices names no voice (piper, espeak)")
    synth = Synthesizer()
    texts = [t for t, _ in hit_questions(seed_intents(), args.n)]
    clips = [(t, phone_band(synth.speak(t, voices[i % len(voices)])))
             for i, t in enumerate(texts)]
    speech_s = sum(len(c) / 32000 for _, c in clips)
    print(f"{len(clips)} utterances, {speech_s:.0f} s, phone band, voices {', '.join(voices)}")
    from gateway.providers.moonshine_stt import MoonshineRecognizer
    from gateway.providers.whisper_stt import WhisperRecognizer

    cache = tempfile.mkdtemp(prefix="vg-models-")
    int8 = MoonshineRecognizer(threads=1, cache_dir=cache)
    folded = MoonshineRecognizer(threads=1, cache_dir=cache, decoder_weights="float")
    shipped = MoonshineRecognizer(threads=1, fold=False)
    assert int8.decoder_weights == "int8", "the int8 decoder did not build (see the log)"
    runs: dict[str | None, list[tuple[str, float]]] = {}
    for model in (int8, folded, shipped):
        model._encoder = TimedSession(model._encoder, runs)
        model._decoder = TimedSession(model._decoder, runs)

    def drafted(model: MoonshineRecognizer) -> Callable[[bytes], tuple[str, list[int]]]:
        """Each clip decoded from its 75% decode's ids (by the same model)."""
        drafts = [model.transcribe_ids(pcm[:len(pcm) * 3 // 4 // 2 * 2])[1] for _, pcm in clips]
        index = {id(pcm): i for i, (_, pcm) in enumerate(clips)}
        return lambda pcm: model.transcribe_ids(pcm, drafts[index[id(pcm)]])

    whisper = WhisperRecognizer(threads=1, workers=1)
    recognizers: dict[str, Callable[[bytes], tuple[str, list[int]]]] = {
        "moonshine int8": int8.transcribe_ids,
        "moonshine int8, draft": drafted(int8),
        "moonshine float": folded.transcribe_ids,
        "moonshine float, draft": drafted(folded),
        "moonshine (.ort as shipped)": shipped.transcribe_ids,
        "whisper tiny.en": lambda pcm: (whisper.transcribe(pcm), []),
    }
    for model in (int8, folded, shipped, whisper):
        model.warm_up()
    runs.clear()
    names = list(recognizers)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    edits = dict.fromkeys(names, 0)
    words = dict.fromkeys(names, 0)
    ids: dict[str, list[list[int]]] = {n: [] for n in names}
    decoder_ms: dict[str, list[float]] = {n: [] for n in names}
    for i, (text, pcm) in enumerate(clips):
        for name in names[i % len(names):] + names[:i % len(names)]:
            TimedSession.row = name
            before = len(runs.setdefault(name, []))
            wall, cpu = time.perf_counter(), time.process_time()
            out, tokens = recognizers[name](pcm)
            decoder_ms[name].append(sum(ms for kind, ms in runs[name][before:]
                                        if kind != "encoder"))
            walls[name].append((time.perf_counter() - wall) * 1000)
            cpus[name].append(time.process_time() - cpu)
            e, w = word_errors(text, out)
            edits[name], words[name] = edits[name] + e, words[name] + w
            ids[name].append(tokens)
    reference = ids["moonshine float"]
    print(f"{'recogniser':28} {'WER':>6} {'ms p50':>7} {'ms p90':>7} {'CPU s/utt':>9} "
          f"{'RTF':>6} {'enc ms':>6} {'dec ms':>6} {'step ms':>7} {'ids=float':>9}")
    for name in names:
        ms = sorted(walls[name])
        line = (f"{name:28} {edits[name] / words[name]:>6.1%} {statistics.median(ms):>7.0f} "
                f"{ms[int(0.9 * (len(ms) - 1))]:>7.0f} {statistics.mean(cpus[name]):>9.3f} "
                f"{sum(cpus[name]) / speech_s:>6.3f}")
        if name.startswith("moonshine"):
            log = runs.get(name, [])
            enc = [ms for kind, ms in log if kind == "encoder"]
            step = [ms for kind, ms in log if kind == "step"]
            same = sum(a == b for a, b in zip(ids[name], reference))
            line += (f" {statistics.median(enc) if enc else float('nan'):>6.0f}"
                     f" {statistics.median(decoder_ms[name]):>6.0f}"
                     f" {statistics.median(step) if step else float('nan'):>7.1f}"
                     f" {same:>5}/{len(reference)}")
        print(line)


if __name__ == "__main__":
    main()
