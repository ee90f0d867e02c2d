"""Smart Turn v3.2: is the caller done, or mid-sentence? A model on the turn's audio.

Silence alone cannot tell "what is my balance?" (done) from "my card number is ..."
(thinking): the words and the intonation can. Smart Turn v3.2 (BSD-2-Clause, by Daily)
reads the last 8 s of a turn as Whisper log-mel features and returns the probability
that the turn is complete. The ONNX file ships inside the ``pipecat-ai`` wheel; we
locate it without importing pipecat and run it on our onnxruntime. Features are
Whisper's log-mel as the model was trained on them (8 s window, waveform normalised,
audio left-padded with zeros), computed with ``transformers.audio_utils`` (numpy):
``WhisperFeatureExtractor`` itself imports torch, which the serving process never needs.

Used by the call's end-of-turn policy (``gateway/call/end_of_turn.py``) at each pause.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLE_RATE = 16000
WINDOW_S = 8
_WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE
_MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
# Less audio than this is no turn to judge (a click): reported as incomplete.
MIN_SAMPLES = SAMPLE_RATE // 10


class TurnModelError(RuntimeError):
    """The end-of-turn model is missing or unusable."""


def default_model_path() -> Path:
    """The ONNX file inside the installed ``pipecat-ai`` wheel (pipecat is not imported)."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise TurnModelError("Smart Turn needs the pipecat-ai package, which ships its "
                             "model (pip install pipecat-ai), or VOICEGATE_TURN_MODEL=none")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "audio" / "turn" / "smart_turn" / "data" / _MODEL_FILE
    if not path.is_file():
        raise TurnModelError(f"no {_MODEL_FILE} in the installed pipecat-ai ({path})")
    return path


_N_FFT, _HOP, _MELS = 400, 160, 80  # Whisper's STFT and mel bands


class SmartTurn:
    def __init__(self, threads: int = 1, model_path: str | Path | None = None) -> None:
        from transformers.audio_utils import mel_filter_bank, window_function

        path = Path(model_path) if model_path else default_model_path()
        if not path.is_file():
            raise TurnModelError(f"no Smart Turn model at {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._window = window_function(_N_FFT, "hann")
        self._mel_filters = mel_filter_bank(
            num_frequency_bins=1 + _N_FFT // 2, num_mel_filters=_MELS, min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
            mel_scale="slaney")

    def features(self, pcm16: bytes) -> np.ndarray:
        """[1, 80, 800] log-mel of the last 8 s, zeros before a shorter turn."""
        from transformers.audio_utils import spectrogram

        samples = np.frombuffer(pcm16[:len(pcm16) // 2 * 2], dtype="<i2")[-_WINDOW_SAMPLES:]
        audio = np.zeros(_WINDOW_SAMPLES, dtype=np.float32)
        if len(samples):
            audio[-len(samples):] = samples.astype(np.float32) / 32768.0
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        log_mel = spectrogram(audio, self._window, frame_length=_N_FFT, hop_length=_HOP,
                              power=2.0, mel_filters=self._mel_filters,
                              log_mel="log10")[:, :-1]
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
        return ((log_mel + 4.0) / 4.0)[np.newaxis].astype(np.float32)

    def probability(self, pcm16: bytes) -> float:
        """P(the turn is complete) from its 16 kHz PCM16 audio; blocking, thread-safe.

        Under 100 ms of audio is no turn yet: 0.0."""
        if len(pcm16) // 2 < MIN_SAMPLES:
            return 0.0
        (out,) = self._session.run(None, {self._input: self.features(pcm16)})
        return float(np.clip(np.asarray(out).reshape(-1)[0], 0.0, 1.0))

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        self.probability((rng.standard_normal(SAMPLE_RATE) * 300).astype("<i2").tobytes())
