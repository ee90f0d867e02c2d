"""The agent a cache miss goes to: per-call context, hedged LLM streams, tools.

``Agent.respond(conversation, text)`` is an async iterator of typed events the
responder turns into audio:

- ``Sentence(text)``: a speakable piece, in order; synthesize and play it.
- ``ToolStarted(name, call_id)``: the model called a tool; play filler now (once per turn).
  Words it wrote before the call ("Sure, let me look that up") come first, as a Sentence.
- ``Slow(waited_s)``: nothing to say yet after ``filler_after_s`` (no token, or tokens that
  make no sentence yet); filler bridges the gap. Timed on the ``clock`` given to ``respond``
  (the call's: ``turn.timeline.clock``; ``SYSTEM_CLOCK`` by default), like the hedge.
- ``StillWorking(waited_s)``: a tool call (or the round after it) has left the line quiet for
  ``waited_s`` since the tool was called, nothing said since, or a model has said nothing
  for ``waited_s`` since the filler (a first token, then a stall): a hold phrase plays ("still
  checking"), every ``hold_after_s`` for as long as the quiet lasts (the phrases in turn).
  The one filler covers the first second or two of a tool; a webhook that takes its whole
  ``timeout_s`` would otherwise leave the caller in silence for the rest. A stall once a
  sentence was said (no tool call since) is no cue: the responder holds it, as only it
  knows when the caller has heard the answer so far (gateway/responder.py).
- ``Handoff(reason, error)``: no LLM configured, every LLM failed before anything was said
  (``error`` ``llm_failed``: an outage, the call reports it too), or the model answered a
  round with nothing (no word, no tool call: common right after a tool result) and again
  when asked again (``llm_empty_reply``: no outage); play the handoff message and tell the
  client. A winner whose stream breaks after its first token, before the round said or
  called anything, is not that: the round is asked again (once a turn) first. Also the
  model's own handoff: it called ``transfer_to_person`` (``TRANSFER_TOOL``, gateway/tools.py;
  offered with the operator's tools on every round that offers tools, where the line can
  hand off: ``respond(..., can_hand_off)``), no error: ``reason`` "the agent handed off: <its
  reason>". No webhook runs for it; the round's words come first, the turn ends there (other
  tools called with it are not run), counted as ``ToolRunner.outcomes``' (transfer_to_person,
  handoff) and logged ``agent_handoff``. The system prompt (built-in or the operator's) is
  followed by ``TRANSFER_PROMPT`` there, by ``NO_TRANSFER_PROMPT`` on a line that cannot.

Cancelling the consumer (a barge-in) closes every LLM stream and cancels the tool calls
still running; the results that came back stay in the context, the others say they did
not finish and that it is unknown whether they acted. A call the round had made while its
stream was still read (tools run only once it has ended) says it was not run. Then call
``Conversation.record_heard`` with what the caller actually heard.

``Agent.preempt(conversation, text)`` starts the first LLM round before the caller's
turn has ended (gateway/preemption.py), committing nothing; ``respond(..., preempted)``
adopts it when its request is the one the turn would send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Union

from gateway.clock import SYSTEM_CLOCK, Clock, Expired, Timeouts
from gateway.hedge import AdaptiveDelay, HedgedChat
from gateway.preemption import Preemption
from gateway.providers.base import ChatModel, LLMChunk, ProviderError, ToolCall, ToolSpec
from gateway.sentences import SentenceChunker, ends_sentence, spoken_text
from gateway.settings import Settings, SettingsError
from gateway.tools import (TRANSFER_TOOL, TRANSFER_TOOL_NAME, ToolRunner, chat_tool_name,
                           load_tools, parse_arguments)
from . import logs

log = logging.getLogger("voicegate.agent")

DEFAULT_SYSTEM_PROMPT = """\
You are the voice of a call-center agent, speaking with a caller on the phone.
Everything you write is read aloud by a speech synthesizer.
Answer first: begin with a short first sentence of at most ten words that answers or \
acknowledges, then add only the details the caller needs.
Keep replies to two or three short sentences unless the caller asks for more.
Write plain spoken sentences: no markdown, no lists, no headings, no emoji, no URLs; \
say numbers the way a person would say them.
When you need account or order data, call a tool instead of guessing; if a tool fails, \
say so briefly and offer another way to help.
The caller may interrupt you; if your last reply was cut short, do not repeat what was \
already said unless asked."""

# What the system prompt says about transfers, appended to it (the built-in one or an
# operator's ``llm_system_prompt``) by the agent, as the call's line allows: where the model
# is offered ``transfer_to_person`` (gateway/tools.py), to call it; where not (a Twilio line
# with no handoff number or REST credentials, or no tool rounds), never to promise a transfer.
TRANSFER_PROMPT = ("If the caller asks for a person, or you cannot help, call "
                   f"{TRANSFER_TOOL_NAME} to transfer them: only calling it puts them "
                   "through, words alone do not.")
NO_TRANSFER_PROMPT = ("You cannot transfer this call to a person: never promise a transfer or "
                      "a colleague; if the caller asks for one, say you cannot put them through "
                      "on this line, and offer what you can.")


# Texts for the responder to pre-render at start-up (the agent never speaks them itself):
# one filler, varied, at most once per turn, on ToolStarted or Slow; the handoff on Handoff.
FILLER_PHRASES: tuple[str, ...] = (
    "Let me check that for you.",
    "One moment, please.",
    "Let me look that up.",
    "Just a second while I check.",
)
# Said while a tool (or the answer after it) keeps the line quiet: every hold_after_s of
# silence since the tool call, in turn, for as long as it lasts (a tool's timeout_s has no
# cap, and a silent line is worse than a slow one); so does a model that stalls after the
# filler, or mid-answer once the caller has heard what it said (the responder's). None
# promises how long is left. Each must be said in well under HOLD_AFTER_MIN_MS
# (gateway/settings.py, the least llm_hold_after_ms: tests/test_piper_voice.py measures).
HOLD_PHRASES: tuple[str, ...] = (
    "Still checking, thanks for waiting.",
    "Thanks for holding, I'm still working on it.",
)
# transfer_to_person's result in the context, and what it becomes when the caller stops the
# handoff message before the transfer is made (``Conversation.transfer_not_made``).
TRANSFER_UNDER_WAY = "the caller is being transferred to a person"
TRANSFER_NOT_MADE = ("not transferred: the caller spoke over the handoff message and is "
                     "still on the line with you")
HANDOFF_MESSAGE = "I'm going to connect you with a colleague who can help. Please stay on the line."
# A stage of the reply failed (a TTS or LLM error): the call goes on and the caller says it again.
APOLOGY_MESSAGE = "Sorry, I had a problem on my side. Could you say that again?"
# The transfer after a handoff message failed (Twilio refused it or did not answer): said at
# once, the caller was promised a person and would otherwise hear nothing; the bot goes on.
TRANSFER_FAILED_MESSAGE = ("Sorry, I couldn't put you through just now. "
                           "I'm still here: how can I help?")
# A handoff asked for (a handoff intent, the handoff key, no LLM to ask) on a line that
# cannot transfer (Twilio with no handoff number or REST credentials): said instead of the
# handoff message, whose promise of a colleague the line could not keep; the bot goes on.
HANDOFF_UNAVAILABLE_MESSAGE = ("I can't put you through to a colleague on this line, "
                               "but I can keep helping you here.")
# The caller has said nothing for idle_prompt_s since the bot finished; then, after as long
# again, the call ends with the goodbye.
IDLE_PROMPT_MESSAGE = "Are you still there?"
GOODBYE_MESSAGE = "I haven't heard from you, so I'll end the call now. Goodbye."
# The call reached max_call_s: said once the reply under way is over, then the call ends.
TIME_LIMIT_MESSAGE = ("I'm sorry, this call has reached its time limit, so I'll end it now. "
                      "Please call again if you need more help. Goodbye.")
# Every phrase pre-rendered once per voice at start-up (Runtime.render_prompts), by key.
PROMPT_TEXTS: dict[str, str] = {
    "handoff": HANDOFF_MESSAGE, "apology": APOLOGY_MESSAGE,
    "transfer_failed": TRANSFER_FAILED_MESSAGE, "handoff_unavailable": HANDOFF_UNAVAILABLE_MESSAGE,
    "idle": IDLE_PROMPT_MESSAGE, "goodbye": GOODBYE_MESSAGE, "time_limit": TIME_LIMIT_MESSAGE,
    **{f"filler:{i}": text for i, text in enumerate(FILLER_PHRASES)},
    **{f"hold:{i}": text for i, text in enumerate(HOLD_PHRASES)}}


def prompt_texts(greeting: str = "") -> dict[str, str]:
    """Every phrase to pre-render: the fixed ones, plus the configured greeting (if any),
    stripped as the call says it: rendered with a trailing newline (a YAML block scalar),
    it never matched, and every call synthesized its greeting live."""
    greeting = greeting.strip()
    return {**PROMPT_TEXTS, **({"greeting": greeting} if greeting else {})}


# ------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Sentence:
    text: str


@dataclass(frozen=True)
class ToolStarted:
    name: str
    call_id: str


@dataclass(frozen=True)
class Slow:
    waited_s: float


@dataclass(frozen=True)
class StillWorking:
    waited_s: float  # of silence since the tool call


@dataclass(frozen=True)
class Handoff:
    reason: str
    # The stage failure the call reports with it (counted, an ``error`` event): None, or
    # ``llm_failed`` (an outage), ``llm_empty_reply`` (the model said nothing, twice) or
    # ``llm_tool_not_offered`` (it answered a round offering no tools with a tool call only).
    error: str | None = None

    @property
    def failed(self) -> bool:
        """The LLM failed (an outage): counted as llm_failed, not only a handoff."""
        return self.error == "llm_failed"


AgentEvent = Union[Sentence, ToolStarted, Slow, StillWorking, Handoff]


# ------------------------------------------------------------------- conversation


class Conversation:
    """One call's chat context, trimmed to a character budget (about 4 chars a token).

    Over the budget, an exchange (it starts at a user message, so a tool call is never
    separated from its result) larger than half of it first has its tool results cut to
    fit, each saying so (the latest exchange only as far as the earlier ones need, never
    below half); then whole exchanges are dropped, oldest first. One exchange's webhooks
    answering a lot thus never evicts what the caller said before. The system prompt and
    the latest exchange's user turn always stay.
    """

    def __init__(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT, budget_chars: int = 8000) -> None:
        self.system_prompt = system_prompt
        # What the system prompt says about transfers on this call's line (TRANSFER_PROMPT
        # or NO_TRANSFER_PROMPT), appended to it: set by the agent each turn, as the line
        # allows; empty (nothing appended) until then.
        self.handoff_prompt = ""
        self.budget_chars = budget_chars
        self.history: list[dict[str, Any]] = []

    def system(self) -> str:
        """The system message's text: the prompt, then what it says about transfers."""
        if not self.handoff_prompt:
            return self.system_prompt
        return f"{self.system_prompt.rstrip()}\n{self.handoff_prompt}"

    def add_user(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def add_assistant(self, text: str, tool_calls: list[ToolCall] | None = None) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": chat_tool_name(c.name),
                                                   "arguments": _readable_arguments(c)}}
                                     for c in tool_calls]
        if message["content"] is None and not tool_calls:
            return
        self.history.append(message)

    def add_tool_result(self, call: ToolCall, content: str) -> None:
        self.history.append({"role": "tool", "tool_call_id": call.id, "content": content})

    def transfer_not_made(self) -> None:
        """The handoff message of a ``transfer_to_person`` call was stopped (the caller
        talked over it) before the transfer was made: its result in the last exchange says
        so, not that the caller is being transferred (the next turn's model would believe
        a transfer under way)."""
        under_way = json.dumps({"result": TRANSFER_UNDER_WAY})
        start = self._last_exchange_start()
        for index in range(start, len(self.history)):
            message = self.history[index]
            if message["role"] == "tool" and message.get("content") == under_way:
                self.history[index] = {**message,
                                       "content": json.dumps({"result": TRANSFER_NOT_MADE})}

    def messages(self) -> list[dict[str, Any]]:
        self.trim()
        return [{"role": "system", "content": self.system()}, *_answer_every_tool_call(self.history)]

    def snapshot(self) -> list[dict[str, Any]]:
        """The history as the next request would carry it (trimmed, every tool call
        answered), without the system prompt: what a call resumed on another stream, maybe
        on another replica, goes on from (``restore``). JSON-serialisable."""
        return self.messages()[1:]

    def restore(self, history: Any) -> None:
        """Go on from a ``snapshot`` (read back from JSON). Raises ValueError, and changes
        nothing, when ``history`` is not one (another version's, or damaged): each message
        must be one a chat request takes as ``Conversation`` writes it, and is rebuilt of
        its known fields only."""
        if not isinstance(history, list):
            raise ValueError("a conversation's history is a list of messages")
        restored: list[dict[str, Any]] = []
        unanswered: set[str] = set()
        for index, message in enumerate(history):
            try:
                restored.append(_restored_message(message, unanswered))
            except ValueError as exc:
                raise ValueError(f"message {index}: {exc}") from None
        self.history = restored

    def messages_for(self, text: str, handoff_prompt: str | None = None) -> list[dict[str, Any]]:
        """The request the next turn would send for the caller's ``text``, built on a copy:
        this conversation is not changed (a preemptive start commits nothing).
        ``handoff_prompt``: the turn's (its line's), if not this conversation's."""
        peek = Conversation(self.system_prompt, self.budget_chars)
        peek.handoff_prompt = self.handoff_prompt if handoff_prompt is None else handoff_prompt
        # Trimming builds a new list (a cut tool result a new message), never edits one.
        peek.history = list(self.history)
        peek.add_user(text)
        return peek.messages()

    def record_heard(self, heard: str) -> None:
        """The caller barged in: keep only the words of the last assistant turn they heard.

        ``heard`` is the prefix of that turn's spoken text (its Sentences joined by spaces)
        that was played; matching is by words, so whitespace differences do not matter.
        """
        keep = len(heard.split())
        start = self._last_exchange_start()
        kept: list[dict[str, Any]] = self.history[:start]
        for message in self.history[start:]:
            if message["role"] != "assistant" or not message.get("content"):
                kept.append(message)
                continue
            words = message["content"].split()
            if keep >= len(words):
                keep -= len(words)
                kept.append(message)
                continue
            truncated = " ".join(words[:keep])
            keep = 0
            if truncated or message.get("tool_calls"):
                kept.append({**message, "content": truncated or None})
        self.history = kept

    def last_user_message(self) -> dict[str, Any] | None:
        """The message that began the last exchange (compared by identity: a question
        asked twice is two messages)."""
        start = self._last_exchange_start()
        if self.history and self.history[start]["role"] == "user":
            return self.history[start]
        return None

    def withdraw_exchange(self, message: dict[str, Any]) -> bool:
        """The caller was not done: the last exchange, begun by ``message``, is taken back,
        so the turn that continues it is asked once, whole. Kept (False) when it called a
        tool (the agent must know what its tools did) or ``message`` no longer begins the
        last exchange."""
        start = self._last_exchange_start()
        exchange = self.history[start:]
        if not exchange or exchange[0] is not message \
                or any(m.get("tool_calls") or m["role"] == "tool" for m in exchange):
            return False
        del self.history[start:]
        return True

    def _last_exchange_start(self) -> int:
        for i in range(len(self.history) - 1, -1, -1):
            if self.history[i]["role"] == "user":
                return i
        return 0

    def trim(self) -> None:
        """Keep the history within the budget. Every request does (``messages``); the call
        does it at each turn's end too, so a call the cache answers throughout (no request
        built) keeps within it. Not as a turn begins: a cache hit's first audio would wait
        for it (~0.35 ms for a full budget)."""
        # Linear: each message is measured once (a cut one again), then exchanges are
        # summed and dropped by arithmetic; this runs on the event loop every LLM round.
        history = self.history
        if not history:
            return
        budget = self.budget_chars - _size({"role": "system", "content": self.system()})
        sizes = [_size(m) for m in history]
        # The results messages() writes for calls left unanswered are sent too: each
        # counted with the message that made the call (its exchange's, never cut).
        made, at = 0, 0
        for message in _answer_every_tool_call(history):
            if at < len(history) and message is history[at]:
                made = at if message["role"] != "tool" else made
                at += 1
            else:
                sizes[made] += _size(message)
        if sum(sizes) <= budget:
            return
        starts = [i for i, m in enumerate(history) if m["role"] == "user"]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        bounds = list(zip(starts, starts[1:] + [len(history)]))
        history = list(history)
        half = budget // 2
        kept_before = 0  # the earlier exchanges' size, cut
        totals: list[int] = []
        for n, (a, b) in enumerate(bounds):
            latest = n == len(bounds) - 1
            # An earlier exchange may take half the budget; the latest what the earlier
            # ones leave, and half at least (more of the earlier ones go then).
            cap = max(half, budget - kept_before) if latest else half
            if sum(sizes[a:b]) > cap:
                _cut_tool_results(history, sizes, a, b, cap)
            total = sum(sizes[a:b])
            totals.append(total)
            kept_before += total
        first = 0
        excess = sum(totals) - budget
        while excess > 0 and first < len(bounds) - 1:
            excess -= totals[first]
            first += 1
        self.history = history[bounds[first][0]:]


_CUT_NOTE = " … [the rest of this result was cut to fit the conversation]"
# A cut result keeps at least its head (a status, a first row): emptied, the model would
# have nothing to answer from but the note; over budget then, earlier exchanges go.
_MIN_KEPT_CHARS = 500


def _size(value: Any) -> int:
    """Characters ``value`` takes in the request, as JSON (a message, or a text in one)."""
    return len(json.dumps(value, ensure_ascii=False))


def _cut_tool_results(history: list[dict[str, Any]], sizes: list[int], a: int, b: int,
                      cap: int) -> None:
    """Cut the tool results among ``history[a:b]`` (``sizes`` theirs) so the exchange
    takes about ``cap`` characters: the largest first, each ending with ``_CUT_NOTE``.
    Cut messages are new dicts: a copy of the history (``messages_for``) is unchanged."""
    tools = [i for i in range(a, b) if history[i]["role"] == "tool"]
    if not tools:
        return
    contents = {i: _size(history[i]["content"]) for i in tools}
    room = cap - (sum(sizes[a:b]) - sum(contents.values()))  # for the results' text
    # The smallest keep what they have when it is under an even share of what is left.
    for left, i in enumerate(sorted(tools, key=lambda i: contents[i])):
        share = max(_MIN_KEPT_CHARS, room // (len(tools) - left))
        room -= min(share, contents[i])
        if contents[i] <= share:
            continue
        text = str(history[i]["content"])
        if text.endswith(_CUT_NOTE):
            text = text[:-len(_CUT_NOTE)]  # cut before: cut again from the original part
        # The JSON-escaped size over the raw one (quotes and newlines count twice).
        ratio = len(text) / max(1, _size(text))
        keep = max(0, int((share - _size(_CUT_NOTE)) * ratio))
        history[i] = {**history[i], "content": text[:keep] + _CUT_NOTE}
        sizes[i] = _size(history[i])


def _restored_message(message: Any, unanswered: set[str]) -> dict[str, Any]:
    """``message`` as ``Conversation`` writes it (user, assistant with its tool calls, the
    result of one of the calls just before it), rebuilt of those fields; ValueError when it
    is not one (a chat API would refuse every request carrying it). ``unanswered``: the
    ids of the calls whose results may come next, updated."""
    if not isinstance(message, dict):
        raise ValueError("not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant", "tool"):
        raise ValueError(f"unknown role {str(role)[:20]!r}")
    if not (isinstance(content, str) or (content is None and role == "assistant")):
        raise ValueError("content is not text")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in unanswered:
            raise ValueError("a tool result answers no tool call just before it")
        unanswered.discard(call_id)
        return {"role": "tool", "tool_call_id": call_id, "content": content}
    unanswered.clear()
    if role == "user":
        return {"role": "user", "content": content}
    calls = message.get("tool_calls")
    if calls is None:
        if content is None:
            raise ValueError("an assistant message with neither text nor tool calls")
        return {"role": "assistant", "content": content}
    if not isinstance(calls, list) or not calls:
        raise ValueError("tool_calls is a list of calls")
    kept = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(call, dict) and isinstance(call.get("id"), str)
                and isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise ValueError("a tool call needs an id, a function name and its arguments")
        kept.append({"id": call["id"], "type": "function",
                     # As add_assistant names it: a snapshot written before that (a name
                     # the chat API refuses) would have the call's every request refused.
                     "function": {"name": chat_tool_name(function["name"]),
                                  "arguments": function["arguments"]}})
        unanswered.add(call["id"])
    return {"role": "assistant", "content": content, "tool_calls": kept}


def _canonical_arguments(text: str) -> str:
    """Arguments as one spelling of their value (key order and spacing aside)."""
    arguments = parse_arguments(text)
    return text if arguments is None else json.dumps(arguments, sort_keys=True)


def _readable_arguments(call: ToolCall) -> str:
    """The call's arguments as the context keeps them. Arguments that are no JSON object
    (the runner refused them, and its result says so) are kept as "{}": sent back as
    streamed, a server that decodes them (Ollama) refuses this request and every later
    one of the call (HTTP 400 "invalid tool call arguments")."""
    return call.arguments if parse_arguments(call.arguments) is not None else "{}"


def _unfinished_result(name: str, why: str = "the caller interrupted") -> str:
    """The result of a tool call that did not come back. Never "it did not happen": a
    webhook (a payment, a ticket) may have acted before the cancel reached it, and a model
    told otherwise may do it again."""
    return json.dumps({"error": f"{name} did not finish ({why} before its result came "
                                "back): it is unknown whether it was carried out; check, or "
                                "ask the caller, before doing it again"})


def _not_run_result(name: str) -> str:
    """The result of a tool call the round made but never ran: the turn stopped (a
    barge-in) while the round's stream was still read, before any of its calls ran. Sure,
    unlike one cancelled under way (``_unfinished_result``): nothing was sent."""
    return json.dumps({"error": f"{name} was not run (the caller interrupted before it was "
                                "called): nothing was done"})


def _answer_every_tool_call(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat APIs reject a tool call without a result (HTTP 400). The agent writes a result
    for every call it ran (gateway/agent.py, ``_record_results``) and for every one it
    stopped before running (``_not_run_result``); one left without any gets an "unknown"
    one here."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, tool name)

    def close_pending() -> None:
        for call_id, name in pending:
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": _unfinished_result(name)})
        pending.clear()

    for message in history:
        if message["role"] == "tool":
            pending[:] = [p for p in pending if p[0] != message.get("tool_call_id")]
        else:
            close_pending()
        out.append(message)
        if message["role"] == "assistant" and message.get("tool_calls"):
            pending = [(call["id"], call["function"]["name"]) for call in message["tool_calls"]]
    close_pending()
    return out


# -------------------------------------------------------------------------- agent


class Agent:
    """Shared by every call (it holds the LLM clients and their hedge statistics);
    per-call state lives in ``Conversation``.

    ``filler_after_s`` (the ``Slow`` cue) and ``hold_after_s`` (``StillWorking``, every as
    long): seconds, or None or 0 for never, as ``llm_filler_after_ms`` and
    ``llm_hold_after_ms`` read 0 (a hold_after_s of 0 would time every hold phrase at the
    tool call itself, a tight loop of them). Kept as None then; a negative or non-finite
    delay raises ValueError, given to the constructor or set later."""

    def __init__(self, llm: ChatModel | None, tools: list[ToolSpec] | None = None, *,
                 runner: ToolRunner | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 context_chars: int = 8000, max_tool_rounds: int = 3,
                 filler_after_s: float | None = 0.9, hold_after_s: float | None = 4.0) -> None:
        self.llm = llm
        self.tools = list(tools or [])
        if any(tool.name == TRANSFER_TOOL_NAME for tool in self.tools):
            raise ValueError(f"tool {TRANSFER_TOOL_NAME!r} is built in (the agent's handoff "
                             "to a person, no webhook): rename yours")
        self.runner = runner or ToolRunner(self.tools)
        self.system_prompt = system_prompt
        self.context_chars = context_chars
        self.max_tool_rounds = max_tool_rounds
        self.filler_after_s = filler_after_s
        self.hold_after_s = hold_after_s

    @property
    def filler_after_s(self) -> float | None:
        return self._filler_after_s

    @filler_after_s.setter
    def filler_after_s(self, seconds: float | None) -> None:
        self._filler_after_s = _delay("filler_after_s", seconds)

    @property
    def hold_after_s(self) -> float | None:
        return self._hold_after_s

    @hold_after_s.setter
    def hold_after_s(self, seconds: float | None) -> None:
        self._hold_after_s = _delay("hold_after_s", seconds)

    def new_conversation(self) -> Conversation:
        return Conversation(self.system_prompt, self.context_chars)

    def preempt(self, conversation: Conversation, text: str, *,
                can_hand_off: bool = True) -> Preemption | None:
        """Start the first LLM round for ``text`` now, before the caller's turn has ended
        (gateway/preemption.py); None when no LLM is configured (a miss is a handoff).
        Nothing is committed: ``respond`` adopts it, or it is cancelled. ``can_hand_off``:
        the line's, as ``respond`` takes it (the request differs by it: a start made for
        another line's request is never adopted)."""
        if self.llm is None:
            return None
        return Preemption(self.llm, conversation.messages_for(
            text, self.handoff_prompt(can_hand_off)), self._tools_for(0, can_hand_off), text)

    def offers_transfer(self, can_hand_off: bool) -> bool:
        """Whether the model may call ``transfer_to_person`` on a line that can (or cannot)
        hand off: only there, and only with tool rounds to call it in."""
        return can_hand_off and self.max_tool_rounds > 0

    def handoff_prompt(self, can_hand_off: bool) -> str:
        """What the system prompt says about transfers on such a line."""
        return TRANSFER_PROMPT if self.offers_transfer(can_hand_off) else NO_TRANSFER_PROMPT

    def _tools_for(self, round_no: int, can_hand_off: bool = True) -> list[ToolSpec] | None:
        # The last round offers no tools, so the model must answer in words. Every other
        # offers the operator's tools and, where the line can hand off, the built-in
        # transfer (with no tools file, the only one).
        if round_no >= self.max_tool_rounds:
            return None
        tools = [*self.tools, TRANSFER_TOOL] if self.offers_transfer(can_hand_off) else self.tools
        return tools or None

    async def respond(self, conversation: Conversation, text: str,
                      preempted: Preemption | None = None, *,
                      clock: Clock = SYSTEM_CLOCK,
                      can_hand_off: bool = True,
                      on_first_token: Callable[[], None] | None = None
                      ) -> AsyncIterator[AgentEvent]:
        """``preempted``: a stream started for these words before the turn ended; the first
        round takes it when its request is the one this turn would send, else it is
        cancelled and a fresh call made. ``clock``: the call's; ``filler_after_s`` (the
        ``Slow`` cue), ``hold_after_s`` (``StillWorking``) and each tool's ``timeout_s`` are
        timed on it (a test's ``ManualClock``). ``can_hand_off``: the line puts a handoff
        through (``Turn.can_hand_off``): the model is offered ``transfer_to_person`` and
        told to call it; where not, neither, and told it cannot transfer.
        ``on_first_token``: called once, as the turn's first token comes (words, or the
        first fragment of a tool call; whitespace is none, as for the hedge): the turn's
        ``first_token`` stage, not its first whole sentence or tool call, which may take
        the model seconds more to write."""
        conversation.add_user(text)
        conversation.handoff_prompt = self.handoff_prompt(can_hand_off)
        if self.llm is None:
            if preempted is not None:
                preempted.cancel()
            yield Handoff("no LLM configured")
            return
        spoke = False  # has a Sentence been emitted this turn?
        filler = False  # has a filler cue (Slow or ToolStarted) been emitted this turn?
        retried = False  # a broken round is asked again at most once a turn
        reasked_empty = False  # and an empty one
        started = clock.now()  # the filler's wait counts from here
        held_since: float | None = None  # the tool call (or filler) nothing was said since
        holds = 0  # hold phrases cued this turn
        held_holds = 0  # of them, cued before held_since (an earlier quiet stretch's)
        last_hold: float | None = None  # when the last one was cued
        stalled = False  # held_since is the Slow cue's (no tool call yet): a call restarts it

        def next_cue() -> float | None:
            """When (clock time) the next cue is due: the filler until something is said or
            called, then a hold phrase while a tool call keeps the line quiet."""
            if not (spoke or filler):
                return None if self.filler_after_s is None else started + self.filler_after_s
            if held_since is None or self.hold_after_s is None:
                return None
            # Every hold_after_s of this quiet stretch: a tool called after words said
            # (a second tool, after a first one's hold) waits hold_after_s, not twice that.
            # Never closer than that to the last one: a consumer that stalled (a frozen
            # playout) would otherwise get every phrase it missed back to back.
            due = held_since + (holds - held_holds + 1) * self.hold_after_s
            return due if last_hold is None else max(due, last_hold + self.hold_after_s)

        def cue() -> Slow | StillWorking:
            nonlocal filler, holds, last_hold, held_since, held_holds, stalled
            if not (spoke or filler):
                filler = True
                # Held from here too: a model that stalls (a first token, then nothing until
                # llm_idle_timeout_s, then a retry) must not leave dead air after the filler.
                held_since, held_holds, stalled = clock.now(), holds, True
                return Slow(self.filler_after_s or 0.0)
            holds += 1
            last_hold = clock.now()
            return StillWorking((holds - held_holds) * (self.hold_after_s or 0.0))

        round_no = 0
        # This turn's tool runs by (tool, arguments), with the round each was made in: a
        # call the model repeats is answered with the first one's result, never sent to its
        # webhook again (but one that failed in an earlier round: the model retries it).
        ran: dict[tuple[str, str], tuple[int, asyncio.Task[tuple[str, bool]]]] = {}
        while round_no <= self.max_tool_rounds:
            tools = self._tools_for(round_no, can_hand_off)
            chunker = SentenceChunker()
            spoken: list[str] = []  # the pieces as emitted: what the caller will hear
            calls: list[ToolCall] = []
            answered = False  # has a chunk come (a leg won the race)?
            cut = False  # the model stopped at llm_max_tokens (finish_reason "length")
            ignored: str | None = None  # a tool the model called though none was offered
            transfer: ToolCall | None = None  # the model handed the caller off (no webhook)
            retry = False
            read = False  # the round's stream was read to its end (its calls may run)
            messages = conversation.messages()
            if preempted is not None and preempted.usable(messages, tools):
                stream = preempted.adopt()  # what it received so far at once, then the rest
            else:
                if preempted is not None:
                    preempted.cancel()
                stream = self.llm.stream(messages, tools)
            preempted = None  # only the first round may adopt it
            events = _with_cues(stream, next_cue, clock)
            try:
                async for item in events:
                    if item is _CUE:
                        yield cue()
                        continue
                    answered = True
                    if item.cut:
                        cut = True
                        continue
                    if on_first_token is not None and (
                            item.text.strip() or item.tool_call is not None
                            or item.tool_call_fragment):
                        on_first_token()
                        on_first_token = None  # once a turn
                    pieces = chunker.feed(item.text) if item.text else []
                    if item.tool_call is not None or item.tool_call_fragment:
                        # The model moved on to a tool call: its preface ("Sure, let me
                        # look that up", no sentence end) is complete. Spoken now, before
                        # ToolStarted (the filler), not after it at the round's end.
                        tail = chunker.flush()
                        pieces += [tail] if tail else []
                    for piece in filter(spoken_text, pieces):  # no words: nothing said ("👍")
                        spoken.append(piece)
                        spoke, held_since = True, None
                        yield Sentence(piece)
                    if item.tool_call is not None \
                            and item.tool_call.name == TRANSFER_TOOL_NAME \
                            and self.offers_transfer(can_hand_off):
                        # The built-in handoff: no webhook, no filler (the handoff message
                        # follows the round's words). Also in the last round, which offers
                        # no tools: a model calling it there meant it, and the line can.
                        # A second one in the round is only answered "not run", below.
                        if transfer is None:
                            transfer = item.tool_call
                        else:
                            calls.append(item.tool_call)
                    elif item.tool_call is not None and tools is None:
                        # Not offered (the last round, or no tools): never run, and no
                        # filler; without words the turn hands off below, not into silence.
                        ignored = item.tool_call.name
                        logs.event(log, "tool_call_not_offered", logging.WARNING,
                                   tool=ignored, round=round_no)
                    elif item.tool_call is not None:
                        calls.append(item.tool_call)
                        filler = True
                        # The silence a hold phrase covers starts here (a stall's, at
                        # the filler, gives way: the model is answering after all).
                        if held_since is None or stalled:
                            held_since, held_holds, stalled = clock.now(), holds, False
                        yield ToolStarted(item.tool_call.name, item.tool_call.id)
                tail = chunker.flush()
                if tail and cut and spoken and not ends_sentence(tail):
                    # Broken off at llm_max_tokens ("It arrives on"): never said, nor kept
                    # in the context; the whole sentences before it are the answer. With
                    # none before it, said as it is: better than nothing.
                    logs.event(log, "llm_answer_cut", logging.WARNING, round=round_no,
                               dropped_chars=len(tail))
                    tail = None
                if tail and spoken_text(tail):
                    spoken.append(tail)
                    spoke, held_since = True, None
                    yield Sentence(tail)
                read = True
            except ProviderError as exc:
                logs.event(log, "llm_failed", logging.WARNING, round=round_no, error=str(exc)[:300])
                # A half-streamed tool call is not run, nor a transfer in a broken round.
                called, calls, transfer = bool(calls or transfer), [], None
                if answered and not spoken and not called and not retried:
                    # The winner broke after its first token, the other leg already
                    # cancelled, and this round emitted nothing: one leg failed, not every
                    # LLM. Asked again (the hedged pair) before a person takes over or the
                    # apology plays; also after a round before it spoke (a preface before
                    # a tool): this round has said nothing the caller would hear twice.
                    retry = True
                elif spoke:
                    # Half an answer, or a preface before a tool ("let me check that"), then
                    # nothing: never end so in silence. Raised: the call reports
                    # ``llm_failed`` and apologises after what was heard.
                    raise
                else:
                    # Nothing said yet (a filler alone is not an answer): a person takes over.
                    yield Handoff(f"LLM failed: {exc}", error="llm_failed")
                    return
            finally:
                # Also on the consumer's aclose() or cancellation (barge-in): both LLM
                # streams are closed before this generator finishes, and what was emitted
                # is in the context, for record_heard() to cut to what was played. Written
                # before the closes, as the tools' results below: a second cancel during
                # them (a stream's close taking a while) must not lose what was heard.
                made = [*calls, *([transfer] if transfer else [])]
                conversation.add_assistant(" ".join(spoken), made)
                if not read:
                    # Stopped as its stream was read (a barge-in): a tool runs only once
                    # the round's stream has ended, so none of these ran, and the context
                    # says so, not "unknown" as of a webhook cancelled mid-request.
                    for call in made:
                        conversation.add_tool_result(call, _not_run_result(call.name))
                await events.aclose()
                await stream.aclose()  # type: ignore[attr-defined]
            if retry:
                retried = True
                continue
            if transfer is not None:
                # The turn ends with the handoff (its message, the `handoff` event, a phone
                # line's transfer), after the words this round said; other calls made with
                # it are not run (the caller is leaving), and the context says so.
                for call in calls:
                    conversation.add_tool_result(call, json.dumps({
                        "error": f"{call.name} was not run: the caller was being transferred "
                                 "to a person"}))
                conversation.add_tool_result(transfer, json.dumps(
                    {"result": TRANSFER_UNDER_WAY}))
                reason = _transfer_reason(transfer)
                outcomes = getattr(self.runner, "outcomes", None)
                if outcomes is not None:  # voicegate_tool_calls_total{outcome="handoff"}
                    outcomes[TRANSFER_TOOL_NAME, "handoff"] += 1
                logs.event(log, "agent_handoff", round=round_no, reason=reason[:200],
                           skipped=len(calls))
                yield Handoff("the agent handed off" + (f": {reason}" if reason else ""))
                return
            if not calls:
                if spoken:
                    return  # the answer
                # This round said nothing (whatever an earlier one said: a preface before
                # a tool must not end in silence).
                if ignored:
                    yield Handoff(f"the LLM called {ignored}, a tool it was not offered",
                                  error="llm_tool_not_offered")
                    return
                # An empty completion: the model answered, with nothing. No outage (the
                # hedge ended its stream empty): asked again once, then a person takes
                # over, reported as such, not as llm_failed.
                logs.event(log, "llm_empty_reply", logging.WARNING, round=round_no,
                           again=not reasked_empty)
                if not reasked_empty:
                    reasked_empty = True
                    continue
                yield Handoff("the LLM returned an empty reply twice", error="llm_empty_reply")
                return
            tasks = [self._run_once(call, clock, round_no, ran) for call in calls]
            gathered = asyncio.gather(*tasks)
            # Its outcome retrieved also when a barge-in left it unread.
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
            timeouts = Timeouts(clock)
            try:
                while True:  # the tools' results, a hold phrase cued while they keep us waiting
                    due = next_cue()
                    try:
                        await (gathered if due is None
                               else timeouts.until(due, asyncio.shield(gathered)))
                        break
                    except Expired:
                        yield cue()
            finally:
                timeouts.close()
                # One raising (a runner's bug) leaves no sibling webhook call running.
                for task in tasks:
                    task.cancel()
                # Written before the wait below (a second cancel may cut it short): a
                # barge-in keeps every result that came back; the next round must never
                # think a completed payment or ticket did not happen.
                _record_results(conversation, calls, tasks)
                await asyncio.gather(*tasks, return_exceptions=True)
            round_no += 1

    def _run_once(self, call: ToolCall, clock: Clock, round_no: int,
                  ran: dict[tuple[str, str], tuple[int, "asyncio.Task[tuple[str, bool]]"]]
                  ) -> "asyncio.Task[tuple[str, bool]]":
        """The task answering ``call``: its webhook's run, or, for a call this turn made
        already (same tool, same arguments: a small model repeats one in a round, or the
        next), the first one's result (a ticket, a payment acts once). A first run of an
        earlier round that failed is run again: the model saw its failure, and retrying it
        is what it asks. One of this round shares the first's result whatever it is: the
        model has seen nothing of it (a repeat, no retry), and a timeout may have acted."""
        key = (call.name, _canonical_arguments(call.arguments))
        made = ran.get(key)
        if made is None:
            task = asyncio.create_task(self.runner.run(call, clock))
            ran[key] = (round_no, task)
            return task
        first_round, first = made

        async def same_as_first() -> tuple[str, bool]:
            content, ok = await asyncio.shield(first)
            if ok or first_round == round_no:
                logs.event(log, "tool_call_repeated", tool=call.name)
                return content, ok
            return await self.runner.run(call, clock)

        task = asyncio.create_task(same_as_first())
        if first_round != round_no:
            ran[key] = (round_no, task)  # this round's repeats share it: one retry, not one each
        return task

    async def aclose(self) -> None:
        await self.runner.aclose()
        if isinstance(self.llm, HedgedChat):
            await self.llm.aclose()  # its losers' streams close before their clients
        for model in _models(self.llm):
            close = getattr(model, "aclose", None)
            if close is not None:
                await close()


def _delay(name: str, seconds: float | None) -> float | None:
    """A cue's delay as ``Agent`` keeps it: None (never) for None or 0, as the settings
    read 0; a negative or non-finite one is no delay (ValueError, naming ``name``)."""
    if seconds is None or seconds == 0:
        return None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds, or 0 or None "
                         f"(never), not {seconds!r}")
    return float(seconds)


def _transfer_reason(call: ToolCall) -> str:
    """The reason a model gave ``transfer_to_person``, on one line and short (it goes to
    the client's `handoff` event and the log); "" when it gave none (or no object)."""
    arguments = parse_arguments(call.arguments) or {}
    reason = arguments.get("reason")
    if not isinstance(reason, str):
        return ""
    return " ".join(reason.split())[:200]


def _record_results(conversation: Conversation, calls: list[ToolCall],
                    tasks: list[asyncio.Task[tuple[str, bool]]]) -> None:
    """Each call's result into the context: what came back, else that it did not finish
    (stopped by a barge-in, or by a sibling's runner raising: a gateway failure)."""
    broke = any(t.done() and not t.cancelled() and t.exception() is not None for t in tasks)
    why = "the gateway failed" if broke else "the caller interrupted"
    for call, task in zip(calls, tasks):
        if task.done() and not task.cancelled() and task.exception() is None:
            content, _ok = task.result()
        else:
            content = _unfinished_result(call.name, why)
        conversation.add_tool_result(call, content)


_END = object()
_CUE = object()  # a cue is due: the filler, or a hold phrase (``respond`` says which)


async def _with_cues(stream: AsyncIterator[LLMChunk], next_cue: Callable[[], float | None],
                     clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[Any]:
    """The stream's chunks, and ``_CUE`` whenever ``next_cue()`` (a time of ``clock``, or
    None: no cue) passes before the next chunk: nothing to say yet, whether no token came
    or only tokens that make no sentence ("Sure", then a stall). ``next_cue`` is read
    again before every wait: what the consumer said or cued since moves it.

    A task reads the stream meanwhile: the wait for the cue never cancels a read (that
    would end the stream), and chunks already there (a preemptive start's) pass in one
    step, not a task each."""
    if next_cue() is None:
        async for chunk in stream:
            yield chunk
        return
    chunks: asyncio.Queue[Any] = asyncio.Queue()

    async def read() -> None:
        try:
            async for chunk in stream:
                chunks.put_nowait(chunk)
        except Exception as exc:  # raised to the consumer, after the chunks before it
            chunks.put_nowait(exc)
        else:
            chunks.put_nowait(_END)

    reader = asyncio.create_task(read(), name="vg-llm-read")
    # The waits for the cue, on one timer task (a barge-in meanwhile stays a cancel).
    timeouts = Timeouts(clock)
    try:
        while True:
            cue_at = next_cue()
            try:
                if cue_at is None:
                    item = await chunks.get()
                else:
                    item = await timeouts.until(cue_at, chunks.get())
            except Expired:
                yield _CUE
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        timeouts.close()
        # Closed or cancelled (a barge-in): the read stops, which closes the stream.
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def _models(llm: ChatModel | None) -> list[Any]:
    if isinstance(llm, HedgedChat):
        return [m for m in (llm.primary, llm.secondary) if m is not None]
    return [llm] if llm is not None else []


# ------------------------------------------------------------------------ factory


def build_chat_model(provider: str, url: str, model: str, settings: Settings, role: str) -> ChatModel:
    if provider == "openai" and not url and not settings.openai_api_key:
        raise SettingsError(f"llm_{role}_model is set for api.openai.com but VOICEGATE_OPENAI_API_KEY "
                            f"is not; set llm_{role}_url for a local server")
    common: dict[str, Any] = {"timeout_s": settings.llm_timeout_s, "max_retries": settings.llm_max_retries,
                              "temperature": settings.llm_temperature, "max_tokens": settings.llm_max_tokens}
    if provider == "groq":
        from gateway.providers.groq_llm import GroqChat
        return GroqChat(model, api_key=settings.groq_api_key, base_url=url, name=f"groq:{role}", **common)
    from gateway.providers.openai_llm import OpenAIChat
    return OpenAIChat(model, base_url=url, api_key=settings.openai_api_key, name=f"openai:{role}", **common)


def build_llm(settings: Settings) -> ChatModel | None:
    """The configured LLM: None (handoff), one model, or a hedged pair."""
    if not settings.llm_primary_model:
        return None
    primary = build_chat_model(settings.llm_primary_provider, settings.llm_primary_url,
                               settings.llm_primary_model, settings, "primary")
    secondary = None
    if settings.llm_secondary_model:
        secondary = build_chat_model(settings.llm_secondary_provider, settings.llm_secondary_url,
                                     settings.llm_secondary_model, settings, "secondary")
    delay = None if settings.llm_hedge_delay_ms < 0 else settings.llm_hedge_delay_ms / 1000
    return HedgedChat(primary, secondary, hedge_delay_s=delay,
                      adaptive=AdaptiveDelay(percentile=settings.llm_hedge_percentile,
                                             floor_s=settings.llm_hedge_min_delay_ms / 1000,
                                             ceiling_s=settings.llm_hedge_max_delay_ms / 1000,
                                             initial_s=settings.llm_hedge_initial_delay_ms / 1000),
                      first_token_timeout_s=settings.llm_first_token_timeout_s,
                      idle_timeout_s=settings.llm_idle_timeout_s)


def build_agent(settings: Settings) -> Agent:
    return Agent(build_llm(settings), load_tools(settings.llm_tools_file),
                 system_prompt=settings.llm_system_prompt or DEFAULT_SYSTEM_PROMPT,
                 context_chars=settings.llm_context_chars, max_tool_rounds=settings.llm_max_tool_rounds,
                 filler_after_s=settings.llm_filler_after_ms / 1000 if settings.llm_filler_after_ms > 0
                 else None,
                 hold_after_s=settings.llm_hold_after_ms / 1000 if settings.llm_hold_after_ms > 0
                 else None)
