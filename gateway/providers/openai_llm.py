"""Streaming chat completions through the official ``openai`` SDK.

Any OpenAI-compatible server works through ``base_url`` (Ollama, vLLM, llama.cpp
server); a local server needs no key, so a placeholder is sent.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import openai

from gateway.providers.base import LLMChunk, ProviderError, ToolSpec
from gateway.providers.chat_stream import chunks, request_args


class OpenAIChat:
    """``ChatModel`` over ``openai.AsyncOpenAI``; one client (connection pool) per instance."""

    def __init__(self, model: str, *, base_url: str = "", api_key: str = "", name: str = "openai",
                 timeout_s: float = 30.0, max_retries: int = 0, temperature: float | None = None,
                 max_tokens: int | None = None) -> None:
        self.name = name
        self.model = model
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed",  # local servers ignore it; the SDK insists on one
            base_url=base_url or None, timeout=timeout_s, max_retries=max_retries)

    async def stream(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        try:
            response = await self._client.chat.completions.create(
                **request_args(self.model, messages, tools, self._temperature, self._max_tokens))
        except openai.OpenAIError as exc:
            raise self._error(exc) from exc
        try:
            async for chunk in chunks(response):
                yield chunk
        except openai.OpenAIError as exc:
            raise self._error(exc) from exc
        except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ProviderError(self.name, f"malformed stream chunk: {exc}") from exc
        finally:
            # Runs on normal end, on error, and when the consumer closes or cancels us:
            # the HTTP stream must not outlive the generator.
            await response.close()

    def _error(self, exc: openai.OpenAIError) -> ProviderError:
        if isinstance(exc, openai.APIStatusError):
            return ProviderError(self.name, f"HTTP {exc.status_code} from {self.model}: {exc.message}")
        if isinstance(exc, openai.APITimeoutError):
            return ProviderError(self.name, f"request to {self._client.base_url} timed out")
        if isinstance(exc, openai.APIConnectionError):
            return ProviderError(self.name, f"cannot reach {self._client.base_url}: {exc}")
        return ProviderError(self.name, f"stream failed: {exc}")

    async def aclose(self) -> None:
        await self._client.close()
