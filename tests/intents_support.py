"""Shared helpers for the intents / cache_seed tests.

Kept out of conftest.py so this branch merges cleanly beside the gateway's fixtures.
Test modules import the fixtures they use; the heavy objects are built once per
process (``functools.cache``) even if pytest instantiates the fixture per module.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cache_seed import seed  # noqa: E402
from intents.classifier import IntentClassifier, fitted_probabilities, probabilities_of_logits  # noqa: E402
from intents.embedder import Embedder  # noqa: E402
from intents.loader import LoadedCache, load_cache  # noqa: E402
from intents.ngrams import CharNgramFeatures  # noqa: E402
from intents.store import LocalStore  # noqa: E402
from intents.types import Action, Entry  # noqa: E402

BANK_FAQ = Path(__file__).resolve().parent.parent / "cache_seed" / "examples" / "bank_faq.csv"
TONE_RATE = 8000


def tone_render(text: str) -> tuple[bytes, int]:
    """A cheap deterministic stand-in for the TTS: a 440 Hz tone, 10 ms per character.

    Acceptable ONLY in unit tests of seeding, where what matters is that each
    answer maps to its own, reproducible audio; it is not speech.
    """
    samples = TONE_RATE // 100 * max(1, len(text))
    return b"".join(struct.pack("<h", int(6000 * math.sin(2 * math.pi * 440 * i / TONE_RATE)))
                    for i in range(samples)), TONE_RATE


@functools.cache
def shared_embedder() -> Embedder:
    return Embedder()


@functools.cache
def _seeded_bank_store() -> str:
    root = tempfile.mkdtemp(prefix="voicegate-bank-")
    seed(BANK_FAQ, LocalStore(root), tone_render, "test-tone", progress=False,
         embedder=shared_embedder())
    return root


@pytest.fixture(scope="session")
def intent_embedder() -> Embedder:
    return shared_embedder()


@pytest.fixture(scope="session")
def bank_cache(intent_embedder: Embedder) -> LoadedCache:
    """The shipped bank FAQ, seeded once with the test tone renderer and loaded."""
    return load_cache(LocalStore(_seeded_bank_store()), intent_embedder)


def two_view_state(clf: IntentClassifier, mix_weight: float | None,
                   characters: tuple | None = None) -> dict:
    """The state the classifier wrote before the word view (2026-11-25 until then): its
    embedding and character models under those keys, the embeddings' share (none before
    the geometric mix). ``characters``: the (vectorizer, model) of the character view, when
    not the classifier's own."""
    state = clf.state()
    vectorizer, model = characters or state["views"]["characters"]
    legacy = {"sklearn": state["sklearn"], "classes": state["classes"],
              "single": state["single"], "model": state["embeddings"], "text_model": model,
              "ngrams": vectorizer}
    if mix_weight is not None:
        legacy["mix_weight"] = mix_weight
    return legacy


def two_view_probabilities(state: dict, query: np.ndarray, texts: list[str]) -> np.ndarray:
    """What the classifier before the word view computed from that state, step by step."""
    embedding = fitted_probabilities(state["model"], query)
    model = state["text_model"]
    ngrams = probabilities_of_logits(
        CharNgramFeatures(state["ngrams"]).project(texts, model.coef_) + model.intercept_)
    weight = state.get("mix_weight")
    if weight is None:
        return (embedding + ngrams) / 2.0
    tiny = np.finfo(np.float64).tiny
    return probabilities_of_logits(weight * np.log(np.maximum(embedding, tiny))
                                   + (1.0 - weight) * np.log(np.maximum(ngrams, tiny)))


class HashEmbedder:
    """Vectors from a text's words (hashing): deterministic, no model, for calibration tests
    that need whole routers quickly."""

    model_name = "hash-test-embedder"
    dim = 64

    def encode_batch(self, texts, batch_size: int = 64):  # type: ignore[no-untyped-def]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z']+", text.lower()):
                out[row, sum(map(ord, word)) * 7919 % self.dim] += 1.0
            out[row] /= max(float(np.linalg.norm(out[row])), 1e-6)
        return out

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_many(self, texts):  # type: ignore[no-untyped-def]
        return self.encode_batch(list(texts))


def answer_entries(labels: list[str], questions: list[str]) -> dict[str, Entry]:
    """One answer entry per intent, holding its questions."""
    return {i: Entry(id=i, intent=i, action=Action.ANSWER, answer=f"about {i}",
                     questions=tuple(q for q, y in zip(questions, labels) if y == i))
            for i in dict.fromkeys(labels)}
