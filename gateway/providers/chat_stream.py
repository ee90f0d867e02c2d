"""Turn an OpenAI-style streamed chat completion into LLMChunks.

The ``openai`` and ``groq`` SDKs stream the same chunk shape (``choices[0].delta``
with ``content`` and indexed ``tool_calls`` fragments) and raise exceptions of the
same names from their own modules; ``SDKChat`` holds everything they share, so the
adapters only construct their client.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, AsyncIterator

import httpx

from gateway.providers.base import (LLMChunk, ProviderError, RateLimited, ToolCall, ToolSpec,
                                    without_key)
from gateway.providers.rate_limits import reset_s, retry_after_s
from gateway.settings import redact_url


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Collects indexed tool-call deltas. A call is complete when the choice finishes, or
    earlier, once a later index starts, if its arguments are already a whole JSON object
    (OpenAI streams parallel calls one after the other: the first is announced, its filler
    cued, while the next is written; every call runs once the round's stream has ended; a
    server that interleaves them has each wait for its own fragments)."""

    def __init__(self) -> None:
        self._open: dict[int, _PartialCall] = {}
        self._order: list[int] = []
        self._next = 0  # above every index seen: what an index-less new call gets

    def add(self, delta_calls: list[Any]) -> list[ToolCall]:
        done: list[ToolCall] = []
        for delta in delta_calls:
            _check_text(delta)
            index = getattr(delta, "index", None)
            if index is None:  # some OpenAI-compatible servers omit it
                index = self._unindexed(delta)
            self._next = max(self._next, index + 1)
            call_id = getattr(delta, "id", None)
            open_call = self._open.get(index)
            if open_call is not None and call_id and open_call.id and call_id != open_call.id:
                # A new call at an index in use (servers that send each call whole, all at
                # index 0): the one there is whole.
                done.extend(self._emit(index))
                open_call = None
            if open_call is None:
                done.extend(self._close_whole(before=index))
                self._open[index] = _PartialCall()
                self._order.append(index)
            partial = self._open[index]
            if call_id:
                partial.id = call_id
            function = getattr(delta, "function", None)
            if function is not None:
                if getattr(function, "name", None) and not partial.name:
                    partial.name = function.name  # sent whole, in the first fragment
                if getattr(function, "arguments", None):
                    partial.arguments.append(function.arguments)
        return done

    def _unindexed(self, delta: Any) -> int:
        """A fragment without an index: an id (other than the open call's) or a name starts
        a new call (both come whole, in its first fragment); the rest continue the last one."""
        last = self._open[self._order[-1]] if self._order else None
        call_id = getattr(delta, "id", None)
        function = getattr(delta, "function", None)
        starts = (call_id and (last is None or call_id != last.id)) or \
            (not call_id and function is not None and getattr(function, "name", None))
        if starts or not self._order:
            return self._next
        return self._order[-1]

    def finish(self) -> list[ToolCall]:
        done: list[ToolCall] = []
        for index in list(self._order):
            done.extend(self._emit(index))
        return done

    def drop(self) -> int:
        """Forget the open calls (their fragments were cut); how many there were."""
        count = len(self._order)
        self._open.clear()
        self._order.clear()
        return count

    def _close_whole(self, before: int) -> list[ToolCall]:
        """The calls below ``before`` whose arguments are already a whole JSON object."""
        done: list[ToolCall] = []
        for index in list(self._order):
            if index < before and _whole_object(self._open[index].arguments):
                done.extend(self._emit(index))
        return done

    def _emit(self, index: int) -> list[ToolCall]:
        partial = self._open.pop(index)
        self._order.remove(index)
        if not partial.name:
            return []
        # A server that sends no id: one made up, unique (a webhook keys on call_id).
        return [ToolCall(id=partial.id or f"call_{uuid.uuid4().hex[:24]}", name=partial.name,
                         arguments="".join(partial.arguments) or "{}")]


def _check_text(delta: Any) -> None:
    """A call's id and name are text, or absent. The SDKs build chunks unchecked: another
    value (a number, a list) crashed the agent's runner, or went into the context, which
    the chat API then refused at every later request of the call. This leg's malformed
    chunk instead (a name comes in a call's first fragment: the other leg answers)."""
    function = getattr(delta, "function", None)
    for name, value in (("id", getattr(delta, "id", None)),
                        ("function.name", getattr(function, "name", None))):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"a tool call's {name} is a {type(value).__name__}, not text")


def _whole_object(arguments: list[str]) -> bool:
    try:
        return isinstance(json.loads("".join(arguments)), dict)
    except ValueError:
        return False


def request_args(model: str, messages: list[dict[str, Any]], tools: list[ToolSpec] | None,
                 temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    # The messages go in ``extra_body`` (merged into the JSON body as is) rather than
    # ``messages``: the SDKs run a typed transform over every message, about 0.1 ms each,
    # i.e. ~9 ms for an 80-message context on the critical path of every miss. Ours are
    # already plain JSON dicts, so the transform buys nothing.
    args: dict[str, Any] = {"model": model, "messages": [], "stream": True,
                            "extra_body": {"messages": messages}}
    if tools:
        args["tools"] = [tool.as_openai() for tool in tools]
    if temperature is not None:
        args["temperature"] = temperature
    if max_tokens is not None:
        # Not ``max_tokens``: deprecated, and refused by OpenAI's current models (GPT-5,
        # the o-series); Groq takes either.
        args["max_completion_tokens"] = max_tokens
    return args


class CutShort(Exception):
    """The stream ended with no ``finish_reason``: the answer (or a tool call's
    arguments) was cut short, by a proxy or a worker that died, not finished."""


async def chunks(stream: AsyncIterator[Any]) -> AsyncIterator[LLMChunk]:
    """LLMChunks from an SDK stream of ChatCompletionChunk objects (no error mapping).
    Raises ``CutShort`` when the stream ends before its choice finished; says the finish
    itself at once (``LLMChunk(finished=True)``, after its tool calls), then reads on."""
    assembler = ToolCallAssembler()
    finished = False
    async for completion_chunk in stream:
        for choice in getattr(completion_chunk, "choices", None) or ():
            if getattr(choice, "index", 0) not in (0, None):
                continue  # n > 1 is never requested
            delta = choice.delta
            if delta is not None:
                content = delta.content
                if content is not None and not isinstance(content, str):
                    # The SDKs build chunks unchecked: a list of typed parts, or anything
                    # else, is no text to say. This leg's malformed chunk (the other leg
                    # answers), never a crash of the hedge reading ``LLMChunk.text``.
                    raise ValueError(f"delta.content is a {type(content).__name__}, not text")
                if content:
                    yield LLMChunk(text=content)
                if delta.tool_calls:
                    done = assembler.add(list(delta.tool_calls))
                    for call in done:
                        yield LLMChunk(tool_call=call)
                    if not done:
                        # Said at once: a model writing a call's arguments is answering
                        # (the hedge's first token, no idle stall), though the call is
                        # only run once whole.
                        yield LLMChunk(tool_call_fragment=True)
            if choice.finish_reason == "length" and assembler.drop():
                # Stopped at max_tokens while writing a call: its arguments are cut as
                # surely as by a dropped connection, and it must not run.
                raise CutShort("the answer reached llm_max_tokens while writing a tool call")
            if choice.finish_reason:
                finished = True
                for call in assembler.finish():
                    yield LLMChunk(tool_call=call)
                # Said at once: the answer is whole, and its consumer (the hedge) need not
                # wait for the body's end ([DONE], the close), which a server or proxy
                # holding the connection may never send, nor fail the answer if it breaks.
                # ``cut``: stopped at max_tokens, its last sentence maybe broken off.
                yield LLMChunk(finished=True, cut=choice.finish_reason == "length")
    if not finished:
        # The SDKs end quietly when the body just stops (no [DONE] either): without this,
        # half an answer was spoken as a whole one, and a half-streamed tool call run.
        raise CutShort("the stream ended without a finish_reason (cut short)")


class SDKChat:
    """``ChatModel`` over an OpenAI-style async SDK client (``openai`` or ``groq``).

    ``sdk`` is the SDK's module: its ``APIStatusError``, ``APITimeoutError`` and
    ``APIConnectionError`` become ``ProviderError`` messages (its ``RateLimitError`` a
    ``RateLimited``, unless the quota is spent); ``base_error`` is the root of its
    exceptions.
    """

    def __init__(self, name: str, model: str, client: Any, sdk: ModuleType,
                 base_error: type[Exception], temperature: float | None,
                 max_tokens: int | None) -> None:
        self.name = name
        self.model = model
        self._client = client
        self._sdk = sdk
        self._base_error = base_error
        self._temperature = temperature
        self._max_tokens = max_tokens

    async def stream(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        try:
            response = await self._client.chat.completions.create(
                **request_args(self.model, messages, tools, self._temperature, self._max_tokens))
        except self._base_error as exc:
            raise self._error(exc) from exc
        try:
            async with contextlib.aclosing(chunks(response)) as pieces:
                async for chunk in pieces:
                    yield chunk
        except self._base_error as exc:
            raise self._error(exc) from exc
        except CutShort as exc:
            raise ProviderError(self.name, str(exc)) from exc
        except httpx.TimeoutException as exc:  # groq's stream lets httpx's own through
            raise ProviderError(self.name, f"{self.model} timed out mid-answer") from exc
        except httpx.TransportError as exc:
            raise ProviderError(self.name, f"lost {self._url()} mid-answer: "
                                           f"{type(exc).__name__}") from exc
        except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ProviderError(self.name, f"malformed stream chunk: {exc}") from exc
        finally:
            # Runs on normal end, on error, and when the consumer closes or cancels us:
            # the SDKs release the HTTP response only when read to the end, and it must
            # not outlive the generator.
            await response.close()

    def _error(self, exc: Exception) -> ProviderError:
        message = self._redacted(self._describe(exc))
        if isinstance(exc, self._sdk.RateLimitError) and not _quota_spent(exc.body):
            # A rate limit, with what its headers say of when it clears (the hedge decides
            # whether to wait): the SDKs' own retries are off (max_retries=0).
            headers = exc.response.headers
            return RateLimited(self.name, message, retry_after_s=retry_after_s(headers),
                               reset_s=reset_s(headers))
        return ProviderError(self.name, message)

    def _describe(self, exc: Exception) -> str:
        sdk = self._sdk
        if isinstance(exc, sdk.APIStatusError):
            return f"HTTP {exc.status_code} from {self.model}: {_status_text(exc)}"
        if isinstance(exc, sdk.APITimeoutError):
            return f"request to {self._url()} timed out"
        if isinstance(exc, sdk.APIConnectionError):
            return f"cannot reach {self._url()}: {exc}"
        return f"stream failed: {exc}"

    def _url(self) -> str:
        """The endpoint without a password in it (``user:pass@``, as settings mask it): the
        message goes to logs and to the caller's events."""
        return redact_url(str(self._client.base_url))

    def _redacted(self, message: str) -> str:
        """The message without the API key: OpenAI masks it in its 401 text, but a
        compatible server may echo it whole, and the message goes to logs and events."""
        return without_key(message, getattr(self._client, "api_key", "") or "")

    async def aclose(self) -> None:
        await self._client.close()


def _status_text(exc: Any) -> str:
    """What the provider said, without the SDK's wrapping: its ``message`` reads "Error
    code: 429 - ..." and, with groq, the whole error envelope as a Python dict."""
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        return error["message"]
    if isinstance(error, str) and error:
        return error
    return str(exc.message).removeprefix(f"Error code: {exc.status_code} - ")


def _quota_spent(body: object) -> bool:
    """A 429 for an account out of credit (OpenAI's ``insufficient_quota``), not over its
    rate: no wait clears it. The openai SDK hands over the error object, groq its envelope."""
    error = body.get("error", body) if isinstance(body, dict) else None
    return isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type"))
