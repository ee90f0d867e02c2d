"""Request bodies read with a size limit: an HTTP handler never buffers more than it allows."""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes while it streams in
    (a declared Content-Length is checked first; a chunked body is counted as it arrives)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes")
    # Starlette's own parsers (request.form) read this cached body instead of the stream.
    request._body = bytes(body)  # noqa: SLF001
    return request._body
