"""Counters shared by every replica, in Redis, and the cluster-wide stats snapshot.

``SharedStats`` observes this replica's ``Stats`` (call started, turn finished,
error). Recording never touches the network: it adds to an in-memory map of pending
increments, and a background task flushes that map to Redis every ``flush_s`` as one
batch: a Lua script under the batch's sequence number, applied at most once (a flush that
timed out but that Redis applied is not counted again when retried, however long Redis
stays unreachable meanwhile; an increment a foreign value refuses is dropped, the rest
written). While Redis is down the increments stay buffered (aggregated, so the buffer grows
with the number of distinct counters, not with traffic) and are written when it returns;
only increments to new counters beyond ``max_pending`` distinct ones are dropped, and
counted in ``dropped`` (as is a batch left unconfirmed for half of
``BATCH_SEQUENCE_TTL_S``).

Key layout (``prefix`` defaults to ``voicegate:``)::

    <prefix>stats:totals          hash  calls, turns, hits, misses, keypad_turns,
                                        interrupted_turns
    <prefix>stats:intents         hash  intent -> turns (the served version's intents, at
                                        most MAX_INTENT_SERIES, and OTHER_INTENT; pruned
                                        to a version's at its marks' write)
    <prefix>stats:entries         hash  entry id -> cache hits
    <prefix>stats:entry_marks     hash  entry id -> answer mark its hits were counted for
    <prefix>stats:entry_marks_version  string  the cache version those marks are of (gone:
                                  Redis lost the marks; each heartbeat looks, and they are
                                  written again)
    <prefix>stats:sources         hash  source -> turns
    <prefix>stats:errors          hash  error code -> count
    <prefix>stats:minute:<epoch minute>   hash turns, hits (expires after 61 minutes)
    <prefix>stats:applied:<replica id>:<run>  string this SharedStats' highest applied
                                  batch sequence (expires: BATCH_SEQUENCE_TTL_S, 7 days)
    <prefix>replica:<id>          string JSON {active_calls, cache_version, ...}, TTL 3 heartbeats

Latency percentiles cannot be summed across replicas; a cluster snapshot carries the
local replica's (``latency_scope: "replica"``) and its ``replica_id``. Its per-minute
``series`` is the cluster's, read from the minute buckets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from intents.redis_store import (DEFAULT_PREFIX, RedisKeys, glob_escape, refused_writes,
                                 refusing_for_now)

from . import logs
from .redis_link import NOT_NOW, RedisHealth, failure_said, honour_cancel
from .stats import (OTHER_INTENT, SERIES_MINUTES, IntentLabels, barged_in, intent_label, keyed,
                    outcome_of)

log = logging.getLogger("voicegate.shared_stats")

# The minute buckets feed hit_rate_5m and the dashboard's chart of the last SERIES_MINUTES:
# a bucket must outlive that hour from its first write (its expiry is renewed by every
# write), a minute more for slack. 61 small hashes at most.
MINUTE_BUCKET_TTL_S = (SERIES_MINUTES + 1) * 60
# hit_rate_5m / turns_5m: the last 300 s, as a replica's own Stats. They cover six minute
# buckets, the oldest only partly: its counts are weighted by the share of it still inside.
RECENT_WINDOW_S = 300
# How long Redis remembers the highest batch sequence a SharedStats applied (one key per
# instance, its expiry renewed by every batch applied). A batch not confirmed is retried
# only for half of that: if Redis applied it, it remembers so for longer than any retry
# (and than any copy of it delayed in the network), however long the outage; one older
# than that is dropped (and counted in ``dropped``) rather than risk counting it twice.
BATCH_SEQUENCE_TTL_S = 7 * 24 * 3600
# KEYS[1] this instance's highest applied sequence; KEYS[2..] the hashes; ARGV: the batch's
# sequence, the sequence key's ttl, the minute buckets' ttl, minute prefix, then field,
# amount per hash. Returns the (1-based) slots that could not be incremented.
_APPLY_ONCE = """
if tonumber(ARGV[1]) <= (tonumber(redis.call('GET', KEYS[1])) or 0) then return {} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local failed = {}
for i = 2, #KEYS do
  local ok = redis.pcall('HINCRBY', KEYS[i], ARGV[2 * i + 1], ARGV[2 * i + 2])
  if type(ok) == 'table' and ok.err then
    table.insert(failed, i - 1)
  elseif string.sub(KEYS[i], 1, #ARGV[4]) == ARGV[4] then
    redis.call('EXPIRE', KEYS[i], ARGV[3])
  end
end
return failed
"""
_HASHES = ("totals", "intents", "entries", "sources", "errors")
# A cache version loaded (Stats.entries_published), in the cluster's counters: KEYS[1] the
# entries hash, KEYS[2] the marks hash, KEYS[3] the version those marks are of, KEYS[4] the
# store's `current` pointer, KEYS[5] the intents hash; ARGV[1] the version ('' unknown),
# ARGV[2] how many intent labels follow (-1: not known, the intents hash is left as it is),
# those labels (intent_label of the version's intents counted by name, and OTHER_INTENT: the
# intents hash keeps only them), then entry id, answer mark, ... of the version. An id whose mark differs from the one recorded loses its hits; ids the
# version does not hold lose their hits and mark. Idempotent: every replica that loads the
# version runs it, and only the first changes anything (the others find the marks already
# in place). Written late (a replica's flush failed while Redis was down, retried after a
# newer version was published), an older version's marks are ignored: they would put back
# its marks and clear the hits counted since under the newer one. Version names cannot tell
# which is older (the publisher's clock, to the second, then a random suffix), so the
# store's pointer does: every publish moves `current` to a new name, so a version it no
# longer names is an older one. Once a version's marks are recorded (KEYS[3]), only the
# current version's are written (a current version no replica can load leaves the marks
# last written in place until the next publish: hits kept, none cleared). Written anyway: the
# first marks (the first start, or marks a voicegate without KEYS[3] wrote), and when the
# order is unknown (no pointer under this prefix, no version name): clearing as before; a
# write with no version name leaves KEYS[3] as it was (deleted, a stale replica's older
# marks would pass as first marks again).
# Returns 1 when written, 0 when ignored.
_ENTRIES_PUBLISHED = """
local version = ARGV[1]
local named = tonumber(ARGV[2])
local first = 3 + math.max(named, 0)
local applied = redis.call('GET', KEYS[3])
local current = redis.pcall('GET', KEYS[4])
if type(current) ~= 'string' then current = false end
if version ~= '' and applied and current and version ~= current then return 0 end
local held = {}
for i = first, #ARGV, 2 do
  local id, mark = ARGV[i], ARGV[i + 1]
  held[id] = true
  local old = redis.call('HGET', KEYS[2], id)
  if old ~= mark then
    if old then redis.call('HDEL', KEYS[1], id) end
    redis.call('HSET', KEYS[2], id, mark)
  end
end
for k = 1, 2 do
  for _, id in ipairs(redis.call('HKEYS', KEYS[k])) do
    if not held[id] then redis.call('HDEL', KEYS[k], id) end
  end
end
if named >= 0 then
  local kept = {}
  for i = 3, first - 1 do kept[ARGV[i]] = true end
  for _, name in ipairs(redis.call('HKEYS', KEYS[5])) do
    if not kept[name] then redis.call('HDEL', KEYS[5], name) end
  end
end
if version ~= '' then redis.call('SET', KEYS[3], version) end
return 1
"""


class RefusedIncrement(ResponseError):
    """A flush's increments that a foreign value refused (dropped, counted in ``dropped``);
    the rest of the batch was written."""


def new_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class SharedStats:
    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 replica_id: str | None = None, health: RedisHealth | None = None,
                 describe: Callable[[], dict[str, Any]] = dict, heartbeat_s: float = 5.0,
                 flush_s: float = 0.25, max_pending: int = 10_000) -> None:
        self._redis = client
        self._prefix = prefix
        self.replica_id = replica_id or new_replica_id()
        self._health = health or RedisHealth()
        self._describe = describe  # this replica's live figures for its heartbeat
        self._heartbeat_s = heartbeat_s
        self._flush_s = flush_s
        self._max_pending = max_pending
        self._pending: Counter[tuple[str, str]] = Counter()  # (hash key, field) -> increment
        # Batches are numbered from 1 per instance (a restart is a new instance, a new key).
        self._sequence_key = prefix + f"stats:applied:{self.replica_id}:{secrets.token_hex(4)}"
        self._sequence = 0
        # Sent, unconfirmed: (sequence, increments, monotonic time it was first sent).
        self._inflight: tuple[int, Counter[tuple[str, str]], float] | None = None
        # The cache version last loaded ('' unknown) and its entry marks, until written
        # (entries_published): one pending at most, a newer version's replacing it.
        # And the intent names it counts by name (None: not known).
        self._published: tuple[str, dict[str, str], list[str] | None] | None = None
        # The last of them Redis answered for: written again should Redis lose them
        # (restarted empty), which the heartbeat looks for.
        self._marks_sent: tuple[str, dict[str, str], list[str] | None] | None = None
        self._intent_labels = IntentLabels()  # as Stats.intent_labels: bounded
        self.dropped = 0
        # A counters key whose foreign value refused an increment, and that refusal: it
        # refuses every one, so the replica stays degraded naming it (not only until the
        # next flush with nothing to write: a flapping /readyz, a log line pair a turn)
        # until an increment to it is written or the key is gone (the heartbeat looks).
        self._refused: tuple[RefusedIncrement, str] | None = None

    # -- recording (StatsObserver; called on the event loop, never blocks) ---------------
    def call_started(self) -> None:
        self._add("stats:totals", "calls")

    def error(self, code: str) -> None:
        self._add("stats:errors", code)

    def turn_finished(self, metrics: dict[str, Any]) -> None:
        if barged_in(metrics):  # as Stats counts it: stops by the bot or the call's end are not
            self._add("stats:totals", "interrupted_turns")
        if keyed(metrics):  # no hit or miss (Stats.turn_finished)
            self._add("stats:totals", "keypad_turns")
            return
        outcome = outcome_of(metrics)
        minute = f"stats:minute:{int(time.time() // 60)}"
        self._add("stats:totals", "turns")
        self._add("stats:totals", "hits" if outcome == "hit" else "misses")
        self._add(minute, "turns")
        if outcome == "hit":
            self._add(minute, "hits")
            if metrics.get("entry_id"):
                self._add("stats:entries", str(metrics["entry_id"]))
        if metrics.get("intent"):
            self._add("stats:intents", self._intent_labels.label(str(metrics["intent"])))
        self._add("stats:sources", str(metrics.get("source") or "none"))

    def entries_published(self, marks: Mapping[str, str], version: str | None = None,
                          intents: Iterable[str] | None = None) -> None:
        """A cache version was loaded here: its entries' marks are written at the next
        flush, after that flush's increments, clearing the cluster's hits of the ids it
        dropped or whose answer changed (``Stats.entries_published``). Hits this replica
        counted on such an id between the load and that flush (a quarter of a second) are
        cleared with them; a replica still serving the version before (until its next
        poll or publish notice) may add its last hits of the old answer after the reset.

        ``version``: the version's name (the gateway passes the loaded version's); without
        one, the ``cache_version`` that ``describe`` reports, the version serving as the
        marks arrive. Written late, after a newer version's
        marks, they are ignored (``_ENTRIES_PUBLISHED``). Marks not yet written are replaced
        by these: only the newest version loaded is ever pending.

        ``intents``: the version's intent names: only they (its first MAX_INTENT_SERIES) are
        counted by name from now on, the rest as OTHER_INTENT, and the marks' write prunes
        the cluster's intents hash to them (as it does the entries')."""
        if version is None:
            version = self._describe().get("cache_version")
        served = None if intents is None else sorted(self._intent_labels.serve(intents))
        self._published = (str(version or ""), dict(marks), served)

    def _add(self, key: str, field: str) -> None:
        slot = (self._prefix + key, field)
        if slot not in self._pending and len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending[slot] += 1

    @property
    def pending(self) -> int:
        inflight = sum(self._inflight[1].values()) if self._inflight else 0
        return sum(self._pending.values()) + inflight

    # -- background: flush and heartbeat --------------------------------------------------
    async def run(self) -> None:
        next_beat = 0.0
        while True:
            problem: Exception | None = None
            try:
                try:
                    await self.flush()
                except RefusedIncrement as exc:  # Redis answered: the rest was written
                    problem = exc  # reported, yet this replica still announces itself
                if time.monotonic() >= next_beat:
                    await self.heartbeat()
                    next_beat = time.monotonic() + self._heartbeat_s
            except (RedisError, OSError) as exc:
                problem = exc
                next_beat = 0.0  # announce ourselves again as soon as Redis is back
            if problem is None and self._refused is not None:
                problem = self._refused[0]
            if problem is None:
                self._health.up("counters")
            else:
                self._health.down("counters",
                                  f"cannot write counters: {failure_said(problem)}")
            honour_cancel()  # a cancel redis-py swallowed: shutdown waits for this task
            await asyncio.sleep(self._flush_s)

    async def flush(self) -> None:
        """Write the pending increments, then the entry marks of a cache version loaded
        since the last flush (``entries_published``). Increments a foreign value refused
        are reported after the marks are written: a key overwritten by hand, refusing its
        increment at every flush, must not hold back a version's marks for good."""
        try:
            await self._flush_counts()
        except RefusedIncrement:
            await self._flush_marks()
            raise
        await self._flush_marks()

    async def _flush_marks(self) -> None:
        published = self._published
        if published is None:
            return
        version, marks, intents = published
        keys = [self._prefix + "stats:entries", self._prefix + "stats:entry_marks",
                self._prefix + "stats:entry_marks_version", RedisKeys(self._prefix).current,
                self._prefix + "stats:intents"]
        named = [] if intents is None else [*map(intent_label, intents), OTHER_INTENT]
        args = [version, len(named) if intents is not None else -1, *named]
        args += [part for pair in marks.items() for part in pair]
        try:
            written = await self._redis.eval(_ENTRIES_PUBLISHED, len(keys), *keys, *args)
        except NOT_NOW:
            raise  # a failover under way (READONLY, ...): kept, written at a later flush
        except ResponseError as exc:  # a foreign type under a key: dropped, not retried
            if refused_writes(exc) or refusing_for_now(exc):
                # Redis refuses writes for now (MISCONF, NOREPLICAS, ...), or everything
                # (BUSY behind a script): kept, written at a later flush
                raise
            self._forget_published(published)
            raise RefusedIncrement(f"cannot reset the hits of changed entries: {exc}") from exc
        self._forget_published(published)  # else (unreachable) it is written at a later flush
        self._marks_sent = published
        if not written:
            logs.event(log, "shared_stats_entry_marks_superseded", version=version)

    def _forget_published(self, published: tuple[str, dict[str, str], list[str] | None]
                          ) -> None:
        if self._published is published:  # not replaced by a newer version meanwhile
            self._published = None

    async def _flush_counts(self) -> None:
        """Write the pending increments once: a batch carries this instance's next sequence
        number, and Redis applies it only above the highest it applied (a retry after a
        timeout that was in fact applied is a no-op, however late it comes). Increments that
        fail (a foreign value under the key) are dropped and reported."""
        if self._inflight is not None and \
                time.monotonic() - self._inflight[2] > BATCH_SEQUENCE_TTL_S / 2:
            # Redis may have applied it and forgotten so since: at most once, not twice.
            unsure = sum(self._inflight[1].values())
            self.dropped += unsure
            self._inflight = None
            logs.event(log, "shared_stats_batch_dropped", logging.WARNING, increments=unsure)
        if self._inflight is None:
            if not self._pending:
                return
            self._sequence += 1
            self._inflight = (self._sequence, self._pending, time.monotonic())
            self._pending = Counter()
        sequence, batch, _ = self._inflight
        slots = list(batch.items())
        keys = [self._sequence_key] + [key for (key, _), _ in slots]
        args = [sequence, BATCH_SEQUENCE_TTL_S, MINUTE_BUCKET_TTL_S,
                self._prefix + "stats:minute:"]
        for (_, field), amount in slots:
            args += [field, amount]
        failed = await self._redis.eval(_APPLY_ONCE, len(keys), *keys, *args)
        self._inflight = None
        if failed:
            index = int(failed[0]) - 1
            self.dropped += sum(slots[int(i) - 1][1] for i in failed)
            (key, field), _ = slots[index]
            refused = RefusedIncrement(f"cannot add to {key} {field}: not a hash of integers")
            if not key.startswith(self._prefix + "stats:minute:"):  # not past its minute
                self._refused = (refused, key)
            raise refused
        if self._refused is not None and any(key == self._refused[1] for (key, _), _ in slots):
            self._refused = None  # an increment to it was written

    async def heartbeat(self) -> None:
        """Announce this replica (its key expires after 3 beats), and look whether Redis
        still holds the entry marks it wrote: a Redis restarted empty (no persistence) or
        flushed lost them, and the next version's would be taken for the first ever,
        clearing no hits of a changed answer. Lost, they are written again at the next
        flush (as a version's load writes them: one newer already written wins). And
        whether a foreign key that refused an increment is still there."""
        body = dict(self._describe(), replica=self.replica_id, pending=self.pending,
                    dropped=self.dropped, at=time.time())
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._prefix + f"replica:{self.replica_id}", json.dumps(body, default=str),
                 ex=max(1, round(self._heartbeat_s * 3)))
        pipe.exists(self._prefix + "stats:entry_marks_version")
        refused = self._refused
        if refused is not None:
            pipe.exists(refused[1])
        _, marks_held, *refusing = await pipe.execute()
        if refused is not None and not refusing[0] and self._refused is refused:
            self._refused = None  # the foreign key is gone (deleted by hand)
        sent = self._marks_sent
        # A write without a version name records none: nothing to look for then.
        if not marks_held and sent is not None and sent[0] and self._published is None:
            self._published = sent
            logs.event(log, "shared_stats_entry_marks_lost", logging.WARNING, version=sent[0])

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Best-effort goodbye: flush and drop the heartbeat so the replica count is exact."""
        async def flush_applied() -> None:
            try:
                await self.flush()
            except RefusedIncrement as exc:  # one foreign key: the rest of it was applied
                logs.event(log, "shared_stats_refused", logging.WARNING, error=str(exc))

        async def goodbye() -> None:
            await flush_applied()
            # A flush sends one batch: after a failed one, that batch again. What was
            # counted since is the next batch, lost with the process if not sent now.
            while self._pending:
                await flush_applied()
            await self._redis.delete(self._prefix + f"replica:{self.replica_id}")

        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel
                await goodbye()
        except (RedisError, OSError, TimeoutError) as exc:
            logs.event(log, "shared_stats_leave_failed", logging.WARNING, error=str(exc),
                       pending=self.pending)

    async def aclose(self) -> None:
        await self._redis.aclose()

    # -- the cluster view -----------------------------------------------------------------
    async def cluster_snapshot(self, local: dict[str, Any]) -> dict[str, Any]:
        """``local`` (a ``Stats.snapshot()``) with the counters summed over all replicas.

        Redis unreachable: the local figures, marked ``degraded`` and ``replicas: None``.
        """
        try:
            counts, replicas = await self._read_cluster()
        except (RedisError, OSError) as exc:
            reason = f"cannot read shared counters: {type(exc).__name__}: {exc}"
            return dict(local, scope="replica", replicas=None, degraded=True,
                        degraded_reason=self._health.reason or reason,
                        latency_scope="replica", replica_id=self.replica_id)
        # The answering replica's own calls are its live count, not its last heartbeat's
        # (up to a heartbeat old: a call begun or ended here meanwhile was missed, or shown
        # still on); the others' are their heartbeats. It answers, so it is one of them.
        own = _int(local.get("active_calls"))
        if own is not None:
            replicas = [r for r in replicas if r.get("replica") != self.replica_id]
        active_calls = sum(_int(r.get("active_calls")) or 0 for r in replicas) + (own or 0)
        live = len(replicas) + (own is not None)
        totals = counts["totals"]
        hits, misses = totals.get("hits", 0), totals.get("misses", 0)
        recent_turns, recent_hits = counts["recent_turns"], counts["recent_hits"]  # weighted
        turns_5m = round(recent_turns)
        return dict(
            local, scope="cluster", replicas=live, active_calls=active_calls,
            calls=totals.get("calls", 0), turns=totals.get("turns", 0),
            keypad_turns=totals.get("keypad_turns", 0), hits=hits,
            misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None,
            hit_rate_5m=recent_hits / recent_turns if turns_5m else None,
            turns_5m=turns_5m, interrupted_turns=totals.get("interrupted_turns", 0),
            sources=counts["sources"], intents=self._served_intents(counts["intents"]),
            errors=counts["errors"],
            entry_hits=counts["entries"], degraded=self._health.degraded,
            degraded_reason=self._health.reason,
            # The chart beside the cluster's figures counts the cluster's minutes too.
            series={"minute_s": 60, "points": counts["series"]},
            # Latency and the misses list stay this replica's: the page names it.
            latency_scope="replica", replica_id=self.replica_id)

    def _served_intents(self, intents: dict[str, int]) -> dict[str, int]:
        """The cluster's intents, those this replica's version does not hold under
        OTHER_INTENT: a replica still on the version before (loading the new one) counts
        them by name after the first to load it pruned them, until the next publish."""
        folded: Counter[str] = Counter()
        for label, turns in intents.items():
            folded[label if self._intent_labels.kept(label) else OTHER_INTENT] += turns
        return dict(folded)

    async def _read_cluster(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        # The chart's hour of minute buckets, the current one (partial) last; the 5 min
        # window [now - 300 s, now] is their last six, of which the oldest counts only for
        # its last (1 - fraction), the share of it inside the window.
        now = time.time()
        current = int(now // 60)
        hour = range(current - SERIES_MINUTES + 1, current + 1)
        pipe = self._redis.pipeline(transaction=False)
        for name in _HASHES:
            pipe.hgetall(self._prefix + f"stats:{name}")
        for minute in hour:
            pipe.hmget(self._prefix + f"stats:minute:{minute}", ["turns", "hits"])
        # A reply that is an error (a foreign type under one key: WRONGTYPE) is left out, as
        # a foreign field is; a lost connection still raises.
        results = [None if isinstance(r, Exception) else r
                   for r in await pipe.execute(raise_on_error=False)]
        counts: dict[str, Any] = {name: _ints(raw or {}) for name, raw in zip(_HASHES, results)}
        buckets = {minute: tuple(_int(v) or 0 for v in (raw or (None, None)))
                   for minute, raw in zip(hour, results[len(_HASHES):])}
        first_minute, fraction = divmod((now - RECENT_WINDOW_S) / 60, 1)
        minutes = range(int(first_minute), int(first_minute) + RECENT_WINDOW_S // 60 + 1)
        weights = [1.0 - fraction] + [1.0] * (len(minutes) - 1)
        recent = [(w, buckets.get(m, (0, 0))) for w, m in zip(weights, minutes)]
        counts["recent_turns"] = sum(w * t for w, (t, _) in recent)
        counts["recent_hits"] = sum(w * h for w, (_, h) in recent)
        # Misses are turns less hits; a foreign bucket with more hits than turns draws none.
        counts["series"] = [{"t": m * 60, "hits": h, "misses": max(0, t - h)}
                            for m, (t, h) in buckets.items()]
        # The prefix literally, as the store matches it: `*?[]` in it are no pattern that
        # would count another deployment's replicas (and none of ours).
        pattern = glob_escape(self._prefix) + "replica:*"
        # Deduplicated: SCAN may return a key twice (the keyspace shrank meanwhile, keys
        # expiring), which would count that replica and its calls twice.
        keys = list(dict.fromkeys([key async for key in
                                   self._redis.scan_iter(match=pattern, count=500)]))
        values = await self._redis.mget(keys) if keys else []
        replicas = [r for r in map(_heartbeat, values) if r is not None]
        return counts, replicas


def _heartbeat(value: bytes | None) -> dict[str, Any] | None:
    """A replica's heartbeat; None when expired between SCAN and MGET, or not ours."""
    try:
        body = json.loads(value) if value else None
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a foreign 1e999
        return None


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    """A counters hash; a field that is not an integer (not ours) is left out."""
    out = {k.decode("utf-8", "replace"): _int(v) for k, v in raw.items()}
    return {k: v for k, v in out.items() if v is not None}
