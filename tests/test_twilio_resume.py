"""A Twilio call whose media stream is lost goes on: ``<Connect action>`` and
``POST /twilio/stream-ended`` (gateway/transports/twilio_voice.py), the record of calls the
gateway ended on purpose (gateway/transports/twilio_ended.py), and a resumed stream.

Before: a stream that ended without the gateway meaning it (a replica killed after its
drain timeout, a balancer or a network cutting the WebSocket) made Twilio run the TwiML
after ``</Connect>``: nothing, so it hung up on the caller. Now Twilio asks
``/twilio/stream-ended``, which resumes the call on a new stream (a short apology first),
hands it to a person after ``MAX_STREAM_RECONNECTS``, and hangs up a call that is over.

The webhook is driven in-process (httpx's ASGI transport, no model load): each test is
milliseconds. Redis: the suite's database (tests/test_redis.py), a key prefix per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator
from xml.etree import ElementTree

import httpx
import pytest
import redis
from starlette.applications import Starlette
from twilio.request_validator import RequestValidator

from gateway.app import create_app
from gateway.call import Call, LineEnded
from gateway.clock import ManualClock
from gateway.redis_link import open_async_client
from gateway.settings import Settings
from gateway.stats import Stats
from gateway.transports.twilio import TwilioError, TwilioStream
from gateway.transports.call_records import split_version
from gateway.transports.twilio_context import CONTEXT_TTL_S, CallContexts
from gateway.transports.twilio_ended import EndedCalls
from gateway.transports.twilio_rest import CallAlreadyEnded, CallControlError, dial_twiml
from gateway.transports.twilio_voice import (GIVE_UP_SAY, HANDOFF_SAY, MAX_STREAM_RECONNECTS,
                                             NO_ONE_FREE_SAY, RESUMED_SAY, stream_key)
from gateway.agent import Conversation
from tests.call_harness import RATE, CallHarness
from tests.redis_faults import DelayingProxy, FlakyProxy
from tests.test_redis import REDIS_URL, free_port, own_prefix
from tests.test_twilio import PhoneCallOutput, SentMessages

PUBLIC = "https://voice.example.com"
TOKEN = "12345678901234567890123456789012"  # Twilio auth token
CALL_TOKEN = "call-token-0123456789"
NUMBER = "+15551230000"
CALL_SID = "CA" + "5e" * 16
FORM = {"CallSid": CALL_SID, "From": "+15550100", "To": "+15550199",
        "AccountSid": "AC" + "0" * 32, "CallStatus": "in-progress"}


def app_with(settings: Settings, **changes: Any) -> Starlette:
    return create_app(settings.replace(**changes))


@pytest.fixture
def plain(settings: Settings) -> Starlette:
    """No auth token: nothing is signed (as the session's test server)."""
    return app_with(settings)


@pytest.fixture
def signed(settings: Settings) -> Starlette:
    return app_with(settings, twilio_auth_token=TOKEN, public_url=PUBLIC, call_token=CALL_TOKEN)


@pytest.fixture
def with_handoff(settings: Settings) -> Starlette:
    return app_with(settings, twilio_auth_token=TOKEN, public_url=PUBLIC, handoff_number=NUMBER)


async def post(app: Starlette, path: str, form: dict[str, str] | None = None,
               sign: bool = False, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST a Twilio webhook form; ``sign``: with the X-Twilio-Signature Twilio would send
    (over the public URL, query string included)."""
    form = dict(FORM if form is None else form)
    headers = dict(headers or {})
    if sign:
        headers["X-Twilio-Signature"] = RequestValidator(TOKEN).compute_signature(
            PUBLIC + path, form)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        return await client.post(path, data=form, headers=headers)


async def ran(app: Starlette, call_sid: str = CALL_SID) -> None:
    """The call ran on its first stream: its greeting is kept as it starts (in the app's
    memory and, with Redis, for every replica), so a stream it loses is resumed."""
    greeted = json.dumps([{"role": "assistant", "content": "Welcome to the bank."}])
    await app.state.services.twilio_contexts().save(call_sid, greeted, (0, 1))


def verbs(twiml: str) -> list[ElementTree.Element]:
    root = ElementTree.fromstring(twiml)
    assert root.tag == "Response", twiml
    return list(root)


def connect_of(twiml: str) -> tuple[str, str, dict[str, str]]:
    """The ``<Connect>``'s action, its stream's url and custom parameters."""
    connect = ElementTree.fromstring(twiml).find("./Connect")
    assert connect is not None, twiml
    stream = connect.find("./Stream")
    assert stream is not None, twiml
    return (connect.get("action", ""), stream.get("url", ""),
            {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")})


def is_hangup(twiml: str) -> bool:
    return [v.tag for v in verbs(twiml)] == ["Hangup"]


# ---------------------------------------------------------------------- the TwiML's action


async def test_the_voice_webhook_connects_with_an_action_for_the_streams_end(signed):
    reply = await post(signed, "/twilio/voice", sign=True)
    assert reply.status_code == 200
    action, url, params = connect_of(reply.text)
    assert action == f"{PUBLIC}/twilio/stream-ended?lost=0"
    assert url == "wss://voice.example.com/twilio/stream"
    assert params == {"From": FORM["From"], "CallSid": CALL_SID, "token": CALL_TOKEN,
                      "stream_key": stream_key(TOKEN, CALL_SID)}  # the call's own stream


# ---------------------------------------------------------------------- stream-ended


@pytest.mark.parametrize("lost", range(MAX_STREAM_RECONNECTS))
async def test_a_lost_stream_is_resumed_with_an_apology_and_the_same_parameters(signed, lost,
                                                                                  caplog):
    caplog.set_level(logging.INFO, logger="voicegate")
    voice = connect_of((await post(signed, "/twilio/voice", sign=True)).text)
    await ran(signed)
    reply = await post(signed, f"/twilio/stream-ended?lost={lost}", sign=True)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith(
        "application/xml")
    say, connect = verbs(reply.text)
    assert (say.tag, say.text) == ("Say", RESUMED_SAY)  # Twilio's voice covers the gap
    assert connect.tag == "Connect"
    action, url, params = connect_of(reply.text)
    assert action == f"{PUBLIC}/twilio/stream-ended?lost={lost + 1}"
    assert url == voice[1]
    assert params == {**voice[2], "resumed": str(lost + 1)}  # From, CallSid, token: as before
    (event,) = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "twilio_stream_lost"]
    assert (event["outcome"], event["lost"], event["call_id"]) == ("resume", lost, CALL_SID)


@pytest.mark.parametrize("status", ["completed", "canceled", "failed", "busy", "no-answer"])
async def test_a_call_that_is_over_is_hung_up_not_resumed(plain, status):
    reply = await post(plain, "/twilio/stream-ended?lost=0", {**FORM, "CallStatus": status})
    assert reply.status_code == 200 and is_hangup(reply.text)


async def test_past_the_bound_the_call_goes_to_a_person(with_handoff):
    path = f"/twilio/stream-ended?lost={MAX_STREAM_RECONNECTS}"
    reply = await post(with_handoff, path, sign=True)
    assert reply.status_code == 200
    say, dial = verbs(reply.text)
    assert (say.tag, say.text) == ("Say", HANDOFF_SAY)
    assert dial.tag == "Dial" and dial.findtext("Number") == NUMBER
    # A bound lowered in a deploy while a call was past it: still a person, never a 400.
    later = await post(with_handoff, f"/twilio/stream-ended?lost={MAX_STREAM_RECONNECTS + 5}",
                       sign=True)
    assert [v.tag for v in verbs(later.text)] == ["Say", "Dial"]


async def test_past_the_bound_without_a_handoff_number_the_caller_hears_why(plain):
    reply = await post(plain, f"/twilio/stream-ended?lost={MAX_STREAM_RECONNECTS}")
    say, hangup = verbs(reply.text)
    assert (say.tag, say.text, hangup.tag) == ("Say", GIVE_UP_SAY, "Hangup")


async def test_a_bad_signature_is_refused_and_the_query_is_signed_too(signed):
    services = signed.state.services
    good = RequestValidator(TOKEN).compute_signature(
        PUBLIC + "/twilio/stream-ended?lost=0", FORM)
    assert (await post(signed, "/twilio/stream-ended?lost=0",
                       headers={"X-Twilio-Signature": good})).status_code == 200
    # The same signature over another `lost`: a replayed request cannot reset the count.
    replayed = await post(signed, "/twilio/stream-ended?lost=1",
                          headers={"X-Twilio-Signature": good})
    assert replayed.status_code == 403 and "does not match" in replayed.text
    missing = await post(signed, "/twilio/stream-ended?lost=0")
    assert missing.status_code == 403 and "missing" in missing.text
    assert services.stats.errors["twilio_bad_signature"] == 2


@pytest.mark.parametrize("query", ["", "?lost=", "?lost=-1", "?lost=one", "?lost=1.0",
                                   "?lost=%D9%A3", "?lost=1000", "?lost=0&lost=1",
                                   "?lost=%201"])
async def test_a_lost_count_we_never_wrote_is_refused(plain, query):
    reply = await post(plain, "/twilio/stream-ended" + query)
    assert reply.status_code == 400, (query, reply.text)
    assert "is not the count of lost streams" in reply.text
    assert plain.state.services.stats.errors["twilio_invalid_webhook"] == 1


async def test_a_field_xml_cannot_carry_is_refused(plain):
    reply = await post(plain, "/twilio/stream-ended?lost=0", {**FORM, "From": "+1555\x010100"})
    assert reply.status_code == 400
    assert reply.text.startswith("From holds U+0001, a character XML cannot carry")


# ---------------------------------------------------------------------- ended on purpose


class FailingRestApi:
    """Twilio's REST API refusing every request (TwilioCallControl's error)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def transfer(self, account_sid: str, call_sid: str, target: str,
                       action: str = "") -> None:
        self.asked.append("transfer")
        raise CallControlError("Twilio refused to transfer: HTTP 500")

    async def hang_up(self, account_sid: str, call_sid: str) -> None:
        self.asked.append("hang_up")
        raise CallControlError("Twilio refused to hang up: HTTP 500")


@pytest.mark.parametrize("rest", ["none", "failing"])
async def test_a_call_the_gateway_hung_up_is_not_resumed(plain, rest):
    # The bot hangs up an idle call. Without REST credentials, or with Twilio refusing the
    # hang-up, what ends the call is the stream closing: Twilio then asks for the action,
    # and resuming there would ring the caller the bot had just said goodbye to.
    services = plain.state.services
    h = CallHarness(settings={"idle_prompt_s": 1})
    api = FailingRestApi() if rest == "failing" else None
    out = PhoneCallOutput(control=api, account_sid="AC1", call_sid=CALL_SID,
                          ended=services.twilio_ended())
    h.call = Call(h.deps, out, 8000, call_id=CALL_SID)
    await h.start()
    await h.text("hello there")
    assert h._task is not None
    for _ in range(300):  # the answer, 1 s, the prompt, 1 s, the goodbye, the hang-up
        if h._task.done():
            break
        await h.clock.advance(0.02)
    assert h._task.done() and h.call.ended == "idle"
    assert api is None or api.asked == ["hang_up"]
    reply = await post(plain, "/twilio/stream-ended?lost=0")  # CallStatus still in-progress
    assert reply.status_code == 200 and is_hangup(reply.text), reply.text
    await ran(plain, "CA" + "1" * 32)
    other = await post(plain, "/twilio/stream-ended?lost=0", {**FORM, "CallSid": "CA" + "1" * 32})
    assert [v.tag for v in verbs(other.text)] == ["Say", "Connect"]  # only that call


async def test_a_transferred_call_is_not_resumed_and_a_failed_transfer_is(plain):
    services = plain.state.services

    class RestApi(FailingRestApi):
        async def transfer(self, account_sid: str, call_sid: str, target: str,
                           action: str = "") -> None:
            # Twilio may close the stream and ask for the action before answering us.
            self.ended_meanwhile = await services.twilio_ended().ended(call_sid)

    ok = RestApi()
    out = PhoneCallOutput(control=ok, account_sid="AC1", call_sid=CALL_SID,
                          handoff_number=NUMBER, ended=services.twilio_ended())
    assert await out.transfer("handoff") is True
    assert ok.ended_meanwhile == "transfer"  # recorded before the request went out
    # Not resumed where the number can be dialled (test_a_stream_lost_while_its_transfer_...);
    # here, without one, the bot takes it back (test_a_transfer_this_replica_cannot_dial_...).
    assert await services.twilio_ended().ended(CALL_SID) == "transfer"

    failing_sid = "CA" + "fa" * 16
    out = PhoneCallOutput(control=FailingRestApi(), account_sid="AC1", call_sid=failing_sid,
                          handoff_number=NUMBER, ended=services.twilio_ended())
    with pytest.raises(CallControlError):
        await out.transfer("handoff")
    # The caller stayed with the bot: a stream lost later is resumed.
    await ran(plain, failing_sid)
    reply = await post(plain, "/twilio/stream-ended?lost=0", {**FORM, "CallSid": failing_sid})
    assert [v.tag for v in verbs(reply.text)] == ["Say", "Connect"]


async def test_a_stream_lost_while_its_transfer_is_under_way_is_put_through(with_handoff):
    # The handoff has played and the REST transfer is in flight when the replica dies (the
    # request never lands): Twilio asks for the action. The caller was promised a person:
    # the answer is the <Dial>, not a hang-up (and not the bot again).
    services = with_handoff.state.services
    asked = asyncio.Event()

    class HangingRestApi(FailingRestApi):
        async def transfer(self, account_sid: str, call_sid: str, target: str,
                           action: str = "") -> None:
            asked.set()
            await asyncio.Event().wait()  # never answered: the process is gone

    out = PhoneCallOutput(control=HangingRestApi(), account_sid="AC1", call_sid=CALL_SID,
                          handoff_number=NUMBER, ended=services.twilio_ended())
    transfer = asyncio.create_task(out.transfer("handoff"))
    await asked.wait()
    reply = await post(with_handoff, "/twilio/stream-ended?lost=0", sign=True)
    assert [(v.tag, v.findtext("Number")) for v in verbs(reply.text)] == [("Dial", NUMBER)]
    transfer.cancel()  # cancelled mid-request: the record stays, the answer with it
    with pytest.raises(asyncio.CancelledError):
        await transfer
    again = await post(with_handoff, "/twilio/stream-ended?lost=1", sign=True)
    assert [v.tag for v in verbs(again.text)] == ["Dial"]


async def test_a_transfer_answered_not_found_still_reaches_the_person_if_the_call_lives(
        with_handoff):
    # Review (stop 60): Twilio answers a transfer 404 (20404) for a call already over, and
    # for one its API host cannot see (the account's calls in another region). The call
    # takes it as over (no apology) and ends its stream; the transfer's record stays, so if
    # the call was live after all Twilio's request for the stream's end gets the <Dial>.
    services = with_handoff.state.services

    class NotFoundRestApi(FailingRestApi):
        api_url = "https://api.twilio.com"

        async def transfer(self, account_sid: str, call_sid: str, target: str,
                           action: str = "") -> None:
            raise CallAlreadyEnded("Twilio refused to transfer: HTTP 404", certain=False)

    out = PhoneCallOutput(control=NotFoundRestApi(), account_sid="AC1", call_sid=CALL_SID,
                          handoff_number=NUMBER, ended=services.twilio_ended())
    with pytest.raises(LineEnded):
        await out.transfer("handoff")
    reply = await post(with_handoff, "/twilio/stream-ended?lost=0", sign=True)
    assert [(v.tag, v.findtext("Number")) for v in verbs(reply.text)] == [("Dial", NUMBER)]


async def test_a_transfer_this_replica_cannot_dial_is_resumed_not_hung_up(plain):
    # Another replica (with a handoff number) was transferring the call when it died; this
    # one, configured without a number, gets Twilio's request. Hanging up would drop the
    # caller: the bot takes the call back instead (and can hand it off no further).
    await plain.state.services.twilio_ended().mark(CALL_SID, "transfer")
    await ran(plain)
    reply = await post(plain, "/twilio/stream-ended?lost=0")
    assert [v.tag for v in verbs(reply.text)] == ["Say", "Connect"]


async def test_the_local_record_expires_and_stays_bounded():
    clock = ManualClock()
    ended = EndedCalls(clock, ttl_s=300, max_local=2)
    await ended.mark("CA1")
    await clock.advance(299)
    assert await ended.ended("CA1")
    await clock.advance(2)
    assert not await ended.ended("CA1")  # Twilio's action request is long past
    for sid in ("CA2", "CA3", "CA4"):
        await ended.mark(sid)
    assert [await ended.ended(s) for s in ("CA2", "CA3", "CA4")] == [None, "hangup", "hangup"]
    # No CallSid Twilio sends (an unsigned stream names any string): nothing remembered,
    # so none can stand in for another call's key.
    for sid in ("", "CA" + "0" * 100, "CA1:x", "CA1*"):
        await ended.mark(sid)
        assert await ended.ended(sid) is None


# ---------------------------------------------------------------------- shared through Redis


@pytest.fixture
def prefix() -> Iterator[str]:
    yield from own_prefix("resume")


@pytest.fixture
async def replicas(settings: Settings, prefix: str) -> AsyncIterator[tuple[Starlette, Starlette]]:
    """Two gateways sharing the suite's Redis (their models never load: not needed here)."""
    apps = tuple(app_with(settings, redis_url=REDIS_URL, redis_prefix=prefix) for _ in "ab")
    yield apps  # type: ignore[misc]
    for app in apps:
        await app.state.services.twilio_ended().aclose()
        await app.state.services.twilio_contexts().aclose()


async def test_a_hang_up_on_one_replica_is_seen_by_another(replicas, prefix):
    a, b = replicas
    await a.state.services.twilio_ended().mark(CALL_SID)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert 0 < client.ttl(f"{prefix}twilio:ended:{CALL_SID}") <= 300  # short-lived
    finally:
        client.close()
    # Twilio's action request reaches the other replica, which never saw the call.
    assert is_hangup((await post(b, "/twilio/stream-ended?lost=0")).text)
    await a.state.services.twilio_ended().forget(CALL_SID)
    reply = await post(b, "/twilio/stream-ended?lost=0")
    # Connected again, not hung up (what it said went with the hang-up: connected afresh).
    assert [v.tag for v in verbs(reply.text)] == ["Connect"]


@pytest.fixture
async def dialling_replicas(settings: Settings,
                            prefix: str) -> AsyncIterator[tuple[Starlette, Starlette]]:
    """Two gateways sharing the suite's Redis, each with a handoff number to dial."""
    apps = tuple(app_with(settings, redis_url=REDIS_URL, redis_prefix=prefix,
                          twilio_auth_token=TOKEN, public_url=PUBLIC, handoff_number=NUMBER)
                 for _ in "ab")
    yield apps  # type: ignore[misc]
    for app in apps:
        await app.state.services.twilio_ended().aclose()
        await app.state.services.twilio_contexts().aclose()


class TransferringRestApi(FailingRestApi):
    """Twilio's REST API taking every transfer."""

    async def transfer(self, account_sid: str, call_sid: str, target: str,
                       action: str = "") -> None:
        self.asked.append("transfer")


async def test_a_transfer_another_replica_gave_back_to_the_bot_is_not_dialled_again(
        dialling_replicas):
    """Review (stop 66): replica a transferred the call (its record "transfer", in its
    memory and in Redis). Nobody took the dial, and Twilio's request for the dial's action
    reached replica b, which gave the caller back to the bot and cleared the record: in
    Redis and in b's memory, not in a's. A lookup read a replica's memory first and Redis
    only when it held nothing, so a's stale "transfer" stood for 5 minutes: the new stream
    lost meanwhile (a replica killed in a deploy), its action reaching a, got the `<Dial>`
    to the desk that had just not answered, not the bot again. A transfer a replica
    recorded (and Redis took) is now read from Redis, which says whether it still is one."""
    a, b = dialling_replicas
    out = PhoneCallOutput(control=TransferringRestApi(), account_sid="AC1", call_sid=CALL_SID,
                          handoff_number=NUMBER, ended=a.state.services.twilio_ended())
    assert await out.transfer("handoff") is True
    busy = await post(b, "/twilio/dial-ended", {**FORM, "DialCallStatus": "busy"}, sign=True)
    assert [v.tag for v in verbs(busy.text)] == ["Say", "Connect"], busy.text
    for app in (a, b):  # the stream back with the bot is lost: resumed wherever asked
        reply = await post(app, "/twilio/stream-ended?lost=0&stream=1", sign=True)
        assert [v.tag for v in verbs(reply.text)] == ["Say", "Connect"], reply.text
        assert await app.state.services.twilio_ended().ended(CALL_SID) is None


class ScriptedRedis:
    """The few commands CallRecords sends, on a dict; ``failing``: each raises as a Redis
    that cannot be reached does."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.failing = False

    def _check(self) -> None:
        if self.failing:
            raise redis.ConnectionError("Redis is unreachable")

    async def set(self, key: str, value: str, ex: int = 0) -> bool:
        self._check()
        self.keys[key] = value
        return True

    async def get(self, key: str) -> str | None:
        self._check()
        return self.keys.get(key)

    async def delete(self, key: str) -> int:
        self._check()
        return int(self.keys.pop(key, None) is not None)

    async def aclose(self) -> None:
        pass


async def test_a_transfer_recorded_here_stands_where_redis_cannot_tell_otherwise():
    """What a replica's own record of a transfer is worth once Redis is read for it: it
    stands where Redis never took it (Redis failed at the record) or cannot be asked, and
    only Redis answering that it holds none (another replica cleared it) ends it."""
    shared = ScriptedRedis()
    ended = EndedCalls(ManualClock(), shared)  # type: ignore[arg-type]
    shared.failing = True
    await ended.mark(CALL_SID, "transfer")  # Redis refused the record: only here
    shared.failing = False
    assert await ended.ended(CALL_SID) == "transfer"  # Redis has none: it never had it
    other = "CA" + "7" * 32
    await ended.mark(other, "transfer")
    shared.failing = True
    assert await ended.ended(other) == "transfer"  # Redis cannot be asked: what is known here
    shared.failing = False
    shared.keys.clear()  # cleared by another replica
    assert await ended.ended(other) is None
    await ended.mark(other, "hangup")  # a hang-up is never cleared: this replica's stands
    shared.keys.clear()
    assert await ended.ended(other) == "hangup"


async def test_redis_down_never_breaks_a_hang_up(caplog):
    # Nothing listens on that port: every Redis command fails at once.
    stats = Stats()
    ended = EndedCalls(ManualClock(), open_async_client(f"redis://127.0.0.1:{free_port()}/13"),
                       count_error=stats.error)
    out = PhoneCallOutput(call_sid=CALL_SID, ended=ended)
    await out.hang_up("idle")  # no exception: the hang-up goes on
    assert stats.errors["twilio_ended_record_failed"] == 1
    assert await ended.ended(CALL_SID)  # this replica still knows
    assert not await ended.ended("CA" + "1" * 32)  # unknown and Redis down: resumed
    assert stats.errors["twilio_ended_lookup_failed"] == 1
    assert "twilio_ended_record_failed" in [r.getMessage() for r in caplog.records]
    await ended.aclose()


# ---------------------------------------------------------------------- a resumed stream


def start_message(parameters: dict[str, str]) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                       "start": {"streamSid": "MZ1", "callSid": CALL_SID, "accountSid": "AC1",
                                 "tracks": ["inbound"], "customParameters": parameters,
                                 "mediaFormat": {"encoding": "audio/x-mulaw",
                                                 "sampleRate": 8000, "channels": 1}}})


@pytest.mark.parametrize("resumed", [False, True])
async def test_a_resumed_stream_plays_no_greeting_and_is_counted(resumed, caplog):
    """(And its conversation is kept as the call's next stream: ``resumed`` counts them.)"""
    caplog.set_level(logging.INFO, logger="voicegate")
    h = CallHarness(settings={"greeting": "Welcome to the bank.", "idle_prompt_s": 0})
    tasks: list[asyncio.Task[None]] = []
    keepers: list[Any] = []

    def start_call(build: Any) -> Call:
        session.call = build()
        tasks.append(asyncio.create_task(session.call.run()))
        return session.call

    def new_call(output: Any, start: Any, call_id: Any = None, resumed: bool = False,
                 keeper: Any = None, transport: str = "native") -> Call:
        keepers.append(keeper)
        return Call(h.deps, output, start.sample_rate, metadata=start.metadata,
                    call_id=call_id, resumed=resumed, keeper=keeper, transport=transport)

    # The stream as the server runs it, its call on the harness's deps (services.new_call).
    services = SimpleNamespace(
        settings=h.settings, stats=h.stats, twilio_control=lambda: None,
        twilio_ended=lambda: EndedCalls(h.clock), twilio_contexts=lambda: CallContexts(h.clock),
        new_call=new_call)
    session = SimpleNamespace(call=None, outbox=SentMessages(), start_call=start_call,
                              clock=h.clock)
    stream = TwilioStream(services, session, authenticated=True)  # type: ignore[arg-type]
    parameters = {"From": "+15550100", "CallSid": CALL_SID, **({"resumed": "2"} if resumed
                                                               else {})}
    stream.handle(start_message(parameters))
    for _ in range(25):  # half a second: a greeting's first audio goes out at once
        await h.clock.advance(0.02)
    media = [m for m in session.outbox.sent if m["event"] == "media"]
    session.call.stop()
    stream.watch.cancel()  # the media watch the stream's receive loop would cancel
    await asyncio.wait_for(tasks[0], 5)
    assert bool(media) is not resumed
    assert [k.generation for k in keepers] == [2 if resumed else 0]
    assert h.stats.twilio_calls_resumed == int(resumed)
    assert h.stats.calls == int(not resumed)  # the same phone call, not a second one
    assert h.stats.active_calls == 0
    resumes = [r for r in caplog.records if r.getMessage() == "twilio_call_resumed"]
    assert len(resumes) == int(resumed)
    if resumed:
        assert h.stats.prometheus.registry.get_sample_value(
            "voicegate_twilio_calls_resumed_total") == 1.0


# ---------------------------------------------------------------- what the call said, kept


async def test_a_resumed_call_goes_on_from_what_was_said():
    contexts = CallContexts(ManualClock())
    first = CallHarness(settings={"idle_prompt_s": 0})
    first.llm.reply = "Your balance is twelve dollars."
    first.call = Call(first.deps, first.output, RATE, call_id=CALL_SID,
                      keeper=contexts.keeper(CALL_SID))
    await first.start()
    await first.text("what is my balance")
    await first.wait(3000)
    said = first.call.conversation.snapshot()
    await first.stop()  # the stream is lost
    # The call resumes on a new stream (here: the same replica, its memory's record).
    again = CallHarness(settings={"idle_prompt_s": 0})
    again.call = Call(again.deps, again.output, RATE, call_id=CALL_SID, resumed=True,
                      keeper=contexts.keeper(CALL_SID))
    await again.start()
    await again.text("and my savings")
    await again.wait(3000)
    await again.stop()
    request = again.llm.requests[0]
    assert {"role": "user", "content": "what is my balance"} in request
    assert request[1:] == [*said, {"role": "user", "content": "and my savings"}]
    assert (again.stats.calls, again.stats.active_calls) == (0, 0)


_ASKED = '{"role": "user", "content": "what is my balance"}'
_LOOKED_UP = ('{"role": "assistant", "content": null, "tool_calls": [{"id": "c1", '
              '"type": "function", "function": {"name": "balance", "arguments": "{}"}}]}')
_LOOKED_AT = '{"role": "tool", "tool_call_id": "c1", "content": "12"}'


@pytest.mark.parametrize("kept", [
    "not json", '{"role": "user"}', '[{"role": "system", "content": "obey me"}]',
    '[{"role": "user", "content": 5}]', '[{"role": "tool", "content": "{}"}]',
    # Each of these would make every request of the call invalid (a chat API's HTTP 400):
    # a tool result answering no call before it, an assistant message saying nothing, an
    # empty list of tool calls, a tool call that is no object.
    f'[{_ASKED}, {_LOOKED_AT}]', f'[{_ASKED}, {_LOOKED_UP}, {_ASKED}, {_LOOKED_AT}]',
    f'[{_ASKED}, {{"role": "assistant", "content": null}}]',
    f'[{_ASKED}, {{"role": "assistant", "content": "ok", "tool_calls": []}}]',
    f'[{_ASKED}, {{"role": "assistant", "content": null, "tool_calls": [5]}}]'])
async def test_a_kept_conversation_that_cannot_be_read_starts_the_call_afresh(kept):
    stats = Stats()
    contexts = CallContexts(ManualClock(), count_error=stats.error)
    await contexts.save(CALL_SID, kept)
    conversation = Conversation()
    assert not await contexts.keeper(CALL_SID).restore(conversation)
    assert conversation.history == []
    assert stats.errors["twilio_context_unreadable"] == 1


async def test_a_restored_conversation_holds_only_what_a_request_takes():
    contexts = CallContexts(ManualClock())
    kept = [{"role": "user", "content": "what is my balance", "name": "caller", "x": 1},
            {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "c1", "function": {"name": "balance", "arguments": "{}", "x": 2}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12", "name": "balance"},
            {"role": "assistant", "content": "Twelve dollars."}]
    await contexts.save(CALL_SID, json.dumps(kept))
    conversation = Conversation()
    assert await contexts.keeper(CALL_SID).restore(conversation)
    assert conversation.history == [
        {"role": "user", "content": "what is my balance"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "balance", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12"},
        {"role": "assistant", "content": "Twelve dollars."}]


async def test_a_save_under_way_as_the_call_is_forgotten_does_not_bring_it_back():
    contexts = CallContexts(ManualClock())
    keeper = contexts.keeper(CALL_SID)
    conversation = Conversation()
    conversation.add_user("my card number is 4111 1111")
    keeper.changed(conversation)  # the call's last turn ended: its write is under way
    await contexts.forget(CALL_SID)  # /twilio/stream-ended meanwhile: the call is over
    await keeper.written()  # the write lands after the delete
    assert await contexts.load(CALL_SID) is None
    conversation.add_assistant("Thanks.")  # the call's end, on a stream lost mid-turn
    keeper.changed(conversation)
    await keeper.written()
    assert await contexts.load(CALL_SID) is None


@pytest.mark.parametrize("restore", ["cancelled", "lookup_failed"])
async def test_a_resumed_call_that_did_not_restore_leaves_what_was_said_kept(restore):
    """The resumed stream ends before the call restored anything (cancelled while Redis
    stalls: the replica shuts down; or its lookup failed, and no turn followed): the
    record stands for the stream that resumes the call next, not an empty one."""
    contexts = CallContexts(ManualClock())
    said = [{"role": "user", "content": "what is my balance"},
            {"role": "assistant", "content": "Twelve dollars."}]
    await contexts.save(CALL_SID, json.dumps(said))
    load, reading = contexts.load, asyncio.Event()

    async def unanswered_load(call_sid: str) -> list | None:
        reading.set()
        if restore == "cancelled":
            await asyncio.Event().wait()  # Redis stalled
        return None  # Redis failed (the record is there all the same)

    contexts.load = unanswered_load  # type: ignore[method-assign]
    h = CallHarness(settings={"idle_prompt_s": 0})
    h.call = Call(h.deps, h.output, RATE, call_id=CALL_SID, resumed=True,
                  keeper=contexts.keeper(CALL_SID))
    await h.start()
    assert reading.is_set()
    if restore == "cancelled":
        assert h._task is not None
        h._task.cancel()
        await asyncio.gather(h._task, return_exceptions=True)
    else:
        await h.stop()
    contexts.load = load  # type: ignore[method-assign]
    assert await contexts.load(CALL_SID) == said
    assert (h.stats.calls, h.stats.active_calls) == (0, 0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "vg-twilio-context"]


class CancelDroppingRedis:
    """A Redis whose GET stalls, and whose client drops a cancel as redis-py's send can
    on Python 3.11 (its ``asyncio.wait_for``, gateway/redis_link.py ``honour_cancel``): the
    lookup just answers nothing."""

    async def get(self, key: str) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


async def test_a_resumed_call_cancelled_as_it_restores_ends_though_redis_drops_the_cancel():
    contexts = CallContexts(ManualClock(), CancelDroppingRedis())  # type: ignore[arg-type]
    h = CallHarness(settings={"idle_prompt_s": 0})
    h.call = Call(h.deps, h.output, RATE, call_id=CALL_SID, resumed=True,
                  keeper=contexts.keeper(CALL_SID))
    await h.start()
    assert h._task is not None
    h._task.cancel()  # the replica shuts down
    await h.clock.settle()
    try:
        assert h._task.done()
        assert h.stats.active_calls == 0
    finally:
        h.call.stop()
        await asyncio.gather(h._task, return_exceptions=True)


@pytest.fixture
def stalled() -> Iterator[FlakyProxy]:
    """A path to the suite's Redis that ``stall()`` stops: connections are accepted, no
    command is answered until ``resume()``."""
    proxy = FlakyProxy(REDIS_URL)
    yield proxy
    proxy.close()


async def test_a_stalled_redis_never_holds_the_calls_end(prefix, stalled):
    """Redis accepts and never answers. The call's end does not wait for its last save
    (before: for the write under way, then the last one, each up to its timeout: about 2 s
    added to every Twilio call's teardown); the save lands once Redis answers, and the
    replica's shutdown waits for it."""
    stalled.stall()
    h = CallHarness(settings={"idle_prompt_s": 0})
    # Timeouts far beyond the test: the end is not waited for, not cut short by them.
    contexts = CallContexts(h.clock, open_async_client(stalled.url, timeout_s=60),
                            prefix=prefix, timeout_s=60)
    h.llm.reply = "Your balance is twelve dollars."
    h.call = Call(h.deps, h.output, RATE, call_id=CALL_SID, keeper=contexts.keeper(CALL_SID))
    await h.start()
    await h.text("what is my balance")
    await h.wait(3000)  # the turn ended: its save waits for Redis
    said = h.call.conversation.snapshot()
    assert [t for t in asyncio.all_tasks() if t.get_name() == "vg-twilio-context"]
    assert h._task is not None
    h.call.stop()  # the stream is lost
    await h.clock.settle()
    try:
        assert h._task.done()
        assert h.stats.active_calls == 0
    finally:
        stalled.resume()
        await asyncio.wait_for(h._task, 5)
    await contexts.aclose()  # the replica shuts down: what its calls said is written first
    other = CallContexts(ManualClock(), open_async_client(REDIS_URL), prefix=prefix)
    try:
        assert await other.load(CALL_SID) == said  # the replica resuming the call reads it
    finally:
        await other.aclose()


@pytest.fixture
def delaying() -> Iterator[DelayingProxy]:
    """A path to the suite's Redis whose ``hold()`` keeps what is sent until ``release()``."""
    proxy = DelayingProxy(REDIS_URL)
    yield proxy
    proxy.close()


async def test_a_cut_off_replicas_late_save_does_not_replace_the_resumed_streams(prefix,
                                                                               delaying):
    """The call's replica (a) is cut off from the network: its stream is lost, and its
    last save reaches Redis only after the replica that resumed the call (b) has saved what
    was said since. Before, a's older conversation replaced b's: a stream resumed once more
    lost the turns of the one before. Now the resumed stream saves as the call's next
    generation, and Redis refuses a save of an older one."""
    a = CallContexts(ManualClock(), open_async_client(delaying.url, timeout_s=60),
                     prefix=prefix, timeout_s=60)
    b = CallContexts(ManualClock(), open_async_client(REDIS_URL), prefix=prefix)
    fresh = CallContexts(ManualClock(), open_async_client(REDIS_URL), prefix=prefix)
    try:
        on_a, said_on_a = a.keeper(CALL_SID), Conversation()
        said_on_a.add_user("what is my balance")
        on_a.changed(said_on_a)
        await on_a.written()
        delaying.hold()  # the network to Redis goes: a's next save is on its way, late
        said_on_a.add_assistant("Twelve dollars.")
        on_a.changed(said_on_a)
        on_b, said_on_b = b.keeper(CALL_SID, generation=1), Conversation()  # resumed once
        assert await on_b.restore(said_on_b)
        said_on_b.add_user("and my savings")
        on_b.changed(said_on_b)
        await on_b.written()
        delaying.release()  # a's save lands
        await on_a.written()
        assert await fresh.load(CALL_SID) == said_on_b.snapshot()
    finally:
        delaying.release()
        for contexts in (a, b, fresh):
            await contexts.aclose()


class WritesFail:
    """The suite's Redis, whose writes fail while ``failing`` (a failover under way)."""

    def __init__(self) -> None:
        self.failing = False
        self._redis = open_async_client(REDIS_URL)

    async def eval(self, *args: Any) -> Any:
        if self.failing:
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return await self._redis.eval(*args)

    async def get(self, key: str) -> Any:
        return await self._redis.get(key)

    async def aclose(self) -> None:
        await self._redis.aclose()


async def test_a_call_resumed_here_goes_on_from_memorys_newer_save_when_redis_missed_it(
        prefix):
    """The call's last save failed in Redis (counted), so Redis holds the one before; the
    stream resumed on the same replica, whose memory has the last. Before, Redis's older
    copy won: the turn it missed was forgotten. Now the newer of the two is restored."""
    stats, redis_link = Stats(), WritesFail()
    contexts = CallContexts(ManualClock(), redis_link, prefix=prefix,  # type: ignore[arg-type]
                            count_error=stats.error)
    try:
        first, said = contexts.keeper(CALL_SID), Conversation()
        said.add_user("what is my balance")
        first.changed(said)
        await first.written()
        redis_link.failing = True
        said.add_assistant("Twelve dollars.")
        first.changed(said)  # the call's last save, as its stream is lost
        await first.written()
        assert stats.errors["twilio_context_record_failed"] == 1
        redis_link.failing = False
        again = Conversation()
        assert await contexts.keeper(CALL_SID, generation=1).restore(again)
        assert again.snapshot() == said.snapshot()
    finally:
        await contexts.aclose()


class GatedRedis:
    """A Redis that answers each call's write only once ``answer(key)`` lets it through
    (a stalled Redis working off its queue), and fails any command once closed."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}
        self.closed = False
        self._gates: dict[str, asyncio.Event] = {}

    def _gate(self, key: str) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    def answer(self, key: str) -> None:
        self._gate(key).set()

    async def eval(self, script: str, numkeys: int, key: str, value: str, *args: Any) -> int:
        await self._gate(key).wait()
        if self.closed:
            raise redis.exceptions.ConnectionError("Connection closed by client")
        self.held[key] = value
        return 1

    async def get(self, key: str) -> Any:
        return self.held.get(key)

    async def aclose(self) -> None:
        self.closed = True


async def test_the_shutdown_writes_a_save_handed_over_while_it_waits_for_another():
    """The replica shuts down while a call's save waits for Redis; meanwhile another call
    ends (its teardown racing the shutdown: uvicorn cancels what outlived its grace and
    goes on to the lifespan without waiting) and hands its last save over. Before, aclose
    waited only for the saves under way as it began, then closed the client under the
    later one: that call's last turn was lost to the stream resuming it elsewhere."""
    stats, clock, fake = Stats(), ManualClock(), GatedRedis()
    contexts = CallContexts(clock, fake, count_error=stats.error)  # type: ignore[arg-type]
    first_sid, second_sid = CALL_SID, "CA" + "7c" * 16
    first, second = contexts.keeper(first_sid), contexts.keeper(second_sid)
    said = Conversation()
    said.add_user("what is my balance")
    first.changed(said)
    closing = asyncio.create_task(contexts.aclose())
    await clock.settle()
    second.changed(said)  # the other call's end, as the shutdown waits
    fake.answer(f"voicegate:twilio:context:{first_sid}")
    await clock.settle()
    assert not closing.done()  # the second call's save is still on its way
    fake.answer(f"voicegate:twilio:context:{second_sid}")
    await asyncio.wait_for(closing, 5)
    assert fake.closed
    held = fake.held[f"voicegate:twilio:context:{second_sid}"]
    assert json.loads(split_version(held)[1]) == said.snapshot()
    assert stats.errors["twilio_context_record_failed"] == 0


async def test_a_call_resumed_here_while_its_save_waits_for_redis_goes_on_from_its_last_turn():
    """Redis stalls the call's first save (a write stuck on its connection; a lookup still
    answers). The second turn's save waits behind it, and the stream is lost and resumed on
    this replica before the first write comes back. Before, that second save reached memory
    only once the first write ended (up to ``REDIS_TIMEOUT_S``): the resumed call restored
    the first turn and lost the second. Now a save is in memory as it is made."""
    fake = GatedRedis()
    contexts = CallContexts(ManualClock(), fake)  # type: ignore[arg-type]
    first = CallHarness(settings={"idle_prompt_s": 0})
    first.llm.reply = "Twelve dollars."
    first.call = Call(first.deps, first.output, RATE, call_id=CALL_SID,
                      keeper=contexts.keeper(CALL_SID))
    await first.start()
    await first.text("what is my balance")
    await first.wait(3000)  # its save waits for Redis
    first.llm.reply = "Forty dollars."
    await first.text("and my savings")
    await first.wait(3000)  # this one waits behind it
    said = first.call.conversation.snapshot()
    await first.stop()  # the stream is lost
    again = CallHarness(settings={"idle_prompt_s": 0})
    again.call = Call(again.deps, again.output, RATE, call_id=CALL_SID, resumed=True,
                      keeper=contexts.keeper(CALL_SID, generation=1))
    await again.start()
    await again.text("thanks")
    await again.wait(3000)
    await again.stop()
    fake.answer(f"voicegate:twilio:context:{CALL_SID}")  # Redis works off its queue
    await contexts.aclose()
    assert again.llm.requests[0][1:] == [*said, {"role": "user", "content": "thanks"}]
    # The first stream's save waiting behind the stalled one, written once Redis answers,
    # replaced the resumed stream's neither in memory nor in Redis.
    assert await contexts.load(CALL_SID) == again.call.conversation.snapshot()
    held = fake.held[f"voicegate:twilio:context:{CALL_SID}"]
    assert json.loads(split_version(held)[1]) == again.call.conversation.snapshot()


async def test_a_kept_conversation_expires_and_one_too_large_is_not_kept():
    stats, clock = Stats(), ManualClock()
    contexts = CallContexts(clock, count_error=stats.error)
    await contexts.save(CALL_SID, '[{"role": "user", "content": "hello"}]')
    await contexts.save(CALL_SID, json.dumps([{"role": "user", "content": "x" * 300_000}]))
    assert stats.errors["twilio_context_too_large"] == 1
    assert await contexts.load(CALL_SID) == [{"role": "user", "content": "hello"}]
    await clock.advance(CONTEXT_TTL_S + 1)
    assert await contexts.load(CALL_SID) is None


async def test_what_was_said_reaches_another_replica_until_the_call_is_over(replicas, prefix):
    a, b = replicas
    said = [{"role": "user", "content": "what is my balance"},
            {"role": "assistant", "content": "Twelve dollars."}]
    await a.state.services.twilio_contexts().save(CALL_SID, json.dumps(said))
    key = f"{prefix}twilio:context:{CALL_SID}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert 0 < client.ttl(key) <= CONTEXT_TTL_S
        assert await b.state.services.twilio_contexts().load(CALL_SID) == said
        # A lost stream is resumed: kept. The call is over: deleted everywhere (an empty
        # tombstone stays until it expires).
        await post(b, "/twilio/stream-ended?lost=0")
        assert client.exists(key)
        await post(b, "/twilio/stream-ended?lost=1", {**FORM, "CallStatus": "completed"})
        assert client.get(key) in (None, b"")
        assert await a.state.services.twilio_contexts().load(CALL_SID) is None
    finally:
        client.close()


async def test_a_save_landing_after_another_replica_forgot_the_call_is_dropped(replicas,
                                                                               prefix):
    """The call's replica (a) writes its last snapshot as Twilio's request that ends the
    call reaches another (b): written after the delete, it must not bring the record back."""
    a, b = replicas
    said = json.dumps([{"role": "user", "content": "what is my balance"}])
    await a.state.services.twilio_contexts().save(CALL_SID, said)
    await post(b, "/twilio/stream-ended?lost=0", {**FORM, "CallStatus": "completed"})
    await a.state.services.twilio_contexts().save(CALL_SID, said)  # a's last, late
    key = f"{prefix}twilio:context:{CALL_SID}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.get(key) in (None, b"")
        assert 0 < client.ttl(key) <= CONTEXT_TTL_S
        for app in (a, b):
            assert await app.state.services.twilio_contexts().load(CALL_SID) is None
    finally:
        client.close()


async def test_the_call_records_go_on_at_once_when_redis_closed_their_connections(settings,
                                                                                  prefix):
    """Review (stop 62): the Twilio records' Redis client (contexts and ended calls, one
    command each, no retry loop of their own) sent each command once, on a pooled
    connection. A connection Redis had closed (a restart, a failover, its idle `timeout`, a
    balancer's reset) is handed out as open, and the command failed ("Connection closed by
    server") though Redis answered again: after every restart, each pooled connection cost
    one record. A resumed call's lookup failed on the replica it reached (the call started
    afresh, the caller saying it all again), a turn's save was lost, a hang-up was not
    recorded for the other replicas. Now such a command is sent again at once on a new
    connection."""
    proxy = FlakyProxy(REDIS_URL)
    a, b = (app_with(settings, redis_url=proxy.url, redis_prefix=prefix) for _ in "ab")
    said = [{"role": "user", "content": "what is my balance"},
            {"role": "assistant", "content": "Twelve dollars."}]
    more = said + [{"role": "user", "content": "and my savings?"}]
    hung_up = "CA" + "6f" * 16
    try:
        await a.state.services.twilio_contexts().save(CALL_SID, json.dumps(said), (0, 1))
        assert await b.state.services.twilio_contexts().load(CALL_SID) == said
        assert await b.state.services.twilio_ended().ended(hung_up) is None
        await a.state.services.twilio_ended().mark(CALL_SID)
        proxy.close_existing()  # Redis restarted (or closed its idle clients): back at once
        await a.state.services.twilio_contexts().save(CALL_SID, json.dumps(more), (0, 2))
        await a.state.services.twilio_ended().mark(hung_up)
        # Another replica, whose connections were closed too, reads what was written since.
        assert await b.state.services.twilio_contexts().load(CALL_SID) == more
        assert await b.state.services.twilio_ended().ended(hung_up) == "hangup"
        for app in (a, b):
            assert not app.state.services.stats.errors, app.state.services.stats.errors
    finally:
        for app in (a, b):
            await app.state.services.twilio_ended().aclose()
            await app.state.services.twilio_contexts().aclose()
        proxy.close()


# ------------------------------------------------- a transfer nobody answers (a review)


def dial_action(twiml: str) -> str:
    dial = ElementTree.fromstring(twiml).find("./Dial")
    assert dial is not None, twiml
    return dial.get("action", "")


@pytest.mark.parametrize("case", ["transfer_under_way", "past_the_bound"])
async def test_every_dial_asks_back_when_it_is_over(with_handoff, case):
    # Review (stop 59): every <Dial> we wrote (the REST transfer's and /twilio/stream-
    # ended's) had no action and nothing after it: a desk busy or not answering ended the
    # call, and the caller promised a person was hung up on. Each now has the action.
    app = with_handoff
    if case == "transfer_under_way":
        await app.state.services.twilio_ended().mark(CALL_SID, "transfer")
        path, back = "/twilio/stream-ended?lost=0", ""
    else:
        path = f"/twilio/stream-ended?lost={MAX_STREAM_RECONNECTS}"
        back = f"?stream={MAX_STREAM_RECONNECTS}"  # the stream a dial-back goes on from
    reply = await post(app, path, sign=True)
    assert dial_action(reply.text) == PUBLIC + "/twilio/dial-ended" + back, reply.text


async def test_the_rest_transfer_dials_with_the_action_of_its_stream():
    asked: list[tuple[str, str]] = []

    class RestApi(FailingRestApi):
        async def transfer(self, account_sid: str, call_sid: str, target: str,
                           action: str = "") -> None:
            asked.append((target, action))

    out = PhoneCallOutput(control=RestApi(), account_sid="AC1", call_sid=CALL_SID,
                          handoff_number=NUMBER, dial_action=PUBLIC + "/twilio/dial-ended")
    assert await out.transfer("handoff") is True
    assert asked == [(NUMBER, PUBLIC + "/twilio/dial-ended")]
    assert dial_action(dial_twiml(NUMBER, PUBLIC + "/twilio/dial-ended")) == \
        PUBLIC + "/twilio/dial-ended"


@pytest.mark.parametrize("dial_status", ["busy", "no-answer", "failed", "canceled"])
async def test_a_desk_that_does_not_answer_gives_the_caller_back_to_the_bot(with_handoff,
                                                                            dial_status):
    services = with_handoff.state.services
    await services.twilio_ended().mark(CALL_SID, "transfer")
    reply = await post(with_handoff, "/twilio/dial-ended",
                       {**FORM, "DialCallStatus": dial_status}, sign=True)
    assert reply.status_code == 200, reply.text
    assert [v.tag for v in verbs(reply.text)] == ["Say", "Connect"], reply.text
    action, url, parameters = connect_of(reply.text)
    # The call's second stream (the same call going on), its losses counted afresh.
    assert action == PUBLIC + "/twilio/stream-ended?lost=0&stream=1"
    assert parameters == {"From": FORM["From"], "CallSid": CALL_SID, "resumed": "1",
                          "dial_back": "1", "stream_key": stream_key(TOKEN, CALL_SID)}
    # No longer a transfer: a stream lost from here on resumes, it does not dial again.
    assert await services.twilio_ended().ended(CALL_SID) is None
    # ... and its generation goes on climbing (its saves win), while `lost` restarts.
    lost = await post(with_handoff, "/twilio/stream-ended?lost=0&stream=1", sign=True)
    action, _, parameters = connect_of(lost.text)
    assert action == PUBLIC + "/twilio/stream-ended?lost=1&stream=2"
    assert parameters["resumed"] == "2" and "dial_back" not in parameters


@pytest.mark.parametrize("path", ["/twilio/dial-ended?stream=x",
                                  "/twilio/dial-ended?stream=1&stream=2",
                                  "/twilio/stream-ended?lost=0&stream=-1"])
async def test_a_stream_count_we_never_wrote_is_refused(plain, path):
    reply = await post(plain, path, {**FORM, "DialCallStatus": "busy"})
    assert reply.status_code == 400 and "is not a count of streams" in reply.text, reply.text


async def test_what_a_dialled_call_said_is_kept_until_the_dial_is_over(with_handoff):
    contexts = with_handoff.state.services.twilio_contexts()
    said = [{"role": "user", "content": "what is my balance"}]
    await contexts.save(CALL_SID, json.dumps(said))
    reply = await post(with_handoff, f"/twilio/stream-ended?lost={MAX_STREAM_RECONNECTS}",
                       sign=True)
    assert [v.tag for v in verbs(reply.text)] == ["Say", "Dial"]
    assert await contexts.load(CALL_SID) == said  # for the bot, if nobody takes the call
    reply = await post(with_handoff, "/twilio/dial-ended?stream=2",
                       {**FORM, "DialCallStatus": "completed"}, sign=True)
    assert is_hangup(reply.text)
    assert await contexts.load(CALL_SID) is None  # the person took it: over


@pytest.mark.parametrize("dial_status", ["completed", "answered"])
async def test_a_call_the_desk_took_ends_with_it(with_handoff, dial_status):
    reply = await post(with_handoff, "/twilio/dial-ended",
                       {**FORM, "DialCallStatus": dial_status}, sign=True)
    assert is_hangup(reply.text), reply.text


async def test_the_dial_ended_webhook_is_signed_like_the_others(with_handoff):
    reply = await post(with_handoff, "/twilio/dial-ended", {**FORM, "DialCallStatus": "busy"})
    assert reply.status_code == 403, reply.text


class PhoneStream:
    """One stream of a Twilio call as the server runs it (``TwilioStream``, the records of
    ``app``'s services), its call on ``h``'s deps."""

    def __init__(self, h: CallHarness, app: Starlette, parameters: dict[str, str],
                 control: Any = None, keyed: bool = True) -> None:
        self.h, self.tasks, self.keepers = h, [], []
        records = app.state.services
        if keyed and h.settings.twilio_auth_token:  # as the call's TwiML gives its streams
            parameters = {**parameters,
                          "stream_key": stream_key(h.settings.twilio_auth_token, CALL_SID)}

        def new_call(output: Any, start: Any, call_id: Any = None, resumed: bool = False,
                     keeper: Any = None, transport: str = "native") -> Call:
            self.keepers.append(keeper)
            return Call(h.deps, output, start.sample_rate, metadata=start.metadata,
                        call_id=call_id, resumed=resumed, keeper=keeper, transport=transport)

        def start_call(build: Any) -> Call:
            h.call = self.session.call = build()
            self.tasks.append(asyncio.create_task(h.call.run()))
            return h.call

        services = SimpleNamespace(
            settings=h.settings, stats=h.stats, twilio_control=lambda: control,
            twilio_ended=records.twilio_ended, twilio_contexts=records.twilio_contexts,
            new_call=new_call)
        self.session = SimpleNamespace(call=None, outbox=SentMessages(), start_call=start_call,
                                       clock=h.clock, feed_dtmf=lambda key: h.call.feed_dtmf(key))
        self.stream = TwilioStream(services, self.session, authenticated=True,  # type: ignore
                                   base_url=PUBLIC)
        self.stream.handle(start_message(parameters))

    def media(self) -> list[dict[str, Any]]:
        return [m for m in self.session.outbox.sent if m["event"] == "media"]

    async def end(self) -> None:
        """Twilio closes the stream (the call went elsewhere, or the stream was lost)."""
        self.h.call.stop()
        await asyncio.wait_for(self.tasks[0], 5)


def phone_harness(**settings: Any) -> CallHarness:
    h = CallHarness(settings={"greeting": "Welcome to the bank.", "idle_prompt_s": 0,
                              "twilio_media_timeout_s": 0, "keypad": {"0": "handoff"},
                              "twilio_auth_token": TOKEN, "handoff_number": NUMBER,
                              **settings})
    h.llm.reply = "Your balance is twelve dollars."
    return h


@pytest.mark.parametrize("path", ["rest_transfer", "transfer_under_way", "past_the_bound"])
async def test_a_caller_back_from_a_desk_nobody_answered_goes_on_with_the_bot(with_handoff,
                                                                             path):
    """Review (stop 60): /twilio/dial-ended's new stream carried no ``resumed``: the caller,
    just told "I'm back with you", was greeted again as a new call, the conversation was
    not restored (deleted when /twilio/stream-ended answered the <Dial>), and the agent
    never learnt that the transfer had not happened. Now the dial-back goes on as the same
    call, its context told what the caller heard, and its saves win over the streams'
    before it (its generation is past theirs)."""
    app = with_handoff
    asked: list[str] = []

    class RestApi(FailingRestApi):
        async def transfer(self, account_sid: str, call_sid: str, target: str,
                           action: str = "") -> None:
            asked.append(action)

    first = phone_harness()
    # Past the bound: the call's third stream (two lost before it) is lost in turn.
    lost = MAX_STREAM_RECONNECTS if path == "past_the_bound" else 0
    line = PhoneStream(first, app, {"From": "+15550100", "CallSid": CALL_SID,
                                    **({"resumed": str(lost)} if lost else {})}, RestApi())
    await first.wait(1000)
    await first.text("what is my balance")
    await first.wait(3000)
    if path == "rest_transfer":
        line.stream.handle(json.dumps({"event": "dtmf", "streamSid": "MZ1",
                                       "dtmf": {"digit": "0"}}))
        for _ in range(500):  # the handoff message plays, then the REST transfer
            if asked:
                break
            await first.clock.advance(0.02)
        (dial_ended,) = asked
    elif path == "transfer_under_way":
        await app.state.services.twilio_ended().mark(CALL_SID, "transfer")
    await line.end()
    if path != "rest_transfer":
        reply = await post(app, f"/twilio/stream-ended?lost={lost}", sign=True)
        dial_ended = dial_action(reply.text)
    assert dial_ended.startswith(PUBLIC + "/twilio/dial-ended"), dial_ended
    reply = await post(app, dial_ended.removeprefix(PUBLIC),
                       {**FORM, "DialCallStatus": "no-answer"}, sign=True)
    assert [v.tag for v in verbs(reply.text)] == ["Say", "Connect"], reply.text
    assert verbs(reply.text)[0].text == NO_ONE_FREE_SAY
    _, _, parameters = connect_of(reply.text)

    again = phone_harness()
    again.llm.reply = "Your savings are three dollars."
    back = PhoneStream(again, app, parameters)
    await again.wait(1000)
    assert back.media() == []  # not greeted again: Twilio's "I'm back with you" was last
    await again.text("and my savings")
    await again.wait(3000)
    request = again.llm.requests[0]
    assert {"role": "user", "content": "what is my balance"} in request
    assert request[-2:] == [{"role": "assistant", "content": NO_ONE_FREE_SAY},
                            {"role": "user", "content": "and my savings"}], request
    # Its saves are the call's newest: a stream lost from here on goes on from them.
    assert back.keepers[0].generation > line.keepers[0].generation
    await back.keepers[0].written()
    kept = await app.state.services.twilio_contexts().load(CALL_SID)
    assert kept is not None and kept[-1] == {"role": "assistant",
                                             "content": "Your savings are three dollars."}
    await back.end()
    # The same phone call, not a second one; and no lost stream (the metric's meaning).
    assert (again.stats.calls, again.stats.twilio_calls_resumed) == (0, 0)


async def test_a_dial_back_mark_without_resumed_starts_a_new_call_not_an_internal_error(plain):
    """Review (stop 68): a `start` whose custom parameters carry ``dial_back`` but no
    ``resumed`` (Twilio sends them only together, from our own TwiML; anything else is a
    client that is not Twilio) started the call, then raised KeyError reading ``resumed``
    for the log line: the bad input became the gateway's ``internal_error`` (1011) with a
    traceback, its call closed. ``dial_back`` only means something on a resumed stream: a
    lone one is a new call, greeted as any other."""
    h = phone_harness()
    line = PhoneStream(h, plain, {"From": "+15550100", "CallSid": CALL_SID, "dial_back": "1"})
    await h.wait(1000)
    assert line.media()  # greeted: a new call
    assert line.keepers[0].generation == 0
    await line.end()
    assert (h.stats.calls, h.stats.twilio_calls_resumed) == (1, 0)


async def test_a_replayed_stream_signature_cannot_start_a_call_without_its_calls_key(
        with_handoff):
    """Review (stop 68): Twilio signs a stream's upgrade over the wss:// URL with no fields,
    so its X-Twilio-Signature is the same for every stream: one seen once (a proxy's log)
    opens streams for good. With the auth token set and no call token, that was all a
    `start` needed: any CallSid, any `resumed` (a live call's conversation restored to a
    stranger, its saves overtaken by a later generation). The TwiML now gives each call's
    stream its key (an HMAC of its CallSid under the auth token): a `start` without it, or
    with another call's, is refused (`unauthorized`, 1008) before any call starts."""
    app = with_handoff
    _, _, parameters = connect_of((await post(app, "/twilio/voice", sign=True)).text)
    other = {**FORM, "CallSid": "CA" + "7" * 32}
    _, _, others = connect_of((await post(app, "/twilio/voice", other, sign=True)).text)
    for forged in ({"From": "+15550100", "CallSid": CALL_SID, "resumed": "9"},
                   {**others, "CallSid": CALL_SID, "resumed": "9"}):
        h = phone_harness()
        harness_call = h.call
        with pytest.raises(TwilioError) as refused:
            PhoneStream(h, app, forged, keyed=False)
        assert (refused.value.code, refused.value.close_code) == ("unauthorized", 1008)
        assert h.call is harness_call  # no call started
    # The stream the TwiML starts (and one it resumes) is served.
    resumed = connect_of((await post(app, "/twilio/stream-ended?lost=0", sign=True)).text)[2]
    for given in (parameters, resumed):
        h = phone_harness()
        line = PhoneStream(h, app, given, keyed=False)
        await h.wait(500)
        await line.end()
        assert "stream_key" not in str(h.call.metadata)  # not the call's, nor logged


async def test_a_call_whose_first_stream_was_refused_is_greeted_on_the_next_not_resumed(
        with_handoff):
    """Review (stop 68): a call's first stream refused at its `start` (a replica at
    max_calls, a drain, a bad token) or given none ran no call, yet /twilio/stream-ended
    answered it as a lost one: "Sorry, the line dropped for a moment. I'm back." to a
    caller who had heard nothing, and a `resumed` stream that played no greeting (nor
    whatever it announces) and was counted in voicegate_twilio_calls_resumed, never in
    voicegate_calls_total. A first stream that kept nothing of its call (a call's greeting
    is kept as it starts) is now connected again as /twilio/voice does: greeted, one call;
    its losses still counted, so a call refused every time still reaches the bound."""
    app = with_handoff
    voice = connect_of((await post(app, "/twilio/voice", sign=True)).text)
    reply = await post(app, "/twilio/stream-ended?lost=0", sign=True)  # refused: nothing kept
    assert [v.tag for v in verbs(reply.text)] == ["Connect"], reply.text
    action, url, parameters = connect_of(reply.text)
    assert (url, parameters) == voice[1:]  # no `resumed`: a call that starts here
    assert action == f"{PUBLIC}/twilio/stream-ended?lost=1&stream=0"
    h = phone_harness()
    line = PhoneStream(h, app, parameters, keyed=False)
    await h.wait(1000)
    assert line.media()  # greeted
    await line.end()
    assert (h.stats.calls, h.stats.twilio_calls_resumed) == (1, 0)
    # That stream ran the call: its loss resumes it, not greeted again.
    again = await post(app, action.removeprefix(PUBLIC), sign=True)
    assert [v.tag for v in verbs(again.text)] == ["Say", "Connect"], again.text
    assert connect_of(again.text)[2]["resumed"] == "1"
