"""The sentence chunker on scripts other than Latin: their own sentence marks.

The Latin rules (abbreviations, decimals, initials, list markers, closers) are pinned in
tests/test_agent.py; here the marks of other scripts, which need no space after them.
"""

from __future__ import annotations

import pytest

from gateway.sentences import SentenceChunker
from tests.test_agent import chunk_all, chunk_as_fed as streamed


@pytest.mark.parametrize("tokens", ["char", "whole"])
@pytest.mark.parametrize("sentences", [
    # Chinese: the ideographic full stop, full-width question and exclamation marks.
    ["您好，我可以帮您重置密码。", "请打开应用，然后点击设置。", "还有其他问题吗？", "祝您愉快！"],
    # Japanese, a closing corner bracket after the full stop, and "？！" together.
    ["パスワードをリセットしました。", "「設定を開いてください。」", "本当ですか？！", "はい。"],
    # Hindi: the danda, and the double danda (a space after them, as Hindi writes it).
    ["आपका पासवर्ड बदल दिया गया है। ", "क्या कुछ और चाहिए? ", "धन्यवाद॥"],
    # Arabic question mark and full stop (Urdu), Armenian full stop, Ethiopic full stop.
    ["هل تريد إعادة تعيين كلمة المرور؟ ", "ٹھیک ہے۔ ", "Շնորհակալություն։ ", "እሺ። ", "ደህና ሁን።"],
])
def test_other_scripts_sentence_marks_end_a_sentence(sentences, tokens):
    """Review (stop 63): the chunker ended sentences on ". ! ? …" only, and only before
    whitespace: a reply in Chinese or Japanese ("。", "！", "？", no space after them), or
    Hindi (the danda "।"), Arabic ("؟", "۔"), Armenian ("։") or Ethiopic ("።") was one
    piece until the whole reply was written (or max_chars), and the caller waited in
    silence for seconds. Each script's sentence mark ends the sentence, after its closing
    bracket if one follows, as soon as the next character is known."""
    text = "".join(sentences)
    as_fed = streamed(text, tokens)
    assert [piece for _, piece in as_fed] == [s.strip() for s in sentences], as_fed
    if tokens == "char":
        # Out as soon as the character after the mark (and its closers) came, not later.
        for (fed, piece), sentence in zip(as_fed[:-1], sentences):
            assert len(fed) <= text.index(sentence) + len(sentence) + 1, (fed, piece)


def test_the_first_sentence_of_a_chinese_reply_goes_out_before_the_reply_ends():
    """Review (stop 63): streamed token by token as an LLM writes it, a Chinese reply's
    first sentence is a piece before the next one is written, not at the flush."""
    chunker = SentenceChunker()
    out: list[str] = []
    for token in ["您好", "，我可以", "帮您重置密码", "。", "请打开", "应用", "，然后点击"]:
        out += chunker.feed(token)
    assert out == ["您好，我可以帮您重置密码。"]
    assert chunker.flush() == "请打开应用，然后点击"


@pytest.mark.parametrize("text", [
    "圆周率约为３．１４，请记住。",  # a full-width decimal point
    "会议在10։30开始。",  # a mark between two digits: a decimal or a time
])
def test_a_mark_between_digits_ends_no_sentence(text):
    """Review (stop 63): a full stop between two digits is a decimal point (or a time's
    separator), in any script, as "3.5" is in Latin text."""
    assert [piece for _, piece in streamed(text, "char")] == [text]


def test_every_sentence_terminal_of_unicode_ends_a_sentence():
    """Review (stop 63): the chunker's marks are Unicode's Sentence_Terminal (UAX #29
    STerm) in the Basic Multilingual Plane, where the ``regex`` package knows it."""
    regex = pytest.importorskip("regex")
    from gateway.sentences import SENTENCE_TERMINALS
    sterm = {chr(c) for c in range(0x10000) if regex.match(r"\p{Sentence_Terminal}", chr(c))}
    # "." "!" "?" keep the Latin rules; ONE DOT LEADER is a leader, seldom a full stop.
    assert sterm - SENTENCE_TERMINALS == {".", "!", "?", "\u2024"}
    assert SENTENCE_TERMINALS - sterm == set()
    for mark in sorted(SENTENCE_TERMINALS):
        assert [p for _, p in streamed(f"Ab{mark}Cd{mark}", "char")] == [
            f"Ab{mark}", f"Cd{mark}"], hex(ord(mark))


CLAUSE_MARKS = ["\uff0c", "\u3001", "\uff1b", "\uff1a", "\u060c", "\u061b"]  # ， 、 ； ： ، ؛


@pytest.mark.parametrize("tokens", ["char", "whole"])
@pytest.mark.parametrize("mark", CLAUSE_MARKS)
def test_a_long_first_sentence_is_cut_at_a_full_width_or_arabic_clause_mark(mark, tokens):
    """Review (stop 63): the long-clause cut (a first sentence past 24 characters goes out
    at a clause mark, so the caller hears something sooner) knew only the Latin ", ; : —"
    before whitespace: a long Chinese first sentence ("，" "、" "；" "：", no space after
    them) or an Arabic one ("،" "؛") waited for its full stop. Those marks cut too, with
    no space after them needed, under the same minimum length."""
    first, rest = "一" * 30 + mark, "二" * 10 + "。"
    as_fed = streamed(first + rest, tokens)
    assert [piece for _, piece in as_fed] == [first, rest], as_fed
    if tokens == "char":  # out when the character after the mark came, not at the 。
        assert len(as_fed[0][0]) == len(first) + 1


def test_a_long_chinese_first_sentence_goes_out_at_its_first_comma_past_the_minimum():
    """Review (stop 63): a real reply: its first sentence is cut at the first "，" past the
    first piece's minimum (24 characters; "您好，" is too short), the next pieces need 60,
    so "点击设置页面，" waits for the 。 as a Latin clause of its length would."""
    text = "您好，我可以帮您重置您的网上银行密码，然后您需要打开手机应用，点击设置页面，再选择安全选项。请稍等。"
    assert [piece for _, piece in streamed(text, "char")] == [
        "您好，我可以帮您重置您的网上银行密码，然后您需要打开手机应用，",
        "点击设置页面，再选择安全选项。", "请稍等。"]


def test_an_arabic_comma_cuts_a_long_first_sentence():
    """Review (stop 63): Arabic writes a space after its comma "،"; it is a clause mark as
    "," is."""
    text = "مرحبا، يمكنني مساعدتك في إعادة تعيين كلمة المرور الخاصة بك، ثم افتح التطبيق واختر الإعدادات."
    assert [piece for _, piece in streamed(text, "char")] == [
        "مرحبا، يمكنني مساعدتك في إعادة تعيين كلمة المرور الخاصة بك،",
        "ثم افتح التطبيق واختر الإعدادات."]


def test_a_full_width_comma_between_digits_cuts_nothing():
    """Review (stop 63): "１，０００" is a number: a clause mark between two digits is a
    separator, as the sentence marks' rule has it."""
    first = "您好，根据我们的记录，您的储蓄账户目前的可用余额一共是人民币１２，３４５，６７８元整，"
    text = first + "谢谢您的耐心等待和理解。"
    assert first.index("１２，") > 24
    assert [piece for _, piece in streamed(text, "char")] == [first, "谢谢您的耐心等待和理解。"]


def limited(text: str, max_chars: int, tokens: str = "char") -> list[str]:
    chunker = SentenceChunker(min_clause_chars=1000, first_min_clause_chars=1000,
                              max_chars=max_chars)
    pieces: list[str] = []
    for part in (list(text) if tokens == "char" else [text]):
        pieces += chunker.feed(part)
    tail = chunker.flush()
    return pieces + ([tail] if tail else [])


@pytest.mark.parametrize("tokens", ["char", "whole"])
def test_the_length_cut_in_text_without_spaces_prefers_a_clause_mark(tokens):
    """Review (stop 63): a piece never exceeds max_chars, cut at the last space before the
    limit; CJK text has no space, so it was cut at exactly the limit, even when a clause
    mark ("，") stood a few characters before it. Now after the last clause mark in the
    window, else at the limit (an ideograph is a word of its own)."""
    text = "一" * 30 + "，" + "二" * 20 + "、" + "三" * 60
    assert limited(text, 40, tokens) == ["一" * 30 + "，", "二" * 20 + "、", "三" * 40, "三" * 20]


@pytest.mark.parametrize("tokens", ["char", "whole"])
@pytest.mark.parametrize("unit", [
    "e\u0301",  # e and a combining acute accent
    "\u0915\u093f",  # Devanagari ki: a consonant and its vowel sign
    "\U0001F44D\U0001F3FD",  # thumbs up, medium skin tone
    "\U0001F468\u200d\U0001F469\u200d\U0001F467",  # a family: ZWJ sequence
    "\U0001F1EF\U0001F1F5",  # a flag: two regional indicators
    "\u2764\ufe0f",  # a heart and its emoji variation selector
])
def test_the_length_cut_never_splits_a_character_from_its_marks(unit, tokens):
    """Review (stop 63): cut at exactly max_chars code points, a letter was split from its
    combining accent (the next piece opened with a bare "\u0301"), an emoji from its skin
    tone, a ZWJ sequence or a flag in two: each half is spoken (or read out) as garbage.
    The cut steps back to the last boundary between two user-perceived characters."""
    text = unit * 40
    pieces = limited(text, 11, tokens)
    assert "".join(pieces) == text
    for piece in pieces:
        assert len(piece) <= 11 and piece == unit * (len(piece) // len(unit)), pieces
    regex = pytest.importorskip("regex")
    assert all(regex.fullmatch(r"\X", g) for p in pieces for g in regex.findall(r"\X", p))


@pytest.mark.parametrize("tokens", ["char", "whole"])
def test_the_length_cut_in_latin_text_is_still_at_the_last_space(tokens):
    """Review (stop 63): pinned before the change: Latin text is cut at the last space
    before max_chars, a word longer than that at the limit."""
    assert limited("alpha beta gamma delta epsilon zeta", 20, tokens) == [
        "alpha beta gamma", "delta epsilon zeta"]
    assert limited("x" * 25, 10, tokens) == ["x" * 10, "x" * 10, "x" * 5]


@pytest.mark.parametrize("tokens", ["char", "word", "whole"])
@pytest.mark.parametrize("text, said", [
    # Past first_max_chars: the length cut fell inside the link, between its words, and
    # neither half was a link any more.
    ("You can reset your passcode in the app under [Security settings]"
     "(https://bank.example.com/security/passcode/reset?from=voice). Anything else?",
     ["You can reset your passcode in the app under Security settings.", "Anything else?"]),
    # Within it: the link whole in one piece, said with its address.
    ("Sure. Open [our help page](https://bank.example.com/help) and tap Reset.",
     ["Sure.", "Open our help page and tap Reset."]),
    # Brackets that are no link are said as written.
    ("Press [1] for English. Thanks.", ["Press [1] for English.", "Thanks."]),
], ids=["past-the-first-limit", "within-it", "no-link"])
def test_a_markdown_link_is_said_as_its_text_never_its_address(tokens, text, said):
    """Review (stop 69): markdown that slips through is stripped, the chunker says, but a
    link was not: the voice read its address out ("h t t p s colon slash slash bank dot
    example dot com slash ...") and its brackets, and a link past the first piece's length
    was cut between its words, so no later rule could know it for one. A link is said as
    its text; the chunker cuts no piece inside one still being written."""
    assert chunk_all(text, tokens) == said


def test_a_bracket_that_opens_no_link_holds_the_first_piece_back_only_briefly():
    # A link's text is a few words: a bracket never closed is read on past 100 characters,
    # and the first piece goes out at its length limit soon after, not at max_chars.
    text = "Your reference is [ABC " + "and then some more words " * 12 + "done."
    (fed, first), *_ = streamed(text, "word")
    assert first.startswith("Your reference is [ABC and") and len(fed) < 140, (fed, first)


@pytest.mark.parametrize("tokens", ["char", "word", "whole"])
def test_a_word_emphasised_between_single_asterisks_is_said_without_them(tokens):
    """Review (stop 69): markdown's bold ("**Settings**") was stripped, its italics
    ("*Security*") were not, and Piper reads each asterisk out: "choose asterisk security
    asterisk". A keypad's star is still said ("Press * to go back", "dial *72")."""
    assert chunk_all("Then choose *Security* and tap *Reset passcode*. Press * to go back, "
                     "or dial *72 first.", tokens) == [
        "Then choose Security and tap Reset passcode.",
        "Press * to go back, or dial *72 first."]
