"""The FAQ cache this replica serves: the router and the answers' audio, hot in memory.

A published version is loaded whole (router, faiss index, every answer's audio in
each output format) and then swapped in at once, so a call routes against one
version from start to end of a lookup, and a hit sends its first frame without
touching disk, network or a model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from intents.embedder import Embedder
from intents.loader import LoadedCache, load_cache
from intents.store import Store, StoreError
from intents.types import Action, RouteDecision, miss

from . import logs
from .audio_bank import AudioBank, Clip

log = logging.getLogger("voicegate.cache")


@dataclass(frozen=True)
class _Serving:
    version: str
    cache: LoadedCache


class FaqCache:
    def __init__(self, store: Store, embedder: Embedder, audio: AudioBank | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.audio = audio or AudioBank()
        self._serving: _Serving | None = None
        self.last_error: str | None = None
        # The version the last load failed on (None once one loads): whose failure
        # ``last_error`` describes when it is a load's.
        self.failed_version: str | None = None
        self._refreshing = threading.Lock()  # one load at a time, the newest wins

    @property
    def version(self) -> str | None:
        return self._serving.version if self._serving else None

    @property
    def loaded(self) -> LoadedCache | None:
        return self._serving.cache if self._serving else None

    def route(self, text: str) -> RouteDecision:
        """Route one transcript against the serving version (CPU: call it off the event loop)."""
        serving = self._serving
        if serving is None:
            return miss(text, "no FAQ cache is published")
        return serving.cache.router.route(text)

    def route_many(self, texts: Sequence[str]) -> list[RouteDecision]:
        """Route a batch (one embedding pass); CPU: call it off the event loop."""
        serving = self._serving
        if serving is None:
            return [miss(text, "no FAQ cache is published") for text in texts]
        return serving.cache.router.route_many(texts)

    def refresh(self) -> bool:
        """Load the store's current version if it is not the one serving. Blocking.

        A version that cannot be loaded leaves the serving one in place. One refresh at a
        time (the subscriber, the poll and the publisher all call it): a slow load of an
        older version never lands after a newer one.
        """
        with self._refreshing:
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            current = self.store.current_version()
        except Exception as exc:  # the store is unreachable: keep serving what we hold
            self.last_error = f"store unavailable: {exc}"
            return False
        if current is None and self.version is not None:
            # The store lost what it published (Redis restarted without persistence, a wiped
            # directory): keep serving from memory, and say so; a replica started now has none.
            self.last_error = (f"the store has no published version: serving {self.version} "
                               "from memory; a replica started now has no cache: seed again")
            return False
        if current is None or current == self.version:
            if current is not None:
                self.last_error = None  # the store answers again and we serve its version
            return False
        started = time.perf_counter()
        try:
            loaded = load_cache(self.store, self.embedder, current)
            clips = [Clip(entry.id, entry.answer or "", entry.pcm, entry.sample_rate)
                     for entry in loaded.entries.values()
                     if entry.action is Action.ANSWER and entry.pcm and entry.sample_rate]
            # Audio first: a decision never names missing audio. All or nothing: a clip that
            # cannot be converted (torn PCM, a foreign rate) leaves the serving clips whole.
            self.audio.replace_all(clips)
        except Exception as exc:  # corrupt or foreign: refuse it, keep what we serve
            self.last_error = f"cannot load cache version {current}: {type(exc).__name__}: {exc}"
            self.failed_version = current
            logs.event(log, "cache_load_failed", logging.ERROR, version=current, error=str(exc))
            return False
        self._serving = _Serving(current, loaded)
        self.last_error = self.failed_version = None
        logs.event(log, "cache_loaded", version=current, entries=len(loaded.entries),
                   clips=len(clips), ms=round((time.perf_counter() - started) * 1000, 1))
        return True
