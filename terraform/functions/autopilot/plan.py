"""The autopilot's planner: who starts maintenance now, who waits and why. Pure: no I/O, no clock.

Kept apart from main.py (which reads the ledger, asks Compute Engine and records) so that every
rule of docs/autopilot.md is a function of its inputs, and tests/test_autopilot.py can hold the
promises (never without can_reschedule, never over max_per_zone, never two of one group, never
outside the windows before the deadline margin) over thousands of generated fleets and clocks.

Windows are wall-clock times in an IANA time zone, so "Saturday 02:00-06:00 Europe/Berlin"
stays at 02:00 local across daylight-saving changes: on the night the clocks go forward the
window is an hour shorter in real time, on the night they go back a repeated hour counts
twice. A window whose end is not after its start runs overnight into the next day (equal start
and end: the whole day); `days` name the day the window starts on.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
GROUP_BY = ("", "name_prefix", "mig")  # or "label:KEY"
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")
# A managed instance group's VMs are named <base instance name>-<4 characters>.
_MIG_SUFFIX = re.compile(r"-[a-z0-9]{4}$")


class PolicyError(ValueError):
    """AUTOPILOT_POLICY is malformed: one line saying what, raised before any tick runs."""


@dataclass(frozen=True)
class Window:
    """A weekly maintenance window in local wall-clock time."""

    days: frozenset[int]  # 0 = Monday, the day the window starts on
    start: time
    length: timedelta  # wall-clock length, 1 minute to 24 hours
    zone: ZoneInfo

    def is_open(self, at: datetime) -> bool:
        """Whether the local wall clock at `at` is inside the window."""
        local = at.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        for back in (0, 1):  # today's window, or yesterday's running overnight
            day = local.date() - timedelta(days=back)
            if day.weekday() in self.days:
                opens = datetime.combine(day, self.start)
                if opens <= wall < opens + self.length:
                    return True
        return False

    def next_open(self, at: datetime) -> datetime | None:
        """The first instant at or after `at` when the window is open (`at` itself if it is).

        The window can only open where the wall clock reaches `start` (either instance of it on
        a night the clocks go back) or where it jumps (the clocks go forward into the window),
        so those instants are the only candidates. Two weeks ahead covers a window whose only
        day next week falls in the hour the clocks skip. None: it never opens (every day it
        names is skipped by the clocks, which no real zone does twice running).
        """
        if self.is_open(at):
            return at
        local_day = at.astimezone(self.zone).date()
        candidates = []
        for offset in range(-1, 16):
            day = local_day + timedelta(days=offset)
            for fold in (0, 1):
                wall = datetime.combine(day, self.start, tzinfo=self.zone).replace(fold=fold)
                candidates.append(wall.astimezone(timezone.utc))
        candidates.extend(_transitions(self.zone, at, at + timedelta(days=16)))
        return min((c for c in candidates if c >= at and self.is_open(c)), default=None)


def _transitions(zone: ZoneInfo, since: datetime, until: datetime) -> list[datetime]:
    """Instants in [since, until) where the zone's UTC offset changes, to the second."""
    out = []
    step = timedelta(hours=1)
    t = since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    before = t.astimezone(zone).utcoffset()
    while t < until:
        after = (t + step).astimezone(zone).utcoffset()
        if after != before:
            lo, hi = t, t + step  # offset(lo) == before, offset(hi) == after
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                if mid.astimezone(zone).utcoffset() == before:
                    lo = mid
                else:
                    hi = mid
            out.append(hi.replace(microsecond=0))
        t, before = t + step, after
    return out


@dataclass(frozen=True)
class Policy:
    """AUTOPILOT_POLICY, parsed and checked once (docs/autopilot.md, "The policy")."""

    windows: tuple[Window, ...] = ()
    max_per_zone: int = 1
    deadline_margin: timedelta = timedelta(hours=24)
    group_by: str = ""
    leave_alone: tuple[str, ...] = ()  # instance name patterns (fnmatch)
    leave_alone_label: tuple[str, str] | None = None  # (key, value)
    pre_hook_url: str = ""
    dry_run: bool = False

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            raw = json.loads(text or "{}")
        except ValueError as exc:
            raise PolicyError(f"AUTOPILOT_POLICY is not JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> Policy:
        if not isinstance(raw, dict):
            raise PolicyError("AUTOPILOT_POLICY must be a JSON object")
        known = {
            "windows",
            "max_per_zone",
            "deadline_margin_hours",
            "group_by",
            "leave_alone",
            "leave_alone_label",
            "pre_hook_url",
            "dry_run",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PolicyError(f"AUTOPILOT_POLICY: unknown field(s) {', '.join(unknown)}")
        windows = raw.get("windows") or []
        if not isinstance(windows, list):
            raise PolicyError("AUTOPILOT_POLICY.windows must be a list")
        max_per_zone = raw.get("max_per_zone", 1)
        if isinstance(max_per_zone, bool) or not isinstance(max_per_zone, int) or max_per_zone < 1:
            raise PolicyError("AUTOPILOT_POLICY.max_per_zone must be an integer >= 1")
        margin = raw.get("deadline_margin_hours", 24)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise PolicyError("AUTOPILOT_POLICY.deadline_margin_hours must be a number >= 0")
        group_by = raw.get("group_by") or ""
        if group_by not in GROUP_BY and not (
            isinstance(group_by, str) and group_by.startswith("label:") and len(group_by) > 6
        ):
            raise PolicyError("AUTOPILOT_POLICY.group_by must be name_prefix, mig or label:KEY")
        leave_alone = raw.get("leave_alone") or []
        if not isinstance(leave_alone, list) or not all(isinstance(p, str) for p in leave_alone):
            raise PolicyError("AUTOPILOT_POLICY.leave_alone must be a list of name patterns")
        label = raw.get("leave_alone_label") or ""
        if not isinstance(label, str) or (label and "=" not in label):
            raise PolicyError("AUTOPILOT_POLICY.leave_alone_label must be KEY=VALUE")
        hook = raw.get("pre_hook_url") or ""
        if not isinstance(hook, str) or (hook and not hook.startswith(("https://", "http://"))):
            raise PolicyError("AUTOPILOT_POLICY.pre_hook_url must be an http(s) URL")
        return cls(
            windows=tuple(_window(w, i) for i, w in enumerate(windows)),
            max_per_zone=max_per_zone,
            deadline_margin=timedelta(hours=margin),
            group_by=group_by,
            leave_alone=tuple(leave_alone),
            leave_alone_label=tuple(label.split("=", 1)) if label else None,  # type: ignore[arg-type]
            pre_hook_url=hook,
            dry_run=bool(raw.get("dry_run", False)),
        )

    def in_window(self, at: datetime) -> bool:
        return any(w.is_open(at) for w in self.windows)

    def next_window(self, at: datetime) -> datetime | None:
        """When a window is next open (`at` if one is); None without windows."""
        opens = [t for t in (w.next_open(at) for w in self.windows) if t is not None]
        return min(opens, default=None)

    def left_alone(self, name: str, labels: dict[str, str]) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.leave_alone):
            return True
        if self.leave_alone_label is None:
            return False
        key, value = self.leave_alone_label
        return labels.get(key) == value

    def group_of(self, name: str, labels: dict[str, str], created_by: str) -> str:
        """The replica group an instance belongs to ("" = none): at most one of a group is taken
        at a time. `created_by` is the instance's `created-by` metadata (its MIG, if any)."""
        if self.group_by == "name_prefix":
            return "prefix:" + _MIG_SUFFIX.sub("", name)
        if self.group_by == "mig":
            return f"mig:{created_by}" if "/instanceGroupManagers/" in created_by else ""
        if self.group_by.startswith("label:"):
            value = labels.get(self.group_by[6:], "")
            return f"{self.group_by}={value}" if value else ""
        return ""


def _window(raw: Any, index: int) -> Window:
    where = f"AUTOPILOT_POLICY.windows[{index}]"
    if not isinstance(raw, dict) or set(raw) - {"days", "start", "end", "time_zone"}:
        raise PolicyError(f"{where} must be an object of days, start, end, time_zone")
    days = raw.get("days") or []
    if not isinstance(days, list) or not days or not all(d in DAYS for d in days):
        raise PolicyError(f"{where}.days must list some of {', '.join(DAYS)}")
    bounds = []
    for name in ("start", "end"):
        value = raw.get(name)
        if not isinstance(value, str) or not _HHMM.match(value):
            raise PolicyError(f"{where}.{name} must be HH:MM (00:00-24:00)")
        hours, minutes = map(int, value.split(":"))
        bounds.append(hours * 60 + minutes)
    try:
        zone = ZoneInfo(str(raw.get("time_zone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        raise PolicyError(f"{where}.time_zone is not an IANA time zone") from None
    start, end = bounds
    if start == 24 * 60:
        raise PolicyError(f"{where}.start must be before 24:00")
    length = (end - start) % (24 * 60) or 24 * 60
    return Window(
        days=frozenset(DAYS.index(d) for d in days),
        start=time(start // 60, start % 60),
        length=timedelta(minutes=length),
        zone=zone,
    )


@dataclass(frozen=True)
class Candidate:
    """An instance with a scheduled window, as instances.get confirmed it (main.py)."""

    key: str  # the ledger document id
    name: str
    zone: str
    can_reschedule: bool
    status: str  # maintenanceStatus: PENDING, ONGOING, ...
    deadline: datetime | None  # latestWindowStartTime, else windowStartTime
    group: str = ""
    left_alone: bool = False
    blocked: str = ""  # why the caller will not act on it this tick (a refused call, ...)


@dataclass(frozen=True)
class Busy:
    """An instance in maintenance now, for whatever reason: it uses its zone's and group's room."""

    key: str
    zone: str
    group: str = ""


@dataclass(frozen=True)
class Wait:
    candidate: Candidate
    reason: str


@dataclass(frozen=True)
class Plan:
    start: tuple[Candidate, ...] = ()
    waits: tuple[Wait, ...] = ()
    next_slot: dict[str, datetime | None] = field(default_factory=dict)
    urgent: frozenset[str] = frozenset()  # keys started (or due) inside the deadline margin


def next_slot(
    policy: Policy, deadline: datetime | None, now: datetime, opens: datetime | None
) -> datetime | None:
    """The first moment at or after `now` the policy lets the autopilot act on an instance with
    this deadline: the next window (`opens`, policy.next_window(now)) or the deadline margin,
    whichever comes first (room in the zone and group aside). None: no window, no deadline."""
    urgent_at = None if deadline is None else max(now, deadline - policy.deadline_margin)
    return min((t for t in (opens, urgent_at) if t is not None), default=None)


def plan(policy: Policy, candidates: list[Candidate], busy: list[Busy], now: datetime) -> Plan:
    """Choose which candidates start now.

    Room per zone is max_per_zone minus the instances already in maintenance there (any
    reason: `busy`, and candidates whose maintenance is ONGOING); one instance per group at a
    time, counting the busy ones; the instances inside the deadline margin first, each in order
    of deadline, so that room goes to the one Google would otherwise take first.
    """
    occupied: dict[str, set[str]] = {}
    groups: set[str] = set()
    for b in [*busy, *(Busy(c.key, c.zone, c.group) for c in candidates if c.status == "ONGOING")]:
        occupied.setdefault(b.zone, set()).add(b.key)
        if b.group:
            groups.add(b.group)
    opens = policy.next_window(now)
    open_window = opens == now
    far = datetime.max.replace(tzinfo=timezone.utc)

    def due(c: Candidate) -> bool:
        return c.deadline is not None and now >= c.deadline - policy.deadline_margin

    order = sorted(candidates, key=lambda c: (not due(c), c.deadline or far, c.zone, c.name))
    start: list[Candidate] = []
    waits: list[Wait] = []
    slots: dict[str, datetime | None] = {}
    for c in order:
        slots[c.key] = next_slot(policy, c.deadline, now, opens)
        reason = _why_not(policy, c, occupied, groups, open_window, due(c), slots[c.key])
        if reason:
            waits.append(Wait(c, reason))
            continue
        start.append(c)
        occupied.setdefault(c.zone, set()).add(c.key)
        if c.group:
            groups.add(c.group)
    urgent = frozenset(c.key for c in candidates if due(c))
    return Plan(tuple(start), tuple(waits), slots, urgent)


def _why_not(
    policy: Policy,
    c: Candidate,
    occupied: dict[str, set[str]],
    groups: set[str],
    open_window: bool,
    due: bool,
    slot: datetime | None,
) -> str:
    """Why `c` does not start now, or "" if it does; the first rule that holds it back."""
    if c.left_alone:
        return "left alone by the policy"
    if not c.can_reschedule:
        return "cannot be rescheduled: Google starts it in its own window"
    if c.status != "PENDING":
        return f"maintenance {c.status or 'status unknown'}, not PENDING"
    if any(c.key in keys for keys in occupied.values()):
        return "maintenance under way"
    if c.blocked:
        return c.blocked
    if not open_window and not due:
        when = f"; next slot {rfc3339(slot)}" if slot else ""
        return f"outside the windows and the deadline margin{when}"
    in_zone = len(occupied.get(c.zone, set()))
    if in_zone >= policy.max_per_zone:
        return f"{in_zone} in maintenance in {c.zone} (max_per_zone {policy.max_per_zone})"
    if c.group and c.group in groups:
        return f"another of group {c.group} is in maintenance"
    return ""


def rfc3339(moment: datetime | None) -> str:
    """UTC, to the second, as the ledger and the events write times."""
    if moment is None:
        return ""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_id(key: str, window_start: str) -> str:
    """One scheduled window of one instance: what a requestId and a ledger record are for."""
    return f"{key}/{window_start}"
