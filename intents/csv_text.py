"""What the seed CSV and the negatives CSV readers share: the csv module's limits and errors
said in an operator's words. Here, in ``intents``, because ``cache_seed`` imports ``intents``
and not the reverse."""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass
from typing import Callable, Iterator


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


def line_problems(data: bytes) -> dict[int, str]:
    """The lines of ``data`` (numbered as the csv reader numbers them: LF, CRLF or a lone CR
    ends one) that cannot be read as text, each with why: a NUL byte, or bytes that are not
    UTF-8. Every one is found, not only the first."""
    bad: dict[int, str] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        if b"\x00" in raw:
            bad[number] = NUL_LINE
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad[number] = (f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                           "save the file as UTF-8")
    return bad


# How both files are read. skipinitialspace: spaces after a comma are not the next cell's
# start, so a hand-written `"When are you open?", "Nine to five, weekdays"` reads its quoted
# cells as quoted; read with the spaces, the second cell was ` "Nine to five` and ` weekdays"`
# (one cell too many), and `, "Nine to five"` was published quotes and all. The readers strip
# every cell anyway. Only spaces: a tab starting a cell is still seen (CSV injection).
READING: dict[str, bool] = {"strict": True, "skipinitialspace": True}


@dataclass(frozen=True)
class CsvRow:
    """A row as ``csv_rows`` reads it: its first and last lines, and its fields, or (fields
    None) why it is not CSV."""

    start: int
    end: int
    fields: list[str] | None
    problem: str = ""


def csv_rows(text: str, in_header: Callable[[], bool]) -> Iterator[CsvRow]:
    """The rows of ``text`` read by the strict csv reader, each with the lines it spans. A
    row that is not CSV is yielded with why (``not_csv``), and reading starts again at the
    line after it when that can be trusted; else it is the last row. ``in_header()``: no
    header has been read yet (asked when a row is not CSV: the next would be read as the
    header). The seed CSV and the negatives file are both read by it."""
    allow_cells_of(text)  # a long cell is told by the readers' own checks, on its line
    # Physical lines as the csv reader takes them (LF, CRLF, a lone CR): after a row that is
    # not CSV, reading starts again at the line after it.
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(iter(lines), **READING)
    skipped = 0  # lines before the reader's first (read past after a row that is not CSV)
    last_line = 0
    while True:
        start = last_line + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            failed = skipped + reader.line_num  # the line the error is on
            reason, resume = not_csv(exc, lines, start, failed, in_header())
            yield CsvRow(start, failed, None, reason)
            if not resume:
                return
            skipped = last_line = failed
            reader = csv.reader(iter(lines[failed:]), **READING)
            continue
        last_line = skipped + reader.line_num
        yield CsvRow(start, last_line, fields)


def not_csv(exc: csv.Error, lines: list[str], start: int, failed: int,
            in_header: bool) -> tuple[str, bool]:
    """The reason for a row (from line ``start``) the strict csv reader refused on line
    ``failed``, and whether the lines after ``failed`` can still be read: only when the row,
    read leniently, ends with that line. A quote never closed, or one the bad line leaves
    open, makes every later line's cells a guess: the check stops and says so."""
    reason = f"not CSV: {csv_problem(exc)}"
    if "unexpected end of data" in str(exc):  # the reader went on to the file's end
        if any(line.strip() for line in lines[start:]):
            reason += "; the rest of the file was not checked: it is inside that quote"
        return reason, False
    if failed > start:
        reason += f" (a quoted field carries this row on to line {failed}, where the error is)"
    rest = any(line.strip() for line in lines[failed:])
    if in_header:  # the next line read as the header would be a data row
        return reason + ("; the rows were not checked: the header could not be read"
                         if rest else ""), False
    lenient = csv.reader(iter(lines[start - 1:]), **dict(READING, strict=False))
    try:
        next(lenient, None)
    except csv.Error:  # not expected (cells are not capped, NUL is read): stop, as before
        return reason + ("; the rest of the file was not checked" if rest else ""), False
    if start - 1 + lenient.line_num > failed:
        return reason + (f"; the rest of the file was not checked: line {failed} also opens a "
                         "quote it does not close, so where the next row starts is unknown"), False
    return reason, True
