"""Review of the agent path on a cache miss: failing tests for suspected bugs."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.clock import ManualClock
from gateway.hedge import HedgedChat
from tests.test_hedge import MESSAGES, LegWhoseCloseWaits, collect, llm_tasks, until


async def test_a_leg_failed_for_no_first_token_is_not_cut_short_in_its_close_at_the_win():
    """The primary gets no first token within first_token_timeout_s: ``_fail`` cancels it
    and its HTTP close starts. The secondary (the failover) then answers, and at the win
    ``_cancel`` cancels every non-winner again, the failed primary included, whose close
    is still under way: the close is cut short (the SDK's response never released)."""
    clock = ManualClock()
    ends = asyncio.Event()
    primary = LegWhoseCloseWaits("primary")  # no token, ever; its close waits for release
    secondary = LegWhoseCloseWaits("secondary", first="Backup answer.", ends=ends)
    secondary.release.set()
    hedged = HedgedChat(primary, secondary, hedge_delay_s=600.0,  # type: ignore[arg-type]
                        first_token_timeout_s=4.0, clock=clock)
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(4.0)  # the primary's first-token timeout: it fails, its close starts
    assert await until(lambda: primary.closing == 1)
    ends.set()
    assert await until(answer.done) and answer.result() == "Backup answer."
    assert primary.cut == 0, "the failed primary's close under way was cancelled again (cut short)"
    primary.release.set()
    await hedged.aclose()
    assert primary.closed == 1


async def test_a_leg_failed_for_no_first_token_is_not_cut_short_when_every_leg_fails():
    """As above, but the secondary fails too: the stream's end (``_stop``) cancels the
    primary again while its close is under way."""
    clock = ManualClock()
    primary = LegWhoseCloseWaits("primary")
    secondary = LegWhoseCloseWaits("secondary", ends=asyncio.Event())
    secondary.ends.set()  # an empty reply at once
    secondary.release.set()
    hedged = HedgedChat(primary, secondary, hedge_delay_s=600.0,  # type: ignore[arg-type]
                        first_token_timeout_s=4.0, clock=clock)
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(4.0)
    assert await until(answer.done)
    assert primary.closing == 1
    assert primary.cut == 0, "the failed primary's close under way was cancelled again (cut short)"
    primary.release.set()
    await hedged.aclose()
    assert primary.closed == 1
