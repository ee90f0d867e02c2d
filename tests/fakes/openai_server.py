"""A fake OpenAI-compatible chat-completions server (SSE streaming, tool calls).

It speaks the documented wire format: ``POST .../chat/completions`` with
``stream: true`` answers ``text/event-stream`` lines ``data: {chat.completion.chunk}``
ending with ``data: [DONE]``; errors are ``{"error": {"message", "type", "code"}}``.
Both ``/v1/chat/completions`` (openai) and ``/openai/v1/chat/completions`` (groq) are served.

Behaviour per request comes from ``script(body) -> Reply``; by default replies are
looked up by model name in ``replies``. Every request is recorded, and a client that
goes away before the reply is complete is counted as a disconnect.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

STALL = 3600.0  # a "stall": the first token never comes within any test's patience


@dataclass
class Reply:
    text: str = "Hello there. How can I help you today?"
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON)
    ttft_s: float = 0.0  # delay before the first content chunk
    token_delay_s: float = 0.0  # delay between later chunks
    status: int = 200  # != 200: an error reply before any streaming
    malformed_at: int | None = None  # send a broken chunk instead of chunk number N (0-based)
    stall_after: int | None = None  # stop sending (but keep the connection) after N chunks
    # End the response cleanly after N chunks, with no finish_reason and no [DONE] (a proxy
    # or a crashed worker cutting the answer short): the body just ends.
    cut_after: int | None = None
    # Ordering without timing: hold the first content until a request for this model has
    # arrived (so a test knows the other leg really reached the server before it lost).
    after_request_of: str | None = None
    # Tool-call fragments without their "index" (some OpenAI-compatible servers omit it):
    # the first fragment of a call carries its id and name, the rest only arguments.
    omit_tool_index: bool = False
    # Ordering without timing: send N chunks, then the rest only once ``FakeOpenAI.release``
    # is set (a model still writing its answer, or a tool call's arguments, for as long as
    # the test needs).
    hold_after: int | None = None
    error_message: str = ""  # with a status != 200, the error's message (else "fake failure N")


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)  # by model
    completed: Counter = field(default_factory=Counter)
    disconnects: Counter = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)


class FakeOpenAI:
    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.default = Reply()
        self.script: Callable[[dict[str, Any]], Reply] | None = None
        # Refuse a request whose history holds a tool call with arguments that are no JSON
        # object (400 "invalid tool call arguments"), as Ollama's OpenAI compatibility does:
        # it decodes each one into a map (openai/openai.go, FromCompletionToolCall).
        self.strict_tool_arguments = False
        # Refuse a request whose history holds a tool call named outside [a-zA-Z0-9_-] or
        # past 64 characters, as OpenAI does (400 "Invalid 'messages[N].tool_calls[i]
        # .function.name': string does not match pattern").
        self.strict_tool_names = False
        self.release = threading.Event()  # ends every Reply.hold_after
        # Refusals before any reply, one a request, in order: (status, error, headers), e.g.
        # a rate limit's 429 and its Retry-After, which an account over its limit answers to
        # every request (both legs of a hedge) until it clears.
        self.refusals: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        self.stats = Stats()
        self._lock = threading.Lock()

    def reply_for(self, body: dict[str, Any]) -> Reply:
        if self.script is not None:
            return self.script(body)
        return self.replies.get(body.get("model", ""), self.default)

    def wait_for(self, predicate: Callable[[Stats], bool], timeout: float = 5.0) -> bool:
        """Poll (from the test's thread or loop) until the server-side stats satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self.stats):
                    return True
            time.sleep(0.01)
        return False

    async def await_for(self, predicate: Callable[[Stats], bool], timeout: float = 20.0) -> bool:
        # Polls: a passing check returns at once; the bound is for a loaded machine (the
        # full suite on two cores once took over 5 s to see a hedge loser's disconnect).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self.stats):
                    return True
            await asyncio.sleep(0.01)
        return False

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await _json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error",
                                              "code": None}})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            await _json(send, 400, {"error": {"message": "body is not JSON", "type": "invalid_request_error",
                                              "code": None}})
            return
        model = body.get("model", "")
        with self._lock:
            self.stats.requests[model] += 1
            self.stats.bodies.append(body)
            refusal = self.refusals.pop(0) if self.refusals else None
        if refusal is not None:
            status, error, headers = refusal
            await _json(send, status, {"error": error}, headers)
            with self._lock:
                self.stats.completed[model] += 1
            return
        if "max_tokens" in body:  # as OpenAI's current models (GPT-5, o-series) answer it
            await _json(send, 400, {"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                           "model. Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens",
                "code": "unsupported_parameter"}})
            with self._lock:
                self.stats.completed[model] += 1
            return
        if self.strict_tool_arguments and not _tool_arguments_are_objects(body):
            await _json(send, 400, {"error": {"message": "invalid tool call arguments",
                                              "type": "invalid_request_error", "code": None}})
            with self._lock:
                self.stats.completed[model] += 1
            return
        bad_name = _bad_tool_name(body) if self.strict_tool_names else None
        if bad_name is not None:
            await _json(send, 400, {"error": {
                "message": f"Invalid '{bad_name}': string does not match pattern. Expected a "
                           "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                "type": "invalid_request_error", "param": bad_name, "code": "invalid_value"}})
            with self._lock:
                self.stats.completed[model] += 1
            return
        reply = self.reply_for(body)
        if reply.status != 200:
            message = reply.error_message or f"fake failure {reply.status}"
            await _json(send, reply.status, {"error": {"message": message,
                                                       "type": "server_error", "code": None}})
            with self._lock:
                self.stats.completed[model] += 1
            return

        # The reply and a disconnect listener race: a client closing its stream
        # (the hedge's loser) is seen here even while the reply is sleeping.
        writer = asyncio.ensure_future(self._stream(send, model, reply))
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        done, _ = await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
        if writer in done and writer.exception() is None:
            listener.cancel()
            with self._lock:
                self.stats.completed[model] += 1
        else:
            writer.cancel()
            listener.cancel()
            with self._lock:
                self.stats.disconnects[model] += 1
        await asyncio.gather(writer, listener, return_exceptions=True)

    async def _stream(self, send: Any, model: str, reply: Reply) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        chunk_id = f"chatcmpl-{id(reply):x}{time.monotonic_ns() % 100000}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        pieces: list[bytes] = [chunk({"role": "assistant", "content": ""})]  # role first, as OpenAI does
        for word in _split_words(reply.text):
            pieces.append(chunk({"content": word}))
        for n, (name, arguments) in enumerate(reply.tool_calls):
            # (A name that is no string, as a broken server sends, is sent as it is.)
            named = name if isinstance(name, str) else repr(name)
            call_id = f"call_{n}_{abs(hash((named, arguments))) % 10**8}"
            index = {} if reply.omit_tool_index else {"index": n}
            pieces.append(chunk({"tool_calls": [{**index, "id": call_id, "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}))
            half = len(arguments) // 2  # arguments arrive in fragments
            for part in (arguments[:half], arguments[half:]):
                if part:
                    pieces.append(chunk({"tool_calls": [{**index, "function": {"arguments": part}}]}))
        pieces.append(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
        pieces.append(b"data: [DONE]\n\n")

        for n, piece in enumerate(pieces):
            if reply.cut_after is not None and n >= reply.cut_after:
                break
            if reply.hold_after is not None and n == reply.hold_after:
                while not self.release.is_set():  # polled: a disconnect still cancels it
                    await asyncio.sleep(0.005)
            if reply.stall_after is not None and n >= reply.stall_after:
                await asyncio.sleep(STALL)
            if n == 1:
                await asyncio.sleep(reply.ttft_s)  # the role chunk goes at once, content waits
                while reply.after_request_of and not self.stats.requests[reply.after_request_of]:
                    await asyncio.sleep(0.005)
            elif n > 1 and reply.token_delay_s:
                await asyncio.sleep(reply.token_delay_s)
            if reply.malformed_at is not None and n == reply.malformed_at:
                piece = b'data: {"id": "broken", "choices": [{"delta": {"content": "x"\n\n'
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Go's encoding/json refuses NaN and Infinity


def _tool_arguments_are_objects(body: dict[str, Any]) -> bool:
    for message in body.get("messages") or ():
        for call in message.get("tool_calls") or ():
            try:
                arguments = json.loads(call["function"]["arguments"], parse_constant=_refuse_constant)
            except (ValueError, KeyError, TypeError):
                return False
            if not isinstance(arguments, (dict, type(None))):
                return False
    return True


def _bad_tool_name(body: dict[str, Any]) -> str | None:
    """Where the history holds a tool call whose name OpenAI refuses, else None."""
    for m, message in enumerate(body.get("messages") or ()):
        for c, call in enumerate(message.get("tool_calls") or ()):
            name = (call.get("function") or {}).get("name")
            if not (isinstance(name, str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name)):
                return f"messages[{m}].tool_calls[{c}].function.name"
    return None


def _split_words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words) if w or i == 0] if text else []


async def _wait_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _json(send: Any, status: int, payload: dict[str, Any],
                headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})
