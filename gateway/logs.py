"""Structured logs: one JSON object per line, one line per event. Never audio, never keys."""

from __future__ import annotations

import contextvars
import json
import logging
import re
from typing import Any

# The call a line belongs to: set once in a call's task, inherited by every task it starts,
# so every line logged on a call's behalf carries its id without passing it around.
_call_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("voicegate_call_id",
                                                                       default=None)


def bind_call_id(call_id: str | None) -> None:
    """Tag every log line of the current task (and the tasks it starts) with ``call_id``."""
    _call_id.set(call_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        call_id = _call_id.get()
        if call_id is not None:
            entry["call_id"] = call_id
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("voicegate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def event(logger: logging.Logger, name: str, level: int = logging.INFO, *,
          exc_info: BaseException | None = None, **fields: Any) -> None:
    """One structured line; ``exc_info`` adds that exception's traceback (a bug's)."""
    if logger.isEnabledFor(level):
        if "call_id" not in fields and (call_id := _call_id.get()) is not None:
            fields["call_id"] = call_id
        logger.log(level, name, exc_info=exc_info, extra={"fields": fields})


class Throttle:
    """At most one line a key every ``every_s`` seconds of the caller's clock: a failure that
    repeats (a stage failing on every frame, a flood of refused requests) is counted in full
    elsewhere and logged sparingly here."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}  # key: (logged at, held back since)

    def admit(self, key: str, now: float) -> int | None:
        """None: hold this one back; else log it, and that many were held back since the
        last line of this key."""
        last, held = self._last.get(key, (None, 0))
        if last is not None and now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return None
        self._last[key] = (now, 0)
        return held


# A browser WebSocket cannot send headers, so the caller page presents the call token as
# `?token=` (docs/protocol.md); uvicorn logs every upgrade's and request's path with its query.
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&#\s\"]*")
REDACTED = "[redacted]"


def _redact(value: Any) -> Any:
    return _TOKEN_IN_QUERY.sub(r"\1" + REDACTED, value) if isinstance(value, str) else value


class RedactQueryToken(logging.Filter):
    """Rewrites ``?token=...`` in a record's message and arguments to ``?token=[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) for arg in record.args)
        return True


def redact_server_logs() -> None:
    """Keep call tokens out of uvicorn's own lines (its upgrade lines and access log); safe to
    call again."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryToken) for f in logger.filters):
            logger.addFilter(RedactQueryToken())


# uvicorn's websockets-sansio protocol (gateway/server.py's ws=) answers a text message that
# is not UTF-8 with ``logger.exception(`` this ``)`` on "uvicorn.error", a traceback at ERROR,
# then closes the connection 1007 (no reason). Any client can do that on every connection it
# opens: the session counts and logs it once as bad input (``invalid_utf8``) instead. Matched
# by its text: should uvicorn reword it, the line just comes back, nothing else changes.
UVICORN_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."


class DropInvalidUtf8Traceback(logging.Filter):
    """Drops uvicorn's traceback for a text message that is not UTF-8 (``invalid_utf8``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != UVICORN_INVALID_UTF8


# uvicorn's websockets-sansio protocol never marks the handshake complete after a denial
# response (HTTP 503 to an upgrade: draining, not_ready, overloaded), so when the handler
# returns it logs this at ERROR on "uvicorn.error" for every refused call, though the client
# got its 503 (uvicorn PR #3138, open). Alerting on ERROR would page for each. Dropped only
# in the task that sent the denial (``denial_sent``): any other handler returning without a
# handshake is a bug and keeps its line.
UVICORN_NO_HANDSHAKE = "ASGI callable returned without completing handshake."
_DENIED: contextvars.ContextVar[bool] = contextvars.ContextVar("vg_denial_sent", default=False)


def denial_sent() -> None:
    """This connection's task answered its upgrade with an HTTP response (a denial)."""
    _DENIED.set(True)


class DropDenialHandshakeError(logging.Filter):
    """Drops uvicorn's "without completing handshake" after a denial this task sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == UVICORN_NO_HANDSHAKE and _DENIED.get())


def quiet_invalid_utf8() -> None:
    """Keep uvicorn's traceback for a client's text that is not UTF-8 out of the log (the
    session logs it as bad input); safe to call again."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropInvalidUtf8Traceback) for f in logger.filters):
        logger.addFilter(DropInvalidUtf8Traceback())


def quiet_denial_handshake_error() -> None:
    """Keep uvicorn's "without completing handshake" line for an upgrade refused with an HTTP
    response (``denial_sent``) out of the log; safe to call again."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropDenialHandshakeError) for f in logger.filters):
        logger.addFilter(DropDenialHandshakeError())
