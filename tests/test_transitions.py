"""The pure core: transitions and event building, no network, no clock, no mocks."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from bridge import keys
from bridge.events import (
    Instance,
    Scheduling,
    build_event,
    decode_pubsub,
    decode_structured,
)
from bridge.keys import KEYS, KINDS, MAINTENANCE, PREEMPTED, UPCOMING, Key
from bridge.transitions import canonical, classify, is_notice, notice_seconds

INSTANCE = Instance(
    id="42",
    name="vm-1",
    zone="europe-west4-b",
    project_id="proj-a",
    project_number="123",
    hostname="vm-1.internal",
)
SCHED = Scheduling("MIGRATE", "TRUE", "FALSE", "STANDARD")
WHEN = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("key", "previous", "current", "kind"),
    [
        (MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started"),
        (MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "NONE", "maintenance.ended"),
        (
            MAINTENANCE,
            "TERMINATE_ON_HOST_MAINTENANCE",
            "MIGRATE_ON_HOST_MAINTENANCE",
            "maintenance.changed",
        ),
        (MAINTENANCE, "NONE", "SOMETHING_NEW", "maintenance.started"),
        (PREEMPTED, "FALSE", "TRUE", "preemption.started"),
        (PREEMPTED, "TRUE", "FALSE", "preemption.ended"),
        (UPCOMING, "", '{"type":"SCHEDULED"}', "upcoming.scheduled"),
        (UPCOMING, '{"type":"SCHEDULED"}', '{"type":"UNSCHEDULED"}', "upcoming.updated"),
        (UPCOMING, '{"type":"SCHEDULED"}', "", "upcoming.cleared"),
    ],
)
def test_classify(key: str, previous: str, current: str, kind: str) -> None:
    transition = classify(key, previous, current)
    assert transition is not None
    assert transition.kind == kind
    assert (transition.previous, transition.current) == (previous, current)


def test_no_change_is_no_transition() -> None:
    assert classify(MAINTENANCE, "NONE", "NONE") is None
    assert classify(UPCOMING, "", "") is None


def test_unknown_values_are_passed_on_not_dropped() -> None:
    transition = classify(MAINTENANCE, "NONE", "FUTURE_VALUE")
    assert transition is not None and transition.current == "FUTURE_VALUE"
    assert canonical(MAINTENANCE, {"odd": 1}) == '{"odd":1}'


def test_upcoming_canonical_form() -> None:
    # {} means nothing scheduled; camelCase from some emulators becomes the documented snake_case.
    assert canonical(UPCOMING, {}) == ""
    assert canonical(UPCOMING, None) == ""
    a = canonical(UPCOMING, {"windowStartTime": "2030-01-01T00:00:00Z", "type": "SCHEDULED"})
    b = canonical(UPCOMING, {"type": "SCHEDULED", "window_start_time": "2030-01-01T00:00:00Z"})
    assert a == b == '{"type":"SCHEDULED","window_start_time":"2030-01-01T00:00:00Z"}'


def test_notice_windows() -> None:
    assert notice_seconds(classify(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE")) == 60
    assert notice_seconds(classify(MAINTENANCE, "NONE", "TERMINATE_ON_HOST_MAINTENANCE")) == 3600
    assert notice_seconds(classify(PREEMPTED, "FALSE", "TRUE")) == 30
    assert notice_seconds(classify(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "NONE")) is None
    assert notice_seconds(classify(MAINTENANCE, "NONE", "SOMETHING_NEW")) is None
    # Preemption's 30 s hold for whatever value it starts with, and only when it starts.
    assert notice_seconds(classify(PREEMPTED, "FALSE", "UNKNOWN")) == 30
    assert notice_seconds(classify(PREEMPTED, "TRUE", "UNKNOWN")) is None
    assert notice_seconds(classify(UPCOMING, "", '{"type":"SCHEDULED"}')) is None


def _event(kind_values: tuple[str, str, str], **kw: object):
    transition = classify(*kind_values)
    assert transition is not None
    args = dict(
        event_id="id-1",
        sequence=7,
        observed_at=WHEN,
        instance=INSTANCE,
        scheduling=SCHED,
        happened_while_down=False,
        notice_seconds=notice_seconds(transition),
    )
    args.update(kw)
    return build_event(transition, **args)


def test_build_event_is_pure_and_complete() -> None:
    key = (MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE")
    event = _event(key)
    assert event == _event(key)  # same inputs, same event
    s = event.to_structured()
    assert s["specversion"] == "1.0"
    assert s["id"] == "id-1"
    assert s["type"] == "io.github.maintenancebridge.gce.v1.maintenance.started"
    assert s["source"] == (
        "//compute.googleapis.com/projects/proj-a/zones/europe-west4-b/instances/vm-1"
    )
    assert s["subject"] == MAINTENANCE
    assert s["time"] == "2026-11-25T12:00:00.123Z"
    assert s["datacontenttype"] == "application/json"
    assert s["dataschema"].endswith("/schemas/v1/event-data.json")
    assert (s["instanceid"], s["zone"], s["project"]) == ("42", "europe-west4-b", "proj-a")
    data = s["data"]
    assert data["previous"] == "NONE" and data["current"] == "MIGRATE_ON_HOST_MAINTENANCE"
    assert data["notice_seconds"] == 60 and data["sequence"] == 7
    assert data["happened_while_down"] is False
    assert data["instance"]["hostname"] == "vm-1.internal"
    assert data["scheduling"]["on_host_maintenance"] == "MIGRATE"


def test_at_startup_is_written_and_read_back() -> None:
    """Always written (false by default) so that a subscriber sees it; round-trips both modes."""
    key = (MAINTENANCE, "NONE", "TERMINATE_ON_HOST_MAINTENANCE")
    assert _event(key).to_structured()["data"]["at_startup"] is False
    event = _event(key, at_startup=True)
    assert event.to_structured()["data"]["at_startup"] is True
    assert decode_pubsub(*event.to_pubsub("binary")) == event
    assert decode_structured(event.to_structured()).data.at_startup is True


def test_type_prefix_is_configurable() -> None:
    event = _event((PREEMPTED, "FALSE", "TRUE"), type_prefix="com.example.fleet.v2")
    assert event.type == "com.example.fleet.v2.preemption.started"
    assert event.kind == "preemption.started"


def test_upcoming_event_carries_the_window() -> None:
    value = canonical(
        UPCOMING,
        {
            "type": "SCHEDULED",
            "can_reschedule": "true",
            "window_start_time": "2030-01-15T02:00:00Z",
            "maintenance_reasons": ["HOST_UPGRADE"],
        },
    )
    scheduled = _event((UPCOMING, "", value))
    assert scheduled.data.upcoming is not None
    assert scheduled.data.upcoming.can_reschedule is True
    assert scheduled.data.upcoming.maintenance_reasons == ("HOST_UPGRADE",)
    cleared = _event((UPCOMING, value, ""))
    assert cleared.kind == "upcoming.cleared"
    assert cleared.data.upcoming == scheduled.data.upcoming  # the window that went away


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_pubsub_encodings_round_trip(mode: str) -> None:
    event = _event((MAINTENANCE, "NONE", "TERMINATE_ON_HOST_MAINTENANCE"))
    attributes, payload = event.to_pubsub(mode)
    if mode == "binary":
        assert attributes["ce-id"] == "id-1" and attributes["content-type"] == "application/json"
        assert "ce-datacontenttype" not in attributes
        assert json.loads(payload)["current"] == "TERMINATE_ON_HOST_MAINTENANCE"
    else:
        assert attributes == {"content-type": "application/cloudevents+json; charset=UTF-8"}
    assert decode_pubsub(attributes, payload) == event
    assert decode_structured(event.to_structured()) == event


def test_upcoming_without_reasons_has_an_empty_list() -> None:
    event = _event((UPCOMING, "", canonical(UPCOMING, {"type": "SCHEDULED"})))
    assert event.to_structured()["data"]["upcoming"]["maintenance_reasons"] == []


def test_registry_kinds_and_what_the_outbox_may_drop() -> None:
    kinds, droppable = KINDS, keys.DROPPABLE_KINDS
    assert kinds == (
        "maintenance.started",
        "maintenance.changed",
        "maintenance.ended",
        "preemption.started",
        "preemption.changed",
        "preemption.ended",
        "upcoming.scheduled",
        "upcoming.updated",
        "upcoming.cleared",
        "bridge.heartbeat",
    )
    # Over the outbox bound only the window and heartbeats may go: never a notice.
    assert droppable == {kinds[-1], *kinds[6:9]}
    assert [KEYS[k].alt for k in (MAINTENANCE, PREEMPTED, UPCOMING)] == [None, None, "json"]


def test_a_new_key_is_one_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transitions, notices and events follow the registry: no per-key code to touch."""
    path = "instance/guest-attributes/hostEvents/state"
    key = Key(path, "host", "IDLE", ("begun", "moved", "over"), notice={"DRAINING": 120},
              notice_on=("begun",))  # fmt: skip
    monkeypatch.setitem(KEYS, path, key)
    begun = classify(path, "IDLE", "DRAINING")
    assert begun is not None and begun.kind == "host.begun"
    assert notice_seconds(begun) == 120
    assert classify(path, "DRAINING", "IDLE").kind == "host.over"
    assert classify(path, "DRAINING", "PAUSED").kind == "host.moved"
    event = _event((path, "IDLE", "DRAINING"))
    assert event.kind == "host.begun" and event.data.notice_seconds == 120
    assert event.data.upcoming is None


@pytest.mark.parametrize("nothing", [None, {}, "", "NONE", " NONE\n"])
def test_every_nothing_scheduled_form_reads_as_the_baseline(nothing: object) -> None:
    """`{}`, `{ }` (decoded: {}), the 503/404 (None), and `NONE` as text or as JSON `"NONE"`."""
    assert canonical(UPCOMING, nothing) == KEYS[UPCOMING].baseline == ""


def test_an_unknown_upcoming_shape_is_passed_on() -> None:
    assert canonical(UPCOMING, "SOMETHING_NEW") == '"SOMETHING_NEW"'
    assert canonical(UPCOMING, [1]) == "[1]"
    assert classify(UPCOMING, "", canonical(UPCOMING, "SOMETHING_NEW")) is not None


def test_what_counts_as_a_notice() -> None:
    assert not is_notice(MAINTENANCE, "NONE")
    assert is_notice(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    assert is_notice(MAINTENANCE, "FUTURE_VALUE")
    assert is_notice(PREEMPTED, "TRUE") and not is_notice(PREEMPTED, "FALSE")
    ongoing = canonical(UPCOMING, {"maintenanceStatus": "ONGOING", "type": "SCHEDULED"})
    assert is_notice(UPCOMING, ongoing)
    assert not is_notice(UPCOMING, canonical(UPCOMING, {"maintenance_status": "PENDING"}))
    assert not is_notice(UPCOMING, "") and not is_notice(UPCOMING, '"SOMETHING_NEW"')
