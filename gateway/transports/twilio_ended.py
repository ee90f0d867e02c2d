"""Twilio calls this gateway ended on purpose (hung up, transferred), remembered for a while.

A stream's end makes Twilio request ``/twilio/stream-ended`` (the ``<Connect action>``),
which resumes a call whose stream was lost (gateway/transports/twilio_voice.py). A call
the gateway hung up or transferred must not be resumed: the stream's output records its
CallSid here *before* it asks Twilio's REST API or closes the stream (the REST request may
fail, or answer after Twilio has already asked for the action).

Twilio's action request may reach any replica: the records are ``CallRecords`` of kind
"ended" (gateway/transports/call_records.py): a Redis key ``<prefix>twilio:ended:<CallSid>``
that expires after ``ENDED_TTL_S`` when the replicas share one, and always in memory. A
Redis failure never fails a hang-up: it is logged and counted
(``twilio_ended_record_failed``), and the local record stands.

How it ended is kept too: ``HUNG_UP`` or ``TRANSFERRED``. A stream lost while a transfer
is under way (the replica killed while its REST request is in flight) must still reach
the person it was promised: /twilio/stream-ended answers that call a ``<Dial>``.

A transfer's record is cleared again where its dial ends with nobody taking the call
(/twilio/dial-ended: the caller is back with the bot), on whichever replica Twilio asks:
in Redis and there, not in the memory of the replica that made it. So that replica reads
a transfer it recorded, and Redis took, from Redis: Redis says whether it still is one
(its own record stands only when Redis cannot be asked). A hang-up is never cleared: the
memory's record of one stands.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import redis.asyncio as aioredis

from ..clock import Clock
from .call_records import REDIS_TIMEOUT_S, SAFE_ID, CallRecords

# Twilio asks for the action within seconds of the stream's end; minutes is ample, and a
# key per ended call does not pile up in Redis.
ENDED_TTL_S = 300.0
# Calls remembered in memory: a busy replica's hang-ups over ENDED_TTL_S, with room to spare.
MAX_LOCAL_ENDED = 10_000
# How a call ended on purpose (the record's value).
HUNG_UP = "hangup"
TRANSFERRED = "transfer"
_HOW = (HUNG_UP, TRANSFERRED)
_UNASKED = object()  # Redis could not be asked


class EndedCalls:
    def __init__(self, clock: Clock, redis: aioredis.Redis | None = None, *,
                 prefix: str = "voicegate:", count_error: Callable[[str], None] | None = None,
                 ttl_s: float = ENDED_TTL_S, max_local: int = MAX_LOCAL_ENDED,
                 timeout_s: float = REDIS_TIMEOUT_S) -> None:
        self._records = CallRecords("ended", clock, redis, prefix=prefix, ttl_s=ttl_s,
                                    max_local=max_local, timeout_s=timeout_s,
                                    count_error=count_error)
        self._max_local = max_local
        # Transfers recorded here that Redis took (oldest first): another replica may have
        # cleared them since, and only Redis says so.
        self._shared_transfers: OrderedDict[str, None] = OrderedDict()

    async def mark(self, call_sid: str, how: str = HUNG_UP) -> None:
        """Remember ``call_sid`` as ended on purpose, ``how`` (``HUNG_UP`` or
        ``TRANSFERRED``). Never raises for Redis."""
        assert how in _HOW, how
        self._shared_transfers.pop(call_sid, None)
        if await self._records.put(call_sid, how) and how == TRANSFERRED:
            self._shared_transfers[call_sid] = None
            while len(self._shared_transfers) > self._max_local:
                self._shared_transfers.popitem(last=False)

    async def forget(self, call_sid: str) -> None:
        """``call_sid`` goes on after all (its transfer failed, or its dial ended with
        nobody taking the call): a lost stream resumes it."""
        self._shared_transfers.pop(call_sid, None)
        await self._records.delete(call_sid)

    async def ended(self, call_sid: str) -> str | None:
        """How ``call_sid`` was ended on purpose (here or on any replica sharing Redis):
        ``HUNG_UP``, ``TRANSFERRED``, or None. Redis unreachable: what this replica knows
        (a call it cannot tell is resumed: a dropped call is worse than a resumed one)."""
        if not SAFE_ID.fullmatch(call_sid):
            return None
        found = self._records.local(call_sid)
        if found == TRANSFERRED and call_sid in self._shared_transfers:
            # Maybe cleared on another replica since (a dial nobody took): Redis says.
            shared = await self._records.shared_value(call_sid, failed=_UNASKED)
            if shared is not _UNASKED:
                found = shared
        elif found is None:
            found = await self._records.shared_value(call_sid)
        if found is None:
            return None
        # A value this version does not know (or an older replica's "1"): ended, hung up.
        return found if found in _HOW else HUNG_UP

    async def aclose(self) -> None:
        await self._records.aclose()
