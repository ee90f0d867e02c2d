from __future__ import annotations

from typing import Iterator

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.server import ServerThread
from tests.fakes.webhook_server import FakeWebhook


@pytest.fixture
def llm_server() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    fake = FakeOpenAI()
    with ServerThread(fake) as server:
        yield fake, server


@pytest.fixture
def webhook() -> Iterator[tuple[FakeWebhook, ServerThread]]:
    fake = FakeWebhook()
    with ServerThread(fake.app) as server:
        yield fake, server
