"""Group missed questions by meaning, so an operator sees which FAQ to add next.

The texts are embedded with the router's own embedder (through its cache, off the event
loop) and clustered greedily: distinct texts, most frequent first, join the most
similar existing group when the cosine similarity to its centroid is at least
``threshold``, else start a group. Groups come back most frequent first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from intents.embedder import Embedder, normalize_text

from ..stats import MissedQuestion

DEFAULT_THRESHOLD = 0.75
EXAMPLES_PER_GROUP = 5
QUESTIONS_PER_GROUP = 50  # distinct wordings offered as a promoted entry's paraphrases


def is_agent_intent(missed: MissedQuestion, hit_similarity: float) -> bool:
    """Routed on purpose to the agent or a human, and as close to that intent's seed
    questions as a cache hit would need to be: not a missing FAQ. A question the router
    only guessed an agent intent for (low similarity) may well be one, so it stays."""
    return (missed.intent is not None and missed.action in ("llm", "handoff")
            and missed.score is not None and missed.score >= hit_similarity)


@dataclass
class _Group:
    texts: Counter[str] = field(default_factory=Counter)  # normalized text -> count
    shown: dict[str, str] = field(default_factory=dict)  # normalized -> first spelling seen
    intents: Counter[str | None] = field(default_factory=Counter)
    last_at: float = 0.0
    calls: set[str] = field(default_factory=set)
    answer: tuple[float, str] | None = None  # (when, what) the agent answered most recently


def group_misses(missed: Sequence[MissedQuestion], embedder: Embedder,
                 threshold: float = DEFAULT_THRESHOLD, limit: int = 20,
                 with_keys: bool = False) -> list[dict[str, Any]]:
    """Blocking (embeds): run it on a worker thread. ``with_keys``: each group also holds
    ``keys``, the normalized text of every wording in it (``questions`` stops at
    ``QUESTIONS_PER_GROUP``), for a promotion to take them all off the misses list."""
    if not missed:
        return []
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    intents: dict[str, Counter[str | None]] = {}
    last_at: dict[str, float] = {}
    calls: dict[str, set[str]] = {}
    answers: dict[str, tuple[float, str]] = {}
    for n, m in enumerate(missed):
        key = normalize_text(m.text)
        counts[key] += 1
        spelling.setdefault(key, m.text)
        intents.setdefault(key, Counter())[m.intent] += 1
        last_at[key] = max(last_at.get(key, 0.0), m.at)
        calls.setdefault(key, set()).add(m.call_id or f"#{n}")  # no id: a call of its own
        if m.answer and (key not in answers or m.at >= answers[key][0]):
            answers[key] = (m.at, m.answer)
    texts = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    # Through the router's LRU: a missed question was routed, so its vector is usually
    # there, and the dashboard asks again every 3 s (up to 2,000 distinct misses: ~5 s of
    # forward passes each time, a core taken from the calls, when read past the cache).
    vectors = embedder.encode_many(texts)
    groups: list[_Group] = []
    # The groups' centroids as rows of one matrix, and their norms: a text is scored against
    # every group in one product. Group by group in Python it took ~7 s for 2,000 distinct
    # misses (1,000 groups), holding the GIL the calls' event loop needs on every refresh.
    centroids = np.zeros((len(texts), vectors.shape[1]), dtype=np.float64)
    norms = np.zeros(len(texts), dtype=np.float64)
    for text, vector in zip(texts, vectors):
        best = None
        if groups:
            n = len(groups)
            scores = (centroids[:n] @ vector) / np.where(norms[:n] > 0.0, norms[:n], 1.0)
            # The most similar group at or over the threshold; on a tie the later one, as
            # the group-by-group comparison (>=) chose.
            at = n - 1 - int(np.argmax(scores[::-1]))
            if scores[at] >= threshold:
                best = at
        if best is None:
            best = len(groups)
            groups.append(_Group())
        centroids[best] += vector * counts[text]
        norms[best] = np.linalg.norm(centroids[best])
        group = groups[best]
        group.texts[text] += counts[text]
        group.shown.setdefault(text, spelling[text])
        group.intents.update(intents[text])
        group.last_at = max(group.last_at, last_at[text])
        group.calls |= calls[text]
        if text in answers and (group.answer is None or answers[text][0] >= group.answer[0]):
            group.answer = answers[text]
    out = []
    for group in groups:
        ranked = [t for t, _ in group.texts.most_common()]
        out.append({
            "question": group.shown[ranked[0]],  # the most frequent wording
            "count": sum(group.texts.values()),
            "examples": [{"text": group.shown[t], "count": group.texts[t]}
                         for t in ranked[:EXAMPLES_PER_GROUP]],
            "distinct": len(ranked),
            "intents": [{"intent": intent, "count": n}
                        for intent, n in group.intents.most_common()],
            "last_at": group.last_at,
            # Calls that asked it: each would have been answered instantly by an entry.
            "calls": len(group.calls),
            "draft_answer": group.answer[1] if group.answer else None,
            "questions": [group.shown[t] for t in ranked[:QUESTIONS_PER_GROUP]],
            **({"keys": ranked} if with_keys else {}),
        })
    out.sort(key=lambda g: (-g["count"], -g["last_at"]))
    return out[:limit]
