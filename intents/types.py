"""Value types shared by the router, the stores and their users."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


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
    reason: str = ""
    ms: float = 0.0  # routing time

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"] = self.action.value
        return data


def miss(text: str, reason: str, ms: float = 0.0) -> RouteDecision:
    """A decision that sends the turn to the agent."""
    return RouteDecision(text=text, intent=None, action=Action.LLM, hit=False, reason=reason, ms=ms)


@dataclass(frozen=True)
class Entry:
    """One cache entry: an intent, what to do with it, and (for FAQs) its answer.

    Every intent of a seed is one entry; its id is the intent name.
    """

    id: str
    intent: str
    action: Action
    answer: str | None
    questions: tuple[str, ...]  # the seed's paraphrases
    audio_key: str | None = None  # content hash of (voice, answer); None without an answer


@dataclass(frozen=True)
class Audio:
    """16-bit little-endian mono PCM."""

    pcm: bytes
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate
