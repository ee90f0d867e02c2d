"""Bearer-token authentication for every ``/admin`` route.

The token comes from the settings (``VOICEGATE_ADMIN_TOKEN``) and is compared in
constant time. Without a configured token the admin API is off and says so.
"""

from __future__ import annotations

import functools
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..credentials import bearer_token, token_matches

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
    if not token_matches(bearer_token(request), token):
        # Counted as every refusal is: a run of them is someone guessing, or a dashboard
        # left with an old token.
        request.app.state.services.stats.error("admin_unauthorized")
        return JSONResponse({"error": UNAUTHORIZED}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="voicegate admin"'})
    return None


def admin_only(handler: Handler) -> Handler:
    """Wrap a handler: 404 when the admin API is off, 401 without the right token."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        refused = check(request)
        if refused is not None:
            return refused
        return await handler(request)

    return guarded
