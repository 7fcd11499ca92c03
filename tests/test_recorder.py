"""The recorder on its own: observations in, numbered events recorded and handed to the relay.

A real state store in a temporary directory and the relay on an in-memory sink; no metadata
server. What users rely on: one id and one sequence number per transition, the value and its
event stored together before anything is sent, sequence numbers total across keys and sent in
that order, every send and retirement made by the relay thread (a sink blocked in `send`
delays delivery, never recording), restarts telling a change that happened while the bridge
was down, a broken disk costing the store, not the events, and what it missed written the
moment it takes writes again (one id per transition across a restart), a value the store
cannot hold (a lone surrogate) recorded escaped, and a failed BEGIN leaving no commit unsynced.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support.harness import INSTANCE, SCHEDULING, event_for, wait_for
from support.memory_sink import MemorySink

from bridge import relay as relay_module
from bridge.config import Config
from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING, Event
from bridge.health import Health
from bridge.hooks import Hooks
from bridge.metrics import Metrics
from bridge.recorder import Recorder
from bridge.relay import Relay
from bridge.simulator import sample_window
from bridge.store import CHECKPOINT_EVERY, WAL_RESERVE_PAGES, Store

WINDOW = sample_window()
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"


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


def test_only_the_relay_thread_sends_and_retires(bridge, caplog):
    """Whatever the timing: the recording thread hands events over, the relay's sends them
    and retires them (and says so in the log)."""
    caplog.set_level(logging.INFO, logger="bridge.relay")
    for value in ["TRUE", "FALSE"] * 10:
        bridge.observe(PREEMPTED, value)
    events = bridge.published()
    assert len(events) == 20
    assert {send.thread for send in bridge.sink.sends} == {"relay"}
    retired = [r for r in caplog.records if r.getMessage().startswith("published ")]
    assert len(retired) == 20
    assert {r.threadName for r in retired} == {"relay"}


class BlockedSink(MemorySink):
    """A sink whose `send` blocks until `release` is set (stdout into a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def send(self, event: Event) -> Future[str]:
        self.release.wait(30)
        return super().send(event)


def test_a_sink_blocked_in_send_delays_delivery_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_module, "SEND_STUCK", 0.2)
    sink = BlockedSink()
    r = rig(tmp_path, sink)
    try:
        values = [MIGRATE, "NONE"] * 30
        for value in values:
            started = time.monotonic()
            r.observe(MAINTENANCE, value)
            assert time.monotonic() - started < 0.5, "recording waited for the sink"
        r.observe(PREEMPTED, "TRUE")
        # Recorded, in the store, while the sink has not taken even the first one.
        assert [seq for seq, _, _ in r.store.load().pending] == list(range(1, 62))
        reason = wait_for("the relay said stuck", lambda: r.relay.stuck(time.monotonic()))
        assert re.fullmatch(r"sink memory blocked in send for \d+ s", reason), reason
        sink.release.set()
        events = r.published()
    finally:
        sink.release.set()
        r.close()
    assert [e.data.sequence for e in events] == list(range(1, 62))
    assert len(sink.sends) == 61, "an event was sent twice"
    assert events[-1].kind == "preemption.started"
    assert r.relay.stuck(time.monotonic()) == ""


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


def test_a_value_the_store_cannot_hold_is_recorded_escaped_and_the_watch_goes_on(tmp_path):
    """A lone surrogate (JSON `"\\ud800"` decodes to one) has no UTF-8 form: the value is kept
    backslash-escaped, in memory, the store and the event, so a restart sees no change."""
    first = rig(tmp_path)
    try:
        first.observe(MAINTENANCE, "NONE", first=True)
        first.observe(MAINTENANCE, "\ud800")
        first.observe(PREEMPTED, "TRUE")
        events = first.published()
    finally:
        first.close()
    assert [(e.kind, e.data.current) for e in events] == [
        ("maintenance.started", "\\ud800"),
        ("preemption.started", "TRUE"),
    ]
    assert json.loads(events[0].structured)["data"]["current"] == "\\ud800"
    second = rig(tmp_path)
    try:
        assert second.recorder.values[MAINTENANCE] == "\\ud800"
        second.observe(MAINTENANCE, "\ud800", first=True)  # the same value: no event
        second.observe(MAINTENANCE, "NONE")
        [ended] = second.published()
    finally:
        second.close()
    assert (ended.kind, ended.data.previous, ended.data.sequence) == (
        "maintenance.ended",
        "\\ud800",
        3,
    )


def query_only(store: Store, on: bool) -> None:
    """As a read-only remount or a full disk would: every write fails, or works again."""
    with store._lock:
        store._db.execute(f"PRAGMA query_only = {int(on)}")


def test_what_was_published_from_memory_is_written_when_the_store_takes_writes(tmp_path):
    """Not persisted is a state: the values, the counter and every event still waiting go
    into the store the moment it takes writes, without a new transition; health is green
    then, and a restart sends nothing under a new id (and nothing already published)."""
    sink = MemorySink(hold=True)
    first = rig(tmp_path, sink)
    try:
        first.observe(MAINTENANCE, "NONE", first=True)
        first.observe(PREEMPTED, "FALSE", first=True)
        query_only(first.store, True)
        first.observe(MAINTENANCE, MIGRATE)  # published from memory, acknowledged
        sink.wait("the first send", lambda s: len(s.sends) == 1)
        sink.ack()
        wait_for("the first retired", lambda: first.relay.depth() == 0)
        first.observe(PREEMPTED, "TRUE")  # published from memory, not yet acknowledged
        sink.wait("the second send", lambda s: len(s.sends) == 2)
        first.recorder.retry_store()
        assert first.health.store_error, "still unwritable"
        query_only(first.store, False)
        first.recorder.retry_store()
        assert first.health.store_error == ""
        [(seq, waiting, _)] = first.store.load().pending
        assert (seq, waiting.kind) == (2, "preemption.started")
        snapshot = first.store.load()
        assert snapshot.values == {MAINTENANCE: MIGRATE, PREEMPTED: "TRUE"}
        assert snapshot.next_sequence == 3
    finally:
        sink.hold = False
        sink.ack()
        first.close()
    second = rig(tmp_path)
    try:
        second.observe(MAINTENANCE, MIGRATE, first=True)
        second.observe(PREEMPTED, "TRUE", first=True)
        after = second.published()
    finally:
        second.close()
    assert after == [], "a transition went out again after the restart"


def test_a_failed_begin_leaves_commits_synced(tmp_path):
    """A transaction not synced on its own (a retirement) sets synchronous=NORMAL for its
    commit: a BEGIN that fails (the database locked) must not leave it so for the next."""
    path = tmp_path / "bridge.sqlite3"
    store = Store(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        event = event_for(MAINTENANCE, "NONE", MIGRATE)
        store.record(event)
        store._db.execute("PRAGMA busy_timeout = 10")
        other.execute("BEGIN IMMEDIATE")  # holds the write lock
        with pytest.raises(sqlite3.OperationalError):
            store.ack(1, event.id, event.data.observed_at)
        assert store._db.execute("PRAGMA synchronous").fetchone() == (2,), "FULL"
    finally:
        other.close()
        store.close()


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
