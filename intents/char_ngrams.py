"""Character n-gram TF-IDF features of a routed text, word by word from a cache.

The intent classifier's n-gram model reads a fitted scikit-learn ``TfidfVectorizer``
(``char_wb``: n-grams never span two words). Its ``transform`` costs ~0.7-1.1 ms on
one short text, nearly all of it input checks and Python n-gram loops, while the call loop
routes the same words over and over (every partial repeats the previous one's words).
Because ``char_wb`` n-grams belong to single words, a text's counts are the sum of its
words' counts: each word is analysed once and cached, and a text costs a few dictionary
lookups plus the sublinear-tf/idf/l2 arithmetic. The output is the vectorizer's own matrix
to float32 rounding: the same columns, values within 1e-7 (computed in float64, stored as
float32; ``tests/test_char_ngrams.py`` compares them on Banking77 and odd whitespace).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

# Distinct words kept (callers' words are unbounded; a bank's vocabulary is a few thousand).
WORD_CACHE_SIZE = 65_536

_EMPTY = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
for _array in _EMPTY:
    _array.setflags(write=False)


class CharNgramFeatures:
    """``vectorizer.transform(texts)`` from per-word cached counts."""

    def __init__(self, vectorizer: TfidfVectorizer) -> None:
        # Settings under which a text's counts are not the sum of its words' are refused.
        if vectorizer.analyzer != "char_wb" or vectorizer.norm != "l2" \
                or not vectorizer.use_idf or vectorizer.binary or vectorizer.input != "content" \
                or vectorizer.preprocessor is not None:
            raise ValueError("needs a fitted char_wb TfidfVectorizer on content, with idf, l2 "
                             "norm, counts (not binary) and the default preprocessor")
        self.vectorizer = vectorizer
        self._analyse = vectorizer.build_analyzer()
        self._vocabulary = vectorizer.vocabulary_
        self._idf = np.asarray(vectorizer.idf_, dtype=np.float64)
        self._sublinear = bool(vectorizer.sublinear_tf)
        self._dtype = vectorizer.dtype
        self._width = len(self._idf)
        self._word = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._word_counts)

    def _word_counts(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns, counts) of one word's n-grams that the vocabulary knows."""
        counts: dict[int, int] = {}
        for gram in self._analyse(word):
            column = self._vocabulary.get(gram)
            if column is not None:
                counts[column] = counts.get(column, 0) + 1
        if not counts:
            return _EMPTY
        order = sorted(counts)  # a CSR row's columns in order, as scikit-learn writes them
        columns = np.asarray(order, dtype=np.int64)
        values = np.asarray([counts[c] for c in order], dtype=np.float64)
        columns.setflags(write=False)  # shared by every thread that routes this word
        values.setflags(write=False)
        return columns, values

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
        parts = [self._word(w) for w in text.split()]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return _EMPTY
        if len(parts) == 1:
            columns, counts = parts[0]
        else:
            merged = np.concatenate([c for c, _ in parts])
            columns, where = np.unique(merged, return_inverse=True)
            counts = np.bincount(where, weights=np.concatenate([v for _, v in parts]))
        values = (np.log(counts) + 1.0 if self._sublinear else counts) * self._idf[columns]
        return columns, values / np.sqrt(values @ values)

    def __getstate__(self) -> dict:
        return {"vectorizer": self.vectorizer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vectorizer"])  # type: ignore[misc]
