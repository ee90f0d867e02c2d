"""Where published cache versions and rendered audio live.

``Store`` is the interface; ``LocalStore`` (a directory, nothing to start) is the
embedded default, and ``intents.redis_store.RedisStore`` the shared one, with the same
guarantees.

Publishing is atomic: a version is written completely under a temporary name,
renamed into place, and only then does the ``CURRENT`` pointer move (``os.replace``,
atomic on POSIX). A reader resolves ``CURRENT`` once and reads that version, so it
never sees half a seed, and a seed that fails before the swap leaves the previous
version serving. It is durable too: each file is fsynced before its rename, and each rename
that publishes is followed by an fsync of its directory (an answer's audio and the version's
directory before the pointer moves, the pointer's after), so a power cut cannot leave
``CURRENT`` naming a version or audio that the disk lost. Whatever stops a publish (a
refusal, an error, Ctrl-C) removes what it created; the temporary directories of a
publishing process that died are swept by a later publish (``LocalStore._sweep_staging``).
Audio is content-addressed (``audio_key``), outside versions, so a re-seed renders only
answers whose text or voice changed.

Nothing else ever frees a store (Redis runs with noeviction), so after each publish
the store keeps the current version and the newest ``keep_versions`` published ones,
deletes the rest, and deletes audio that none of the kept versions names once no seed
has written or reused it (``claim_audio``) for ``audio_grace_s``: a seed between its
rendering and its publish has no version naming its audio yet. Should the grace be too
short for a seed, its publish is refused (the pointer never names a version whose audio
is gone) rather than served broken. The same clean-up deletes the temporary files
(``.<name>.<hex>.tmp``) of audio or pointer writes whose process died before the rename, once
they are older than that grace. A clean-up that fails is logged and counted, never a failed
publish.

Layout of a ``LocalStore``::

    CURRENT                      name of the serving version
    versions/<version>/manifest.json, vectors.npy, classifier.joblib
                                 (the directory's mtime: when it was published)
    versions/.staging-<version>/ a version being written (locked by its publish)
    audio/<sha256>.wav           16-bit mono PCM answers (mtime: when a seed last wrote
                                 or reused it)
    .CURRENT.<hex>.tmp, audio/.<sha256>.wav.<hex>.tmp
                                 a write in progress (renamed into place when complete)
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
import wave
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from intents.types import Audio

# 2: the router's models blob holds the classifier and the judge (intents.router).
MANIFEST_FORMAT = 2

# Retention after a publish (gateway settings cache_versions_kept, cache_audio_grace_s).
KEEP_VERSIONS = 10
AUDIO_GRACE_S = 3600.0
# A ``.staging-*`` directory no publish holds is deleted once it is this old (LocalStore).
STAGING_STALE_S = 3600.0

log = logging.getLogger("voicegate.store")


class StoreError(RuntimeError):
    """The store is empty, unreadable or inconsistent."""


class StoreUnavailable(StoreError):
    """The store did not answer (a lost connection, a timeout, a server error): the same
    request may succeed as it is once the store is back; what it asked for is not at fault."""


class StoreStarting(StoreUnavailable):
    """The store answers but is still starting (Redis LOADING its dataset after a restart or
    a replica's sync): not ready yet, nothing it holds is at fault; retried as an outage is."""


class StoreConflict(StoreError):
    """A publish that was to replace one version found another current (a second
    publisher got there first): nothing was published."""


class PublishUnconfirmed(StoreError):
    """The pointer swap was sent but never answered, and the store could not be asked
    afterwards: the version may still become current (a swap the network delivers late).
    Neither "published" nor "nothing published" is known; the message says how to tell."""


class AnyVersion:
    def __repr__(self) -> str:
        return "ANY_VERSION"


# ``publish(..., replaces=ANY_VERSION)``: replace whatever is current (a whole new seed).
ANY_VERSION = AnyVersion()


def audio_key(text: str, voice_id: str) -> str:
    """Content hash naming an answer's audio: same text and voice → same audio."""
    return hashlib.sha256(f"{voice_id}\n{text}".encode("utf-8")).hexdigest()


def referenced_audio(manifest: Any) -> set[str] | None:
    """The audio keys a version's manifest names (its entries' answers); None when the
    manifest does not list its entries, so what it uses is unknown."""
    entries = manifest.get("entries") if isinstance(manifest, Mapping) else None
    if not isinstance(entries, list):
        return None
    return {e["audio_key"] for e in entries
            if isinstance(e, Mapping) and isinstance(e.get("audio_key"), str) and e["audio_key"]}


def kept_versions(newest_first: Iterable[str], current: str | None, keep: int) -> set[str]:
    """The versions a clean-up keeps: the newest ``keep`` and the current one, whatever its
    age (a publisher's clock may run ahead of another's)."""
    kept = set(list(newest_first)[:keep])
    if current is not None:
        kept.add(current)
    return kept


@dataclass(frozen=True)
class CacheBundle:
    """Everything one published cache version consists of (audio aside)."""

    manifest: dict[str, Any]  # JSON: entries, questions, thresholds, model names
    vectors: np.ndarray  # (questions, dim) float32
    classifier: bytes  # the router's models (intents.router.models_to_bytes)


class Store(ABC):
    # Called (from the publishing thread) when a publish succeeded but its clean-up failed:
    # the gateway counts it. The failure is logged and counted in ``cleanup_failures``.
    on_cleanup_failed: Callable[[], None] | None = None
    cleanup_failures: int = 0

    # -- audio, content-addressed --------------------------------------------
    @abstractmethod
    def has_audio(self, key: str) -> bool: ...

    @abstractmethod
    def claim_audio(self, key: str) -> bool:
        """Whether the audio is stored (whole: a local WAV cut short is not, and is rendered
        again); if it is, a seed is about to use it: the clean-up after another publish
        spares it for the grace period (no version names it yet)."""

    @abstractmethod
    def get_audio(self, key: str) -> Audio: ...

    @abstractmethod
    def put_audio(self, key: str, audio: Audio) -> None: ...

    # -- cache versions ---------------------------------------------------------
    @abstractmethod
    def publish(self, bundle: CacheBundle,
                replaces: str | None | AnyVersion = ANY_VERSION) -> str:
        """Store a complete version and make it the current one; return its name.

        ``replaces``: the version the bundle was built from (None: no version yet). If
        another is current when the pointer would move, nothing is published and
        ``StoreConflict`` is raised: an edit built on an older version never silently
        drops a change published meanwhile (two replicas' admin APIs, one Redis)."""

    @abstractmethod
    def current_version(self) -> str | None:
        """Name of the serving version, None when nothing was ever published."""

    @abstractmethod
    def read(self, version: str | None = None) -> tuple[str, CacheBundle]:
        """(name, bundle) of ``version``, default the current one."""

    def _clean_up_quietly(self, published: str, clean_up: Callable[[], None]) -> None:
        """Run a publish's clean-up; a failure is logged and counted, never raised: the
        version is published, and the next publish tries the clean-up again."""
        try:
            clean_up()
        except Exception as exc:
            self.cleanup_failures += 1
            log.warning("cache_cleanup_failed version=%s error=%s: %s", published,
                        type(exc).__name__, exc)
            try:
                if self.on_cleanup_failed is not None:
                    self.on_cleanup_failed()
            except Exception:  # counting it must not fail the publish either
                log.exception("cache_cleanup_count_failed version=%s", published)


_AUDIO_FILE = re.compile(r"[0-9a-f]{64}\.wav")
# ``_atomic_write``'s temporary file for ``target`` (``_temporary_path``).
_TEMPORARY_FILE = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.tmp")


class LocalStore(Store):
    def __init__(self, root: str | Path, *, keep_versions: int = KEEP_VERSIONS,
                 audio_grace_s: float = AUDIO_GRACE_S,
                 clock: Callable[[], float] = time.time) -> None:
        if keep_versions < 1 or audio_grace_s <= 0:
            raise ValueError("keep_versions must be at least 1 and audio_grace_s positive")
        self.root = Path(root)
        self._versions = self.root / "versions"
        self._audio = self.root / "audio"
        self._pointer = self.root / "CURRENT"
        self.keep_versions = keep_versions
        self.audio_grace_s = audio_grace_s
        self._clock = clock  # publish times and audio ages (a test's clock)

    # -- audio -------------------------------------------------------------------
    def _audio_path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise StoreError(f"not an audio key: {key!r}")
        return self._audio / f"{key}.wav"

    def has_audio(self, key: str) -> bool:
        return self._audio_path(key).is_file()

    def claim_audio(self, key: str) -> bool:
        path = self._audio_path(key)
        try:
            if not _whole_wav(path):
                # Reused, it would be published again by every seed, each version failing
                # to load ("cut short"): rendered again instead, the file replaced whole.
                log.warning("cache_audio_torn path=%s (shorter than its header says: "
                            "rendered again)", path)
                return False
            self._stamp(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _write_failed(path, exc) from exc
        return True

    def _stamp(self, path: Path) -> None:
        """Date a file or directory by this store's clock (its age for the clean-up)."""
        now = self._clock()
        os.utime(path, (now, now))

    def get_audio(self, key: str) -> Audio:
        path = self._audio_path(key)
        try:
            with wave.open(str(path), "rb") as wav:
                if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                    raise StoreError(f"{path}: not 16-bit mono")
                pcm = wav.readframes(wav.getnframes())
                if len(pcm) != 2 * wav.getnframes():
                    # The wave module reads what is there: a file that lost its tail on a
                    # sample boundary would be served cut off mid-word, never said.
                    raise StoreError(f"{path}: cut short ({len(pcm) // 2:,} of its "
                                     f"{wav.getnframes():,} samples)")
                return Audio(pcm, wav.getframerate())
        except (*_NOT_THERE, wave.Error, EOFError) as exc:  # missing or torn: a bad version
            raise StoreError(f"cannot read audio {path}: {exc}") from exc
        except OSError as exc:
            raise _disk_unavailable(f"audio {path}", exc) from exc

    def put_audio(self, key: str, audio: Audio) -> None:
        if len(audio.pcm) % 2:
            raise ValueError("16-bit PCM must have an even number of bytes")
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(audio.sample_rate)
            wav.writeframes(audio.pcm)
        path = self._audio_path(key)
        try:
            _make_directory(self._audio)
            _atomic_write(path, buffer.getvalue())
            _sync_directory(self._audio)  # its rename: a version may name it once we return
            self._stamp(path)
        except OSError as exc:  # e.g. the disk is full: a StoreError, as reads are
            raise _write_failed(path, exc) from exc

    # -- versions ------------------------------------------------------------------
    def publish(self, bundle: CacheBundle,
                replaces: str | None | AnyVersion = ANY_VERSION) -> str:
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        staging = self._versions / f".staging-{version}"
        final = self._versions / version
        self._sweep_staging()
        created = renamed = False
        held: int | None = None  # the staging directory, locked while this publish owns it
        try:
            try:
                _make_directory(self._versions)
                staging.mkdir()
                created = True
                held = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(held, fcntl.LOCK_SH)  # _sweep_staging: "a publish owns this"
                manifest = dict(bundle.manifest, format=MANIFEST_FORMAT, version=version)
                _write_synced(staging / "manifest.json",
                              json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
                vectors = io.BytesIO()
                np.save(vectors, np.ascontiguousarray(bundle.vectors, dtype=np.float32))
                _write_synced(staging / "vectors.npy", vectors.getvalue())
                _write_synced(staging / "classifier.joblib", bundle.classifier)
                os.fsync(held)  # the files' names, before the directory is renamed
            except OSError as exc:
                raise _write_failed(final, exc) from exc
            # The only step readers can observe: the pointer now names a complete version.
            # Checked and moved under a lock, so two publishing processes cannot interleave;
            # the version enters versions/ under it too, so a clean-up never meets one in
            # flight.
            try:
                with open(self.root / ".publish.lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    # Read only to check ``replaces``: a whole seed replaces whatever the
                    # pointer holds, one that cannot be read included (edited by hand; its
                    # error advises seeding again), as the Redis store's swap does.
                    if replaces is not ANY_VERSION:
                        current = self.current_version()
                        if current != replaces:
                            raise StoreConflict(conflict_message(replaces, current))
                    missing = sorted(k for k in referenced_audio(manifest) or ()
                                     if not self.has_audio(k))
                    if missing:
                        raise StoreError(missing_audio_message(version, missing))
                    os.rename(staging, final)
                    renamed = True
                    _sync_directory(self._versions)  # on disk before the pointer names it
                    self._stamp(final)  # its publish time, for the clean-up
                    _atomic_write(self._pointer, (version + "\n").encode("ascii"))
                    self._sync_pointer(version)
                    self._clean_up_quietly(version, self._clean_up)
            except OSError as exc:  # the pointer did not move (os.replace is all or nothing)
                raise _write_failed(self._pointer, exc) from exc
        except BaseException:
            # Whatever failed or interrupted it (a refusal, a full disk, Ctrl-C), this publish
            # removes what it created, and only that: never a directory of the same name it
            # did not create, never the version the pointer names.
            if created and not renamed:
                shutil.rmtree(staging, ignore_errors=True)
            if renamed and not self._names(version):
                shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            if held is not None:
                os.close(held)
        return version

    def _sync_pointer(self, version: str) -> None:
        """Make the pointer's rename durable. A failure is logged, not raised: the pointer
        has moved and readers serve ``version``, so "nothing published" would be false."""
        try:
            _sync_directory(self.root)
        except OSError as exc:
            log.error("cache_pointer_not_durable version=%s error=%s: %s (a power cut may "
                      "undo this publish)", version, type(exc).__name__, exc)

    def _names(self, version: str) -> bool:
        """Whether the pointer names ``version``; True when it cannot be read (unknown: keep)."""
        try:
            return self.current_version() == version
        except Exception:
            return True

    def _sweep_staging(self) -> None:
        """Delete ``.staging-*`` directories a publish left when its process died (a crash, a
        kill, a power cut: no ``finally`` ran). One is deleted only when it is older than
        ``STAGING_STALE_S`` *and* no process holds its lock: a publish holds it from creating
        the directory until it is renamed into place, and the kernel drops it when the
        process dies, so a running seed's staging directory is never taken from under it,
        however long it waits; the age is the margin for file systems whose locks do not
        reach other hosts (NFS), where a fresh directory may belong to a running seed
        elsewhere. Never the published versions or the pointer. Never fails the publish."""
        try:
            candidates = [p for p in self._versions.iterdir() if p.name.startswith(".staging-")]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cache_staging_sweep_failed dir=%s error=%s: %s", self._versions,
                        type(exc).__name__, exc)
            return
        cutoff = self._clock() - STAGING_STALE_S
        for path in candidates:
            try:
                info = os.lstat(path)
                if not stat.S_ISDIR(info.st_mode) or info.st_mtime >= cutoff:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue  # gone meanwhile, or not ours to open
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a publish still owns it
                shutil.rmtree(path)
                log.info("cache_staging_swept dir=%s (left by a publish that did not finish)",
                         path)
            except OSError as exc:
                log.warning("cache_staging_sweep_failed dir=%s error=%s: %s", path,
                            type(exc).__name__, exc)
            finally:
                os.close(fd)

    def _clean_up(self) -> None:
        """Under the publish lock: delete versions beyond the kept ones, then audio none of
        them names that no seed wrote or reused within the grace period, then temporary files
        older than the grace (``_sweep_temporaries``)."""
        current = self.current_version()
        by_age = sorted(((p.stat().st_mtime, p.name) for p in self._versions.iterdir()
                         if p.is_dir() and not p.name.startswith(".")), reverse=True)
        kept = kept_versions((name for _, name in by_age), current, self.keep_versions)
        for _, name in by_age:
            if name not in kept:
                shutil.rmtree(self._versions / name)
        used: set[str] = set()
        for name in kept:
            try:
                manifest = json.loads((self._versions / name / "manifest.json")
                                      .read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StoreError(f"cannot read cache version {name}'s manifest ({exc}): its "
                                 "audio is unknown, so no audio was deleted") from exc
            keys = referenced_audio(manifest)
            if keys is None:
                raise StoreError(f"cache version {name} lists no entries: its audio is "
                                 "unknown, so no audio was deleted")
            used |= keys
        cutoff = self._clock() - self.audio_grace_s
        if self._audio.is_dir():
            for path in self._audio.iterdir():
                if _AUDIO_FILE.fullmatch(path.name) and path.stem not in used \
                        and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
        self._sweep_temporaries(cutoff)

    def _sweep_temporaries(self, cutoff: float) -> None:
        """Delete the temporary files of ``_atomic_write`` (``.<name>.<hex>.tmp`` beside an
        audio file or the pointer) that a process killed between the write and the rename
        left, once last written before ``cutoff`` (the audio grace ago): a seed in another
        process writes its audio outside the publish lock, and is about to rename a recent one.
        Only regular files named exactly as ``_atomic_write`` names them for this store's
        files, nothing else, however old."""
        removed = 0
        for directory, target in ((self.root, lambda name: name == self._pointer.name),
                                  (self._audio, _AUDIO_FILE.fullmatch)):
            try:
                paths = list(directory.iterdir())
            except FileNotFoundError:
                continue
            for path in paths:
                found = _TEMPORARY_FILE.fullmatch(path.name)
                if found is None or not target(found["target"]):
                    continue
                try:
                    info = os.lstat(path)
                    if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue  # renamed into place meanwhile
                removed += 1
        if removed:
            log.info("cache_temporaries_swept count=%d dir=%s (left by writes that did not "
                     "finish)", removed, self.root)

    def current_version(self) -> str | None:
        try:
            return self._pointer.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None
        except (IsADirectoryError, UnicodeDecodeError) as exc:  # edited by hand: no name
            raise StoreError(unreadable_pointer_message(str(self._pointer), exc)) from exc
        except OSError as exc:  # never a pointer that names no version
            raise _disk_unavailable(f"the current-version pointer ({self._pointer})",
                                    exc) from exc

    def read(self, version: str | None = None) -> tuple[str, CacheBundle]:
        name = version or self.current_version()
        if name is None:
            raise StoreError(f"no cache version published in {self.root} (run `voicegate seed`)")
        directory = self._versions / name
        try:
            manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
            vectors = np.load(directory / "vectors.npy", allow_pickle=False)
            classifier = (directory / "classifier.joblib").read_bytes()
        except (*_NOT_THERE, ValueError, EOFError) as exc:  # not there, or corrupt (cut short)
            raise StoreError(f"cannot read cache version {name} in {self.root}: {exc}") from exc
        except OSError as exc:  # never a bad version: FaqCache would not wait for the disk
            raise _disk_unavailable(f"cache version {name} in {self.root}", exc) from exc
        check_format(name, manifest)
        return name, CacheBundle(manifest, vectors, classifier)

    def versions(self) -> list[str]:
        if not self._versions.is_dir():
            return []
        return sorted(p.name for p in self._versions.iterdir()
                      if p.is_dir() and not p.name.startswith("."))


def unreadable_pointer_message(where: str, exc: BaseException) -> str:
    return (f"the current-version pointer ({where}) cannot be read as a version name "
            f"({type(exc).__name__}: {exc}); nothing is served from it: set it back to a "
            f"published version's name, or seed again")


_JSON_KINDS = {list: "a JSON array", type(None): "null", str: "a JSON string",
               int: "a JSON number", float: "a JSON number", bool: "a JSON boolean"}


def check_format(version: str, manifest: Any) -> None:
    if not isinstance(manifest, dict):  # JSON, but a list or null: a bad version, said so
        kind = _JSON_KINDS.get(type(manifest), type(manifest).__name__)
        raise StoreError(f"cache version {version}: its manifest is {kind}, not a JSON object")
    found = manifest.get("format")
    if found != MANIFEST_FORMAT:
        older = isinstance(found, int) and found < MANIFEST_FORMAT
        raise StoreError(f"cache version {version}: format {found}, this voicegate reads "
                         f"{MANIFEST_FORMAT}" + (": it was published by an older voicegate, "
                                                 "seed again to publish it in this format"
                                                 if older else ""))


def missing_audio_message(version: str, missing: list[str]) -> str:
    return (f"cache version {version} names audio the store does not have ({missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): a clean-up "
            f"deleted it while this seed ran for longer than the audio grace period, or it was "
            f"never stored; nothing was published, seed again")


def conflict_message(replaces: object, current: str | None) -> str:
    return (f"the cache changed while this was being published: it was built on version "
            f"{replaces or '(none)'}, and {current or '(none)'} is now current")


# An OSError reading a store's file that says it is not there (or is the wrong kind of
# entry): what it names is missing, a bad version or pointer. Any other (EIO, a lost NFS
# mount, no permission) is ``_disk_unavailable``.
_NOT_THERE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _disk_unavailable(what: str, exc: OSError) -> StoreUnavailable:
    """A read the disk did not answer: an outage to wait out, as an unreachable Redis is
    (StoreUnavailable: FaqCache stays unready and reads again at the next poll)."""
    return StoreUnavailable(f"{what} cannot be read: {exc.strerror or exc} (the store's disk "
                            "did not answer; read again at the next refresh)")


def _write_failed(path: Path, exc: OSError) -> StoreError:
    """A failed write (no space left, read-only, no permission) as a StoreError naming the
    file and the reason: the admin API and the CLI then say nothing was published."""
    return StoreError(f"cannot write {path}: {exc.strerror or exc}")


def _whole_wav(path: Path) -> bool:
    """Whether a stored WAV holds every sample its header says (reads its header only)."""
    with open(path, "rb") as f:
        try:
            with wave.open(f, "rb") as wav:  # leaves ``f`` at the first sample
                end = f.tell() + wav.getnframes() * wav.getsampwidth() * wav.getnchannels()
        except (wave.Error, EOFError):
            return False
        return os.fstat(f.fileno()).st_size >= end


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(path: Path) -> None:
    """fsync a directory: the renames and new entries in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; a new one is made durable in its parent."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        _sync_directory(path.parent)


def _temporary_path(path: Path) -> Path:
    """Where ``_atomic_write`` writes ``path`` before renaming it (``_TEMPORARY_FILE``)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = _temporary_path(path)
    try:
        _write_synced(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
