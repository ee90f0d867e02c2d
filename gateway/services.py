"""The composition root of a gateway process: settings, warm runtime, responder, router.

``Services.start()`` loads models on a worker thread so the HTTP server answers
``/healthz`` at once and ``/readyz`` when everything is warm.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import logs
from .call import Call, CallOutput, RouteFn
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
        self.router: RouteFn | None = None
        self.responder: Responder | None = None
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
        except Exception as exc:  # surfaced by /readyz; the process stays up for diagnosis
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("runtime_load_failed")
            return
        self._runtime = runtime
        self.responder = Responder(runtime)
        logs.event(log, "ready", load_times_s=runtime.load_times_s)

    def new_call(self, output: CallOutput, start: StartMessage,
                 call_id: str | None = None) -> Call:
        assert self.responder is not None
        return Call(self.runtime, output, start.sample_rate, self.responder, router=self.router,
                    metadata=start.metadata, call_id=call_id)

    def readiness(self) -> dict[str, Any]:
        if self._runtime is None:
            return {"ready": False, "error": self.load_error}
        return {"ready": True, "load_times_s": self._runtime.load_times_s,
                "stt": self._runtime.stt.name, "tts": self._runtime.tts.name}

    async def aclose(self) -> None:
        if self._load_task is not None:
            self._load_task.cancel()
        # A runtime handed in by the caller is the caller's to close.
        if self._runtime is not None and self._given_runtime is None:
            await self._runtime.aclose()
