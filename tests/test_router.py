"""Router decisions on the shipped bank FAQ: paraphrases hit, out of scope misses,
``llm``/``handoff`` intents are never served from the cache."""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import re
import shutil
import weakref

import joblib

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import intents.router
from cache_seed import route_lines
from intents.calibration import (NEVER, TRANSCRIPT_TARGET_FACTOR, HeldOut, Thresholds, _loosest,
                                 calibrate, cross_validate, wrong_rate_bound)
from intents.classifier import (OUT_OF_DOMAIN, TWO_VIEWS, IntentClassifier, _char_ngrams,
                                fitted_probabilities)
from intents.embedder import MAX_KEY_CHARS, Embedder
from intents.judge import SIGNALS, Judge, Signals
from intents.loader import LoadedCache, load_cache
from intents.router import Router, models_from_bytes, models_to_bytes
from intents.semantic_cache import SemanticCache
from intents.store import CacheBundle, LocalStore
from intents.types import Action, Entry
from tests.intents_support import (HashEmbedder, _seeded_bank_store, answer_entries,  # noqa: F401
                                   bank_cache, intent_embedder, shared_embedder,
                                   two_view_probabilities, two_view_state)


# Paraphrases written for this test: none of them is in bank_faq.csv.
UNSEEN_PARAPHRASES = [
    ("what time do you open on monday", "opening_hours"),
    ("until when is the branch open", "opening_hours"),
    ("can you give me your routing number", "routing_number"),
    ("I don't remember my online banking password", "reset_online_password"),
    ("I don't remember the PIN for my card", "forgot_pin"),
    ("how do I activate the card you sent me", "activate_card"),
    ("how much cash can I withdraw in a day", "atm_withdrawal_limit"),
    ("what's the fee if I overdraw", "overdraft_fee"),
    ("can I deposit a check using the app", "mobile_check_deposit"),
    ("can I send money using zelle", "zelle"),
    ("is my money FDIC insured", "fdic_insurance"),
    ("I need to update my address because I moved", "update_address"),
    ("what interest rate do you pay on a savings account", "savings_rate"),
    ("I'd like to order a new checkbook", "order_checks"),
]

OUT_OF_SCOPE = [
    "what's the weather like tomorrow",
    "tell me a joke",
    "who won the football game last night",
    "how do I bake sourdough bread",
    "what is the capital of France",
    "book me a flight to Chicago",
    "play some music",
]

AGENT_AND_HUMAN = [
    ("how much money is in my savings account right now", "account_balance", Action.LLM),
    ("please move a hundred dollars into my savings", "transfer_money", Action.LLM),
    # Not "there are payments on my card that I never made": its fraud and recent_transactions
    # are a near tie (0.58), fraud with the blockwise int8 embedder, recent_transactions with
    # both dynamic ones (stop 65): a test of the kernels' rounding, not of the routing rule.
    ("someone made payments with my card", "fraud", Action.HANDOFF),
    ("I'd like to speak with a person please", "speak_to_person", Action.HANDOFF),
]


@pytest.mark.parametrize("text,intent", UNSEEN_PARAPHRASES)
def test_unseen_paraphrase_hits_its_entry(bank_cache: LoadedCache, text: str, intent: str) -> None:  # noqa: F811
    decision = bank_cache.router.route(text)
    assert decision.hit, decision.reason
    assert decision.intent == decision.entry_id == intent
    assert decision.action is Action.ANSWER
    assert decision.answer == bank_cache.entries[intent].answer


@pytest.mark.parametrize("text", OUT_OF_SCOPE)
def test_out_of_scope_is_a_miss_without_intent(bank_cache: LoadedCache, text: str) -> None:  # noqa: F811
    decision = bank_cache.router.route(text)
    assert not decision.hit
    assert decision.intent is None and decision.entry_id is None and decision.answer is None
    assert decision.action is Action.LLM and decision.reason == "out of scope"


@pytest.mark.parametrize("text,intent,action", AGENT_AND_HUMAN)
def test_agent_and_handoff_intents_are_recognised_but_never_hit(
        bank_cache: LoadedCache, text: str, intent: str, action: Action) -> None:  # noqa: F811
    decision = bank_cache.router.route(text)
    assert (decision.intent, decision.action, decision.hit) == (intent, action, False)
    assert decision.answer is None


def test_llm_and_handoff_never_hit_even_with_thresholds_wide_open(
        bank_cache: LoadedCache) -> None:  # noqa: F811
    base = bank_cache.router
    open_thresholds = dataclasses.replace(base.thresholds, min_similarity=-1.0,
                                          hit_confidence=-1.0)
    router = Router(base.embedder, base.classifier, base.judge, base.cache, base.entries,
                    open_thresholds)
    seen_actions = set()
    for entry in bank_cache.entries.values():
        if entry.action is Action.ANSWER:
            continue
        for question in entry.paraphrases:  # the seed's own questions: as close as it gets
            decision = router.route(question)
            seen_actions.add(decision.action)
            assert not decision.hit and decision.answer is None, question
    assert seen_actions == {Action.LLM, Action.HANDOFF}


def test_every_seed_question_routes_to_its_own_entry(bank_cache: LoadedCache) -> None:  # noqa: F811
    for entry in bank_cache.entries.values():
        for question in entry.paraphrases:
            decision = bank_cache.router.route(question)
            assert decision.intent == entry.intent, question
            assert decision.hit == (entry.action is Action.ANSWER), question


def test_empty_text_is_a_miss(bank_cache: LoadedCache) -> None:  # noqa: F811
    decision = bank_cache.router.route("   ")
    assert not decision.hit and decision.intent is None


def test_route_lines_emits_the_route_command_fields(bank_cache: LoadedCache) -> None:  # noqa: F811
    rows = list(route_lines(bank_cache.router, ["is my money FDIC insured\n", "\n",
                                                "tell me a joke\n"]))
    assert [r["text"] for r in rows] == ["is my money FDIC insured", "tell me a joke"]
    assert set(rows[0]) == {"text", "intent", "action", "hit", "spoken_hit", "finished",
                            "entry_id", "answer", "score", "ms"}
    assert rows[0]["hit"] is True and rows[0]["entry_id"] == "fdic_insurance"
    assert rows[1]["hit"] is False and rows[1]["intent"] is None and rows[1]["action"] == "llm"


def test_embedder_vectors_are_unit_length_and_cached(intent_embedder: Embedder) -> None:  # noqa: F811
    misses = intent_embedder.cache_misses
    a = intent_embedder.encode("How do I reset my password, the unit-test edition?")
    b = intent_embedder.encode("  how do i RESET my password, the unit-test EDITION? ")
    # same normalized text: the second one is served from the LRU cache
    assert np.array_equal(a, b) and intent_embedder.cache_misses == misses + 1
    assert a.dtype == np.float32 and abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    batch = intent_embedder.encode_batch(["How do I reset my password, the unit-test edition?"])
    assert np.allclose(batch[0], a, atol=1e-5)


def test_embedding_cache_can_be_off_or_cleared() -> None:
    uncached = Embedder(cache_size=0)  # VOICEGATE_EMBEDDER_CACHE_SIZE=0: every text embedded
    uncached.encode("what are your opening hours")
    uncached.encode("what are your opening hours")
    assert (uncached.cache_hits, uncached.cache_misses) == (0, 2)
    cached = Embedder(cache_size=4)
    cached.encode("what are your opening hours")
    cached.clear_cache()
    cached.encode("what are your opening hours")
    assert (cached.cache_hits, cached.cache_misses) == (0, 2)


def test_a_cached_vector_keeps_only_its_own_floats_alive() -> None:
    """Review (stop 67): a vector kept in the embedder's LRU is its own 384 floats, not a
    view of the batch it was embedded with: a text still cached once the rest of its batch
    was evicted no longer holds the whole batch in memory (a batch is up to 128 texts)."""
    embedder = Embedder(cache_size=1)
    batches: list[weakref.ref] = []
    encode = embedder._encode

    def tracked(texts, batch_size=64):  # type: ignore[no-untyped-def]
        vectors = encode(texts, batch_size=batch_size)
        batches.append(weakref.ref(vectors))
        return vectors

    embedder._encode = tracked
    embedder.encode_many(["what are your opening hours", "where is the nearest branch",
                          "how do i reset my pin"])
    gc.collect()
    assert embedder.is_cached("how do i reset my pin") and len(batches) == 1
    assert batches[0]() is None


def test_a_long_text_is_kept_under_a_short_key() -> None:
    """Review (stop 67): a text longer than ``MAX_KEY_CHARS`` is kept in the LRU under a
    digest of its words, not the words themselves: its bound in texts is then one in memory
    too (a caller's typed messages, up to 64 KiB each, were kept whole as keys: 512 MiB at
    the default size). It is still embedded once, and apart from a text one character off."""
    embedder = Embedder(cache_size=4)
    long = "x" * MAX_KEY_CHARS + " card"
    first = embedder.encode(long)
    assert embedder.is_cached("  " + long.upper()) and not embedder.is_cached(long + "s")
    assert np.array_equal(embedder.encode(long), first)
    assert (embedder.cache_hits, embedder.cache_misses) == (1, 1)
    assert np.allclose(first, embedder.encode_batch([long])[0], atol=1e-5)
    assert not np.allclose(embedder.encode("x" * MAX_KEY_CHARS + " lost"), first, atol=1e-3)
    assert all(len(key) <= 32 for key in embedder._cache)


def test_a_version_from_before_the_completeness_model_learns_it_at_load(
        bank_cache: LoadedCache, intent_embedder: Embedder, tmp_path) -> None:  # noqa: F811
    shutil.copytree(_seeded_bank_store(), tmp_path / "store")  # the answers' audio too
    older = LocalStore(tmp_path / "store")
    _, bundle = older.read()
    classifier, judge, _ = models_from_bytes(bundle.classifier)
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "version")}
    older.publish(CacheBundle(manifest, bundle.vectors, models_to_bytes(classifier, judge)))
    assert models_from_bytes(older.read()[1].classifier)[2] is None
    loaded = load_cache(older, intent_embedder)
    assert loaded.router.completeness is not None
    assert loaded.router.completeness.report == bank_cache.router.completeness.report
    for text in ("the card I ordered", "what are your opening hours", "how do I"):
        assert loaded.router.route(text).finished == bank_cache.router.route(text).finished
        assert loaded.router.completeness.probability(text) == \
            bank_cache.router.completeness.probability(text)


def test_a_version_published_with_two_views_loads_and_routes_as_it_was_calibrated(
        bank_cache: LoadedCache, intent_embedder: Embedder, tmp_path) -> None:  # noqa: F811
    # A replica upgraded in a rolling deploy reads the versions the release before the word
    # view published: their models blob has its layout, and their judge and thresholds hold
    # only for its two views' mix. Loaded as they are (not trained again), they route so.
    shutil.copytree(_seeded_bank_store(), tmp_path / "store")
    older = LocalStore(tmp_path / "store")
    _, bundle = older.read()
    classifier, judge, completeness = models_from_bytes(bundle.classifier)
    assert completeness is not None
    # The bank FAQ is too small for text views: give its version the character model a
    # larger seed's had, in the state that release wrote.
    questions = [q["text"] for q in bundle.manifest["questions"]]
    intents = [q["intent"] for q in bundle.manifest["questions"]]
    vectorizer = _char_ngrams().fit(questions)
    text_model = LogisticRegression(C=10.0, max_iter=3000, random_state=0).fit(
        vectorizer.transform(questions), intents)
    legacy = two_view_state(classifier, TWO_VIEWS["embeddings"], (vectorizer, text_model))
    blob = io.BytesIO()
    joblib.dump({"classifier": legacy, "judge": judge, "completeness": completeness.state()},
                blob)
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "version")}
    older.publish(CacheBundle(manifest, bundle.vectors, blob.getvalue()))
    loaded = load_cache(older, intent_embedder).router
    assert loaded.classifier.views == ("embeddings", "characters")  # not trained again
    assert loaded.thresholds == bank_cache.thresholds

    class TwoViews(IntentClassifier):  # the arithmetic of the release before the word view
        def probabilities(self, vectors, texts=None):  # type: ignore[no-untyped-def]
            return two_view_probabilities(legacy, np.atleast_2d(vectors), list(texts))

    before = Router(intent_embedder, TwoViews.from_state(legacy), judge, loaded.cache,
                    loaded.entries, loaded.thresholds, completeness)
    texts = ([t for t, _ in UNSEEN_PARAPHRASES] + OUT_OF_SCOPE
             + [t for t, _, _ in AGENT_AND_HUMAN] + questions[:40])
    fields = ("intent", "action", "hit", "spoken_hit", "entry_id", "answer", "score",
              "confidence", "margin", "certainty", "finished", "reason")
    now, then = loaded.route_many(texts), before.route_many(texts)
    assert [[getattr(d, f) for f in fields] for d in now] == \
        [[getattr(d, f) for f in fields] for d in then]
    assert sum(d.hit for d in now) >= 10  # a test of the hits, not of misses alone


def test_models_survive_serialisation(bank_cache: LoadedCache,
                                       intent_embedder: Embedder) -> None:  # noqa: F811
    router = bank_cache.router
    classifier, judge, completeness = models_from_bytes(router.models_bytes())
    restored = Router(router.embedder, classifier, judge, router.cache, router.entries,
                      router.thresholds, completeness)
    for text in ("what are your wire fees", "what time do you open on monday", "tell me a joke"):
        a, b = router.route(text), restored.route(text)
        assert (a.intent, a.hit, a.certainty, a.confidence, a.finished) == (
            b.intent, b.hit, b.certainty, b.confidence, b.finished)


def test_fast_probabilities_equal_scikit_learns() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    for labels in (np.array(["a", "b"] * 30), np.array(["a", "b", "c"] * 20)):
        model = IntentClassifier(c=1.0)._model.fit(x, labels)
        assert np.allclose(fitted_probabilities(model, x), model.predict_proba(x), atol=1e-10)


def _signals(predicted: list[str], similarity: list[float], margin: list[float]) -> Signals:
    """Held-out signals where similarity and margin carry the information, as in life."""
    n = len(predicted)
    matrix = np.zeros((n, len(SIGNALS)))
    matrix[:, SIGNALS.index("probability")] = np.clip(np.array(margin) + 0.1, 0, 1)
    matrix[:, SIGNALS.index("margin")] = margin
    matrix[:, SIGNALS.index("nearest_similarity")] = similarity
    matrix[:, SIGNALS.index("intent_similarity")] = similarity
    matrix[:, SIGNALS.index("nearest_agrees")] = 1.0
    # a little noise so the judge's scaling never divides by a zero spread
    matrix += np.random.default_rng(len(predicted)).normal(scale=1e-3, size=matrix.shape)
    labels = np.array(predicted, dtype=object)
    return Signals(labels, matrix[:, 0], np.array(margin, dtype=float),
                   np.array(similarity, dtype=float), labels.copy(), matrix)


def _held_out(true: list[str], predicted: list[str], similarity: list[float],
              margin: list[float], negatives: tuple[list[float], list[float]] = ([], [])
              ) -> HeldOut:
    neg_sim, neg_margin = negatives
    return HeldOut(np.array(true, dtype=object), _signals(predicted, similarity, margin),
                   _signals(["a"] * len(neg_sim), neg_sim, neg_margin), 5)


def test_clopper_pearson_bound() -> None:
    # No mistake in n: the one-sided 95% bound is 1 - 0.05 ** (1/n) (the "rule of three").
    assert wrong_rate_bound(0, 299) == pytest.approx(1 - 0.05 ** (1 / 299), rel=1e-6)
    assert wrong_rate_bound(0, 299) < 0.01 < wrong_rate_bound(0, 298)
    # Published value: 1 wrong in 100 -> upper 95% one-sided bound 4.66%.
    assert wrong_rate_bound(1, 100) == pytest.approx(0.0466, abs=5e-4)
    assert wrong_rate_bound(0, 0) == 1.0 and wrong_rate_bound(5, 5) == 1.0


def test_calibration_bounds_the_wrong_answers_below_target() -> None:
    # 400 right answers close to the seed, 10 wrong ones far from it: the threshold
    # must leave out the wrong ones, and 400 clean hits are enough for a 1% bound.
    n_right, n_wrong = 400, 10
    held = _held_out(["a"] * n_right + ["b"] * n_wrong, ["a"] * (n_right + n_wrong),
                     [0.9] * n_right + [0.5] * n_wrong, [0.8] * n_right + [0.3] * n_wrong,
                     negatives=([0.45] * 700, [0.2] * 700))
    t, judge = calibrate(held, {"a", "b"}, target_wrong_rate=0.01)
    assert t.bounded and t.wrong_rate_bound <= 0.01 and t.expected_wrong_rate == 0.0
    assert t.expected_hit_rate == pytest.approx(n_right / 410, abs=1e-3)
    assert t.out_of_domain_hit_rate == 0.0 and t.negatives == 700
    assert "95% confidence" in t.promise()
    close = judge.confidence(held.signals.matrix[:1])[0]
    far = judge.confidence(held.signals.matrix[-1:])[0]
    assert far < t.hit_confidence <= close


def test_a_small_seed_is_served_on_its_point_estimate_and_says_so() -> None:
    held = _held_out(["a"] * 100, ["a"] * 100, [0.9] * 100, [0.8] * 100,
                     negatives=([0.4] * 50, [0.1] * 50))
    t, _ = calibrate(held, {"a"}, target_wrong_rate=0.01)
    assert not t.bounded and t.expected_hit_rate == 1.0
    assert t.wrong_rate_bound > 0.01 and "too small to bound" in t.promise()
    tiny = _held_out(["a"] * 30, ["a"] * 30, [0.9] * 30, [0.8] * 30,
                     negatives=([0.4] * 50, [0.1] * 50))
    t, _ = calibrate(tiny, {"a"}, target_wrong_rate=0.01)
    assert t.hit_confidence == NEVER and t.expected_hit_rate == 0.0  # 30 hits prove nothing


def test_out_of_domain_questions_that_look_answered_close_the_cache() -> None:
    # Negatives indistinguishable from right answers: serving any hit would serve them too.
    held = _held_out(["a"] * 400, ["a"] * 400, [0.9] * 400, [0.8] * 400,
                     negatives=([0.9] * 400, [0.8] * 400))
    t, _ = calibrate(held, {"a"}, target_wrong_rate=0.01)
    assert t.hit_confidence == NEVER and "no cached answer" in t.promise()


def test_calibration_never_hits_when_nothing_meets_the_target() -> None:
    held = _held_out(["a", "b"] * 50, ["b", "a"] * 50, [0.9] * 100, [0.9] * 100)
    t, _ = calibrate(held, {"a", "b"}, target_wrong_rate=0.01)
    assert t.hit_confidence == NEVER and t.expected_hit_rate == 0.0


def test_route_many_matches_route_one_by_one(bank_cache: LoadedCache) -> None:  # noqa: F811
    texts = ["what time do you open on saturday", "", "how much is in my account",
             "what's the weather like in paris", "what time do you open on saturday"]
    batched = bank_cache.router.route_many(texts)
    single = [bank_cache.router.route(t) for t in texts]
    assert [(d.intent, d.action, d.hit, d.entry_id) for d in batched] == \
        [(d.intent, d.action, d.hit, d.entry_id) for d in single]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(batched, single))


def _clusters(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    picked = centres[np.arange(count) % len(centres)]
    vectors = picked + rng.normal(scale=0.3, size=picked.shape)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_negatives_become_a_class_that_a_large_seed_never_serves() -> None:
    # Two seed intents and a region of unrelated questions: the negatives' class takes
    # that region, and a question it wins is a miss, whatever the other thresholds say.
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16))
    seed = _clusters(rng, centres[:2], 80)  # 40 questions an intent: large enough
    intents = ["card", "pin"] * 40
    negatives = _clusters(rng, centres[2:], 60)
    unrelated = _clusters(rng, centres[2:], 5)
    clf = IntentClassifier().fit(seed, intents, negative_vectors=negatives)
    assert OUT_OF_DOMAIN in clf.classes and clf.intents == ["card", "pin"]
    assert set(clf.scores_arrays(unrelated)[0]) == {OUT_OF_DOMAIN}
    wide_open = Thresholds(
        min_similarity=-1.0, hit_confidence=0.0, target_wrong_rate=0.01, bounded=True,
        confidence_level=0.95, wrong_rate_bound=0.0, expected_hit_rate=1.0,
        expected_wrong_rate=0.0, out_of_domain_target=0.005, out_of_domain_hit_rate=0.0,
        negatives=60, calibration_questions=80, folds=5, hit_similarity=0.0)
    entries = {i: Entry(id=i, intent=i, action=Action.ANSWER, answer=f"about {i}",
                        questions=(i,)) for i in ("card", "pin")}
    router = Router(shared_embedder(), clf, Judge().fit(np.zeros((2, len(SIGNALS))), [1, 1]),
                    SemanticCache(seed, intents), entries, wide_open)
    decisions = router.route_vectors(["q"] * 7, np.concatenate([unrelated, seed[:2]]))
    assert [d.reason for d in decisions[:5]] == ["out of domain"] * 5
    assert all(not d.hit and d.intent is None and d.action is Action.LLM
               for d in decisions[:5])
    assert [d.intent for d in decisions[5:] if d.hit] == ["card", "pin"]
    # The class survives the models blob, and a seed question in its region, asked word
    # for word, is still its operator's answer.
    clf, judge, _ = models_from_bytes(models_to_bytes(clf, router.judge))
    stray = negatives[:1] * 1.0  # a "card" question that reads like the negatives
    clf = IntentClassifier().fit(np.concatenate([seed, stray]), intents + ["card"],
                                 negative_vectors=negatives[1:])
    assert clf.scores_arrays(stray)[0][0] == OUT_OF_DOMAIN
    clf = models_from_bytes(models_to_bytes(clf, judge))[0]
    router = Router(shared_embedder(), clf, judge,
                    SemanticCache(np.concatenate([seed, stray]), intents + ["card"]),
                    entries, wide_open)
    # The stray question's vector under the words of the seed's "card" question: verbatim
    # takes both (the words, and the vector), as a caller saying the seed question does.
    verbatim, near = router.route_vectors(["card", "q"], np.concatenate([stray, negatives[1:2]]))
    assert verbatim.hit and verbatim.intent == "card"
    assert not near.hit and near.reason == "out of domain"
    # A small seed (a few questions an intent) keeps its intents to itself.
    small = IntentClassifier().fit(seed[:10], intents[:10], negative_vectors=negatives)
    assert small.classes == ["card", "pin"]
    with pytest.raises(ValueError, match="out-of-domain label"):
        IntentClassifier().fit(seed[:4], ["card", OUT_OF_DOMAIN] * 2)


def test_each_calibration_fold_learns_every_negative_but_its_own() -> None:
    # A fold that learned the negatives it is then asked about would promise an
    # out-of-domain rate no caller sees.
    trained_on: list[set[str]] = []

    class Spy(IntentClassifier):
        def fit(self, *args, negative_texts=(), **kwargs):  # type: ignore[override]
            trained_on.append(set(negative_texts))
            return super().fit(*args, negative_texts=negative_texts, **kwargs)

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 16))
    seed = _clusters(rng, centres[:2], 200)
    negatives = [f"unrelated {i}" for i in range(23)]
    held = cross_validate(seed, [f"q{i}" for i in range(200)], ["card", "pin"] * 100,
                          _clusters(rng, centres[2:], 23), negatives, folds=5,
                          make_classifier=Spy)
    assert len(trained_on) == 5 and len(held.negatives) == 23
    left_out = [set(negatives) - fold for fold in trained_on]
    assert sorted(n for fold in left_out for n in fold) == sorted(negatives)  # once each


def test_folds_fitted_in_worker_processes_read_what_one_process_reads() -> None:
    # `voicegate seed` fits the folds in worker processes (jobs = its cores): the held-out
    # signals, and so the thresholds it promises, must not depend on where a fold ran.
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(4, 16))
    seed = _clusters(rng, centres[:3], 240)
    labels = ["card", "pin", "loan"] * 80
    texts = [f"{label} question {i}" for i, label in enumerate(labels)]
    negatives = [f"unrelated {i}" for i in range(25)]
    runs = [cross_validate(seed, texts, labels, _clusters(np.random.default_rng(7),
                                                          centres[3:], 25),
                           negatives, folds=5, jobs=jobs) for jobs in (1, 2)]
    one, two = runs
    assert np.array_equal(one.true_intent, two.true_intent)
    for mine, theirs in ((one.signals, two.signals), (one.negatives, two.negatives)):
        assert np.array_equal(mine.predicted, theirs.predicted)
        assert np.array_equal(mine.matrix, theirs.matrix)


def test_transcripts_are_served_at_the_threshold_of_a_stricter_target() -> None:
    # Right answers at every similarity, a few wrong ones among the lower scores: half
    # the target must serve fewer questions, and that threshold is the transcripts'.
    rng = np.random.default_rng(5)
    right_sim = list(rng.uniform(0.5, 0.95, 3000))
    wrong_sim = list(rng.uniform(0.5, 0.7, 30))
    sims = right_sim + wrong_sim
    held = _held_out(["a"] * 3030, ["a"] * 3000 + ["b"] * 30, sims,
                     [s - 0.1 for s in sims], negatives=([0.3] * 700, [0.1] * 700))
    t, _ = calibrate(held, {"a", "b"}, target_wrong_rate=0.01)
    half, _ = calibrate(held, {"a", "b"}, target_wrong_rate=0.01 * TRANSCRIPT_TARGET_FACTOR)
    assert t.bounded and half.bounded and half.hit_confidence > t.hit_confidence
    assert t.transcript_strict and t.spoken_confidence == half.hit_confidence
    assert t.transcript_expected_hit_rate == half.expected_hit_rate < t.expected_hit_rate
    assert "spoken questions need more certainty" in t.promise()
    # A cache calibrated before transcripts had a threshold serves them as typed text.
    old = Thresholds.from_json({k: v for k, v in t.as_json().items()
                                if not k.startswith("transcript")})
    assert old.spoken_confidence == old.hit_confidence == t.hit_confidence


def test_a_seed_too_small_for_the_stricter_promise_serves_transcripts_as_typed_text() -> None:
    # 60 clean hits: enough for the 1% point estimate (50), not for 0.5% (100).
    held = _held_out(["a"] * 60, ["a"] * 60, [0.9] * 60, [0.8] * 60,
                     negatives=([0.4] * 50, [0.1] * 50))
    t, _ = calibrate(held, {"a"}, target_wrong_rate=0.01)
    assert t.hit_confidence < NEVER and not t.transcript_strict
    assert t.spoken_confidence == t.hit_confidence
    assert "spoken questions are served at the same threshold: this seed gives no stricter" \
        in t.promise()


def test_a_transcript_needs_the_spoken_threshold_but_a_seed_question_word_for_word_does_not(
) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(2, 16))
    seed = _clusters(rng, centres, 80)
    intents = ["card", "pin"] * 40
    clf = IntentClassifier().fit(seed, intents)
    strict = Thresholds(
        min_similarity=-1.0, hit_confidence=0.0, target_wrong_rate=0.01, bounded=True,
        confidence_level=0.95, wrong_rate_bound=0.0, expected_hit_rate=1.0,
        expected_wrong_rate=0.0, out_of_domain_target=0.005, out_of_domain_hit_rate=0.0,
        negatives=0, calibration_questions=80, folds=5, hit_similarity=0.0,
        transcript_confidence=NEVER, transcript_strict=True)
    entries = {i: Entry(id=i, intent=i, action=Action.ANSWER, answer=f"about {i}",
                        questions=(i,)) for i in ("card", "pin")}
    router = Router(shared_embedder(), clf, Judge().fit(np.zeros((2, len(SIGNALS))), [1, 1]),
                    SemanticCache(seed, intents), entries, strict)
    near = _clusters(rng, centres[:1], 1)
    # seed[0] is a "card" question; its entry's question is the word "card".
    typed, verbatim = router.route_vectors(["q", "card"], np.concatenate([near, seed[:1]]))
    assert typed.hit and typed.spoken_hit is False
    heard = typed.as_spoken()
    assert (heard.hit, heard.answer, heard.reason) == (
        False, None, "not sure enough of a transcript")
    assert (heard.intent, heard.entry_id) == (typed.intent, typed.entry_id)
    assert verbatim.spoken_hit and verbatim.as_spoken() is verbatim


def test_route_command_says_which_stdin_line_is_not_utf8_and_routes_the_rest(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A Latin-1 line piped into `voicegate route` (a Windows export) ended the command on
    # a TypeError traceback from the tokenizer (Python hands the bad byte over as a lone
    # surrogate), and nothing said which line. Now: that line is named on stderr and
    # skipped, the others are routed, and the status is 1. A BOM on the first line is not
    # part of its text.
    import sys

    import gateway.runtime
    from gateway import cli

    monkeypatch.setattr(gateway.runtime, "build_embedder", lambda settings, **_: shared_embedder())
    monkeypatch.delenv("VOICEGATE_CONFIG", raising=False)
    lines = "\ufeffwhen are you open\r\ncafé near the branch\nis my money FDIC insured\n"
    data = lines.replace("café", "caf\udce9").encode("utf-8", "surrogateescape")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8",
                                                       errors="surrogateescape"))
    try:
        code = cli.main(["route", "--store", _seeded_bank_store()])
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"`voicegate route` with a Latin-1 line raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    assert code == 1
    assert err == ("voicegate route: line 2: not UTF-8 (byte 0xe9 at column 4), skipped; "
                   "give UTF-8 text\n")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["when are you open", "is my money FDIC insured"]


def test_route_command_whose_reader_stops_reading_stops_quietly(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Review (stop 66): `voicegate route < questions.txt | head -1` ended on a
    BrokenPipeError traceback once head had exited (the next line's print). The command now
    stops routing at once, says nothing (the reader asked for no more), and exits 1: not all
    of its output was read."""
    import sys

    import gateway.runtime
    from gateway import cli
    from tests.fakes.reader_gone import ReaderGone

    monkeypatch.setattr(gateway.runtime, "build_embedder", lambda settings, **_: shared_embedder())
    monkeypatch.delenv("VOICEGATE_CONFIG", raising=False)
    lines = "".join(f"when are you open on day {n}\n" for n in range(50)).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    stdout = ReaderGone()
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        code = cli.main(["route", "--store", _seeded_bank_store()])
    except BrokenPipeError as exc:
        pytest.fail(f"`voicegate route | head -1` raised {exc!r}")
    assert code == 1
    assert capsys.readouterr().err == ""
    assert json.loads("".join(stdout.out))["text"] == "when are you open on day 0"
    assert stdout.refused == 1  # no line routed after the reader was gone


def _stated_precision(promise: str) -> float:
    found = re.search(r"at least ([0-9.]+)% of cached answers are right", promise)
    assert found, promise
    return float(found.group(1)) / 100.0


@pytest.mark.parametrize("target,n", [(0.0025, 1200), (0.0125, 240)])
def test_the_promise_never_states_more_precision_than_the_bound_established(
        target: float, n: int) -> None:
    # Review: 1,200 clean held-out hits bound the wrong answers at 0.249%, under a 0.25%
    # target: the calibration established 99.75% at 95% confidence, and the report must not
    # say more (it said "at least 99.8%", the target formatted with .1%, rounded up).
    held = HeldOut(np.array(["a"] * n, dtype=object), _signals(["a"] * n, [0.9] * n, [0.8] * n),
                   _signals(["a"] * 700, [0.45] * 700, [0.2] * 700), 5)
    t, _ = calibrate(held, {"a"}, target_wrong_rate=target)
    assert t.bounded and t.wrong_rate_bound <= target
    stated = _stated_precision(t.promise())
    assert stated <= 1.0 - t.wrong_rate_bound + 1e-12, (
        f"states {stated:.2%} with a bound on wrong answers of {t.wrong_rate_bound:.3%}: "
        f"{t.promise()[:90]}")


def test_a_seed_whose_report_says_no_answer_is_served_serves_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Review: ten questions an intent, too few held-out hits for any threshold (NEVER), and
    # the report says "no cached answer is served ... every question goes to the agent". The
    # router still answered a seed question asked word for word from the cache (its
    # VERBATIM_SIMILARITY path bypassed the judge's threshold, NEVER included).
    monkeypatch.setattr(intents.router, "negatives_for_seed",
                        lambda extra, questions: tuple(f"weather in town {c}" for c in "abcdefghij"))
    questions = [f"when does the {w} branch open" for w in
                 ("north", "south", "east", "west", "main", "city", "old", "new", "airport",
                  "harbour")]
    questions += [f"how do I block my {w} card" for w in
                  ("debit", "credit", "stolen", "lost", "old", "new", "virtual", "business",
                   "travel", "joint")]
    labels = ["hours"] * 10 + ["block"] * 10
    router = intents.router.train_router(HashEmbedder(), questions, labels,  # type: ignore[arg-type]
                                         answer_entries(labels, questions)).router
    promise = router.thresholds.promise()
    assert "every question goes to the agent" in promise
    served = [d.text for d in router.route_many(questions) if d.hit]
    assert served == [], f"report: {promise[:60]}...; yet served {len(served)}: {served[:2]}"


def _open_thresholds(hit: float) -> Thresholds:
    return Thresholds(
        min_similarity=-1.0, hit_confidence=hit, target_wrong_rate=0.01, bounded=True,
        confidence_level=0.95, wrong_rate_bound=0.0, expected_hit_rate=1.0,
        expected_wrong_rate=0.0, out_of_domain_target=0.005, out_of_domain_hit_rate=0.0,
        negatives=0, calibration_questions=10, folds=5, hit_similarity=0.0)


def test_verbatim_override_never_serves_a_text_two_intents_hold_word_for_word() -> None:
    # Review (stop 59): two intents hold questions the embedder cannot tell apart (accents are stripped by the
    # uncased tokenizer: cosine 1.0; the seed's duplicate check, NFKC + case + spacing, lets
    # them through). Each text is then exactly as much the other intent's question as its
    # own: the judge, which sees a 50/50 classifier and no lead, would not serve it. The
    # VERBATIM_SIMILARITY override only compares with the top-1 neighbour's intent (faiss
    # breaks the tie by row), so it serves one intent's answer to the other intent's own
    # question, word for word, past the judge.
    embedder = shared_embedder()
    wrong = []
    # Whichever of the two the classifier leans to (a paraphrase more), one text is served
    # the other intent's answer when faiss's tie-break names the intent it leans to.
    for leaning in ("branch_montreal", "branch_quebec"):
        questions = ["is there a branch in montreal", "where is your branch in montreal",
                     "is there a branch in montréal", "which branch in montréal is closest",
                     "how do I block my card", "my card was stolen, block it",
                     "do you have a branch in that city"]
        intents = ["branch_montreal", "branch_montreal", "branch_quebec", "branch_quebec",
                   "block_card", "block_card", leaning]
        vectors = embedder.encode_batch(questions)
        assert float(vectors[0] @ vectors[2]) >= 0.9999  # the premise: the same vector
        entries = {i: Entry(id=i, intent=i, action=Action.ANSWER, answer=f"about {i}",
                            questions=tuple(q for q, y in zip(questions, intents) if y == i))
                   for i in dict.fromkeys(intents)}
        classifier = IntentClassifier().fit(vectors, intents)
        judge = Judge().fit(np.zeros((2, len(SIGNALS))), [1, 1])  # confidence: probability
        router = Router(embedder, classifier, judge, SemanticCache(vectors, intents), entries,
                        _open_thresholds(0.9))
        for text, own in ((questions[0], "branch_montreal"), (questions[2], "branch_quebec")):
            decision = router.route(text)
            if decision.hit and decision.intent != own:
                wrong.append((text, decision.intent, round(decision.certainty, 3),
                              decision.reason))
    assert not wrong, f"another intent's answer served as 'verbatim': {wrong}"


def test_a_stricter_target_never_falls_back_to_a_looser_threshold_on_a_seed_that_can_bound_it(
) -> None:
    """Review (stop 64): a target whose bound was not met fell back on the point estimate
    whatever the seed's size, so on a seed large enough to bound it a stricter promise could
    get a looser router: here 0.3% served all 2,000 held-out hits (5 wrong) where 0.5%, met
    with its bound, served 1,981 (4 wrong). The point estimate is for seeds too small to
    bound the target at all; a seed that can bound it and does not meet it serves nothing."""
    n = 2000
    scores = np.linspace(1.0, 0.0, n)
    wrong = np.zeros(n, dtype=bool)
    wrong[[400, 1000, 1600, 1980, 1981]] = True
    assert wrong_rate_bound(0, n) <= 0.003  # this seed can bound either target
    loose = _loosest(scores, wrong, np.array([]), 0, 0.005, 1.0, 0.95)
    assert loose is not None and loose[3] and loose[1] == 1981
    assert _loosest(scores, wrong, np.array([]), 0, 0.003, 1.0, 0.95) is None
    # A seed too small to bound the target still falls back on its point estimate.
    small = _loosest(scores[:250], wrong[:250], np.array([]), 0, 0.01, 1.0, 0.95)
    assert wrong_rate_bound(0, 250) > 0.01
    assert small is not None and not small[3] and small[1] == 250


def test_a_seed_that_could_bound_the_target_but_misses_it_serves_nothing_and_says_why() -> None:
    """Review (stop 64): 1,008 held-out questions, 8 of them wrong and indistinguishable from
    the right ones: enough to bound 1%, wrong too often for it (bound 1.4%). The cache served
    every one on the point estimate (99.2% right) and told the operator the seed was "too
    small to bound the precision" and to add paraphrases."""
    held = _held_out(["a"] * 1000 + ["b"] * 8, ["a"] * 1008, [0.9] * 1008, [0.8] * 1008,
                     negatives=([0.4] * 700, [0.1] * 700))
    t, _ = calibrate(held, {"a", "b"}, target_wrong_rate=0.01)
    assert t.hit_confidence == NEVER and t.expected_hit_rate == 0.0
    assert t.bounded  # not a seed too small: one that could bound the promise
    promise = t.promise()
    assert "no cached answer is served" in promise and "too small" not in promise
    assert "wrong too often" in promise and "loosen the target" in promise
    assert "spoken" not in promise  # nothing is served, typed or spoken


def test_a_seed_question_asked_word_for_word_is_never_served_another_intents_answer() -> None:
    """Review (stop 66): a seed question asked word for word is "that question: answered
    whatever the judge's margin (the operator's own label)" (docs/architecture.md). The
    router kept that promise only when the negatives' class won the text: when another
    intent won it (a "card" question whose vector reads like the "pin" questions), it was
    judged as that intent and, the judge sure, served the "pin" answer to the operator's
    own "card" question."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(2, 16))
    seed = _clusters(rng, centres, 80)
    intents = ["card", "pin"] * 40
    stray = seed[1:2] * 1.0  # a "card" question among the "pin" ones
    vectors = np.concatenate([seed, stray])
    labels = intents + ["card"]
    clf = IntentClassifier().fit(vectors, labels)
    assert clf.scores_arrays(stray)[0][0] == "pin"  # the premise: another intent wins it
    entries = {
        "card": Entry(id="card", intent="card", action=Action.ANSWER, answer="about card",
                      questions=("my card is stuck in the machine",)),
        "pin": Entry(id="pin", intent="pin", action=Action.ANSWER, answer="about pin",
                     questions=("how do I change my pin",)),
    }
    judge = Judge().fit(np.zeros((2, len(SIGNALS))), [1, 1])  # confidence: probability
    router = Router(shared_embedder(), clf, judge, SemanticCache(vectors, labels), entries,
                    _open_thresholds(0.5))
    own, other = router.route_vectors(["My card is stuck in the machine", "q"],
                                      np.concatenate([stray, stray]))
    assert own.intent == "card" and own.hit and own.answer == "about card", own
    assert other.intent == "pin"  # words of no seed question: the classifier's intent
