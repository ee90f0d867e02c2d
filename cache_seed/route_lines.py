"""The engine of ``voicegate route``: one utterance per line in, one JSON-able dict out."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from intents.router import Router


def route_lines(router: Router, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Route each non-blank line; yields text, intent, action, hit (as typed text),
    spoken_hit (as a caller's transcript: a stricter threshold), finished (a hit's words
    read as a finished question: a spoken one ends the turn on the short silence, one that
    reads unfinished waits the long one), entry_id, answer, score, ms."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        d = router.route(text)
        yield {"text": d.text, "intent": d.intent, "action": d.action.value, "hit": d.hit,
               "spoken_hit": d.as_spoken().hit, "finished": d.finished,
               "entry_id": d.entry_id, "answer": d.answer,
               "score": round(d.score, 4), "ms": round(d.ms, 3)}
