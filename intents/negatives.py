"""Out-of-domain negatives: questions no entry of a seed should answer.

Every seed calibrates against them (``intents.calibration``): the judge learns what an
unrelated question looks like from the router's point of view, and the threshold
keeps the share of them served from the cache under a bound. A generic set ships
with the package (``intents/data/negatives.csv``: 1,267 questions from CLINC150's
train split outside banking and credit cards, CC BY 3.0, Larson et al. 2019; built by
``scripts/build_negatives.py``); an operator adds their own (questions callers ask
that the FAQ must never answer) as a CSV with a ``text`` column.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import logging
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from intents.csv_text import csv_rows, field_count_problem, line_problems, without_extra_boms
from intents.embedder import AGREEMENT, Embedder, least_agreement, normalize_text
from intents.model_cache import build_once

log = logging.getLogger("voicegate.negatives")

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
    as the seed CSV is (``cache_seed.validate``, with the same ``csv_rows``): the first line
    that is not blank is the header, its names in any case; a problem is reported on the
    line where its row starts, lines ending in LF, CRLF or a lone CR; every bad row is
    reported at once, reading on after a row that is not CSV (a stray quote) when where the
    next row starts is certain; a quote left open is an error, and ends the check there."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise NegativesError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    # So a bad byte's line counts in ``raw``; a second BOM is skipped as the seed CSV's is.
    raw = without_extra_boms(raw).removeprefix(codecs.BOM_UTF8)
    # Lines that are not UTF-8 or hold a NUL byte (the seed CSV refuses such a line; the csv
    # module reads it), every one of them, numbered as the reader numbers lines.
    bad_lines = line_problems(raw)
    problems: list[tuple[int, str]] = list(bad_lines.items())
    content = raw.decode("utf-8", errors="replace")
    column: int | None = None
    header_line = 0
    texts: list[str] = []
    for read in csv_rows(content, lambda: column is None):
        start, fields = read.start, read.fields
        spanned = [n for n in range(start, read.end + 1) if n in bad_lines]
        if fields is None:
            if column is None or not spanned:  # else reported as not UTF-8 or NUL
                problems.append((start, read.problem))
            if column is None:
                break  # the header could not be read (csv_rows stops there too)
            continue
        if column is None:
            if not any(f.strip() for f in fields):
                continue  # blank lines before the header
            # The first line that is not blank is the header, UTF-8 or not, as the seed
            # CSV's (a bad byte is already told on its line, and read as U+FFFD).
            names = [f.strip().lower() for f in fields]
            if "text" not in names:
                problems.append((start, f"needs a 'text' column (found {fields})"))
                break
            if names.count("text") > 1:  # the seed CSV refuses a column twice too
                problems.append((start, "column 'text' appears twice (only one is read: "
                                        "merge them, or rename one)"))
                break
            column, header_line = names.index("text"), start
            width = len(names)
            continue
        if spanned:
            continue  # already reported as not UTF-8 or NUL
        if not any(f.strip() for f in fields):
            continue  # a blank line, or a spreadsheet's empty row (",,"), as the seed's
        text = (fields[column] if column < len(fields) else "").strip()
        if len(fields) > width:  # "Hi, can you ..." unquoted: cut at its comma
            problems.append((start, field_count_problem(fields, width, "texts")))
        elif not normalize_text(text):
            problems.append((start, "empty text"))
        elif not same_question(text):
            # negatives_for_seed would drop it without a word (its key is empty): say so
            problems.append((start, f"no words, only punctuation ({text!r})"))
        elif len(text) > MAX_TEXT_CHARS:
            problems.append((start, f"text over {MAX_TEXT_CHARS} characters"))
        else:
            texts.append(text)
    if column is None and not problems:
        raise NegativesError(f"{path}: line 1: needs a 'text' column (found nothing)")
    if not texts and not problems:  # as the seed CSV: --negatives was given to add some
        raise NegativesError(f"{path}: line {header_line}: no rows after the header (no "
                             "negatives to add: leave out --negatives to seed with the "
                             "shipped set alone)")
    if problems:
        problems.sort(key=lambda problem: problem[0])  # a line's own problems in their order
        told = [f"line {line}: {reason}" for line, reason in problems]
        raise NegativesError(f"{path}: " + "; ".join(told[:20])
                             + (f" (and {len(told) - 20} more)" if len(told) > 20 else ""))
    return tuple(texts)


def negatives_for_seed(extra: Sequence[str] = (), questions: Sequence[str] = ()
                       ) -> tuple[str, ...]:
    """The generic set plus ``extra``, without any text the seed itself asks as a question
    (``same_question``)."""
    seed = {same_question(q) for q in questions}
    seen: set[str] = set()
    out: list[str] = []
    for text in (*generic_negatives(), *extra):
        key = same_question(text)
        if key and key not in seed and key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)


def same_question(text: str) -> str:
    """``text`` as a question, for telling a negative that is one of the seed's: the words
    alone, in any Unicode form, case or spacing. The embedder gives "when are you open"
    a vector within cosine 0.96 of "When are you open?" (punctuation is a token of its
    own), too near to learn as out-of-domain. Merging too much is cheap: a negative dropped
    is one text of over a thousand; one kept may cost the seed's own question its answer."""
    text = unicodedata.normalize("NFKC", text)
    return normalize_text("".join(c for c in text if not unicodedata.category(c).startswith("P")))


_vectors: dict[tuple[str, str], np.ndarray] = {}
# The shipped set's vectors, per model (``shipped_vectors``).
_shipped: dict[str, tuple[dict[str, int], np.ndarray]] = {}


def embed_negatives(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Their vectors, kept per model and text set: every re-seed and promotion reuses them.
    Those of the shipped set come from ``shipped_vectors``: a new process (a CLI seed, a
    replica's first edit) does not embed its 1,267 questions again."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    key = (embedder.model_name, digest)
    found = _vectors.get(key)
    if found is None:
        if getattr(embedder, "cache_dir", None) is None:  # no model cache to keep them in
            found = embedder.encode_batch(list(texts), batch_size=128)
        else:
            found = _with_shipped(embedder, texts)
        found.setflags(write=False)
        _vectors.clear()  # one set at a time: a process serves one seed's negatives
        _vectors[key] = found
    return found


def _with_shipped(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """``texts``' vectors: the shipped ones' from ``shipped_vectors``, the others embedded."""
    rows, shipped = shipped_vectors(embedder)
    found = np.empty((len(texts), embedder.dim), dtype=np.float32)
    others = [i for i, text in enumerate(texts) if text not in rows]
    for i, text in enumerate(texts):
        if text in rows:
            found[i] = shipped[rows[text]]
    if others:
        found[others] = embedder.encode_batch([texts[i] for i in others], batch_size=128)
    return found


def shipped_vectors(embedder: Embedder) -> tuple[dict[str, int], np.ndarray]:
    """The shipped set's vectors (and each text's row), embedded once per machine and model:
    kept in the model cache dir (``negatives-<key>.npy``, written atomically), ~7 s of a
    seed on two cores otherwise. A file that does not load, or whose vectors the model no
    longer gives (re-embedded, a few texts spread over the set), is embedded again."""
    texts = generic_negatives()
    held = _shipped.get(embedder.model_name)
    if held is not None:
        return held
    key = hashlib.sha256("\n".join((embedder.model_name, *texts)).encode("utf-8")).hexdigest()
    path = embedder.cache_dir / f"negatives-{key[:16]}.npy"
    vectors = _read_vectors(path, (len(texts), embedder.dim))
    if vectors is not None and not least_agreement(embedder, texts, vectors) >= AGREEMENT:
        log.warning("negatives_vectors_stale path=%s", path)
        vectors = None
    if vectors is None:
        vectors = embedder.encode_batch(list(texts), batch_size=128)
        try:
            path.unlink(missing_ok=True)  # build_once keeps a file that loads
            build_once(path, lambda tmp: _write_vectors(tmp, vectors),
                       loads=lambda p: _read_vectors(p, vectors.shape) is not None)
        except OSError as exc:  # a read-only cache dir costs time, never the seed
            log.warning("negatives_vectors_not_kept path=%s error=%s", path, exc)
    vectors.setflags(write=False)
    held = {text: i for i, text in enumerate(texts)}, vectors
    _shipped[embedder.model_name] = held
    return held


def _read_vectors(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, not an array, empty
        return None
    if vectors.shape != shape or vectors.dtype != np.float32 or not np.isfinite(vectors).all():
        return None
    return vectors


def _write_vectors(path: Path, vectors: np.ndarray) -> None:
    with open(path, "wb") as out:  # np.save(path) would add ".npy" to the temp name
        np.save(out, vectors, allow_pickle=False)
