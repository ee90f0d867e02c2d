"""What the seed CSV and the negatives CSV readers share: the csv module's limits and errors
said in an operator's words. Here, in ``intents``, because ``cache_seed`` imports ``intents``
and not the reverse."""

from __future__ import annotations

import codecs
import csv


def without_extra_boms(data: bytes) -> bytes:
    """``data`` with one UTF-8 BOM at most at its start: a second one (an editor that adds a
    BOM to text already carrying one) is no part of the header's first name, and was told
    as "unknown column '\\ufeffquestion'", a character the operator cannot see."""
    while data.startswith(codecs.BOM_UTF8 * 2):
        data = data[len(codecs.BOM_UTF8):]
    return data


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
    if "expected after" in str(exc):  # strict: "',' expected after '\"'"
        return ("text follows a quoted field's closing '\"' before the next comma (a cell "
                "holding a '\"' is quoted whole, each '\"' in it doubled: \"say \"\"hi\"\" "
                "now\")")
    return str(exc)


NUL_LINE = "not CSV: the line contains a NUL byte (a binary file?)"


def field_count_problem(fields: list[str], width: int, cells: str = "fields") -> str:
    """Why a row of ``fields`` does not fit a header of ``width`` columns, with the advice its
    shape calls for. Extra fields all empty are likely a trailing comma, but an unquoted
    comma in a cell of a row whose last columns are empty looks the same: removing a comma
    would then shift the cells, so the advice names both."""
    found = f"expected {width} fields as in the header, found {len(fields)}"
    extra = len(fields) - width
    if extra < 0:
        return f"{found} (write a comma for every column, empty cells too)"
    if not any(f.strip() for f in fields[width:]):
        what = ("the last one empty: a trailing comma? remove it" if extra == 1 else
                f"the last {extra} empty: trailing commas? remove them")
        return f"{found}, {what} (but if a cell holds a comma, quote that cell instead)"
    return f"{found} (quote {cells} with commas)"
