"""Routing time per partial transcript (p50, p99), as the call loop sees it.

Every utterance is routed word by word ("I", "I lost", "I lost my", ...), the way
the call loop routes changed partials. Figures per router:
  cold    ``Router.route`` on a text never seen before: embedding + classifier + index
  warm    the same texts again: the embedder's LRU cache answers (repeated partials)
  decide  classifier + nearest-neighbour search + thresholds only (``route_vector``)
  decide, scikit-learn n-grams  the same with the text views' features from their
          TfidfVectorizers' own ``transform`` (before intents.ngrams), in the same run
  decide, two views  the same without the word view (the router before it: embeddings and
          characters), in the same run

Routers: the shipped bank FAQ (cache_seed/examples/bank_faq.csv, ~230 questions) and
banking77 train (10k questions, 77 intents) to see the index size matter. Each embedder
backend in turn, in one run (onnx-int8-dynamic, the default on CPUs with int8 dot products;
onnx-int8-dynamic-7bit, the default elsewhere; onnx-int8, blockwise weight-only int8;
torch: sentence-transformers), with its load time (the int8 exports are cached
beforehand: a server start, not the first); ``--rounds`` repeats the bank FAQ's figures
with the backends interleaved.

Run (from the repository root):
  .venv/bin/python bench/route_speed.py [--utterances 300] [--threads 1] [--rounds 1]
                          [--backends onnx-int8-dynamic,onnx-int8-dynamic-7bit,onnx-int8,torch]
                          [--no-banking77]
Nothing here asserts a timing; it prints figures.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from cache_seed import read_seed_csv  # noqa: E402
from intents.classifier import TWO_VIEWS  # noqa: E402
from intents.embedder import Embedder  # noqa: E402
from intents.router import Router, train_router  # noqa: E402
from intents.types import Action, Entry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BANK_FAQ = ROOT / "cache_seed" / "examples" / "bank_faq.csv"
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"


def percentiles(samples_ms: list[float]) -> str:
    a = np.asarray(samples_ms)
    return (f"p50 {np.percentile(a, 50):7.3f} ms  p99 {np.percentile(a, 99):7.3f} ms  "
            f"max {a.max():7.3f} ms  (n={len(a)})")


def measure(name: str, router: Router, utterances: list[str]) -> None:
    partials = [" ".join(u.split()[:k]) for u in utterances for k in range(1, len(u.split()) + 1)]
    unique = list(dict.fromkeys(partials))  # cold means never embedded before
    router.embedder.clear_cache()
    cold = [router.route(t).ms for t in unique]
    warm = [router.route(t).ms for t in unique]
    vectors = router.embedder.encode_batch(unique)
    decide = time_decisions(router, unique, vectors)
    print(f"{name}: {len(utterances)} utterances, {len(unique)} distinct partials")
    print(f"  cold   {percentiles(cold)}")
    print(f"  warm   {percentiles(warm)}")
    print(f"  decide {percentiles(decide)}")
    classifier = router.classifier
    if not classifier.reads_text:
        return
    views, mix = classifier._text_views, classifier.mix
    try:
        classifier._text_views = {name: (ScikitLearnNgrams(features.vectorizer), model)
                                  for name, (features, model) in views.items()}
        slow = time_decisions(router, unique, vectors)
        classifier._text_views = {name: view for name, view in views.items() if name != "words"}
        classifier.mix = TWO_VIEWS
        two = time_decisions(router, unique, vectors)
    finally:
        classifier._text_views, classifier.mix = views, mix
    print(f"  decide, scikit-learn n-grams {percentiles(slow)}")
    print(f"  decide, two views  {percentiles(two)}")


def time_decisions(router: Router, texts: list[str], vectors: np.ndarray) -> list[float]:
    decide = []
    for text, vector in zip(texts, vectors):
        start = time.perf_counter()
        router.route_vector(text, vector, start)
        decide.append((time.perf_counter() - start) * 1000)
    return decide


class ScikitLearnNgrams:
    """The n-gram features as the vectorizer's own ``transform`` computes them."""

    def __init__(self, vectorizer: object) -> None:
        self.vectorizer = vectorizer

    def project(self, texts: list[str], weights: np.ndarray) -> np.ndarray:
        return np.asarray(self.vectorizer.transform([str(t) for t in texts]) @ weights.T)


def main() -> None:
    parser = argparse.ArgumentParser(description="routing time per partial")
    parser.add_argument("--utterances", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="threads per embedding")
    parser.add_argument("--backends",
                        default="onnx-int8-dynamic,onnx-int8-dynamic-7bit,onnx-int8,torch")
    parser.add_argument("--rounds", type=int, default=1,
                        help="bank FAQ rounds, the backends in turn in each (a machine's speed "
                             "drifts: interleaved rounds compare them at the same moment)")
    parser.add_argument("--no-banking77", action="store_true", help="the bank FAQ only")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, {args.threads} thread(s) per embedding")
    with (BANKING77 / "dev.csv").open(encoding="utf-8", newline="") as f:
        dev = [r["text"] for r in csv.DictReader(f)]
    step = max(1, len(dev) // args.utterances)
    utterances = dev[::step][:args.utterances]
    plan = read_seed_csv(BANK_FAQ)
    banks: dict[str, Router] = {}
    for backend in args.backends.split(","):
        Embedder(backend=backend)  # the int8 export, once (not part of a start)
        start = time.perf_counter()
        embedder = Embedder(threads=args.threads, backend=backend)
        embedder.warm_up()
        print(f"== {backend}: loaded in {time.perf_counter() - start:.2f} s")
        banks[backend] = train_router(embedder, plan.questions, plan.intents,
                                      plan.entries).router
    for round_ in range(1, args.rounds + 1):
        for backend, bank in banks.items():
            print(f"\n== {backend}, round {round_}")
            measure("bank FAQ router", bank, utterances)
    if args.no_banking77:
        return
    with (BANKING77 / "train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [r["text"] for r in rows], [r["category"] for r in rows]
    entries = {y: Entry(id=y, intent=y, action=Action.ANSWER, answer=y, questions=())
               for y in set(labels)}
    for backend, bank in banks.items():
        print(f"\n== {backend}")
        start = time.perf_counter()
        big = train_router(bank.embedder, texts, labels, entries).router
        print(f"banking77 trained and calibrated in {time.perf_counter() - start:.0f} s")
        measure("banking77 router (10k questions)", big, utterances)

if __name__ == "__main__":
    main()
