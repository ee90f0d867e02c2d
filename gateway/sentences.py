"""Chunk a streamed LLM reply into speakable pieces for TTS.

A piece ends at a sentence end (after any closing quote or bracket: 'says "shipped."'),
in any script: Latin ". ! ? …" before whitespace (abbreviations, decimals and initials
kept whole), another script's sentence mark ("。", "？", "।", "؟", "։", "።": Unicode's
Sentence_Terminal) with no space needed after it; or at a clause boundary (comma,
semicolon, colon, dash, before whitespace; or the full-width "，" "；" "：", the
ideographic "、", the Arabic "،" "؛", no space needed) once it is long enough, so the
first TTS request starts after a few words, not after the whole first sentence. A piece
never exceeds max_chars (240), the first one first_max_chars (100: a run-on answer with no
punctuation at all starts speaking after about 20 words, not 50): with no boundary in
sight it ends at the last space or wide clause mark before the limit, else (CJK text has
no spaces) at the limit, never inside a character as seen (a letter and its accent, an
emoji sequence). Markdown that slips through is stripped (bold and italics: never an
"asterisk" said; a keypad's star stays): a link ("[our help page](https://...)") is said
as its text, never its address, and no piece is cut inside one still being written (its
end, and whether it is one, not known yet). A line ends a piece: a list's
item is a piece of its own, without its marker (numbered, "2. Tap Settings", or bulleted,
"- Tap Settings", often with no period), and so is any other line ("Our hours" / "Monday
to Friday 9 to 5"). Within a line ("Open the app. 2. Tap Settings.") a number after a
sentence's end is an item's marker only as a list's first or next one: "How many? 3." says it.
``spoken_text`` is a piece as a voice should be asked for it (the agent, responder.tts_audio):
without its emoji (a voice reads one by name), nothing when no words are left.
"""

from __future__ import annotations

import re
import unicodedata

# Words ending in a period that do not end a sentence.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd",
    "co", "approx", "dept", "apt", "ave", "mt", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec",
})
# Abbreviations only before a number ("No. 5"); else the word itself ends the sentence
# ("No. We're closed on Sundays.": held as an abbreviation, the first piece waited).
_NUMBER_ABBREVIATIONS = frozenset({"no"})
# A capital letter and a period is an initial ("J. Smith", "John F. Kennedy": a name
# split there is read "Jay." and a pause), unless one of these words follows: a pronoun or
# an opener no surname is ("Choose plan B. It costs less."). Names in a bank's answers
# (payees, account holders) matter more than the pause after "plan B", so only these.
_SENTENCE_OPENERS = frozenset({
    "it", "its", "this", "that", "these", "those", "the", "there", "here", "you", "your",
    "we", "our", "i", "they", "their", "he", "she", "please", "thanks", "thank", "if",
    "but", "and", "also", "then", "would", "could", "should", "let", "yes", "what",
    "which", "when", "how", "anything", "is", "are",
})
# A dotted abbreviation ("U.S.", "U.K.", "Ph.D.", "a.m.", "p.m.") ends a sentence when a
# capitalized opener follows ("We only ship within the U.S. Do you ...", "We open at 9 a.m.
# Our branch ..."), and only then: another capitalized word goes on with it far more often,
# a name or the time's place, day, month or zone ("U.S. Bank", "9 a.m. New York time",
# "9 a.m. Monday", "5 p.m. Eastern"). A wrong cut only costs the prosody, a missed one
# delays the audio, so the openers here are more than the initials' (a surname can be "Do"
# or "An", no name goes on after "U.S."): auxiliaries, question words, determiners. "May"
# is left out ("9 a.m. May 5"). "e.g." and "i.e." (_ABBREVIATIONS) never end one: an
# example follows them, capitalized or not.
_DOTTED_OPENERS = _SENTENCE_OPENERS | frozenset({
    "do", "does", "did", "can", "will", "was", "were", "has", "have", "my", "a", "an",
    "who", "where", "why", "so", "no", "for", "to", "after", "before", "however",
})
# What follows a period: the next word's letters (quotes or markdown before it skipped;
# "It's" gives "It", "Mon-Fri" "Mon"), and a period after them (an initial: "B. J. Smith").
_NEXT_WORD = re.compile(r"\s*[\"'(“‘*]*([^\W\d_]*)(\.?)")
# Letters and dots before the final one: "U.K", "U.S.A", "Ph.D" (also "e.g").
_DOTTED = re.compile(r"(?:[a-z]{1,2}\.)+[a-z]{1,2}")
_SENTENCE_END = ".!?…"
# The sentence marks of other scripts: Unicode's Sentence_Terminal property (UAX #29's
# STerm; PropList.txt) in the Basic Multilingual Plane, less "." "!" "?" (the Latin rules
# above and below) and U+2024 ONE DOT LEADER (a leader dot, seldom a full stop).
# unicodedata has no such property: this list was made with the ``regex`` package's
# \p{Sentence_Terminal} (regex 2026.11.19), and tests/test_sentences.py checks it against
# that when regex is installed. Among them the ideographic full stop "。", the full-width
# "！" "？" "．", the Devanagari danda "।" and "॥", the Arabic "؟" and "۔", the Armenian
# "։", the Ethiopic "።", the Myanmar "။", the Khmer "។". Chinese and Japanese put no space
# after them, so none is needed: the mark (and any closing bracket or quote after it, and
# any mark after it: "？！") ends the sentence once the next character is known, unless it
# stands between two digits (a decimal point or a time: "３．１４").
SENTENCE_TERMINALS = frozenset(
    "\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e"
    "\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u1803"
    "\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b4e\u1b4f\u1b5a\u1b5b\u1b5e\u1b5f"
    "\u1b7d\u1b7e\u1b7f\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2cf9"
    "\u2cfa\u2cfb\u2e2e\u2e3c\u2e53\u2e54\u2e60\u2e61\u3002\ua4ff\ua60e\ua60f\ua6f3"
    "\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1"
    "\uabeb\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61"
)
# What closes a quotation or a bracket after a sentence's mark: 'says "shipped." It', and
# the CJK corner brackets, full-width brackets and quotes: "「設定を開いてください。」".
_CLOSERS = "\"')]”’」』）】〕〉》〗〙〛］｝｣＂＇"
_CLAUSE_END = ",;:—–"
# Clause marks written with no space after them (Chinese, Japanese) or of another script:
# the full-width comma, semicolon and colon, the ideographic comma "、", the Arabic comma
# "،" and semicolon "؛". None needs whitespace after it, only the next character known
# and no digit either side ("１２，３４５" is a number).
_WIDE_CLAUSE_END = "\uff0c\u3001\uff1b\uff1a\u060c\u061b"
# U+200D ZERO WIDTH JOINER, and the emoji modifiers (skin tones) U+1F3FB to U+1F3FF.
_ZWJ = "\u200d"
# A numbered list's item marker is "1." to "99.": a longer number with a period after it
# ("Your confirmation number. 48213. Keep it handy.") is said, never taken for a marker.
# Italics' single asterisks ("*Security*", which Piper reads "asterisk security asterisk"):
# one before a letter with no word before it, one after a word with none after it; a
# keypad's star ("Press * to go back", "dial *72") stays.
_MARKDOWN = re.compile(r"(\*\*|__|`+|^#{1,6}\s+|^\s*[-*•]\s+|^\s*\d{1,2}\.\s+(?=\D)"
                       r"|(?<![\w*])\*(?=[^\W\d_])|(?<=[^\s*\d])\*(?![\w*]))", re.MULTILINE)
_SPACES = re.compile(r"\s+")
# A markdown link: said as its text; its address, read out by a voice character by
# character ("h t t p s colon slash slash ..."), and its brackets are dropped.
_LINK = re.compile(r"\[([^\[\]\n]*)\]\([^()\s]*\)")
# One still being written at the buffer's end ("[our he", "[our help page]", "[our help
# page](https://ba"): the chunker cuts no piece inside it (``_find_cut``). A bracket with
# 100 characters after it and no "]" is no link's: its text is a few words.
_LINK_UNDER_WAY = re.compile(r"\[[^\[\]\n]{0,100}(?:\](?:\([^()\s]*)?)?\Z")
# Emoji, which a voice reads by name (Piper: "😊" is "smiling face with smiling eyes", "👍"
# "thumbs up"): the pictographs (Unicode's emoji blocks, less the dingbats' circled digits,
# said as numbers), each with its presentation selectors, tags and ZWJ sequence, and a
# keycap's marks ("1️⃣": its digit is said). Not a joiner in a word (Indic conjuncts).
_PICTOGRAPH = ("[\U0001F10D-\U0001FAFF\u2600-\u2775\u2794-\u27BF\u2B00-\u2BFF"
               "\u231A\u231B\u23E9-\u23F3\u23F8-\u23FA]")
# A run of them (a skin tone, a flag's two letters, "👍 👍") is one match: its neighbours are
# the words around the run.
_EMOJI = re.compile(rf"(?:\s*(?:{_PICTOGRAPH}(?:[\ufe0e\ufe0f\U000E0020-\U000E007F]"
                    rf"|\u200d{_PICTOGRAPH})*|[\ufe0e\ufe0f]?\u20e3|\ufe0f))+")
_LIST_MARKER = re.compile(r"\s*\d{1,2}")
_ITEM_OPENING = re.compile(r"\s*(\d{1,2})\.\s")  # a piece opening with its item's marker


def speakable(text: str) -> str:
    """Text without markdown markers (a link as its text) and with single spaces."""
    return _SPACES.sub(" ", _MARKDOWN.sub("", _LINK.sub(r"\1", text))).strip()


def without_emoji(text: str) -> str:
    """``text`` as a voice should read it: without its emoji (the model is told to write
    none; one that slips through would be read out by name). An emoji between two words
    leaves a space ("Great👍done": "Great done")."""
    def dropped(match: re.Match[str]) -> str:
        start, end = match.span()
        between_words = start > 0 and text[start - 1].isalnum() and \
            end < len(text) and text[end].isalnum()
        return " " if between_words else ""
    return _EMOJI.sub(dropped, text).strip()


def spoken_text(text: str) -> str:
    """What a voice is asked to say for ``text``: without its emoji; "" when that leaves no
    words ("👍", "😊."): nothing to ask, a reply's piece that says nothing
    (agent, responder.tts_audio)."""
    spoken = without_emoji(text)
    return spoken if has_words(spoken) else ""


def rendered_text(text: str) -> str:
    """What a voice is asked for a phrase rendered once and played many times (a seeded
    answer, a prompt): its ``spoken_text``, unless that is nothing (then as written: an
    emoji read by name beats a silent answer)."""
    return spoken_text(text) or text


def ends_sentence(text: str) -> bool:
    """Whether ``text`` ends with a sentence's mark (closing quotes or brackets after it
    aside): a piece a stream cut off at its token limit that is a whole sentence still."""
    stripped = text.rstrip().rstrip(_CLOSERS)
    return bool(stripped) and (stripped[-1] in _SENTENCE_END or stripped[-1] in SENTENCE_TERMINALS)


def has_words(text: str) -> bool:
    """Whether ``text`` has anything a voice must say (punctuation alone may be silent)."""
    return any(ch.isalnum() for ch in text)


def _next_word(buf: str, end: int) -> str | None:
    """The letters of the word after ``end`` ("" when none begins there: a digit), or
    None while it may still be coming (the buffer ends in it)."""
    found = _NEXT_WORD.match(buf, end)
    assert found is not None  # every part is optional
    if found.end() == len(buf):
        return None
    letters, period = found.groups()
    # A single letter and a period: another initial ("B. J. Smith"), no sentence opener.
    return "" if len(letters) == 1 and period else letters


def _is_wide_clause_mark(buf: str, i: int) -> bool:
    """A wide or Arabic clause mark at ``i`` ("，"), not between two digits ("１２，３４５")."""
    return buf[i] in _WIDE_CLAUSE_END and not (
        0 < i < len(buf) - 1 and buf[i - 1].isdigit() and buf[i + 1].isdigit())


def _grapheme_boundary(buf: str, cut: int) -> bool:
    """Whether ``buf[cut - 1]`` and ``buf[cut]`` belong to two characters as a reader sees
    them (UAX #29's grapheme clusters, the rules that matter in a reply): not before a
    combining mark (an accent, a vowel sign, a variation selector), an emoji modifier or a
    tag, not on either side of a joiner, not inside a pair of regional indicators (a flag)."""
    before, after = buf[cut - 1], buf[cut]
    if unicodedata.category(after).startswith("M") or _ZWJ in (before, after):
        return False
    if 0x1F3FB <= ord(after) <= 0x1F3FF or 0xE0020 <= ord(after) <= 0xE007F:
        return False
    regional = 0
    while regional < cut and 0x1F1E6 <= ord(buf[cut - 1 - regional]) <= 0x1F1FF:
        regional += 1
    return not (regional % 2 and 0x1F1E6 <= ord(after) <= 0x1F1FF)


class SentenceChunker:
    """``feed`` tokens, get finished pieces; ``flush`` at the end of the stream."""

    def __init__(self, min_clause_chars: int = 60, first_min_clause_chars: int = 24,
                 max_chars: int = 240, first_max_chars: int = 100) -> None:
        self.min_clause_chars = min_clause_chars
        self.first_min_clause_chars = first_min_clause_chars
        self.max_chars = max_chars
        # The first piece's limit: a reply with no punctuation at all (a run-on answer)
        # starts speaking after about 20 words, not 50 (or at the stream's end).
        self.first_max_chars = min(first_max_chars, max_chars)
        self._buffer = ""
        self._emitted = 0
        # The last cut was inside a sentence (a clause boundary, or max_chars): the buffer
        # then opens mid-sentence, so a number there ("is: 48213. Keep it") is no list item.
        self._mid_sentence = False
        # The last cut was a line's end: a number opening the buffer opens a line.
        self._line_start = False
        self._last_item = 0  # the number of the last list item cut (0: none yet)

    def feed(self, text: str) -> list[str]:
        # A link written whole is its text from here on: no cut falls inside it.
        self._buffer = _LINK.sub(r"\1", self._buffer + text)
        pieces: list[str] = []
        while True:
            found = self._find_cut()
            if found is None:
                break
            cut, self._mid_sentence = found
            raw, self._buffer = self._buffer[:cut], self._buffer[cut:]
            self._line_start = raw.endswith("\n")
            item = _ITEM_OPENING.match(raw)  # its marker's period did not end the piece
            if item is not None:
                self._last_item = int(item.group(1))
            piece = speakable(raw)
            if piece:
                pieces.append(piece)
                self._emitted += 1
        return pieces

    def flush(self) -> str | None:
        piece, self._buffer = speakable(self._buffer), ""
        if piece:
            self._emitted += 1
            return piece
        return None

    def _find_cut(self) -> tuple[int, bool] | None:
        """Where the next piece ends, and whether that is inside a sentence (a clause
        boundary, or max_chars); None while no boundary is known yet."""
        buf = self._buffer
        # A link still being written: read up to it (cut before it, or wait for its end).
        # Brackets open for longer than a piece may be are no link: read on.
        under_way = _LINK_UNDER_WAY.search(buf)
        if under_way is not None and len(buf) - under_way.start() <= self.max_chars:
            buf = buf[:under_way.start()]
        min_clause = self.first_min_clause_chars if self._emitted == 0 else self.min_clause_chars
        clause_cut: int | None = None
        # A boundary counts only once the next character is known (whitespace),
        # so "3.5", "e.g." and "U.S." are not split mid-token.
        for i in range(len(buf) - 1):
            ch, nxt = buf[i], buf[i + 1]
            if ch == "\n" and nxt == "\n":
                return i + 2, False
            if ch == "\n" and speakable(buf[:i]):
                # A line ends a piece: a list's item (numbered, its marker stripped there,
                # or bulleted: "- ", "* ", "• "; items often have no period) or a plain line
                # ("Our hours" / "Monday to Friday 9 to 5"), never run into the next one.
                return i + 1, False
            if ch in SENTENCE_TERMINALS and not (i > 0 and buf[i - 1].isdigit() and nxt.isdigit()):
                # Another script's mark: no whitespace after it needed ("。请").
                end = self._after_closers(buf, i + 1, marks=True)
                if end < len(buf):
                    return end, False
            if ch in _SENTENCE_END:
                # The whitespace may come after closing quotes or brackets: 'says "shipped." It'.
                end = self._after_closers(buf, i + 1)
                if end < len(buf) and buf[end].isspace() and not self._is_list_marker(buf, i):
                    abbreviation = self._is_abbreviation(buf, i, end)
                    if abbreviation is None:
                        break  # "No." before what: a number or a new sentence? Wait and see.
                    if not abbreviation:
                        return end, False
            if clause_cut is None and (
                    ch in _CLAUSE_END and nxt.isspace() or _is_wide_clause_mark(buf, i)) and len(
                    speakable(buf[: i + 1])) >= min_clause:
                clause_cut = i + 1
        if clause_cut is not None:
            return clause_cut, True
        limit = self.first_max_chars if self._emitted == 0 else self.max_chars
        if len(buf) >= limit:
            cut = self._limit_cut(buf, limit)
            return None if cut is None else (cut, True)
        return None

    def _limit_cut(self, buf: str, limit: int) -> int | None:
        """Where a piece that reached ``limit`` (max_chars, or first_max_chars for the
        first piece) with no boundary in sight ends: after the
        last space or wide clause mark ("，": CJK text has no space) before the limit, else
        at the limit (an ideograph is a word of its own), stepped back to a boundary
        between two characters as seen (never between a letter and its combining accent,
        an emoji and its skin tone, or inside a ZWJ sequence or a flag); None while the
        character after the limit, which may belong to the one before it, is not known."""
        for j in range(limit - 1, 0, -1):
            if buf[j] == " " or _is_wide_clause_mark(buf, j):
                return j + 1
        if len(buf) == limit:
            return None
        cut = limit
        while cut > 0 and not _grapheme_boundary(buf, cut):
            cut -= 1
        return cut or limit  # one character of more than max_chars code points: cut anyway

    @staticmethod
    def _is_abbreviation(buf: str, i: int, end: int) -> bool | None:
        """Whether the period at ``i`` ends an abbreviation (whitespace from ``end``); None
        while that depends on what comes next and has not come yet."""
        if buf[i] != ".":
            return False
        start = i
        while start > 0 and not buf[start - 1].isspace():
            start -= 1
        raw = buf[start:i].lstrip("(\"'“‘")
        word = raw.lower()
        if word in _ABBREVIATIONS:
            return True
        if _DOTTED.fullmatch(word):
            after = _next_word(buf, end)
            if after is None:
                return None
            return not (after[:1].isupper() and after.lower() in _DOTTED_OPENERS)
        if word in _NUMBER_ABBREVIATIONS:
            rest = buf[end:].lstrip()
            return rest[0].isdigit() if rest else None
        # An initial ("J. Smith", also quoted or bracketed: "(J. Smith)"), or "plan B." at
        # a sentence's end.
        if len(raw) == 1 and raw.isupper():
            after = _next_word(buf, end)
            if after is None:
                return None
            return not (after[:1].isupper() and after.lower() in _SENTENCE_OPENERS)
        return False

    def _is_list_marker(self, buf: str, i: int) -> bool:
        """The period of "1." opening a line (or the buffer: "Open the app. 2. Tap ...").
        A buffer that opens mid-sentence, after a clause cut, opens no item but a list's
        first ("Do this: 1. Open the app"): "is: 48213. Keep it" says its number. One
        that opens after a sentence's end opens a list's first item or the next one, no
        other: "How many? 3. One of them virtual." says its 3."""
        line = buf.rfind("\n", 0, i)
        if buf[i] != "." or _LIST_MARKER.fullmatch(buf, line + 1, i) is None:
            return False
        if line >= 0 or self._line_start:
            return True
        number = int(buf[:i])
        return number == 1 or (not self._mid_sentence and number == self._last_item + 1)

    @staticmethod
    def _after_closers(buf: str, j: int, marks: bool = False) -> int:
        """Past the closing quotes and brackets from ``j`` (and, with ``marks``, other
        scripts' sentence marks: "？！" is one end)."""
        while j < len(buf) and (buf[j] in _CLOSERS or marks and buf[j] in SENTENCE_TERMINALS):
            j += 1
        return j
