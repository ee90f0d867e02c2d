"""Bad input found by a review (transports, session layer, admin seeding), each with the
clear refusal it must get and what it must not break. Each failed before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cache_seed import SeedValidationError, parse_seed_csv
from gateway.call.session import AudioRateLimit
from gateway.client import Caller
from gateway.clock import ManualClock
from gateway.server import BackgroundServer
from tests.call_harness import CallHarness

pytestmark = pytest.mark.slow

CALL_TOKEN = "review-call-token"
ADMIN_TOKEN = "review-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def guarded(settings, runtime, tmp_path_factory) -> Iterator[BackgroundServer]:
    """A gateway with a call token and the admin API on, over an empty store of its own."""
    store = tmp_path_factory.mktemp("review-store")
    srv = BackgroundServer(settings.replace(call_token=CALL_TOKEN, admin_token=ADMIN_TOKEN,
                                            store_dir=str(store), cache_poll_s=600.0),
                           runtime).start()
    yield srv
    srv.stop()


def twilio_url(server: BackgroundServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/twilio/stream"


async def messages_until_closed(ws: Any, timeout: float = 20) -> list[Any]:
    received: list[Any] = []

    async def read() -> None:
        try:
            async for message in ws:
                received.append(message)
        except ConnectionClosed:
            pass

    await asyncio.wait_for(read(), timeout)
    return received


# ---------------------------------------------------------------- Twilio `start`


async def test_twilio_media_format_number_that_overflows_int_is_refused_not_a_crash(
        server, runtime, caplog):
    """`mediaFormat.sampleRate` 1e999 is standard JSON (it parses to float inf); the
    check ``int(...)`` raises OverflowError, which ``_is_twilio_format`` does not catch
    (it catches TypeError/ValueError): the handler dies, the socket is closed 1000 as if
    Twilio had hung up normally, nothing is counted. It should be
    ``twilio_unsupported_media_format`` and 1003 like any other bad format."""
    caplog.set_level(logging.ERROR)
    before = runtime.stats.errors["twilio_unsupported_media_format"]
    async with connect(twilio_url(server)) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send('{"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1", '
                      '"callSid": "CA1", "mediaFormat": {"encoding": "audio/x-mulaw", '
                      '"sampleRate": 1e999, "channels": 1}}}')
        await messages_until_closed(ws)
        code = ws.close_code
    assert code == 1003, f"closed {code}"
    assert runtime.stats.errors["twilio_unsupported_media_format"] == before + 1


async def test_twilio_start_with_a_lone_surrogate_token_is_refused_not_a_crash(
        guarded, runtime, caplog):
    """With a call token set, a stream whose upgrade carried none must bring it in `start`.
    A `token` custom parameter of "\\ud800" (a JSON escape that JSON itself allows) used to
    reach the constant-time comparison, whose ``encode()`` raised: the handler died and
    the socket closed 1000 as if Twilio had hung up. Now the message is refused as not
    valid Unicode, counted, and the stream that never started closes 1008; and the
    comparison itself no longer raises on such a string."""
    from gateway.credentials import token_matches

    caplog.set_level(logging.ERROR)
    before = runtime.stats.errors["twilio_invalid_json"]
    async with connect(twilio_url(guarded)) as ws:
        await ws.send('{"event": "start", "streamSid": "MZ2", "start": {"streamSid": "MZ2", '
                      '"callSid": "CA2", "customParameters": {"token": "\\ud800"}}}')
        await messages_until_closed(ws)
        code = ws.close_code
    assert code == 1008, f"closed {code}"
    assert runtime.stats.errors["twilio_invalid_json"] == before + 1
    assert "Exception in ASGI application" not in caplog.text
    assert not token_matches("\ud800", CALL_TOKEN)


# ---------------------------------------------------------------- the voice webhook


def test_twilio_voice_webhook_refuses_an_oversized_body(server):
    """POST /twilio/voice reads ``await request.body()`` with no limit (the admin API
    bounds every body, this endpoint does not; uvicorn has no limit either). Without a
    Twilio auth token anyone can post here, and with one the signature is only checked
    after the whole body is buffered. A Twilio webhook form is a few KB: 8 MiB should be
    refused (413), not buffered, parsed and answered 200."""
    body = b"CallSid=CA1&From=%2B1555&Junk=" + b"x" * (8 * 1024 * 1024)
    response = httpx.post(server.base_url + "/twilio/voice", content=body, timeout=60,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413, response.status_code


# ---------------------------------------------------------------- request bodies that stall


async def test_read_body_gives_up_on_a_body_that_trickles_past_its_deadline():
    """``read_body`` read until the body ended: a client that sent its headers and then a
    byte every so often (or nothing) held the handler's task, and what it had sent, for as
    long as it liked (uvicorn bounds the wait for headers, not for the body). The body
    must have arrived in full within its deadline, however steadily it trickles."""
    from starlette.requests import Request

    from gateway.http_body import BodyTimeout, read_body

    clock = ManualClock()
    pulled = 0

    async def receive() -> dict[str, Any]:  # a byte every 10 s, never the end
        nonlocal pulled
        if pulled:
            await clock.sleep(10.0)
        pulled += 1
        return {"type": "http.request", "body": b"q", "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    reading = asyncio.create_task(read_body(request, 10_000, 60.0, clock))
    await clock.advance(59.0)
    assert not reading.done() and pulled == 6  # an idle timeout would never fire here
    await clock.advance(1.0)
    with pytest.raises(BodyTimeout, match=r"within 60 s \(6 bytes by then"):
        await asyncio.wait_for(reading, 5)
    assert clock.sleeping == 0  # nothing left waiting on the clock


def _warm_app(store_dir: Path, clock: ManualClock) -> Any:
    """A gateway app that counts as warm (no lifespan, no models) on ``clock``."""
    from types import SimpleNamespace

    from gateway.app import create_app
    from gateway.faq_cache import FaqCache
    from gateway.services import Services
    from gateway.settings import Settings
    from intents.store import LocalStore

    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(store_dir),
                              "admin_token": ADMIN_TOKEN}, environ={})
    assert settings.body_timeout_s == 60.0  # the default
    services = Services(settings, clock=clock)
    services._runtime = SimpleNamespace(stats=services.stats, load_times_s={})
    services.responder = object()
    services.cache = FaqCache(LocalStore(store_dir), embedder=None)
    return create_app(settings, services=services)


@pytest.mark.parametrize("path, content_type, error", [
    ("/admin/seed", "text/csv",
     "the upload stalled: the body did not arrive in full within 60 s (16 bytes by then; "
     "VOICEGATE_BODY_TIMEOUT_S); nothing published, the previous version keeps serving"),
    ("/admin/entries", "application/json",
     "the body did not arrive in full within 60 s (16 bytes by then; "
     "VOICEGATE_BODY_TIMEOUT_S); nothing was changed"),
    ("/twilio/voice", "application/x-www-form-urlencoded", None),
])
async def test_a_request_whose_body_stalls_gets_408_at_its_deadline(path, content_type, error,
                                                                   tmp_path):
    """An admin POST (a seed CSV, an entry) or a Twilio webhook whose client sends the
    headers and a first chunk, then nothing: answered 408 once ``body_timeout_s`` (60 s)
    has passed on the gateway's clock, not one moment before, with the reason and
    ``Connection: close`` (what is left of the body must not be read as a request); and
    counted as every refusal is, under ``body_timeout`` in /admin/stats and Prometheus
    (it was not: the operator saw no trace of stalled uploads)."""
    clock = ManualClock()
    app = _warm_app(tmp_path / "store", clock)
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"question,answer\n", "more_body": True}
        await asyncio.Event().wait()  # the client stalls: the rest never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"gateway"), (b"content-type", content_type.encode()),
               (b"authorization", ADMIN["Authorization"].encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    handling = asyncio.create_task(app(scope, receive, send))
    try:
        for _ in range(200):  # until the handler reads the body, on its deadline
            if clock.sleeping:
                break
            await asyncio.sleep(0)
        assert clock.sleeping == 1, sent
        await clock.advance(59.9)
        assert not handling.done() and sent == []
        await clock.advance(0.1)
        await asyncio.wait_for(handling, 5)
    finally:
        handling.cancel()
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert (start["type"], start["status"]) == ("http.response.start", 408), (start, body)
    assert (b"connection", b"close") in start["headers"], start["headers"]
    if error is None:  # the webhook answers in plain text, as its 413
        assert body.decode() == ("the body did not arrive in full within 60 s (16 bytes by "
                                 "then; VOICEGATE_BODY_TIMEOUT_S)")
    else:
        assert json.loads(body) == {"error": error}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        stats = (await client.get("/admin/stats")).json()
        metrics = (await client.get("/metrics")).text
    assert stats["errors"] == {"body_timeout": 1}, stats["errors"]
    assert 'voicegate_errors_total{code="body_timeout"} 1.0' in metrics, metrics


@pytest.mark.parametrize("path, content_type", [
    ("/admin/seed", "text/csv"),
    ("/admin/entries", "application/json"),
    ("/twilio/voice", "application/x-www-form-urlencoded"),
])
async def test_a_client_gone_before_its_body_arrived_is_counted_not_a_traceback(
        path, content_type, tmp_path, caplog):
    """Review (stop 66): a client that closed its connection before its body had arrived in
    full (curl interrupted mid-upload, a dropped link; anyone, on the Twilio webhook) made
    Starlette's ``ClientDisconnect`` escape the handler: uvicorn logged "Exception in ASGI
    application" with a traceback at ERROR for each, and nothing was counted. It is now
    counted as ``body_abandoned`` and logged as the other refused bodies are (one line,
    throttled, no traceback); the handler ends normally, nothing done."""
    app = _warm_app(tmp_path / "store", ManualClock())
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"question,answer\n", "more_body": True}
        return {"type": "http.disconnect"}  # the client is gone: the rest never comes

    async def send(message: dict[str, Any]) -> None:
        pass  # a real server drops what is sent to a closed connection

    headers = [(b"host", b"gateway"), (b"content-type", content_type.encode()),
               (b"content-length", b"1000"),
               (b"authorization", ADMIN["Authorization"].encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    with caplog.at_level(logging.INFO):
        await asyncio.wait_for(app(scope, receive, send), 5)  # raised ClientDisconnect
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        caplog.text
    assert (f"body_abandoned path={path} client=127.0.0.1: the client closed the connection "
            f"before its body arrived in full (16 bytes by then)") in caplog.text, caplog.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        stats = (await client.get("/admin/stats")).json()
        metrics = (await client.get("/metrics")).text
    assert stats["errors"] == {"body_abandoned": 1}, stats["errors"]
    assert 'voicegate_errors_total{code="body_abandoned"} 1.0' in metrics, metrics
    assert not (tmp_path / "store" / "CURRENT").exists()


@pytest.mark.parametrize("path, content_type, limit", [
    ("/admin/seed", "text/csv", 5 * 1024 * 1024),
    ("/admin/entries", "application/json", 1024 * 1024),
    ("/twilio/voice", "application/x-www-form-urlencoded", 64 * 1024),
])
async def test_a_body_over_its_limit_gets_413_and_is_counted(path, content_type, limit,
                                                            tmp_path, caplog):
    """An admin upload or a webhook larger than its endpoint's limit is refused 413, and
    counted as every refusal is, under ``body_too_large`` in /admin/stats and Prometheus
    (it was not: an operator whose seeds were refused for size saw no trace of them)."""
    app = _warm_app(tmp_path / "store", ManualClock())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        refused = await client.post(path, content=b"x" * (limit + 1),
                                    headers={"content-type": content_type})
        stats = (await client.get("/admin/stats")).json()
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 413, refused.text
    assert stats["errors"] == {"body_too_large": 1}, stats["errors"]
    assert 'voicegate_errors_total{code="body_too_large"} 1.0' in metrics, metrics
    assert f"body_too_large path={path} client=127.0.0.1: the body is larger than" in caplog.text


async def test_a_flood_of_refused_bodies_is_counted_in_full_and_logged_sparingly(tmp_path,
                                                                               caplog):
    """Anyone can post to the Twilio webhook: every refused body is counted, but the log
    gets one line a code every ``BODY_REFUSAL_LOG_EVERY_S`` (it got one a request), the
    next saying how many it stood for."""
    from gateway.services import BODY_REFUSAL_LOG_EVERY_S

    clock = ManualClock()
    app = _warm_app(tmp_path / "store", clock)
    big = b"x" * (64 * 1024 + 1)
    form = {"content-type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        for _ in range(50):
            assert (await client.post("/twilio/voice", content=big, headers=form)
                    ).status_code == 413
        await clock.advance(BODY_REFUSAL_LOG_EVERY_S)
        assert (await client.post("/twilio/voice", content=big, headers=form)
                ).status_code == 413
        stats = (await client.get("/admin/stats")).json()
    assert stats["errors"] == {"body_too_large": 51}, stats["errors"]
    lines = [r.getMessage() for r in caplog.records if "body_too_large" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[1].endswith("(49 more since the last line)"), lines[1]


# ---------------------------------------------------------------- native protocol


async def test_a_callers_text_with_a_lone_surrogate_is_refused_and_admin_misses_works(
        guarded, runtime):
    """`{"type": "text", "text": "... \\ud800 ..."}` is valid JSON. It used to be taken as
    a turn: a miss, kept for /admin/misses, whose grouping embeds it, and the tokenizer's
    TypeError made GET /admin/misses answer 500 for every operator until 2,000 later
    misses pushed it out. Now the message is refused (`invalid_json`, the call goes on and
    answers its next question) and never reaches the misses."""
    poisoned = "where is my card \ud800 please"
    missed_before = len(runtime.stats.missed)
    async with connect(guarded.call_url + f"?token={CALL_TOKEN}") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        await ws.send('{"type": "text", "text": "where is my card \\ud800 please"}')
        error = None
        while error is None:
            message = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                error = json.loads(message)
        assert error["code"] == "invalid_json" and "surrogate" in error["message"], error
        await ws.send(json.dumps({"type": "text", "text": "what are your opening hours"}))
        for _ in range(400):
            message = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(message, str) and json.loads(message)["type"] == "turn_metrics":
                break
        else:
            raise AssertionError("the call did not answer its next question")
        await ws.send(json.dumps({"type": "stop"}))
    assert all(m.text != poisoned for m in runtime.stats.missed)
    assert len(runtime.stats.missed) <= missed_before + 1
    response = httpx.get(guarded.base_url + "/admin/misses", headers=ADMIN, timeout=60)
    assert response.status_code == 200, (response.status_code, response.text[:200])


async def test_a_flood_of_empty_audio_frames_is_refused_or_limited(guarded):
    """A zero-byte binary frame passes ``check_audio_frame`` (0 is even), costs nothing in
    ``AudioRateLimit.add`` (0 bytes), and ``feed_audio`` drops it silently: a client can
    send them as fast as the socket goes, uncounted and unlimited. Twilio's equivalent
    (an empty `media.payload`) is refused as ``twilio_empty_media``; the native protocol
    says nothing at all."""
    async with connect(guarded.call_url + f"?token={CALL_TOKEN}") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        try:
            for _ in range(20000):
                await ws.send(b"")
        except ConnectionClosed:
            pass
        try:
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        received = await messages_until_closed(ws)
        code = ws.close_code
    errors = [json.loads(m) for m in received if isinstance(m, str)
              and json.loads(m)["type"] == "error"]
    assert errors or code != 1000, "20000 empty frames: no error, closed 1000"


class _KeptRecords(logging.Handler):
    """Every record of the loggers it is put on, at any level, whatever their propagation
    (uvicorn configures "uvicorn" not to propagate to the root logger, the gateway does the
    same for "voicegate")."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._loggers = [logging.getLogger(name) for name in names]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_KeptRecords":
        for logger in self._loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for logger in self._loggers:
            logger.removeHandler(self)


def _twilio_start(n: int) -> str:
    return json.dumps({"event": "start", "streamSid": f"MZ61{n}", "start": {
        "streamSid": f"MZ61{n}", "callSid": f"CA61utf8{n}", "accountSid": "AC61"}})


async def test_a_text_frame_that_is_not_utf8_closes_1007_with_one_log_line_not_a_traceback(
        server, runtime):
    """A text frame whose bytes are not UTF-8 (RFC 6455 requires text to be) is failed by
    uvicorn's websockets-sansio layer with 1007 (no reason) after
    ``logger.exception("Invalid UTF-8 sequence received from client.")``: a traceback at
    ERROR on "uvicorn.error" for every such connection, which any client can open again and
    again, and nothing counted. Now that line is dropped (logs.quiet_invalid_utf8) and the
    session, seeing a 1007 it did not send, counts and logs it as bad input: one WARNING
    `bad_input` line (code `invalid_utf8`, its transport and call) per connection, nothing
    at ERROR, no traceback, on both endpoints, before and after `start`; the call running
    alongside goes on untouched.

    One bad frame per connection: uvicorn closes the socket as soon as its close frame is
    written, and a client still sending then gets a TCP reset that can lose that frame
    (1006); so the client sends one and reads until the close."""
    base = server.base_url.replace("http://", "ws://")
    bad_texts = [b"\xff\xfe{}", b'{"type": "text", "text": "caf\xc3"}', b"\xc0\xaf",
                 b'{"type": "text", "text": "\xed\xa0\x80"}']
    # (endpoint, what the client sends first, the call id its log line names)
    connections = [("native", "start", None), ("native", None, None),
                   ("twilio", _twilio_start(0), "CA61utf80"), ("twilio", None, None),
                   ("native", "start", None), ("twilio", _twilio_start(1), "CA61utf81")]
    before = runtime.stats.errors["invalid_utf8"]
    closes: list[tuple[int | None, str | None]] = []
    expected: list[tuple[str, str | None]] = []
    with _KeptRecords("uvicorn.error", "uvicorn", "voicegate", "websockets") as kept:
        async with Caller(server.call_url) as healthy:
            healthy_turn = asyncio.create_task(healthy.say_text("do you have branches downtown"))
            for n, (transport, first, call_id) in enumerate(connections):
                path = "/v1/call" if transport == "native" else "/twilio/stream"
                async with connect(base + path) as ws:
                    if first == "start":
                        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
                        while call_id is None:  # the call is started: its id is known
                            message = await asyncio.wait_for(ws.recv(), 30)
                            if isinstance(message, str) and json.loads(message)["type"] == "ready":
                                call_id = json.loads(message)["call_id"]
                    elif first is not None:
                        await ws.send(first)
                    await ws.send(bad_texts[n % len(bad_texts)], text=True)
                    await messages_until_closed(ws)
                closes.append((ws.close_code, ws.close_reason))
                expected.append((transport, call_id))
                for _ in range(200):  # the session counts it as it reads the disconnect
                    if runtime.stats.errors["invalid_utf8"] >= before + n + 1:
                        break
                    await asyncio.sleep(0.05)
                assert runtime.stats.errors["invalid_utf8"] == before + n + 1, \
                    (n, transport, first, runtime.stats.errors["invalid_utf8"] - before)
            # A binary frame of odd length was the gateway's own 1007, not this refusal;
            # since stop 62 it closes nothing (dropped, `odd_pcm_length`, the call goes on):
            # counted under its own code, never as invalid_utf8, and the `stop` ends it.
            odd_before = runtime.stats.errors["odd_pcm_length"]
            async with connect(base + "/v1/call") as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
                await ws.send(b"\x00\x01\x02")
                await ws.send(json.dumps({"type": "stop"}))
                received = await messages_until_closed(ws)
            closes.append((ws.close_code, ws.close_reason))
            assert runtime.stats.errors["odd_pcm_length"] == odd_before + 1
            assert [json.loads(m)["code"] for m in received if isinstance(m, str)
                    and json.loads(m)["type"] == "error"] == ["odd_pcm_length"]
            turn = await healthy_turn
        healthy_code = healthy.closed_code
    assert closes == [(1007, "")] * len(connections) + [(1000, "")], closes
    loud = [r for r in kept.records if r.exc_info or r.levelno >= logging.ERROR]
    assert loud == [], [(r.name, r.getMessage()) for r in loud]
    assert not any("Invalid UTF-8" in r.getMessage() for r in kept.records)
    lines = [r for r in kept.records if getattr(r, "fields", {}).get("code") == "invalid_utf8"]
    assert [(r.levelno, r.getMessage()) for r in lines] == \
        [(logging.WARNING, "bad_input")] * len(connections)
    assert [(r.fields["transport"], r.fields["call_id"]) for r in lines] == expected
    assert runtime.stats.errors["invalid_utf8"] == before + len(connections)
    assert turn.first("response") is not None and turn.first("error") is None
    assert healthy_code == 1000, healthy_code


# ---------------------------------------------------------------- session limits


def test_a_real_time_client_sending_documented_max_size_frames_is_not_refused():
    """docs/protocol.md: a binary frame is "any whole number of samples up to 64 KiB",
    and only audio "sustained faster than twice real time" is refused. At 16 kHz a
    64 KiB frame is 2.048 s of audio, more than the bucket's initial ``grace_s`` (2 s):
    a client sending such frames at exactly real time is refused on its first frame
    (``audio_too_fast``, "faster than 2x real time for over 2 s", which is false). At
    8 kHz any frame over 2 s (32 000 bytes, half the allowed size) is refused the same way."""
    from gateway.settings import Settings

    clock = ManualClock()
    frame = Settings().max_frame_bytes  # the documented maximum, 2.048 s at 16 kHz
    assert frame == 64 * 1024
    # as the session builds it
    limit = AudioRateLimit(16000, 2.0, 2.0, clock, max_frame_bytes=frame)
    refused_at = None
    for n in range(10):  # 20 s of audio at exactly real time
        if limit.add(frame):
            refused_at = n
            break
        clock._now += frame / 32000
    assert refused_at is None, f"a real-time client refused at frame {refused_at}"


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_one_frame_of_the_documented_largest_size_is_heard_whole(rate):
    """docs/protocol.md accepts a binary frame of any whole number of samples up to 64 KiB
    (``max_frame_bytes``), and a Twilio `media` of up to 32,768 μ-law bytes (64 KiB as
    pcm16). The call's inbound buffer held ``inbound_buffer_ms`` (2 s) and cut what was
    over the moment audio was appended: one such frame is 4.1 s at 8 kHz, so 2.1 s of it
    was dropped (counted only, `audio_dropped`) before the gateway read any of it; 48 ms
    at 16 kHz. A backlog the gateway has not read is still cut at ``inbound_buffer_ms``."""
    from gateway.call import Call

    h = CallHarness()
    h.call = Call(h.deps, h.output, rate, call_id="test-call")
    await h.start()
    frame = bytes(h.settings.max_frame_bytes)
    h.call.feed_audio(frame)
    assert (h.call.dropped_audio_bytes, h.stats.errors["audio_dropped"]) == (0, 0), (
        f"one {len(frame)}-byte frame at {rate} Hz")
    h.call.feed_audio(frame)  # a second one before the gateway read the first: a backlog
    buffer_bytes = rate * 2 * h.settings.inbound_buffer_ms // 1000
    assert h.call.dropped_audio_bytes == len(frame) - buffer_bytes  # the oldest, first
    await h.clock.advance(0.1)  # the gateway reads what it holds
    h.call.feed_audio(frame)
    assert h.call.dropped_audio_bytes == len(frame) - buffer_bytes
    await h.stop()


async def test_keypad_collection_does_not_grow_without_bound():
    """Keys that are not `#` are appended to ``Keypad._keys`` with no limit; the queue of
    4 x max_queued_texts only bounds presses *waiting*, and the keypad loop drains it at
    once. A client pressing keys (a flood, or one every < keypad_pause_s) grows the list
    and the text handed to the agent ("the caller pressed 1 1 1 ...") without bound;
    every press is also an INFO log line. A collection should be capped (with a clear
    error or by ending it), like every other per-call input."""
    h = CallHarness(settings={"keypad_pause_s": 3})
    await h.start()
    presses = 2000
    for _ in range(presses):
        while True:
            try:
                h.call.feed_dtmf("1")  # what CallSession.feed_dtmf passes on
                break
            except asyncio.QueueFull:  # 64 waiting: let the keypad loop take them
                await h.clock.settle()
    h.call.feed_dtmf("#")
    await h.clock.settle()
    await h.wait(200)
    await h.stop()
    keys = [e["keys"] for e in h.output.of("keypad")]
    longest = max((len(k) for k in keys), default=0)
    prompt = max((len(m[-1]["content"]) for m in h.llm.requests), default=0)
    from gateway.call.keypad import MAX_COLLECTED_KEYS

    assert 0 < longest <= MAX_COLLECTED_KEYS and prompt < 4 * MAX_COLLECTED_KEYS + 100, (
        longest, prompt)


@pytest.mark.parametrize("transport", ["native", "twilio"])
async def test_a_message_over_ws_max_size_is_closed_1009_unread_and_counted(transport,
                                                                           tmp_path):
    """Review (stop 63): what bounds a single message. One over `ws_max_size` (1 MiB) is
    refused by the WebSocket layer (uvicorn, websockets-sansio) on its frame header, its
    payload never read and the gateway's code never handed it: closed 1009 with the layer's
    reason. It went uncounted (only a 1007 from that layer was): the operator saw nothing of
    the clients sent away for size. The session reads that 1009 and counts it as
    `frame_too_large`, the code a smaller oversized message gets. A message of exactly
    1 MiB is read whole and is the gateway's own (`frame_too_large` by name before `start`,
    closed 1009; a running call would drop it, within the bad-bytes budget)."""
    import threading

    import uvicorn

    from gateway.server import uvicorn_options

    app = _warm_app(tmp_path / "store", ManualClock())
    stats = app.state.services.stats
    options = uvicorn_options(app.state.services.settings)
    options.update(log_level="warning", lifespan="off")  # warm already: no models to load
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        path = "/v1/call" if transport == "native" else "/twilio/stream"
        url = f"ws://127.0.0.1:{port}{path}"
        closes = []
        # Twilio drops a binary frame of 1 MiB and waits for its `start`: only the larger.
        sizes = (1024 * 1024, 1024 * 1024 + 1) if transport == "native" else (1024 * 1024 + 1,)
        for size in sizes:
            async with connect(url, max_size=None) as ws:
                await ws.send(b"\x00" * size)
                received = await messages_until_closed(ws)
            closes.append((size, ws.close_code, [json.loads(m)["code"] for m in received]))
            if size > 1024 * 1024:
                assert ws.close_reason == "frame with 1048577 bytes exceeds limit of 1048576 " \
                                          "bytes", ws.close_reason
        for _ in range(1500):  # the session counts it as it reads the disconnect (30 s:
            # a bound on a hang; 2 s was a loaded machine's server thread's pace)
            if stats.errors["frame_too_large"] >= 1 + (transport == "native"):
                break
            await asyncio.sleep(0.02)
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 10)
    if transport == "native":  # 1 MiB: the gateway's own refusal before `start`, by name
        assert closes == [(1024 * 1024, 1009, ["frame_too_large"]),
                          (1024 * 1024 + 1, 1009, [])], closes
        assert stats.errors["frame_too_large"] == 2, stats.errors
    else:
        assert closes == [(1024 * 1024 + 1, 1009, [])], closes
        assert stats.errors["frame_too_large"] == 1, stats.errors


# ---------------------------------------------------------------- admin seeding


def test_csv_with_classic_mac_line_endings_reports_the_bad_byte_on_its_own_line():
    """A CSV saved as Excel's "CSV (Macintosh)" has CR line endings and Mac Roman bytes.
    ``_decode`` numbers lines by LF only, the csv reader by CR too: the non-UTF-8 byte of
    line 3 is reported on line 1 "at column 71", line 1 (the header) is then skipped as
    already reported, and the first data row is read as the header: two bogus "missing
    column" errors. The one true error is line 3, column 17."""
    rows = ["question,answer", "What are your hours?,We open at nine.",
            "Where is the caf\x8e?,Next door.", "How do I pay?,By card."]
    with pytest.raises(SeedValidationError) as info:
        parse_seed_csv("\r".join(rows).encode("latin-1") + b"\r", "mac.csv")
    errors = [(e.line, e.reason) for e in info.value.errors]
    assert len(errors) == 1 and errors[0][0] == 3 and "column 17" in errors[0][1], errors


def test_admin_entry_with_a_lone_surrogate_is_a_400_not_a_500(guarded):
    """POST /admin/entries with a question "\\ud800" (a JSON escape: ``json.loads``
    accepts it). ``parse_seed_rows`` encodes the rebuilt CSV with ``.encode("utf-8")``,
    which raises UnicodeEncodeError; ``post_entry`` catches BadEntry and the seed errors
    only, so the operator gets a bare 500 instead of a 400 naming the bad field."""
    body = (b'{"intent": "lost_card", "answer": "Call us to block it.", '
            b'"questions": ["I lost my card \\ud800", "my card is gone"]}')
    response = httpx.post(guarded.base_url + "/admin/entries", content=body, timeout=120,
                          headers={**ADMIN, "content-type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text[:200])


def test_admin_entry_whose_intent_the_seed_normalizes_comes_back_under_its_id(guarded):
    """POST /admin/entries with intent "Card  lost" (two spaces; a tab or a pasted
    no-break space does the same). ``parse_seed_rows`` collapses whitespace, so the entry
    is published as "Card lost", but the route looks it up under
    ``entry_id_for("Card  lost")`` (a hash of the exact name): 201 with ``"entry": null``.
    (A CSV upload refuses the no-break space outright as an invisible separator; this
    path silently renames it.) Either refuse the name or answer the entry it published."""
    body = {"intent": "Card  lost", "answer": "Call us to block it.",
            "questions": ["I lost my bank card", "my bank card was stolen"]}
    response = httpx.post(guarded.base_url + "/admin/entries", json=body, timeout=300,
                          headers=ADMIN)
    if response.status_code == 400:
        return  # refused: fine
    assert response.status_code in (200, 201), (response.status_code, response.text[:300])
    assert response.json()["entry"] is not None, response.json()


def test_a_twilio_call_sid_that_is_no_id_does_not_name_the_call():
    """The CallSid becomes the call's id, which names recording files
    (``<start>-<call id>.wav``) and every log line. An unsigned stream can send any
    string: one with "/" broke the recording (a path outside the directory's own
    files), one with a newline a log line. Only a CallSid-shaped id is used; otherwise
    the call gets a generated one (the CallSid stays in the call's metadata)."""
    from gateway.transports.twilio import call_id_from_sid

    assert call_id_from_sid("CA" + "0123456789abcdef" * 2) == "CA" + "0123456789abcdef" * 2
    for bad in ("../../etc/passwd", "CA1/../x", "CA1\nforged", "", "x" * 65, "CA 1"):
        assert call_id_from_sid(bad) is None, bad


async def test_an_upload_that_is_not_a_csv_by_its_content_type_is_a_specific_415_counted(
        tmp_path):
    """`curl -d @faq.csv` (the usual curl form) sends application/x-www-form-urlencoded
    with the file's line breaks stripped: the whole seed became one header line, and the
    operator got 44 errors "column 'account_balance' appears twice". A JSON body got "not
    CSV: ',' expected after '\"'". Neither said what was wrong, and neither (nor a body
    that is not JSON on /admin/entries) was counted, as other refusals are."""
    app = _warm_app(tmp_path / "store", ManualClock())
    faq = (Path(__file__).resolve().parents[1] / "cache_seed" / "examples" / "bank_faq.csv"
           ).read_bytes()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        form = await client.post("/admin/seed", content=faq.replace(b"\n", b""), headers={
            "content-type": "application/x-www-form-urlencoded"})
        as_json = await client.post("/admin/seed", json={"question": "q", "answer": "a"})
        not_json = await client.post("/admin/entries", content=b"{nope",
                                     headers={"content-type": "application/json"})
        stats = (await client.get("/admin/stats")).json()
        metrics = (await client.get("/metrics")).text
    for response, given in ((form, "application/x-www-form-urlencoded"),
                            (as_json, "application/json")):
        assert response.status_code == 415, (given, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert given in error and "text/csv" in error, error
        assert "--data-binary" in error and "nothing published" in error, error
    assert "no line breaks" in form.json()["error"]
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
    assert stats["errors"] == {"admin_bad_request": 3}, stats["errors"]
    assert 'voicegate_errors_total{code="admin_bad_request"} 3.0' in metrics


async def test_a_form_typed_upload_with_lone_cr_line_breaks_is_read_as_the_csv(tmp_path):
    """Excel's "CSV (Macintosh)" ends its lines with a lone CR, which the seed CSV reader
    takes (cache_seed/validate.py). Sent with `curl --data-binary @faq.csv` (no -H: a form
    type) it was refused as a body whose line breaks curl -d had stripped, 415, because
    only LF counted as a line break. curl -d strips CR too, so a CR is a line break kept."""
    app = _warm_app(tmp_path / "store", ManualClock())
    csv = b"question,answer\rWhat are your hours?,=HYPERLINK(\"x\")\r"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        response = await client.post("/admin/seed", content=csv, headers={
            "content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert [e["line"] for e in response.json()["errors"]] == [2], response.json()


async def test_every_refused_admin_request_is_counted(tmp_path):
    """Only the bodies refused for their form (not JSON, the upload's 415s) were counted as
    `admin_bad_request`; the other 400s were not: a bad target_wrong_rate, a multipart
    upload without its file, an empty upload, a CSV with bad rows, a bad entry or one whose
    rows do not validate, bad /admin/misses parameters, a bad promotion. A script sending
    any of them showed nothing in the stats."""
    app = _warm_app(tmp_path / "store", ManualClock())
    csv = {"content-type": "text/csv"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=ADMIN) as client:
        refused = {
            "target_wrong_rate": await client.post("/admin/seed?target_wrong_rate=2",
                                                   content=b"question,answer\n", headers=csv),
            "no file field": await client.post("/admin/seed", files={
                "upload": ("faq.csv", b"question,answer\nq,a\n", "text/csv")}),
            "file as text": await client.post("/admin/seed", data={"file": "question,answer"},
                                              files={"x": ("x", b"", "text/plain")}),
            "malformed multipart": await client.post("/admin/seed", content=b"q,a\n", headers={
                "content-type": "multipart/form-data"}),  # no boundary
            "empty upload": await client.post("/admin/seed", content=b" \n", headers=csv),
            "bad rows": await client.post("/admin/seed", content=b"question,answer\n=1+1,a\n",
                                          headers=csv),
            "bad entry": await client.post("/admin/entries", json=[]),
            "new entry without questions": await client.post("/admin/entries", json={
                "intent": "x", "answer": "a"}),
            "entry that does not validate": await client.post("/admin/entries", json={
                "intent": "x", "answer": "a", "questions": ["=1+1"]}),
            "misses limit": await client.get("/admin/misses?limit=x"),
            "misses threshold": await client.get("/admin/misses?threshold=2"),
            "bad promotion": await client.post("/admin/misses/promote", json={}),
        }
        stats = (await client.get("/admin/stats")).json()
        metrics = (await client.get("/metrics")).text
    for name, response in refused.items():
        assert response.status_code == 400, (name, response.status_code, response.text[:300])
    assert stats["errors"] == {"admin_bad_request": len(refused)}, stats["errors"]
    assert f'voicegate_errors_total{{code="admin_bad_request"}} {len(refused)}.0' in metrics
