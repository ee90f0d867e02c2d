"""The caller page at ``/``: talk to the gateway from a browser (docs/protocol.md, "The caller page").

Static files shipped in the package (``gateway/static/``: no CDN, no build step) and a small
JSON config so the page knows the negotiated rate and whether it must ask for the call token
(a browser WebSocket cannot send headers: it presents the token as ``?token=``).
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from .services import Services

PAGE_RATE = 16000  # the rate the page negotiates: the recognisers' own, so nothing resamples twice
CALL_PATH = "/v1/call"
# Scripts, styles, the worklet and the WebSocket all come from this origin ('self' covers ws:/wss:
# to the same host in CSP 3); the microphone is this page's only.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "Permissions-Policy": "microphone=(self)",
}


def _page_html() -> str:
    return resources.files("gateway").joinpath("static/caller.html").read_text("utf-8")


async def caller_page(request: Request) -> Response:
    return HTMLResponse(_page_html(), headers=PAGE_HEADERS)


async def caller_config(request: Request) -> JSONResponse:
    """What the page needs before it calls; says whether a token is needed, never the token."""
    services: Services = request.app.state.services
    settings = services.settings
    return JSONResponse({"token_required": bool(settings.call_token), "sample_rate": PAGE_RATE,
                         "frame_ms": settings.frame_ms, "call_path": CALL_PATH},
                        headers={"Cache-Control": "no-store"})


class CallerFiles(StaticFiles):
    """The page's files. The page itself is one of them (``/caller/caller.html``): there it
    gets the headers it gets at ``/``, or any site could frame it, its microphone too."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if path.endswith(".html"):
            response.headers.update(PAGE_HEADERS)
        return response


def caller_routes() -> list[BaseRoute]:
    return [
        Route("/", caller_page),
        Route("/caller/config.json", caller_config),
        Mount("/caller", CallerFiles(packages=[("gateway", "static")]), name="caller-static"),
    ]
