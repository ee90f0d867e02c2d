"""Value types shared by the router, the stores and their users."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any


# The promise when the operator names none: at most 1% of cached answers wrong. Here, not in
# intents.calibration, so the command line reads it without loading numpy and scikit-learn.
DEFAULT_TARGET_WRONG_RATE = 0.01

# Characters an entry id may use as it is: safe in a file name, a Redis key and a URL path.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_.\-]+")


def entry_id_for(intent: str) -> str:
    """The id under which an intent's entry is stored and addressed (``/admin/entries/{id}``).

    Intent names are the operator's own words (``reverted_card_payment?``, ``Card lost``):
    a name already safe for storage and URLs is its own id; any other gets a readable slug
    plus a short hash of the exact name, so two names never share an id.
    """
    if _SAFE_ID.match(intent):
        return intent
    slug = _UNSAFE_RUN.sub("_", intent).strip("_.-")[:60] or "intent"
    return f"{slug}-{hashlib.sha256(intent.encode('utf-8')).hexdigest()[:8]}"


class Action(str, Enum):
    ANSWER = "answer"  # cacheable FAQ: replay the pre-rendered answer
    LLM = "llm"  # personal or transactional: always the agent, never cached
    HANDOFF = "handoff"  # a human


@dataclass(frozen=True)
class RouteDecision:
    """What the router decided for one (partial or final) transcript, and why."""

    text: str
    intent: str | None  # None: out of scope
    action: Action
    hit: bool  # True only when the cached answer may be replayed
    entry_id: str | None = None
    answer: str | None = None
    score: float = 0.0  # similarity of the nearest cached question
    confidence: float = 0.0  # classifier probability of ``intent``
    margin: float = 0.0  # classifier probability gap between the top two intents
    certainty: float = 0.0  # the judge's confidence that ``intent`` is right
    finished: bool = True  # a hit's words read as a finished question (intents.completeness)
    reason: str = ""
    ms: float = 0.0  # routing time
    # ``hit`` for a spoken transcript, which needs more certainty than typed text
    # (intents.calibration, ``Thresholds.spoken_confidence``); None: the same as ``hit``.
    spoken_hit: bool | None = None
    # The published cache version that decided it (None: none was, or no cache decided it):
    # a decision is reused only while its version serves (gateway.call.speculation).
    version: str | None = None

    def as_spoken(self) -> "RouteDecision":
        """This decision for words a recogniser transcribed: not a hit when the judge
        was sure enough for typed text but not for a transcript."""
        if not self.hit or self.spoken_hit is not False:
            return self
        return replace(self, hit=False, answer=None, spoken_hit=False,
                       reason="not sure enough of a transcript")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"] = self.action.value
        del data["version"]  # the gateway's own bookkeeping, not the route event's
        return data


def miss(text: str, reason: str, ms: float = 0.0) -> RouteDecision:
    """A decision that sends the turn to the agent."""
    return RouteDecision(text=text, intent=None, action=Action.LLM, hit=False, reason=reason, ms=ms)


@dataclass(frozen=True)
class Entry:
    """One cache entry: an intent, what to do with it, and (for FAQs) its answer.

    Every intent of a seed is one entry; its id is ``entry_id_for(intent)`` (the intent
    name itself when that is safe in a URL).
    """

    id: str
    intent: str
    action: Action
    answer: str | None
    questions: tuple[str, ...]  # the seed's paraphrases
    # content hash of (voice, answer); None when no caller hears one (no answer, or an
    # `llm` or `handoff` entry)
    audio_key: str | None = None


@dataclass(frozen=True)
class Audio:
    """16-bit little-endian mono PCM."""

    pcm: bytes
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate
