"""``POST /twilio/voice``: the voice webhook of a Twilio number; ``POST /twilio/stream-ended``.

``/twilio/voice`` answers TwiML that connects the call to our Media Streams endpoint
(``<Connect action="https://HOST/twilio/stream-ended?lost=0"><Stream
url="wss://HOST/twilio/stream">``, with the caller's number and the CallSid as custom
parameters). With an auth token configured, requests must carry a valid
``X-Twilio-Signature`` (checked with the official validator); so must the stream's
WebSocket upgrade, which Twilio signs over the wss:// URL with no fields.

When the stream's WebSocket closes, Twilio requests the ``<Connect action>`` and runs the
TwiML it answers (without one, the call would end there: a replica killed mid-call, a
balancer or a network cutting the connection, dropped the caller). ``/twilio/stream-ended``
answers ``<Hangup/>`` for a call that is over (the gateway hung it up:
gateway/transports/twilio_ended.py; or its CallStatus says so), the ``<Dial>`` to the
handoff number for one whose transfer was under way (the REST request may never have
landed); else, up to
``MAX_STREAM_RECONNECTS`` times a call (``lost`` counts them), a short apology and a new
``<Connect><Stream>`` marked ``resumed`` (no greeting again), or, for a first stream that
ran no call (refused at its ``start``: nothing of the call kept), the ``<Connect>`` of
``/twilio/voice`` again (a new call, greeted); past that, a ``<Dial>`` to
``VOICEGATE_HANDOFF_NUMBER`` (a person takes the call) or an apology and ``<Hangup/>``.

Every ``<Dial>`` has ``/twilio/dial-ended`` as its action: a dial nobody took gives the
caller back to the bot on a new stream, marked ``resumed`` (and ``dial_back``) as a lost
one's: the same call, its conversation restored. ``stream`` in both actions' query is the
generation of the call's last stream (its saves' version, twilio_context.py): the new
stream's is one more, so its saves replace theirs. Left out where it tells nothing new
(``lost`` in a call never dialled back; 0 in a dial's), and read so when absent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from typing import Mapping
from urllib.parse import parse_qsl

from starlette.datastructures import ImmutableMultiDict
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse

from .. import logs
from ..http_body import BodyAbandoned, BodyTimeout, BodyTooLarge, closing
from ..services import Services
from ..settings import redact_url
from .twilio_ended import TRANSFERRED
from .twilio_rest import dial

log = logging.getLogger("voicegate.twilio")

STREAM_PATH = "/twilio/stream"
# Custom parameters handed to the stream; they come back in its `start` message.
FORWARDED_PARAMETERS = ("From", "CallSid")
# The stream parameter that carries VOICEGATE_CALL_TOKEN (Twilio's stream URL takes no query).
TOKEN_PARAMETER = "token"
# The stream parameter that binds a stream to its call (with an auth token set):
# ``stream_key`` of the call's CallSid. The upgrade's signature cannot: it is the same
# for every stream, so one seen once could be replayed for any call.
STREAM_KEY_PARAMETER = "stream_key"
# The stream parameter of a call going on over a new stream (its stream lost, or a dial
# nobody took): the stream's generation, how many streams the call had before it (1..).
RESUMED_PARAMETER = "resumed"
# The stream parameter of a call back from a dial nobody took (its value "1"): the caller
# heard NO_ONE_FREE_SAY, which the agent is told (the restored context has no word of it).
DIAL_BACK_PARAMETER = "dial_back"
STREAM_ENDED_PATH = "/twilio/stream-ended"
# The <Dial action>: Twilio asks it when a transfer's dial is over (answered, busy, ...).
DIAL_ENDED_PATH = "/twilio/dial-ended"
# DialCallStatus of a dial the person took: the call is over when they are done.
_DIAL_TAKEN = frozenset({"completed", "answered"})
# New streams for one call after its stream was lost: a replica gone is one, a rolling
# deploy may cost another; a call that keeps losing its stream goes to a person instead.
MAX_STREAM_RECONNECTS = 2
# `lost` in the action URL: what we wrote there, a count from 0 (a few digits at most).
_LOST = re.compile("[0-9]{1,3}")
# CallStatus values of a call that is over: nothing to resume.
_CALL_OVER = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
# What the caller hears (Twilio's own voice: our stream is what was lost).
RESUMED_SAY = "Sorry, the line dropped for a moment. I'm back."
HANDOFF_SAY = "Sorry, we are having trouble with this line. Let me put you through to a person."
GIVE_UP_SAY = "Sorry, we are having trouble with this line. Please call us again."
NO_ONE_FREE_SAY = "Sorry, no one could take your call just now. I'm back with you."
# Anything but XML 1.0's Char production (most C0 controls, surrogates, U+FFFE/U+FFFF):
# TwiML holding one is not XML, and Twilio rejects it. The TwiML library escapes markup only.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def stream_key(auth_token: str, call_sid: str) -> str:
    """The key a stream of ``call_sid`` must carry: an HMAC of the CallSid under the
    Twilio auth token, so only a TwiML this gateway answered a signed webhook with holds
    it, and it opens streams of that call only."""
    return hmac.new(auth_token.encode(), f"voicegate-stream:{call_sid}".encode(),
                    hashlib.sha256).hexdigest()


def stream_generation(resumed: str) -> int:
    """Which of its call's streams a stream is, by its ``resumed`` parameter: 0 for the
    first, else how many were lost before it (1 for a value this gateway did not write)."""
    if not resumed:
        return 0
    return max(1, int(resumed)) if _LOST.fullmatch(resumed) else 1


# A WebSocket upgrade's scheme (Starlette's for one, or the X-Forwarded-Proto some proxies,
# Traefik among them, set on upgrades) as the HTTP base it stands for.
_HTTP_SCHEME = {"wss": "https", "ws": "http"}


def public_base_url(request: HTTPConnection, public_url: str) -> str:
    """The gateway's base URL as Twilio sees it: the setting, else Host + X-Forwarded-Proto.
    An HTTP URL (the webhooks' base) also when taken from the stream's WebSocket upgrade:
    a `wss` scheme is `https` (``stream_url`` makes it `wss` again), so the `<Dial action>`
    a stream writes is a URL Twilio can request."""
    if public_url:  # its scheme as Twilio reads it ("HTTPS" is https; TwiML's wss too)
        scheme, sep, rest = public_url.rstrip("/").partition("://")
        return f"{scheme.lower()}{sep}{rest}"
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    scheme = proto or request.url.scheme
    scheme = _HTTP_SCHEME.get(scheme, scheme)
    host = request.headers.get("host") or request.url.netloc
    return f"{scheme}://{host}"


def stream_url(base_url: str) -> str:
    """ws(s):// twin of the base URL: TLS in front of the webhook means TLS for the stream."""
    scheme, sep, rest = base_url.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws" if scheme == "http" else scheme
    return f"{ws_scheme}{sep}{rest}{STREAM_PATH}"


def not_xml_refusal(fields: Mapping[str, str]) -> str | None:
    """Why one of these values (going into TwiML) is refused, or None."""
    for name, value in fields.items():
        found = _NOT_XML_CHAR.search(value)
        if found is not None:
            return (f"{name} holds U+{ord(found.group()):04X}, a character XML cannot carry: "
                    "Twilio never sends one, and TwiML cannot hold it")
    return None


def stream_ended_url(base_url: str, lost: int, stream: int | None = None) -> str:
    """The ``<Connect action>``: Twilio requests it when the stream ends. ``stream``: the
    stream's generation, when it is not ``lost`` (a stream after a dial nobody took)."""
    more = "" if stream is None or stream == lost else f"&stream={stream}"
    return f"{base_url}{STREAM_ENDED_PATH}?lost={lost}{more}"


def dial_ended_url(base_url: str, stream: int = 0) -> str:
    """The ``<Dial action>``: Twilio requests it when a transfer's dial is over.
    ``stream``: the generation of the call's stream before the dial."""
    return f"{base_url}{DIAL_ENDED_PATH}" + (f"?stream={stream}" if stream else "")


def _query_count(request: Request, name: str, absent: int | None, should_be: str) -> int | str:
    """The action URL's count ``name`` (``lost``, ``stream``: one we wrote, 0-999);
    ``absent`` when it is not there (None: it must be). A ``str``: why it is refused, it
    ``should_be`` what."""
    values = request.query_params.getlist(name)
    if not values and absent is not None:
        return absent
    if len(values) == 1 and _LOST.fullmatch(values[0]):
        return int(values[0])
    return f"{name}={','.join(values)[:40]!r} is {should_be}"


_NOT_A_STREAM_COUNT = ("not a count of streams (stream=N, N a number from 0, as the action "
                       "URL this gateway wrote)")


def twiml_connect(url: str, parameters: dict[str, str], action: str, say: str = "") -> str:
    response = VoiceResponse()
    if say:
        response.say(say)
    connect = Connect(action=action)
    stream = connect.stream(url=url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


# Twilio's voice webhook form is a few KB (call fields, caller and callee details).
MAX_WEBHOOK_BODY_BYTES = 64 * 1024


async def signed_form(request: Request) -> tuple[ImmutableMultiDict[str, str], str] | Response:
    """A Twilio webhook's form fields and our public base URL; or the refusal to answer:
    413/408 for the body, 403 for the signature."""
    services: Services = request.app.state.services
    # Twilio posts application/x-www-form-urlencoded; parsed here without a multipart dependency.
    # Its form is a few KB: a larger body is refused before it is buffered (anyone can post
    # here, and the signature can only be checked once the whole body is read).
    try:
        body = (await services.read_body(request, MAX_WEBHOOK_BODY_BYTES)).decode(
            "utf-8", errors="replace")
    except BodyTooLarge as exc:
        return PlainTextResponse(str(exc), status_code=413)
    except BodyTimeout as exc:
        return closing(PlainTextResponse(str(exc), status_code=408))
    except BodyAbandoned as exc:  # the poster is gone: nobody reads this answer
        return PlainTextResponse(str(exc), status_code=400)
    params = ImmutableMultiDict(parse_qsl(body, keep_blank_values=True))
    base = public_base_url(request, services.settings.public_url)
    # Twilio signs the exact URL it requested, query string included, plus the form fields.
    refused = signature_refusal(request, base + request.url.path, params)
    if refused is not None:
        return PlainTextResponse(refused, status_code=403)
    return params, base


def invalid_webhook(services: Services, reason: str) -> Response:
    """400: a webhook request Twilio would never send (counted, logged)."""
    services.stats.error("twilio_invalid_webhook")
    logs.event(log, "twilio_invalid_webhook", logging.WARNING, reason=reason)
    return PlainTextResponse(reason, status_code=400)


def stream_parameters(services: Services, params: Mapping[str, str],
                      url: str) -> dict[str, str] | Response:
    """The custom parameters of the call's ``<Stream>`` (or the 400 refusing the request)."""
    settings = services.settings
    forwarded = {name: params.get(name, "") for name in FORWARDED_PARAMETERS}
    # Unsigned (no auth token), anyone can post: refuse what TwiML cannot carry rather
    # than answer a document that is not XML. (Host is the caller's too; httptools
    # already refuses control characters in headers.)
    invalid = not_xml_refusal({**forwarded, "Host": url})
    if invalid is not None:
        return invalid_webhook(services, invalid)
    # The token goes into TwiML only for requests proven to come from Twilio: without a
    # Twilio auth token anyone could read it here (docs/operations.md).
    if settings.call_token and settings.twilio_auth_token:
        forwarded[TOKEN_PARAMETER] = settings.call_token
    if settings.twilio_auth_token:  # the stream's `start` must carry it (twilio.py)
        forwarded[STREAM_KEY_PARAMETER] = stream_key(settings.twilio_auth_token,
                                                     forwarded["CallSid"])
    return forwarded


def _xml(twiml: str) -> Response:
    return Response(twiml, media_type="application/xml")


async def _call_webhook(request: Request) -> tuple[ImmutableMultiDict[str, str], str,
                                                   dict[str, str]] | Response:
    """A webhook about a call (signed, size-limited): its form, the public base URL and the
    parameters a stream of the call is given; or the refusal."""
    signed = await signed_form(request)
    if isinstance(signed, Response):
        return signed
    params, base = signed
    forwarded = stream_parameters(request.app.state.services, params, stream_url(base))
    if isinstance(forwarded, Response):
        return forwarded
    return params, base, forwarded


async def twilio_voice(request: Request) -> Response:
    webhook = await _call_webhook(request)
    if isinstance(webhook, Response):
        return webhook
    _, base, forwarded = webhook
    logs.event(log, "twilio_voice", call_id=forwarded["CallSid"] or None)
    return _xml(twiml_connect(stream_url(base), forwarded, stream_ended_url(base, 0)))


async def twilio_stream_ended(request: Request) -> Response:
    """The call's stream ended (Twilio's ``<Connect action>``): hang up a call that is over,
    resume one whose stream was lost, hand it to a person after ``MAX_STREAM_RECONNECTS``."""
    services: Services = request.app.state.services
    signed = await signed_form(request)
    if isinstance(signed, Response):
        return signed
    params, base = signed
    lost = _query_count(request, "lost", None,
                        f"not the count of lost streams ({STREAM_ENDED_PATH}?lost=N, N a "
                        "number from 0, as the <Connect action> this gateway wrote)")
    if isinstance(lost, str):
        return invalid_webhook(services, lost)
    # The ended stream's generation: `lost` unless a dial nobody took came between.
    stream = _query_count(request, "stream", lost, _NOT_A_STREAM_COUNT)
    if isinstance(stream, str):
        return invalid_webhook(services, stream)
    url = stream_url(base)
    forwarded = stream_parameters(services, params, url)
    if isinstance(forwarded, Response):
        return forwarded
    call_sid = forwarded["CallSid"]
    status = params.get("CallStatus", "")
    event = {"call_id": call_sid or None, "lost": lost, "call_status": status[:32]}
    response = VoiceResponse()
    handoff = services.settings.handoff_number
    how = None if status in _CALL_OVER else await services.twilio_ended().ended(call_sid)
    if how == TRANSFERRED and not handoff:
        # Another replica was putting it through; this one has no number to dial (their
        # settings differ): the bot takes the call back rather than hang up on the caller.
        logs.event(log, "twilio_transfer_not_dialled", logging.WARNING, **event,
                   hint="set VOICEGATE_HANDOFF_NUMBER alike on every replica")
        how = None
    if how is None and status not in _CALL_OVER and lost < MAX_STREAM_RECONNECTS:
        if stream == 0 and not await services.twilio_contexts().kept(call_sid):
            # The call's first stream never ran it (refused at its `start`: a full
            # replica, a bad token; or no `start` came): nothing to resume, and the caller
            # has heard nothing. Connected again as /twilio/voice does: greeted, one call.
            logs.event(log, "twilio_stream_lost", logging.WARNING, outcome="restart", **event)
            return _xml(twiml_connect(url, forwarded, stream_ended_url(base, lost + 1, 0)))
        logs.event(log, "twilio_stream_lost", logging.WARNING, outcome="resume", **event)
        resumed = {**forwarded, RESUMED_PARAMETER: str(stream + 1)}
        return _xml(twiml_connect(url, resumed, stream_ended_url(base, lost + 1, stream + 1),
                                  say=RESUMED_SAY))
    # Not resumed. A call dialled keeps what it said (twilio_context.py) until the dial is
    # over: a desk nobody answers gives the caller back to the bot, which goes on from it.
    if how == TRANSFERRED and handoff:
        # The stream ended while the transfer was under way (its REST request may never
        # have landed): the person the caller was promised, whoever asked Twilio last.
        logs.event(log, "twilio_stream_ended", outcome="transfer", **event)
        response.append(dial(handoff, dial_ended_url(base, stream)))
    elif status in _CALL_OVER or how is not None:
        # Hung up by the gateway, or the caller is gone: nothing to resume.
        logs.event(log, "twilio_stream_ended", outcome="hangup", **event)
        await services.twilio_contexts().forget(call_sid)
        response.hangup()
    else:
        logs.event(log, "twilio_stream_lost", logging.WARNING,
                   outcome="handoff" if handoff else "hangup", **event)
        if handoff:
            response.say(HANDOFF_SAY)
            response.append(dial(handoff, dial_ended_url(base, stream)))
        else:
            await services.twilio_contexts().forget(call_sid)
            response.say(GIVE_UP_SAY)
            response.hangup()
    return _xml(str(response))


async def twilio_dial_ended(request: Request) -> Response:
    """A transfer's dial is over (Twilio's ``<Dial action>``). The person took the call:
    it ends with them. Nobody did (busy, no answer, failed): the caller is back with the
    bot, told so, on a new stream that goes on with the call (as a lost stream's does),
    never hung up on."""
    services: Services = request.app.state.services
    webhook = await _call_webhook(request)
    if isinstance(webhook, Response):
        return webhook
    params, base, forwarded = webhook
    # Absent from a dial this gateway started before it wrote `stream`: the first stream's.
    stream = _query_count(request, "stream", 0, _NOT_A_STREAM_COUNT)
    if isinstance(stream, str):
        return invalid_webhook(services, stream)
    call_sid = forwarded["CallSid"]
    dial_status = params.get("DialCallStatus", "")[:32]
    status = params.get("CallStatus", "")
    event = {"call_id": call_sid or None, "dial_status": dial_status, "call_status": status[:32]}
    if dial_status in _DIAL_TAKEN or status in _CALL_OVER:
        logs.event(log, "twilio_dial_ended", outcome="hangup", **event)
        # The call will not come back to the bot: what it said is kept no longer.
        await services.twilio_contexts().forget(call_sid)
        response = VoiceResponse()
        response.hangup()
        return _xml(str(response))
    # Not transferred after all: a stream lost from here on resumes, not dials again.
    await services.twilio_ended().forget(call_sid)
    logs.event(log, "twilio_dial_ended", logging.WARNING, outcome="back_to_bot", **event)
    # The same call going on, as after a lost stream: not greeted again, its conversation
    # restored, its saves replacing those of the streams before the dial (one generation
    # on). Its losses are counted afresh (lost=0): a lost stream resumes, not dials again.
    back = {**forwarded, RESUMED_PARAMETER: str(stream + 1), DIAL_BACK_PARAMETER: "1"}
    return _xml(twiml_connect(stream_url(base), back, stream_ended_url(base, 0, stream + 1),
                              say=NO_ONE_FREE_SAY))


def signature_refusal(connection: HTTPConnection, public_url: str,
                      params: Mapping[str, str]) -> str | None:
    """Why this request is refused (its X-Twilio-Signature is missing or wrong), or None.

    ``public_url`` is the URL Twilio requested, without the query string. Without an auth
    token nothing is checked (logged once per app).
    """
    services: Services = connection.app.state.services
    token = services.settings.twilio_auth_token
    if not token:
        if not getattr(connection.app.state, "twilio_unsigned_noted", False):
            connection.app.state.twilio_unsigned_noted = True  # once per app, not per call
            logs.event(log, "twilio_signature_validation_off", logging.WARNING,
                       hint="set VOICEGATE_TWILIO_AUTH_TOKEN to reject requests not from Twilio")
        return None
    query = connection.url.query
    url = public_url + (f"?{query}" if query else "")
    signature = connection.headers.get("x-twilio-signature", "")
    if signature and RequestValidator(token).validate(url, params, signature):
        return None
    # Counted while the models load too: these counters are the runtime's once loaded.
    services.stats.error("twilio_bad_signature")
    reason = "missing" if not signature else "does not match"
    # Neither the URL's password (Twilio's HTTP auth) nor its query (a call token) is
    # logged or told to whoever sent the request.
    shown = redact_url(url, query=True)
    logs.event(log, "twilio_bad_signature", logging.WARNING, url=shown, reason=reason)
    return (f"X-Twilio-Signature {reason} for {shown}: check VOICEGATE_TWILIO_AUTH_TOKEN, and "
            "set VOICEGATE_PUBLIC_URL if Twilio reaches this gateway through a proxy")
