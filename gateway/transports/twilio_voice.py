"""``POST /twilio/voice``: the voice webhook of a Twilio number.

Answers TwiML that connects the call to our Media Streams endpoint
(``<Connect><Stream url="wss://HOST/twilio/stream">``, with the caller's number and
the CallSid as custom parameters). With an auth token configured, requests must carry
a valid ``X-Twilio-Signature`` (checked with the official validator); so must the
stream's WebSocket upgrade, which Twilio signs over the wss:// URL with no fields.
"""

from __future__ import annotations

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
from ..http_body import BodyTimeout, BodyTooLarge, closing
from ..services import Services

log = logging.getLogger("voicegate.twilio")

STREAM_PATH = "/twilio/stream"
# Custom parameters handed to the stream; they come back in its `start` message.
FORWARDED_PARAMETERS = ("From", "CallSid")
# The stream parameter that carries VOICEGATE_CALL_TOKEN (Twilio's stream URL takes no query).
TOKEN_PARAMETER = "token"
# Anything but XML 1.0's Char production (most C0 controls, surrogates, U+FFFE/U+FFFF):
# TwiML holding one is not XML, and Twilio rejects it. The TwiML library escapes markup only.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def public_base_url(request: HTTPConnection, public_url: str) -> str:
    """The gateway's base URL as Twilio sees it: the setting, else Host + X-Forwarded-Proto."""
    if public_url:
        return public_url.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    scheme = proto or request.url.scheme
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


def twiml_connect(url: str, parameters: dict[str, str]) -> str:
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


# Twilio's voice webhook form is a few KB (call fields, caller and callee details).
MAX_WEBHOOK_BODY_BYTES = 64 * 1024


async def twilio_voice(request: Request) -> Response:
    services: Services = request.app.state.services
    settings = services.settings
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
    params = ImmutableMultiDict(parse_qsl(body, keep_blank_values=True))
    base = public_base_url(request, settings.public_url)
    # Twilio signs the exact URL it requested, query string included, plus the form fields.
    refused = signature_refusal(request, base + request.url.path, params)
    if refused is not None:
        return PlainTextResponse(refused, status_code=403)
    forwarded = {name: params.get(name, "") for name in FORWARDED_PARAMETERS}
    url = stream_url(base)
    # Unsigned (no auth token), anyone can post: refuse what TwiML cannot carry rather
    # than answer a document that is not XML. (Host is the caller's too; httptools
    # already refuses control characters in headers.)
    invalid = not_xml_refusal({**forwarded, "Host": url})
    if invalid is not None:
        services.stats.error("twilio_invalid_webhook")
        logs.event(log, "twilio_invalid_webhook", logging.WARNING, reason=invalid)
        return PlainTextResponse(invalid, status_code=400)
    logs.event(log, "twilio_voice", call_id=forwarded["CallSid"] or None)
    # The token goes into TwiML only for requests proven to come from Twilio: without a
    # Twilio auth token anyone could read it here (docs/operations.md).
    if settings.call_token and settings.twilio_auth_token:
        forwarded[TOKEN_PARAMETER] = settings.call_token
    return Response(twiml_connect(url, forwarded), media_type="application/xml")


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
    logs.event(log, "twilio_bad_signature", logging.WARNING, url=url, reason=reason)
    return (f"X-Twilio-Signature {reason} for {url}: check VOICEGATE_TWILIO_AUTH_TOKEN, and "
            "set VOICEGATE_PUBLIC_URL if Twilio reaches this gateway through a proxy")
