"""The shipped negatives' vectors, kept on disk per model (intents/negatives.py): a new
process seeds without embedding the 1,267 questions again, and a kept file is only
trusted while the model still gives its vectors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from intents import negatives
from intents.embedder import CHECKED_TEXTS, Embedder
from intents.negatives import embed_negatives, negatives_for_seed
from tests.intents_support import shared_embedder


class CountingEmbedder:
    """The suite's embedder with its own cache dir, counting the texts it embeds."""

    def __init__(self, cache_dir: Path) -> None:
        self.inner: Embedder = copy.copy(shared_embedder())
        self.inner.cache_dir = cache_dir
        self.embedded = 0
        encode = self.inner._encode

        def counted(texts, batch_size=64):  # type: ignore[no-untyped-def]
            self.embedded += len(texts)
            return encode(texts, batch_size=batch_size)

        self.inner._encode = counted


@pytest.fixture(autouse=True)
def few_negatives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped set's first 40 questions stand for all 1,267 (the same code paths, a
    fraction of the embedding)."""
    shipped = negatives.generic_negatives()[:40]
    monkeypatch.setattr(negatives, "generic_negatives", lambda: shipped)


def new_process() -> None:
    """What a fresh process has in memory: nothing."""
    negatives._vectors.clear()
    negatives._shipped.clear()


@pytest.fixture
def kept(tmp_path: Path) -> tuple[CountingEmbedder, np.ndarray]:
    """The shipped vectors embedded once into tmp_path, as a first seed on a machine does."""
    new_process()
    first = CountingEmbedder(tmp_path)
    texts = negatives_for_seed(questions=["where is the nearest atm"])
    vectors = embed_negatives(first.inner, texts).copy()
    assert first.embedded >= len(negatives.generic_negatives())
    yield first, vectors
    new_process()


def test_a_new_process_reads_the_shipped_vectors_instead_of_embedding_them(kept, tmp_path):
    first, vectors = kept
    assert len(list(tmp_path.glob("negatives-*.npy"))) == 1
    new_process()
    second = CountingEmbedder(tmp_path)
    extra = ["what is the weather on mars", "play some jazz"]
    texts = negatives_for_seed(extra, questions=["where is the nearest atm"])
    again = embed_negatives(second.inner, texts)
    # Only the few texts that check the file, and the operator's own.
    assert second.embedded == CHECKED_TEXTS + len(extra)
    shipped = len(texts) - len(extra)
    assert np.allclose(again[:shipped], vectors, atol=1e-5)
    assert np.allclose(again[shipped:], second.inner.encode_batch(extra), atol=1e-5)


def test_kept_vectors_the_model_no_longer_gives_are_embedded_again(kept, tmp_path):
    first, vectors = kept
    (path,) = tmp_path.glob("negatives-*.npy")
    rng = np.random.default_rng(0)  # another model's vectors under the same name
    other = rng.normal(size=vectors.shape).astype(np.float32)
    np.save(path, other / np.linalg.norm(other, axis=1, keepdims=True))
    new_process()
    second = CountingEmbedder(tmp_path)
    again = embed_negatives(second.inner, negatives_for_seed(questions=["where is the nearest atm"]))
    assert second.embedded >= len(negatives.generic_negatives())
    assert np.allclose(again, vectors, atol=1e-5)
    assert np.allclose(np.load(path), first.inner.encode_batch(list(negatives.generic_negatives())),
                       atol=1e-4)  # rewritten


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong shape"])
def test_a_kept_file_that_does_not_load_is_embedded_again(kept, tmp_path, damage):
    first, vectors = kept
    (path,) = tmp_path.glob("negatives-*.npy")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        np.save(path, np.zeros((3, 384), dtype=np.float32))
    new_process()
    second = CountingEmbedder(tmp_path)
    again = embed_negatives(second.inner, negatives_for_seed(questions=["where is the nearest atm"]))
    assert np.allclose(again, vectors, atol=1e-5)
    assert np.load(path).shape == (len(negatives.generic_negatives()), second.inner.dim)


def test_a_cache_dir_that_cannot_be_written_costs_time_not_the_seed(tmp_path):
    new_process()
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("not a directory")
    embedder = CountingEmbedder(blocked)
    texts = negatives_for_seed()
    vectors = embed_negatives(embedder.inner, texts)
    assert vectors.shape == (len(texts), embedder.inner.dim)
    new_process()
