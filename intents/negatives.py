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
    """An operator's negatives: a CSV with a ``text`` column (other columns ignored). Read
    as the seed CSV is (``cache_seed.validate``): the first line that is not blank is the
    header, its names in any case; a problem is reported on the line where its row starts,
    lines ending in LF, CRLF or a lone CR; a quote left open is an error."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise NegativesError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = len((raw[:exc.start] + b".").splitlines())  # split as the csv reader splits
        raise NegativesError(f"{path}: line {line}: not UTF-8 text") from exc
    # strict: a quote left open is refused, not read as the rest of the file in one text
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    column: int | None = None
    texts: list[str] = []
    problems: list[str] = []
    last_line = 0
    try:
        for fields in reader:
            start, last_line = last_line + 1, reader.line_num
            if column is None:
                if not any(f.strip() for f in fields):
                    continue  # blank lines before the header
                names = [f.strip().lower() for f in fields]
                if "text" not in names:
                    raise NegativesError(f"{path}: line {start}: needs a 'text' column "
                                         f"(found {fields})")
                column = names.index("text")
                continue
            if not fields:
                continue  # a blank line
            text = (fields[column] if column < len(fields) else "").strip()
            if not normalize_text(text):
                problems.append(f"line {start}: empty text")
            elif len(text) > MAX_TEXT_CHARS:
                problems.append(f"line {start}: text over {MAX_TEXT_CHARS} characters")
            else:
                texts.append(text)
    except csv.Error as exc:
        raise NegativesError(f"{path}: line {last_line + 1}: not CSV: {exc}") from exc
    if column is None:
        raise NegativesError(f"{path}: line 1: needs a 'text' column (found nothing)")
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
