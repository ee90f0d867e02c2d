"""Twilio calls this gateway ended on purpose (hung up, transferred), remembered for a while.

A stream's end makes Twilio request ``/twilio/stream-ended`` (the ``<Connect action>``),
which resumes a call whose stream was lost (gateway/transports/twilio_voice.py). A call
the gateway hung up or transferred must not be resumed: the stream's output records its
CallSid here *before* it asks Twilio's REST API or closes the stream (the REST request may
fail, or answer after Twilio has already asked for the action).

Twilio's action request may reach any replica: with a shared Redis the record is a key
``<prefix>twilio:ended:<CallSid>`` that expires after ``ENDED_TTL_S``. Every record is
also kept here in memory (bounded, same expiry), for a single replica and for when Redis
is down. A Redis failure never fails a hang-up: it is logged and counted
(``twilio_ended_record_failed``), and the local record stands.

How it ended is kept too: ``HUNG_UP`` or ``TRANSFERRED``. A stream lost while a transfer
is under way (the replica killed while its REST request is in flight) must still reach
the person it was promised: /twilio/stream-ended answers that call a ``<Dial>``.
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

# Twilio asks for the action within seconds of the stream's end; minutes is ample, and a
# key per ended call does not pile up in Redis.
ENDED_TTL_S = 300.0
# Calls remembered in memory: a busy replica's hang-ups over ENDED_TTL_S, with room to spare.
MAX_LOCAL_ENDED = 10_000
# A hang-up waits this long for Redis at most (a stalled Redis must not hold the call).
REDIS_TIMEOUT_S = 1.0
# Ids safe in a Redis key, a log field or a file name: Twilio's CallSid is "CA" and 32 hex
# digits; an unsigned stream can name any string, which is not remembered.
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# How a call ended on purpose (the record's value).
HUNG_UP = "hangup"
TRANSFERRED = "transfer"
_HOW = (HUNG_UP, TRANSFERRED)


class EndedCalls:
    def __init__(self, clock: Clock, redis: aioredis.Redis | None = None, *,
                 prefix: str = "voicegate:", count_error: Callable[[str], None] | None = None,
                 ttl_s: float = ENDED_TTL_S, max_local: int = MAX_LOCAL_ENDED,
                 timeout_s: float = REDIS_TIMEOUT_S) -> None:
        self._clock = clock
        self._redis = redis
        self._prefix = prefix
        self._count_error = count_error
        self._ttl_s = ttl_s
        self._max_local = max_local
        self._timeout_s = timeout_s
        # CallSid -> (expires at on the clock, how it ended)
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def _key(self, call_sid: str) -> str:
        return f"{self._prefix}twilio:ended:{call_sid}"

    async def mark(self, call_sid: str, how: str = HUNG_UP) -> None:
        """Remember ``call_sid`` as ended on purpose, ``how`` (``HUNG_UP`` or
        ``TRANSFERRED``). Never raises for Redis."""
        assert how in _HOW, how
        if not SAFE_ID.fullmatch(call_sid):
            return
        self._local.pop(call_sid, None)
        self._local[call_sid] = (self._clock.now() + self._ttl_s, how)
        while len(self._local) > self._max_local:
            self._local.popitem(last=False)  # the oldest: its action request is long past
        if self._redis is not None:
            await self._quietly("record", call_sid, self._redis.set(
                self._key(call_sid), how, ex=max(1, round(self._ttl_s))))

    async def forget(self, call_sid: str) -> None:
        """``call_sid`` goes on after all (its transfer failed): a lost stream resumes it."""
        if not SAFE_ID.fullmatch(call_sid):
            return
        self._local.pop(call_sid, None)
        if self._redis is not None:
            await self._quietly("forget", call_sid, self._redis.delete(self._key(call_sid)))

    async def ended(self, call_sid: str) -> str | None:
        """How ``call_sid`` was ended on purpose (here or on any replica sharing Redis):
        ``HUNG_UP``, ``TRANSFERRED``, or None. Redis unreachable: what this replica knows
        (a call it cannot tell is resumed: a dropped call is worse than a resumed one)."""
        if not SAFE_ID.fullmatch(call_sid):
            return None
        local = self._local.get(call_sid)
        if local is not None:
            expires, how = local
            if expires > self._clock.now():
                return how
            del self._local[call_sid]
        if self._redis is None:
            return None
        found = await self._quietly("lookup", call_sid, self._redis.get(self._key(call_sid)))
        if isinstance(found, bytes):
            found = found.decode("ascii", errors="replace")
        if found is None:
            return None
        # A value this version does not know (or an older replica's "1"): ended, hung up.
        return found if found in _HOW else HUNG_UP

    async def _quietly(self, what: str, call_sid: str, request: Awaitable[Any]) -> Any:
        """Await one Redis command within ``timeout_s``; a failure is logged and counted
        (None)."""
        try:
            async with asyncio.timeout(self._timeout_s):  # not wait_for: it can swallow a cancel
                return await request
        except (RedisError, OSError, TimeoutError) as exc:
            code = f"twilio_ended_{what}_failed"
            if self._count_error is not None:
                self._count_error(code)
            logs.event(log, code, logging.WARNING, call_id=call_sid,
                       error=f"{type(exc).__name__}: {exc}"[:300])
            return None

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
