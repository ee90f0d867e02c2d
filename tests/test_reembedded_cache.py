"""A version seeded by another embedder backend is re-embedded and calibrated once per
replica disk: the result is kept in the model cache dir and a later load reuses it."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import intents.loader
from intents.embedder import Embedder
from intents.loader import LoadedCache, load_cache
from intents.store import CacheBundle, LocalStore
from tests.intents_support import _seeded_bank_store, shared_embedder

OTHER_BACKEND = "sentence-transformers/all-MiniLM-L6-v2#some-other-backend"
PROBES = ("what are your opening hours", "I lost my card", "how do I", "the card I ordered",
          "can I speak to a person", "what is the weather tomorrow", "reset my pin please")


def _embedder_keeping_in(directory: Path) -> Embedder:
    """The suite's embedder (its model, its backend), with its model cache dir elsewhere."""
    embedder = copy.copy(shared_embedder())
    embedder.cache_dir = directory
    return embedder


def _seeded_elsewhere(root: Path, **changes: object) -> LocalStore:
    """A copy of the suite's bank FAQ store whose current version says another backend
    embedded it (``changes``: other manifest fields to change)."""
    shutil.copytree(_seeded_bank_store(), root)
    store = LocalStore(root)
    _, bundle = store.read()
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "version")}
    manifest.update(embedding_model=OTHER_BACKEND, **changes)
    store.publish(CacheBundle(manifest, bundle.vectors, bundle.classifier))
    return store


def _renamed(store: LocalStore, name: str) -> LocalStore:
    """``store`` with its current version renamed ``name`` (another store's version may bear
    the same name)."""
    current = store.current_version()
    (store.root / "versions" / current).rename(store.root / "versions" / name)
    (store.root / "CURRENT").write_text(name + "\n", encoding="ascii")
    return store


@pytest.fixture
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``train_router`` the loader runs (the texts' first question)."""
    calls: list[str] = []
    real = intents.loader.train_router

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[1][0])
        return real(*args, **kwargs)

    monkeypatch.setattr(intents.loader, "train_router", counted)
    return calls


def _decisions(cache: LoadedCache) -> list[tuple]:
    return [(d.intent, d.hit, d.spoken_hit, d.entry_id, round(d.score, 6),
             round(d.confidence, 6), d.finished, d.reason)
            for d in (cache.router.route(text) for text in PROBES)]


def _kept(directory: Path) -> list[Path]:
    return sorted(directory.glob("reembedded-*.npz"))


def test_a_version_seeded_by_another_backend_is_reembedded_once_per_disk(
        tmp_path: Path, trainings: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """Review (stop 63): a replica whose embedder backend is not the one that seeded the
    version re-embeds its questions and calibrates again at every load (every restart, every
    replica: minutes for 10,003 questions, /readyz 503 meanwhile). The result is kept on the
    replica's disk (model cache dir), and the second load of the same version by the same
    backend uses it: no train_router, the same thresholds and decisions."""
    store = _seeded_elsewhere(tmp_path / "store")
    embedder = _embedder_keeping_in(tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="voicegate.cache"):
        first = load_cache(store, embedder)
        assert len(trainings) == 1
        second = load_cache(store, _embedder_keeping_in(tmp_path / "models"))
    assert len(trainings) == 1, "the second load calibrated again"
    assert second.version == first.version
    assert second.thresholds == first.thresholds == second.router.thresholds
    assert (second.router.cache._vectors == first.router.cache._vectors).all()
    assert _decisions(second) == _decisions(first)
    assert second.router.completeness.report == first.router.completeness.report
    assert any("cache_reembedded_reused" in r.getMessage() for r in caplog.records)
    assert len(_kept(tmp_path / "models")) == 1
    # Never written into the shared store: another replica may be the other CPU class.
    assert store.read()[1].manifest["embedding_model"] == OTHER_BACKEND


def test_a_version_seeded_by_this_backend_keeps_nothing(tmp_path: Path,
                                                        trainings: list[str]) -> None:
    shutil.copytree(_seeded_bank_store(), tmp_path / "store")
    load_cache(LocalStore(tmp_path / "store"), _embedder_keeping_in(tmp_path / "models"))
    assert trainings == [] and _kept(tmp_path / "models") == []


def test_another_version_of_the_same_name_is_never_taken_for_it(
        tmp_path: Path, trainings: list[str]) -> None:
    """Two stores (or a store wiped and seeded again) may name different versions alike:
    the kept result is keyed by the manifest's content too."""
    one = _renamed(_seeded_elsewhere(tmp_path / "one"), "20261129T000000Z-abcdef")
    target = one.read()[1].manifest["thresholds"]["target_wrong_rate"]
    other = _renamed(_seeded_elsewhere(
        tmp_path / "other", thresholds={**one.read()[1].manifest["thresholds"],
                                        "target_wrong_rate": target / 2}),
        "20261129T000000Z-abcdef")
    models = tmp_path / "models"
    first = load_cache(one, _embedder_keeping_in(models))
    second = load_cache(other, _embedder_keeping_in(models))
    assert len(trainings) == 2
    assert second.thresholds.target_wrong_rate == target / 2 != first.thresholds.target_wrong_rate
    assert len(_kept(models)) == 2
    load_cache(one, _embedder_keeping_in(models))
    load_cache(other, _embedder_keeping_in(models))
    assert len(trainings) == 2


@pytest.mark.parametrize("damage", ["torn", "empty", "garbage", "another_versions"])
def test_a_damaged_or_mismatched_kept_file_is_recomputed_and_replaced(
        tmp_path: Path, trainings: list[str], caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    store = _seeded_elsewhere(tmp_path / "store")
    models = tmp_path / "models"
    first = load_cache(store, _embedder_keeping_in(models))
    [kept] = _kept(models)
    whole = kept.read_bytes()
    if damage == "torn":  # cut short (a copy of the cache dir that did not finish)
        kept.write_bytes(whole[:len(whole) // 2])
    elif damage == "empty":
        kept.write_bytes(b"")
    elif damage == "garbage":
        kept.write_bytes(b"\x00not a kept re-embedding" * 100)
    else:  # whole, but another version's (a file copied over this one's name)
        other = _seeded_elsewhere(tmp_path / "other", negatives=["is it raining in Paris"])
        load_cache(other, _embedder_keeping_in(tmp_path / "other-models"))
        [foreign] = _kept(tmp_path / "other-models")
        shutil.copyfile(foreign, kept)
    trained = len(trainings)
    with caplog.at_level(logging.INFO, logger="voicegate.cache"):
        again = load_cache(store, _embedder_keeping_in(models))
    assert len(trainings) == trained + 1, "a damaged or foreign file was trusted"
    assert again.thresholds == first.thresholds
    assert _decisions(again) == _decisions(first)
    assert any("cache_reembedded_ignored" in r.getMessage() for r in caplog.records)
    # Overwritten with a whole one: the next load reuses it.
    assert kept.read_bytes() != b"" and _kept(models) == [kept]
    load_cache(store, _embedder_keeping_in(models))
    assert len(trainings) == trained + 1


def test_a_kept_file_whose_vectors_the_model_no_longer_gives_is_recomputed(
        tmp_path: Path, trainings: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """Another export of the model under the same name (a changed recipe) gives other
    vectors: a few questions embedded again must agree with the kept ones."""
    import io

    import numpy as np

    store = _seeded_elsewhere(tmp_path / "store")
    models = tmp_path / "models"
    load_cache(store, _embedder_keeping_in(models))
    [kept] = _kept(models)
    with np.load(io.BytesIO(kept.read_bytes()), allow_pickle=False) as held:
        arrays = {k: held[k] for k in held.files}
    rolled = np.roll(arrays["vectors"], 1, axis=1)  # unit vectors still, but not the model's
    with open(kept, "wb") as out:
        np.savez(out, **{**arrays, "vectors": rolled})
    with caplog.at_level(logging.INFO, logger="voicegate.cache"):
        load_cache(store, _embedder_keeping_in(models))
    assert len(trainings) == 2
    assert any("cache_reembedded_ignored" in r.getMessage() for r in caplog.records)


def test_a_cache_dir_that_cannot_be_written_only_loses_the_saving(
        tmp_path: Path, trainings: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """A full or read-only disk (here: the cache dir's parent is a file, so nothing can be
    created in it, whoever runs the test) costs the next load's time, never this load."""
    store = _seeded_elsewhere(tmp_path / "store")
    (tmp_path / "not-a-directory").write_bytes(b"")
    models = tmp_path / "not-a-directory" / "models"
    with caplog.at_level(logging.INFO, logger="voicegate.cache"):
        loaded = load_cache(store, _embedder_keeping_in(models))
        again = load_cache(store, _embedder_keeping_in(models))
    assert len(trainings) == 2
    assert _decisions(again) == _decisions(loaded)
    assert any("cache_reembedded_not_kept" in r.getMessage() for r in caplog.records)


def test_a_full_disk_only_loses_the_saving(tmp_path: Path, trainings: list[str],
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import os

    store = _seeded_elsewhere(tmp_path / "store")
    models = tmp_path / "models"
    models.mkdir()

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level(logging.INFO, logger="voicegate.cache"):
        load_cache(store, _embedder_keeping_in(models))
    monkeypatch.undo()
    assert any("cache_reembedded_not_kept" in r.getMessage() for r in caplog.records)
    assert list(models.iterdir()) == []  # no temporary file left behind


def test_old_versions_kept_files_are_pruned_per_backend(tmp_path: Path) -> None:
    """The newest ``KEEP_PER_BACKEND`` per backend stay (by when last written or used);
    another backend's files and other files in the cache dir are not touched."""
    import os

    from intents import reembedded

    models = tmp_path / "models"
    models.mkdir()
    ours = [reembedded.kept_path(models, "model#ours", f"v{i}", f"{i:016x}")
            for i in range(reembedded.KEEP_PER_BACKEND + 2)]
    theirs = reembedded.kept_path(models, "model#theirs", "v0", "0" * 16)
    export = models / "minilm-dynint8-0123456789abcdef.onnx"
    for age, path in enumerate(reversed([*ours, theirs, export])):
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))  # ours[0] newest
    os.utime(theirs, (1, 1))  # the oldest of all, but the only one of its backend
    reembedded.prune(models, "model#ours")
    assert sorted(p for p in models.iterdir()) == sorted(
        [*ours[:reembedded.KEEP_PER_BACKEND], theirs, export])


def test_two_writers_of_the_same_file_never_share_a_temp_file(tmp_path: Path) -> None:
    """Review (stop 63): docker-compose.yml now gives the replicas one shared model cache
    volume, so two replicas write the same file names (both re-embed a version at the same
    start, both export the same model). intents/model_cache.write_atomically writes a temp
    file and renames it: two writers under way at once must each have their own temp file
    (tempfile.mkstemp: a random name, created exclusively), or one would rename the other's
    half-written file into place. Passed when written: pins the property the volume needs."""
    import threading

    from intents.model_cache import write_atomically

    target = tmp_path / "reembedded-model-version.npz"
    both_open = threading.Barrier(2, timeout=10)
    temps: list[Path] = []

    def writer(payload: bytes) -> None:
        def build(tmp: Path) -> None:
            temps.append(tmp)
            tmp.write_bytes(payload[:10])
            both_open.wait()  # both temp files exist, each half written
            with open(tmp, "ab") as out:
                out.write(payload[10:])

        write_atomically(target, build)

    payloads = (b"a" * 1000, b"b" * 2000)
    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(temps) == 2 and temps[0] != temps[1]
    assert all(t.parent == tmp_path for t in temps)
    assert target.read_bytes() in payloads  # one writer's whole file, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp left


_CRASHING_KEEP = """
import os, sys
from pathlib import Path
import numpy as np
from intents import reembedded
from tests.test_reembedded_cache import _thresholds

real = Path.write_bytes

def crash(self, data):
    real(self, data[: len(data) // 2])
    os._exit(9)  # killed mid-write: nothing of the writer's own clean-up runs

Path.write_bytes = crash
models = Path(sys.argv[1])
reembedded.keep(reembedded.kept_path(models, "model#ours", "v1", "1" * 16),
                model_name="model#ours", version="v1", digest="1" * 16,
                vectors=np.zeros((3, 4), np.float32), models=b"m", thresholds=_thresholds())
"""


def _thresholds() -> object:
    from intents.calibration import Thresholds
    return Thresholds(min_similarity=0.5, hit_confidence=0.5, target_wrong_rate=0.05,
                      bounded=True, confidence_level=0.95, wrong_rate_bound=0.05,
                      expected_hit_rate=0.5, expected_wrong_rate=0.05,
                      out_of_domain_target=0.05, out_of_domain_hit_rate=0.0, negatives=0,
                      calibration_questions=10, folds=5, hit_similarity=0.6)


def test_a_write_that_crashed_leaves_no_temp_file_for_good(tmp_path: Path) -> None:
    """Review (stop 64): a replica killed while writing a re-embedded version (an OOM kill, a
    deploy's SIGKILL, a power cut) left its ``reembedded-*.npz<random>.tmp`` in the model
    cache dir for good: nothing ever deleted it (the prune after each write matches only
    finished files), and each is as large as the kept file (15 MB and more), on a volume
    the replicas share. Wanted: the next write's clean-up deletes the temp files a crashed
    write of that model left, once older than the grace a write under way needs (another
    replica may be writing one right now: kept), as the model exports' clean-up does."""
    import os
    import subprocess
    import sys
    import time

    from intents import model_cache, reembedded

    models = tmp_path / "models"
    models.mkdir()
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_KEEP, str(models)],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr
    left = list(models.iterdir())
    assert len(left) == 1 and left[0].name.startswith("reembedded-") \
        and left[0].name.endswith(".tmp"), left
    long_ago = time.time() - model_cache.TEMPORARY_GRACE_S - 60
    os.utime(left[0], (long_ago, long_ago))
    # Another replica's write under way (same model), another model's crashed write, and a
    # look-alike: none is this clean-up's to delete.
    writing = models / (reembedded.kept_path(models, "model#ours", "v3", "3" * 16).name
                        + "k2j_x9q0.tmp")
    theirs = models / (reembedded.kept_path(models, "model#theirs", "v1", "1" * 16).name
                       + "a1b2c3d4.tmp")
    notes = models / "reembedded-notes.tmp"
    for path in (writing, theirs, notes):
        path.write_bytes(b"half")
    for path in (theirs, notes):
        os.utime(path, (long_ago, long_ago))

    kept = reembedded.kept_path(models, "model#ours", "v2", "2" * 16)
    assert reembedded.keep(kept, model_name="model#ours", version="v2", digest="2" * 16,
                           vectors=np.zeros((3, 4), np.float32), models=b"m",
                           thresholds=_thresholds())  # type: ignore[arg-type]
    assert sorted(models.iterdir()) == sorted([kept, writing, theirs, notes])
