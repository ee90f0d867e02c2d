"""Shared helpers for the intents / cache_seed tests.

Kept out of conftest.py so this branch merges cleanly beside the gateway's fixtures.
Test modules import the fixtures they use; the heavy objects are built once per
process (``functools.cache``) even if pytest instantiates the fixture per module.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cache_seed import seed  # noqa: E402
from intents.embedder import Embedder  # noqa: E402
from intents.loader import LoadedCache, load_cache  # noqa: E402
from intents.store import LocalStore  # noqa: E402

BANK_FAQ = Path(__file__).resolve().parent.parent / "cache_seed" / "examples" / "bank_faq.csv"
TONE_RATE = 8000


def tone_render(text: str) -> tuple[bytes, int]:
    """A cheap deterministic stand-in for the TTS: a 440 Hz tone, 10 ms per character.

    Acceptable ONLY in unit tests of seeding, where what matters is that each
    answer maps to its own, reproducible audio; it is not speech.
    """
    samples = TONE_RATE // 100 * max(1, len(text))
    return b"".join(struct.pack("<h", int(6000 * math.sin(2 * math.pi * 440 * i / TONE_RATE)))
                    for i in range(samples)), TONE_RATE


@functools.cache
def shared_embedder() -> Embedder:
    return Embedder()


@functools.cache
def _seeded_bank_store() -> str:
    root = tempfile.mkdtemp(prefix="voicegate-bank-")
    seed(BANK_FAQ, LocalStore(root), tone_render, "test-tone", progress=False,
         embedder=shared_embedder())
    return root


@pytest.fixture(scope="session")
def intent_embedder() -> Embedder:
    return shared_embedder()


@pytest.fixture(scope="session")
def bank_cache(intent_embedder: Embedder) -> LoadedCache:
    """The shipped bank FAQ, seeded once with the test tone renderer and loaded."""
    return load_cache(LocalStore(_seeded_bank_store()), intent_embedder)
