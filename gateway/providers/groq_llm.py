"""Streaming chat completions through the official ``groq`` SDK."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import groq

from gateway.providers.base import LLMChunk, ProviderError, ToolSpec
from gateway.providers.chat_stream import chunks, request_args


class GroqChat:
    """``ChatModel`` over ``groq.AsyncGroq``. ``base_url`` is the host root
    (the SDK appends ``/openai/v1/chat/completions``)."""

    def __init__(self, model: str, *, api_key: str, base_url: str = "", name: str = "groq",
                 timeout_s: float = 30.0, max_retries: int = 0, temperature: float | None = None,
                 max_tokens: int | None = None) -> None:
        if not api_key:
            raise ProviderError(name, "no API key (set VOICEGATE_GROQ_API_KEY)")
        self.name = name
        self.model = model
        self._temperature = temperature
        self._max_tokens = max_tokens
        # Accept the OpenAI-style URL too: the SDK appends /openai/v1 itself.
        base_url = base_url.rstrip("/").removesuffix("/openai/v1")
        self._client = groq.AsyncGroq(api_key=api_key, base_url=base_url or None,
                                      timeout=timeout_s, max_retries=max_retries)

    async def stream(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        try:
            response = await self._client.chat.completions.create(
                **request_args(self.model, messages, tools, self._temperature, self._max_tokens))
        except groq.GroqError as exc:
            raise self._error(exc) from exc
        try:
            async for chunk in chunks(response):
                yield chunk
        except groq.GroqError as exc:
            raise self._error(exc) from exc
        except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ProviderError(self.name, f"malformed stream chunk: {exc}") from exc
        finally:
            # groq's AsyncStream only releases the response when read to the end;
            # close it ourselves on every exit (including cancellation).
            await response.close()

    def _error(self, exc: groq.GroqError) -> ProviderError:
        if isinstance(exc, groq.APIStatusError):
            return ProviderError(self.name, f"HTTP {exc.status_code} from {self.model}: {exc.message}")
        if isinstance(exc, groq.APITimeoutError):
            return ProviderError(self.name, f"request to {self._client.base_url} timed out")
        if isinstance(exc, groq.APIConnectionError):
            return ProviderError(self.name, f"cannot reach {self._client.base_url}: {exc}")
        return ProviderError(self.name, f"stream failed: {exc}")

    async def aclose(self) -> None:
        await self._client.close()
