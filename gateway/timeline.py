"""The timeline of one caller turn: every stage stamps it, the client gets it at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .clock import SYSTEM_CLOCK, Clock

# Stages in the order a turn normally reaches them.
STAGES = ("speech_start", "speech_end", "end_of_turn", "final_transcript", "route_decided",
          "first_token", "first_audio", "reply_end")


def now() -> float:
    return time.perf_counter()


@dataclass
class TurnTimeline:
    turn: int
    marks: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False, compare=False)
    # The reply's own words began to play: not a filler or hold phrase, which mark
    # ``first_audio`` (the silence ended) but answer nothing. Words the caller goes on with
    # before it are the same question, carried into the next turn.
    answered: bool = field(default=False, compare=False)

    def mark(self, stage: str, at: float | None = None, *, overwrite: bool = False) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown timeline stage {stage!r}")
        if overwrite or stage not in self.marks:
            self.marks[stage] = self.clock.now() if at is None else at

    def has(self, stage: str) -> bool:
        return stage in self.marks

    def _delta_ms(self, start: str, end: str) -> float | None:
        if start in self.marks and end in self.marks:
            return round((self.marks[end] - self.marks[start]) * 1000.0, 3)
        return None

    def metrics(self) -> dict[str, Any]:
        """Durations in ms. Stages are measured from the end of the caller's speech,
        except ``first_audio_ms``, which is end of turn -> first reply frame sent."""
        out: dict[str, Any] = {"turn": self.turn}
        out["speech_ms"] = self._delta_ms("speech_start", "speech_end")
        for stage in ("end_of_turn", "final_transcript", "route_decided", "first_token"):
            out[f"{stage}_ms"] = self._delta_ms("speech_end", stage)
        out["first_audio_ms"] = self._delta_ms("end_of_turn", "first_audio")
        out["reply_latency_ms"] = self._delta_ms("speech_end", "first_audio")
        out["reply_ms"] = self._delta_ms("first_audio", "reply_end")
        out.update(self.info)
        return out
