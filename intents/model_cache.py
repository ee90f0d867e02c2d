"""Model files built once per machine (a conversion, an export) and kept in a cache dir.

Used by the router's int8 embedder (intents/onnx_encoder.py), Moonshine's folded
weights (gateway/providers/moonshine_stt.py), the shipped negatives' vectors
(intents/negatives.py) and versions seeded by another embedder backend, as re-embedded
here (intents/reembedded.py). A file is keyed by its source's identity and the recipe's
version, written atomically (temp file synced to disk, rename, directory
synced: replicas starting together and a crash mid-write or just after never leave a half
or empty file), and built again when the cached one does not load or has no graph.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger("voicegate.models")


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
               loads: Callable[[Path], bool] = onnx_loads) -> Path:
    """``target``, built by ``build(temp_path)`` unless a whole one is already there."""
    if target.is_file() and loads(target):
        return target
    write_atomically(target, build)
    log.info("model_cached path=%s", target)
    return target


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
