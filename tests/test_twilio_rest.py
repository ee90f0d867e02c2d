"""Transfer and hang-up through Twilio's REST API (the real `twilio` SDK against a local fake
of the call resource), keypad presses on both endpoints, and the bot hanging up an idle call."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from twilio.request_validator import RequestValidator

from gateway.client import Caller
from gateway.server import BackgroundServer
from gateway.stats import Stats
from gateway.transports.twilio import TwilioOutput
from gateway.transports.twilio_rest import CallControlError, TwilioCallControl, dial_twiml
from gateway.transports.twilio_voice import stream_key
from tests.fakes.server import ServerThread
from tests.fakes.twilio_media import TwilioLine
from tests.fakes.twilio_rest import FakeTwilioRest

pytestmark = pytest.mark.slow

ACCOUNT = "AC" + "0" * 32  # what TwilioLine's `start` names
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CALL_SID = "CA" + "ab" * 16
PUBLIC = "https://voice.example.com"
NUMBER = "+15551230000"


@pytest.fixture
def rest() -> Iterator[tuple[FakeTwilioRest, ServerThread]]:
    fake = FakeTwilioRest(ACCOUNT, AUTH_TOKEN)
    with ServerThread(fake.app) as server:
        yield fake, server


# ---------------------------------------------------------------------- the REST client


async def test_transfer_posts_dial_twiml_to_the_call(rest):
    fake, server = rest
    control = TwilioCallControl(AUTH_TOKEN, server.url)
    await control.transfer(ACCOUNT, CALL_SID, NUMBER)
    await control.transfer(ACCOUNT, CALL_SID, "sip:desk@pbx.example.com")
    await control.hang_up(ACCOUNT, CALL_SID)
    await control.aclose()
    first, sip, hangup = fake.requests
    assert (first["account"], first["call"]) == (ACCOUNT, CALL_SID)
    assert (first["user"], first["password"]) == (ACCOUNT, AUTH_TOKEN)
    assert first["content_type"].startswith("application/x-www-form-urlencoded")
    assert first["form"] == {"Twiml": '<?xml version="1.0" encoding="UTF-8"?><Response>'
                                      f'<Dial><Number>{NUMBER}</Number></Dial></Response>'}
    assert "<Dial><Sip>sip:desk@pbx.example.com</Sip></Dial>" in sip["form"]["Twiml"]
    assert hangup["form"] == {"Status": "completed"}


async def test_refusals_and_an_unreachable_api_are_clear_errors(rest):
    fake, server = rest
    wrong = TwilioCallControl("not-the-token", server.url)
    with pytest.raises(CallControlError, match="HTTP 401.*Authenticate"):
        await wrong.transfer(ACCOUNT, CALL_SID, NUMBER)
    await wrong.aclose()
    fake.status = 404
    control = TwilioCallControl(AUTH_TOKEN, server.url)
    with pytest.raises(CallControlError, match="HTTP 404"):
        await control.hang_up(ACCOUNT, CALL_SID)
    with pytest.raises(CallControlError, match="no account SID"):
        await control.hang_up("", CALL_SID)
    await control.aclose()
    gone = TwilioCallControl(AUTH_TOKEN, "http://127.0.0.1:9", timeout_s=5)
    with pytest.raises(CallControlError, match="could not reach Twilio"):
        await gone.transfer(ACCOUNT, CALL_SID, NUMBER)
    await gone.aclose()


@pytest.mark.parametrize("status, code, level", [(404, None, "WARNING"), (400, 21220, "INFO")],
                         ids=["20404", "21220"])
async def test_hanging_up_a_call_already_over_is_no_failure(rest, status, code, level, caplog):
    """Review (stop 60): the caller hung up as the bot did (its idle goodbye, the time
    limit), and Twilio answers the hang-up 404 (20404), or 400 with 21220 "Call is not
    in-progress". The call is over, as asked: that was raised as a failure, which the call
    counted `hangup_failed` and logged as a failed stage. It is counted apart, no error.
    Twilio's 20404 is also its answer for a call this API host cannot see (the account's
    calls processed in another region): a warning naming the account, not silence."""
    fake, server = rest
    fake.status, fake.code = status, code
    caplog.set_level(logging.INFO)
    stats = Stats()
    control = TwilioCallControl(AUTH_TOKEN, server.url)
    output = TwilioOutput(None, "MZ1", CALL_SID, control=control,  # type: ignore[arg-type]
                          account_sid=ACCOUNT, call_sid=CALL_SID, stats=stats)
    try:
        await output.hang_up("idle")  # no CallControlError: the call reports no failure
    finally:
        await control.aclose()
    assert fake.requests[0]["form"] == {"Status": "completed"}
    assert not stats.errors
    assert stats.prometheus.registry.get_sample_value(
        "voicegate_twilio_hangups_already_ended_total") == 1.0
    ours = [r for r in caplog.records if r.name.startswith("voicegate")]
    assert [(r.getMessage(), r.levelname) for r in ours] == [
        ("twilio_hangup_already_ended", level)]
    if level == "WARNING":
        fields = ours[0].fields  # type: ignore[attr-defined]
        assert fields["account_sid"] == ACCOUNT and fields["api_url"] == server.url, fields
    fake.status, fake.code = 500, None  # Twilio failing is still a failure
    control = TwilioCallControl(AUTH_TOKEN, server.url)
    output = TwilioOutput(None, "MZ1", CALL_SID, control=control,  # type: ignore[arg-type]
                          account_sid=ACCOUNT, call_sid=CALL_SID, stats=stats)
    try:
        with pytest.raises(CallControlError, match="HTTP 500"):
            await output.hang_up("idle")
    finally:
        await control.aclose()


async def test_a_404_that_is_not_twilios_is_a_failure_not_a_call_over(rest):
    """Review (stop 60): any 404 was taken for a call already over, and a hang-up so
    answered counted as no failure. A 404 without Twilio's error body (its code 20404)
    is not Twilio saying anything of the call: a proxy's, or a VOICEGATE_TWILIO_API_URL
    that is not Twilio's API. A configuration error: hangup_failed, as any refusal."""
    fake, server = rest
    fake.status, fake.twilio_body = 404, False
    stats = Stats()
    control = TwilioCallControl(AUTH_TOKEN, server.url)
    output = TwilioOutput(None, "MZ1", CALL_SID, control=control,  # type: ignore[arg-type]
                          account_sid=ACCOUNT, call_sid=CALL_SID, stats=stats)
    try:
        with pytest.raises(CallControlError, match="HTTP 404") as refused:
            await output.hang_up("idle")
    finally:
        await control.aclose()
    assert type(refused.value) is CallControlError, refused.value
    assert stats.prometheus.registry.get_sample_value(
        "voicegate_twilio_hangups_already_ended_total") == 0.0


def test_dial_twiml_for_a_number_and_a_sip_uri():
    assert "<Number>+15551230000</Number>" in dial_twiml(NUMBER)
    assert "<Sip>sips:a@b.example.com</Sip>" in dial_twiml("sips:a@b.example.com")


# ---------------------------------------------------------------------- a live Twilio call


@pytest.fixture
def phone_server(settings, runtime, rest):
    fake, api = rest
    server = BackgroundServer(settings.replace(
        twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC, handoff_number=NUMBER,
        twilio_api_url=api.url, keypad={"0": "handoff"}, idle_prompt_s=0), runtime).start()
    yield fake, server
    server.stop()


def signed_line(server: BackgroundServer, call_sid: str = CALL_SID) -> TwilioLine:
    signature = RequestValidator(AUTH_TOKEN).compute_signature(f"{PUBLIC.replace('https', 'wss')}"
                                                               "/twilio/stream", {})
    return TwilioLine(server.base_url.replace("http://", "ws://") + "/twilio/stream",
                      call_sid=call_sid, stream_sid="MZ" + "cd" * 16,
                      headers={"X-Twilio-Signature": signature},
                      parameters={"stream_key": stream_key(AUTH_TOKEN, call_sid)})


async def press(line: TwilioLine, digit: str) -> None:
    await line.send({"event": "dtmf", "streamSid": line.stream_sid, "sequenceNumber": "9",
                     "dtmf": {"track": "inbound_track", "digit": digit}})


async def test_a_handoff_redirects_the_live_call_after_the_message_played(phone_server,
                                                                          runtime):
    fake, server = phone_server
    async with signed_line(server) as line:
        await press(line, "0")  # the keypad map's handoff
        await line.wait_until(lambda: bool(fake.requests), timeout=30)
        played_by_then = len(line.played)
        sent = len(line.media)
    (request,) = fake.requests
    assert (request["account"], request["call"]) == (ACCOUNT, CALL_SID)
    # With the way back (/twilio/dial-ended) if the desk does not answer.
    assert request["form"]["Twiml"].endswith(
        f'<Dial action="{PUBLIC}/twilio/dial-ended"><Number>{NUMBER}</Number></Dial></Response>')
    handoff_audio = runtime.prompts.audio("handoff", 8000, "mulaw")
    assert len(handoff_audio) <= sent < len(handoff_audio) + 160  # all of it went first ...
    assert played_by_then >= sent - 8 * 100  # ... and had played (but Twilio's buffer)


async def test_a_failed_transfer_keeps_the_caller_on_the_line(phone_server, runtime):
    fake, server = phone_server
    fake.status = 500
    before = runtime.stats.errors["transfer_failed"]
    async with signed_line(server, "CA" + "ef" * 16) as line:
        await press(line, "0")
        await line.wait_until(lambda: bool(fake.requests), timeout=30)
        for _ in range(100):
            if runtime.stats.errors["transfer_failed"] > before:
                break
            await asyncio.sleep(0.05)
        assert line.close_code is None  # not hung up
        fake.status = 200
        await press(line, "0")  # the next try works
        await line.wait_until(lambda: len(fake.requests) == 2, timeout=30)
    assert runtime.stats.errors["transfer_failed"] == before + 1
    assert fake.requests[1]["form"]["Twiml"].count("<Dial ") == 1


@pytest.mark.parametrize("status, code, level", [(400, 21220, "INFO"), (404, None, "WARNING")],
                         ids=["21220", "20404"])
async def test_a_transfer_of_a_call_already_over_is_no_failure(phone_server, runtime, caplog,
                                                               status, code, level):
    """Review (stop 60): the caller hung up as the handoff message ended, and Twilio answers
    the transfer 400 with 21220 "Call is not in-progress" (or 404, 20404). That was counted
    `transfer_failed`, and the apology played to nobody. The call is over: no failure, no
    apology, the stream closed. Twilio answers 20404 also for a call this API host cannot
    see (another region's): that one is logged as a warning naming the account."""
    fake, server = phone_server
    fake.status, fake.code = status, code
    caplog.set_level(logging.INFO)
    before = runtime.stats.errors["transfer_failed"]
    async with signed_line(server, "CA" + "9a" * 16) as line:
        await press(line, "0")
        await line.wait_until(lambda: bool(fake.requests), timeout=30)
        sent = len(line.media)
        assert await line.closed() == 1000  # the gateway ends the call
    assert len(line.media) == sent  # no apology
    assert runtime.stats.errors["transfer_failed"] == before
    ours = [(r.getMessage(), r.levelname) for r in caplog.records
            if r.getMessage() in ("twilio_transfer_already_ended", "stage_failed")]
    assert ours == [("twilio_transfer_already_ended", level)]
    if level == "WARNING":
        (record,) = [r for r in caplog.records if r.getMessage() == ours[0][0]]
        assert ACCOUNT in str(getattr(record, "fields", {})), vars(record)


async def test_a_bad_twilio_digit_is_refused_and_the_stream_goes_on(phone_server, runtime):
    fake, server = phone_server
    before = runtime.stats.errors["twilio_invalid_dtmf"]
    async with signed_line(server, "CA" + "12" * 16) as line:
        await press(line, "X")
        await line.say(b"\x00\x00" * 800)
        assert line.close_code is None
    assert runtime.stats.errors["twilio_invalid_dtmf"] == before + 1
    assert fake.requests == []


async def test_an_idle_twilio_call_is_hung_up_through_the_rest_api(settings, runtime, rest):
    fake, api = rest
    server = BackgroundServer(settings.replace(
        twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC, twilio_api_url=api.url,
        greeting="Hello.", idle_prompt_s=1), runtime).start()
    try:
        line = signed_line(server, "CA" + "34" * 16)
        await line.connect()
        await line.closed()  # greeting, 1 s, prompt, 1 s, goodbye: the gateway hangs up
        await line.hang_up()
    finally:
        server.stop()
    assert line.close_code == 1000
    (request,) = fake.requests
    assert request["call"] == "CA" + "34" * 16 and request["form"] == {"Status": "completed"}


async def test_a_dead_stream_is_closed_without_hanging_up_the_call(settings, runtime, rest):
    # A stream whose media stopped (a half-open connection: Twilio may already be resuming
    # the call on a new stream) must not be hung up by the idle goodbye through the REST
    # API: it is closed as dead, and /twilio/stream-ended finds no record of an end.
    fake, api = rest
    server = BackgroundServer(settings.replace(
        twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC, twilio_api_url=api.url,
        greeting="Hello.", idle_prompt_s=1, twilio_media_timeout_s=1), runtime).start()
    before = runtime.stats.errors["twilio_no_media"]
    try:
        line = signed_line(server, "CA" + "56" * 16)
        line.streams_silence = False  # `start`, then nothing: the stream is dead
        await line.connect()
        assert await line.closed() == 1011
        await line.hang_up()
    finally:
        server.stop()
    assert runtime.stats.errors["twilio_no_media"] == before + 1
    assert fake.requests == []  # no hang-up: the call is the resumed stream's


async def test_a_line_streaming_silence_is_not_taken_for_dead(settings, runtime, rest):
    # The real clock: the line's frames come from this test's thread, the watch runs in the
    # server's. A media timeout of 1 s let a 1 s stall of this thread on a loaded machine
    # (no frame sent meanwhile) close the line as dead; at 4 s it takes a 3 s stall.
    fake, api = rest
    server = BackgroundServer(settings.replace(
        twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC, twilio_api_url=api.url,
        idle_prompt_s=0, twilio_media_timeout_s=4), runtime).start()
    before = runtime.stats.errors["twilio_no_media"]
    try:
        async with signed_line(server, "CA" + "78" * 16) as line:  # Twilio's silence
            # Past the timeout and its checks (a dead line is closed within 1.25 of it).
            await asyncio.sleep(5.5)
            assert line.close_code is None
        assert line.close_code == 1000
    finally:
        server.stop()
    assert runtime.stats.errors["twilio_no_media"] == before


# ---------------------------------------------------------------------- native protocol


@pytest.fixture
def native_server(settings, runtime):
    server = BackgroundServer(settings.replace(greeting="Hello.", idle_prompt_s=1,
                                               keypad={"0": "handoff"}), runtime).start()
    yield server
    server.stop()


async def test_native_keypad_and_the_idle_hang_up(native_server):
    async with Caller(native_server.call_url) as caller:
        greeting = await caller.wait_for("response", source="greeting")
        assert greeting["text"] == "Hello."
        await caller.send_json({"type": "dtmf", "digit": "55"})
        error = await caller.wait_for("error", code="invalid_dtmf")
        assert "not a keypad key" in error["message"]
        await caller.send_json({"type": "dtmf", "digit": "0"})
        keypad = await caller.wait_for("keypad")
        assert keypad["keys"] == "0" and keypad["action"] == "handoff"
        await caller.wait_for("handoff")  # the native contract: the event
        # (stop 64) A caller waiting for a person is never prompted nor hung up as idle:
        # the idle hang-up is a second call's, one left silent.
    async with Caller(native_server.call_url) as caller:
        await caller.wait_for("response", source="greeting")
        await caller.wait_for("response", source="prompt", timeout=30)
        await caller.wait_for("response", source="goodbye", timeout=30)
        hangup = await caller.wait_for("hangup", timeout=30)
        assert hangup["reason"] == "idle"
        for _ in range(200):
            if caller.closed_code is not None:
                break
            await asyncio.sleep(0.05)
    assert caller.closed_code == 1000


def test_the_first_rest_request_imports_nothing_on_the_event_loop():
    # Review (stop 59): gateway/transports/twilio_rest.py (client.calls(call_sid)): the
    # SDK's call resource (twilio.rest.api.v2010.account.call and ~90 modules around it) is imported
    # lazily, on the first transfer or hang-up: module imports (file reads, compiles) on
    # the serving loop, stalling every call's audio on the replica (~40-70 ms warm, far
    # more from a cold disk). Loaded with the gateway, the request imports nothing.
    script = textwrap.dedent("""
        import asyncio, sys
        import gateway.app  # what the server loads at start-up
        from gateway.transports.twilio_rest import TwilioCallControl

        async def main():
            control = TwilioCallControl("token", "http://127.0.0.1:9", timeout_s=2)
            before = set(sys.modules)
            try:
                await control.hang_up("AC" + "0" * 32, "CA" + "1" * 32)
            except Exception:
                pass  # nothing listens on port 9: the request fails, as is fine here
            await control.aclose()
            imported = sorted(m for m in set(sys.modules) - before if m.startswith("twilio"))
            print(len(imported), " ".join(imported[:8]))

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                                       "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    count, _, names = done.stdout.strip().partition(" ")
    assert int(count) == 0, f"{count} twilio modules imported on the loop: {names} ..."


async def test_a_handoff_with_no_number_to_call_is_a_failed_transfer():
    """Review (stop 60): with no VOICEGATE_HANDOFF_NUMBER, a handoff told the caller "I'm
    going to connect you with a colleague. Please stay on the line", and the transfer
    returned False: no error, no apology, nothing in the agent's context; the caller sat in
    silence. It fails as a refused transfer does (transfer_failed, the apology), naming the
    setting."""
    output = TwilioOutput(None, "MZ1", CALL_SID, account_sid=ACCOUNT,  # type: ignore[arg-type]
                          call_sid=CALL_SID)
    with pytest.raises(CallControlError, match="VOICEGATE_HANDOFF_NUMBER"):
        await output.transfer("intent talk_to_person is routed to a human")


@pytest.mark.parametrize("forwarded, scheme", [("wss", "https"), (None, "http")])
async def test_the_transfers_way_back_is_an_http_url_whatever_scheme_the_upgrade_came_with(
        settings, runtime, rest, forwarded, scheme):
    """Review (stop 64): without VOICEGATE_PUBLIC_URL the stream took its base URL from its
    own WebSocket upgrade, whose scheme is `ws`/`wss` (Starlette's for a WebSocket, or the
    `X-Forwarded-Proto: wss` Traefik sets on upgrades), and wrote it into the transfer's
    `<Dial action>`: `wss://host/twilio/dial-ended`, a URL Twilio cannot request. A caller
    whose desk did not answer was not given back to the bot. The base is an HTTP URL (the
    webhooks'): `wss` is `https`, `ws` is `http`; the stream's own URL stays `wss`/`ws`."""
    fake, api = rest
    server = BackgroundServer(settings.replace(
        twilio_auth_token=AUTH_TOKEN, handoff_number=NUMBER, twilio_api_url=api.url,
        keypad={"0": "handoff"}, idle_prompt_s=0), runtime).start()
    try:
        host = server.base_url.split("://", 1)[1]
        signed = f"{'wss' if forwarded else 'ws'}://{host}/twilio/stream"
        headers = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(
            signed, {})}
        if forwarded:
            headers["X-Forwarded-Proto"] = forwarded
        line = TwilioLine(f"ws://{host}/twilio/stream", call_sid="CA" + "12" * 16,
                          stream_sid="MZ" + "cd" * 16, headers=headers,
                          parameters={"stream_key": stream_key(AUTH_TOKEN, "CA" + "12" * 16)})
        async with line:
            await press(line, "0")  # the keypad map's handoff
            await line.wait_until(lambda: bool(fake.requests), timeout=30)
    finally:
        server.stop()
    (request,) = fake.requests
    assert f'<Dial action="{scheme}://{host}/twilio/dial-ended">' in request["form"]["Twiml"], \
        request["form"]["Twiml"]


async def test_streams_naming_made_up_accounts_do_not_pile_up_rest_clients(rest, monkeypatch):
    """Review (stop 64): the REST side made (and kept) one twilio client, with its own HTTP
    session, for every `start.accountSid` it was asked to hang up or transfer on. `start`
    is not signed, and the upgrade's signature is the same for every stream: whoever saw
    one could make a replica build sessions for made-up accounts without end. Every request
    goes through one HTTP session, whatever account it names (auth is per request)."""
    from gateway.transports import twilio_rest

    made: list[object] = []

    class Counted(twilio_rest.AsyncTwilioHttpClient):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(twilio_rest, "AsyncTwilioHttpClient", Counted)
    fake, server = rest
    control = TwilioCallControl(AUTH_TOKEN, server.url)
    try:
        await control.hang_up(ACCOUNT, CALL_SID)
        for n in range(1, 6):
            with pytest.raises(CallControlError, match="HTTP 401"):
                await control.hang_up("AC" + str(n) * 32, CALL_SID)
    finally:
        await control.aclose()
    assert len(made) == 1, f"{len(made)} HTTP sessions for one gateway's REST requests"
    assert [r["user"] for r in fake.requests][:1] == [ACCOUNT]


async def test_a_configured_account_is_the_only_one_the_rest_api_is_asked_about(rest):
    """Review (stop 64): with `twilio_account_sid` set, a hang-up or transfer for a call of
    another account (a forged `start`) is refused here, never sent: the line is controlled
    only through the gateway's own account."""
    fake, server = rest
    control = TwilioCallControl(AUTH_TOKEN, server.url, account_sid=ACCOUNT)
    try:
        with pytest.raises(CallControlError, match="not this gateway's Twilio account"):
            await control.hang_up("AC" + "1" * 32, CALL_SID)
        with pytest.raises(CallControlError, match="not this gateway's Twilio account"):
            await control.transfer("AC" + "1" * 32, CALL_SID, NUMBER)
        assert fake.requests == []
        await control.hang_up(ACCOUNT, CALL_SID)
    finally:
        await control.aclose()
    assert [(r["user"], r["form"]) for r in fake.requests] == [
        (ACCOUNT, {"Status": "completed"})]


async def test_a_stream_of_another_account_than_the_configured_one_is_refused(settings, runtime,
                                                                               rest):
    """Review (stop 64): with `twilio_account_sid` set, a `start` naming another account
    (Twilio's never does: the number is the account's) is refused at once, 1008, by name
    (`twilio_wrong_account`): no call starts, and nothing is ever asked of the REST API
    about that account's calls. The configured account's stream is served."""
    fake, api = rest
    server = BackgroundServer(settings.replace(
        twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC, twilio_api_url=api.url,
        twilio_account_sid="AC" + "1" * 32, greeting="Hello.", idle_prompt_s=1), runtime).start()
    before = runtime.stats.errors["twilio_wrong_account"]
    calls = runtime.stats.calls
    try:
        line = signed_line(server, "CA" + "78" * 16)  # its `start` names AC000…
        await line.connect()
        assert await line.closed() == 1008
        await line.hang_up()
    finally:
        server.stop()
    assert runtime.stats.errors["twilio_wrong_account"] == before + 1
    assert runtime.stats.calls == calls and fake.requests == []
