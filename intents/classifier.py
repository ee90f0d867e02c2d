"""Intent classifier: multinomial logistic regression on sentence embeddings.

Trained at seed time on the seed's questions (and any extra labelled utterances).
Logistic regression gives calibrated-enough probabilities whose top-2 margin is the
best single confidence signal we measured on banking77 (better than the top
probability, a kNN vote or an MLP); the router combines it with the nearest
neighbours and thresholds calibrated on the seed.

Beside the embeddings, a second logistic regression reads the text's character
n-grams (TF-IDF, 2-5 characters within words): it catches what a sentence embedding
blurs (a misheard word's spelling, "PIN" vs "pin code") and costs ~0.2 ms a query
(``intents.ngrams``: per-word cached counts). The two models are combined as a
weighted geometric mean (their log-probabilities averaged, 0.7 to the embeddings, then
renormalised): an intent both models like beats one that only one model is sure of,
which an arithmetic mean does not see. Chosen by 5-fold cross-validation on banking77
*train* only (``bench/router_quality.py`` reports dev): top-1 accuracy 92.0% (embeddings
alone) -> 92.8%; the share of held-out seed questions the calibrated router answers at a
1% target, 69.2% with the arithmetic mean, 71.2% with equal weights, 72.4% at 0.7.

Out of domain: a linear classifier trained on the seed alone always names *some* intent,
however far the query is from everything it was trained on. Two defences: the
out-of-scope decision on similarity to the nearest seed question (see
``IntentClassifier.decide``), and, for seeds large enough to learn it, one more class,
``OUT_OF_DOMAIN``, learned from the out-of-domain negatives (``intents.negatives``) by
both models: probability an unrelated question gives to the bank's intents moves to it,
and a question it wins is never served. Measured by 5-fold cross-validation on banking77
*train*: the calibrated router answers 75.6% of held-out questions at a 1% target where
it answered 73.0% without the class (the out-of-domain limit held that threshold back);
held-out negatives answered 0.46% -> 0.39%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from intents.ngrams import CharNgramFeatures

# Inverse regularisation strength: chosen by 5-fold cross-validation on banking77 *train*
# (C=1 underfits 77 close intents; above 10 nothing improves and fitting gets slower).
DEFAULT_C = 10.0
# The n-gram model joins in only with this many questions per intent on average: with a
# handful (the shipped bank FAQ has ~5) it learns words, not intents ("payments on my card
# I never made" went to payment_due instead of fraud); banking77 has ~130.
MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS = 20
# The same holds for the out-of-domain class: a seed needs this many questions an intent
# for its intents to hold their own against the negatives.
MIN_QUESTIONS_PER_INTENT_FOR_NEGATIVES = 20
# The embedding model's share of the combined log-probability (the n-gram model has the
# rest). Cross-validated on banking77 train: 0.6 -> 71.0%, 0.7 -> 72.4% of held-out
# questions answered at a 1% target; sharper (tempered) mixtures did worse with the judge.
EMBEDDING_WEIGHT = 0.7
# The negatives' class weighs at most this many average intents (banking77: 1,300
# negatives against ~130 questions an intent, at full weight); against a smaller seed each
# negative counts for less, so the class cannot swallow the seed's own paraphrases.
NEGATIVES_WEIGHT_IN_INTENTS = 10
# The label of the negatives' class: a control character keeps it from ever equalling a
# seed's intent (seed intents are printable).
OUT_OF_DOMAIN = "\x1fout-of-domain"


def fitted_probabilities(model: LogisticRegression, features: Any) -> np.ndarray:
    """``model.predict_proba(features)`` without scikit-learn's per-call input checks,
    which cost more than the arithmetic on a single routed text (~0.1 ms a call)."""
    return probabilities_of_logits(features @ model.coef_.T + model.intercept_)


def probabilities_of_logits(scores: Any) -> np.ndarray:
    """A fitted logistic regression's probabilities from its decision scores (n, 1 or k)."""
    scores = np.array(scores, dtype=np.float64)
    if scores.shape[1] == 1:  # two classes: one logit
        positive = 1.0 / (1.0 + np.exp(-scores[:, 0]))
        return np.column_stack([1.0 - positive, positive])
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    return scores


def combined_probabilities(embedding: np.ndarray, ngrams: np.ndarray,
                           weight: float = EMBEDDING_WEIGHT) -> np.ndarray:
    """The two models' probabilities as a weighted geometric mean, renormalised per row."""
    tiny = np.finfo(np.float64).tiny  # a probability that underflowed to 0 stays finite
    log = weight * np.log(np.maximum(embedding, tiny)) + (1.0 - weight) * np.log(
        np.maximum(ngrams, tiny))
    return probabilities_of_logits(log)


def averaged_probabilities(embedding: np.ndarray, ngrams: np.ndarray) -> np.ndarray:
    """The mix before 2026-11-25 (an arithmetic mean): caches calibrated on it keep it."""
    return (embedding + ngrams) / 2.0


def _char_ngrams() -> TfidfVectorizer:
    # char_wb: n-grams never span two words, so word order noise in ASR stays local.
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                           min_df=2, lowercase=True, dtype=np.float32)


@dataclass(frozen=True)
class IntentScores:
    intent: str  # most probable intent (before the out-of-scope decision)
    probability: float
    margin: float  # top-1 minus top-2 probability (1.0 with a single intent)
    runner_up: str | None


class IntentClassifier:
    # The embedding model's weight in the geometric mix of the two models; None: their
    # arithmetic mean (a cache calibrated before 2026-11-25, or a benchmark's ablation).
    mix_weight: float | None = EMBEDDING_WEIGHT

    def __init__(self, c: float = DEFAULT_C, max_iter: int = 3000, seed: int = 0) -> None:
        self._model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        self._text_model: LogisticRegression | None = None
        # The n-gram model's fitted TfidfVectorizer, its transform cached per word.
        self._features: CharNgramFeatures | None = None
        self._c, self._max_iter, self._seed = c, max_iter, seed
        self.classes: list[str] = []
        self._single: str | None = None  # LogisticRegression refuses one class

    @property
    def intents(self) -> list[str]:
        """The seed intents it names (``classes`` without ``OUT_OF_DOMAIN``)."""
        return [c for c in self.classes if c != OUT_OF_DOMAIN]

    @property
    def reads_text(self) -> bool:
        """Whether scoring needs the texts beside their vectors (the n-gram model)."""
        return self._text_model is not None

    def fit(self, vectors: np.ndarray, intents: Sequence[str],
            texts: Sequence[str] | None = None, *,
            negative_vectors: np.ndarray | None = None,
            negative_texts: Sequence[str] = (),
            seed_questions_per_intent: float | None = None) -> "IntentClassifier":
        """Fit on the seed's vectors, and on its ``texts``' character n-grams when given.

        Out-of-domain negatives (their vectors, and their texts when ``texts`` are given)
        become the ``OUT_OF_DOMAIN`` class when the seed has enough questions per intent
        to hold its own against them; a small seed ignores them.

        ``seed_questions_per_intent``: the whole seed's, when this fit is one
        calibration fold of it (which holds fewer): the n-gram and negatives gates then
        decide as they will for the seed, so the fold calibrates the model that serves."""
        labels = np.asarray(intents, dtype=object)
        distinct = sorted(set(labels.tolist()))
        if not distinct:
            raise ValueError("cannot train an intent classifier without examples")
        if OUT_OF_DOMAIN in distinct:
            raise ValueError("the out-of-domain label is not a seed intent")
        if texts is not None and len(texts) != len(labels):
            raise ValueError("need one text per vector")
        self.classes = distinct
        self._text_model = self._features = None
        if len(distinct) == 1:
            self._single = distinct[0]
            return self
        self._single = None
        per_intent = (len(labels) / len(distinct) if seed_questions_per_intent is None
                      else seed_questions_per_intent)
        weights = np.ones(len(labels))
        if (per_intent >= MIN_QUESTIONS_PER_INTENT_FOR_NEGATIVES
                and negative_vectors is not None and len(negative_vectors)):
            if texts is not None and len(negative_texts) != len(negative_vectors):
                raise ValueError("need one text per negative vector")
            share = NEGATIVES_WEIGHT_IN_INTENTS * len(labels) / len(distinct)
            weights = np.r_[weights, np.full(len(negative_vectors),
                                             min(1.0, share / len(negative_vectors)))]
            vectors = np.concatenate([vectors, negative_vectors])
            labels = np.concatenate([labels, np.full(len(negative_vectors), OUT_OF_DOMAIN,
                                                     dtype=object)])
            if texts is not None:
                texts = [*texts, *negative_texts]
        labels = labels.astype(str)
        self._model.fit(vectors, labels, sample_weight=weights)
        self.classes = [str(c) for c in self._model.classes_]
        if texts is not None and per_intent >= MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS:
            ngrams = _char_ngrams()
            try:
                grams = ngrams.fit_transform([str(t) for t in texts])
            except ValueError:  # no n-gram occurs twice (a tiny seed): embeddings alone
                return self
            self._features = CharNgramFeatures(ngrams)
            self._text_model = LogisticRegression(
                C=self._c, max_iter=self._max_iter, random_state=self._seed,
            ).fit(grams, labels, sample_weight=weights)
        return self

    def probabilities(self, vectors: np.ndarray,
                      texts: Sequence[str] | None = None) -> np.ndarray:
        """(n, classes) probabilities, columns in ``classes`` order."""
        matrix = np.atleast_2d(vectors)
        if self._single is not None:
            return np.ones((matrix.shape[0], 1))
        proba = fitted_probabilities(self._model, matrix)
        if self._text_model is not None and self._features is not None:
            if texts is None or len(texts) != matrix.shape[0]:
                raise ValueError("this classifier also reads the texts: pass one per vector")
            logits = (self._features.project(texts, self._text_model.coef_)
                      + self._text_model.intercept_)
            ngrams = probabilities_of_logits(logits)
            proba = (averaged_probabilities(proba, ngrams) if self.mix_weight is None
                     else combined_probabilities(proba, ngrams, self.mix_weight))
        return proba

    def scores(self, vectors: np.ndarray, texts: Sequence[str] | None = None
               ) -> list[IntentScores]:
        """Top intent, its probability and the top-2 margin for each row of ``vectors``."""
        top, prob, margin, second = self.scores_arrays(vectors, texts)
        return [IntentScores(str(t), float(p), float(m), None if s is None else str(s))
                for t, p, m, s in zip(top, prob, margin, second)]

    def scores_arrays(self, vectors: np.ndarray, texts: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
        """Vectorised ``scores`` (for calibration and benchmarks)."""
        proba = self.probabilities(vectors, texts)
        n = proba.shape[0]
        if self._single is not None:
            return (np.full(n, self._single, dtype=object), np.ones(n), np.ones(n), [None] * n)
        order = np.argsort(-proba, axis=1)[:, :2]
        rows = np.arange(n)
        p1 = proba[rows, order[:, 0]]
        p2 = proba[rows, order[:, 1]]
        classes = np.asarray(self.classes, dtype=object)
        return classes[order[:, 0]], p1, p1 - p2, list(classes[order[:, 1]])

    @staticmethod
    def decide(nearest_similarity: float, min_similarity: float) -> bool:
        """In scope when the query is at least as close to a seed question as
        (nearly) every held-out seed question was during calibration."""
        return nearest_similarity >= min_similarity

    # -- persistence (joblib, in the router's models blob: intents.router.models_to_bytes)
    def state(self) -> dict[str, Any]:
        """What persists (joblib-able; see ``from_state``)."""
        return {"sklearn": sklearn.__version__, "classes": self.classes, "single": self._single,
                "model": self._model, "text_model": self._text_model,
                "mix_weight": self.mix_weight,
                "ngrams": None if self._features is None else self._features.vectorizer}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IntentClassifier":
        if state.get("sklearn") != sklearn.__version__:
            # Pickled estimators are only guaranteed to load in the same version.
            raise ValueError(f"classifier was saved by scikit-learn {state.get('sklearn')}, "
                             f"this is {sklearn.__version__}")
        clf = cls()
        clf._model = state["model"]
        clf.classes = list(state["classes"])
        clf._single = state["single"]
        clf._text_model = state.get("text_model")
        # A cache saved before the geometric mix records none: it was calibrated on averaged
        # probabilities, and its judge and thresholds only hold if it keeps routing that way.
        clf.mix_weight = state.get("mix_weight")
        ngrams = state.get("ngrams")
        clf._features = None if ngrams is None else CharNgramFeatures(ngrams)
        return clf
