"""Load the serving cache version: a ready Router plus every entry's audio in memory.

The gateway calls this once at start-up (and again when a new version is
published); after that a cache hit touches neither disk nor a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from intents import reembedded
from intents.calibration import Thresholds
from intents.classifier import IntentClassifier
from intents.completeness import Completeness
from intents.embedder import Embedder
from intents.judge import Judge
from intents.router import Router, completeness_for_seed, models_from_bytes, train_router
from intents.semantic_cache import SemanticCache
from intents.store import Store, StoreError
from intents.types import Action, Audio, Entry

log = logging.getLogger("voicegate.cache")


@dataclass(frozen=True)
class CachedEntry:
    id: str
    intent: str
    action: Action
    answer: str | None
    paraphrases: tuple[str, ...]
    pcm: bytes | None  # 16-bit little-endian mono; None for entries without an answer
    sample_rate: int | None

    @property
    def audio(self) -> Audio | None:
        return None if self.pcm is None or self.sample_rate is None else Audio(
            self.pcm, self.sample_rate)


@dataclass(frozen=True)
class LoadedCache:
    version: str
    router: Router
    entries: dict[str, CachedEntry]
    thresholds: Thresholds
    voice_id: str
    # The operator's own out-of-domain questions it was seeded with: an upload through the
    # admin API keeps them, from memory (the store may no longer hold this version).
    negatives: tuple[str, ...] = ()


def entries_from_manifest(manifest: dict) -> dict[str, Entry]:
    return {e["id"]: Entry(id=e["id"], intent=e["intent"], action=Action(e["action"]),
                           answer=e.get("answer"), questions=tuple(e["questions"]),
                           audio_key=e.get("audio_key"))
            for e in manifest["entries"]}


# What ``models_from_bytes`` reads from a version's models blob.
Models = tuple[IntentClassifier, Judge, Completeness | None]


def _router_from(models: Models, vectors: np.ndarray, embedder: Embedder, texts: list[str],
                 intents: list[str], entries: dict[str, Entry], thresholds: Thresholds,
                 negatives: Sequence[str]) -> Router:
    """The router a version's models (``models_from_bytes``) and question vectors make."""
    classifier, judge, completeness = models
    if completeness is None:  # seeded before the model existed: learn it now
        completeness = completeness_for_seed(texts, negatives)
    return Router(embedder, classifier, judge, SemanticCache(vectors, intents), entries,
                  thresholds, completeness)


def _reembedded(name: str, manifest: dict, embedder: Embedder, texts: list[str],
                intents: list[str], entries: dict[str, Entry], thresholds: Thresholds,
                negatives: Sequence[str], embedded_by: object) -> Router:
    """The version's router for ``embedder``, which did not seed it: from the model cache
    dir when this replica's disk already holds its re-embedding, else embedded and
    calibrated again (and kept there for the next load)."""
    directory = getattr(embedder, "cache_dir", None)  # None: nowhere to keep it
    path = digest = None
    if directory is not None:
        digest = reembedded.manifest_digest(manifest)
        path = reembedded.kept_path(directory, embedder.model_name, name, digest)
        try:
            vectors, blob, kept_thresholds = reembedded.read(
                path, model_name=embedder.model_name, version=name, digest=digest,
                questions=texts, embedder=embedder,
                target_wrong_rate=thresholds.target_wrong_rate)
            router = _router_from(models_from_bytes(blob), vectors, embedder, texts, intents,
                                  entries, kept_thresholds, negatives)
        except (FileNotFoundError, NotADirectoryError):
            pass  # its first load on this disk (or no cache dir: told when not kept)
        except Exception as exc:  # noqa: BLE001 - torn, foreign, stale: recompute
            reembedded.ignored(path, name, exc)
        else:
            reembedded.touch(path)
            log.info("cache_reembedded_reused version=%s embedded_by=%s serving=%s "
                     "questions=%d path=%s", name, embedded_by, embedder.model_name,
                     len(texts), path)
            return router
    log.warning("cache_reembedded version=%s embedded_by=%s serving=%s questions=%d kept_in=%s",
                name, embedded_by, embedder.model_name, len(texts), path)
    trained = train_router(embedder, texts, intents, entries,
                           target_wrong_rate=thresholds.target_wrong_rate, negatives=negatives)
    router = trained.router
    if path is not None and digest is not None:
        reembedded.keep(path, model_name=embedder.model_name, version=name, digest=digest,
                        vectors=trained.vectors, models=router.models_bytes(),
                        thresholds=router.thresholds)
    return router


def load_cache(store: Store, embedder: Embedder, version: str | None = None) -> LoadedCache:
    name, bundle = store.read(version)
    manifest = bundle.manifest
    intents = [q["intent"] for q in manifest["questions"]]
    if len(intents) != bundle.vectors.shape[0]:
        raise StoreError(f"cache version {name}: {len(intents)} questions but "
                         f"{bundle.vectors.shape[0]} vectors")
    entries = entries_from_manifest(manifest)
    thresholds = Thresholds.from_json(manifest["thresholds"])
    texts = [q["text"] for q in manifest["questions"]]
    negatives = manifest.get("negatives", ())
    embedded_by = manifest.get("embedding_model")
    if embedded_by != embedder.model_name or bundle.vectors.shape[1] != embedder.dim:
        # Seeded by another embedder (or backend): its vectors and calibration do not
        # hold for ours. Embed the questions again and calibrate as the seed did, once per
        # replica disk: the result is kept in the model cache dir (intents/reembedded.py).
        router = _reembedded(name, manifest, embedder, texts, intents, entries, thresholds,
                             negatives, embedded_by)
        thresholds = router.thresholds
    else:
        try:
            models = models_from_bytes(bundle.classifier)
        except ValueError as exc:
            # Saved by another scikit-learn (or torn: a blob cut short inside an array reads
            # the same): train again from the stored vectors and texts (same data, same folds,
            # same result; takes as long as the seed's calibration). Said, as it is slow.
            log.warning("cache_retrained version=%s reason=%s (the stored models do not load: "
                        "retraining from its vectors)", name, exc)
            router = train_router(embedder, texts, intents, entries,
                                  target_wrong_rate=thresholds.target_wrong_rate,
                                  vectors=bundle.vectors, negatives=negatives).router
        else:
            router = _router_from(models, bundle.vectors, embedder, texts, intents, entries,
                                  thresholds, negatives)
    cached: dict[str, CachedEntry] = {}
    for entry in entries.values():
        audio = store.get_audio(entry.audio_key) if entry.audio_key else None
        cached[entry.id] = CachedEntry(
            id=entry.id, intent=entry.intent, action=entry.action, answer=entry.answer,
            paraphrases=entry.questions, pcm=audio.pcm if audio else None,
            sample_rate=audio.sample_rate if audio else None)
    return LoadedCache(name, router, cached, thresholds, manifest.get("voice_id", ""),
                       tuple(negatives or ()))
