"""Read and validate a seed CSV; turn its rows into cache entries.

Every row is checked before anything is rendered or published, and every bad row
is reported with its line number and reason: one bad row publishes nothing.

Columns: ``question`` and ``answer`` are required, ``intent`` and ``action``
optional; other columns (notes, ids) are ignored, but one named almost like a missing
known column (``actions``, ``qustion``) is refused: its values would be lost. Rows with the same intent, or (without an intent) the same answer, are
paraphrases of one entry. ``action`` defaults to ``answer`` when the entry has an
answer (on any of its rows) and ``llm`` when it has none; rows without an answer
still train the classifier, so they need an intent (or join an entry by intent).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import html.entities
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

from intents.csv_text import csv_rows, field_count_problem, line_problems, without_extra_boms
from intents.embedder import normalize_text
from intents.negatives import same_question
from intents.types import Action, Entry, entry_id_for

# A plain decimal: ASCII digits and one point. float() also takes an exponent (5e-2), spaces,
# underscores (0.0_5), a sign, other scripts' digits (Arabic-Indic, full-width), inf and nan.
_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_target_wrong_rate(text: str) -> float:
    """A seed's target wrong-answer rate as an operator writes it (``voicegate seed
    --target-wrong-rate``, the admin API's ``target_wrong_rate``): a plain decimal number
    (digits, one point) strictly between 0 and 1. Raises ValueError saying what was given."""
    value = float(text) if _PLAIN_DECIMAL.fullmatch(text) else -1.0
    if not 0.0 < value < 1.0:
        raise ValueError(f"must be a number between 0 and 1 (exclusive), written in digits "
                         f"with one point, e.g. 0.01; not {text[:40]!r}")
    return value


REQUIRED_COLUMNS = ("question", "answer")
OPTIONAL_COLUMNS = ("intent", "action")
READ_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# A guard against a pasted document, not a style rule: about two and a half minutes of
# speech. Callers' real questions run to a few hundred characters (Banking77's longest: 433);
# the embedder reads the first 256 word pieces of a question and the seed report says how
# many were longer.
MAX_QUESTION_CHARS = 2000
MAX_ANSWER_CHARS = 1200  # about 80 s of speech: longer answers belong to the agent
MAX_INTENT_CHARS = 200  # any printable name; the entry id derived from it is URL-safe
_SLUG = re.compile(r"[^a-z0-9]+")
# An answer that is only an audio file's name or URL (an IVR's prompt export, a CMS's media
# link): the voice would read the reference itself to callers. One word, ending in an audio
# file's extension (a URL's query or fragment after it); not .au or .al, which end web
# addresses ("www.bank.com.au" is an answer).
_AUDIO_REFERENCE = re.compile(
    r"\S+\.(?:wav|mp3|ogg|oga|opus|m4a|aac|flac|ulaw|alaw|aif|aiff|wma|amr|gsm|vox|webm"
    r"|raw|pcm)(?:[?#]\S*)?", re.IGNORECASE)
# HTML's named entities (nbsp, amp, ...): "&T;" in "AT&T; Verizon" is none.
_HTML_ENTITIES = frozenset(name[:-1] for name in html.entities.html5 if name.endswith(";"))
# What an answer may hold that is no words to say, by what it is: HTML (a help centre's export:
# Zendesk, Intercom), Markdown (a chat assistant's writing), a template's placeholder (a help
# desk's macro). The voice reads markup aloud ("less than p greater than", "asterisk
# asterisk") and skips a placeholder ("Our branches are open."). A "<", "&", "*" or brace in
# plain words is none of them.
_NOT_WORDS_IN_ANSWER = (
    ("HTML markup", re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>"
                               r"|&(?:[A-Za-z][A-Za-z0-9]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")),
    ("Markdown", re.compile(r"\*\*\S(?:[^*]*\S)?\*\*|__\S(?:[^_]*\S)?__"
                            r"|\[[^\[\]]+\]\([^()\s]+\)")),
    ("a template placeholder", re.compile(r"\{\{[^{}]*\}\}|\$\{[^{}]*\}")),
)
# A sheet's marks for an answer still to write: a cell of one of them alone (punctuation and
# case aside) is no answer; the voice would say "T B D" to callers.
_PLACEHOLDER_ANSWERS = frozenset({"tbd", "tba", "tbc", "todo", "fixme", "na", "xxx",
                                  "placeholder"})
# How close an unknown column's name must be to a known column's (difflib's ratio) to be read as
# a misspelling of it: 'actions', 'intents', 'acton' (0.91+) are; 'intent_id', 'answer_id' (0.8)
# are extra columns and ignored.
_NEAR_MISS = 0.85


@dataclass(frozen=True)
class RowError:
    line: int  # 1-based line of the CSV file where the row starts
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class SeedError(RuntimeError):
    """Seeding failed; nothing was published."""


class SeedValidationError(SeedError):
    """The CSV has bad rows; ``errors`` lists every one of them."""

    def __init__(self, source: str, errors: list[RowError]) -> None:
        self.source = source
        self.errors = sorted(errors, key=lambda e: e.line)
        listing = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} bad row(s), nothing published:\n{listing}")


@dataclass(frozen=True)
class SeedRow:
    line: int
    question: str
    answer: str | None
    intent: str | None
    action: Action | None  # as written; None: use the default


@dataclass
class SeedPlan:
    """The validated seed: entries (audio not yet rendered) and the training questions."""

    entries: dict[str, Entry]  # by intent name (an entry's ``id`` is derived from it)
    questions: list[str] = field(default_factory=list)
    intents: list[str] = field(default_factory=list)  # one per question


def read_seed_csv(path: str | Path) -> SeedPlan:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SeedError(f"cannot read {path}: {exc}") from exc
    return parse_seed_csv(data, source=str(path))


def parse_seed_rows(rows: Iterable[Mapping[str, str | None]], source: str = "<rows>",
                    published: Collection[int] = ()) -> SeedPlan:
    """Validate rows given as mappings (``question``, ``answer``, ``intent``, ``action``)
    exactly as the same rows in a CSV file: row ``i`` (0-based) is reported as line ``i + 2``,
    the header being line 1. ``published``: indexes of rows a serving version holds unchanged
    (an admin edit of another entry): what their words say is not judged again (``_read_row``)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    for row in rows:
        # one physical line per row, so line numbers map back to row indexes
        writer.writerow([" ".join(str(row.get(column) or "").split())
                         for column in REQUIRED_COLUMNS + OPTIONAL_COLUMNS])
    # surrogatepass: a lone surrogate (JSON lets "\ud800" through) becomes bytes that are
    # not UTF-8, reported on its row like any such byte, instead of an exception here.
    return parse_seed_csv(buffer.getvalue().encode("utf-8", "surrogatepass"), source=source,
                          published_lines=frozenset(i + 2 for i in published))


def rows_from_manifest(manifest: Mapping[str, Any]) -> list[dict[str, str]]:
    """The rows of a published version (one per question), to re-seed it with changes."""
    rows: list[dict[str, str]] = []
    for entry in manifest["entries"]:
        for question in entry["questions"]:
            rows.append({"question": question, "answer": entry.get("answer") or "",
                         "intent": entry["intent"], "action": entry["action"]})
    return rows


def parse_seed_csv(data: bytes, source: str = "<csv>",
                   published_lines: frozenset[int] = frozenset()) -> SeedPlan:
    data = without_extra_boms(data)
    wide = _wide_encoding(data)
    if wide is not None:
        # Every line of it would be "a NUL byte (a binary file?)": one error that says what
        # the file is and what to do instead.
        raise SeedValidationError(source, [RowError(1, (
            f"not UTF-8: the file is {wide} (Excel's \"Unicode Text\" saves that); save it as "
            "UTF-8 (Excel: \"CSV UTF-8 (Comma delimited)\")"))])
    binary = _binary_kind(data)
    if binary is not None:
        # Read as CSV it gave a NUL byte or a bad byte on line after line and "missing
        # column" for a header of junk: one error naming the file and the fix instead.
        raise SeedValidationError(source, [RowError(1, (
            f"not CSV: the file is {binary}, not CSV text; export it as CSV UTF-8 (Excel: "
            "\"CSV UTF-8 (Comma delimited)\")"))])
    data, separated = _separator_hint(data)
    separated = separated or _other_separator(data)
    if separated is not None:
        # Read with commas its header is one column: "missing column" for every column it has.
        line, name = separated
        raise SeedValidationError(source, [RowError(line, (
            f"the file is separated by {name}; voicegate reads comma-separated CSV: export it "
            "as CSV UTF-8 (Excel: \"CSV UTF-8 (Comma delimited)\")"))])
    errors: list[RowError] = []
    text, bad_lines = _decode(data, errors)
    rows = _read_rows(text, bad_lines, errors, source, published_lines)
    plan = _plan(rows, errors)
    if errors:
        raise SeedValidationError(source, errors)
    return plan


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _wide_encoding(data: bytes) -> str | None:
    """"UTF-16" or "UTF-32" for text in one of them (by its BOM, or without one by the NUL
    bytes every ASCII character carries there), else None. UTF-32's BOM starts with
    UTF-16 LE's: checked first."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            return name
    sample = data[:4096]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    for name, width, zero_at in (("UTF-32", 4, (1, 2, 3)), ("UTF-32", 4, (0, 1, 2)),
                                 ("UTF-16", 2, (1,)), ("UTF-16", 2, (0,))):
        units = [sample[i:i + width] for i in range(0, len(sample) - width + 1, width)]
        # ASCII text: the same bytes of every unit are NUL, and the others are not
        if units and sum(all(u[z] == 0 for z in zero_at) and any(u[k] for k in range(width)
                                                              if k not in zero_at)
                         for u in units) >= 0.9 * len(units):
            return name
    return None


# What operators upload instead of a CSV, by the bytes it starts with. OLE2 is also a .doc.
_BINARY_MAGIC = ((b"PK\x03\x04", "a zip archive (as an .xlsx or .ods workbook is)"),
                 (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
                  "an Excel 97-2003 workbook (.xls) or another Office document"),
                 (b"%PDF-", "a PDF document"),
                 (b"\x1f\x8b", "a gzip archive"),
                 (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                 (b"GIF8", "a GIF image"), (b"ID3", "audio (an MP3 file)"),
                 (b"RIFF", "audio (a WAV file) or another RIFF file"),
                 (b"OggS", "audio (an Ogg file)"), (b"fLaC", "audio (a FLAC file)"))

# Text that is not CSV, by how its first line starts (a BOM and spaces aside): a sheet's link
# fetched without its sign-in saves the sign-in page. Read as CSV, markup's quotes gave
# "text follows a quoted field's closing '\"'", JSON "missing column 'question'".
_MARKUP = (("<!doctype html", "an HTML page (a web page saved or downloaded in place of the "
                              "CSV: a sign-in or sharing page?)"),
           ("<html", "an HTML page (a web page saved or downloaded in place of the CSV: a "
                     "sign-in or sharing page?)"),
           ("<?xml", "an XML document (Excel's \"XML Spreadsheet\"?)"))


def _binary_kind(data: bytes) -> str | None:
    """What a file that is not CSV text is ("an Excel workbook (.xlsx)", "an HTML page",
    "JSON", ...), else None. Called after _wide_encoding: UTF-16 and UTF-32 text have NUL
    bytes too."""
    for magic, kind in _BINARY_MAGIC:
        if data.startswith(magic):
            # a zip's member names are stored as they are, in its central directory
            if magic.startswith(b"PK") and b"xl/workbook." in data:
                return "an Excel workbook (.xlsx)"
            if magic.startswith(b"PK") and _is_ods(data):
                return "an OpenDocument spreadsheet (.ods)"
            return kind
    # Any other binary: no text file has a NUL byte in its header (a data row with one
    # is reported on its own line, the rest of the file still checked).
    text = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    header = next((line for line in text[:4096].splitlines() if line.strip()), b"")
    if b"\x00" in header:
        return "binary (its first line holds a NUL byte)"
    start = header.decode("utf-8", errors="replace").lstrip(" \t").lower()
    for opening, kind in _MARKUP:
        if start.startswith(opening):
            return kind
    if start[:1] in ("{", "["):
        try:  # no CSV is a JSON object or array
            if isinstance(json.loads(text.decode("utf-8")), (dict, list)):
                return "JSON"
        except ValueError:  # not UTF-8 (UnicodeDecodeError is one) or not JSON
            pass
    return None


def _is_ods(data: bytes) -> bool:
    """An OpenDocument spreadsheet's first zip entry is the file 'mimetype', stored
    uncompressed, holding its type: the name 30 bytes in, the type after the entry's extra
    field (its length at bytes 28-29)."""
    start = 38 + int.from_bytes(data[28:30], "little")
    return data[30:38] == b"mimetype" and data[start:].startswith(
        b"application/vnd.oasis.opendocument.spreadsheet")


_SEPARATOR_NAMES = {";": "semicolons", "\t": "tabs", ",": "commas"}


def _first_line(data: bytes) -> tuple[int, int, bytes, str] | None:
    """The first line that is not blank, as ``_decode`` numbers and reads it: (its number,
    its offset in ``data``, its bytes with their line end, its text without)."""
    offset = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        line = raw.rstrip(b"\r\n")
        if line.strip():
            return number, offset, raw, line.decode("utf-8-sig" if number == 1 else "utf-8",
                                                   errors="replace")
        offset += len(raw)
    return None


def _separator_hint(data: bytes) -> tuple[bytes, tuple[int, str] | None]:
    """Excel's separator hint ("sep=,", a first line Excel reads and never shows): a comma
    one is blanked (its line still counted, so errors keep their line numbers); another
    separator's is (line, its name), refused as a header of that separator is."""
    first = _first_line(data)
    if first is None:
        return data, None
    number, offset, raw, text = first
    hint = re.fullmatch(r'"?sep=(.)"?', text.strip(" "), re.IGNORECASE | re.DOTALL)
    if hint is None:
        return data, None
    separator = hint.group(1)
    if separator == ",":
        ending = raw[len(raw.rstrip(b"\r\n")):]
        return data[:offset] + ending + data[offset + len(raw):], None
    return data, (number, _SEPARATOR_NAMES.get(separator, repr(separator)))


def _other_separator(data: bytes) -> tuple[int, str] | None:
    """(line, "semicolons" or "tabs") when the header, the first line that is not blank, has
    no comma and known column names between semicolons or tabs (Excel saves "CSV" with
    semicolons where a comma is the decimal separator, and "Text (Tab delimited)"). Named,
    not guessed and read: a comma file's questions can hold semicolons."""
    first = _first_line(data)
    if first is None:
        return None
    number, _, _, header = first
    if "," in header:
        return None
    for separator in (";", "\t"):
        names = [n.strip().strip('"').strip().lower() for n in header.split(separator)]
        if len(names) > 1 and set(names) & set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS):
            return number, _SEPARATOR_NAMES[separator]
    return None


def _decode(data: bytes, errors: list[RowError]) -> tuple[str, set[int]]:
    """Decode as UTF-8 (a BOM is fine); every line that is not UTF-8, or holds a NUL byte,
    is an error.

    Lines end as the csv reader ends them (LF, CRLF or a lone CR: Excel's "CSV
    (Macintosh)"), so an error's line number is the row's."""
    bad = line_problems(data)
    errors.extend(RowError(number, reason) for number, reason in bad.items())
    return data.decode("utf-8-sig", errors="replace"), set(bad)


def _read_rows(text: str, bad_lines: set[int], errors: list[RowError],
               source: str, published_lines: frozenset[int] = frozenset()) -> list[SeedRow]:
    # A long cell is told "too long" on its line, below; after a row that is not CSV,
    # reading starts again at the line after it (csv_rows).
    header: list[str] | None = None
    header_line = 0
    rows: list[SeedRow] = []
    last_line = 0
    for read in csv_rows(text, lambda: header is None):
        start, last_line, fields = read.start, read.end, read.fields
        if fields is None:
            if header is None or not any(n in bad_lines for n in range(start, last_line + 1)):
                errors.append(RowError(start, read.problem))  # else reported as not UTF-8 or NUL
            continue
        if header is not None and any(line in bad_lines for line in range(start, last_line + 1)):
            continue  # already reported as not UTF-8
        if not any(f.strip() for f in fields):
            continue  # blank line
        if header is None:
            # The first line that is not blank is the header, UTF-8 or not (a bad byte is
            # already reported on its line and read as U+FFFD): the required columns it names
            # are read, and the rows checked, instead of a data row taken for the header.
            header = [f.strip().lower() for f in fields]
            header_line = start
            near = _near_misses(header)
            missing = [c for c in REQUIRED_COLUMNS if c not in header and c not in near.values()]
            # Only a column that is read: two "notes" columns are ignored like one.
            duplicated = sorted({c for c in header if c in READ_COLUMNS and header.count(c) > 1})
            if near or missing or duplicated:
                for index, known in near.items():
                    errors.append(RowError(start, f"unknown column {fields[index].strip()!r}: "
                                                  f"did you mean '{known}'? (rename it; columns "
                                                  "with other names are ignored)"))
                for column in missing:
                    errors.append(RowError(start, f"missing column '{column}' (header is: "
                                                  f"{', '.join(fields)})"))
                for column in duplicated:
                    errors.append(RowError(start, f"column '{column}' appears twice"))
                return []
            continue
        if len(fields) != len(header):
            errors.append(RowError(start, f"not CSV: {field_count_problem(fields, len(header))}"))
            continue
        if _repeats_header(fields, header):
            # Two exports joined (each with its header, Excel's with a BOM): read as data,
            # it was an entry "question" answered "answer", published without a word.
            errors.append(RowError(start, f"this row repeats the header (line {header_line}): "
                                          "were two CSV files joined? remove it"))
            continue
        row = _read_row(start, dict(zip(header, fields)), errors, start in published_lines)
        if row is not None:
            rows.append(row)
    if header is None and not errors:
        errors.append(RowError(1, f"missing columns {', '.join(REQUIRED_COLUMNS)}: the file is empty"))
    elif header is not None and not rows and not errors:
        errors.append(RowError(last_line, "no rows after the header"))
    return rows


# Invisible characters that are part of ordinary spelling (Persian, Hindi, emoji sequences):
# the zero-width non-joiner and joiner. isprintable() refuses them with every other format
# character.
_JOINERS = frozenset("\u200c\u200d")


def _visible(text: str) -> bool:
    """Something shows: not only spaces and format characters (zero-width spaces, a BOM)."""
    return any(c.isprintable() and not c.isspace() for c in text)


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in _JOINERS for c in text)


def bad_intent_characters(name: str) -> str:
    """Why an intent name (stripped) with a control or invisible separator character is
    refused: the seed CSV's reason, the admin API's too (gateway/admin/publish.py)."""
    return f"bad intent {name!r}: it contains a control or invisible separator character"


def _placeholder(answer: str) -> bool:
    """"TBD", "N/A", "[TODO]": a mark for an answer still to write (_PLACEHOLDER_ANSWERS)."""
    words = re.sub(r"[^\w]+", " ", same_question(answer)).strip()
    return words in _PLACEHOLDER_ANSWERS or words.replace(" ", "") in _PLACEHOLDER_ANSWERS


def _not_words(answer: str) -> tuple[str, str] | None:
    """(what, the text) of the first markup or placeholder ``answer`` holds, else None."""
    for kind, pattern in _NOT_WORDS_IN_ANSWER:
        for found in pattern.finditer(answer):
            text = found.group()
            if text[0] == "&" and text[1] != "#" and text[1:-1] not in _HTML_ENTITIES:
                continue  # "&T;" of "AT&T; Verizon": no entity HTML has
            return kind, text
    return None


def _repeats_header(fields: list[str], header: list[str]) -> bool:
    """A data row that names the header's columns again (in any order, any case, a BOM
    before it: a second file's first line)."""
    names = sorted(f.strip().lstrip("\ufeff").strip().lower() for f in fields)
    return names == sorted(header)


def _near_misses(header: list[str]) -> dict[int, str]:
    """Header columns (by index) named almost like a known column the header lacks: a misspelled
    ``actions`` would otherwise be ignored and every handoff in it lost. Any other unknown
    column (notes, ids) is ignored, as is one close to a known column that is present."""
    absent = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c not in header]
    near: dict[int, str] = {}
    for index, column in enumerate(header):
        if column and column not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            match = difflib.get_close_matches(column, absent, n=1, cutoff=_NEAR_MISS)
            if match:
                near[index] = match[0]
    return near


def looks_like_formula(cell: str) -> bool:
    """A cell a spreadsheet would evaluate (CSV injection): =, @, a tab or carriage return
    first, or + / - followed by something other than a digit, a space or a dot.

    "+1 800 555 0100" and "-5 degrees" stay legal; "=HYPERLINK(...)", "@SUM(...)",
    "-cmd|..." and "+A1" are refused.
    """
    if not cell:
        return False
    if cell[0] in "\t\r":
        return True
    text = cell.strip()
    if not text:
        return False
    if text[0] in "=@":
        return True
    if text[0] in "+-":
        rest = text[1:2]
        return rest != "" and not (rest.isdigit() or rest in " .")
    return False


def _formula_problem(column: str, cell: str) -> str:
    # The advice must be one the check accepts: leading spaces do not count.
    return (f"{column} looks like a spreadsheet formula ({cell.strip()[:40]!r}): cells "
            "starting with =, @, a tab, or + or - before anything but a digit, a space or a "
            "dot are refused, leading spaces not counted (CSV injection); if meant, reword it "
            "to start otherwise (e.g. 'The code is =SAVE10')")


def question_problems(cell: str, published: bool = False) -> list[str]:
    """Why a question cell cannot be seeded, whatever the rest of its row (empty, no words,
    too long, a formula), in the seed's words; none when it can. The seed's own check of
    each row, and the admin API's promotion of caller wordings (gateway/admin/routes.py).
    ``published``: a serving version's question, unchanged (``_read_row``)."""
    question = " ".join(cell.split())
    problems = []
    if not _visible(question):  # a zero-width space alone is no question
        problems.append("empty question")
    elif not published and not same_question(question):  # "?": nothing to learn
        problems.append(f"question has no words, only punctuation ({question[:40]!r})")
    elif len(question) > MAX_QUESTION_CHARS:
        problems.append(f"question too long ({len(question)} characters, at most "
                        f"{MAX_QUESTION_CHARS})")
    if looks_like_formula(cell):
        problems.append(_formula_problem("question", cell))
    return problems


def _answer_wording_problem(answer: str) -> str | None:
    """Why what a (visible, not too long) answer says is no words to say to a caller, if it
    is not: punctuation alone, a placeholder, an audio file's name, markup."""
    if not same_question(answer):
        # A sheet's placeholder ("-", "..."): a voice renders it as nothing, or a breath.
        return (f"answer has no words, only punctuation ({answer[:40]!r}): a placeholder? "
                "leave the cell empty for a question that takes its intent's answer or goes "
                "to the agent")
    if _placeholder(answer):
        return (f"answer {answer[:40]!r} is a placeholder, not an answer: write the answer, or "
                "leave the cell empty for a question that takes its intent's answer or goes to "
                "the agent")
    if _AUDIO_REFERENCE.fullmatch(answer):
        return (f"answer {answer[:80]!r} is a reference to an audio file, not words to say: the "
                "configured voice renders each answer's text (it would read the reference "
                "aloud); write the answer's words")
    found = _not_words(answer)
    if found is not None:
        kind, text = found
        return (f"answer holds {kind} ({text[:40]!r}): the voice would read it aloud or skip "
                "it; write the answer as the plain words to say")
    return None


def _read_row(line: int, values: dict[str, str], errors: list[RowError],
              published: bool = False) -> SeedRow | None:
    """One row, read and checked. ``published``: a row a serving version holds unchanged (an
    admin edit of another entry rebuilds the version from its rows): what its words say
    (punctuation alone, a placeholder, an audio file's name, markup: rules a version published
    before them may break) is not judged again, or every edit of any entry would be refused
    until a whole new seed; its structure still is."""
    before = len(errors)
    question = " ".join(values["question"].split())
    # Composed (NFC), as an intent's name: one answer pasted in two Unicode forms is one.
    answer = unicodedata.normalize("NFC", " ".join(values["answer"].split())) or None
    intent_text = values.get("intent", "").strip()
    # A run of spaces is one space, as parse_seed_rows (the admin API's rows) makes it: a name
    # is the same, and so is its entry id, whichever path published it. Composed (NFC): "é"
    # as one character or as e and an accent looks the same and is one intent.
    intent = " ".join(intent_text.split()) or None
    if intent is not None and not published:
        # A published row keeps its name as it serves: a version from before names were
        # read composed may hold one in both forms as two entries (merged on an edit of
        # another entry, they would refuse it for each other's action or answer).
        intent = unicodedata.normalize("NFC", intent)
    action_text = values.get("action", "").strip().lower()
    action: Action | None = None
    errors.extend(RowError(line, problem)
                  for problem in question_problems(values["question"], published))
    if answer is not None and not _visible(answer):
        errors.append(RowError(line, "empty answer: it holds only invisible characters"))
    elif answer and len(answer) > MAX_ANSWER_CHARS:
        errors.append(RowError(line, f"answer too long ({len(answer)} characters, at most "
                                     f"{MAX_ANSWER_CHARS})"))
    elif answer is not None and not published:  # a published one's words were judged then
        problem = _answer_wording_problem(answer)
        if problem is not None:
            errors.append(RowError(line, problem))
    if intent is not None and (not _printable(intent_text) or not _visible(intent)):
        # a tab is refused, not collapsed; joiners alone show nothing
        errors.append(RowError(line, bad_intent_characters(intent_text)))
    elif intent is not None and len(intent) > MAX_INTENT_CHARS:
        errors.append(RowError(line, f"bad intent {intent[:40]!r}...: {len(intent)} characters, "
                                     f"at most {MAX_INTENT_CHARS}"))
    if looks_like_formula(values.get("answer") or ""):
        errors.append(RowError(line, _formula_problem("answer", values.get("answer") or "")))
    if action_text:
        try:
            action = Action(action_text)
        except ValueError:
            errors.append(RowError(line, f"unknown action {action_text!r} (expected answer, llm or "
                                         "handoff)"))
    if action is Action.ANSWER and not answer and intent is None:
        # With an intent, the row is a paraphrase that takes its intent's answer (checked
        # once rows are grouped, in _plan).
        errors.append(RowError(line, "action 'answer' needs an answer"))
    if not answer and intent is None and question and action is not Action.ANSWER:
        errors.append(RowError(line, "a question without an answer needs an intent"))
    if len(errors) > before:
        return None
    return SeedRow(line, question, answer, intent, action)


@dataclass
class _Group:
    intent: str
    first_line: int
    rows: list[SeedRow] = field(default_factory=list)
    answer: str | None = None
    answer_line: int = 0
    action: Action | None = None
    action_line: int = 0


def _plan(rows: list[SeedRow], errors: list[RowError]) -> SeedPlan:
    # Duplicate questions: identical rows are dropped, conflicting ones are errors. An action,
    # an intent or an answer written on one of them and left empty on the other is not a
    # conflict: it is kept (a row without an answer takes its intent's anyway). The row with
    # the answer stands for both, else the row with the intent; it takes the other's intent.
    seen: dict[str, int] = {}  # question -> index in unique of its row
    acted: dict[str, SeedRow] = {}  # question -> the first of its rows with an action written
    unique: list[SeedRow] = []
    for row in rows:
        key = _duplicate_key(row.question)
        index = seen.get(key)
        if index is None:
            seen[key] = len(unique)
            unique.append(row)
        else:
            first = unique[index]
            answers = first.answer is not None and row.answer is not None
            if (answers and first.answer != row.answer) or (
                    first.intent is not None and row.intent is not None
                    and first.intent != row.intent):
                what = "answer" if answers and first.answer != row.answer else "intent"
                errors.append(RowError(row.line, f"duplicate question (line {first.line}) with "
                                                 f"a conflicting {what}"))
                continue
            kept, other = first, row
            if (first.answer is None and row.answer is not None) or (
                    first.answer == row.answer and first.intent is None and row.intent is not None):
                kept, other = row, first
            if kept.intent is None and other.intent is not None:
                kept = replace(kept, intent=other.intent)
            unique[index] = kept
        if row.action is None:
            continue
        acting = acted.setdefault(key, row)
        if acting.action is not row.action:
            errors.append(RowError(row.line, f"duplicate question (line {acting.line}) with a "
                                             "conflicting action"))

    groups: dict[str, _Group] = {}
    by_answer: dict[str, str] = {}  # answer text -> intent of the group holding it
    for row in [r for r in unique if r.intent] + [r for r in unique if not r.intent]:
        intent = row.intent or (by_answer.get(row.answer) if row.answer else None)
        if intent is None:
            intent = _new_intent(row.question, groups)
        group = groups.setdefault(intent, _Group(intent, row.line))
        if row.answer:
            if group.answer is None:
                group.answer, group.answer_line = row.answer, row.line
                by_answer.setdefault(row.answer, intent)
            elif group.answer != row.answer:
                errors.append(RowError(row.line, f"intent {intent!r} already has a different "
                                                 f"answer (line {group.answer_line})"))
                continue
        acting = acted.get(_duplicate_key(row.question))  # on this row or a duplicate's
        if acting is not None:
            if group.action is None:
                group.action, group.action_line = acting.action, acting.line
            elif group.action is not acting.action:
                errors.append(RowError(acting.line, f"intent {intent!r} has action "
                                                    f"'{group.action.value}' on line "
                                                    f"{group.action_line}, not "
                                                    f"'{acting.action.value}'"))
                continue
        group.rows.append(row)

    plan = SeedPlan(entries={})
    ids: dict[str, _Group] = {}
    for group in sorted(groups.values(), key=lambda g: g.first_line):
        entry_id = entry_id_for(group.intent)
        other = ids.setdefault(entry_id, group)
        if other is not group:  # only when an intent is literally another one's derived id
            errors.append(RowError(group.first_line, f"intent {group.intent!r} has the same "
                                                     f"entry id {entry_id!r} as intent "
                                                     f"{other.intent!r} (line {other.first_line})"
                                                     "; rename one of them"))
            continue
        action = group.action or (Action.ANSWER if group.answer else Action.LLM)
        if action is Action.ANSWER and group.answer is None:
            errors.append(RowError(group.action_line, f"action 'answer' needs an answer: "
                                                      f"no row of intent {group.intent!r} "
                                                      "has one"))
            continue
        group.rows.sort(key=lambda r: r.line)
        plan.entries[group.intent] = Entry(
            id=entry_id, intent=group.intent, action=action, answer=group.answer,
            questions=tuple(r.question for r in group.rows))
        for row in group.rows:
            plan.questions.append(row.question)
            plan.intents.append(group.intent)
    if rows and not errors and len(plan.questions) < 2:
        errors.append(RowError(rows[0].line, "a seed needs at least two distinct questions"))
    return plan


_SPACE_BEFORE_MARK = re.compile(r"\s+(?=[^\w\s])")


def _duplicate_key(question: str) -> str:
    """Two questions the embedder cannot tell apart are duplicates: the same text in any
    Unicode form (NFC "café" and NFD "café" look alike and embed alike), any case or spacing,
    a space before punctuation included ("hours ?")."""
    return normalize_text(_SPACE_BEFORE_MARK.sub("", unicodedata.normalize("NFKC", question)))


def _new_intent(question: str, groups: dict[str, _Group]) -> str:
    """An intent name for rows that did not give one: a slug of the entry's first question."""
    base = _SLUG.sub("_", question.casefold()).strip("_")[:40].rstrip("_") or "entry"
    name, n = base, 2
    while name in groups:
        name, n = f"{base}_{n}", n + 1
    return name
