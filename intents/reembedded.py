"""A version re-embedded by this replica's backend, kept on its disk for the next load.

A version records the embedder backend that seeded it (manifest ``embedding_model``). A
replica serving another backend (a mixed-CPU cluster, an upgrade: ``auto`` resolves per CPU)
embeds the version's questions again and calibrates again (intents/loader.py), minutes for
a large seed during which it is not ready. The result (the question vectors, the models blob
a published version holds: ``intents.router.models_to_bytes``, and the thresholds) is kept
here, in the model cache dir (``model_cache_dir``, the embedder's ``cache_dir``), so that
happens once per replica disk per version, not at every start.

One file per (serving model, version): ``reembedded-<model key>-<version key>.npz``, the
version key a digest of the version's name *and* of what its calibration is computed from
(questions and intents, entries' actions, negatives, target wrong rate), so another version
that bears the same name (a store wiped and seeded again, another store) never matches.
Written as the model exports are (intents/model_cache.py: temp file synced, renamed, the
directory synced). Trusted only when it verifiably matches: its header names the same
version, digest, model and format; its vectors have the version's shape, are finite, and a
few of its questions embedded again agree with them (another export of the model under the
same name gives other vectors); its models blob loads. Anything else (missing, torn,
unreadable, another version's, stale) is ignored and recomputed, then overwritten: a log
line, never a failed load. Failing to write (a full or read-only disk) loses the saving
only.

Never written into the shared store: the other replicas may be the other CPU class.

Bounded: after each write, the newest ``KEEP_PER_BACKEND`` files of the serving model are
kept (by when last written or reused: a reuse touches its file) and older ones deleted; a
version a replica no longer serves is one of these unless it came back within a few
versions (a rollback, a promotion of an older one), and the temp files of the serving model's
writes a crash left are deleted once old enough (``model_cache.prune``, as for the exports).
Other models' files are left alone (a cache dir shared by replicas of both classes holds
each class's own).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from intents import model_cache
from intents.calibration import Thresholds
from intents.embedder import AGREEMENT, least_agreement
from intents.model_cache import write_atomically

log = logging.getLogger("voicegate.cache")

# The file's layout; a change makes every kept file a mismatch (recomputed once).
FORMAT = 1
# Kept files per serving model after a write (each 4 bytes x 384 per question, 15 MB for
# Banking77's 10,003, plus the models blob).
KEEP_PER_BACKEND = 3
_PREFIX = "reembedded-"


class Mismatch(ValueError):
    """A kept file that is not this version's re-embedding by this model."""


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """What the version's re-embedding and calibration are computed from."""
    identity = {
        "questions": [[q["text"], q["intent"]] for q in manifest["questions"]],
        "entries": [[e["id"], e["intent"], e["action"], e.get("answer") is not None]
                    for e in manifest["entries"]],
        "negatives": list(manifest.get("negatives") or ()),
        "target_wrong_rate": (manifest.get("thresholds") or {}).get("target_wrong_rate"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def _model_key(model_name: str) -> str:
    return hashlib.sha256(model_name.encode("utf-8")).hexdigest()[:8]


def kept_path(directory: Path, model_name: str, version: str, digest: str) -> Path:
    key = hashlib.sha256(f"{version}\n{digest}".encode("utf-8")).hexdigest()[:16]
    return Path(directory) / f"{_PREFIX}{_model_key(model_name)}-{key}.npz"


def _header(model_name: str, version: str, digest: str) -> dict[str, Any]:
    return {"format": FORMAT, "model": model_name, "version": version, "digest": digest}


def read(path: Path, *, model_name: str, version: str, digest: str,
         questions: Sequence[str], embedder: Any, target_wrong_rate: float
         ) -> tuple[np.ndarray, bytes, Thresholds]:
    """(vectors, models blob, thresholds) kept in ``path``; raises ``Mismatch`` (or what
    reading it raised: OSError, a zip or numpy error) when it is not whole and this one's."""
    data = path.read_bytes()  # all of it at once: a concurrent prune cannot cut it short
    with np.load(io.BytesIO(data), allow_pickle=False) as held:
        if set(held.files) != {"header", "vectors", "models"}:
            raise Mismatch(f"holds {sorted(held.files)}")
        header = json.loads(held["header"].tobytes().decode("utf-8"))
        vectors = held["vectors"]
        models = held["models"].tobytes()
    expected = _header(model_name, version, digest)
    found = {k: header.get(k) for k in expected}
    if found != expected:
        raise Mismatch(f"another re-embedding ({found})")
    if vectors.dtype != np.float32 or vectors.shape != (len(questions), embedder.dim) \
            or not np.isfinite(vectors).all():
        raise Mismatch(f"vectors {vectors.dtype} {vectors.shape}, not float32 "
                       f"{(len(questions), embedder.dim)} and finite")
    thresholds = Thresholds.from_json(header["thresholds"])
    if thresholds.target_wrong_rate != target_wrong_rate:
        raise Mismatch(f"calibrated for a target of {thresholds.target_wrong_rate}")
    # A few questions embedded again (intents.embedder.least_agreement), as the shipped
    # negatives' kept vectors are checked.
    agreement = least_agreement(embedder, questions, vectors)
    if not agreement >= AGREEMENT:
        raise Mismatch(f"the model no longer gives its vectors (cosine {agreement:.4f})")
    return vectors, models, thresholds


def ignored(path: Path, version: str, exc: BaseException) -> None:
    log.warning("cache_reembedded_ignored version=%s path=%s reason=%s: %s (embedding and "
                "calibrating again; the file is overwritten)", version, path,
                type(exc).__name__, exc)


def touch(path: Path) -> None:
    """Mark ``path`` as just used, for ``prune`` (a read-only disk: it keeps its age)."""
    try:
        os.utime(path)
    except OSError:
        pass


def keep(path: Path, *, model_name: str, version: str, digest: str, vectors: np.ndarray,
         models: bytes, thresholds: Thresholds) -> bool:
    """Write the re-embedding to ``path`` atomically, then ``prune``. Never raises: a disk
    that is full or read-only loses the saving (logged), not the load."""
    header = dict(_header(model_name, version, digest), thresholds=thresholds.as_json())
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
             vectors=np.ascontiguousarray(vectors, dtype=np.float32),
             models=np.frombuffer(models, dtype=np.uint8))
    data = buffer.getvalue()
    try:
        write_atomically(path, lambda tmp: tmp.write_bytes(data))
    except Exception as exc:  # noqa: BLE001 - never the load's failure
        log.warning("cache_reembedded_not_kept version=%s path=%s error=%s: %s (the next "
                    "load embeds and calibrates again)", version, path, type(exc).__name__,
                    exc)
        return False
    log.info("cache_reembedded_kept version=%s path=%s bytes=%d", version, path, len(data))
    prune(path.parent, model_name)
    return True


def prune(directory: Path, model_name: str, keep: int = KEEP_PER_BACKEND) -> None:
    """Delete ``model_name``'s kept files beyond the newest ``keep``, and the temp files its
    crashed writes left (``model_cache.prune``); never raises."""
    key = "0" * 16  # kept_path's version key: any other of that length is this model's too
    name = f"{_PREFIX}{_model_key(model_name)}-{key}.npz"
    model_cache.prune(directory, model_cache.kind_pattern(name, key), keep, logger=log,
                      event="cache_reembedded")
