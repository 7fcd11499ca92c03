"""The bridge end to end: a real `maintenance-bridge run` process against the simulator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridge import REPO, BridgeProcess
from support.harness import free_port, holds_for, wait_for
from support.pubsub import PubSubServer, admin

from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING, decode_pubsub
from bridge.simulator import Simulator, sample_window
from bridge.store import DB_NAME, read_status

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


def _started(bridge: BridgeProcess, sim: Simulator, before: dict[str, int] | None = None) -> None:
    """Wait until every watcher hangs on its key (each key asked at least once), counting only
    the requests made since `before` (the simulator's stats when this bridge started)."""
    base = before or {}

    def polling() -> bool:
        stats = sim.stats()
        return all(stats.get(k, 0) - base.get(k, 0) >= 2 for k in (MAINTENANCE, PREEMPTED))

    wait_for(
        "long polls on every key", polling, 10, detail=lambda: (sim.stats(), bridge.logs()[-5:])
    )


# Metadata servers that differ where the real one is undocumented or can misbehave: how a plain
# value reads under alt=json, and an instance/scheduling/ that cannot be read as JSON.
SERVERS: dict[str, dict[str, str]] = {
    "default": {},
    "plain values raw under alt=json": {"plain_alt_json": "raw"},
    "scheduling a text listing": {"scheduling": "text"},
    "scheduling 404": {"scheduling": "404"},
    "scheduling broken JSON": {"scheduling": "broken"},
}


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[Simulator]:
    with Simulator(**SERVERS[request.param]) as simulator:
        yield simulator.start()


@pytest.fixture(params=["string", "raw"])
def both_renderings(request: pytest.FixtureRequest) -> Iterator[Simulator]:
    """The simulator under either rendering of a plain value under alt=json."""
    with Simulator(plain_alt_json=request.param) as simulator:
        yield simulator.start()


def test_every_transition_once_in_order(server: Simulator, tmp_path: Path) -> None:
    # How fast is bench/run.py's to measure (phase_latency, on a quiet machine); a wall-clock
    # bound here would fail on a busy CI runner without telling anything about the bridge.
    sim = server
    bridge = BridgeProcess(sim.url, tmp_path / "state")
    try:
        _started(bridge, sim)
        events = []
        for value in SEQUENCE:
            sim.set_value(MAINTENANCE, value)
            events.append(bridge.next_event(timeout=10)[1])
        sim.set_value(PREEMPTED, "TRUE")
        events.append(bridge.next_event(timeout=10)[1])
        assert bridge.no_more_events(0.3)
    finally:
        assert bridge.terminate() == 0
    assert [e["type"].removeprefix(PREFIX) for e in events] == [*EXPECTED, "preemption.started"]
    assert len({e["id"] for e in events}) == len(events)
    assert [e["data"]["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["data"]["happened_while_down"] is False for e in events)
    assert all(e["data"]["at_startup"] is False for e in events)
    assert {e["data"]["instance"]["hostname"] for e in events} == {
        "demo-vm.us-central1-a.c.demo-project.internal"
    }
    scheduling = events[0]["data"]["scheduling"]
    warnings = [r["message"] for r in bridge.logs() if "fields empty" in r.get("message", "")]
    if sim.scheduling == "json":
        assert scheduling["on_host_maintenance"] == "MIGRATE" and not warnings
    else:  # read once, one warning line, the fields empty: watching was not held up
        assert set(scheduling.values()) == {""}
        assert len(warnings) == 1 and "instance/scheduling/" in warnings[0], warnings
        assert sim.stats()["instance/scheduling/"] == 1
    # The key itself is queried after every event, which keeps the 60 s warning armed.
    assert sim.stats()[MAINTENANCE] >= len(SEQUENCE) + 1


def test_kill_9_change_while_down_restart(both_renderings: Simulator, tmp_path: Path) -> None:
    sim = both_renderings
    state = tmp_path / "state"
    first = BridgeProcess(sim.url, state)
    _started(first, sim)
    sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    _, started = first.next_event()
    wait_for("the outbox to retire it", lambda: read_status(state / DB_NAME)["outbox_depth"] == 0)
    first.kill()  # then die without any cleanup

    sim.set_value(MAINTENANCE, "NONE")  # the migration ends while the bridge is down
    second = BridgeProcess(sim.url, state)
    try:
        _, ended = second.next_event()
        # A retry may repeat an id (at least once); a retired event or a new id may not come.
        again = {e["id"] for e in second.events_until_quiet(1.0)}
        assert again <= {ended["id"]}, "something was published twice"
    finally:
        assert second.terminate() == 0
    assert started["type"].endswith("maintenance.started")
    assert ended["type"].endswith("maintenance.ended")
    assert ended["data"]["happened_while_down"] is True
    assert ended["data"]["at_startup"] is True
    assert ended["data"]["previous"] == "MIGRATE_ON_HOST_MAINTENANCE"
    assert ended["id"] != started["id"]
    assert ended["data"]["sequence"] == started["data"]["sequence"] + 1


def test_first_start_with_every_key_on_then_a_restart(
    both_renderings: Simulator, tmp_path: Path
) -> None:
    """A first-ever start compares with the documented defaults: each key already on gives one
    event, at_startup but not happened_while_down (nothing was ever stored). A restart that
    finds other values than the stored ones: happened_while_down too."""
    sim = both_renderings
    window = sample_window()
    assert window is not None
    sim.set_value(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE")
    sim.set_value(PREEMPTED, "TRUE")
    sim.set_value(UPCOMING, window)
    state = tmp_path / "state"
    first = BridgeProcess(sim.url, state)
    try:
        on = {e["subject"]: e for e in first.events(3)}
        assert first.no_more_events(0.8)
    finally:
        assert first.terminate() == 0
    assert {k: e["type"].removeprefix(PREFIX) for k, e in on.items()} == {
        MAINTENANCE: "maintenance.started",
        PREEMPTED: "preemption.started",
        UPCOMING: "upcoming.scheduled",
    }
    for event in on.values():
        assert (event["data"]["at_startup"], event["data"]["happened_while_down"]) == (True, False)
    assert on[MAINTENANCE]["data"]["previous"] == "NONE"
    assert on[MAINTENANCE]["data"]["notice_seconds"] == 3600  # a latest bound: see docs
    assert on[PREEMPTED]["data"]["notice_seconds"] == 30

    sim.set_value(MAINTENANCE, "NONE")  # all three change while the bridge is stopped
    sim.set_value(PREEMPTED, "FALSE")
    sim.delete_value(UPCOMING)
    second = BridgeProcess(sim.url, state)
    try:
        off = {e["subject"]: e for e in second.events(3)}
        assert second.no_more_events(0.8)
    finally:
        assert second.terminate() == 0
    assert {k: e["type"].removeprefix(PREFIX) for k, e in off.items()} == {
        MAINTENANCE: "maintenance.ended",
        PREEMPTED: "preemption.ended",
        UPCOMING: "upcoming.cleared",
    }
    for event in off.values():
        assert (event["data"]["at_startup"], event["data"]["happened_while_down"]) == (True, True)

    before = sim.stats()
    third = BridgeProcess(sim.url, state)  # and a restart that finds what it stored: nothing
    try:
        _started(third, sim, before)
        assert third.no_more_events(0.5)
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        _, live = third.next_event()
    finally:
        assert third.terminate() == 0
    assert (live["data"]["at_startup"], live["data"]["happened_while_down"]) == (False, False)


@pytest.mark.parametrize("unreachable", ["refused", "no such host"])
def test_off_gce_one_line_then_keeps_retrying(unreachable: str, tmp_path: Path) -> None:
    port = free_port()
    if unreachable == "refused":
        url, args = f"http://127.0.0.1:{port}/computeMetadata/v1/", ()
    else:  # .invalid never resolves (RFC 2606)
        url, args = "http://metadata.invalid/computeMetadata/v1/", ("--allow-metadata-host", "true")
    bridge = BridgeProcess(url, tmp_path / "state", "--retry-cap", "0.2", *args)
    try:
        line = bridge.wait_for_log("cannot be reached")["message"]
        # Several more failed attempts, at most 0.2 s apart: it neither gives up nor says more.
        holds_for("the bridge running", lambda: bridge.proc.poll() is None, 1.5)
        records = bridge.logs()
        assert "\n" not in line and "GCE_METADATA_HOST=" in line
        assert "maintenance-bridge simulate" in line and url in line
        loud = [r["message"] for r in records if r.get("severity") not in ("DEBUG", "INFO")]
        assert loud == [line], records  # once, however many attempts failed
        if unreachable == "refused":  # the simulator comes up: the bridge finds it
            with Simulator(port=port) as sim:
                sim.start()
                _started(bridge, sim)
                sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
                _, event = bridge.next_event()
                assert event["data"]["current"] == "MIGRATE_ON_HOST_MAINTENANCE"
    finally:
        assert bridge.terminate() == 0


BAD_ARGUMENTS: dict[str, list[str]] = {
    "run: not a number": ["run", "--poll-timeout", "soon"],
    "run: unknown key": ["run", "--keys", "instance/nothing"],
    "run: unknown flag": ["run", "--no-such-flag"],
    "simulate: unknown scenario": ["simulate", "--port", "0", "--scenario", "no-such-scenario"],
    "simulate: scenario not JSON": ["simulate", "--port", "0", "--scenario", "{bad}"],
    "simulate: speed 0": ["simulate", "--speed", "0"],
    "simulate: speed nan": ["simulate", "--speed", "nan"],
    "simulate: port out of range": ["simulate", "--port", "70000"],
    "simulate: port not a number": ["simulate", "--port", "http"],
    "simulate: unknown host": ["simulate", "--port", "0", "--host", "no.such.host.invalid"],
    "simulate: rendering": ["simulate", "--plain-alt-json", "xml"],
    "simulate: scheduling mode": ["simulate", "--scheduling", "slow"],
    "demo: speed": ["demo", "--speed", "-2"],
    "status: no state": ["status", "--state-dir", "/nonexistent/maintenance-bridge"],
    "listen: count": ["listen", "--subscription", "projects/p/subscriptions/s", "--count", "-1"],
    "listen: timeout": ["listen", "--subscription", "projects/p/subscriptions/s", "--timeout", "x"],
    "no subcommand": [],
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_every_bad_argument_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    argv = [a.replace("{bad}", str(tmp_path / "bad.json")) for a in BAD_ARGUMENTS[case]]
    (tmp_path / "bad.json").write_text("[{")
    if argv[:1] == ["run"]:
        argv += ["--state-dir", str(tmp_path / "state")]
    done = subprocess.run(
        [sys.executable, "-m", "bridge", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("maintenance-bridge: error: "), lines
    assert done.stdout == ""


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
                asked = sim.stats()[MAINTENANCE]
                sim.set_value(MAINTENANCE, value)
                # The next long poll has begun: this value was read, the next one is a change.
                wait_for("the value read", lambda n=asked: sim.stats()[MAINTENANCE] > n)
            got = ps.pull_until(sub, len(SEQUENCE), 20, same=lambda m: m.attributes["ce-id"])
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
