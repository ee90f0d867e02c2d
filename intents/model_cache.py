"""Model files built once per machine (a conversion, an export) and kept in a cache dir.

Used by the router's int8 embedder (intents/onnx_encoder.py) and Moonshine's folded
weights (gateway/providers/moonshine_stt.py). A file is keyed by its source's identity
and the recipe's version, written atomically (temp file, then rename: replicas starting
together and a crash mid-write never leave a half file), and built again when the cached
one does not load.
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
    """A cached ONNX file that is whole (a truncated or foreign file is rebuilt)."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
        return True
    except Exception:
        log.warning("model_cache_unreadable path=%s", path)
        return False


def build_once(target: Path, build: Callable[[Path], None],
               loads: Callable[[Path], bool] = onnx_loads) -> Path:
    """``target``, built by ``build(temp_path)`` unless a whole one is already there."""
    if target.is_file() and loads(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("model_cached path=%s", target)
    return target
