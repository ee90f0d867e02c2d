"""Seed the cache: validate the CSV, render answers, calibrate, publish atomically.

The TTS is injected (``render``) so this package never imports the gateway: the
gateway passes its configured voice, tests may pass a cheap renderer.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from cache_seed.validate import SeedError, SeedPlan, read_seed_csv
from intents.calibration import Thresholds
from intents.completeness import CompletenessReport
from intents.embedder import Embedder
from intents.router import train_router
from intents.store import ANY_VERSION, AnyVersion, CacheBundle, Store, audio_key
from intents.types import DEFAULT_TARGET_WRONG_RATE, Action, Audio, Entry

# text -> (16-bit mono PCM bytes, sample rate)
Renderer = Callable[[str], tuple[bytes, int]]


class RenderError(SeedError):
    """The TTS failed or returned unusable audio for an answer."""


@dataclass(frozen=True)
class NewAnswerLimit:
    """At most ``most`` answers not yet in the store are rendered by one seed; ``setting``
    names where the operator raises it (the refusal says so)."""

    most: int
    setting: str = "max_new_answers"


class TooManyNewAnswers(SeedError):
    """The seed has more new answers to render than its limit: refused before rendering
    any (tens of thousands of answers render for hours)."""

    def __init__(self, new: int, reused: int, limit: NewAnswerLimit) -> None:
        self.new, self.reused, self.limit = new, reused, limit
        super().__init__(
            f"this seed would render {new:,} new answers ({reused:,} more are already in the "
            f"store), over the limit of {limit.most:,} new answers a seed may render "
            f"({limit.setting}): nothing was rendered or published; raise {limit.setting} "
            "if so many new answers are meant")


# The last phase, from just before ``Store.publish``: the write under way cannot be stopped
# (the admin API refuses a cancel from here on: gateway/admin/seed_status.py).
PUBLISHING = "publishing"


@dataclass(frozen=True)
class SeedProgress:
    """Where a seed is, reported (``on_progress``) from the thread it runs on: as each phase
    starts and after each answer renders."""

    phase: str  # "rendering", "calibrating" or PUBLISHING
    rendered: int  # new answers rendered so far
    to_render: int  # new answers this seed renders
    reused: int  # answers whose audio the store already had


ProgressCallback = Callable[[SeedProgress], None]


class SeedCancelled(SeedError):
    """The seed was cancelled (``cancel`` set): it stopped before its next answer, or
    before publishing; nothing is published."""


@dataclass(frozen=True)
class SeedReport:
    version: str
    entries: int
    answer_entries: int  # entries served from the cache (action answer)
    questions: int
    rendered: int  # answers rendered by this seed
    reused: int  # answers whose audio was already in the store
    thresholds: Thresholds
    completeness: CompletenessReport | None = None

    @property
    def expected_hit_rate(self) -> float:
        return self.thresholds.expected_hit_rate

    def summary(self) -> str:
        t = self.thresholds
        return (f"published {self.version}: {self.entries} entries ({self.answer_entries} cached "
                f"answers), {self.questions} questions; audio rendered {self.rendered}, reused "
                f"{self.reused}\nprecision: {t.promise()}\ncalibration: {t.folds}-fold "
                f"cross-validation on the seed's {t.calibration_questions} questions and "
                f"{t.negatives} out-of-domain ones; held out, {t.expected_hit_rate:.1%} of FAQ "
                f"questions were answered from the cache with {t.expected_wrong_rate:.2%} wrong; "
                f"judge confidence >= {t.hit_confidence:.3f} (spoken transcripts >= "
                f"{t.spoken_confidence:.3f}), in-scope similarity >= "
                f"{t.min_similarity}; questions over {MAX_EMBEDDED_WORDS} words are judged on "
                f"their first {MAX_EMBEDDED_WORDS} or so (the embedder truncates)"
                + (f"\n{self.completeness.summary()}" if self.completeness else ""))


# all-MiniLM-L6-v2 reads at most 256 word pieces (~180 spoken words): the rest is unseen.
MAX_EMBEDDED_WORDS = 180


def seed(csv_path: str | Path, store: Store, render: Renderer, voice_id: str,
         target_wrong_rate: float = DEFAULT_TARGET_WRONG_RATE, progress: bool = True,
         embedder: Embedder | None = None, negatives: Sequence[str] = (),
         limit: NewAnswerLimit | None = None,
         cancel: threading.Event | None = None, jobs: int = 1) -> SeedReport:
    """Validate ``csv_path`` and publish it as the new current cache version of ``store``.
    ``jobs``: classifiers the calibration fits at once (``train_router``).

    Raises ``SeedValidationError`` (every bad row), ``TooManyNewAnswers``, ``SeedCancelled``
    or ``RenderError``; in each case the previously published version keeps serving.
    """
    plan = read_seed_csv(csv_path)
    return seed_plan(plan, store, render, voice_id, source=Path(csv_path).name,
                     target_wrong_rate=target_wrong_rate, progress=progress, embedder=embedder,
                     negatives=negatives, limit=limit, cancel=cancel, jobs=jobs)


def seed_plan(plan: SeedPlan, store: Store, render: Renderer, voice_id: str, *,
              source: str = "<rows>", target_wrong_rate: float = DEFAULT_TARGET_WRONG_RATE, progress: bool = True,
              embedder: Embedder | None = None, negatives: Sequence[str] = (),
              replaces: str | None | AnyVersion = ANY_VERSION,
              limit: NewAnswerLimit | None = None,
              cancel: threading.Event | None = None,
              on_progress: ProgressCallback | None = None, jobs: int = 1) -> SeedReport:
    """Publish an already validated plan (from ``parse_seed_csv`` or ``parse_seed_rows``):
    render the answers not yet in the store, calibrate, publish atomically.

    ``negatives``: the operator's own out-of-domain questions (beside the generic set).
    ``replaces``: the version the plan was built from; another one current at publish time
    raises ``StoreConflict`` (``Store.publish``). ``limit``: more new answers than it allows
    raise ``TooManyNewAnswers`` before any renders. ``cancel``: once set, the seed stops
    before its next answer, before calibrating or before publishing (``SeedCancelled``); a
    publish under way completes. ``on_progress``: told each phase and each answer rendered (``SeedProgress``).
    ``jobs``: classifiers the calibration fits at once (``train_router``; 1 inside a serving
    gateway, whose calls need the other cores).

    Raises ``RenderError``; the previously published version keeps serving.
    """
    tell = on_progress or _ignore_progress
    entries, rendered, reused = render_answers(plan, store, render, voice_id, progress,
                                               limit, cancel, tell)
    if cancel is not None and cancel.is_set():
        # Asked while it validated (nothing to render) or rendered its last answer: the
        # calibration (minutes for a large seed) would run only to be thrown away.
        raise SeedCancelled("seed cancelled before calibrating; nothing published")
    tell(SeedProgress("calibrating", rendered, rendered, reused))
    embedder = embedder or Embedder()
    trained = train_router(embedder, plan.questions, plan.intents, entries,
                           target_wrong_rate=target_wrong_rate, negatives=negatives,
                           jobs=jobs)
    if cancel is not None and cancel.is_set():  # calibration is not interruptible
        raise SeedCancelled("seed cancelled while calibrating; nothing published")
    thresholds = trained.router.thresholds
    manifest: dict[str, Any] = {
        "source": source,
        "voice_id": voice_id,
        "embedding_model": embedder.model_name,
        "thresholds": thresholds.as_json(),
        "negatives": list(negatives),  # the operator's own; the generic set ships with us
        "questions": [{"text": q, "intent": i} for q, i in zip(plan.questions, plan.intents)],
        "entries": [{"id": e.id, "intent": e.intent, "action": e.action.value, "answer": e.answer,
                     "questions": list(e.questions), "audio_key": e.audio_key}
                    for e in entries.values()],
    }
    tell(SeedProgress(PUBLISHING, rendered, rendered, reused))
    if cancel is not None and cancel.is_set():
        # Accepted just before the phase said "publishing" (the admin API refuses a cancel
        # from then on, under the lock ``tell`` takes): honoured, never accepted and ignored.
        raise SeedCancelled("seed cancelled before publishing; nothing published")
    version = store.publish(CacheBundle(manifest, trained.vectors,
                                        trained.router.models_bytes()), replaces)
    return SeedReport(version=version, entries=len(entries),
                      answer_entries=sum(e.action is Action.ANSWER for e in entries.values()),
                      questions=len(plan.questions), rendered=rendered, reused=reused,
                      thresholds=thresholds,
                      completeness=trained.router.completeness.report
                      if trained.router.completeness else None)


def render_answers(plan: SeedPlan, store: Store, render: Renderer, voice_id: str,
                   progress: bool = True, limit: NewAnswerLimit | None = None,
                   cancel: threading.Event | None = None,
                   on_progress: ProgressCallback | None = None
                   ) -> tuple[dict[str, Entry], int, int]:
    """Render each distinct answer of an `answer` entry not yet in the store; return entries
    with audio keys (None for an entry without one, or of another action).

    Over ``limit`` nothing renders (``TooManyNewAnswers``); once ``cancel`` is set, nothing
    more does (``SeedCancelled``: what rendered stays in the store for the next seed).
    ``on_progress`` is told the count once it is known and after each answer."""
    tell = on_progress or _ignore_progress
    # Only an `answer` entry's answer is ever played (an `llm` or `handoff` one goes to the
    # agent or a person, whatever its answer cell says): no other is rendered, billed by a
    # cloud voice and counted against ``limit``, for audio no caller hears.
    keyed = {eid: dataclasses.replace(e, audio_key=audio_key(e.answer, voice_id)
                                      if e.answer and e.action is Action.ANSWER else None)
             for eid, e in plan.entries.items()}
    todo: dict[str, str] = {}  # key -> answer text, each distinct answer once
    claimed: set[str] = set()  # keys reused, each distinct answer once too
    for entry in keyed.values():
        if entry.audio_key is None or entry.audio_key in todo or entry.audio_key in claimed:
            continue
        # Claimed, not just found: the clean-up after another publish spares audio a seed
        # is about to use, though no version names it until this one is published.
        if store.claim_audio(entry.audio_key):
            claimed.add(entry.audio_key)
        else:
            todo[entry.audio_key] = entry.answer or ""
    reused = len(claimed)
    if limit is not None and len(todo) > limit.most:
        raise TooManyNewAnswers(len(todo), reused, limit)
    tell(SeedProgress("rendering", 0, len(todo), reused))
    for done, (key, text) in enumerate(tqdm(todo.items(), total=len(todo),
                                            desc="rendering answers", unit="answer",
                                            disable=not progress)):
        if cancel is not None and cancel.is_set():
            raise SeedCancelled(f"seed cancelled after rendering {done:,} of {len(todo):,} new "
                                "answers; nothing published")
        store.put_audio(key, _checked_render(render, text))
        tell(SeedProgress("rendering", done + 1, len(todo), reused))
    return keyed, len(todo), reused


def _ignore_progress(progress: SeedProgress) -> None:
    pass


def _checked_render(render: Renderer, text: str) -> Audio:
    short = text if len(text) <= 60 else text[:57] + "..."
    try:
        pcm, sample_rate = render(text)
    except Exception as exc:
        raise RenderError(f"rendering answer {short!r} failed: {exc}") from exc
    if not isinstance(pcm, (bytes, bytearray)) or not pcm or len(pcm) % 2:
        raise RenderError(f"rendering answer {short!r} returned no 16-bit PCM")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise RenderError(f"rendering answer {short!r} returned sample rate {sample_rate!r}")
    return Audio(bytes(pcm), sample_rate)
