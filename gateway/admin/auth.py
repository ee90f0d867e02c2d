"""Bearer-token authentication for every ``/admin`` route.

The token comes from the settings (``VOICEGATE_ADMIN_TOKEN``) and is compared in
constant time. Without a configured token the admin API is off and says so.
"""

from __future__ import annotations

import functools
import hmac
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Handler = Callable[[Request], Awaitable[Response]]

DISABLED = "admin API is disabled: set VOICEGATE_ADMIN_TOKEN"
UNAUTHORIZED = "missing or wrong admin token: send the header Authorization: Bearer <token>"


def error(message: str, status: int, **extra: object) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def configured_token(request: Request) -> str:
    return str(request.app.state.services.settings.admin_token or "")


def disabled_response() -> JSONResponse:
    return error(DISABLED, 404)


def check(request: Request) -> Response | None:
    """None when the request carries the configured token, else the response to send."""
    token = configured_token(request)
    if not token:
        return disabled_response()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token_matches(given.strip(), token):
        # Counted as every refusal is: a run of them is someone guessing, or a dashboard
        # left with an old token.
        request.app.state.services.stats.error("admin_unauthorized")
        return JSONResponse({"error": UNAUTHORIZED}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="voicegate admin"'})
    return None


def token_matches(given: str, token: str) -> bool:
    """Whether a header's token (its bytes as Starlette decodes them, Latin-1) is ``token``,
    in constant time. A token beyond ASCII arrives as UTF-8 from curl and scripts, as
    Latin-1 from a browser's fetch (the dashboard): both are the token. Compared as UTF-8
    alone, curl's never matched (401 to every request)."""
    sent = given.encode("latin-1", "replace")  # the header's bytes (U+FFFD: not a header's)
    expected = token.encode("utf-8")
    try:
        as_latin1 = token.encode("latin-1")
    except UnicodeEncodeError:  # no browser can send it; curl's UTF-8 still matches
        as_latin1 = expected
    # both compared, always: the time taken does not tell which one was close
    return hmac.compare_digest(sent, expected) | hmac.compare_digest(sent, as_latin1)


def admin_only(handler: Handler) -> Handler:
    """Wrap a handler: 404 when the admin API is off, 401 without the right token."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        refused = check(request)
        if refused is not None:
            return refused
        return await handler(request)

    return guarded
