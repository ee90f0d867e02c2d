"""The transport side every endpoint shares: admission, token, timeouts, bounds, bad input."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any, Iterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from gateway.app import create_app
from gateway.call.session import Admission, AudioRateLimit, CallSession, Outbox, TokenBucket
from gateway.client import Caller, TurnResult, utterance_answered
from gateway.clock import ManualClock
from gateway.protocol import ProtocolError, parse_text_frame
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.stats import Stats
from gateway.transports.twilio import TwilioOutput, TwilioStream
from tests.fakes.server import ServerThread

pytestmark = pytest.mark.slow

TOKEN = "s3cret-call-token"
START_TIMEOUT_S = 2.0  # the guarded gateway's


@pytest.fixture(scope="module")
def guarded(settings, runtime) -> Iterator[BackgroundServer]:
    """A gateway with a call token, one call at most and short timeouts. Every call to it
    must send `start` within ``START_TIMEOUT_S`` of its upgrade: short, for the test of a
    connection that never starts, but not so short that a loaded machine's stall fails a
    call that does (0.5 s did)."""
    srv = BackgroundServer(settings.replace(max_calls=1, call_token=TOKEN,
                                            start_timeout_s=START_TIMEOUT_S,
                                            audio_rate_grace_s=0.3, max_logged_errors=3),
                           runtime).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
async def no_call_in_progress(request):
    """The guarded gateway takes one call: wait until the previous test's call has ended."""
    if "guarded" in request.fixturenames:
        await until_no_calls(request.getfixturevalue("guarded"))


async def until_no_calls(server: BackgroundServer, timeout: float = 30) -> None:
    admission = server.app.state.services.admission
    for _ in range(int(timeout / 0.02)):
        if admission.active == 0:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the previous call never ended")


async def events_until_closed(ws: Any, timeout: float = 30) -> list[dict[str, Any]]:
    events = []
    async def read() -> None:
        try:
            async for message in ws:
                if isinstance(message, str):
                    events.append(json.loads(message))
        except ConnectionClosedError:
            pass  # closed with an error code: the test reads it from ws.close_code
    await asyncio.wait_for(read(), timeout)
    return events


async def test_a_call_without_the_token_is_refused_before_accept(guarded):
    with pytest.raises(InvalidStatus) as info:
        async with connect(guarded.call_url):
            pass
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        async with connect(guarded.call_url + "?token=wrong"):
            pass


async def test_the_token_is_taken_as_bearer_or_query(guarded):
    async with Caller(guarded.call_url, token=TOKEN) as caller:
        assert caller.ready is not None
    await until_no_calls(guarded)
    async with Caller(guarded.call_url + f"?token={TOKEN}") as caller:
        assert caller.ready is not None


async def test_a_call_over_the_limit_gets_too_many_calls_and_1013(guarded):
    async with Caller(guarded.call_url, token=TOKEN) as first:
        assert first.ready is not None
        async with connect(guarded.call_url + f"?token={TOKEN}") as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            events = await events_until_closed(ws)
            assert [e["code"] for e in events if e["type"] == "error"] == ["too_many_calls"]
            assert ws.close_code == 1013


async def test_a_connection_that_never_starts_is_closed(guarded):
    async with connect(guarded.call_url + f"?token={TOKEN}") as ws:
        events = await events_until_closed(ws)
    assert [e["code"] for e in events] == ["start_timeout"]
    assert events[0]["message"] == f"no `start` within {START_TIMEOUT_S:g} s"
    assert ws.close_code == 1008


async def test_audio_much_faster_than_real_time_is_refused(guarded):
    async with connect(guarded.call_url + f"?token={TOKEN}") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        frame = bytes(640)  # 20 ms
        try:
            for _ in range(4000):  # 80 s of audio, as fast as the socket takes it
                await ws.send(frame)
                await asyncio.sleep(0)
        except Exception:
            pass
        events = await events_until_closed(ws)
    assert "audio_too_fast" in [e.get("code") for e in events]
    assert ws.close_code == 1008


async def test_a_call_reaching_a_replica_still_loading_is_refused_before_the_upgrade(
        settings, runtime) -> None:
    """HAProxy (deploy/haproxy.cfg) retries an upgrade refused with HTTP 503 on another
    replica (retry-on 503, redispatch); that is how a draining replica stays invisible to
    callers. A replica whose models are still loading instead accepts the upgrade (101) and
    then sends `not_ready` and closes 1013 (gateway/transports/native.py; twilio.py alike):
    past the 101, HAProxy cannot retry, and the caller's call fails. HAProxy sends calls to a
    loading replica whenever it does not know yet: its servers start UP at every HAProxy
    start or reload (no init-state in 2.6) until the first check (inter 1s), e.g. the reload
    that adds a new replica's `server` line while that replica loads. While not ready, the
    upgrade should be refused with HTTP 503, as while draining."""
    app = create_app(settings, runtime)  # lifespan off below: the models never "finish" loading
    with ServerThread(app, ws="websockets-sansio") as loading:
        assert not app.state.services.ready
        url = loading.ws_url + "/v1/call"
        try:
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
                events: list[Any] = []
                try:
                    async for message in ws:
                        events.append(message)
                except ConnectionClosed:
                    pass
                pytest.fail(f"the upgrade was accepted (101) while not ready, then "
                            f"{events} and close {ws.close_code}: a balancer cannot retry it")
        except InvalidStatus as refused:
            assert refused.response.status_code == 503


async def test_text_sent_right_after_start_is_answered(server):
    for _ in range(5):
        async with connect(server.call_url) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            await ws.send(json.dumps({"type": "text", "text": "hello, who am I talking to?"}))
            kinds = []
            while "response" not in kinds:
                message = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(message, str):
                    kinds.append(json.loads(message)["type"])
            assert kinds.index("ready") < kinds.index("response")


async def test_bad_input_is_counted_but_logged_only_a_few_times(guarded, caplog):
    caplog.set_level(logging.WARNING, logger="voicegate")
    async with Caller(guarded.call_url, token=TOKEN) as caller:
        for _ in range(30):
            await caller.send_raw("{not json")
        # Every frame's error has come (not a pause: a loaded machine answers late).
        async with asyncio.timeout(30):
            while sum(e.get("code") == "invalid_json" for e in caller.events) < 30:
                await asyncio.sleep(0.02)
    # The summary is logged as the session closes, after the client's side has closed:
    # waited for, within a ceiling that only bounds a hang.
    async with asyncio.timeout(30):
        while not any(r.getMessage() == "bad_input_not_logged" for r in caplog.records):
            await asyncio.sleep(0.02)
    lines = [r for r in caplog.records if r.getMessage() == "bad_input"]
    assert len(lines) == 3
    assert sum(1 for e in caller.events if e.get("code") == "invalid_json") == 30


async def test_a_bad_keypad_message_never_puts_the_callers_keys_in_the_log(guarded, caplog):
    # A client that sends a PIN in one `dtmf` message (or as a number) gets invalid_dtmf;
    # its `bad_input` log line said why, quoting the digit: the caller's PIN in the log.
    from gateway.logs import JsonFormatter

    caplog.set_level(logging.WARNING, logger="voicegate")
    async with Caller(guarded.call_url, token=TOKEN) as caller:
        await caller.send_json({"type": "dtmf", "digit": "4921"})
        await caller.send_json({"type": "dtmf", "digit": 7350})
        await caller.send_json({"type": "dtmf", "digit": "8"})  # then a key: the call goes on
        await caller.wait_for("keypad", timeout=10)
    errors = [e for e in caller.events if e.get("code") == "invalid_dtmf"]
    assert len(errors) == 2 and all("not a keypad key" in e["message"] for e in errors)
    lines = [JsonFormatter().format(r) for r in caplog.records if r.getMessage() == "bad_input"]
    assert len(lines) == 2
    for line in lines:
        assert "4921" not in line and "7350" not in line, line


async def test_a_flood_of_bad_messages_closes_its_connection_and_no_other(guarded, runtime):
    # Thousands of bad messages cost every call on the replica its event loop's time: past
    # the burst, faster than max_bad_message_rate, the connection is closed, by name.
    before = runtime.stats.errors["too_many_bad_messages"]
    async with connect(guarded.call_url + f"?token={TOKEN}") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        reader = asyncio.ensure_future(events_until_closed(ws))
        for _ in range(5000):
            try:
                await ws.send("{not json")
            except ConnectionClosed:
                break
        events = await reader
    assert ws.close_code == 1008
    codes = [e.get("code") for e in events if e.get("type") == "error"]
    assert codes[-1] == "too_many_bad_messages" and "invalid_json" in codes
    assert runtime.stats.errors["too_many_bad_messages"] == before + 1
    await until_no_calls(guarded)
    async with Caller(guarded.call_url, token=TOKEN) as caller:  # the slot is free again
        assert caller.ready is not None


async def _call_that_stops_reading(guarded: Any) -> ClientConnection:
    """A started call whose client reads nothing: a small receive window that stays shut,
    and (max_queue=1) the library stops reading the socket once a message waits unread; no
    pings of its own (their pongs unanswered, it would close first)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", guarded.port))
    ws = await connect(guarded.call_url + f"?token={TOKEN}", sock=sock, max_queue=1,
                       ping_interval=None)
    await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
    return ws


async def test_a_client_that_stops_reading_is_found_out_and_counted(guarded, runtime):
    """Review (stop 70): a caller whose client stopped reading (a frozen app, a dead socket
    still acked by its host) was never closed as `client_not_reading`, though the docs say a
    client that takes nothing for `send_timeout_s` (5 s) is. The kernel took every byte: the
    socket's send buffer grows to tcp_wmem's maximum (4 MiB: two minutes of 16 kHz reply
    audio), so the gateway's sends never waited and its watchdog never fired. The call ran
    on, buffering for nobody, until the WebSocket keepalive dropped it after 40 s as an
    ordinary hang-up: not counted, not logged. A client that reads nothing while replies play
    must be closed as not reading well before the keepalive would (here: within 30 s)."""
    before = runtime.stats.errors["client_not_reading"]
    ws = await _call_that_stops_reading(guarded)
    try:
        for _ in range(150):  # a question every 0.2 s: reply audio the whole time
            if runtime.stats.errors["client_not_reading"] > before:
                break
            try:
                await ws.send(json.dumps({"type": "text", "text": "what time do you open"}))
            except ConnectionClosed:
                pass
            await asyncio.sleep(0.2)
        assert runtime.stats.errors["client_not_reading"] == before + 1, (
            "a client that read nothing for 30 s was never closed as not reading")
    finally:
        ws.transport.abort()


async def test_a_connection_closed_on_a_client_that_stopped_reading_is_let_go(guarded,
                                                                               runtime):
    """Review (stop 70): once the gateway had closed a call whose client stopped reading
    (`client_not_reading`), the connection itself stayed open for good: closing a socket
    waits for its unsent bytes to go out, which a client whose receive window stays shut
    never lets happen. Each such client held a socket, its buffers and a file descriptor
    of the replica's for as long as its host stayed up, and was never told: it could go
    on sending. The gateway must let the connection go (here: the client finds it reset
    within 30 s of the close)."""
    before = runtime.stats.errors["client_not_reading"]
    ws = await _call_that_stops_reading(guarded)
    try:
        for _ in range(150):
            if runtime.stats.errors["client_not_reading"] > before:
                break
            await ws.send(json.dumps({"type": "text", "text": "what time do you open"}))
            await asyncio.sleep(0.2)
        assert runtime.stats.errors["client_not_reading"] == before + 1
        gone = False
        for _ in range(150):  # the client's microphone goes on, as a frozen app's would
            try:
                await ws.send(b"\x00" * 640)
            except (ConnectionClosed, OSError):
                gone = True
                break
            await asyncio.sleep(0.2)
        assert gone, "the gateway still held the connection 30 s after closing its call"
    finally:
        ws.transport.abort()


# ---------------------------------------------------------------- units


def test_a_bad_message_budget_cuts_a_flood_not_a_client_with_a_bug():
    clock = ManualClock()
    budget = TokenBucket(per_s=100.0, capacity=500, clock=clock)
    for _ in range(60 * 50):  # one bad message every 20 ms frame for a minute
        assert budget.take()
        clock._now += 0.02
    flood = TokenBucket(per_s=100.0, capacity=500, clock=clock)
    taken = 0
    while flood.take():  # a thousand a second
        taken += 1
        clock._now += 0.001
    assert 540 <= taken <= 560  # the burst, plus what 100 a second refilled meanwhile
    clock._now += 1.0
    assert sum(flood.take() for _ in range(200)) == 99  # 100 back after a second


def test_audio_rate_limit_allows_real_time_and_bursts_but_not_a_sustained_excess():
    clock = ManualClock()
    frame = 640  # 20 ms at 16 kHz

    def run(rate: float, seconds: float, limit: AudioRateLimit) -> float | None:
        """Feed ``seconds`` of wall time at ``rate`` x real time; when it tripped, if it did."""
        start = clock.now()
        while clock.now() - start < seconds:
            if limit.add(frame):
                return clock.now() - start
            clock._now += 0.02 / rate
        return None

    assert run(1.0, 20, AudioRateLimit(16000, 2.0, 2.0, clock)) is None
    assert run(1.9, 20, AudioRateLimit(16000, 2.0, 2.0, clock)) is None
    tripped = run(3.0, 20, AudioRateLimit(16000, 2.0, 2.0, clock))
    assert tripped is not None and 1.9 < tripped < 2.2
    burst = AudioRateLimit(16000, 2.0, 2.0, clock)
    clock._now += 1.5
    for _ in range(75):  # a 1.5 s stall delivered at once
        assert not burst.add(frame)
    assert run(1.0, 10, burst) is None
    # A real-time client whose audio the server read 4 s late, all at once (a stalled loop).
    stalled = AudioRateLimit(16000, 2.0, 2.0, clock)
    assert run(1.0, 30, stalled) is None
    clock._now += 4.0
    assert not any(stalled.add(frame) for _ in range(200))
    assert run(1.0, 10, stalled) is None
    # After a long real-time stretch a flood is still caught within seconds.
    assert (tripped := run(10.0, 20, stalled)) is not None and tripped < 1.5


async def test_an_outbox_whose_client_does_not_read_is_closed():
    stuck: list[str] = []

    class NeverReads:
        async def send_text(self, text: str) -> None:
            await asyncio.Event().wait()

    outbox = Outbox(NeverReads(), limit=4, send_timeout_s=60, on_stuck=stuck.append)  # type: ignore
    for _ in range(5):  # one in the writer's hands, four queued
        outbox.send_text("x")
        await asyncio.sleep(0)
    assert not outbox.closed and stuck == []
    outbox.send_text("x")  # over the bound
    assert len(stuck) == 1 and "waiting for the client" in stuck[0]
    await outbox.aclose()

    timed_out: list[str] = []
    slow = Outbox(NeverReads(), limit=4, send_timeout_s=0.05, on_stuck=timed_out.append)  # type: ignore
    slow.send_text("x")
    await asyncio.wait_for(slow._watchdog, 5)
    assert slow.closed and slow._writer.done() and "read nothing" in timed_out[0]
    await slow.aclose()


@pytest.mark.parametrize("raw", ["[" * 30000, '{"type": "text", "text": 1' + "0" * 5000 + "}"])
def test_pathological_json_is_an_invalid_json_error(raw):
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(raw, 1 << 20)
    assert info.value.code == "invalid_json" and info.value.close_code is None


async def test_twilio_pathological_json_and_marks_are_errors_not_crashes():
    stream = TwilioStream.__new__(TwilioStream)
    stream._max_bytes = 1 << 20
    for raw in ("[" * 30000, '{"event": 1' + "0" * 5000 + "}"):
        with pytest.raises(ProtocolError) as info:
            stream.handle(raw)
        assert info.value.code == "twilio_invalid_json"

    class Outbox:
        def send_text(self, text: str) -> None:
            pass

    output = TwilioOutput(Outbox(), "MZ1", "call")  # type: ignore[arg-type]
    output.reply_started(1)
    await output.send_audio(b"\xff" * 800)  # 100 ms: the mark 1:100 is sent
    assert output.mark_played("²:5") is False  # a digit int() refuses: not ours, no crash
    assert output.mark_played("1:²") is False
    assert output.mark_played("1:100") is True


async def test_a_tcp_connection_that_sends_nothing_is_closed(server):
    # uvicorn's keep-alive timeout (5 s by default) now also covers a connection's start.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
    finally:
        writer.close()


async def test_a_request_whose_headers_never_finish_is_closed(server: BackgroundServer) -> None:
    """An HTTP client that sends the first line of a request (to the admin API, or anything)
    and then nothing more holds its connection, a file descriptor and parser state, forever:
    gateway/http_idle.py arms uvicorn's keep-alive timer when the connection is made, but the
    first byte received cancels it and nothing re-arms it until a response is sent. One client
    can open thousands of such connections (classic slowloris) on the replica's own port
    (docker-compose.yml publishes 8081/8082). Docs: "TCP connections that never send an HTTP
    request are closed after uvicorn's keep-alive timeout (5 s)". A request that has not
    finished its headers long after that should be closed too (here: within 30 s, six times
    the 5 s timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /admin/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        await writer.drain()
        try:
            data: bytes | None = await asyncio.wait_for(reader.read(), 30)
        except TimeoutError:
            data = None
        assert data is not None, ("a request with unfinished headers was still open after 30 s "
                                  "(uvicorn's keep-alive timeout is 5 s): the connection is "
                                  "held forever")
        # Closed by the server (a 408 first is fine).
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]
    finally:
        writer.close()


def test_a_turn_cut_off_by_the_callers_next_words_is_not_the_answer_to_wait_for():
    # The gateway answered at a pause ("I forgot my password for the app, ..."), the
    # caller talked on: that turn's metrics come first, the whole question's later.
    cut = [{"type": "interrupt", "turn": 2, "cause": "speech", "heard_ms": 220},
           {"type": "turn_metrics", "turn": 2}]
    assert not utterance_answered(cut)
    assert utterance_answered(cut + [{"type": "turn_metrics", "turn": 3}])
    # Noise that stopped the reply for a moment (resumed): that turn is the answer.
    assert utterance_answered([{"type": "interrupt", "turn": 2, "cause": "speech"},
                               {"type": "resume", "turn": 2, "from_ms": 400},
                               {"type": "turn_metrics", "turn": 2}])
    assert utterance_answered([{"type": "interrupt", "turn": 2, "cause": "text"},
                               {"type": "turn_metrics", "turn": 2}]) is True
    assert not utterance_answered([{"type": "transcript", "text": "hi", "final": False}])


def test_a_turn_that_heard_no_words_is_not_the_answer_to_wait_for():
    # Noise heard as an utterance (its final transcript empty) ends with its turn_metrics
    # too (docs/protocol.md), before the question's own turn: it answers nothing.
    noise = [{"type": "transcript", "text": "", "final": True, "turn": 2},
             {"type": "turn_metrics", "turn": 2, "input": "audio", "empty": True}]
    assert not utterance_answered(noise)
    answered = noise + [{"type": "turn_metrics", "turn": 3, "source": "cache"}]
    assert utterance_answered(answered)
    assert TurnResult(number=3, events=answered).metrics == answered[-1]


HEARD = [{"type": "transcript", "text": "what time", "final": False},
         {"type": "transcript", "text": "what time do you open", "final": True, "turn": 1}]


async def scripted_gateway_say(after_clip: list[dict[str, Any]]) -> Any:
    """``Caller.say`` against a gateway that answers the clip with ``after_clip``'s events
    (then stays silent): what ``say`` returns, within 8 s (its own timeout is 30 s)."""
    from websockets.asyncio.server import serve

    clip_frames = 10

    async def gateway(ws: Any) -> None:
        frames = 0
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "start":
                await ws.send(json.dumps({"type": "ready"}))
            elif isinstance(message, bytes):
                frames += 1
                if frames == clip_frames:
                    for event in after_clip:
                        await ws.send(json.dumps(event))

    async with serve(gateway, "127.0.0.1", 0) as listener:
        port = listener.sockets[0].getsockname()[1]
        async with Caller(f"ws://127.0.0.1:{port}") as caller:
            async with asyncio.timeout(8):
                return await caller.say(bytes(640 * clip_frames), timeout=30,
                                        nothing_heard_ms=300)


async def test_say_returns_when_nothing_follows_a_turn_cut_by_wordless_speech():
    # Noise stopped the reply for good (the hold expired: no resume) and held no words:
    # no later turn comes. say() ends once the line is quiet, not at its timeout.
    turn = await scripted_gateway_say([*HEARD,
                                       {"type": "interrupt", "turn": 1, "cause": "speech"},
                                       {"type": "turn_metrics", "turn": 1}])
    assert turn.number == 1


async def test_say_returns_the_continued_turn_when_one_follows():
    turn = await scripted_gateway_say([*HEARD,
                                       {"type": "interrupt", "turn": 1, "cause": "speech"},
                                       {"type": "turn_metrics", "turn": 1},
                                       {"type": "turn_metrics", "turn": 2}])
    assert turn.number == 2


async def test_waiting_for_a_turns_metrics_skips_an_empty_turns():
    # Noise heard as speech ends an empty turn with its metrics (``empty``) before the
    # utterance's own: a benchmark waiting for the utterance's must not take those.
    caller = Caller("ws://127.0.0.1:9/unused")
    caller.events = [{"type": "transcript", "text": "", "final": True, "turn": 1},
                     {"type": "turn_metrics", "turn": 1, "empty": True}]

    async def answer_later() -> None:
        await asyncio.sleep(0)
        caller.events.append({"type": "turn_metrics", "turn": 2, "hit": True})
        caller._new_event.set()

    later = asyncio.ensure_future(answer_later())
    metrics = await caller.wait_for_answered_turn(start=0, timeout=5)
    await later
    assert metrics == {"type": "turn_metrics", "turn": 2, "hit": True}


class QuietSocket:
    """A WebSocket that accepts every send and never delivers a message."""

    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def send_text(self, text: str) -> None:
        pass

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code


class SlowClosingCall:
    """A call whose close takes a while (its stages' streams closing, a recording being
    written): ``run`` returns only once ``closed`` is set after ``stop``."""

    sample_rate = 16000

    def __init__(self) -> None:
        self.id = "slow-close"
        self.ended = None
        self.stopped = asyncio.Event()
        self.closed = asyncio.Event()

    def stop(self) -> None:
        self.stopped.set()

    async def run(self) -> None:
        await self.stopped.wait()
        await self.closed.wait()


async def test_a_session_close_cancelled_while_the_call_closes_still_frees_its_slot() -> None:
    """Review (stop 59): uvicorn cancels the handlers that outlive its graceful-shutdown
    timeout (5 s) once; a handler then is often inside ``session.close``, awaiting its
    call's task (the call closing its stages: a Deepgram flush waits up to 2 s, a recording
    up to its bound). The cancel lands in ``await asyncio.gather(task)`` and nothing after
    it runs: ``admission.leave()`` never does, so ``admission.active`` stays up for good
    (Services ._let_cut_calls_close then waits its whole 10 s for a call that is gone and
    logs it as unfinished; a drain counts it), and the outbox's writer and watchdog tasks
    outlive the session (the docstring: "nothing outlives it")."""
    settings = Settings.load({}, environ={})
    admission = Admission(limit=2)
    session = CallSession(QuietSocket(), settings, Stats(), admission, "native")  # type: ignore[arg-type]
    call = SlowClosingCall()
    session.start_call(lambda: call)  # type: ignore[arg-type,return-value]
    assert admission.active == 1
    await asyncio.sleep(0)

    closing = asyncio.create_task(session.close())
    await call.stopped.wait()
    await asyncio.sleep(0)
    closing.cancel()  # the server's one cancel at the end of its grace
    with pytest.raises(asyncio.CancelledError):
        await closing
    call.closed.set()
    await asyncio.sleep(0)
    try:
        assert admission.active == 0, (
            f"the session was closed (cancelled in its close) but its max_calls slot is "
            f"still taken: admission.active == {admission.active}")
        assert session.outbox._writer.done() and session.outbox._watchdog.done(), \
            "the session's outbox tasks outlived its close"
    finally:
        await session.outbox.aclose()


class BackpressuredSocket(QuietSocket):
    """A socket whose every send waits a few loop iterations for the
    transport to drain (uvicorn's ``send`` awaits ``writable`` while the write buffer is
    over its mark)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        self.sent.append(text)


async def test_the_last_message_being_sent_is_not_cut_off_by_the_close() -> None:
    """A client that reads a little slowly (the goodbye's audio filled the socket's
    buffer) gets its last event, `hangup` or the `too_many_calls` error, in the
    writer's hands when the session closes. ``aclose`` sees an empty queue, skips its
    1 s flush and cancels the writer in the middle of that send: the event is lost,
    though the socket would have taken it an instant later."""
    ws = BackpressuredSocket()
    stuck: list[str] = []
    outbox = Outbox(ws, limit=16, send_timeout_s=5.0, on_stuck=stuck.append)  # type: ignore[arg-type]
    outbox.send_text('{"type": "hangup", "reason": "idle"}')
    await asyncio.sleep(0)  # the writer takes it and starts sending
    await outbox.aclose()
    assert ws.sent == ['{"type": "hangup", "reason": "idle"}'], (
        f"the message being sent when the outbox closed never reached the client: "
        f"sent {ws.sent}")


class StuckSocket(QuietSocket):
    """A client that reads nothing: every send waits for ever."""

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()

    async def send_bytes(self, data: bytes) -> None:
        await asyncio.Event().wait()


async def test_an_outbox_close_cancelled_while_it_drains_leaves_no_writer_running() -> None:
    """Review (stop 59, of this session's change): session.py Outbox.aclose: it now also
    waits while the writer holds a message (``_sending_since``), up to _DRAIN_S for a client
    that reads nothing. A cancel in that wait (the server's one cancel at the end of its
    shutdown grace, the very case d8a446f handles in CallSession.close) skips ``abort()``:
    the writer and the watchdog outlive the outbox. ``abort`` belongs in a ``finally``."""
    outbox = Outbox(StuckSocket(), limit=16, send_timeout_s=30.0,  # type: ignore[arg-type]
                    on_stuck=lambda why: None)
    outbox.send_text('{"type": "hangup"}')
    await asyncio.sleep(0)  # the writer takes it; its send never completes
    assert outbox._sending_since is not None
    closing = asyncio.create_task(outbox.aclose())
    await asyncio.sleep(0)  # in its drain wait
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    for _ in range(3):
        await asyncio.sleep(0)
    try:
        assert outbox._writer.done() and outbox._watchdog.done(), (
            "Outbox.aclose was cancelled in its drain wait and its writer / watchdog tasks "
            f"run on (writer done: {outbox._writer.done()}, watchdog done: "
            f"{outbox._watchdog.done()})")
    finally:
        outbox.abort()


class EndedCall:
    sample_rate = 16000

    def __init__(self) -> None:
        self.id = "ended"
        self.ended = None

    def stop(self) -> None:
        pass

    async def run(self) -> None:
        return None


async def test_a_session_close_cancelled_in_its_outbox_drain_leaves_no_outbox_task() -> None:
    """Review (stop 59, of this session's change): session.py CallSession.close: the cancel
    is handled only around the call task's wait; one landing in ``outbox.aclose()`` (a
    client that stopped reading holds it up to _DRAIN_S now that the message being sent is
    waited for) leaves the outbox's writer and watchdog running after the session ("nothing
    outlives us")."""
    settings = Settings.load({}, environ={})
    admission = Admission(limit=2)
    ws = StuckSocket()
    session = CallSession(ws, settings, Stats(), admission, "native")  # type: ignore[arg-type]
    session.start_call(lambda: EndedCall())  # type: ignore[arg-type,return-value]
    session.outbox.send_text('{"type": "hangup", "reason": "idle"}')
    for _ in range(3):
        await asyncio.sleep(0)
    closing = asyncio.create_task(session.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done()  # draining the stuck send
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    for _ in range(3):
        await asyncio.sleep(0)
    try:
        assert admission.active == 0
        assert session.outbox._writer.done() and session.outbox._watchdog.done(), (
            "the session's close was cancelled while its outbox drained: the outbox's "
            "writer / watchdog outlive the session")
    finally:
        session.outbox.abort()


class HeldSocket(QuietSocket):
    """A client reading a little late: each send completes once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        await self.release.wait()
        self.sent.append(text)


async def test_a_drain_holds_until_the_last_call_has_its_last_message_and_close() -> None:
    """Review (stop 60): the drain ends when ``admission.held`` reaches 0 (gateway/cli.py),
    and uvicorn's shutdown then closes every connection still open with 1012. The last
    call's slot was freed as soon as its task ended, before its session flushed what was
    queued (its `hangup`, its last `turn_metrics`: up to _DRAIN_S) and sent its own close
    frame: the drain saw no call, and uvicorn's 1012 (service restart: an SDK reconnects)
    cut a call that had ended, under its last messages, instead of its 1000."""
    settings = Settings.load({}, environ={})
    admission = Admission(limit=2)
    ws = HeldSocket()
    session = CallSession(ws, settings, Stats(), admission, "native")  # type: ignore[arg-type]
    session.start_call(lambda: EndedCall())  # type: ignore[arg-type,return-value]
    session.outbox.send_text('{"type": "hangup", "reason": "idle"}')
    closing = asyncio.create_task(session.close())
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        assert not closing.done() and ws.closed_with is None  # still flushing its `hangup`
        assert admission.held == 1, (
            f"the session is still sending its last message and has not closed its socket, "
            f"yet the drain sees {admission.held} call: it ends, and uvicorn closes this "
            f"one with 1012")
    finally:
        ws.release.set()
        await closing
    assert ws.sent == ['{"type": "hangup", "reason": "idle"}'] and ws.closed_with == 1000
    assert admission.held == 0 and admission.active == 0


@pytest.mark.parametrize("where", ["bearer", "query"])
def test_a_call_token_beyond_ascii_matches_as_a_client_sends_it(where: str) -> None:
    """Review (stop 64): a call token beyond ASCII (VOICEGATE_CALL_TOKEN=Schlüssel-...) sent
    in `Authorization: Bearer` never matched: Starlette decodes a header's bytes as Latin-1
    and the comparison took that string as UTF-8, so a client's UTF-8 header was refused
    (403) on every call while the same token as `?token=` got in."""
    from urllib.parse import quote

    from starlette.requests import HTTPConnection

    from gateway.call.session import presented_token
    from gateway.credentials import token_matches

    token = "Schlüssel-ëxtra-2"
    if where == "bearer":
        headers = [(b"authorization", b"Bearer " + token.encode("utf-8"))]
        query = b""
    else:
        headers, query = [], f"token={quote(token)}".encode()
    connection = HTTPConnection({"type": "websocket", "path": "/v1/call", "headers": headers,
                                 "query_string": query})
    assert token_matches(presented_token(connection), token)
    assert not token_matches(presented_token(connection), "Schlussel-extra-2")
