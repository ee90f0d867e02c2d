"""The lexical end-of-turn model: finished questions against the first words of one."""

from __future__ import annotations

import csv
import pickle
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


def test_a_stricter_rate_holds_more_questions_and_passes_fewer_first_words(bank_questions):
    default = train_completeness(bank_questions, generic_negatives()).report
    strict = train_completeness(bank_questions, generic_negatives(), held_rate=0.05).report
    assert 0 < default.threshold < strict.threshold
    assert default.held_rate < strict.held_rate <= 0.05
    assert strict.prefixes_passed < default.prefixes_passed < 0.6
    assert default.questions == len(set(bank_questions))
    assert f"of the seed's {default.questions} questions" in default.summary()


def test_a_prefix_that_is_a_question_of_its_own_is_never_taught_as_unfinished():
    rng = random.Random(0)
    finished = frozenset({"can i top up"})
    prefixes = unfinished_prefixes(["can I top up by cheque"] * 20, 5, rng, finished)
    assert "can i top up" not in prefixes
    assert set(prefixes) == {"can", "can i", "can i top", "can i top up by"}


def test_twins_in_wording_are_one_question(bank_questions):
    twice = [*bank_questions, *(q.upper() + "?" for q in bank_questions)]
    assert train_completeness(twice, generic_negatives()).report.questions == len(
        set(bank_questions))


@pytest.mark.parametrize("questions,extra", [(["what are your hours", "where are you"],
                                              generic_negatives()[:50]),
                                             ([f"word{i}" for i in range(80)], ())])
def test_too_small_or_wordless_seeds_never_hold_a_cached_question(questions, extra):
    model = train_completeness(questions, extra)
    assert model.threshold == 0.0 and model.finished("the card I ordered")
    assert "too few questions" in model.report.summary()


def test_a_seed_of_one_word_questions_trains_on_the_generic_questions():
    # Its held-out folds have no prefixes of their own (scikit-learn refuses empty input).
    questions = [f"word{i}" for i in range(80)]
    model = train_completeness(questions, generic_negatives())
    assert model.report.questions == 80 and model.report.prefixes_passed == 0.0
    assert sum(model.finished(q) for q in questions) >= 79


def test_state_is_plain_data(bank_model):
    # An older gateway reads a models blob with this in it (it ignores the key).
    state = bank_model.state()
    assert b"intents" not in pickle.dumps(state)
    restored = Completeness.from_state(state)
    for text in ("the card I ordered", "what are your opening hours", "can’t log in"):
        assert restored.probability(text) == bank_model.probability(text)
    assert restored.report == bank_model.report


def test_a_curly_apostrophe_is_an_apostrophe():
    assert features("I can’t log in") == features("I can't log in")


BANKING77 = Path("/work/shared/data/banking77")  # where this machine has it


@pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(), reason="no Banking77 here")
def test_on_banking77_the_first_words_of_cached_questions_wait():
    with (BANKING77 / "train.csv").open(newline="", encoding="utf-8") as f:
        questions = [row["text"] for row in csv.DictReader(f)]
    model = train_completeness(questions, generic_negatives())
    assert model.report.held_rate <= 0.005 and model.report.prefixes_passed < 0.45
    for beginning in ("the card I ordered", "the exchange rate", "I want to close"):
        assert not model.finished(beginning), beginning
    for question in ("the card I ordered has not arrived", "what is the exchange rate",
                     "I lost my card", "why was my card declined"):
        assert model.finished(question), question
