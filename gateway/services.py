"""The composition root of a gateway process: settings, warm runtime, responder, router.

``Services.start()`` loads models on a worker thread so the HTTP server answers
``/healthz`` at once and ``/readyz`` when everything is warm.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from functools import partial
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.websockets import WebSocket

from intents.loader import LoadedCache
from intents.redis_store import RedisKeys
from intents.store import Store, StoreUnavailable

from . import logs
from .call import Call, CallDeps, CallOutput, ConversationKeeper
from .call.engine import recordings_written
from .call.session import Admission, CallSession
from .clock import SYSTEM_CLOCK, Clock
from .collector import CollectorPolicy
from .faq_cache import FaqCache
from .hedge import HedgedChat
from .http_body import BodyAbandoned, BodyTimeout, BodyTooLarge, read_body
from .overload import OverloadGate, watch_loop_lag
from .route_batcher import RoutingLanes
from .protocol import StartMessage
from .redis_link import RedisHealth, VersionSubscriber, open_async_client
from .responder import Responder
from .runtime import Runtime, load_failure
from .settings import Settings
from .shared_stats import SharedStats
from .stats import Stats, answer_mark, latency_percentiles
from .stores import open_store
from .transports.call_records import REDIS_TIMEOUT_S
from .transports.twilio_context import CallContexts
from .transports.twilio_ended import EndedCalls
from .transports.twilio_rest import TwilioCallControl

log = logging.getLogger("voicegate.services")
BODY_REFUSAL_LOG_EVERY_S = 10.0  # a refused body is logged at most this often a code

# Start-up steps that reach the network (the voice rendering the prompts, the store) are
# retried after a failure: first after this long, doubling up to the cap.
LOAD_RETRY_S = (1.0, 30.0)
# At shutdown, how long calls cut short may take to close (their last counts) and write
# their recordings.
SHUTDOWN_CLOSE_S = 10.0


T = TypeVar("T")
_LOADING: set[threading.Thread] = set()  # off_loop's threads still running


def loads_under_way() -> bool:
    """A load (``off_loop``) still runs, or an admin seed's step (gateway/admin/publish.py):
    the process must end without the interpreter's teardown (gateway/cli.py ``serve``),
    which would kill its thread inside a model's native code (an abort, a segfault) or wait
    for it."""
    return any(thread.is_alive() for thread in list(_LOADING))


async def off_loop(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a daemon thread of its own, awaited (as ``asyncio.to_thread``).

    For the loads a shutdown must not wait for: the models (``Runtime.load``), a cache
    version (``FaqCache.refresh``: minutes when it is re-embedded) and an admin seed's steps
    (its rendering and calibration: minutes, gateway/admin/publish.py). On asyncio's default
    executor, ``asyncio.run`` (uvicorn's run) waits for such a thread at its end, and the
    interpreter joins executor threads at exit: a replica stopped while it loads stayed up
    until the load was done (as a container's PID 1 the re-raised SIGTERM is ignored, and a
    second one finds no handler). A daemon thread ends with the process; what it wrote it
    wrote atomically (the model cache, re-embedded versions); `serve` ends a process whose
    load still runs with ``os._exit`` (``loads_under_way``)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, exc: BaseException | None) -> None:
        if done.done():  # the awaiting task was cancelled (a shutdown)
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result, exc = context.run(work, *args), None
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            result, exc = None, error
        finally:
            _LOADING.discard(threading.current_thread())
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop has closed (shut down meanwhile): nobody waits
            pass

    thread = threading.Thread(target=run, name=f"vg-{getattr(work, '__name__', 'load')}",
                              daemon=True)
    _LOADING.add(thread)
    thread.start()
    return await done


def _counted_on(loop: asyncio.AbstractEventLoop, stats: Stats, code: str) -> Callable[[], None]:
    """Counts an error from a worker thread (a publish's clean-up) on the serving loop,
    where the stats and their observers live."""
    return lambda: loop.call_soon_threadsafe(stats.error, code)


def _entries_published_on(loop: asyncio.AbstractEventLoop,
                          stats: Stats) -> Callable[[LoadedCache], None]:
    """Tells the stats, on the serving loop, what each entry of a version just loaded plays
    (its hits are counted for that: a changed or dropped entry's count is cleared)."""
    def published(loaded: LoadedCache) -> None:
        marks = {e.id: answer_mark(e.action.value, e.answer) for e in loaded.entries.values()}
        # Its intents, in seed order: only they are counted by name (a bounded label set).
        intents = list(dict.fromkeys(e.intent for e in loaded.entries.values()))
        try:
            loop.call_soon_threadsafe(partial(stats.entries_published, marks, loaded.version,
                                              intents=intents))
        except RuntimeError:  # the loop closed (shut down) while the version loaded
            pass
    return published


class Services:
    def __init__(self, settings: Settings, runtime: Runtime | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        # The HTTP handlers' time: request bodies' deadlines (a test's ManualClock).
        self.clock = clock
        self._body_refusal_logs = logs.Throttle(BODY_REFUSAL_LOG_EVERY_S)
        self._runtime: Runtime | None = None
        self._given_runtime = runtime
        # Counters exist before the models load: refusals while loading are counted too.
        self.stats: Stats = runtime.stats if runtime is not None else Stats()
        self.admission = Admission(settings.max_calls)
        # How far behind the event loop runs; refuses new calls while too far (overload.py).
        self.overload = OverloadGate(settings.overload_loop_lag_ms / 1000.0,
                                     busy_threshold=settings.overload_loop_busy)
        self._lag_task: asyncio.Task[None] | None = None
        self._call_deps: CallDeps | None = None
        self.cache: FaqCache | None = None
        self.route_batcher: RoutingLanes | None = None
        self.responder: Responder | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._collector: CollectorPolicy | None = None
        self.load_error: str | None = None
        # A start-up that cannot succeed (a model that does not load): why. Handed to
        # ``on_fatal``, which whoever runs the server sets to stop it (gateway/cli.py,
        # gateway/server.py), so the process exits instead of staying up unready for good.
        self.fatal_error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        # Only with a shared Redis (settings.redis_url):
        self.redis_health: RedisHealth | None = None
        self.shared_stats: SharedStats | None = None
        self._redis_tasks: list[asyncio.Task[None]] = []
        self._twilio_control: TwilioCallControl | None = None
        self._twilio_ended: EndedCalls | None = None
        self._twilio_contexts: CallContexts | None = None
        # The admin API's seed lock (gateway/admin/publish.py), once it has one: a drain
        # waits for a seed under way as for a call, not cancel it 5 s after a drain of no call.
        self.seed_lock: asyncio.Lock | None = None
        # Its ``Publisher.shut_down``: the shutdown cancels the seed still under way.
        self.stop_seed: Callable[[float], Awaitable[None]] | None = None

    @property
    def ready(self) -> bool:
        return self._runtime is not None and self.responder is not None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def held(self) -> int:
        """What a drain waits for (gateway/drain.py): the calls (``Admission.held``) and a
        seed under way."""
        seeding = self.seed_lock is not None and self.seed_lock.locked()
        return self.admission.held + int(seeding)

    def begin_drain(self) -> None:
        """Take no new calls (``/readyz`` 503, upgrades 503, ``start`` refused); the
        running ones go on (gateway/drain.py decides when the process exits)."""
        self.admission.draining = True

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the runtime is not loaded yet")
        return self._runtime

    async def start(self) -> None:
        self._load_task = asyncio.create_task(self._load(self._given_runtime))
        # Exported by the Services that watches its loop: one built and never started (tests
        # build several on a shared runtime's Stats) does not take over the gauges.
        self.stats.watch_overload(self.overload)
        self._lag_task = asyncio.create_task(watch_loop_lag(self.overload, self.clock),
                                             name="vg-loop-lag")

    async def _load(self, runtime: Runtime | None) -> None:
        try:
            if runtime is None:
                runtime = await off_loop(Runtime.load, self.settings, self.stats)
        except Exception as exc:
            # Not retried: loading the models reaches no network, so what failed (a file,
            # a setting, a package) fails again. Kept up, the replica would answer
            # /healthz 200 and /readyz 503 for good, which restarts nothing; the process
            # exits with the cause instead (`voicegate serve`: status 1), and the
            # orchestrator restarts it or alerts. /readyz shows it until then.
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.fatal_error = load_failure(exc)
            log.exception("runtime_load_failed")
            if self.on_fatal is not None:
                self.on_fatal(self.fatal_error)
            return
        # A voice or store briefly down at start-up must not keep the replica unready for
        # good: retried with backoff, the last error shown by /readyz meanwhile.
        delay, cap = LOAD_RETRY_S
        cache: FaqCache | None = None
        rendered = False  # a retry for the store does not render the prompts again
        while True:
            try:
                if not rendered:
                    await runtime.render_prompts(self.settings.greeting)
                    rendered = True
                if cache is None:
                    cache = FaqCache(self.open_store(), runtime.embedder)
                    cache.store.on_cleanup_failed = _counted_on(
                        asyncio.get_running_loop(), runtime.stats, "cache_cleanup_failed")
                    cache.on_loaded = _entries_published_on(asyncio.get_running_loop(),
                                                            runtime.stats)
                await off_loop(cache.refresh)
                if cache.store_unanswered:  # refresh keeps its failure; ready means read
                    raise StoreUnavailable(cache.last_error or "the store did not answer")
                break
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("runtime_load_failed retry_in_s=%s", delay)
            await asyncio.sleep(delay)
            delay = min(cap, delay * 2)
        self.load_error = None
        self._runtime = runtime
        self.cache = cache
        target_ms = self.settings.route_batch_target_ms
        self.route_batcher = RoutingLanes.build(
            cache.route_many, runtime.route_executors, runtime.embedder.is_cached,
            target_batch_ms=target_ms,
            gather_cold_finals=self.settings.route_gather_cold_finals,
            embed_one=(None if runtime.embedder.batches_share_a_pass
                       else runtime.embedder.encode))
        self.responder = Responder(runtime.agent, runtime.tts, runtime.prompts, cache.audio,
                                   tts_gap_timeout_s=self.settings.tts_gap_timeout_s)
        self._call_deps = CallDeps(settings=self.settings, vad=runtime.vad_batcher,
                                   stt=runtime.stt, responder=self.responder,
                                   router=self.route_batcher.route, stats=runtime.stats,
                                   new_conversation=runtime.agent.new_conversation,
                                   turn_model=(runtime.judge_turn if runtime.turn_model
                                               else None),
                                   cache_version=lambda: cache.version)
        poll_s = self.settings.cache_poll_s
        if self.settings.redis_url:
            self._start_redis(runtime, cache)
            poll_s = self.settings.redis_poll_s
        self._watch_task = asyncio.create_task(self._watch_cache(cache, poll_s))
        # What start-up built lives as long as the process: frozen, and full collections
        # on a slow timer instead of Python's schedule (gateway/collector.py).
        self._collector = CollectorPolicy(self.settings.gc_full_interval_s,
                                          observe=runtime.stats.prometheus.gc_pauses.observe)
        self._collector.start()
        if isinstance(runtime.agent.llm, HedgedChat):  # its failures beside the call's errors
            runtime.stats.watch_hedge(runtime.agent.llm.stats)
        # Webhook failures are misses, not call errors: count them; and the model's own
        # handoffs (transfer_to_person, offered whenever there is an LLM and the line can).
        if runtime.agent.tools or runtime.agent.llm is not None:
            runtime.stats.watch_tools(runtime.agent.runner)
        slots = getattr(runtime.tts, "slots", None)
        if slots is not None:  # a capped cloud voice (elevenlabs_max_concurrent)
            runtime.stats.watch_slots(slots)
        logs.event(log, "ready", load_times_s=runtime.load_times_s, cache_version=cache.version,
                   store="redis" if self.settings.redis_url else "local")

    async def _let_cut_calls_close(self) -> None:
        """Calls the shutdown cut short (uvicorn cancels what outlives its grace) still
        close: they count their last turns (for the shared counters, detached next) and
        write their recordings. Let them, up to ``SHUTDOWN_CLOSE_S``, before the loop's
        teardown cancels what is left (``.wav.part`` files, turns never counted)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_CLOSE_S
        while self.admission.active and loop.time() < deadline:
            await asyncio.sleep(0.05)  # a cancelled call's close hands its recording over
        left = (await recordings_written(deadline - loop.time())
                if self.settings.record_dir else 0)
        if left or self.admission.active:
            logs.event(log, "calls_unfinished_at_shutdown", logging.WARNING,
                       recordings=left, calls=self.admission.active)

    async def _stop_seed(self) -> None:
        """An admin seed still under way (the drain waited for it up to its timeout) is
        cancelled, and gets as long as the calls cut short to end; a seed whose thread does
        not end in that time is left to the process's exit (``off_loop``, gateway/cli.py
        ``serve``): nothing is half-published, the store's publish moves its pointer last."""
        if self.stop_seed is not None:
            await self.stop_seed(SHUTDOWN_CLOSE_S)

    def open_store(self) -> Store:
        return open_store(self.settings)

    def _start_redis(self, runtime: Runtime, cache: FaqCache) -> None:
        """Pub/sub reloads, degraded-mode tracking and the shared counters. The counters'
        commands are sent again at once on a new connection when Redis had closed their
        pooled one (a restart, its idle timeout): a batch is applied at most once (its
        sequence number), the rest are idempotent. The subscriber's client retries nothing:
        its reconnect must be seen (its catch-up refresh)."""
        settings = self.settings
        health = RedisHealth(on_change=runtime.stats.set_degraded)
        shared = SharedStats(
            open_async_client(settings.redis_url, reconnect_once=True),
            prefix=settings.redis_prefix, health=health,
            heartbeat_s=settings.redis_heartbeat_s,
            describe=lambda: {"active_calls": runtime.stats.active_calls,
                              "cache_version": cache.version})
        runtime.stats.attach(shared)  # with what was counted while the models loaded
        subscriber = VersionSubscriber(settings.redis_url, RedisKeys(settings.redis_prefix),
                                       lambda: self._refresh(cache), health)
        self.redis_health, self.shared_stats = health, shared
        self._redis_tasks = [asyncio.create_task(subscriber.run()),
                             asyncio.create_task(shared.run())]

    async def _refresh(self, cache: FaqCache) -> None:
        try:
            await off_loop(cache.refresh)
        except Exception:  # a bad version must not stop the watcher
            log.exception("cache_refresh_failed")

    async def _watch_cache(self, cache: FaqCache, poll_s: float) -> None:
        """Pick up newly published versions (another process may seed at any time)."""
        while True:
            await asyncio.sleep(poll_s)
            await self._refresh(cache)

    def new_call(self, output: CallOutput, start: StartMessage,
                 call_id: str | None = None, resumed: bool = False,
                 keeper: ConversationKeeper | None = None, transport: str = "native") -> Call:
        assert self._call_deps is not None, "new_call before the runtime is ready"
        return Call(self._call_deps, output, start.sample_rate, metadata=start.metadata,
                    call_id=call_id, resumed=resumed, keeper=keeper, transport=transport)

    def twilio_control(self) -> TwilioCallControl | None:
        """Twilio's REST API for transfers and hang-ups; None without an auth token."""
        settings = self.settings
        if not settings.twilio_auth_token:
            return None
        if self._twilio_control is None:
            self._twilio_control = TwilioCallControl(settings.twilio_auth_token,
                                                     settings.twilio_api_url,
                                                     settings.twilio_api_timeout_s,
                                                     settings.twilio_account_sid)
        return self._twilio_control

    def twilio_ended(self) -> EndedCalls:
        """The Twilio calls ended on purpose (not to be resumed), shared through Redis when
        the replicas share one. Made on first use, on the serving loop (its Redis client
        binds to it)."""
        if self._twilio_ended is None:
            self._twilio_ended = EndedCalls(self.clock, self._twilio_redis(),
                                            prefix=self.settings.redis_prefix,
                                            count_error=self.stats.error)
        return self._twilio_ended

    def twilio_contexts(self) -> CallContexts:
        """The Twilio calls' conversations, kept for a resumed stream (through Redis when
        the replicas share one). Made on first use, on the serving loop."""
        if self._twilio_contexts is None:
            self._twilio_contexts = CallContexts(self.clock, self._twilio_redis(),
                                                 prefix=self.settings.redis_prefix,
                                                 count_error=self.stats.error)
        return self._twilio_contexts

    def _twilio_redis(self) -> aioredis.Redis | None:
        """A client of its own for each kind of Twilio record (each closes its own). A
        record is one command, not a loop: one whose connection Redis had closed (a
        restart, its idle timeout) is sent again at once on a new one."""
        url = self.settings.redis_url
        return (open_async_client(url, timeout_s=REDIS_TIMEOUT_S, reconnect_once=True)
                if url else None)

    async def read_body(self, request: Request, limit: int) -> bytes:
        """A request's body, at most ``limit`` bytes and in full within
        ``settings.body_timeout_s`` (``BodyTooLarge``, ``BodyTimeout``: gateway/http_body.py).
        A body refused is counted here (``body_timeout``, answered 408; ``body_too_large``,
        413; ``body_abandoned``, its client gone: ``BodyAbandoned``), where every handler
        that answers it reads it, as every refusal is counted under its code."""
        try:
            return await read_body(request, limit, self.settings.body_timeout_s, self.clock)
        except BodyTimeout as exc:
            self._refuse_body("body_timeout", request, exc)
            raise
        except BodyTooLarge as exc:
            self._refuse_body("body_too_large", request, exc)
            raise
        except BodyAbandoned as exc:
            self._refuse_body("body_abandoned", request, exc)
            raise

    def _refuse_body(self, code: str, request: Request, reason: Exception) -> None:
        """Count every refused body; log one a code every ``BODY_REFUSAL_LOG_EVERY_S`` (anyone
        can post to the Twilio webhook: a flood must not flood the log too)."""
        self.stats.error(code)
        held = self._body_refusal_logs.admit(code, self.clock.now())
        if held is None:
            return
        client = request.client.host if request.client else "-"
        more = f" ({held} more since the last line)" if held else ""
        log.warning("%s path=%s client=%s: %s%s", code, request.url.path, client, reason, more)

    def open_session(self, websocket: WebSocket, transport: str) -> CallSession:
        """The transport side of one connection (admission, bounds, timeouts)."""
        return CallSession(websocket, self.settings, self.stats, self.admission, transport)

    def readiness(self) -> dict[str, Any]:
        if self._runtime is None:
            return {"ready": False, "error": self.load_error, "draining": self.draining,
                    "active_calls": self.admission.active}
        cache = self.cache
        health = self.redis_health
        # Degraded is still ready: the replica serves the version it holds. Draining is
        # not: a balancer must stop sending calls here.
        return {"ready": not self.draining, "draining": self.draining,
                "active_calls": self.admission.active,
                "overloaded": self.overload.overloaded,
                "loop_lag_ms": round(self.overload.lag_s * 1000.0, 1),
                "loop_busy": round(self.overload.busy, 3),
                "load_times_s": self._runtime.load_times_s,
                "stt": self._runtime.stt.name, "tts": self._runtime.tts.name,
                "store": "redis" if self.settings.redis_url else "local",
                "cache_version": cache.version if cache else None,
                "cache_error": cache.last_error if cache else None,
                "degraded": bool(health and health.degraded),
                "degraded_reason": health.reason if health else None}

    async def stats_snapshot(self) -> dict[str, Any]:
        """What ``/admin/stats`` answers: this replica's stats with the counters summed over
        every replica (with Redis), and the serving cache version; ``entry_hits`` only for
        the entries that version holds."""
        stats = self.runtime.stats
        # The percentiles on a thread: on the loop they held every call ~20 ms a request
        # (the dashboard asks every 3 s).
        local = stats.snapshot(await off_loop(latency_percentiles, stats.latency_samples()))
        if self.shared_stats is None:
            snapshot = dict(local, scope="replica", replicas=1)
        else:
            snapshot = await self.shared_stats.cluster_snapshot(local)
        loaded = self.cache.loaded if self.cache else None
        snapshot["cache_version"] = loaded.version if loaded else None
        # A version's load clears the counts of the ids it dropped or changed (here, and in
        # Redis once this replica writes it); report only the ids the serving version holds,
        # so what another replica still counts for a dropped entry is not shown meanwhile.
        held = loaded.entries if loaded else {}
        snapshot["entry_hits"] = {k: v for k, v in (snapshot.get("entry_hits") or {}).items()
                                  if k in held}
        return snapshot

    async def aclose(self) -> None:
        await asyncio.gather(self._let_cut_calls_close(), self._stop_seed())
        for task in (self._load_task, self._watch_task, self._lag_task, *self._redis_tasks):
            if task is not None:
                task.cancel()
        if self._collector is not None:
            await self._collector.aclose()
        # Let the counter flusher finish cancelling before the final flush in leave().
        await asyncio.gather(*self._redis_tasks, return_exceptions=True)
        if self.shared_stats is not None:
            if self._runtime is not None:
                self._runtime.stats.observers.remove(self.shared_stats)
                self._runtime.stats.set_degraded(None)
            await self.shared_stats.leave()
            await self.shared_stats.aclose()
        if self._twilio_control is not None:
            await self._twilio_control.aclose()
        if self._twilio_ended is not None:
            await self._twilio_ended.aclose()
        if self._twilio_contexts is not None:
            await self._twilio_contexts.aclose()
        # A runtime handed in by the caller is the caller's to close.
        if self._runtime is not None and self._given_runtime is None:
            await self._runtime.aclose()
