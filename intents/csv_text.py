"""What the seed CSV and the negatives CSV readers share: the csv module's limits and errors
said in an operator's words. Here, in ``intents``, because ``cache_seed`` imports ``intents``
and not the reverse."""

from __future__ import annotations

import csv


def allow_cells_of(text: str) -> None:
    """Lift the csv module's cap on a cell (128 Ki characters, process-wide) to ``text``'s
    length: a long cell is then told by the readers' own length checks, on its line, and the
    rows after it are still read, where the cap stopped the file with a reason naming no
    column."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))


def csv_problem(exc: csv.Error) -> str:
    """What a csv.Error means for the row it stopped at (which starts on the line the
    caller names)."""
    if "unexpected end of data" in str(exc):  # strict: the file ended inside quotes
        return ("a quoted field that starts on this line is never closed (a '\"' is missing; "
                "a '\"' inside a quoted field is written '\"\"')")
    return str(exc)
