"""Preemptive generation: a miss's first LLM round, started before the turn ends.

At a pause whose early transcript is known, not a cache hit and not lexically
unfinished, the call asks the agent for a ``Preemption`` of those words while the
end-of-turn silence runs. It runs ``llm.stream(messages, tools)`` (the hedged pair, as
is: first token wins, the other leg is cancelled) in a task of its own and keeps every
chunk. Nothing else happens: the messages were built from a copy of the conversation
(``Conversation.messages_for``), a tool call is only a kept chunk (no tool runs: the
turn that adopts the stream runs it, as today), nothing is said or synthesized, and a
failure is only remembered (never reported: the turn then makes a fresh call).

When the turn ends on the same words with an unchanged conversation, ``Agent.respond``
adopts it (``adopt``): the kept chunks at once, then the rest as it streams. Otherwise
it is cancelled.

Cancellation: ``cancel`` (synchronous) cancels the task, whose ``finally`` closes the
LLM stream (``aclosing``: a hedged pair closes both legs' HTTP streams); ``aclose``
also waits for it. An adopted stream closes the task when it is closed itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from typing import Any, AsyncIterator

from intents.embedder import normalize_text

from . import logs
from .providers.base import ChatModel, LLMChunk, ProviderError, ToolSpec

log = logging.getLogger("voicegate.preempt")


class Preemption:
    def __init__(self, llm: ChatModel, messages: list[dict[str, Any]],
                 tools: list[ToolSpec] | None, text: str) -> None:
        self.text = text  # the caller's words it was started for
        self.messages = copy.deepcopy(messages)  # the request as sent
        self.tools = tools
        self.adopted = False
        self.cancelled = False
        self.failed: BaseException | None = None  # the stream's error, kept, never reported
        self._chunks: list[LLMChunk] = []
        self._done = False
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] = asyncio.create_task(self._pump(llm), name="vg-preempt")

    @property
    def chunks_received(self) -> int:
        return len(self._chunks)

    async def _pump(self, llm: ChatModel) -> None:
        try:
            stream = llm.stream(self.messages, self.tools)
            async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    # A tool call is kept like text: it runs only in the turn that adopts it.
                    self._chunks.append(chunk)
                    self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # kept: the turn makes a fresh call instead
            self.failed = exc
            logs.event(log, "preempt_failed", logging.INFO, error=str(exc)[:300])
        finally:
            self._done = True
            self._wake.set()

    def usable(self, messages: list[dict[str, Any]], tools: list[ToolSpec] | None) -> bool:
        """True when a turn about to send ``messages`` (its context plus the caller's
        final words, last) may take this stream instead: the same context and tools, the
        same words (up to case and punctuation), and the stream neither failed nor was
        cancelled so far."""
        if self.adopted or self.cancelled or self.failed is not None:
            return False
        if (self.tools or None) != (tools or None) or len(messages) != len(self.messages):
            return False
        last, mine = messages[-1], self.messages[-1]
        if last.get("role") != "user" or mine.get("role") != "user":
            return False
        if normalize_text(str(last.get("content") or "")) != \
                normalize_text(str(mine.get("content") or "")):
            return False
        return messages[:-1] == self.messages[:-1]

    def adopt(self) -> AsyncIterator[LLMChunk]:
        """The stream, from its first chunk: those already received at once, the rest as
        they come. Closing it closes the LLM stream."""
        self.adopted = True
        return self._replay()

    async def _replay(self) -> AsyncIterator[LLMChunk]:
        sent = 0
        try:
            while True:
                if sent < len(self._chunks):
                    sent += 1
                    yield self._chunks[sent - 1]
                    continue
                if self._done:
                    if self.failed is not None:
                        raise self.failed
                    if self.cancelled:
                        raise ProviderError("preempted", "the stream was cancelled")
                    return
                self._wake.clear()
                await self._wake.wait()
        finally:
            await self.aclose()

    def cancel(self) -> None:
        """Stop the stream (the task closes it); a no-op once it has ended or was stopped:
        cancelled again while closing its stream (the turn that discarded it ending), the
        teardown would be cut short and the HTTP stream left open."""
        if not self.task.done() and not self.cancelled:
            self.cancelled = True
            self.task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
