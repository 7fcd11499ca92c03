"""What counts as a transition of a watched key: pure functions of (previous, current).

Values are kept in a canonical string form so that the state store can compare them byte for
byte: the plain text of `maintenance-event` and `preempted`, and sorted compact JSON (or "" for
"nothing scheduled") for `upcoming-maintenance`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bridge.events import (
    BASELINE,
    FAMILY,
    NOTICE_SECONDS,
    PREEMPTION_NOTICE_SECONDS,
    UPCOMING,
    Transition,
)

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def canonical(key: str, value: Any) -> str:
    """The comparable form of a decoded metadata value (text for plain keys, JSON for the window).

    Unknown shapes are kept, serialised, rather than dropped: a value Google adds tomorrow must
    still reach subscribers.
    """
    if key == UPCOMING:
        if value is None or value == {} or value == "":
            return ""
        if isinstance(value, dict):
            snake = {_CAMEL.sub("_", k).lower(): v for k, v in value.items()}
            return json.dumps(snake, sort_keys=True, separators=(",", ":"))
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def classify(key: str, previous: str, current: str) -> Transition | None:
    """The transition from `previous` to `current`, or None when nothing changed."""
    if previous == current:
        return None
    family = FAMILY[key]
    idle = BASELINE[key]
    if key == UPCOMING:
        action = "scheduled" if previous == idle else "cleared" if current == idle else "updated"
    else:
        action = "started" if previous == idle else "ended" if current == idle else "changed"
    return Transition(key=key, previous=previous, current=current, kind=f"{family}.{action}")


def notice_seconds(transition: Transition) -> int | None:
    """The documented warning before the disruption starts, where one is known."""
    if transition.kind in ("maintenance.started", "maintenance.changed"):
        return NOTICE_SECONDS.get(transition.current)
    if transition.kind == "preemption.started":
        return PREEMPTION_NOTICE_SECONDS
    return None
