"""Process-wide state of a gateway: warm models, executors, pre-rendered audio, stats.

Built once at start-up (``Runtime.load``); every call borrows from it and owns
nothing here. Loading happens off the event loop so ``/healthz`` answers while
models warm up, and ``/readyz`` turns green when they are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

from intents.embedder import Embedder

from .agent import Agent, build_agent, prompt_texts
from .audio_bank import AudioBank, Clip
from .providers.base import ProviderError, SpeechToText, TextToSpeech
from .providers.registry import create_stt, create_tts
from .sentences import has_words, rendered_text
from .route_batcher import PARTIAL_LANES, ROUTING_LANES
from .settings import Settings
from .stats import Stats
from .tools import load_tools
from .vad import SileroVAD, VADBatcher

if TYPE_CHECKING:
    from .turn_model import SmartTurn

log = logging.getLogger("voicegate.runtime")
T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model or provider of the runtime could not be built: names which, and why.

    Nothing in ``Runtime.load`` reaches the network (the cloud providers only build their
    clients), so what fails there (a missing or corrupt model file, a voice path that is
    not a voice, a provider without its key, a missing package) fails the same way on
    every try: the process gives up rather than retry (gateway/services.py)."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"loading {what} failed: {type(cause).__name__}: {cause}")
        self.what = what


def load_failure(exc: BaseException) -> str:
    """The one line a command ends with when ``Runtime.load`` raised ``exc``: which model
    and why, and that it is not retried (``voicegate serve`` through Services.fatal_error,
    ``voicegate demo`` directly; gateway/cli.py prints it and exits with status 1)."""
    cause = str(exc) if isinstance(exc, ModelLoadError) \
        else f"loading the models failed: {type(exc).__name__}: {exc}"
    return f"{cause} (not retried: fix the cause, then start again)"


@dataclass
class Runtime:
    settings: Settings
    vad_executor: ThreadPoolExecutor  # batched VAD windows: short and latency-critical
    model_executor: ThreadPoolExecutor  # STT decodes, TTS sentences: long-running
    vad: SileroVAD
    stt: SpeechToText
    tts: TextToSpeech
    prompts: AudioBank  # filler and handoff phrases, rendered by ``render_prompts``
    vad_batcher: VADBatcher
    agent: Agent
    embedder: Embedder
    stats: Stats = field(default_factory=Stats)
    load_times_s: dict[str, float] = field(default_factory=dict)
    # End-of-turn model (settings.turn_model) on a thread of its own: it runs at every
    # pause, beside the early final decode, and must not queue behind decodes.
    turn_model: "SmartTurn | None" = None
    turn_executor: ThreadPoolExecutor | None = None
    # Routing: a thread per lane (route_batcher.RoutingLanes), so a final never waits
    # behind partials, nor a cached text behind a forward pass.
    route_executors: dict[str, ThreadPoolExecutor] = field(
        default_factory=lambda: routing_executors())

    @classmethod
    def load(cls, settings: Settings, stats: Stats | None = None) -> "Runtime":
        # The tools file first: a bad one (ToolConfigError) stops the start-up at once, not
        # after every model below has loaded. build_agent reads it again, checked the same.
        load_tools(settings.llm_tools_file)
        times: dict[str, float] = {}
        # One thread: the VAD batcher runs one batch at a time by design.
        vad_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vg-vad")
        heavy = ThreadPoolExecutor(max_workers=max(1, settings.cpu_workers),
                                   thread_name_prefix="vg-model")

        try:
            vad = _load_warm("vad", SileroVAD, times, "the VAD (Silero)")
            stt = _load_warm("stt", lambda: create_stt(settings, heavy), times,
                             f"the STT ({settings.stt_provider})")
            tts = _load_warm("tts", lambda: create_tts(settings, heavy), times,
                             f"the TTS ({settings.tts_provider})")
            embedder = _load_warm("embedder", lambda: build_embedder(settings), times,
                                  f"the router's embedder ({settings.embedder_backend})")
            turn_model, turn_pool = None, None
            if settings.turn_model == "smart_turn":
                from .turn_model import SmartTurn

                turn_model = _load_warm("turn_model", SmartTurn, times,
                                        "the turn model (smart_turn)")
                turn_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vg-turn")
        except Exception:  # nothing is left running of a runtime that will not be
            vad_pool.shutdown(wait=False, cancel_futures=True)
            heavy.shutdown(wait=False, cancel_futures=True)
            raise

        log.info("models_loaded %s", " ".join(f"{k}={v:.2f}s" for k, v in times.items()))
        return cls(settings=settings, vad_executor=vad_pool, model_executor=heavy,
                   vad=vad, stt=stt,
                   tts=tts, prompts=AudioBank(),
                   vad_batcher=VADBatcher(vad, vad_pool, settings.vad_batch_interval_ms,
                                          settings.vad_quiet_dbfs if settings.vad_skip_quiet
                                          else None),
                   agent=build_agent(settings), embedder=embedder, load_times_s=times,
                   stats=stats or Stats(), turn_model=turn_model, turn_executor=turn_pool,
                   route_executors=routing_executors(settings.partial_routing_nice))

    async def judge_turn(self, pcm16: bytes) -> float:
        """P(the caller's turn is complete) from its audio; needs ``turn_model``."""
        assert self.turn_model is not None
        return await asyncio.get_running_loop().run_in_executor(
            self.turn_executor, self.turn_model.probability, pcm16)

    async def render_prompts(self, greeting: str | None = None) -> None:
        """Pre-render the filler, handoff, idle and greeting phrases with the configured voice.

        Runs on the serving event loop: a cloud TTS client is bound to the loop it is used on.
        """
        texts = prompt_texts(self.settings.greeting if greeting is None else greeting)
        if all(key in self.prompts and self.prompts.clip(key).text == text
               for key, text in texts.items()):
            return
        start = time.perf_counter()
        for key, text in texts.items():
            if key in self.prompts and self.prompts.clip(key).text == text:
                continue
            audio = b"".join([chunk async for chunk in self.tts.synthesize(rendered_text(text))])
            if not audio and has_words(text):
                # A voice answering an empty body: kept, the phrase (the apology, a filler,
                # the handoff message) would be silence for the life of the process. The
                # start-up fails instead, and asks again (Services._load).
                raise ProviderError(self.tts.name, f"returned no audio for the {key} phrase")
            self.prompts.add(Clip(key, text, audio, self.tts.sample_rate))
        self.load_times_s["prompts"] = time.perf_counter() - start

    async def aclose(self) -> None:
        await self.agent.aclose()
        await self.stt.aclose()
        await self.tts.aclose()
        self.vad_executor.shutdown(wait=False, cancel_futures=True)
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        for executor in self.route_executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        if self.turn_executor is not None:
            self.turn_executor.shutdown(wait=False, cancel_futures=True)


def routing_executors(partial_nice: int = 0) -> dict[str, ThreadPoolExecutor]:
    """A thread per routing lane. ``partial_nice``: the partials' lanes' threads run at that
    much lower an OS priority (Linux nice), so a final's forward pass, the event loop (and
    whatever else the machine runs) take the cores before a partial's."""
    def lowered() -> None:
        # Below the thread's own (inherited) niceness, not set to it: a gateway started
        # under `nice -n 5` keeps its partials 10 below itself, not 5 (the kernel caps 19).
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread,
                       os.getpriority(os.PRIO_PROCESS, thread) + partial_nice)

    return {lane: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=f"vg-route-{lane}",
        initializer=lowered if partial_nice and lane in PARTIAL_LANES else None)
        for lane in ROUTING_LANES}


def build_embedder(settings: Settings, threads: int | None = None) -> Embedder:
    """The router's embedder as the settings ask (serve, seed and route use the same);
    ``threads`` instead of ``embedder_threads`` (a seed alone in its process takes all)."""
    return Embedder(threads=threads or settings.embedder_threads,
                    cache_size=settings.embedder_cache_size,
                    backend=settings.embedder_backend,
                    cache_dir=settings.model_cache_dir or None)


def _load_warm(name: str, build: Callable[[], T], times: dict[str, float],
               what: str) -> T:
    """Build a model, run it once if it can warm up (so the first call pays nothing), and
    note how long both took. A failure is a ``ModelLoadError`` naming ``what`` failed."""
    start = time.perf_counter()
    try:
        model = build()
        warm = getattr(model, "warm_up", None)
        if warm is not None:
            warm()
    except Exception as exc:
        raise ModelLoadError(what, exc) from exc
    times[name] = time.perf_counter() - start
    return model
