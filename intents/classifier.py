"""Intent classifier: multinomial logistic regression on sentence embeddings.

Trained at seed time on the seed's questions (and any extra labelled utterances).
Logistic regression gives calibrated-enough probabilities whose top-2 margin is the
best single confidence signal we measured on banking77 (better than the top
probability, a kNN vote or an MLP); the router combines it with the nearest
neighbours and thresholds calibrated on the seed.

Beside the embeddings, two more logistic regressions read the text itself (its *text
views*, TF-IDF features from ``intents.ngrams``, < 0.1 ms a query together): its character
n-grams (2-5 characters within words) catch what a sentence embedding blurs (a misheard
word's spelling, "PIN" vs "pin code"), its words and word pairs (1-2 grams) what the
words say in which order. The views are combined as a weighted geometric mean (their
log-probabilities weighted by ``MIX``, then renormalised): an intent the views agree on
beats one that only one view is sure of, which an arithmetic mean does not see. All
chosen by 5-fold cross-validation on banking77 *train* only (``bench/router_quality.py``
reports dev). The character view first: top-1 accuracy 92.0% (embeddings alone) -> 92.8%;
the share of held-out seed questions the calibrated router answers at a 1% target, 69.2%
with the arithmetic mean, 71.2% with equal weights, 72.4% at 0.7 to the embeddings. Then
the word view (``bench/router_probes.py --spoken``, fold seeds 0 and 1), at 0.5/0.25/0.25
against the two views at 0.7/0.3: held-out questions served at a 0.5% target 64.2 -> 66.5%
and 58.5 -> 63.6%, their phone transcripts 39.9 -> 41.7% and 36.3 -> 40.1%, at 1% 75.5 ->
77.1% and 77.3 -> 77.5% (the probe fitted its word regression with lbfgs: 65.8% and 65.2%
at 0.5%; the curves' shares at 99.3% and 99.5% precision were within 0.6 points of these,
and on seed 1 the 0.5% threshold landed one wrong answer apart, 22 against 23).

Out of domain: a linear classifier trained on the seed alone always names *some* intent,
however far the query is from everything it was trained on. Two defences: the
out-of-scope decision on similarity to the nearest seed question (see
``IntentClassifier.decide``), and, for seeds large enough to learn it, one more class,
``OUT_OF_DOMAIN``, learned from the out-of-domain negatives (``intents.negatives``) by
every view: probability an unrelated question gives to the bank's intents moves to it,
and a question it wins is never served. Measured by 5-fold cross-validation on banking77
*train*: the calibrated router answers 75.6% of held-out questions at a 1% target where
it answered 73.0% without the class (the out-of-domain limit held that threshold back);
held-out negatives answered 0.46% -> 0.39%.

Versions published before the word view (two views, their state's ``model``,
``text_model``, ``ngrams`` and ``mix_weight``) load and route as they were calibrated:
``IntentClassifier.from_state`` reads that layout too. A voicegate from before the word
view cannot read the layout written since (``views``): it refuses such a version and keeps
serving the one it has (a KeyError, 'model', in its load error).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from intents.ngrams import CharNgramFeatures, NgramFeatures, WordNgramFeatures

# Inverse regularisation strength: chosen by 5-fold cross-validation on banking77 *train*
# (C=1 underfits 77 close intents; above 10 nothing improves and fitting gets slower).
DEFAULT_C = 10.0
# The text views join in only with this many questions per intent on average: with a
# handful (the shipped bank FAQ has ~5) they learn words, not intents ("payments on my card
# I never made" went to payment_due instead of fraud); banking77 has ~130.
MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS = 20
# The same holds for the out-of-domain class: a seed needs this many questions an intent
# for its intents to hold their own against the negatives.
MIN_QUESTIONS_PER_INTENT_FOR_NEGATIVES = 20
# The views a seed's classifier reads and each one's share of the combined log-probability
# (see the module's docstring: cross-validated on banking77 train; sharper, tempered
# mixtures did worse with the judge). "embeddings" always; the text views with enough
# questions per intent.
MIX: Mapping[str, float] = MappingProxyType(
    {"embeddings": 0.5, "characters": 0.25, "words": 0.25})
# The mix from 2026-11-25 until the word view: the versions published then record it (0.7,
# their ``mix_weight``) and route with it; benchmarks compare with it.
TWO_VIEWS: Mapping[str, float] = MappingProxyType({"embeddings": 0.7, "characters": 1.0 - 0.7})
# The negatives' class weighs at most this many average intents (banking77: 1,267
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


def mixed_probabilities(parts: Sequence[np.ndarray], weights: Sequence[float] | None
                        ) -> np.ndarray:
    """The views' probabilities (same columns) as a weighted geometric mean, renormalised
    per row; with ``weights`` None their arithmetic mean (the mix before 2026-11-25: caches
    calibrated on it keep it)."""
    if weights is None:
        return sum(parts) / len(parts)  # type: ignore[return-value]
    tiny = np.finfo(np.float64).tiny  # a probability that underflowed to 0 stays finite
    return probabilities_of_logits(sum(w * np.log(np.maximum(p, tiny))
                                       for p, w in zip(parts, weights)))


def _char_ngrams() -> TfidfVectorizer:
    # char_wb: n-grams never span two words, so word order noise in ASR stays local.
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                           min_df=2, lowercase=True, dtype=np.float32)


def _word_ngrams() -> TfidfVectorizer:
    # Words (two or more letters or digits) and neighbouring pairs, every one the seed has (as
    # measured: bench/router_probes.py).
    return TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True,
                           lowercase=True)


@dataclass(frozen=True)
class TextView:
    """How a text view reads a text and how its logistic regression is fitted."""

    vectorizer: Callable[[], TfidfVectorizer]
    features: type[NgramFeatures]  # the fast ``transform`` of a fitted vectorizer
    solver: str  # LogisticRegression's


TEXT_VIEWS: Mapping[str, TextView] = MappingProxyType({
    "characters": TextView(_char_ngrams, CharNgramFeatures, "lbfgs"),
    # sag, not lbfgs: on banking77's 28k word features lbfgs spends ~50 s a fit in its own
    # update (it grows with the coefficients, 78 classes x 28k: seeding 6 fits) and stops
    # short at the default tolerance; sag reaches a lower loss in ~3 s. Cross-validated the
    # same within a wrong answer at the 0.5% threshold (see the module's docstring).
    "words": TextView(_word_ngrams, WordNgramFeatures, "sag"),
})


@dataclass(frozen=True)
class IntentScores:
    intent: str  # most probable intent (before the out-of-scope decision)
    probability: float
    margin: float  # top-1 minus top-2 probability (1.0 with a single intent)
    runner_up: str | None


class IntentClassifier:
    # The views fitted and how their probabilities are combined: view -> share of a weighted
    # geometric mean (``MIX``), or None: the arithmetic mean of the embeddings and characters
    # (a cache calibrated before 2026-11-25, or a benchmark's ablation). A fit keeps the mix
    # it was fitted with, and a loaded classifier the one it was saved with.
    mix: Mapping[str, float] | None = MIX

    def __init__(self, c: float = DEFAULT_C, max_iter: int = 3000, seed: int = 0) -> None:
        self._model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        # Text view name -> its features (the fitted TfidfVectorizer) and model, in the
        # mix's order.
        self._text_views: dict[str, tuple[NgramFeatures, LogisticRegression]] = {}
        self._c, self._max_iter, self._seed = c, max_iter, seed
        self.classes: list[str] = []
        self._single: str | None = None  # LogisticRegression refuses one class

    @property
    def intents(self) -> list[str]:
        """The seed intents it names (``classes`` without ``OUT_OF_DOMAIN``)."""
        return [c for c in self.classes if c != OUT_OF_DOMAIN]

    @property
    def reads_text(self) -> bool:
        """Whether scoring needs the texts beside their vectors (the text views)."""
        return bool(self._text_views)

    @property
    def views(self) -> tuple[str, ...]:
        """The views it reads: "embeddings", then its text views."""
        return ("embeddings", *self._text_views)

    def fit(self, vectors: np.ndarray, intents: Sequence[str],
            texts: Sequence[str] | None = None, *,
            negative_vectors: np.ndarray | None = None,
            negative_texts: Sequence[str] = (),
            seed_questions_per_intent: float | None = None) -> "IntentClassifier":
        """Fit on the seed's vectors, and its text views on ``texts`` when given.

        Out-of-domain negatives (their vectors, and their texts when ``texts`` are given)
        become the ``OUT_OF_DOMAIN`` class when the seed has enough questions per intent
        to hold its own against them; a small seed ignores them.

        ``seed_questions_per_intent``: the whole seed's, when this fit is one
        calibration fold of it (which holds fewer): the text views' and negatives' gates
        then decide as they will for the seed, so the fold calibrates the model that serves."""
        labels = np.asarray(intents, dtype=object)
        distinct = sorted(set(labels.tolist()))
        if not distinct:
            raise ValueError("cannot train an intent classifier without examples")
        if OUT_OF_DOMAIN in distinct:
            raise ValueError("the out-of-domain label is not a seed intent")
        if texts is not None and len(texts) != len(labels):
            raise ValueError("need one text per vector")
        self.mix = _checked_mix(self.mix)
        self.classes = distinct
        self._text_views = {}
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
            self._text_views = self._fit_text_views([str(t) for t in texts], labels, weights)
        return self

    def _fit_text_views(self, texts: list[str], labels: np.ndarray, weights: np.ndarray
                        ) -> dict[str, tuple[NgramFeatures, LogisticRegression]]:
        """Every text view of the mix, or none (embeddings alone) when one cannot be fitted."""
        fitted: dict[str, tuple[NgramFeatures, LogisticRegression]] = {}
        for name in _text_views_of(self.mix):
            view = TEXT_VIEWS[name]
            vectorizer = view.vectorizer()
            try:
                grams = vectorizer.fit_transform(texts)
            except ValueError:  # no n-gram occurs twice, no word (a tiny seed)
                return {}
            model = LogisticRegression(C=self._c, max_iter=self._max_iter,
                                       random_state=self._seed, solver=view.solver)
            fitted[name] = (view.features(vectorizer),
                            model.fit(grams, labels, sample_weight=weights))
        return fitted

    def view_probabilities(self, vectors: np.ndarray, texts: Sequence[str] | None = None
                           ) -> dict[str, np.ndarray]:
        """Each view's own (n, classes) probabilities, columns in ``classes`` order."""
        matrix = np.atleast_2d(vectors)
        if self._single is not None:
            return {"embeddings": np.ones((matrix.shape[0], 1))}
        parts = {"embeddings": fitted_probabilities(self._model, matrix)}
        if self._text_views:
            if texts is None or len(texts) != matrix.shape[0]:
                raise ValueError("this classifier also reads the texts: pass one per vector")
            for name, (features, model) in self._text_views.items():
                parts[name] = probabilities_of_logits(
                    features.project(texts, model.coef_) + model.intercept_)
        return parts

    def probabilities(self, vectors: np.ndarray,
                      texts: Sequence[str] | None = None) -> np.ndarray:
        """(n, classes) probabilities, columns in ``classes`` order: the views' mix."""
        return self.mixed(self.view_probabilities(vectors, texts))

    def mixed(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        """``view_probabilities`` combined as this classifier combines them."""
        if len(parts) == 1:
            return parts["embeddings"]
        weights = None if self.mix is None else [self.mix[name] for name in parts]
        return mixed_probabilities(list(parts.values()), weights)

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
                "embeddings": self._model,
                "views": {name: (features.vectorizer, model)
                          for name, (features, model) in self._text_views.items()},
                "mix": None if self.mix is None else dict(self.mix)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IntentClassifier":
        """A saved classifier, as it was calibrated: this layout, or the two views' of a
        version published before the word view. Raises ValueError for another
        scikit-learn, or a view this voicegate does not know (the loader then trains the
        version's models again)."""
        if state.get("sklearn") != sklearn.__version__:
            # Pickled estimators are only guaranteed to load in the same version.
            raise ValueError(f"classifier was saved by scikit-learn {state.get('sklearn')}, "
                             f"this is {sklearn.__version__}")
        clf = cls()
        clf.classes = list(state["classes"])
        clf._single = state["single"]
        if "model" in state:  # before the word view
            clf._model = state["model"]
            views = ({} if state.get("ngrams") is None or state.get("text_model") is None
                     else {"characters": (state["ngrams"], state["text_model"])})
            # A cache saved before the geometric mix records none: it was calibrated on
            # averaged probabilities, and its judge and thresholds only hold if it keeps
            # routing that way.
            weight = state.get("mix_weight")
            clf.mix = (None if weight is None
                       else {"embeddings": weight, "characters": 1.0 - weight})
        else:
            clf._model = state["embeddings"]
            views = state["views"]
            clf.mix = state["mix"]
        unknown = sorted(set(views) - set(TEXT_VIEWS))
        if unknown:
            raise ValueError(f"classifier reads views this voicegate does not know: {unknown}")
        clf._text_views = {name: (TEXT_VIEWS[name].features(vectorizer), model)
                           for name, (vectorizer, model) in views.items()}
        if clf.mix is not None and not set(clf.views) <= set(clf.mix):
            raise ValueError(f"classifier's mix {clf.mix} leaves out some of its views "
                             f"{list(clf.views)}")
        return clf


def _checked_mix(mix: Mapping[str, float] | None) -> dict[str, float] | None:
    """A copy of a mix to fit with, once its views are known ones."""
    if mix is None:
        return None
    if "embeddings" not in mix or not set(mix) - {"embeddings"} <= set(TEXT_VIEWS):
        raise ValueError(f"a mix names the embeddings and text views of {list(TEXT_VIEWS)}: "
                         f"{dict(mix)}")
    return dict(mix)


def _text_views_of(mix: Mapping[str, float] | None) -> list[str]:
    """The text views a mix fits, in ``TEXT_VIEWS`` order (the arithmetic mean's: characters)."""
    names = ("characters",) if mix is None else tuple(mix)
    return [name for name in TEXT_VIEWS if name in names]
