"""The core's promises, each asserted at the moment it matters, through surfaces users rely on.

README.md and docs/events.md promise that an event is recorded (its key's new value and the
event itself, in one durable transaction) before it is sent; that it leaves the outbox only once
the sink acknowledged it; that hooks run beside publishing and never before the event is
durable; that events go out in sequence order per instance, each under one id only, a resend
under the same id; that heartbeats are numbered events of the same stream; and that a change
made while the bridge was down is told once, flagged. A test that only looks at what came out
in the end cannot see the first of these broken: sending before committing delivers the same
events, in the same order. So these tests look at the store at the moment it matters:

- `ProbingSink.send` reads the state store from a connection of its own, at the moment the
  relay calls it (whichever thread that is): the event must already be in the outbox under its
  id and sequence number, and its key's state already hold the new value;
- an `--exec` hook (a real subprocess) reads the store when it starts, the same way;
- `stalled` holds SQLite's write lock from outside while a change happens, so that the
  recorder's commit cannot complete: nothing may be sent and no hook may start meanwhile. That
  turns "sent before committed" from a race of a few hundred microseconds into a window of a
  few hundred milliseconds that any such order falls into.

The bridge runs in-process (bridge.daemon.run, the same code `maintenance-bridge run` runs) on
a simulator; tests/test_crash.py covers the same promises across real process deaths.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from support.harness import InProcessBridge, holds_for, in_process, wait_for
from support.memory_sink import MemorySink, SinkDown

from bridge.config import Config
from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING, Event
from bridge.keys import HEARTBEAT_KIND, KEYS
from bridge.simulator import Simulator, sample_window
from bridge.store import DB_NAME

STALL = 0.3  # seconds the commit is held up: far longer than any send or hook start takes


@dataclass(frozen=True)
class Seen:
    """What the store held when an event was sent (or a hook started): its outbox row's id,
    the key's stored value and the next sequence number (one past the last one recorded)."""

    event_id: str
    sequence: int
    key: str
    current: str
    outbox_id: str | None
    state: str | None
    next_sequence: int
    ok: bool = True  # the sink took it (a MemorySink answers at once, unless it holds)

    def problems(self) -> list[str]:
        """What is wrong with the store at that moment, for this event ([] when durable)."""
        found = []
        if self.next_sequence <= self.sequence:
            found.append(f"next sequence {self.next_sequence} (not recorded yet)")
        if self.key in KEYS and self.state != self.current:
            found.append(f"state of {self.key} is {self.state!r}, not {self.current!r}")
        return found


def look(db: sqlite3.Connection, event_id: str, sequence: int, key: str, current: str) -> Seen:
    """Read the store as it is now (each statement its own read transaction)."""
    row = db.execute("SELECT id FROM outbox WHERE seq=?", (sequence,)).fetchone()
    state = db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
    nxt = db.execute("SELECT value FROM meta WHERE name='next_sequence'").fetchone()
    return Seen(
        event_id,
        sequence,
        key,
        current,
        row[0] if row else None,
        state[0] if state else None,
        int(nxt[0]) if nxt else 1,
    )


class ProbingSink(MemorySink):
    """A memory sink whose `send` first reads the state store, as it is at that moment."""

    def __init__(self, db_path: Path, *, hold: bool = False) -> None:
        super().__init__(hold=hold)
        self.db_path = db_path
        self.seen: list[Seen] = []
        self._db: sqlite3.Connection | None = None
        self._probe_lock = threading.Lock()

    def send(self, event: Event) -> Any:
        with self._probe_lock:
            if self._db is None:
                self._db = sqlite3.connect(
                    self.db_path, isolation_level=None, check_same_thread=False
                )
            data = event.data
            seen = look(self._db, event.id, data.sequence, data.key, data.current)
        future = super().send(event)
        failed = future.done() and future.exception() is not None
        with self._probe_lock:
            self.seen.append(replace(seen, ok=not failed))
        return future

    def close(self) -> None:
        with self._probe_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def first_sends(self) -> list[Seen]:
        """The store at the first send of each event (a resend sees a later store)."""
        firsts: dict[str, Seen] = {}
        for seen in list(self.seen):
            firsts.setdefault(seen.event_id, seen)
        return list(firsts.values())


# The --exec hook: a real subprocess that reads the store the moment it starts and appends what
# it saw, as JSON, to a file (the event arrives on stdin, as every hook gets it).
HOOK = textwrap.dedent(
    """
    import json, sqlite3, sys
    db_path, out = sys.argv[1], sys.argv[2]
    event = json.load(sys.stdin)
    data = event["data"]
    db = sqlite3.connect(db_path, isolation_level=None)
    row = db.execute("SELECT id FROM outbox WHERE seq=?", (data["sequence"],)).fetchone()
    state = db.execute("SELECT value FROM state WHERE key=?", (data["key"],)).fetchone()
    nxt = db.execute("SELECT value FROM meta WHERE name='next_sequence'").fetchone()
    seen = [event["id"], data["sequence"], data["key"], data["current"], row and row[0],
            state and state[0], int(nxt[0]) if nxt else 1]
    with open(out, "a") as f:
        f.write(json.dumps(seen) + "\\n")
    """
)


def hook_seen(out: Path) -> list[Seen]:
    if not out.exists():
        return []
    return [Seen(*json.loads(line)) for line in out.read_text().splitlines() if line]


@contextlib.contextmanager
def stalled(db_path: Path) -> Iterator[None]:
    """SQLite's write lock, held from another connection: the bridge's next commit waits
    (its busy timeout is 5 s) until the block ends."""
    db = sqlite3.connect(db_path, isolation_level=None, timeout=5.0)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


def config_for(sim: Simulator, state_dir: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "metadata_url": sim.url,
        "state_dir": state_dir,
        "poll_timeout": 5,
        "retry_cap": 0.05,
        "absent_interval": 0.05,
        "drain_timeout": 2.0,
    }
    values.update(overrides)
    state_dir.mkdir(parents=True, exist_ok=True)
    return Config(**values)


def stored(db_path: Path) -> dict[str, str]:
    """The state table ({} while the bridge has not made it yet)."""
    if not db_path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        try:
            return dict(db.execute("SELECT key, value FROM state").fetchall())
        except sqlite3.OperationalError:  # no such table: the store is being created
            return {}


@contextlib.contextmanager
def running(
    sim: Simulator, state_dir: Path, sink: Any, **overrides: Any
) -> Iterator[InProcessBridge]:
    """The bridge in-process on `state_dir`, once every watcher has handled its first answer
    (the simulator has been asked each key again since) and every key's value is stored: a
    change made from then on is one the bridge sees while running."""
    config = config_for(sim, state_dir, **overrides)
    db_path, asked = state_dir / DB_NAME, sim.stats()
    with in_process(config, sink) as bridge:

        def ready() -> bool:
            now = sim.stats()
            answered = all(now.get(key, 0) >= asked.get(key, 0) + 2 for key in config.keys)
            return answered and set(config.keys) <= set(stored(db_path))

        wait_for("every watcher past its first answer", ready, 10, detail=lambda: bridge.errors)
        yield bridge


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


# -- recorded before sent -------------------------------------------------------------------------


def test_every_event_is_in_the_store_when_the_sink_gets_it(sim: Simulator, state: Path) -> None:
    """Recorded before sent: at the moment `send` is called, the event is in the outbox under its
    own id and sequence number and its key's state already holds the new value; while the
    commit is held up, nothing is sent at all."""
    db_path = state / DB_NAME
    sink = ProbingSink(db_path)
    with running(sim, state, sink):
        with stalled(db_path):
            sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
            holds_for("nothing sent while the commit waits", lambda: not sink.sends, STALL)
        sink.wait("the migration acknowledged", lambda s: len(s.acked) == 1)
        for n, (key, value) in enumerate(
            [(PREEMPTED, "TRUE"), (UPCOMING, json.dumps(sample_window())), (MAINTENANCE, "NONE")],
            start=2,
        ):
            sim.set_value(key, value)
            sink.wait(f"event {n} acknowledged", lambda s, n=n: len(s.acked) == n)
    seen = sink.first_sends()
    assert [s.sequence for s in seen] == [1, 2, 3, 4]
    for s in seen:
        assert s.outbox_id == s.event_id, f"event {s.sequence} not in the outbox when sent: {s}"
        assert not s.problems(), f"event {s.sequence} sent before it was recorded: {s}"


# -- hooks never before durable -------------------------------------------------------------------


def test_hooks_start_only_once_the_event_is_durable(
    sim: Simulator, state: Path, tmp_path: Path
) -> None:
    """A hook runs beside publishing, never before: when it starts, its event and its key's
    new value are committed; while the commit is held up, no hook starts."""
    db_path, out, script = state / DB_NAME, tmp_path / "hooks.jsonl", tmp_path / "probe_hook.py"
    script.write_text(HOOK)
    hook = f"{sys.executable} {script} {db_path} {out}"
    sink = MemorySink()
    with running(sim, state, sink, exec=(hook,)):
        with stalled(db_path):
            sim.set_value(PREEMPTED, "TRUE")
            holds_for("no hook started while the commit waits", lambda: not out.exists(), STALL)
        wait_for("the preemption's hook", lambda: len(hook_seen(out)) == 1)
        sim.set_value(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE")
        wait_for("the maintenance event's hook", lambda: len(hook_seen(out)) == 2)
    seen = sorted(hook_seen(out), key=lambda s: s.sequence)
    assert [s.sequence for s in seen] == [1, 2]
    assert [s.event_id for s in seen] == [e.id for e in sink.events()]
    for s in seen:
        assert not s.problems(), f"event {s.sequence}'s hook started before it was durable: {s}"


# -- it leaves the outbox only once acknowledged; a restart sends what is left, under its id ------


def outbox(db_path: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        return db.execute("SELECT seq, id FROM outbox ORDER BY seq").fetchall()


def test_an_event_stays_in_the_outbox_until_the_sink_acknowledges_it(
    sim: Simulator, state: Path
) -> None:
    """Sent is not acknowledged: while the sink holds an event, the outbox keeps it (and the
    next one waits behind it); it leaves only when the sink says it has it."""
    db_path = state / DB_NAME
    sink = MemorySink(hold=True)
    with running(sim, state, sink):
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        (sent,) = sink.wait("the event sent", lambda s: s.sends)
        sim.set_value(PREEMPTED, "TRUE")
        wait_for("the next one recorded", lambda: len(outbox(db_path)) == 2)
        holds_for(
            "the sent event in the outbox", lambda: outbox(db_path)[0][1] == sent.event.id, 0.2
        )
        sink.ack(1)
        sink.wait("the next one sent", lambda s: len(s.sends) == 2)
        assert [seq for seq, _ in outbox(db_path)] == [2]
        sink.ack(2)
        wait_for("the outbox to empty", lambda: not outbox(db_path))


def test_events_left_unacknowledged_go_out_after_a_restart_once_under_their_ids(
    sim: Simulator, state: Path
) -> None:
    """What the sink never acknowledged goes out on the next start, in order, under the ids it
    was first sent with; nothing already acknowledged and no change is told again."""
    db_path = state / DB_NAME
    first = MemorySink()
    with running(sim, state, first, drain_timeout=0.1):
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        first.wait("the first event acknowledged", lambda s: len(s.acked) == 1)
        wait_for("the first event retired", lambda: not outbox(db_path))
        first.fail = SinkDown("down until the restart")
        sim.set_value(PREEMPTED, "TRUE")
        sim.set_value(UPCOMING, json.dumps(sample_window()))
        wait_for("the two later events recorded", lambda: len(outbox(db_path)) == 2)
        first.wait("the second sent", lambda s: len(s.sends) >= 2)
    left = outbox(db_path)
    assert [seq for seq, _ in left] == [2, 3]
    second = MemorySink()
    with running(sim, state, second):
        second.wait("the outbox resent", lambda s: len(s.acked) == 2)
        holds_for("nothing more sent", lambda: len(second.sends) == 2, 0.2)
    assert [(e.data.sequence, e.id) for e in second.acked] == left
    sent_first = {e.event.id: e.event.to_structured() for e in first.sends}
    assert second.acked[0].to_structured() == sent_first[left[0][1]]


# -- order per instance, one id per event ---------------------------------------------------------


def test_order_per_instance_and_one_id_per_event_through_a_sink_outage(
    sim: Simulator, state: Path
) -> None:
    """Events go out in sequence order, numbered 1, 2, 3 across keys, all from one thread; a
    failed send is sent again, from the first unacknowledged event on, under the same id and
    with the same body."""
    db_path = state / DB_NAME
    sink = ProbingSink(db_path)
    with running(sim, state, sink):
        sink.fail = SinkDown("down for the test")
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        sim.set_value(PREEMPTED, "TRUE")
        sim.set_value(UPCOMING, json.dumps(sample_window()))
        wait_for("three events recorded", lambda: len(outbox(db_path)) == 3)
        sink.wait("a resend after a failure", lambda s: len(s.sends) >= 3)
        sink.fail = None
        sink.wait("all three acknowledged", lambda s: len(s.acked) == 3)
        sim.set_value(MAINTENANCE, "NONE")
        sink.wait("the fourth acknowledged", lambda s: len(s.acked) == 4)
    assert [e.data.sequence for e in sink.acked] == [1, 2, 3, 4]
    assert len({e.id for e in sink.acked}) == 4, "two events under one id"
    # One thread sends (the relay's): no other can overtake it with a later event.
    assert {send.thread for send in sink.sends} == {"relay"}
    by_sequence: dict[int, set[str]] = {}
    for send in sink.sends:
        by_sequence.setdefault(send.event.data.sequence, set()).add(send.event.id)
        first = next(e for e in sink.sends if e.event.id == send.event.id)
        assert send.event.to_structured() == first.event.to_structured(), "a resend changed it"
    assert all(len(ids) == 1 for ids in by_sequence.values()), f"under two ids: {by_sequence}"
    firsts = [s.sequence for s in sink.first_sends()]
    assert firsts == sorted(firsts), f"first sent out of order: {firsts}"
    # Each round of sends starts at the oldest event not yet acknowledged and goes on in order.
    done: set[int] = set()
    previous = 0
    for seen in sink.seen:
        oldest = min(set(range(1, seen.sequence + 1)) - done)
        assert seen.sequence in (previous + 1, oldest), (
            f"sequence {seen.sequence} sent after {previous}, with {oldest} not acknowledged"
        )
        previous = seen.sequence
        if seen.ok:
            done.add(seen.sequence)


# -- heartbeats -----------------------------------------------------------------------------------


def test_heartbeats_are_recorded_numbered_events_of_the_same_stream(
    sim: Simulator, state: Path
) -> None:
    """`bridge.heartbeat` every interval, recorded before sent like any event, numbered in the
    same stream as the changes, never flagged as a startup or while-down event, and no value of
    a key changes."""
    db_path, interval = state / DB_NAME, 0.1
    sink = ProbingSink(db_path)
    with running(sim, state, sink, heartbeat_interval=interval):
        sink.wait("two heartbeats", lambda s: len(s.acked) >= 2)
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        sink.wait("the migration", lambda s: any(e.data.key == MAINTENANCE for e in s.acked))
        sink.wait("a heartbeat after it", lambda s: s.acked[-1].kind == HEARTBEAT_KIND)
        values = stored(db_path)
    events = list(sink.acked)
    beats = [e for e in events if e.kind == HEARTBEAT_KIND]
    assert len(beats) >= 3
    # Numbered with the changes, in order (a heartbeat that waited behind a newer one may be
    # coalesced away, so a gap is allowed, at a heartbeat only).
    sequences = [e.data.sequence for e in events]
    assert sequences == sorted(set(sequences)), sequences
    assert len({e.data.stream_id for e in events}) == 1
    assert values[MAINTENANCE] == "MIGRATE_ON_HOST_MAINTENANCE"
    for beat in beats:
        assert beat.type == f"{Config.type_prefix}.{HEARTBEAT_KIND}"
        assert (beat.data.previous, beat.data.current) == ("", "")
        # false, as the schema has it: not absent, not null
        assert json.loads(beat.structured)["data"]["at_startup"] is False
        assert json.loads(beat.structured)["data"]["happened_while_down"] is False
        assert beat.data.notice_seconds is None
    for seen in sink.first_sends():
        assert seen.outbox_id == seen.event_id and not seen.problems(), seen
    sent_at = [s.at for s in sink.sends if s.event.kind == HEARTBEAT_KIND]
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert min(gaps) > interval / 2, f"heartbeats closer than their interval: {gaps}"


def test_hooks_never_run_for_heartbeats(sim: Simulator, state: Path, tmp_path: Path) -> None:
    """docs/local-actions.md: a hook runs for every event kind except `bridge.heartbeat`, even
    one limited to no kind at all; the change between the heartbeats runs it once."""
    out, script = tmp_path / "hooks.jsonl", tmp_path / "probe_hook.py"
    script.write_text(HOOK)
    hook = f"{sys.executable} {script} {state / DB_NAME} {out}"
    sink = MemorySink()
    with running(sim, state, sink, exec=(hook,), heartbeat_interval=0.05):
        wait_for("three heartbeats", lambda: len(beats(sink)) >= 3)
        sim.set_value(PREEMPTED, "TRUE")
        wait_for("the preemption's hook", lambda: len(hook_seen(out)) == 1)
        wait_for("three more heartbeats", lambda: len(beats(sink)) >= 6)
    (seen,) = hook_seen(out)
    preemption = next(e for e in sink.events() if e.kind != HEARTBEAT_KIND)
    assert seen.event_id == preemption.id, "a hook ran for a heartbeat"


def beats(sink: MemorySink) -> list[Event]:
    return [e for e in sink.events() if e.kind == HEARTBEAT_KIND]


# -- a change while the bridge was down; a notice already on at a first start ---------------------


def test_a_change_while_down_is_told_once_flagged_and_nothing_is_told_again(
    sim: Simulator, state: Path
) -> None:
    """First start with a notice on: one event, `at_startup` but not `happened_while_down` (the
    bridge never had a value). A restart that finds other values: one event per key that
    differs, both flags set; a key that did not change says nothing; a change seen while
    running has neither flag; the sequence goes on."""
    sim.set_value(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE")
    first = MemorySink()
    with running(sim, state, first):
        first.wait("the notice already on", lambda s: len(s.acked) == 1)
    sim.set_value(MAINTENANCE, "NONE")  # while the bridge is not running
    sim.set_value(PREEMPTED, "TRUE")
    second = MemorySink()
    with running(sim, state, second):
        second.wait("what changed while down", lambda s: len(s.acked) == 2)
        sim.set_value(UPCOMING, json.dumps(sample_window()))
        second.wait("a change while running", lambda s: len(s.acked) == 3)
        holds_for("nothing else told", lambda: len(second.sends) == 3, 0.2)
    (on,) = first.acked
    assert on.kind == "maintenance.started" and on.data.previous == "NONE"
    assert on.data.at_startup and not on.data.happened_while_down
    *down, live = second.acked
    assert {(e.kind, e.data.previous) for e in down} == {
        ("maintenance.ended", "TERMINATE_ON_HOST_MAINTENANCE"),
        ("preemption.started", "FALSE"),
    }
    assert all(e.data.at_startup and e.data.happened_while_down for e in down)
    assert live.kind == "upcoming.scheduled"
    assert not live.data.at_startup and not live.data.happened_while_down
    assert [e.data.sequence for e in second.acked] == [2, 3, 4]
    assert {e.data.stream_id for e in second.acked} == {on.data.stream_id}
