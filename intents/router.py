"""The router: text → RouteDecision, on every partial and final transcript.

A hit (replay the cached answer) needs three things:
  1. the text is in scope: at least as close to a seed question as nearly every
     held-out seed question was (``Thresholds.min_similarity``);
  2. the classifier's intent has action ``answer`` and a cached answer;
  3. the judge (``intents.judge``) is confident enough that this intent is right: its
     threshold was calibrated on the seed so the wrong-answer rate stays under the
     target (``intents.calibration``). A spoken transcript needs a stricter threshold:
     ``RouteDecision.spoken_hit``, applied by the call with ``as_spoken()``.
Anything else is a miss: ``llm`` for out-of-scope and agent intents, and for texts
the classifier's out-of-domain class wins (a large seed learns its negatives as one:
``intents.classifier.OUT_OF_DOMAIN``), ``handoff`` for handoff intents.

A hit also says whether its words read as a finished question (``intents.completeness``,
learned from the seed): the end of turn lets a cached question end on a short silence
only then.

``route`` is synchronous and CPU-bound (one embedding, ~5-15 ms on a cold text):
call it from an executor, never on the event loop.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import joblib
import numpy as np

from intents.calibration import (NEVER, HeldOut, MisheardCopies, Thresholds, calibrate,
                                 cross_validate, fitted_rows)
from intents.classifier import OUT_OF_DOMAIN, IntentClassifier
from intents.completeness import Completeness, train_completeness
from intents.embedder import Embedder, normalize_text
from intents.judge import Judge, read_signals
from intents.misheard import MIN_QUESTIONS_PER_INTENT_FOR_MISHEARD, misheard_copies
from intents.negatives import embed_negatives, negatives_for_seed
from intents.semantic_cache import SemanticCache
from intents.types import DEFAULT_TARGET_WRONG_RATE, Action, Entry, RouteDecision, miss

# A text that is a seed question word for word (case and spaces aside), and this close to it,
# is that question: the operator's own label answers it, whatever the judge's margin. Its
# words, not its vector alone: accents, [UNK] symbols and what the embedder truncates leave
# different texts one vector, and two intents may hold such questions.
VERBATIM_SIMILARITY = 0.9999


class Router:
    def __init__(self, embedder: Embedder, classifier: IntentClassifier, judge: Judge,
                 cache: SemanticCache, entries: Mapping[str, Entry],
                 thresholds: Thresholds, completeness: Completeness | None = None) -> None:
        # Keyed by intent (the classifier's labels); callers may key theirs by entry id.
        by_intent = {e.intent: e for e in entries.values()}
        unknown = set(classifier.intents) - set(by_intent)
        if unknown:
            raise ValueError(f"classifier intents without an entry: {sorted(unknown)}")
        # Each seed question (normalized) -> the intents that hold it, for VERBATIM_SIMILARITY.
        self._asked: dict[str, set[str]] = {}
        for entry in by_intent.values():
            for question in entry.questions:
                self._asked.setdefault(normalize_text(question), set()).add(entry.intent)
        self.embedder = embedder
        self.classifier = classifier
        self.judge = judge
        self.cache = cache
        self.entries = by_intent
        self.thresholds = thresholds
        self.completeness = completeness  # None: every text reads as finished

    def route(self, text: str) -> RouteDecision:
        start = time.perf_counter()
        if not normalize_text(text):
            return miss(text, "empty text")
        return self.route_vector(text, self.embedder.encode(text), start)

    def route_vector(self, text: str, vector: np.ndarray,
                     start: float | None = None) -> RouteDecision:
        """Route an already embedded text (benchmarks embed in batches)."""
        return self._route_rows([text], vector.reshape(1, -1),
                                 time.perf_counter() if start is None else start)[0]

    def route_vectors(self, texts: Sequence[str], vectors: np.ndarray) -> list[RouteDecision]:
        """Route already embedded texts (benchmarks embed whole data sets in batches)."""
        return self._route_rows(list(texts), vectors, time.perf_counter())

    def route_many(self, texts: Sequence[str]) -> list[RouteDecision]:
        """Route many texts at once: one embedding batch, one classifier and index pass."""
        start = time.perf_counter()
        decisions: list[RouteDecision | None] = [
            None if normalize_text(t) else miss(t, "empty text") for t in texts]
        todo = [i for i, d in enumerate(decisions) if d is None]
        if todo:
            vectors = self.embedder.encode_many([texts[i] for i in todo])
            for i, decision in zip(todo, self._route_rows([texts[i] for i in todo], vectors,
                                                           start)):
                decisions[i] = decision
        return decisions  # type: ignore[return-value]

    def _route_rows(self, texts: Sequence[str], vectors: np.ndarray,
                    start: float) -> list[RouteDecision]:
        signals = read_signals(self.classifier, self.cache, vectors, texts)
        confidence = self.judge.confidence(signals.matrix)
        t = self.thresholds
        out: list[RouteDecision] = []
        for i, text in enumerate(texts):
            similarity = float(signals.nearest_similarity[i])
            probability, margin = float(signals.probability[i]), float(signals.margin[i])
            sure = float(confidence[i])
            if not IntentClassifier.decide(similarity, t.min_similarity):
                out.append(RouteDecision(
                    text=text, intent=None, action=Action.LLM, hit=False, score=similarity,
                    confidence=probability, margin=margin, certainty=sure,
                    reason="out of scope", ms=_ms(start)))
                continue
            own = self._own_intent(text) if similarity >= VERBATIM_SIMILARITY else None
            if signals.predicted[i] == OUT_OF_DOMAIN and own is None:
                # the negatives' class won
                out.append(RouteDecision(
                    text=text, intent=None, action=Action.LLM, hit=False, score=similarity,
                    confidence=probability, margin=margin, certainty=sure,
                    reason="out of domain", ms=_ms(start)))
                continue
            # A seed question, word for word, is its own label's, whichever class won it
            # (the negatives' or another intent's): the operator labelled these very words.
            predicted = str(signals.predicted[i]) if own is None else own
            entry = self.entries[predicted]
            answerable = entry.action is Action.ANSWER and entry.answer is not None
            verbatim = own == predicted
            # A seed calibrated to serve nothing (NEVER) serves nothing, its own questions
            # word for word included: its report says every question goes to the agent.
            hit = answerable and t.hit_confidence < NEVER and (verbatim
                                                               or sure >= t.hit_confidence)
            spoken_hit = hit and (verbatim or sure >= t.spoken_confidence)
            # Only a hit's words are judged (~50 µs): the end of turn reads them on hits.
            finished = not hit or self.completeness is None or self.completeness.finished(text)
            out.append(RouteDecision(
                text=text, intent=entry.intent, action=entry.action, hit=hit,
                entry_id=entry.id, answer=entry.answer if hit else None, score=similarity,
                confidence=probability, margin=margin, certainty=sure, finished=finished,
                reason=_reason(hit, entry), ms=_ms(start), spoken_hit=spoken_hit))
        return out

    def _own_intent(self, text: str) -> str | None:
        """The one intent whose seed questions include ``text`` word for word, else None."""
        holders = self._asked.get(normalize_text(text))
        return next(iter(holders)) if holders is not None and len(holders) == 1 else None

    def models_bytes(self) -> bytes:
        """The trained models as one blob (``CacheBundle.classifier``)."""
        return models_to_bytes(self.classifier, self.judge, self.completeness)


def models_to_bytes(classifier: IntentClassifier, judge: Judge,
                    completeness: Completeness | None = None) -> bytes:
    buffer = io.BytesIO()
    joblib.dump({"classifier": classifier.state(), "judge": judge,
                 "completeness": completeness.state() if completeness else None}, buffer)
    return buffer.getvalue()


def models_from_bytes(data: bytes) -> tuple[IntentClassifier, Judge, Completeness | None]:
    """Raises ValueError when the blob was written by another scikit-learn. The
    completeness model is None in a blob from before it existed (train it again:
    ``completeness_for_seed``)."""
    state = joblib.load(io.BytesIO(data))
    classifier = IntentClassifier.from_state(state["classifier"])
    judge = state["judge"]
    if not isinstance(judge, Judge):
        raise ValueError("not a voicegate judge")
    completeness = state.get("completeness")
    try:
        return classifier, judge, (Completeness.from_state(completeness)
                                   if completeness is not None else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a voicegate completeness model: {exc}") from exc


def completeness_for_seed(questions: Sequence[str], negatives: Sequence[str] = ()
                          ) -> Completeness:
    """The seed's lexical end-of-turn model: its questions (and the out-of-domain
    negatives, finished questions too) against their word prefixes."""
    return train_completeness(questions, negatives_for_seed(negatives, questions))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _reason(hit: bool, entry: Entry) -> str:
    if hit:
        return "cache hit"
    if entry.action is not Action.ANSWER:
        return f"{entry.action.value} intent"
    if entry.answer is None:
        return "no cached answer"
    return "not sure enough of the intent"


@dataclass(frozen=True)
class TrainedRouter:
    router: Router
    vectors: np.ndarray  # one per seed question, in ``questions`` order
    questions: tuple[str, ...]
    intents: tuple[str, ...]
    held_out: HeldOut


T = TypeVar("T")


def _beside(fit: Callable[[], T]) -> "Future[T]":
    """``fit`` on a daemon thread: a calibration that stops (Ctrl-C, a fold's worker
    dying) reaches its caller at once, and the process exits without waiting for a fit
    nobody will use (a pool's thread would be joined at the exit)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fit())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, name="vg-fit", daemon=True).start()
    return future


def train_router(embedder: Embedder, questions: Sequence[str], intents: Sequence[str],
                 entries: Mapping[str, Entry], *,
                 target_wrong_rate: float = DEFAULT_TARGET_WRONG_RATE,
                 vectors: np.ndarray | None = None, folds: int = 5,
                 negatives: Sequence[str] = (), jobs: int = 1) -> TrainedRouter:
    """Embed the seed's questions, calibrate by cross-validation, fit on all of them.

    ``negatives``: the operator's own out-of-domain questions, beside the generic set.
    ``jobs``: classifiers fitted at once (the calibration's folds in worker processes, the
    served one beside them); 1 keeps every fit in this thread, one after the other.
    """
    if len(questions) != len(intents):
        raise ValueError("need one intent per question")
    if vectors is None:
        vectors = embedder.encode_batch(list(questions))
    answer_intents = {e.intent for e in entries.values()
                      if e.action is Action.ANSWER and e.answer is not None}
    negative_texts = negatives_for_seed(negatives, questions)
    negative_vectors = embed_negatives(embedder, negative_texts)
    per_intent = len(questions) / len(set(intents))
    misheard = None
    if per_intent >= MIN_QUESTIONS_PER_INTENT_FOR_MISHEARD:
        misheard = MisheardCopies(embedder.encode_batch, misheard_copies,
                                  known=dict(zip(questions, vectors)))
    labels = np.asarray(list(intents), dtype=object)
    # The whole seed's copies first: a fold's are mostly among them, embedded once.
    every_row = fitted_rows(vectors, labels, questions, np.arange(len(labels)), misheard)

    def fit_served() -> IntentClassifier:
        return IntentClassifier().fit(*every_row, negative_vectors=negative_vectors,
                                      negative_texts=negative_texts,
                                      seed_questions_per_intent=per_intent)

    served = _beside(fit_served) if jobs > 1 else None
    held_out = cross_validate(vectors, questions, intents, negative_vectors,
                              negative_texts, folds=folds, misheard=misheard, jobs=jobs)
    thresholds, judge = calibrate(held_out, answer_intents, target_wrong_rate)
    classifier = served.result() if served is not None else fit_served()
    router = Router(embedder, classifier, judge, SemanticCache(vectors, intents), entries,
                    thresholds, train_completeness(questions, negative_texts))
    return TrainedRouter(router, vectors, tuple(questions), tuple(intents), held_out)
