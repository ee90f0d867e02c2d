"""Out-of-domain negatives: questions no entry of a seed should answer.

Every seed calibrates against them (``intents.calibration``): the judge learns what an
unrelated question looks like from the router's point of view, and the threshold
keeps the share of them served from the cache under a bound. A generic set ships
with the package (``intents/data/negatives.csv``: 1,300 questions from CLINC150's
train split outside banking and credit cards, CC BY 3.0, Larson et al. 2019; built by
``scripts/build_negatives.py``); an operator adds their own (questions callers ask
that the FAQ must never answer) as a CSV with a ``text`` column.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from intents.embedder import Embedder, normalize_text

MAX_TEXT_CHARS = 2000


class NegativesError(ValueError):
    """An operator's negatives file cannot be used; the message names the line."""


@functools.cache
def generic_negatives() -> tuple[str, ...]:
    """The shipped set (CLINC150, CC BY 3.0)."""
    text = resources.files("intents").joinpath("data/negatives.csv").read_text(encoding="utf-8")
    return tuple(row["text"] for row in csv.DictReader(io.StringIO(text)))


def read_negatives_csv(path: str | Path) -> tuple[str, ...]:
    """An operator's negatives: a CSV with a ``text`` column (other columns ignored)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise NegativesError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise NegativesError(f"{path}: line {line}: not UTF-8 text") from exc
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if not reader.fieldnames or "text" not in [f.strip() for f in reader.fieldnames]:
        raise NegativesError(f"{path}: line 1: needs a 'text' column "
                             f"(found {reader.fieldnames or 'nothing'})")
    texts: list[str] = []
    problems: list[str] = []
    try:
        for row in reader:
            value = next((v for k, v in row.items() if k and k.strip() == "text"), None)
            text = (value or "").strip()
            if not normalize_text(text):
                problems.append(f"line {reader.line_num}: empty text")
            elif len(text) > MAX_TEXT_CHARS:
                problems.append(f"line {reader.line_num}: text over {MAX_TEXT_CHARS} characters")
            else:
                texts.append(text)
    except csv.Error as exc:
        raise NegativesError(f"{path}: line {reader.line_num}: not CSV: {exc}") from exc
    if problems:
        raise NegativesError(f"{path}: " + "; ".join(problems[:20])
                             + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))
    return tuple(texts)


def negatives_for_seed(extra: Sequence[str] = (), questions: Sequence[str] = ()
                       ) -> tuple[str, ...]:
    """The generic set plus ``extra``, without any text the seed itself asks as a question."""
    seed = {normalize_text(q) for q in questions}
    seen: set[str] = set()
    out: list[str] = []
    for text in (*generic_negatives(), *extra):
        key = normalize_text(text)
        if key and key not in seed and key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)


_vectors: dict[tuple[str, str], np.ndarray] = {}


def embed_negatives(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Their vectors, kept per model and text set: every re-seed and promotion reuses them."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    key = (embedder.model_name, digest)
    found = _vectors.get(key)
    if found is None:
        found = embedder.encode_batch(list(texts), batch_size=128)
        found.setflags(write=False)
        _vectors.clear()  # one set at a time: a process serves one seed's negatives
        _vectors[key] = found
    return found
