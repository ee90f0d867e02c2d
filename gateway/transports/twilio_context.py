"""What a Twilio call has said so far, kept for the stream that resumes it.

A call whose media stream is lost (its replica killed, the network) goes on over a new
stream (``/twilio/stream-ended``, gateway/transports/twilio_voice.py), maybe on another
replica. Without its conversation the agent there would start over, and the caller would
have to say everything again. So every Twilio call's conversation (``Conversation.snapshot``:
what the next LLM request would carry) is saved at the end of each of its turns and at its
end, as ``CallRecords`` of kind "context" (``<prefix>twilio:context:<CallSid>`` in Redis,
and in memory); the resumed call restores it before its first turn.

Each save is versioned (``CallRecords`` versions): (the call's stream, the save within
it). A call's first stream is generation 0, each stream that resumes it one more (its
``resumed`` parameter: the count /twilio/stream-ended wrote). A save never replaces a newer
one, here nor in Redis: a replica cut off from the network whose last save reaches Redis
after the stream that resumed its call saved (or a save of its own, delayed, after a later
one) is refused, not written over what was said since. Restoring takes the newer of
Redis's copy and this replica's memory's: a save Redis missed (its write failed) is not
lost to a stream resumed here.

A call whose transfer's dial nobody took comes back to the bot the same way
(/twilio/dial-ended): a new stream, one generation on, going on from the conversation.

Privacy: the record holds what the caller and the agent said. It expires ``CONTEXT_TTL_S``
after the call's last save, and /twilio/stream-ended deletes it as soon as the call is not
to be resumed (over, hung up, given up on); a call dialled to a person keeps it until
/twilio/dial-ended says the person took it or the caller is gone (or it expires): for good,
so a save still under way then (the call's last, on whichever replica it ran) does not
write it again (``CallRecords`` tombstones). Only the memory of a replica other than the
one deleting it keeps its copy until it expires.

Saving never delays the call: a turn's end snapshots the conversation (JSON, on the loop),
keeps it in memory at once (a stream resumed here while Redis stalls the write before it
goes on from it) and one background write per call sends the newest snapshot to Redis
(versions are numbered as made: those it skips are older); a failure is logged and
counted (``twilio_context_record_failed``) and the call goes on. The call's end does not
wait for it either (a stalled Redis held every Twilio call's teardown for up to two
writes' timeouts): the last save outlives the call, and the replica's shutdown
(``CallContexts.aclose``) waits for the saves under way before it closes. Restoring waits for
Redis at most ``REDIS_TIMEOUT_S`` (the caller's first words buffer meanwhile); a record
that is missing, unreadable or too large leaves the call to start afresh, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Coroutine

import redis.asyncio as aioredis

from .. import logs
from ..agent import Conversation
from ..clock import Clock
from ..redis_link import honour_cancel
from .call_records import REDIS_TIMEOUT_S, CallRecords, Version, newer, split_version

log = logging.getLogger("voicegate.twilio")

# A stream is resumed within seconds of its loss; a turn every few minutes keeps it alive.
CONTEXT_TTL_S = 600.0
# Conversations kept in memory: a busy replica's Twilio calls of the last minutes. Each is
# about the conversation's budget (8,000 characters by default).
MAX_LOCAL_CONTEXTS = 2_000
# A record larger than this is not written nor read (a budget set far beyond the default).
MAX_CONTEXT_BYTES = 256 * 1024


class CallContexts:
    def __init__(self, clock: Clock, redis: aioredis.Redis | None = None, *,
                 prefix: str = "voicegate:", count_error: Callable[[str], None] | None = None,
                 ttl_s: float = CONTEXT_TTL_S, max_local: int = MAX_LOCAL_CONTEXTS,
                 timeout_s: float = REDIS_TIMEOUT_S) -> None:
        self._records = CallRecords("context", clock, redis, prefix=prefix, ttl_s=ttl_s,
                                    max_local=max_local, timeout_s=timeout_s,
                                    count_error=count_error, tombstones=True)
        self._count_error = count_error
        # Writes under way, the last ones of calls already over among them: kept here (the
        # loop holds tasks weakly) so the replica's shutdown writes them before it closes.
        self._writers: set[asyncio.Task[None]] = set()

    def keeper(self, call_sid: str, generation: int = 0,
               heard: str = "") -> "ConversationKeeper":
        """The keeper of ``call_sid``'s stream ``generation``: 0 for the call's first, one
        more for each that resumed it (its saves replace no later stream's). ``heard``: what
        Twilio told the caller before this stream (after a dial nobody took), added to the
        restored conversation as the agent's."""
        return ConversationKeeper(self, call_sid, generation, heard)

    def _write_in_background(self, write: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(write, name="vg-twilio-context")
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)
        return task

    def keep(self, call_sid: str, snapshot: str, version: Version = (0, 0)) -> bool:
        """Hold a conversation's snapshot (JSON) as ``version`` in this replica's memory at
        once, for a stream resumed here before ``save`` reaches Redis; False when it is
        not kept (too large, deleted for good, a newer one held)."""
        return self._fits(call_sid, snapshot) and (
            self._records.hold(call_sid, snapshot, version) is not None)

    async def save(self, call_sid: str, snapshot: str, version: Version = (0, 0)) -> None:
        """Record a conversation's snapshot (JSON) as ``version`` (the call's stream, the
        save within it), here and in Redis: not over a newer one. Never raises for Redis."""
        if self._fits(call_sid, snapshot):
            await self._records.put(call_sid, snapshot, version)

    def _fits(self, call_sid: str, snapshot: str) -> bool:
        if len(snapshot.encode("utf-8")) <= MAX_CONTEXT_BYTES:
            return True
        self._failed("twilio_context_too_large", call_sid,
                     f"over {MAX_CONTEXT_BYTES} bytes: the last one kept stands")
        return False

    async def load(self, call_sid: str) -> list | None:
        """The call's last snapshot, parsed: the newer of Redis's (any replica's) and this
        replica's memory's (newer when its write to Redis failed), or None: none kept, a
        tombstone in Redis, or unreadable (counted)."""
        shared = await self._records.shared_value(call_sid)
        local = self._records.local(call_sid)  # after Redis's: a tombstone there is here too
        held = _newer(local, shared)
        if held is None:
            return None
        found = split_version(held)[1]
        try:
            if len(found.encode("utf-8")) > MAX_CONTEXT_BYTES:
                raise ValueError(f"over {MAX_CONTEXT_BYTES} bytes")
            history = json.loads(found)
            if not isinstance(history, list):
                raise ValueError("not a list of messages")
        except ValueError as exc:
            self.unreadable(call_sid, str(exc))
            return None
        return history

    async def kept(self, call_sid: str) -> bool:
        """Something of the call is kept (here or, through Redis, by any replica): a call
        ran on one of its streams (a greeting is kept as it starts). Not read nor parsed."""
        return (self._records.local(call_sid) is not None
                or await self._records.shared_value(call_sid) is not None)

    async def forget(self, call_sid: str) -> None:
        """The call will not be resumed: its conversation is deleted from Redis and from
        this replica's memory, for good (a save still under way does not bring it back).
        A copy in another replica's memory (the one the call ran on) expires with its TTL."""
        await self._records.delete(call_sid)

    def unkeepable(self, call_sid: str, why: str) -> None:
        """A conversation that cannot be written as JSON: the last one kept stands."""
        self._failed("twilio_context_unkeepable", call_sid, why)

    def unreadable(self, call_sid: str, why: str) -> None:
        """A kept conversation that cannot be gone on from: the call starts afresh."""
        self._failed("twilio_context_unreadable", call_sid, why)

    def _failed(self, code: str, call_sid: str, why: str) -> None:
        if self._count_error is not None:
            self._count_error(code)
        logs.event(log, code, logging.WARNING, call_id=call_sid, error=why[:300])

    async def aclose(self) -> None:
        """Write what the calls said (each write bounded by ``timeout_s``: the stream
        resuming a call on another replica goes on from it), then close."""
        # Until none is left, not just those under way now: a call may end while this
        # waits (uvicorn cancels what outlived its grace and goes on to the lifespan
        # without waiting), handing its last save over; closing the client under it lost it.
        while self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)
        await self._records.aclose()


def _newer(held: str | None, than: str | None) -> str | None:
    """Of two records as held, the one with the newer version (``than`` when even)."""
    if held is None or than is None:
        return than if held is None else held
    return held if newer(split_version(held)[0], split_version(than)[0]) else than


class ConversationKeeper:
    """One Twilio call's conversation: restored when the call resumes a lost stream,
    saved at each turn's end and as the call ends (``changed``). The writes outlive the
    call: its end never waits for Redis (``CallContexts.aclose`` does)."""

    def __init__(self, contexts: CallContexts, call_sid: str, generation: int = 0,
                 heard: str = "") -> None:
        self._contexts = contexts
        self.call_sid = call_sid
        self.generation = generation  # the call's stream: its saves are (generation, n)
        self._heard = heard
        self._saves = 0
        # The snapshot last kept (in memory at once) or refused: the same again changes nothing
        self._made: str | None = None
        # The newest one kept and not yet sent to Redis (the write under way sends it next)
        self._pending: tuple[str, Version] | None = None
        self._writer: asyncio.Task[None] | None = None

    async def restore(self, conversation: Conversation) -> bool:
        """Put the call's kept conversation into ``conversation``, then what the caller
        heard meanwhile (``heard``); False when none was kept (the call starts afresh)."""
        history = await self._contexts.load(self.call_sid)
        # Redis's send can swallow a cancel (redis_link.honour_cancel): the call cancelled
        # meanwhile must stop, not start its loops and wait for a stop that never comes.
        honour_cancel()
        restored = history is not None and self._restore(conversation, history)
        if self._heard:
            # Twilio's words, not the agent's: without them the model would not know the
            # caller was told the transfer did not happen (the context keeps no handoff).
            conversation.add_assistant(self._heard)
        if restored or self._heard:
            # Saved with the call's next change: alone, the line heard must not replace a
            # record this lookup could not read.
            self._made = json.dumps(conversation.snapshot(), ensure_ascii=False,
                                    separators=(",", ":"))
        return restored

    def _restore(self, conversation: Conversation, history: list) -> bool:
        try:
            conversation.restore(history)
        except ValueError as exc:  # another version's record, or damaged
            self._contexts.unreadable(self.call_sid, str(exc))
            return False
        return True

    def changed(self, conversation: Conversation) -> None:
        """A turn ended: keep the conversation as it now stands in this replica's memory
        at once (a stream resumed here goes on from it), and write it to Redis in the
        background (the newest snapshot only, one write at a time)."""
        try:
            snapshot = json.dumps(conversation.snapshot(), ensure_ascii=False,
                                  separators=(",", ":"))
        except (TypeError, ValueError) as exc:  # a bug: the turn goes on, unkept
            self._contexts.unkeepable(self.call_sid, f"{type(exc).__name__}: {exc}")
            return
        if snapshot == self._made:
            return
        if snapshot == "[]" and self._made is None:
            # Nothing to go on from, and nothing kept by this call: a resumed call stopped
            # before its restore ended must not overwrite what it was to restore.
            return
        # Numbered as made, not as written: memory holds it before the write under way
        # ends, and the saves it skips in Redis are older.
        version = (self.generation, self._saves + 1)
        self._made = snapshot
        if not self._contexts.keep(self.call_sid, snapshot, version):
            return  # too large, deleted for good, or a newer stream's kept: not written
        self._saves, self._pending = version[1], (snapshot, version)
        if self._writer is None or self._writer.done():
            self._writer = self._contexts._write_in_background(self._write())

    async def _write(self) -> None:
        while self._pending is not None:
            (snapshot, version), self._pending = self._pending, None
            await self._contexts.save(self.call_sid, snapshot, version)

    async def written(self) -> None:
        """Wait for the writes under way (each waits for Redis ``REDIS_TIMEOUT_S`` at
        most). Not the call's end: a stalled Redis would hold it."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
