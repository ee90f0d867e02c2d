"""The hedged pair against the real openai SDK and a local fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from typing import AsyncIterator

import pytest
from prometheus_client import generate_latest

from gateway.agent import Agent, build_llm
from gateway.audio_bank import AudioBank
from gateway.clock import ManualClock
from gateway.hedge import CLOSE_TIMEOUT_S, AdaptiveDelay, HedgedChat
from gateway.providers.base import LLMChunk, ProviderError
from gateway.settings import Settings
from gateway.responder import Responder, Turn
from gateway.timeline import TurnTimeline
from tests.call_harness import RATE, CallHarness, WordTTS
from gateway.providers.groq_llm import GroqChat
from gateway.providers.openai_llm import OpenAIChat
from tests.fakes.openai_server import STALL, FakeOpenAI, Reply

MESSAGES = [{"role": "user", "content": "What are your opening hours?"}]


def pair(server, primary: str, secondary: str, clock: ManualClock | None = None,
         **kwargs) -> HedgedChat:
    """On a manual clock: no hedge delay or timeout passes unless the test advances it, so
    nothing here depends on how fast a loaded machine runs."""
    url = server.url + "/v1"
    return HedgedChat(OpenAIChat(primary, base_url=url, name=primary),
                      OpenAIChat(secondary, base_url=url, name=secondary),
                      clock=clock or ManualClock(), **kwargs)


async def collect(model) -> str:
    return "".join([chunk.text async for chunk in model.stream(MESSAGES)])


@pytest.mark.parametrize("faster", ["secondary", "primary"])
async def test_the_faster_stream_wins_and_the_loser_is_closed(llm_server, faster):
    fake, server = llm_server
    fake.replies["slow"] = Reply(text="From the slow one.", ttft_s=STALL)
    fake.replies["fast"] = Reply(text="From the fast one.", after_request_of="slow")
    legs = ("slow", "fast") if faster == "secondary" else ("fast", "slow")
    hedged = pair(server, *legs, hedge_delay_s=0.0)

    assert await collect(hedged) == "From the fast one."
    wins = {"primary": hedged.stats.primary_wins, "secondary": hedged.stats.secondary_wins}
    assert wins == {"primary": 0, "secondary": 0, faster: 1}
    assert hedged.stats.extra_requests == 1
    # The loser's HTTP stream was closed: the upstream saw the client go away.
    assert await fake.await_for(lambda s: s.disconnects["slow"] == 1)
    assert await fake.await_for(lambda s: s.completed["fast"] == 1)


async def test_secondary_not_started_when_primary_answers_before_the_delay(llm_server):
    fake, server = llm_server
    hedged = pair(server, "a", "b", hedge_delay_s=30.0)
    await collect(hedged)
    assert hedged.stats.extra_requests == 0 and fake.stats.requests["b"] == 0


# A 429 (a rate limit) is asked again first: test_a_429_on_both_legs_is_retried_after_its_wait.
@pytest.mark.parametrize("failure", [Reply(status=503), Reply(status=400),
                                     Reply(malformed_at=1), Reply(ttft_s=STALL)],
                         ids=["5xx", "4xx", "malformed", "stall"])
async def test_failure_before_first_token_hands_over_at_once(llm_server, failure):
    fake, server = llm_server
    fake.replies["bad"] = failure
    fake.replies["good"] = Reply(text="Backup answer.")
    # A hedge delay the clock never reaches: only the failover can start the secondary.
    # A stall fails exactly when the clock passes the first-token timeout (it used to take
    # 3 s of real time); the other failures hand over with the clock standing still.
    clock = ManualClock()
    hedged = pair(server, "bad", "good", clock, hedge_delay_s=600.0, first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    if failure.ttft_s == STALL:
        assert await fake.await_for(lambda s: s.requests["bad"] == 1)
        await clock.advance(3.99)
        assert not answer.done() and fake.stats.requests["good"] == 0
        await clock.advance(0.01)
    assert await asyncio.wait_for(answer, 20) == "Backup answer."
    assert hedged.stats.failovers == 1 and hedged.stats.secondary_wins == 1
    if failure.ttft_s == STALL:
        assert await fake.await_for(lambda s: s.disconnects["bad"] == 1)


async def test_every_leg_failing_raises_provider_error(llm_server):
    fake, server = llm_server
    fake.replies["x"] = Reply(status=500)
    fake.replies["y"] = Reply(status=502)
    hedged = pair(server, "x", "y", hedge_delay_s=600.0)
    with pytest.raises(ProviderError, match="every LLM failed"):
        await collect(hedged)
    assert hedged.stats.all_failed == 1


@pytest.mark.parametrize("other", [Reply(text=""), Reply(status=503), None],
                         ids=["both-empty", "empty-and-down", "one-model"])
async def test_an_empty_reply_ends_the_stream_empty_not_as_an_outage(llm_server, other):
    """A model that answers with nothing (no word, no tool call: common right after a
    tool result) is no LLM outage: the hedge raised "every LLM failed", and the caller was
    handed off with llm_failed. The other leg is still asked (it may answer); when none
    does, the stream ends with no chunk and counts an empty reply, not all_failed."""
    fake, server = llm_server
    fake.replies["empty"] = Reply(text="")
    url = server.url + "/v1"
    if other is None:
        hedged = HedgedChat(OpenAIChat("empty", base_url=url, name="empty"), None,
                            clock=ManualClock())
    else:
        fake.replies["other"] = other
        hedged = pair(server, "empty", "other", hedge_delay_s=600.0)
    assert await asyncio.wait_for(collect(hedged), 20) == ""
    assert hedged.stats.empty_replies == 1 and hedged.stats.all_failed == 0
    if other is not None:
        assert hedged.stats.failovers == 1 and fake.stats.requests["other"] == 1

    fake.replies["other"] = Reply(text="Backup answer.")  # the other leg answers: its answer
    hedged = pair(server, "empty", "other", hedge_delay_s=600.0)
    assert await asyncio.wait_for(collect(hedged), 20) == "Backup answer."
    assert hedged.stats.empty_replies == 0 and hedged.stats.secondary_wins == 1


async def test_failure_after_the_first_token_is_raised_not_retried(llm_server):
    fake, server = llm_server
    fake.replies["p"] = Reply(text="One two three four.", malformed_at=3)
    hedged = pair(server, "p", "s", hedge_delay_s=600.0)
    with pytest.raises(ProviderError, match="malformed"):
        await collect(hedged)
    assert fake.stats.requests["s"] == 0


async def test_cancelling_the_consumer_closes_both_streams(llm_server):
    fake, server = llm_server
    fake.replies["p"] = Reply(ttft_s=STALL)
    fake.replies["s"] = Reply(ttft_s=STALL)
    hedged = pair(server, "p", "s", hedge_delay_s=0.0, first_token_timeout_s=600.0)
    task = asyncio.create_task(collect(hedged))
    assert await fake.await_for(lambda s: s.requests["p"] == 1 and s.requests["s"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.await_for(lambda s: s.disconnects["p"] == 1 and s.disconnects["s"] == 1)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]


async def test_tool_call_is_assembled_from_fragments(llm_server):
    fake, server = llm_server
    fake.replies["t"] = Reply(text="", tool_calls=[("get_order", '{"order_id": "A-17"}'),
                                                    ("get_balance", '{"account": "9"}')])
    model = OpenAIChat("t", base_url=server.url + "/v1")
    calls = [c.tool_call async for c in model.stream(MESSAGES) if c.tool_call]
    assert [(c.name, c.arguments) for c in calls] == [("get_order", '{"order_id": "A-17"}'),
                                                      ("get_balance", '{"account": "9"}')]
    await model.aclose()


async def test_tool_calls_without_an_index_keep_their_streamed_arguments(llm_server):
    """Some OpenAI-compatible servers omit each fragment's "index". The assembler took the
    position in the delta (0) for a fragment without an id, and len(open calls) for one with
    an id: from the second call on, its argument fragments went to a nameless call that was
    dropped (get_balance ran with '{"acc'), and a third call's id reused the second's index,
    so the two were merged into one call with both arguments."""
    fake, server = llm_server
    calls = [("get_order", '{"order_id": "A-17"}'), ("get_balance", '{"account": "9"}'),
             ("get_eta", '{"zip": "10001"}')]
    fake.replies["t"] = Reply(text="", tool_calls=calls, omit_tool_index=True)
    model = OpenAIChat("t", base_url=server.url + "/v1")
    got = [c.tool_call async for c in model.stream(MESSAGES) if c.tool_call]
    assert [(c.name, c.arguments) for c in got] == calls
    assert len({c.id for c in got}) == 3
    await model.aclose()


async def test_groq_adapter_streams_through_its_own_path(llm_server):
    fake, server = llm_server
    fake.replies["llama"] = Reply(text="Groq says hi.")
    model = GroqChat("llama", api_key="test-key", base_url=server.url)
    assert "".join([c.text async for c in model.stream(MESSAGES)]) == "Groq says hi."
    fake.replies["llama"] = Reply(status=401)
    with pytest.raises(ProviderError, match="HTTP 401"):
        [c async for c in model.stream(MESSAGES)]
    await model.aclose()


async def test_an_api_key_a_server_echoes_is_not_in_the_error(llm_server):
    # OpenAI masks the key in its 401 text; a compatible server (a proxy, a self-hosted
    # model) may echo it whole, and the error goes to logs and to the caller's events.
    fake, server = llm_server
    key = "sk-test-0123456789abcdef"
    fake.replies["t"] = Reply(status=401, error_message=f"Incorrect API key provided: {key}")
    model = OpenAIChat("t", base_url=server.url + "/v1", api_key=key)
    with pytest.raises(ProviderError) as failed:
        [c async for c in model.stream(MESSAGES)]
    await model.aclose()
    assert "HTTP 401" in str(failed.value) and "Incorrect API key" in str(failed.value)
    assert key not in str(failed.value), str(failed.value)


@pytest.mark.parametrize("chat", [OpenAIChat, GroqChat])
async def test_a_password_in_the_llm_url_is_not_in_the_error(chat):
    """A URL's password is a secret (settings mask it in every dump): an LLM that cannot be
    reached is named by its URL without it, in the error that goes to logs and, as the
    handoff's reason, to the caller's events."""
    with socket.socket() as closed:  # bound, never listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        model = chat("t", base_url=f"http://proxy-user:s3cret-pass@127.0.0.1:{port}/v1",
                     api_key="sk-test-0123456789abcdef")
        with pytest.raises(ProviderError) as failed:
            [c async for c in model.stream(MESSAGES)]
        await model.aclose()
    assert f"cannot reach http://***@127.0.0.1:{port}/" in str(failed.value), str(failed.value)
    assert "s3cret-pass" not in str(failed.value), str(failed.value)


def test_adaptive_delay_tracks_a_high_percentile_with_a_floor():
    delay = AdaptiveDelay(percentile=0.9, floor_s=0.05, ceiling_s=2.0, initial_s=0.4, min_samples=10)
    assert delay.delay_s() == 0.4  # too few samples: the initial value
    for n in range(100):
        delay.observe(0.1 + n / 1000)  # 0.100 .. 0.199
    assert 0.185 <= delay.delay_s() <= 0.195
    for _ in range(200):
        delay.observe(0.001)
    assert delay.delay_s() == 0.05  # the floor
    for _ in range(200):
        delay.observe(30.0)
    assert delay.delay_s() == 2.0  # the ceiling


def test_a_primary_that_keeps_losing_gets_its_secondary_at_the_floor_until_it_wins():
    """Review (stop 67): a primary that loses race after race (hung, or far slower than it
    was) fed the percentile samples of the delay plus the secondary's time, so the delay
    climbed towards the ceiling and every miss waited up to 2 s before the leg that
    answers was asked. After ``degraded_after`` losses in a row the delay is the floor;
    the primary's next win ends it."""
    delay = AdaptiveDelay(percentile=0.9, floor_s=0.05, ceiling_s=2.0, initial_s=0.4,
                          min_samples=10, degraded_after=3)
    for _ in range(40):
        delay.observe(0.3)
    delay.observe_lost(0.9)  # a loss now and then is no degradation
    delay.observe(0.3)
    delay.observe_lost(0.9)
    delay.observe_lost(0.9)
    assert delay.delay_s() == 0.3 and not delay.degraded
    delay.observe_lost(0.9)  # the third in a row
    assert delay.degraded and delay.delay_s() == 0.05
    delay.observe(0.3)
    assert not delay.degraded and delay.delay_s() == 0.3  # the percentile again


# A barge-in cancels the reply as the LLM's next token arrives: on Python 3.11
# asyncio.wait_for swallowed such a cancel, so the hedged stream went on with nobody
# reading it, the reply's producer blocked on its full queue and the reply (and every
# later turn of the call, queued behind it) never ended. Counted in loop iterations.


class GatedLeg:
    """One LLM leg: a first token at once, then the rest once ``gate`` opens."""

    name = "gated"

    def __init__(self, rest: list[str]) -> None:
        self.gate = asyncio.Event()
        self.rest = rest
        self.opened = self.closed = 0

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        self.opened += 1
        try:
            yield LLMChunk(text="First sentence here. ")
            await self.gate.wait()
            for word in self.rest:
                await asyncio.sleep(0)
                yield LLMChunk(text=word + " ")
        finally:
            self.closed += 1


async def spin(iterations: int) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)


async def until(predicate, iterations: int = 2000) -> bool:
    for _ in range(iterations):
        if predicate():
            return True
        await asyncio.sleep(0)
    return predicate()


async def test_a_cancel_as_a_token_arrives_stops_the_hedged_stream():
    swallowed: list[int] = []
    for n in range(30):  # the cancel lands n loop iterations after the token is released
        leg = GatedLeg(["Second."])
        hedged = HedgedChat(leg, None, hedge_delay_s=0.0,  # type: ignore[arg-type]
                            clock=ManualClock())
        got: list[str] = []

        async def consume() -> None:
            async with contextlib.aclosing(hedged.stream(MESSAGES)) as chunks:
                async for chunk in chunks:
                    got.append(chunk.text)

        task = asyncio.create_task(consume())
        assert await until(lambda: bool(got))
        leg.gate.set()
        await spin(n)
        if task.done():
            break  # the whole stream fitted in n iterations: nothing left to cancel
        task.cancel()
        [result] = await asyncio.gather(task, return_exceptions=True)
        if not isinstance(result, asyncio.CancelledError):
            swallowed.append(n)
        assert leg.closed == leg.opened
    assert not swallowed, f"the cancel was swallowed at iterations {swallowed}"


async def test_a_barge_in_as_a_token_arrives_ends_the_reply_and_closes_the_llm_stream():
    words = " ".join(f"This is sentence number {k} of the answer." for k in range(10)).split()
    for n in range(40):
        leg = GatedLeg(words)
        clock = ManualClock()
        agent = Agent(HedgedChat(leg, None, hedge_delay_s=0.0, clock=clock),  # type: ignore[arg-type]
                      filler_after_s=None)
        responder = Responder(agent, WordTTS(), AudioBank(rates=(RATE,), encoded=()))  # type: ignore[arg-type]
        turn = Turn(number=1, text="where is my order", sample_rate=RATE,
                    timeline=TurnTimeline(1, clock=clock),
                    conversation=agent.new_conversation())
        playing = asyncio.Event()

        async def play() -> None:  # ReplyStage's loop, reduced: it stays on the first piece
            async with contextlib.aclosing(responder.respond(turn)) as segments:
                async for _segment in segments:
                    playing.set()
                    await asyncio.Event().wait()  # the first sentence playing out

        reply = asyncio.create_task(play())
        assert await until(playing.is_set)
        leg.gate.set()
        await spin(n)
        reply.cancel()  # the barge-in
        ended = await until(reply.done)
        if not ended:
            reply.cancel()  # unstick it so the test can end
        await asyncio.gather(reply, return_exceptions=True)
        assert ended, f"a barge-in {n} iterations after the token: the reply never ended"
        assert leg.closed == leg.opened


# The hedge on the call's clock: its delay and timeouts pass when the clock does, with no
# real time elapsing (they used time.monotonic and the loop's timers).


class ScriptedLeg:
    """A leg that answers ``text`` at once (one chunk per word), or never (``None``),
    or says its first word and then stalls (``stall_after_first``)."""

    def __init__(self, name: str, text: str | None, stall_after_first: bool = False,
                 close_s: float = 0.0) -> None:
        self.name = name
        self.text = text
        self.stall_after_first = stall_after_first
        self.close_s = close_s  # closing its stream takes this long (an HTTP teardown)
        self.opened: list[float] = []  # clock time of each request
        self.closed = 0
        self.clock: ManualClock | None = None

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        assert self.clock is not None
        self.opened.append(self.clock.now())
        try:
            if self.text is None:
                await asyncio.Event().wait()  # no first token, ever
            for n, word in enumerate((self.text or "").split()):
                if n == 1 and self.stall_after_first:
                    await asyncio.Event().wait()
                yield LLMChunk(text=(" " if n else "") + word)
        finally:
            if self.close_s:
                await self.clock.sleep(self.close_s)
            self.closed += 1


def scripted_pair(primary: ScriptedLeg, secondary: ScriptedLeg | None,
                  **kwargs) -> tuple[HedgedChat, ManualClock]:
    clock = ManualClock()
    for leg in (primary, secondary):
        if leg is not None:
            leg.clock = clock
    return HedgedChat(primary, secondary, clock=clock, **kwargs), clock  # type: ignore[arg-type]


class SlowLeg(ScriptedLeg):
    """A ScriptedLeg whose first word comes ``first_s`` of the clock after its request."""

    def __init__(self, name: str, text: str, first_s: float) -> None:
        super().__init__(name, text)
        self.first_s = first_s

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        assert self.clock is not None
        self.opened.append(self.clock.now())
        try:
            await self.clock.sleep(self.first_s)
            yield LLMChunk(text=self.text or "")
        finally:
            self.closed += 1


async def test_a_hung_primary_does_not_push_the_secondary_later_turn_after_turn():
    """Review (stop 67): with the primary hung, each turn's secondary started at the
    delay, and the primary's censored time (delay + the secondary's 0.5 s) raised the
    delay: 0.4, 0.9, 1.4 ... up to 2 s of silence before the answering leg was asked.
    From the third loss in a row it is asked at the floor."""
    primary = ScriptedLeg("primary", None)  # never a first token
    secondary = SlowLeg("secondary", "Hi.", first_s=0.5)
    hedged, clock = scripted_pair(primary, secondary, first_token_timeout_s=4.0,
                                  adaptive=AdaptiveDelay(initial_s=0.4, floor_s=0.06,
                                                         min_samples=2, degraded_after=3))
    waits = []
    for _ in range(8):
        start = clock.now()
        answer = asyncio.ensure_future(collect(hedged))
        while not answer.done():
            await clock.advance(0.01)
        assert answer.result() == "Hi."
        waits.append(round(secondary.opened[-1] - start, 2))
    assert waits[:3] == [0.4, 0.4, 0.9]  # the percentile of the first censored times
    assert waits[3:] == [0.06] * 5
    assert hedged.stats.secondary_wins == 8


async def test_a_primary_back_to_health_wins_again_after_a_degraded_spell():
    """Review (stop 67): a degraded primary (3 losses in a row) whose secondary starts at
    the floor could win again only by beating the floor plus the secondary's own time: one
    healthy but slower than that (here 0.6 s against 0.06 + 0.2 s) never did, and every
    turn went to the secondary, two requests each, for good. Every 10th race while
    degraded is a probe at the percentile, which losses at the floor do not drag down."""
    primary = SlowLeg("primary", "From the primary.", first_s=30.0)  # hung: no first token
    secondary = SlowLeg("secondary", "From the secondary.", first_s=0.2)
    hedged, clock = scripted_pair(primary, secondary, first_token_timeout_s=4.0,
                                  adaptive=AdaptiveDelay(initial_s=0.4, floor_s=0.06,
                                                         min_samples=2, degraded_after=3,
                                                         window=20))

    async def race() -> str:
        answer = asyncio.ensure_future(collect(hedged))
        while not answer.done():
            await clock.advance(0.01)
        return answer.result()

    answers = [await race() for _ in range(60)]  # a spell longer than the window
    assert set(answers) == {"From the secondary."} and hedged.adaptive.degraded
    primary.first_s = 0.6  # back, slower than the secondary as it always was
    answers = [await race() for _ in range(12)]
    assert "From the primary." in answers, "the primary never won again: degraded for good"
    assert not hedged.adaptive.degraded and answers[-1] == "From the primary."


async def test_the_secondary_starts_exactly_when_the_clock_passes_the_hedge_delay():
    primary = ScriptedLeg("primary", None)
    secondary = ScriptedLeg("secondary", "From the secondary.")
    hedged, clock = scripted_pair(primary, secondary, hedge_delay_s=0.5)
    start = clock.now()
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(0.49)
    assert primary.opened == [start] and secondary.opened == []
    await clock.advance(0.01)
    assert secondary.opened == [start + 0.5]  # no real time elapsed: the clock alone
    assert await asyncio.wait_for(answer, 5) == "From the secondary."
    assert hedged.stats.secondary_wins == 1 and hedged.stats.extra_requests == 1
    assert primary.closed == 1 and hedged.stats.ttft_s[-1] == 0.5
    assert hedged.adaptive._samples[-1] == 0.5  # the primary, censored at the win


async def test_the_winners_first_token_does_not_wait_for_the_loser_to_close():
    """The loser was cancelled and awaited before the winner's first token was yielded: a
    loser whose HTTP stream takes 2 s to tear down held the answer back 2 s, a hedge
    waiting for the slow one. Its close now runs while the winner streams (and after the
    stream's end: test_the_streams_end_does_not_wait_for_the_losers_teardown)."""
    primary = ScriptedLeg("primary", None, close_s=2.0)
    secondary = ScriptedLeg("secondary", "From the secondary.")
    hedged, clock = scripted_pair(primary, secondary, hedge_delay_s=0.5)
    got: list[tuple[float, str]] = []

    async def consume() -> None:
        async with contextlib.aclosing(hedged.stream(MESSAGES)) as chunks:
            async for chunk in chunks:
                got.append((clock.now(), chunk.text))

    task = asyncio.ensure_future(consume())
    await clock.advance(0.5)
    assert got == [(1000.5, "From"), (1000.5, " the"), (1000.5, " secondary.")], got
    assert primary.closed == 0  # its teardown is under way
    closing = asyncio.ensure_future(hedged.aclose())  # a shutdown waits for it
    await clock.advance(1.99)
    assert not closing.done()
    await clock.advance(0.01)
    assert await until(closing.done) and closing.exception() is None
    assert task.done() and task.exception() is None
    assert primary.closed == 1 and secondary.closed == 1 and clock.sleeping == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]


class SilentLegWhoseCloseFails:
    """A leg whose stream (an SDK's, not a generator) never answers, and whose close takes
    ``close_s`` and then raises (a connection reset as the HTTP response closes)."""

    name = "silent"

    def __init__(self, close_s: float) -> None:
        self.close_s = close_s
        self.closed = 0
        self.clock: ManualClock | None = None

    def stream(self, messages, tools=None) -> "SilentLegWhoseCloseFails":
        return self

    def __aiter__(self) -> "SilentLegWhoseCloseFails":
        return self

    async def __anext__(self) -> LLMChunk:
        await asyncio.Event().wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        assert self.clock is not None
        await self.clock.sleep(self.close_s)
        self.closed += 1
        raise ConnectionResetError("reset while closing")


async def test_the_streams_end_does_not_wait_for_the_losers_teardown():
    """The winner had ended and the stream's end still waited for the loser's teardown (a
    2 s HTTP close here): the agent's round, so the reply, ended 2 s late. The stream now
    ends with the winner; the teardown goes on (HedgedChat.aclose waits for it: the test
    above), and its failure is retrieved (no "Task exception was never retrieved")."""
    primary = SilentLegWhoseCloseFails(close_s=2.0)
    secondary = ScriptedLeg("secondary", "From the secondary.")
    hedged, clock = scripted_pair(primary, secondary, hedge_delay_s=0.5)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        answer = asyncio.ensure_future(collect(hedged))
        await clock.advance(0.5)
        assert await until(answer.done) and answer.result() == "From the secondary."
        assert primary.closed == 0 and secondary.closed == 1  # the loser still closing
        await clock.advance(2.0)  # its close ends, raising, with nobody waiting for it
        assert await until(lambda: primary.closed == 1) and clock.sleeping == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]
        del answer
        gc.collect()
        assert unhandled == [], unhandled
        await hedged.aclose()  # nothing left to wait for
    finally:
        loop.set_exception_handler(handler)


async def test_closing_does_not_wait_for_ever_for_a_losers_hanging_teardown(caplog,
                                                                              monkeypatch):
    """aclose waited for the losers' teardowns with no bound: a provider whose stream
    close never ends (a half-open socket) hung the gateway's shutdown with it. It waits
    CLOSE_TIMEOUT_S of the clock, then logs the leg it left and cancels it once more."""
    # Seen by caplog even after a test ran the CLI (its logging stops propagation).
    monkeypatch.setattr(logging.getLogger("voicegate"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="voicegate.hedge")
    primary = ScriptedLeg("stuck", None, close_s=3600.0)  # its close hangs
    secondary = ScriptedLeg("secondary", "From the secondary.")
    hedged, clock = scripted_pair(primary, secondary, hedge_delay_s=0.5)
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(0.5)
    assert await until(answer.done) and answer.result() == "From the secondary."
    closing = asyncio.ensure_future(hedged.aclose())
    await clock.advance(CLOSE_TIMEOUT_S - 0.01)
    assert not closing.done()
    await clock.advance(0.01)
    assert await until(closing.done) and closing.exception() is None
    timed_out = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                 if r.getMessage() == "llm_close_timed_out"]
    assert [(f["legs"], f["waited_s"]) for f in timed_out] == [("primary stuck", CLOSE_TIMEOUT_S)]
    # Cancelled once more, the close ended there (a close awaiting I/O does): no task left.
    assert await until(lambda: not [t for t in asyncio.all_tasks()
                                    if t.get_name().startswith("llm-")])
    assert primary.closed == 0 and clock.sleeping == 0
    await hedged.aclose()  # nothing left to wait for


class LegWhoseCloseWaits:
    """A leg whose stream (an SDK's) says ``first`` (if any) and then nothing, ever, and
    whose close (an HTTP teardown) goes on until the test sets ``release``; a cancel
    landing in it cuts it short (``cut``), as it would the SDK's response close."""

    def __init__(self, name: str, first: str | None = None,
                 ends: asyncio.Event | None = None) -> None:
        self.name = name
        self.first = first
        self.ends = ends  # set: the stream ends (after ``first``)
        self.release = asyncio.Event()
        self.closing = self.closed = self.cut = 0

    def stream(self, messages, tools=None) -> "LegWhoseCloseWaits":
        return self

    def __aiter__(self) -> "LegWhoseCloseWaits":
        return self

    async def __anext__(self) -> LLMChunk:
        if self.first is not None:
            first, self.first = self.first, None
            return LLMChunk(text=first)
        await (self.ends or asyncio.Event()).wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closing += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cut += 1
            raise
        self.closed += 1


def llm_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]


@pytest.mark.parametrize("won", [False, True], ids=["before-a-win", "after-a-win"])
async def test_a_second_cancel_as_the_legs_close_leaves_their_closes_to_aclose(won):
    """A barge-in cancels the reply, so the hedged stream, whose end cancels its legs and
    waits for their HTTP closes; the call's teardown cancels it again meanwhile. That
    second cancel went through the wait (a gather) to the legs and cut their closes short:
    the SDK's response close interrupted, the connection never given back, nothing left
    for HedgedChat.aclose to wait for. The stream's end now gives up its wait, as a cancel
    asks, but not the closes: they go on and aclose waits for them, as for a loser's."""
    primary = LegWhoseCloseWaits("primary", first="Hello." if won else None)
    secondary = LegWhoseCloseWaits("secondary")
    hedged = HedgedChat(primary, secondary, hedge_delay_s=0.0,  # type: ignore[arg-type]
                        clock=ManualClock())
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    got: list[str] = []

    async def consume() -> None:
        async for chunk in hedged.stream(MESSAGES):
            got.append(chunk.text)

    try:
        reply = asyncio.create_task(consume())
        assert await until(lambda: len(llm_tasks()) == 2)
        if won:
            assert await until(lambda: got == ["Hello."] and secondary.closing == 1)
        await spin(10)  # every leg waits for its next token
        reply.cancel()  # the barge-in: the legs close (the loser already did, after a win)
        assert await until(lambda: primary.closing == 1 and secondary.closing == 1)
        await spin(10)
        assert not reply.done()  # the stream's end waits for the closes
        reply.cancel()  # the call's teardown
        assert await until(reply.done) and reply.cancelled()  # a cancel stays a cancel
        assert primary.cut == 0 and secondary.cut == 0  # the closes go on
        assert len(llm_tasks()) == 2 and not [t for t in llm_tasks() if t.done()]
        closing = asyncio.ensure_future(hedged.aclose())  # the call's end waits for them
        await spin(20)
        assert not closing.done()
        primary.release.set()
        secondary.release.set()
        assert await until(closing.done) and closing.exception() is None
        assert (primary.closed, secondary.closed) == (1, 1) and not llm_tasks()
        assert not hedged._closing
        del reply, closing
        gc.collect()
        assert unhandled == [], unhandled
    finally:
        loop.set_exception_handler(handler)


async def test_a_losers_close_under_way_as_the_stream_ends_is_not_cut_short():
    """A loser is cancelled at the win and closes its HTTP stream while the winner speaks.
    When the winner ended before that close did, the stream's end cancelled the loser once
    more (handing it to aclose), which cut the close under way short: only a loser that
    had not run since the win (the winner's whole answer already queued) escaped."""
    ends = asyncio.Event()
    primary = LegWhoseCloseWaits("primary", first="Hello.", ends=ends)
    secondary = LegWhoseCloseWaits("secondary")
    primary.release.set()  # the winner's own close is quick
    hedged = HedgedChat(primary, secondary, hedge_delay_s=0.0,  # type: ignore[arg-type]
                        clock=ManualClock())
    answer = asyncio.ensure_future(collect(hedged))
    assert await until(lambda: secondary.closing == 1)  # the loser's close under way
    ends.set()  # then the winner ends
    assert await until(answer.done) and answer.result() == "Hello."
    assert primary.closed == 1 and secondary.cut == 0 and secondary.closed == 0
    closing = asyncio.ensure_future(hedged.aclose())
    await spin(20)
    assert not closing.done()
    secondary.release.set()
    assert await until(closing.done) and closing.exception() is None
    assert secondary.closed == 1 and not llm_tasks() and not hedged._closing


@pytest.mark.parametrize(("adaptive", "asked_at"), [
    ({"initial_s": 0.4, "min_samples": 20}, 0.4),
    # Review (stop 69): at the max (llm_hedge_max_delay_ms), not the initial delay past it.
    ({"ceiling_s": 0.2, "initial_s": 0.4}, 0.2),
], ids=["initial", "initial-past-the-max"])
async def test_an_adaptive_delay_is_timed_on_the_clock_too(adaptive, asked_at):
    primary = ScriptedLeg("primary", None)
    secondary = ScriptedLeg("secondary", "Hi.")
    hedged, clock = scripted_pair(primary, secondary, adaptive=AdaptiveDelay(**adaptive))
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(asked_at - 0.01)
    assert secondary.opened == []
    await clock.advance(0.01)
    assert len(secondary.opened) == 1
    assert await asyncio.wait_for(answer, 5) == "Hi."


async def test_the_initial_delay_keeps_within_the_min_and_max_delays():
    """Review (stop 69): the adaptive delay is clamped to llm_hedge_min_delay_ms and
    llm_hedge_max_delay_ms, but its initial value (llm_hedge_initial_delay_ms, 400, until
    20 races were seen) was not: an operator who set the max to 200 ms, so that no caller
    waits longer for the secondary, had every race of a fresh replica wait 400 ms before
    it was asked; a min above 400 was not kept either. On the clock:
    test_an_adaptive_delay_is_timed_on_the_clock_too[initial-past-the-max]."""
    assert AdaptiveDelay(floor_s=0.06, ceiling_s=0.2, initial_s=0.4).delay_s() == 0.2
    assert AdaptiveDelay(floor_s=0.5, ceiling_s=2.0, initial_s=0.4).delay_s() == 0.5
    llm = build_llm(Settings(llm_primary_model="a", llm_primary_url="http://127.0.0.1:9/v1",
                             llm_secondary_model="b", llm_secondary_url="http://127.0.0.1:9/v1",
                             llm_hedge_max_delay_ms=200))
    try:
        assert isinstance(llm, HedgedChat) and llm.hedge_delay_s() == 0.2
    finally:
        await Agent(llm).aclose()


async def test_a_leg_with_no_first_token_fails_when_the_clock_passes_the_timeout():
    primary = ScriptedLeg("primary", None)
    secondary = ScriptedLeg("secondary", None)
    hedged, clock = scripted_pair(primary, secondary, hedge_delay_s=1.0,
                                  first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(3.99)
    assert not answer.done() and hedged.stats.leg_failures == 0
    await clock.advance(0.01)  # the primary's 4 s: the secondary (started at 1 s) still runs
    assert not answer.done() and hedged.stats.leg_failures == 1 and primary.closed == 1
    await clock.advance(0.99)
    assert not answer.done()
    await clock.advance(0.01)
    with pytest.raises(ProviderError, match="every LLM failed.*no first token after 4 s"):
        await asyncio.wait_for(answer, 5)
    assert hedged.stats.all_failed == 1 and secondary.closed == 1


async def test_a_winner_that_stalls_fails_when_the_clock_passes_the_idle_timeout():
    primary = ScriptedLeg("primary", "One two three.", stall_after_first=True)
    hedged, clock = scripted_pair(primary, None, idle_timeout_s=10.0)
    got: list[str] = []

    async def consume() -> None:
        async for chunk in hedged.stream(MESSAGES):
            got.append(chunk.text)
            await clock.sleep(30.0)  # the consumer's own time is no stall

    task = asyncio.ensure_future(consume())
    await clock.advance(30.0 + 9.99)
    assert got == ["One"] and not task.done()
    await clock.advance(0.01)
    assert task.done()
    with pytest.raises(ProviderError, match="stream stalled for 10 s"):
        task.result()
    assert primary.closed == 1 and clock.sleeping == 0


class SeenLeg:
    """An OpenAI leg that notes each chunk it yields (the test knows it reached the race)."""

    def __init__(self, inner: OpenAIChat) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[LLMChunk] = []

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        async with contextlib.aclosing(self.inner.stream(messages, tools)) as chunks:
            async for chunk in chunks:
                self.seen.append(chunk)
                yield chunk


async def test_a_whitespace_only_chunk_is_no_first_token(llm_server):
    """A model that streams "\\n\\n" first (then thinks, or ends) won the race with it: the
    other leg was cancelled for a chunk with nothing to say. Ending there, the turn was an
    empty reply (a handoff) though the secondary had an answer; stalling there, the caller
    waited out the idle timeout (10 s) instead of the first-token timeout's failover."""
    fake, server = llm_server
    url = server.url + "/v1"
    fake.replies["blank"] = Reply(text="\n\n")  # whitespace, then the end
    fake.replies["good"] = Reply(text="Backup answer.")
    hedged = HedgedChat(OpenAIChat("blank", base_url=url, name="blank"),
                        OpenAIChat("good", base_url=url, name="good"),
                        clock=ManualClock(), hedge_delay_s=600.0)
    assert await asyncio.wait_for(collect(hedged), 20) == "Backup answer."
    assert hedged.stats.failovers == 1 and hedged.stats.leg_failures == 1

    fake.replies["thinking"] = Reply(text="\n\n", stall_after=2)  # whitespace, then nothing
    clock = ManualClock()
    primary = SeenLeg(OpenAIChat("thinking", base_url=url, name="thinking"))
    hedged = HedgedChat(primary, OpenAIChat("good", base_url=url, name="good"),  # type: ignore[arg-type]
                        clock=clock, hedge_delay_s=600.0, first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    for _ in range(2000):  # the whitespace has reached the race (a real socket: polled)
        if primary.seen:
            break
        await asyncio.sleep(0.01)
    assert [c.text for c in primary.seen] == ["\n\n"]
    await clock.advance(4.0)  # the first-token timeout: the secondary takes over
    assert await asyncio.wait_for(answer, 20) == "Backup answer."
    assert hedged.stats.failovers == 1 and hedged.stats.secondary_wins == 1
    assert await fake.await_for(lambda s: s.disconnects["thinking"] == 1)


@pytest.mark.parametrize("reply,heard", [
    (Reply(text="Your balance is two hundred dollars today.", cut_after=4), "Your balance is"),
    (Reply(text="", tool_calls=[("get_order", '{"order_id": "A-17"}')], cut_after=3), "")],
    ids=["text", "tool-call"])
async def test_a_stream_that_ends_without_a_finish_is_an_error(llm_server, reply, heard):
    """A response body that just ends (no finish_reason, no [DONE]: a proxy or a crashed
    worker cutting it short) was taken as the whole answer: the caller heard "Your balance
    is" as if complete, and a tool call cut mid-arguments was run with '{"order_'."""
    fake, server = llm_server
    fake.replies["cut"] = reply
    model = OpenAIChat("cut", base_url=server.url + "/v1", name="cut")
    got: list[LLMChunk] = []
    with pytest.raises(ProviderError, match="cut: the stream ended without a finish_reason"):
        async for chunk in model.stream(MESSAGES):
            got.append(chunk)
    await model.aclose()
    assert "".join(c.text for c in got) == heard
    assert not [c for c in got if c.tool_call is not None]  # a cut tool call never runs

    # In the hedge: cut after its first token (a word, or a tool call's first fragment),
    # the winner broke (raised, not an answer: the agent asks the round again once).
    hedged = pair(server, "cut", "spare", hedge_delay_s=600.0)
    with pytest.raises(ProviderError, match="without a finish_reason"):
        await collect(hedged)
    assert hedged.stats.primary_wins == 1

    # Cut before any (the role chunk alone): the leg failed and the other answers.
    fake.replies["cut"] = Reply(text="Never sent.", cut_after=1)
    hedged = pair(server, "cut", "spare", hedge_delay_s=600.0)
    assert await collect(hedged) == "Hello there. How can I help you today?"
    assert hedged.stats.failovers == 1


async def test_a_tool_call_still_streaming_its_arguments_is_no_stall(llm_server):
    """The model answers with a tool call whose arguments take a while to write (a ticket's
    summary, on a slow local model). The SDK adapter yielded nothing until the whole call
    was assembled, so the hedge saw no first token and failed a leg that was streaming:
    "no first token after 4 s" at the first-token timeout, and with one model configured
    the caller heard the filler, then the handoff (llm_failed). A tool call's first
    fragment is the leg's first token, as a first word is; the call itself comes whole."""
    fake, server = llm_server
    arguments = '{"summary": "The card was charged twice for the same coffee on Monday."}'
    # The role chunk, the call's id and name, the first half of its arguments: then held.
    fake.replies["slow"] = Reply(text="", tool_calls=[("create_ticket", arguments)], hold_after=3)
    clock = ManualClock()
    leg = SeenLeg(OpenAIChat("slow", base_url=server.url + "/v1", name="slow"))
    hedged = HedgedChat(leg, None, clock=clock, first_token_timeout_s=4.0,  # type: ignore[arg-type]
                        idle_timeout_s=10.0)

    async def read() -> list[LLMChunk]:
        return [chunk async for chunk in hedged.stream(MESSAGES)]

    answer = asyncio.ensure_future(read())
    try:
        for _ in range(2000):  # the call's first fragments have reached the race (polled)
            if leg.seen:
                break
            await asyncio.sleep(0.01)
        assert leg.seen and leg.seen[0].tool_call is None, (
            "the leg yielded nothing while its tool call streamed")
        await clock.advance(5.0)  # past the first-token timeout, still writing arguments
        assert not answer.done() and hedged.stats.leg_failures == 0
        fake.release.set()  # the rest of the arguments, and the finish
        chunks = await asyncio.wait_for(answer, 20)
    finally:
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        await leg.inner.aclose()
    assert [(c.tool_call.name, c.tool_call.arguments) for c in chunks if c.tool_call] == [
        ("create_ticket", arguments)]
    assert not any(c.text for c in chunks) and hedged.stats.primary_wins == 1


# ---------------------------------------------------------------- rate limits (429)

# What OpenAI answers an account over its rate limit (the error body of its 429s; Groq's
# is alike), and one whose quota is spent: a 429 too, that no wait clears.
RATE_LIMITED = {"message": "Rate limit reached for m in organization org-x on requests per "
                           "min (RPM): Limit 3, Used 3, Requested 1.",
                "type": "requests", "param": None, "code": "rate_limit_exceeded"}
NO_QUOTA = {"message": "You exceeded your current quota, please check your plan and billing "
                       "details.", "type": "insufficient_quota", "param": None,
            "code": "insufficient_quota"}
SECRET = "sk-test-0123456789abcdef"


def chat(sdk: str, server, name: str):
    if sdk == "groq":
        return GroqChat(name, api_key=SECRET, base_url=server.url, name=name)
    return OpenAIChat(name, api_key=SECRET, base_url=server.url + "/v1", name=name)


async def retries(caplog, count: int, answer: "asyncio.Future[object]") -> list[dict]:
    """The hedge's first ``count`` ``llm_retry`` lines once logged (polled: the 429s come
    over a real socket); the test fails if ``answer`` ends first: not retried."""
    for _ in range(3000):
        logged = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                  if r.getMessage() == "llm_retry"]
        if len(logged) >= count:
            return logged
        if answer.done():
            raise AssertionError(f"not retried: {answer.exception() or answer.result()!r}")
        await asyncio.sleep(0.01)
    raise AssertionError(f"not retried in 30 s: {len(logged)} llm_retry lines")


@pytest.fixture
def retry_log(caplog, monkeypatch):
    # Seen by caplog even after a test ran the CLI (its logging stops propagation).
    monkeypatch.setattr(logging.getLogger("voicegate"), "propagate", True)
    caplog.set_level(logging.INFO, logger="voicegate")
    return caplog


def test_the_fake_servers_never_close_a_connection_their_clients_may_reuse():
    """Review (stop 70): test_a_429_on_both_legs_is_retried_after_its_wait failed once on a
    loaded machine. A leg asked again after its 429 reuses the connection the 429 came on,
    idle meanwhile for as long as the test takes to see both 429s (seconds, loaded). The
    fake servers (uvicorn) closed an idle connection after 5 s, the SDKs' pools (httpx)
    keep one 5 s too: a request sent on it as the server closed it failed ("Connection
    error.", the leg failed, not retried), 3 times in 200 tries at that moment. The fake
    servers now keep an idle connection for longer than any test runs: the client's pool
    ends it, with nothing under way."""
    import groq
    import httpx
    import openai

    from tests.fakes.server import ServerThread

    pooled_s = max(httpx.Limits().keepalive_expiry or 0.0,
                   openai.DEFAULT_CONNECTION_LIMITS.keepalive_expiry or 0.0,
                   groq.DEFAULT_CONNECTION_LIMITS.keepalive_expiry or 0.0)
    test_timeout_s = 300  # pyproject.toml's pytest timeout: no test runs longer
    server = ServerThread(FakeOpenAI())
    try:
        kept_s = server._server.config.timeout_keep_alive
    finally:
        server._sock.close()
    assert kept_s > max(pooled_s, test_timeout_s), (kept_s, pooled_s)


@pytest.mark.parametrize("sdk", ["openai", "groq"])
@pytest.mark.parametrize(("status", "body", "said"), [
    (400, {"message": "max_tokens is too large", "type": "invalid_request_error",
           "code": None}, "max_tokens is too large"),
    (401, {"message": "Invalid API Key", "type": "invalid_request_error",
           "code": "invalid_api_key"}, "Invalid API Key"),
    (429, NO_QUOTA, NO_QUOTA["message"]),
], ids=["400", "401", "quota"])
async def test_a_refusal_reads_as_what_the_provider_said(llm_server, sdk, status, body, said):
    """The leg's error goes to logs, to llm_failed and to the operator. groq's SDK renders
    its refusal as "Error code: 400 - {'error': {'message': ...}}", a Python dict, and both
    SDKs prefix "Error code: N - ": the error now reads as what the provider said."""
    fake, server = llm_server
    fake.refusals = [(status, body, {})]
    hedged = HedgedChat(chat(sdk, server, "p"), None, clock=ManualClock(),
                        first_token_timeout_s=4.0)
    try:
        with pytest.raises(ProviderError) as info:
            await asyncio.wait_for(collect(hedged), 20)
    finally:
        await hedged.aclose()
    message = str(info.value)
    assert message.endswith(f"primary p: p: HTTP {status} from p: {said}"), message
    assert "{" not in message and "Error code" not in message, message


@pytest.mark.parametrize(("sdk", "headers", "asked"), [
    ("openai", {"Retry-After": "1"}, 1.0),
    ("openai", {"retry-after-ms": "250"}, 0.25),
    # The limit it hit (none left) is whole again in 300 ms; the other one is not the matter.
    ("openai", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms",
                "x-ratelimit-remaining-tokens": "39000", "x-ratelimit-reset-tokens": "6m0s"},
     0.3),
    ("openai", {}, None),
    ("groq", {"retry-after": "1"}, 1.0),
], ids=["retry-after", "retry-after-ms", "ratelimit-reset", "no-header", "groq"])
async def test_a_429_on_both_legs_is_retried_after_its_wait(llm_server, retry_log, sdk,
                                                            headers, asked):
    """Both legs use one account: over its rate limit, it answers 429 to both at once. Each
    leg failed, the round raised "every LLM failed" and the caller was handed off
    (llm_failed), though the provider said to ask again in a moment. Each leg now waits
    what the 429 asks (Retry-After, retry-after-ms, the exhausted limit's reset; else a
    short jittered backoff) on the hedge's clock, inside its first-token budget, and is
    asked again; every request is counted."""
    fake, server = llm_server
    fake.refusals = [(429, RATE_LIMITED, headers)] * 2
    fake.default = Reply(hold_after=1)  # answered only once the test lets it: both asked again
    clock = ManualClock()
    hedged = HedgedChat(chat(sdk, server, "p"), chat(sdk, server, "s"), clock=clock,
                        hedge_delay_s=0.0, first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    try:
        logged = await retries(retry_log, 2, answer)
        waits = [line["wait_s"] for line in logged]
        if asked is None:
            assert all(0.05 <= w <= 0.1 for w in waits), waits  # 0.1 s, jittered 50-100 %
        else:
            assert waits == [asked, asked]
        await clock.advance(min(waits) - 0.001)
        assert not answer.done() and sum(fake.stats.requests.values()) == 2  # not yet
        await clock.advance(max(waits) - min(waits) + 0.002)  # logged to the millisecond
        assert await fake.await_for(lambda s: sum(s.requests.values()) == 4)
        fake.release.set()
        assert await asyncio.wait_for(answer, 20) == "Hello there. How can I help you today?"
    finally:
        answer.cancel()
        await hedged.aclose()
    assert sum(fake.stats.requests.values()) == 4 and not fake.refusals
    stats = hedged.stats
    assert (stats.requests, stats.extra_requests, stats.retries) == (4, 1, 2)
    assert stats.leg_failures == stats.all_failed == stats.failovers == 0
    # The hedge delay learns the model's time to first token, from the request that
    # answered, not the account's wait: the primary's (won, or censored at the win) is
    # at most the time the clock moved after it was asked again, never the wait itself.
    assert hedged.adaptive._samples[-1] <= max(waits) - min(waits) + 0.002, (
        hedged.adaptive._samples, waits)
    assert sorted((line["role"], line["provider"], line["status"], line["retry"])
                  for line in logged) == [("primary", "p", 429, 1), ("secondary", "s", 429, 1)]
    assert SECRET not in retry_log.text and "opening hours" not in retry_log.text


async def test_a_429_that_persists_fails_after_a_bounded_number_of_retries(llm_server,
                                                                           retry_log):
    """A 429 to every request: asked again 3 times, after 0.1 s doubling (jittered), then
    the leg fails with the 429 itself, well inside the first-token budget."""
    fake, server = llm_server
    fake.refusals = [(429, RATE_LIMITED, {})] * 10
    clock = ManualClock()
    hedged = HedgedChat(chat("openai", server, "p"), None, clock=clock,
                        first_token_timeout_s=4.0)
    started = clock.now()
    answer = asyncio.ensure_future(collect(hedged))
    try:
        for n in (1, 2, 3):
            # wait_s is logged to the millisecond: a millisecond more is past it
            await clock.advance((await retries(retry_log, n, answer))[-1]["wait_s"] + 0.001)
        with pytest.raises(ProviderError, match=r"p: HTTP 429 from p: .*Rate limit reached .*"
                                                r" \(asked 4 times\)$"):
            await asyncio.wait_for(answer, 20)
    finally:
        answer.cancel()
        await hedged.aclose()
    waits = [r.fields["wait_s"] for r in retry_log.records  # type: ignore[attr-defined]
             if r.getMessage() == "llm_retry"]
    assert len(waits) == 3 and all(base / 2 <= w <= base for w, base in
                                   zip(waits, (0.1, 0.2, 0.4))), waits
    assert fake.stats.requests["p"] == 4 and len(fake.refusals) == 6
    assert clock.now() - started < 1.0
    stats = hedged.stats
    assert (stats.requests, stats.retries, stats.leg_failures, stats.all_failed) == (4, 3, 1, 1)


@pytest.mark.parametrize(("status", "error", "headers"), [
    (400, {"message": "bad request", "type": "invalid_request_error", "code": None}, {}),
    (401, {"message": "Incorrect API key provided", "type": "invalid_request_error",
           "code": "invalid_api_key"}, {}),
    (403, {"message": "Country not supported", "type": "invalid_request_error",
           "code": "unsupported_country_region_territory"}, {}),
    (404, {"message": "The model `p` does not exist", "type": "invalid_request_error",
           "code": "model_not_found"}, {}),
    (429, NO_QUOTA, {}),
    (429, RATE_LIMITED, {"Retry-After": "30"}),
    (429, RATE_LIMITED, {"retry-after-ms": "4000"}),
], ids=["400", "401", "403", "404", "429-quota", "429-retry-after-too-long",
        "429-retry-after-ms-at-the-budget"])
async def test_a_refusal_that_will_not_clear_in_time_hands_over_at_once(llm_server, retry_log,
                                                                        status, error, headers):
    """Only a rate limit that clears inside the first-token budget is waited for. A bad
    request, a refused key, a missing model, a spent quota, or a Retry-After ending at or
    beyond the budget (the caller would wait for nothing) fail the leg at once, as before:
    the other leg answers, with the clock standing still."""
    fake, server = llm_server
    fake.refusals = [(status, error, headers)]
    fake.replies["s"] = Reply(text="Backup answer.")
    hedged = HedgedChat(chat("openai", server, "p"), chat("openai", server, "s"),
                        clock=ManualClock(), hedge_delay_s=600.0, first_token_timeout_s=4.0)
    try:
        assert await asyncio.wait_for(collect(hedged), 20) == "Backup answer."
    finally:
        await hedged.aclose()
    assert (fake.stats.requests["p"], fake.stats.requests["s"]) == (1, 1)
    assert hedged.stats.failovers == 1 and hedged.stats.requests == 2
    assert "llm_retry" not in [r.getMessage() for r in retry_log.records]


async def test_a_leg_asked_again_keeps_its_first_token_deadline(llm_server, retry_log):
    """The wait is spent from the leg's first-token budget, not added to it: asked again
    3.5 s in, a leg that then sends nothing fails at 4 s from its first request (the
    caller waits no longer than before). One leg: a secondary would start at once."""
    fake, server = llm_server
    fake.refusals = [(429, RATE_LIMITED, {"retry-after-ms": "3500"})]
    fake.replies["p"] = Reply(ttft_s=STALL)
    clock = ManualClock()
    hedged = HedgedChat(chat("openai", server, "p"), None, clock=clock,
                        first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    try:
        assert (await retries(retry_log, 1, answer))[0]["wait_s"] == 3.5
        await clock.advance(3.5)
        assert await fake.await_for(lambda s: s.requests["p"] == 2)
        await clock.advance(0.49)
        assert not answer.done()
        await clock.advance(0.01)
        with pytest.raises(ProviderError, match=r"primary p: no first token after 4 s"):
            await asyncio.wait_for(answer, 20)
    finally:
        answer.cancel()
        await hedged.aclose()
    assert hedged.stats.requests == 2 and hedged.stats.retries == 1


async def test_a_barge_in_during_the_wait_cancels_it_at_once(llm_server, retry_log):
    """The caller speaks while the leg waits out a 429: the stream ends at once, with the
    clock standing still, and the leg is never asked again."""
    fake, server = llm_server
    fake.refusals = [(429, RATE_LIMITED, {"Retry-After": "1"})]
    clock = ManualClock()
    hedged = HedgedChat(chat("openai", server, "p"), None, clock=clock, first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    await retries(retry_log, 1, answer)
    answer.cancel()
    assert await until(answer.done) and answer.cancelled()
    await clock.advance(2.0)
    assert fake.stats.requests["p"] == 1 and hedged.stats.requests == 1
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]
    assert clock.sleeping == 0
    await hedged.aclose()


async def test_a_call_whose_llm_is_rate_limited_once_hears_the_answer(llm_server, retry_log):
    # The call's side: both legs refused with a 429 and a Retry-After of 1 s. The caller
    # heard the handoff (llm_failed); now the answer, 1 s of the call's clock later.
    fake, server = llm_server
    fake.refusals = [(429, RATE_LIMITED, {"Retry-After": "1"})] * 2
    fake.default = Reply(text="We open at nine.")
    h = CallHarness()
    h.agent = Agent(HedgedChat(chat("openai", server, "p"), chat("openai", server, "s"),
                               hedge_delay_s=0.0, clock=h.clock), filler_after_s=None)
    h.responder._agent = h.agent
    await h.start()
    try:
        await h.text("when do you open")
        asked_at = h.clock.now()

        async def an_error() -> list[dict]:
            await h.output.until(lambda: h.output.of("error"))
            return h.output.of("error")

        failed = asyncio.ensure_future(an_error())
        await retries(retry_log, 2, failed)
        failed.cancel()
        assert h.output.frames == []
        await h.wait(1020)  # a frame past the wait: 51 steps of 20 ms
        assert await h.output.until(lambda: h.output.of("response"))
        await h.wait(2000)
        assert [e["source"] for e in h.output.of("response")] == ["llm"]
        assert h.output.of("error") == [] and not h.stats.errors.get("llm_failed")
        first_heard = h.output.frames[0][0] - asked_at
        assert 1.0 <= first_heard < 1.2, first_heard
        h.stats.watch_hedge(h.agent.llm.stats)  # type: ignore[union-attr]
        exposed = generate_latest(h.stats.prometheus.registry).decode()
        assert "voicegate_llm_rate_limit_retries_total 2.0" in exposed
        assert "voicegate_llm_requests_total 4.0" in exposed
    finally:
        await h.stop()
        await h.agent.aclose()
    assert sum(fake.stats.requests.values()) == 4


async def test_a_primary_waiting_out_a_429_starts_the_secondary_at_once(llm_server, retry_log):
    """The secondary may be another account or another provider: a primary refused for its
    rate limit waited out its Retry-After while the secondary started only at the hedge
    delay (2 s here), though a failure would have started it at once. It now starts at
    once, as after a failure, and answers while the primary waits."""
    fake, server = llm_server
    fake.refusals = [(429, RATE_LIMITED, {"retry-after": "1"})]  # the first request only
    clock = ManualClock()
    hedged = HedgedChat(chat("openai", server, "p"), chat("openai", server, "s"), clock=clock,
                        hedge_delay_s=2.0, first_token_timeout_s=4.0)
    answer = asyncio.ensure_future(collect(hedged))
    try:
        # The clock never moves: neither the primary's wait nor the hedge delay passes.
        assert await asyncio.wait_for(answer, 10) == "Hello there. How can I help you today?"
    finally:
        answer.cancel()
        await hedged.aclose()
    stats = hedged.stats
    assert (stats.secondary_wins, stats.failovers, stats.retries) == (1, 1, 0)
    assert sum(fake.stats.requests.values()) == 2  # the primary was never asked again


@pytest.mark.parametrize("secondary_says", ["Backup answer.", None],
                         ids=["at-the-win", "when-every-leg-fails"])
async def test_a_leg_failed_for_no_first_token_is_not_cut_short_in_its_close(secondary_says):
    """Review: the primary gets no first token within first_token_timeout_s: ``_fail`` cancels it
    and its HTTP close starts. The secondary (the failover) then answers, and at the win
    ``_cancel`` cancels every non-winner again, the failed primary included, whose close
    is still under way: the close is cut short (the SDK's response never released). Or
    the secondary fails too (an empty reply at once): the stream's end (``_stop``) cancels
    the primary again while its close is under way."""
    clock = ManualClock()
    ends = asyncio.Event()
    primary = LegWhoseCloseWaits("primary")  # no token, ever; its close waits for release
    secondary = LegWhoseCloseWaits("secondary", first=secondary_says, ends=ends)
    secondary.release.set()
    hedged = HedgedChat(primary, secondary, hedge_delay_s=600.0,  # type: ignore[arg-type]
                        first_token_timeout_s=4.0, clock=clock)
    if secondary_says is None:
        ends.set()  # nothing, then its end: an empty reply as soon as it is asked
    answer = asyncio.ensure_future(collect(hedged))
    await clock.advance(4.0)  # the primary's first-token timeout: it fails, its close starts
    assert await until(lambda: primary.closing == 1)
    ends.set()
    assert await until(answer.done) and answer.result() == (secondary_says or "")
    assert primary.closing == 1
    assert primary.cut == 0, "the failed primary's close under way was cancelled again (cut short)"
    primary.release.set()
    await hedged.aclose()
    assert primary.closed == 1


class FinishingLeg:
    """A leg that answers ``text`` and its finish at once, then holds its body open for
    ``body_s`` of the clock (None: for ever) before it ends ([DONE], the response's end)."""

    name = "finishing"

    def __init__(self, clock: ManualClock, text: str, body_s: float | None) -> None:
        self.clock = clock
        self.text = text
        self.body_s = body_s
        self.read_to_end = False  # its body was read to its end (the connection reusable)
        self.closed_at: float | None = None

    async def stream(self, messages, tools=None) -> AsyncIterator[LLMChunk]:
        try:
            yield LLMChunk(text=self.text)
            yield LLMChunk(finished=True)
            if self.body_s is None:
                await asyncio.Event().wait()
            await self.clock.sleep(self.body_s)
            self.read_to_end = True
        finally:
            self.closed_at = self.clock.now()


@pytest.mark.parametrize("body_s", [None, 0.1], ids=["held-open", "ends-within-the-grace"])
async def test_the_stream_ends_at_the_models_finish_not_at_its_bodys_end(body_s):
    """Review (stop 64): the stream ended (its consumer's StopAsyncIteration) only once
    the winner's body had ended or its grace (``FINISH_GRACE_S``) passed, though its model
    had finished: the agent says a round's last piece at the stream's end, so a proxy
    holding the connection open delayed it by the whole grace. The stream now ends at the
    finish; the body's rest is still read (its connection reused) or cut at the grace,
    without the consumer, and ``aclose`` waits for it."""
    clock = ManualClock()
    leg = FinishingLeg(clock, "We open at nine.", body_s)
    hedged = HedgedChat(leg, None, hedge_delay_s=0.0, clock=clock)  # type: ignore[arg-type]
    start = clock.now()
    ended: list[float] = []

    async def consume() -> None:
        async for chunk in hedged.stream(MESSAGES):
            assert chunk.text == "We open at nine."
        ended.append(clock.now())

    task = asyncio.ensure_future(consume())
    await clock.advance(0.0)
    assert await until(task.done) and task.exception() is None
    assert ended == [start] and leg.closed_at is None  # its body is still being read
    closing = asyncio.ensure_future(hedged.aclose())  # a shutdown waits for it
    await clock.advance(0.3)
    assert await until(closing.done) and closing.exception() is None
    if body_s is None:
        assert not leg.read_to_end and leg.closed_at == start + 0.2  # cut at its grace
    else:
        assert leg.read_to_end and leg.closed_at == start + body_s  # read to its end
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llm-")]
