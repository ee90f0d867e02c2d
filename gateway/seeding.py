"""Seeding from the gateway's side: the configured voice as ``cache_seed``'s renderer.

``cache_seed`` never imports the gateway; the gateway hands it a plain function
``render(text) -> (pcm16, sample_rate)`` built from whatever TTS is configured.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Callable, Sequence

from cache_seed import (NewAnswerLimit, ProgressCallback, SeedPlan, SeedReport, read_seed_csv,
                        seed_plan)
from intents.embedder import Embedder
from intents.store import ANY_VERSION, AnyVersion, Store
from intents.types import DEFAULT_TARGET_WRONG_RATE

from .providers.base import TextToSpeech
from .providers.synthesis_slots import SEEDING, URGENCY
from .sentences import rendered_text
from .settings import ENV_PREFIX

Renderer = Callable[[str], tuple[bytes, int]]

# Where the operator raises the limit on new answers per seed: the environment variable
# of Settings.seed_max_new_answers, named as Settings.load reads it.
MAX_NEW_ANSWERS_SETTING = ENV_PREFIX + "seed_max_new_answers".upper()


def new_answer_limit(max_new_answers: int | None) -> NewAnswerLimit | None:
    return None if max_new_answers is None else NewAnswerLimit(max_new_answers,
                                                               MAX_NEW_ANSWERS_SETTING)


def voice_id(tts: TextToSpeech) -> str:
    """Names the voice in the audio's content hash (``TextToSpeech.audio_id``: voice, model,
    output format, speed): a change to any of them re-renders everything. A vendor's voice
    id alone is not enough (ElevenLabs' model and sample rate change the audio too)."""
    return str(getattr(tts, "audio_id", tts.name))


def blocking_renderer(tts: TextToSpeech, loop: asyncio.AbstractEventLoop | None = None) -> Renderer:
    """A synchronous renderer for a TTS. Local voices render directly; a streaming (cloud)
    TTS is driven on ``loop``: a private loop of this thread (the CLI), or the serving loop
    running in another thread (the admin API), whose HTTP clients are bound to it."""
    whole = getattr(tts, "synthesize_all", None)
    if whole is not None:
        return lambda text: (whole(rendered_text(text)), tts.sample_rate)
    if loop is None:
        raise ValueError(f"{tts.name} needs an event loop to render")

    async def collect(text: str) -> bytes:
        URGENCY.set(SEEDING)  # this task's own: behind every caller's sentence
        return b"".join([chunk async for chunk in tts.synthesize(rendered_text(text))])

    def render(text: str) -> tuple[bytes, int]:
        if loop.is_running():  # another thread's loop: hand the synthesis to it, wait here
            return asyncio.run_coroutine_threadsafe(collect(text), loop).result(), tts.sample_rate
        return loop.run_until_complete(collect(text)), tts.sample_rate

    return render


def seed_with_voice(csv_path: str | Path, store: Store, tts: TextToSpeech, embedder: Embedder,
                    target_wrong_rate: float = DEFAULT_TARGET_WRONG_RATE, progress: bool = True,
                    negatives: Sequence[str] = (),
                    max_new_answers: int | None = None, jobs: int = 1,
                    plan: SeedPlan | None = None,
                    replaces: str | None | AnyVersion = ANY_VERSION) -> SeedReport:
    """Seed ``csv_path``; ``plan``: its rows as already read and validated (the CLI reads
    them before the voice loads), so the file is read once: a pipe (``<(curl ...)``,
    /dev/stdin) read again is empty. ``replaces``: publish only over that version
    (``Store.publish``; else ``StoreConflict``)."""
    if plan is None:
        plan = read_seed_csv(csv_path)
    loop = None if hasattr(tts, "synthesize_all") else asyncio.new_event_loop()
    try:
        return seed_plan(plan, store, blocking_renderer(tts, loop), voice_id(tts),
                         source=Path(csv_path).name, target_wrong_rate=target_wrong_rate,
                         progress=progress, embedder=embedder, negatives=negatives,
                         replaces=replaces, limit=new_answer_limit(max_new_answers), jobs=jobs)
    finally:
        if loop is not None:
            loop.close()


def seed_plan_with_voice(plan: SeedPlan, store: Store, tts: TextToSpeech, embedder: Embedder,
                         source: str, target_wrong_rate: float = DEFAULT_TARGET_WRONG_RATE,
                         serving_loop: asyncio.AbstractEventLoop | None = None,
                         negatives: Sequence[str] = (),
                         replaces: str | None | AnyVersion = ANY_VERSION,
                         max_new_answers: int | None = None,
                         cancel: threading.Event | None = None,
                         on_progress: ProgressCallback | None = None) -> SeedReport:
    """Publish a validated plan (admin API: uploads and entry edits). Blocking: run it on a
    worker thread. A streaming (cloud) TTS synthesizes on ``serving_loop``, the loop its
    client is bound to (a private loop would fail: "bound to a different event loop").
    ``cancel`` set (from the serving loop) stops it before its next answer; ``on_progress``
    is called on this (the seeding) thread."""
    private = None
    loop = serving_loop
    if loop is None and not hasattr(tts, "synthesize_all"):
        loop = private = asyncio.new_event_loop()
    try:
        return seed_plan(plan, store, blocking_renderer(tts, loop), voice_id(tts), source=source,
                         target_wrong_rate=target_wrong_rate, progress=False, embedder=embedder,
                         negatives=negatives, replaces=replaces,
                         limit=new_answer_limit(max_new_answers), cancel=cancel,
                         on_progress=on_progress)
    finally:
        if private is not None:
            private.close()
