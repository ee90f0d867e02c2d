"""This replica's live link to the shared Redis: health and version notifications.

``RedisHealth`` says whether the replica is degraded (Redis unreachable) and why.
``VersionSubscriber`` keeps a pub/sub subscription on ``<prefix>versions`` and
calls ``refresh`` for every published version; when the connection drops it marks
the replica degraded, reconnects with backoff, and on return refreshes once to
catch up with anything published meanwhile. While degraded the replica keeps
serving the version it holds: nothing here ever unloads a cache. A Redis still loading
its dataset (-LOADING) confirms a subscription but serves no read: the link is up only
once it serves one, and till then degraded as "loading its dataset" (starting), not as
unreachable. A Redis refusing writes (-MISCONF) refuses the keep-alive PING too: an answer,
so the link stays up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import (ClusterDownError, ConnectionError, OutOfMemoryError,
                              ReadOnlyError, RedisError, ResponseError, TryAgainError)
from redis.retry import Retry

from intents.redis_store import (LOADING_SAID, RedisKeys, cannot_persist, redacted,
                                 refused_credentials, refused_writes, refusing_for_now,
                                 still_loading)

from . import logs
from .clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("voicegate.redis")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
# A degraded replica whose cause changes (Redis back with another password, refusing
# writes) logs the new one: at most this often, as a link's errors may word the same
# failure differently from one attempt to the next.
REASON_LOG_EVERY_S = 60.0
# Replies that refuse a command for now, not for good: a replica promoted or demoted in a
# failover (READONLY, MASTERDOWN, TRYAGAIN) or memory full. A write refused so is retried,
# unlike one a foreign value under its key refuses (WRONGTYPE), which would fail again.
NOT_NOW: tuple[type[ResponseError], ...] = (ReadOnlyError, ClusterDownError, TryAgainError,
                                            OutOfMemoryError)


def open_async_client(url: str, timeout_s: float = 5.0, *,
                      reconnect_once: bool = False) -> aioredis.Redis:
    """An asyncio client whose failures surface at once: the callers own the retry loops
    (redis-py's silent reconnects would hide an outage and skip the catch-up).

    ``reconnect_once``: for callers whose every command may be sent twice to the same end
    (the Twilio records: a SET, a GET, a DEL, their put script; the shared counters: a batch
    under its sequence number, applied at most once, the entry marks' idempotent script,
    the heartbeat's SET, reads).
    redis-py's pool hands out a connection Redis has closed (a restart, a failover, its idle
    ``timeout``, a balancer's reset) as open, and its command fails though Redis answers
    again: such a command is sent again at once on a new connection. A connection error
    only: a timeout is not retried. (The asyncio ``Retry``: the sync one, which redis-py's
    asyncio client also takes, calls the command without awaiting it and retries nothing.)"""
    retry = (AsyncRetry(NoBackoff(), 1, supported_errors=(ConnectionError,)) if reconnect_once
             else Retry(NoBackoff(), 0))
    return aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s,
                                   socket_timeout=timeout_s, retry=retry)


def failure_said(exc: BaseException) -> str:
    """A Redis failure as an operator reads it: what Redis is doing (loading its dataset,
    refusing writes: for want of a disk, as a read-only replica, for want of memory; busy
    behind a script, a replica cut off from its primary) said plainly, as a publish says
    it, else the error's type and message."""
    if still_loading(exc):
        return f"Redis {LOADING_SAID} (tried again later): {exc}"
    said = refused_writes(exc)
    if said:
        return f"{said}. Redis said: {exc}"
    busy = refusing_for_now(exc)  # a script past its time limit, a replica cut off
    if busy:
        return f"Redis {busy} (tried again later): {exc}"
    return f"{type(exc).__name__}: {exc}"


def honour_cancel() -> None:
    """Raise the cancel a redis-py call swallowed. redis-py sends each command under
    ``asyncio.wait_for``, which on Python 3.11 drops a cancel that lands in the step its
    send completes: a loop around such calls would go on, and whoever cancelled it and
    waits for it (a replica's shutdown) would wait for good. The task still counts the
    request (``cancelling``), so a loop checks it at each turn."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisHealth:
    """Degraded while any user of the link (subscriber, counters) reports Redis down."""

    def __init__(self, on_change: Callable[[str | None], None] | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._down: dict[str, str] = {}  # who -> why
        self._on_change = on_change
        self._clock = clock
        self._logged: tuple[str | None, float] = (None, 0.0)  # the reason logged, and when

    @property
    def degraded(self) -> bool:
        return bool(self._down)

    @property
    def reason(self) -> str | None:
        return "; ".join(f"{who}: {why}" for who, why in sorted(self._down.items())) or None

    def down(self, who: str, why: str) -> None:
        """``who`` failed, for ``why``: logged when the replica turns degraded, and again
        when the reason differs from the one logged (at most every REASON_LOG_EVERY_S):
        each link says its failure again at each attempt."""
        was = self.reason
        self._down[who] = why
        logged, at = self._logged
        now = self._clock.now()
        if was is None or (self.reason != logged and now - at >= REASON_LOG_EVERY_S):
            logs.event(log, "redis_degraded", logging.WARNING, reason=self.reason)
            self._logged = (self.reason, now)
        self._changed(was)

    def up(self, who: str) -> None:
        was = self.reason
        self._down.pop(who, None)
        if was is not None and self.reason is None:
            logs.event(log, "redis_recovered")
        self._changed(was)

    def _changed(self, was: str | None) -> None:
        if self._on_change is not None and was != self.reason:
            self._on_change(self.reason)


class VersionSubscriber:
    def __init__(self, url: str, keys: RedisKeys, refresh: Callable[[], Awaitable[None]],
                 health: RedisHealth, ping_s: float = 5.0) -> None:
        self._url = url
        self._keys = keys
        self._refresh = refresh
        self._health = health
        self._ping_s = ping_s  # a silent dead link is found by pinging it

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            client = open_async_client(self._url)
            # Subscribe confirmations are read, not ignored: the link is up once Redis has
            # confirmed the subscription, not once the command is sent (an ACL without the
            # channel, or a Redis that stopped answering, never shows healthy).
            pubsub = client.pubsub(ignore_subscribe_messages=False)
            try:
                await pubsub.subscribe(self._keys.channel)
                await self._confirmed(pubsub)
                # Redis confirms a SUBSCRIBE while it is still loading its dataset (after a
                # restart) and refuses every read: up once it serves a read.
                await client.exists(self._keys.current)
                self._health.up("subscriber")
                backoff = BACKOFF_MIN_S
                # Subscribed first, then refresh: a version published in between is not missed.
                await self._refresh()
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                # An error reply (an ACL without the channel) or credentials Redis refused
                # (a wrong password, an unknown user) is no outage: say which.
                # Still loading its dataset (-LOADING) is no outage either: Redis is starting.
                what = (f"{LOADING_SAID} (tried again later)" if still_loading(exc)
                        else "refused the credentials" if refused_credentials(exc)
                        else "refused" if isinstance(exc, ResponseError) else "unreachable")
                self._health.down("subscriber", f"Redis at {redacted(self._url)} {what}: "
                                                f"{type(exc).__name__}: {exc}")
            finally:
                await _quietly(pubsub.aclose())
                await _quietly(client.aclose())
            honour_cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _confirmed(self, pubsub: aioredis.client.PubSub) -> None:
        """Wait for Redis to confirm the subscription (its refusal raises as a RedisError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ping_s
        while (left := deadline - loop.time()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is not None and message.get("type") == "subscribe":
                return
        raise ConnectionError(f"Redis did not confirm SUBSCRIBE within {self._ping_s:g} s")

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        pinged = False  # a PING is out and nothing has come back since
        while True:
            honour_cancel()
            try:
                message = await pubsub.get_message(timeout=self._ping_s)
            except ResponseError as exc:
                if not cannot_persist(exc):
                    raise
                # Redis refusing writes (MISCONF) refuses PING too: an answer all the same,
                # the link is alive (the counters and publishes report the refused writes).
                pinged = False
                continue
            if message is None:
                if pinged:
                    raise ConnectionError(f"no reply to PING within {self._ping_s:g} s")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message.get("type") == "message":
                logs.event(log, "version_published", version=_text(message.get("data")))
                await self._refresh()


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def _quietly(closing: Awaitable[object]) -> None:
    try:
        await closing
    except (RedisError, OSError):
        pass
