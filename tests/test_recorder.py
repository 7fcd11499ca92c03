"""The recorder on its own: observations in, numbered events recorded and handed to the relay.

A real state store in a temporary directory and the relay on an in-memory sink; no metadata
server. What users rely on: one id and one sequence number per transition, the value and its
event stored together before anything is sent, sequence numbers total across keys and sent in
that order, the first send made by the recording thread when the relay is idle, restarts
telling a change that happened while the bridge was down, and a broken disk costing the
store, not the events.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support.harness import INSTANCE, SCHEDULING, event_for
from support.memory_sink import MemorySink

from bridge.config import Config
from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING, Event
from bridge.health import Health
from bridge.hooks import Hooks
from bridge.metrics import Metrics
from bridge.recorder import Recorder
from bridge.relay import Relay
from bridge.simulator import sample_window
from bridge.sinks import StdoutSink
from bridge.store import CHECKPOINT_EVERY, WAL_RESERVE_PAGES, Store

WINDOW = sample_window()


@dataclass
class Rig:
    recorder: Recorder
    store: Store
    relay: Relay
    sink: MemorySink
    health: Health

    def observe(self, key: str, value: str, *, first: bool = False) -> None:
        self.recorder.observe(key, value, datetime.now(timezone.utc), time.monotonic(), first)

    def published(self) -> list[Event]:
        assert self.relay.drain(timeout=10), "the outbox did not empty"
        return list(self.sink.acked)

    def close(self) -> None:
        self.relay.drain(timeout=1)
        self.store.close()


def rig(state_dir: Path, sink: MemorySink | None = None) -> Rig:
    """A recorder resuming from the store in `state_dir`, as the daemon builds it."""
    config = Config(state_dir=state_dir)
    metrics, health, sink = Metrics(), Health(), sink or MemorySink()
    store = Store(state_dir / "bridge.sqlite3")
    relay = Relay(sink, store, metrics, retry_cap=0.2)
    relay.start()
    hooks = Hooks((), timeout=5, metrics=metrics, environ={})
    recorder = Recorder(
        config, store, store.load(), INSTANCE, SCHEDULING, relay, hooks, health, metrics
    )
    return Rig(recorder, store, relay, sink, health)


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Rig]:
    r = rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def test_a_transition_is_stored_with_its_value_and_sent_once(bridge):
    bridge.observe(MAINTENANCE, "NONE", first=True)  # the documented default: no event
    assert bridge.store.load().pending == []
    bridge.sink.hold = True
    bridge.observe(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    # Value and event in the store together, before the sink has acknowledged anything.
    snapshot = bridge.store.load()
    assert snapshot.values[MAINTENANCE] == "MIGRATE_ON_HOST_MAINTENANCE"
    [(seq, stored, _)] = snapshot.pending
    assert (seq, stored.kind) == (1, "maintenance.started")
    bridge.sink.hold = False
    bridge.sink.ack()
    [event] = bridge.published()
    assert event.id == stored.id
    assert bridge.store.load().pending == []
    bridge.observe(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")  # the same value again
    assert bridge.published() == [event]


def test_sequence_numbers_are_total_across_keys_and_sent_in_that_order(bridge):
    values = {
        MAINTENANCE: ["MIGRATE_ON_HOST_MAINTENANCE", "NONE"] * 25,
        PREEMPTED: ["TRUE", "FALSE"] * 25,
        UPCOMING: [WINDOW, ""] * 25,
    }

    def watch(key: str) -> None:  # one thread per key, as the watchers are
        for value in values[key]:
            bridge.observe(key, value)

    threads = [threading.Thread(target=watch, args=(key,)) for key in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    events = bridge.published()
    assert [e.data.sequence for e in events] == list(range(1, 151))
    assert len({e.id for e in events}) == 150
    for key, expected in values.items():  # and each key's own changes in the order they came
        assert [e.data.current for e in events if e.data.key == key] == expected


def test_the_recording_thread_sends_at_once_when_the_relay_is_idle(bridge):
    bridge.observe(PREEMPTED, "TRUE")
    # Sent before observe returned, by the thread that recorded it.
    [send] = bridge.sink.sends
    assert send.thread == threading.current_thread().name
    assert send.event.kind == "preemption.started"
    assert [e.id for e in bridge.published()] == [send.event.id]
    assert len(bridge.sink.sends) == 1


def test_a_heartbeat_is_numbered_in_the_same_stream_and_changes_no_value(bridge):
    bridge.observe(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    bridge.recorder.heartbeat(datetime.now(timezone.utc), time.monotonic())
    bridge.observe(MAINTENANCE, "NONE")
    events = bridge.published()
    assert [(e.kind, e.data.sequence) for e in events] == [
        ("maintenance.started", 1),
        ("bridge.heartbeat", 2),
        ("maintenance.ended", 3),
    ]
    assert bridge.store.load().values == {MAINTENANCE: "NONE"}


def test_a_restart_tells_what_changed_while_the_bridge_was_down(tmp_path):
    first = rig(tmp_path)
    first.observe(MAINTENANCE, "NONE", first=True)
    first.observe(PREEMPTED, "FALSE", first=True)
    before = first.published()
    first.close()
    assert before == []

    second = rig(tmp_path)  # maintenance began while it was not running
    try:
        second.observe(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE", first=True)
        second.observe(PREEMPTED, "FALSE", first=True)
        [event] = second.published()
    finally:
        second.close()
    assert event.kind == "maintenance.started"
    assert (event.data.at_startup, event.data.happened_while_down) == (True, True)
    assert event.data.sequence == 1


def test_a_notice_already_on_at_a_first_start_was_not_seen_to_change(bridge):
    bridge.observe(PREEMPTED, "TRUE", first=True)
    [event] = bridge.published()
    assert (event.data.at_startup, event.data.happened_while_down) == (True, False)


def test_a_broken_store_costs_durability_not_events(bridge, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.recorder")
    bridge.store.close()  # every write now raises sqlite3.ProgrammingError
    bridge.observe(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    bridge.observe(MAINTENANCE, "NONE")
    events = bridge.published()
    assert [e.kind for e in events] == ["maintenance.started", "maintenance.ended"]
    assert [e.data.sequence for e in events] == [1, 2]
    assert bridge.health.store_error
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1, "the broken store was not said once"


def test_the_outbox_bound_counts_what_an_earlier_run_left(tmp_path):
    """The store keeps the outbox's size in memory: rows an earlier run left unpublished count
    towards the bound from the first record of the next run, and dropping is oldest first."""
    path = tmp_path / "bridge.sqlite3"
    first = Store(path, max_events=3)
    for seq in (1, 2, 3):
        assert first.record(event_for(UPCOMING, "", WINDOW, sequence=seq)) == []
    first.close()

    store = Store(path, max_events=3)
    try:
        assert store.record(event_for(UPCOMING, WINDOW, "", sequence=4)) == [1]
        store.ack(2, "id", "2026-11-30T00:00:00.000Z")
        assert store.record(event_for(UPCOMING, "", WINDOW, sequence=5)) == []
        assert store.record(event_for(UPCOMING, WINDOW, "", sequence=6)) == [3]
        assert [seq for seq, _, _ in store.load().pending] == [4, 5, 6]
    finally:
        store.close()


def test_an_event_written_at_once_is_retired_by_the_thread_that_wrote_it(tmp_path, caplog):
    """A sink that has acknowledged when `send` returns (stdout) costs no hand-off to the relay
    thread: the event has left the outbox when `observe` returns, and the log says recorded,
    then published."""
    caplog.set_level(logging.INFO, logger="bridge")
    out = io.StringIO()
    r = rig(tmp_path, StdoutSink(out))  # type: ignore[arg-type]
    try:
        r.observe(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        assert r.relay.depth() == 0
        assert r.store.report()["outbox_depth"] == 0
        [line] = out.getvalue().splitlines()
        event_id = json.loads(line)["id"]
    finally:
        r.close()
    said = [rec.getMessage() for rec in caplog.records if event_id in rec.getMessage()]
    assert [m.split()[0] for m in said] == ["maintenance.started:", "published"]


def test_the_write_ahead_log_is_long_enough_before_the_first_change(tmp_path):
    """A commit that lengthens the log costs a second device flush on the path of a change:
    the daemon's store reserves the log's length at start, leaves nothing of it in the
    database, and checkpoints often enough that recording and retiring stay within it."""
    path = tmp_path / "bridge.sqlite3"
    store = Store(path)
    try:
        store.load()
        assert store.reserve_wal()
        wal = path.with_name(path.name + "-wal")
        reserved = wal.stat().st_size
        assert reserved >= WAL_RESERVE_PAGES * 4096
        for seq in range(1, 5 * CHECKPOINT_EVERY):
            on, off = "MIGRATE_ON_HOST_MAINTENANCE", "NONE"
            previous, current = (off, on) if seq % 2 else (on, off)
            event = event_for(MAINTENANCE, previous, current, sequence=seq)
            store.record(event, (MAINTENANCE, current, event.data.observed_at))
            store.ack(seq, event.id, event.data.observed_at)
            assert wal.stat().st_size == reserved, f"the log grew at event {seq}"
        assert store.report()["outbox_depth"] == 0
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert "wal_reserve" not in tables
