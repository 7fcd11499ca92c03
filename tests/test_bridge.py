"""The bridge end to end: a real `maintenance-bridge run` process against the simulator."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from support.bridge import BridgeProcess
from support.pubsub import PubSubServer, admin

from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING, decode_pubsub
from bridge.simulator import Simulator

PREFIX = "io.github.maintenancebridge.gce.v1."
SEQUENCE = [
    "MIGRATE_ON_HOST_MAINTENANCE",
    "NONE",
    "MIGRATE_ON_HOST_MAINTENANCE",
    "NONE",
    "TERMINATE_ON_HOST_MAINTENANCE",
    "MIGRATE_ON_HOST_MAINTENANCE",
    "NONE",
]
EXPECTED = [
    "maintenance.started",
    "maintenance.ended",
    "maintenance.started",
    "maintenance.ended",
    "maintenance.started",
    "maintenance.changed",
    "maintenance.ended",
]


def _started(bridge: BridgeProcess, sim: Simulator) -> None:
    """Wait until every watcher hangs on its key (each key asked at least once)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = sim.stats()
        if stats.get(MAINTENANCE, 0) >= 2 and stats.get(PREEMPTED, 0) >= 2:
            return
        time.sleep(0.02)
    raise AssertionError(f"bridge never long-polled: {sim.stats()} {bridge.logs()[-5:]}")


def test_every_transition_once_in_order_within_50ms(sim: Simulator, tmp_path: Path) -> None:
    bridge = BridgeProcess(sim.url, tmp_path / "state")
    try:
        _started(bridge, sim)
        latencies, events = [], []
        for value in SEQUENCE:
            changed = time.monotonic()
            sim.set_value(MAINTENANCE, value)
            arrived, event = bridge.next_event(timeout=5)
            latencies.append(arrived - changed)
            events.append(event)
        changed = time.monotonic()
        sim.set_value(PREEMPTED, "TRUE")
        arrived, event = bridge.next_event(timeout=5)
        latencies.append(arrived - changed)
        events.append(event)
        assert bridge.no_more_events(0.3)
    finally:
        assert bridge.terminate() == 0
    assert [e["type"].removeprefix(PREFIX) for e in events] == [*EXPECTED, "preemption.started"]
    assert len({e["id"] for e in events}) == len(events)
    assert [e["data"]["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["data"]["happened_while_down"] is False for e in events)
    print(
        f"change-to-stdout latency: median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} transitions"
    )
    assert max(latencies) < 0.050, latencies
    # The key itself is queried after every event, which keeps the 60 s warning armed.
    assert sim.stats()[MAINTENANCE] >= len(SEQUENCE) + 1


def test_kill_9_change_while_down_restart(sim: Simulator, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = BridgeProcess(sim.url, state)
    _started(first, sim)
    sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    _, started = first.next_event()
    first.wait_for_log("maintenance.started")
    time.sleep(0.3)  # let the outbox retire it, then die without any cleanup
    first.kill()

    sim.set_value(MAINTENANCE, "NONE")  # the migration ends while the bridge is down
    second = BridgeProcess(sim.url, state)
    try:
        _, ended = second.next_event()
        assert second.no_more_events(1.0), "something was published twice"
    finally:
        assert second.terminate() == 0
    assert started["type"].endswith("maintenance.started")
    assert ended["type"].endswith("maintenance.ended")
    assert ended["data"]["happened_while_down"] is True
    assert ended["data"]["previous"] == "MIGRATE_ON_HOST_MAINTENANCE"
    assert ended["id"] != started["id"]
    assert ended["data"]["sequence"] == started["data"]["sequence"] + 1


def test_first_start_baseline_is_the_documented_default(sim: Simulator, tmp_path: Path) -> None:
    # NONE / FALSE / nothing scheduled at first start: no event. A notice already underway: one.
    sim.set_value(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE")
    bridge = BridgeProcess(sim.url, tmp_path / "state")
    try:
        _, event = bridge.next_event()
        assert bridge.no_more_events(0.8)
    finally:
        bridge.terminate()
    assert event["type"].endswith("maintenance.started")
    assert event["data"]["happened_while_down"] is True
    assert event["data"]["notice_seconds"] == 3600


def test_upcoming_maintenance_lifecycle(sim: Simulator, tmp_path: Path) -> None:
    bridge = BridgeProcess(sim.url, tmp_path / "state")
    window = {
        "type": "SCHEDULED",
        "can_reschedule": "false",
        "maintenance_status": "PENDING",
        "window_start_time": "2030-01-15T02:00:00Z",
    }
    try:
        _started(bridge, sim)
        sim.set_value(UPCOMING, json.dumps(window))
        _, scheduled = bridge.next_event()
        sim.set_value(UPCOMING, json.dumps({**window, "maintenance_status": "ONGOING"}))
        _, updated = bridge.next_event()
        sim.set_value(UPCOMING, "{}")  # also means nothing scheduled
        _, cleared = bridge.next_event()
    finally:
        bridge.terminate()
    assert [e["type"].removeprefix(PREFIX) for e in (scheduled, updated, cleared)] == [
        "upcoming.scheduled",
        "upcoming.updated",
        "upcoming.cleared",
    ]
    assert scheduled["data"]["upcoming"]["can_reschedule"] is False
    assert updated["data"]["upcoming"]["maintenance_status"] == "ONGOING"


def test_sigterm_exits_zero_and_keeps_unpublished_events(
    sim: Simulator, tmp_path: Path, pubsub: PubSubServer
) -> None:
    # A topic that does not exist: the event cannot leave the outbox; SIGTERM waits
    # --drain-timeout, exits 0, and the next start publishes it under its first id.
    topic = f"projects/{pubsub.project}/topics/later"
    env = pubsub.env()
    args = ("--topic", topic, "--drain-timeout", "0.5")
    first = BridgeProcess(sim.url, tmp_path / "state", *args, env=env)
    _started(first, sim)
    sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    recorded = first.wait_for_log("maintenance.started")
    first.wait_for_log("not_found")
    began = time.monotonic()
    assert first.terminate() == 0
    assert time.monotonic() - began < 5
    event_id = recorded["message"].split("event ")[1].split(",")[0]

    with admin(pubsub) as ps:
        ps.create_topic("later")
        sub = ps.create_subscription(topic, "later-sub")
        second = BridgeProcess(sim.url, tmp_path / "state", *args, env=env)
        try:
            got = ps.pull_until(sub, 1, timeout=15)
        finally:
            second.terminate()
    assert got[0].attributes["ce-id"] == event_id


def test_publishes_to_the_pubsub_emulator_in_order(
    sim: Simulator, tmp_path: Path, pubsub: PubSubServer
) -> None:
    with admin(pubsub) as ps:
        topic = ps.create_topic("maintenance")
        sub = ps.create_subscription(topic, "maintenance-sub", ordering=True)
        bridge = BridgeProcess(sim.url, tmp_path / "state", "--topic", topic, env=pubsub.env())
        try:
            _started(bridge, sim)
            for value in SEQUENCE:
                sim.set_value(MAINTENANCE, value)
                time.sleep(0.05)
            got = ps.pull_until(sub, len(SEQUENCE), timeout=20)
        finally:
            assert bridge.terminate() == 0
    events = [decode_pubsub(m.attributes, m.data) for m in got]
    assert [e.kind for e in events] == EXPECTED
    assert [e.data.sequence for e in events] == list(range(1, len(SEQUENCE) + 1))
    first = got[0]
    assert first.ordering_key == "4520031799277579481"  # the instance id
    assert first.attributes["content-type"] == "application/json"
    for name in (
        "ce-specversion",
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-time",
        "ce-subject",
        "ce-dataschema",
        "ce-instanceid",
        "ce-zone",
        "ce-project",
    ):
        assert name in first.attributes, name
    assert first.attributes["ce-source"].startswith("//compute.googleapis.com/projects/")
    assert json.loads(first.data)["current"] == "MIGRATE_ON_HOST_MAINTENANCE"
