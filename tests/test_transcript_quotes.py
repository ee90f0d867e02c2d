"""Stray quote marks around a recognised transcript: stripped; typed text kept as typed."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.providers.redecode import RedecodingSTT
from tests.call_harness import CallHarness

# `make demo`'s caller 2, heard by Moonshine base-en at the pause after "app,": its first
# token is "▁\"'" (id 13577, p 0.73 int8 / 0.79 float), the model's own greedy choice.
OBSERVED = "\"'I forgot my password for the app."


class QuotingRecognizer:
    """Hears every utterance as Moonshine heard `make demo`'s caller 2."""

    name = "quoting"

    def transcribe_ids(self, pcm16, draft=(), stop=None):
        return OBSERVED, [13577, 29902, 9640]

    def transcribe(self, pcm16: bytes) -> str:
        return self.transcribe_ids(pcm16)[0]

    def warm_up(self) -> None:
        return None


@pytest.fixture
def pool():
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


async def test_stray_quotes_the_recogniser_put_before_the_words_are_stripped(pool):
    """Review (stop 63): `make demo` printed heard '"\\'I forgot my password for the app.':
    Moonshine's first token was the one for a space, '"' and "'" (its greedy choice, not
    the draft's nor the no-speech rule's), and the transcript went as it was to the client's
    `transcript` event, the logs, the router and the LLM's context. The partials, the early
    final and the final of a recognised utterance carry the words without the quotes."""
    stt = RedecodingSTT(QuotingRecognizer(), pool, slots=1, partial_interval_ms=100)
    stream = stt.open_stream()
    await stream.send_audio(bytes(16000 * 2))  # 1 s: a partial is due
    partial = await asyncio.wait_for(anext(aiter(stream.partials())), 5)
    early = await stream.speech_paused()
    final = await stream.finalize()
    wanted = "I forgot my password for the app."
    assert (partial.text, early.text, final.text) == (wanted, wanted, wanted)
    assert stt.transcribe(bytes(16000 * 2)) == wanted
    await stream.aclose()


@pytest.mark.parametrize("heard, cleaned", [
    (OBSERVED, "I forgot my password for the app."),
    ("\"'I forgot my password for the app. How do I reset it?",
     "I forgot my password for the app. How do I reset it?"),
    ("I forgot my password.\"", "I forgot my password."),
    ("“I forgot my password", "I forgot my password"),
    ("‘ I lost my card.", "I lost my card."),
    ("I lost my card.’’", "I lost my card."),
    ("'", ""),
    ("\"'", ""),
    # Balanced quotations, at the ends or inside, and apostrophes in words are kept.
    ("It says \"declined\" on the screen.", "It says \"declined\" on the screen."),
    ("\"Declined\" is what it says.", "\"Declined\" is what it says."),
    ("The screen says \"declined.\"", "The screen says \"declined.\""),
    ("“Declined,” it says.", "“Declined,” it says."),
    ("'Declined' is what it says.", "'Declined' is what it says."),
    ("I don't know my PIN.", "I don't know my PIN."),
    ("I can’t log in, it’s locked.", "I can’t log in, it’s locked."),
    ("Songs from the '90s are on hold.", "Songs from the '90s are on hold."),
    ("'90s prices, I'd say.", "'90s prices, I'd say."),
    ("'Cause my card was stolen.", "'Cause my card was stolen."),
    ("It's my parents'", "It's my parents'"),
    ("Is it O'Brien's account?", "Is it O'Brien's account?"),
])
def test_only_unbalanced_quotes_at_the_ends_are_stray(heard, cleaned):
    """Review (stop 63): a quote mark at the start or the end of a transcript with nothing
    to pair with is stray; a quotation and an apostrophe (don't, the '90s) are words."""
    from gateway.providers.base import strip_stray_quotes
    assert strip_stray_quotes(heard) == cleaned


async def test_typed_text_keeps_its_quotes():
    """Review (stop 63): only recognised speech is cleaned: a typed message is the caller's
    own words, its `transcript` echo and its turn keep them as typed."""
    h = await CallHarness().start()
    typed = "\"'I forgot my password for the app."
    await h.text(typed)
    await h.wait(500)
    await h.stop()
    assert [e["text"] for e in h.output.of("transcript")] == [typed]
