"""Native endpoint driven end to end over a fake WebSocket (no models, no sockets):
``native_call`` with a real ``CallSession`` and a real ``Call`` from the harness."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.call import Call
from gateway.call.session import Admission, CallSession
from gateway.overload import OverloadGate
from gateway.transports.native import native_call
from tests.call_harness import CallHarness


class FakeWebSocket:
    def __init__(self, services: Any) -> None:
        self.app = SimpleNamespace(state=SimpleNamespace(services=services))
        self.headers: dict[str, str] = {}
        self.query_params: dict[str, str] = {}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.events: list[dict[str, Any]] = []
        self.closed_with: int | None = None

    async def accept(self) -> None:
        return None

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        self.events.append(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        return None

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code

    def text(self, message: dict[str, Any]) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(message)})

    def audio(self, data: bytes) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "bytes": data})

    def errors(self) -> list[str]:
        return [e["code"] for e in self.events if e["type"] == "error"]


def services_for(h: CallHarness, max_calls: int = 2) -> SimpleNamespace:
    admission = Admission(max_calls)
    services = SimpleNamespace(settings=h.settings, stats=h.stats, admission=admission,
                               ready=True, overload=OverloadGate(0.0))
    services.open_session = lambda ws, transport: CallSession(
        ws, h.settings, h.stats, admission, transport, clock=h.clock)
    services.new_call = lambda output, start: Call(h.deps, output, start.sample_rate)
    return services


async def run_call(ws: FakeWebSocket) -> None:
    await asyncio.wait_for(native_call(ws), 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("second", [
    {"type": "start", "sample_rate": 8001},            # a rate not supported
    {"type": "start", "sample_rate": 16000, "encoding": "mulaw"},
    {"type": "start"},                                 # no rate at all
    {"type": "start", "sample_rate": 16000},           # the control: a valid one
    {"type": "start", "sample_rate": 48000},           # a valid one asking another rate
], ids=["bad-rate", "bad-encoding", "no-rate", "the-same", "another-rate"])
async def test_a_second_start_is_already_started_and_never_hangs_up_the_running_call(second):
    """docs/protocol.md: a second `start` is `already_started`, "stays open (ignored)". The
    endpoint parses (and validates) the message before it checks whether the call has
    started, so a second `start` whose fields are bad hangs up a running call with
    1003/1008 and an error naming the sample rate/encoding of a start that was ignored.

    Review (stop 68): a client that changes its microphone mid-call (48 kHz now) and sends
    a second `start` with the new rate got `already_started`, "this call has already
    started", and went on streaming the new rate into a call still at the old one
    (garbled, then `audio_too_fast`): nothing said the `start` was ignored, its rate not
    taken. The error now says so, and how to change the rate: a new call."""
    h = CallHarness()
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    ws.text(second)
    ws.text({"type": "stop"})
    await run_call(ws)
    assert ws.errors() == ["already_started"]
    error = next(e for e in ws.events if e["type"] == "error")
    assert "ignored" in error["message"] and "sample_rate" in error["message"], error
    assert "new call" in error["message"], error
    assert ws.closed_with == 1000
    assert services.admission.active == 0


class NotReadingWebSocket(FakeWebSocket):
    """A client whose TCP window is shut: the server's transport is paused, so every send
    (the close frame included) waits for a `writable` that never comes (uvicorn's
    websockets-sansio `send` awaits it first, for `websocket.close` too)."""

    def __init__(self, services: Any) -> None:
        super().__init__(services)
        self.close_attempts = 0

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()

    async def send_bytes(self, data: bytes) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int = 1000) -> None:
        self.close_attempts += 1
        await asyncio.Event().wait()


@pytest.mark.parametrize("last", [
    [{"text": json.dumps({"type": "stop"})}],  # the caller hangs up
    # Bad frames that close it: since stop 62 one odd-length frame no longer does (it is
    # dropped, `odd_pcm_length`, the call goes on), so it takes a flood of them past the
    # bad-message burst (1 here): too_many_bad_messages, closed 1008.
    [{"bytes": b"\x00"}] * 3,
    [{"text": json.dumps({"type": "start", "sample_rate": 16000, "metadata": []})}],
], ids=["stop", "bad-frames", "bad-start"])
async def test_a_session_of_a_client_that_stopped_reading_ends_whatever_ended_it(
        last, monkeypatch):
    """The outbox watchdog catches a client that reads nothing only after send_timeout_s
    (5 s). A call that ends before that (the caller's `stop`, bad frames that close it)
    reaches CallSession.close with outbox.closed False, and there the socket close runs
    without the _DRAIN_S bound the stuck path has: it waits for a writable transport that
    a client with a shut window never gives (a keepalive timeout's transport.close() waits
    for the same buffer to flush, so connection_lost never comes either). The handler,
    its session and the connection's buffers are held for good."""
    import gateway.call.session as session_module

    # The bound made short: the wait below is for a hang, not for the bound to pass.
    monkeypatch.setattr(session_module, "_DRAIN_S", 0.05)
    h = CallHarness(settings={"send_timeout_s": 60.0, "bad_message_burst": 1})
    services = services_for(h)
    ws = NotReadingWebSocket(services)
    if "metadata" not in last[0].get("text", ""):
        ws.text({"type": "start", "sample_rate": 16000})
    for message in last:
        ws.inbox.put_nowait({"type": "websocket.receive", **message})
    handler = asyncio.ensure_future(native_call(ws))  # type: ignore[arg-type]
    done, _ = await asyncio.wait({handler}, timeout=8)
    assert services.admission.active == 0
    try:
        assert handler in done, (f"native_call still running 8 s after the call ended "
                                 f"(close attempts: {ws.close_attempts})")
    finally:
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)


async def test_a_flood_of_tiny_valid_messages_is_closed_by_name():
    """Review (stop 60): docs/protocol.md allows audio frames of "any whole number of
    samples", and the only bound on a started call's frames is `audio_too_fast`, which
    counts audio seconds, not messages: one-sample frames pass it at 32,000 messages a
    second (2x real time at 16 kHz), as do lone `#` keys, each costing the event loop a
    receive, a parse and a feed that every other call on the replica waits behind. Nothing
    names or stops such a flood. The clock stands still: 9,000 frames of one sample are
    0.56 s of audio, within the audio budget, and must be refused as messages."""
    h = CallHarness()
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    for _ in range(9000):
        ws.audio(b"\x01\x00")
    ws.text({"type": "stop"})
    await run_call(ws)
    assert ws.errors() == ["messages_too_fast"]
    error = next(e for e in ws.events if e["type"] == "error")
    assert "1000" in error["message"] and "a second" in error["message"]
    assert ws.closed_with == 1008
    assert services.admission.active == 0


async def test_a_client_sending_small_frames_in_real_time_is_not_refused():
    # The control: 128-sample frames at 48 kHz (an AudioWorklet's render quantum, 375 a
    # second) go on; so does eight seconds' backlog of them read all at once.
    h = CallHarness()
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 48000})
    run = asyncio.ensure_future(run_call(ws))
    for second in range(10):
        for _ in range(375):
            ws.audio(b"\x00\x00" * 128)
        while not ws.inbox.empty():  # read before the clock moves on
            await asyncio.sleep(0)
        h.clock._now += 1.0
    h.clock._now += 8.0  # a stalled server: 8 s of frames wait, then are read in a burst
    for _ in range(375 * 8):
        ws.audio(b"\x00\x00" * 128)
    ws.text({"type": "stop"})
    await run
    assert ws.errors() == [] and ws.closed_with == 1000


async def test_a_message_with_a_field_it_does_not_have_is_refused_and_the_call_goes_on():
    """Review (stop 62): a field a message does not have was ignored: `{"type": "text",
    "text": "...", "fnal": false}` (a typo of `final`) was taken as a final, and ended the
    caller's turn on what was meant as a partial, with nothing said. It is now
    `invalid_message` naming the field, the message is dropped and the call goes on: the
    next message is answered, and the caller's `stop` still closes with 1000."""
    h = CallHarness(faqs={"opening hours": "We open at nine."})
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    ws.text({"type": "text", "text": "what are your", "fnal": False})
    ws.text({"type": "text", "text": "opening hours"})
    handler = asyncio.ensure_future(run_call(ws))
    for _ in range(10_000):  # until the good message's transcript is out (no clock involved)
        if any(e["type"] == "transcript" for e in ws.events) or handler.done():
            break
        await asyncio.sleep(0)
    ws.text({"type": "stop"})
    await handler
    assert ws.errors() == ["invalid_message"]
    error = next(e for e in ws.events if e["type"] == "error")
    assert '"fnal"' in error["message"], error["message"]
    assert [e["text"] for e in ws.events if e["type"] == "transcript"] == ["opening hours"]
    assert ws.closed_with == 1000
    assert services.admission.active == 0


async def _until(ws: FakeWebSocket, handler: asyncio.Future[Any], kind: str) -> None:
    for _ in range(10_000):  # until an event of that kind is out (no clock involved)
        if any(e["type"] == kind for e in ws.events) or handler.done():
            return
        await asyncio.sleep(0)


async def _one_bad_message_then_a_question(bad: dict[str, Any]) -> tuple[FakeWebSocket, Any]:
    """A running call gets ``bad`` (a raw receive message), then a question: the events
    and the harness, once the caller's `stop` has ended it."""
    h = CallHarness(faqs={"opening hours": "We open at nine."})
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    ws.audio(b"\x00\x00" * 320)
    ws.inbox.put_nowait({"type": "websocket.receive", **bad})
    ws.audio(b"\x00\x00" * 320)  # the next frame starts on a sample boundary: heard
    ws.text({"type": "text", "text": "opening hours"})
    handler = asyncio.ensure_future(run_call(ws))
    await _until(ws, handler, "transcript")
    ws.text({"type": "stop"})
    await handler
    assert services.admission.active == 0
    return ws, h


@pytest.mark.parametrize(("bad", "code", "size"), [
    ({"bytes": b"\x00" * 641}, "odd_pcm_length", "641 bytes"),
    ({"bytes": b"\x00" * (64 * 1024 + 2)}, "frame_too_large", "65536 bytes"),
    ({"text": json.dumps({"type": "text", "text": "x" * (64 * 1024)})}, "frame_too_large",
     "65536 bytes"),
], ids=["misaligned-audio", "audio-over-the-limit", "text-over-the-limit"])
async def test_one_bad_message_is_dropped_and_the_call_goes_on(bad, code, size):
    """Review (stop 62): one binary frame of an odd length (not whole 16-bit samples)
    closed a running call with 1007, the caller hung up over a few bytes. Dropping the
    frame keeps the samples aligned (each frame is whole samples on its own, the next one
    starts on a sample boundary), as `empty_audio_frame` is dropped: it is `odd_pcm_length`
    by name, counted as bad input, and the call goes on (a flood of them still meets the
    bad-message limit).

    Review (stop 62): one message over `max_frame_bytes` (64 KiB) but within the
    WebSocket layer's own limit (1 MiB) closed a running call with 1009, though the server
    had already read it whole and could simply drop it. It is `frame_too_large` by name,
    counted as bad input, and the call goes on: the next frame is heard, the next question
    answered. (Beyond 1 MiB the WebSocket layer still closes 1009 by itself.)"""
    ws, h = await _one_bad_message_then_a_question(bad)
    assert ws.errors() == [code]
    assert [e["text"] for e in ws.events if e["type"] == "transcript"] == ["opening hours"]
    assert ws.closed_with == 1000
    assert h.stats.errors[code] == 1
    error = next(e for e in ws.events if e["type"] == "error")
    assert size in error["message"] and "dropped" in error["message"], error


async def test_a_stop_over_the_frame_limit_is_dropped_unread_and_says_so():
    """Review (stop 64): docs/protocol.md said "A `stop` ends the call whatever else it
    carries", yet a `stop` over `max_frame_bytes` (64 KiB) in a running call is dropped as
    `frame_too_large` and the call goes on. That is by design (an oversized message is
    never parsed: reading it is what the limit guards against), so the doc now says a
    `stop` must fit the frame limit, and the error says the message was dropped unread,
    whatever its type, a `stop` too."""
    bad = {"text": json.dumps({"type": "stop", "metadata": "x" * (64 * 1024)})}
    ws, h = await _one_bad_message_then_a_question(bad)
    assert ws.errors() == ["frame_too_large"]
    assert [e["text"] for e in ws.events if e["type"] == "transcript"] == ["opening hours"]
    assert ws.closed_with == 1000  # the later, small `stop`
    error = next(e for e in ws.events if e["type"] == "error")
    assert "dropped unread" in error["message"] and "a `stop` too" in error["message"], error
    assert "the call goes on" in error["message"], error
    protocol = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    said = protocol[protocol.index("A `stop`\nends the call whatever else it carries"):][:400]
    assert "64 KiB" in said and "frame_too_large" in said, said


@pytest.mark.parametrize("bad", [
    {"bytes": b"\x00" * (64 * 1024 + 2)},
    {"text": json.dumps({"type": "start", "sample_rate": 16000,
                         "metadata": {"notes": "x" * (64 * 1024)}})},
], ids=["audio", "text"])
async def test_a_message_over_the_frame_limit_before_start_still_closes_1009(bad):
    """Before `start` there is no call to keep: an oversized text may be the `start`
    itself (left open, the client would wait for `ready` until the start timeout), and an
    oversized binary frame is not heard in any case. Both still close 1009 by name."""
    h = CallHarness()
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.inbox.put_nowait({"type": "websocket.receive", **bad})
    await run_call(ws)
    assert ws.errors() == ["frame_too_large"] and ws.closed_with == 1009
    assert services.admission.active == 0


async def test_a_flood_of_misaligned_frames_still_meets_the_bad_message_limit():
    """Dropping one odd-length frame keeps the call; hundreds of them are a flood, closed
    by the bad-message limit (`too_many_bad_messages`, 1008) as any other. The clock stands
    still: the burst (bad_message_burst) is all there is."""
    h = CallHarness(settings={"bad_message_burst": 50})
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    for _ in range(60):
        ws.audio(b"\x00\x00\x00")
    ws.text({"type": "stop"})
    await run_call(ws)
    errors = ws.errors()
    assert errors[-1] == "too_many_bad_messages" and set(errors[:-1]) == {"odd_pcm_length"}
    assert ws.closed_with == 1008
    assert services.admission.active == 0


# ------------------------------------------------------------- bytes of bad messages

WS_MAX = 1024 * 1024  # ws_max_size: the largest message the WebSocket layer lets through
BAD_BYTES_BUDGET = 4 * 1024 * 1024  # docs/protocol.md: bad messages' bytes, in a burst


class CountingWebSocket(FakeWebSocket):
    """Counts the messages (and their bytes) the server read off the connection."""

    def __init__(self, services: Any) -> None:
        super().__init__(services)
        self.read_messages = 0
        self.read_bytes = 0

    async def receive(self) -> dict[str, Any]:
        message = await super().receive()
        self.read_messages += 1
        self.read_bytes += len(message.get("bytes") or b"") + \
            len((message.get("text") or "").encode("utf-8", "surrogatepass"))
        return message


@pytest.mark.parametrize("frame", [
    {"bytes": b"\x00" * WS_MAX},                                        # oversized audio
    {"bytes": b"\x00" * (WS_MAX - 1)},                                  # odd, and oversized
    {"text": json.dumps({"type": "text", "text": "x" * (WS_MAX - 40)})},  # oversized text
], ids=["audio", "odd-audio", "text"])
async def test_a_flood_of_oversized_messages_is_closed_by_its_bytes_not_after_500(frame):
    """Review (stop 63): since stop 62 a running call drops a message over `max_frame_bytes`
    (64 KiB) and goes on, and the only bound on a stream of them was the bad-message count
    (`bad_message_burst`, 500, then 100 a second). Every one of them is read whole (up to
    the WebSocket layer's 1 MiB, `ws_max_size`) before it is refused, so one connection
    made the replica read about 500 MiB of garbage before it was closed, costing every call
    on it CPU and memory. Bad messages are budgeted by their bytes too: past a burst of
    4 MiB the connection is closed (`too_many_bad_messages`, 1008), with an error naming
    the bytes; the clock stands still, the burst is all there is."""
    h = CallHarness()
    services = services_for(h)
    ws = CountingWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    message = {"type": "websocket.receive", **frame}
    for _ in range(600):  # the same object: 600 MiB offered, none of it allocated here
        ws.inbox.put_nowait(message)
    ws.text({"type": "stop"})
    await run_call(ws)
    errors = ws.errors()
    assert errors[-1] == "too_many_bad_messages", (errors[-3:], len(errors), ws.read_bytes)
    # Read before the close: the burst's bytes, plus the message that went over it.
    assert ws.read_bytes <= BAD_BYTES_BUDGET + WS_MAX + 1024, ws.read_bytes
    assert ws.closed_with == 1008
    flood = next(e for e in ws.events if e.get("code") == "too_many_bad_messages")
    assert "bytes" in flood["message"] and "4 MiB" in flood["message"], flood["message"]
    assert services.admission.active == 0


async def test_an_occasional_oversized_message_is_only_dropped_for_the_whole_call():
    # The control: a 1 MiB message now and then (one every 20 s, a few back to back once)
    # is dropped with its `frame_too_large` and the call goes on to the caller's `stop`.
    h = CallHarness()
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    handler = asyncio.ensure_future(run_call(ws))
    for n in range(12):
        for _ in range(3 if n == 0 else 1):
            ws.audio(b"\x00" * WS_MAX)
        ws.audio(b"\x00\x00" * 320)
        while not ws.inbox.empty() and not handler.done():  # read before the clock moves on
            await asyncio.sleep(0)
        h.clock._now += 20.0
    ws.text({"type": "stop"})
    await handler
    assert ws.errors() == ["frame_too_large"] * 14 and ws.closed_with == 1000


async def test_a_twilio_stream_flooded_with_large_messages_is_closed_by_their_bytes():
    """Review (stop 63): a Twilio Media Stream drops a message over `max_frame_bytes`
    (`twilio_frame_too_large`) and a binary frame (`twilio_binary_frame`) and goes on,
    before `start` too: up to 500 of them, of up to 1 MiB each, read whole, before the
    bad-message count closed it. The same budget of bad bytes closes it past 4 MiB."""
    from gateway.transports.twilio import twilio_stream

    h = CallHarness(settings={"public_url": "https://gateway.example"})
    services = services_for(h)
    for frame in ({"bytes": b"\x00" * WS_MAX}, {"text": "x" * WS_MAX}):
        ws = CountingWebSocket(services)
        message = {"type": "websocket.receive", **frame}
        for _ in range(600):
            ws.inbox.put_nowait(message)
        await asyncio.wait_for(twilio_stream(ws), 10)  # type: ignore[arg-type]
        assert ws.read_bytes <= BAD_BYTES_BUDGET + WS_MAX, (frame.keys(), ws.read_bytes)
        assert ws.closed_with == 1008, ws.closed_with
        assert h.stats.errors["too_many_bad_messages"] >= 1


async def test_a_real_time_client_whose_every_frame_is_bad_is_not_closed_for_their_bytes():
    # The control: one bad frame per 20 ms (50 a second, the count's own allowance) of
    # 48 kHz audio is 96,000 bytes a second, under the bytes' rate: 200 s of them go on.
    h = CallHarness()
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 48000})
    handler = asyncio.ensure_future(run_call(ws))
    for second in range(200):
        for _ in range(50):
            ws.audio(b"\x00" * 1921)  # 20 ms and one byte: odd, dropped
        while not ws.inbox.empty() and not handler.done():  # read before the clock moves on
            await asyncio.sleep(0)
        h.clock._now += 1.0
    ws.text({"type": "stop"})
    await handler
    assert set(ws.errors()) == {"odd_pcm_length"} and ws.closed_with == 1000


async def stream_for(ws: FakeWebSocket, h: CallHarness, run: asyncio.Future[None],
                     seconds: int, frame: bytes, frames_a_second: int = 50) -> None:
    """``seconds`` of the clock, ``frames_a_second`` frames each, read as they come (until
    the call's handler ends)."""
    for _ in range(seconds):
        for _ in range(frames_a_second):
            ws.audio(frame)
        while not ws.inbox.empty() and not run.done():  # read before the clock moves on
            await asyncio.sleep(0)
        h.clock._now += 1.0


async def test_audio_declared_at_half_its_rate_is_named_and_the_call_goes_on():
    """Review (stop 68): a client whose `start` says 8000 Hz but sends 16 kHz audio (the
    commonest slip: the telephone rate declared for a microphone's audio) streams, at the
    pace it is spoken, exactly twice the audio the gateway expects. The limit,
    `audio_too_fast`, refuses only more than 2x (a real-time client catches up at up to 2x),
    so nothing was ever said: the call went on hearing every word at half speed, an octave
    down, never understood, with no error to tell the developer why. Sustained audio well
    past real time (1.5x, beyond the backlog a real-time client may bank) is now named once,
    `audio_pace_mismatch`, with the rate it sounds like; the call goes on, its stop closes
    it with 1000."""
    # No idle hang-up meanwhile; frames of at most 4 KiB, so the backlog a real-time client
    # may bank (the grace plus the largest frame) is short and the test too.
    h = CallHarness(settings={"idle_prompt_s": 0, "max_frame_bytes": 4096})
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 8000})
    run = asyncio.ensure_future(run_call(ws))
    await stream_for(ws, h, run, 10, bytes(640))  # 20 ms of 16 kHz audio each: "40 ms" at 8 kHz
    ws.text({"type": "stop"})
    await run
    assert ws.errors() == ["audio_pace_mismatch"]
    error = next(e for e in ws.events if e["type"] == "error")
    assert "8000" in error["message"] and "16000 Hz" in error["message"], error["message"]
    assert "2.0x real time" in error["message"], error["message"]
    assert ws.closed_with == 1000


async def test_audio_declared_at_a_third_of_its_rate_is_refused_naming_the_rate():
    """Review (stop 68): 48 kHz audio sent as `start` `sample_rate` 16000 arrives at 3x
    real time, and is closed as `audio_too_fast` with "stream it at the pace it is spoken",
    which the client already does: the fault, its declared rate, went unnamed. The message
    now gives the pace measured and the rate the audio sounds like."""
    h = CallHarness(settings={"idle_prompt_s": 0})  # no idle hang-up meanwhile
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    run = asyncio.ensure_future(run_call(ws))
    await stream_for(ws, h, run, 10, bytes(1920))  # 20 ms of 48 kHz audio each
    await run
    assert ws.errors() == ["audio_too_fast"]
    error = next(e for e in ws.events if e["type"] == "error")
    assert "48000 Hz" in error["message"] and "16000" in error["message"], error["message"]
    assert ws.closed_with == 1008


async def test_a_real_time_client_is_never_told_its_pace_is_off():
    """The control: real-time audio, a client sending the largest frames allowed (each a
    second's audio landing at once), and a stalled server reading 8 s of backlog in one
    burst, never hear `audio_pace_mismatch`."""
    h = CallHarness(settings={"idle_prompt_s": 0})  # no idle hang-up meanwhile
    services = services_for(h)
    ws = FakeWebSocket(services)
    ws.text({"type": "start", "sample_rate": 16000})
    run = asyncio.ensure_future(run_call(ws))
    await stream_for(ws, h, run, 20, bytes(640))
    await stream_for(ws, h, run, 20, bytes(32000), frames_a_second=1)
    h.clock._now += 8.0
    for _ in range(50 * 8):
        ws.audio(bytes(640))
    await stream_for(ws, h, run, 20, bytes(640))
    ws.text({"type": "stop"})
    await run
    assert ws.errors() == [] and ws.closed_with == 1000


async def paced_for(ws: FakeWebSocket, h: CallHarness, run: asyncio.Future[None],
                    seconds: float, frame: bytes, every_s: float = 0.02) -> None:
    """A frame every ``every_s`` of the clock, for ``seconds``, each read as it comes."""
    for _ in range(round(seconds / every_s)):
        ws.audio(frame)
        while not ws.inbox.empty() and not run.done():
            await asyncio.sleep(0)
        h.clock._now += every_s


async def test_audio_declared_at_twice_its_rate_is_named_and_the_call_goes_on():
    """Review (stop 68): a client sending 8 kHz audio under the SDK's default `start`,
    16000 Hz, streams, at the pace it is spoken, half the audio the gateway expects: every
    word is heard twice as fast, an octave up, never understood, and nothing was said (no
    limit is about audio too slow). Frames that keep coming (no pause in sending) yet carry
    half their time's audio are now named once, `audio_pace_mismatch`, with the rate the
    audio sounds like; the call goes on."""
    h = CallHarness(settings={"idle_prompt_s": 0})
    ws = FakeWebSocket(services_for(h))
    ws.text({"type": "start", "sample_rate": 16000})
    run = asyncio.ensure_future(run_call(ws))
    await paced_for(ws, h, run, 15, bytes(320))  # 20 ms of 8 kHz audio: "10 ms" at 16 kHz
    ws.text({"type": "stop"})
    await run
    assert ws.errors() == ["audio_pace_mismatch"]
    error = next(e for e in ws.events if e["type"] == "error")
    assert "0.5x real time" in error["message"] and "8000 Hz" in error["message"], error
    assert ws.closed_with == 1000


async def test_audio_too_fast_after_a_slow_stretch_gives_its_own_pace_not_the_slow_one():
    """Review (stop 68): once a call's audio had been named slow (`audio_pace_mismatch`,
    0.5x), the pace in every later message stayed that one: a client that then sent 4x
    real time was closed `audio_too_fast` "faster than 2x real time ... (0.5x real time for
    the declared 16000 Hz (it sounds like 8000 Hz audio))", a reason contradicting itself
    and naming the wrong fault. The close now gives the pace of the last seconds."""
    h = CallHarness(settings={"idle_prompt_s": 0})
    ws = FakeWebSocket(services_for(h))
    ws.text({"type": "start", "sample_rate": 16000})
    run = asyncio.ensure_future(run_call(ws))
    await paced_for(ws, h, run, 15, bytes(320))  # 0.5x: named slow
    await paced_for(ws, h, run, 15, bytes(2560))  # then 4x: closed
    await run
    assert ws.errors() == ["audio_pace_mismatch", "audio_too_fast"], ws.errors()
    closing = [e for e in ws.events if e["type"] == "error"][-1]["message"]
    assert "0.5x" not in closing and "8000 Hz" not in closing, closing
    pace = float(closing.split("(", 1)[1].split("x real time", 1)[0])
    assert pace > 2.0, closing
    assert ws.closed_with == 1008


async def test_a_client_sending_only_while_its_caller_speaks_is_not_taken_as_slow():
    """The control: audio in real time, but only while the caller speaks (a client that
    gates its microphone), pauses of seconds between, is no rate mismatch."""
    h = CallHarness(settings={"idle_prompt_s": 0})
    ws = FakeWebSocket(services_for(h))
    ws.text({"type": "start", "sample_rate": 16000})
    run = asyncio.ensure_future(run_call(ws))
    for _ in range(8):
        await paced_for(ws, h, run, 1, bytes(640))
        h.clock._now += 3.0
    ws.text({"type": "stop"})
    await run
    assert ws.errors() == [] and ws.closed_with == 1000
