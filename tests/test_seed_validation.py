"""CSV validation: every bad-row kind is reported with its line and reason, nothing is published."""

from __future__ import annotations

import csv
import gzip
import io
import re
import unicodedata
import zipfile
from pathlib import Path
from typing import Any

import pytest

from cache_seed import SeedValidationError, parse_seed_csv, read_seed_csv, seed
from cache_seed.validate import MAX_ANSWER_CHARS, MAX_QUESTION_CHARS
from intents.negatives import NegativesError, negatives_for_seed, read_negatives_csv
from intents.store import LocalStore
from intents.types import Action, entry_id_for
from tests.intents_support import BANK_FAQ, bank_cache, intent_embedder, tone_render  # noqa: F401

HEADER = "question,answer,intent,action\n"
DATA = Path("/work/shared/data")  # Banking77 and CLINC150, where this machine has them


def errors_of(data: str | bytes) -> list[tuple[int, str]]:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with pytest.raises(SeedValidationError) as info:
        parse_seed_csv(raw, source="test.csv")
    return [(e.line, e.reason) for e in info.value.errors]


def test_valid_seed_groups_paraphrases_by_intent_and_by_answer() -> None:
    plan = parse_seed_csv((
        HEADER +
        "When are you open?,We open at nine.,,\n"
        "What are your hours?,We open at nine.,,\n"  # same answer: same entry
        "What is my balance?,,balance,\n"  # no answer: llm by default
        "How much money do I have?,,balance,\n"
        "I lost my card,,lost_card,handoff\n"
        "My card is gone,,lost_card,\n"
        "What's the routing number?,It is 021000089.,routing,\n"
        "routing number please,,routing,\n"  # paraphrase without repeating the answer
    ).encode())
    assert len(plan.entries) == 4
    hours = next(e for e in plan.entries.values() if e.answer == "We open at nine.")
    assert hours.action is Action.ANSWER and len(hours.questions) == 2
    assert plan.entries["balance"].action is Action.LLM
    assert plan.entries["lost_card"].action is Action.HANDOFF
    assert plan.entries["routing"].questions == ("What's the routing number?",
                                                 "routing number please")
    assert len(plan.questions) == len(plan.intents) == 8


def test_missing_column() -> None:
    assert errors_of("question,intent\nhello,greet\n") == [
        (1, "missing column 'answer' (header is: question, intent)")]


def test_a_misspelled_column_is_refused_not_ignored() -> None:
    # 'actions' ignored would lose every handoff in it: refused on the header's line.
    rows = ("I want to speak to a person,,speak_to_person,handoff\n"
            "When are you open?,Nine to five.,hours,answer\n")
    assert errors_of("question,answer,intent,Actions\n" + rows) == [
        (1, "unknown column 'Actions': did you mean 'action'? (rename it; columns with other "
            "names are ignored)")]
    found = errors_of("qustion,answer,intents\nWhen are you open?,Nine to five.,hours\n")
    assert [(line, reason.split("?")[0]) for line, reason in found] == [
        (1, "unknown column 'qustion': did you mean 'question'"),
        (1, "unknown column 'intents': did you mean 'intent'")]


def test_other_extra_columns_are_ignored() -> None:
    # Operators' spreadsheets carry notes and ids; a column close to one already present is
    # another column too (answer2 beside answer).
    plan = parse_seed_csv(("question,answer,notes,intent_id,action_id,answer2,intent,action\n"
                           "I lost my card,,check,7,3,x,lost_card,handoff\n"
                           "When are you open?,Nine to five.,,8,4,y,hours,\n").encode())
    assert plan.entries["lost_card"].action is Action.HANDOFF
    assert plan.entries["hours"].answer == "Nine to five."


def test_empty_question() -> None:
    assert errors_of(HEADER + "ok question,an answer,,\n  ,another answer,,\n") == [
        (3, "empty question")]


def test_unknown_action() -> None:
    [(line, reason)] = errors_of(HEADER + "q one,a,,\nq two,b,,cache\n")
    assert line == 3 and reason.startswith("unknown action 'cache'")


def test_duplicate_question_with_conflicting_answers() -> None:
    [(line, reason)] = errors_of(HEADER + "When are you open?,Nine to five.,,\n"
                                          "q two,b,,\n"
                                          "when are you  OPEN?,Eight to four.,,\n")
    assert line == 4 and "duplicate question (line 2)" in reason and "answer" in reason


def test_identical_duplicate_rows_are_dropped() -> None:
    plan = parse_seed_csv((HEADER + "q one,a,,\nq one,a,,\nq two,a,,\n").encode())
    assert plan.questions == ["q one", "q two"]


def test_duplicate_question_with_a_conflicting_action() -> None:
    found = errors_of(HEADER + "I lost my card,Call us to block it.,lost_card,answer\n"
                               "When are you open?,Nine to five.,hours,\n"
                               "I lost my card,Call us to block it.,lost_card,handoff\n")
    assert found == [(4, "duplicate question (line 2) with a conflicting action")]


def test_a_duplicate_questions_written_action_is_kept_when_the_other_row_has_none() -> None:
    for rows in ("I lost my card,,lost_card,\nI lost my card,,lost_card,handoff\n",
                 "I lost my card,,lost_card,handoff\nI lost my card,,lost_card,\n"):
        plan = parse_seed_csv((HEADER + rows + "When are you open?,Nine to five.,hours,\n"
                                               "My card is gone,,lost_card,\n").encode())
        assert plan.entries["lost_card"].action is Action.HANDOFF, rows
        assert plan.entries["lost_card"].questions == ("I lost my card", "My card is gone")
    # the kept action still has to agree with the rest of its intent
    found = errors_of(HEADER + "I lost my card,,lost_card,\nMy card is gone,,lost_card,llm\n"
                               "I lost my card,,lost_card,handoff\nq two,a,,\n")
    assert found == [(3, "intent 'lost_card' has action 'handoff' on line 4, not 'llm'")]


def test_real_world_intent_names_and_long_questions_are_accepted() -> None:
    spoken = ("I made a payment with my card last week and it was reverted and " * 7).strip()
    assert 400 < len(spoken) < MAX_QUESTION_CHARS  # Banking77's longest question is 433
    plan = parse_seed_csv((
        HEADER +
        "Why was my card payment reverted?,We reverse a payment when...,reverted_card_payment?,\n"
        f"{spoken},,reverted_card_payment?,\n"
        "Where is my card?,Cards arrive in 5 days.,Card arrival (UK),\n"
        "Card not here yet,,Card arrival (UK),\n"
        "When are you open?,Nine to five.,opening_hours,\n"
    ).encode())
    reverted = plan.entries["reverted_card_payment?"]
    assert reverted.intent == "reverted_card_payment?" and len(reverted.questions) == 2
    assert reverted.questions[1] == spoken
    # Stored and addressed by a safe id; a name that is already safe is its own id.
    assert reverted.id.startswith("reverted_card_payment-") and "?" not in reverted.id
    assert plan.entries["Card arrival (UK)"].id.startswith("Card_arrival_UK-")
    assert plan.entries["opening_hours"].id == "opening_hours"
    assert entry_id_for("reverted_card_payment?") != entry_id_for("reverted_card_payment!")


def test_intent_with_control_characters_or_pasted_text_is_refused() -> None:
    found = errors_of(HEADER + "q one,a,bad\x01intent,\nq two,b," + "x" * 201 + ",\n")
    assert [line for line, _ in found] == [2, 3]
    assert found[0][1] == "bad intent 'bad\\x01intent': it contains a control or invisible " \
                          "separator character"
    assert "201 characters, at most 200" in found[1][1]


def test_a_run_of_spaces_in_an_intent_name_is_one_space() -> None:
    # As the admin API's rows make it (parse_seed_rows): the same name, so the same entry id,
    # whichever path published it. A tab or other control character is still refused.
    plan = parse_seed_csv((HEADER + "I lost my card,Call us.,Card  lost,\n"
                                    "my card was stolen,, Card lost ,\n"
                                    "When are you open?,Nine to five.,hours,\n").encode())
    assert set(plan.entries) == {"Card lost", "hours"}
    assert plan.entries["Card lost"].questions == ("I lost my card", "my card was stolen")
    assert plan.entries["Card lost"].id == entry_id_for("Card lost")
    [(line, reason)] = errors_of(HEADER + "q one,a,Card\tlost,\nq two,b,,\n")
    assert line == 2 and reason.startswith("bad intent 'Card\\tlost'")


def test_intent_named_like_another_intents_derived_id_is_refused() -> None:
    clash = entry_id_for("refund?")
    [(line, reason)] = errors_of(HEADER + f"q one,a,refund?,\nq two,b,{clash},\n")
    assert line == 3 and f"same entry id {clash!r}" in reason


@pytest.mark.parametrize("path, intent_column", [
    (DATA / "banking77" / "train.csv", "category"),
    (DATA / "clinc150" / "train.csv", "intent"),
    (DATA / "clinc150" / "val.csv", "intent"),
])
def test_every_row_of_public_intent_datasets_seeds_unmodified(path: Path,
                                                              intent_column: str) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["question", "answer", "intent"])
    for row in rows:  # one answer per intent, as an operator would write it
        writer.writerow([row["text"], f"About {row[intent_column]}.", row[intent_column]])
    plan = parse_seed_csv(buffer.getvalue().encode("utf-8"), source=path.name)
    assert set(plan.entries) == {r[intent_column] for r in rows}
    # Identical duplicate rows are dropped, no more: identical as the embedder reads them
    # (any case, spacing, Unicode form, a space before punctuation).
    distinct = {" ".join(re.sub(r"\s+(?=[^\w\s])", "", unicodedata.normalize("NFKC", r["text"]))
                         .split()).casefold() for r in rows}
    assert len(plan.questions) == len(distinct)
    ids = [e.id for e in plan.entries.values()]
    assert len(set(ids)) == len(ids)


def test_text_too_long() -> None:
    long_q = "why " * (MAX_QUESTION_CHARS // 4 + 1)
    long_a = "x" * (MAX_ANSWER_CHARS + 1)
    found = errors_of(HEADER + f"{long_q},a,,\nfine question,{long_a},,\n")
    assert [line for line, _ in found] == [2, 3]
    assert found[0][1].startswith("question too long") and found[1][1].startswith("answer too long")


def test_not_utf8() -> None:
    data = (HEADER + "caf").encode() + b"\xe9 question,answer,,\nfine,answer,,\n"
    [(line, reason)] = errors_of(data)
    assert line == 2 and reason.startswith("not UTF-8 (byte 0xe9")


def test_a_header_that_is_not_utf8_turns_the_first_question_into_the_header() -> None:
    """An operator's spreadsheet saved as Latin-1 has one accented extra column name
    ("notes_équipe"). The header line is reported as not UTF-8 (right), and then skipped, so
    the first data row is read as the header: the operator is told line 2, a good row, is
    "missing column 'question' (header is: When are you open?, ...)", and nothing after it
    is checked: the unknown action on line 4 goes unreported until the next upload. Only
    the lines that are wrong should be reported, and every bad row of the file with them
    (the header's known columns are readable: the bad byte is in an ignored column)."""
    data = ("question,answer,intent,action,notes_\xe9quipe\n"
            "When are you open?,We open at nine.,hours,,\n"
            "What are your hours?,,hours,,\n"
            "Can I see my balance?,,balance,refund,\n").encode("latin-1")
    with pytest.raises(SeedValidationError) as caught:
        parse_seed_csv(data, source="faq.csv")
    errors = [(e.line, e.reason) for e in caught.value.errors]
    assert 1 in {line for line, _ in errors}  # the header is not UTF-8: reported
    assert not [e for e in errors if e[0] in (2, 3)] and 4 in {line for line, _ in errors}, (
        f"lines 2-3 are good rows and line 4 has an unknown action; reported: {errors}")


def test_utf8_bom_is_fine() -> None:
    plan = parse_seed_csv(b"\xef\xbb\xbf" + (HEADER + "q one,a,,\nq two,a,,\n").encode())
    assert len(plan.questions) == 2


def test_not_csv_broken_quote() -> None:
    [(line, reason)] = errors_of(HEADER + "q one,a,,\n\"q two,\"b\"\",,\n")
    assert line == 3 and reason.startswith("not CSV")


def test_not_csv_wrong_field_count() -> None:
    [(line, reason)] = errors_of(HEADER + "q one,a,,\nq, two, has commas,a,,\n")
    assert line == 3 and reason.startswith("not CSV: expected 4 fields")


def test_binary_file_is_not_csv() -> None:
    found = errors_of(b"\x00\x01\x02PK\x03\x04")
    assert found and found[0][0] == 1 and found[0][1].startswith("not CSV")


def test_answer_action_needs_an_answer_and_answerless_rows_need_an_intent() -> None:
    found = errors_of(HEADER + "q one,a,,\nq two,,,answer\nq three,,,\n")
    assert found == [(3, "action 'answer' needs an answer"),
                     (4, "a question without an answer needs an intent")]


def test_conflicting_answers_or_actions_within_an_intent() -> None:
    found = errors_of(HEADER + "q one,a,greet,answer\nq two,b,greet,\nq three,,greet,llm\n")
    assert found == [(3, "intent 'greet' already has a different answer (line 2)"),
                     (4, "intent 'greet' has action 'answer' on line 2, not 'llm'")]


def test_every_bad_row_is_reported_with_its_own_line() -> None:
    # A quoted answer spanning two lines shifts every later line number.
    found = errors_of(HEADER + "q one,\"line one\nline two\",,\n"
                               ",empty question,,\n"
                               "q three,a,,bogus\n"
                               "q four,a,,\n")
    assert [line for line, _ in found] == [4, 5]


def test_bad_csv_publishes_nothing_and_renders_nothing(tmp_path: Path, intent_embedder) -> None:  # noqa: F811
    store = LocalStore(tmp_path / "store")
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "When are you open?,Nine to five.,,\n"
                             "What time do you open?,Nine to five.,,\n"
                             "What is my balance?,,balance,\nHow much do I have?,,balance,\n")
    first = seed(good, store, tone_render, "v", progress=False, embedder=intent_embedder)
    calls: list[str] = []

    def counting_render(text: str) -> tuple[bytes, int]:
        calls.append(text)
        return tone_render(text)

    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "A new question,A new answer.,,\n,an answer without a question,,\n")
    with pytest.raises(SeedValidationError) as info:
        seed(bad, store, counting_render, "v", progress=False, embedder=intent_embedder)
    assert "line 3: empty question" in str(info.value)
    assert calls == []
    assert store.current_version() == first.version
    assert store.versions() == [first.version]


def test_formula_cells_are_refused_with_their_lines():
    from cache_seed.validate import SeedValidationError, parse_seed_csv, looks_like_formula

    csv = ("question,answer,intent\n"
           "What is your phone number?,+1 800 555 0100,phone\n"
           'How cold is the vault?,"-5 degrees, always",vault\n'
           'Where do I click?,"=HYPERLINK(""http://evil.example"",""here"")",click\n'
           "@SUM(A1:A2),An answer,sum\n"
           "Run this?,-cmd|' /C calc'!A0,cmd\n").encode()
    with pytest.raises(SeedValidationError) as info:
        parse_seed_csv(csv, "faq.csv")
    bad = {e.line: e.reason for e in info.value.errors}
    assert sorted(bad) == [4, 5, 6]
    assert "formula" in bad[4] and bad[5].startswith("question")
    assert not looks_like_formula("+1 800 555 0100") and not looks_like_formula("-5 degrees")
    assert looks_like_formula("\t=1+1") and looks_like_formula("+A1")


def test_the_formula_refusals_advice_is_accepted() -> None:
    rows = "What is the promo code?,{answer},promo,\nWhen are you open?,Nine to five.,hours,\n"
    [(line, reason)] = errors_of(HEADER + rows.format(answer="=SAVE10 is the code"))
    assert line == 2 and "leading spaces not counted" in reason and "reword it" in reason
    # a space first is still refused (the check reads the cell without its leading spaces)
    assert [line for line, _ in errors_of(HEADER + rows.format(answer=" =SAVE10 is the code"))
            ] == [2]
    # following the advice (the example it gives) is accepted
    plan = parse_seed_csv((HEADER + rows.format(answer="The code is =SAVE10")).encode())
    assert plan.entries["promo"].answer == "The code is =SAVE10"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_file_is_named_as_such_not_called_binary(encoding: str) -> None:
    """Excel's "Unicode Text" and many Windows tools save UTF-16. It was reported as "not
    CSV: the line contains a NUL byte (a binary file?)" followed by "missing column
    'question' (header is: \\x00q\\x00u...)": nothing told the operator the one thing to do,
    save it as UTF-8. One error, on line 1, naming the encoding and the fix."""
    text = HEADER + "When are you open?,Nine to five.,hours,\nWhat are your hours?,,hours,\n"
    found = errors_of(text.encode(encoding))
    assert len(found) == 1, found
    line, reason = found[0]
    assert line == 1 and reason.startswith(f"not UTF-8: the file is {encoding[:6].upper()}"), \
        reason
    assert "save it as" in reason and "UTF-8" in reason


def test_a_duplicate_row_with_an_empty_intent_joins_the_row_with_the_intent() -> None:
    """The same question and answer twice, once with an intent and once with the intent left
    empty (a row copied before the intent column was filled), was refused as "duplicate
    question (line 2) with a conflicting intent". An empty intent names nothing: it is kept
    as the written one, as an empty action is. Two different intents still conflict."""
    for rows in ("When are you open?,Nine to five.,hours,\nWhen are you open?,Nine to five.,,\n",
                 "When are you open?,Nine to five.,,\nwhen are you  open?,Nine to five.,hours,\n"):
        _assert_one_hours_question(rows)
    # a different intent on the same question is a conflict, reported against the row that
    # wrote an intent (line 3), not the one that left it empty (line 2)
    found = errors_of(HEADER + "When are you open?,Nine to five.,,\n"
                               "When are you open?,Nine to five.,hours,\n"
                               "When are you open?,Nine to five.,opening,\n"
                               "q two,b,,\n")
    assert found == [(4, "duplicate question (line 3) with a conflicting intent")]


def _zip(names: tuple[str, ...]) -> bytes:
    """A zip archive holding ``names`` (deflated, as Excel and LibreOffice write them)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.writestr(name, f"<xml>{name} {HEADER * 20}</xml>")
    return buffer.getvalue()


def _ods() -> bytes:
    """An OpenDocument spreadsheet as LibreOffice writes one: its first entry the file
    'mimetype', stored uncompressed, naming the type; the rest deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet",
                         compress_type=zipfile.ZIP_STORED)
        for name in ("content.xml", "styles.xml", "META-INF/manifest.xml"):
            archive.writestr(name, f"<xml>{name} {HEADER * 20}</xml>")
    return buffer.getvalue()


@pytest.mark.parametrize("data, kind", [
    (_zip(("[Content_Types].xml", "_rels/.rels", "xl/workbook.xml", "xl/worksheets/sheet1.xml",
           "xl/sharedStrings.xml")), "an Excel workbook (.xlsx)"),
    (_ods(), "an OpenDocument spreadsheet (.ods)"),
    (_zip(("mimetype", "content.xml", "META-INF/manifest.xml")), "a zip archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 8, "an Excel 97-2003 workbook"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "a PDF document"),
    (gzip.compress(HEADER.encode() * 50, mtime=0), "a gzip archive"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\n" + bytes(range(256)) * 4, "binary"),
], ids=["xlsx", "ods", "zip", "xls", "pdf", "gzip", "other"])
def test_a_workbook_or_other_binary_file_is_named_as_such_not_missing_columns(data: bytes,
                                                                               kind: str) -> None:
    """An .xlsx saved instead of exported (or a zip, a PDF) got junk: "not CSV: the line contains
    a NUL byte", "not UTF-8 (byte 0x..." on line after line, and "missing column 'question'
    (header is: PK\\x03\\x04...)". One error, on line 1, saying what the file is and how to
    export it, as a UTF-16 file gets."""
    found = errors_of(data)
    assert len(found) == 1, found[:4]
    line, reason = found[0]
    assert line == 1 and reason.startswith(f"not CSV: the file is {kind}"), reason
    assert "export it as CSV UTF-8" in reason, reason


@pytest.mark.parametrize("separator, named", [(";", "semicolons"), ("\t", "tabs")])
def test_a_semicolon_or_tab_separated_file_is_named_as_such(separator: str, named: str) -> None:
    """Excel in a locale whose decimal separator is a comma saves "CSV" with semicolons, and
    "Text (Tab delimited)" with tabs. Read with commas the whole header was one column:
    "missing column 'question' (header is: question;answer;intent;action)" and the same for
    'answer', which names neither the separator nor the fix. One error on the header's line
    instead, also when the header's names are quoted (that read as "not CSV: ',' expected
    after '\"'"). voicegate reads commas only: guessing the separator could split a comma
    file's questions at their semicolons."""
    rows = [["question", "answer", "intent", "action"],
            ["When are you open?", "Nine to five, weekdays.", "hours", ""],
            ["What are your hours?", "", "hours", ""]]
    plain = "\n" + "\n".join(separator.join(row) for row in rows) + "\n"  # a blank line first
    quoted = "\n".join(separator.join(f'"{cell}"' for cell in row) for row in rows) + "\n"
    for text, line in ((plain, 2), (quoted, 1)):
        found = errors_of(text)
        assert len(found) == 1, found
        assert found[0][0] == line and found[0][1].startswith(
            f"the file is separated by {named}; voicegate reads comma-separated CSV"), found
        assert "CSV UTF-8 (Comma delimited)" in found[0][1], found
    # a comma file whose header holds a semicolon or a tab in a column's name is read as before
    plan = parse_seed_csv((f"question,answer,notes{separator}internal\n"
                           "When are you open?,Nine to five.,x\n"
                           "What are your hours?,Nine to five.,\n").encode())
    assert len(plan.questions) == 2


def _assert_one_hours_question(rows: str):  # type: ignore[no-untyped-def]
    """``rows`` (the same question twice) seed beside one more hours question and a handoff:
    the two rows are one question of 'hours', answered "Nine to five.". Returns the plan."""
    plan = parse_seed_csv((HEADER + rows + "What are your hours?,,hours,\n"
                                           "I lost my card,,lost_card,handoff\n").encode())
    assert set(plan.entries) == {"hours", "lost_card"}, rows
    assert len(plan.entries["hours"].questions) == 2, plan.entries["hours"]
    assert plan.entries["hours"].answer == "Nine to five."
    assert plan.intents.count("hours") == 2 and len(plan.questions) == 3
    return plan


def test_a_duplicate_row_with_an_empty_answer_joins_the_row_with_the_answer() -> None:
    """The same question under the same intent twice, once with the answer and once with the
    answer left empty, was refused as "duplicate question (line 2) with a conflicting answer".
    A row without an answer takes its intent's (a paraphrase need not repeat it), so an empty
    answer names nothing: the row with the answer stands for both, as a row with an intent does
    for one without. Two different answers still conflict, with both lines."""
    for rows in ("When are you open?,Nine to five.,hours,\nWhen are you open?,,hours,\n",
                 "When are you open?,,hours,\nwhen are you  open?,Nine to five.,hours,\n"):
        plan = _assert_one_hours_question(rows)
        assert plan.entries["hours"].action is Action.ANSWER
    # two different answers on the same question are a conflict, reported against the row
    # that wrote the first answer (line 3), not the one that left it empty (line 2)
    found = errors_of(HEADER + "When are you open?,,hours,\n"
                               "When are you open?,Nine to five.,hours,\n"
                               "When are you open?,Eight to four.,hours,\n"
                               "q two,b,,\n")
    assert found == [(4, "duplicate question (line 3) with a conflicting answer")]
    # the answer kept must still agree with the rest of its intent
    found = errors_of(HEADER + "What are your hours?,Eight to four.,hours,\n"
                               "When are you open?,,hours,\n"
                               "When are you open?,Nine to five.,hours,\n"
                               "q two,b,,\n")
    assert found == [(4, "intent 'hours' already has a different answer (line 2)")]


@pytest.mark.parametrize("header,repeat", [
    (b"question,answer,intent\n", b"question,answer,intent\n"),
    (b"question,answer\n", b"\xef\xbb\xbfQuestion,Answer\n"),
    (b"question,answer,intent,action\n", b"answer,question,intent,action\n")])
def test_a_header_repeated_mid_file_is_refused_not_published_as_an_entry(header: bytes,
                                                                         repeat: bytes) -> None:
    """Two exports joined into one file (`cat a.csv b.csv`, each with its header and, from
    Excel, its BOM) repeat the header mid-file. That line was read as a data row: without an
    action column, an FAQ entry whose question is "question" (with an invisible U+FEFF
    before it when the second file had a BOM) answered "answer" was published without a
    word; with one, it was refused as "unknown action 'action'". It is refused on its own
    line as what it is, naming the header's line, and the rows around it are read."""
    pad = b"," * (header.count(b",") - 1)
    data = (header + b"q one,a" + pad + b"\n" + repeat + b"q two,b" + pad + b"\n"
            + b"=bad,c" + pad + b"\n")
    found = errors_of(data)
    assert [line for line, _ in found] == [3, 5], found
    assert "repeats the header (line 1)" in found[0][1]


@pytest.mark.parametrize("data, expected", [
    # A spreadsheet's capitalised header, as the seed CSV's "Question" is read.
    (b"Text,Topic\nwhat's the weather,chat\n", ("what's the weather",)),
    # Blank lines before the header: the first line that is not blank is the header.
    (b"\n\ntext\nbook me a flight\n", ("book me a flight",)),
], ids=["capitalised-header", "blank-lines-first"])
def test_a_negatives_file_is_read_as_the_seed_csv_is(tmp_path: Path, data: bytes,
                                                     expected: tuple[str, ...]) -> None:
    path = tmp_path / "never.csv"
    path.write_bytes(data)
    assert read_negatives_csv(path) == expected


@pytest.mark.parametrize("data, line, reason", [
    (b"text\rhello\rbad \xff byte\r", 3, "not UTF-8"),  # Excel's "CSV (Macintosh)": CR only
    (b"text,n\n\"\n\n\",1\nok,2\n", 2, "empty text"),  # a row is named by its first line
    (b"\nnote\nhello\n", 2, "needs a 'text' column (found ['note'])"),
    # Read leniently, the rest of the file was one negative, without a word.
    (b'text\nok\n"abc\nmore\n', 3, "not CSV: a quoted field that starts on this line is never closed"),
], ids=["lone-cr-not-utf8", "multi-line-row", "header-after-a-blank-line", "quote-left-open"])
def test_a_negatives_file_refused_names_the_right_line(tmp_path: Path, data: bytes, line: int,
                                                       reason: str) -> None:
    path = tmp_path / "never.csv"
    path.write_bytes(data)
    with pytest.raises(NegativesError) as info:
        read_negatives_csv(path)
    assert f": line {line}: {reason}" in str(info.value)


# ---------------------------------------------------------------------- review 2026-11-28

def _review_errors(data: str) -> list[tuple[int, str]]:
    with pytest.raises(SeedValidationError) as info:
        parse_seed_csv(data.encode("utf-8"), source="faq.csv")
    return [(e.line, e.reason) for e in info.value.errors]


# ---------------------------------------------------------------------- negatives CSV


@pytest.mark.parametrize("data, line", [
    # Excel's "CSV UTF-8" starts with a BOM; a row added later in a Latin-1 editor
    # ("¡Hola?" / "¿Dónde?" start with a byte that is not UTF-8).
    (b"\xef\xbb\xbftext\n\xa1Hola, qu\xe9 tal?\n", 2),
    (b"\xef\xbb\xbftext\nbook a flight\n\xbfD\xf3nde est\xe1 el tren?\n", 3),
], ids=["second-line", "third-line"])
def test_negatives_with_a_bom_name_the_line_of_the_bad_byte(tmp_path: Path, data: bytes,
                                                            line: int) -> None:
    """read_negatives_csv decodes with utf-8-sig, whose error offset does not count the BOM's
    three bytes; the line is computed on the raw bytes (BOM included), so a bad byte in the
    first three bytes of a line is blamed on the line before it."""
    path = tmp_path / "never.csv"
    path.write_bytes(data)
    with pytest.raises(NegativesError) as info:
        read_negatives_csv(path)
    assert f": line {line}: not UTF-8" in str(info.value), str(info.value)


@pytest.mark.parametrize("data", [
    b"text,notes\nbook me a flight,travel\nwhat's the weather,\n,\n",  # Excel's empty row
    b"text,notes\nbook me a flight,travel\nwhat's the weather,\n,,\n",
    b"text\nbook me a flight\nwhat's the weather\n   \n",  # a line of spaces
], ids=["empty-cells", "empty-cells-extra-comma", "spaces-only"])
def test_negatives_blank_rows_are_skipped_as_in_the_seed_csv(tmp_path: Path,
                                                             data: bytes) -> None:
    """The docs: the negatives file is "read as the seed CSV is". The seed CSV skips a row
    whose cells are all empty (a spreadsheet's trailing empty row: ",") as a blank line;
    the negatives file refuses the whole file with "line 4: empty text"."""
    path = tmp_path / "never.csv"
    path.write_bytes(data)
    assert read_negatives_csv(path) == ("book me a flight", "what's the weather")
    # the seed CSV reads the same kind of row as blank
    plan = parse_seed_csv(b"question,answer,notes\nWhen are you open?,Nine.,x\n"
                          b"What are your hours?,Nine.,\n,,\n")
    assert len(plan.questions) == 2


# ---------------------------------------------------------------------- seed CSV


def test_a_paraphrase_row_with_action_answer_takes_its_intents_answer() -> None:
    """A paraphrase need not repeat its intent's answer ("routing number please,,routing,"
    is accepted, and so is the action written on the answer's row), and an action written
    on any row is the entry's. Writing the action on every row (a filled-down column) is the
    same entry, but the paraphrase row is refused "action 'answer' needs an answer": the
    entry has one, on line 2."""
    data = (HEADER + "How do I reset my PIN?,Use the app: Cards then PIN.,pin,answer\n"
                     "reset my pin,,pin,answer\n"
                     "When are you open?,Nine to five.,hours,\n")
    plan = parse_seed_csv(data.encode("utf-8"))
    assert plan.entries["pin"].action is Action.ANSWER
    assert plan.entries["pin"].questions == ("How do I reset my PIN?", "reset my pin")
    # the same rows with the action written on the first row only
    same = data.replace("reset my pin,,pin,answer", "reset my pin,,pin,")
    assert parse_seed_csv(same.encode("utf-8")).entries["pin"] == plan.entries["pin"]


def test_two_ignored_columns_with_the_same_name_do_not_refuse_the_file() -> None:
    """"Other columns (notes, ids) are ignored": two of them named alike (a ticket export's
    "tag,tag", two "notes" columns) refuse the whole file "column 'notes' appears twice",
    though neither is read. Only a known column appearing twice is ambiguous."""
    plan = parse_seed_csv((
        "question,answer,intent,notes,notes\n"
        "When are you open?,Nine to five.,hours,checked,2024\n"
        "What are your hours?,,hours,,\n").encode("utf-8"))
    assert plan.entries["hours"].questions == ("When are you open?", "What are your hours?")


@pytest.mark.parametrize("first, second", [
    # the same visible question: precomposed (NFC) and decomposed (NFD, as macOS gives text)
    ("Où est mon café gratuit ?", "Ou\u0300 est mon cafe\u0301 gratuit ?"),
    # a space before the question mark (French typography) or not
    ("What are your opening hours?", "What are your opening hours ?"),
], ids=["nfc-nfd", "space-before-punctuation"])
def test_duplicate_questions_the_embedder_cannot_tell_apart_with_conflicting_answers(
        first: str, second: str) -> None:
    """Duplicate questions with conflicting answers are refused ("duplicate question (line N)
    with a conflicting answer"), keyed by normalize_text ("case and spacing never change the
    vector"). all-MiniLM-L6-v2's tokenizer gives these pairs the very same vector (cosine 1.0:
    NFD-normalised and split at punctuation), but normalize_text sees two questions: both
    are published, under two entries with conflicting answers, and a caller asking it is
    answered by whichever the router picks."""
    found = _review_errors(HEADER + f"{first},We have no free coffee.,coffee,\n"
                             f"{second},Free coffee is at the counter.,coffee_promo,\n"
                             "When are you open?,Nine to five.,hours,\n")
    assert [line for line, _ in found] == [3], found
    assert "duplicate question (line 2)" in found[0][1], found


def test_an_intent_whose_action_is_answer_with_no_answer_on_any_row_is_refused() -> None:
    found = _review_errors(HEADER + "How do I reset my PIN?,,pin,answer\n"
                                    "reset my pin,,pin,\n"
                                    "When are you open?,Nine to five.,hours,\n")
    assert found == [(2, "action 'answer' needs an answer: no row of intent 'pin' has one")]


def test_a_huge_answer_is_too_long_on_its_line_and_the_rows_after_it_are_still_checked() -> None:
    """Review (stop 59): cache_seed/validate.py:280: a field over the csv module's
    field_size_limit (131,072 characters; uploads may be 5 MB) surfaces as "not CSV: field
    larger than field limit (131072)" and the loop stops: no "answer too long", and the
    unknown action two lines later is never reported (every bad row is promised)."""
    found = errors_of(HEADER + "q one," + "x" * 200_000 + ",,\nq two,a,,\nq three,b,,bogus\n")
    assert (2, "answer too long (200000 characters, at most 1200)") in found, found
    assert any(line == 4 and "unknown action 'bogus'" in reason for line, reason in found), found


def test_a_quote_left_open_in_a_large_file_is_named_as_a_quote_not_a_field_limit() -> None:
    """Review (stop 59): cache_seed/validate.py:280: a quote left open on line 3 of a file
    over 128 KiB is reported as "not CSV: field larger than field limit (131072)": the
    operator hunts for a huge cell that does not exist. (The same quote in a small file says
    "unexpected end of data".) The reason should say a quoted field opened on that line is
    never closed."""
    rows = "".join(f"question number {i},answer {i},,\n" for i in range(8000))
    [(line, reason)] = errors_of(HEADER + "q one,a,,\n\"q two,b,,\n" + rows)
    assert line == 3
    assert "field limit" not in reason and "quote" in reason, reason


def test_a_negative_with_an_unquoted_comma_is_not_silently_cut_at_it(tmp_path: Path) -> None:
    """Review (stop 59): intents/negatives.py:80: the natural negatives file is one question
    a line under a 'text' header. A question with a comma, unquoted, is read as two fields
    and silently cut to its first: "Hi, can you tell me a joke" becomes the negative "Hi".
    The seed CSV refuses such a row with its line ("expected N fields ... quote fields with
    commas"); the negatives file is documented as read as the seed CSV is."""
    path = tmp_path / "never.csv"
    path.write_bytes(b"text\nbook me a flight\nHi, can you tell me a joke\n")
    try:
        texts = read_negatives_csv(path)
    except NegativesError as exc:  # refused on its line, as the seed CSV does: fine
        assert ": line 3:" in str(exc), str(exc)
        return
    assert texts == ("book me a flight", "Hi, can you tell me a joke"), texts


@pytest.mark.parametrize("intent", [
    "درخواست\u200cکارت",  # Persian "card request": ZWNJ is part of its spelling
    "कार्ड\u200dखो गया",  # Devanagari with a ZWJ (half-form)
], ids=["persian-zwnj", "devanagari-zwj"])
def test_an_intent_name_written_in_a_script_that_needs_zwnj_or_zwj_seeds(intent: str) -> None:
    """Review (stop 59): cache_seed/validate.py:391: "any printable intent name" is checked with
    str.isprintable(), which is False for the zero-width (non-)joiner that Persian, Hindi and
    other scripts need in ordinary words: such a name is refused as containing "a control or
    invisible separator character", with no way to write it otherwise."""
    plan = parse_seed_csv((HEADER + f"I lost my card,Call us.,{intent},\n"
                                    "When are you open?,Nine to five.,hours,\n").encode())
    assert intent in plan.entries


def test_the_shipped_negatives_hold_no_question_the_shipped_bank_faq_answers(bank_cache) -> None:  # noqa: F811
    """Review (stop 59): intents/data/negatives.csv (scripts/build_negatives.py keeps every
    CLINC domain but banking and credit cards): its "unrelated" questions include CLINC's
    oos row "how much is an overdraft fee for bank" and the travel domain's
    travel_notification ("tell my bank that i'm going to france"). The shipped example FAQ
    answers both (overdraft_fee, travel_notice), and the router says so; yet every seed
    calibrates against them as questions that must never get a cached answer, so a right
    answer counts against the out-of-domain bound and trains the judge that it is wrong."""
    plan = read_seed_csv(BANK_FAQ)
    in_domain = {"how much is an overdraft fee for bank": "overdraft_fee",
                 "tell my bank that i'm going to france": "travel_notice",
                 "i need to inform the bank i am going out of country": "travel_notice"}
    for text, intent in in_domain.items():  # the FAQ's own entries for them
        assert bank_cache.router.route(text).intent == intent, text
    negatives = set(negatives_for_seed((), plan.questions))
    assert not negatives & set(in_domain), sorted(negatives & set(in_domain))


def test_a_negative_that_is_a_seed_question_but_for_punctuation_is_not_trained_against() -> None:
    """Review (stop 60): intents/negatives.py negatives_for_seed dropped a negative only
    when it matched a seed question up to case and spacing (normalize_text). The operator's
    negatives CSV is typed by hand or pasted from call logs (no question mark, "?!", a
    full-width letter); "when are you open" then stayed a never-answer question beside the
    seed's "When are you open?", a vector within cosine 0.96 of it: the judge learns the operator's own question as out-of-domain, and the
    threshold counts its cached answer as a wrong one."""
    questions = ["When are you open?", "Can I get a refund?"]
    same = ["when are you open", "WHEN are you open ?!", "when are you open\u2026",
            "\uff37hen are you open?", "can i get a refund", "Can I get a refund ."]
    negatives = negatives_for_seed((*same, "do you sell car insurance"), questions)
    assert not set(same) & set(negatives), sorted(set(same) & set(negatives))
    assert "do you sell car insurance" in negatives


def test_a_cell_of_invisible_characters_alone_is_empty() -> None:
    """Review (stop 59): a question or answer of a zero-width space or a BOM alone passed
    the empty check: the question was embedded as next to nothing (a vector any garbage
    may land near) and the answer spoken as silence."""
    found = errors_of(HEADER + "\u200b,Nine to five.,,\nWhen are you open?,\ufeff,,\n"
                               "Where are you?,On Main Street.,,\n")
    assert (2, "empty question") in found, found
    assert (3, "empty answer: it holds only invisible characters") in found, found


def test_an_intent_named_by_joiners_alone_is_refused_as_an_invisible_name() -> None:
    """Review (stop 59, of this session's change): cache_seed/validate.py _read_row:
    ZWJ/ZWNJ are now let into intent names (_printable), but nothing checks a name shows
    anything, as 345e3ab does for questions and answers (_visible). An intent of a zero-
    width joiner alone (isprintable refused it before) now seeds: an entry whose name is
    blank in the dashboard, logs and stats labels, and "Card lost" and "Card lost\u200d" are
    two intents that look one."""
    from cache_seed import SeedValidationError, parse_seed_csv

    data = ("question,answer,intent\n"
            "how do I reset my pin,Open the app and choose PIN.,\u200d\n"
            "where is my card,It is on its way.,Card lost\n").encode("utf-8")
    with pytest.raises(SeedValidationError) as raised:
        plan = parse_seed_csv(data, "seed.csv")
        pytest.fail(f"an intent of a zero-width joiner alone seeded: {sorted(plan.entries)!r}")
    assert any(e.line == 2 for e in raised.value.errors), raised.value


def test_a_negatives_csv_with_a_quote_left_open_names_the_open_quote(tmp_path: Any) -> None:
    """Review (stop 59, of this session's change): intents/negatives.py read_negatives_csv:
    5b783ef names an open quote in the seed CSV (validate.csv_problem) but the negatives
    CSV, read "as the seed CSV is", still says the csv module's "unexpected end of data", a
    missed call site."""
    from intents.negatives import NegativesError, read_negatives_csv

    path = tmp_path / "negatives.csv"
    path.write_text('text\nwhat is the weather\n"is it going to rain today\nhello\n',
                    encoding="utf-8")
    with pytest.raises(NegativesError) as raised:
        read_negatives_csv(path)
    assert "never closed" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("text", ["???", "...", "¿?", "- ! -"])
def test_a_negative_of_punctuation_alone_is_refused_on_its_line(tmp_path: Any,
                                                                text: str) -> None:
    """Review (stop 60): intents/negatives.py read_negatives_csv: a row of punctuation alone
    ("???", "...") was read as a negative, then silently dropped by negatives_for_seed (its
    same_question key is empty): the operator's file loads and one of its rows does nothing.
    It is refused when the file is read, on its line and saying why, as an empty one is."""
    path = tmp_path / "negatives.csv"
    path.write_text(f'text\nwhat is the weather\n"{text}"\nhello\n', encoding="utf-8")
    with pytest.raises(NegativesError) as raised:
        texts = read_negatives_csv(path)
        pytest.fail(f"read as negatives, {negatives_for_seed(texts)[-2:]!r} kept: {texts!r}")
    assert ": line 3: no words, only punctuation" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("data, line, reason", [
    (b"text\n", 1, "no rows after the header"),
    (b"\ntext,notes\n,\n\n", 2, "no rows after the header"),
    (b"text,Text\nbook me a flight,what's the weather\n", 1, "column 'text' appears twice"),
], ids=["header-only", "blank-rows-only", "text-twice"])
def test_a_negatives_file_that_adds_nothing_or_half_is_refused(tmp_path: Path, data: bytes,
                                                               line: int, reason: str) -> None:
    """Review (stop 62): intents/negatives.py read_negatives_csv returned () for a file
    with a header and no rows, and read the first of two 'text' columns, dropping the
    other's questions: `voicegate seed --negatives` seeded without the operator's
    negatives, or half of them, and said nothing (exit 0). The seed CSV, which the
    negatives file is documented to be read as, refuses both ("no rows after the header",
    "column ... appears twice"); so does the negatives file now, naming the line."""
    path = tmp_path / "never.csv"
    path.write_bytes(data)
    with pytest.raises(NegativesError) as info:
        read_negatives_csv(path)
    assert f": line {line}: {reason}" in str(info.value)


# ---------------------------------------------------------------------- review stop 62: messages


def test_a_file_starting_with_two_byte_order_marks_is_read_as_one_with_one(tmp_path: Path) -> None:
    """Review (stop 62): cache_seed/validate.py: a file starting with two UTF-8 BOMs (an
    editor that adds one to text already carrying one) was refused "unknown column
    '\\ufeffquestion': did you mean 'question'?": an operator cannot see the character it
    names, nor find a column to rename. A BOM is no part of a column's name; a second one at
    the start is an editor's artefact, skipped as the first is: in the seed CSV and in the
    negatives file, which said "needs a 'text' column (found ['\\ufefftext'])"."""
    bom = b"\xef\xbb\xbf"
    plan = parse_seed_csv(bom * 2 + (HEADER + "q one,a,,\nq two,b,,\n").encode())
    assert plan.questions == ["q one", "q two"]
    plan = parse_seed_csv(bom * 3 + b"question,answer\nq one,a\nq two,b\n")
    assert plan.questions == ["q one", "q two"]
    path = tmp_path / "never.csv"
    path.write_bytes(bom * 2 + b"text\nbook me a flight\n")
    assert read_negatives_csv(path) == ("book me a flight",)


def test_a_line_that_is_not_csv_is_named_and_the_lines_after_it_are_still_checked() -> None:
    """Review (stop 62): cache_seed/validate.py _read_rows: any csv.Error stopped the check at
    its row: `"when" open,9` on line 3 gave "not CSV: ',' expected after '\\"'" (the csv
    module's words) and the unknown action on line 4 and the empty question on line 5 went
    unreported until the next upload. An error confined to its line (or to its row's lines)
    is named in words and the check goes on at the next line."""
    found = errors_of(HEADER + "q one,a,,\n\"when\" open,9,,\nq three,b,,bogus\n,c,,\nq five,d,,\n")
    assert [line for line, _ in found] == [3, 4, 5], found
    assert "expected after" not in found[0][1] and "doubled" in found[0][1], found
    # a row whose quoted field runs on over two lines: named by its first, read on after it
    found = errors_of(HEADER + "q one,\"line one\nline two\"x,,\nq three,b,,bogus\nq four,c,,\n")
    assert [line for line, _ in found] == [2, 4], found
    assert "line 3" in found[0][1], found


@pytest.mark.parametrize("rows", [
    "q one,a,,\n\"q two,b,,\nq three,c,,bogus\n",  # a quote never closed
    "q one,a,,\n\"when\" open,\"9,,\nq three,c,,bogus\n",  # the bad line leaves one open too
], ids=["never-closed", "bad-line-leaves-a-quote-open"])
def test_a_check_stopped_by_a_quote_says_the_rest_of_the_file_was_not_checked(rows: str) -> None:
    """Review (stop 62): where reading on after a line that is not CSV cannot be trusted (a
    quote left open swallows the lines after it), the check stops there: the operator was
    not told that the lines after it (here line 4's unknown action) went unchecked, and
    fixed the file only to be refused again."""
    [(line, reason)] = errors_of(HEADER + rows)
    assert line == 3 and "the rest of the file was not checked" in reason, reason


def test_a_trailing_comma_is_named_as_such_not_told_to_quote_fields() -> None:
    """Review (stop 62): cache_seed/validate.py _read_rows, intents/negatives.py: a row with
    more fields than the header was always told "(quote fields with commas)", also when
    the extra fields are empty (a trailing comma), and a row with fewer fields, which has
    no comma too many at all. Each is told what it shows. An unquoted comma in a row whose
    last column is empty ("Hi, can I pay?,Yes.,pay,") looks like a trailing comma, and
    removing a comma would shift its cells: that advice names quoting too."""
    found = errors_of(HEADER + "q one,a,,,\nq two,b,,\nq three,c,,,,\nq four,d\n"
                               "Hi, can I pay?,Yes.,pay,answer\n")
    assert found == [
        (2, "not CSV: expected 4 fields as in the header, found 5, the last one empty: a "
            "trailing comma? remove it (but if a cell holds a comma, quote that cell instead)"),
        (4, "not CSV: expected 4 fields as in the header, found 6, the last 2 empty: "
            "trailing commas? remove them (but if a cell holds a comma, quote that cell "
            "instead)"),
        (5, "not CSV: expected 4 fields as in the header, found 2 (write a comma for every "
            "column, empty cells too)"),
        (6, "not CSV: expected 4 fields as in the header, found 5 (quote fields with "
            "commas)")], found


def test_a_negatives_files_trailing_comma_is_named_as_such(tmp_path: Path) -> None:
    """Review (stop 62): intents/negatives.py: as the seed CSV's, a trailing comma was told
    "(quote texts with commas)"."""
    path = tmp_path / "never.csv"
    path.write_bytes(b"text\nbook me a flight,\nhello\n")
    with pytest.raises(NegativesError) as info:
        read_negatives_csv(path)
    assert ": line 2: expected 1 fields as in the header, found 2, the last one empty: a " \
           "trailing comma? remove it" in str(info.value), str(info.value)


@pytest.mark.parametrize("data", [b"text\nbook a flight\nwhat\x00 weather\nhello\n",
                                  b"text\nbook a flight\n\x00\nhello\n"],
                         ids=["nul-in-text", "nul-alone"])
def test_a_negative_holding_a_nul_byte_is_refused_as_the_seed_csv_refuses_it(
        tmp_path: Path, data: bytes) -> None:
    """Review (stop 62): intents/negatives.py read_negatives_csv: a NUL byte in a text was
    read as part of the negative (a line of one NUL was a negative "\\x00"), where the seed
    CSV, which the negatives file is documented to be read as, refuses such a line "not
    CSV: the line contains a NUL byte (a binary file?)"."""
    path = tmp_path / "never.csv"
    path.write_bytes(data)
    with pytest.raises(NegativesError) as info:
        texts = read_negatives_csv(path)
        pytest.fail(f"read as negatives: {texts!r}")
    assert ": line 3: not CSV: the line contains a NUL byte" in str(info.value), str(info.value)


# ---------------------------------------------------------------------- review stop 63


def test_a_negatives_file_with_several_bad_rows_names_every_one_in_one_pass(
        tmp_path: Path) -> None:
    """Review (stop 63): intents/negatives.py read_negatives_csv stopped at its first row
    that is not CSV (a stray quote): an operator fixing the file saw one error per attempt,
    where the seed CSV (cache_seed/validate.py) reads on after a row confined to its line
    and names every bad row with its line. The negatives file is read on the same way: each
    stray quote, the trailing comma, the text of punctuation alone and the line that is not
    UTF-8 after them, all in one error."""
    path = tmp_path / "never.csv"
    path.write_bytes(b'text\nbook me a flight\n"when" open\nwhat\'s the weather\n'
                     b'say "hi" "there"x,\n"..."\nbad \xff byte\n"is it" raining\nhello\n')
    with pytest.raises(NegativesError) as info:
        texts = read_negatives_csv(path)
        pytest.fail(f"read as negatives: {texts!r}")
    message = str(info.value)
    for line, reason in ((3, "not CSV: text follows a quoted field's closing"),
                         (6, "no words, only punctuation"), (7, "not UTF-8"),
                         (8, "not CSV: text follows a quoted field's closing")):
        assert f"line {line}: {reason}" in message, (line, message)
    # line 5 is two cells (a comma): told once, as the seed CSV tells it
    assert "line 5: " in message, message
    assert [int(n) for n in re.findall(r"line (\d+): ", message)] == [3, 5, 6, 7, 8], message


def test_a_negatives_file_stopped_by_a_quote_left_open_still_names_the_rows_before_it(
        tmp_path: Path) -> None:
    """Review (stop 63): a quote never closed swallows the rest of the file, so the check
    stops there, as the seed CSV's does, saying the rest was not checked; the bad rows before
    it are still named with it."""
    path = tmp_path / "never.csv"
    path.write_bytes(b'text\n???\nbook me a flight\n"is it going to rain\nhello\n')
    with pytest.raises(NegativesError) as info:
        read_negatives_csv(path)
    message = str(info.value)
    assert "line 2: no words, only punctuation" in message, message
    assert "line 4: not CSV: a quoted field that starts on this line is never closed" in message
    assert "the rest of the file was not checked" in message, message


def test_a_quoted_cell_after_a_space_is_read_as_quoted_not_published_with_its_quotes() -> None:
    """Review (stop 64): a hand-written CSV with a space after each comma (`question, answer`
    is a header it already read) quoted its cells after that space: `"When are you open?",
    "Nine to five", hours`. The csv reader took the space for the cell's start and the quotes
    for its text, so the answer was published as `"Nine to five"`, quote marks and all, without
    a word; a quoted cell holding a comma (`, "Nine to five, weekdays"`) was split there and
    told "quote fields with commas", though it was quoted. Spaces after a comma are skipped
    (cells are stripped anyway): the quotes delimit the cell, as the operator wrote them."""
    plan = parse_seed_csv((
        "question, answer, intent\n"
        '"When are you open?", "Nine to five, weekdays.", hours\n'
        'What are your hours?,  "Nine to five, weekdays.", hours\n'
        'Where are you?, "On ""Main"" Street.", \n').encode("utf-8"))  # no intent
    assert plan.entries["hours"].answer == "Nine to five, weekdays."
    assert plan.entries["hours"].questions == ("When are you open?", "What are your hours?")
    assert [e.answer for e in plan.entries.values()] == ["Nine to five, weekdays.",
                                                         'On "Main" Street.']
    # A space inside the quotes is the cell's own (then stripped as any cell's); a tab after
    # the comma is no space: a cell starting with one is still refused (CSV injection).
    errors = errors_of('question,answer\nWhen are you open?,\t"=1+1"\nWhere are you?,Main St\n')
    assert [line for line, _ in errors] == [2] and "formula" in errors[0][1], errors


@pytest.mark.parametrize("hint", ["sep=,", '"sep=,"', "SEP=,"])
def test_excel_s_separator_hint_line_before_a_comma_header_is_skipped(hint: str) -> None:
    """Review (stop 64): a CSV saved for Excel can start with its separator hint ("sep=,",
    which Excel reads and never shows). It was taken for the header: "missing column
    'question' (header is: sep=, )" and the same for 'answer', naming neither the line nor
    the fix. A comma hint says what voicegate reads anyway: the line is skipped."""
    plan = parse_seed_csv((f"{hint}\r\nquestion,answer,intent\r\n"
                           "When are you open?,Nine to five.,hours\r\n"
                           "What are your hours?,Nine to five.,hours\r\n").encode())
    assert list(plan.questions) == ["When are you open?", "What are your hours?"]


@pytest.mark.parametrize("separator, named", [(";", "semicolons"), ("\t", "tabs")])
def test_a_separator_hint_of_another_separator_names_it(separator: str, named: str) -> None:
    """Review (stop 64): "sep=;" (or a tab) before a semicolon file's header: one error on
    its line naming the separator and the fix, as a semicolon header gets, not "missing
    column" for the hint."""
    text = (f"sep={separator}\nquestion{separator}answer\n"
            f"When are you open?{separator}Nine to five.\n")
    found = errors_of(text)
    assert len(found) == 1, found
    assert found[0][0] == 1 and found[0][1].startswith(
        f"the file is separated by {named}; voicegate reads comma-separated CSV"), found


@pytest.mark.parametrize("answer", [
    "prompts/opening_hours.wav", "OPENING-HOURS.WAV", "hours.mp3",
    "https://cdn.example.com/ivr/hours.mp3?v=2", "s3://bucket/prompts/hours.ulaw",
    "file:///var/lib/ivr/hours.ogg",
])
def test_an_answer_that_is_an_audio_file_reference_is_refused_on_its_line(answer: str) -> None:
    """Review (stop 68): an answer cell holding an audio file's name or URL (an IVR's prompt
    export: "prompts/opening_hours.wav") seeded as text: the voice rendered it, and every
    caller asking for the opening hours heard "prompts slash opening underscore hours dot
    wav" from the cache, a wrong cached answer published without a word. It is refused on
    its line, saying the answer must be the words to say; an answer that mentions a file or
    a web address among its words is still an answer."""
    found = errors_of(HEADER + f"When are you open?,{answer},hours,\n"
                               "Where are you?,On Main Street.,where,\n")
    assert len(found) == 1 and found[0][0] == 2, found
    assert "audio file" in found[0][1] and "words" in found[0][1], found
    plan = parse_seed_csv((HEADER + "When are you open?,Hear our hours at bank.example/hours.mp3"
                                    " or call us.,hours,\n"
                                    "What is your website?,www.bank.com.au,site,\n").encode())
    assert plan.entries["site"].answer == "www.bank.com.au"


@pytest.mark.parametrize("data, kind", [
    (b"\xef\xbb\xbf\n<!DOCTYPE html>\n<html lang=\"en\"><head><title>Sign in - Google Accounts"
     b"</title>\n<script nonce=\"x\">var a = \"b\";</script>\n</head><body>question,answer"
     b"</body></html>\n", "an HTML page"),
    (b"<html>\n<body><table><tr><td>question</td><td>answer</td></tr></table></body>\n</html>\n",
     "an HTML page"),
    (b'<?xml version="1.0"?>\n<?mso-application progid="Excel.Sheet"?>\n<Workbook '
     b'xmlns="urn:schemas-microsoft-com:office:spreadsheet">\n</Workbook>\n', "an XML document"),
    (b'[\n  {"question": "When are you open?", "answer": "Nine to five."},\n'
     b'  {"question": "Where are you?", "answer": "On Main Street."}\n]\n', "JSON"),
    (b'{"rows": [{"question": "When are you open?", "answer": "Nine to five."}]}\n', "JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)) * 4,
     "a PNG image"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\n" + bytes(range(256)) * 4, "a JPEG image"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x00\n" + bytes(range(256)) * 4, "audio"),
], ids=["html-sign-in-page", "html-table", "excel-xml", "json-list", "json-object", "png", "jpeg",
        "mp3"])
def test_a_web_page_json_or_an_image_is_named_as_such_not_a_broken_quote(data: bytes,
                                                                         kind: str) -> None:
    """Review (stop 68): a sheet's CSV link fetched without its sign-in (curl -L ... >
    faq.csv) saves Google's HTML sign-in page; uploaded, it was refused on line 1 for "text
    follows a quoted field's closing '\"'" (the markup's attribute quotes), JSON for
    "missing column 'question' (header is: [)", a PNG screenshot with "not UTF-8" and a
    missing column per line: true, and no word of what the file is. One error on line 1 now
    names it, as a workbook or a PDF is named."""
    found = errors_of(data)
    assert len(found) == 1, found[:4]
    line, reason = found[0]
    assert line == 1 and reason.startswith(f"not CSV: the file is {kind}"), reason
    assert "export it as CSV UTF-8" in reason, reason


def test_a_cell_of_punctuation_alone_is_refused_on_its_line() -> None:
    """Review (stop 68): a spreadsheet's placeholder for "no answer yet" ("-", "...", "—")
    passed validation as an answer. Piper renders it as no audio at all, so the seed failed
    after validation, at that answer's render ("returned no 16-bit PCM": no line, and the
    other such rows unsaid); a cloud voice renders a breath, published as a cached answer
    of silence. A question of punctuation alone ("?") was trained on as a question. Each is
    refused on its line, as the negatives file refuses its own."""
    found = errors_of(HEADER + "When are you open?,-,hours,\n"
                               "Where are you?,...,where,\n"
                               "Do you have a branch in Leeds?,\u2014,leeds,\n"
                               "?,Nine to five.,hours,\n"
                               "What is your fee?,$5 a month.,fee,\n"
                               "Who are you?,\u2605\u2605\u2605,who,\n")
    assert [line for line, _ in found] == [2, 3, 4, 5], found
    assert all("no words, only punctuation" in reason for _, reason in found), found
    assert found[0][1].startswith("answer") and found[3][1].startswith("question"), found


def test_an_intent_name_in_two_unicode_forms_is_one_intent() -> None:
    """Review (stop 68): rows pasted from two sources spelt one intent "résiliation" in two
    Unicode forms (é as one character, NFC, and as e plus a combining accent, NFD, as macOS
    and PDFs give it): identical on screen, they seeded two intents. The rows without an
    answer formed one of their own, published as an agent (llm) entry: its questions never
    got the cached answer, and the classifier split what is one intent in two. A name is
    read in its composed form (NFC), as its spaces are collapsed, in the CSV and in the
    admin API's rows alike."""
    composed = unicodedata.normalize("NFC", "résiliation")
    decomposed = unicodedata.normalize("NFD", "résiliation")
    assert composed != decomposed
    rows = (HEADER + f"How do I close my account?,Call us to close it.,{composed},\n"
                     f"I want to cancel my account,,{decomposed},\n"
                     "When are you open?,Nine to five.,hours,\n")
    plan = parse_seed_csv(rows.encode())
    assert sorted(plan.entries) == sorted([composed, "hours"]), sorted(plan.entries)
    entry = plan.entries[composed]
    assert entry.action is Action.ANSWER and entry.answer == "Call us to close it."
    assert entry.questions == ("How do I close my account?", "I want to cancel my account")
    from cache_seed import parse_seed_rows
    again = parse_seed_rows([{"question": "I want to cancel my account", "intent": decomposed},
                             {"question": "How do I close my account?",
                              "answer": "Call us to close it.", "intent": composed},
                             {"question": "When are you open?", "answer": "Nine to five.",
                              "intent": "hours"}])
    assert sorted(again.entries) == sorted(plan.entries)


@pytest.mark.parametrize("answer, shown", [
    ("<p>Our branches are open nine to five.</p>", "<p>"),
    ('Open <b>nine</b> to five; see <a href="https://bank.example/hours">hours</a>.', "<b>"),
    ("Open nine&nbsp;to&nbsp;five.", "&nbsp;"),
    ("Call us on 0800 123 456.<br/>", "<br/>"),
])
def test_an_answer_holding_html_markup_is_refused_on_its_line(answer: str, shown: str) -> None:
    """Review (stop 68): a help centre's export (Zendesk, Intercom) carries its answers as
    HTML. Seeded as they were, the voice read the markup aloud: "<p>Our branches are open
    nine to five.</p>" took Piper 3.0 s where the words take 2.1, "nine&nbsp;to&nbsp;five"
    4.2 s, every caller hearing the tags and entities spelt out from the cache. Such an
    answer is refused on its line, naming the markup; a "<" or "&" in plain words is not
    markup."""
    found = errors_of(HEADER + f'When are you open?,"{answer.replace(chr(34), chr(34) * 2)}",'
                               "hours,\nWhere are you?,On Main Street.,where,\n")
    assert len(found) == 1 and found[0][0] == 2, found
    assert "HTML" in found[0][1] and shown in found[0][1], found
    plan = parse_seed_csv((HEADER + "What is the minimum?,Deposits of < 5 pounds & more are "
                                    "fine; R&D is closed.,minimum,\n"
                                    "Where are you?,On Main Street.,where,\n").encode())
    assert plan.entries["minimum"].answer.startswith("Deposits of < 5 pounds & more")


@pytest.mark.parametrize("answer", [
    "We support AT&T; Verizon and T-Mobile.",
    "Ask our Q&A; it lists every fee.",
    "Brands we accept: M&S; H&M; B&Q.",
])
def test_an_ampersand_word_before_a_semicolon_is_no_html_entity(answer: str) -> None:
    """Review (stop 68): an answer was refused as HTML markup for any "&letters;": a carriers'
    list, "We support AT&T; Verizon and T-Mobile.", was refused on its line for "holds HTML
    markup ('&T;')", though it holds none and the voice says it right; a brand list
    ("M&S; H&M; B&Q.") alike. Only HTML's own entity names (&nbsp;, &amp;, ...) are markup."""
    plan = parse_seed_csv((HEADER + f'Which carriers?,"{answer}",carriers,\n'
                                    "Where are you?,On Main Street.,where,\n").encode())
    assert plan.entries["carriers"].answer == answer
    found = errors_of(HEADER + "When are you open?,Nine&ensp;to five &amp; on Sundays.,hours,\n")
    assert len(found) == 1 and "HTML" in found[0][1] and "&ensp;" in found[0][1], found


@pytest.mark.parametrize("answer, kind, shown", [
    ("**Open** nine to five.", "Markdown", "**Open**"),
    ("Open nine to five, see [our site](https://bank.example/hours).", "Markdown",
     "[our site](https://bank.example/hours)"),
    ("Our branches are open {{branch_hours}}.", "template placeholder", "{{branch_hours}}"),
    ("Your card arrives in ${delivery_days} days.", "template placeholder", "${delivery_days}"),
])
def test_an_answer_in_markdown_or_with_a_template_placeholder_is_refused_on_its_line(
        answer: str, kind: str, shown: str) -> None:
    """Review (stop 68): answers written by a chat assistant come in Markdown, and a help
    desk's macros carry placeholders. Seeded as they were, "**Open** nine to five." took
    Piper 3.7 s where the words take 1.5 (the asterisks spelt out), a link's brackets and
    address 6.2 s against 2.6, and "Our branches are open {{branch_hours}}." was said as
    "Our branches are open.": a wrong cached answer. Each is refused on its line, naming
    what it holds; an asterisk or a brace in plain words is neither."""
    found = errors_of(HEADER + f'When are you open?,"{answer}",hours,\n'
                               "Where are you?,On Main Street.,where,\n")
    assert len(found) == 1 and found[0][0] == 2, found
    assert kind in found[0][1] and shown in found[0][1], found
    plan = parse_seed_csv((HEADER + "Any fees?,No fees* on transfers (*terms apply) {or so}.,"
                                    "fees,\nWhere are you?,On Main Street.,where,\n").encode())
    assert plan.entries["fees"].answer.startswith("No fees*")


def test_an_answer_repeated_in_two_unicode_forms_is_one_answer() -> None:
    """Review (stop 68): an intent's rows that each carry its answer, pasted from two
    sources, spelt "Our café opens at nine." with é composed (NFC) on one row and as e plus
    a combining accent (NFD) on the other: identical on screen, refused as "intent 'cafe'
    already has a different answer", a difference the operator cannot see to fix. An answer
    is read in its composed form, as an intent's name is."""
    composed = unicodedata.normalize("NFC", "Our café opens at nine.")
    decomposed = unicodedata.normalize("NFD", composed)
    plan = parse_seed_csv((HEADER + f"When does the cafe open?,{composed},cafe,\n"
                                    f"Cafe opening time?,{decomposed},cafe,\n"
                                    "Where are you?,On Main Street.,where,\n").encode())
    assert plan.entries["cafe"].answer == composed
    assert len(plan.entries["cafe"].questions) == 2


@pytest.mark.parametrize("answer", ["TBD", "n/a", "TODO", "tbc.", "N.A.", "[TBD]", "xxx", "?TODO?"])
def test_an_answer_that_is_a_placeholder_word_is_refused_on_its_line(answer: str) -> None:
    """Review (stop 68): a sheet's answers still to write ("TBD", "N/A", "TODO") seeded as
    answers: callers asking were told "T B D" from the cache, a wrong cached answer. A cell
    that is such a placeholder alone is refused on its line, as one of punctuation alone
    is; an answer using the word among others is an answer."""
    found = errors_of(HEADER + f"When are you open?,{answer},hours,\n"
                               "Where are you?,On Main Street.,where,\n")
    assert len(found) == 1 and found[0][0] == 2, found
    assert "placeholder" in found[0][1], found
    plan = parse_seed_csv((HEADER + "When are you open?,Hours are TBD for the holidays.,hours,\n"
                                    "Where are you?,On Main Street.,where,\n").encode())
    assert plan.entries["hours"].answer == "Hours are TBD for the holidays."
