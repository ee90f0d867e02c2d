"""The process lifecycle and its glue: idle HTTP connections (http_idle), start-up
readiness and shutdown (services), the shared counters' goodbye, the compose file's grace.

Each test failed before its fix and names the production failure it showed. None times
anything on the wall clock: timers are held and fired by hand (the HTTP protocol), and waits
poll a condition with a generous bound only so that a regression fails instead of hanging.

Redis: the suite's database (tests/test_redis.py), each test under a key prefix of its own,
deleted after; under CI a missing Redis fails, never skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, Iterator

import pytest
import redis
import uvicorn
from uvicorn.server import ServerState

import gateway.faq_cache
import gateway.services
from gateway.audio_bank import AudioBank
from gateway.faq_cache import FaqCache
from gateway.http_idle import IdleTimeoutHttpToolsProtocol
from gateway.redis_link import RedisHealth, open_async_client
from gateway.runtime import routing_executors
from gateway.services import Services
from gateway.settings import Settings
from gateway.shared_stats import SharedStats
from gateway.stats import Stats
from intents.store import StoreUnavailable
from tests.test_redis import REDIS_URL, free_port, own_prefix, poll

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def prefix() -> Iterator[str]:
    yield from own_prefix("lifecycle")


# ---------------------------------------------------------------------------------------
# 1. gateway/http_idle.py: a connection whose request was answered before its body arrived
#    is held forever once one more byte of that body comes.

class HeldTimers:
    """The protocol's loop: the running loop for everything but ``call_later``, whose timers
    are held here and fired only when the test lets time pass (``elapse``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timers: list[asyncio.TimerHandle] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any
                   ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(self._loop.time() + delay, callback, args, self._loop)
        self._timers.append(handle)
        return handle

    @property
    def armed(self) -> int:
        return sum(not h.cancelled() for h in self._timers)

    def elapse(self) -> None:
        """Any amount of time passes: every timer armed fires (again, for those it arms)."""
        for _ in range(5):
            due, self._timers = self._timers, []
            for handle in due:
                if not handle.cancelled():
                    handle._run()  # noqa: SLF001


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080),
                "peername": ("203.0.113.9", 40000)}.get(name, default)

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def answers_without_reading_the_body(scope: Any, receive: Any, send: Any) -> None:
    """As the gateway answers a request it refuses before reading its body: an admin POST
    without the token (401), a declared Content-Length over the limit (413,
    ``_json_body``), or any GET sent with a body (/healthz)."""
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def test_a_connection_answered_before_its_body_arrived_is_never_closed() -> None:
    """uvicorn's data_received cancels the keep-alive timer on every byte; after the response
    only ``on_response_complete`` arms it, and http_idle re-arms nothing but the headers
    deadline (on_message_begin). Bytes of a body still due after the answer are no new
    message: the timer they cancel is never armed again, and the connection, with its file
    descriptor, stays open for good. One client can so hold thousands (the replicas' own
    ports are published: docker-compose.yml 8081/8082), which http_idle is there to
    prevent."""
    config = uvicorn.Config(answers_without_reading_the_body, http=IdleTimeoutHttpToolsProtocol,
                            log_level="warning")
    config.load()
    timers = HeldTimers(asyncio.get_running_loop())
    protocol = IdleTimeoutHttpToolsProtocol(config, ServerState(), {}, _loop=timers)
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"POST /admin/entries HTTP/1.1\r\nHost: gw\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 9000000\r\n\r\n")
    for _ in range(20):  # the ASGI task answers
        await asyncio.sleep(0)
    assert transport.written.startswith(b"HTTP/1.1 413"), bytes(transport.written[:80])
    assert timers.armed == 1  # the keep-alive timer, as after any response

    protocol.data_received(b"{")  # one byte of the body it declared, then nothing
    timers.elapse()  # minutes, hours: every timer there is fires
    try:
        assert transport.closed, (
            f"the request was answered and its client then went quiet, yet after any amount "
            f"of time the connection is still open (timers armed: {timers.armed}): the byte "
            f"cancelled the keep-alive timer and nothing armed another")
    finally:
        protocol.connection_lost(None)


# ---------------------------------------------------------------------------------------
# 2. gateway/services.py _load: a store that does not answer at start-up is not retried;
#    the replica turns ready with no FAQ cache at all.

def fake_runtime() -> SimpleNamespace:
    """What Services._load uses of a Runtime, without models."""
    async def render_prompts(greeting: str | None = None) -> None:
        return None

    return SimpleNamespace(
        render_prompts=render_prompts, stats=Stats(), load_times_s={},
        embedder=SimpleNamespace(is_cached=lambda text: False),
        route_executors=routing_executors(),
        agent=SimpleNamespace(llm=None, new_conversation=lambda: None),
        tts=SimpleNamespace(name="tts"), stt=SimpleNamespace(name="stt"),
        prompts=AudioBank(), vad_batcher=None, turn_model=None, judge_turn=None)


async def test_a_replica_started_while_redis_is_down_is_not_ready_without_its_cache(
        tmp_path: Path) -> None:
    """README and docs/operations.md ("A replica that cannot start"): /readyz is 503 "until
    the models are warm, the prompts rendered and the cache read. A voice or store that
    fails meanwhile (a cloud voice or Redis briefly down) is tried again after 1 s, then
    twice as long each time up to 30 s". Services._load retries only when cache.refresh
    raises, but FaqCache.refresh catches the store's failure (StoreUnavailable), records it
    in last_error and returns False: _load goes on as if the cache were read. The replica
    turns ready with no cache (every caller a miss: a handoff where no LLM is configured),
    and HAProxy's leastconn sends the fresh, empty replica the most new calls. A rolling
    deploy during a Redis blip does this to every replica it restarts."""
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "redis_url": f"redis://127.0.0.1:{free_port()}/11",
                              "gc_full_interval_s": 0}, environ={})
    runtime = fake_runtime()
    services = Services(settings, runtime)  # type: ignore[arg-type]
    await services.start()
    try:
        # The first attempt to read the cache has been made once either is true: the load
        # gave up on this attempt (retrying, its error shown) or it went on (finished).
        await poll(lambda: services.load_error is not None or services._load_task.done(),
                    "the first attempt to read the cache from the store")
        body = services.readiness()
        assert not body["ready"], (
            f"Redis (the store) did not answer at start-up, yet /readyz says ready with no "
            f"cache: cache_version={body.get('cache_version')}, "
            f"cache_error={body.get('cache_error')!r}")
    finally:
        await services.aclose()
        for executor in runtime.route_executors.values():
            executor.shutdown(wait=False)


# ---------------------------------------------------------------------------------------
# 3. gateway/services.py aclose: the shared counters are detached before the calls the
#    shutdown cut short have closed (without record_dir it does not wait for them at all).

async def test_the_turns_of_calls_cut_short_at_shutdown_reach_the_cluster_counters(
        tmp_path: Path, prefix: str) -> None:
    """uvicorn cancels the calls that outlive its 5 s grace and goes straight on to the
    lifespan's shutdown (Services.aclose); each cancelled call still closes over a few loop
    iterations (session.close waits for the call's task, which stops its replies and ends
    its turns: turn_finished, call_ended). Only with a record_dir does aclose wait for
    ``admission.active`` to reach 0 (_finish_recordings); without one (the default) it
    removes the SharedStats observer at once, and what those calls count from then on never
    reaches Redis: /admin/stats' cluster totals lose the cut turns of every shutdown."""
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "redis_url": REDIS_URL}, environ={})
    assert not settings.record_dir
    runtime = fake_runtime()
    services = Services(settings, runtime)  # type: ignore[arg-type]
    services._runtime = runtime  # type: ignore[assignment]  # as _load leaves it
    shared = SharedStats(open_async_client(REDIS_URL), prefix=prefix, health=RedisHealth(),
                         replica_id="cut")
    runtime.stats.attach(shared)
    services.shared_stats = shared
    raw = redis.Redis.from_url(REDIS_URL)

    # One call, cancelled by uvicorn at the end of its grace, still closing.
    assert services.admission.try_enter()
    runtime.stats.call_started()

    async def call_closing() -> None:
        await asyncio.sleep(0)  # its stages' tasks being cancelled and gathered
        await asyncio.sleep(0)
        runtime.stats.turn_finished({"source": "llm", "hit": False, "intent": "balance",
                                     "interrupted": True})
        runtime.stats.call_ended()
        services.admission.leave()

    closing = asyncio.create_task(call_closing())
    try:
        await services.aclose()
        await closing
        totals = {k.decode(): int(v) for k, v in
                  raw.hgetall(prefix + "stats:totals").items()}
    finally:
        raw.close()
        for executor in runtime.route_executors.values():
            executor.shutdown(wait=False)
    assert totals.get("turns") == 1, (
        f"the call counted its last turn while it closed, after the shutdown began; the "
        f"cluster's counters hold {totals} (shared stats still pending in the departed "
        f"replica: {shared.pending})")


# ---------------------------------------------------------------------------------------
# 4. gateway/shared_stats.py leave: one foreign counter key keeps a departed replica in
#    the cluster view.

async def test_a_departing_replica_with_one_foreign_counter_key_leaves_the_cluster_view(
        prefix: str) -> None:
    """``leave`` is "best-effort goodbye: flush and drop the heartbeat so the replica count
    is exact". Its flush raises RefusedIncrement (a ResponseError) whenever one increment
    hits a key someone reset by hand, as every flush that carries a finished turn does
    then (test_redis_failures covers the flusher's side of this); leave() takes that for
    Redis being unreachable and gives up before deleting its heartbeat. Redis answers, yet
    the departed replica stays in /admin/stats' `replicas` and `active_calls` (its last
    heartbeat's) for three heartbeats, on every shutdown or drain of every replica."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(prefix + "stats:sources", "reset by hand")  # a string where a hash belongs
    stats = SharedStats(open_async_client(REDIS_URL), prefix=prefix, health=RedisHealth(),
                        replica_id="leaving", describe=lambda: {"active_calls": 3})
    try:
        await stats.heartbeat()
        assert raw.get(prefix + "replica:leaving") is not None
        stats.turn_finished({"source": "llm", "hit": False, "intent": "balance"})
        await stats.leave()
        beat = raw.get(prefix + "replica:leaving")
        turns = int(raw.hget(prefix + "stats:totals", "turns") or 0)
    finally:
        raw.close()
        await stats.aclose()
    assert turns == 1  # Redis answered: the rest of the batch was written
    assert beat is None, (
        f"the replica left while Redis answered, yet its heartbeat is still there "
        f"({beat!r}): the cluster view counts it, and its 3 calls, until the key expires")


# ---------------------------------------------------------------------------------------
# 5. docker-compose.yml: stop_grace_period is shorter than the shutdown it must cover.

def test_the_compose_grace_period_covers_the_whole_shutdown() -> None:
    """docker-compose.yml gives each replica stop_grace_period 610s for
    VOICEGATE_DRAIN_TIMEOUT_S 600. After the drain, uvicorn waits up to SHUTDOWN_GRACE_S
    (5 s) for the calls it closed, then Services.aclose waits up to SHUTDOWN_CLOSE_S
    (10 s, added by f796a9f) for the recordings of the calls it cut, then SharedStats.leave
    (2 s) flushes the counters: up to 617 s. Docker SIGKILLs at 610 s, in the middle of the
    very wait that keeps the recordings from being left as .wav.part (and before the last
    counters are flushed). docs/operations.md: "Give the orchestrator a longer grace period
    than both"."""
    from gateway.server import SHUTDOWN_GRACE_S
    from gateway.services import SHUTDOWN_CLOSE_S

    compose = (ROOT / "docker-compose.yml").read_text()
    grace = int(re.search(r"stop_grace_period:\s*(\d+)s", compose).group(1))  # type: ignore[union-attr]
    drain = float(re.search(r'VOICEGATE_DRAIN_TIMEOUT_S:\s*"(\d+)"', compose).group(1))  # type: ignore[union-attr]
    leave_s = 2.0  # SharedStats.leave's default timeout
    needed = drain + SHUTDOWN_GRACE_S + SHUTDOWN_CLOSE_S + leave_s
    assert grace >= needed, (
        f"stop_grace_period {grace}s < drain {drain:g} s + uvicorn's grace "
        f"{SHUTDOWN_GRACE_S:g} s + recordings {SHUTDOWN_CLOSE_S:g} s + goodbye flush "
        f"{leave_s:g} s = {needed:g} s: SIGKILL lands inside the shutdown")


# ---------------------------------------------------------------------------------------
# FaqCache.store_unanswered: a store that comes back empty has answered.

class FlakyStore:
    """A store that names version v1 as current, loses its connection while v1 is read,
    and comes back empty (Redis restarted without persistence)."""

    def __init__(self) -> None:
        self.current: list[str | None] = ["v1"]
        self.on_cleanup_failed = None

    def current_version(self) -> str | None:
        return self.current[0]


def test_a_store_that_comes_back_empty_is_no_longer_unanswered(monkeypatch) -> None:
    # Review: the flag of a version the store was lost under stayed set when the store
    # came back answering that nothing is published.
    store = FlakyStore()

    def lost_mid_read(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("Redis went away while v1 was read")

    monkeypatch.setattr(gateway.faq_cache, "load_cache", lost_mid_read)
    cache = FaqCache(store, embedder=SimpleNamespace())  # type: ignore[arg-type]
    cache.refresh()
    assert cache.store_unanswered  # right: the store failed under the read
    store.current[0] = None  # Redis is back, and answers: nothing is published
    cache.refresh()
    assert not cache.store_unanswered, (
        f"the store answered (no published version, as on a fresh Redis), yet the cache "
        f"still says it did not answer: failed_for_store={cache.failed_for_store}, "
        f"last_error={cache.last_error!r}")


async def test_a_replica_whose_store_comes_back_empty_becomes_ready(
        tmp_path: Path, monkeypatch) -> None:
    """The production symptom of the stale flag: Services._load retries for as long as
    ``store_unanswered`` holds, so the replica stays unready (/readyz 503) until somebody
    seeds, while a replica started a moment later against the same empty store is ready."""
    store = FlakyStore()

    def lost_mid_read(*args: Any, **kwargs: Any) -> Any:
        store.current[0] = None  # ... and Redis restarts empty
        raise StoreUnavailable("Redis went away while v1 was read")

    monkeypatch.setattr(gateway.faq_cache, "load_cache", lost_mid_read)
    monkeypatch.setattr(gateway.services, "LOAD_RETRY_S", (0.001, 0.001))
    monkeypatch.setattr(Services, "open_store", lambda self: store)
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "gc_full_interval_s": 0}, environ={})
    runtime = fake_runtime()
    services = Services(settings, runtime)  # type: ignore[arg-type]
    await services.start()
    try:
        await poll(lambda: services.readiness()["ready"],
                   "the replica turns ready", timeout=5.0)
        assert services.readiness()["ready"], (f"the store answers (empty) yet the replica never turns ready: "
                       f"{services.readiness()}")
    finally:
        await services.aclose()
        for executor in runtime.route_executors.values():
            executor.shutdown(wait=False)


# ---------------------------------------------------------------------------------------
# gateway/cli.py serve: the drain waits for calls only, not for an admin seed under way.

async def test_a_drain_waits_for_an_admin_seed_under_way(monkeypatch, tmp_path: Path) -> None:
    """Review (stop 60): SIGTERM drains until what `serve` hands the DrainingServer as
    ``active_calls`` reaches 0; that counted calls only. A replica carrying no call while an
    operator's seed runs on it (POST /admin/seed: minutes of rendering; a rolling deploy's
    SIGTERM) ended its drain at once: 5 s later uvicorn cancelled the request, the seed was
    cancelled and nothing published, the upload lost though the drain had up to
    drain_timeout_s to give it."""
    import gateway.drain
    import gateway.logs
    from gateway import cli
    from gateway.admin.publish import Publisher
    from gateway.admin.seed_status import UPLOAD

    hooks: dict[str, Any] = {}

    class NotServed:
        def __init__(self, config: Any, begin_drain: Callable[[], None],
                     active_calls: Callable[[], int], timeout_s: float) -> None:
            hooks.update(begin_drain=begin_drain, held=active_calls)
            self.should_exit = False

        def run(self, sockets: Any = None) -> None:
            pass

    monkeypatch.setattr(gateway.drain, "DrainingServer", NotServed)
    monkeypatch.setattr(gateway.logs, "configure", lambda level: None)
    for name in ("VOICEGATE_CONFIG", "VOICEGATE_STORE_DIR", "VOICEGATE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["serve", "--port", "0", "--store", str(tmp_path / "store")]) == 0
    services = hooks["begin_drain"].__self__
    publisher = Publisher(services)
    started, release = asyncio.Event(), asyncio.Event()

    async def seeding() -> None:
        started.set()
        await release.wait()

    seed = asyncio.create_task(publisher._seed(UPLOAD, "faq.csv", seeding))
    await started.wait()
    try:
        assert hooks["held"]() == 1, (
            "a seed is under way, yet the drain counts nothing to wait for: it ends at once "
            "and the shutdown cancels the seed")
    finally:
        release.set()
        await seed
    assert hooks["held"]() == 0


def _serve_on_a_thread(
        main: Callable[[], Awaitable[None]]) -> tuple[threading.Event, threading.Thread]:
    """``asyncio.run(main())`` on a daemon thread, as uvicorn's run (its teardown included);
    the event is set once that loop has ended."""
    loop_ended = threading.Event()

    def serving_loop() -> None:
        asyncio.run(main())
        loop_ended.set()

    runner = threading.Thread(target=serving_loop, daemon=True)
    runner.start()
    return loop_ended, runner


# ---------------------------------------------------------------------------------------
# gateway/services.py: a shutdown waits for a model load (or a cache load) under way.

def test_a_replica_stopped_while_it_loads_exits_without_waiting_for_the_load(
        monkeypatch, tmp_path: Path) -> None:
    """Review (stop 64): the models (Runtime.load) and the cache (FaqCache.refresh: a
    version re-embedded for this replica's embedder takes minutes for a 10k-question FAQ)
    load on asyncio's default executor. A SIGTERM meanwhile (a rolling deploy stopping a
    replica still starting, `docker compose stop`) drains at once (no call) and shuts down,
    but ``asyncio.run`` then waits for the executor's thread to finish the load. Outside a
    container the re-raised SIGTERM kills the process first; as a container's PID 1 (the
    Dockerfile's exec-form CMD) that re-raise is ignored, so the replica stayed up until the
    load was done (minutes), and a second SIGTERM, its handler gone, did nothing either:
    only the orchestrator's SIGKILL after `stop_grace_period` (620 s) ended it. Here: the
    serving loop, shut down while a load blocks, must end without that load ending."""

    entered, release = threading.Event(), threading.Event()

    def load_that_blocks(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait()
        raise RuntimeError("released by the test")

    monkeypatch.setattr(gateway.services.Runtime, "load", load_that_blocks)
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "gc_full_interval_s": 0}, environ={})

    async def serve_then_shut_down() -> None:
        services = Services(settings)
        await services.start()
        await poll(entered.is_set, "the model load to start")
        await services.aclose()  # what the lifespan's shutdown does

    loop_ended, runner = _serve_on_a_thread(serve_then_shut_down)
    try:
        # A bound only so that a regression fails instead of hanging (the load never ends).
        assert loop_ended.wait(timeout=30), (
            "the replica was shut down while its models loaded, yet its event loop does not "
            "end until the load does: the process outlives its SIGTERM by the whole load")
    finally:
        release.set()
        runner.join(timeout=30)


# ---------------------------------------------------------------------------------------
# gateway/admin/publish.py: a shutdown waits for an admin seed's worker thread.

def test_a_replica_shut_down_during_an_admin_seed_cancels_it_and_exits_without_its_thread(
        monkeypatch, caplog, tmp_path: Path) -> None:
    """Review (stop 65): an admin seed (POST /admin/seed) runs on asyncio's default executor.
    A SIGTERM meanwhile drains (the drain waits for the seed up to drain_timeout_s), then
    uvicorn cancels the request, which asks the seed to stop before its next answer; but an
    answer rendering or a calibration under way goes on (minutes), and ``asyncio.run``'s
    teardown, then the interpreter's exit, wait for that non-daemon thread: the replica
    outlives the drain's bounds until the orchestrator SIGKILLs it. Wanted: the shutdown
    cancels the seed itself, logs that it did (the operator seeds again), and the serving loop
    ends without the seed's thread, which `serve` then leaves to ``os._exit``
    (``loads_under_way``); the thread, once it stops, has published nothing."""
    import logging

    import gateway.admin.publish
    from gateway.admin.publish import Publisher
    from intents.store import LocalStore
    from tests.admin_support import GatedVoice, small_faq_csv

    monkeypatch.setattr(gateway.services, "SHUTDOWN_CLOSE_S", 0.2)  # the seed never ends in it
    caplog.set_level(logging.INFO, logger="voicegate")
    voice = GatedVoice()  # its first answer renders until the test lets it go
    runtime = fake_runtime()
    runtime.tts = voice
    store = LocalStore(tmp_path / "store")
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "gc_full_interval_s": 0}, environ={})
    seen: dict[str, Any] = {}
    seeding = gateway.admin.publish.seed_plan_with_voice

    def seed_thread(*args: Any) -> Any:
        seen["thread"] = threading.current_thread()
        return seeding(*args)

    monkeypatch.setattr(gateway.admin.publish, "seed_plan_with_voice", seed_thread)

    async def serve_then_shut_down() -> None:
        services = Services(settings, runtime)  # type: ignore[arg-type]
        services._runtime = runtime  # type: ignore[assignment]  # as loaded
        services.cache = SimpleNamespace(store=store, loaded=None)  # type: ignore[assignment]
        publisher = Publisher(services)
        request = asyncio.create_task(publisher.seed_csv(small_faq_csv().encode(), "faq.csv"))
        await poll(voice.rendering.is_set, "the seed to render its first answer")
        request.cancel()  # uvicorn, past the drain and its grace
        await services.aclose()  # the lifespan's shutdown
        seen["cancelling"] = publisher.status.snapshot().get("cancelling")

    loop_ended, runner = _serve_on_a_thread(serve_then_shut_down)
    try:
        # A bound only so that a regression fails instead of hanging (the render never ends).
        assert loop_ended.wait(timeout=30), (
            "the replica was shut down while an admin seed rendered, yet its event loop does "
            "not end until the seed's thread does: the process outlives the drain's bounds")
        assert seen["thread"].is_alive() and gateway.services.loads_under_way(), (
            "the seed's thread still runs: `serve` must end the process without waiting "
            "for it (os._exit)")
        assert seen["cancelling"] is True, "the shutdown did not cancel the seed"
        logged = [r for r in caplog.records if r.getMessage() == "seed_cancelled_at_shutdown"]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        fields = logged[0].fields  # type: ignore[attr-defined]
        assert (fields["kind"], fields["source"], fields["ended"]) == ("upload", "faq.csv",
                                                                       False), fields
        assert "seed again" in fields["detail"], fields
    finally:
        voice.release.set()
        runner.join(timeout=30)
    # The answer under way finishes; the cancel stops the seed before the next: nothing
    # published, the store holds no version.
    seen["thread"].join(timeout=30)
    assert not seen["thread"].is_alive()
    assert len(voice.texts) == 1 and store.current_version() is None


async def test_the_shutdown_itself_cancels_an_admin_seed_whose_request_still_runs(
        caplog, tmp_path: Path) -> None:
    """Review (stop 65, read-back): the test above cancels the seed's request first (as
    uvicorn does past its grace), which alone asks the seed to stop, so it passed with
    ``Publisher.shut_down`` not cancelling at all. Here the request still runs when the
    shutdown comes: the shutdown's own cancel must stop the seed before its next answer,
    and say so; without it the seed renders on and publishes."""
    import logging

    from gateway.admin.publish import Publisher
    from intents.store import LocalStore
    from tests.admin_support import GatedVoice, small_faq_csv

    caplog.set_level(logging.INFO, logger="voicegate")
    voice = GatedVoice()
    runtime = fake_runtime()
    runtime.tts = voice
    store = LocalStore(tmp_path / "store")
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(tmp_path),
                              "gc_full_interval_s": 0}, environ={})
    services = Services(settings, runtime)  # type: ignore[arg-type]
    services._runtime = runtime  # type: ignore[assignment]  # as loaded
    services.cache = SimpleNamespace(store=store, loaded=None)  # type: ignore[assignment]
    publisher = Publisher(services)
    request = asyncio.create_task(publisher.seed_csv(small_faq_csv().encode(), "faq.csv"))
    try:
        await poll(voice.rendering.is_set, "the seed to render its first answer")
        stopping = asyncio.create_task(publisher.shut_down(30.0))
        await poll(lambda: publisher.status.snapshot().get("cancelling") is True,
                   "the shutdown to cancel the seed")
        voice.release.set()  # the answer under way ends; the seed must not render another
        await stopping
    finally:
        voice.release.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await request
    assert len(voice.texts) == 1 and store.current_version() is None
    logged = [r for r in caplog.records if r.getMessage() == "seed_cancelled_at_shutdown"]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].fields["ended"] is True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# gateway/admin/routes.py: a draining replica starts no publish.

async def test_a_draining_replica_refuses_a_new_publish_and_still_cancels(tmp_path: Path) -> None:
    """Review (stop 67): a draining replica answers a new seed, entry edit, deletion or
    promotion with 503 `draining` before reading its body, so no seed starts that the drain
    would wait for and the shutdown then cancel; DELETE /admin/seed still works."""
    import httpx

    from gateway.clock import ManualClock
    from tests.admin_support import AUTH, small_faq_csv, warm_app

    app = warm_app(tmp_path / "store", ManualClock())
    services = app.state.services
    services.begin_drain()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=AUTH) as client:
        writes = {
            "POST /admin/seed": await client.post(
                "/admin/seed", content=small_faq_csv().encode(),
                headers={"content-type": "text/csv"}),
            "POST /admin/entries": await client.post(
                "/admin/entries", json={"intent": "lost_card", "answer": "Call us.",
                                        "questions": ["I lost my card"]}),
            "DELETE /admin/entries/{id}": await client.delete("/admin/entries/opening_hours"),
            "POST /admin/misses/promote": await client.post(
                "/admin/misses/promote", json={"question": "is there a Boston branch",
                                               "entry_id": "boston", "answer": "No."}),
        }
        cancel = await client.delete("/admin/seed")
    for route, response in writes.items():
        assert response.status_code == 503, (route, response.status_code, response.text)
        body = response.json()
        assert body["draining"] is True and "shutting down" in body["error"], (route, body)
        assert "nothing was published" in body["error"], (route, body)
    assert services.held == 0, "a publish started on a draining replica holds its drain"
    assert app.state.admin_publisher.status.snapshot() == {"running": False, "last": None}
    assert cancel.status_code == 409 and "no seed is running" in cancel.json()["error"]
