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

Such a record can be put with a ``Version``: (the call's stream, the save within it), held
as ``<stream>:<save>:<value>`` (``split_version`` reads it back). ``put`` then never
replaces a newer version either, here nor in Redis (the same script: one round trip): the
late write of a replica cut off from Redis, landing after the stream that resumed its call
on another replica saved, is refused (logged, ``twilio_<kind>_record_outdated``).

A Redis failure never fails the call: each command waits ``timeout_s`` at most, and a
failure is logged and counted as ``twilio_<kind>_<what>_failed`` (what: record, lookup,
forget); the local record stands. The gateway's client for them (``Services._twilio_redis``)
sends a command again at once on a new connection when Redis had closed its pooled one (a
restart, its idle ``timeout``): every command here has the same outcome sent twice.
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
# A record's version: (the call's stream, 0 and one more for each that resumed it; the
# save within that stream, from 1). A record held without one (an older replica's) is older.
Version = tuple[int, int]
_VERSION_HEAD = re.compile(r"([0-9]{1,9}):([0-9]{1,9}):")
# ``put`` of a record with tombstones: SET, unless the key holds one (0) or, for a put with
# a version (ARGV[4], ARGV[5]), a newer version (-1).
_PUT_UNLESS_TOMBSTONE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[3] then return 0 end
if held and ARGV[4] then
  local stream, save = string.match(held, '^(%d+):(%d+):')
  if stream then
    stream, save = tonumber(stream), tonumber(save)
    local put_stream, put_save = tonumber(ARGV[4]), tonumber(ARGV[5])
    if stream > put_stream or (stream == put_stream and save > put_save) then return -1 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def split_version(held: str) -> tuple[Version | None, str]:
    """A record as ``put`` held it: its version (None: put without one) and its value."""
    head = _VERSION_HEAD.match(held)
    if head is None:
        return None, held
    return (int(head[1]), int(head[2])), held[head.end():]


def newer(version: Version | None, than: Version | None) -> bool:
    """``version`` is newer than ``than`` (a record without a version is older than any)."""
    return version is not None and (than is None or version > than)


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

    def hold(self, call_sid: str, value: str, version: Version | None = None) -> str | None:
        """``put``'s part in this replica's memory, at once: ``value`` as held (with its
        version), or None when refused (an unsafe id, a tombstone, a newer version)."""
        if not SAFE_ID.fullmatch(call_sid):
            return None
        held = self._local_value(call_sid) if self.tombstones else None
        if held == TOMBSTONE:
            return None  # deleted for good here: Redis holds the tombstone too (or failed)
        if version is not None:
            assert self.tombstones, "a version is kept by the tombstones' script"
            if held is not None and newer(split_version(held)[0], version):
                self._outdated(call_sid, version)  # a later save of this replica's went first
                return None
            value = f"{version[0]}:{version[1]}:{value}"
        self._keep_local(call_sid, value)
        return value

    async def put(self, call_sid: str, value: str, version: Version | None = None) -> bool:
        """Record ``value`` for ``call_sid`` (replacing any but a tombstone, and with a
        ``version``, which needs ``tombstones``, any but a newer version), here and in
        Redis. Held here first (``hold``), so a value held since it was made (a newer
        version, a tombstone) keeps it from Redis too. True when Redis took it."""
        held = self.hold(call_sid, value, version)
        if held is None:
            return False
        value = held
        if self._redis is None:
            return False
        if not self.tombstones:
            return bool(await self._quietly("record", call_sid, self._redis.set(
                self.key(call_sid), value, ex=self._ttl_whole_s)))
        written = await self._quietly("record", call_sid, self._redis.eval(
            _PUT_UNLESS_TOMBSTONE, 1, self.key(call_sid), value, self._ttl_whole_s, TOMBSTONE,
            *(version or ())))
        if written == 0:  # deleted for good on another replica: here too
            self._keep_local(call_sid, TOMBSTONE)
        elif written == -1 and version is not None:
            self._outdated(call_sid, version)
        return written == 1

    def _outdated(self, call_sid: str, version: Version) -> None:
        """A put refused: a newer version is held (a stream resumed the call meanwhile)."""
        logs.event(log, f"twilio_{self.kind}_record_outdated", call_id=call_sid,
                   version=f"{version[0]}:{version[1]}")

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

    async def shared_value(self, call_sid: str, failed: Any = None) -> Any:
        """Redis's record of ``call_sid`` (any replica's); None without Redis or when there
        is none (or a tombstone); ``failed`` when Redis fails (counted)."""
        if self._redis is None or not SAFE_ID.fullmatch(call_sid):
            return None
        found = await self._quietly("lookup", call_sid, self._redis.get(self.key(call_sid)),
                                    failed)
        if found is failed:
            return failed
        if isinstance(found, bytes):
            found = found.decode("utf-8", errors="replace")
        if found == TOMBSTONE and self.tombstones:
            self._keep_local(call_sid, TOMBSTONE)  # deleted for good on another replica
            return None
        return found

    async def _quietly(self, what: str, call_sid: str, request: Awaitable[Any],
                       failed: Any = None) -> Any:
        """Await one Redis command within ``timeout_s``; a failure is logged and counted
        (``failed``)."""
        try:
            async with asyncio.timeout(self._timeout_s):  # not wait_for: it can swallow a cancel
                return await request
        except (RedisError, OSError, TimeoutError) as exc:
            code = f"twilio_{self.kind}_{what}_failed"
            if self._count_error is not None:
                self._count_error(code)
            logs.event(log, code, logging.WARNING, call_id=call_sid,
                       error=f"{type(exc).__name__}: {exc}"[:300])
            return failed

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
