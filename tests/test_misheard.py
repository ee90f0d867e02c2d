"""Misheard copies of a seed (intents.misheard) and where calibration and training use them."""

from __future__ import annotations

import re

import numpy as np
import pytest

import intents.router
from intents.calibration import MisheardCopies, cross_validate, fitted_rows
from intents.classifier import IntentClassifier
from intents.misheard import misheard_copies
from intents.types import Action, Entry
from tests.intents_support import HashEmbedder, answer_entries

SEED = [
    "can I pay in a cheque at the branch",
    "how do I check my balance",
    "my card was declined at the ATM",
    "the cash machine kept my card",
    "I want a refund for this payment",
    "why was the payment refunded twice",
    "where is my new card",
    "how long does a transfer take",
] * 5


def _words(texts: list[str]) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z']+", t.lower())}


def test_a_copy_only_drops_or_swaps_words_for_ones_the_seed_says() -> None:
    copies = misheard_copies(SEED, rate=0.5)
    assert len(copies) == len(SEED)
    assert copies != SEED  # at half the words something was misheard
    assert _words(copies) <= _words(SEED)  # nothing the seed does not say
    assert all(c.strip() for c in copies)


def test_copies_are_the_same_every_time_and_rate_zero_is_the_seed() -> None:
    assert misheard_copies(SEED) == misheard_copies(SEED)
    assert misheard_copies(SEED, rate=0.0) == SEED


def test_a_swapped_word_sounds_or_is_spelt_like_the_word_it_replaces() -> None:
    # At rate 1 every word is dropped or swapped: "cheque" can only become "check" (same
    # Metaphone code), never a word that neither sounds nor is spelt like it.
    copies = misheard_copies(["cheque check"] * 50, rate=1.0)
    for copy in copies:
        for word in copy.split():
            assert word in {"cheque", "check"}
    assert any("check" in c.split() for c in copies)


def test_a_rate_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="share of words"):
        misheard_copies(SEED, rate=1.5)


def test_each_fold_fits_the_copies_of_its_training_questions_only() -> None:
    rng = np.random.default_rng(3)
    n = 40
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    texts = [f"question {i}" for i in range(n)]
    labels = ["a", "b"] * (n // 2)
    copies = MisheardCopies(
        embed=lambda made: np.stack([vectors[int(t.split()[1])] + 100.0 for t in made]),
        make=lambda fitted: [t.replace("question", "copy") for t in fitted])
    folds: list[tuple[list[str], list[str]]] = []  # each fold's (fitted, scored) texts

    class Spy(IntentClassifier):
        def fit(self, v, y, t=None, **kwargs):  # type: ignore[override]
            folds.append((list(t), []))
            assert len(v) == len(y) == len(t)
            return super().fit(v, y, t, **kwargs)

        def probabilities(self, v, t=None):  # type: ignore[override]
            folds[-1][1].extend(t)
            return super().probabilities(v, t)

    cross_validate(vectors, texts, labels, folds=4, make_classifier=Spy, misheard=copies)
    assert len(folds) == 4
    for fitted, scored in folds:
        questions = [t for t in fitted if t.startswith("question")]
        assert sorted(t for t in fitted if t.startswith("copy")) == sorted(
            q.replace("question", "copy") for q in questions)
        assert scored and not [t for t in scored if t.startswith("copy")]  # never held out
        held_out_copies = {t.replace("question", "copy") for t in scored}
        assert not held_out_copies & set(fitted)  # a held-out question's copy would leak it
    assert sorted(t for _, scored in folds for t in scored) == sorted(texts)  # each once


def test_fitted_rows_pairs_every_question_with_its_copy() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    index = {"P": 0, "Q": 1, "R": 2}
    copies = MisheardCopies(embed=lambda made: -vectors[[index[t] for t in made]],
                            make=lambda fitted: [t.upper() for t in fitted])
    v, y, t = fitted_rows(vectors, np.array(["a", "b", "c"], dtype=object), ["p", "q", "r"],
                          np.array([0, 2]), copies)
    assert t == ["p", "r", "P", "R"] and list(y) == ["a", "c", "a", "c"]
    assert np.array_equal(v, np.concatenate([vectors[[0, 2]], -vectors[[0, 2]]]))
    # A copy that is, word for word, a held-out question is not fitted (it would leak it).
    v, y, t = fitted_rows(vectors, np.array(["a", "b", "c"], dtype=object), ["p", "q", "r"],
                          np.array([0, 2]), copies, held_out=["r"])
    assert t == ["p", "r", "P"] and list(y) == ["a", "c", "a"] and len(v) == 3
    v, y, t = fitted_rows(vectors, np.array(["a", "b", "c"], dtype=object), ["p", "q", "r"],
                          np.array([1]), None)
    assert t == ["q"] and list(y) == ["b"]


class _CountingEmbedder:
    """Vectors from a text's words (hashing), and the texts it was asked to embed."""

    model_name = "counting-test-embedder"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def encode_batch(self, texts, batch_size: int = 64):  # type: ignore[no-untyped-def]
        self.asked.extend(texts)
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, hash(word) % 32] += 1.0
            out[row] /= max(np.linalg.norm(out[row]), 1e-6)
        return out


@pytest.mark.parametrize("per_intent,copied", [(25, True), (5, False)])
def test_only_a_seed_with_enough_questions_an_intent_is_fitted_with_copies(
        monkeypatch: pytest.MonkeyPatch, per_intent: int, copied: bool) -> None:
    made: list[int] = []
    real = intents.router.misheard_copies

    def counting(texts):  # type: ignore[no-untyped-def]
        made.append(len(texts))
        return real(texts)

    monkeypatch.setattr(intents.router, "misheard_copies", counting)
    monkeypatch.setattr(intents.router, "negatives_for_seed", lambda extra, questions: ())
    questions = [f"{w} question number {i}" for w in ("card", "pin") for i in range(per_intent)]
    labels = ["card"] * per_intent + ["pin"] * per_intent
    entries = {i: Entry(id=i, intent=i, action=Action.ANSWER, answer=f"about {i}",
                        questions=tuple(q for q, y in zip(questions, labels) if y == i))
               for i in ("card", "pin")}
    embedder = _CountingEmbedder()
    intents.router.train_router(embedder, questions, labels, entries)  # type: ignore[arg-type]
    # The whole seed (its copies serve most folds), then each fold's training questions.
    assert made == ([len(questions)] + [len(questions) * 4 // 5] * 5 if copied else [])


def test_a_copy_depends_on_its_question_and_the_vocabulary_alone() -> None:
    # So a fold's copies are those of the whole seed except where its vocabulary differs,
    # and each is embedded once.
    whole = misheard_copies(SEED[:8], rate=0.5)
    assert misheard_copies(SEED[:8][::-1], rate=0.5) == whole[::-1]


def test_a_folds_copy_is_the_whole_seeds_wherever_the_fold_says_its_words() -> None:
    # So the whole seed's copies, embedded first, serve every fold but where the word
    # swapped in is one only the fold's held-out questions say. A swap picked by index
    # among the alternatives changed with every alternative a fold lacked (and so did
    # every draw after it): about 3,200 more copies of Banking77 train were embedded.
    # "cash" may be heard as any of ten words only one question each says: a fold lacks
    # some of them.
    seed = [f"can I {a} my {b} {i}" for a in ("check", "cheque") for b in ("cash", "card")
            for i in range(10)]
    seed += [f"the {word} is here" for word in
             ("cask", "cast", "casa", "cass", "case", "cash", "cant", "cane", "cape", "care")]
    whole = dict(zip(seed, misheard_copies(seed, rate=0.6)))
    rng = np.random.default_rng(8)
    compared = 0
    for _ in range(20):
        fold = [t for t in seed if rng.random() < 0.7]
        says = _words(fold)
        for text, copy in zip(fold, misheard_copies(fold, rate=0.6)):
            if set(whole[text].split()) <= says:
                compared += 1
                assert copy == whole[text], (text, copy, whole[text])
    assert compared > 150


def test_each_distinct_copy_is_embedded_once_however_many_folds_make_it() -> None:
    embedded: list[str] = []

    def embed(texts: list[str]) -> np.ndarray:
        embedded.extend(texts)
        return np.ones((len(texts), 4), dtype=np.float32)

    copies = MisheardCopies(embed, make=lambda fitted: [f"copy of {t}" for t in fitted])
    copies.of(["a", "b", "c"])
    copies.of(["b", "c", "d"])
    assert embedded == ["copy of a", "copy of b", "copy of c", "copy of d"]


_WORDS = re.compile(r"[a-z']+")


def test_a_folds_copies_never_carry_a_word_only_its_held_out_questions_say(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Review: copies made once from the whole seed let a copy of a training question swap
    # in a word only a held-out question of that fold says ("cheque" for "check"): the
    # fold's classifier was fitted on the held-out question's own words. On Banking77 train,
    # 258 held-out questions met a word their fold knew only from such copies.
    fitted: list[list[str]] = []

    class Spy(IntentClassifier):
        def fit(self, vectors, intents_, texts=None, **kwargs):  # type: ignore[override]
            fitted.append(list(texts or ()))
            return super().fit(vectors, intents_, texts, **kwargs)

    real = intents.router.cross_validate

    def spying(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real(*args, make_classifier=Spy, **kwargs)

    monkeypatch.setattr(intents.router, "cross_validate", spying)
    monkeypatch.setattr(intents.router, "negatives_for_seed", lambda extra, questions: tuple(
        f"weather in town {c}" for c in "abcdefghij"))
    things = ["savings", "salary", "refund", "rent", "gift", "loan", "bonus", "prize", "tax",
              "wage", "fee", "sale", "debt", "fund", "tip"]
    questions = [f"how do I deposit a check for my {t} {u}" for t in things
                 for u in ("today", "now")][:29] + ["where can I pay in a cheque"]
    questions += [f"I forgot my pin code {t} {u}" for t in things for u in ("again", "twice")][:30]
    labels = ["deposit"] * 30 + ["pin"] * 30
    intents.router.train_router(HashEmbedder(), questions, labels,  # type: ignore[arg-type]
                                answer_entries(labels, questions))
    folds = fitted  # the calibration folds' classifiers (the final one is not a Spy)
    assert len(folds) == 5
    leaks = []
    for texts in folds:
        originals, copies = texts[:len(texts) // 2], texts[len(texts) // 2:]
        held_out = [q for q in questions if q not in set(originals)]
        known = {w for t in originals for w in _WORDS.findall(t.lower())}
        only_held_out = {w for q in held_out for w in _WORDS.findall(q.lower())} - known
        leaks += [(w, c) for c in copies for w in _WORDS.findall(c.lower())
                  if w in only_held_out]
    assert leaks == [], f"fitted copies carry held-out words: {leaks[:3]}"
