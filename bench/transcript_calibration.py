"""Where the router's transcript threshold comes from: Banking77 *train* only.

The seed's calibration promises a precision on typed questions held out from the seed;
callers' questions arrive as transcripts. This measures, on train questions spoken and
transcribed by the project's own stack (bench/spoken_train.py), how right the cached
answers to those transcripts are at the threshold of each target wrong-answer rate, and
what a threshold calibrated on the transcripts themselves would be. The shipped rule
(intents.calibration.TRANSCRIPT_TARGET_FACTOR) was chosen from this table; dev and
dev_spoken are never read.

Method: the shipped 5-fold cross-validation of the whole train set (10,003 questions, the
shipped negatives, the questions' misheard copies: ``intents.misheard``); each fold's classifier also reads the transcripts of its held-out
questions. Typed rows are scored by the calibration's own cross-fitted judges; the
transcripts by a judge trained on every out-of-fold row except those same questions.

Run: .venv/bin/python bench/transcript_calibration.py [--per-intent 26]
(the first run transcribes the sample: about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import spoken_train  # noqa: E402
from bench.speech_corpus import DATA  # noqa: E402
from intents.calibration import (CONFIDENCE, MisheardCopies, _cross_fitted,  # noqa: E402
                                 _loosest, calibrate, cross_validate, fitted_rows)
from intents.classifier import IntentClassifier  # noqa: E402
from intents.embedder import Embedder  # noqa: E402
from intents.judge import SIGNALS, Judge, read_signals  # noqa: E402
from intents.misheard import misheard_copies  # noqa: E402
from intents.negatives import embed_negatives, negatives_for_seed  # noqa: E402
from intents.semantic_cache import SemanticCache  # noqa: E402

FOLDS = 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-intent", type=int, default=26)
    parser.add_argument("--target", type=float, default=0.01)
    args = parser.parse_args()
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [r["text"] for r in rows]
    labels = np.array([r["category"] for r in rows], dtype=object)
    spoken = spoken_train.load(args.per_intent, progress=True)
    index = {t: i for i, t in enumerate(texts)}
    sp_rows = np.array([index[r["text"]] for r in spoken])
    sp_texts = [r["asr_text"] for r in spoken]

    embedder = Embedder()
    vectors = embedder.encode_batch(texts, batch_size=128)
    sp_vectors = embedder.encode_batch(sp_texts, batch_size=128)
    neg_texts = negatives_for_seed((), texts)
    neg_vectors = embed_negatives(embedder, neg_texts)
    # The shipped fit: every fold's classifier also learns its questions' misheard copies.
    copies = misheard_copies(texts)
    misheard = MisheardCopies(embedder.encode_batch(copies, batch_size=128), copies)
    held = cross_validate(vectors, texts, labels, neg_vectors, neg_texts, folds=FOLDS,
                          misheard=misheard)

    # The same folds (cross_validate's splitter), each reading its held-out transcripts.
    splits = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0).split(
        vectors, labels.astype(str))
    neg_fold = np.arange(len(neg_texts)) % FOLDS
    per_intent = len(texts) / len(set(labels))
    sp_predicted = np.empty(len(sp_rows), dtype=object)
    sp_matrix = np.zeros((len(sp_rows), len(SIGNALS)))
    sp_similarity = np.zeros(len(sp_rows))
    for fold, (train, test) in enumerate(splits):
        mine = np.flatnonzero(np.isin(sp_rows, test))
        others = np.flatnonzero(neg_fold != fold)
        clf = IntentClassifier().fit(*fitted_rows(vectors, labels, texts, train, misheard),
                                     negative_vectors=neg_vectors[others],
                                     negative_texts=[neg_texts[i] for i in others],
                                     seed_questions_per_intent=per_intent)
        s = read_signals(clf, SemanticCache(vectors[train], labels[train]), sp_vectors[mine],
                         [sp_texts[i] for i in mine])
        sp_predicted[mine], sp_matrix[mine] = s.predicted, s.matrix
        sp_similarity[mine] = s.nearest_similarity

    h, neg = held.signals, held.negatives
    right = h.predicted == labels
    all_rows = np.concatenate([h.matrix, neg.matrix])
    outcome = np.concatenate([right, np.zeros(len(neg), dtype=bool)])
    typed_score = _cross_fitted(all_rows, outcome, 0)[:len(h)]
    unseen = np.ones(len(all_rows), dtype=bool)
    unseen[sp_rows] = False
    sp_score = Judge().fit(all_rows[unseen], outcome[unseen]).confidence(sp_matrix)
    sp_right = sp_predicted == labels[sp_rows]
    answers = set(labels)
    typed, _ = calibrate(held, answers, args.target)
    floor = typed.min_similarity
    sp_eligible = (sp_similarity >= floor) & np.array([p in answers for p in sp_predicted])
    typed_eligible = (h.nearest_similarity >= floor) & np.array([p in answers
                                                                 for p in h.predicted])
    n = len(sp_rows)
    voices = {v: sum(r["voice"] == v for r in spoken) for v in sorted({r["voice"] for r in spoken})}
    print(f"{n} train questions spoken ({', '.join(f'{k} {v}' for k, v in voices.items())}), "
          f"phone band, Moonshine: the fold's classifier names the right intent for "
          f"{sp_right.mean():.1%} of the transcripts, {right[sp_rows].mean():.1%} of the same "
          f"questions typed")

    def served(threshold: float, scores: np.ndarray, ok: np.ndarray, eligible: np.ndarray
               ) -> str:
        hit = eligible & (scores >= threshold)
        wrong = int((hit & ~ok).sum())
        return (f"{hit.sum() / n:6.1%} answered, {1 - wrong / max(hit.sum(), 1):7.2%} right "
                f"({wrong} wrong of {hit.sum()})")

    print(f"\n{'typed target':>12}  {'threshold':>9}  {'typed (held-out train)':<40}  "
          f"transcripts of the same questions")
    for factor in (1.0, 0.7, 0.5, 0.4, 0.3):
        t, _ = calibrate(held, answers, args.target * factor)
        line = served(t.hit_confidence, typed_score[sp_rows], right[sp_rows],
                      typed_eligible[sp_rows])
        print(f"{args.target * factor:12.2%}  {t.hit_confidence:9.4f}  {line:<40}  "
              f"{served(t.hit_confidence, sp_score, sp_right, sp_eligible)}")
    direct = _loosest(sp_score[sp_eligible], ~sp_right[sp_eligible], np.array([]), 0,
                      args.target, 1.0, CONFIDENCE)
    if direct is None:
        print("\ncalibrated on the transcripts themselves: no threshold keeps the promise")
    else:
        print(f"\ncalibrated on the transcripts themselves (bound at {args.target:.0%}, "
              f"{CONFIDENCE:.0%} confidence): threshold {direct[0]:.4f}, "
              f"{served(direct[0], sp_score, sp_right, sp_eligible)}")


if __name__ == "__main__":
    main()
