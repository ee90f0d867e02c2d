"""The text views' n-gram features are scikit-learn's own TF-IDF matrix, faster."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from cache_seed import read_seed_csv
from intents.classifier import (EMBEDDING_WEIGHT, IntentClassifier, _char_ngrams,
                                fitted_probabilities)
from intents.ngrams import CharNgramFeatures, NgramFeatures, WordNgramFeatures
from tests.intents_support import BANK_FAQ

BANKING77 = Path("/work/shared/data/banking77")  # where this machine has it

ODD_TEXTS = ["", "   ", "zzzz qqqq", "Card CARD card", "my  card\tis\nlost",
             "I'm — Ünïcode café", "a", "pin pin pin pin pin", "x" * 300,
             # Whitespace str.split() and scikit-learn's normaliser must agree on, and
             # characters whose lowercase depends on their neighbours or changes length.
             "card\u00a0pin", "card\x1cpin\x1dlost\x1e\x1fx", "card\u2028pin\u2029",
             "zero\u200bwidth", "\u0130stanbul card", "\u039f\u0394\u039f\u03a3 \u0391\u03a3.\u0392"]


def bank_questions() -> list[str]:
    return list(read_seed_csv(BANK_FAQ).questions)


def _words() -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)


VIEWS = [(_char_ngrams, CharNgramFeatures), (_words, WordNgramFeatures)]


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


def test_settings_it_cannot_reproduce_are_refused() -> None:
    questions = bank_questions()
    for change in ({"analyzer": "word"}, {"binary": True}, {"preprocessor": str.upper},
                   {"norm": "l1"}, {"use_idf": False}):
        vectorizer = _char_ngrams().set_params(**change).fit(questions)
        with pytest.raises(ValueError, match="char_wb"):
            CharNgramFeatures(vectorizer)
    for change in ({"analyzer": "char_wb"}, {"binary": True}, {"norm": "l1"}):
        vectorizer = _words().set_params(**change).fit(questions)
        with pytest.raises(ValueError, match="word"):
            WordNgramFeatures(vectorizer)
    # The word analyzer reads the whole text: its own preprocessor is fine.
    vectorizer = _words().set_params(preprocessor=str.upper, lowercase=False)
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


def test_the_classifier_reads_texts_as_scikit_learn_would_and_survives_a_round_trip() -> None:
    plan = read_seed_csv(BANK_FAQ)
    questions, intents = list(plan.questions), list(plan.intents)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((len(questions), 16)).astype(np.float32)
    # Enough questions per intent that the n-gram model joins in.
    many = questions * 10
    clf = IntentClassifier().fit(np.tile(vectors, (10, 1)), intents * 10, many)
    assert clf.reads_text
    texts = questions[:15] + ODD_TEXTS[:4]
    query = rng.standard_normal((len(texts), 16)).astype(np.float32)
    state = clf.state()
    # A weighted geometric mean of the two models' probabilities, renormalised.
    embedding = fitted_probabilities(state["model"], query)
    ngrams = state["text_model"].predict_proba(state["ngrams"].transform(texts))
    mixed = embedding ** EMBEDDING_WEIGHT * ngrams ** (1 - EMBEDDING_WEIGHT)
    expected = mixed / mixed.sum(axis=1, keepdims=True)
    assert np.allclose(clf.probabilities(query, texts), expected, atol=1e-6)
    restored = IntentClassifier.from_state(pickle.loads(pickle.dumps(state)))
    assert np.allclose(restored.probabilities(query, texts), expected, atol=1e-6)
    copied = pickle.loads(pickle.dumps(clf))  # the classifier itself, its word cache warm
    assert np.allclose(copied.probabilities(query, texts), expected, atol=1e-6)


def test_a_cache_saved_before_the_geometric_mix_keeps_averaging() -> None:
    # Its judge and thresholds were calibrated on averaged probabilities; mixing its models
    # another way would break the precision its seed report promised.
    plan = read_seed_csv(BANK_FAQ)
    questions, intents = list(plan.questions) * 10, list(plan.intents) * 10
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((len(questions), 16)).astype(np.float32)
    clf = IntentClassifier().fit(vectors, intents, questions)
    texts = list(plan.questions[:12])
    query = rng.standard_normal((len(texts), 16)).astype(np.float32)
    state = clf.state()
    embedding = fitted_probabilities(state["model"], query)
    ngrams = state["text_model"].predict_proba(state["ngrams"].transform(texts))
    legacy = {k: v for k, v in state.items() if k != "mix_weight"}
    old = IntentClassifier.from_state(pickle.loads(pickle.dumps(legacy)))
    assert np.allclose(old.probabilities(query, texts), (embedding + ngrams) / 2, atol=1e-6)
    assert old.state()["mix_weight"] is None  # and stays so when saved again
    new = IntentClassifier.from_state(pickle.loads(pickle.dumps(state)))
    assert state["mix_weight"] == EMBEDDING_WEIGHT
    assert np.allclose(new.probabilities(query, texts), clf.probabilities(query, texts))
    assert not np.allclose(new.probabilities(query, texts), (embedding + ngrams) / 2, atol=1e-3)
