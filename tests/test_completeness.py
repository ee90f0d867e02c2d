"""The lexical end-of-turn model: finished questions against the first words of one."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from intents.completeness import (Completeness, _model, _vectorizer, features,
                                  train_completeness, unfinished_prefixes)
from intents.negatives import generic_negatives

BANK_FAQ = Path(__file__).resolve().parents[1] / "cache_seed" / "examples" / "bank_faq.csv"


@pytest.fixture(scope="module")
def bank_questions() -> list[str]:
    with BANK_FAQ.open(newline="", encoding="utf-8") as f:
        return [row["question"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def bank_model(bank_questions) -> Completeness:
    return train_completeness(bank_questions, generic_negatives())


def test_features_mark_the_start_the_end_and_the_length():
    grams = features("The card I ordered?")
    assert "#4" in grams and "<s> the" in grams and "ordered </s>" in grams
    assert "card i ordered" in grams and "i ordered </s>" in grams
    assert features("") == ["#0", "<s>", "</s>", "<s> </s>"]


def test_the_fast_probability_is_scikit_learns(bank_questions):
    rng = random.Random(3)
    finished = bank_questions[:120]
    unfinished = unfinished_prefixes(finished, 2, rng)
    vectorizer = _vectorizer()
    matrix = vectorizer.fit_transform([*finished, *unfinished])
    model = _model().fit(matrix, [1] * len(finished) + [0] * len(unfinished))
    fast = Completeness.from_fitted(vectorizer, model, 0.5, None)  # type: ignore[arg-type]
    texts = [*bank_questions[120:160], "the card i ordered", "", "zzz qqq", "is is is is"]
    expected = model.predict_proba(vectorizer.transform(texts))[:, 1]
    assert np.allclose([fast.probability(t) for t in texts], expected, atol=1e-9)


# Written for this test: none is in bank_faq.csv or the shipped negatives.
UNSEEN_QUESTIONS = ["what time do you open on monday", "can you give me your routing number",
                    "how do I activate the card you sent me",
                    "how much cash can I take out in a day", "I lost my card"]
# The first words of a question, and the question; no beginning ends on a word the word
# list (gateway.call.end_of_turn) knows.
UNSEEN_BEGINNINGS = [("the card I ordered", "the card I ordered has not arrived"),
                     ("the exchange rate", "what is the exchange rate"),
                     ("I want to close", "I want to close my account"),
                     ("can you check", "can you check my balance"),
                     ("how much cash", "how much cash can I take out in a day"),
                     ("what time do you open on", "what time do you open on monday")]


def test_unseen_questions_read_finished(bank_model):
    assert [q for q in UNSEEN_QUESTIONS if not bank_model.finished(q)] == []


def test_the_first_words_of_a_question_read_less_finished_than_the_question(bank_model):
    wrong = [(b, q) for b, q in UNSEEN_BEGINNINGS
             if bank_model.probability(b) >= bank_model.probability(q)]
    assert wrong == []


def test_the_threshold_holds_back_at_most_the_held_rate_out_of_fold(bank_questions):
    model = train_completeness(bank_questions, generic_negatives(), held_rate=0.02)
    report = model.report
    assert report.threshold == model.threshold > 0
    assert report.held_rate <= 0.02
    assert report.questions == len(set(bank_questions))
    # Most first words wait (the seed shows what a finished question looks like).
    assert report.prefixes_passed < 0.6
    assert f"of the seed's {report.questions} questions" in report.summary()


def test_too_small_a_seed_never_holds_a_cached_question():
    model = train_completeness(["what are your hours", "where are you"], generic_negatives()[:50])
    assert model.threshold == 0.0 and model.finished("the card I ordered")
