"""Semantic end of turn: how much silence ends the caller's turn, given what was said.

A fixed silence is wrong both ways: 300 ms makes every FAQ wait, and still cuts off
"my card number is ... four one two seven". While the caller is paused, the call
gathers three signals about the words so far, each arriving when its model is done:

- the turn model's probability that the turn is complete (Smart Turn, on the audio),
- the early transcript (the utterance decoded at the pause), checked for lexical
  completeness: a turn ending in "to", "and", "my", "um" is not over,
- the router's decision on that transcript: a cache hit is an answerable question,
  and whether its words read as a finished question by the seed's own questions
  (``intents.completeness``: "the card I ordered" routes to a cached intent, but no
  seed question ends there).

While the early transcript is still decoding (or being routed) the turn does not end
on the default silence: the reply needs that very transcript and its route, so waiting
for them costs the caller nothing, and the words may show the caller is not done
("my card number is 4127" under load arrives after 300 ms). The long silence caps it.

``EndOfTurnPolicy.required_silence_ms`` turns what is known so far into the silence
that ends the turn: short for a cached question whose words read as finished and that the
turn model does not doubt, long
when the words or the model say the caller is not done, the plain default otherwise. It is pure state: the turn
detector asks it on every window, the engine feeds it the signals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# Words an utterance does not end on: articles, possessives, conjunctions, hesitations,
# the copula ("my card number is ..."), a few prepositions, and the subject "I" ("how do
# I, uh, ...": a recogniser often drops the "uh", leaving a question stem that reads as
# asked). Words that can end a question ("log in", "help me with", "how do I do that",
# "thank you") are deliberately absent.
_CONTINUATIONS = frozenset("""
a an the my your our their his her its
to of for via per
and or but nor because if when while although though whether than
is are was were
um uh er erm hmm uhm
i i'm i'd i've it's
""".split())
_WORD = re.compile(r"[a-z0-9']+")
# Digits read out in groups ("my card number is 4127 ... 8831"): a group is no end. Read
# as words, a group ends on a digit, a teen, a ten or a multiplier as often ("forty one,
# twenty seven", "nineteen ... eighty four", "four hundred ... and twelve").
_DIGIT_WORDS = frozenset("""
zero oh one two three four five six seven eight nine
ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen
twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
""".split())
_NUMBER_NOUNS = frozenset("""
number code pin digits iban account card phone sort passcode postcode zip reference
""".split())
_COPULAS = frozenset("is are was were".split())
# Wh-words that stand for the copula's complement, so that a subject right after them
# closes a clause ending on the copula: "what [my password] is", "where [it] is". ("why my
# transfer is", "when I was" are not closed: those wh-words leave the complement open.)
_COMPLEMENT_WH = frozenset("what where who whom which whatever whoever".split())
# Words that open a clause's subject.
_SUBJECT_WORDS = frozenset("""
i you he she it we they this that these those there
the a an my your our their his her its
""".split())
# Words that open another clause between a wh-word and the copula.
_CLAUSE_OPENERS = frozenset("""
if when why how because and but or so since while although though whether unless until
""".split())
# A wh-word this close before a final copula can own it ("what the steps for the identity
# checks are" is 7 words).
_WH_REACH = 8
# Before a final "one", words that make it the pronoun ("a new one", "get one", "my only
# one"), not a digit.
_ONE_AS_PRONOUN_AFTER = frozenset("""
a new another this that only other old original existing replacement spare second extra
different same last first get order have want need buy send use
""".split())
# Before a final "a while": the idiom's verbs and prepositions ("I've been waiting a while").
_A_WHILE_AFTER = frozenset("for been waiting waited taking took takes take in".split())


def lexically_incomplete(text: str, closed_phrases: bool = True) -> bool:
    """The transcript ends on a word an utterance does not end on, or in a group of
    digits of a number being read out.

    Three endings that look like continuations close a phrase instead: a copula ending a
    wh-clause that has its own subject ("I don't know what my password is", "where the
    money is"; "what is", "how much is", "why my transfer is" stay open), "one" as a
    pronoun ("how do I get a new one"; digits are "four one", "number is one") and "a
    while" ("I've been waiting a while"). On Banking77 train they halve the finished
    questions read unfinished, each of which waited the long silence even as a cache hit
    (171 -> 93 of 10,003), and let 85 of its 75,831 word prefixes through
    (`bench/lexical_ends.py`). ``closed_phrases=False`` reads the last word alone (the rule
    before them, for that comparison).
    """
    words = _WORD.findall(text.lower())
    if not words:
        return False
    last = words[-1]
    if last in _CONTINUATIONS:
        return not (closed_phrases and _closes_a_phrase(words))
    if last.isdigit() or last in _DIGIT_WORDS:
        if closed_phrases and last == "one" and len(words) > 1 \
                and words[-2] in _ONE_AS_PRONOUN_AFTER:
            return False
        return any(w in _NUMBER_NOUNS for w in words[-12:])
    return False


def _closes_a_phrase(words: list[str]) -> bool:
    last = words[-1]
    if last == "while":
        return len(words) > 2 and words[-2] == "a" and words[-3] in _A_WHILE_AFTER
    if last not in _COPULAS:
        return False
    for k in range(len(words) - 2, max(-1, len(words) - 2 - _WH_REACH), -1):
        if words[k] in _CLAUSE_OPENERS or words[k] in _COPULAS:
            return False  # "what do I do if my card is": the copula is the new clause's
        if words[k] in _COMPLEMENT_WH:
            return k + 1 < len(words) - 1 and words[k + 1] in _SUBJECT_WORDS
    return False


class Judgement(Enum):
    UNKNOWN = "unknown"  # no signal yet: the default silence
    PENDING = "pending"  # the early transcript or its route is on its way: wait (capped)
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class EndOfTurnSettings:
    silence_ms: float = 900.0  # nothing known yet (or the signals disagree)
    complete_silence_ms: float = 160.0  # the turn is judged complete
    incomplete_silence_ms: float = 1200.0  # the turn is judged incomplete
    complete_threshold: float = 0.5  # a cache hit ends early at or above this probability
    incomplete_threshold: float = 0.05  # below: incomplete, whatever the words
    needs_finished_words: bool = True  # a cache hit ends early only if its words read finished
    # ... and one whose words read unfinished is judged incomplete (the long silence)
    unfinished_words_incomplete: bool = True
    # A caller who hesitated mid-turn (a pause at least this long, after which they spoke
    # again) may pause as long again after words that are a cached question ("I need to,
    # uh, ... freeze my card, ... right now"): a turn judged complete then waits their
    # longest pause plus the margin, within the short and the open silences. 0: off.
    hesitation_ms: float = 300.0
    hesitation_margin_ms: float = 500.0

    @property
    def longest_ms(self) -> float:
        return max(self.silence_ms, self.complete_silence_ms, self.incomplete_silence_ms)


class EndOfTurnPolicy:
    """What is known about the current pause, and the silence that ends the turn."""

    def __init__(self, settings: EndOfTurnSettings) -> None:
        self.settings = settings
        self.turn_probability: float | None = None
        self.transcript: str | None = None
        self.cache_hit: bool | None = None
        self.words_finished: bool | None = None  # the router's completeness judgement
        self.awaiting_early = False  # the pause's early transcript is decoding / routing
        # The longest pause of this utterance that the caller spoke again after (ms).
        self.longest_resumed_pause_ms = 0.0

    def reset(self) -> None:
        """Speech resumed: what was known about the pause is stale (not how the caller
        paused: that is the utterance's)."""
        self.turn_probability = self.transcript = self.cache_hit = None
        self.words_finished = None
        self.awaiting_early = False

    def new_utterance(self) -> None:
        """A turn ended or a new one began: nothing known carries over."""
        self.reset()
        self.longest_resumed_pause_ms = 0.0

    def note_resumed_pause(self, pause_ms: float) -> None:
        """The caller spoke again after a pause of ``pause_ms`` in this utterance."""
        self.longest_resumed_pause_ms = max(self.longest_resumed_pause_ms, pause_ms)

    @property
    def hesitated(self) -> bool:
        """The caller paused mid-turn for at least ``hesitation_ms`` (the rule is on)."""
        s = self.settings
        return s.hesitation_ms > 0 and self.longest_resumed_pause_ms >= s.hesitation_ms

    def judge(self) -> Judgement:
        """Incomplete when the words or the turn model say the caller is not done;
        complete only for a cached question whose words read as finished and that the
        turn model does not doubt. A cached question whose words read like the start of a
        longer sentence ("the exchange rate, ...") is incomplete, as words that end on "my"
        are: about 1% of real questions read so (Banking77 dev), and they wait the long
        silence, where a caller pausing after such a start would be cut off.

        The turn model alone never shortens a turn: "Hi," before the question sounds as
        finished as the question itself, and a miss waits for the agent anyway. Nor does
        it alone hold a cached question whose words are complete for the long silence
        (the model doubts many a finished question read flatly): that waits the default.
        """
        s = self.settings
        p = self.turn_probability
        if self.transcript is not None and lexically_incomplete(self.transcript):
            return Judgement.INCOMPLETE
        if self.awaiting_early:
            return Judgement.PENDING
        reads_unfinished = self.words_finished is False and s.needs_finished_words
        if self.cache_hit and reads_unfinished and s.unfinished_words_incomplete:
            return Judgement.INCOMPLETE
        if p is not None and p < s.incomplete_threshold:
            if self.cache_hit and self.transcript is not None:
                return Judgement.UNKNOWN
            return Judgement.INCOMPLETE
        if self.transcript is not None and not self.transcript.strip():
            return Judgement.COMPLETE  # nothing was said (noise): nothing to wait for
        if self.cache_hit and not reads_unfinished and (p is None or p >= s.complete_threshold):
            return Judgement.COMPLETE
        return Judgement.UNKNOWN

    def required_silence_ms(self) -> float:
        judgement = self.judge()
        if judgement is Judgement.COMPLETE:
            return self._complete_silence_ms()
        if judgement in (Judgement.INCOMPLETE, Judgement.PENDING):
            return self.settings.incomplete_silence_ms
        return self.settings.silence_ms

    def _complete_silence_ms(self) -> float:
        """The short silence, or for a caller who hesitated before a cached question
        their own longest pause plus the margin (at most the open silence)."""
        s = self.settings
        if not (self.cache_hit and self.hesitated):
            return s.complete_silence_ms
        wait = self.longest_resumed_pause_ms + s.hesitation_margin_ms
        return min(s.silence_ms, max(s.complete_silence_ms, wait))
