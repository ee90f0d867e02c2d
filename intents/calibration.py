"""Threshold calibration by cross-validation on the seed.

Each seed question is held out in turn (k folds): a classifier and an index are
trained on the other folds and the held-out question is routed with the same
rule the live router uses. The thresholds are then the loosest ones whose
held-out *wrong-answer rate* (wrong cached answers / cached answers served) stays
within the target, because a wrong cached answer costs the caller's trust while
a miss only costs latency.

Held-out questions whose intent has no other question in the training folds act
as "unseen intent" probes: any hit on them is counted as a wrong answer.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Collection, Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from intents.classifier import IntentClassifier
from intents.semantic_cache import SemanticCache

NEVER = 2.0  # a similarity/margin threshold no query reaches: the router never hits
GRID_STEP = 0.01


@dataclass(frozen=True)
class Thresholds:
    min_similarity: float  # below: out of scope (no intent)
    hit_similarity: float  # nearest seed question must be at least this similar
    hit_margin: float  # classifier top-1 minus top-2 probability must be at least this
    target_wrong_rate: float
    expected_hit_rate: float  # held-out FAQ (action answer) questions served from the cache
    expected_wrong_rate: float  # held-out wrong cached answers / cached answers served
    calibration_questions: int
    folds: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Thresholds":
        return cls(**data)


def hit_rule(in_scope: Any, is_answer: Any, agree: Any, similarity: Any, margin: Any,
             thresholds: Thresholds) -> Any:
    """The hit decision; works on scalars (the router) and numpy arrays (calibration)."""
    return (in_scope & is_answer & agree & (similarity >= thresholds.hit_similarity)
            & (margin >= thresholds.hit_margin))


@dataclass(frozen=True)
class HeldOut:
    """Features of every held-out question, in seed order."""

    true_intent: np.ndarray
    predicted: np.ndarray
    margin: np.ndarray
    nearest_intent: np.ndarray
    similarity: np.ndarray
    folds: int


def cross_validate(vectors: np.ndarray, intents: Sequence[str], folds: int = 5,
                   make_classifier: Callable[[], IntentClassifier] = IntentClassifier,
                   seed: int = 0) -> HeldOut:
    labels = np.asarray(list(intents), dtype=object)
    n = len(labels)
    _, counts = np.unique(labels, return_counts=True)
    if n < 2:
        raise ValueError("calibration needs at least two questions")
    if counts.max() >= 2:
        splitter: Any = StratifiedKFold(n_splits=int(min(folds, counts.max())), shuffle=True,
                                        random_state=seed)
    else:
        splitter = KFold(n_splits=int(min(folds, n)), shuffle=True, random_state=seed)
    predicted = np.empty(n, dtype=object)
    margin = np.zeros(n)
    nearest = np.empty(n, dtype=object)
    similarity = np.zeros(n)
    with warnings.catch_warnings():
        # Intents with fewer questions than folds are expected (they become unseen-intent probes).
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        splits = list(splitter.split(vectors, labels.astype(str)))
    for train, test in splits:
        clf = make_classifier().fit(vectors[train], labels[train])
        top, _, marg, _ = clf.scores_arrays(vectors[test])
        cache = SemanticCache(vectors[train], labels[train])
        scores, rows = cache.search_arrays(vectors[test], k=1)
        predicted[test] = top
        margin[test] = marg
        nearest[test] = cache.intents[rows[:, 0]]
        similarity[test] = scores[:, 0]
    return HeldOut(labels, predicted, margin, nearest, similarity, len(splits))


def calibrate(held_out: HeldOut, answer_intents: Collection[str], target_wrong_rate: float = 0.01,
              out_of_scope_quantile: float = 0.01) -> Thresholds:
    """Loosest (similarity, margin) thresholds meeting the target on the held-out questions."""
    if not 0.0 < target_wrong_rate < 1.0:
        raise ValueError("target_wrong_rate must be between 0 and 1")
    answers = set(answer_intents)
    h = held_out
    # Out-of-scope floor: (1 - quantile) of in-scope held-out questions are at least this close.
    floor = float(np.quantile(h.similarity, out_of_scope_quantile))
    is_answer = np.array([p in answers for p in h.predicted])
    true_answer = np.array([t in answers for t in h.true_intent])
    eligible = (h.similarity >= floor) & is_answer & (h.predicted == h.nearest_intent)
    wrong = h.predicted != h.true_intent
    n_answer = int(true_answer.sum())

    best = (0, 0, NEVER, NEVER)  # hits, wrong, similarity, margin
    # Rounded so a grid value never lands a hair above a score it should admit.
    margin_grid = np.round(np.arange(0.0, 1.0 + GRID_STEP / 2, GRID_STEP), 6)
    sim_grid = np.round(np.arange(np.floor(floor / GRID_STEP) * GRID_STEP, 1.0 + GRID_STEP / 2,
                                  GRID_STEP), 6)
    for t_sim in sim_grid:
        chosen = eligible & (h.similarity >= t_sim)
        margins = h.margin[chosen]
        order = np.argsort(margins)
        sorted_margins = margins[order]
        wrong_suffix = np.cumsum(wrong[chosen][order][::-1])[::-1]  # wrong among margin >= m_i
        start = np.searchsorted(sorted_margins, margin_grid - 1e-12, side="left")
        hits = len(sorted_margins) - start
        wrongs = np.where(start < len(sorted_margins),
                          wrong_suffix[np.minimum(start, len(sorted_margins) - 1)] if len(
                              sorted_margins) else 0, 0)
        # One imagined wrong answer: a small seed with no observed mistakes must not get the
        # loosest thresholds on the strength of a few dozen questions.
        ok = (wrongs + 1) / (hits + 1) <= target_wrong_rate
        for i in np.flatnonzero(ok):
            # Ascending thresholds: an equal hit count later means stricter thresholds, keep those.
            if hits[i] > 0 and hits[i] >= best[0]:
                best = (int(hits[i]), int(wrongs[i]), float(t_sim), float(margin_grid[i]))
    hits, wrongs, t_sim, t_margin = best
    return Thresholds(
        min_similarity=round(floor, 4), hit_similarity=round(t_sim, 4),
        hit_margin=round(t_margin, 4), target_wrong_rate=target_wrong_rate,
        expected_hit_rate=round(hits / n_answer, 4) if n_answer else 0.0,
        expected_wrong_rate=round(wrongs / hits, 4) if hits else 0.0,
        calibration_questions=len(h.true_intent), folds=h.folds)
