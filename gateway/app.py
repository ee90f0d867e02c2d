"""The Starlette application: health, readiness, metrics, the call endpoints, the caller page
(``/``) and /admin."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from .admin import admin_exception_handlers, admin_routes
from .caller_page import caller_routes
from .runtime import Runtime
from .services import Services
from .settings import Settings
from .tracing import configure_from_env as configure_tracing
from .tracing import flush_traces
from .transports.native import native_call
from .transports.twilio import twilio_stream
from .transports.twilio_voice import twilio_dial_ended, twilio_stream_ended, twilio_voice


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    body = services.readiness()
    # Pending asyncio tasks in this process: a leak shows as a count that only grows
    # (bench/soak.py reads it).
    body["tasks"] = len(asyncio.all_tasks())
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    if not services.ready:
        return Response("# not ready: models are loading\n", status_code=503,
                        media_type="text/plain")
    registry = services.runtime.stats.prometheus.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, runtime: Runtime | None = None,
               services: Services | None = None) -> Starlette:
    """Build the app. Tests pass a warm ``runtime`` so models load once per session."""
    services = services or Services(settings, runtime)
    configure_tracing()  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.start()
        yield
        await services.aclose()
        await asyncio.to_thread(flush_traces)  # the drain's last calls' spans, sent now

    app = Starlette(routes=[
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        WebSocketRoute("/v1/call", native_call),
        Route("/twilio/voice", twilio_voice, methods=["POST"]),
        Route("/twilio/stream-ended", twilio_stream_ended, methods=["POST"]),
        Route("/twilio/dial-ended", twilio_dial_ended, methods=["POST"]),
        WebSocketRoute("/twilio/stream", twilio_stream),
        *admin_routes(),
        *caller_routes(),
    ], exception_handlers=admin_exception_handlers(), lifespan=lifespan)
    app.state.services = services
    return app
