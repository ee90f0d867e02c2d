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
    reason: str = ""
    ms: float = 0.0  # routing time

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"] = self.action.value
        return data


def miss(text: str, reason: str, ms: float = 0.0) -> RouteDecision:
    """A decision that sends the turn to the agent."""
    return RouteDecision(text=text, intent=None, action=Action.LLM, hit=False, reason=reason, ms=ms)
