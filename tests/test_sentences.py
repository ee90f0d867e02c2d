"""The sentence chunker on scripts other than Latin: their own sentence marks.

The Latin rules (abbreviations, decimals, initials, list markers, closers) are pinned in
tests/test_agent.py; here the marks of other scripts, which need no space after them.
"""

from __future__ import annotations

import pytest

from gateway.sentences import SentenceChunker


def streamed(text: str, tokens: str) -> list[tuple[str, str]]:
    """The pieces of ``text`` fed character by character (or as one token), each with the
    text fed when it came out (all of it for the flush's)."""
    chunker = SentenceChunker()
    parts = list(text) if tokens == "char" else [text]
    fed = ""
    pieces: list[tuple[str, str]] = []
    for part in parts:
        fed += part
        pieces += [(fed, piece) for piece in chunker.feed(part)]
    tail = chunker.flush()
    return pieces + ([(fed, tail)] if tail else [])


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
