"""Twilio's REST API for the calls this gateway streams: transfer and hang up.

A Media Stream carries audio only; moving the call somewhere else is a REST request
on the call itself (``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json``),
made here with the official ``twilio`` SDK on its asyncio HTTP client:

- transfer: new TwiML for the live call, ``<Dial>`` to ``VOICEGATE_HANDOFF_NUMBER``
  (a phone number, or ``<Sip>`` for a SIP URI); Twilio ends our stream and dials;
- hang up: ``Status=completed``.

A call already over (the caller hung up first) is answered 400 with Twilio's error 21220
("Call is not in-progress"), or 404 with Twilio's 20404: ``CallAlreadyEnded``, no failure
for a hang-up or a transfer. 20404 is ambiguous: it is also Twilio's answer for a call
this API host cannot see (an account whose calls are processed in another region than
``VOICEGATE_TWILIO_API_URL``'s). The SIDs cannot be wrong (both come from the stream's
``start``), and credentials of another account are answered 401, so the host is what
a 20404 may mean besides a caller gone: ``CallAlreadyEnded.certain`` is False, and the
output logs it as a warning naming the account and the host. A 404 without Twilio's
error body (a proxy's, a base URL that is not Twilio's API) says nothing of the call:
a ``CallControlError`` like any refusal.

Credentials: the call's account SID (from the stream's ``start``) and
``VOICEGATE_TWILIO_AUTH_TOKEN``. ``VOICEGATE_TWILIO_API_URL`` replaces
https://api.twilio.com (tests point it at a local fake). ``start`` is not signed: with
``VOICEGATE_TWILIO_ACCOUNT_SID`` set, a request for any other account is refused here,
never sent (the stream is refused before, at its ``start``).

One HTTP session carries every request, whatever account it names (the SDK sends the
credentials with each request); the SDK's ``Client`` around it is made per request, so
nothing is kept per account a ``start`` names. Cleanup: ``aclose`` closes that session
(made on first use).
"""

from __future__ import annotations

import asyncio
import logging

# The call resource, which the SDK would import on the first request: ~90 modules read and
# compiled on the serving loop, every call's audio stalled meanwhile. Here, with the app.
import twilio.rest.api.v2010.account.call  # noqa: F401
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import Dial, VoiceResponse

from .. import logs

log = logging.getLogger("voicegate.twilio")


# Twilio's error for a live-call operation on a call that is not in progress (completed).
CALL_NOT_IN_PROGRESS = 21220
# Twilio's error for a resource it does not have (in its 404's JSON body; the SDK puts
# the HTTP status in ``code`` when a body has none, as a proxy's page).
RESOURCE_NOT_FOUND = 20404
DEFAULT_API_URL = "https://api.twilio.com"


class CallControlError(RuntimeError):
    """Twilio refused the request or could not be reached; the message says which."""


class CallAlreadyEnded(CallControlError):
    """Twilio answered that the call is over: ``CALL_NOT_IN_PROGRESS``, or HTTP 404 with
    ``RESOURCE_NOT_FOUND`` (the call is no longer live to update). The caller hung up
    before the request landed. ``certain``: False for the 404, which Twilio answers too
    for a call this API host does not see (another region's)."""

    def __init__(self, message: str, certain: bool) -> None:
        super().__init__(message)
        self.certain = certain


def dial(target: str, action: str = "") -> Dial:
    """The ``<Dial>`` that connects the call to ``target``: a phone number or a SIP URI.
    ``action``: what Twilio asks when the dial is over. Without it (and with no verb after)
    Twilio ends the call when the desk is busy or does not answer: a caller promised a
    person would be hung up on."""
    verb = Dial(action=action) if action else Dial()
    if target.startswith(("sip:", "sips:")):
        verb.sip(target)
    else:
        verb.number(target)
    return verb


def dial_twiml(target: str, action: str = "") -> str:
    """TwiML that connects the call to ``target``: a phone number or a SIP URI; ``action``:
    the URL Twilio asks once the dial is over (``/twilio/dial-ended``), which takes the
    caller back when nobody answered."""
    response = VoiceResponse()
    response.append(dial(target, action))
    return str(response)


class TwilioCallControl:
    def __init__(self, auth_token: str, api_url: str = "", timeout_s: float = 10.0,
                 account_sid: str = "") -> None:
        self._auth_token = auth_token
        self._api_url = api_url.rstrip("/")
        self._timeout_s = timeout_s
        # The gateway's own account (VOICEGATE_TWILIO_ACCOUNT_SID); "": any the stream names.
        self._account_sid = account_sid
        self._http: AsyncTwilioHttpClient | None = None

    @property
    def api_url(self) -> str:
        """Where the requests go (a 20404's warning names it: the calls' region)."""
        return self._api_url or DEFAULT_API_URL

    def _client(self, account_sid: str) -> Client:
        if not account_sid:
            raise CallControlError("the stream's `start` named no account SID: the call "
                                   "cannot be addressed through the REST API")
        if self._account_sid and account_sid != self._account_sid:
            raise CallControlError(f"account {account_sid[:64]} is not this gateway's Twilio "
                                   "account (VOICEGATE_TWILIO_ACCOUNT_SID): not asked")
        if self._http is None:
            # Made on the serving loop (its aiohttp session is bound to it), once: one
            # session for every account, never one per SID an unsigned `start` names.
            self._http = AsyncTwilioHttpClient(timeout=self._timeout_s)
        client = Client(account_sid, self._auth_token, http_client=self._http)
        if self._api_url:
            client.api.base_url = self._api_url
        return client

    async def transfer(self, account_sid: str, call_sid: str, target: str,
                       action: str = "") -> None:
        await self._update(account_sid, call_sid, "transfer",
                           twiml=dial_twiml(target, action))

    async def hang_up(self, account_sid: str, call_sid: str) -> None:
        await self._update(account_sid, call_sid, "hang up", status="completed")

    async def _update(self, account_sid: str, call_sid: str, what: str, **changes: str) -> None:
        if not call_sid:
            raise CallControlError(f"cannot {what}: the stream named no call SID")
        client = self._client(account_sid)
        try:
            async with asyncio.timeout(self._timeout_s):
                await client.calls(call_sid).update_async(**changes)
        except TwilioRestException as exc:
            message = (f"Twilio refused to {what} call {call_sid}: HTTP {exc.status} "
                       f"{exc.msg}"[:300])
            if exc.code == CALL_NOT_IN_PROGRESS:
                raise CallAlreadyEnded(message, certain=True) from None
            if exc.status == 404 and exc.code == RESOURCE_NOT_FOUND:
                raise CallAlreadyEnded(message, certain=False) from None
            raise CallControlError(message) from None
        except TimeoutError:
            raise CallControlError(f"Twilio did not answer the {what} request within "
                                   f"{self._timeout_s:g} s") from None
        except Exception as exc:  # aiohttp: refused, DNS, TLS
            raise CallControlError(f"could not reach Twilio to {what}: "
                                   f"{type(exc).__name__}: {exc}"[:300]) from None
        logs.event(log, "twilio_call_updated", action=what, call_id=call_sid)

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None and http.session is not None:
            await http.session.close()
