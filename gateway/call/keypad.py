"""Keypad presses (DTMF) of one call: mapped keys act at once, the rest are collected.

The keypad map (``VOICEGATE_KEYPAD``) names what a key does when it is the first key
pressed: ``handoff`` (a person) or a cache entry id (that answer plays). Any other key
starts a collection; keys are gathered until ``#``, a pause of ``keypad_pause_s`` or
``MAX_COLLECTED_KEYS`` keys (a card number is 19; a flood of presses is not a number), then
the agent gets them as text ("the caller pressed 4 5 6 7"), so it can use an
account number or a menu choice. A mapped key pressed inside a collection is just a
digit of it.

Pure logic, no tasks and no clock: the call's keypad loop feeds presses and tells
it when the pause ran out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..settings import KEYPAD_END, KEYPAD_HANDOFF, KEYPAD_KEYS

_SPOKEN = {"*": "star", "#": "hash"}
MAX_COLLECTED_KEYS = 32


class BadKey(ValueError):
    """Not a key of a telephone keypad."""


def check_key(key: object) -> str:
    """``key`` as a keypad key, or ``BadKey`` naming what is allowed."""
    if not isinstance(key, str) or key not in KEYPAD_KEYS:
        raise BadKey(f"{str(key)[:16]!r} is not a keypad key; expected one of 0-9, * or #")
    return key


@dataclass(frozen=True)
class Mapped:
    """A key of the keypad map: ``action`` is ``handoff`` or a cache entry id."""

    key: str
    action: str

    @property
    def handoff(self) -> bool:
        return self.action == KEYPAD_HANDOFF


@dataclass(frozen=True)
class Collected:
    """Keys gathered until ``#`` or a pause, for the agent."""

    keys: str

    def text(self) -> str:
        return "the caller pressed " + " ".join(_SPOKEN.get(k, k) for k in self.keys)


class Keypad:
    def __init__(self, mapping: Mapping[str, str], pause_s: float) -> None:
        self.mapping = dict(mapping)
        self.pause_s = pause_s
        self._keys: list[str] = []
        self.began_at: float | None = None  # when the collection's first key came (``press``)

    @property
    def collecting(self) -> bool:
        return bool(self._keys)

    def does_nothing(self, key: str) -> bool:
        """Pressing ``key`` now does nothing: a lone `#`, no collection under way."""
        return key == KEYPAD_END and not self._keys

    def hands_off(self, key: str) -> bool:
        """Pressing ``key`` now asks for a person: mapped to handoff, no collection under way."""
        return not self._keys and self.mapping.get(key) == KEYPAD_HANDOFF

    def press(self, key: str, at: float | None = None) -> Mapped | Collected | None:
        """One key (pressed at ``at``, clock time); what to do now, or None while a
        collection goes on."""
        key = check_key(key)
        if key == KEYPAD_END:
            return self.expire()  # a lone `#` ends nothing and does nothing
        if not self._keys and key in self.mapping:
            return Mapped(key, self.mapping[key])
        if not self._keys:
            self.began_at = at
        self._keys.append(key)
        if len(self._keys) >= MAX_COLLECTED_KEYS:  # handed over as if `#` were pressed
            return self.expire()
        return None

    def expire(self) -> Collected | None:
        """The pause ran out (or `#`): the collection so far, if any."""
        if not self._keys:
            return None
        keys, self._keys, self.began_at = "".join(self._keys), [], None
        return Collected(keys)
