"""In-process counters and latency samples of this replica."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LATENCY_STAGES = ("end_of_turn_ms", "route_decided_ms", "first_token_ms", "first_audio_ms",
                   "reply_latency_ms")


@dataclass
class Stats:
    window: int = 10_000
    active_calls: int = 0
    calls: int = 0
    turns: int = 0
    interrupted_turns: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, dict[str, deque[float]]] = field(default_factory=dict)

    def call_started(self) -> None:
        self.calls += 1
        self.active_calls += 1

    def call_ended(self) -> None:
        self.active_calls -= 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def turn_finished(self, metrics: dict[str, Any]) -> None:
        self.turns += 1
        source = str(metrics.get("source") or "none")
        self.sources[source] += 1
        if metrics.get("interrupted"):
            self.interrupted_turns += 1
        per_source = self.latencies.setdefault(source, {})
        for stage in _LATENCY_STAGES:
            value = metrics.get(stage)
            if value is not None:
                per_source.setdefault(stage, deque(maxlen=self.window)).append(float(value))

    def snapshot(self) -> dict[str, Any]:
        latency: dict[str, dict[str, dict[str, float]]] = {}
        for source, stages in self.latencies.items():
            latency[source] = {
                stage: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
                        "n": len(v)}
                for stage, v in stages.items() if v}
        return {"active_calls": self.active_calls, "calls": self.calls, "turns": self.turns,
                "interrupted_turns": self.interrupted_turns, "sources": dict(self.sources),
                "errors": dict(self.errors), "latency_ms": latency}
