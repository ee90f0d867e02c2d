"""A ``Store`` in Redis, shared by every gateway replica (sync redis-py).

The ``Store`` interface is synchronous: it is called from the seed CLI and from the
gateway's worker threads, never from the event loop. Same guarantees as
``LocalStore``: audio is content-addressed, a version is written completely before
the pointer moves, and a reader resolves the pointer once, so it never sees half a
seed.

Key layout (``prefix`` defaults to ``voicegate:``)::

    <prefix>audio:<sha256>      hash  pcm (16-bit mono PCM bytes), rate (Hz)
    <prefix>version:<name>      hash  manifest (JSON), vectors (.npy bytes), classifier
    <prefix>current             string  name of the serving version
    <prefix>published           sorted set  every published version, scored by publish time

    channel <prefix>versions    PUBLISH <name> when a version becomes current

Publishing writes ``version:<name>`` with one HSET (a single atomic command), then
moves ``current``, records it in ``published`` and publishes on the channel in one Lua
script (``_swap_pointer``: it checks its keys' types first, as MULTI/EXEC would not roll
back, and that the version's hash exists): a replica told about a version can always read
all of it.

Nothing published is lost only if the Redis persists (``appendonly yes``): see
docs/operations.md, "Scaling with Redis".
"""

from __future__ import annotations

import io
import json
import secrets
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from intents.store import (ANY_VERSION, MANIFEST_FORMAT, AnyVersion, CacheBundle, Store,
                           StoreConflict, StoreError, check_format, conflict_message)
from intents.types import Audio

DEFAULT_PREFIX = "voicegate:"

# Checks every key first, then writes: no half-applied swap (MULTI/EXEC never rolls back).
# ARGV[4] '1': only if the pointer names ARGV[5] ('' for none); else returns the current one.
# KEYS[3], the version's hash, must exist: a swap delivered late, after the failed publish's
# clean-up deleted that hash, must not point `current` at nothing.
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
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {1, ARGV[1]}
"""
# -1: the pointer names the version (the swap went through); 0: dropped (or already gone).
_DROP_UNLESS_CURRENT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return -1 end
redis.call('DEL', KEYS[2])
return 0
"""


def redacted(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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
                 client: redis.Redis | None = None) -> None:
        self.url = url
        self.keys = RedisKeys(prefix)
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
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreError(f"Redis at {redacted(self.url)} is unreachable ({what}): {exc}") \
                from exc
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {redacted(self.url)} failed ({what}): {exc}") from exc

    # -- audio ---------------------------------------------------------------------
    def has_audio(self, key: str) -> bool:
        return bool(self._call("has_audio", lambda: self._redis.exists(self.keys.audio(key))))

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
        self._call("put_audio", lambda: self._redis.hset(
            name, mapping={"pcm": audio.pcm, "rate": audio.sample_rate}))

    # -- versions ------------------------------------------------------------------
    def publish(self, bundle: CacheBundle,
                replaces: str | None | AnyVersion = ANY_VERSION) -> str:
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        manifest = dict(bundle.manifest, format=MANIFEST_FORMAT, version=version)
        vectors = io.BytesIO()
        np.save(vectors, np.ascontiguousarray(bundle.vectors, dtype=np.float32))
        fields = {"manifest": json.dumps(manifest, ensure_ascii=False).encode("utf-8"),
                  "vectors": vectors.getvalue(), "classifier": bundle.classifier}
        key = self.keys.version(version)
        self._call("publish: write version", lambda: self._redis.hset(key, mapping=fields))
        try:
            self._swap_pointer(version, replaces)
        except BaseException:
            # A timeout does not say whether the swap was applied: drop the version only if
            # the pointer does not name it (atomically; best effort, Redis may be gone).
            try:
                if self._redis.eval(_DROP_UNLESS_CURRENT, 2, self.keys.current, key,
                                    version) == -1:
                    return version  # the swap went through after all
            except redis.RedisError:
                pass
            raise
        return version

    def _swap_pointer(self, version: str, replaces: str | None | AnyVersion) -> None:
        """The only step readers can observe: one script moves the pointer, records the
        version and tells every subscribed replica, after checking that no key it writes
        holds a foreign type (MULTI/EXEC would apply the rest and not roll back), that the
        version's hash exists (a swap delayed past the clean-up of its failed publish is
        refused) and, when asked, that the pointer still names the version this one
        replaces."""
        checked = replaces is not ANY_VERSION
        moved, current = self._call("publish: move pointer", lambda: self._redis.eval(
            _SWAP, 3, self.keys.current, self.keys.published, self.keys.version(version),
            version, time.time(),
            self.keys.channel, "1" if checked else "0", (replaces or "") if checked else ""))
        if not moved:
            current = current.decode("utf-8", "replace") if isinstance(current, bytes) else current
            raise StoreConflict(conflict_message(replaces, current or None))

    def current_version(self) -> str | None:
        name = self._call("current_version", lambda: self._redis.get(self.keys.current))
        return name.decode("utf-8") if name else None

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
