"""The composition root of a gateway process: settings, warm runtime, responder, router.

``Services.start()`` loads models on a worker thread so the HTTP server answers
``/healthz`` at once and ``/readyz`` when everything is warm.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import logs
from intents.store import LocalStore, Store

from .call import Call, CallOutput
from .faq_cache import FaqCache
from .route_batcher import RouteBatcher
from .protocol import StartMessage
from .responder import Responder
from .runtime import Runtime
from .settings import Settings

log = logging.getLogger("voicegate.services")


class Services:
    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self._runtime: Runtime | None = None
        self._given_runtime = runtime
        self.cache: FaqCache | None = None
        self.route_batcher: RouteBatcher | None = None
        self.responder: Responder | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.load_error: str | None = None
        self._load_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._runtime is not None and self.responder is not None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the runtime is not loaded yet")
        return self._runtime

    async def start(self) -> None:
        self._load_task = asyncio.create_task(self._load(self._given_runtime))

    async def _load(self, runtime: Runtime | None) -> None:
        try:
            if runtime is None:
                runtime = await asyncio.to_thread(Runtime.load, self.settings)
            await runtime.render_prompts()
            cache = FaqCache(self.open_store(), runtime.embedder)
            await asyncio.to_thread(cache.refresh)
        except Exception as exc:  # surfaced by /readyz; the process stays up for diagnosis
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("runtime_load_failed")
            return
        self._runtime = runtime
        self.cache = cache
        self.route_batcher = RouteBatcher(cache.route_many, runtime.route_executor)
        self.responder = Responder(runtime, cache.audio)
        self._watch_task = asyncio.create_task(self._watch_cache(cache))
        logs.event(log, "ready", load_times_s=runtime.load_times_s, cache_version=cache.version)

    def open_store(self) -> Store:
        return LocalStore(self.settings.store_dir)

    async def _watch_cache(self, cache: FaqCache) -> None:
        """Pick up newly published versions (another process may seed at any time)."""
        while True:
            await asyncio.sleep(self.settings.cache_poll_s)
            try:
                await asyncio.to_thread(cache.refresh)
            except Exception:  # a bad version must not stop the watcher
                log.exception("cache_refresh_failed")

    def new_call(self, output: CallOutput, start: StartMessage,
                 call_id: str | None = None) -> Call:
        assert self.responder is not None
        assert self.cache is not None
        assert self.route_batcher is not None
        return Call(self.runtime, output, start.sample_rate, self.responder,
                    router=self.route_batcher.route,
                    metadata=start.metadata, call_id=call_id)

    def readiness(self) -> dict[str, Any]:
        if self._runtime is None:
            return {"ready": False, "error": self.load_error}
        cache = self.cache
        return {"ready": True, "load_times_s": self._runtime.load_times_s,
                "stt": self._runtime.stt.name, "tts": self._runtime.tts.name,
                "cache_version": cache.version if cache else None,
                "cache_error": cache.last_error if cache else None}

    def stats_snapshot(self) -> dict[str, Any]:
        """What ``/admin/stats`` answers: this replica's stats and the serving cache version."""
        snapshot = self.runtime.stats.snapshot()
        snapshot["cache_version"] = self.cache.version if self.cache else None
        return snapshot

    async def aclose(self) -> None:
        for task in (self._load_task, self._watch_task):
            if task is not None:
                task.cancel()
        # A runtime handed in by the caller is the caller's to close.
        if self._runtime is not None and self._given_runtime is None:
            await self._runtime.aclose()
