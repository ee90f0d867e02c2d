"""Review of the shared-Redis path: failing tests for bugs found (review-redis)."""

from __future__ import annotations

from typing import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from gateway.redis_link import RedisHealth, open_async_client
from gateway.shared_stats import SharedStats
from tests.test_redis import REDIS_URL, hit, own_prefix


@pytest.fixture
def prefix() -> Iterator[str]:
    yield from own_prefix("review")


async def test_the_goodbye_flush_after_a_failed_flush_writes_what_was_counted_since(
        prefix: str) -> None:
    """A flush fails (Redis unreachable for a moment): its batch is kept in flight. More
    turns are counted. The replica shuts down once Redis answers again: leave() flushes,
    but flush() sends only the batch in flight and returns, so every increment counted
    since the failure is lost (docs: "buffered ... written when Redis returns")."""
    raw = redis.Redis.from_url(REDIS_URL)
    stats = SharedStats(open_async_client(REDIS_URL), prefix=prefix, health=RedisHealth(),
                        replica_id="r")
    real_eval = stats._redis.eval
    failures = 1

    async def eval_failing_once(*args, **kwargs):
        nonlocal failures
        if failures:
            failures -= 1
            raise redis.ConnectionError("Redis went away for a moment")
        return await real_eval(*args, **kwargs)

    stats._redis.eval = eval_failing_once  # type: ignore[method-assign]
    try:
        stats.turn_finished(hit("opening_hours"))
        with pytest.raises(redis.ConnectionError):
            await stats.flush()  # the batch (turn 1) is kept in flight
        stats.turn_finished(hit("opening_hours"))  # turn 2, pending
        await stats.leave()  # Redis answers again: the replica's goodbye
        turns = int(raw.hget(prefix + "stats:totals", "turns") or 0)
    finally:
        raw.close()
        await stats.aclose()
    assert turns == 2, (f"two turns counted before the goodbye, Redis holds {turns}; "
                        f"still pending in the departed replica: {stats.pending}")
