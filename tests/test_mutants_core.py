"""Promises of the core that mutation testing found unguarded (docs/reliability.md, "Mutation
testing"): each test here failed on a mutant of bridge/store.py, relay.py, recorder.py or
events.py that every other in-process test let through, and asserts what users rely on.

- `status` (and `status --json`) shows what the store holds, read from a copy that includes
  what the daemon has committed but not yet checkpointed, and a copy torn by a write is taken
  again, at most three times;
- the outbox bound counts the rows written back after a disk outage;
- a parked event leaves the queue, is kept with why, is counted, and the next event goes on;
  a redrive counts it back, never below zero;
- stale heartbeats the store cannot forget still go out, and so does what waits behind them;
- /readyz's outbox age and "blocked in send" reason;
- the recorder: an id per event, never the same across a restart; the change-to-publish latency
  of changes and heartbeats; the store's own error in /healthz; a key's newest value kept over
  the one the full disk refused; nothing written while the store is healthy; an event published
  while it was being written back does not go out again after a restart;
- the decoder and the window model accept what docs/events.md allows to be absent.

Each runs in well under a second: a real store in a temporary directory, the relay on a memory
sink, no metadata server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import test_recorder
import test_relay
from support.full_disk import FullDisk
from support.harness import INSTANCE, SCHEDULING, event_for, wait_for
from support.memory_sink import MemorySink, SinkDown
from test_recorder import MIGRATE, WINDOW, Rig, query_only, rig

from bridge import store as store_module
from bridge.config import Config, ConfigError
from bridge.events import (
    MAINTENANCE,
    PREEMPTED,
    UPCOMING,
    CloudRecord,
    DecodeError,
    Event,
    Scheduling,
    Upcoming,
    build_event,
    decode_structured,
)
from bridge.keys import HEARTBEAT_KIND
from bridge.metrics import Metrics
from bridge.recorder import HEARTBEAT
from bridge.relay import Relay
from bridge.sinks import Permanent
from bridge.store import SCHEMA_VERSION, Store, read_status

AT = "2026-12-07T14:00:00.000Z"


def now() -> datetime:
    return datetime.now(timezone.utc)


# The same fixtures: a store, and a recorder with its relay and memory sink, on a fresh state dir.
store = test_relay.store
bridge = test_recorder.bridge


# -- status ---------------------------------------------------------------------------------------


def test_status_shows_what_the_store_holds_while_the_daemon_runs(store: Store) -> None:
    """`status --json`: every key's value and when it was seen, the outbox's depth and age, the
    last publish, the last error until a publish clears it, the next sequence number, the
    parked events with why, and who runs; from a copy, seeing what is not yet checkpointed."""
    fresh = store.report()
    assert fresh["next_sequence"] == 1
    assert (fresh["daemon"], fresh["last_publish"], fresh["last_error"]) == (None, None, None)
    assert (fresh["outbox_depth"], fresh["outbox_oldest_age_seconds"]) == (0, None)
    first = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1)
    second = event_for(UPCOMING, "", WINDOW, sequence=2)
    third = event_for(PREEMPTED, "FALSE", "TRUE", sequence=3)
    store.record(first, (MAINTENANCE, MIGRATE, first.data.observed_at))
    store.record(second)
    store.record(third)
    store.ack(1, first.id, AT)
    store.note_error("publish unavailable: down", AT)
    store.park(2, 400, "refused: bad request", AT)
    store.note_daemon({"pid": 42, "sink": "stdout"})
    for report in (store.report(), read_status(store.path)):
        assert report["schema_version"] == SCHEMA_VERSION
        assert report["keys"] == {
            MAINTENANCE: {"value": MIGRATE, "observed_at": first.data.observed_at}
        }
        assert report["outbox_depth"] == 1
        age = report["outbox_oldest_age_seconds"]
        assert isinstance(age, float) and 0.0 <= age < 1.0, age
        assert len(repr(age).partition(".")[2]) <= 3, f"{age}: milliseconds"
        assert report["last_publish"] == {"at": AT, "event_id": first.id}
        assert report["last_error"] == {"at": AT, "message": "publish unavailable: down"}
        assert report["next_sequence"] == 4
        assert report["parked_count"] == 1
        assert report["parked"] == [
            {
                "event_id": second.id,
                "kind": "upcoming.scheduled",
                "parked_at": AT,
                "status": 400,
                "reason": "refused: bad request",
            }
        ]
        assert report["daemon"] == {"pid": 42, "sink": "stdout"}
    store.ack(3, third.id, AT, clear_error=True)
    assert read_status(store.path)["last_error"] is None


@pytest.mark.parametrize(("torn", "ok"), [(1, True), (2, True), (3, False)])
def test_status_takes_a_torn_copy_again_at_most_three_times(
    store: Store, monkeypatch: pytest.MonkeyPatch, torn: int, ok: bool
) -> None:
    """A copy torn by a daemon writing at that moment fails to open: taken again, quickly, up to
    three copies in all; then the error is the answer."""
    copies: list[Path] = []
    real = store_module._read_copy

    def tearing(path: Path) -> dict[str, object]:
        copies.append(path)
        if len(copies) <= torn:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real(path)

    monkeypatch.setattr(store_module, "_read_copy", tearing)
    started = time.monotonic()
    if ok:
        assert read_status(store.path)["next_sequence"] == 1
    else:
        with pytest.raises(sqlite3.DatabaseError):
            read_status(store.path)
    assert copies == [store.path] * min(torn + 1, 3)
    assert time.monotonic() - started < 0.5


def test_status_of_a_state_dir_where_no_bridge_ran_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="has the bridge run"):
        read_status(tmp_path / "bridge.sqlite3")


# -- the outbox bound -----------------------------------------------------------------------------


def test_rows_written_back_after_a_disk_outage_count_towards_the_bound(tmp_path: Path) -> None:
    """What was published from memory and written back later (`Store.rewrite`) is in the
    outbox like any row: the next record over the bound drops the oldest droppable one."""
    store = Store(tmp_path / "bridge.sqlite3", max_events=2)
    try:
        back = [event_for(UPCOMING, "", WINDOW, sequence=1), event_for(UPCOMING, WINDOW, "", 2)]
        store.rewrite(back, [], 3)
        assert store.record(event_for(UPCOMING, "", WINDOW, sequence=3)) == [1]
    finally:
        store.close()


# -- the relay ------------------------------------------------------------------------------------


def relay_on(store: Store, sink: MemorySink) -> Relay:
    relay = Relay(sink, store, Metrics(), retry_cap=0.05)
    relay.start()
    return relay


def record(store: Store, relay: Relay, event: Event, *, since: float | None = None) -> None:
    store.record(event)
    relay.enqueue(event.data.sequence, event, time.monotonic(), [], since=since)


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_refused_event_is_parked_with_why_and_the_queue_goes_on(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md: an event the sink refuses for good leaves the queue for the parked
    table (status code, reason, when), is counted and logged with its id and kind, the sink
    recovers, and the next event goes out; a redrive counts it back, never below zero."""
    caplog.set_level(logging.ERROR, logger="bridge.relay")
    sink = MemorySink()
    relay = relay_on(store, sink)
    try:
        relay.parked = 2  # as the daemon sets it from the store at start
        sink.fail = Permanent(400, "refused: bad request")
        refused = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1)
        record(store, relay, refused)
        wait_for("the event parked", lambda: store.parked_count() == 1)
        sink.fail = None
        record(store, relay, event_for(PREEMPTED, "FALSE", "TRUE", sequence=2))
        sink.wait("the next event", lambda s: len(s.acked) == 1)
        assert relay.drain(timeout=5)
    finally:
        relay.drain(timeout=1)
    assert relay.parked == 3
    assert sink.recovered == [refused.id]
    assert sample(relay, "maintenance_bridge_publish_failures_total", reason="other") == 1
    (parked,) = store.report()["parked"]
    assert (parked["event_id"], parked["status"], parked["reason"]) == (
        refused.id,
        400,
        "refused: bad request",
    )
    assert parked["parked_at"].endswith("Z") and parked["parked_at"][:2] == "20"
    assert [seq for seq, _, _ in store.load().pending] == []
    (line,) = [r for r in caplog.records if "parked" in r.getMessage()]
    assert refused.id in line.getMessage() and "refused: bad request" in line.getMessage()
    assert (line.event_id, line.kind) == (refused.id, "maintenance.started")  # type: ignore[attr-defined]
    relay.unparked(1)
    assert relay.parked == 2
    relay.unparked(3)
    assert relay.parked == 0


def test_stale_heartbeats_the_store_cannot_forget_still_go_out_with_what_follows(
    tmp_path: Path,
) -> None:
    """Coalescing is an optimisation: when the store refuses to forget the stale heartbeats,
    they go out, in order, and so does the notice queued behind them."""
    store = FullDisk(tmp_path / "bridge.sqlite3", "forget")
    sink = MemorySink(hold=True)
    relay = relay_on(store, sink)
    try:
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1))
        sink.wait("the first send", lambda s: len(s.sends) == 1)
        beats = [heartbeat(seq) for seq in (2, 3, 4)]
        for beat in beats:
            record(store, relay, beat)
        record(store, relay, event_for(PREEMPTED, "FALSE", "TRUE", sequence=5))
        sink.hold = False
        sink.ack()
        sink.wait("everything", lambda s: len(s.acked) == 5, timeout=5)
    finally:
        relay.drain(timeout=1)
        store.close()
    assert [e.data.sequence for e in sink.acked] == [1, 2, 3, 4, 5]


def heartbeat(seq: int) -> Event:
    return build_event(
        HEARTBEAT,
        event_id=str(uuid.uuid4()),
        sequence=seq,
        observed_at=now(),
        instance=INSTANCE,
        scheduling=SCHEDULING,
        happened_while_down=False,
        notice_seconds=None,
    )


def test_the_outbox_age_is_the_oldest_waiting_event_s(store: Store) -> None:
    """/readyz and maintenance_bridge_outbox_oldest_age_seconds: the age of the event at the
    head of the queue, the next one's once it is out, nothing once all are."""
    sink = MemorySink(hold=True)
    relay = relay_on(store, sink)
    try:
        assert relay.oldest_seen() is None
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, 1), since=100.0)
        record(store, relay, event_for(PREEMPTED, "FALSE", "TRUE", 2), since=200.0)
        assert relay.oldest_seen() == 100.0
        sink.wait("the first send", lambda s: len(s.sends) >= 1)
        sink.ack(1)
        wait_for("the first retired", lambda: relay.depth() == 1)
        assert relay.oldest_seen() == 200.0
        sink.wait("the second send", lambda s: len(s.sends) == 2)
        sink.ack(2)
        wait_for("both retired", lambda: relay.depth() == 0)
        assert relay.oldest_seen() is None
    finally:
        relay.drain(timeout=1)


class BlockingSink(MemorySink):
    """`send` itself blocks (stdout into a pipe nobody reads) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.started = 0.0

    def send(self, event: Event) -> Future[str]:
        self.started = time.monotonic()
        self.entered.set()
        self.release.wait(10)
        return super().send(event)


def test_readyz_says_the_sink_is_blocked_in_send_after_two_seconds(store: Store) -> None:
    sink = BlockingSink()
    relay = relay_on(store, sink)
    try:
        assert relay.stuck(time.monotonic()) == ""
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, 1))
        assert sink.entered.wait(5)
        assert relay.stuck(sink.started + 1.0) == ""
        assert relay.stuck(sink.started + 3.0) == "sink memory blocked in send for 3 s"
        sink.release.set()
        sink.wait("the event", lambda s: len(s.acked) == 1)
        wait_for("the send over", lambda: relay.stuck(time.monotonic() + 60) == "")
    finally:
        sink.release.set()
        relay.drain(timeout=1)


# -- the recorder ---------------------------------------------------------------------------------


def test_every_event_has_its_own_uuid_across_restarts(tmp_path: Path) -> None:
    """One id per event, never reused: the first event after each start included."""
    ids = []
    for value in (MIGRATE, "NONE"):
        r = rig(tmp_path)
        try:
            r.observe(MAINTENANCE, value, first=True)
            r.recorder.heartbeat(now(), time.monotonic())
            ids += [e.id for e in r.published()]
        finally:
            r.close()
    assert len(ids) == 4 and len(set(ids)) == 4, ids
    assert all(str(uuid.UUID(i)) == i for i in ids), ids


def test_the_change_to_publish_latency_is_measured_for_changes_and_heartbeats(
    bridge: Rig,
) -> None:
    """maintenance_bridge_change_to_publish_seconds counts every change and heartbeat, and
    maintenance_bridge_events_total counts heartbeats under their kind."""
    bridge.observe(MAINTENANCE, "NONE", first=True)
    bridge.observe(MAINTENANCE, MIGRATE)
    bridge.recorder.heartbeat(now(), time.monotonic())
    assert len(bridge.published()) == 2
    registry = bridge.relay.metrics.registry
    latency = "maintenance_bridge_change_to_publish_seconds_count"
    assert registry.get_sample_value(latency) == 2
    beats = registry.get_sample_value("maintenance_bridge_events_total", {"kind": HEARTBEAT_KIND})
    assert beats == 1


def test_the_store_error_in_healthz_is_the_store_s_own_and_clears_once_written(
    bridge: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """/healthz names why the store refused (from the first failure, in one critical line that
    names the store), and keeps saying so while it still refuses; a heartbeat recorded from
    memory during the outage is written, and health green again, by the retry alone."""
    caplog.set_level(logging.WARNING, logger="bridge.recorder")
    bridge.observe(MAINTENANCE, "NONE", first=True)
    query_only(bridge.store, True)
    bridge.recorder.heartbeat(now(), time.monotonic())
    assert "readonly" in bridge.health.store_error
    wait_for("the heartbeat published", lambda: bridge.relay.depth() == 0)
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and str(bridge.store.path) in critical[0].getMessage()
    bridge.sink.hold = True
    bridge.recorder.heartbeat(now(), time.monotonic())  # an event to write back, no value
    bridge.recorder.retry_store()
    assert "readonly" in bridge.health.store_error
    query_only(bridge.store, False)
    bridge.recorder.retry_store()
    assert bridge.health.store_error == ""
    assert [seq for seq, _, _ in bridge.store.load().pending] == [2]
    bridge.sink.hold = False
    bridge.sink.ack()


def test_the_newest_value_of_a_key_wins_over_the_one_a_full_disk_refused(bridge: Rig) -> None:
    """A value the store refused is written later only if no newer value of its key was
    written meanwhile: otherwise a restart would see a change that did not happen."""
    bridge.observe(MAINTENANCE, "NONE", first=True)
    query_only(bridge.store, True)
    bridge.observe(MAINTENANCE, MIGRATE)
    query_only(bridge.store, False)
    bridge.observe(MAINTENANCE, "NONE")
    assert bridge.health.store_error == ""
    assert bridge.store.load().values[MAINTENANCE] == "NONE"
    bridge.recorder.retry_store()
    assert bridge.store.load().values[MAINTENANCE] == "NONE"


def test_a_healthy_store_is_not_written_by_the_retry_timer(bridge: Rig) -> None:
    """retry_store runs every second: with nothing to write back it writes nothing."""
    bridge.observe(MAINTENANCE, "NONE", first=True)
    bridge.observe(MAINTENANCE, MIGRATE)
    assert len(bridge.published()) == 1
    # data_version changes, for this connection, with every commit made by another one.
    with contextlib.closing(sqlite3.connect(bridge.store.path)) as db:
        before = db.execute("PRAGMA data_version").fetchone()
        for _ in range(3):
            bridge.recorder.retry_store()
        assert db.execute("PRAGMA data_version").fetchone() == before
        bridge.store.note_error("a commit of the store's own", AT)  # the probe can see one
        assert db.execute("PRAGMA data_version").fetchone() != before


def test_an_event_published_while_it_was_written_back_is_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay may retire an event between the recorder's look at the queue and the row's
    write: that row is removed again, so a restart does not send the event a second time."""
    first = rig(tmp_path)
    try:
        first.observe(MAINTENANCE, "NONE", first=True)
        first.sink.hold = True
        query_only(first.store, True)
        first.observe(MAINTENANCE, MIGRATE)
        query_only(first.store, False)
        looks: list[list[int]] = []

        def queued(seqs: list[int]) -> list[int]:  # published right after the first look
            looks.append(list(seqs))
            return seqs if len(looks) == 1 else []

        monkeypatch.setattr(first.relay, "queued", queued)
        first.recorder.retry_store()
        assert looks == [[1], [1]]
        assert first.store.load().pending == []
        first.sink.hold = False
        first.sink.ack()
    finally:
        first.close()


# -- the decoder and the window model -------------------------------------------------------------


def upcoming_event(upcoming: dict[str, object]) -> dict[str, object]:
    body = event_for(UPCOMING, "", WINDOW, sequence=1).to_structured()
    body["data"]["upcoming"] = upcoming  # type: ignore[index]
    return body


def test_an_upcoming_window_decodes_without_the_members_the_schema_makes_optional() -> None:
    """docs/events.md: every text member of `upcoming` and `maintenance_reasons` may be absent
    in what a subscriber receives (an older or newer v1 bridge): they decode as "" and ()."""
    event = decode_structured(upcoming_event({"type": "SCHEDULED"}))
    assert event.data.upcoming == Upcoming(type="SCHEDULED")
    bare = decode_structured(upcoming_event({}))
    assert bare.data.upcoming == Upcoming()


def test_the_window_model_of_what_the_server_said() -> None:
    """What the metadata server put in `upcoming-maintenance`: null members are "" (strings
    in the event, as the schema says), an absent can_reschedule stays absent, a single reason
    given as a string is one reason, and a value that is not an object is kept as its type."""
    window = Upcoming.from_canonical(
        '{"type": "SCHEDULED", "window_end_time": null, "maintenance_reasons": "PLANNED_UPDATE"}'
    )
    assert window == Upcoming(type="SCHEDULED", maintenance_reasons=("PLANNED_UPDATE",))
    assert Upcoming.from_canonical('"SCHEDULED"') == Upcoming(type='"SCHEDULED"')
    assert Upcoming.from_canonical('{"can_reschedule": "TRUE"}') == Upcoming(can_reschedule=True)


def test_events_carry_the_configured_type_prefix_and_the_documented_notice(
    bridge: Rig, tmp_path: Path
) -> None:
    """docs/events.md: `type` is --type-prefix + kind; notice_seconds is 60 for a migration,
    3600 for a termination, 30 for a preemption, absent at an end and for a window."""
    prefix = "com.example.fleet.v1"
    bridge.recorder.config = Config(state_dir=tmp_path, type_prefix=prefix)
    for key, value in ((MAINTENANCE, "NONE"), (PREEMPTED, "FALSE"), (UPCOMING, "")):
        bridge.observe(key, value, first=True)
    for key, value in (
        (MAINTENANCE, MIGRATE),
        (MAINTENANCE, "NONE"),
        (MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE"),
        (PREEMPTED, "TRUE"),
        (UPCOMING, WINDOW),
    ):
        bridge.observe(key, value)
    events = bridge.published()
    assert [e.type for e in events] == [
        f"{prefix}.maintenance.started",
        f"{prefix}.maintenance.ended",
        f"{prefix}.maintenance.started",
        f"{prefix}.preemption.started",
        f"{prefix}.upcoming.scheduled",
    ]
    assert [e.data.notice_seconds for e in events] == [60, None, 3600, 30, None]


def test_the_recorded_line_says_what_changed_under_which_id_and_sequence(
    bridge: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The one INFO line per recorded change (tests/test_crash.py joins on it): kind, previous ->
    current ("(nothing)" for an empty value), event id, sequence, why it was seen at a start;
    the id and kind also as log fields (docs/operations.md: `event_id`, `kind` in jsonPayload).
    maintenance_bridge_events_total counts it under its kind."""
    caplog.set_level(logging.INFO, logger="bridge.recorder")
    bridge.observe(MAINTENANCE, MIGRATE, first=True)
    bridge.recorder.values[PREEMPTED] = "FALSE"  # as if stored by an earlier run
    bridge.observe(PREEMPTED, "TRUE", first=True)
    bridge.observe(UPCOMING, WINDOW)
    bridge.observe(UPCOMING, "")
    started, preempted, scheduled, cleared = bridge.published()
    lines = [r for r in caplog.records if r.name == "bridge.recorder"]
    assert [r.getMessage() for r in lines[:2]] == [
        f"maintenance.started: NONE -> {MIGRATE} (event {started.id}, sequence 1, already on "
        "at start)",
        f"preemption.started: FALSE -> TRUE (event {preempted.id}, sequence 2, happened while "
        "the bridge was down)",
    ]
    assert lines[2].getMessage().startswith("upcoming.scheduled: (nothing) -> {")
    assert lines[2].getMessage().endswith(f"(event {scheduled.id}, sequence 3)")
    assert lines[3].getMessage().endswith(f"-> (nothing) (event {cleared.id}, sequence 4)")
    fields = [(r.event_id, r.kind) for r in lines]  # type: ignore[attr-defined]
    assert fields == [(e.id, e.kind) for e in (started, preempted, scheduled, cleared)]
    registry = bridge.relay.metrics.registry
    count = registry.get_sample_value(
        "maintenance_bridge_events_total", {"kind": "upcoming.cleared"}
    )
    assert count == 1


def test_a_failed_publish_is_the_reason_in_readyz_and_the_last_error_in_status(
    store: Store,
) -> None:
    """While the sink refuses: /readyz's reason is the failure's class and message (at most 500
    characters), and `status` shows it as the last error, with when."""
    sink = MemorySink()
    relay = relay_on(store, sink)
    try:
        sink.fail = SinkDown("x" * 1000)
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, 1))
        sink.wait("a failed send", lambda s: len(s.sends) >= 1)
        wait_for("the error noted", lambda: store.report()["last_error"] is not None)
        assert relay.last_failure == ("publish other: " + "x" * 1000)[:500]
        error = store.report()["last_error"]
        assert error["message"] == relay.last_failure
        assert error["at"].endswith("Z") and error["at"][:2] == "20"
        sink.fail = None
        sink.wait("the event", lambda s: len(s.acked) == 1)
        wait_for("the reason gone", lambda: relay.last_failure == "")
    finally:
        relay.drain(timeout=1)


def test_a_cloud_event_decodes_as_it_was_made() -> None:
    """docs/events.md: the system-events function's events carry `origin: "cloud"` and the log
    entry in `data.cloud`; every member a subscriber decodes is the one that was encoded."""
    event = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=7)
    cloud = CloudRecord(
        log_name="projects/p/logs/cloudaudit.googleapis.com%2Fsystem_event",
        insert_id="abc123",
        method="compute.instances.migrateOnHostMaintenance",
        timestamp="2026-12-07T14:00:00.123456Z",
        severity="INFO",
    )
    made = replace(event, data=replace(event.data, origin="cloud", cloud=cloud))
    assert decode_structured(made.to_structured()) == made
    assert decode_structured(event.to_structured()) == event


def test_the_decoder_refuses_what_the_schema_requires_and_accepts_what_it_allows() -> None:
    """data.instance's members are required (dedupe is on the instance id); scheduling's may
    be absent (""); notice_seconds 0 is allowed (minimum 0)."""
    body = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1).to_structured()
    del body["data"]["instance"]["id"]
    with pytest.raises(DecodeError, match=r"instance\.id"):
        decode_structured(body)
    body = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1).to_structured()
    body["data"]["scheduling"] = {}
    body["data"]["notice_seconds"] = 0
    decoded = decode_structured(body)
    assert (decoded.data.scheduling, decoded.data.notice_seconds) == (Scheduling(), 0)
    body["data"]["notice_seconds"] = -1
    with pytest.raises(DecodeError, match="notice_seconds"):
        decode_structured(body)


class RefusingSink(MemorySink):
    """A client that refuses every event outright: `send` raises instead of returning."""

    def send(self, event: Event) -> Future[str]:
        super().send(event)
        raise SinkDown("connection refused")


@pytest.mark.parametrize("outright", [False, True], ids=["future", "raised"])
def test_a_failing_sink_is_tried_again_after_a_back_off_not_in_a_loop(
    store: Store, outright: bool
) -> None:
    """The relay backs off between attempts (100 ms up to the cap), whether the send raised or
    its acknowledgement failed: a sink down is not hammered."""
    sink = RefusingSink() if outright else MemorySink()
    sink.fail = None if outright else SinkDown("unavailable")
    relay = relay_on(store, sink)
    try:
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, 1))
        time.sleep(0.3)
        attempts = len(sink.sends)
    finally:
        relay.drain(timeout=0.1)
    assert 1 <= attempts <= 10, f"{attempts} attempts in 0.3 s"


def test_only_the_newest_of_the_heartbeats_left_waiting_goes_out(store: Store) -> None:
    """After an outage, heartbeats queued behind a newer one are coalesced: the newest goes out,
    the older leave the outbox unsent; a change behind them goes out."""
    sink = MemorySink(hold=True)
    relay = relay_on(store, sink)
    try:
        assert relay.last_failure == ""
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, 1))
        sink.wait("the first send", lambda s: len(s.sends) == 1)
        for seq in (2, 3):
            record(store, relay, heartbeat(seq))
        record(store, relay, event_for(PREEMPTED, "FALSE", "TRUE", sequence=4))
        sink.hold = False
        sink.ack()
        sink.wait("the rest", lambda s: len(s.acked) == 3)
        assert relay.drain(timeout=5)
    finally:
        relay.drain(timeout=1)
    assert [e.data.sequence for e in sink.acked] == [1, 3, 4]
    assert store.load().pending == []


def test_redriven_events_go_back_by_id_and_count_towards_the_bound(tmp_path: Path) -> None:
    """`redrive ID ID`: the named parked events go back into the outbox, where they count
    towards the bound like any row."""
    store = Store(tmp_path / "bridge.sqlite3", max_events=3)
    try:
        events = [event_for(UPCOMING, "", WINDOW, sequence=seq) for seq in (1, 2, 3)]
        for event in events:
            store.record(event)
            store.park(event.data.sequence, 400, "refused", AT)
        assert store.request_redrive([events[0].id, events[2].id]) == [events[0].id, events[2].id]
        assert [seq for seq, _, _ in store.take_redrives()] == [1, 3]
        store.record(event_for(UPCOMING, WINDOW, "", sequence=4))
        assert store.record(event_for(UPCOMING, "", WINDOW, sequence=5)) == [1]
    finally:
        store.close()


def test_optional_context_attributes_decode_as_sent() -> None:
    """time, subject and dataschema may be absent (""), and datacontenttype is kept as sent."""
    body = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1).to_structured()
    for name in ("time", "subject", "dataschema"):
        del body[name]
    body["datacontenttype"] = "application/json; charset=utf-8"
    event = decode_structured(body)
    assert (event.time, event.subject, event.dataschema) == ("", "", "")
    assert event.datacontenttype == "application/json; charset=utf-8"


def test_a_failed_write_is_rolled_back_and_the_store_takes_the_next(store: Store) -> None:
    """A write the database refuses (here the same event twice) leaves nothing half-done and no
    transaction open: the next record commits."""
    first = event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1)
    store.record(first)
    with pytest.raises(sqlite3.IntegrityError):
        store.record(first, (MAINTENANCE, "NONE", first.data.observed_at))
    store.record(event_for(PREEMPTED, "FALSE", "TRUE", sequence=2))
    snapshot = store.load()
    assert [seq for seq, _, _ in snapshot.pending] == [1, 2]
    assert snapshot.values == {}


def synchronous_at_each_commit(statements: list[str]) -> list[tuple[str, str]]:
    """(what the transaction wrote, the `synchronous` level its COMMIT ran at), replayed from
    the statements SQLite executed, in order: the level is what the last PRAGMA set."""
    level, wrote, commits = "", "", []
    for sql in statements:
        text = " ".join(sql.split()).upper()
        if text.startswith("PRAGMA SYNCHRONOUS="):
            level = text.split("=", 1)[1]
        elif text.startswith("INSERT INTO OUTBOX"):
            wrote = "event"
        elif text.startswith("DELETE FROM OUTBOX") and not wrote:
            wrote = "retirement"
        elif text == "COMMIT":
            commits.append((wrote, level))
            wrote = ""
    return commits


def test_a_recorded_event_is_committed_with_its_own_sync(tmp_path: Path) -> None:
    """Recorded means it survives a power cut: in WAL mode that is a COMMIT at
    synchronous=FULL (the write-ahead log synced before COMMIT returns); at NORMAL a power cut
    can lose the last commits, and kill -9 (the crash tests) cannot tell the two apart. Every
    event's commit is FULL, the one right after a retirement (committed at NORMAL, on purpose)
    included."""
    statements: list[str] = []
    store = Store(tmp_path / "bridge.sqlite3")
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store._db.set_trace_callback(statements.append)
        store.record(event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1))
        store.ack(1, "id-1", AT)
        store.record(event_for(MAINTENANCE, MIGRATE, "NONE", sequence=2))
        store.ack(2, "id-2", AT)
        store.record(event_for(PREEMPTED, "FALSE", "TRUE", sequence=3))
    finally:
        store.close()
    # Whatever the connection started at, the open set FULL before these: replay from there.
    commits = synchronous_at_each_commit(["PRAGMA synchronous=FULL", *statements])
    events = [level for wrote, level in commits if wrote == "event"]
    assert events == ["FULL", "FULL", "FULL"], commits
    assert [level for wrote, level in commits if wrote == "retirement"] == ["NORMAL", "NORMAL"]


def test_the_store_opens_at_synchronous_full(tmp_path: Path) -> None:
    """The level every durable commit inherits is set when the store opens."""
    store = Store(tmp_path / "bridge.sqlite3")
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        store.record(event_for(MAINTENANCE, "NONE", MIGRATE, sequence=1))
        store.ack(1, "id-1", AT)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2, "back at FULL"
    finally:
        store.close()


# -- what the relay says about a published event --------------------------------------------------


def test_the_published_line_and_histogram_give_the_latency_from_the_change_or_the_recording(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md joins logs on the published line: its `latency_ms` is from the change
    (a live event) or, for an event restored from the outbox, from its recording; the histogram
    `change_to_publish_seconds` takes the live ones only, at their own value."""
    caplog.set_level(logging.INFO, logger="bridge.relay")
    sink = MemorySink()
    relay = relay_on(store, sink)
    try:
        live = event_for(MAINTENANCE, "NONE", MIGRATE, 1)
        store.record(live)
        relay.enqueue(1, live, time.monotonic() - 5.0, [])  # the change was seen 5 s ago
        restored = event_for(MAINTENANCE, MIGRATE, "NONE", 2)
        store.record(restored)
        relay.enqueue(2, restored, None, [], since=time.monotonic() - 20.0)  # recorded 20 s ago
        sink.wait("both events", lambda s: len(s.acked) == 2)
        wait_for("both lines", lambda: len(published_lines(caplog)) == 2)
    finally:
        relay.drain(timeout=1)
    lines = {r.event_id: r.latency_ms for r in published_lines(caplog)}  # type: ignore[attr-defined]
    assert 5000 <= lines[live.id] < 6000, lines
    assert 20000 <= lines[restored.id] < 21000, lines
    assert sample(relay, "maintenance_bridge_change_to_publish_seconds_count") == 1
    assert 5.0 <= sample(relay, "maintenance_bridge_change_to_publish_seconds_sum") < 6.0


def published_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("published ")]


def test_the_next_publish_clears_the_last_error_in_status(store: Store) -> None:
    """`status` shows the last error until a publish succeeds, whether the error is this run's
    (a sink outage) or one an earlier run left in the store."""
    store.note_error("publish unavailable: from the last run", AT)
    sink = MemorySink()
    relay = relay_on(store, sink)
    try:
        record(store, relay, event_for(MAINTENANCE, "NONE", MIGRATE, 1))
        sink.wait("the first event", lambda s: len(s.acked) == 1)
        wait_for("the old error cleared", lambda: store.report()["last_error"] is None)
        sink.fail = SinkDown("down")
        record(store, relay, event_for(MAINTENANCE, MIGRATE, "NONE", 2))
        wait_for("the outage noted", lambda: store.report()["last_error"] is not None)
        sink.fail = None
        sink.wait("the second event", lambda s: len(s.acked) == 2)
        wait_for("the outage's error cleared", lambda: store.report()["last_error"] is None)
    finally:
        relay.drain(timeout=1)


def test_a_redriven_event_recorded_before_stream_id_goes_out_in_the_store_s_stream(
    tmp_path: Path,
) -> None:
    """An event parked by a bridge older than stream_id, redriven after the upgrade, joins the
    store's stream, as one restored from the outbox does (test_contract): a topic schema that
    requires the field would refuse it otherwise."""
    store = Store(tmp_path / "bridge.sqlite3")
    try:
        stream = store.load().stream_id
        made = event_for(UPCOMING, "", WINDOW, sequence=1)
        old = made.to_structured()
        old["data"].pop("stream_id", None)  # an older bridge's body has none
        with store._transaction():
            store._db.execute(
                "INSERT INTO outbox(seq, id, kind, body, recorded_at) VALUES (1, ?, ?, ?, 0)",
                (made.id, made.kind, json.dumps(old)),
            )
        store.park(1, 400, "refused", AT)
        assert store.request_redrive([old["id"]]) == [old["id"]]
        ((seq, event, _),) = store.take_redrives()
    finally:
        store.close()
    assert (seq, event.id, event.data.stream_id) == (1, old["id"], stream)
