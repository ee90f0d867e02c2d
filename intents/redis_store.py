"""A ``Store`` in Redis, shared by every gateway replica (sync redis-py).

The ``Store`` interface is synchronous: it is called from the seed CLI and from the
gateway's worker threads, never from the event loop. Same guarantees as
``LocalStore``: audio is content-addressed, a version is written completely before
the pointer moves, and a reader resolves the pointer once, so it never sees half a
seed.

Key layout (``prefix`` defaults to ``voicegate:``)::

    <prefix>audio:<sha256>      hash  pcm (16-bit mono PCM bytes), rate (Hz), t (when a seed
                                      last wrote or reused it, by the Redis server's clock,
                                      Unix seconds)
    <prefix>version:<name>      hash  manifest (JSON), vectors (.npy bytes), classifier,
                                      audio (the audio keys it names, space-separated),
                                      seen (unpublished: when a clean-up first found it so,
                                      by the Redis server's clock, Unix seconds)
    <prefix>current             string  name of the serving version
    <prefix>published           sorted set  the kept published versions, scored by publish time

    channel <prefix>versions    PUBLISH <name> when a version becomes current

Publishing writes ``version:<name>`` with one HSET (a single atomic command), then
moves ``current``, records it in ``published`` and publishes on the channel in one Lua
script (``_swap_pointer``: it checks its keys' types first, as MULTI/EXEC would not roll
back, that the version's hash exists and that every audio key it names exists): a replica
told about a version can always read all of it. A publish that fails before the swap (the
write or the swap refused, failed or timed out) deletes the version's hash unless ``current``
names it or ``published`` lists it (a swap that timed out may have been applied); a hash that
is not there (Redis refused its write: -MISCONF, -READONLY) is nothing to delete, and no write
is sent for it; if Redis cannot be reached for that, or refuses the delete of a hash written
before it began refusing writes, it is logged (``cache_publish_cleanup_failed``) and left, and
a swap that went unanswered raises ``PublishUnconfirmed``: delivered late, it still publishes.

Then the clean-up (``intents.store``: retention): versions in ``published`` beyond the
newest ``keep_versions`` are deleted (never the one ``current`` names); a version hash
that neither ``current`` names nor ``published`` lists (a failed publish left it, its own
clean-up failed) is deleted once ``audio_grace_s`` has passed since a clean-up first found
it so (``seen``, on the Redis server's clock: replicas' clocks may disagree by more than
the grace), so a seed that wrote its hash and has yet to move the pointer keeps it (a swap
after the deletion is refused: the hash is gone); and audio that no
version left in ``published`` or ``current`` names, and that no seed wrote or reused
(``claim_audio``) within ``audio_grace_s``, is deleted in a transaction that watches
``current``, ``published`` and those audio keys: a publish or a seed's claim meanwhile
aborts it (the next publish tries again). Audio's ``t`` is stamped and aged on the Redis
server's clock too (``TIME`` in the write's and the claim's scripts; the clean-up reads
``TIME`` for its cut-off after reading the stamps, within the watch), so a replica whose
clock runs ahead by more than the grace spares the audio another replica's seed just wrote
or reused. Audio without ``t`` (stored by a voicegate from before the clean-up) gets it at
the first clean-up that finds it unused, and its grace starts then; a ``t`` an older
voicegate wrote is its replica's clock, read as Unix seconds like the server's.

Nothing published is lost only if the Redis persists (``appendonly yes``): see
docs/operations.md, "Scaling with Redis".
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from intents.store import (ANY_VERSION, AUDIO_GRACE_S, KEEP_VERSIONS, MANIFEST_FORMAT,
                           AnyVersion, CacheBundle, PublishUnconfirmed, Store, StoreConflict,
                           StoreError, StoreStarting, StoreUnavailable, check_format,
                           conflict_message, kept_versions, missing_audio_message,
                           referenced_audio, unreadable_pointer_message)
from intents.types import Audio

DEFAULT_PREFIX = "voicegate:"

log = logging.getLogger("voicegate.store")

# Checks every key first, then writes: no half-applied swap (MULTI/EXEC never rolls back).
# ARGV[4] '1': only if the pointer names ARGV[5] ('' for none); else returns the current one.
# KEYS[3], the version's hash, must exist: a swap delivered late, after the failed publish's
# clean-up deleted that hash, must not point `current` at nothing. So must every audio key
# its `audio` field names (ARGV[6]: their prefix; read here, so not declared as KEYS, as
# this store's scripts already assume one Redis, not a cluster): a seed that ran longer than
# the audio grace may have reused audio a clean-up deleted meanwhile. Returns {2, that key}.
_SWAP = """
for i, want in ipairs({'string', 'zset'}) do
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= 'none' and t ~= want then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want)
  end
end
if ARGV[4] == '1' then
  local current = redis.call('GET', KEYS[1]) or ''
  if current ~= ARGV[5] then return {0, current} end
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  return redis.error_reply('NOVERSION ' .. KEYS[3] .. ' does not exist: pointer not moved')
end
local audio = redis.call('HGET', KEYS[3], 'audio') or ''
for key in string.gmatch(audio, '%x+') do
  if redis.call('EXISTS', ARGV[6] .. key) == 0 then return {2, key} end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {1, ARGV[1]}
"""
# After a failed publish: KEYS[1] current, KEYS[2] the version's hash, KEYS[3] published,
# ARGV[1] its name. -1: `current` names it or `published` lists it (the swap went through,
# maybe followed by another publish): kept; 0: dropped (or already gone). A key of a foreign
# type names nothing (the swap checks their types: it cannot have gone through then).
# The only thing a publish writes before its swap is that hash, in one HSET: a single command
# (no pipeline), applied whole or not at all. The swap is one script that checks everything
# before its first write (SET), where a refusal stops it: nothing of it applied. So what may be
# left is that hash, and only if it was written: the HSET answered OK (the swap then refused,
# failed or unanswered), or an HSET unanswered (a lost connection: applied or not, and redis-py
# sends it again). EXISTS says which: a hash that is not there is nothing to delete, and no DEL
# is sent for it. A Redis refusing every write (-MISCONF, -READONLY: a ResponseError, a
# ReadOnlyError) refused the HSET too and refuses a DEL even of a missing key, but runs this
# script (no flags) up to its first write; -OOM refuses the HSET but never a DEL.
_DROP_UNPUBLISHED = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return -1
end
if redis.call('TYPE', KEYS[3]).ok == 'zset' and redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
return 0
"""
# Audio's `t`, when a seed last wrote or reused it, is the Redis server's clock (TIME, Unix
# seconds), as the clean-up's cut-off is, never a replica's: one whose clock runs ahead of
# the seeder's by more than the grace would take the seed's fresh audio for unused.
# A seed wrote this audio (ARGV[1] the PCM, ARGV[2] its rate).
_PUT_AUDIO = """
redis.call('HSET', KEYS[1], 'pcm', ARGV[1], 'rate', ARGV[2], 't', redis.call('TIME')[1])
return 1
"""
# A seed is about to reuse this audio: its clean-up grace starts again (1), or it is gone (0).
_CLAIM_AUDIO = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 't', redis.call('TIME')[1])
return 1
"""
# Old versions: KEYS[1] current, KEYS[2] published, KEYS[2 + i] the hash of ARGV[i]. The one
# `current` names is never dropped. UNLINK: Redis frees the memory off its main thread.
_DROP_VERSIONS = """
local current = redis.call('GET', KEYS[1])
local dropped = 0
for i, name in ipairs(ARGV) do
  if name ~= current then
    redis.call('UNLINK', KEYS[2 + i])
    redis.call('ZREM', KEYS[2], name)
    dropped = dropped + 1
  end
end
return dropped
"""
# Version hashes no publish finished: KEYS[1] current, KEYS[2] published, KEYS[i] (i >= 3)
# the hash of ARGV[i]; ARGV[1] the grace in seconds (ARGV[2] unused: ARGV[i] pairs with
# KEYS[i]). A hash `current` names or `published` lists is a published version's (the
# retention above keeps or drops those); each other one is stamped `seen` the first time a
# clean-up finds it, and dropped once the grace has passed since. Both on the Redis server's
# clock (TIME), never a replica's: one whose clock runs ahead by more than the grace would
# take the fresh hash of another replica's seed, between its write and its swap, for an old
# one. Nothing when `current` or `published` holds a foreign type (what is published is
# unknown then). Returns the names dropped.
_DROP_ORPHANS = """
for i, want in ipairs({'string', 'zset'}) do
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= 'none' and t ~= want then return {} end
end
local current = redis.call('GET', KEYS[1])
local now = tonumber(redis.call('TIME')[1])
local dropped = {}
for i = 3, #KEYS do
  local name = ARGV[i]
  if name ~= current and not redis.call('ZSCORE', KEYS[2], name)
      and redis.call('TYPE', KEYS[i]).ok == 'hash'
      and redis.call('HEXISTS', KEYS[i], 'manifest') == 1 then
    local seen = tonumber(redis.call('HGET', KEYS[i], 'seen'))
    if seen == nil then
      redis.call('HSET', KEYS[i], 'seen', now)
    elseif now - seen > tonumber(ARGV[1]) then
      redis.call('UNLINK', KEYS[i])
      dropped[#dropped + 1] = name
    end
  end
end
return dropped
"""
# A version's name, as ``publish`` makes it: only such hashes are taken for orphans.
_VERSION_NAME = re.compile(rb"\d{8}T\d{6}Z-[0-9a-f]{6}")


def _unanswered(failure: BaseException) -> bool:
    """Whether a publish step failed for want of Redis's answer (a lost connection, a
    timeout): the command may still have been applied, or be on its way."""
    return isinstance(failure.__cause__, (redis.ConnectionError, redis.TimeoutError))


def unconfirmed_message(version: str, failure: BaseException) -> str:
    return (f"{failure}; whether version {version} was published is unknown: its pointer "
            f"swap was sent, and Redis could not be asked since (a swap delivered late still "
            f"publishes it). Once Redis answers, /readyz cache_version (or GET /admin/entries "
            f"version) says which: {version} is published; the previous version means nothing "
            f"was published (its hash goes with the retention)")


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern (a prefix may hold ``*?[]\\``)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# redis-py takes a password from the query too (`?password=...`).
_QUERY_PASSWORD = re.compile(r"(^|&)(password=)[^&]*")


def redacted(url: str) -> str:
    """The URL without its password (in the user part or the query), fit for error messages
    and logs."""
    parts = urlsplit(url)
    if parts.query:  # in place: urlunsplit would turn unix:///path into unix:/path
        query = _QUERY_PASSWORD.sub(r"\1\2***", parts.query)
        url = url.replace("?" + parts.query, "?" + query, 1)
        parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# Said for a write Redis refuses because it cannot persist (-MISCONF: a failed BGSAVE with
# stop-writes-on-bgsave-error yes, or a failed AOF write): an operator's fix, not an outage.
MISCONF_SAID = ("Redis refuses writes: it cannot persist to disk (MISCONF); fix its disk or "
                "stop-writes-on-bgsave-error")
# Said for a write a read-only replica refuses (-READONLY, redis-py ReadOnlyError): the URL
# names a replica, or a failover demoted the Redis it names.
READONLY_SAID = ("Redis refuses writes: it is a read-only replica (READONLY); point the Redis "
                 "URL at the primary")
# Said for a write Redis refuses for want of memory (-OOM, redis-py OutOfMemoryError: used
# memory over maxmemory under maxmemory-policy noeviction, which it must keep: an evicting
# policy would drop published versions and audio; docs/operations.md).
OOM_SAID = ("Redis refuses writes: its memory is full (OOM: used memory over maxmemory); "
            "raise maxmemory or free memory, and keep maxmemory-policy noeviction (an "
            "evicting policy drops published versions and audio)")
# Said for a write Redis refuses because fewer replicas than min-replicas-to-write are in
# sync with it (-NOREPLICAS: a ResponseError redis-py has no class for), for as long as they lag.
NOREPLICAS_SAID = ("Redis refuses writes: fewer replicas than min-replicas-to-write are in "
                   "sync with it (NOREPLICAS); bring its replicas back or lower "
                   "min-replicas-to-write")
# Said for a Redis that answers -LOADING (redis-py BusyLoadingError): still loading its
# dataset after a restart (or a replica's full sync). Reads are tried again later (the poll,
# the subscriber say so); a refused write (a publish) is the operator's to send again.
LOADING_SAID = "is loading its dataset: it is starting, not ready yet"
# Said for a Redis that refuses every command for as long as its cause lasts, reads too: a
# script running past busy-reply-threshold (-BUSY: until it ends or SCRIPT KILL stops it), a
# replica cut off from its primary with replica-serve-stale-data no (-MASTERDOWN, redis-py
# MasterDownError). A store that did not answer, as an unreachable one: retried, not a
# pointer naming no version.
BUSY_SAID = ("is busy running a script (BUSY) and serves nothing until it ends or SCRIPT KILL "
             "stops it")
MASTERDOWN_SAID = ("is a replica cut off from its primary and serves no reads (MASTERDOWN: "
                   "replica-serve-stale-data no); point the Redis URL at the primary")


def cannot_persist(exc: BaseException) -> bool:
    """Redis refused a write because it cannot persist (-MISCONF). redis-py has no class for
    it: a ResponseError whose message starts with the code (a script's too)."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("MISCONF")


def refused_writes(exc: BaseException) -> str | None:
    """Why Redis refused a write, said with its fix, when the refusal is Redis's state, not
    the write's (a key of a foreign type): it cannot persist (-MISCONF), it is a read-only
    replica (-READONLY), its memory is full (-OOM), its replicas lag (-NOREPLICAS). None for
    any other failure. redis-py strips the codes it has a class for from the message: the
    class says which, the code is checked too (a reply it did not map)."""
    if not isinstance(exc, redis.ResponseError):
        return None
    if cannot_persist(exc):
        return MISCONF_SAID
    if isinstance(exc, redis.ReadOnlyError) or str(exc).startswith("READONLY "):
        return READONLY_SAID
    if isinstance(exc, redis.OutOfMemoryError) or str(exc).startswith("OOM "):
        return OOM_SAID
    if str(exc).startswith("NOREPLICAS "):
        return NOREPLICAS_SAID
    return None


def still_loading(exc: BaseException) -> bool:
    """Redis answered -LOADING: it is up, loading its dataset. redis-py raises it as a
    ConnectionError (BusyLoadingError), which is what an outage raises too."""
    return isinstance(exc, redis.BusyLoadingError)


def refusing_for_now(exc: BaseException) -> str | None:
    """What Redis is doing when it refuses every command for now (-BUSY, -MASTERDOWN), said
    as ``BUSY_SAID`` or ``MASTERDOWN_SAID``; None for any other failure. redis-py has no class
    for -BUSY (a ResponseError whose message starts with the code) and strips MASTERDOWN
    from its message (its class says it)."""
    if isinstance(exc, redis.exceptions.MasterDownError):
        return MASTERDOWN_SAID
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("BUSY "):
        return BUSY_SAID
    return None


def refused_credentials(exc: BaseException) -> bool:
    """Redis refused the URL's user or password (WRONGPASS, NOAUTH): no outage, a setting
    to fix. redis-py raises these as a ConnectionError."""
    return isinstance(exc, redis.AuthenticationError)


class RedisKeys:
    """Names of the store's keys and channel under one prefix (shared with the gateway)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.current = f"{prefix}current"
        self.published = f"{prefix}published"
        self.channel = f"{prefix}versions"

    def audio(self, key: str) -> str:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise StoreError(f"not an audio key: {key!r}")
        return f"{self.prefix}audio:{key}"

    def version(self, name: str) -> str:
        return f"{self.prefix}version:{name}"


class RedisStore(Store):
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, *, timeout_s: float = 5.0,
                 client: redis.Redis | None = None, keep_versions: int = KEEP_VERSIONS,
                 audio_grace_s: float = AUDIO_GRACE_S,
                 clock: Callable[[], float] = time.time) -> None:
        if keep_versions < 1 or audio_grace_s <= 0:
            raise ValueError("keep_versions must be at least 1 and audio_grace_s positive")
        self.url = url
        self.keys = RedisKeys(prefix)
        self.keep_versions = keep_versions
        self.audio_grace_s = audio_grace_s
        self._clock = clock  # publish times (a test's clock); ages are the Redis server's
        # Few, short retries: a caller (seed CLI, refresh thread) should learn quickly that
        # Redis is gone rather than hang in redis-py's default backoff.
        self._redis = client or redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))

    def close(self) -> None:
        self._redis.close()

    def _call(self, what: str, operation: Callable[[], Any]) -> Any:
        """Run one Redis operation, turning any redis-py failure into a clear StoreError."""
        try:
            return operation()
        except redis.BusyLoadingError as exc:  # retried, as an outage is, then still so
            raise StoreStarting(f"Redis at {redacted(self.url)} {LOADING_SAID} ({what}): "
                                f"{exc}") from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Still unavailable (retried, as an outage is): fixed on Redis's side (an ACL
            # user's password set), it answers again. Said as refused, not unreachable.
            state = "refused the credentials" if refused_credentials(exc) else "is unreachable"
            raise StoreUnavailable(f"Redis at {redacted(self.url)} {state} ({what}): "
                                   f"{exc}") from exc
        except redis.RedisError as exc:  # an answer (a key of a foreign type): not transient
            said = refused_writes(exc)
            if said:  # nothing written: the operator fixes Redis (its disk, URL, memory)
                raise StoreError(f"Redis at {redacted(self.url)} ({what}): {said}. "
                                 f"Redis said: {exc}") from exc
            said = refusing_for_now(exc)
            if said:  # it serves nothing for now, reads neither: retried, as an outage is
                raise StoreUnavailable(f"Redis at {redacted(self.url)} {said} ({what}): "
                                       f"{exc}") from exc
            raise StoreError(f"Redis at {redacted(self.url)} failed ({what}): {exc}") from exc

    # -- audio ---------------------------------------------------------------------
    def has_audio(self, key: str) -> bool:
        return bool(self._call("has_audio", lambda: self._redis.exists(self.keys.audio(key))))

    def claim_audio(self, key: str) -> bool:
        name = self.keys.audio(key)
        return bool(self._call("claim_audio", lambda: self._redis.eval(_CLAIM_AUDIO, 1, name)))

    def get_audio(self, key: str) -> Audio:
        pcm, rate = self._call("get_audio",
                               lambda: self._redis.hmget(self.keys.audio(key), ["pcm", "rate"]))
        if pcm is None or rate is None:
            raise StoreError(f"audio {key} is missing from Redis at {redacted(self.url)}")
        return Audio(bytes(pcm), int(rate))

    def put_audio(self, key: str, audio: Audio) -> None:
        if len(audio.pcm) % 2:
            raise ValueError("16-bit PCM must have an even number of bytes")
        name = self.keys.audio(key)
        self._call("put_audio", lambda: self._redis.eval(
            _PUT_AUDIO, 1, name, audio.pcm, audio.sample_rate))

    # -- versions ------------------------------------------------------------------
    def publish(self, bundle: CacheBundle,
                replaces: str | None | AnyVersion = ANY_VERSION) -> str:
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        manifest = dict(bundle.manifest, format=MANIFEST_FORMAT, version=version)
        vectors = io.BytesIO()
        np.save(vectors, np.ascontiguousarray(bundle.vectors, dtype=np.float32))
        audio = sorted(referenced_audio(manifest) or ())
        for name in audio:
            self.keys.audio(name)  # a malformed key is refused before anything is written
        fields = {"manifest": json.dumps(manifest, ensure_ascii=False).encode("utf-8"),
                  "vectors": vectors.getvalue(), "classifier": bundle.classifier,
                  "audio": " ".join(audio)}
        key = self.keys.version(version)
        swap_sent = False
        try:
            self._call("publish: write version", lambda: self._redis.hset(key, mapping=fields))
            swap_sent = True
            self._swap_pointer(version, replaces)
        except BaseException as exc:
            # A timeout does not say whether the write or the swap was applied: drop the
            # version's hash unless it was published (atomically; best effort, Redis may be
            # gone). Audio is not this publish's to delete: the seed stored or claimed it
            # before, other versions and seeds may share it (content-addressed), and the
            # retention clean-up deletes it once unused for the grace.
            published = self._drop_unpublished(version, exc)
            if published:
                return version  # the swap went through after all
            if published is None and swap_sent and _unanswered(exc):
                # The swap may yet reach Redis and move the pointer (its hash is still
                # there): "nothing published" could be false.
                raise PublishUnconfirmed(unconfirmed_message(version, exc)) from exc
            raise
        self._clean_up_quietly(version, self._clean_up)
        return version

    def _drop_unpublished(self, version: str, failure: BaseException) -> bool | None:
        """After a failed publish: delete ``version``'s hash unless `current` names it or
        `published` lists it; True when one does (the swap went through after all), False
        when it was dropped, None when Redis could not be asked. Never raises over the
        publish's own error: a failure is logged, the hash is left."""
        key = self.keys.version(version)
        try:
            return self._redis.eval(_DROP_UNPUBLISHED, 3, self.keys.current, key,
                                    self.keys.published, version) == -1
        except Exception as exc:
            log.warning("cache_publish_cleanup_failed version=%s error=%s: %s (the publish "
                        "failed: %s: %s); its hash %s may be left in Redis: unless a swap "
                        "sent before still reaches Redis and publishes it, no version names "
                        "it, and the clean-up after a later publish deletes it once the audio "
                        "grace has passed since one first found it",
                        version, type(exc).__name__, exc, type(failure).__name__, failure, key)
            return None

    def _swap_pointer(self, version: str, replaces: str | None | AnyVersion) -> None:
        """The only step readers can observe: one script moves the pointer, records the
        version and tells every subscribed replica, after checking that no key it writes
        holds a foreign type (MULTI/EXEC would apply the rest and not roll back), that the
        version's hash exists (a swap delayed past the clean-up of its failed publish is
        refused), that every audio key it names exists (a seed that outran the clean-up's
        grace is refused) and, when asked, that the pointer still names the version this one
        replaces."""
        checked = replaces is not ANY_VERSION
        moved, current = self._call("publish: move pointer", lambda: self._redis.eval(
            _SWAP, 3, self.keys.current, self.keys.published, self.keys.version(version),
            version, self._clock(), self.keys.channel, "1" if checked else "0",
            (replaces or "") if checked else "", f"{self.keys.prefix}audio:"))
        if moved == 2:
            missing = current.decode("ascii") if isinstance(current, bytes) else str(current)
            raise StoreError(missing_audio_message(version, [missing]))
        if not moved:
            current = current.decode("utf-8", "replace") if isinstance(current, bytes) else current
            raise StoreConflict(conflict_message(replaces, current or None))

    def _clean_up(self) -> None:
        """After a publish: drop the versions beyond the kept ones, the hashes of failed
        publishes, then unused audio."""
        self._drop_old_versions()
        self._drop_orphaned_versions()
        self._drop_unused_audio()

    def _drop_old_versions(self) -> None:
        newest_first = [n.decode("utf-8") for n in
                        self._redis.zrevrange(self.keys.published, 0, -1)]
        kept = kept_versions(newest_first, self.current_version(), self.keep_versions)
        old = [name for name in newest_first if name not in kept]
        if old:
            self._redis.eval(_DROP_VERSIONS, 2 + len(old), self.keys.current,
                             self.keys.published, *[self.keys.version(n) for n in old], *old)

    def _drop_orphaned_versions(self) -> None:
        """Delete the version hashes of publishes that never finished: a failed publish
        whose own clean-up failed too (Redis went away at that moment), or whose write the
        network delivered after it. Only once the audio grace has passed since a clean-up
        first found it unpublished, on the Redis server's clock: a seed between its write
        and its swap is not to lose its hash (were it deleted, its swap is refused, never a
        pointer at nothing). Never one ``current`` names or ``published`` lists, checked in
        the script that deletes it."""
        prefix = self.keys.version("")
        start = len(prefix.encode("utf-8"))
        hashes = list(dict.fromkeys(  # SCAN may return a key twice
            k for k in self._redis.scan_iter(match=glob_escape(prefix) + "*", count=1000,
                                             _type="hash")
            if _VERSION_NAME.fullmatch(k[start:])))
        if not hashes:
            return
        dropped = self._redis.eval(_DROP_ORPHANS, 2 + len(hashes), self.keys.current,
                                   self.keys.published, *hashes, self.audio_grace_s, "",
                                   *[k[start:] for k in hashes])
        for name in dropped:
            log.info("cache_orphan_dropped version=%s (its publish failed and left its hash)",
                     name.decode("ascii"))

    def _drop_unused_audio(self) -> None:
        """Delete audio that no kept version names and no seed claimed within the grace, in
        one transaction watching what it was decided on (a publish or a claim meanwhile
        aborts it: skipped until the next publish). Ages are the Redis server's clock
        (``TIME``), as the stamps are: read after the stamps, within the watch."""
        prefix = f"{self.keys.prefix}audio:"
        with self._redis.pipeline() as watched:
            watched.watch(self.keys.current, self.keys.published)
            names = {n.decode("utf-8") for n in watched.zrange(self.keys.published, 0, -1)}
            current = watched.get(self.keys.current)
            if current:
                names.add(current.decode("utf-8"))
            used: set[str] = set()
            for name in names:
                used |= self._audio_of(name)
            start = len(prefix.encode("utf-8"))
            unused = [k for k in self._redis.scan_iter(match=glob_escape(prefix) + "*",
                                                       count=1000, _type="hash")
                      if k[start:].decode("ascii", "replace") not in used]
            if not unused:
                return
            watched.watch(*unused)  # from here on a claim or a write aborts the transaction
            reads = self._redis.pipeline(transaction=False)
            for k in unused:
                reads.hmget(k, ["rate", "t"])
            stamps = reads.execute()
            now = self._redis.time()[0]  # the server's Unix seconds, as `t` is
            cutoff = now - self.audio_grace_s
            stale = [k for k, (rate, t) in zip(unused, stamps)
                     if rate is not None and t is not None and float(t) < cutoff]
            unstamped = [k for k, (rate, t) in zip(unused, stamps)
                         if rate is not None and t is None]
            if not stale and not unstamped:
                return
            watched.multi()
            if stale:
                watched.unlink(*stale)
            for k in unstamped:  # stored by an older voicegate: its grace starts now
                watched.hset(k, "t", now)
            try:
                watched.execute()
            except redis.WatchError:
                log.info("cache_cleanup_deferred reason=a publish or a seed changed the "
                         "store meanwhile")

    def _audio_of(self, version: str) -> set[str]:
        """The audio keys a stored version names: its ``audio`` field, or (a version from an
        older voicegate) its manifest's entries. Raises StoreError when they are unknown."""
        key = self.keys.version(version)
        audio = self._redis.hget(key, "audio")
        if audio is not None:
            return set(audio.decode("ascii").split())
        raw = self._redis.hget(key, "manifest")
        if raw is None:
            return set()  # no such version: it names nothing
        try:
            found = referenced_audio(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            found = None
        if found is None:
            raise StoreError(f"cache version {version}'s manifest lists no entries: its "
                             "audio is unknown, so no audio was deleted")
        return found

    def current_version(self) -> str | None:
        name = self._call("current_version", lambda: self._redis.get(self.keys.current))
        try:
            return name.decode("utf-8") if name else None
        except UnicodeDecodeError as exc:  # set by hand: not a name a publish writes
            raise StoreError(unreadable_pointer_message(
                f"{self.keys.current} in Redis at {redacted(self.url)}", exc)) from exc

    def read(self, version: str | None = None) -> tuple[str, CacheBundle]:
        name = version or self.current_version()
        if name is None:
            raise StoreError(f"no cache version published in Redis at {redacted(self.url)} "
                             f"(prefix {self.keys.prefix!r}; run `voicegate seed --redis URL`)")
        raw = self._call("read", lambda: self._redis.hgetall(self.keys.version(name)))
        if not raw:
            raise StoreError(f"cache version {name} is missing from Redis at {redacted(self.url)}")
        try:
            manifest = json.loads(raw[b"manifest"].decode("utf-8"))
            vectors = np.load(io.BytesIO(raw[b"vectors"]), allow_pickle=False)
            classifier = bytes(raw[b"classifier"])
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read cache version {name} in Redis: {exc}") from exc
        check_format(name, manifest)
        return name, CacheBundle(manifest, vectors, classifier)

    def versions(self) -> list[str]:
        names = self._call("versions", lambda: self._redis.zrange(self.keys.published, 0, -1))
        return sorted(n.decode("utf-8") for n in names)
