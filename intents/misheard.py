"""Misheard copies of a seed's questions: the seed as a recogniser might hand it over.

A seed is typed; callers are transcribed, and a transcript drops words and swaps them for
ones that sound or spell alike ("check" for "cheque", "ADM" for "ATM", "reason" for
"refund"). A classifier that only ever saw the typed questions trusts every word of them.
So a large enough seed is fitted on each question and one copy of it with such noise, made
here without audio: each word, with probability ``RATE``, is dropped (half the time) or
replaced (the other half) by another word of the seed's own vocabulary that sounds the same
(the same Metaphone code, jellyfish) or, failing that, is spelt within two edits of it with
the same first letter. Never anything the seed does not say, so no new intent words appear.

Chosen on Banking77 *train* only (``bench/router_probes.py --misheard``, the shipped 5-fold
cross-validation, fold seeds 0 and 1; dev never read), at a rate fixed before the first run:
see the README's router section for the figures. The copies are deterministic (a fixed
random seed per question), so the same seed always fits the same models.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Sequence

import jellyfish

from intents.classifier import MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS

# Only a seed with this many questions an intent on average gets copies (the gate of the
# text views, intents.classifier): measured on Banking77's ~130; with a handful an intent,
# a copy that drops a key word would outweigh what the intent says.
MIN_QUESTIONS_PER_INTENT_FOR_MISHEARD = MIN_QUESTIONS_PER_INTENT_FOR_NGRAMS
# Share of words a copy mishears (half dropped, half replaced where a near word exists).
RATE = 0.15
_WORD = re.compile(r"[a-z']+")
# Words shorter than this have no spelling neighbour worth taking ("a" -> "i").
_MIN_NEAR_LENGTH = 4
_MAX_EDITS = 2


class _Vocabulary:
    """The seed's words, by sound and by first letter."""

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in _WORD.findall(t.lower())})
        self.by_sound: dict[str, list[str]] = {}
        self.by_initial: dict[str, list[str]] = {}
        for word in words:
            self.by_sound.setdefault(jellyfish.metaphone(word), []).append(word)
            self.by_initial.setdefault(word[0], []).append(word)
        self._near: dict[str, list[str]] = {}

    def alternatives(self, word: str) -> list[str]:
        """Words of the seed that a recogniser could hear for ``word`` (lower case)."""
        same_sound = [w for w in self.by_sound.get(jellyfish.metaphone(word), ()) if w != word]
        if same_sound:
            return same_sound
        if len(word) < _MIN_NEAR_LENGTH:
            return []
        if word not in self._near:
            self._near[word] = [
                w for w in self.by_initial.get(word[0], ())
                if w != word and jellyfish.levenshtein_distance(w, word) <= _MAX_EDITS]
        return self._near[word]


def _chosen(alternatives: list[str], key: str) -> str:
    """The alternative ranked first for ``key`` (rendezvous hashing): the same one from any
    vocabulary that holds it, whatever else that vocabulary holds or lacks (a random pick
    by index changed with every word another fold lacks, and so did the draws after it)."""
    return max(alternatives,
               key=lambda word: hashlib.blake2b(f"{key}:{word}".encode(), digest_size=8).digest())


def misheard_copies(texts: Sequence[str], rate: float = RATE, seed: int = 0) -> list[str]:
    """One misheard copy of each text, in order (a copy that would lose every word is the
    text itself)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate is a share of words, 0..1: {rate}")
    vocabulary = _Vocabulary(texts)
    copies = []
    for text in texts:
        # Drawn per text, not from one stream: a question's copy depends on its own words
        # and the vocabulary alone, so the copies made for a calibration fold's questions
        # are, but where the fold's vocabulary lacks the word swapped in, those of the
        # whole seed (embedded once for all of them: intents.calibration.MisheardCopies).
        rng = random.Random(f"{seed}:{text}")
        kept = []
        for position, word in enumerate(text.split()):
            draw = rng.random()
            if draw < rate / 2:
                continue  # dropped
            if draw < rate:
                bare = re.sub(r"[^a-z']", "", word.lower())
                alternatives = vocabulary.alternatives(bare) if bare else []
                if alternatives:
                    kept.append(_chosen(alternatives, f"{seed}:{text}:{position}"))
                    continue
            kept.append(word)
        copies.append(" ".join(kept) if kept else text)
    return copies
