"""Short-lived records about Twilio calls: in this replica's memory and, with a shared
Redis, in every replica's.

A stream's end makes Twilio request ``/twilio/stream-ended`` from whichever replica the
balancer picks, and the resumed stream may land on another one still: what the first
replica knew of the call (that it hung up, what was said) has to be readable there. Each
record is a string under a kind ("ended", "context") and the call's CallSid, kept for
``ttl_s``: as Redis key ``<prefix>twilio:<kind>:<CallSid>`` (it expires on its own) and
here in memory (bounded, same expiry), for a single replica and for when Redis is down.

A record kept with ``tombstones`` is deleted for good: for ``ttl_s`` after ``delete`` it
holds ``TOMBSTONE`` (it reads as none, and nothing of the call's is left in it), which
``put`` never replaces, here nor in Redis (one script, so no write lands between the read
and the write). A write still under way as the record is deleted (a call's last one,
racing Twilio's request that deletes it, maybe on another replica) does not bring it back.

A Redis failure never fails the call: each command waits ``timeout_s`` at most, and a
failure is logged and counted as ``twilio_<kind>_<what>_failed`` (what: record, lookup,
forget); the local record stands.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import logs
from ..clock import Clock

log = logging.getLogger("voicegate.twilio")

# A record waits this long for Redis at most (a stalled Redis must not hold the call).
REDIS_TIMEOUT_S = 1.0
# Ids safe in a Redis key, a log field or a file name: Twilio's CallSid is "CA" and 32 hex
# digits; an unsigned stream can name any string, which is not remembered.
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a record deleted for good holds until it expires (no record ever is empty).
TOMBSTONE = ""
# ``put`` of a record with tombstones: SET, unless the key holds one.
_PUT_UNLESS_TOMBSTONE = """
if redis.call('GET', KEYS[1]) == ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class CallRecords:
    def __init__(self, kind: str, clock: Clock, redis: aioredis.Redis | None = None, *,
                 prefix: str = "voicegate:", ttl_s: float, max_local: int,
                 timeout_s: float = REDIS_TIMEOUT_S,
                 count_error: Callable[[str], None] | None = None,
                 tombstones: bool = False) -> None:
        self.kind = kind
        self.tombstones = tombstones
        self._clock = clock
        self._redis = redis
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._ttl_whole_s = max(1, round(ttl_s))  # Redis expires keys in whole seconds
        self._max_local = max_local
        self._timeout_s = timeout_s
        self._count_error = count_error
        # CallSid -> (expires at on the clock, value), oldest first
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def key(self, call_sid: str) -> str:
        return f"{self._prefix}twilio:{self.kind}:{call_sid}"

    async def put(self, call_sid: str, value: str) -> None:
        """Record ``value`` for ``call_sid`` (replacing any but a tombstone), here and in
        Redis."""
        if not SAFE_ID.fullmatch(call_sid):
            return
        if self.tombstones and self._local_value(call_sid) == TOMBSTONE:
            return  # deleted for good here: Redis holds the tombstone too (or failed)
        self._keep_local(call_sid, value)
        if self._redis is None:
            return
        if not self.tombstones:
            await self._quietly("record", call_sid, self._redis.set(self.key(call_sid), value,
                                                                    ex=self._ttl_whole_s))
            return
        written = await self._quietly("record", call_sid, self._redis.eval(
            _PUT_UNLESS_TOMBSTONE, 1, self.key(call_sid), value, self._ttl_whole_s, TOMBSTONE))
        if written == 0:  # deleted for good on another replica: here too
            self._keep_local(call_sid, TOMBSTONE)

    async def delete(self, call_sid: str) -> None:
        """Delete the record of ``call_sid``; with ``tombstones``, for good (``ttl_s``)."""
        if not SAFE_ID.fullmatch(call_sid):
            return
        if self.tombstones:
            self._keep_local(call_sid, TOMBSTONE)
        else:
            self._local.pop(call_sid, None)
        if self._redis is None:
            return
        if self.tombstones:
            request = self._redis.set(self.key(call_sid), TOMBSTONE, ex=self._ttl_whole_s)
        else:
            request = self._redis.delete(self.key(call_sid))
        await self._quietly("forget", call_sid, request)

    def _keep_local(self, call_sid: str, value: str) -> None:
        self._local.pop(call_sid, None)
        self._local[call_sid] = (self._clock.now() + self._ttl_s, value)
        while len(self._local) > self._max_local:
            self._local.popitem(last=False)  # the oldest: its call is long past

    def local(self, call_sid: str) -> str | None:
        """This replica's record of ``call_sid``, unless it expired (or is a tombstone)."""
        found = self._local_value(call_sid)
        return None if found == TOMBSTONE and self.tombstones else found

    def _local_value(self, call_sid: str) -> str | None:
        found = self._local.get(call_sid)
        if found is None:
            return None
        expires, value = found
        if expires > self._clock.now():
            return value
        del self._local[call_sid]
        return None

    async def shared_value(self, call_sid: str) -> str | None:
        """Redis's record of ``call_sid`` (any replica's); None without Redis, when there
        is none (or a tombstone), or when Redis fails (counted)."""
        if self._redis is None or not SAFE_ID.fullmatch(call_sid):
            return None
        found = await self._quietly("lookup", call_sid, self._redis.get(self.key(call_sid)))
        if isinstance(found, bytes):
            found = found.decode("utf-8", errors="replace")
        if found == TOMBSTONE and self.tombstones:
            self._keep_local(call_sid, TOMBSTONE)  # deleted for good on another replica
            return None
        return found

    async def _quietly(self, what: str, call_sid: str, request: Awaitable[Any]) -> Any:
        """Await one Redis command within ``timeout_s``; a failure is logged and counted
        (None)."""
        try:
            async with asyncio.timeout(self._timeout_s):  # not wait_for: it can swallow a cancel
                return await request
        except (RedisError, OSError, TimeoutError) as exc:
            code = f"twilio_{self.kind}_{what}_failed"
            if self._count_error is not None:
                self._count_error(code)
            logs.event(log, code, logging.WARNING, call_id=call_sid,
                       error=f"{type(exc).__name__}: {exc}"[:300])
            return None

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
