"""Process-wide state of a gateway: warm models, executors, pre-rendered audio, stats.

Built once at start-up (``Runtime.load``); every call borrows from it and owns
nothing here. Loading happens off the event loop so ``/healthz`` answers while
models warm up, and ``/readyz`` turns green when they are.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .audio_bank import AudioBank, Clip
from .providers.base import SpeechToText, TextToSpeech
from .providers.registry import create_stt, create_tts
from .settings import Settings
from .stats import Stats
from .vad import SileroVAD, VADBatcher

log = logging.getLogger("voicegate.runtime")

HANDOFF_TEXT = ("I'm sorry, I can't help with that myself. "
                "Let me connect you with a colleague who can.")
FILLER_TEXTS = ("Let me check that for you.", "One moment while I look that up.",
                "Sure, give me a second.", "Let me pull that up.")


@dataclass
class Runtime:
    settings: Settings
    fast_executor: ThreadPoolExecutor  # VAD windows, embeddings: short and latency-critical
    model_executor: ThreadPoolExecutor  # STT decodes, TTS sentences: long-running
    vad: SileroVAD
    stt: SpeechToText
    tts: TextToSpeech
    prompts: AudioBank  # filler and handoff phrases
    vad_batcher: VADBatcher
    stats: Stats = field(default_factory=Stats)
    load_times_s: dict[str, float] = field(default_factory=dict)
    responder_factory: Any = None

    @classmethod
    def load(cls, settings: Settings) -> "Runtime":
        times: dict[str, float] = {}
        fast = ThreadPoolExecutor(max_workers=max(1, settings.cpu_workers),
                                  thread_name_prefix="vg-fast")
        heavy = ThreadPoolExecutor(max_workers=max(1, settings.cpu_workers),
                                   thread_name_prefix="vg-model")

        start = time.perf_counter()
        vad = SileroVAD()
        vad.warm_up()
        times["vad"] = time.perf_counter() - start

        start = time.perf_counter()
        stt = create_stt(settings, heavy)
        warm = getattr(stt, "warm_up", None)
        if warm:
            warm()
        times["stt"] = time.perf_counter() - start

        start = time.perf_counter()
        tts = create_tts(settings, heavy)
        warm = getattr(tts, "warm_up", None)
        if warm:
            warm()
        times["tts"] = time.perf_counter() - start

        start = time.perf_counter()
        prompts = AudioBank()
        render = getattr(tts, "synthesize_all", None)
        if render is not None:
            prompts.add(Clip("handoff", HANDOFF_TEXT, render(HANDOFF_TEXT), tts.sample_rate))
            for i, text in enumerate(FILLER_TEXTS):
                prompts.add(Clip(f"filler:{i}", text, render(text), tts.sample_rate))
        times["prompts"] = time.perf_counter() - start
        log.info("models_loaded %s", " ".join(f"{k}={v:.2f}s" for k, v in times.items()))
        return cls(settings=settings, fast_executor=fast, model_executor=heavy, vad=vad, stt=stt,
                   tts=tts, prompts=prompts, vad_batcher=VADBatcher(vad, fast),
                   load_times_s=times)

    def filler_key(self) -> str:
        keys = [k for k in ("filler:0", "filler:1", "filler:2", "filler:3") if k in self.prompts]
        return random.choice(keys)

    async def aclose(self) -> None:
        await self.stt.aclose()
        await self.tts.aclose()
        self.fast_executor.shutdown(wait=False, cancel_futures=True)
        self.model_executor.shutdown(wait=False, cancel_futures=True)
