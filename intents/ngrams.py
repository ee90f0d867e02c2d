"""TF-IDF n-gram features of a routed text, without scikit-learn's per-call overhead.

The intent classifier's text views read fitted scikit-learn ``TfidfVectorizer``s: character
2-5 grams within words (``char_wb``) and word 1-2 grams. Their ``transform`` costs
~0.6-1.3 ms on one short text, nearly all of it input checks (and, for characters, Python
n-gram loops), while the call loop routes a text on every partial. Here a text's n-grams
come from the vectorizer's own analyzer, are counted against its vocabulary, and weighted
with its sublinear tf, idf and l2 norm: the output is the vectorizer's own matrix to float
rounding (the same columns, values within 1e-7 for float32; computed in float64, stored in
the vectorizer's dtype; ``tests/test_ngrams.py`` compares them on Banking77 and odd texts).

Characters go further. ``char_wb`` n-grams belong to single words, so a text's counts are
the sum of its words' counts: each word is analysed once and cached (every partial repeats
the previous one's words; a word longer than ``MAX_CACHED_WORD_CHARS`` is analysed each time),
and a text costs a few dictionary lookups plus the arithmetic.
Word n-grams span neighbouring words, so a text is analysed whole (a regular expression and
a bigram join: a few microseconds on a spoken question).
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

# Distinct words kept (callers' words are unbounded; a bank's vocabulary is a few thousand).
WORD_CACHE_SIZE = 65_536
# The longest word kept there: words, not their length, are counted, and a caller may type
# one of 64 KiB (a message without spaces). A longer one is analysed each time it is read.
MAX_CACHED_WORD_CHARS = 64

_EMPTY = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
for _array in _EMPTY:
    _array.setflags(write=False)


def _counted(grams: Iterable[str], vocabulary: Mapping[str, int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """(columns, counts) of the ``grams`` the vocabulary knows, columns in order (as a CSR
    row of scikit-learn's)."""
    counts: dict[int, int] = {}
    for gram in grams:
        column = vocabulary.get(gram)
        if column is not None:
            counts[column] = counts.get(column, 0) + 1
    if not counts:
        return _EMPTY
    order = sorted(counts)
    return (np.asarray(order, dtype=np.int64),
            np.asarray([counts[c] for c in order], dtype=np.float64))


class NgramFeatures:
    """``vectorizer.transform(texts)`` of a fitted ``TfidfVectorizer`` from its analyzer's
    counts; a subclass says how a text's n-grams are counted (``_counts``)."""

    analyzer = ""  # the vectorizer's ``analyzer`` the subclass reproduces

    def __init__(self, vectorizer: TfidfVectorizer) -> None:
        # Settings under which the arithmetic below is not scikit-learn's are refused.
        if vectorizer.analyzer != self.analyzer or vectorizer.norm != "l2" \
                or not vectorizer.use_idf or vectorizer.binary or vectorizer.input != "content":
            raise ValueError(f"needs a fitted {self.analyzer} TfidfVectorizer on content, with "
                             "idf, l2 norm and counts (not binary)")
        self.vectorizer = vectorizer
        self._analyse = vectorizer.build_analyzer()
        self._vocabulary = vectorizer.vocabulary_
        self._idf = np.asarray(vectorizer.idf_, dtype=np.float64)
        self._sublinear = bool(vectorizer.sublinear_tf)
        self._dtype = vectorizer.dtype
        self._width = len(self._idf)

    def _counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns in order, counts) of the text's n-grams that the vocabulary knows."""
        raise NotImplementedError

    def project(self, texts: Sequence[str], weights: np.ndarray) -> np.ndarray:
        """``transform(texts) @ weights.T`` for dense (k, features) ``weights`` (a linear
        model's ``coef_``), without building the sparse matrix: the routed-text path."""
        out = np.zeros((len(texts), weights.shape[0]))
        for row, text in enumerate(texts):
            columns, values = self._text(str(text))
            if len(columns):
                out[row] = weights[:, columns] @ values.astype(self._dtype)
        return out

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        indptr = [0]
        all_columns: list[np.ndarray] = []
        all_values: list[np.ndarray] = []
        for text in texts:
            columns, values = self._text(str(text))
            all_columns.append(columns)
            all_values.append(values)
            indptr.append(indptr[-1] + len(columns))
        return sp.csr_matrix(
            (np.concatenate(all_values).astype(self._dtype) if all_values else [],
             np.concatenate(all_columns) if all_columns else [], indptr),
            shape=(len(indptr) - 1, self._width), dtype=self._dtype)

    def _text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        columns, counts = self._counts(text)
        if not len(columns):
            return _EMPTY
        values = (np.log(counts) + 1.0 if self._sublinear else counts) * self._idf[columns]
        return columns, values / np.sqrt(values @ values)

    def __getstate__(self) -> dict:
        return {"vectorizer": self.vectorizer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vectorizer"])  # type: ignore[misc]


class CharNgramFeatures(NgramFeatures):
    """Character n-grams within words (``char_wb``): summed from per-word cached counts."""

    analyzer = "char_wb"

    def __init__(self, vectorizer: TfidfVectorizer) -> None:
        # A preprocessor of its own could join or split words: the sum would not hold.
        if vectorizer.preprocessor is not None:
            raise ValueError("needs a char_wb TfidfVectorizer with the default preprocessor")
        super().__init__(vectorizer)
        self._word = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._word_counts)

    def _word_counts(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        columns, counts = _counted(self._analyse(word), self._vocabulary)
        columns.setflags(write=False)  # shared by every thread that routes this word
        counts.setflags(write=False)
        return columns, counts

    def _counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._word(w) if len(w) <= MAX_CACHED_WORD_CHARS else self._word_counts(w)
                 for w in text.split()]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return _EMPTY
        if len(parts) == 1:
            return parts[0]
        merged = np.concatenate([c for c, _ in parts])
        columns, where = np.unique(merged, return_inverse=True)
        return columns, np.bincount(where, weights=np.concatenate([v for _, v in parts]))


class WordNgramFeatures(NgramFeatures):
    """Word n-grams (``word``): the whole text through the vectorizer's analyzer."""

    analyzer = "word"

    def _counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return _counted(self._analyse(text), self._vocabulary)
