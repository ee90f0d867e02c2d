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
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from intents.embedder import Embedder
from intents.loader import LoadedCache, load_cache
from intents.store import Store, StoreStarting, StoreUnavailable
from intents.types import Action, RouteDecision, miss

from . import logs
from .clock import SYSTEM_CLOCK, Clock
from .audio_bank import AudioBank, Clip

log = logging.getLogger("voicegate.cache")


@dataclass(frozen=True)
class _Serving:
    version: str
    cache: LoadedCache


# A version that failed to load (corrupt, torn, foreign) is tried again after this long,
# doubling up to the cap: loading one is reading all its audio and models (and retraining
# them when their blob does not load), which every poll (2 s) would redo beside live calls.
# A failure of the store to answer is retried at the next poll; a newer version at once.
RETRY_FAILED_S = 10.0
RETRY_FAILED_MAX_S = 300.0


class FaqCache:
    def __init__(self, store: Store, embedder: Embedder, audio: AudioBank | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.embedder = embedder
        self.audio = audio or AudioBank()
        self._clock = clock
        self._serving: _Serving | None = None
        self.last_error: str | None = None
        # The version the last load failed on (None once one loads): whose failure
        # ``last_error`` describes when it is a load's.
        self.failed_version: str | None = None
        self._failed_error: str | None = None  # why it failed (last_error then)
        # Whether that version failed because the store did not answer while it was read
        # (retried at the next poll), not because the version itself is bad.
        self.failed_for_store = False
        # Whether the last refresh could not even ask the store which version is current.
        self._unreachable = False
        self._retry_s = 0.0  # the wait before that version is tried again (0: next poll)
        self._retry_at = 0.0  # clock time it may be tried again
        self._refreshing = threading.Lock()  # one load at a time, the newest wins
        # Told of each version once it serves (on the refreshing thread): the stats, which
        # clear the hit counts of entries it dropped or changed.
        self.on_loaded: Callable[[LoadedCache], None] | None = None

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
        return replace(serving.cache.router.route(text), version=serving.version)

    def route_many(self, texts: Sequence[str]) -> list[RouteDecision]:
        """Route a batch (one embedding pass); CPU: call it off the event loop."""
        serving = self._serving
        if serving is None:
            return [miss(text, "no FAQ cache is published") for text in texts]
        return [replace(decision, version=serving.version)
                for decision in serving.cache.router.route_many(texts)]

    @property
    def store_unanswered(self) -> bool:
        """Nothing is served because the store did not answer (unreachable, or lost while
        the current version was read): not an empty store, nor a bad version."""
        return self._serving is None and (self._unreachable or self.failed_for_store)

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
        except StoreUnavailable as exc:  # the store is unreachable: keep serving what we hold
            # or still starting (Redis loading its dataset): the same, said as such
            state = "starting" if isinstance(exc, StoreStarting) else "unavailable"
            self.last_error = f"store {state}: {exc}"
            self._unreachable = True
            return False
        except Exception as exc:
            # The store answered with a pointer that names no version (set by hand, a key of
            # another type, a directory): no outage to wait out. A replica starting
            # now turns ready without a cache, as it does on a bad version, and says why.
            self.last_error = f"cannot read the current version: {exc}"
            self._unreachable = False
            self.failed_version, self.failed_for_store = None, False  # no earlier blip's either
            return False
        self._unreachable = False
        if current is None and self.version is not None:
            # The store lost what it published (Redis restarted without persistence, a wiped
            # directory): keep serving from memory, and say so; a replica started now has none.
            self.last_error = (f"the store has no published version: serving {self.version} "
                               "from memory; a replica started now has no cache: seed again")
            return False
        if current is None or current == self.version:
            # The store answers, with nothing new to load: we serve its version, or it has
            # none and neither do we. An earlier failure (the store unreachable, or lost
            # while a version was read, then emptied) is over.
            self.failed_version, self.failed_for_store = None, False
            self.last_error = None
            return False
        if current == self.failed_version and self._clock.now() < self._retry_at:
            # It failed to load a moment ago; say why again (an outage in between may
            # have said something else).
            self.last_error = self._failed_error
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
            self.last_error = self._failed_error = \
                f"cannot load cache version {current}: {type(exc).__name__}: {exc}"
            self._schedule_retry(current, unavailable=isinstance(exc, StoreUnavailable))
            logs.event(log, "cache_load_failed", logging.ERROR, version=current, error=str(exc),
                       retry_in_s=self._retry_s)
            return False
        self._serving = _Serving(current, loaded)
        self.last_error = self.failed_version = None
        self.failed_for_store = False
        self._retry_s = 0.0
        if self.on_loaded is not None:
            self.on_loaded(loaded)
        logs.event(log, "cache_loaded", version=current, entries=len(loaded.entries),
                   clips=len(clips), ms=round((time.perf_counter() - started) * 1000, 1))
        return True

    def _schedule_retry(self, version: str, unavailable: bool) -> None:
        """When ``version``, which just failed to load, is tried again: at the next poll
        when the store did not answer, else after a wait that doubles while it keeps failing."""
        if unavailable:
            self._retry_s = 0.0
        elif version == self.failed_version and self._retry_s > 0:
            self._retry_s = min(2 * self._retry_s, RETRY_FAILED_MAX_S)
        else:
            self._retry_s = RETRY_FAILED_S
        self.failed_version = version
        self.failed_for_store = unavailable
        self._retry_at = self._clock.now() + self._retry_s
