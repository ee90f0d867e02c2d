"""Publishing from the admin API: CSV uploads and single-entry edits.

Both go through ``cache_seed``'s validation and atomic publish, exactly like
``voicegate seed``: an upload is parsed as the CSV file it is; an entry edit
rebuilds the serving version's rows (from its manifest) with the change applied
and validates those rows as a CSV. Only answers whose text changed are rendered
(audio is content-addressed). Seeding is CPU-heavy, so it runs on a worker
thread; one seed at a time per process (an ``asyncio.Lock``), and the cache is
refreshed at once so the new version serves without waiting for the poll. The seed
under way can be cancelled (``Publisher.cancel``, DELETE /admin/seed): it stops before
its next answer, or before publishing, and publishes nothing; its phase and counts, then its
outcome, are kept for GET /admin/seed (``SeedStatus``). A shutdown cancels the seed under
way (``Publisher.shut_down``); its steps run on daemon threads (``off_loop``) that the
process's exit does not wait for. An entry
edit publishes only over the version it was built from: another replica's admin API
may have published meanwhile (one Redis behind a balancer), and a silent last-writer-
wins would drop that change, so the store refuses it (``StoreConflict``, a 409). An edit
while the store's current version cannot be loaded here is refused at once
(``CurrentUnloadable``, a 503): built on another version, it could never publish. A
version published but then not loaded here (``PublishedNotServed``, a 500) is reported as
such: the store names it, this replica keeps serving the one it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import unicodedata
from dataclasses import dataclass
from typing import (Any, Awaitable, Callable, Collection, Iterable, Mapping, Sequence,
                    TypeVar)

from cache_seed import (ProgressCallback, SeedCancelled, SeedPlan, SeedReport,
                        SeedValidationError, parse_seed_csv, parse_seed_rows, rows_from_manifest)
from cache_seed.validate import bad_intent_characters

from intents.store import (ANY_VERSION, AnyVersion, PublishUnconfirmed, StoreConflict,
                           StoreError, StoreUnavailable)
from intents.types import DEFAULT_TARGET_WRONG_RATE, entry_id_for

from .. import logs
from ..seeding import seed_plan_with_voice
from ..services import Services, off_loop
from .seed_status import (CANCELLED, CANCELLING, DELETE, ENTRY, FAILED, NO_SEED, PUBLISHED,
                          UNCONFIRMED, UPLOAD, SeedStatus)

log = logging.getLogger("voicegate.admin")
T = TypeVar("T")
E = TypeVar("E")  # an entry, as find_entry reads it


class SeedBusy(RuntimeError):
    """Another seed is running in this process."""


class EntryNotFound(KeyError):
    pass


class EntryExists(ValueError):
    """A new entry was asked for under an id the serving version already has."""


class BadEntry(ValueError):
    """The request body does not describe an entry (wrong types, missing id)."""


class CurrentUnloadable(StoreError):
    """The store's current version is not the one this replica serves, and cannot be
    loaded: an entry edit (built on the serving one) would be refused at the pointer."""


class PublishedNotServed(RuntimeError):
    """The publish happened (the store's current version is the new one) but this replica
    could not load it and serves the version it held: not a success, and not "nothing
    published" either, so the operator is told both."""

    def __init__(self, report: SeedReport, serving: str | None, cause: str) -> None:
        self.report = report
        self.serving = serving
        self.cause = cause
        super().__init__(
            f"version {report.version} was published, but this replica could not load it "
            f"({cause}); it keeps serving {serving or 'no version'} (/readyz cache_error) and "
            f"tries it again after 10 s, then less often while it keeps failing; other "
            f"replicas load {report.version} from the "
            "store as usual: if they fail too, fix the cause and seed again")


@dataclass(frozen=True)
class RowLabel:
    """What a row of a rebuilt seed stands for, to explain validation errors."""

    entry: str
    question: str
    changed: bool  # part of the requested change


def report_json(report: SeedReport) -> dict[str, Any]:
    return {"version": report.version, "entries": report.entries,
            "answer_entries": report.answer_entries, "questions": report.questions,
            "rendered": report.rendered, "reused": report.reused,
            "thresholds": report.thresholds.as_json(),
            "expected_hit_rate": report.expected_hit_rate, "summary": report.summary()}


class Publisher:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.lock = asyncio.Lock()
        services.seed_lock = self.lock  # a drain waits for the seed under way
        services.stop_seed = self.shut_down  # a shutdown cancels it
        self._cancel: threading.Event | None = None  # the running seed's, while it runs
        self._progress: ProgressCallback | None = None  # the same
        self.status = SeedStatus()

    def cancel(self) -> bool:
        """Ask the seed under way to stop before its next answer (or before calibrating, or
        once a calibration under way ends); False when no seed runs, or it is writing its
        version or has published (``cancel_seed`` says which)."""
        return self.cancel_seed()[0] == CANCELLING

    def cancel_seed(self) -> tuple[str, str | None]:
        """``SeedStatus.cancel``: CANCELLING, or why not (NO_SEED, WRITING, PUBLISHED with
        the version)."""
        if self._cancel is None:
            return NO_SEED, None
        return self.status.cancel()

    async def shut_down(self, timeout_s: float) -> None:
        """The replica shuts down (``Services.aclose``) with a seed still under way, past the
        drain that waited for it: cancel it (as DELETE /admin/seed does) and wait up to
        ``timeout_s`` for it to end. An answer rendering or a calibration may take minutes
        more: its thread (``off_loop``) is left to the process's exit, and a publish it had
        begun is whole or absent (the store moves its pointer last). Logged for the operator
        (``seed_cancelled_at_shutdown``), who runs the seed again."""
        if not self.lock.locked():
            return
        run = self.status.snapshot()
        self.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async with self.lock:  # free once the seed's task ends (nothing queues on it)
                    pass
        last = None if self.lock.locked() else self.status.snapshot()["last"]
        published = last["version"] if last is not None else self.published_under_way
        if published is not None:  # published before the cancel: nothing to run again
            logs.event(log, "seed_published_at_shutdown", kind=run.get("kind"),
                       source=run.get("source"), version=published)
            return
        if last is not None and last["outcome"] == UNCONFIRMED:  # not "nothing published"
            logs.event(log, "seed_unconfirmed_at_shutdown", logging.WARNING,
                       kind=run.get("kind"), source=run.get("source"), error=last["error"])
            return
        logs.event(log, "seed_cancelled_at_shutdown", logging.WARNING, kind=run.get("kind"),
                   source=run.get("source"), phase=(last or run).get("phase"),
                   ended=last is not None, error=last["error"] if last else None,
                   detail="the replica shut down during this seed: nothing was published"
                          + ("" if last else " (unless its publish had begun: the store's "
                             "current version is then this seed's, whole)")
                          + ", the previous version keeps serving; seed again")

    @property
    def published_under_way(self) -> str | None:
        """The version the seed under way has already published (this replica loading it
        now), None before that: there is nothing left to cancel."""
        return self.status.publishing_done()

    # ------------------------------------------------------------------ helpers

    def _claim(self) -> None:
        if self.lock.locked():
            raise SeedBusy("another seed is running; try again when it has finished")

    async def _seed(self, kind: str, source: str, seeding: Callable[[], Awaitable[T]]) -> T:
        """Run ``seeding`` as this process's one seed (``SeedBusy`` for another),
        cancellable while it runs; its progress and outcome go to ``status``.

        The seed is a task of its own that the request waits for. Its worker thread cannot
        be stopped, so a request cancelled meanwhile (the server shutting down past its
        grace, a client gone behind a proxy that cancels) asks the seed to stop, as
        DELETE /admin/seed does, and still waits for it to end: the lock is never free
        while a seed's thread runs, and the status records how it really ended."""
        self._claim()
        await self.lock.acquire()  # free after _claim: taken without yielding to another
        cancel = threading.Event()
        # Cancellable and shown running from now, not from the task's first step: other
        # requests run in between (a second upload already finds the lock taken).
        self._cancel = cancel
        self._progress = self.status.start(kind, source, cancel)
        seed = asyncio.ensure_future(self._run_seed(cancel, seeding))
        try:
            return await asyncio.shield(seed)
        except asyncio.CancelledError:
            if seed.done():
                raise
            cancel.set()
            while not seed.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([seed])
            if not seed.cancelled():
                seed.exception()  # its outcome is in the status; the request is gone
            raise

    async def _run_seed(self, cancel: threading.Event,
                        seeding: Callable[[], Awaitable[T]]) -> T:
        """The seed's task (``_seed``): holds the lock, taken for it, until it ends."""
        try:
            result = await seeding()
        except SeedCancelled as exc:
            self.status.end(CANCELLED, str(exc))
            raise
        except PublishUnconfirmed as exc:  # not "failed": that reads as nothing published
            self.status.end(UNCONFIRMED, str(exc))
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the loop is closing: stop it soon
                cancel.set()
            self.status.end(FAILED, _failure(exc))
            raise
        else:
            self.status.end(PUBLISHED)
            return result
        finally:
            self._cancel = self._progress = None
            self.lock.release()

    def _serving_manifest(self) -> tuple[str | None, dict[str, Any]]:
        """(version, manifest) of the version this replica serves (empty when none). Blocking."""
        cache = self.services.cache
        assert cache is not None
        version = cache.version
        if version is None:
            return None, {"entries": [], "questions": []}
        _, bundle = cache.store.read(version)
        return version, bundle.manifest

    def _edit_base(self) -> tuple[str | None, dict[str, Any]]:
        """Refresh, then (version, manifest) to build an entry edit on: the store's current
        version, loaded. Raises ``CurrentUnloadable`` when it cannot be loaded. Blocking."""
        cache = self.services.cache
        assert cache is not None
        cache.refresh()
        if cache.failed_for_store:
            # The store did not answer while the current version was read: a moment's
            # trouble (its retry is the next refresh), never a reason to replace it.
            cache.refresh()
            if cache.failed_for_store:
                raise StoreUnavailable("the store did not answer while the current cache "
                                       "version was read: retry the request")
        error = cache.last_error
        if error is not None:
            current = cache.store.current_version()
            if current != cache.version:
                raise CurrentUnloadable(
                    f"entries cannot be edited while the current cache version cannot be "
                    f"loaded ({error}): seed a whole CSV (POST /admin/seed or `voicegate "
                    f"seed`) to replace it")
        return self._serving_manifest()

    def _target_wrong_rate(self, manifest: Mapping[str, Any]) -> float:
        thresholds = manifest.get("thresholds") or {}
        return float(thresholds.get("target_wrong_rate", DEFAULT_TARGET_WRONG_RATE))

    async def _publish(self, plan: SeedPlan, source: str, target_wrong_rate: float,
                       negatives: Sequence[str],
                       replaces: str | None | AnyVersion = ANY_VERSION) -> SeedReport:
        """Publish ``plan`` with the serving version's own ``negatives``; with ``replaces``,
        only over that version (else ``StoreConflict``)."""
        services = self.services
        runtime = services.runtime
        cache = services.cache
        assert cache is not None
        self.status.named(source)
        # The voice renders on this (the serving) loop, from the seeding thread.
        report = await off_loop(seed_plan_with_voice, plan, cache.store, runtime.tts,
                                 runtime.embedder, source, target_wrong_rate,
                                 asyncio.get_running_loop(),
                                 tuple(negatives), replaces,
                                 services.settings.seed_max_new_answers, self._cancel,
                                 self._progress)
        self.status.published(report.version)
        await off_loop(cache.refresh)
        # Ours failed to load here. Not another version's failure (a newer publish from
        # another replica that does not load here is no failure of this one), nor the store
        # unreachable for the refresh (the poll loads ours when it answers again).
        if cache.version != report.version and cache.failed_version == report.version \
                and not cache.failed_for_store:
            raise PublishedNotServed(report, cache.version, cache.last_error or "")
        return report

    # ------------------------------------------------------------------ uploads

    async def seed_csv(self, data: bytes, source: str,
                       target_wrong_rate: float | None = None) -> SeedReport:
        """Validate and publish a CSV upload. Raises SeedBusy, SeedValidationError, SeedError.

        The wrong-answer target defaults to the serving version's (the CLI's 1 % when none)."""
        return await self._seed(UPLOAD, source, functools.partial(
            self._seed_csv, data, source, target_wrong_rate))

    async def _seed_csv(self, data: bytes, source: str,
                        target_wrong_rate: float | None) -> SeedReport:
        plan = await off_loop(parse_seed_csv, data, source)
        target, negatives, replaces = await off_loop(self._upload_defaults)
        if target_wrong_rate is None:
            target_wrong_rate = target
        try:
            return await self._publish(plan, source, target_wrong_rate, negatives, replaces)
        except StoreConflict as exc:
            raise StoreConflict(
                f"{exc}: published while this upload ran (an entry edit, a promotion or a "
                "seed on another replica, or `voicegate seed`), and an upload replaces only "
                "the version current when it began; look at what serves (GET /admin/entries) "
                "before uploading again") from exc

    def _upload_defaults(self) -> tuple[float, tuple[str, ...], str | None | AnyVersion]:
        """The target and the operator's own negatives of the version an upload replaces:
        the store's current one, whether this replica serves it, is behind it (another
        replica, the CLI, published since its last poll) or cannot load it (an answer's
        audio lost). Memory's copy when the store lost it (Redis restarted empty, a wiped
        directory: what a reseed repairs) or holds one that cannot be read; the CLI's default (1%) when
        there is none. ``StoreUnavailable`` when the store does not answer. Blocking.

        Third, what the upload's publish replaces: the store's current version as read now
        (an edit another replica publishes while this seed calibrates is not silently
        undone: ``StoreConflict``), or any version when the pointer cannot be read (a
        whole seed is what repairs it)."""
        cache = self.services.cache
        assert cache is not None
        loaded = cache.loaded
        replaces: str | None | AnyVersion = ANY_VERSION
        try:
            current = replaces = cache.store.current_version()
            if current is not None and (loaded is None or current != loaded.version):
                _, bundle = cache.store.read(current)
                return (self._target_wrong_rate(bundle.manifest),
                        tuple(bundle.manifest.get("negatives") or ()), current)
        except StoreUnavailable as exc:
            # Memory's copy may be behind the store's (the CLI or another replica published
            # since the last poll): the store answering again for the publish would replace
            # the operator's negatives and target with it, unsaid.
            raise StoreUnavailable(f"the store did not answer while the current version's "
                                   f"wrong-answer target and negatives were read, to keep "
                                   f"them ({exc}): retry the upload") from exc
        except StoreError:
            pass  # not readable as a version (what a reseed repairs): memory's copy
        if loaded is not None:
            return loaded.thresholds.target_wrong_rate, tuple(loaded.negatives), replaces
        return DEFAULT_TARGET_WRONG_RATE, (), replaces

    # ------------------------------------------------------------------ entries

    async def upsert_entry(self, body: Mapping[str, Any], create_only: bool = False,
                           kind: str = ENTRY) -> tuple[SeedReport, str, bool]:
        """Add or replace one entry; returns (report, entry id, created). With
        ``create_only`` an id the serving version has is refused (``EntryExists``).
        ``kind`` is what GET /admin/seed calls it (``PROMOTE`` for a promoted miss)."""
        entry_id, answer, action, questions = _entry_fields(body)
        return await self._seed(kind, f"admin: entry {entry_id}", functools.partial(
            self._upsert_entry, entry_id, answer, action, questions, create_only))

    async def _upsert_entry(self, entry_id: str, answer: Any, action: Any, questions: Any,
                            create_only: bool) -> tuple[SeedReport, str, bool]:
        base, manifest = await off_loop(self._edit_base)
        existing = _find_entry(manifest, entry_id)
        if existing is not None and create_only:
            raise EntryExists(f"entry {entry_id!r} already exists; choose a new id (or "
                              "edit that entry with POST /admin/entries)")
        if existing is not None:  # addressed by its id or its intent name
            entry_id = existing["intent"]
        if existing is None and questions is _KEEP:
            raise BadEntry("a new entry needs 'questions': a non-empty list of questions")
        if existing is not None:
            answer = existing.get("answer") if answer is _KEEP else answer
            action = existing.get("action") if action is _KEEP else action
            if questions is _KEEP:
                questions = list(existing["questions"])
        elif answer is _KEEP:
            answer = None
        if action is _KEEP:
            action = None
        changed = [{"question": q, "answer": answer or "", "intent": entry_id,
                    "action": action or ""} for q in questions]
        plan = await off_loop(_rebuilt_plan, manifest, entry_id, changed, f"entry {entry_id}")
        report = await self._publish(plan, f"admin: entry {entry_id}",
                                     self._target_wrong_rate(manifest),
                                     manifest.get("negatives") or (), base)
        return report, entry_id_for(entry_id), existing is None

    async def delete_entry(self, entry_id: str) -> SeedReport:
        return await self._seed(DELETE, f"admin: delete {entry_id}",
                                functools.partial(self._delete_entry, entry_id))

    async def _delete_entry(self, entry_id: str) -> SeedReport:
        base, manifest = await off_loop(self._edit_base)
        existing = _find_entry(manifest, entry_id)
        if existing is None:
            raise EntryNotFound(entry_id)
        entry_id = existing["intent"]
        plan = await off_loop(_rebuilt_plan, manifest, entry_id, [],
                              f"without entry {entry_id}")
        return await self._publish(plan, f"admin: delete {entry_id}",
                                   self._target_wrong_rate(manifest),
                                   manifest.get("negatives") or (), base)


# Bad rows GET /admin/seed's ``last.error`` shows. It is kept until the next seed and sent on
# every poll (the dashboard's: each 3 s): a file of 4 MB whose every row was bad kept its whole
# listing there, over 100 MB JSON-encoded on the serving loop per poll. The upload's own
# answer lists every row.
FAILED_ROWS_SHOWN = 5


def _failure(exc: BaseException) -> str:
    """Why a seed ended without publishing (or unserved), for GET /admin/seed's ``last``."""
    if isinstance(exc, EntryNotFound):  # a KeyError: its str() is the quoted id alone
        return f"no entry {exc.args[0]!r} in the serving cache version"
    if isinstance(exc, SeedValidationError) and len(exc.errors) > FAILED_ROWS_SHOWN:
        shown = "\n".join(f"  {e}" for e in exc.errors[:FAILED_ROWS_SHOWN])
        return (f"{exc.source}: {len(exc.errors)} bad row(s), nothing published:\n{shown}\n"
                f"  ... and {len(exc.errors) - FAILED_ROWS_SHOWN} more (the upload's answer "
                "listed up to 1000)")
    return str(exc) or type(exc).__name__


def find_entry(entries: Iterable[E], name: str,
               names: Callable[[E], tuple[str, str]]) -> E | None:
    """The first of ``entries`` whose id (as in URLs) or intent name is ``name``: how GET and
    DELETE /admin/entries/{id} and POST /admin/entries find an entry. ``names`` gives an
    entry's (id, intent)."""
    return next((e for e in entries if name in names(e)), None)


def _find_entry(manifest: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The manifest entry whose id (as in URLs) or intent name is ``name``."""
    return find_entry(manifest["entries"], name, lambda e: (e["id"], e["intent"]))


class _Keep:
    def __repr__(self) -> str:
        return "<keep>"


_KEEP: Any = _Keep()  # a field the request did not give: keep the entry's current value


class LabelledValidationError(ValueError):
    """Validation errors of rebuilt rows, each tied to the entry and question it came from."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} validation error(s), nothing published")


def _rebuilt_plan(manifest: Mapping[str, Any], entry_id: str,
                  changed: list[dict[str, str]], source: str) -> SeedPlan:
    """The version's rows with entry ``entry_id``'s replaced by ``changed`` (none: deleted),
    validated. Blocking: a version of tens of thousands of questions takes a tenth of a
    second and more to rebuild, which on the serving loop every call would wait out."""
    kept = [row for row in rows_from_manifest(manifest) if row["intent"] != entry_id]
    if not changed and not kept:  # parse_seed_rows would say "no rows after the header": whose?
        raise LabelledValidationError([{
            "line": None, "entry": entry_id, "question": None, "changed": True,
            "reason": f"{entry_id!r} is the only entry: a version keeps at least one; "
                      "publish a new seed (POST /admin/seed) to replace it"}])
    labels = [RowLabel(entry_id, r["question"], True) for r in changed] + \
             [RowLabel(r["intent"], r["question"], False) for r in kept]
    # The other entries' rows serve as published: a rule added since (an upgrade) does not
    # refuse them, or no entry could be edited until a whole new seed.
    published = range(len(changed), len(changed) + len(kept))
    return _parse_labelled(changed + kept, labels, source, published)


def _parse_labelled(rows: Sequence[Mapping[str, str]], labels: Sequence[RowLabel],
                    source: str, published: Collection[int] = ()) -> SeedPlan:
    try:
        return parse_seed_rows(rows, source=source, published=published)
    except SeedValidationError as exc:
        errors = []
        for err in exc.errors:
            index = err.line - 2  # parse_seed_rows: row i is line i + 2
            label = labels[index] if 0 <= index < len(labels) else None
            errors.append({"line": err.line, "reason": err.reason,
                           "entry": label.entry if label else None,
                           "question": label.question if label else None,
                           "changed": label.changed if label else False})
        raise LabelledValidationError(errors) from exc


def _entry_fields(body: Mapping[str, Any]) -> tuple[str, Any, Any, Any]:
    if not isinstance(body, Mapping):
        raise BadEntry("the body must be a JSON object")
    known = {"id", "intent", "answer", "action", "questions"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadEntry(f"unknown field(s): {', '.join(unknown)} "
                       f"(expected {', '.join(sorted(known))})")
    entry_id, intent = body.get("id"), body.get("intent")
    for name, value in (("id", entry_id), ("intent", intent)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise BadEntry(f"'{name}' must be a non-empty string")
        if value is not None and any(c.isspace() and c != " " for c in value.strip()):
            # A tab or line break inside a name is refused, as the seed CSV refuses it, not
            # collapsed into a space: the rows collapse whitespace, so their own check (the
            # one other control characters meet) never sees it.
            raise BadEntry(bad_intent_characters(value.strip()))
    # Whitespace and Unicode form as the seed stores the name ("Card  lost" is published as
    # "Card lost", an NFD "é" as NFC): the entry is found, and answered, under the name it is
    # published with.
    entry_id, intent = (unicodedata.normalize("NFC", " ".join(v.split()))
                        if isinstance(v, str) else v for v in (entry_id, intent))
    # Both given: one entry, as GET /admin/entries lists it, its intent name beside its id,
    # which for a name not safe in a URL ("Card lost") is a slug and a hash of it
    # (entry_id_for); only an id that is neither the name nor the name's id is another entry.
    if entry_id and intent and entry_id not in (intent, entry_id_for(intent)):
        raise BadEntry(f"'id' {entry_id[:80]!r} and 'intent' {intent[:80]!r} name different "
                       f"entries (the id of intent {intent[:80]!r} is "
                       f"{entry_id_for(intent)!r}): give one, or both as GET /admin/entries "
                       "lists them")
    name = intent or entry_id or ""
    if not name:
        raise BadEntry("give the entry's 'intent' (or 'id')")
    answer = body["answer"] if "answer" in body else _KEEP
    if answer is not _KEEP and answer is not None and not isinstance(answer, str):
        raise BadEntry("'answer' must be a string or null")
    if isinstance(answer, str) and not answer.strip():
        # The rows collapse it to no answer: a new entry was published as an agent (llm)
        # entry, 201, and an edit told "no row of intent ... has one".
        raise BadEntry("'answer' is blank: give the text the cache plays, or null for an "
                       "entry without an answer (action llm or handoff)")
    action = body["action"] if "action" in body else _KEEP
    if action is not _KEEP and action is not None and not isinstance(action, str):
        raise BadEntry("'action' must be one of answer, llm, handoff")
    # Given questions replace the entry's; none would leave no entry (that is a DELETE), so
    # [] is refused, never read as "keep them" (it was: the old ones stayed, silently).
    questions = body["questions"] if "questions" in body else _KEEP
    if questions is not _KEEP:
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise BadEntry("'questions' must be a list of strings")
        if not questions:
            raise BadEntry("'questions' is empty: an entry keeps at least one question (leave "
                           "'questions' out to keep its questions; DELETE "
                           "/admin/entries/{id} removes the entry)")
    return name, answer, action, questions
