"""What ``GET /admin/seed`` shows: the seed under way in this process, or how the last ended.

The seed reports its progress from its worker thread (``cache_seed``'s ``on_progress``)
while the serving loop reads it, so one lock guards both. Per process, as the seed lock
is: a seed running on another replica (or ``voicegate seed``) is not seen here.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from cache_seed import PUBLISHING, ProgressCallback, SeedProgress

from ..clock import SYSTEM_CLOCK, Clock

# What a seed was started for: the Publisher's entry points.
UPLOAD, ENTRY, DELETE, PROMOTE = "upload", "entry", "delete", "promote"
# How a seed ended (``last.outcome``). UNCONFIRMED: its pointer swap went unanswered, so
# whether it published is unknown (``PublishUnconfirmed``; its error says how to tell).
PUBLISHED, CANCELLED, FAILED = "published", "cancelled", "failed"
UNCONFIRMED = "unconfirmed"
# What a cancel found (``SeedStatus.cancel``): a seed it asked to stop, none, one writing its
# version (past stopping), one that has published.
CANCELLING, NO_SEED, WRITING = "cancelling", "none", "writing"


@dataclass
class _Run:
    kind: str
    source: str
    cancel: threading.Event
    started_at: float  # Unix seconds, for the operator
    started: float  # on the clock, for the elapsed time (a wall clock may jump)
    phase: str = "validating"  # then cache_seed's: rendering, calibrating, publishing
    rendered: int = 0
    to_render: int = 0
    reused: int = 0
    version: str | None = None  # once published

    def counts(self) -> dict[str, Any]:
        return {"phase": self.phase, "rendered": self.rendered, "to_render": self.to_render,
                "reused": self.reused}


class SeedStatus:
    def __init__(self, clock: Clock = SYSTEM_CLOCK,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._last: dict[str, Any] | None = None  # None: no seed ended since the start

    def start(self, kind: str, source: str, cancel: threading.Event) -> ProgressCallback:
        """A seed starts; returns its ``on_progress`` for ``cache_seed``, called on the
        seeding thread. Bound to this seed: a thread that outlives it changes nothing."""
        run = _Run(kind, source, cancel, self._wall(), self._clock.now())
        with self._lock:
            self._run = run
        return functools.partial(self._progress, run)

    def named(self, source: str) -> None:
        """The source as it is published (an entry's name once resolved)."""
        with self._lock:
            if self._run is not None:
                self._run.source = source

    def _progress(self, run: _Run, step: SeedProgress) -> None:
        with self._lock:
            if self._run is run:
                run.phase, run.rendered = step.phase, step.rendered
                run.to_render, run.reused = step.to_render, step.reused

    def published(self, version: str) -> None:
        with self._lock:
            if self._run is not None:
                self._run.version = version

    def publishing_done(self) -> str | None:
        """The version the seed under way has published, None before (or with none)."""
        with self._lock:
            return self._run.version if self._run is not None else None

    def cancel(self) -> tuple[str, str | None]:
        """Ask the seed under way to stop: (CANCELLING, None); or why not: (NO_SEED, None),
        (WRITING, None) once it is writing its version, (PUBLISHED, its version) once it has
        published. Under the lock its progress takes, so a cancel lands either before the
        seed says "publishing" (which then checks it: ``cache_seed.seed_plan``) or is refused:
        never accepted for a seed that publishes anyway."""
        with self._lock:
            run = self._run
            if run is None:
                return NO_SEED, None
            if run.version is not None:
                return PUBLISHED, run.version
            if run.phase == PUBLISHING:
                return WRITING, None
            run.cancel.set()
            return CANCELLING, None

    def end(self, outcome: str, error: str | None = None) -> None:
        with self._lock:
            run, self._run = self._run, None
            if run is None:
                return
            self._last = {"kind": run.kind, "source": run.source, "outcome": outcome,
                          "version": run.version, "error": error, **run.counts(),
                          "started_at": round(run.started_at, 3),
                          "ended_at": round(self._wall(), 3),
                          "elapsed_s": self._elapsed(run)}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            run = self._run
            if run is None:
                return {"running": False, "last": self._last}
            return {"running": True, "kind": run.kind, "source": run.source, **run.counts(),
                    "started_at": round(run.started_at, 3), "elapsed_s": self._elapsed(run),
                    "cancelling": run.cancel.is_set(),
                    **({"version": run.version} if run.version is not None else {})}

    def _elapsed(self, run: _Run) -> float:
        return round(max(0.0, self._clock.now() - run.started), 3)
