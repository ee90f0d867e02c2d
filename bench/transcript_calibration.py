"""Where the router's transcript threshold comes from: Banking77 *train* only.

The seed's calibration promises a precision on typed questions held out from the seed;
callers' questions arrive as transcripts. This measures, on train questions spoken and
transcribed by the project's own stack (bench/spoken_train.py), how right the cached
answers to those transcripts are at the threshold of each target wrong-answer rate, and
what a threshold calibrated on the transcripts themselves would be. The shipped rule
(intents.calibration.TRANSCRIPT_TARGET_FACTOR) was chosen from this table; dev and
dev_spoken are never read.

Method: the shipped 5-fold cross-validation of the whole train set (10,003 questions, the
shipped negatives, the questions' misheard copies: ``intents.misheard``); each fold's
classifier also reads the transcripts of its held-out questions. Typed rows are scored by
the calibration's own cross-fitted judges; the transcripts by a judge trained on every
out-of-fold row except those same questions.

Probe, not shipped: a threshold calibrated per seed on its misheard copies. Every seed has
copies (real transcripts it has not), and a held-out question's copy is never fitted in its
fold, so each fold's classifier also reads the copies of its held-out questions (the copies
the fit uses). A copy is scored by the same cross-fitted judge that scores its question's
typed row (the calibration's judge folds, trained on typed rows and negatives only), so no
judge saw the question. The last block picks, at 1.0, 0.7 and 0.5 times the target, the
loosest threshold whose bound holds on the eligible copies (the transcripts' eligibility:
nearest similarity at least the typed floor, an answer intent predicted), and shows what it
does on the copies of the spoken questions, on all copies, and on the transcripts.
``--fold-seed`` sets the cross-validation's folds (the judge's folds stay the calibration's
own, seed 0), so fold seeds can be compared.

Measured 2026-11-26 (fold seeds 0 and 1), against a bar set before the runs (on the
transcripts, at least 99.2% of cached answers right and more transcripts answered than
TRANSCRIPT_TARGET_FACTOR 0.5 answers, on both fold seeds): no copy target met it. At 1.0x
the target 99.24% right (7 wrong of 922) on seed 0 but 98.98% (10 of 980) on seed 1; at 0.7x
right enough (99.61%, 99.87%) but fewer answered than 0.5x (776 vs 828, 785 vs 794); at
0.5x fewer still. Copies are easier than transcripts: the fold's classifier is right for
86.5-86.7% of the spoken questions' copies, 76.3-76.6% of their transcripts. Not shipped.

Probe 2 (the last line), shipped as 95711c9 and reverted in 1895887: the judge also learns
from the held-out copies, and transcripts are served where the copies' wrong answers are
bounded at the target. Measured 2026-11-27, fold seed 0: 47.8% of the transcripts answered,
99.16% right (8 wrong of 956), against half the target's 41.4%, 99.64% (3 of 828). On dev
(README, "Probed 2026-11-27") it served transcripts at 99.02%: not kept.

Probe 3, not shipped (2026-11-29): the default target at 0.7% (the router issue's 99.3%
typed bar) with the factor re-chosen by the rule above (``--target 0.007``, fold seeds 0 / 1,
the grid with 0.9 added before the run). Typed held-out train at 0.7%: 73.4% / 72.7% answered,
99.39% / 99.45% right; transcripts right at 1.0 / 0.9 / 0.8 of it: 98.84 / 98.93 / 99.64%
(seed 0), 99.26 / 99.44 / 99.53% (seed 1), answered at 0.8 41.5% / 42.6%: 0.8 by the rule. Not
adopted, and dev never read for it: at 0.7% the shipped example FAQ (229 questions, too few to
bound either target) finds no threshold at all on its point estimate (at least 72 held-out
hits, at most 0.7% of them wrong) and would serve nothing, where 1% serves 72.8% of it.

Run: .venv/bin/python bench/transcript_calibration.py [--per-intent 26] [--fold-seed 0]
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
from intents.calibration import (CONFIDENCE, MisheardCopies, _loosest,  # noqa: E402
                                 calibrate, cross_validate, fitted_rows, judge_folds)
from intents.classifier import IntentClassifier  # noqa: E402
from intents.embedder import Embedder  # noqa: E402
from intents.judge import SIGNALS, Judge, read_signals  # noqa: E402
from intents.negatives import embed_negatives, negatives_for_seed  # noqa: E402
from intents.semantic_cache import SemanticCache  # noqa: E402
from intents.types import DEFAULT_TARGET_WRONG_RATE  # noqa: E402

FOLDS = 5
COPY_FACTORS = (1.0, 0.7, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-intent", type=int, default=26)
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET_WRONG_RATE)
    parser.add_argument("--fold-seed", type=int, default=0,
                        help="the cross-validation's folds (StratifiedKFold, cross_validate)")
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
    misheard = MisheardCopies(lambda made: embedder.encode_batch(made, batch_size=128))
    _, copies, copy_vectors = misheard.of(texts)  # the whole seed's, read held out below
    held = cross_validate(vectors, texts, labels, neg_vectors, neg_texts, folds=FOLDS,
                          misheard=misheard, seed=args.fold_seed)

    # The same folds (cross_validate's splitter), each reading its held-out transcripts and
    # its held-out questions' misheard copies.
    splits = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=args.fold_seed).split(
        vectors, labels.astype(str))
    neg_fold = np.arange(len(neg_texts)) % FOLDS
    per_intent = len(texts) / len(set(labels))
    sp_predicted = np.empty(len(sp_rows), dtype=object)
    sp_matrix = np.zeros((len(sp_rows), len(SIGNALS)))
    sp_similarity = np.zeros(len(sp_rows))
    cp_predicted = np.empty(len(texts), dtype=object)
    cp_matrix = np.zeros((len(texts), len(SIGNALS)))
    cp_similarity = np.zeros(len(texts))
    for fold, (train, test) in enumerate(splits):
        mine = np.flatnonzero(np.isin(sp_rows, test))
        others = np.flatnonzero(neg_fold != fold)
        clf = IntentClassifier().fit(*fitted_rows(vectors, labels, texts, train, misheard,
                                                  held_out=[texts[i] for i in test]),
                                     negative_vectors=neg_vectors[others],
                                     negative_texts=[neg_texts[i] for i in others],
                                     seed_questions_per_intent=per_intent)
        cache = SemanticCache(vectors[train], labels[train])
        s = read_signals(clf, cache, sp_vectors[mine], [sp_texts[i] for i in mine])
        sp_predicted[mine], sp_matrix[mine] = s.predicted, s.matrix
        sp_similarity[mine] = s.nearest_similarity
        c = read_signals(clf, cache, copy_vectors[test], [copies[i] for i in test])
        cp_predicted[test], cp_matrix[test] = c.predicted, c.matrix
        cp_similarity[test] = c.nearest_similarity

    h, neg = held.signals, held.negatives
    right = h.predicted == labels
    all_rows = np.concatenate([h.matrix, neg.matrix])
    outcome = np.concatenate([right, np.zeros(len(neg), dtype=bool)])
    # The calibration's own judges (its cross-fitting, seed 0): each copy is scored by the
    # judge that scores its question's row, so by one trained without that question.
    typed_score, cp_score = np.zeros(len(h)), np.zeros(len(texts))
    for judge, test in judge_folds(all_rows, outcome, 0):
        mine = test[test < len(h)]
        typed_score[mine] = judge.confidence(all_rows[mine])
        cp_score[mine] = judge.confidence(cp_matrix[mine])
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
    cp_right = cp_predicted == labels
    cp_eligible = (cp_similarity >= floor) & np.array([p in answers for p in cp_predicted])
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
        return (f"{hit.sum() / len(ok):6.1%} answered, {1 - wrong / max(hit.sum(), 1):7.2%} "
                f"right ({wrong} wrong of {hit.sum()})")

    # Per voice too: Piper's transcripts (word error rate 9.8%) are nearer a phone line's
    # recogniser than espeak's robotic voice (23.9%).
    by_voice = {v: np.array([r["voice"] == v for r in spoken]) for v in voices}
    print(f"\n{'typed target':>12}  {'threshold':>9}  {'typed (held-out train)':<40}  "
          f"transcripts of the same questions: all voices; "
          + "; ".join(by_voice))
    for factor in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        t, _ = calibrate(held, answers, args.target * factor)
        line = served(t.hit_confidence, typed_score[sp_rows], right[sp_rows],
                      typed_eligible[sp_rows])
        per_voice = "; ".join(
            served(t.hit_confidence, sp_score[mine], sp_right[mine], sp_eligible[mine])
            for mine in by_voice.values())
        print(f"{args.target * factor:12.2%}  {t.hit_confidence:9.4f}  {line:<40}  "
              f"{served(t.hit_confidence, sp_score, sp_right, sp_eligible)}; {per_voice}")
    direct = _loosest(sp_score[sp_eligible], ~sp_right[sp_eligible], np.array([]), 0,
                      args.target, 1.0, CONFIDENCE)
    if direct is None:
        print("\ncalibrated on the transcripts themselves: no threshold keeps the promise")
    else:
        print(f"\ncalibrated on the transcripts themselves (bound at {args.target:.0%}, "
              f"{CONFIDENCE:.0%} confidence): threshold {direct[0]:.4f}, "
              f"{served(direct[0], sp_score, sp_right, sp_eligible)}")

    # Probe: the transcript threshold calibrated on the seed's held-out misheard copies.
    print(f"\nfold seed {args.fold_seed}; misheard copies (held out in their question's fold): "
          f"the fold's classifier names the right intent for {cp_right.mean():.1%} of all "
          f"{len(texts)} copies ({right.mean():.1%} typed; "
          f"{np.mean([c == t for c, t in zip(copies, texts)]):.1%} of copies are their "
          f"question unchanged), {cp_right[sp_rows].mean():.1%} of "
          f"the copies of the {n} spoken questions ({sp_right.mean():.1%} of their "
          f"transcripts); eligible (floor {floor:.4f}, an answer predicted): "
          f"{cp_eligible.mean():.1%} of all copies, right {cp_right[cp_eligible].mean():.2%}; "
          f"{sp_eligible.mean():.1%} of transcripts, right {sp_right[sp_eligible].mean():.2%}")
    typed_threshold = typed.hit_confidence
    print(f"\n{'copy target':>12}  {'threshold':>9}  {'copies of the spoken questions':<40}  "
          f"{'all copies (calibrated on)':<40}  transcripts of the same questions")
    for factor in COPY_FACTORS:
        target = args.target * factor
        chosen = _loosest(cp_score[cp_eligible], ~cp_right[cp_eligible], np.array([]), 0,
                          target, 1.0, CONFIDENCE)
        if chosen is None:
            print(f"{target:12.2%}  no threshold keeps the promise on the copies")
            continue
        t = chosen[0]
        note = "" if t >= typed_threshold else (
            f"  (below the typed threshold {typed_threshold:.4f}: transcripts would get that)")
        bounded = "" if chosen[3] else "  (point estimate: the bound holds nowhere)"
        print(f"{target:12.2%}  {t:9.4f}  "
              f"{served(t, cp_score[sp_rows], cp_right[sp_rows], cp_eligible[sp_rows]):<40}  "
              f"{served(t, cp_score, cp_right, cp_eligible):<40}  "
              f"{served(t, sp_score, sp_right, sp_eligible)}{note}{bounded}")

    # Probe 2: the judge also learns from the held-out copies (beside the typed rows and the
    # negatives), and the transcripts' threshold is where the copies' wrong answers are
    # bounded at the target (shipped as 95711c9, reverted in 1895887 after dev).
    rows_with_copies = np.concatenate([all_rows, cp_matrix])
    outcome_with_copies = np.concatenate([outcome, cp_right])
    cp_learnt = np.zeros(len(texts))
    for judge, test in judge_folds(rows_with_copies, outcome_with_copies, 0):
        mine = test[test >= len(all_rows)] - len(all_rows)
        cp_learnt[mine] = judge.confidence(cp_matrix[mine])
    unseen = np.ones(len(rows_with_copies), dtype=bool)
    unseen[sp_rows] = False  # neither the spoken questions' typed rows nor their copies
    unseen[len(all_rows) + sp_rows] = False
    sp_learnt = Judge().fit(rows_with_copies[unseen],
                            outcome_with_copies[unseen]).confidence(sp_matrix)
    chosen = _loosest(cp_learnt[cp_eligible], ~cp_right[cp_eligible], np.array([]), 0,
                      args.target, 1.0, CONFIDENCE)
    print("\njudge learning the copies too, transcripts at the copies' bound at the target: "
          + ("no threshold keeps the promise on the copies" if chosen is None else
             f"threshold {chosen[0]:.4f}, copies of the spoken questions "
             f"{served(chosen[0], cp_learnt[sp_rows], cp_right[sp_rows], cp_eligible[sp_rows])}; "
             f"transcripts {served(chosen[0], sp_learnt, sp_right, sp_eligible)}"))


if __name__ == "__main__":
    main()
