"""The Redis store and several replicas sharing one cache.

Unit tests use the shared Redis on 127.0.0.1:${REDIS_PORT:-6379} (the one
scripts/ensure-redis.sh starts) in a database of the test suite's own, 13, and 14 for the
second pytest-xdist worker (``VOICEGATE_TEST_REDIS_DB`` picks another first one;
``VOICEGATE_TEST_REDIS_URL`` another server: one that names a database is shared by the
workers, so run those tests with ``-n 0``); when another test process on this machine holds
that database (a lock file each), the highest free one. Only that database is flushed, per
test (FLUSHDB, never FLUSHALL); database 0, where voicegate and
the README's commands keep their data by default, is refused. The replica test starts its own
redis-server (free port, temporary directory, appendonly) and two gateway
processes, and restarts that Redis mid-test. Without Redis these tests skip, except
under CI (``CI=true``), where they fail with the reason.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

import gateway.shared_stats
from cache_seed.seed import render_answers
from cache_seed.validate import read_seed_csv
from gateway.client import Caller
from gateway.clock import ManualClock
from gateway.redis_link import REASON_LOG_EVERY_S, RedisHealth, VersionSubscriber
from gateway.shared_stats import SharedStats
from gateway.stats import Stats, answer_mark
from intents.redis_store import RedisKeys, RedisStore, redacted
from intents.store import CacheBundle, StoreError, audio_key
from intents.types import Audio

# Under pytest-xdist each worker flushes a database of its own: the next one up per worker
# (gw0: 13, gw1: 14, ...), so two workers' tests never flush each other's keys.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_WANTED_DB = int(os.environ.get("VOICEGATE_TEST_REDIS_DB", "13")) + \
    (int(_WORKER) if _WORKER.isdigit() else 0)
_HELD_LOCKS: list[Any] = []  # open (so locked) until this process exits


def _claim_test_db(wanted: int) -> int:
    """The database this process flushes, locked against every other test process on this
    machine (a lock file per Redis port and database): two suites at once on one Redis (a
    fresh-clone CI beside a targeted run) would flush each other's keys. The wanted one
    when free, else the highest free one (never 0)."""
    port = os.environ.get("REDIS_PORT", "6379")
    for db in [wanted] + [d for d in range(15, 0, -1) if d != wanted]:
        handle = open(Path(tempfile.gettempdir()) / f"voicegate-test-redis-{port}-{db}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _HELD_LOCKS.append(handle)
        return db
    raise RuntimeError(f"every Redis database 1-15 on port {port} is in use by another test "
                       "process on this machine")


def suite_redis_url() -> str:
    """The test suite's Redis database (VOICEGATE_TEST_REDIS_URL naming one keeps it)."""
    url = os.environ.get("VOICEGATE_TEST_REDIS_URL",
                         f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}")
    if urlsplit(url).path.strip("/") or "db=" in urlsplit(url).query:
        return url
    return f"{url.rstrip('/')}/{_claim_test_db(_WANTED_DB)}"


REDIS_URL = suite_redis_url()
ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip locally; under CI a missing Redis is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}: start one (scripts/ensure-redis.sh) or install "
                    f"redis-server")
    pytest.skip(reason)


def own_prefix(label: str) -> Iterator[str]:
    """A key prefix of the caller's own in the suite's Redis database, its keys deleted
    after (a fixture's body: ``yield from own_prefix("mine")``)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"no Redis at {REDIS_URL} ({exc})")
    name = f"{label}{secrets.token_hex(3)}:"
    yield name
    keys = list(client.scan_iter(match=name + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    if int(client.connection_pool.connection_kwargs.get("db") or 0) == 0:
        pytest.fail(f"{redacted(REDIS_URL)} is database 0, the default every voicegate uses: "
                    "the tests flush their database, give them their own "
                    "(VOICEGATE_TEST_REDIS_DB)")
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"no Redis at {redacted(REDIS_URL)} ({exc})")
    client.flushdb()  # this database only, never FLUSHALL
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_url, prefix="vgtest:")
    yield s
    s.close()


def bundle(marker: str = "a", dim: int = 4) -> CacheBundle:
    vectors = np.arange(3 * dim, dtype=np.float32).reshape(3, dim)
    return CacheBundle({"marker": marker, "entries": [], "questions": []}, vectors,
                       b"classifier-" + marker.encode())


def test_a_second_test_process_on_this_machine_gets_another_database() -> None:
    """Review (stop 65): two test processes on one machine (a fresh-clone CI beside a
    targeted run) both took database 13 and could flush each other's keys: the likely
    cause of a CI run whose cluster test found its seed's audio gone (alone it passed).
    Each test process now locks its database; another process takes a free one."""
    if os.environ.get("VOICEGATE_TEST_REDIS_URL"):
        pytest.skip("VOICEGATE_TEST_REDIS_URL names the database: it is shared by design")
    other = subprocess.run(
        [sys.executable, "-c", "from tests.test_redis import REDIS_URL; print(REDIS_URL)"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=120)
    assert other.returncode == 0, other.stderr[-2000:]
    theirs = other.stdout.strip().rsplit("/", 1)
    ours = REDIS_URL.rsplit("/", 1)
    assert theirs[0] == ours[0] and theirs[1] != ours[1] and theirs[1] != "0", (ours, theirs)


# -- RedisStore ------------------------------------------------------------------------------

def test_publish_then_read_round_trips(store: RedisStore) -> None:
    assert store.current_version() is None
    with pytest.raises(StoreError, match="no cache version published"):
        store.read()
    original = bundle("first")
    version = store.publish(original)
    assert store.current_version() == version
    name, read = store.read()
    assert name == version
    assert read.manifest["marker"] == "first" and read.manifest["version"] == version
    assert read.vectors.dtype == np.float32 and np.array_equal(read.vectors, original.vectors)
    assert read.classifier == original.classifier
    newer = store.publish(bundle("second"))
    assert store.current_version() == newer and store.versions() == sorted([version, newer])
    assert store.read(version)[1].manifest["marker"] == "first"  # old versions stay readable


def test_audio_is_content_addressed(store: RedisStore) -> None:
    key = audio_key("We open at nine.", "voice-1")
    assert not store.has_audio(key)
    store.put_audio(key, Audio(b"\x01\x00\x02\x00", 22050))
    assert store.has_audio(key)
    assert store.get_audio(key) == Audio(b"\x01\x00\x02\x00", 22050)
    with pytest.raises(StoreError, match="missing"):
        store.get_audio(audio_key("never rendered", "voice-1"))
    with pytest.raises(StoreError, match="not an audio key"):
        store.has_audio("../etc/passwd")


def test_a_failed_publish_leaves_the_old_version_serving(store: RedisStore, redis_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old = store.publish(bundle("old"))

    def broken(version: str, replaces: object) -> None:
        raise StoreError("Redis went away before the pointer moved")

    monkeypatch.setattr(store, "_swap_pointer", broken)
    with pytest.raises(StoreError, match="went away"):
        store.publish(bundle("new"))
    assert store.current_version() == old
    assert store.read()[1].manifest["marker"] == "old"
    assert store.versions() == [old]
    keys = redis.Redis.from_url(redis_url).keys("vgtest:version:*")
    assert keys == [f"vgtest:version:{old}".encode()]  # the half-published version is gone


def version_keys(redis_url: str) -> list[bytes]:
    raw = redis.Redis.from_url(redis_url)
    try:
        return sorted(raw.keys("vgtest:version:*"))
    finally:
        raw.close()


def test_a_version_write_whose_reply_was_lost_leaves_no_hash(
        store: RedisStore, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis applied the version's HSET but the reply never came (a timeout): the publish
    failed, and the hash it wrote stayed, named by no version, never deleted (noeviction)."""
    old = store.publish(bundle("old"))
    hset = store._redis.hset

    def applied_then_timed_out(*args: Any, **kwargs: Any) -> Any:
        hset(*args, **kwargs)
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(store._redis, "hset", applied_then_timed_out)
    with pytest.raises(StoreError, match="unreachable"):
        store.publish(bundle("new"))
    monkeypatch.undo()
    assert store.current_version() == old and store.versions() == [old]
    assert version_keys(redis_url) == [f"vgtest:version:{old}".encode()]


def test_a_failed_publish_whose_clean_up_fails_too_raises_its_own_error_and_logs(
        store: RedisStore, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis went away between the failed swap and the deletion of the version's hash: the
    caller learns why the publish failed (not a second error over it), and the log says
    which hash may be left, as nothing else will delete it."""
    old = store.publish(bundle("old"))

    def refused(version: str, replaces: object) -> None:
        raise StoreError("Redis went away before the pointer moved")

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(store, "_swap_pointer", refused)
    monkeypatch.setattr(store._redis, "eval", gone)
    with caplog.at_level(logging.WARNING, logger="voicegate.store"):
        with pytest.raises(StoreError, match="went away before the pointer moved"):
            store.publish(bundle("new"))
    monkeypatch.undo()
    assert "cache_publish_cleanup_failed" in caplog.text and "Connection refused" in caplog.text
    left = [k for k in version_keys(redis_url) if k != f"vgtest:version:{old}".encode()]
    assert len(left) == 1 and left[0].decode() in caplog.text  # the hash it names
    assert store.current_version() == old and store.read()[1].manifest["marker"] == "old"


def publish_left_behind(store: RedisStore, bundle_: CacheBundle,
                        monkeypatch: pytest.MonkeyPatch) -> str:
    """A publish whose swap failed and whose own clean-up failed too (Redis went away at
    that moment): the name of the version whose hash it left."""
    written: list[str] = []

    def refused(version: str, replaces: object) -> None:
        written.append(version)
        raise StoreError("Redis went away before the pointer moved")

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(store, "_swap_pointer", refused)
        patched.setattr(store._redis, "eval", gone)
        with pytest.raises(StoreError, match="went away before the pointer moved"):
            store.publish(bundle_)
    (version,) = written
    return version


def _age(raw: redis.Redis, key: str, seconds: float, field: str = "seen") -> None:
    """Move a hash's ``seen`` stamp (or an audio key's ``t``) back, as if the Redis server's
    clock had moved on."""
    raw.hset(key, field, float(raw.hget(key, field)) - seconds)


def test_a_hash_a_failed_publish_left_goes_once_older_than_the_grace(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed publish whose clean-up failed too left its version's hash: neither `current`
    nor `published` names it, so the retention never deleted it and it stayed in Redis for
    good (noeviction). The first clean-up after a later publish stamps it (`seen`, the Redis
    server's clock) and one past the grace from then deletes it; never the hash of a seed
    that wrote it and has yet to move the pointer, nor a published one, nor audio a kept
    version names."""
    store = RedisStore(redis_url, prefix="vgtest:", keep_versions=2, audio_grace_s=100)
    seeder = RedisStore(redis_url, prefix="vgtest:", keep_versions=2, audio_grace_s=100)
    kept, orphans = audio_key("Kept.", "v"), audio_key("Only the orphan's.", "v")
    store.put_audio(kept, CLIP)
    store.put_audio(orphans, CLIP)
    store.publish(with_audio(kept))
    orphan = publish_left_behind(store, with_audio(orphans), monkeypatch)
    raw = redis.Redis.from_url(redis_url)
    orphan_key = f"vgtest:version:{orphan}"

    def stored(name: str) -> bool:
        return bool(raw.exists(f"vgtest:version:{name}"))

    store.publish(with_audio(kept))  # found: stamped, its grace starts
    assert stored(orphan) and abs(float(raw.hget(orphan_key, "seen")) - time.time()) < 60
    _age(raw, orphan_key, 50)  # within the grace: it may yet be a seed about to move the pointer
    store.publish(with_audio(kept))
    assert stored(orphan)

    _age(raw, orphan_key, 51)  # its grace is over
    # Meanwhile a seed has written its hash and not moved the pointer yet: another
    # replica publishes, and its clean-up runs, right then.
    swap = seeder._swap_pointer

    def another_publish_first(version: str, replaces: object) -> None:
        assert stored(version)
        store.publish(with_audio(kept))
        swap(version, replaces)  # type: ignore[arg-type]

    monkeypatch.setattr(seeder, "_swap_pointer", another_publish_first)
    seeded = seeder.publish(with_audio(kept))
    monkeypatch.undo()
    assert not stored(orphan)
    assert seeder.current_version() == seeded and store.read()[1].manifest["version"] == seeded
    assert store.has_audio(kept)

    for key in version_keys(redis_url):  # every hash old now: the published ones stay
        raw.hset(key, "seen", 0)
    latest = store.publish(with_audio(kept))
    assert store.versions() == sorted([seeded, latest]) and store.read()[0] == latest
    assert store.read(seeded)[1].manifest["version"] == seeded
    assert store.has_audio(kept)
    assert version_keys(redis_url) == sorted(f"vgtest:version:{name}".encode()
                                             for name in (seeded, latest))
    raw.close()
    store.close()
    seeder.close()


@pytest.mark.parametrize("skew_s", [-7200.0, 7200.0])
def test_a_replica_whose_clock_is_off_spares_a_seed_between_its_write_and_its_swap(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, skew_s: float) -> None:
    """Replicas' clocks disagree. A replica whose clock ran more than the grace ahead of
    the seeder's (the stamp was the writer's clock, the cut-off the cleaner's) deleted, as
    an orphan, the fresh hash of another replica's seed between its write and its swap: the
    seed was refused ("does not exist: pointer not moved"). Ages are now the Redis server's."""
    other = RedisStore(redis_url, prefix="vgtest:", clock=lambda: time.time() + skew_s)
    seeder = RedisStore(redis_url, prefix="vgtest:")  # the default grace, 3600 s
    other.publish(bundle("base"))
    swap = seeder._swap_pointer

    def another_publish_first(version: str, replaces: object) -> None:
        other.publish(bundle("other replica"))  # its clean-up runs right then
        swap(version, replaces)  # type: ignore[arg-type]

    monkeypatch.setattr(seeder, "_swap_pointer", another_publish_first)
    seeded = seeder.publish(bundle("seeded"))
    assert seeder.current_version() == seeded == other.current_version()
    other.close()
    seeder.close()


@pytest.mark.parametrize("cleaner_skew_s, seeder_skew_s",
                         [(7200.0, 0.0), (-7200.0, 0.0), (0.0, -7200.0)])
def test_audio_a_seed_wrote_or_claimed_survives_a_replica_whose_clock_is_off(
        redis_url: str, cleaner_skew_s: float, seeder_skew_s: float) -> None:
    """A seed wrote one answer's audio and claimed another's (stored long ago, no version
    names it), then another replica published. When the cleaner's clock ran more than the
    grace ahead of the seeder's (the stamp `t` was the writer's clock, the cut-off the
    cleaner's), its clean-up deleted both, and the seed's publish was refused ("names audio
    the store does not have"). Stamps and ages are now the Redis server's (the cleaner-behind
    case guards the other direction)."""
    cleaner = RedisStore(redis_url, prefix="vgtest:",
                         clock=lambda: time.time() + cleaner_skew_s)
    seeder = RedisStore(redis_url, prefix="vgtest:",  # the default grace, 3600 s
                        clock=lambda: time.time() + seeder_skew_s)
    raw = redis.Redis.from_url(redis_url)
    written, reused = audio_key("Rendered now.", "v"), audio_key("Rendered long ago.", "v")
    seeder.put_audio(reused, CLIP)
    _age(raw, f"vgtest:audio:{reused}", 7200, "t")  # unused for two hours: past the grace

    seeder.put_audio(written, CLIP)  # the seed renders one answer
    assert seeder.claim_audio(reused)  # and reuses the other
    cleaner.publish(bundle("other replica"))  # its clean-up runs while the seed calibrates
    seeded = seeder.publish(with_audio(written, reused))
    assert seeder.current_version() == seeded == cleaner.current_version()
    assert cleaner.get_audio(written) == CLIP == cleaner.get_audio(reused)
    raw.close()
    cleaner.close()
    seeder.close()


def test_an_unpublished_hash_goes_a_grace_after_a_clean_up_first_found_it(
        redis_url: str) -> None:
    """A hash an older voicegate's failed publish left: the first clean-up that finds it
    stamps it, and it goes once the grace has passed from then; a key of another deployment
    under a longer prefix is never taken for one."""
    store = RedisStore(redis_url, prefix="vgtest:", keep_versions=1, audio_grace_s=100)
    legacy = "vgtest:version:20260101T000000Z-abcdef"
    raw = redis.Redis.from_url(redis_url)
    raw.hset(legacy, mapping={"manifest": b"{}", "vectors": b"", "classifier": b"",
                              "audio": ""})
    # Not a version this store names: another deployment's keys under a longer prefix.
    foreign = "vgtest:version:x:audio:" + "0" * 64
    raw.hset(foreign, mapping={"manifest": b"{}", "seen": 0})
    store.publish(bundle("first"))
    assert raw.hexists(legacy, "seen")
    _age(raw, legacy, 99)
    store.publish(bundle("second"))
    assert raw.exists(legacy)
    _age(raw, legacy, 2)
    latest = store.publish(bundle("third"))
    assert not raw.exists(legacy) and raw.exists(foreign)
    assert store.read()[0] == latest
    raw.close()
    store.close()


def test_a_hash_published_while_the_clean_up_looked_for_orphans_stays(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clean-up lists the version hashes, then deletes the orphans among them: seeds'
    swaps that land in between (their hashes older than the grace: seeds held up between
    their write and their swap) published them, and they stay, the current one and the one
    the second swap replaced alike."""
    store = RedisStore(redis_url, prefix="vgtest:", keep_versions=2, audio_grace_s=100)
    seeder = RedisStore(redis_url, prefix="vgtest:", keep_versions=2, audio_grace_s=100)
    store.publish(bundle("base"))
    held: list[tuple[str, object]] = []  # the seed's swap, held up after its write
    swap = seeder._swap_pointer
    monkeypatch.setattr(seeder, "_swap_pointer",
                        lambda version, replaces: held.append((version, replaces)))
    seeder.publish(bundle("first seeded"))
    seeder.publish(bundle("second seeded"))
    monkeypatch.undo()
    (first, _), (second, _) = held
    store.publish(bundle("stamps them"))  # the clean-up finds both unpublished
    raw = redis.Redis.from_url(redis_url)
    for name in (first, second):
        _age(raw, f"vgtest:version:{name}", 200)  # past the grace
    raw.close()
    scan_iter = store._redis.scan_iter

    def swaps_land_after_the_listing(*args: Any, **kwargs: Any) -> Any:
        keys = list(scan_iter(*args, **kwargs))
        if "version:" in str(kwargs.get("match", "")):
            for version, replaces in held:
                swap(version, replaces)  # type: ignore[arg-type]
        return iter(keys)

    monkeypatch.setattr(store._redis, "scan_iter", swaps_land_after_the_listing)
    store.publish(bundle("another"))
    monkeypatch.undo()
    assert store.current_version() == second  # the swaps landed during the clean-up
    assert first in store.versions() and second in store.versions()
    assert store.read(first)[1].manifest["marker"] == "first seeded"
    assert store.read(second)[1].manifest["marker"] == "second seeded"
    store.close()
    seeder.close()


def test_a_swap_that_went_through_before_another_publish_keeps_its_version(
        store: RedisStore, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap was applied but its reply lost, and another replica published meanwhile:
    `current` no longer names this version, yet it was published (`published` lists it,
    replicas were told to load it). Deleting its hash left `published` naming a version
    nobody can read."""
    store.publish(bundle("old"))
    other = RedisStore(redis_url, prefix="vgtest:")
    swap = store._swap_pointer

    def applied_then_reply_lost(version: str, replaces: object) -> None:
        swap(version, replaces)  # type: ignore[arg-type]
        other.publish(bundle("another replica's"))
        raise StoreError("Redis at ... is unreachable (publish: move pointer): timed out")

    monkeypatch.setattr(store, "_swap_pointer", applied_then_reply_lost)
    try:
        ours = store.publish(bundle("ours"))  # it went through: published
    finally:
        other.close()
    monkeypatch.undo()
    assert ours in store.versions()
    assert store.read(ours)[1].manifest["marker"] == "ours"
    assert store.read()[1].manifest["marker"] == "another replica's"


def test_publish_announces_the_version_on_the_channel(store: RedisStore, redis_url: str) -> None:
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("vgtest:versions")
    version = store.publish(bundle())
    message = None
    deadline = time.monotonic() + 10
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
    pubsub.close()
    assert message is not None and message["data"] == version.encode()


def with_audio(*keys: str) -> CacheBundle:
    """A version whose entries' answers are the audio ``keys``."""
    entries = [{"id": f"e{n}", "intent": f"e{n}", "action": "answer", "answer": "...",
                "questions": ["?"], "audio_key": key} for n, key in enumerate(keys)]
    return CacheBundle({"entries": entries, "questions": []}, np.zeros((1, 4), np.float32), b"m")


CLIP = Audio(b"\x01\x00\x02\x00", 16000)


def test_publishing_keeps_the_newest_ten_versions(store: RedisStore, redis_url: str) -> None:
    """Every seed and admin edit publishes a version, and Redis runs with noeviction: versions
    nothing deletes grow it until it refuses writes. After a publish only the newest ten
    (cache_versions_kept's default) are left, hash and `published` entry alike."""
    names = [store.publish(bundle(str(n))) for n in range(12)]
    assert store.versions() == sorted(names[2:])
    raw = redis.Redis.from_url(redis_url)
    assert raw.exists(*(f"vgtest:version:{name}" for name in names[:2])) == 0
    assert raw.zcard("vgtest:published") == 10
    raw.close()
    assert store.current_version() == names[-1] and store.read()[1].manifest["marker"] == "11"
    assert store.read(names[2])[1].manifest["marker"] == "2"  # the oldest kept stays whole


def test_audio_no_kept_version_names_goes_once_no_seed_used_it_for_the_grace(
        redis_url: str) -> None:
    now = [1000.0]
    store = RedisStore(redis_url, prefix="vgtest:", keep_versions=2, audio_grace_s=100,
                       clock=lambda: now[0])
    raw = redis.Redis.from_url(redis_url)
    a, b, c, d, legacy = (audio_key(text, "voice-1") for text in "ABCDE")
    for key in (a, b, c, d):
        store.put_audio(key, CLIP)
    # Stored by a voicegate from before the clean-up: no `t`.
    raw.hset(f"vgtest:audio:{legacy}", mapping={"pcm": CLIP.pcm, "rate": CLIP.sample_rate})

    def publish(*keys: str) -> str:
        now[0] += 1  # publish times are this clock's
        return store.publish(with_audio(*keys))

    def stored() -> set[str]:
        return {k for k in (a, b, c, d, legacy) if store.has_audio(k)}

    first = publish(a)
    # The first clean-up to find it unused starts its grace (the Redis server's clock).
    assert abs(float(raw.hget(f"vgtest:audio:{legacy}", "t")) - raw.time()[0]) < 60
    second = publish(a, b)
    third = publish(c)
    assert store.versions() == sorted([second, third])  # the first is gone
    assert stored() == {a, b, c, d, legacy}  # unused audio within the grace stays

    for key in (a, b, c, d, legacy):  # past the grace of all of them
        _age(raw, f"vgtest:audio:{key}", 200, "t")
    assert store.claim_audio(b)  # a seed is about to reuse b: no version names it yet
    assert not store.claim_audio(audio_key("never stored", "voice-1"))
    fourth = publish(c)  # the second goes: a and b are named by no kept version
    assert store.versions() == sorted([third, fourth]) and first not in store.versions()
    assert stored() == {b, c}  # a, d and legacy were unused for the grace; b was claimed
    assert store.read()[0] == fourth
    raw.close()
    store.close()


def test_the_current_version_is_kept_even_when_another_clock_dated_one_later(
        redis_url: str) -> None:
    """Publish times come from each publisher's clock: a replica whose clock runs ahead
    dates its version later than the current one, published after it by another."""
    ahead = RedisStore(redis_url, prefix="vgtest:", keep_versions=1, clock=lambda: 5000.0)
    behind = RedisStore(redis_url, prefix="vgtest:", keep_versions=1, clock=lambda: 1000.0)
    early = ahead.publish(bundle("early"))
    current = behind.publish(bundle("current"))
    assert behind.current_version() == current
    assert behind.read()[1].manifest["marker"] == "current"
    assert behind.versions() == sorted([early, current])
    ahead.close()
    behind.close()


def test_a_seed_claiming_audio_while_the_clean_up_runs_keeps_it(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clean-up decides on a snapshot; a seed (another replica) claims audio after the
    clean-up read its age and before it deletes it: the transaction watching that audio
    is aborted, and the audio stays for the seed."""
    store = RedisStore(redis_url, prefix="vgtest:", keep_versions=1, audio_grace_s=100)
    seeder = RedisStore(redis_url, prefix="vgtest:")
    x = audio_key("Reused.", "v")
    store.put_audio(x, CLIP)
    raw = redis.Redis.from_url(redis_url)
    _age(raw, f"vgtest:audio:{x}", 200, "t")  # unused past the grace
    raw.close()
    server_time = store._redis.time
    claimed: list[bool] = []

    def claimed_first() -> Any:  # the clean-up's cutoff: after it read the audio's age
        claimed.append(seeder.claim_audio(x))
        return server_time()

    monkeypatch.setattr(store._redis, "time", claimed_first)
    store.publish(bundle("without x"))
    monkeypatch.undo()
    assert claimed == [True] and store.has_audio(x)
    store.publish(with_audio(x))  # the seed publishes: its version is whole
    assert store.get_audio(x) == CLIP
    store.close()
    seeder.close()


def test_a_version_naming_audio_a_clean_up_deleted_is_never_published(
        store: RedisStore, redis_url: str) -> None:
    """A seed that ran longer than the grace may have reused audio that another publish's
    clean-up deleted meanwhile: the pointer must not name it (every replica would fail to
    load it, a new one would start without a cache). Refused in the swap, left nothing."""
    gone = audio_key("Gone.", "v")
    store.put_audio(gone, CLIP)
    base = store.publish(bundle("base"))
    raw = redis.Redis.from_url(redis_url)
    raw.delete(f"vgtest:audio:{gone}")  # ... by another publisher's clean-up
    with pytest.raises(StoreError, match="names audio the store does not have"):
        store.publish(with_audio(gone))
    assert store.current_version() == base and store.versions() == [base]
    assert raw.keys("vgtest:version:*") == [f"vgtest:version:{base}".encode()]
    raw.close()


def test_a_failed_clean_up_never_fails_the_publish(store: RedisStore,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    counted: list[bool] = []
    store.on_cleanup_failed = lambda: counted.append(True)

    def redis_gone() -> None:
        raise redis.ConnectionError("Redis went away after the swap")

    monkeypatch.setattr(store, "_drop_unused_audio", redis_gone)
    with caplog.at_level(logging.WARNING, logger="voicegate.store"):
        version = store.publish(bundle("published"))
    assert store.current_version() == version
    assert store.read()[1].manifest["marker"] == "published"
    assert store.cleanup_failures == 1 and counted == [True]
    assert "cache_cleanup_failed" in caplog.text and "went away" in caplog.text


def test_seeding_twice_reuses_the_audio_in_redis(store: RedisStore, tmp_path: Path) -> None:
    csv = tmp_path / "faq.csv"
    write_small_faq(csv)
    rendered: list[str] = []

    def render(text: str) -> tuple[bytes, int]:
        rendered.append(text)
        return b"\x00\x01" * 100, 16000

    plan = read_seed_csv(csv)
    entries, fresh, reused = render_answers(plan, store, render, "voice-1", progress=False)
    assert fresh == len(rendered) == len(FAQ) and reused == 0
    entries, fresh, reused = render_answers(plan, store, render, "voice-1", progress=False)
    assert fresh == 0 and reused == len(FAQ) and len(rendered) == len(FAQ)
    assert all(store.has_audio(e.audio_key) for e in entries.values() if e.audio_key)


def test_an_unreachable_redis_is_a_clear_store_error() -> None:
    port = free_port()  # nothing listens there
    store = RedisStore(f"redis://:secret@127.0.0.1:{port}/0", timeout_s=1)
    with pytest.raises(StoreError, match=f"Redis at redis://:\\*\\*\\*@127.0.0.1:{port}/0 is "
                                         "unreachable") as caught:
        store.current_version()
    assert "secret" not in str(caught.value)


# -- the replica's link: pub/sub reloads and degraded mode ---------------------------------

async def test_the_subscriber_refreshes_on_connect_and_on_every_publish(store: RedisStore,
                                                                      redis_url: str) -> None:
    refreshes: list[str | None] = []

    async def refresh() -> None:
        refreshes.append(await asyncio.to_thread(store.current_version))

    health = RedisHealth()
    task = asyncio.create_task(VersionSubscriber(redis_url, RedisKeys("vgtest:"), refresh,
                                                 health).run())
    await poll(lambda: refreshes == [None], "the catch-up refresh on subscribing")
    first = await asyncio.to_thread(store.publish, bundle("one"))
    second = await asyncio.to_thread(store.publish, bundle("two"))
    # One refresh per publish; the first may already see the second version.
    await poll(lambda: len(refreshes) == 3 and refreshes[-1] == second, "both publishes heard")
    assert refreshes[1] in (first, second)
    assert health.degraded is False
    task.cancel()


async def test_an_unreachable_redis_degrades_the_replica() -> None:
    changes: list[str | None] = []
    health = RedisHealth(on_change=changes.append)

    async def refresh() -> None:
        raise AssertionError("never subscribed, never refreshed")

    url = f"redis://127.0.0.1:{free_port()}/0"
    task = asyncio.create_task(VersionSubscriber(url, RedisKeys(), refresh, health).run())
    await poll(lambda: health.degraded, "the subscriber reports Redis down")
    task.cancel()
    assert health.reason is not None and "unreachable" in health.reason and url in health.reason
    assert changes == [health.reason]
    health.up("subscriber")
    assert not health.degraded and changes[-1] is None


async def test_a_degraded_replica_whose_cause_changes_logs_the_new_one(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review (stop 68): only the first failure was logged (``redis_degraded``): a Redis
    that went away and came back with another password (or refusing writes, out of memory)
    kept the replica degraded for a new cause its log never named; an operator reading it
    chased an unreachable Redis. A changed cause is logged too, at most once every
    ``REASON_LOG_EVERY_S`` of the link's failures (their errors' words may differ from one
    attempt to the next); the same cause repeated is not."""
    clock = ManualClock()
    health = RedisHealth(clock=clock)
    unreachable = "Redis at redis://r:6379/0 unreachable: ConnectionError: refused"
    refused = "Redis at redis://r:6379/0 refused the credentials: AuthenticationError: ..."

    def degraded_lines() -> list[str]:
        return [r.fields["reason"] for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "redis_degraded"]

    with caplog.at_level(logging.INFO, logger="voicegate.redis"):
        health.down("subscriber", unreachable)
        health.down("subscriber", unreachable)
        health.down("subscriber", refused)  # at once: held back for now
        assert degraded_lines() == [f"subscriber: {unreachable}"]
        await clock.advance(REASON_LOG_EVERY_S)
        health.down("subscriber", refused)  # the next attempt's failure says it
        health.down("subscriber", refused)
        assert degraded_lines() == [f"subscriber: {unreachable}", f"subscriber: {refused}"]
# -- shared counters -----------------------------------------------------------------------

def hit(intent: str) -> dict[str, Any]:
    return {"source": "cache", "hit": True, "intent": intent, "entry_id": intent}


async def test_counters_add_up_over_replicas(redis_url: str) -> None:
    replicas = [SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:",
                            describe=lambda: {"active_calls": 1}) for _ in range(2)]
    first, second = replicas
    for _ in range(3):
        first.turn_finished(hit("opening_hours"))
    second.turn_finished(hit("opening_hours"))
    second.turn_finished({"source": "llm", "hit": False, "intent": "balance"})
    first.call_started()
    second.call_started()
    second.error("bad_frame")
    for replica in replicas:
        await replica.flush()
        await replica.heartbeat()
    local = {"calls": 1, "turns": 3, "hits": 3, "misses": 0, "latency_ms": {"hit": {}}}
    cluster = await first.cluster_snapshot(local)
    assert (cluster["calls"], cluster["turns"], cluster["hits"], cluster["misses"]) == (2, 5, 4, 1)
    assert cluster["hit_rate"] == 0.8 and cluster["turns_5m"] == 5 and cluster["hit_rate_5m"] == 0.8
    assert cluster["intents"] == {"opening_hours": 4, "balance": 1}
    assert cluster["entry_hits"] == {"opening_hours": 4}
    assert cluster["errors"] == {"bad_frame": 1}
    assert cluster["replicas"] == 2 and cluster["active_calls"] == 2
    assert cluster["degraded"] is False and cluster["latency_ms"] == {"hit": {}}
    await second.leave()
    assert (await first.cluster_snapshot(local))["replicas"] == 1
    for replica in replicas:
        await replica.aclose()


async def test_keypad_turns_are_no_hit_or_miss_in_the_cluster(redis_url: str) -> None:
    """Review (stop 61): a keypad turn (a key mapped to an entry, keys for the agent, the
    handoff key) was a hit or a miss in the cluster's counters and minutes, skewing the
    hit rate of the questions the cache answers. It is counted in keypad_turns only (and
    as a barge-in when the caller cut its reply off)."""
    stats = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
    stats.turn_finished(hit("opening_hours"))
    stats.turn_finished({**hit("opening_hours"), "input": "dtmf"})
    stats.turn_finished({"source": "llm", "input": "dtmf", "interrupted": True,
                         "first_audio_ms": 420.0})
    # Review (stop 66): stopped before its reply played (more keys while the agent thought):
    # counted as a keypad turn, but no reply was cut off, so no barge-in.
    stats.turn_finished({"input": "dtmf", "interrupted": True, "heard_ms": 0.0})
    stats.turn_finished({"source": "handoff", "input": "dtmf", "intent": "keypad",
                         "action": "handoff", "hit": False})
    await stats.flush()
    await stats.heartbeat()
    cluster = await stats.cluster_snapshot({"latency_ms": {}})
    assert (cluster["turns"], cluster["hits"], cluster["misses"]) == (1, 1, 0), cluster
    assert cluster["hit_rate"] == 1.0 and cluster["hit_rate_5m"] == 1.0, cluster
    assert cluster["turns_5m"] == 1 and cluster["keypad_turns"] == 4, cluster
    assert cluster["entry_hits"] == {"opening_hours": 1}, cluster
    assert cluster["intents"] == {"opening_hours": 1} and cluster["sources"] == {"cache": 1}
    assert cluster["interrupted_turns"] == 1
    await stats.aclose()


async def test_a_publish_clears_the_cluster_hits_of_dropped_and_changed_entries(
        redis_url: str) -> None:
    # The cluster's hits per entry belong to the entry as published: each replica writes the
    # marks of the version it loaded, and the first to write a changed one clears that id's
    # hits (the others find it in place and keep what was counted since).
    replicas = [SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
                for _ in range(2)]
    first, second = replicas
    old, new = answer_mark("answer", "Nine to five."), answer_mark("answer", "Eight to eight.")
    atm = answer_mark("answer", "Next to the station.")

    async def published(replica: SharedStats, marks: dict[str, str]) -> None:
        replica.entries_published(marks)
        await replica.flush()

    async def entry_hits() -> dict[str, int]:
        return (await first.cluster_snapshot({}))["entry_hits"]

    for replica in replicas:
        await published(replica, {"opening_hours": old, "find_atm": atm, "lost_card": atm})
    for intent in ("opening_hours", "opening_hours", "find_atm", "lost_card"):
        first.turn_finished(hit(intent))
    second.turn_finished(hit("find_atm"))
    await first.flush()
    await second.flush()
    assert await entry_hits() == {"opening_hours": 2, "find_atm": 2, "lost_card": 1}
    # Hours' answer changed, lost_card deleted; find_atm unchanged.
    version_2 = {"opening_hours": new, "find_atm": atm}
    await published(first, version_2)
    assert await entry_hits() == {"find_atm": 2}
    second.turn_finished(hit("opening_hours"))  # counted after the change
    await published(second, version_2)  # the second replica loads it later: nothing cleared
    assert await entry_hits() == {"opening_hours": 1, "find_atm": 2}
    # lost_card published again, with the answer it had: it starts at 0, not at 1.
    await published(first, dict(version_2, lost_card=atm))
    first.turn_finished(hit("lost_card"))
    await first.flush()
    assert await entry_hits() == {"opening_hours": 1, "find_atm": 2, "lost_card": 1}
    for replica in replicas:
        await replica.aclose()


async def test_an_older_versions_marks_written_late_keep_the_newer_versions_hits(
        store: RedisStore, redis_url: str) -> None:
    # Replica B loads v2, and its flush fails (Redis down) with v2's marks pending; meanwhile
    # v3, which changes opening_hours again, is published, A loads it and counts hits on it.
    # B's retry, once Redis is back, must not put v2's mark back (clearing those hits), nor
    # must B's own load of v3 clear them afterwards. Versions are published for real: their
    # names sort by second only, so two in one second may sort either way.
    serving: dict[str, str] = {}
    b_client = aioredis.Redis.from_url(redis_url)
    redis_is_down = False
    real_eval = b_client.eval

    async def eval_unless_down(*args: Any) -> Any:
        if redis_is_down:
            raise redis.ConnectionError("Error 111 connecting to Redis: Connection refused")
        return await real_eval(*args)

    b_client.eval = eval_unless_down  # type: ignore[method-assign]
    a = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:",
                    describe=lambda: {"cache_version": serving["a"]})
    b = SharedStats(b_client, prefix="vgtest:", describe=lambda: {"cache_version": serving["b"]})
    atm = answer_mark("answer", "Next to the station.")
    answers = {"v1": "Nine to five.", "v2": "Eight to eight.", "v3": "Eight to nine."}
    marks = {v: {"opening_hours": answer_mark("answer", text), "find_atm": atm}
             for v, text in answers.items()}

    async def load(replica: SharedStats, name: str, version: str, which: str) -> None:
        serving[name] = version  # FaqCache serves it, then tells the stats its marks
        replica.entries_published(marks[which])
        await replica.flush()

    async def entry_hits() -> dict[str, int]:
        return (await a.cluster_snapshot({}))["entry_hits"]

    v1 = store.publish(bundle("v1"))
    await load(a, "a", v1, "v1")
    await load(b, "b", v1, "v1")
    a.turn_finished(hit("find_atm"))
    await a.flush()
    v2 = store.publish(bundle("v2"))
    await load(a, "a", v2, "v2")
    redis_is_down = True
    with pytest.raises(redis.ConnectionError):
        await load(b, "b", v2, "v2")  # v2's marks stay pending on B
    v3 = store.publish(bundle("v3"))
    await load(a, "a", v3, "v3")
    for _ in range(2):
        a.turn_finished(hit("opening_hours"))  # v3's answer
    await a.flush()
    assert await entry_hits() == {"opening_hours": 2, "find_atm": 1}
    redis_is_down = False
    await b.flush()  # the retry: v2's marks, older than v3's already written
    assert await entry_hits() == {"opening_hours": 2, "find_atm": 1}, (
        "B's late write of v2's marks cleared the hits counted under v3")
    await load(b, "b", v3, "v3")
    b.turn_finished(hit("opening_hours"))
    await b.flush()
    assert await entry_hits() == {"opening_hours": 3, "find_atm": 1}
    await a.aclose()
    await b.aclose()


async def test_a_publish_after_redis_came_back_empty_still_clears_a_changed_answers_hits(
        redis_url: str) -> None:
    """Review (stop 68): Redis restarted without persistence (or flushed) loses the entry
    marks with the counters, and the replicas, still serving their version, never wrote them
    again: the next publish's marks were taken for the first ever, clearing nothing, so the
    hits counted on an answer since the restart stayed on the id once its answer changed
    (the admin API showed the new answer with the old one's hits). A replica whose marks
    are gone from Redis (its heartbeat looks) writes them again."""
    replica = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
    old, new = answer_mark("answer", "Nine to five."), answer_mark("answer", "Eight to eight.")
    atm = answer_mark("answer", "Next to the station.")

    async def entry_hits() -> dict[str, int]:
        return (await replica.cluster_snapshot({}))["entry_hits"]

    replica.entries_published({"opening_hours": old, "find_atm": atm}, "v1",
                              intents=["opening_hours", "find_atm"])
    replica.turn_finished(hit("opening_hours"))
    await replica.flush()
    await replica.heartbeat()
    direct = redis.Redis.from_url(redis_url)
    direct.flushdb()  # Redis restarted empty: the replica keeps serving v1
    direct.close()
    for intent in ("opening_hours", "opening_hours", "find_atm"):
        replica.turn_finished(hit(intent))
    await replica.flush()
    await replica.heartbeat()  # its next beat, seconds later
    await replica.flush()
    assert await entry_hits() == {"opening_hours": 2, "find_atm": 1}
    # v2 changes the hours' answer: their hits (of the old answer) are cleared.
    replica.entries_published({"opening_hours": new, "find_atm": atm}, "v2",
                              intents=["opening_hours", "find_atm"])
    await replica.flush()
    assert await entry_hits() == {"find_atm": 1}, "the old answer's hits stayed on it"
    await replica.aclose()


async def test_replicas_are_counted_under_a_prefix_that_reads_as_a_glob(redis_url: str) -> None:
    # A deployment's prefix is taken literally, as the store takes it: `[eu]` is no character
    # class that would count another deployment's replicas ("vgteste:") and none of its own.
    ours = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest[eu]:",
                       describe=lambda: {"active_calls": 2})
    other = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgteste:",
                        describe=lambda: {"active_calls": 5})
    for replica in (ours, other):
        await replica.heartbeat()
    cluster = await ours.cluster_snapshot({"active_calls": 2})
    assert (cluster["replicas"], cluster["active_calls"]) == (1, 2)
    for replica in (ours, other):
        await replica.aclose()


async def test_cluster_5m_figures_cover_the_last_300_seconds(redis_url: str,
                                                              monkeypatch) -> None:
    # The window is [now - 300 s, now], as a replica's own Stats: the current minute's bucket
    # back to the one the window starts in, counted for the share of it inside the window.
    minute = int(time.time() // 60) - 100
    now = [minute * 60 + 30.0]
    monkeypatch.setattr(gateway.shared_stats, "time",
                        SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))
    shared = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")

    async def recent() -> tuple[int, float | None]:
        snapshot = await shared.cluster_snapshot({"turns_5m": 0, "hit_rate_5m": None})
        assert snapshot["scope"] == "cluster"
        return snapshot["turns_5m"], snapshot["hit_rate_5m"]

    shared.turn_finished(hit("opening_hours"))  # 30 s into the minute
    await shared.flush()
    now[0] += 4 * 60 + 40  # 10 s into the fifth minute after: the turn is 280 s old
    assert await recent() == (1, 1.0)
    now[0] += 80  # 360 s old: its minute is no longer read
    assert await recent() == (0, None)
    # 12 hits in one minute, 3 misses now, read 15 s into the fifth minute after that one:
    # the last 45 s of the hits' minute are inside the window, so 3/4 of its hits count
    # (a minute's turns are taken as spread evenly over it).
    now[0] = (minute + 10) * 60 + 20.0
    for _ in range(12):
        shared.turn_finished(hit("opening_hours"))
    now[0] = (minute + 15) * 60 + 15.0
    for _ in range(3):
        shared.turn_finished({"source": "llm", "intent": "balance"})
    await shared.flush()
    assert await recent() == (12, 0.75)
    await shared.aclose()


async def test_the_batch_sequence_key_expires_after_the_python_constant_and_applies_once(
        redis_url: str, monkeypatch) -> None:
    # The key's lifetime is stated once, in Python (BATCH_SEQUENCE_TTL_S), not in the Lua.
    monkeypatch.setattr(gateway.shared_stats, "BATCH_SEQUENCE_TTL_S", 123)
    shared = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
    shared.turn_finished(hit("opening_hours"))
    batch = shared._pending.copy()
    await shared.flush()
    raw = redis.Redis.from_url(redis_url)
    (applied,) = raw.keys(f"vgtest:stats:applied:{shared.replica_id}:*")
    assert 113 < raw.ttl(applied) <= 123 and raw.get(applied) == b"1"
    (minute,) = raw.keys("vgtest:stats:minute:*")  # the other ttl still reaches its bucket
    assert 0 < raw.ttl(minute) <= gateway.shared_stats.MINUTE_BUCKET_TTL_S
    hits = int(raw.hget("vgtest:stats:totals", "hits") or 0)
    # The same batch again (a retry of a flush Redis applied): not counted twice.
    shared._inflight = (1, batch.copy(), time.monotonic())
    await shared.flush()
    assert int(raw.hget("vgtest:stats:totals", "hits") or 0) == hits
    # The next batch is.
    shared.turn_finished(hit("opening_hours"))
    await shared.flush()
    assert int(raw.hget("vgtest:stats:totals", "hits") or 0) == hits + 1
    assert raw.get(applied) == b"2"
    # A batch unconfirmed for longer than half the key's lifetime is not retried (Redis
    # may have applied it and forgotten so since): dropped, and counted in `dropped`.
    shared.turn_finished(hit("opening_hours"))
    shared._inflight = (3, shared._pending, time.monotonic() - 62)
    shared._sequence, shared._pending = 3, type(shared._pending)()
    await shared.flush()
    assert int(raw.hget("vgtest:stats:totals", "hits") or 0) == hits + 1
    assert shared.dropped == 7 and shared.pending == 0  # 7 counters a hit turn
    raw.close()
    await shared.aclose()


async def test_counters_are_buffered_while_redis_is_down(redis_url: str) -> None:
    health = RedisHealth()
    down = SharedStats(aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"),
                       prefix="vgtest:", health=health, flush_s=0.05)
    down.turn_finished(hit("opening_hours"))
    down.turn_finished(hit("opening_hours"))
    task = asyncio.create_task(down.run())
    await poll(lambda: health.degraded, "counters report Redis down")
    task.cancel()
    assert down.pending == 14 and down.dropped == 0  # 7 counters a hit turn
    snapshot = await down.cluster_snapshot({"hits": 2})
    assert snapshot["degraded"] is True and snapshot["replicas"] is None and snapshot["hits"] == 2
    await down.aclose()
    # Redis is back (the same pending and unconfirmed increments, a reachable client):
    # everything is written once.
    up = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
    up._pending, up._inflight = down._pending, down._inflight
    await up.flush()
    assert (await up.cluster_snapshot({}))["hits"] == 2 and up.pending == 0
    await up.aclose()


async def poll(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


# -- two gateway processes sharing one Redis -------------------------------------------------

# Short answers: a cache hit plays its audio in real time before the turn ends.
FAQ = {
    "opening_hours": ("We open at nine and close at five.",
                      ["What are your opening hours?", "When are you open?",
                       "What time does the branch open?", "Are you open on Saturdays?",
                       "What time do branches close today?"]),
    "routing_number": ("Our routing number is zero two one.",
                       ["What is your routing number?", "What's the bank's ABA number?",
                        "I need the routing number for direct deposit",
                        "Where do I find the routing number?"]),
    "swift_code": ("Our SWIFT code is B L S T U S three three.",
                   ["What is your SWIFT code?", "What's the BIC for Bluestone Bank?",
                    "I need your swift code to receive money from abroad",
                    "Do you have a SWIFT or BIC code?"]),
    "reset_online_password": ("Tap Forgot password on the sign-in screen.",
                              ["How do I reset my online banking password?",
                               "I forgot my password", "I can't remember my login password",
                               "How can I change my online banking password?"]),
    "card_delivery_time": ("A new card arrives within seven days.",
                           ["How long does a new card take to arrive?",
                            "When will my replacement card come?",
                            "How many days until my debit card is delivered?",
                            "My new card hasn't arrived yet, how long does it take?"]),
    "find_atm": ("Our app shows the nearest ATM.",
                 ["Where is the nearest ATM?", "How do I find an ATM near me?",
                  "Is there a cash machine close by?", "Where can I withdraw cash?"]),
}


def write_small_faq(path: Path, answers: dict[str, str] | None = None) -> None:
    out = io.StringIO()
    out.write("question,answer,intent,action\n")
    for intent, (answer, questions) in FAQ.items():
        answer = (answers or {}).get(intent, answer)
        out.write(f'"{questions[0]}","{answer}",{intent},\n')
        for question in questions[1:]:
            out.write(f'"{question}",,{intent},\n')
    path.write_text(out.getvalue(), encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server of this test's own: restartable, persistent (appendonly) in ``dir``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    # Persistence: the append-only file (a restart keeps the data). Subclasses choose theirs.
    PERSISTENCE: tuple[str, ...] = ("--appendonly", "yes", "--save", "")

    def start(self) -> None:
        self.launch(*self.PERSISTENCE)
        self.until_serving()

    def launch(self, *options: str) -> None:
        """Start redis-server on this port and directory with ``options``; not waited for."""
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
             str(self.dir), "--logfile", str(self.dir / "redis.log"), *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def until_serving(self) -> None:
        """Wait (30 s at most) until Redis answers PING, through a dataset's loading too."""
        assert self.process is not None
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start: see "
                                           f"{self.dir}/redis.log")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits, like a restart in production."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None


ADMIN_TOKEN = "test-admin-token"


class Replica:
    """``voicegate serve --redis URL`` in a process of its own."""

    def __init__(self, name: str, redis_url: str, logs: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.call_url = f"ws://127.0.0.1:{self.port}/v1/call"
        self.log = logs / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
                   VOICEGATE_STORE_DIR=str(logs / f"{name}-unused-store"),
                   VOICEGATE_REDIS_HEARTBEAT_S="1", VOICEGATE_LOG_LEVEL="info",
                   VOICEGATE_ADMIN_TOKEN=ADMIN_TOKEN,
                   # No safety-net poll within the test: new versions must come by pub/sub.
                   VOICEGATE_REDIS_POLL_S="3600", **(env or {}))
        env.pop("VOICEGATE_CONFIG", None)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--redis", redis_url], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT)

    def ready(self) -> dict[str, Any]:
        return httpx.get(self.base_url + "/readyz", timeout=10).json()

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"replica {self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def cluster_stats(self) -> dict[str, Any]:
        """``/admin/stats``: the counters summed over every replica sharing the Redis."""
        return httpx.get(self.base_url + "/admin/stats", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def seed_through_cli(csv: Path, redis_url: str) -> str:
    result = subprocess.run(
        # 25 questions cannot show a 1 % wrong-answer rate (one miss is 4 %): calibrate at 10 %.
        [sys.executable, "-m", "gateway.cli", "seed", str(csv), "--redis", redis_url, "--quiet",
         "--target-wrong-rate", "0.1"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("published "), result.stdout
    return result.stdout.split()[1].rstrip(":")


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.2)


async def ask(replica: Replica, question: str) -> dict[str, Any]:
    """One native-protocol text turn; the reply event."""
    async with Caller(replica.call_url) as caller:
        turn = await caller.say_text(question, timeout=120)
    response = turn.first("response")
    assert response is not None, turn.events
    return response


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = OwnRedis(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def replicas(own_redis: OwnRedis, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    started = [Replica(name, own_redis.url, tmp_path) for name in ("a", "b")]
    try:
        for replica in started:
            replica.wait_ready()
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.stop()


@pytest.mark.slow
async def test_replicas_share_one_cache_through_redis(own_redis: OwnRedis,
                                                      replicas: tuple[Replica, Replica],
                                                      tmp_path: Path) -> None:
    a, b = replicas
    assert a.ready()["store"] == "redis" and a.ready()["cache_version"] is None

    # A seed through the CLI is announced on the channel; both replicas load it.
    csv = tmp_path / "faq.csv"
    write_small_faq(csv)
    first = seed_through_cli(csv, own_redis.url)
    for replica in (a, b):
        await wait_until(lambda r=replica: r.ready()["cache_version"] == first,
                         f"replica {replica.name} serves {first}")
    hits = {"a": 0, "b": 0}
    for replica, question in ((b, "What are your opening hours?"), (b, "I forgot my password"),
                              (a, "What is your SWIFT code?")):
        response = await ask(replica, question)
        assert response["source"] == "cache", response
        hits[replica.name] += 1
    assert (await ask(b, "What are your opening hours?"))["text"] == FAQ["opening_hours"][0]
    hits["b"] += 1

    # The hit counts add up over the two processes.
    await wait_until(lambda: a.cluster_stats()["hits"] == 4 and a.cluster_stats()["replicas"] == 2,
                     "the cluster counts 4 hits from 2 replicas")
    cluster = b.cluster_stats()
    assert cluster["hits"] == 4 and cluster["entry_hits"]["opening_hours"] == 2
    assert a.cluster_stats()["entry_hits"] == cluster["entry_hits"]

    # Redis goes away: both keep serving the version they hold and say they are degraded.
    own_redis.stop()
    for replica in (a, b):
        await wait_until(lambda r=replica: r.ready()["degraded"] is True,
                         f"replica {replica.name} reports degraded")
        body = replica.ready()
        assert body["ready"] is True and "unreachable" in body["degraded_reason"]
        assert httpx.get(replica.base_url + "/readyz").status_code == 200
        assert (await ask(replica, "Where is the nearest ATM?"))["source"] == "cache"
        assert replica.cluster_stats()["degraded"] is True
    stats_while_down = a.cluster_stats()
    assert stats_while_down["replicas"] is None and stats_while_down["degraded_reason"]

    # Redis returns (same data directory): the replicas reconnect and are whole again.
    own_redis.start()
    for replica in (a, b):
        await wait_until(lambda r=replica: r.ready()["degraded"] is False,
                         f"replica {replica.name} recovers")
    # Counters recorded while Redis was down were buffered, not lost.
    await wait_until(lambda: a.cluster_stats()["hits"] == 6 and a.cluster_stats()["replicas"] == 2,
                     "the cluster counts all 6 hits again")
    assert a.cluster_stats()["entry_hits"]["find_atm"] == 2

    # A seed published after the restart reaches both; the first one survived it.
    write_small_faq(csv, answers={"opening_hours": "We now open at eight."})
    second = seed_through_cli(csv, own_redis.url)
    for replica in (a, b):
        await wait_until(lambda r=replica: r.ready()["cache_version"] == second,
                         f"replica {replica.name} serves {second}")
        assert (await ask(replica, "When are you open?"))["text"] == "We now open at eight."
    store = RedisStore(own_redis.url)
    assert store.versions() == sorted([first, second])
    name, old = store.read(first)
    assert name == first
    assert all(store.has_audio(e["audio_key"]) for e in old.manifest["entries"] if e["audio_key"])
    store.close()


@pytest.fixture
def cluster_prefix() -> Iterator[str]:
    yield from own_prefix("cluster-stats")


async def test_a_heartbeat_the_scan_returns_twice_counts_its_replica_once(
        cluster_prefix: str) -> None:
    """SCAN may return a key more than once (Redis documents it: the keyspace shrinking
    between two SCAN calls, e.g. Twilio context keys expiring, re-reports a bucket). That
    replica must not count twice in `replicas`, nor its calls in `active_calls`."""
    one = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=cluster_prefix,
                      replica_id="one", describe=lambda: {"active_calls": 2})
    two = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=cluster_prefix,
                      replica_id="two", describe=lambda: {"active_calls": 3})
    real_scan_iter = one._redis.scan_iter

    async def scan_iter_as_scan_may(*args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        seen: list[bytes] = []
        async for key in real_scan_iter(*args, **kwargs):
            seen.append(key)
            yield key
        for key in seen[:1]:  # the bucket of a key already returned, returned again
            yield key

    one._redis.scan_iter = scan_iter_as_scan_may  # type: ignore[method-assign]
    try:
        await one.heartbeat()
        await two.heartbeat()
        snapshot = await one.cluster_snapshot({"active_calls": 2})
    finally:
        await one.aclose()
        await two.aclose()
    assert (snapshot["replicas"], snapshot["active_calls"]) == (2, 5), (
        f"2 live replicas with 2 + 3 calls; /admin/stats says {snapshot['replicas']} "
        f"replicas, {snapshot['active_calls']} active calls")


async def test_a_foreign_heartbeat_with_an_infinite_figure_is_left_out(
        cluster_prefix: str) -> None:
    """docs/operations.md: a heartbeat that is not ours (a foreign type or value) is left out
    of the cluster stats, the rest summed. One whose active_calls is 1e999 (read as inf,
    which int() refuses with OverflowError) answered /admin/stats with a 500."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(cluster_prefix + "replica:by-hand", '{"active_calls": 1e999}')
    raw.close()
    ours = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=cluster_prefix,
                       replica_id="ours", describe=lambda: {"active_calls": 1})
    try:
        await ours.heartbeat()
        snapshot = await ours.cluster_snapshot({"active_calls": 1})
    finally:
        await ours.aclose()
    assert snapshot["scope"] == "cluster" and snapshot["active_calls"] == 1


async def test_the_cluster_counts_no_time_limit_stop_as_a_barge_in(cluster_prefix: str) -> None:
    """Review (stop 59): A reply the time limit stops is "no barge-in of the caller's"
    (docs/protocol.md, ``stopped_by``); Stats.turn_finished leaves it out of
    ``interrupted_turns`` and ``voicegate_barge_ins_total``. With Redis, /admin/stats
    answers the cluster's figure (SharedStats.cluster_snapshot), which
    SharedStats.turn_finished counts from ``interrupted`` alone: the same replica's
    /admin/stats says 1 barge-in with Redis and 0 without."""
    from gateway.redis_link import open_async_client

    stats = Stats()
    shared = SharedStats(open_async_client(REDIS_URL), prefix=cluster_prefix,
                         health=RedisHealth(), replica_id="review")
    stats.attach(shared)
    try:
        stats.turn_finished({"turn": 1, "source": "llm", "interrupted": True,
                             "stopped_by": "time_limit", "heard_ms": 30000.0})
        await shared.flush()
        local = stats.snapshot()
        cluster = await shared.cluster_snapshot(local)
    finally:
        await shared.aclose()
    assert cluster["scope"] == "cluster"
    assert local["interrupted_turns"] == 0
    assert cluster["interrupted_turns"] == local["interrupted_turns"], (
        f"a time-limit stop: the replica counts {local['interrupted_turns']} barge-ins, "
        f"the cluster {cluster['interrupted_turns']}")


async def test_the_cluster_chart_is_the_clusters_and_outlives_its_hour(cluster_prefix: str) -> None:
    """Review (stop 60): /admin/stats' counters are the cluster's, but its ``series`` (the
    dashboard's per-minute chart beside them) was the local Stats': behind a balancer each
    reload drew another replica's minutes under the cluster's figures, and no hour of the
    chart added up to them. The minute buckets in Redis (turns, hits) hold the cluster's
    minutes, but expired after 10 of the chart's 60: they must last its hour."""
    from gateway.redis_link import open_async_client
    from gateway.stats import SERIES_MINUTES

    stats = {name: Stats() for name in ("one", "two")}
    shared = {name: SharedStats(open_async_client(REDIS_URL), prefix=cluster_prefix,
                                health=RedisHealth(), replica_id=name) for name in stats}
    for name in stats:
        stats[name].attach(shared[name])
    for _ in range(2):
        stats["one"].turn_finished(hit("opening_hours"))
    for _ in range(3):
        stats["two"].turn_finished({"turn": 1, "source": "llm", "intent": "balance"})
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        for replica in shared.values():
            await replica.flush()
        # A foreign bucket (hits above its turns) draws no negative bar.
        foreign = int(time.time() // 60) - 30
        raw.hset(cluster_prefix + f"stats:minute:{foreign}", mapping={"turns": 1, "hits": 3})
        cluster = await shared["one"].cluster_snapshot(stats["one"].snapshot())
        buckets = [k for k in raw.keys(cluster_prefix + "stats:minute:*")
                   if not k.endswith(str(foreign).encode())]
        lifetimes = [raw.ttl(k) for k in buckets]
    finally:
        raw.close()
        for replica in shared.values():
            await replica.aclose()
    assert (cluster["scope"], cluster["hits"], cluster["misses"]) == ("cluster", 2, 3)
    points = cluster["series"]["points"]
    assert len(points) == SERIES_MINUTES
    assert all(p["hits"] >= 0 and p["misses"] >= 0 for p in points), points
    counted = [p for p in points if p["t"] != foreign * 60]
    assert (sum(p["hits"] for p in counted), sum(p["misses"] for p in counted)) == (2, 3), (
        "the chart beside the cluster's 2 hits and 3 misses drew one replica's minutes")
    assert cluster["replica_id"] == "one"  # whose latency and misses the page shows
    assert buckets and min(lifetimes) >= SERIES_MINUTES * 60, (
        f"a minute bucket expires after {min(lifetimes)} s: the chart shows an hour")


async def test_the_answering_replicas_own_active_calls_are_live_not_its_last_heartbeats(
        cluster_prefix: str) -> None:
    """Review (stop 64): with Redis, /admin/stats' ``active_calls`` (the dashboard's "Active
    calls") summed the replicas' heartbeats, the answering replica's own included: written
    every ``redis_heartbeat_s`` (5 s), it said 0 for up to 5 s after a call began on the
    very replica answering, and 1 as long after it ended, though that replica's own figure
    (its ``Stats``, ``voicegate_active_calls``) was exact. Other replicas' come from their
    heartbeats; its own is its live count, and it is one of the replicas answering."""
    stats = Stats()
    ours = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=cluster_prefix,
                       replica_id="ours", describe=lambda: {"active_calls": stats.active_calls})
    other = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=cluster_prefix,
                        replica_id="other", describe=lambda: {"active_calls": 3})
    stats.attach(ours)
    try:
        await ours.heartbeat()  # 0 calls here
        await other.heartbeat()
        stats.call_started()  # a call begins here, before this replica's next heartbeat
        await ours.flush()
        begun = await ours.cluster_snapshot(stats.snapshot())
        await ours.heartbeat()  # 1 call here
        stats.call_ended()
        await ours.flush()
        ended = await ours.cluster_snapshot(stats.snapshot())
    finally:
        await ours.aclose()
        await other.aclose()
    assert (begun["replicas"], begun["active_calls"]) == (2, 4), (
        f"1 call here and 3 on the other replica; /admin/stats says {begun['active_calls']}")
    assert stats.prometheus.registry.get_sample_value("voicegate_active_calls") == 0
    assert (ended["replicas"], ended["active_calls"]) == (2, 3), (
        f"the call here ended, 3 on the other replica; /admin/stats says "
        f"{ended['active_calls']}")


# -- bounded intent cardinality -------------------------------------------------------------

def _intent_series(stats: Stats) -> set[str]:
    return {s.labels["intent"] for metric in stats.prometheus.intents.collect()
            for s in metric.samples if s.name == "voicegate_intent_turns_total"}


def test_intent_labels_are_bounded_to_the_served_version() -> None:
    """Review (stop 64): voicegate_intent_turns_total{intent} and /admin/stats' intents
    took every intent name ever routed as a label, with no bound: a seed of tens of
    thousands of intents, or re-seeds renaming intents, grew the series for the process's
    life. Only the served version's intents (the first MAX_INTENT_SERIES of them) have a
    series; others count under OTHER_INTENT, and a new version drops the series of intents
    it no longer holds."""
    from gateway.stats import MAX_INTENT_SERIES, OTHER_INTENT
    stats = Stats()
    stats.entries_published({"a": "m", "b": "m"}, "v1", intents=["opening_hours", "balance"])
    stats.turn_finished(hit("opening_hours"))
    stats.turn_finished({"source": "llm", "hit": False, "intent": "balance"})
    stats.turn_finished({"source": "llm", "hit": False, "intent": "renamed_away"})
    assert _intent_series(stats) == {"opening_hours", "balance", OTHER_INTENT}
    assert stats.snapshot()["intents"] == {"opening_hours": 1, "balance": 1, OTHER_INTENT: 1}
    stats.entries_published({"b": "m"}, "v2", intents=["balance"])
    assert _intent_series(stats) == {"balance", OTHER_INTENT}
    assert stats.snapshot()["intents"] == {"balance": 1, OTHER_INTENT: 1}
    many = [f"intent_{n}" for n in range(MAX_INTENT_SERIES + 500)]
    stats.entries_published({}, "v3", intents=many)
    for name in many:
        stats.turn_finished({"source": "llm", "hit": False, "intent": name})
    assert len(_intent_series(stats)) == MAX_INTENT_SERIES + 1
    assert len(stats.snapshot()["intents"]) == MAX_INTENT_SERIES + 1
    fresh = Stats()  # no version known yet: the first MAX_INTENT_SERIES names seen
    for name in many:
        fresh.turn_finished({"source": "llm", "hit": False, "intent": name})
    assert len(_intent_series(fresh)) == MAX_INTENT_SERIES + 1


def test_a_real_intent_named_like_the_overflow_bucket_keeps_a_label_of_its_own() -> None:
    """Review (stop 65): an operator's seed may name an intent ``__other__`` (seeding takes
    any printable name), and its turns were counted under OTHER_INTENT, the overflow bucket's
    label: in voicegate_intent_turns_total, /admin/stats' intents and the cluster's
    stats:intents hash the real intent and the overflow shared one count, and neither could
    be told from the other. A real intent never shares the overflow's label: one named
    ``__other__`` (or ``___other___``, ...) is labelled with one more underscore each side;
    every other name keeps its label, and the labels stay bounded."""
    from gateway.stats import OTHER_INTENT
    assert OTHER_INTENT == "__other__"
    stats = Stats()
    stats.entries_published({}, "v1", intents=["balance", "__other__", "___other___"])
    for name in ("balance", "__other__", "___other___", "not_served"):
        stats.turn_finished({"source": "llm", "hit": False, "intent": name})
    expected = {"balance": 1, "___other___": 1, "____other____": 1, OTHER_INTENT: 1}
    assert stats.snapshot()["intents"] == expected
    assert _intent_series(stats) == set(expected)
    stats.entries_published({}, "v2", intents=["balance", "__other__"])  # kept: still served
    assert stats.snapshot()["intents"] == {"balance": 1, "___other___": 1, OTHER_INTENT: 1}
    assert _intent_series(stats) == {"balance", "___other___", OTHER_INTENT}
    fresh = Stats()  # no version known yet: the names seen are escaped the same way
    fresh.turn_finished({"source": "llm", "hit": False, "intent": "__other__"})
    assert fresh.snapshot()["intents"] == {"___other___": 1}
    from gateway.stats import intent_label
    assert [intent_label(n) for n in ("other", "_other_", "__other___", "x__other__")] == \
        ["other", "_other_", "__other___", "x__other__"]

    class Recorded:  # the cluster's counters: what the pending increments and the prune name
        def __init__(self) -> None:
            self.args: tuple[Any, ...] = ()

        async def eval(self, *args: Any) -> int:
            self.args = args
            return 1

    redis_client = Recorded()
    shared = SharedStats(redis_client, prefix="vgtest:")  # type: ignore[arg-type]
    shared.entries_published({}, "v1", intents=["balance", "__other__"])
    for name in ("balance", "__other__", "not_served"):
        shared.turn_finished({"source": "llm", "hit": False, "intent": name})
    assert {f for (key, f) in shared._pending if key == "vgtest:stats:intents"} == \
        {"balance", "___other___", OTHER_INTENT}
    asyncio.run(shared._flush_marks())
    _script, key_count, *rest = redis_client.args
    _version, name_count, *rest = rest[key_count:]
    kept = rest[:name_count]  # the names the intents hash is pruned to
    assert sorted(kept) == sorted(["balance", "___other___", OTHER_INTENT])


async def test_the_cluster_intents_hash_is_bounded_and_pruned_on_publish(redis_url: str) -> None:
    """Review (stop 64): the shared stats:intents hash kept every intent ever routed, in
    Redis for good. Intents the served version does not hold count under OTHER_INTENT, and
    a version's publish prunes the hash to its intents."""
    from gateway.stats import OTHER_INTENT
    stats = SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
    for name in ("opening_hours", "balance", "old_name"):
        stats.turn_finished({"source": "llm", "hit": False, "intent": name})
    await stats.flush()
    stats.entries_published({"opening_hours": "m"}, "", intents=["opening_hours"])
    stats.turn_finished({"source": "llm", "hit": False, "intent": "balance"})
    stats.turn_finished(hit("opening_hours"))
    await stats.flush()
    cluster = await stats.cluster_snapshot({"latency_ms": {}})
    assert cluster["intents"] == {"opening_hours": 2, OTHER_INTENT: 1}, cluster
    await stats.aclose()


async def test_an_intent_a_lagging_replica_counts_after_the_prune_is_not_shown_by_name(
        redis_url: str) -> None:
    """Review (stop 68): the first replica to load a version prunes the cluster's intents to
    its own, but a replica still loading it (seconds: its audio, its router) routes with the
    version before and counts the intents the new one dropped or renamed by name, after the
    prune: /admin/stats' intents showed them until the next publish, though only the serving
    version's intents are counted by name (docs/operations.md). The cluster view counts an
    intent the answering replica's version does not hold under OTHER_INTENT, as it counts
    only that version's entries in entry_hits."""
    from gateway.stats import OTHER_INTENT
    first, lagging = (SharedStats(aioredis.Redis.from_url(redis_url), prefix="vgtest:")
                      for _ in range(2))
    for replica in (first, lagging):
        replica.entries_published({}, "v1", intents=["opening_hours", "find_atm"])
        await replica.flush()
    first.entries_published({}, "v2", intents=["opening_hours", "cash_machine"])  # renamed
    await first.flush()  # the prune: find_atm is gone
    lagging.turn_finished({"source": "llm", "hit": False, "intent": "find_atm"})  # still v1
    first.turn_finished({"source": "llm", "hit": False, "intent": "cash_machine"})
    await lagging.flush()
    await first.flush()
    cluster = await first.cluster_snapshot({"latency_ms": {}})
    assert cluster["intents"] == {"cash_machine": 1, OTHER_INTENT: 1}, cluster
    for replica in (first, lagging):
        await replica.aclose()
