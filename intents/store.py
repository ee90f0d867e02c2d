"""Where published cache versions and rendered audio live.

``Store`` is the interface; ``LocalStore`` (a directory, nothing to start) is the
embedded default. A Redis store will implement the same methods.

Publishing is atomic: a version is written completely under a temporary name,
renamed into place, and only then does the ``CURRENT`` pointer move (``os.replace``,
atomic on POSIX). A reader resolves ``CURRENT`` once and reads that version, so it
never sees half a seed, and a seed that fails before the swap leaves the previous
version serving. Audio is content-addressed (``audio_key``), outside versions, so a
re-seed renders only answers whose text or voice changed.

Layout of a ``LocalStore``::

    CURRENT                      name of the serving version
    versions/<version>/manifest.json, vectors.npy, classifier.joblib
    audio/<sha256>.wav           16-bit mono PCM answers
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import time
import wave
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from intents.types import Audio

# 2: the router's models blob holds the classifier and the judge (intents.router).
MANIFEST_FORMAT = 2


class StoreError(RuntimeError):
    """The store is empty, unreadable or inconsistent."""


class StoreConflict(StoreError):
    """A publish that was to replace one version found another current (a second
    publisher got there first): nothing was published."""


class AnyVersion:
    def __repr__(self) -> str:
        return "ANY_VERSION"


# ``publish(..., replaces=ANY_VERSION)``: replace whatever is current (a whole new seed).
ANY_VERSION = AnyVersion()


def audio_key(text: str, voice_id: str) -> str:
    """Content hash naming an answer's audio: same text and voice → same audio."""
    return hashlib.sha256(f"{voice_id}\n{text}".encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheBundle:
    """Everything one published cache version consists of (audio aside)."""

    manifest: dict[str, Any]  # JSON: entries, questions, thresholds, model names
    vectors: np.ndarray  # (questions, dim) float32
    classifier: bytes  # the router's models (intents.router.models_to_bytes)


class Store(ABC):
    # -- audio, content-addressed --------------------------------------------
    @abstractmethod
    def has_audio(self, key: str) -> bool: ...

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


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._versions = self.root / "versions"
        self._audio = self.root / "audio"
        self._pointer = self.root / "CURRENT"

    # -- audio -------------------------------------------------------------------
    def _audio_path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise StoreError(f"not an audio key: {key!r}")
        return self._audio / f"{key}.wav"

    def has_audio(self, key: str) -> bool:
        return self._audio_path(key).is_file()

    def get_audio(self, key: str) -> Audio:
        path = self._audio_path(key)
        try:
            with wave.open(str(path), "rb") as wav:
                if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                    raise StoreError(f"{path}: not 16-bit mono")
                return Audio(wav.readframes(wav.getnframes()), wav.getframerate())
        except (OSError, wave.Error, EOFError) as exc:
            raise StoreError(f"cannot read audio {path}: {exc}") from exc

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
            self._audio.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, buffer.getvalue())
        except OSError as exc:  # e.g. the disk is full: a StoreError, as reads are
            raise _write_failed(path, exc) from exc

    # -- versions ------------------------------------------------------------------
    def publish(self, bundle: CacheBundle,
                replaces: str | None | AnyVersion = ANY_VERSION) -> str:
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        staging = self._versions / f".staging-{version}"
        try:
            self._versions.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            manifest = dict(bundle.manifest, format=MANIFEST_FORMAT, version=version)
            _write_synced(staging / "manifest.json",
                          json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
            vectors = io.BytesIO()
            np.save(vectors, np.ascontiguousarray(bundle.vectors, dtype=np.float32))
            _write_synced(staging / "vectors.npy", vectors.getvalue())
            _write_synced(staging / "classifier.joblib", bundle.classifier)
            os.rename(staging, self._versions / version)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_failed(self._versions / version, exc) from exc
            raise
        # The only step readers can observe: the pointer now names a complete version.
        # Checked and moved under a lock, so two publishing processes cannot interleave.
        try:
            with open(self.root / ".publish.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.current_version()
                if replaces is not ANY_VERSION and current != replaces:
                    shutil.rmtree(self._versions / version, ignore_errors=True)
                    raise StoreConflict(conflict_message(replaces, current))
                _atomic_write(self._pointer, (version + "\n").encode("ascii"))
        except OSError as exc:  # the pointer did not move (os.replace is all or nothing)
            shutil.rmtree(self._versions / version, ignore_errors=True)
            raise _write_failed(self._pointer, exc) from exc
        return version

    def current_version(self) -> str | None:
        try:
            return self._pointer.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None

    def read(self, version: str | None = None) -> tuple[str, CacheBundle]:
        name = version or self.current_version()
        if name is None:
            raise StoreError(f"no cache version published in {self.root} (run `voicegate seed`)")
        directory = self._versions / name
        try:
            manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
            vectors = np.load(directory / "vectors.npy", allow_pickle=False)
            classifier = (directory / "classifier.joblib").read_bytes()
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read cache version {name} in {self.root}: {exc}") from exc
        check_format(name, manifest)
        return name, CacheBundle(manifest, vectors, classifier)

    def versions(self) -> list[str]:
        if not self._versions.is_dir():
            return []
        return sorted(p.name for p in self._versions.iterdir()
                      if p.is_dir() and not p.name.startswith("."))


def check_format(version: str, manifest: dict[str, Any]) -> None:
    found = manifest.get("format")
    if found != MANIFEST_FORMAT:
        older = isinstance(found, int) and found < MANIFEST_FORMAT
        raise StoreError(f"cache version {version}: format {found}, this voicegate reads "
                         f"{MANIFEST_FORMAT}" + (": it was published by an older voicegate, "
                                                 "seed again to publish it in this format"
                                                 if older else ""))


def conflict_message(replaces: object, current: str | None) -> str:
    return (f"the cache changed while this was being published: it was built on version "
            f"{replaces or '(none)'}, and {current or '(none)'} is now current")


def _write_failed(path: Path, exc: OSError) -> StoreError:
    """A failed write (no space left, read-only, no permission) as a StoreError naming the
    file and the reason: the admin API and the CLI then say nothing was published."""
    return StoreError(f"cannot write {path}: {exc.strerror or exc}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
