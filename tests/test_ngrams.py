"""The text views' n-gram features are scikit-learn's own TF-IDF matrix, faster; the
classifier reads its three views, and a version saved with two still routes as it did."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest

from cache_seed import read_seed_csv
from intents.classifier import MIX, TWO_VIEWS, IntentClassifier, _char_ngrams, _word_ngrams
from intents.ngrams import (MAX_CACHED_WORD_CHARS, CharNgramFeatures, NgramFeatures,
                            WordNgramFeatures)
from tests.intents_support import BANK_FAQ, two_view_probabilities, two_view_state

BANKING77 = Path("/work/shared/data/banking77")  # where this machine has it

ODD_TEXTS = ["", "   ", "zzzz qqqq", "Card CARD card", "my  card\tis\nlost",
             "I'm — Ünïcode café", "a", "pin pin pin pin pin", "x" * 300,
             # Whitespace str.split() and scikit-learn's normaliser must agree on, and
             # characters whose lowercase depends on their neighbours or changes length.
             "card\u00a0pin", "card\x1cpin\x1dlost\x1e\x1fx", "card\u2028pin\u2029",
             "zero\u200bwidth", "\u0130stanbul card", "\u039f\u0394\u039f\u03a3 \u0391\u03a3.\u0392"]


def bank_questions() -> list[str]:
    return list(read_seed_csv(BANK_FAQ).questions)


VIEWS = [(_char_ngrams, CharNgramFeatures), (_word_ngrams, WordNgramFeatures)]


def assert_same_matrix(texts: list[str], fitted_on: list[str]) -> None:
    for vectorizer_of, features_of in VIEWS:
        vectorizer = vectorizer_of().fit(fitted_on)
        expected = vectorizer.transform(texts)
        got = features_of(vectorizer).transform(texts)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert got.nnz == expected.nnz
        assert np.array_equal(got.indptr, expected.indptr)
        assert np.array_equal(got.indices, expected.indices)
        assert np.abs(got - expected).max() < 1e-6


def test_the_matrix_is_scikit_learns_on_seed_questions_and_odd_texts() -> None:
    questions = bank_questions()
    assert_same_matrix(questions + ODD_TEXTS, fitted_on=questions)
    # Words and pairs the vocabulary has, repeated and in another order.
    assert_same_matrix(["card lost card lost", "lost card", "my card my card my",
                        "PIN pin Pin"], fitted_on=questions)


@pytest.mark.skipif(not (BANKING77 / "dev_spoken.csv").is_file(), reason="no Banking77 here")
def test_the_matrix_is_scikit_learns_on_banking77_transcripts() -> None:
    with (BANKING77 / "train.csv").open(encoding="utf-8") as f:
        train = [r["text"] for r in csv.DictReader(f)]
    with (BANKING77 / "dev_spoken.csv").open(encoding="utf-8") as f:
        spoken = [r["asr_text"] for r in csv.DictReader(f)]
    assert_same_matrix(spoken + ODD_TEXTS, fitted_on=train)


@pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(), reason="no Banking77 here")
def test_the_matrix_is_scikit_learns_on_banking77_questions_it_was_not_fitted_on() -> None:
    with (BANKING77 / "train.csv").open(encoding="utf-8") as f:
        train = [r["text"] for r in csv.DictReader(f)]
    assert_same_matrix(train[1::4] + ODD_TEXTS, fitted_on=train[::4])


def test_rows_stay_scikit_learns_once_the_word_cache_is_warm() -> None:
    vectorizer = _char_ngrams().fit(bank_questions())
    features = CharNgramFeatures(vectorizer)
    texts = ["I lost my card", "my card", "lost", "I lost my card today"]
    for _ in range(3):  # the second and third passes are served from the cache
        got = features.transform(texts)
        assert np.abs(got - vectorizer.transform(texts)).max() < 1e-6


def test_a_word_too_long_to_keep_is_counted_but_never_kept() -> None:
    """Review (stop 67): the per-word cache keeps words of at most ``MAX_CACHED_WORD_CHARS``;
    a longer one (a typed message of one 64 KiB "word") is analysed each time, so the cache
    holds 65,536 words, not 65,536 such messages."""
    vectorizer = _char_ngrams().fit(bank_questions())
    features = CharNgramFeatures(vectorizer)
    texts = ["card" * 5000, "my card " + "pin" * (MAX_CACHED_WORD_CHARS // 3 + 1)]
    for _ in range(2):
        assert np.abs(features.transform(texts) - vectorizer.transform(texts)).max() < 1e-6
    assert features._word.cache_info().currsize == 2  # "my" and "card"


def test_settings_it_cannot_reproduce_are_refused() -> None:
    questions = bank_questions()
    for change in ({"analyzer": "word"}, {"binary": True}, {"preprocessor": str.upper},
                   {"norm": "l1"}, {"use_idf": False}):
        vectorizer = _char_ngrams().set_params(**change).fit(questions)
        with pytest.raises(ValueError, match="char_wb"):
            CharNgramFeatures(vectorizer)
    for change in ({"analyzer": "char_wb"}, {"binary": True}, {"norm": "l1"}):
        vectorizer = _word_ngrams().set_params(**change).fit(questions)
        with pytest.raises(ValueError, match="word"):
            WordNgramFeatures(vectorizer)
    # The word analyzer reads the whole text: its own preprocessor is fine.
    vectorizer = _word_ngrams().set_params(preprocessor=str.upper, lowercase=False)
    vectorizer.fit(questions)
    texts = ["Lost my card", "lost MY card"]
    assert np.abs(WordNgramFeatures(vectorizer).transform(texts)
                  - vectorizer.transform(texts)).max() < 1e-12


@pytest.mark.parametrize("vectorizer_of, features_of", VIEWS)
def test_project_is_the_matrix_times_the_weights(vectorizer_of, features_of) -> None:  # type: ignore[no-untyped-def]
    questions = bank_questions()
    features: NgramFeatures = features_of(vectorizer_of().fit(questions))
    weights = np.random.default_rng(0).standard_normal((7, features.transform([""]).shape[1]))
    texts = questions[:20] + ODD_TEXTS
    expected = features.transform(texts) @ weights.T
    assert np.allclose(features.project(texts, weights), expected, atol=1e-9)


def _fitted(seed: int) -> tuple[IntentClassifier, list[str], np.ndarray]:
    """A classifier that reads texts (enough questions per intent), and texts to ask it."""
    plan = read_seed_csv(BANK_FAQ)
    questions, intents = list(plan.questions), list(plan.intents)
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(questions), 16)).astype(np.float32)
    clf = IntentClassifier().fit(np.tile(vectors, (10, 1)), intents * 10, questions * 10)
    texts = questions[:15] + ODD_TEXTS[:4] + ["lost card my", "my card lost"]
    return clf, texts, rng.standard_normal((len(texts), 16)).astype(np.float32)


def _geometric(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    mixed = np.prod([p ** w for p, w in zip(parts, weights)], axis=0)
    return mixed / mixed.sum(axis=1, keepdims=True)


def test_the_classifier_reads_its_three_views_as_scikit_learn_would_and_survives_a_round_trip(
        ) -> None:
    clf, texts, query = _fitted(1)
    assert clf.reads_text and clf.views == ("embeddings", "characters", "words")
    state = clf.state()
    # A weighted geometric mean of the three views' probabilities, renormalised, each
    # view's as scikit-learn computes it: it fails if a view is dropped or weighed otherwise.
    parts = [state["embeddings"].predict_proba(query)]
    for name in ("characters", "words"):
        vectorizer, model = state["views"][name]
        parts.append(model.predict_proba(vectorizer.transform(texts)))
    assert state["mix"] == dict(MIX) and MIX["words"] > 0
    expected = _geometric(parts, [MIX["embeddings"], MIX["characters"], MIX["words"]])
    assert np.allclose(clf.probabilities(query, texts), expected, atol=1e-6)
    # The word view changes what the classifier says: without it, other probabilities.
    two = _geometric(parts[:2], [MIX["embeddings"], MIX["characters"]])
    assert np.abs(clf.probabilities(query, texts) - two).max() > 0.01
    restored = IntentClassifier.from_state(pickle.loads(pickle.dumps(state)))
    assert restored.views == clf.views
    assert np.array_equal(restored.probabilities(query, texts), clf.probabilities(query, texts))
    copied = pickle.loads(pickle.dumps(clf))  # the classifier itself, its word cache warm
    assert np.array_equal(copied.probabilities(query, texts), clf.probabilities(query, texts))


def test_a_seed_too_small_for_the_text_views_reads_embeddings_alone() -> None:
    plan = read_seed_csv(BANK_FAQ)  # ~5 questions an intent
    vectors = np.random.default_rng(3).standard_normal((len(plan.questions), 16))
    clf = IntentClassifier().fit(vectors, list(plan.intents), list(plan.questions))
    assert not clf.reads_text and clf.views == ("embeddings",)
    assert np.array_equal(clf.probabilities(vectors[:5]),
                          clf.state()["embeddings"].predict_proba(vectors[:5]))
    restored = IntentClassifier.from_state(pickle.loads(pickle.dumps(clf.state())))
    assert np.array_equal(restored.probabilities(vectors[:5]), clf.probabilities(vectors[:5]))


@pytest.mark.parametrize("mix_weight", [TWO_VIEWS["embeddings"], None])
def test_a_version_saved_with_two_views_routes_exactly_as_before(mix_weight) -> None:  # type: ignore[no-untyped-def]
    # A replica upgraded in a rolling deploy reads versions the previous release published:
    # their judge and thresholds were calibrated on the two views' mix (or, before
    # 2026-11-25, on their arithmetic mean), and only hold if they keep routing that way.
    clf, texts, query = _fitted(2)
    state = pickle.loads(pickle.dumps(two_view_state(clf, mix_weight)))
    old = IntentClassifier.from_state(state)
    assert old.views == ("embeddings", "characters")
    expected = two_view_probabilities(state, query, texts)
    assert np.array_equal(old.probabilities(query, texts), expected)  # to the last bit
    assert not np.allclose(expected, clf.probabilities(query, texts), atol=1e-3)
    # Saved again (the layout since the word view), it still routes the same.
    again = IntentClassifier.from_state(pickle.loads(pickle.dumps(old.state())))
    assert again.mix == old.mix and (mix_weight is not None or again.mix is None)
    assert np.array_equal(again.probabilities(query, texts), expected)


def test_a_mix_or_a_view_this_voicegate_does_not_know_is_refused() -> None:
    clf, texts, query = _fitted(4)
    state = clf.state()
    for broken in ({**state, "views": {**state["views"], "phonemes": state["views"]["words"]}},
                   {**state, "mix": {"embeddings": 0.5, "characters": 0.5}}):
        with pytest.raises(ValueError):  # the loader trains the version's models again
            IntentClassifier.from_state(broken)
