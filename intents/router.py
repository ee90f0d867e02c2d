"""The router: text → RouteDecision, on every partial and final transcript.

A hit (replay the cached answer) needs three things to agree:
  1. the classifier's intent is in scope and its action is ``answer``;
  2. the nearest seed question belongs to that same intent;
  3. the nearest similarity and the classifier's top-2 margin clear the thresholds
     calibrated on the seed (see ``intents.calibration``).
Anything else is a miss: ``llm`` for out-of-scope and agent intents, ``handoff``
for handoff intents.

``route`` is synchronous and CPU-bound (one embedding, ~5-15 ms on a cold text):
call it from an executor, never on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from intents.calibration import HeldOut, Thresholds, calibrate, cross_validate, hit_rule
from intents.classifier import IntentClassifier
from intents.embedder import Embedder, normalize_text
from intents.semantic_cache import SemanticCache
from intents.types import Action, Entry, RouteDecision, miss


class Router:
    def __init__(self, embedder: Embedder, classifier: IntentClassifier, cache: SemanticCache,
                 entries: Mapping[str, Entry], thresholds: Thresholds) -> None:
        unknown = set(classifier.classes) - set(entries)
        if unknown:
            raise ValueError(f"classifier intents without an entry: {sorted(unknown)}")
        self.embedder = embedder
        self.classifier = classifier
        self.cache = cache
        self.entries = dict(entries)
        self.thresholds = thresholds

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
        all_scores = self.classifier.scores(vectors)
        sims, rows = self.cache.search_arrays(vectors, k=1)
        t = self.thresholds
        out: list[RouteDecision] = []
        for text, scores, sim, row in zip(texts, all_scores, sims[:, 0], rows[:, 0]):
            similarity = float(sim)
            nearest_intent = str(self.cache.intents[row])
            if not IntentClassifier.decide(similarity, t.min_similarity):
                out.append(RouteDecision(
                    text=text, intent=None, action=Action.LLM, hit=False, score=similarity,
                    confidence=scores.probability, margin=scores.margin,
                    reason="out of scope", ms=_ms(start)))
                continue
            entry = self.entries[scores.intent]
            agree = nearest_intent == scores.intent
            hit = bool(hit_rule(True, entry.action is Action.ANSWER and entry.answer is not None,
                                agree, similarity, scores.margin, t))
            out.append(RouteDecision(
                text=text, intent=scores.intent, action=entry.action, hit=hit,
                entry_id=entry.id, answer=entry.answer if hit else None, score=similarity,
                confidence=scores.probability, margin=scores.margin,
                reason=_reason(hit, entry.action, agree, similarity, scores.margin, t),
                ms=_ms(start)))
        return out


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _reason(hit: bool, action: Action, agree: bool, similarity: float, margin: float,
            t: Thresholds) -> str:
    if hit:
        return "cache hit"
    if action is not Action.ANSWER:
        return f"{action.value} intent"
    if not agree:
        return "classifier and nearest question disagree"
    if similarity < t.hit_similarity:
        return "not similar enough to a seed question"
    if margin < t.hit_margin:
        return "classifier not confident enough"
    return "no cached answer"


@dataclass(frozen=True)
class TrainedRouter:
    router: Router
    vectors: np.ndarray  # one per seed question, in ``questions`` order
    questions: tuple[str, ...]
    intents: tuple[str, ...]
    held_out: HeldOut


def train_router(embedder: Embedder, questions: Sequence[str], intents: Sequence[str],
                 entries: Mapping[str, Entry], *, target_wrong_rate: float = 0.01,
                 vectors: np.ndarray | None = None, folds: int = 5,
                 progress: bool = False) -> TrainedRouter:
    """Embed the seed's questions, calibrate by cross-validation, fit on all of them."""
    if len(questions) != len(intents):
        raise ValueError("need one intent per question")
    if vectors is None:
        vectors = embedder.encode_batch(list(questions), progress=progress)
    answer_intents = {e.intent for e in entries.values()
                      if e.action is Action.ANSWER and e.answer is not None}
    held_out = cross_validate(vectors, intents, folds=folds)
    thresholds = calibrate(held_out, answer_intents, target_wrong_rate)
    classifier = IntentClassifier().fit(vectors, intents)
    router = Router(embedder, classifier, SemanticCache(vectors, intents), entries, thresholds)
    return TrainedRouter(router, vectors, tuple(questions), tuple(intents), held_out)
