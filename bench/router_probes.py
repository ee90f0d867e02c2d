"""Train-only probes of the router's ranking: more judge signals, another judge model,
and the shipped classifier (three views: embeddings, character and word n-grams, fitted
with the seed's misheard copies, ``intents.misheard``) against the same without the
copies and the two views before the word view.

What decides how many questions the cache can answer at a promised precision is the
order in which the judge ranks them. These probes ask whether anything cheap improves
that order. Everything is chosen and measured on Banking77 *train* only (dev and
dev_spoken are never read): the shipped 5-fold cross-validation of all 10,003 questions
with the shipped negatives (``intents.calibration``), every row's judge score from a
judge that never saw it. Per probe:

  @1.0% / @0.5%   held-out questions served at the threshold the shipped calibration
                  picks for that target (Clopper-Pearson bound, out-of-domain limit),
                  and how many of them were wrong
  cov@99.3/99.5   the curve's shape: the largest share served at that point precision
  spoken          with --spoken: the transcripts of bench/spoken_train.py's sample (the
                  same questions, held out in the same folds) at the 0.5% threshold (the
                  shipped transcript rule), and the curve's share at 99.2% precision

The shipped classifier gets every probe; then its "shipped judge" row again for the
classifier without misheard copies, and for the one with two views (embeddings and
characters at 0.7/0.3, as shipped before the word view: ``intents.classifier.TWO_VIEWS``),
same folds. ``--mix`` probes other shares
of the three views in place of the shipped ``MIX``. ``--spoken --transcript-judge``: the
shipped classifier only, and a judge for transcripts learnt from the seed's own misheard
copies (each held-out question's copy read by its fold's classifier, which never saw it;
its threshold calibrated on those copies) against the shipped rule (the typed judge at
half the target), on the real transcripts.

Run: .venv/bin/python bench/router_probes.py [--fold-seed 0] [--spoken] [--mix 0.5,0.25,0.25]
     [--transcript-judge]
(about 15 minutes on 2 cores; --spoken transcribes the sample first if it is not cached)
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import spoken_train  # noqa: E402
from bench.speech_corpus import DATA  # noqa: E402
from intents.calibration import (CONFIDENCE, OUT_OF_DOMAIN_TARGET, MisheardCopies,  # noqa: E402
                                 _loosest, fitted_rows)
from intents.classifier import MIX, OUT_OF_DOMAIN, TWO_VIEWS, IntentClassifier  # noqa: E402
from intents.embedder import Embedder  # noqa: E402
from intents.judge import NEIGHBOURS, SIGNALS, Judge, read_signals  # noqa: E402
from intents.negatives import embed_negatives, negatives_for_seed  # noqa: E402
from intents.semantic_cache import SemanticCache  # noqa: E402

FOLDS = 5


class ProbedClassifier(IntentClassifier):
    """The shipped classifier (or one with another ``mix``), each view's own probabilities
    of the last texts scored kept for the probes."""

    def __init__(self, mix: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if mix is not None:
            self.mix = mix
        self.parts: dict[str, np.ndarray] | None = None

    def view_probabilities(self, vectors, texts=None):  # type: ignore[no-untyped-def]
        self.parts = super().view_probabilities(vectors, texts)
        return self.parts


@dataclass
class Rows:
    """Held-out rows of one kind (seed questions, negatives or transcripts), seed order."""

    predicted: np.ndarray
    matrix: np.ndarray  # the shipped judge's signals
    extra: np.ndarray  # candidate signals (EXTRA order)
    nearest: np.ndarray
    # The closest seed questions of the fold's training part (seed row numbers, -1: none)
    # and their similarities, for the local signals (``add_local_signals``).
    neighbours: np.ndarray
    neighbour_sims: np.ndarray

    @classmethod
    def empty(cls, n: int, width: int) -> "Rows":
        return cls(np.empty(n, dtype=object), np.zeros((n, width)), np.zeros((n, len(EXTRA))),
                   np.zeros(n), np.full((n, NEIGHBOURS), -1), np.zeros((n, NEIGHBOURS)))


EXTRA = ("embedding_p", "characters_p", "embedding_agrees", "characters_agrees",
         "out_of_domain_p", "entropy", "log_odds", "third_p",
         "local_error", "local_intent_error", "local_precision")
LOCAL = EXTRA[-3:]


def add_local_signals(rows: Rows, oof_predicted: np.ndarray, labels: np.ndarray) -> None:
    """How reliable the classifier was near each row, from its neighbours' own out-of-fold
    predictions (each neighbour predicted by a classifier that never saw it):

      local_error         similarity-weighted share of the neighbours it got wrong
      local_intent_error  the same among the neighbours labelled with the predicted intent
      local_precision     among the neighbours it predicted the same intent for, the
                          similarity-weighted share that really were that intent (1 if none)

    A probe with a leak: a neighbour's out-of-fold classifier may have been fitted on the
    held-out row itself, which a new caller's question never is."""
    wrong = oof_predicted != labels
    for i in range(len(rows.predicted)):
        found = rows.neighbours[i] >= 0
        nb = rows.neighbours[i][found]
        w = np.clip(rows.neighbour_sims[i][found], 1e-6, None)
        same_label = labels[nb] == rows.predicted[i]
        same_prediction = oof_predicted[nb] == rows.predicted[i]
        rows.extra[i, EXTRA.index("local_error")] = (w * wrong[nb]).sum() / w.sum()
        rows.extra[i, EXTRA.index("local_intent_error")] = (
            (w * wrong[nb])[same_label].sum() / w[same_label].sum() if same_label.any() else 1.0)
        rows.extra[i, EXTRA.index("local_precision")] = (
            (w * same_label)[same_prediction].sum() / w[same_prediction].sum()
            if same_prediction.any() else 1.0)


def candidate_signals(clf: ProbedClassifier, combined: np.ndarray, predicted: np.ndarray
                      ) -> np.ndarray:
    """Signals the shipped judge does not read: each model's own view of the intent the
    mix chose, whether each model alone would choose it, and the mix's shape."""
    assert clf.parts is not None
    embedding, characters = clf.parts["embeddings"], clf.parts["characters"]
    column = np.array([clf.classes.index(p) for p in predicted])
    rows = np.arange(len(predicted))
    top = np.sort(combined, axis=1)[:, ::-1]
    ood = clf.classes.index(OUT_OF_DOMAIN)
    return np.column_stack([
        embedding[rows, column], characters[rows, column],
        embedding.argmax(1) == column, characters.argmax(1) == column,
        combined[:, ood], -(combined * np.log(np.maximum(combined, 1e-12))).sum(1),
        np.log(top[:, 0] / np.maximum(top[:, 1], 1e-12)), top[:, 2],
        *np.zeros((len(LOCAL), len(predicted)))]).astype(float)  # LOCAL: after the folds


def held_out_rows(make: Callable[[], ProbedClassifier], vectors: np.ndarray, texts: list[str],
                  labels: np.ndarray, neg_vectors: np.ndarray, neg_texts: list[str],
                  spoken_rows: np.ndarray, spoken_vectors: np.ndarray, spoken_texts: list[str],
                  fold_seed: int, misheard: MisheardCopies | None = None,
                  heard: Rows | None = None) -> tuple[Rows, Rows, Rows]:
    """The shipped cross-validation (same folds and negatives split as
    ``intents.calibration.cross_validate`` at seed 0, misheard copies of the training part
    when given), each fold also reading the transcripts of its held-out questions (and,
    into ``heard``, the misheard copies of its held-out questions, never fitted on)."""
    seed, negs = Rows.empty(len(texts), len(SIGNALS)), Rows.empty(len(neg_texts), len(SIGNALS))
    spoken = Rows.empty(len(spoken_rows), len(SIGNALS))
    neg_fold = np.arange(len(neg_texts)) % FOLDS
    per_intent = len(texts) / len(set(labels))
    splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=fold_seed)
    # The whole seed's copies (seed order), read as held out in their question's fold.
    _, copy_texts, copy_vectors = (misheard.of(texts) if heard is not None and misheard
                                   is not None else ((), [], None))
    for fold, (train, test) in enumerate(splitter.split(vectors, labels.astype(str))):
        others = np.flatnonzero(neg_fold != fold)
        clf = make().fit(*fitted_rows(vectors, labels, texts, train, misheard,
                                      held_out=[texts[i] for i in test]),
                         negative_vectors=neg_vectors[others],
                         negative_texts=[neg_texts[i] for i in others],
                         seed_questions_per_intent=per_intent)
        cache = SemanticCache(vectors[train], labels[train])
        for rows, where, source_vectors, source_texts in (
                (seed, test, vectors, texts),
                (negs, np.flatnonzero(neg_fold == fold), neg_vectors, neg_texts),
                (spoken, np.flatnonzero(np.isin(spoken_rows, test)), spoken_vectors,
                 spoken_texts),
                *([(heard, test, copy_vectors, copy_texts)]
                  if heard is not None and copy_vectors is not None else [])):
            if not len(where):
                continue
            mine = [source_texts[i] for i in where]
            signals = read_signals(clf, cache, source_vectors[where], mine)
            combined = clf.probabilities(source_vectors[where], mine)
            rows.predicted[where] = signals.predicted
            rows.matrix[where] = signals.matrix
            rows.extra[where] = candidate_signals(clf, combined, signals.predicted)
            rows.nearest[where] = signals.nearest_similarity
            sims, found = cache.search_arrays(source_vectors[where], k=NEIGHBOURS)
            rows.neighbours[where] = np.where(found >= 0, train[np.maximum(found, 0)], -1)
            rows.neighbour_sims[where] = sims
        print(f"  fold {fold + 1}/{FOLDS}", flush=True)
    for rows in (seed, negs, spoken, *([heard] if heard is not None else [])):
        add_local_signals(rows, seed.predicted, labels)
    return seed, negs, spoken


def gradient_boosting() -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                          min_samples_leaf=40, l2_regularization=1.0,
                                          random_state=0)


def report(name: str, columns: Sequence[str], seed: Rows, negs: Rows, spoken: Rows,
           labels: np.ndarray, spoken_labels: np.ndarray, judge: str = "logistic") -> str:
    def inputs(rows: Rows) -> np.ndarray:
        return np.column_stack([rows.matrix] + [rows.extra[:, EXTRA.index(c)]
                                                for c in columns])

    x = np.concatenate([inputs(seed), inputs(negs)])
    right = seed.predicted == labels
    outcome = np.r_[right, np.zeros(len(negs.predicted), dtype=bool)]

    def fitted(rows: np.ndarray, y: np.ndarray):  # type: ignore[no-untyped-def]
        if judge == "logistic":
            model = Judge().fit(rows, y)
            return model.confidence
        return gradient_boosting().fit(rows, y).predict_proba

    score = np.zeros(len(outcome))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, outcome):
        found = fitted(x[train], outcome[train])(x[test])
        score[test] = found if found.ndim == 1 else found[:, 1]
    floor = np.quantile(seed.nearest, 0.01)
    n, n_neg = len(labels), len(negs.predicted)
    mine = (seed.nearest >= floor) & (seed.predicted != OUT_OF_DOMAIN)
    neg_mine = (negs.nearest >= floor) & (negs.predicted != OUT_OF_DOMAIN)
    scores, wrong = score[:n][mine], ~right[mine]
    neg_scores = np.sort(score[n:][neg_mine])[::-1]
    line = [f"{name:<44}"]
    chosen = {}
    for target in (0.01, 0.005):
        found = _loosest(scores, wrong, neg_scores, n_neg, target, OUT_OF_DOMAIN_TARGET,
                         CONFIDENCE)
        chosen[target] = None if found is None else found[0]
        line.append("none" if found is None else f"{found[1] / n:6.1%} ({found[2]:>2} wrong)")
    line += [f"{share_at(scores, wrong, n, p):6.1%}" for p in (0.993, 0.995)]
    if len(spoken.predicted):
        whole = fitted(x, outcome)
        found = whole(inputs(spoken))
        s = found if found.ndim == 1 else found[:, 1]
        ok = spoken.predicted == spoken_labels
        eligible = (spoken.nearest >= floor) & (spoken.predicted != OUT_OF_DOMAIN)
        threshold = chosen[0.005]
        hit = eligible & (s >= (threshold if threshold is not None else 2.0))
        wrong_spoken = int((hit & ~ok).sum())
        line.append(f"{hit.mean():6.1%} at {1 - wrong_spoken / max(hit.sum(), 1):6.2%}")
        line.append(f"{share_at(s[eligible], ~ok[eligible], len(s), 0.992):6.1%}")
    return "  ".join(line)


def transcript_judge_report(seed: Rows, heard: Rows, negs: Rows, spoken: Rows,
                            labels: np.ndarray, spoken_labels: np.ndarray) -> list[str]:
    """A judge for transcripts learnt from the seed's own misheard copies: each held-out
    question's copy read by the fold's classifier (which never saw it), its threshold
    calibrated on those copies (cross-fitted scores, the shipped bound) instead of the typed
    judge at half the target. Measured on the real transcripts: served share and precision
    at each target, and the curve's share at 99.2% precision."""
    n, n_neg = len(labels), len(negs.predicted)
    floor = np.quantile(seed.nearest, 0.01)
    lines = []

    def eligible(rows: Rows) -> np.ndarray:
        return (rows.nearest >= floor) & (rows.predicted != OUT_OF_DOMAIN)

    ok_spoken = spoken.predicted == spoken_labels
    for name, typed_too in (("transcript judge: copies + negatives", False),
                            ("transcript judge: seed + copies (flagged) + negatives", True)):
        def inputs(rows: Rows, flag: float) -> np.ndarray:
            return np.column_stack([rows.matrix, np.full(len(rows.predicted), flag)]
                                   ) if typed_too else rows.matrix
        parts = ([(inputs(seed, 0.0), seed.predicted == labels)] if typed_too else [])
        parts += [(inputs(heard, 1.0), heard.predicted == labels),
                  (inputs(negs, 0.0), np.zeros(n_neg, dtype=bool))]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        score = np.zeros(len(y))
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
            score[test] = Judge().fit(x[train], y[train]).confidence(x[test])
        start = n if typed_too else 0
        heard_scores = score[start:start + n]
        neg_scores = score[start + n:]
        heard_ok = heard.predicted == labels
        mine = eligible(heard)
        neg_desc = np.sort(neg_scores[eligible(negs)])[::-1]
        spoken_scores = Judge().fit(x, y).confidence(inputs(spoken, 1.0))
        line = [f"{name:<56}"]
        for target in (0.01, 0.005):
            found = _loosest(heard_scores[mine], ~heard_ok[mine], neg_desc, n_neg, target,
                             OUT_OF_DOMAIN_TARGET, CONFIDENCE)
            if found is None:
                line.append("none")
                continue
            hit = eligible(spoken) & (spoken_scores >= found[0])
            wrong = int((hit & ~ok_spoken).sum())
            line.append(f"@{target:.1%} copies {found[1] / n:5.1%}, transcripts "
                        f"{hit.mean():5.1%} at {1 - wrong / max(hit.sum(), 1):6.2%}")
        e = eligible(spoken)
        line.append(f"cov@99.2 {share_at(spoken_scores[e], ~ok_spoken[e], len(e), 0.992):5.1%}")
        lines.append("  ".join(line))
    return lines


def share_at(scores: np.ndarray, wrong: np.ndarray, n: int, precision: float) -> float:
    """The largest share of ``n`` served, best scores first, at that point precision."""
    order = np.argsort(-scores, kind="stable")
    wrongs = np.cumsum(wrong[order])
    served = np.arange(1, len(order) + 1)
    ok = np.flatnonzero(wrongs <= (1 - precision) * served)
    return served[ok.max()] / n if len(ok) else 0.0


PROBES: list[tuple[str, tuple[str, ...], str]] = [
    ("shipped judge", (), "logistic"),
    ("+ each model's probability", ("embedding_p", "characters_p"), "logistic"),
    ("+ each model agrees", ("embedding_agrees", "characters_agrees"), "logistic"),
    ("+ out-of-domain probability", ("out_of_domain_p",), "logistic"),
    ("+ entropy, log odds, third probability", ("entropy", "log_odds", "third_p"), "logistic"),
    ("+ all of them", EXTRA[:7], "logistic"),
    ("+ local reliability (leaky)", LOCAL, "logistic"),
    ("+ local precision (leaky)", ("local_precision",), "logistic"),
    ("gradient boosting, shipped signals", (), "boosting"),
    ("gradient boosting, all signals", EXTRA[:7], "boosting"),
    ("gradient boosting, + local reliability", LOCAL, "boosting"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--spoken", action="store_true",
                        help="also route bench/spoken_train.py's transcripts (26 per intent)")
    parser.add_argument("--mix", default=None,
                        help="embeddings,characters,words: shares to probe in place of the "
                             "shipped mix (" + ",".join(f"{w:g}" for w in MIX.values()) + ")")
    parser.add_argument("--transcript-judge", action="store_true",
                        help="with --spoken: the shipped classifier only, its transcripts "
                             "judged by a judge learnt from misheard copies (against the "
                             "shipped rule)")
    parser.add_argument("--shipped-only", action="store_true",
                        help="probe the shipped classifier only, not the two before it")
    args = parser.parse_args()
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [r["text"] for r in rows]
    labels = np.array([r["category"] for r in rows], dtype=object)
    spoken = spoken_train.load(26, progress=True) if args.spoken else []
    index = {t: i for i, t in enumerate(texts)}
    spoken_rows = np.array([index[r["text"]] for r in spoken], dtype=int)
    spoken_texts = [r["asr_text"] for r in spoken]
    embedder = Embedder()
    vectors = embedder.encode_batch(texts, batch_size=128)
    spoken_vectors = (embedder.encode_batch(spoken_texts, batch_size=128) if spoken_texts
                      else np.zeros((0, vectors.shape[1]), dtype=np.float32))
    neg_texts = list(negatives_for_seed((), texts))
    neg_vectors = embed_negatives(embedder, neg_texts)
    spoken_labels = labels[spoken_rows]
    header = (f"{'probe (train only, fold seed ' + str(args.fold_seed) + ')':<44}  "
              f"{'@1.0%':<16}  {'@0.5%':<16}  cov@99.3  cov@99.5"
              + ("  spoken @0.5%        cov@99.2" if spoken else ""))
    mix = (None if args.mix is None
           else dict(zip(("embeddings", "characters", "words"),
                         (float(w) for w in args.mix.split(",")))))
    misheard = MisheardCopies(lambda made: embedder.encode_batch(made, batch_size=128))
    first = "shipped classifier" if mix is None else f"classifier, mix {args.mix}"
    two_views = "two views (" + "/".join(f"{w:g}" for w in TWO_VIEWS.values()) + ")"
    for label, make, copied in (
            (first, lambda: ProbedClassifier(mix), misheard),
            ("three views, no misheard copies", lambda: ProbedClassifier(mix), None),
            (two_views + ", no misheard copies", lambda: ProbedClassifier(TWO_VIEWS), None)
    )[:1 if args.shipped_only or args.transcript_judge else 3]:
        print(f"{label}: cross-validating", flush=True)
        heard = Rows.empty(len(texts), len(SIGNALS)) if args.transcript_judge else None
        seed, negs, spoken_held = held_out_rows(
            make, vectors, texts, labels, neg_vectors, neg_texts, spoken_rows,
            spoken_vectors, spoken_texts, args.fold_seed, copied, heard)
        print(f"{label}: top-1 right on held-out questions "
              f"{(seed.predicted == labels).mean():.2%}"
              + (f", on their transcripts {(spoken_held.predicted == spoken_labels).mean():.2%}"
                 if spoken else ""))
        print(header)
        for name, columns, judge in (PROBES if label == first and not args.transcript_judge
                                     else PROBES[:1]):
            print(report(name, columns, seed, negs, spoken_held, labels, spoken_labels, judge),
                  flush=True)
        if heard is not None:
            print(f"misheard copies of held-out questions: top-1 right "
                  f"{(heard.predicted == labels).mean():.2%}")
            for line in transcript_judge_report(seed, heard, negs, spoken_held, labels,
                                                spoken_labels):
                print(line, flush=True)


if __name__ == "__main__":
    main()
