"""Request bodies read with a size limit and a deadline: an HTTP handler never buffers more
than it allows, nor waits for the rest of a body for longer than ``body_timeout_s``."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .clock import SYSTEM_CLOCK, Clock, Expired, deadline


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The body did not arrive in full in time: answer 408 with ``closing`` (the rest of
    it, if it ever comes, must not be read as the next request)."""


class BodyAbandoned(Exception):
    """The client closed its connection before its body arrived in full (an interrupted
    upload, a dropped link): nothing was done, and the answer reaches nobody. Starlette's
    ``ClientDisconnect`` escaping the handler was logged by uvicorn as an ERROR traceback."""


async def read_body(request: Request, limit: int, timeout_s: float,
                    clock: Clock = SYSTEM_CLOCK) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes while it streams in
    (a declared Content-Length is checked first; a chunked body is counted as it arrives),
    and refused (``BodyTimeout``) unless it has arrived in full within ``timeout_s`` of
    ``clock``: uvicorn bounds the wait for a request's headers (gateway/http_idle.py), not
    for its body, so a client that sends headers and then trickles or stalls would hold
    this task, and what it sent so far, forever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    try:
        async with deadline(clock, timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"the body is larger than {limit} bytes")
    except ClientDisconnect:
        raise BodyAbandoned(f"the client closed the connection before its body arrived in "
                            f"full ({len(body)} bytes by then)") from None
    except Expired:
        raise BodyTimeout(f"the body did not arrive in full within {timeout_s:g} s "
                          f"({len(body)} bytes by then; VOICEGATE_BODY_TIMEOUT_S)") from None
    # Starlette's own parsers (request.form) read this cached body instead of the stream.
    request._body = bytes(body)  # noqa: SLF001
    return request._body


def closing(response: Response) -> Response:
    """``response`` with ``Connection: close``: uvicorn closes the connection once it is
    sent, so what is left of a body that timed out is never read."""
    response.headers["connection"] = "close"
    return response
