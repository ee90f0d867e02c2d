"""The client SDK (gateway/client.py) when the gateway ends the call: a clear
ConnectionError saying why, at once, never a silent result or a wait for ever. Each test
dials a scripted gateway on 127.0.0.1 (websockets' own server) that speaks the native
protocol's messages for its scenario. And `voicegate call`, the SDK's own caller, when its
output's reader goes away."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from gateway.client import Caller

READY = {"type": "ready", "call_id": "c1", "sample_rate": 16000, "encoding": "pcm16",
         "frame_ms": 20}
REFUSED_RATE = {"type": "error", "code": "unsupported_sample_rate",
                "message": "sample rate 11025 Hz is not supported; use one of 8000, 16000"}
FRAME = bytes(640)  # 20 ms at 16 kHz

Script = Callable[[Any], Awaitable[None]]


@asynccontextmanager
async def scripted_gateway(script: Script) -> AsyncIterator[str]:
    """A gateway whose every connection runs ``script``; yields its call URL."""
    from websockets.asyncio.server import serve

    async with serve(script, "127.0.0.1", 0) as listener:
        port = listener.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/call"


async def after_ready(ws: Any) -> AsyncIterator[dict[str, Any]]:
    """A scripted gateway's messages after its `start` (answered `ready`), as JSON."""
    async for message in ws:
        if json.loads(message)["type"] == "start":
            await ws.send(json.dumps(READY))
            continue
        yield json.loads(message)


async def refuses_the_rate(ws: Any) -> None:
    """A `start` at a rate the gateway does not take: `error`, then 1003."""
    await ws.recv()
    await ws.send(json.dumps(REFUSED_RATE))
    await ws.close(1003)


async def hangs_up_after_ready(ws: Any) -> None:
    """The call starts, then the gateway hangs up (its goodbye said): `hangup`, 1000."""
    await ws.recv()
    await ws.send(json.dumps(READY))
    await ws.send(json.dumps({"type": "hangup", "reason": "idle"}))
    await ws.close(1000)


async def test_a_refused_start_raises_naming_the_gateways_error():
    """Review (stop 66): a `start` the gateway refused (a rate it does not take, a full
    replica, a draining one) raised only "connection closed (1003) before 'ready'": the
    `error` the gateway sent first, which says what was wrong and what to send instead, was
    left in ``caller.events`` (``voicegate call`` printed the same bare line). Now the
    exception carries it."""
    async with scripted_gateway(refuses_the_rate) as url:
        caller = Caller(url, sample_rate=11025)
        with pytest.raises(ConnectionError) as closed:
            await asyncio.wait_for(caller.connect(), 10)
        await caller.close()
    message = str(closed.value)
    assert message.startswith("connection closed (1003) before 'ready'"), message
    assert "unsupported_sample_rate" in message and REFUSED_RATE["message"] in message, message


async def test_waiting_on_a_call_the_gateway_hung_up_says_it_hung_up():
    """Review (stop 66): the same for a wait cut short by the gateway's own hang-up: the
    exception says it hung up and why (`hangup`'s reason), not only the close code."""
    async with scripted_gateway(hangs_up_after_ready) as url:
        async with Caller(url) as caller:
            with pytest.raises(ConnectionError) as closed:
                await caller.wait_for("turn_metrics", timeout=10)
    assert str(closed.value) == ("connection closed (1000) before 'turn_metrics'; the "
                                 "gateway hung up (idle)"), closed.value


async def test_a_turns_error_is_not_given_as_why_the_call_ended():
    """A stage that failed in a turn (`error` with a `turn`) leaves the call open: it is
    not named as the reason of a close that came later for no stated reason."""
    async def fails_a_turn_then_drops(ws: Any) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        await ws.send(json.dumps({"type": "error", "code": "stt_failed", "turn": 1,
                                  "message": "the recogniser failed"}))
        await ws.close(1011)

    async with scripted_gateway(fails_a_turn_then_drops) as url:
        async with Caller(url) as caller:
            with pytest.raises(ConnectionError) as closed:
                await caller.wait_for("turn_metrics", timeout=10)
    assert str(closed.value) == "connection closed (1011) before 'turn_metrics'", closed.value


async def test_speaking_on_a_call_the_gateway_hung_up_raises_every_time():
    """Review (stop 66): once the connection had closed, the line that sends the caller's
    audio stopped at its first failed send. ``stream_audio`` then returned as if the audio
    had gone out, and the next call (the next utterance: ``say``, a load generator's next
    turn) waited for ever for a line that would never drain it: bench/capacity.py's callers
    hung on a call the gateway had ended. Now each raises ConnectionError at once, saying
    why the gateway ended the call."""
    async with scripted_gateway(hangs_up_after_ready) as url:
        async with Caller(url) as caller:
            with pytest.raises(ConnectionError):  # the connection is closed
                await caller.wait_for("turn_metrics", timeout=10)
            for attempt in range(2):
                with pytest.raises(ConnectionError) as closed:
                    await asyncio.wait_for(caller.stream_audio(FRAME), 10)
                assert str(closed.value) == ("connection closed (1000) before the audio was "
                                             "sent; the gateway hung up (idle)"), attempt


async def test_audio_the_gateway_stopped_taking_midway_raises_naming_its_error():
    """Review (stop 66): the gateway closed the call while an utterance was going out (here
    `audio_too_fast`, 1008): ``stream_audio`` returned as if all of it had been sent."""
    async def closes_after_three_frames(ws: Any) -> None:
        frames = 0
        async for message in ws:
            if isinstance(message, str):
                await ws.send(json.dumps(READY))
                continue
            frames += 1
            if frames == 3:
                await ws.send(json.dumps({"type": "error", "code": "audio_too_fast",
                                          "message": "audio arrives too fast"}))
                await ws.close(1008)
                return

    async with scripted_gateway(closes_after_three_frames) as url:
        async with Caller(url) as caller:
            with pytest.raises(ConnectionError) as closed:  # 5 s of speech, cut short
                await asyncio.wait_for(caller.stream_audio(FRAME * 250), 10)
    assert str(closed.value) == ("connection closed (1008) before the audio was sent; the "
                                 "gateway's last error: audio_too_fast: audio arrives too "
                                 "fast"), closed.value


async def test_a_call_that_ends_before_the_utterance_is_answered_raises_at_once():
    """Review (stop 66): ``say`` went on waiting after the connection closed: once the
    gateway had sent a transcript of the utterance, for its whole timeout (60 s by default,
    ``voicegate call --wav``'s too), then returned the turn without its answer as if the
    call had gone on (``say_text``, whose wait raises ConnectionError, did not). Now it
    raises at once, with the gateway's error."""
    async def fails_the_call_on_the_first_frame(ws: Any) -> None:
        async for message in ws:
            if isinstance(message, str):
                await ws.send(json.dumps(READY))
                continue
            await ws.send(json.dumps({"type": "transcript", "text": "what time do you open",
                                      "final": True, "turn": 1}))
            await ws.send(json.dumps({"type": "error", "code": "internal_error",
                                      "message": "the call failed inside the gateway"}))
            await ws.close(1011)
            return

    async with scripted_gateway(fails_the_call_on_the_first_frame) as url:
        async with Caller(url) as caller:
            with pytest.raises(ConnectionError) as closed:
                await asyncio.wait_for(caller.say(FRAME, timeout=30), 10)
    assert str(closed.value) == ("connection closed (1011) before the utterance was answered; "
                                 "the gateway's last error: internal_error: the call failed "
                                 "inside the gateway"), closed.value


async def test_an_event_hook_that_raises_is_named_and_the_call_ended():
    """Review (stop 66): an exception in the caller's ``on_event`` (``voicegate call
    --json`` piped into a reader that went away: BrokenPipeError) stopped the SDK's reader
    silently. Every wait then raised "connection closed (None)", a close that had not
    happened, the hook's exception lost; the connection stayed open, unread (until the
    caller's own close, or the gateway found the client stuck). Now the wait names the
    hook's exception (chained) and the SDK closes the call itself."""
    gateway_saw: list[int | None] = []
    gateway_closed = asyncio.Event()

    async def sends_a_transcript(ws: Any) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        await ws.send(json.dumps({"type": "transcript", "text": "hello", "final": False}))
        await ws.wait_closed()
        gateway_saw.append(ws.close_code)
        gateway_closed.set()

    def hook(event: dict[str, Any]) -> None:
        if event["type"] == "transcript":
            raise BrokenPipeError(32, "Broken pipe")

    async with scripted_gateway(sends_a_transcript) as url:
        async with Caller(url, on_event=hook) as caller:
            with pytest.raises(ConnectionError) as closed:
                await caller.wait_for("turn_metrics", timeout=10)
            await asyncio.wait_for(gateway_closed.wait(), 10)  # closed by the SDK itself
    assert str(closed.value) == ("connection closed (1000) before 'turn_metrics'; the client "
                                 "closed it: reading raised BrokenPipeError(32, 'Broken pipe') "
                                 "(in on_event or on_audio, or a message that is not JSON)"
                                 ), closed.value
    assert isinstance(closed.value.__cause__, BrokenPipeError)
    assert gateway_saw == [1000]


async def test_audio_still_going_out_when_the_caller_hangs_up_raises_not_waits_for_ever():
    """Review (stop 66): ``close()`` stopped the line while another task's ``stream_audio``
    (or ``say``) still had audio going out: nothing ever woke that wait (the line's stop is
    a cancel, which ends it without marking the audio gone), so the task waited for ever.
    Now it raises ConnectionError as soon as the call is closed."""
    async def keeps_the_call(ws: Any) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        async for _ in ws:
            pass

    async with scripted_gateway(keeps_the_call) as url:
        caller = Caller(url)
        await caller.connect()
        speaking = asyncio.create_task(caller.stream_audio(FRAME * 250))  # 5 s of speech
        await asyncio.sleep(0)  # its line started
        await caller.close()
        with pytest.raises(ConnectionError) as closed:
            await asyncio.wait_for(speaking, 10)
    assert str(closed.value).startswith("connection closed (1000) before the audio was sent"), \
        closed.value


@pytest.mark.parametrize("failure", ["no-ready-in-time", "cancelled", "refused"])
async def test_a_connect_that_fails_closes_the_socket_and_reader_it_opened(failure: str):
    """Review (stop 67): a ``connect`` that failed once its socket was open (no `ready`
    within its timeout, a cancel) left the WebSocket and its reader task open, a leak in any
    program that retries; now it closes both before the error propagates, which stays
    specific (what was waited for, how long). A gateway's `error` and close leaves none too."""
    started = asyncio.Event()
    handlers: list[asyncio.Task[Any]] = []
    gateway_saw: list[int | None] = []

    async def never_ready(ws: Any) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        await ws.recv()  # the `start`
        started.set()
        if failure == "refused":
            await ws.send(json.dumps(REFUSED_RATE))
            await ws.close(1003)
        await ws.wait_closed()
        gateway_saw.append(ws.close_code)

    async with scripted_gateway(never_ready) as url:
        before = asyncio.all_tasks()
        caller = Caller(url)
        # Only the timeout's case is timed: a cancel or a refusal that a loaded machine
        # delivers later than 0.1 s must not be overtaken by the `ready` timeout.
        ready_timeout = 0.1 if failure == "no-ready-in-time" else 30
        connecting = asyncio.create_task(caller.connect(ready_timeout=ready_timeout))
        if failure == "cancelled":
            await asyncio.wait_for(started.wait(), 10)
            connecting.cancel()
        raised = {"no-ready-in-time": TimeoutError, "cancelled": asyncio.CancelledError,
                  "refused": ConnectionError}[failure]
        with pytest.raises(raised) as failed:
            await asyncio.wait_for(connecting, 10)
        await asyncio.wait_for(asyncio.gather(*handlers), 10)  # the gateway saw the close
        for _ in range(3):  # let cancelled tasks (the connection's keepalive) finish
            await asyncio.sleep(0)
        left = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert gateway_saw == [1003 if failure == "refused" else 1000]
    assert left == set(), left
    assert caller._reader is not None and caller._reader.done()
    if failure == "no-ready-in-time":
        assert str(failed.value) == "no 'ready' event within 0.1s", failed.value


TURN_METRICS = {"type": "turn_metrics", "turn": 1, "reply_latency_ms": 120.0}


@pytest.mark.parametrize("reader_goes", ["mid-turn", "at-the-turns-end"])
def test_call_command_whose_reader_stops_reading_stops_quietly(
        reader_goes: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review (stop 67): `voicegate call --json | head -1` ended on "connection closed
    (1000) before 'turn_metrics'; the client closed it: reading raised BrokenPipeError" (or,
    the pipe gone at the turn's last event, status 0) and Python's "Exception ignored"
    line. Now the call is ended and the command stops as `route` does: quietly, status 1."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    from gateway import cli
    from tests.fakes.reader_gone import ReaderGone

    turn = [TURN_METRICS] if reader_goes == "at-the-turns-end" else [
        {"type": "transcript", "text": "hello", "final": True, "turn": 1},
        {"type": "response", "turn": 1, "source": "cache", "text": "Hi."}, TURN_METRICS]
    gateway_saw: list[int | None] = []
    call_over = threading.Event()

    def answers_one_turn(ws: Any) -> None:
        try:
            ws.recv()  # `start`
            ws.send(json.dumps(READY))
            ws.recv()  # the caller's text
            for event in turn:
                ws.send(json.dumps(event))
            for _ in ws:
                pass
        except ConnectionClosed:
            pass
        finally:
            gateway_saw.append(ws.close_code)
            call_over.set()

    stdout = ReaderGone()
    with serve(answers_one_turn, "127.0.0.1", 0) as gateway:
        listening = threading.Thread(target=gateway.serve_forever, daemon=True)
        listening.start()
        url = f"ws://127.0.0.1:{gateway.socket.getsockname()[1]}/v1/call"
        monkeypatch.setattr(sys, "stdout", stdout)
        try:
            code = cli.main(["call", url, "--text", "hello", "--json", "--timeout", "10"])
        except BrokenPipeError as exc:
            pytest.fail(f"`voicegate call --json | head -1` raised {exc!r}")
        assert call_over.wait(10)
        gateway.shutdown()
    listening.join(10)
    assert capsys.readouterr().err == ""
    assert code == 1
    assert json.loads("".join(stdout.out)) == READY
    assert stdout.refused == 1  # nothing printed after the reader was gone
    assert gateway_saw == [1000]  # the call was ended, not left open


@pytest.mark.parametrize("code", ["frame_too_large", "invalid_json", "too_many_messages"])
async def test_a_text_the_gateway_refuses_raises_its_error_at_once(code):
    """Review (stop 68): a text the gateway drops (over 64 KiB: `frame_too_large`; a lone
    surrogate, which json.dumps escapes: `invalid_json`; 16 already waiting:
    `too_many_messages`) gets an `error` and no turn, the call going on. ``say_text`` waited
    for that turn's `turn_metrics` for its whole timeout (60 s by default, `voicegate call
    --text` too), then raised "no 'turn_metrics' event within 60s", the gateway's own word
    on what was wrong left in ``caller.events``. Now it raises MessageRefused with the
    gateway's code and message at once."""
    from gateway.client import MessageRefused
    from gateway.protocol import LONE_SURROGATE, too_large

    # Each text as the gateway refuses it, with its own words (stop 69: the client blames
    # on its text only a refusal that can be that text's).
    text = {"frame_too_large": "what are your opening hours " * 3000,
            "invalid_json": "what are your opening hours \ud800",
            "too_many_messages": "what are your opening hours"}[code]
    said: list[str] = []

    async def refuses_texts(ws: Any) -> None:
        async for message in ws:
            if json.loads(message).get("type") == "start":
                await ws.send(json.dumps(READY))
            elif json.loads(message).get("type") == "text":
                said.append({"frame_too_large": too_large(
                                 "text message", len(message.encode("utf-8")), 65536,
                                 started=True).message,
                             "invalid_json": LONE_SURROGATE,
                             "too_many_messages": "16 text messages are already waiting; "
                                                  "this one was dropped"}[code])
                await ws.send(json.dumps({"type": "error", "code": code,
                                          "message": said[-1]}))

    async with scripted_gateway(refuses_texts) as url:
        async with Caller(url) as caller:
            with pytest.raises(MessageRefused) as refused:
                await asyncio.wait_for(caller.say_text(text, timeout=30), 5)
    assert (refused.value.code, refused.value.message) == (code, said[-1])
    assert code in str(refused.value)


@pytest.mark.parametrize("earlier", ["malformed", "key", "audio-frame", "longer-text"])
async def test_a_refusal_of_an_earlier_message_is_not_blamed_on_the_text(earlier: str):
    """Review (stop 69): ``say_text`` raised MessageRefused for any refusal (an `error` of
    no turn with a code that drops a message) that arrived once it had begun, though the
    gateway names no message it refuses: a message sent just before (a malformed one, a
    key while too many wait, an audio frame or another text over 64 KiB), refused after
    the text went out, was blamed on the text, whose turn then came unread. A refusal is
    now blamed on the text only when it can be the text's (the size it names, a lone
    surrogate for invalid JSON, a text's own too_many_messages), and its turn is
    returned."""
    from gateway.protocol import too_large

    before = {"malformed": ({"type": "hello"}, "unknown_message_type",
                            'unknown message type "hello"; expected start, text, dtmf or stop'),
              "key": ({"type": "dtmf", "digit": "5"}, "too_many_messages",
                      "too many keypad presses are waiting; this one was dropped"),
              "audio-frame": (bytes(70000), "frame_too_large",
                              too_large("audio frame", 70000, 65536, started=True).message),
              "longer-text": ({"type": "text", "text": "x" * 70000, "final": True},
                              "frame_too_large", too_large("text message", 70043, 65536,
                                                           started=True).message)}[earlier]
    message, code, why = before

    async def refuses_the_earlier_message_late(ws: Any) -> None:
        refusal = None
        async for received in ws:
            kind = json.loads(received).get("type") if isinstance(received, str) else None
            if kind == "start":
                await ws.send(json.dumps(READY))
            elif refusal is None:  # the earlier message: its refusal goes out after the text
                refusal = {"type": "error", "code": code, "message": why}
            elif kind == "text":
                await ws.send(json.dumps(refusal))
                for event in ({"type": "transcript", "text": "hello", "final": True},
                              {"type": "response", "turn": 1, "source": "cache", "text": "Hi."},
                              {"type": "turn_metrics", "turn": 1, "input": "text"}):
                    await ws.send(json.dumps(event))

    if earlier == "longer-text":  # the size the gateway names is this message's
        assert len(json.dumps(message)) == 70043
    async with scripted_gateway(refuses_the_earlier_message_late) as url:
        async with Caller(url) as caller:
            if isinstance(message, bytes):
                await caller.send_raw(message)
            else:
                await caller.send_json(message)
            turn = await asyncio.wait_for(caller.say_text("hello", timeout=30), 10)
    assert turn.number == 1 and turn.first("response")["text"] == "Hi."
    assert turn.first("error", code=code) is not None  # kept among the events


@pytest.mark.parametrize("gateway_hears", ["nothing", "words-but-never-answers"])
def test_call_command_whose_utterance_gets_no_answer_says_so_and_fails(
        gateway_hears: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Review (stop 68): `voicegate call --wav FILE` against a gateway that took the call
    but never answered the utterance (no transcript at all, or a transcript and then no
    turn) printed nothing more and exited 0, as a call that was answered does: ``say()``
    returns its events with no turn when its wait runs out (``say_text`` raises). Now the
    command says on stderr that no reply came, and exits 1."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    from gateway import cli
    from gateway.audio import write_wav

    def never_answers(ws: Any) -> None:
        try:
            ws.recv()  # `start`
            ws.send(json.dumps(READY))
            if gateway_hears != "nothing":
                ws.recv()  # the utterance's first frame: its words are heard
                ws.send(json.dumps({"type": "transcript", "text": "hello", "final": True,
                                    "turn": 1}))
            for _ in ws:  # the caller's audio, then its line's silence: never a reply
                pass
        except ConnectionClosed:
            pass

    wav = tmp_path / "question.wav"
    write_wav(wav, b"\x10\x00" * 1600, 16000)  # 0.1 s
    with serve(never_answers, "127.0.0.1", 0) as gateway:
        listening = threading.Thread(target=gateway.serve_forever, daemon=True)
        listening.start()
        url = f"ws://127.0.0.1:{gateway.socket.getsockname()[1]}/v1/call"
        code = cli.main(["call", url, "--wav", str(wav), "--timeout", "1"])
        gateway.shutdown()
    listening.join(10)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"voicegate call: no reply to --wav {wav}"), err
    if gateway_hears == "nothing":
        assert "heard no words" in err, err
    else:
        assert "within --timeout 1 s" in err and "'hello'" in err, err


@pytest.mark.parametrize("code", ["overloaded", "draining"])
def test_call_command_refused_with_503_says_the_gateways_own_reason(
        code: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Review (stop 68): `voicegate call` refused with HTTP 503 said "the gateway is still
    loading or is shutting down; try again" whatever the 503 was, and since the overload
    gate (gateway/overload.py) a 503 is mostly `overloaded`, a replica running and behind
    on its calls: the operator was sent looking at start-up and shutdowns. The gateway's
    own body (`error`, `message`) is now what the command says."""
    from websockets.sync.server import serve

    from gateway import cli

    message = {"overloaded": "this replica is behind on the calls it has",
               "draining": "this replica is shutting down; use another"}[code]

    def refuses(connection: Any, request: Any) -> Any:
        response = connection.respond(503, json.dumps({"error": code, "message": message}))
        response.headers["Content-Type"] = "application/json"
        return response

    with serve(lambda ws: None, "127.0.0.1", 0, process_request=refuses) as gateway:
        listening = threading.Thread(target=gateway.serve_forever, daemon=True)
        listening.start()
        url = f"ws://127.0.0.1:{gateway.socket.getsockname()[1]}/v1/call"
        exit_code = cli.main(["call", url, "--text", "hello", "--timeout", "10"])
        gateway.shutdown()
    listening.join(10)
    err = capsys.readouterr().err
    assert exit_code == 1
    assert "HTTP 503" in err and code in err and message in err, err
    assert "still loading" not in err, err


OVERLOADED = ("this replica is behind on the calls it has and takes no new one until it "
              "catches up; retry shortly or use another")


@pytest.mark.parametrize(("status", "body", "headers", "error", "said"), [
    (503, {"error": "overloaded", "message": OVERLOADED}, {"Retry-After": "1"}, "overloaded",
     f"the gateway refused the call (HTTP 503): overloaded: {OVERLOADED}"),
    (503, {"error": "not_ready", "message": "models are still loading"}, {"Retry-After": "2"},
     "not_ready", "the gateway refused the call (HTTP 503): not_ready: models are still loading"),
    # The gateway's 403 (a missing or wrong call token) has no body: its status says why.
    (403, None, {}, None, "the gateway refused the call (HTTP 403): it takes calls that "
                          "carry its call token (VOICEGATE_CALL_TOKEN), and this one carried "
                          "none or another"),
    # A proxy's page is no word of the gateway's: the status alone, and the body unread.
    (503, "<html>Service Unavailable</html>", {}, None,
     "the gateway refused the call (HTTP 503): it is still loading, shutting down or "
     "overloaded; try again"),
], ids=["overloaded", "not-ready", "unauthorized", "a-proxys-page"])
async def test_a_call_the_gateway_refuses_raises_its_status_and_reason(
        status: int, body: Any, headers: dict[str, str], error: str | None, said: str) -> None:
    """Review (stop 70): a call refused at its upgrade (HTTP 403 without the call token;
    503 while the replica loads, drains or is overloaded) raised websockets' own
    InvalidStatus, "server rejected WebSocket connection: HTTP 503": the gateway's reason
    (its body's `error` and `message`, its Retry-After) was left inside the response, where
    only `voicegate call` looked. It now raises CallRefused, a ConnectionError like every
    other way a call ends, carrying the status, the gateway's `error` and `message` and
    ``retry_after_s``, and saying them; still an InvalidStatus (its ``response``) for code
    that caught that."""
    from websockets.asyncio.server import serve
    from websockets.exceptions import InvalidStatus

    def refuses(connection: Any, request: Any) -> Any:
        text = json.dumps(body) if isinstance(body, dict) else body or ""
        response = connection.respond(status, text)
        for name, value in headers.items():
            response.headers[name] = value
        return response

    async with serve(lambda ws: None, "127.0.0.1", 0, process_request=refuses) as gateway:
        url = f"ws://127.0.0.1:{gateway.sockets[0].getsockname()[1]}/v1/call"
        caller = Caller(url)
        with pytest.raises(ConnectionError) as refused:
            await caller.connect()
    exc: Any = refused.value
    assert type(exc).__name__ == "CallRefused", repr(exc)
    assert (exc.status, exc.error) == (status, error)
    assert exc.message == (body["message"] if isinstance(body, dict) else None)
    assert exc.retry_after_s == (float(headers["Retry-After"]) if headers else None)
    assert str(exc) == said
    assert isinstance(exc, InvalidStatus) and exc.response.status_code == status
    assert caller._ws is None and caller._reader is None  # nothing opened, nothing to close


async def test_a_refusal_with_its_retry_after_given_twice_still_raises_call_refused() -> None:
    """Review (stop 70): a 503 refusal carrying Retry-After twice (a proxy in front adds its
    own beside the gateway's) made ``connect`` raise websockets' MultipleValuesError, a
    LookupError, while reading the wait for CallRefused: neither the CallRefused nor the
    InvalidStatus a program catches, and `voicegate call` ended in a traceback. It is
    CallRefused with its reason; two waits are no one wait (``retry_after_s`` None, as the
    provider adapters read a header given twice)."""
    from websockets.asyncio.server import serve

    def refuses(connection: Any, request: Any) -> Any:
        response = connection.respond(503, json.dumps({"error": "overloaded",
                                                       "message": OVERLOADED}))
        response.headers["Retry-After"] = "1"  # the gateway's
        response.headers["Retry-After"] = "5"  # a proxy's: Headers keeps both
        return response

    async with serve(lambda ws: None, "127.0.0.1", 0, process_request=refuses) as gateway:
        url = f"ws://127.0.0.1:{gateway.sockets[0].getsockname()[1]}/v1/call"
        with pytest.raises(ConnectionError) as refused:
            await Caller(url).connect()
    exc: Any = refused.value
    assert type(exc).__name__ == "CallRefused", repr(exc)
    assert (exc.status, exc.error, exc.retry_after_s) == (503, "overloaded", None)
    assert str(exc) == f"the gateway refused the call (HTTP 503): overloaded: {OVERLOADED}"


@pytest.mark.parametrize("gateway_hears", ["nothing", "noise", "words-but-never-answers"])
async def test_say_that_gets_no_reply_raises_saying_what_came(gateway_hears: str):
    """Review (stop 69): ``say()`` returned a result with no turn (number 0, no audio) when
    no reply came, as if the utterance had been answered with silence: the gateway heard no
    words in it (no transcript), or heard some and ended no turn within ``timeout``. Only
    `voicegate call` looked at ``number``; the demo wrote an empty reply-N.wav, an SDK
    program went on. Noise heard as speech (its turn ended empty) was waited on for the
    whole timeout. Now each raises NoReply (a TimeoutError) saying which, what came of the
    utterance kept in its ``result``; the noise's at once the line is quiet."""
    from gateway.client import NoReply

    heard = {"nothing": [],
             "noise": [{"type": "transcript", "text": "", "final": True, "turn": 1},
                       {"type": "turn_metrics", "turn": 1, "input": "audio", "empty": True}],
             "words-but-never-answers": [
                 {"type": "transcript", "text": "hello", "final": False},
                 {"type": "transcript", "text": "hello", "final": True, "turn": 1}]}[gateway_hears]

    async def never_answers(ws: Any) -> None:
        async for message in ws:
            if isinstance(message, str):
                await ws.send(json.dumps(READY))
            elif heard:
                for event in heard:  # at the utterance's first frame
                    await ws.send(json.dumps(event))
                heard.clear()

    timeout = 1 if gateway_hears == "words-but-never-answers" else 30
    async with scripted_gateway(never_answers) as url:
        async with Caller(url) as caller:
            with pytest.raises(NoReply) as no_reply:
                await asyncio.wait_for(caller.say(FRAME * 5, timeout=timeout,
                                                  nothing_heard_ms=300), 10)
    assert isinstance(no_reply.value, TimeoutError)
    result, message = no_reply.value.result, str(no_reply.value)
    assert result.number == 0 and not result.audio
    if gateway_hears == "nothing":
        assert message == ("no reply: the gateway heard no words in the utterance (no "
                           "transcript came within 300 ms of its end)"), message
    elif gateway_hears == "noise":
        assert message == ("no reply: the gateway heard no words in the utterance (its turn "
                           "1 ended empty: noise)"), message
        assert result.first("turn_metrics", empty=True) is not None
    else:
        assert message == ("no reply to the utterance within 1 s (the gateway heard 'hello'; "
                           "no reply began)"), message
        assert result.transcript == "hello"


async def test_a_caller_connected_again_is_a_new_call_not_the_last_ones():
    """Review (stop 69): ``connect()`` again on a Caller closed after a call (a program
    that retries, as connect's docstring has it, or dials the next call) kept the last
    call's state: its wait for `ready` returned the last call's at once (``ready`` named
    the old call, before the new one had started, or one refused), the line that had sent
    the last call's audio was over, so every ``stream_audio``/``say`` raised at once with
    the last call's hang-up as the reason, and a close of the new call before it said why
    was blamed on an earlier one's `error`. Each connect is now a call of its own: its
    events, audio and line; connecting one still open is refused (its socket and reader
    would leak)."""
    calls: list[str] = []
    frames: dict[str, int] = {}

    async def four_calls(ws: Any) -> None:
        call_id = f"c{len(calls) + 1}"
        calls.append(call_id)
        await ws.recv()  # `start`
        if call_id == "c2":  # refused: full
            await ws.send(json.dumps({"type": "error", "code": "too_many_calls",
                                      "message": "this gateway is at its limit"}))
            await ws.close(1013)
            return
        if call_id == "c3":  # dropped, no reason given
            await ws.close(1011)
            return
        await ws.send(json.dumps({**READY, "call_id": call_id}))
        async for message in ws:
            if isinstance(message, bytes):
                frames[call_id] = frames.get(call_id, 0) + 1
                if call_id == "c1" and frames[call_id] == 3:  # the bot hangs up
                    await ws.send(json.dumps({"type": "hangup", "reason": "idle"}))
                    await ws.close(1000)
                    return

    async with scripted_gateway(four_calls) as url:
        caller = Caller(url)
        await asyncio.wait_for(caller.connect(), 10)
        await asyncio.wait_for(caller.stream_audio(FRAME * 3), 10)
        with pytest.raises(ConnectionError):  # hung up
            await caller.wait_for("turn_metrics", timeout=10)
        await caller.close()
        with pytest.raises(ConnectionError, match="too_many_calls"):  # c2: refused
            await asyncio.wait_for(caller.connect(), 10)
        with pytest.raises(ConnectionError) as dropped:  # c3: closed, saying nothing
            await asyncio.wait_for(caller.connect(), 10)
        await asyncio.wait_for(caller.connect(), 10)  # c4: taken
        try:
            assert caller.ready is not None and caller.ready["call_id"] == "c4", caller.ready
            assert [e["type"] for e in caller.events] == ["ready"], caller.events
            await asyncio.wait_for(caller.stream_audio(FRAME * 3), 10)  # goes out
            with pytest.raises(RuntimeError, match="close"):  # still open: not dialled again
                await caller.connect()
        finally:
            await caller.close()
    assert str(dropped.value) == "connection closed (1011) before 'ready'", dropped.value
    assert calls == ["c1", "c2", "c3", "c4"] and frames.get("c4", 0) >= 3, (calls, frames)


@pytest.mark.parametrize("ending", ["refused-rate", "full", "hung-up", "lost"])
async def test_a_call_that_closes_says_its_close_code_and_the_gateways_code_as_values(
        ending: str):
    """Review (stop 69): a call the gateway closed raised a bare ConnectionError whose
    words alone held the close code and the gateway's error code: a program that retries
    a full or draining replica (1013: too_many_calls, draining), and not a `start` it must
    fix (1003: unsupported_sample_rate), or dials again after a hang-up, had to parse
    English. Now CallClosed, a ConnectionError, carries them: ``close_code``, ``error``
    (the gateway's code) and ``hangup`` (its reason)."""
    from gateway.client import CallClosed

    async def full(ws: Any) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "error", "code": "too_many_calls",
                                  "message": "this gateway is at its limit"}))
        await ws.close(1013)

    async def lost(ws: Any) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        await ws.send(json.dumps({"type": "error", "code": "stt_failed", "turn": 1,
                                  "message": "a turn's stage: the call goes on"}))
        ws.transport.abort()  # no close frame: 1006

    script = {"refused-rate": refuses_the_rate, "full": full, "hung-up": hangs_up_after_ready,
              "lost": lost}[ending]
    async with scripted_gateway(script) as url:
        caller = Caller(url, sample_rate=11025 if ending == "refused-rate" else 16000)
        try:
            with pytest.raises(CallClosed) as closed:
                await asyncio.wait_for(caller.connect(), 10)
                await caller.wait_for("turn_metrics", timeout=10)
        finally:
            await caller.close()
    assert isinstance(closed.value, ConnectionError)
    expected = {"refused-rate": (1003, "unsupported_sample_rate", None),
                "full": (1013, "too_many_calls", None), "hung-up": (1000, None, "idle"),
                "lost": (1006, None, None)}[ending]
    assert (closed.value.close_code, closed.value.error, closed.value.hangup) == expected


async def test_a_message_sent_on_a_closed_call_raises_why_it_closed():
    """Review (stop 69): ``say_text`` (``send_json``, ``send_transcript``) on a call the
    gateway had ended raised the WebSocket library's own ConnectionClosedOK ("received
    1000 (OK); then sent 1000 (OK)"), no ConnectionError, the gateway's reason (its
    `hangup`) left out, where ``say`` and ``stream_audio`` say it (stop 66). Now the same
    CallClosed as every wait."""
    from gateway.client import CallClosed

    async with scripted_gateway(hangs_up_after_ready) as url:
        async with Caller(url) as caller:
            with pytest.raises(ConnectionError):
                await caller.wait_for("turn_metrics", timeout=10)
            for send in (lambda: caller.say_text("hello", timeout=10),
                         lambda: caller.send_json({"type": "dtmf", "digit": "1"})):
                with pytest.raises(CallClosed) as closed:
                    await asyncio.wait_for(send(), 10)
                assert (closed.value.close_code, closed.value.hangup) == (1000, "idle")
                assert str(closed.value) == ("connection closed (1000) before the message "
                                             "was sent; the gateway hung up (idle)"), closed.value


@pytest.mark.parametrize("before", ["superseded-words", "noise"])
async def test_say_text_returns_its_texts_turn_not_a_spoken_one_that_ended_first(before: str):
    """Review (stop 69): ``say_text`` returned at the first `turn_metrics` after it began,
    whichever turn they were: the caller's spoken words the text superseded (the gateway
    ends their turn, unanswered, before the text's: docs/protocol.md), or noise on the
    line heard as speech (an empty turn). The result then held no reply (``number`` that
    turn's, or 0), and the text's answer came after it, unread. It now waits for its text
    turn's metrics (``input`` text, not empty)."""
    spoken = {"superseded-words": [{"type": "turn_metrics", "turn": 1, "input": "audio",
                                    "end_of_turn": "complete"}],
              "noise": [{"type": "transcript", "text": "", "final": True, "turn": 1},
                        {"type": "turn_metrics", "turn": 1, "input": "audio",
                         "empty": True}]}[before]
    answer = [{"type": "transcript", "text": "what time do you open", "final": True},
              {"type": "route", "turn": 2, "text": "what time do you open", "hit": True,
               "action": "answer", "intent": "opening_hours", "score": 0.9},
              {"type": "response", "turn": 2, "source": "cache", "text": "We open at nine."},
              {"type": "turn_metrics", "turn": 2, "input": "text", "source": "cache"}]
    spoken_ended = asyncio.Event()  # the client has read the spoken turn's end

    async def ends_the_spoken_turn_first(ws: Any) -> None:
        async for _ in after_ready(ws):
            for event in spoken:
                await ws.send(json.dumps(event))
            await spoken_ended.wait()
            for event in answer:
                await ws.send(json.dumps(event))

    def read(event: dict[str, Any]) -> None:
        if event["type"] == "turn_metrics" and event["turn"] == 1:
            spoken_ended.set()

    async with scripted_gateway(ends_the_spoken_turn_first) as url:
        async with Caller(url, on_event=read) as caller:
            turn = await asyncio.wait_for(caller.say_text("what time do you open",
                                                          timeout=30), 10)
    assert turn.number == 2, turn.events
    assert turn.first("response") is not None
    assert turn.first("response")["text"] == "We open at nine."
    assert turn.metrics is not None and turn.metrics["input"] == "text"


async def test_say_text_returns_the_spoken_turn_its_text_was_carried_into():
    """Review (stop 69, the whole-change review): a text the caller's speech stopped before
    its reply spoke is carried into the next spoken turn, which asks it with those words
    and sends the only `turn_metrics` (``input`` audio; docs/protocol.md). ``say_text``,
    waiting for metrics of ``input`` text alone, ran to its timeout though the text was
    answered. It returns that turn; a spoken turn without the text still is not its."""
    events = [{"type": "transcript", "text": "what time do you open", "final": True},
              {"type": "transcript", "text": "uh", "final": False},
              {"type": "transcript", "text": "what time do you open uh on sunday",
               "final": True, "turn": 3},
              {"type": "response", "turn": 3, "source": "agent", "text": "At ten on Sundays."},
              {"type": "turn_metrics", "turn": 3, "input": "audio"}]

    async def carries_the_text(ws: Any) -> None:
        async for _ in after_ready(ws):
            for event in events:
                await ws.send(json.dumps(event))

    async with scripted_gateway(carries_the_text) as url:
        async with Caller(url) as caller:
            turn = await asyncio.wait_for(caller.say_text("What time do you open",
                                                          timeout=30), 10)
    assert turn.number == 3, turn.events
    assert turn.first("response")["text"] == "At ten on Sundays."


def test_a_results_metrics_are_its_own_turns():
    """Review (stop 69): ``TurnResult.metrics`` gave the first non-empty `turn_metrics` in
    the result, not its own turn's: a ``say`` whose words were cut off at a pause and
    continued in turn 2 reported turn 1's metrics (its reply cut, ``interrupted``) for
    turn 2's answer, a ``say_text`` those of the spoken turn its text superseded."""
    from gateway.client import TurnResult

    events = [{"type": "interrupt", "turn": 1, "cause": "speech"},
              {"type": "turn_metrics", "turn": 1, "interrupted": True},
              {"type": "turn_metrics", "turn": 2, "interrupted": False, "continues": True}]
    assert TurnResult(number=2, events=events).metrics == events[2]
    assert TurnResult(number=0, events=events[:2]).metrics is None


WORDS = b"\x01\x00" * 320  # a 20 ms frame of speech (the line's silence is all zeros)
MORE_WORDS = b"\x02\x00" * 320


@pytest.mark.parametrize("second", ["answered", "noise"])
async def test_say_over_a_reply_still_playing_is_not_answered_by_that_reply(second: str):
    """Review (stop 70): a ``say()`` begun while the last turn's reply still played (a
    barge-in, as bench/soak.py and bench/chaos.py speak) returned at once when that reply
    ended just after the utterance began (its `turn_metrics` came, no `interrupt`: the
    speech was not heard yet): the earlier turn's end was taken for the utterance's
    answer, its number, metrics and audio given as the result, with no transcript of the
    utterance, and the real answer came after, unread. Noise said over the reply was
    "answered" too, not NoReply. A turn under way before the utterance began is now
    none of its answer: ``say()`` waits for its own turn."""
    from gateway.client import NoReply

    first = [{"type": "transcript", "text": "what time do you open", "final": True, "turn": 1},
             {"type": "route", "turn": 1, "text": "what time do you open", "hit": True,
              "action": "answer", "intent": "opening_hours", "score": 0.9},
             {"type": "response", "turn": 1, "source": "cache", "text": "We open at nine."},
             b"\x09" * 640]
    ends_first = [{"type": "turn_metrics", "turn": 1, "input": "audio", "source": "cache"}]
    answer = {"answered": [
        {"type": "transcript", "text": "and on sundays", "final": True, "turn": 2},
        {"type": "response", "turn": 2, "source": "agent", "text": "At ten on Sundays."},
        b"\x07" * 640,
        {"type": "turn_metrics", "turn": 2, "input": "audio", "source": "agent"}],
        "noise": [{"type": "transcript", "text": "", "final": True, "turn": 2},
                  {"type": "turn_metrics", "turn": 2, "input": "audio", "empty": True}],
    }[second]
    first_ended = asyncio.Event()  # the client has read turn 1's end

    async def send(ws: Any, events: list[Any]) -> None:
        for event in events:
            await ws.send(event if isinstance(event, bytes) else json.dumps(event))

    async def ends_the_reply_as_the_caller_speaks(ws: Any) -> None:
        async for message in ws:
            if isinstance(message, str):
                await ws.send(json.dumps(READY))
            elif message == WORDS:
                await send(ws, first)  # turn 1's reply plays
            elif message == MORE_WORDS:  # its last frame went out as this speech began
                await send(ws, ends_first)
                await first_ended.wait()
                await send(ws, answer)

    def read(event: dict[str, Any]) -> None:
        if event["type"] == "turn_metrics" and event["turn"] == 1:
            first_ended.set()

    async with scripted_gateway(ends_the_reply_as_the_caller_speaks) as url:
        async with Caller(url, on_event=read) as caller:
            await asyncio.wait_for(caller.stream_audio(WORDS), 10)
            await caller.wait_for("response", timeout=10, turn=1)
            if second == "noise":
                with pytest.raises(NoReply) as no_reply:
                    await asyncio.wait_for(caller.say(MORE_WORDS, timeout=30,
                                                      nothing_heard_ms=300), 10)
                assert str(no_reply.value) == ("no reply: the gateway heard no words in the "
                                               "utterance (its turn 2 ended empty: noise)")
                assert no_reply.value.result.number == 0
                return
            turn = await asyncio.wait_for(caller.say(MORE_WORDS, timeout=30), 10)
    assert turn.number == 2, turn.events
    assert turn.transcript == "and on sundays"
    assert turn.metrics is not None and turn.metrics["turn"] == 2
    assert bytes(turn.audio) == b"\x07" * 640
    assert [e["type"] for e in turn.events if e.get("turn") == 1] == [], turn.events


async def test_say_text_over_a_reply_still_playing_is_not_answered_by_that_reply():
    """Review (stop 70): the same for ``say_text`` sent over the reply to a text sent
    before it (bench/chaos.py's typed barge-in): the text stops that reply, whose turn
    then ends (`interrupt`, its `turn_metrics` of ``input`` text), and ``say_text`` took
    those metrics for its own text's answer. It now waits for its text's turn."""
    first = [{"type": "transcript", "text": "what time do you open", "final": True},
             {"type": "route", "turn": 1, "text": "what time do you open", "hit": True,
              "action": "answer", "intent": "opening_hours", "score": 0.9},
             {"type": "response", "turn": 1, "source": "cache", "text": "We open at nine."}]
    stopped = [{"type": "interrupt", "turn": 1, "cause": "text", "heard_ms": 400,
                "sent_ms": 600},
               {"type": "transcript", "text": "and on sundays", "final": True},
               {"type": "turn_metrics", "turn": 1, "input": "text", "source": "cache",
                "interrupted": True}]
    answer = [{"type": "response", "turn": 2, "source": "agent", "text": "At ten on Sundays."},
              {"type": "turn_metrics", "turn": 2, "input": "text", "source": "agent"}]
    first_ended = asyncio.Event()

    async def stops_the_reply_for_the_text(ws: Any) -> None:
        texts = 0
        async for message in after_ready(ws):
            texts += 1
            if texts > 2:  # the client's `stop`
                return
            for event in first if texts == 1 else stopped:
                await ws.send(json.dumps(event))
            if texts == 2:
                await first_ended.wait()
                for event in answer:
                    await ws.send(json.dumps(event))

    def read(event: dict[str, Any]) -> None:
        if event["type"] == "turn_metrics" and event["turn"] == 1:
            first_ended.set()

    async with scripted_gateway(stops_the_reply_for_the_text) as url:
        async with Caller(url, on_event=read) as caller:
            await caller.send_transcript("what time do you open", partial_words=False)
            await caller.wait_for("response", timeout=10, turn=1)
            turn = await asyncio.wait_for(caller.say_text("and on sundays", timeout=30), 10)
    assert turn.number == 2, turn.events
    assert turn.metrics is not None and turn.metrics["turn"] == 2
    assert turn.first("response")["text"] == "At ten on Sundays."
