"""Do the words so far read as a finished question? The lexical end-of-turn signal,
learned from the seed.

A cached question ends its turn on a short silence. But the first words of a longer
sentence are often a cached question's words already: "the exchange rate, ... seems
wrong on my last payment" and "the card I ordered, ... last week, ... still hasn't
arrived" route to cached intents at the first pause, and the short silence answered
them before the caller went on. A word list (``gateway.call.end_of_turn``) knows that
no sentence ends on "the" or "my"; it cannot know that "the card I ordered" is not a
question.

The seed knows: each of its questions is a finished utterance, and each word prefix of
one ("the card I ordered" of "the card I ordered has not arrived") is what an
unfinished one looks like. A logistic regression on word 1-3 grams with the
utterance's start and end marked, plus its length, learns the difference; the shipped
out-of-domain questions (``intents.negatives``) join as finished questions so a small
seed still learns English, not just its own phrasing.

Its threshold is the seed's own: the probability under which only ``held_rate`` of the
seed's questions fall when judged by a model that never saw them (5-fold, out of fold).
So a cached question whose words read as finished as 99.5% of the seed's questions ends
on the short silence, and a prefix-like one waits the long silence instead (the gateway's
``unfinished_words_incomplete``; the open silence with it off): a wrong "finished" cuts a
caller off, a wrong "unfinished" costs one cached answer that wait.

Serving costs ~50 µs a text (a dictionary lookup per n-gram and a dot product); the
router judges every hit's text (the end of turn reads it only on hits). A seed of fewer than 50 questions cannot be judged out
of fold: the model is then off (every text reads as finished) and the report says so.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

_WORD = re.compile(r"[a-z0-9']+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})  # a seed typed with "can’t"
# Prefixes drawn per seed question (all of them would be ~10 a question: no better, slower).
PREFIXES_PER_QUESTION = 3
FOLDS = 5
# Fewer seed questions than this are too few for an out-of-fold threshold: the model is off.
MIN_QUESTIONS = 10 * FOLDS
# Seed questions a fitted model may hold (out of fold): each one held is a cached answer
# that waits the long silence instead of the short one.
DEFAULT_HELD_RATE = 0.005
# Chosen out of fold on banking77 *train*: the first words that read as finished at the
# 0.5% threshold were 46% (C=0.5), 40% (2), 37.7% (4), 36.5% (8), 37.1% (16).
_C = 8.0
_SEED = 20261124  # prefixes are drawn reproducibly: the same seed trains the same model


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower().translate(_APOSTROPHES))


def _key(text: str) -> str:
    return " ".join(words_of(text))


def features(text: str) -> list[str]:
    """Word 1-3 grams with the start and end marked, and the length (capped at 12)."""
    words = words_of(text)
    tokens = ["<s>", *words, "</s>"]
    grams = [f"#{min(len(words), 12)}"]
    for n in (1, 2, 3):
        grams.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return grams


def unfinished_prefixes(questions: Sequence[str], per_question: int, rng: random.Random,
                        finished: frozenset[str] = frozenset()) -> list[str]:
    """Up to ``per_question`` word prefixes of each question, none of which is itself a
    finished text (``finished``: their keys; "can I top up" begins "can I top up by
    cheque" and is a question of its own)."""
    out = []
    for question in questions:
        words = words_of(question)
        cuts = [k for k in range(1, len(words)) if " ".join(words[:k]) not in finished]
        for k in rng.sample(cuts, min(per_question, len(cuts))):
            out.append(" ".join(words[:k]))
    return out


@dataclass(frozen=True)
class CompletenessReport:
    """How the threshold was set (``voicegate seed`` prints it)."""

    threshold: float
    held_rate: float  # seed questions (out of fold) judged unfinished
    prefixes_passed: float  # seed prefixes (out of fold) judged finished
    questions: int

    def summary(self) -> str:
        if self.threshold <= 0.0:
            return (f"end of turn: any cached question ends on the short silence (too few "
                    f"questions, {self.questions}, to learn what an unfinished one looks like)")
        return (f"end of turn: a cached question ends on the short silence when its words read "
                f"as finished (probability >= {self.threshold:.3f}); held out, "
                f"{self.held_rate:.1%} of the seed's {self.questions} questions read as "
                f"unfinished (they wait the long silence) and {self.prefixes_passed:.0%} of "
                f"their first words read as finished")


class Completeness:
    """P(finished) of a transcript, and the seed's threshold for "finished"."""

    def __init__(self, grams: dict[str, tuple[float, float]], intercept: float,
                 threshold: float, report: CompletenessReport) -> None:
        self._grams = grams  # n-gram -> (idf, coefficient)
        self._intercept = intercept
        self.threshold = threshold
        self.report = report

    def probability(self, text: str) -> float:
        """The fitted model's probability, without scikit-learn's per-call checks."""
        counts: dict[str, int] = {}
        for gram in features(text):
            if gram in self._grams:
                counts[gram] = counts.get(gram, 0) + 1
        score, norm = 0.0, 0.0
        for gram, count in counts.items():
            idf, coefficient = self._grams[gram]
            value = (1.0 + math.log(count)) * idf
            norm += value * value
            score += value * coefficient
        logit = self._intercept + (score / math.sqrt(norm) if norm else 0.0)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))

    def finished(self, text: str) -> bool:
        return self.probability(text) >= self.threshold

    def state(self) -> dict[str, Any]:
        """Plain data (no class of ours): a gateway that predates a field still reads the
        models blob that holds it."""
        return {"grams": self._grams, "intercept": self._intercept,
                "threshold": self.threshold, "report": asdict(self.report)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Completeness":
        return cls(dict(state["grams"]), float(state["intercept"]), float(state["threshold"]),
                   CompletenessReport(**state["report"]))

    @classmethod
    def from_fitted(cls, vectorizer: TfidfVectorizer, model: LogisticRegression,
                    threshold: float, report: CompletenessReport) -> "Completeness":
        coefficients = model.coef_[0]
        grams = {gram: (float(vectorizer.idf_[column]), float(coefficients[column]))
                 for gram, column in vectorizer.vocabulary_.items()}
        return cls(grams, float(model.intercept_[0]), threshold, report)


def _vectorizer() -> TfidfVectorizer:
    return TfidfVectorizer(analyzer=features, sublinear_tf=True, min_df=2)


def _model() -> LogisticRegression:
    # liblinear: a binary problem on ~10^4-10^5 sparse rows, 4-7x faster than lbfgs here.
    return LogisticRegression(C=_C, solver="liblinear", max_iter=2000)


# The last model trained, by its inputs: a re-seed of the same questions, a replica loading
# the version it just published, and the test suite's many seeds of one FAQ train once.
_trained: dict[str, "Completeness"] = {}


def train_completeness(questions: Sequence[str], also_finished: Sequence[str] = (),
                       held_rate: float = DEFAULT_HELD_RATE) -> Completeness:
    """Fit on the seed's questions (plus ``also_finished``: the out-of-domain negatives,
    finished questions too) against their prefixes; set the threshold out of fold on the
    seed's own questions (the generic ones are another style: pooled with them, a 0.5%
    quantile fell to CLINC150's oddest phrasings and passed 90% of first words)."""
    # One row per distinct wording ("What are your hours?" is "what are your hours"):
    # a twin in another fold would be a held-out question seen in training.
    by_key: dict[str, str] = {}
    for question in questions:
        by_key.setdefault(_key(question), question)
    by_key.pop("", None)
    extra_by_key: dict[str, str] = {}
    for question in also_finished:
        if _key(question) not in by_key:
            extra_by_key.setdefault(_key(question), question)
    extra_by_key.pop("", None)
    questions, extra = list(by_key.values()), list(extra_by_key.values())
    key = hashlib.sha256(repr((questions, extra, held_rate)).encode("utf-8")).hexdigest()
    found = _trained.get(key)
    if found is None:
        found = _train(questions, extra, held_rate)
        _trained.clear()
        _trained[key] = found
    return found


def _off(questions: int) -> Completeness:
    """Too few questions to learn from, or to judge out of fold: every text reads finished."""
    return Completeness({}, 60.0, 0.0, CompletenessReport(0.0, 0.0, 1.0, questions))


def _train(questions: list[str], extra: list[str], held_rate: float) -> Completeness:
    n_q = len(questions)
    if n_q < MIN_QUESTIONS:
        return _off(n_q)
    rng = random.Random(_SEED)
    finished = frozenset(_key(q) for q in (*questions, *extra))
    prefixes = [unfinished_prefixes([q], PREFIXES_PER_QUESTION, rng, finished)
                for q in questions]
    extra_prefixes = unfinished_prefixes(extra, PREFIXES_PER_QUESTION, rng, finished)
    owner = np.array([i for i, p in enumerate(prefixes) for _ in p], dtype=np.int64)
    n_extra, n_prefix = len(extra), len(owner)
    if n_prefix + len(extra_prefixes) == 0:  # one-word questions only: nothing unfinished
        return _off(n_q)
    # Every text is vectorized once (the vocabulary and idf see every fold's texts: no
    # labels cross folds, only which n-grams exist); each fold fits on its rows.
    texts = [*questions, *extra, *(p for group in prefixes for p in group), *extra_prefixes]
    vectorizer = _vectorizer()
    matrix = vectorizer.fit_transform(texts)
    labels = np.r_[np.ones(n_q + n_extra), np.zeros(n_prefix + len(extra_prefixes))]
    question_rows = np.arange(n_q)
    prefix_rows = n_q + n_extra + np.arange(n_prefix)
    always = np.r_[n_q + np.arange(n_extra), n_q + n_extra + n_prefix
                   + np.arange(len(extra_prefixes))]
    fold_of = np.empty(n_q, dtype=np.int64)
    fold_of[rng.sample(range(n_q), n_q)] = np.arange(n_q) % FOLDS
    prefix_fold = fold_of[owner]
    held_p: list[float] = []
    prefix_p: list[float] = []
    for fold in range(FOLDS):
        rows = np.r_[question_rows[fold_of != fold], prefix_rows[prefix_fold != fold], always]
        if len(set(labels[rows])) < 2:
            return _off(n_q)
        model = _model().fit(matrix[rows], labels[rows])
        held_p.extend(_probabilities(model, matrix[question_rows[fold_of == fold]]))
        prefix_p.extend(_probabilities(model, matrix[prefix_rows[prefix_fold == fold]]))
    model = _model().fit(matrix, labels)
    threshold = float(np.quantile(held_p, held_rate, method="lower"))
    report = CompletenessReport(
        threshold=threshold, held_rate=float(np.mean(np.asarray(held_p) < threshold)),
        prefixes_passed=float(np.mean(np.asarray(prefix_p) >= threshold)) if prefix_p else 0.0,
        questions=n_q)
    return Completeness.from_fitted(vectorizer, model, threshold, report)


def _probabilities(model: LogisticRegression, rows: Any) -> list[float]:
    return list(model.predict_proba(rows)[:, 1]) if rows.shape[0] else []
