"""Tools the agent may call: declared in configuration, run as HTTP webhooks.

The webhook receives ``POST {"tool", "call_id", "arguments"}`` and answers with JSON
(or text). Whatever happens, the model gets a string back: the result, or an error it
can explain to the caller ("the account service did not answer").
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from gateway.clock import SYSTEM_CLOCK, Clock, deadline
from gateway.providers.base import ToolCall, ToolSpec
from gateway.settings import redact_url
from . import logs

log = logging.getLogger("voicegate.tools")

MAX_RESULT_CHARS = 4000  # what goes back into the context; a webhook may answer a lot
MAX_REFUSAL_CHARS = 300  # of a 4xx's body: why the service refused the arguments
# How an answer longer than these ends, within them: the model must know it has only a part.
_CUT_NOTE = " … [the rest of this answer was cut: the service sent more]"
UNKNOWN_TOOL = "(unknown)"  # the tool label of a call to a name no tool has
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the function names OpenAI takes


class ToolConfigError(ValueError):
    """The tools file is missing or malformed."""


# The agent's own handoff (gateway/agent.py): offered to the model beside the tools file's,
# on a line that can hand off; never a webhook. Its name is the agent's: a tools file that
# declares it too is refused at load (which one would a call of it mean?).
TRANSFER_TOOL_NAME = "transfer_to_person"
TRANSFER_TOOL = ToolSpec(
    name=TRANSFER_TOOL_NAME,
    description=("Transfer the caller to a human colleague: call it when the caller asks for "
                 "a person, or when you cannot help them. The caller then hears that they "
                 "are being connected; say nothing after calling it."),
    parameters={"type": "object",
                "properties": {"reason": {"type": "string",
                                          "description": "Why, in a few words, for the "
                                                         "colleague who takes the call."}}})


def load_tools(path: str) -> list[ToolSpec]:
    """Read a JSON list of ``{name, description, parameters, url, timeout_s}``."""
    if not path:
        return []
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ToolConfigError(f"cannot read tools file {path}: {exc}") from exc
    if not isinstance(raw, list):
        raise ToolConfigError(f"tools file {path}: expected a JSON list of tools")
    tools: list[ToolSpec] = []
    for n, item in enumerate(raw):
        if not isinstance(item, dict) or not item.get("name") or not item.get("url"):
            raise ToolConfigError(f"tools file {path}: tool #{n} needs at least a name and a url")
        name = str(item["name"])
        unknown = set(item) - {"name", "description", "parameters", "url", "timeout_s"}
        if unknown:
            raise ToolConfigError(f"tools file {path}: tool {name!r} has unknown keys "
                                  f"{sorted(unknown)}")
        # Found here, not by callers: OpenAI refuses every request offering a name
        # outside this pattern (HTTP 400), so every miss would hand off.
        if not _TOOL_NAME.fullmatch(name):
            raise ToolConfigError(f"tools file {path}: tool {name!r} has a bad name: use "
                                  "letters, digits, '_' and '-', at most 64")
        if name == TRANSFER_TOOL_NAME:
            raise ToolConfigError(f"tools file {path}: tool {name!r} is built in (the agent's "
                                  "handoff to a person, no webhook): rename yours")
        if any(tool.name == name for tool in tools):
            raise ToolConfigError(f"tools file {path}: tool {name!r} is declared twice")
        url = str(item["url"])
        problem = _url_problem(url)
        if problem:  # never its password (a webhook's credentials travel in its URL)
            raise ToolConfigError(f"tools file {path}: tool {name!r} has a bad url "
                                  f"{redact_url(url, query=True)!r}: {problem}")
        timeout_s = item.get("timeout_s", 5.0)
        # 0 or less fails every call at once; infinite (JSON's Infinity) lets a hung
        # webhook hold the turn in silence for good.
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ToolConfigError(f"tools file {path}: tool {name!r} has a bad timeout_s "
                                  f"{timeout_s!r}: expected seconds above zero")
        parameters = item.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        # Found here, not by callers: a schema the chat API refuses fails every request
        # that offers the tools (every miss a handoff).
        problem = _schema_problem(parameters)
        if problem:
            raise ToolConfigError(f"tools file {path}: tool {name!r} has bad parameters: "
                                  f"{problem}")
        description = item.get("description", "")
        if not isinstance(description, str):
            raise ToolConfigError(f"tools file {path}: tool {name!r} has a bad description: "
                                  "expected a string")
        tools.append(ToolSpec(name=name, description=description,
                              parameters=parameters, url=url, timeout_s=float(timeout_s)))
    return tools


def _schema_problem(parameters: Any) -> str | None:
    """Why ``parameters`` is no JSON schema of an object's arguments, or None."""
    if not isinstance(parameters, dict):
        return "expected a JSON schema object"
    if parameters.get("type") != "object":
        return "the schema's type must be \"object\" (a tool's arguments are an object)"
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"not a JSON schema{f' at {where}' if where else ''}: {exc.message}"
    try:
        root = DRAFT202012.create_resource(parameters)
        ref = _unresolved_ref(root, Registry().resolver_with_root(root))
    except Exception:  # noqa: BLE001 - a schema the walk cannot read: the runner's guard
        ref = None  # (a check that raises is a result for the model) covers it at a call
    if ref is not None:
        # check_schema takes any URI: resolved only at a call, it raised out of the runner.
        return (f"$ref {ref[:100]!r} does not resolve (a tool's schema refers only within "
                "itself: no schema is fetched)")
    return None


def _unresolved_ref(resource: Any, resolver: Any) -> str | None:
    """The first ``$ref`` of ``resource``'s schemas that does not resolve (a typo, a remote
    URI: no schema is fetched), each from where it stands (a nested ``$id`` moves its base).
    Only the keywords that hold schemas are walked (``subresources``): a property named
    ``$id``, or a ``default`` or ``const`` holding a ``$ref``, is data, never resolved."""
    contents = resource.contents
    ref = contents.get("$ref") if isinstance(contents, dict) else None
    if isinstance(ref, str):
        try:
            resolver.lookup(ref)
        except Unresolvable:
            return ref
    for subresource in resource.subresources():
        found = _unresolved_ref(subresource, resolver.in_subresource(subresource))
        if found is not None:
            return found
    return None


def _url_problem(url: str) -> str | None:
    # Checked at start-up: a URL httpx cannot parse would otherwise fail every call of the tool.
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return str(exc)
    if parsed.scheme not in ("http", "https"):
        return "expected http:// or https://"
    if not parsed.host:
        return "no host"
    return None


class ToolRunner:
    def __init__(self, tools: list[ToolSpec], http: httpx.AsyncClient | None = None) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self._validators = {tool.name: Draft202012Validator(tool.parameters) for tool in tools}
        # A connection pool per tool unless one client is given: a webhook that hangs
        # holds its own tool's connections, never every other tool's.
        self._http = http
        self._clients: dict[str, httpx.AsyncClient] = {}
        # Calls per (tool, outcome), read by /metrics (voicegate_tool_calls): a webhook
        # that fails is a miss the caller hears as "I could not do that", never an error
        # of the call, so nothing else counts it. A name no tool has counts as UNKNOWN_TOOL:
        # the model makes names up, and each would be a metric series of its own.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    async def run(self, call: ToolCall, clock: Clock = SYSTEM_CLOCK) -> tuple[str, bool]:
        """(content for the model, ok). ``timeout_s`` bounds the whole call on ``clock``
        (the call's, which the agent hands on: a test's ``ManualClock``)."""
        content, outcome = await self._run(call, clock)
        self.outcomes[call.name if call.name in self.tools else UNKNOWN_TOOL, outcome] += 1
        return content, outcome == "ok"

    async def _run(self, call: ToolCall, clock: Clock) -> tuple[str, str]:
        """(content for the model, outcome). The outcome (voicegate_tool_calls' label): ok;
        the model's own mistake (unknown_tool, bad_arguments, not_sent: arguments httpx
        cannot send); the service's (timeout, unreachable, redirected, refused: a 4xx,
        failed: a 5xx)."""
        tool = self.tools.get(call.name)
        if tool is None:
            return _error(f"there is no tool named {call.name}"), "unknown_tool"
        arguments = parse_arguments(call.arguments)
        if arguments is None:
            return _error(f"the arguments for {call.name} were not a JSON object"), "bad_arguments"
        try:
            wrong = next(iter(self._validators[call.name].iter_errors(arguments)), None)
        except Exception as exc:  # a schema load_tools did not check (built in code): not sent
            logs.event(log, "tool_schema_error", logging.WARNING, tool=call.name,
                       error=type(exc).__name__, detail=str(exc)[:300])
            return _error(f"{call.name} could not be called: its parameters could not be "
                          "checked"), "not_sent"
        if wrong is not None:  # the webhook's contract: never sent what it forbids
            where = "/".join(str(p) for p in wrong.absolute_path) or "arguments"
            return _error(f"the arguments for {call.name} do not fit its parameters: "
                          f"{where}: {wrong.message}"), "bad_arguments"
        started = clock.now()
        try:
            # httpx's timeout bounds each read, not the call: a webhook that trickles its
            # answer a byte at a time would hold the turn for ever. timeout_s bounds it all.
            async with deadline(clock, tool.timeout_s):
                async with self._client(call.name).stream(
                        "POST", tool.url, timeout=tool.timeout_s,
                        json={"tool": call.name, "call_id": call.id, "arguments": arguments}
                ) as response:
                    status = response.status_code
                    chars = _chars_read(status)
                    content = await _head(response, chars) if chars else ""
        except (httpx.TimeoutException, TimeoutError):
            logs.event(log, "tool_timeout", logging.WARNING, tool=call.name, after_s=tool.timeout_s)
            return (_error(f"{call.name} did not answer within {tool.timeout_s:g} seconds"),
                    "timeout")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError
            logs.event(log, "tool_unreachable", logging.WARNING, tool=call.name, error=type(exc).__name__)
            return _error(f"{call.name} could not be reached"), "unreachable"
        except Exception as exc:
            # Arguments httpx cannot send (NaN, a lone surrogate: json.loads takes both), or
            # a bug: still a string for the model, never a failed reply.
            logs.event(log, "tool_error", logging.WARNING, tool=call.name, error=type(exc).__name__,
                       detail=str(exc)[:300])
            return _error(f"{call.name} could not be called with these arguments"), "not_sent"
        ms = (clock.now() - started) * 1000
        if 300 <= status < 400:
            # Not followed (a POST redirected may not arrive, or not to whom it should):
            # taken for a success, the model would say a payment went through that never
            # reached the service.
            logs.event(log, "tool_redirected", logging.WARNING, tool=call.name, status=status)
            return _error(f"{call.name} failed: its service answered with a redirect "
                          f"(status {status})"), "redirected"
        if status >= 400:
            logs.event(log, "tool_failed", logging.WARNING, tool=call.name, status=status, ms=round(ms))
            said = " ".join(content.split())
            return _error(f"{call.name} failed with status {status}"
                          + (f": {said}" if said else "")), "refused" if status < 500 else "failed"
        logs.event(log, "tool_done", tool=call.name, status=status, ms=round(ms))
        return content, "ok"

    def _client(self, tool: str) -> httpx.AsyncClient:
        if self._http is not None:
            return self._http
        client = self._clients.get(tool)
        if client is None:
            client = self._clients[tool] = httpx.AsyncClient()
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _chars_read(status: int) -> int:
    """How much of an answer's body the model gets: a success's result, a refusal's reason
    (a 422 "account is required": the model can ask the caller), briefly; nothing of a
    redirect or of a 5xx (the service's own trouble)."""
    if status < 300:
        return MAX_RESULT_CHARS
    return MAX_REFUSAL_CHARS if 400 <= status < 500 else 0


async def _head(response: httpx.Response, chars: int) -> str:
    """The body's first ``chars`` characters. A webhook may answer megabytes (a whole
    history): reading stops there, about 4 bytes a character at most, not at its end. One
    longer ends with ``_CUT_NOTE`` (within ``chars``): cut mid-row without a word, the model
    took the first rows of a history for all of it."""
    text = ""
    async for part in response.aiter_text():
        text += part
        if len(text) > chars:
            break  # leaving the stream closes the connection: the rest is never read
    if len(text) <= chars:
        return text
    return text[:chars - len(_CUT_NOTE)] + _CUT_NOTE


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: json.loads reads inf, a strict parser refuses it
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _float_sized_int(text: str) -> int:
    _finite_float(text)  # a strict parser reads every number as a double
    return int(text)


def parse_arguments(text: str) -> dict[str, Any] | None:
    """A tool call's arguments as the object they must be; None when they are not one
    (cut short, an array, NaN or Infinity or a number past a double's range, which
    json.loads takes and strict parsers such as Ollama's do not). Empty or ``null``: no arguments."""
    try:
        arguments = json.loads(text or "{}", parse_constant=_refuse_constant,
                               parse_float=_finite_float, parse_int=_float_sized_int)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    if arguments is None:
        return {}
    return arguments if isinstance(arguments, dict) else None


def chat_tool_name(name: str) -> str:
    """``name`` as a chat request's history may hold it (a tool call the model made): as
    is when the chat APIs take it (``_TOOL_NAME``), else its other characters as "_", cut
    to 64. OpenAI refuses a request whose history holds any other name (HTTP 400 "string
    does not match pattern"), and a model does write them: GPT-4o's leaked
    ``multi_tool_use.parallel``, a small model's ``functions.get_balance``."""
    if _TOOL_NAME.fullmatch(name):
        return name
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "_"


def _error(message: str) -> str:
    return json.dumps({"error": message})
