"""When a provider's 429 says to ask again: its headers, read as the vendors document them.

Shared by the adapters that ask again after a rate limit (ElevenLabs in its own request,
the LLMs through the hedge). Header names are read in lower case, as httpx gives them.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from typing import Mapping

# A Go duration, as OpenAI and Groq write their x-ratelimit-reset-* ("6m0s", "120ms", "7.66s").
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait the provider asks for: ``retry-after-ms`` (OpenAI's, in milliseconds), else
    ``retry-after`` (seconds, or an HTTP date from now), as the openai SDK reads them; None
    when absent or unreadable."""
    millis = _number(headers.get("retry-after-ms", ""))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after", "").strip()
    seconds = _number(value)
    if seconds is not None or not value:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_wait(asked_s: float | None, retries_done: int, backoff_s: float,
               left_s: float) -> float | None:
    """How long to wait before asking again: ``asked_s`` (what the provider asked for), else
    ``backoff_s`` doubling with each retry done, jittered 50-100 % so calls refused together
    do not ask again together; None when the wait would not end inside ``left_s`` of the
    budget (the caller would wait for nothing, then hear the failure anyway)."""
    wait = asked_s
    if wait is None:
        wait = backoff_s * 2 ** retries_done * random.uniform(0.5, 1.0)
    return wait if wait < left_s else None


def reset_s(headers: Mapping[str, str]) -> float | None:
    """When the limit a 429 hit is whole again, at the latest: the longest
    ``x-ratelimit-reset-<kind>`` of a kind (requests, tokens) with none left
    (``x-ratelimit-remaining-<kind>: 0``). None when no header names such a limit: a 429
    beside limits with room left says nothing of when its own clears."""
    waits = [_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
             for kind in ("requests", "tokens")
             if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"]
    known = [w for w in waits if w is not None]
    return max(known) if known else None


def _number(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return max(0.0, number) if math.isfinite(number) else None


def _duration(value: str) -> float | None:
    value = value.strip()
    if not value or _DURATION_PART.sub("", value):  # empty, or not a duration throughout
        return _number(value)  # some servers write plain seconds
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))
