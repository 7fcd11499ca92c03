"""The autopilot (terraform/functions/autopilot, docs/autopilot.md).

First the pure planner, held to the promises of issue 25 point 4 by hypothesis over generated
fleets, windows in time zones with daylight-saving changes (and clocks near those changes),
deadlines and instances already in maintenance. Then the function as deployed: from its zip in
a clean venv under functions-framework (tests/test_functions.py's machinery), over the official
Firestore emulator, with the ledger function from its own zip writing the documents it reads,
against the fake Compute API of tests/support/compute_api.py; and end to end from real bridges'
events through the Pub/Sub emulator and the ledger to the performMaintenance call.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
AUTOPILOT = REPO / "terraform" / "functions" / "autopilot"


def _plan_module() -> Any:
    spec = importlib.util.spec_from_file_location("autopilot_plan", AUTOPILOT / "plan.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["autopilot_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


P = _plan_module()
UTC = timezone.utc
# Zones with every kind of daylight-saving rule: none, northern, southern, half-hour shifts
# (Lord Howe), odd offsets (Chatham, Kolkata), and one that abolished DST (Sao Paulo).
ZONES = [
    "UTC",
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/Santiago",
    "America/Sao_Paulo",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Asia/Kolkata",
]


def _offset_changes(zone: str) -> list[datetime]:
    """Every UTC-offset change of `zone` in 2026-2027, to the minute, found by scanning (not by
    the planner's own search)."""
    tz = ZoneInfo(zone)
    out = []
    t = datetime(2026, 1, 1, tzinfo=UTC)
    while t.year < 2028:
        nxt = t + timedelta(hours=1)
        if t.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            m = t
            while m.astimezone(tz).utcoffset() == t.astimezone(tz).utcoffset():
                m += timedelta(minutes=1)
            out.append(m)
        t = nxt
    return out


CHANGES = sorted(c for z in ZONES for c in _offset_changes(z))
assert len(CHANGES) > 20


@st.composite
def clocks(draw: Any) -> datetime:
    """A moment, half the time within three days of some zone's clock change."""
    if draw(st.booleans()):
        change = draw(st.sampled_from(CHANGES))
        return change + timedelta(seconds=draw(st.integers(-3 * 86400, 3 * 86400)))
    return draw(st.datetimes(datetime(2026, 1, 1), datetime(2027, 12, 31), timezones=st.just(UTC)))


hhmm = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
window_raw = st.fixed_dictionaries(
    {
        "days": st.lists(st.sampled_from(P.DAYS), min_size=1, max_size=7, unique=True),
        "start": hhmm,
        "end": hhmm | st.just("24:00"),
        "time_zone": st.sampled_from(ZONES),
    }
)


@st.composite
def policies(draw: Any) -> Any:
    raw = {
        "windows": draw(st.lists(window_raw, max_size=3)),
        "max_per_zone": draw(st.integers(1, 3)),
        "deadline_margin_hours": draw(st.sampled_from([0, 1, 6, 24, 72])),
    }
    return P.Policy.from_dict(raw)


@st.composite
def fleets(draw: Any, now: datetime) -> tuple[list[Any], list[Any]]:
    n = draw(st.integers(0, 12))
    candidates = []
    for i in range(n):
        deadline = draw(st.none() | st.integers(-6 * 60, 30 * 24 * 60))
        candidates.append(
            P.Candidate(
                key=f"vm-{i}",
                name=f"vm-{i}",
                zone=draw(st.sampled_from(["a", "b", "c"])),
                can_reschedule=draw(st.booleans()),
                status=draw(st.sampled_from(["PENDING", "PENDING", "ONGOING", "UNKNOWN", ""])),
                deadline=None if deadline is None else now + timedelta(minutes=deadline),
                group=draw(st.sampled_from(["", "", "g1", "g2", "g3"])),
                left_alone=draw(st.booleans()),
                blocked=draw(st.sampled_from(["", "", "", "refused for this window"])),
            )
        )
    busy = [
        P.Busy(
            key=draw(st.sampled_from([f"vm-{i}" for i in range(n)] + [f"other-{j}"])),
            zone=draw(st.sampled_from(["a", "b", "c"])),
            group=draw(st.sampled_from(["", "g1", "g2", "g3"])),
        )
        for j in range(draw(st.integers(0, 4)))
    ]
    return candidates, busy


def _eligible(c: Any, busy_keys: set[str]) -> bool:
    return (
        c.can_reschedule
        and c.status == "PENDING"
        and not c.left_alone
        and not c.blocked
        and c.key not in busy_keys
    )


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), policy=policies(), now=clocks())
def test_planner_keeps_every_promise(data: Any, policy: Any, now: datetime) -> None:
    candidates, busy = data.draw(fleets(now))
    result = P.plan(policy, candidates, busy, now)
    started = {c.key for c in result.start}
    waiting = {w.candidate.key for w in result.waits}
    assert started | waiting == {c.key for c in candidates} and not started & waiting
    occupants = [
        *busy,
        *(P.Busy(c.key, c.zone, c.group) for c in candidates if c.status == "ONGOING"),
    ]
    busy_keys = {b.key for b in occupants}
    taken_groups = {b.group for b in occupants if b.group}
    open_window = policy.in_window(now)

    def due(c: Any) -> bool:
        return c.deadline is not None and now >= c.deadline - policy.deadline_margin

    for c in result.start:
        # Never without can_reschedule, never one not PENDING, left alone, refused or under way.
        assert _eligible(c, busy_keys), c
        # Never outside the windows before the margin.
        assert open_window or due(c), c
        # Never two of one group, counting those already in maintenance.
        assert not c.group or c.group not in taken_groups, c
        if c.group:
            taken_groups.add(c.group)
    for zone in "abc":
        already = len({b.key for b in occupants if b.zone == zone})
        now_started = sum(1 for c in result.start if c.zone == zone)
        # Never over max_per_zone, counting instances already in maintenance for any reason.
        assert now_started <= max(0, policy.max_per_zone - already), zone
    groups_after = {b.group for b in occupants if b.group} | {c.group for c in result.start}
    full = {
        z
        for z in "abc"
        if len({b.key for b in occupants if b.zone == z}) + sum(c.zone == z for c in result.start)
        >= policy.max_per_zone
    }
    for w in result.waits:
        c = w.candidate
        if not _eligible(c, busy_keys):
            continue
        if due(c) or open_window:
            # It could act and did not: only for want of room in its zone or group.
            assert c.zone in full or (c.group and c.group in groups_after), (c, w.reason)
        if due(c):
            # The deadline goes first: no instance outside the margin took its zone's room.
            later = [s for s in result.start if s.zone == c.zone and not due(s)]
            assert not later or (c.group and c.group in groups_after), (c, later)
    for c in candidates:
        slot = result.next_slot[c.key]
        if policy.windows or c.deadline is not None:
            assert slot is not None and slot >= now
            if open_window or due(c):
                assert slot == now
        else:
            assert slot is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), now=clocks(), windows=st.lists(window_raw, max_size=1))
def test_ticks_over_days_never_crowd_a_zone_nor_miss_a_deadline(
    data: Any, now: datetime, windows: list[dict[str, Any]]
) -> None:
    """A timeline: a tick every 30 minutes for three days; what a tick starts is in maintenance
    for a random while, then done. No tick ever has a zone over max_per_zone or two of a group
    in maintenance; and where a zone has room for all its instances, each starts before its
    deadline, inside the windows or not."""
    per_zone = data.draw(st.integers(1, 3))
    policy = P.Policy.from_dict(
        {"windows": windows, "max_per_zone": per_zone, "deadline_margin_hours": 2}
    )
    fleet = {}
    for i in range(data.draw(st.integers(1, 8))):
        zone = data.draw(st.sampled_from("ab"))
        fleet[f"vm-{i}"] = P.Candidate(
            key=f"vm-{i}",
            name=f"vm-{i}",
            zone=zone,
            can_reschedule=True,
            status="PENDING",
            deadline=now + timedelta(minutes=data.draw(st.integers(150, 3 * 24 * 60))),
            group=data.draw(st.sampled_from(["", "g1", "g2"])),
        )
    lasts = {k: timedelta(minutes=data.draw(st.integers(10, 240))) for k in fleet}
    roomy = {z for z in "ab" if sum(c.zone == z for c in fleet.values()) <= per_zone}
    under_way: dict[str, datetime] = {}  # key -> when it ends
    started_at: dict[str, datetime] = {}
    t = now
    while t < now + timedelta(days=3):
        under_way = {k: end for k, end in under_way.items() if end > t}
        busy = [P.Busy(k, fleet[k].zone, fleet[k].group) for k in under_way]
        waiting = [c for k, c in fleet.items() if k not in started_at]
        for c in P.plan(policy, waiting, busy, t).start:
            started_at[c.key] = t
            under_way[c.key] = t + lasts[c.key]
        for zone in "ab":
            assert sum(fleet[k].zone == zone for k in under_way) <= per_zone, (t, zone)
        groups = [fleet[k].group for k in under_way if fleet[k].group]
        assert len(groups) == len(set(groups)), (t, groups)
        t += timedelta(minutes=30)
    for key, c in fleet.items():
        if c.zone in roomy and not c.group:
            assert key in started_at and started_at[key] <= c.deadline, (key, c.deadline)


@settings(max_examples=300, deadline=None)
@given(raw=window_raw, now=clocks())
def test_next_open_is_the_first_open_minute(raw: dict[str, Any], now: datetime) -> None:
    """next_open against a minute-by-minute scan of is_open: the window's bounds are whole
    minutes and every zone listed changes its offset on a whole minute, so a minute scan sees
    every opening."""
    window = P.Policy.from_dict({"windows": [raw]}).windows[0]
    opens = window.next_open(now)
    assert opens is not None and opens >= now and window.is_open(opens)
    t = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    assert opens == now or not window.is_open(now)
    while t < opens:
        assert not window.is_open(t), (t, opens)
        t += timedelta(minutes=1)


@settings(max_examples=500, deadline=None)
@given(raw=window_raw, now=clocks())
def test_a_window_opens_at_its_local_start_on_its_days(raw: dict[str, Any], now: datetime) -> None:
    """On each listed day whose start time exists on the local clock, the window is open at that
    wall time, and it is closed the minute before unless it was already open (overnight, or a
    whole-day window on the day before)."""
    window = P.Policy.from_dict({"windows": [raw]}).windows[0]
    tz = ZoneInfo(raw["time_zone"])
    day = now.astimezone(tz).date()
    for offset in range(8):
        d = day + timedelta(days=offset)
        wall = datetime.combine(d, window.start, tzinfo=tz)
        exists = wall.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall.replace(
            tzinfo=None
        )
        if not exists:
            continue
        assert window.is_open(wall.astimezone(UTC)) == (d.weekday() in window.days), wall


def _window_at(zone: str, days: list[str], start: str, end: str) -> Any:
    return P.Policy.from_dict(
        {"windows": [{"days": days, "start": start, "end": end, "time_zone": zone}]}
    ).windows[0]


def test_dst_examples() -> None:
    """The clock changes by name: a window in the skipped hour is not open that night; a window
    in the repeated hour opens twice; a window spanning the change keeps its wall-clock bounds."""
    berlin = _window_at("Europe/Berlin", ["sun"], "02:00", "03:00")
    # 2026-03-29 02:00 CET does not exist in Berlin: the next opening is a week later.
    assert berlin.next_open(datetime(2026, 3, 28, 12, tzinfo=UTC)) == datetime(
        2026, 4, 5, 0, tzinfo=UTC
    )
    new_york = _window_at("America/New_York", ["sun"], "01:30", "01:45")
    first = new_york.next_open(datetime(2026, 10, 31, 12, tzinfo=UTC))
    assert first == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT
    second = new_york.next_open(first + timedelta(minutes=15))
    assert second == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # 01:30 EST, the repeated hour
    # 02:30-03:30 on the night New York skips 02:00-03:00: open from 03:00 EDT (07:00 UTC).
    skipped = _window_at("America/New_York", ["sun"], "02:30", "03:30")
    assert skipped.next_open(datetime(2026, 3, 7, tzinfo=UTC)) == datetime(
        2026, 3, 8, 7, tzinfo=UTC
    )
    overnight = _window_at("Australia/Sydney", ["sat"], "22:00", "06:00")
    # Sydney leaves DST on 2026-04-05 03:00 AEDT: the window still ends at 06:00 local (AEST).
    assert overnight.is_open(datetime(2026, 4, 4, 19, 59, tzinfo=UTC))  # 05:59 AEST Sunday
    assert not overnight.is_open(datetime(2026, 4, 4, 20, 0, tzinfo=UTC))  # 06:00 AEST


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not JSON"),
        ('["a"]', "JSON object"),
        ('{"max_per_zone": 0}', "max_per_zone"),
        ('{"max_per_zone": true}', "max_per_zone"),
        ('{"deadline_margin_hours": -1}', "deadline_margin_hours"),
        ('{"windows": [{"days": ["mon"], "start": "25:00", "end": "03:00"}]}', "start"),
        ('{"windows": [{"days": ["monday"], "start": "01:00", "end": "03:00"}]}', "days"),
        ('{"windows": [{"days": [], "start": "01:00", "end": "03:00"}]}', "days"),
        (
            '{"windows": [{"days": ["mon"], "start": "01:00", "end": "03:00", "time_zone": "X"}]}',
            "zone",
        ),
        ('{"group_by": "rack"}', "group_by"),
        ('{"leave_alone_label": "nokey"}', "KEY=VALUE"),
        ('{"pre_hook_url": "ftp://x"}', "pre_hook_url"),
        ('{"max_per_zon": 1}', "unknown field"),
    ],
)
def test_malformed_policy_is_one_line(raw: str, message: str) -> None:
    with pytest.raises(P.PolicyError) as err:
        P.Policy.from_json(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_groups_and_leave_alone() -> None:
    policy = P.Policy.from_dict(
        {"group_by": "name_prefix", "leave_alone": ["db-*"], "leave_alone_label": "autopilot=off"}
    )
    assert policy.group_of("web-x7k2", {}, "") == policy.group_of("web-ab12", {}, "")
    assert policy.group_of("web-x7k2", {}, "") != policy.group_of("api-ab12", {}, "")
    assert policy.left_alone("db-main", {}) and policy.left_alone("web-1", {"autopilot": "off"})
    assert not policy.left_alone("web-1", {"autopilot": "on"})
    mig = P.Policy.from_dict({"group_by": "mig"})
    created = "projects/123/zones/us-central1-a/instanceGroupManagers/trainers"
    assert mig.group_of("anything", {}, created) == f"mig:{created}"
    assert mig.group_of("anything", {}, "") == ""  # not in a MIG: no group
    label = P.Policy.from_dict({"group_by": "label:service"})
    assert label.group_of("x", {"service": "web"}, "") == "label:service=web"
    assert label.group_of("x", {}, "") == ""


# --- the function as deployed ----------------------------------------------------------------

from support.compute_api import LOST, REFUSALS, ComputeApi, FakeInstance, window  # noqa: E402
from test_functions import (  # noqa: E402  (the functions' zip-and-venv machinery, not a copy)
    PROJECT,
    Function,
    firestore_host,  # noqa: F401  (a fixture: the official Firestore emulator)
    skip_without_firestore,
    stop,
    wait_for_port,
)

from bridge.events import Instance, Scheduling, Transition, build_event  # noqa: E402
from bridge.keys import MAINTENANCE, UPCOMING  # noqa: E402

ALL_DAYS = list(P.DAYS)
OPEN_POLICY = {
    "windows": [{"days": ALL_DAYS, "start": "00:00", "end": "00:00", "time_zone": "UTC"}],
    "max_per_zone": 1,
    "deadline_margin_hours": 6,
}


def _closed_policy() -> dict[str, Any]:
    """A window on the day after tomorrow's next day, 00:00-01:00 UTC: closed now."""
    day = P.DAYS[(datetime.now(UTC).weekday() + 3) % 7]
    window_ = {"days": [day], "start": "00:00", "end": "01:00", "time_zone": "UTC"}
    return {"windows": [window_], "max_per_zone": 5, "deadline_margin_hours": 6}


class Lab:
    """One ledger and one autopilot, each from its zip, on a collection of their own."""

    def __init__(self, host: str, compute: ComputeApi, policy: dict[str, Any], tmp: Path) -> None:
        from google.cloud import firestore

        self.compute = compute
        name = f"autopilot-{uuid.uuid4().hex[:8]}"
        common = {"FIRESTORE_EMULATOR_HOST": host, "GOOGLE_CLOUD_PROJECT": PROJECT}
        self.ledger = Function("ledger", {**common, "LEDGER_COLLECTION": name}, tmp)
        env = {
            **common,
            "LEDGER_COLLECTION": name,
            "COMPUTE_API_BASE": compute.base,
            "COMPUTE_ANONYMOUS": "1",
            "AUTOPILOT_POLICY": json.dumps(policy),
        }
        self.autopilot = Function("autopilot", env, tmp, "tick", "http")
        self.collection = firestore.Client(project=PROJECT).collection(name)
        self.sequence = 0
        self.numbers = iter(range(1, 10_000))

    def wait_ready(self) -> None:
        import time

        deadline = time.monotonic() + 60
        for fn in (self.ledger, self.autopilot):
            wait_for_port(fn.port, fn.proc, fn.log, deadline)

    def stop(self) -> None:
        for fn in (self.ledger, self.autopilot):
            stop(fn.proc)

    def vm(
        self,
        name: str,
        zone: str,
        *,
        latest_in: timedelta = timedelta(days=10),
        can_reschedule: bool = True,
        in_compute: bool = True,
        **fields: Any,
    ) -> tuple[Instance, FakeInstance | None]:
        """An instance with a window scheduled: in the fake Compute API and, through the
        ledger function, in the ledger (as a bridge's upcoming.scheduled puts it there)."""
        now = datetime.now(UTC)
        start, end = now + timedelta(days=2), now + timedelta(days=2, hours=4)
        number = next(self.numbers)
        inst = Instance(
            id=str(6_000_000_000 + number),
            name=name,
            zone=zone,
            project_id=PROJECT,
            project_number="123456789012",
            hostname=f"{name}.{zone}.c.{PROJECT}.internal",
        )
        up = window(start, end, now + latest_in, can_reschedule=can_reschedule)
        fake = self.compute.add(PROJECT, zone, name, upcoming=up, **fields) if in_compute else None
        value = {
            "type": "SCHEDULED",
            "can_reschedule": "true" if can_reschedule else "false",
            "window_start_time": up["windowStartTime"],
            "window_end_time": up["windowEndTime"],
            "latest_window_start_time": up["latestWindowStartTime"],
            "maintenance_status": "PENDING",
        }
        self.send(inst, UPCOMING, "", json.dumps(value, sort_keys=True), "upcoming.scheduled")
        return inst, fake

    def send(self, inst: Instance, key: str, previous: str, current: str, kind: str) -> None:
        self.sequence += 1
        event = build_event(
            Transition(key=key, previous=previous, current=current, kind=kind),
            event_id=str(uuid.uuid4()),
            sequence=self.sequence,
            observed_at=datetime.now(UTC),
            instance=inst,
            scheduling=Scheduling(),
            happened_while_down=False,
            notice_seconds=None,
        )
        assert self.ledger.send(event).status_code == 200

    def over(self, inst: Instance, fake: FakeInstance) -> None:
        """The maintenance is over: the cloud says so, and the bridge reports the GPU VM's
        stop-and-start ending and its window cleared."""
        self.compute.finish(fake)
        term = "TERMINATE_ON_HOST_MAINTENANCE"
        self.send(inst, MAINTENANCE, "NONE", term, "maintenance.started")
        self.send(inst, MAINTENANCE, term, "NONE", "maintenance.ended")
        self.send(inst, UPCOMING, "{}", "", "upcoming.cleared")

    def tick(self, **params: str) -> dict[str, Any]:
        import requests

        resp = requests.post(f"http://127.0.0.1:{self.autopilot.port}/", params=params, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def doc(self, inst: Instance) -> dict[str, Any]:
        snap = self.collection.document(f"{PROJECT}_{inst.id}").get()
        return snap.to_dict() if snap.exists else {}

    def logs(self, needle: str, name: str) -> list[dict[str, Any]]:
        return [
            e for e in self.autopilot.logs() if needle in e["message"] and e.get("instance") == name
        ]


def names(entries: list[dict[str, Any]], zone: str) -> list[str]:
    return sorted(e["instance"] for e in entries if e["zone"] == zone)


def calls_in(compute: ComputeApi, zone: str) -> list[dict[str, Any]]:
    return [c for c in compute.performed() if f"/zones/{zone}/" in c["path"]]


@pytest.fixture(scope="module")
def compute() -> Any:
    server = ComputeApi()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def labs(firestore_host, compute, tmp_path_factory) -> Any:  # noqa: F811
    """Start a Lab per policy, once per module (start-up is the slow part)."""
    if firestore_host is None:
        skip_without_firestore()
    import os

    saved = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = firestore_host
    started: dict[str, Lab] = {}

    def lab(label: str, policy: dict[str, Any]) -> Lab:
        if label not in started:
            started[label] = Lab(firestore_host, compute, policy, tmp_path_factory.mktemp(label))
            started[label].wait_ready()
        return started[label]

    try:
        yield lab
    finally:
        for running in started.values():
            running.stop()
        if saved is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = saved


@pytest.fixture
def open_lab(labs) -> Lab:
    return labs("open", OPEN_POLICY)


def test_one_at_a_time_in_a_zone_until_the_ledger_sees_it_over(open_lab: Lab) -> None:
    """Done when (issue 25): three VMs in one zone, two reschedulable, max_per_zone 1, window
    open: one tick starts exactly one; a second starts nothing while it is under way; after its
    bridge reports the maintenance over and the window cleared, the next starts the other; the
    third is never started."""
    lab, zone = open_lab, "us-central1-a"
    a = lab.vm("train-a", zone)
    b = lab.vm("train-b", zone)
    c = lab.vm("train-c", zone, can_reschedule=False)
    first = lab.tick()
    assert len(names(first["started"], zone)) == 1
    one = names(first["started"], zone)[0]
    (done_vm, done_fake), (next_vm, next_fake) = (a, b) if one == "train-a" else (b, a)
    assert len(lab.compute.started(done_fake)) == 1 and not lab.compute.started(next_fake)
    started_entry = next(e for e in first["started"] if e["instance"] == one)
    assert started_entry["why"] == "window open" and started_entry["operation"]
    record = lab.doc(done_vm)["autopilot"]
    assert record["state"] == "started" and record["request_id"] == started_entry["request_id"]
    waits = {e["instance"]: e["reason"] for e in first["waiting"] if e["zone"] == zone}
    assert "max_per_zone 1" in waits[next_vm.name]
    assert "cannot be rescheduled" in waits["train-c"]

    second = lab.tick()
    assert names(second["started"], zone) == []
    assert names(second["under_way"], zone) == [one]
    assert len(lab.compute.performed(done_fake)) == 1  # not even asked again
    assert not lab.compute.performed(next_fake)

    lab.over(done_vm, done_fake)
    third = lab.tick()
    assert names(third["done"], zone) == [one]
    assert names(third["started"], zone) == [next_vm.name]
    assert len(lab.compute.started(next_fake)) == 1
    assert lab.doc(done_vm)["autopilot"]["state"] == "done"

    fourth = lab.tick()
    assert names(fourth["started"], zone) == []
    lab.over(next_vm, next_fake)
    assert names(lab.tick()["started"], zone) == []
    assert not lab.compute.performed(c[1])  # the third: never


def test_outside_the_windows_only_the_deadline_margin_acts(labs) -> None:
    """Done when: with the window closed, only an instance whose latest start is inside the
    margin is started; the other waits with its next slot, which the board reads."""
    lab, zone = labs("closed", _closed_policy()), "europe-west4-a"
    urgent, _ = lab.vm("urgent-vm", zone, latest_in=timedelta(hours=2))
    calm, _ = lab.vm("calm-vm", zone, latest_in=timedelta(days=5))
    dry = lab.tick(dry_run="true")
    assert dry["dry_run"] is True and names(dry["started"], zone) == ["urgent-vm"]
    assert not calls_in(lab.compute, zone) and "autopilot" not in lab.doc(urgent)
    summary = lab.tick()
    assert names(summary["started"], zone) == ["urgent-vm"]
    assert summary["started"][0]["why"] == "deadline margin"
    (wait,) = [e for e in summary["waiting"] if e["instance"] == "calm-vm"]
    assert "outside the windows" in wait["reason"]
    slot = datetime.fromisoformat(wait["next_slot"].replace("Z", "+00:00"))
    assert datetime.now(UTC) < slot <= datetime.now(UTC) + timedelta(days=7)
    assert slot.weekday() == P.DAYS.index(_closed_policy()["windows"][0]["days"][0])
    shown = lab.doc(calm)["autopilot"]
    assert shown["next_slot"] == wait["next_slot"] and shown["deadline"] == wait["deadline"]
    # A dry run at the window's opening would start the calm one too.
    at = lab.tick(dry_run="true", at=wait["next_slot"])
    assert "calm-vm" in names(at["started"], zone)


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_refused_call_is_logged_once_and_never_retried(open_lab: Lab, refusal: str) -> None:
    """Google does not document the refusal of performMaintenance for an instance whose window
    moved on (FACTS.md 9, UNSURE): every plausible one is final for that window."""
    lab, zone = open_lab, f"refusal-{refusal.lower()}"
    lab.compute.refusal = REFUSALS[refusal]
    inst, fake = lab.vm(f"refused-{refusal.lower()}", zone)
    assert fake is not None
    # Between the autopilot's instances.get and its call, the window stops being reschedulable.
    lab.compute.after_get[fake.path] = {**(fake.upcoming or {}), "canReschedule": False}
    first = lab.tick()
    (failed,) = [e for e in first["failed"] if e["zone"] == zone]
    assert failed["status"] == REFUSALS[refusal][0] and failed["retry"] is False
    assert lab.doc(inst)["autopilot"]["state"] == "refused"
    lab.compute.set_upcoming(fake, {**(fake.upcoming or {}), "canReschedule": True})
    for _ in range(2):
        later = lab.tick()
        assert names(later["started"], zone) == []
        assert (
            "never started twice"
            in {e["instance"]: e["reason"] for e in later["waiting"]}[inst.name]
        )
    assert len(lab.compute.performed(fake)) == 1 and not lab.compute.started(fake)
    assert len(lab.logs("performMaintenance answered", inst.name)) == 1


@pytest.mark.parametrize("status", [403, 429, 503, LOST])
def test_a_transient_failure_is_retried_under_the_same_request_id(
    open_lab: Lab, status: int
) -> None:
    """403 (IAM still propagating), 429, 5xx, or the answer lost on the way back: logged once,
    tried again on a later tick with the same requestId, and one window starts once."""
    lab, zone = open_lab, f"transient-{status}"
    inst, fake = lab.vm(f"flaky-{status}", zone)
    lab.compute.faults += [("performMaintenance", status), ("performMaintenance", status)]
    first = lab.tick()
    assert [e["retry"] for e in first["failed"] if e["zone"] == zone] == [True]
    if status == LOST:  # it did start: the next tick sees it ONGOING, calls nothing more
        assert len(lab.compute.started(fake)) == 1
        assert names(lab.tick()["under_way"], zone) == [inst.name]
        assert len(lab.compute.performed(fake)) == 1
        lab.compute.faults.clear()
    else:
        assert not lab.compute.started(fake)
        assert [e["retry"] for e in lab.tick()["failed"] if e["zone"] == zone] == [True]
        assert names(lab.tick()["started"], zone) == [inst.name]
    assert len(lab.compute.started(fake)) == 1
    ids = {c["query"]["requestId"] for c in lab.compute.performed(fake)}
    assert len(ids) == 1 and ids == {lab.doc(inst)["autopilot"]["request_id"]}
    assert len(lab.logs("performMaintenance answered", inst.name)) == 1
    assert names(lab.tick()["started"], zone) == []


def test_concurrent_ticks_start_a_window_once(open_lab: Lab) -> None:
    """Cloud Scheduler retrying a tick that is still running: two ticks at once."""
    from concurrent.futures import ThreadPoolExecutor

    lab, zone = open_lab, "concurrent-a"
    _, fake = lab.vm("twice-vm", zone)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: lab.tick(), range(2)))
    assert sum(len(names(r["started"], zone)) for r in results) == 1
    assert len(lab.compute.started(fake)) == 1


def test_a_claim_left_by_a_dead_tick_is_taken_again_only_once_it_is_old(open_lab: Lab) -> None:
    """A tick that claimed a window and died before its call (or before recording the answer):
    while the claim is fresh another tick may still be calling, so it is left alone; once older
    than any tick lives, the same requestId goes out again (Compute would answer a repeat with
    the operation it already started)."""
    lab, zone = open_lab, "dead-tick-a"
    inst, fake = lab.vm("orphan-vm", zone)
    assert fake is not None and fake.upcoming is not None
    request_id = str(uuid.uuid4())
    key = f"{PROJECT}_{inst.id}"
    claim = {
        "autopilot.state": "starting",
        "autopilot.window": f"{key}/{fake.upcoming['windowStartTime']}",
        "autopilot.window_start": fake.upcoming["windowStartTime"],
        "autopilot.request_id": request_id,
        "autopilot.claimed_at": P.rfc3339(datetime.now(UTC) - timedelta(minutes=1)),
    }
    lab.collection.document(key).update(claim)
    assert names(lab.tick()["under_way"], zone) == ["orphan-vm"]
    assert not lab.compute.performed(fake)
    old = P.rfc3339(datetime.now(UTC) - timedelta(minutes=7))
    lab.collection.document(key).update({"autopilot.claimed_at": old})
    assert names(lab.tick()["started"], zone) == ["orphan-vm"]
    assert [c["query"]["requestId"] for c in lab.compute.performed(fake)] == [request_id]
    assert lab.doc(inst)["autopilot"]["state"] == "started"


def test_stale_ledger_entries_are_never_acted_on(open_lab: Lab) -> None:
    """The ledger says scheduled; the instance says nothing is (or no longer exists)."""
    lab, zone = open_lab, "stale-a"
    _, fake = lab.vm("stale-vm", zone)
    assert fake is not None
    lab.compute.set_upcoming(fake, None)
    lab.vm("deleted-vm", zone, in_compute=False)
    summary = lab.tick()
    reasons = {e["instance"]: e["reason"] for e in summary["waiting"] if e["zone"] == zone}
    assert "no maintenance scheduled" in reasons["stale-vm"]
    assert "no longer exists" in reasons["deleted-vm"]
    lab.tick()
    assert not calls_in(lab.compute, zone)
    assert len(lab.logs("instances.get answered 404", "deleted-vm")) == 1  # once, not per tick


def test_groups_leave_alone_and_the_pre_hook(labs, tmp_path: Path) -> None:
    """Two replicas of one service are never down together; a VM left alone is never touched;
    the pre-hook is called first and a refusal from it holds the start back (logged once)."""
    from test_functions import Recorder, WebhookHandler

    hook = Recorder(WebhookHandler)
    try:
        policy = {
            **OPEN_POLICY,
            "max_per_zone": 5,
            "group_by": "name_prefix",
            "leave_alone": ["db-*"],
            "pre_hook_url": f"http://127.0.0.1:{hook.port}/drain",
        }
        lab, zone = labs("groups", policy), "asia-east1-a"
        lab.vm("web-ab12", zone)
        lab.vm("web-cd34", zone)
        _, api = lab.vm("api-ef56", zone)
        _, db = lab.vm("db-main", zone)
        hook.fail_next += [503, 503]  # the first two hook calls of the first tick are refused
        first = lab.tick()
        assert names(first["started"], zone) == []  # both chosen, both held back by the hook
        summary = lab.tick()
        started = names(first["started"], zone) + names(summary["started"], zone)
        assert sorted(n.split("-")[0] for n in started) == ["api", "web"]  # one web, never two
        assert not lab.compute.performed(db)
        reasons = {e["instance"]: e["reason"] for e in summary["waiting"]}
        assert reasons["db-main"] == "left alone by the policy"
        other_web = ({"web-ab12", "web-cd34"} - set(started)).pop()
        assert "group prefix:web" in reasons[other_web]
        drained = {r["body"]["instance"]["name"] for r in hook.take()}
        assert drained == set(started)
        refused = [e for e in first["failed"] if e["zone"] == zone]
        assert len(refused) == 2 and {e["call"] for e in refused} == {"pre-hook"}
        for name in (e["instance"] for e in refused):
            assert len(lab.logs("pre-hook answered", name)) == 1
        assert len(lab.compute.started(api)) == 1
    finally:
        hook.shutdown()


def test_end_to_end_from_real_bridges_to_the_next_instances_turn(labs, pubsub, tmp_path) -> None:
    """Two bridges on metadata simulators publish their upcoming.scheduled through the official
    Pub/Sub emulator to the ledger (push, from its zip); a tick starts one; its bridge's
    maintenance.ended and upcoming.cleared, through the same path, give the other its turn."""
    from support.bridge import BridgeProcess
    from support.harness import wait_for
    from support.pubsub import admin

    from bridge.simulator import Simulator

    lab, zone, project = labs("e2e", OPEN_POLICY), "us-central1-a", "demo-project"
    now = datetime.now(UTC)
    up = window(now + timedelta(days=2), now + timedelta(days=2, hours=4), now + timedelta(days=9))
    value = json.dumps(
        {
            "type": "SCHEDULED",
            "can_reschedule": "true",
            "window_start_time": up["windowStartTime"],
            "window_end_time": up["windowEndTime"],
            "latest_window_start_time": up["latestWindowStartTime"],
            "maintenance_status": "PENDING",
        }
    )
    vms = {"e2e-gpu-a": "5550001112220000001", "e2e-gpu-b": "5550001112220000002"}
    sims, bridges, fakes = {}, {}, {}
    topic_name = f"autopilot-{uuid.uuid4().hex[:8]}"
    with admin(pubsub) as ps:
        topic = ps.create_topic(topic_name)
        endpoint = f"http://127.0.0.1:{lab.ledger.port}/{topic}"
        ps.create_subscription(topic, f"{topic_name}-ledger", push_endpoint=endpoint)
        try:
            for name, instance_id in vms.items():
                fakes[name] = lab.compute.add(project, zone, name, upcoming=dict(up))
                sims[name] = Simulator(
                    identity={
                        "instance/id": instance_id,
                        "instance/name": name,
                        "instance/hostname": f"{name}.{zone}.c.{project}.internal",
                    }
                ).start()
                bridges[name] = BridgeProcess(
                    sims[name].url, tmp_path / name, "--topic", topic, env=pubsub.env()
                )
            for name, sim in sims.items():
                wait_for(f"{name} watching", lambda sim=sim: sim.stats().get(UPCOMING, 0) >= 2, 15)
                sim.set_value(UPCOMING, value)

            def ledger_doc(name: str) -> dict[str, Any]:
                snap = lab.collection.document(f"{project}_{vms[name]}").get()
                return (snap.to_dict() or {}) if snap.exists else {}

            for name in vms:
                wait_for(
                    f"{name} in the ledger",
                    lambda n=name: ledger_doc(n).get("upcoming_window_start"),
                    20,
                )
            first = lab.tick()
            (one,) = names(first["started"], zone)
            other = ({*vms} - {one}).pop()
            assert len(lab.compute.started(fakes[one])) == 1 and not lab.compute.performed(
                fakes[other]
            )
            assert names(lab.tick()["started"], zone) == []
            # Google runs the maintenance: the VM is stopped and started again; its bridge sees
            # the notice come and go and the window cleared.
            lab.compute.finish(fakes[one])
            sims[one].set_value(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE")
            wait_for("notice in the ledger", lambda: ledger_doc(one).get("disrupting"), 20, 0.2)
            sims[one].set_value(MAINTENANCE, "NONE")
            sims[one].delete_value(UPCOMING)

            def over() -> bool:
                state = ledger_doc(one).get("state") or {}
                return (state.get("upcoming") or {}).get("kind") == "upcoming.cleared" and (
                    state.get("maintenance") or {}
                ).get("kind") == "maintenance.ended"

            wait_for("maintenance over in the ledger", over, 20, 0.2)
            turn = lab.tick()
            assert names(turn["done"], zone) == [one]
            assert names(turn["started"], zone) == [other]
            assert len(lab.compute.started(fakes[other])) == 1
            assert len(lab.compute.performed(fakes[one])) == 1
        finally:
            for bridge in bridges.values():
                assert bridge.terminate() == 0
            for sim in sims.values():
                sim.stop()


def _main_module() -> Any:
    """The function's main.py imported in-process, for its pure helpers."""
    shared = str(AUTOPILOT.parent / "_shared")
    sys.path[:0] = [str(AUTOPILOT), shared]
    try:
        spec = importlib.util.spec_from_file_location("autopilot_main", AUTOPILOT / "main.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["autopilot_main"] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(AUTOPILOT))
        sys.path.remove(shared)
    return module


def test_when_a_started_maintenance_counts_as_over() -> None:
    """The ledger decides (window cleared or replaced, maintenance ended after the start), or the
    instance itself shows none; an `ended` from before the start does not count."""
    main = _main_module()
    record = {"state": "started", "window_start": "2030-01-15T02:00:00Z"}
    record["started_at"] = "2026-12-07T10:00:00Z"
    scheduled = {
        "kind": "upcoming.scheduled",
        "upcoming": {"window_start_time": "2030-01-15T02:00:00Z"},
    }
    still = main.Observed({"maintenanceStatus": "ONGOING"}, {}, "")

    def doc(upcoming: dict[str, Any], maintenance: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"state": {"upcoming": upcoming, "maintenance": maintenance or {}}}

    assert main.finished(record, doc(scheduled), still) == ""
    assert main.finished(record, doc({"kind": "upcoming.cleared"}), still) == "upcoming.cleared"
    moved = {"kind": "upcoming.updated", "upcoming": {"window_start_time": "2030-02-01T02:00:00Z"}}
    assert main.finished(record, doc(moved), still) == "upcoming.updated"
    before = {"kind": "maintenance.ended", "observed_at": "2026-12-07T09:59:59Z"}
    after = {"kind": "maintenance.ended", "observed_at": "2026-12-07T10:30:00Z"}
    assert main.finished(record, doc(scheduled, before), still) == ""
    assert main.finished(record, doc(scheduled, after), still) == "maintenance.ended"
    assert main.finished(record, doc(scheduled), main.Observed(None, {}, "")) == (
        "instance shows no maintenance"
    )
    assert main.finished(record, doc(scheduled), None) == ""  # instances.get failed: unknown


def test_the_board_shows_the_plan() -> None:
    """Issue 25 point 5: per instance the next slot the autopilot would use and the deadline, or
    "started by the autopilot"; what the autopilot wrote is shown as text, never markup."""
    from test_functions import _load_module

    board = _load_module("board")
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    upcoming = {
        "kind": "upcoming.scheduled",
        "observed_at": "2026-12-07T11:00:00Z",
        "upcoming": {
            "window_start_time": "2026-12-09T02:00:00Z",
            "window_end_time": "2026-12-09T06:00:00Z",
            "maintenance_status": "PENDING",
        },
    }
    waiting = {
        "instance": {"name": "gpu-1", "zone": "us-central1-a", "project_id": PROJECT},
        "state": {"upcoming": upcoming},
        "autopilot": {
            "reason": "outside the windows and the deadline margin",
            "next_slot": "2026-12-12T01:00:00Z",
            "deadline": "2026-12-16T02:00:00Z<b>",
        },
    }
    summary = board.summarize("d1", waiting, now)
    assert summary["autopilot"]["next_slot"] == "2026-12-12T01:00:00Z"
    html = board.row(summary, now)
    assert (
        "autopilot: next slot 2026-12-12T01:00:00Z, deadline 2026-12-16T02:00:00Z&lt;b&gt;" in html
    )
    started = {**waiting, "autopilot": {"state": "started", "started_at": "2026-12-07T11:55:00Z"}}
    html = board.row(board.summarize("d2", started, now), now)
    assert "started by the autopilot 2026-12-07T11:55:00Z" in html
    assert board.summarize("d3", {**waiting, "autopilot": None}, now)["autopilot"] is None


def test_a_malformed_policy_stops_the_function_with_one_line(compute, tmp_path) -> None:
    """The function does not serve with a policy it cannot read: one ERROR line, exit 2."""
    import subprocess

    env = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "COMPUTE_API_BASE": compute.base,
        "COMPUTE_ANONYMOUS": "1",
        "AUTOPILOT_POLICY": json.dumps({"max_per_zone": 0}),
    }
    fn = Function("autopilot", env, tmp_path, "tick", "http")
    try:
        assert fn.proc.wait(60) == 2
    except subprocess.TimeoutExpired:
        pytest.fail("the function kept running with a malformed policy")
    finally:
        stop(fn.proc)
    errors = [e for e in fn.logs() if e["severity"] == "ERROR"]
    assert [e["message"] for e in errors] == [
        "autopilot configuration: AUTOPILOT_POLICY.max_per_zone must be an integer >= 1"
    ]


def test_the_function_runs_from_its_archive_alone(open_lab: Lab) -> None:
    """The planner it imports is the zip's plan.py (archive.json's `only` entry), not the
    repository's, and the repository is not importable from the function's environment."""
    probe = (
        "import json, os, sys, plan, subscriber, bridge.events\n"
        "repo = [p for p in sys.path if os.path.isfile(os.path.join(p, 'bridge', 'cli.py'))]\n"
        "print(json.dumps([plan.__file__, subscriber.__file__, bridge.events.__file__, repo]))"
    )
    result = open_lab.autopilot.python(probe)
    assert result.returncode == 0, result.stderr
    planner, subscriber, events, repo = json.loads(result.stdout)
    source = open_lab.autopilot.source
    assert Path(planner) == source / "plan.py" and Path(subscriber) == source / "subscriber.py"
    assert Path(events) == source / "bridge" / "events.py" and not repo
