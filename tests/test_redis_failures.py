"""Redis misbehaving as operators meet it: down, stalled, a silently dead link, foreign or
corrupt values under the project's keys. Every replica keeps serving what it has, every
operator gets a clear error, no published version is damaged, no counter counts twice.

Redis: the suite's database (tests/test_redis.py: 127.0.0.1:6379, database 13); each test
keeps to a key prefix of its own and deletes its keys. tests/redis_faults.FlakyProxy
stands between a client and Redis where a test needs a stall or a dead link;
tests/redis_faults.StartingRedis and MisconfRedis are redis-servers of a test's own, one
restarted into a real LOADING state that lasts until the test ends it, one refusing writes
with a real MISCONF (its snapshot cannot be written) until the test heals it.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import shutil
import threading
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from starlette.testclient import TestClient

import gateway.faq_cache as faq_cache
from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.faq_cache import FaqCache
from gateway.redis_link import RedisHealth, VersionSubscriber, failure_said, open_async_client
from gateway.services import Services
from gateway.settings import Settings
from gateway.shared_stats import SharedStats
from gateway.stats import answer_mark
from cache_seed import parse_seed_csv, seed_plan
from gateway.admin.publish import Publisher
from gateway.admin.routes import _publish_failed
from intents.redis_store import RedisKeys, RedisStore
from intents.store import (MANIFEST_FORMAT, LocalStore, PublishUnconfirmed, StoreConflict,
                           StoreError, StoreUnavailable)
from tests.admin_support import small_faq_csv
from tests.intents_support import shared_embedder, tone_render
from intents.types import Audio
from tests.redis_faults import (DelayingProxy, FlakyProxy, MisconfRedis, ReadRefusingRedis,
                                StartingRedis)
from tests.test_redis import OwnRedis
from tests.test_redis import (REDIS_URL, bundle, free_port, hit, own_prefix, poll,
                              unavailable)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own in the suite's Redis database (keys deleted after)."""
    yield from own_prefix("faults")


@pytest.fixture
def proxy() -> Iterator[FlakyProxy]:
    p = FlakyProxy(REDIS_URL)
    yield p
    p.close()


# --------------------------------------------------------------------------------------
# Publishing through the admin API while Redis is unreachable answers a clear error (503,
# JSON, the store's reason, "the previous version keeps serving"), never a bare 500.

TOKEN = "hunt-token"
CSV = ("question,answer,intent,action\n"
       "When are you open?,We open at nine.,opening_hours,\n"
       "What are your opening hours?,,opening_hours,\n")


@pytest.fixture
def client_with_redis_down(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "admin_token": TOKEN, "redis_url": dead}, environ={})
    services = Services(settings)
    tts = SimpleNamespace(name="fake", voice_id="fake", sample_rate=16000,
                          synthesize_all=lambda text: b"\x00\x00" * 160)
    # A warm replica (models loaded) whose Redis has gone away; no lifespan is run.
    services._runtime = SimpleNamespace(stats=services.stats, tts=tts, embedder=None,
                                        load_times_s={})
    services.responder = object()
    services.cache = FaqCache(RedisStore(dead, timeout_s=0.5), embedder=None)
    client = TestClient(create_app(settings, services=services), raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    return client


@pytest.mark.parametrize("method,path,kwargs", [
    ("POST", "/admin/seed", {"content": CSV, "headers": {"Content-Type": "text/csv"}}),
    ("POST", "/admin/entries", {"json": {"intent": "opening_hours", "answer": "Nine.",
                                         "questions": ["When are you open?", "What are your opening hours?"]}}),
])
def test_publishing_with_redis_down_is_a_clear_error(client_with_redis_down, method, path,
                                                     kwargs):
    response = client_with_redis_down.request(method, path, **kwargs)
    assert response.headers["content-type"].startswith("application/json"), (
        f"{method} {path} with Redis down answered {response.status_code} "
        f"{response.headers['content-type']}: {response.text[:200]!r}")
    assert "unreachable" in response.json()["error"]


# --------------------------------------------------------------------------------------
# A corrupt or foreign value under the current version's key is refused clearly (the
# replica keeps serving what it has, or, at start-up, is ready without a cache and tries
# again later), as a missing version is: never an exception out of refresh().

def vectors() -> bytes:
    out = io.BytesIO()
    np.save(out, np.zeros((1, 4), np.float32))
    return out.getvalue()


@pytest.mark.parametrize("manifest", [
    json.dumps(["not", "an", "object"]),
    json.dumps({"format": MANIFEST_FORMAT}),  # a foreign/partial manifest: no questions
    json.dumps({"format": MANIFEST_FORMAT, "questions": [{"text": "hi", "intent": "x"}],
                "entries": "none"}),
], ids=["list", "no-questions", "entries-not-a-list"])
def test_a_corrupt_current_version_is_a_clear_load_error(prefix: str, manifest: str) -> None:
    raw = redis.Redis.from_url(REDIS_URL)
    raw.hset(prefix + "version:broken", mapping={"manifest": manifest, "vectors": vectors(),
                                                 "classifier": b""})
    raw.set(prefix + "current", "broken")
    raw.close()
    store = RedisStore(REDIS_URL, prefix=prefix)
    cache = FaqCache(store, SimpleNamespace(model_name="m", dim=4))
    try:
        loaded = cache.refresh()
    finally:
        store.close()
    assert loaded is False and cache.version is None
    assert cache.last_error is not None and "broken" in cache.last_error


def test_an_unreadable_current_pointer_is_a_clear_store_error(prefix: str) -> None:
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "current", b"\xff\xfe-set-by-hand")
    raw.close()
    store = RedisStore(REDIS_URL, prefix=prefix)
    cache = FaqCache(store, SimpleNamespace(model_name="m", dim=4))
    try:
        with pytest.raises(StoreError, match="current-version pointer .*current.* cannot be "):
            store.current_version()
        assert cache.refresh() is False and cache.version is None
    finally:
        store.close()
    assert cache.last_error is not None and "current-version pointer" in cache.last_error
    # Review (stop 59): Redis answered, so this is no outage. It was reported as "store
    # unavailable" with store_unanswered True: a replica starting now stayed unready for
    # good (services._load retries for ever), where a bad version leaves it ready without
    # a cache.
    assert not cache.last_error.startswith("store unavailable"), cache.last_error
    assert cache.store_unanswered is False


# --------------------------------------------------------------------------------------
# The FAQ cache is refreshed from several threads (the subscriber, the safety poll, the
# admin publisher): a slow load of an older version never replaces a newer one.

class PointerStore:
    def __init__(self) -> None:
        self.current = "v1"

    def current_version(self) -> str:
        return self.current


def test_a_slow_load_of_an_older_version_never_replaces_a_newer_one(monkeypatch) -> None:
    store = PointerStore()
    inside_v1, release_v1 = threading.Event(), threading.Event()

    def load_cache(store_, embedder, version):
        if version == "v1":  # a slow load (Redis answering slowly)
            inside_v1.set()
            release_v1.wait(10)
        return SimpleNamespace(version=version, entries={})

    monkeypatch.setattr(faq_cache, "load_cache", load_cache)
    cache = FaqCache(store, embedder=None)
    poll = threading.Thread(target=cache.refresh)  # e.g. the safety poll
    poll.start()
    assert inside_v1.wait(10)
    store.current = "v2"  # published meanwhile
    heard = threading.Thread(target=cache.refresh)  # the subscriber hears v2
    heard.start()
    heard.join(0.5)
    release_v1.set()
    poll.join(10)
    heard.join(10)
    assert cache.version == "v2", f"current is v2 but the replica serves {cache.version}"


# --------------------------------------------------------------------------------------
# A pub/sub link that dies silently (a failover, a NAT or balancer reset: no RST, no FIN)
# is found by its unanswered PING, replaced, and the versions published meanwhile caught up.

async def test_a_silently_dead_subscription_is_detected_and_replaced(prefix: str,
                                                                    proxy: FlakyProxy) -> None:
    direct = RedisStore(REDIS_URL, prefix=prefix)
    seen: list[str | None] = []

    async def refresh() -> None:
        seen.append(await asyncio.to_thread(direct.current_version))

    health = RedisHealth()
    ping_s = 0.3
    task = asyncio.create_task(VersionSubscriber(proxy.url, RedisKeys(prefix), refresh, health,
                                                 ping_s=ping_s).run())
    try:
        await poll(lambda: seen == [None], "the catch-up refresh on subscribing", 10)
        proxy.kill_existing_silently()  # the subscriber's socket is now a black hole
        await asyncio.sleep(ping_s * 3)  # several pings go unanswered
        version = await asyncio.to_thread(direct.publish, bundle("published while dead"))
        # A fix notices the missing PONG within a ping or two, resubscribes on a new
        # connection (the proxy accepts new ones) and catches up with the version.
        await poll(lambda: version in seen, f"the subscriber, its socket dead (pinged every "
                   f"{ping_s} s), hears {version} on a new one", 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        direct.close()


# --------------------------------------------------------------------------------------
# A subscription counts as up once Redis confirms it, not once the command is sent.

class _RecordedHealth(RedisHealth):
    """RedisHealth that keeps every report, in order (a change-only callback would miss an
    "up" that the next "down" overwrites at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[str, str]] = []

    def down(self, who: str, why: str) -> None:
        self.reports.append(("down", why))
        super().down(who, why)

    def up(self, who: str) -> None:
        self.reports.append(("up", ""))
        super().up(who)


async def test_a_subscription_redis_refuses_is_never_reported_healthy(prefix: str) -> None:
    # An ACL user that may read keys but not subscribe (Redis 7 grants new users no
    # channels): Redis refuses the SUBSCRIBE. The link must stay down, saying why, on
    # every attempt; before, it reported healthy as soon as the command was sent.
    admin = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    user = f"vg_nochannel_{secrets.token_hex(3)}"
    admin.acl_setuser(user, enabled=True, passwords=[f"+{user}"], keys=["*"],
                      commands=["+@all"])
    url = REDIS_URL.replace("redis://", f"redis://{user}:{user}@", 1)

    async def refresh() -> None:
        pass

    health = _RecordedHealth()
    task = asyncio.create_task(VersionSubscriber(url, RedisKeys(prefix), refresh, health,
                                                 ping_s=2.0).run())
    try:
        await poll(lambda: sum(kind == "down" for kind, _ in health.reports) >= 3,
                   "three refused attempts to subscribe", 10)
        assert ("up", "") not in health.reports, health.reports
        reason = health.reason or ""
        assert health.degraded and "refused: NoPermissionError" in reason, reason
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        admin.acl_deluser(user)
        admin.close()


# --------------------------------------------------------------------------------------
# A publish never leaves `current` naming a deleted version: a pointer swap that timed out
# may still have been applied (a stalled Redis works off its queue), and MULTI/EXEC never
# rolls back; the swap checks every key before writing, and the clean-up of a failed publish
# deletes the version only if the pointer does not name it.


def test_a_stalled_pointer_swap_never_leaves_current_naming_a_deleted_version(
        prefix: str, proxy: FlakyProxy) -> None:
    direct = RedisStore(REDIS_URL, prefix=prefix)
    old = direct.publish(bundle("old"))
    store = RedisStore(proxy.url, prefix=prefix, timeout_s=0.3)
    swap = store._swap_pointer

    def swap_while_redis_stalls(version: str, replaces: object) -> None:
        proxy.stall()  # Redis stops answering: MULTI..EXEC is queued, the client times out
        try:
            swap(version, replaces)  # type: ignore[arg-type]
        finally:
            proxy.resume()  # ... and Redis works off its queue: the EXEC is applied

    store._swap_pointer = swap_while_redis_stalls  # type: ignore[method-assign]
    try:
        store.publish(bundle("new"))  # may fail (it timed out) or find out it went through
    except StoreError:
        pass
    finally:
        store.close()
    assert_current_is_whole(direct, prefix, old)


def test_a_foreign_published_key_never_leaves_current_naming_a_deleted_version(
        prefix: str) -> None:
    """``<prefix>published`` holding a string (an operator's SET): a transaction would set
    `current` and announce it, fail only the ZADD, and the clean-up would then delete the
    version replicas were told to load. The publish is refused before anything is written."""
    direct = RedisStore(REDIS_URL, prefix=prefix)
    old = direct.publish(bundle("old"))
    raw = redis.Redis.from_url(REDIS_URL)
    raw.delete(prefix + "published")
    raw.set(prefix + "published", "oops")
    raw.close()
    try:
        direct.publish(bundle("new"))  # refused clearly, or published whole
    except StoreError:
        pass
    assert_current_is_whole(direct, prefix, old)


@pytest.fixture
def delaying_proxy() -> Iterator[DelayingProxy]:
    p = DelayingProxy(REDIS_URL)
    yield p
    p.close()


def test_a_pointer_swap_delivered_after_the_clean_up_leaves_current_naming_a_deleted_version(
        prefix: str, delaying_proxy: DelayingProxy) -> None:
    """An operator seeds while the network to Redis loses packets: the swap times out (and
    its retries), `voicegate seed` says "the previous version keeps serving", and the
    clean-up, on a fresh connection that gets through, deletes the new version's hash. Then
    the delayed swap arrives: `current` now names a version that no longer exists, its name
    is announced to every replica, none can load it, a replica started now has no cache at
    all, and every admin entry edit is refused. The swap must never move the pointer to a
    version whose hash is gone (check it in the script), so the published cache stays whole."""
    direct = RedisStore(REDIS_URL, prefix=prefix)
    old = direct.publish(bundle("old"))
    store = RedisStore(delaying_proxy.url, prefix=prefix, timeout_s=0.3)
    swap = store._swap_pointer

    def swap_over_a_lossy_network(version: str, replaces: object) -> None:
        delaying_proxy.hold()  # what is sent from now on is delayed in the network
        try:
            swap(version, replaces)  # type: ignore[arg-type]
        finally:
            delaying_proxy.admit_new()  # the network recovers: new connections get through

    store._swap_pointer = swap_over_a_lossy_network  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreError, match="unreachable"):
            store.publish(bundle("new"))
        assert direct.current_version() == old  # as reported: the old version serves
        delaying_proxy.release()  # ... and the delayed swap reaches Redis
        for link in delaying_proxy.held:
            assert link.replied.wait(10), "a delayed command was never answered by Redis"
    finally:
        store.close()
    current = direct.current_version()
    try:
        name, _ = direct.read()
    except StoreError as exc:
        pytest.fail(f"after a publish reported as failed, `current` = {current} (was {old}) "
                    f"names a version that cannot be read: {exc}")
    finally:
        direct.close()
    assert name == current


def test_a_swap_whose_outcome_is_unknown_is_not_reported_as_nothing_published(
        prefix: str, delaying_proxy: DelayingProxy) -> None:
    """The swap reaches Redis late, and Redis stays unreachable for the failed publish's
    clean-up too (nothing got through to delete the hash): the publisher cannot know whether
    the pointer moved. The delayed swap then moves it (the hash still exists), other replicas
    load the version, and the operator, told "nothing published, the previous version keeps
    serving", seeds again or gives up on an edit that is live. An unknown outcome must be
    said as such."""
    direct = RedisStore(REDIS_URL, prefix=prefix)
    old = direct.publish(bundle("old"))
    store = RedisStore(delaying_proxy.url, prefix=prefix, timeout_s=0.3)
    swap = store._swap_pointer

    def swap_as_the_network_fails(version: str, replaces: object) -> None:
        delaying_proxy.hold()  # from now on nothing gets through, the clean-up neither
        swap(version, replaces)  # type: ignore[arg-type]

    store._swap_pointer = swap_as_the_network_fails  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreError) as failed:
            store.publish(bundle("new"))
        first = delaying_proxy.held[0]  # the connection the swap was first sent on
        first.replied.clear()  # (it answered the version's write before)
        first.gate.set()  # ... delivered late, before anything sent after it
        assert first.replied.wait(10), "the delayed swap was never answered by Redis"
        delaying_proxy.release()
    finally:
        store.close()
    current = direct.current_version()
    direct.close()
    assert current != old  # the delayed swap published the version
    services = SimpleNamespace(cache=SimpleNamespace(version=old))
    answer = _publish_failed(failed.value, services)  # type: ignore[arg-type]
    body = json.loads(answer.body)
    assert "nothing published" not in body["error"], body["error"]
    assert "unknown" in body["error"] and answer.status_code == 503


def assert_current_is_whole(direct: RedisStore, prefix: str, old: str) -> None:
    current = direct.current_version()
    try:
        name, _ = direct.read()  # whatever `current` names must be whole
    except StoreError as exc:
        raw = redis.Redis.from_url(REDIS_URL)
        versions = sorted(k.decode() for k in raw.keys(prefix + "version:*"))
        raw.close()
        pytest.fail(f"the failed publish left `current` = {current} (was {old}) naming a "
                    f"deleted version ({exc}); version keys left: {versions}")
    assert name == current
    direct.close()


# --------------------------------------------------------------------------------------
# Shared counters: a batch is applied at most once (a flush that timed out but was applied
# is not written again), an increment that cannot be applied (a foreign value) is dropped
# and counted, and a foreign counter field or heartbeat never breaks /admin/stats.

async def test_a_foreign_key_does_not_make_the_other_counters_count_again(prefix: str) -> None:
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "stats:errors", "reset by hand")  # a string where a hash belongs
    stats = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=prefix,
                        health=RedisHealth())
    stats.call_started()
    stats.turn_finished(hit("opening_hours"))
    stats.error("bad_frame")  # the one increment that cannot be written
    for _ in range(4):  # one second of the flusher's life
        try:
            await stats.flush()
        except redis.RedisError:
            pass
    totals = {k.decode(): int(v) for k, v in raw.hgetall(prefix + "stats:totals").items()}
    raw.close()
    await stats.aclose()
    assert totals == {"calls": 1, "turns": 1, "hits": 1}, (
        f"one call with one hit turn, counted {totals}")


async def test_a_cancel_a_redis_call_swallowed_still_stops_the_counter_flusher(
        prefix: str) -> None:
    """redis-py sends each command under asyncio.wait_for, which on Python 3.11 drops a
    cancel that lands in the step the send completes. The flusher then looped on, and the
    replica's shutdown, which cancels it and waits for it, waited for good. (CI hung 300 s
    once on the heartbeat test below: its flusher, cancelled in its tenth flush, flushed
    again and parked.) A cancel the task still counts now stops the loop."""
    stats = SharedStats(open_async_client(REDIS_URL), prefix=prefix, health=RedisHealth(),
                        replica_id="r", flush_s=0.01, describe=dict)
    flushes = 0
    in_flush = asyncio.Event()

    async def flush_that_swallows_a_cancel() -> None:  # as wait_for does, in that step
        nonlocal flushes
        flushes += 1
        in_flush.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if flushes > 1:
                raise  # only the first: a later cancel ends a regressed test

    async def heartbeat() -> None:
        return None

    stats.flush = flush_that_swallows_a_cancel  # type: ignore[method-assign]
    stats.heartbeat = heartbeat  # type: ignore[method-assign]
    task = asyncio.create_task(stats.run())
    await in_flush.wait()
    task.cancel()
    # Bounded only so that a regression fails instead of hanging the suite.
    done, _ = await asyncio.wait({task}, timeout=10)
    if not done:
        task.cancel()  # the second flush waits on: this cancel reaches it
    await asyncio.gather(task, return_exceptions=True)
    await stats.aclose()
    assert done and task.cancelled(), "the cancelled flusher went on"
    assert flushes == 1


async def test_one_foreign_counter_key_stops_a_busy_replicas_heartbeat(
        prefix: str) -> None:
    """Someone reset `stats:sources` by hand (a string where a hash belongs). Every flush
    that carries a finished turn now ends in the refused increment's error, and the flusher
    then skips the heartbeat: as long as calls keep finishing turns this replica writes no
    heartbeat, so the cluster view counts one replica fewer and leaves its active calls
    out, and /readyz calls it degraded although Redis answers. The refused increment
    should be dropped and counted (as documented) without costing the replica its
    heartbeat."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "stats:sources", "reset by hand")
    health = RedisHealth()
    stats = SharedStats(open_async_client(REDIS_URL), prefix=prefix, health=health,
                        replica_id="busy", flush_s=0.01, describe=lambda: {"active_calls": 40})
    flushing = stats.flush
    flushes = 0

    async def flush_after_a_turn() -> None:  # a turn finished since every previous flush
        nonlocal flushes
        if flushes == 10:
            await asyncio.Event().wait()  # enough: park here until cancelled
        flushes += 1
        stats.turn_finished({"source": "llm", "intent": "balance"})
        await flushing()

    stats.flush = flush_after_a_turn  # type: ignore[method-assign]
    task = asyncio.create_task(stats.run())
    try:
        await poll(lambda: flushes >= 10, "ten flushes")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    try:
        written = int(raw.hget(prefix + "stats:totals", "turns") or 0)
        beat = raw.get(prefix + "replica:busy")
    finally:
        raw.close()
        await stats.aclose()
    assert written >= 9  # Redis answers: the rest of every batch is written
    assert beat is not None, (
        f"Redis is reachable and {written} turns were written, yet the replica wrote no "
        f"heartbeat in {flushes} flushes (degraded: {health.reason})")


async def test_entry_marks_refused_by_a_read_only_replica_are_written_once_redis_writes(
        prefix: str) -> None:
    """During a failover Redis answers a write with READONLY (a ResponseError, not a
    connection error). The marks of the version this replica loaded were dropped then, as
    if a foreign value had refused them: the entries' hits were never reset for that
    version. A refusal that says "not now" keeps them for the next flush."""
    client = aioredis.Redis.from_url(REDIS_URL)
    real_eval = client.eval
    refusals = 1

    async def eval_read_only_once(*args):
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise redis.exceptions.ReadOnlyError("You can't write against a read only replica.")
        return await real_eval(*args)

    client.eval = eval_read_only_once  # type: ignore[method-assign]
    stats = SharedStats(client, prefix=prefix)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        stats.entries_published({"opening_hours": answer_mark("answer", "Nine to five.")})
        with pytest.raises(redis.RedisError):
            await stats.flush()
        assert raw.hgetall(prefix + "stats:entry_marks") == {}
        await stats.flush()
        marks = raw.hgetall(prefix + "stats:entry_marks")
    finally:
        raw.close()
        await stats.aclose()
    assert marks == {b"opening_hours": answer_mark("answer", "Nine to five.").encode()}


async def test_a_foreign_counter_key_keeps_the_replica_degraded_not_flapping(
        prefix: str) -> None:
    """Review (stop 68): a counters key overwritten by hand refuses every increment to it,
    yet the replica was degraded only until its next flush with nothing to write (a quarter
    of a second later): on a quiet line each turn logged `redis_degraded` then
    `redis_recovered`, and `/readyz` and `voicegate_degraded` flapped (an alert on it too),
    the key named for a moment only. It stays degraded, naming the key, until an increment
    to that key is written or the key is gone (its heartbeat looks)."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "stats:sources", "reset by hand")
    changes: list[str | None] = []
    stats = SharedStats(open_async_client(REDIS_URL), prefix=prefix,
                        health=RedisHealth(on_change=changes.append), flush_s=0.01,
                        heartbeat_s=0.05)
    flushing = stats.flush
    flushes = 0

    async def counted_flush() -> None:
        nonlocal flushes
        flushes += 1
        await flushing()

    stats.flush = counted_flush  # type: ignore[method-assign]
    task = asyncio.create_task(stats.run())
    try:
        await poll(lambda: flushes >= 2, "the flusher running")
        stats.turn_finished({"source": "llm", "intent": "balance"})  # one quiet turn
        await poll(lambda: changes, "the refused increment reported")
        seen = flushes
        await poll(lambda: flushes >= seen + 10, "ten flushes with nothing to write")
        assert changes == [changes[0]] and "stats:sources" in str(changes[0]), changes
        raw.delete(prefix + "stats:sources")  # fixed by hand; no turn since
        await poll(lambda: changes[-1] is None, "healthy once the key is gone")
        assert len(changes) == 2, changes
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raw.close()
        await stats.aclose()


async def test_a_foreign_counter_key_does_not_hold_back_the_entry_marks(prefix: str) -> None:
    """A counters key someone overwrote by hand refuses its increment at every flush (the
    rest of the batch is written). The marks of a newly loaded version came after the counts
    in the same flush, so a replica that kept counting errors never wrote them."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "stats:errors", "reset by hand")
    stats = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=prefix)
    try:
        stats.entries_published({"opening_hours": answer_mark("answer", "Nine to five.")})
        stats.error("bad_frame")  # refused by the foreign value
        with pytest.raises(redis.RedisError):
            await stats.flush()
        marks = raw.hgetall(prefix + "stats:entry_marks")
    finally:
        raw.close()
        await stats.aclose()
    assert marks == {b"opening_hours": answer_mark("answer", "Nine to five.").encode()}


@pytest.mark.parametrize("key,write", [
    ("stats:entries", lambda raw, key: raw.hset(key, "opening_hours", "lots")),
    ("replica:by-hand", lambda raw, key: raw.set(key, "alive")),
], ids=["non-integer-counter-field", "foreign-heartbeat"])
async def test_a_foreign_value_does_not_break_the_cluster_stats(prefix: str, key: str,
                                                                write) -> None:
    raw = redis.Redis.from_url(REDIS_URL)
    write(raw, prefix + key)
    raw.close()
    stats = SharedStats(aioredis.Redis.from_url(REDIS_URL), prefix=prefix)
    try:
        snapshot = await stats.cluster_snapshot({"hits": 1})
    finally:
        await stats.aclose()
    assert snapshot["hits"] is not None


async def test_one_foreign_counter_key_takes_the_whole_cluster_view_down(
        prefix: str) -> None:
    """Someone reset `stats:errors` by hand (a string where a hash belongs: the very case
    tests/test_redis_failures.py writes counters around). /admin/stats then reads the
    counters hashes in one pipeline, the HGETALL of that key fails with WRONGTYPE, and the
    whole answer falls back to this replica's own figures, `degraded: true`,
    `replicas: null`: every other replica's calls and hits vanish from the dashboard
    although Redis answers. As documented for foreign fields and heartbeats, what is not
    ours should be left out, and the rest summed over the cluster."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "stats:errors", "reset by hand")
    other = SharedStats(open_async_client(REDIS_URL), prefix=prefix, replica_id="other")
    this = SharedStats(open_async_client(REDIS_URL), prefix=prefix, replica_id="this")
    try:
        for _ in range(3):
            other.turn_finished(hit("opening_hours"))
        await other.flush()
        await other.heartbeat()
        await this.heartbeat()
        snapshot = await this.cluster_snapshot({"hits": 0, "turns": 0})
    finally:
        raw.close()
        await other.aclose()
        await this.aclose()
    assert snapshot["scope"] == "cluster" and snapshot["hits"] == 3, (
        f"Redis answers and holds 3 hits from 2 replicas, /admin/stats says scope "
        f"{snapshot['scope']!r}, hits {snapshot['hits']}, replicas {snapshot['replicas']}, "
        f"degraded: {snapshot.get('degraded_reason')}")


async def test_a_flush_that_timed_out_but_was_applied_is_not_written_twice(prefix: str,
                                                                          proxy) -> None:
    """A stalled Redis: the client times out, Redis applies the queued batch when it
    resumes, and the retry of that batch must not apply it a second time."""

    raw = redis.Redis.from_url(REDIS_URL)
    stats = SharedStats(open_async_client(proxy.url, timeout_s=0.3), prefix=prefix)
    stats.turn_finished(hit("opening_hours"))
    await stats.flush()  # connected and warm
    stats.turn_finished(hit("opening_hours"))
    proxy.stall()
    try:
        await stats.flush()
    except redis.RedisError:
        pass
    finally:
        proxy.resume()
    await stats.flush()  # Redis answers again
    hits = int(raw.hget(prefix + "stats:totals", "hits") or 0)
    raw.close()
    await stats.aclose()
    assert hits == 2, f"two hit turns, counted {hits}"


async def test_a_batch_applied_before_a_long_partition_is_counted_again_after_it(
        prefix: str, proxy: FlakyProxy) -> None:
    """A replica flushes its counters just as the network to Redis partitions: Redis applies
    the batch, the reply is lost, the replica keeps the batch to retry it. The partition
    lasts longer than the batch marker's hour (BATCH_MARKER_TTL_S): when Redis is reachable
    again the retry finds no marker and is applied a second time, so /admin/stats counts
    the turns twice (docs/operations.md: "applied at most once"; degraded mode promises to
    buffer through any outage). A batch must stay applied-once however long the retry
    waits (e.g. a per-replica sequence number kept in Redis instead of an expiring marker)."""
    raw = redis.Redis.from_url(REDIS_URL)
    stats = SharedStats(open_async_client(proxy.url, timeout_s=0.3), prefix=prefix)
    try:
        stats.turn_finished(hit("opening_hours"))
        await stats.flush()  # connected and warm
        stats.turn_finished(hit("opening_hours"))
        proxy.stall()  # Redis stops answering: the flush times out, its batch kept
        with pytest.raises(redis.RedisError):
            await stats.flush()
        proxy.resume()  # ... yet the request reached Redis and is applied
        await poll(lambda: int(raw.hget(prefix + "stats:totals", "hits") or 0) == 2,
                   "Redis applies the batch that was in flight")
        # Then Redis stays unreachable from this replica for more than two hours (every
        # retry fails meanwhile): every key of ours due to expire within them expires.
        expiring = [key for key in raw.scan_iter(match=prefix + "*")
                    if 0 < raw.ttl(key) <= 2 * 3600]
        assert expiring  # (the minute buckets at least)
        raw.delete(*expiring)
        await stats.flush()  # Redis is reachable again: the kept batch is retried
        hits = int(raw.hget(prefix + "stats:totals", "hits") or 0)
    finally:
        raw.close()
        await stats.aclose()
    assert hits == 2, f"two hit turns, the cluster counts {hits}"


# --------------------------------------------------------------------------------------
# Two replicas' admin APIs publishing at once: the per-process lock does not see the other
# replica, so an entry edit publishes only over the version it was built from; the later
# one is refused (409) instead of silently dropping the other operator's entry.

@pytest.mark.parametrize("kind", ["redis", "local"])
def test_a_publish_over_a_version_no_longer_current_is_refused(prefix: str, kind: str,
                                                               tmp_path) -> None:
    store = (RedisStore(REDIS_URL, prefix=prefix) if kind == "redis"
             else LocalStore(tmp_path / "store"))
    try:
        with pytest.raises(StoreConflict, match=r"v-that-never-was, and \(none\) is now current"):
            store.publish(bundle("x"), replaces="v-that-never-was")
        first = store.publish(bundle("first"), replaces=None)
        second = store.publish(bundle("second"), replaces=first)
        with pytest.raises(StoreConflict, match=f"built on version {first}.*{second} is now"):
            store.publish(bundle("stale"), replaces=first)
        assert store.current_version() == second
        assert store.versions() == sorted([first, second])  # the refused one left nothing
        assert store.publish(bundle("whole seed")) != second  # no base: replaces any
    finally:
        if kind == "redis":
            store.close()


class _HeldVoice:
    """A local voice (synthesize_all, as Piper has) that can hold one answer's rendering,
    so a second replica publishes while the first is still seeding."""

    name = voice_id = "held-tone"
    sample_rate = 8000

    def __init__(self, hold: str | None = None) -> None:
        self.hold = hold
        self.holding = threading.Event()
        self.release = threading.Event()

    def synthesize_all(self, text: str) -> bytes:
        if text == self.hold:
            self.holding.set()
            self.release.wait(60)
        return tone_render(text)[0]


def test_two_replicas_adding_entries_at_once_lose_neither(prefix: str) -> None:
    seeding = RedisStore(REDIS_URL, prefix=prefix)
    seed_plan(parse_seed_csv(small_faq_csv().encode()), seeding, tone_render, "held-tone",
              source="faq.csv", target_wrong_rate=0.05, progress=False,
              embedder=shared_embedder())

    def replica(voice: _HeldVoice) -> tuple[Publisher, FaqCache, RedisStore]:
        store = RedisStore(REDIS_URL, prefix=prefix)
        cache = FaqCache(store, shared_embedder())
        cache.refresh()
        services = SimpleNamespace(cache=cache, settings=Settings(), runtime=SimpleNamespace(
            tts=voice, embedder=shared_embedder()))
        return Publisher(services), cache, store  # type: ignore[arg-type]

    boston = "Our Boston branch is on State Street."
    voice_a = _HeldVoice(hold=boston)
    publisher_a, _, store_a = replica(voice_a)
    publisher_b, _, store_b = replica(_HeldVoice())

    async def scenario() -> object:
        adding_boston = asyncio.create_task(publisher_a.upsert_entry({
            "intent": "boston_branch", "answer": boston,
            "questions": ["is there a Boston branch", "where is your branch in Boston"]}))
        assert await asyncio.to_thread(voice_a.holding.wait, 60), "replica A never rendered"
        await publisher_b.upsert_entry({"intent": "lost_card",
                                        "answer": "Call us at once to block your card.",
                                        "questions": ["I lost my card", "my card was stolen"]})
        voice_a.release.set()
        return (await asyncio.gather(adding_boston, return_exceptions=True))[0]

    try:
        outcome = asyncio.run(scenario())
        _, published = seeding.read()
        intents = {e["intent"] for e in published.manifest["entries"]}
    finally:
        for s in (seeding, store_a, store_b):
            s.close()
    assert "lost_card" in intents, "replica B's entry, answered with success, was dropped"
    # Replica A built its edit on the version B replaced: refused, so its operator knows.
    assert isinstance(outcome, StoreConflict), outcome
    assert "boston_branch" not in intents


async def test_an_entry_edit_over_an_unloadable_current_version_says_retry_forever(
        prefix: str) -> None:
    """`current` names a version no replica can load (missing, as the late swap above
    leaves it, or corrupt: the docs' own cases). The replica keeps serving the version it
    holds and /readyz says why. An operator then edits an entry: the edit is built on the
    serving version, rendered and calibrated, and refused at the pointer with 409 "the cache
    changed while this was being published ... nothing was published: retry the request".
    Retrying gives the same 409 every time, after the same seconds of rendering and
    calibration, and never says what is wrong. The edit should be refused at once with
    the real cause (the current version cannot be loaded: why; seed a whole CSV to
    replace it), not a retry that cannot succeed."""
    raw = redis.Redis.from_url(REDIS_URL)
    store = RedisStore(REDIS_URL, prefix=prefix)
    embedder = shared_embedder()
    try:
        seed_plan(parse_seed_csv(small_faq_csv().encode()), store, tone_render, "tone",
                  source="faq.csv", target_wrong_rate=0.05, progress=False, embedder=embedder)
        cache = FaqCache(store, embedder)
        assert cache.refresh()
        serving = cache.version
        raw.set(prefix + "current", "20991231T235959Z-dead00")  # cannot be loaded
        services = SimpleNamespace(cache=cache, settings=Settings(),
                                   runtime=SimpleNamespace(tts=_HeldVoice(), embedder=embedder))
        publisher = Publisher(services)  # type: ignore[arg-type]
        answers = []
        for _ in range(2):  # the operator follows the advice and retries
            try:
                await publisher.upsert_entry({"intent": "opening_hours",
                                              "answer": "We open at eight."})
            except Exception as exc:  # noqa: BLE001 - what the admin route would answer
                response = _publish_failed(exc, services)  # type: ignore[arg-type]
                answers.append((response.status_code, response.body.decode()))
            else:
                answers.append((200, "published"))
        last_error = cache.last_error
    finally:
        raw.close()
        store.close()
    assert cache.version == serving and last_error and "missing" in last_error
    assert not all(status == 409 and "retry the request" in body for status, body in answers), (
        f"the replica knows why it serves {serving} ({last_error}); the operator was told, "
        f"twice: {answers}")
    # Refused at once, with the cause and the way out.
    assert all(status == 503 and "missing" in body and "seed a whole CSV" in body
               for status, body in answers), answers


# --------------------------------------------------------------------------------------
# The store lost what this replica serves (a Redis restarted without persistence, a local
# store directory wiped or restored): the replica serves its version from memory, and the
# way back the docs give is to seed again. An upload through the admin API must do that.

@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_an_upload_reseeds_a_store_that_lost_the_serving_version(prefix: str, kind: str,
                                                                       tmp_path) -> None:
    """`POST /admin/seed` read the serving version back from the store only to take its
    defaults (the wrong-answer target, the operator's negatives). With that version gone
    from the store, every upload failed: 503 "cache version ... is missing ...; nothing
    published", the very reseed docs/operations.md ("Redis must persist") prescribes."""
    raw = redis.Redis.from_url(REDIS_URL)
    store = (RedisStore(REDIS_URL, prefix=prefix) if kind == "redis"
             else LocalStore(tmp_path / "store"))
    embedder = shared_embedder()
    try:
        plan = parse_seed_csv(small_faq_csv().encode())
        seed_plan(plan, store, tone_render, "tone", source="faq.csv", target_wrong_rate=0.05,
                  progress=False, embedder=embedder, negatives=("do you sell car insurance",))
        cache = FaqCache(store, embedder)
        assert cache.refresh()
        serving = cache.version
        if kind == "redis":  # Redis came back empty
            raw.delete(*raw.scan_iter(match=prefix + "*"))
        else:
            import shutil
            shutil.rmtree(tmp_path / "store")
        services = SimpleNamespace(cache=cache, settings=Settings(),
                                   runtime=SimpleNamespace(tts=_HeldVoice(), embedder=embedder))
        publisher = Publisher(services)  # type: ignore[arg-type]
        try:
            report = await publisher.seed_csv(small_faq_csv().encode(), "faq.csv")
        except StoreError as exc:
            pytest.fail(f"the reseed was refused: {exc}")
        _, published = store.read()
    finally:
        raw.close()
        if kind == "redis":
            store.close()
    assert store.current_version() == report.version == cache.version != serving
    # the serving version's defaults carried over, from what the replica holds
    assert published.manifest["thresholds"]["target_wrong_rate"] == 0.05
    assert published.manifest["negatives"] == ["do you sell car insurance"]


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_a_store_that_lost_the_serving_version_is_said_in_readyz(prefix: str, kind: str,
                                                                tmp_path) -> None:
    """Redis restarted without persistence (or the store directory was wiped): `current` is
    gone. The replica rightly keeps serving its version from memory, but /readyz said
    nothing (`cache_error` null, as if all were well), while any replica started now comes
    up with no cache at all. Keep serving, and say so."""
    raw = redis.Redis.from_url(REDIS_URL)
    store = (RedisStore(REDIS_URL, prefix=prefix) if kind == "redis"
             else LocalStore(tmp_path / "store"))
    try:
        seed_plan(parse_seed_csv(small_faq_csv().encode()), store, tone_render, "tone",
                  source="faq.csv", target_wrong_rate=0.05, progress=False,
                  embedder=shared_embedder())
        cache = FaqCache(store, shared_embedder())
        assert cache.refresh() and cache.last_error is None
        serving = cache.version
        if kind == "redis":
            raw.delete(*raw.scan_iter(match=prefix + "*"))
        else:
            import shutil
            shutil.rmtree(tmp_path / "store")
        assert cache.refresh() is False
    finally:
        raw.close()
        if kind == "redis":
            store.close()
    assert cache.version == serving  # still served, from memory
    assert cache.last_error is not None and "no published version" in cache.last_error \
        and serving in cache.last_error, cache.last_error


async def test_the_goodbye_flush_after_a_failed_flush_writes_what_was_counted_since(
        prefix: str) -> None:
    """Review: a flush fails (Redis unreachable for a moment): its batch is kept in flight. More
    turns are counted. The replica shuts down once Redis answers again: leave() flushes,
    but flush() sends only the batch in flight and returns, so every increment counted
    since the failure is lost (docs: "buffered ... written when Redis returns")."""
    raw = redis.Redis.from_url(REDIS_URL)
    stats = SharedStats(open_async_client(REDIS_URL), prefix=prefix, health=RedisHealth(),
                        replica_id="r")
    real_eval = stats._redis.eval
    failures = 1

    async def eval_failing_once(*args, **kwargs):
        nonlocal failures
        if failures:
            failures -= 1
            raise redis.ConnectionError("Redis went away for a moment")
        return await real_eval(*args, **kwargs)

    stats._redis.eval = eval_failing_once  # type: ignore[method-assign]
    try:
        stats.turn_finished(hit("opening_hours"))
        with pytest.raises(redis.ConnectionError):
            await stats.flush()  # the batch (turn 1) is kept in flight
        stats.turn_finished(hit("opening_hours"))  # turn 2, pending
        await stats.leave()  # Redis answers again: the replica's goodbye
        turns = int(raw.hget(prefix + "stats:totals", "turns") or 0)
    finally:
        raw.close()
        await stats.aclose()
    assert turns == 2, (f"two turns counted before the goodbye, Redis holds {turns}; "
                        f"still pending in the departed replica: {stats.pending}")


class _Pointer:
    """A store whose pointer a test moves, makes unreachable, or makes garbage."""

    def __init__(self, current: str) -> None:
        self.current = current
        self.down = False
        self.garbage = False

    def current_version(self) -> str:
        if self.down:
            raise StoreUnavailable("Redis at redis://x is unreachable (current_version): gone")
        if self.garbage:
            raise StoreError("the current-version pointer cannot be read as a version name")
        return self.current


def test_a_version_that_failed_to_load_is_not_said_to_be_redis_unreachable_once_it_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 59): v2 fails to load (corrupt): tried again in 10 s, last_error says
    why. Redis blips once meanwhile (a poll finds it unreachable), then answers again: until
    the retry (up to 5 min once it doubled) /readyz cache_error says "store unavailable", an
    outage that is over, and never again why v2 is refused; an entry edit's 503 quotes the
    same."""
    def load_cache(store, embedder, version):
        if version == "v2":
            raise StoreError("cannot read cache version v2 in Redis: corrupt manifest")
        return SimpleNamespace(version=version, entries={})

    monkeypatch.setattr(faq_cache, "load_cache", load_cache)
    store, clock = _Pointer("v1"), ManualClock()
    cache = FaqCache(store, embedder=None, clock=clock)  # type: ignore[arg-type]
    assert cache.refresh() and cache.version == "v1"
    store.current = "v2"
    assert not cache.refresh()
    assert "corrupt manifest" in (cache.last_error or "")
    store.down = True
    assert not cache.refresh()  # a poll meets the blip
    store.down = False
    assert not cache.refresh()  # Redis answers again; v2 waits for its retry
    assert cache.store_unanswered is False
    assert "corrupt manifest" in (cache.last_error or ""), (
        f"Redis answers again and v2 is still refused, but cache_error says: "
        f"{cache.last_error}")


def test_a_garbage_pointer_after_a_version_lost_mid_read_does_not_keep_the_replica_unready(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 59, of this session's change): faq_cache.py _refresh, the new ``except
    Exception`` branch: the store answers (the pointer is garbage, no outage) and
    ``_unreachable`` is cleared, but ``failed_for_store`` from an earlier read the store
    dropped is left set. ``store_unanswered`` stays True, so a starting replica stays
    unready for good: the very bug the commit fixes, by another path (and an entry edit
    answers 503 "retry" instead of CurrentUnloadable)."""
    def load_cache(store: Any, embedder: Any, version: str) -> Any:
        raise StoreUnavailable("Redis at redis://x is unreachable (read): connection reset")

    monkeypatch.setattr(faq_cache, "load_cache", load_cache)
    store = _Pointer("v1")
    cache = FaqCache(store, embedder=None, clock=ManualClock())  # type: ignore[arg-type]
    assert not cache.refresh()
    assert cache.failed_for_store and cache.store_unanswered  # a blip mid-read: unready, fine
    store.garbage = True  # the store answers now, with a pointer that names no version
    assert not cache.refresh()
    assert cache.last_error is not None and "cannot read the current version" in cache.last_error
    assert cache.store_unanswered is False, (
        "the store answered (its pointer is garbage: no outage), yet store_unanswered is "
        "still True from the earlier blip (failed_for_store never cleared): the replica "
        "stays unready for good")


async def test_the_counters_go_on_at_once_when_redis_closed_their_connections(
        prefix: str, proxy: FlakyProxy, tmp_path) -> None:
    """Review (stop 62): the shared counters' client (Services._start_redis) sent each
    command once, on a pooled connection. After a Redis restart (or its idle `timeout`, a
    failover) the pool hands out a connection Redis has closed, and the next flush failed
    ("Connection closed by server") though Redis answered again: /readyz and
    `voicegate_degraded` said degraded for a flush, with an extra `redis_degraded` /
    `redis_recovered` pair, and /admin/stats could answer this replica's figures alone. A
    batch is applied at most once (its sequence number), so the flush is sent again at once
    on a new connection. The subscriber's drop is still seen: its catch-up refresh."""
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "redis_url": proxy.url, "redis_prefix": prefix}, environ={})
    services = Services(settings)
    reasons: list[str | None] = []
    set_degraded = services.stats.set_degraded

    def recorded(reason: str | None) -> None:
        reasons.append(reason)
        set_degraded(reason)

    services.stats.set_degraded = recorded  # type: ignore[method-assign]
    runtime = SimpleNamespace(stats=services.stats)
    cache = SimpleNamespace(version=None, refresh=lambda: False)
    raw = redis.Redis.from_url(REDIS_URL)

    def calls() -> int:
        return int(raw.hget(prefix + "stats:totals", "calls") or 0)

    services._start_redis(runtime, cache)  # type: ignore[arg-type]
    shared, health = services.shared_stats, services.redis_health
    assert shared is not None and health is not None
    try:
        shared.call_started()
        await poll(lambda: calls() == 1 and not health.degraded, "a first flush, subscribed",
                   10)
        proxy.close_existing()  # Redis restarted (or closed its idle clients): back at once
        shared.call_started()
        await poll(lambda: calls() == 2, "the flush after the close", 10)
        await poll(lambda: any("subscriber" in (r or "") for r in reasons),
                   "the subscriber sees its link drop (it catches up once back)", 10)
        assert not [r for r in reasons if "counters" in (r or "")], reasons
        proxy.close_existing()  # again, before /admin/stats reads the counters
        snapshot = await shared.cluster_snapshot({"calls": 0})
        assert snapshot["scope"] == "cluster" and snapshot["calls"] == 2, snapshot
    finally:
        for task in services._redis_tasks:
            task.cancel()
        await asyncio.gather(*services._redis_tasks, return_exceptions=True)
        await shared.aclose()
        raw.close()


async def test_a_counters_flush_applied_before_its_connection_closed_is_not_counted_twice(
        prefix: str) -> None:
    """Review (stop 62): the counters' client sends a command again when its connection
    closed; a batch Redis applied before the close (its reply lost) is sent again under the
    same sequence number, and not counted twice."""
    client = open_async_client(REDIS_URL, reconnect_once=True)  # as Services._start_redis
    sent = client._send_command_parse_response
    lost = 1

    async def reply_lost_once(conn, command_name, *args, **options):
        nonlocal lost
        reply = await sent(conn, command_name, *args, **options)  # applied by Redis
        if command_name == "EVAL" and lost:
            lost -= 1
            raise redis.ConnectionError("Connection closed by server.")
        return reply

    client._send_command_parse_response = reply_lost_once  # type: ignore[method-assign]
    stats = SharedStats(client, prefix=prefix)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        stats.turn_finished(hit("opening_hours"))
        await stats.flush()
        hits = int(raw.hget(prefix + "stats:totals", "hits") or 0)
    finally:
        raw.close()
        await stats.aclose()
    assert lost == 0 and hits == 1, f"one hit turn, its reply lost once: counted {hits}"


# --------------------------------------------------------------------------------------
# Credentials Redis refuses (a wrong password, an ACL user that does not exist) are said as
# such, not as "unreachable": the operator fixes the password, not the network. The
# password never shows.

SECRET = "not-the-password-" + secrets.token_hex(3)


def refused_url(where: str) -> str:
    user = f"vg_nobody_{secrets.token_hex(3)}"
    if where == "netloc":
        return REDIS_URL.replace("redis://", f"redis://{user}:{SECRET}@", 1)
    return REDIS_URL + f"?username={user}&password={SECRET}"


@pytest.mark.parametrize("where", ["netloc", "query"])
async def test_the_subscriber_says_redis_refused_the_credentials(prefix: str,
                                                                 where: str) -> None:
    """Review (stop 62): the subscriber reported an AuthenticationError (WRONGPASS, NOAUTH)
    as "Redis at ... unreachable", sending the operator to the network."""
    async def refresh() -> None:
        pass

    health = _RecordedHealth()
    task = asyncio.create_task(VersionSubscriber(refused_url(where), RedisKeys(prefix),
                                                 refresh, health, ping_s=2.0).run())
    try:
        await poll(lambda: health.reports, "a refused attempt to subscribe", 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    reason = health.reason or ""
    assert "refused the credentials" in reason and "unreachable" not in reason, reason
    assert SECRET not in reason, reason


@pytest.mark.parametrize("where", ["netloc", "query"])
def test_the_store_says_redis_refused_the_credentials(where: str) -> None:
    """Review (stop 62): the store (`voicegate seed --redis`, a replica's loads, the admin
    API's publishes) said "Redis at ... is unreachable" for credentials Redis refused."""
    store = RedisStore(refused_url(where), timeout_s=2.0)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            store.current_version()
    finally:
        store.close()
    message = str(raised.value)
    assert "refused the credentials" in message and "unreachable" not in message, message
    assert SECRET not in message, message


# --------------------------------------------------------------------------------------
# Review (stop 63): a Redis still LOADING its dataset after a restart (-LOADING, redis-py
# BusyLoadingError), and one that refuses writes because it cannot persist (-MISCONF).

MISCONF_SAID = ("Redis refuses writes: it cannot persist to disk (MISCONF); fix its disk or "
                "stop-writes-on-bgsave-error")


OwnRedisT = TypeVar("OwnRedisT", bound=OwnRedis)


def _own_redis(kind: type[OwnRedisT], directory: Path) -> Iterator[OwnRedisT]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    directory.mkdir()
    server = kind(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def starting_redis(tmp_path) -> Iterator[StartingRedis]:
    yield from _own_redis(StartingRedis, tmp_path / "starting-redis")


@pytest.fixture
def misconf_redis(tmp_path) -> Iterator[MisconfRedis]:
    yield from _own_redis(MisconfRedis, tmp_path / "misconf-redis")


def _loads_anything(store: Any, embedder: Any, version: str) -> Any:
    return SimpleNamespace(version=version, entries={})


def _readiness(url: str, cache: FaqCache, health: RedisHealth) -> dict[str, Any]:
    """What /readyz answers for a warm replica with this cache and Redis health."""
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "redis_url": url}, environ={})
    services = Services(settings)
    services._runtime = SimpleNamespace(load_times_s={}, stt=SimpleNamespace(name="stt"),
                                        tts=SimpleNamespace(name="tts"))
    services.responder = object()
    services.cache, services.redis_health = cache, health
    return services.readiness()


async def test_a_redis_still_loading_its_dataset_is_said_to_be_starting_not_healthy(
        starting_redis: StartingRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 63): Redis restarted and is LOADING its dataset: it confirms a SUBSCRIBE
    (served while loading) and refuses every read with -LOADING. The version subscriber
    reported the link healthy as soon as the subscription was confirmed, then, at its PING,
    "unreachable"; the store and /readyz cache_error said "Redis ... is unreachable" too: an
    operator is sent to the network while Redis is only starting. Wanted: not healthy, said
    to be loading (starting), reads retried later, the cache in memory kept serving, nothing
    published damaged; once loaded, all well again."""
    monkeypatch.setattr(faq_cache, "load_cache", _loads_anything)
    url, prefix = starting_redis.url, "vgload:"
    store = RedisStore(url, prefix=prefix, timeout_s=5.0)
    health = _RecordedHealth()
    task: asyncio.Task[None] | None = None
    try:
        v1 = store.publish(bundle("v1"))
        cache = FaqCache(store, embedder=None, clock=ManualClock())  # type: ignore[arg-type]
        assert cache.refresh() and cache.version == v1
        await asyncio.to_thread(starting_redis.restart_loading)

        async def refresh() -> None:
            await asyncio.to_thread(cache.refresh)

        task = asyncio.create_task(VersionSubscriber(url, RedisKeys(prefix), refresh, health,
                                                     ping_s=1.0).run())
        await poll(lambda: any(kind == "down" for kind, _ in health.reports),
                   "the subscriber's first report while Redis loads", 60)
        assert ("up", "") not in health.reports, (
            f"Redis is still loading its dataset, yet the link was reported healthy: "
            f"{health.reports}")
        reason = health.reason or ""
        assert health.degraded and "loading" in reason and "unreachable" not in reason, reason

        # A serving replica keeps its cache; a poll says why nothing new is read.
        assert not await asyncio.to_thread(cache.refresh)
        assert cache.version == v1 and cache.store_unanswered is False
        error = cache.last_error or ""
        assert "loading" in error and "unreachable" not in error, error
        # A replica starting now stays unready (retried), saying why.
        starting = FaqCache(store, embedder=None, clock=ManualClock())  # type: ignore[arg-type]
        assert not await asyncio.to_thread(starting.refresh)
        assert starting.store_unanswered and starting.version is None
        error = starting.last_error or ""
        assert "loading" in error and "unreachable" not in error, error
        ready = _readiness(url, cache, health)
        assert ready["degraded"] and "loading" in ready["degraded_reason"], ready
        assert "unreachable" not in ready["degraded_reason"] + (ready["cache_error"] or ""), \
            ready
        # A publish meanwhile is refused as "starting", nothing written.
        with pytest.raises(StoreUnavailable) as raised:
            await asyncio.to_thread(store.publish, bundle("v2"))
        assert "loading" in str(raised.value) and "unreachable" not in str(raised.value), \
            str(raised.value)
        # Nothing retries a publish (review, stop 63): its error must not say it will be.
        assert "tried again" not in str(raised.value), str(raised.value)

        await asyncio.to_thread(starting_redis.finish_loading)
        await poll(lambda: not health.degraded and cache.last_error is None
                   and health.reports[-1] == ("up", ""),
                   "the subscriber and the cache recover once Redis has loaded", 60)
        assert await asyncio.to_thread(store.current_version) == v1 == cache.version
        assert (await asyncio.to_thread(store.read))[1].manifest["marker"] == "v1"
        assert await asyncio.to_thread(starting.refresh) and starting.version == v1
        v2 = await asyncio.to_thread(store.publish, bundle("v2"))
        await poll(lambda: cache.version == v2, "the subscriber hears the next publish", 30)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        store.close()


def _refused_publish(store: RedisStore, current: str) -> tuple[list[StoreError], dict]:
    """A publish and a seed's first write (its audio) to a Redis refusing writes: both
    failures, and the admin API's answer to the first."""
    failures = []
    for attempt in (lambda: store.publish(bundle("v2")),
                    lambda: store.put_audio("ab" * 32, Audio(b"\x00\x00", 16000))):
        with pytest.raises(StoreError) as raised:
            attempt()
        failures.append(raised.value)
    services = SimpleNamespace(cache=SimpleNamespace(version=current),
                               stats=SimpleNamespace(error=lambda code: None))
    return failures, json.loads(_publish_failed(failures[0], services).body)  # type: ignore[arg-type]


def test_a_publish_redis_refuses_for_misconf_says_so(misconf_redis: MisconfRedis) -> None:
    """Review (stop 63): Redis refuses writes because it cannot persist (-MISCONF, a
    ResponseError): a publish (admin API, `voicegate seed`) failed with "Redis at ... failed
    (publish: write version): MISCONF Redis is configured to save RDB snapshots, ...", a
    generic error that names no fix. Wanted: said plainly, with the fix; nothing published,
    the published version whole."""
    store = RedisStore(misconf_redis.url, prefix="vgmisconf:", timeout_s=5.0)
    try:
        v1 = store.publish(bundle("v1"))
        misconf_redis.refuse_writes()
        failures, answer = _refused_publish(store, v1)
        for said in [str(f) for f in failures] + [answer["error"]]:
            assert MISCONF_SAID in said, said
        assert store.current_version() == v1 and store.versions() == [v1]
        assert store.read()[1].manifest["marker"] == "v1"
        misconf_redis.heal()
        assert store.current_version() == v1
        assert store.publish(bundle("v2")) == store.current_version() != v1
    finally:
        store.close()


# Review (stop 64): a publish Redis refuses as a read-only replica (-READONLY) or for want of
# memory (-OOM), each said as plainly as -MISCONF is, with its fix.
READONLY_SAID = ("Redis refuses writes: it is a read-only replica (READONLY); point the Redis "
                 "URL at the primary")
OOM_SAID = ("Redis refuses writes: its memory is full (OOM: used memory over maxmemory); "
            "raise maxmemory or free memory, and keep maxmemory-policy noeviction (an "
            "evicting policy drops published versions and audio)")
# Review (stop 66): -NOREPLICAS (min-replicas-to-write, fewer replicas in sync) said too.
NOREPLICAS_SAID = ("Redis refuses writes: fewer replicas than min-replicas-to-write are in "
                   "sync with it (NOREPLICAS); bring its replicas back or lower "
                   "min-replicas-to-write")


def _refusing_writes_for(kind: str, own: OwnRedis) -> tuple[Any, Any]:
    """How to make ``own`` refuse every write as ``kind`` says, and how to undo it:
    -READONLY (made a replica of a master that is not there: it keeps its dataset and serves
    reads), -OOM (maxmemory below what it uses, with the default noeviction policy),
    -NOREPLICAS (min-replicas-to-write 1, and it has none)."""
    def configure(*command: str) -> None:
        raw = redis.Redis.from_url(own.url)
        try:
            raw.execute_command(*command)
        finally:
            raw.close()
    if kind == "readonly":
        return (lambda: configure("REPLICAOF", "127.0.0.1", str(free_port())),
                lambda: configure("REPLICAOF", "NO", "ONE"))
    if kind == "noreplicas":
        return (lambda: configure("CONFIG", "SET", "min-replicas-to-write", "1"),
                lambda: configure("CONFIG", "SET", "min-replicas-to-write", "0"))
    return (lambda: configure("CONFIG", "SET", "maxmemory", "1"),
            lambda: configure("CONFIG", "SET", "maxmemory", "0"))


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    yield from _own_redis(OwnRedis, tmp_path / "own-redis")


@pytest.mark.parametrize("kind,said", [("readonly", READONLY_SAID), ("oom", OOM_SAID),
                                       ("noreplicas", NOREPLICAS_SAID)])
def test_a_publish_redis_refuses_as_a_read_only_replica_or_full_says_why_and_the_fix(
        own_redis: OwnRedis, kind: str, said: str) -> None:
    """Review (stop 64): a publish (admin API, `voicegate seed`) Redis refused as a read-only
    replica (-READONLY: the URL names a replica, or a failover demoted it) or for want of
    memory (-OOM: used memory over maxmemory, noeviction) failed with "Redis at ... failed
    (publish: write version): You can't write against a read only replica." or "...: command
    not allowed when used memory > 'maxmemory'.": a generic failure that names neither the
    cause nor the fix, where -MISCONF is said plainly. Wanted: each said as MISCONF is, with
    its fix, by the store, the admin API's answer and the replica's health (the counters meet
    the same refusals); nothing published, the published version whole and serving."""
    refuse_writes, heal = _refusing_writes_for(kind, own_redis)
    prefix = "vgrefused:"
    store = RedisStore(own_redis.url, prefix=prefix, timeout_s=5.0)
    try:
        v1 = store.publish(bundle("v1"))
        refuse_writes()
        failures, answer = _refused_publish(store, v1)
        health = failure_said(failures[0].__cause__)  # type: ignore[arg-type]
        for text in [str(f) for f in failures] + [answer["error"], health]:
            assert said in text, text
            assert "failed" not in text.split("Redis said:")[0], text
        assert store.current_version() == v1 and store.versions() == [v1]
        assert store.read()[1].manifest["marker"] == "v1"
        assert _version_keys(own_redis.url, prefix) == [prefix + "version:" + v1]
        heal()
        assert store.current_version() == v1
        assert store.publish(bundle("v2")) == store.current_version() != v1
    finally:
        store.close()


async def test_entry_marks_redis_refuses_for_misconf_are_kept_and_said(
        misconf_redis: MisconfRedis) -> None:
    """Review (stop 63): the counters' flush met -MISCONF (a ResponseError): a loaded
    version's entry marks were dropped for good as if a foreign value refused them
    ("cannot reset the hits of changed entries"), and the replica's health said a generic
    "ResponseError: MISCONF ...". Wanted: a failed write, kept and written once Redis writes
    again; the health says Redis refuses writes and why."""
    prefix = "vgmisconf:"
    health = RedisHealth()
    stats = SharedStats(open_async_client(misconf_redis.url, reconnect_once=True),
                        prefix=prefix, health=health, replica_id="r", flush_s=0.05)
    raw = redis.Redis.from_url(misconf_redis.url)
    task: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(misconf_redis.refuse_writes)
        stats.entries_published({"e1": "m1"}, version="v1")
        task = asyncio.create_task(stats.run())
        await poll(lambda: health.degraded, "the counters report the refused writes", 30)
        assert stats._published is not None, "the entry marks Redis refused were dropped"
        assert MISCONF_SAID in (health.reason or ""), health.reason
        stats.turn_finished(hit("opening_hours"))  # counted while Redis refuses writes
        await poll(lambda: stats._inflight is not None, "a flush of the turn refused", 30)
        assert stats.dropped == 0 and stats.pending > 0  # kept, not dropped
        await asyncio.to_thread(misconf_redis.heal)
        await poll(lambda: not health.degraded and stats.pending == 0,
                   "the counters write once Redis writes again", 30)
        await poll(lambda: raw.hget(prefix + "stats:entry_marks", "e1") == b"m1",
                   "the entry marks are written once Redis writes again", 30)
        assert raw.hget(prefix + "stats:totals", "turns") == b"1"
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        raw.close()
        await stats.aclose()


async def test_call_records_redis_refuses_for_misconf_never_fail_the_call(
        misconf_redis: MisconfRedis) -> None:
    """Stop 63 check (held before any change): a Twilio call record Redis refuses with
    -MISCONF is a failed write, logged and counted; the call's hang-up goes on and this
    replica's record stands."""
    from gateway.transports.twilio_ended import HUNG_UP, EndedCalls
    counted: list[str] = []
    ended = EndedCalls(ManualClock(), open_async_client(misconf_redis.url, timeout_s=1.0,
                                                        reconnect_once=True),
                       prefix="vgmisconf:", count_error=counted.append)
    try:
        await asyncio.to_thread(misconf_redis.refuse_writes)
        await ended.mark("CA" + "0" * 32)
        assert await ended.ended("CA" + "0" * 32) == HUNG_UP
        assert counted == ["twilio_ended_record_failed"], counted
    finally:
        await ended.aclose()


async def test_a_redis_refusing_writes_for_misconf_keeps_the_version_subscription(
        misconf_redis: MisconfRedis) -> None:
    """Review (stop 63): Redis refusing writes (-MISCONF) refuses PING too, the subscriber's
    keep-alive: each PING's refusal was taken for a dead link, the subscription dropped,
    the replica reported "refused" and reconnected, over and over, though Redis answers and
    publishes. Wanted: a refused PING is an answer; the subscription stays, healthy."""
    prefix = "vgmisconf:"
    health = _RecordedHealth()
    refreshes: list[int] = []

    async def refresh() -> None:
        refreshes.append(1)

    raw = redis.Redis.from_url(misconf_redis.url)

    def pings() -> int:
        stat = raw.info("commandstats").get("cmdstat_ping") or {}
        return int(stat.get("calls", 0)) + int(stat.get("rejected_calls", 0))

    task = asyncio.create_task(VersionSubscriber(misconf_redis.url, RedisKeys(prefix), refresh,
                                                 health, ping_s=0.2).run())
    try:
        await poll(lambda: refreshes, "the subscriber's first refresh", 10)
        await asyncio.to_thread(misconf_redis.refuse_writes)
        raw.config_resetstat()
        await poll(lambda: pings() >= 3, "three keep-alive PINGs Redis refused", 30)
        assert health.reports == [("up", "")] and len(refreshes) == 1, (
            health.reports, len(refreshes))
        raw.publish(RedisKeys(prefix).channel, "v9")  # PUBLISH is served under MISCONF
        await poll(lambda: len(refreshes) == 2, "the subscriber hears a publish", 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raw.close()


def _refusing_redis(kind: str, directory: Path) -> Iterator[tuple[OwnRedis, Any]]:
    """A redis-server of the test's own and how to make it refuse every write: -MISCONF (it
    cannot persist), or -READONLY (made a replica, of a master that is not there: it keeps
    its dataset and serves reads)."""
    if kind == "misconf":
        for server in _own_redis(MisconfRedis, directory):
            yield server, server.refuse_writes
        return
    for own in _own_redis(OwnRedis, directory):
        def demote() -> None:
            raw = redis.Redis.from_url(own.url)
            raw.replicaof("127.0.0.1", str(free_port()))
            raw.close()
        yield own, demote


@pytest.fixture(params=["misconf", "readonly"])
def refusing_redis(request, tmp_path) -> Iterator[tuple[OwnRedis, Any]]:
    yield from _refusing_redis(request.param, tmp_path / "refusing-redis")


def _version_keys(url: str, prefix: str) -> list[str]:
    raw = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() for k in raw.keys(prefix + "version:*"))
    finally:
        raw.close()


def test_a_publish_whose_writes_redis_refused_does_not_say_its_hash_may_be_left(
        refusing_redis: tuple[OwnRedis, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Review (stop 63): Redis refuses every write (-MISCONF: it cannot persist; -READONLY:
    a replica after a failover): the publish fails, rightly, and its clean-up's DEL, a write,
    is refused too, so it logged a WARNING ``cache_publish_cleanup_failed`` saying the
    version's hash "may be left in Redis". Redis wrote nothing (the version's HSET was
    refused): the warning sends an operator hunting for garbage that does not exist.
    Wanted: no clean-up failure said when nothing of the version is in Redis."""
    server, refuse_writes = refusing_redis
    prefix = "vgrefused:"
    store = RedisStore(server.url, prefix=prefix, timeout_s=5.0)
    try:
        v1 = store.publish(bundle("v1"))
        refuse_writes()
        caplog.set_level("INFO", logger="voicegate.store")
        with pytest.raises(StoreError):
            store.publish(bundle("v2"))
        assert _version_keys(server.url, prefix) == [prefix + "version:" + v1]  # nothing left
        said = [r.getMessage() for r in caplog.records
                if "cache_publish_cleanup_failed" in r.getMessage() or "may be left" in
                r.getMessage()]
        assert not said, f"nothing of the version is in Redis, yet the log says: {said}"
        assert store.current_version() == v1
    finally:
        store.close()


def test_a_publish_refused_after_its_version_was_written_says_what_is_left(
        misconf_redis: MisconfRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Review (stop 63), held: the version's hash was written, then Redis began refusing
    writes (a BGSAVE failed in between) and refused the pointer swap and the clean-up's
    DEL: the hash is left in Redis, and the warning names it."""
    prefix = "vgrefused:"
    store = RedisStore(misconf_redis.url, prefix=prefix, timeout_s=5.0)
    swap = store._swap_pointer

    def swap_once_redis_refuses_writes(version: str, replaces: object) -> None:
        misconf_redis.refuse_writes()
        swap(version, replaces)  # type: ignore[arg-type]

    try:
        v1 = store.publish(bundle("v1"))
        store._swap_pointer = swap_once_redis_refuses_writes  # type: ignore[method-assign]
        caplog.set_level("INFO", logger="voicegate.store")
        with pytest.raises(StoreError, match="MISCONF"):
            store.publish(bundle("v2"))
        left = [k for k in _version_keys(misconf_redis.url, prefix) if not k.endswith(v1)]
        assert len(left) == 1, left
        warned = [r for r in caplog.records
                  if "cache_publish_cleanup_failed" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelname == "WARNING", warned
        assert left[0] in warned[0].getMessage() and "may be left" in warned[0].getMessage()
        assert store.current_version() == v1
    finally:
        store.close()


def test_a_restart_between_the_version_write_and_the_swap_is_said_unknown_and_retried_cleanly(
        starting_redis: StartingRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Stop 63 check (held before any change): Redis restarts after the version's hash was
    written and before the pointer swap, which meets -LOADING (after a lost connection: it
    may have been applied before the restart). The publish is unconfirmed, not "nothing
    published"; the clean-up, refused too, warns that the written hash may be left (it is).
    Once loaded, the previous version serves, and a retry built on it publishes (no conflict);
    its clean-up finds the first attempt's hash (stamped for the retention): no other left."""
    prefix = "vgload:"
    store = RedisStore(starting_redis.url, prefix=prefix, timeout_s=5.0)
    swap = store._swap_pointer

    def swap_after_a_restart(version: str, replaces: object) -> None:
        starting_redis.restart_loading()
        swap(version, replaces)  # type: ignore[arg-type]

    try:
        v1 = store.publish(bundle("v1"))
        store._swap_pointer = swap_after_a_restart  # type: ignore[method-assign]
        caplog.set_level("INFO", logger="voicegate.store")
        with pytest.raises(PublishUnconfirmed) as raised:
            store.publish(bundle("v2"))
        store._swap_pointer = swap  # type: ignore[method-assign]
        services = SimpleNamespace(cache=SimpleNamespace(version=v1))
        answer = _publish_failed(raised.value, services)  # type: ignore[arg-type]
        said = json.loads(answer.body)["error"]
        assert answer.status_code == 503 and "nothing published" not in said, said
        assert "loading" in said and "is unknown" in said, said
        starting_redis.finish_loading()
        assert store.current_version() == v1
        left = [k for k in _version_keys(starting_redis.url, prefix) if not k.endswith(v1)]
        assert len(left) == 1, left  # the first attempt's hash, written before the restart
        warned = [r.getMessage() for r in caplog.records
                  if "cache_publish_cleanup_failed" in r.getMessage()]
        assert len(warned) == 1 and left[0] in warned[0] and "may be left" in warned[0], warned
        v2 = store.publish(bundle("v2"), replaces=v1)  # built on v1: v1 is still current
        assert store.current_version() == v2 and store.versions() == sorted([v1, v2])
        orphans = [k for k in _version_keys(starting_redis.url, prefix)
                   if not k.endswith((v1, v2))]
        assert orphans == left  # one, and known to the retention (deleted after the grace)
        raw = redis.Redis.from_url(starting_redis.url)
        assert raw.hget(left[0], "seen") is not None
        raw.close()
    finally:
        store.close()


@pytest.fixture
def read_refusing_redis(tmp_path) -> Iterator[ReadRefusingRedis]:
    yield from _own_redis(ReadRefusingRedis, tmp_path / "read-refusing-redis")


@pytest.mark.parametrize("how,said", [("busy", "busy"), ("masterdown", "MASTERDOWN")])
def test_a_redis_refusing_reads_for_now_is_a_store_that_did_not_answer(
        read_refusing_redis: ReadRefusingRedis, how: str, said: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 66): Redis answering every read with a refusal that lasts only while its
    cause does (-BUSY: a script running past busy-reply-threshold; -MASTERDOWN: a replica cut
    off from its primary with replica-serve-stale-data no) was taken for a store that answered
    with a pointer naming no version ("cannot read the current version"): a replica starting
    then turned ready with no FAQ cache (every caller's question a miss) instead of staying
    unready and trying again as for an unreachable or loading Redis. Wanted: a store that did
    not answer, said as what Redis is doing; the serving replica keeps its version; once
    Redis serves again, all well."""
    monkeypatch.setattr(faq_cache, "load_cache", _loads_anything)
    store = RedisStore(read_refusing_redis.url, prefix="vgrefusing:", timeout_s=5.0)
    try:
        v1 = store.publish(bundle("v1"))
        serving = FaqCache(store, embedder=None, clock=ManualClock())  # type: ignore[arg-type]
        assert serving.refresh() and serving.version == v1
        read_refusing_redis.refuse(how)
        try:
            starting = FaqCache(store, embedder=None, clock=ManualClock())  # type: ignore[arg-type]
            assert not starting.refresh() and starting.version is None
            error = starting.last_error or ""
            # Services._load keeps a replica whose store did not answer unready, and retries.
            assert starting.store_unanswered, error
            assert said in error and "cannot read the current version" not in error, error
            assert not serving.refresh() and serving.version == v1
            assert said in (serving.last_error or ""), serving.last_error
            with pytest.raises(StoreUnavailable) as raised:
                store.current_version()
            assert said in str(raised.value), str(raised.value)
        finally:
            read_refusing_redis.serve()
        assert starting.refresh() and starting.version == v1
        assert not serving.refresh() and serving.last_error is None
    finally:
        store.close()


async def test_entry_marks_redis_refuses_while_busy_behind_a_script_are_written_after(
        read_refusing_redis: ReadRefusingRedis) -> None:
    """Review (stop 66): a replica loaded a version while Redis was busy behind a script
    (-BUSY, past busy-reply-threshold: a ResponseError with no class of its own). Its entry
    marks' script met -BUSY and the marks were dropped as if a foreign value had refused them:
    the cluster's hits of the entries that version changed or dropped were never reset for it
    (until a later publish), and degraded said "cannot reset the hits of changed entries".
    Redis being busy is a refusal for now, as READONLY or MISCONF is: kept and written once
    Redis serves again."""
    url, prefix = read_refusing_redis.url, "vgbusymarks:"
    stats = SharedStats(open_async_client(url, reconnect_once=True), prefix=prefix)
    raw = redis.Redis.from_url(url)
    mark = answer_mark("answer", "Nine to five.")
    try:
        stats.entries_published({"opening_hours": mark}, "v1")
        read_refusing_redis.refuse("busy")
        try:
            with pytest.raises(redis.RedisError) as raised:
                await stats.flush()
            assert "BUSY" in str(raised.value), str(raised.value)
        finally:
            read_refusing_redis.serve()
        assert raw.hgetall(prefix + "stats:entry_marks") == {}
        await stats.flush()
        assert raw.hgetall(prefix + "stats:entry_marks") == {b"opening_hours": mark.encode()}
    finally:
        raw.close()
        await stats.aclose()


async def test_entry_marks_redis_refuses_for_want_of_replicas_are_kept_and_said(
        own_redis: OwnRedis) -> None:
    """Review (stop 66): Redis with min-replicas-to-write and fewer replicas in sync refuses
    every write with -NOREPLICAS (a ResponseError with no class of its own), for as long as its
    replicas lag: the marks of a version loaded meanwhile were dropped as if a foreign value had
    refused them ("cannot reset the hits of changed entries"): the cluster's hits of the
    entries it changed were never reset for it. Wanted: kept and written once Redis writes
    again, the refusal said with its fix, as -MISCONF is."""
    refuse_writes, heal = _refusing_writes_for("noreplicas", own_redis)
    prefix = "vgnoreplicas:"
    stats = SharedStats(open_async_client(own_redis.url, reconnect_once=True), prefix=prefix)
    raw = redis.Redis.from_url(own_redis.url)
    try:
        refuse_writes()
        stats.entries_published({"e1": "m1"}, version="v1")
        with pytest.raises(redis.RedisError) as raised:
            await stats.flush()
        assert NOREPLICAS_SAID in failure_said(raised.value), failure_said(raised.value)
        assert stats._published is not None, "the entry marks Redis refused were dropped"
        heal()
        await stats.flush()
        assert raw.hgetall(prefix + "stats:entry_marks") == {b"e1": b"m1"}
    finally:
        raw.close()
        await stats.aclose()


def test_a_redis_busy_or_cut_off_is_said_plainly_in_the_health_reason() -> None:
    """Review (stop 66, second look): the degraded reason (/readyz, /admin/stats) said a
    Redis busy behind a script or a replica cut off from its primary as a bare error type
    ("ResponseError: BUSY ..."), where a publish says what Redis is doing and that it is
    tried again."""
    import redis as redis_py

    from intents.redis_store import BUSY_SAID, MASTERDOWN_SAID

    busy = failure_said(redis_py.ResponseError(
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."))
    cut_off = failure_said(redis_py.exceptions.MasterDownError("Link with MASTER is down"))
    assert BUSY_SAID in busy and "tried again later" in busy, busy
    assert MASTERDOWN_SAID in cut_off and "tried again later" in cut_off, cut_off
