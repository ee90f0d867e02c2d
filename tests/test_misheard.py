"""Misheard copies of a seed (intents.misheard) and where calibration and training use them."""

from __future__ import annotations

import re

import numpy as np
import pytest

import intents.router
from intents.calibration import MisheardCopies, cross_validate, fitted_rows
from intents.classifier import IntentClassifier
from intents.misheard import misheard_copies
from intents.types import Action, Entry

SEED = [
    "can I pay in a cheque at the branch",
    "how do I check my balance",
    "my card was declined at the ATM",
    "the cash machine kept my card",
    "I want a refund for this payment",
    "why was the payment refunded twice",
    "where is my new card",
    "how long does a transfer take",
] * 5


def _words(texts: list[str]) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z']+", t.lower())}


def test_a_copy_only_drops_or_swaps_words_for_ones_the_seed_says() -> None:
    copies = misheard_copies(SEED, rate=0.5)
    assert len(copies) == len(SEED)
    assert copies != SEED  # at half the words something was misheard
    assert _words(copies) <= _words(SEED)  # nothing the seed does not say
    assert all(c.strip() for c in copies)


def test_copies_are_the_same_every_time_and_rate_zero_is_the_seed() -> None:
    assert misheard_copies(SEED) == misheard_copies(SEED)
    assert misheard_copies(SEED, rate=0.0) == SEED


def test_a_swapped_word_sounds_or_is_spelt_like_the_word_it_replaces() -> None:
    # At rate 1 every word is dropped or swapped: "cheque" can only become "check" (same
    # Metaphone code), never a word that neither sounds nor is spelt like it.
    copies = misheard_copies(["cheque check"] * 50, rate=1.0)
    for copy in copies:
        for word in copy.split():
            assert word in {"cheque", "check"}
    assert any("check" in c.split() for c in copies)


def test_a_rate_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="share of words"):
        misheard_copies(SEED, rate=1.5)


def test_each_fold_fits_the_copies_of_its_training_questions_only() -> None:
    rng = np.random.default_rng(3)
    n = 40
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    texts = [f"question {i}" for i in range(n)]
    labels = ["a", "b"] * (n // 2)
    copies = MisheardCopies(vectors + 100.0, [f"copy {i}" for i in range(n)])
    folds: list[tuple[list[str], list[str]]] = []  # each fold's (fitted, scored) texts

    class Spy(IntentClassifier):
        def fit(self, v, y, t=None, **kwargs):  # type: ignore[override]
            folds.append((list(t), []))
            assert len(v) == len(y) == len(t)
            return super().fit(v, y, t, **kwargs)

        def probabilities(self, v, t=None):  # type: ignore[override]
            folds[-1][1].extend(t)
            return super().probabilities(v, t)

    cross_validate(vectors, texts, labels, folds=4, make_classifier=Spy, misheard=copies)
    assert len(folds) == 4
    for fitted, scored in folds:
        questions = [t for t in fitted if t.startswith("question")]
        assert sorted(t for t in fitted if t.startswith("copy")) == sorted(
            q.replace("question", "copy") for q in questions)
        assert scored and not [t for t in scored if t.startswith("copy")]  # never held out
        held_out_copies = {t.replace("question", "copy") for t in scored}
        assert not held_out_copies & set(fitted)  # a held-out question's copy would leak it
    assert sorted(t for _, scored in folds for t in scored) == sorted(texts)  # each once


def test_fitted_rows_pairs_every_question_with_its_copy() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    copies = MisheardCopies(-vectors, ["x", "y", "z"])
    v, y, t = fitted_rows(vectors, np.array(["a", "b", "c"], dtype=object), ["p", "q", "r"],
                          np.array([0, 2]), copies)
    assert t == ["p", "r", "x", "z"] and list(y) == ["a", "c", "a", "c"]
    assert np.array_equal(v, np.concatenate([vectors[[0, 2]], -vectors[[0, 2]]]))
    v, y, t = fitted_rows(vectors, np.array(["a", "b", "c"], dtype=object), ["p", "q", "r"],
                          np.array([1]), None)
    assert t == ["q"] and list(y) == ["b"]


class _CountingEmbedder:
    """Vectors from a text's words (hashing), and the texts it was asked to embed."""

    model_name = "counting-test-embedder"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def encode_batch(self, texts, batch_size: int = 64):  # type: ignore[no-untyped-def]
        self.asked.extend(texts)
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, hash(word) % 32] += 1.0
            out[row] /= max(np.linalg.norm(out[row]), 1e-6)
        return out


@pytest.mark.parametrize("per_intent,copied", [(25, True), (5, False)])
def test_only_a_seed_with_enough_questions_an_intent_is_fitted_with_copies(
        monkeypatch: pytest.MonkeyPatch, per_intent: int, copied: bool) -> None:
    made: list[int] = []
    real = intents.router.misheard_copies

    def counting(texts):  # type: ignore[no-untyped-def]
        made.append(len(texts))
        return real(texts)

    monkeypatch.setattr(intents.router, "misheard_copies", counting)
    monkeypatch.setattr(intents.router, "negatives_for_seed", lambda extra, questions: ())
    questions = [f"{w} question number {i}" for w in ("card", "pin") for i in range(per_intent)]
    labels = ["card"] * per_intent + ["pin"] * per_intent
    entries = {i: Entry(id=i, intent=i, action=Action.ANSWER, answer=f"about {i}",
                        questions=tuple(q for q, y in zip(questions, labels) if y == i))
               for i in ("card", "pin")}
    embedder = _CountingEmbedder()
    intents.router.train_router(embedder, questions, labels, entries)  # type: ignore[arg-type]
    assert made == ([len(questions)] if copied else [])
