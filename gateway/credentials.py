"""The tokens a client presents: read as the client meant them, compared in constant time.

Used by the call endpoints (the call token) and the admin API (the admin token)."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection


def bearer_token(connection: HTTPConnection) -> str:
    """The ``Authorization: Bearer`` token, "" when there is none.

    A header's bytes reach us decoded as Latin-1. Clients send a token beyond ASCII as UTF-8
    (curl, scripts, SDKs) or, a browser's fetch, as Latin-1: the value is read as UTF-8
    where its bytes are that, else as the Latin-1 it is. Read as Latin-1 alone, a UTF-8
    token never matched (every request refused)."""
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return ""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return value


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token means authentication is off."""
    if not expected:
        return True
    # surrogatepass: a token parsed from JSON may hold a lone surrogate; it just fails to match.
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode())
