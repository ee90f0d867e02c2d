"""Calibration folds fitted in worker processes (``cross_validate(jobs=)``, what
`voicegate seed` does on every core) read exactly what one process reads, fit the model
this process serves, start no more workers than folds, and a calibration that stops does
not wait for the served fit beside it. Each test failed before its fix (a review)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

import intents.calibration
import intents.router
from intents.calibration import cross_validate
from intents.classifier import IntentClassifier
from tests.intents_support import HashEmbedder, answer_entries


def _seed_like(intents_n: int, per: int, dim: int, negatives_n: int, seed: int = 3
               ) -> tuple[np.ndarray, list[str], list[str], np.ndarray, list[str]]:
    """A seed shaped like a real one: embedder-sized vectors, enough questions an intent
    for the text views and the negatives' class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(intents_n + 1, dim))
    vectors = np.concatenate([c + 0.9 * rng.normal(size=(per, dim))
                              for c in centres[:intents_n]]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"intent{j}" for j in range(intents_n) for _ in range(per)]
    words = [f"w{n}" for n in range(300)]
    texts = [" ".join(rng.choice(words, 6)) + f" intent{j}"
             for j in range(intents_n) for _ in range(per)]
    negatives = (centres[intents_n] + rng.normal(size=(negatives_n, dim))).astype(np.float32)
    negatives /= np.linalg.norm(negatives, axis=1, keepdims=True)
    negative_texts = [" ".join(rng.choice(words, 5)) for _ in range(negatives_n)]
    return vectors, texts, labels, negatives, negative_texts


def test_held_out_signals_of_an_embedder_sized_seed_do_not_depend_on_jobs() -> None:
    """test_router's own promise ("the held-out signals, and so the thresholds it
    promises, must not depend on where a fold ran"), on 384-dimensional vectors instead of
    16: a fold fitted in a loky worker runs its BLAS on cpu_count // jobs threads, one
    fitted in this process on all of them, and the fits' sums come out differently. So
    `voicegate seed` (jobs = the cores) and the same CSV seeded through the admin API, or
    retrained by a replica (jobs=1), calibrate on different numbers."""
    data = _seed_like(intents_n=10, per=25, dim=384, negatives_n=100)
    one, two = (cross_validate(*data, folds=5, jobs=jobs) for jobs in (1, 2))
    assert np.array_equal(one.signals.predicted, two.signals.predicted)
    worst = float(np.abs(one.signals.matrix - two.signals.matrix).max())
    same = bool(np.array_equal(one.signals.matrix, two.signals.matrix))
    assert same, f"the held-out signals differ between jobs=1 and jobs=2 (by up to {worst:.2e})"
    assert np.array_equal(one.negatives.matrix, two.negatives.matrix)


def test_folds_in_worker_processes_fit_the_classifier_this_process_serves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """IntentClassifier.mix is a class attribute a benchmark's ablation sets
    (bench/router_quality.py: arithmetic_mix, two_views), and the served classifier,
    fitted in this process, keeps it. A fold fitted in a worker process imports
    intents.classifier afresh and fits with the shipped MIX: with jobs > 1 the calibration
    is of another model than the one served ("so the fold calibrates the model that
    serves", IntentClassifier.fit)."""
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(4, 16))

    def clusters(count: int, which: slice, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        picked = centres[which][np.arange(count) % len(centres[which])]
        vectors = picked + r.normal(scale=0.3, size=picked.shape)
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    labels = ["card", "pin", "loan"] * 80
    texts = [f"{label} question {i} {'x' * (i % 7)}" for i, label in enumerate(labels)]
    negatives = [f"unrelated {i}" for i in range(25)]
    monkeypatch.setattr(IntentClassifier, "mix", None)  # the ablation's arithmetic mix
    one, two = (cross_validate(clusters(240, slice(0, 3), 1), texts, labels,
                               clusters(25, slice(3, 4), 7), negatives, folds=5, jobs=jobs)
                for jobs in (1, 2))
    same = bool(np.array_equal(one.signals.matrix, two.signals.matrix))
    assert same, "folds fitted in worker processes ignored IntentClassifier.mix set here"


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_calibration_that_stops_does_not_wait_for_the_served_fit(
        monkeypatch: pytest.MonkeyPatch, failure: type[BaseException]) -> None:
    """With jobs > 1 the served classifier is fitted on a thread beside the folds. When
    the calibration stops (Ctrl-C on `voicegate seed`, which promises status 130 and one
    line; a fold's worker dying), train_router leaves its ``with ThreadPoolExecutor`` block,
    whose exit joins the served fit: the interrupt, or the error, reaches the caller only
    once a fit nobody will use has run to its end (the whole seed's classifier: the
    longest fit of the seed). A second Ctrl-C does not help either: the pool's thread is
    joined again at interpreter exit."""
    released, started, finished = threading.Event(), threading.Event(), threading.Event()

    class SlowServedClassifier:
        def fit(self, *args: Any, **kwargs: Any) -> "SlowServedClassifier":
            started.set()
            released.wait(5)  # the whole seed's fit (the bound only ends the test)
            finished.set()
            return self

    def stopped_calibration(*args: Any, **kwargs: Any) -> Any:
        assert started.wait(5)  # the served fit is under way beside the folds
        raise failure()

    monkeypatch.setattr(intents.router, "IntentClassifier", SlowServedClassifier)
    monkeypatch.setattr(intents.router, "cross_validate", stopped_calibration)
    monkeypatch.setattr(intents.router, "negatives_for_seed", lambda extra, questions: ())
    questions = [f"{w} question number {i}" for w in ("card", "pin") for i in range(5)]
    labels = ["card"] * 5 + ["pin"] * 5
    try:
        with pytest.raises(failure):
            intents.router.train_router(HashEmbedder(), questions, labels,  # type: ignore[arg-type]
                                        answer_entries(labels, questions), jobs=2)
        assert not finished.is_set(), (
            f"{failure.__name__} reached the caller only after the served fit had finished")
    finally:
        released.set()


def test_a_seed_on_a_many_core_host_starts_no_more_workers_than_folds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`voicegate seed` passes jobs=usable_cpus() down to Parallel(n_jobs=jobs), and loky
    starts every worker it is allowed at the first task (_adjust_process_count), whatever
    the number of tasks: 5 folds on a 64-CPU host start 64 processes, 59 of which never get
    a fold (here, jobs=8: 8 workers, the 3 idle ones ~40 MB each, the 5 busy ~150 MB). The
    pool is asked for what it will be given: at most one worker a fold."""
    asked: list[int] = []
    real = intents.calibration.Parallel

    def counting_parallel(n_jobs: int = 1, **kwargs: Any) -> Any:
        asked.append(n_jobs)
        return real(n_jobs=1, **kwargs)  # run here: the count is what matters

    monkeypatch.setattr(intents.calibration, "Parallel", counting_parallel)
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(60, 16)).astype(np.float32)
    labels = ["a", "b", "c"] * 20
    cross_validate(vectors, [f"{label} q {i}" for i, label in enumerate(labels)], labels,
                   folds=5, jobs=8)
    assert asked and max(asked) <= 5, f"worker processes asked for 5 folds: {asked}"
