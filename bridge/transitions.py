"""What counts as a transition of a watched key: pure functions of (previous, current).

Values are kept in a canonical string form (`Key.canonical` in bridge/keys.py) so that the state
store can compare them byte for byte; what each key's transitions are called and which of them
carry a notice is declared with the key.
"""

from __future__ import annotations

from typing import Any

from bridge.events import Transition
from bridge.keys import KEYS


def canonical(key: str, value: Any) -> str:
    """The comparable form of a decoded value of `key` (see `Key.canonical`)."""
    return KEYS[key].canonical(value)


def is_notice(key: str, value: str) -> bool:
    """Whether the canonical `value` of `key` means a notice is on (see `Key.is_notice`)."""
    return KEYS[key].is_notice(value)


def classify(key: str, previous: str, current: str) -> Transition | None:
    """The transition from `previous` to `current`, or None when nothing changed."""
    if previous == current:
        return None
    spec = KEYS[key]
    kind = f"{spec.family}.{spec.action(previous, current)}"
    return Transition(key=key, previous=previous, current=current, kind=kind)


def notice_seconds(transition: Transition) -> int | None:
    """The documented warning before the disruption starts, where one is known."""
    spec = KEYS.get(transition.key)
    if spec is None:  # a heartbeat
        return None
    return spec.notice_seconds(transition.kind.rsplit(".", 1)[1], transition.current)
