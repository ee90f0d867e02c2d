"""Streaming chat completions through the official ``openai`` SDK.

Any OpenAI-compatible server works through ``base_url`` (Ollama, vLLM, llama.cpp
server); a local server needs no key, so a placeholder is sent.
"""

from __future__ import annotations

import openai

from gateway.providers.chat_stream import SDKChat


class OpenAIChat(SDKChat):
    """``ChatModel`` over ``openai.AsyncOpenAI``; one client (connection pool) per instance."""

    def __init__(self, model: str, *, base_url: str = "", api_key: str = "", name: str = "openai",
                 timeout_s: float = 30.0, max_retries: int = 0, temperature: float | None = None,
                 max_tokens: int | None = None) -> None:
        client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed",  # local servers ignore it; the SDK insists on one
            base_url=base_url or None, timeout=timeout_s, max_retries=max_retries)
        super().__init__(name, model, client, openai, openai.OpenAIError, temperature, max_tokens)
