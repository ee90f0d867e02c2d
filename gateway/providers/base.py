"""Typed interfaces every speech and language provider implements.

One file per vendor lives beside this one; ``registry.py`` maps a configured
name to a factory. The call loop only ever sees these interfaces.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Protocol, runtime_checkable


class ProviderError(RuntimeError):
    """A provider failed (unreachable, refused, malformed reply).

    ``provider`` names the vendor adapter; the message never contains credentials.
    """

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider


class RateLimited(ProviderError):
    """A provider refused a request for its rate limit (HTTP 429), a refusal that clears
    in moments: the hedge may ask that leg again (gateway/hedge.py). A 429 for a spent
    quota is a plain ``ProviderError``: no wait clears it.

    ``retry_after_s``: the wait the provider asked for (Retry-After), None if it named
    none; ``reset_s``: when the limit it hit is whole again at the latest, None if unknown.
    """

    def __init__(self, provider: str, message: str, *, retry_after_s: float | None = None,
                 reset_s: float | None = None) -> None:
        super().__init__(provider, message)
        self.retry_after_s = retry_after_s
        self.reset_s = reset_s


# ---------------------------------------------------------------- speech to text

# Quote marks, by kind: a mark pairs only with one of its own kind.
_QUOTE_KINDS = {'"': '"', "“": '"', "”": '"', "„": '"', "'": "'", "‘": "'", "’": "'", "‚": "'"}
_OPENING, _CLOSING = "“„‘‚", "”’"
# Words spelt with an apostrophe first ("'cause"): no quotation opens there.
_ELISIONS = ("cause", "cos", "em", "til", "tis", "twas", "bout", "round", "n")
# What may follow a transcript's last words besides quote marks.
_TRAILING = set(".,;:!?…") | {" "}


def _apostrophe(text: str, i: int) -> bool:
    """Whether the single quote mark at ``i`` is an apostrophe: inside a word ("don't",
    "O'Brien"), before a year's digits ("the '90s") or an elided word ("'cause")."""
    before = text[i - 1] if i > 0 else ""
    after = text[i + 1:i + 2]
    if before.isalnum() and after.isalpha():
        return True
    if before.isalnum():
        return False  # closes a quotation, or a plural's possessive ("parents'"): see below
    if after.isdigit():
        return True
    word = text[i + 1:].split(maxsplit=1)[0].rstrip(".,;:!?…\"'”’").lower() if after else ""
    return word in _ELISIONS


def strip_stray_quotes(text: str) -> str:
    """A recognised transcript without the quote marks at its start or end that pair with
    none ('"\'I forgot my password.' -> 'I forgot my password.'): a recogniser's stray
    output, never words. A quotation ('says "declined"', '"Declined," it says') and an
    apostrophe (don't, the '90s, 'cause, parents') are kept, as is any mark between the
    words. For recognised speech only: typed text is the caller's own."""
    marks: list[tuple[int, str, bool]] = []  # (index, kind, opens)
    for i, ch in enumerate(text):
        kind = _QUOTE_KINDS.get(ch)
        if kind is None or kind == "'" and _apostrophe(text, i):
            continue
        if ch in _OPENING or ch in _CLOSING:
            opens = ch in _OPENING
        else:  # a straight quote opens after a space (or at the start), else closes
            opens = i == 0 or text[i - 1].isspace() or text[i - 1] in "([{" or (
                _QUOTE_KINDS.get(text[i - 1]) is not None and marks != []
                and marks[-1][0] == i - 1 and marks[-1][2])
        marks.append((i, kind, opens))
    open_at: dict[str, list[int]] = {'"': [], "'": []}
    unpaired: set[int] = set()
    for i, kind, opens in marks:
        if opens:
            open_at[kind].append(i)
        elif open_at[kind]:
            open_at[kind].pop()
        elif not (kind == "'" and i > 0 and text[i - 1] in "sS"):  # "parents'" is a word
            unpaired.add(i)
    unpaired.update(*open_at.values())
    if not unpaired:
        return text
    start = 0  # the leading marks and spaces: up to the first word
    while start < len(text) and (text[start].isspace() or text[start] in _QUOTE_KINDS):
        start += 1
    end = len(text)  # the trailing ones, with sentence punctuation among them
    while end > start and (text[end - 1].isspace() or text[end - 1] in _QUOTE_KINDS
                           or text[end - 1] in _TRAILING):
        end -= 1
    kept = "".join(ch for i, ch in enumerate(text)
                   if not (i in unpaired and (i < start or i >= end)))
    return kept.strip()



@dataclass(frozen=True)
class Transcript:
    text: str
    final: bool


@runtime_checkable
class STTStream(Protocol):
    """One caller's streaming recognition session.

    Audio is 16-bit little-endian mono PCM at ``SpeechToText.sample_rate``. A call sends
    its recogniser the VAD's 16 kHz windows, whatever the line's rate: ``CallDeps``
    refuses a recogniser declared at another rate.
    """

    async def send_audio(self, pcm16: bytes) -> None:
        """Add caller speech to the current utterance (may trigger a partial)."""

    def finalize(self) -> Awaitable[Transcript]:
        """The turn ended: cut the utterance NOW and return an awaitable of its final.

        The cut is synchronous: audio sent after this call belongs to the next
        utterance, and cancelling the awaitable leaves the stream clean.
        """

    def partials(self) -> AsyncIterator[Transcript]:
        """Partial transcripts, in order, while the caller is speaking. One not yet read
        when its utterance is cut (``finalize``, ``reset``) is dropped: read later, it
        would pass for the next utterance's (``drop_queued_partials``)."""

    async def reset(self) -> None:
        """Drop the current utterance without a final (e.g. a noise that was not speech)."""

    async def aclose(self) -> None:
        """Release the session; idempotent."""


@runtime_checkable
class SpeechToText(Protocol):
    name: str
    sample_rate: int

    def open_stream(self) -> STTStream: ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- text to speech


@runtime_checkable
class TextToSpeech(Protocol):
    name: str
    sample_rate: int
    # Names every setting that changes the audio (voice, model, output format, speed): the
    # seed's audio keys hash it, so changing one renders the answers again (gateway/seeding.py).
    audio_id: str

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Stream 16-bit mono PCM at ``sample_rate``; the first chunk comes as soon as it exists.
        A voice that bounds the wait for its first chunk itself says so with a class
        attribute ``times_first_audio = True`` (ElevenLabs); any other has the call's
        ``tts_gap_timeout_s`` for it (``responder.tts_audio``)."""

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- language model


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as streamed by the model


@dataclass(frozen=True)
class LLMChunk:
    """One streamed piece of a chat completion: text, a complete tool call, or word that
    a tool call is being written (``tool_call_fragment``: its pieces arrive, the call
    comes whole in a later chunk; nothing to say or run yet, but no stall either), or
    that the model finished its answer (``finished``: its ``finish_reason`` came; nothing
    of the answer follows, whatever the HTTP body does after: [DONE], its end), ``cut``
    with it when that was ``length`` (``llm_max_tokens`` reached: its text broke off)."""

    text: str = ""
    tool_call: ToolCall | None = None
    tool_call_fragment: bool = False
    finished: bool = False
    cut: bool = False


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    url: str = ""
    timeout_s: float = 5.0

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                  "parameters": self.parameters}}


@runtime_checkable
class ChatModel(Protocol):
    name: str

    def stream(self, messages: list[dict[str, Any]],
               tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        """Stream a completion. Closing the iterator (``aclose``) closes the HTTP stream."""


def drop_queued_partials(queue: "asyncio.Queue[Transcript | None]") -> None:
    """Empty a stream's queue of partials at an utterance's cut: those still unread are the
    cut utterance's (a consumer a loop pass behind, audio sent in large chunks). The end
    of the partials (None), if queued, stays."""
    ended = False
    while not queue.empty():
        ended |= queue.get_nowait() is None
    if ended:
        queue.put_nowait(None)


def without_key(message: str, key: str) -> str:
    """``message`` with the API ``key`` masked: a compatible server (a proxy at a custom
    base URL) may echo it whole, and the message goes to logs and the caller's events. A
    key too short to be one masks nothing (it would mask ordinary words)."""
    return message.replace(key, "[API key]") if len(key) >= 8 else message
