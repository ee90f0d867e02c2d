"""Model files built once per machine (a conversion, an export) and kept in a cache dir.

Used by the router's int8 embedder (intents/onnx_encoder.py), Moonshine's folded
weights (gateway/providers/moonshine_stt.py), the shipped negatives' vectors
(intents/negatives.py) and versions seeded by another embedder backend, as re-embedded
here (intents/reembedded.py). A file is keyed by its source's identity and the recipe's
version, written atomically (temp file synced to disk, rename, directory
synced: replicas starting together and a crash mid-write or just after never leave a half
or empty file), and built again when the cached one does not load or has no graph.

Superseded exports are pruned. A source's key holds its modification time, which
``pip install`` sets, so every image rebuild exports again under a new name. After writing
an export, ``build_once(..., key=key)`` removes older files of the same kind: the names that
match the new one's exactly except for the key (``minilm-int8-<16 hex>.onnx``; never
``minilm-dynint8-*`` or another look-alike), beyond the newest
``KEEP_PER_KIND`` by modification time (the new one counts and is never removed), and the
temp files a crashed write of that kind left, once last written ``TEMPORARY_GRACE_S`` ago
(a write under way, another replica's on a shared volume, is younger). Two stay,
so the exports of a rolling upgrade's old replicas (and of a rollback by one image) are
still there when one of them restarts; one superseded longer ago is rebuilt once by a
replica that still needs it. Deleting a file another process has open or mapped is safe on
Linux (the inode lives until it is closed). A removal that fails is logged, never raised.
A kind is assumed to have one source: the shipped model files (a second model exported
under the same kind's names would count among its two).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("voicegate.models")

# Exports of a kind kept after a new one is written (the new one included).
KEEP_PER_KIND = 2
# A temp file of ``write_atomically`` this much older than its last write is a crashed
# write's, swept by ``prune``: a write under way (another replica's, on a shared volume)
# is younger, an export's conversion included (minutes at most, its temp file created first).
TEMPORARY_GRACE_S = 3600.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voicegate"


def source_key(source: Path, recipe: str) -> str:
    """Changes when the source file or the recipe that builds from it changes."""
    stat = source.stat()
    return hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:"
                          f"{recipe}".encode()).hexdigest()[:16]


def onnx_loads(path: Path) -> bool:
    """A cached ONNX file that is whole (a truncated, empty or foreign file is rebuilt).

    An empty file parses as an empty model: one without graph nodes counts as missing.
    """
    import onnx

    try:
        if len(onnx.load(str(path), load_external_data=False).graph.node) > 0:
            return True
    except Exception:
        pass
    log.warning("model_cache_unreadable path=%s", path)
    return False


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_once(target: Path, build: Callable[[Path], None],
               loads: Callable[[Path], bool] = onnx_loads, *, key: str | None = None) -> Path:
    """``target``, built by ``build(temp_path)`` unless a whole one is already there.

    ``key``: the source key in ``target``'s name; once a new ``target`` is written, the
    other files of its kind beyond the newest ``KEEP_PER_KIND`` are deleted (``prune``)."""
    if target.is_file() and loads(target):
        return target
    write_atomically(target, build)
    log.info("model_cached path=%s", target)
    if key is not None:
        prune(target.parent, kind_pattern(target.name, key), KEEP_PER_KIND, spare=target)
    return target


def kind_pattern(name: str, key: str) -> re.Pattern[str]:
    """File names of ``name``'s kind: ``name`` with any lowercase hex key of ``key``'s
    length in place of ``key`` (its last occurrence), and nothing else."""
    at = name.rindex(key)
    return re.compile(re.escape(name[:at]) + f"[0-9a-f]{{{len(key)}}}"
                      + re.escape(name[at + len(key):]))


def temporary_pattern(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """The names ``write_atomically`` gives the temp files of ``pattern``'s files
    (``tempfile.mkstemp``: the target's name, 8 random characters, ``.tmp``)."""
    return re.compile(f"(?:{pattern.pattern})" + r"[a-z0-9_]{8}\.tmp")


def prune(directory: Path, pattern: re.Pattern[str], keep: int, *,
          spare: Path | None = None, logger: logging.Logger = log,
          event: str = "model_cache") -> None:
    """Delete the files of ``directory`` whose whole name matches ``pattern``, beyond the
    newest ``keep`` by modification time (``spare`` never), and the temp files a crashed
    ``write_atomically`` of such a file left (a killed process runs no clean-up), once
    last written ``TEMPORARY_GRACE_S`` ago (regular files only); never raises: a failure
    is logged (``<event>_prune_failed``), each removal too (``<event>_pruned``)."""
    temporary = temporary_pattern(pattern)
    cutoff = time.time() - TEMPORARY_GRACE_S
    crashed: list[Path] = []
    try:
        found = []
        for path in Path(directory).iterdir():
            if temporary.fullmatch(path.name):
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    continue  # renamed into place or swept meanwhile
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    crashed.append(path)
                continue
            if not pattern.fullmatch(path.name):
                continue
            try:
                found.append((path.stat().st_mtime_ns, path.name, path))
            except FileNotFoundError:
                continue  # pruned by another replica meanwhile
    except OSError as exc:
        logger.warning("%s_prune_failed dir=%s error=%s: %s", event, directory,
                       type(exc).__name__, exc)
        return
    found.sort(reverse=True)
    for path in crashed + [path for _, _, path in found[keep:]]:
        if spare is not None and path.name == spare.name:
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("%s_prune_failed path=%s error=%s: %s", event, path,
                           type(exc).__name__, exc)
            continue
        logger.info("%s_pruned path=%s", event, path)


def write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """``target`` replaced by what ``build(temp_path)`` writes, whole or not at all: a failure
    (a full or read-only disk) raises and leaves no temporary file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        # On disk before the rename, and the rename itself after: a machine that crashes
        # soon after must not come back with the name pointing at an empty file.
        _fsync(tmp)
        os.replace(tmp, target)
        try:
            _fsync(target.parent)
        except OSError:  # a directory cannot be opened everywhere (Windows)
            pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
