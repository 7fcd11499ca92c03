"""The watched metadata keys: one declaration each, read by every part of the stream.

Transitions, events, the state store's outbox bound, the configuration, the simulator, the
schema generator and the Terraform kinds list (checked by tests/test_terraform.py) all derive
what they know about a key from its `Key` here, so that adding a key is one declaration plus its
schema fields, its simulator default and its docs (docs/architecture.md, "Adding a metadata
key"). Standard library only: the example Cloud Functions vendor it with `bridge/events.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ANY_VALUE = "*"  # in `Key.notice`: whatever the new value is
HEARTBEAT_KEY = "bridge/heartbeat"  # the `key` of a heartbeat, which watches nothing
HEARTBEAT_KIND = "bridge.heartbeat"

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Key:
    """One watched key and everything the bridge does differently for it."""

    path: str  # relative to computeMetadata/v1/
    family: str  # the first part of its event kinds
    baseline: str  # the documented default, canonical: what a first start compares against
    # The action when the value leaves the baseline, moves between two other values, comes back.
    actions: tuple[str, str, str]
    # "text": asked as Google's sample asks (no alt), a plain value; "json": asked with
    # alt=json, a document, canonicalised to sorted snake_case JSON ("" for nothing).
    form: Literal["text", "json"] = "text"
    # A 404 (or the server's "no notifications" 503) means the baseline, not a missing key.
    absent_is_baseline: bool = False
    # Documented warning before the disruption, by new value (ANY_VALUE: any), for the
    # actions in `notice_on`.
    notice: Mapping[str, int] = field(default_factory=dict)
    notice_on: tuple[str, ...] = ()
    # The value is a maintenance window: events carry it parsed as `data.upcoming`.
    window: bool = False
    # Over the outbox bound its events may go (oldest first); a notice never is.
    droppable: bool = False
    # Decoded string answers that mean the baseline too (a JSON key's "nothing" besides `{}`):
    # `NONE`, which users report upcoming-maintenance answering as text or as JSON `"NONE"`.
    nothing: frozenset[str] = frozenset()

    @property
    def alt(self) -> str | None:
        """The `alt` query parameter the key is asked with."""
        return "json" if self.form == "json" else None

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(f"{self.family}.{action}" for action in self.actions)

    def canonical(self, value: Any) -> str:
        """The comparable form of a decoded value; unknown shapes are kept, serialised, rather
        than dropped: a value Google adds tomorrow must still reach subscribers."""
        if self.form == "json":
            if value is None or value == {} or value == "":
                return ""
            if isinstance(value, str) and value.strip() in self.nothing:
                return self.baseline
            if isinstance(value, dict):
                value = {_CAMEL.sub("_", k).lower(): v for k, v in value.items()}
            return _compact(value)
        return value if isinstance(value, str) else _compact(value)

    def action(self, previous: str, current: str) -> str:
        appeared, changed, cleared = self.actions
        if previous == self.baseline:
            return appeared
        return cleared if current == self.baseline else changed

    def is_notice(self, value: str) -> bool:
        """Whether the canonical `value` says a disruption is near or under way: any plain value
        off its baseline (an unknown maintenance-event value included), a window ONGOING. The
        watchers poll more often while one is (bridge/watcher.py)."""
        if not self.window:
            return value != self.baseline
        try:
            window = json.loads(value) if value else None
        except ValueError:
            return False
        return isinstance(window, dict) and window.get("maintenance_status") == "ONGOING"

    def notice_seconds(self, action: str, current: str) -> int | None:
        if action not in self.notice_on:
            return None
        return self.notice.get(current, self.notice.get(ANY_VALUE))


MAINTENANCE = "instance/maintenance-event"
PREEMPTED = "instance/preempted"
UPCOMING = "instance/upcoming-maintenance"

KEYS: Mapping[str, Key] = {
    key.path: key
    for key in (
        Key(
            MAINTENANCE,
            "maintenance",
            "NONE",
            ("started", "changed", "ended"),
            notice={"MIGRATE_ON_HOST_MAINTENANCE": 60, "TERMINATE_ON_HOST_MAINTENANCE": 3600},
            notice_on=("started", "changed"),
        ),
        Key(
            PREEMPTED,
            "preemption",
            "FALSE",
            ("started", "changed", "ended"),
            notice={ANY_VALUE: 30},
            notice_on=("started",),
        ),
        Key(
            UPCOMING,
            "upcoming",
            "",
            ("scheduled", "updated", "cleared"),
            form="json",
            absent_is_baseline=True,
            window=True,
            droppable=True,
            nothing=frozenset({"NONE"}),
        ),
    )
}
WATCHED_KEYS: tuple[str, ...] = tuple(KEYS)

# Every kind the bridge emits: the part of the CloudEvent type after the configurable prefix.
KINDS: tuple[str, ...] = (*(kind for key in KEYS.values() for kind in key.kinds), HEARTBEAT_KIND)
# Kinds the outbox may drop, oldest first, when over its bound (heartbeats: liveness only).
DROPPABLE_KINDS: frozenset[str] = frozenset(
    {HEARTBEAT_KIND, *(kind for key in KEYS.values() if key.droppable for kind in key.kinds)}
)
