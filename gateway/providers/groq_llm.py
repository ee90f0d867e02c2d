"""Streaming chat completions through the official ``groq`` SDK."""

from __future__ import annotations

import groq

from gateway.providers.base import ProviderError
from gateway.providers.chat_stream import SDKChat


class GroqChat(SDKChat):
    """``ChatModel`` over ``groq.AsyncGroq``. ``base_url`` is the host root
    (the SDK appends ``/openai/v1/chat/completions``)."""

    def __init__(self, model: str, *, api_key: str, base_url: str = "", name: str = "groq",
                 timeout_s: float = 30.0, max_retries: int = 0, temperature: float | None = None,
                 max_tokens: int | None = None) -> None:
        if not api_key:
            raise ProviderError(name, "no API key (set VOICEGATE_GROQ_API_KEY)")
        # Accept the OpenAI-style URL too: the SDK appends /openai/v1 itself.
        base_url = base_url.rstrip("/").removesuffix("/openai/v1")
        client = groq.AsyncGroq(api_key=api_key, base_url=base_url or None,
                                timeout=timeout_s, max_retries=max_retries)
        super().__init__(name, model, client, groq, groq.GroqError, temperature, max_tokens)
