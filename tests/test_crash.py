"""kill -9 at random points: every observed transition is published, under its first id only.

`maintenance-bridge run` (a real subprocess, stdout sink: one flushed JSON line per event) is
SIGKILLed at a random moment of each round while a driver thread keeps changing all three
watched keys of an in-process simulator every few milliseconds. Some kills land during start-up
(imports, opening the store, reading the identity, resuming the outbox), most while events flow
(between the metadata answer, the SQLite commit, the write to stdout and the retirement from the
outbox). After the last round a clean run drains what is left, then:

- every transition the bridge logged as recorded ("event ID, sequence N") is published with
  that id (its first one), and each sequence number is published under exactly one id;
- sequence numbers 1..N are all published (nothing recorded is lost) and per key the events
  chain up (`previous` of each = `current` of the one before), ending on the final value;
- the same id may be published twice (at least once: a kill between the write and the
  retirement); that count is reported, and every copy is identical.

- within each run, events go out in sequence order (what a restart resumes first included).

Where a kill lands is luck, so the rounds are a soak: BRIDGE_CRASH_ROUNDS sets their number
(CI default 20; the docs quote 100+); BRIDGE_TEST_SEED replays a run (a failure reports its
seed; the timing of a machine is not replayed). The windows that matter most are also hit
deterministically, each by a test of its own: the same `maintenance-bridge run` code in a
process whose stdout sink is wrapped by a fault (`faulty`, below, started with `python -c`;
nothing in the bridge knows of it) kills the process with SIGKILL at a named point:

- at the send of an event, before the sink has it: the restart sends it once, under the id
  it was recorded with (an event sent before its commit would be recorded again after the
  restart, under a new id, flagged happened_while_down);
- right after the sink has it, before it is retired: the restart sends it again under the same
  id (at least once, never renamed);
- with three events sent and none acknowledged: the restart sends all three, in sequence order
  (a restart that resumed the outbox in another order is caught here).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.harness import holds_for, wait_for, wait_for_text
from test_promises import STALL, stalled

from bridge.events import Event, decode_structured
from bridge.keys import KEYS, MAINTENANCE, PREEMPTED, UPCOMING
from bridge.simulator import Simulator
from bridge.store import read_status
from bridge.transitions import canonical

pytestmark = pytest.mark.faults

ROUNDS = int(os.environ.get("BRIDGE_CRASH_ROUNDS", "20"))
BIN = Path(sys.executable).with_name("maintenance-bridge")
RECORDED = re.compile(r"\(event ([0-9a-f-]{36}), sequence (\d+)")
WINDOWS = [
    json.dumps({"type": "SCHEDULED", "maintenance_status": "PENDING", "window_start_time": f"d{i}"})
    for i in range(7)
]
VALUES: dict[str, list[str | None]] = {
    MAINTENANCE: ["MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE", "NONE"],
    PREEMPTED: ["TRUE", "FALSE"],
    UPCOMING: [*WINDOWS, None],  # None: withdrawn (the 'no notifications' 503)
}


def write_figures(name: str, figures: dict[str, Any]) -> None:
    target = os.environ.get("BRIDGE_FIGURES_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        figures = {"test": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | (
            figures
        )
        (Path(target) / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


class Driver:
    """Changes a random key every few milliseconds until stopped; remembers the last values."""

    def __init__(self, sim: Simulator, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.position = dict.fromkeys(VALUES, 0)
        self.final: dict[str, str | None] = {MAINTENANCE: "NONE", PREEMPTED: "FALSE"}
        self.final[UPCOMING] = None
        self.changes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="driver", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.002, 0.02)):
            key = self.rng.choice(list(VALUES))
            values = VALUES[key]
            value = values[self.position[key] % len(values)]
            self.position[key] += 1
            if value is None:
                self.sim.delete_value(key)
            else:
                self.sim.set_value(key, value)
            self.final[key] = value
            self.changes += 1

    def __enter__(self) -> Driver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def spawn(
    sim: Simulator,
    state: Path,
    out: Path,
    err: Path,
    fault: str = "",
    fault_log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`maintenance-bridge run` on the stdout sink; with `fault`, the same run in a process whose
    sink is wrapped by `faulty` (which notes each send it sees in `fault_log`)."""
    command = [str(BIN)] if not fault else [sys.executable, "-c", CHILD]
    args = [
        *command,
        "run",
        "--metadata-url",
        sim.url,
        "--state-dir",
        str(state),
        "--poll-timeout",
        "5",
        "--retry-cap",
        "0.2",
        "--absent-interval",
        "0.05",
        "--drain-timeout",
        "5",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "GCE_", "PUBSUB"))}
    if fault:
        env |= {"CRASH_FAULT": fault, "CRASH_FAULT_LOG": str(fault_log)}
    with out.open("ab") as stdout, err.open("ab") as stderr:
        return subprocess.Popen(
            args, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env
        )


# A bridge process with a fault in its sink: this module, imported by `python -c`, runs the CLI.
CHILD = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_crash; " + (
    "test_crash.faulty()"
)
FAULTS = ("before_write", "after_write", "hold")


def faulty() -> None:
    """`maintenance-bridge run` (bridge.cli.main, the arguments after `-c CODE`) with its stdout
    sink wrapped: every send is first noted in $CRASH_FAULT_LOG (the process may die the next
    instant), then $CRASH_FAULT decides: `before_write` SIGKILLs the
    process before the sink writes the event, `after_write` right after it wrote and flushed
    it (before the bridge can retire it), `hold` never acknowledges it (the test kills)."""
    from concurrent.futures import Future

    from bridge.cli import main
    from bridge.sinks.stdout import StdoutSink

    fault, noted = os.environ["CRASH_FAULT"], Path(os.environ["CRASH_FAULT_LOG"])
    assert fault in FAULTS, fault
    send = StdoutSink.send

    fd = os.open(noted, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def faulty_send(self: StdoutSink, event: Event) -> Future[str]:
        # One write(2): in the page cache at once, so it outlives the SIGKILL a moment later.
        os.write(
            fd, (json.dumps({"id": event.id, "sequence": event.data.sequence}) + "\n").encode()
        )
        if fault == "hold":
            return Future()
        if fault == "after_write":
            send(self, event)
        os.kill(os.getpid(), signal.SIGKILL)
        return Future()  # not reached: SIGKILL to itself is delivered before kill() returns

    StdoutSink.send = faulty_send  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))


@contextlib.contextmanager
def killing(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def final_canonical(key: str, value: str | None) -> str:
    if value is None:
        return KEYS[key].baseline
    return canonical(key, json.loads(value) if key == UPCOMING else value)


def settle(proc: subprocess.Popen[bytes], state: Path, err: Path, wanted: dict[str, str]) -> None:
    """Until the bridge has emptied its outbox and stored the `wanted` value of every key (what
    a restart compares with the live values is then told), then SIGTERM: it must exit 0."""
    deadline = time.monotonic() + 60

    def settled() -> bool:
        with contextlib.suppress(Exception):
            status = read_status(state / "bridge.sqlite3")
            stored = {k: v["value"] for k, v in status["keys"].items()}
            return status["outbox_depth"] == 0 and all(
                stored.get(k, KEYS[k].baseline) == v for k, v in wanted.items()
            )
        return False

    wait_for_text(err, "watching")  # handlers installed
    while not settled():
        assert time.monotonic() < deadline, "the bridge did not catch up"
        assert proc.poll() is None, err.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def published(path: Path) -> tuple[list[Event], bool]:
    """The events a run wrote to stdout, and whether its last line was torn (no ack)."""
    body, _, tail = path.read_text().rpartition("\n")
    return [decode_structured(json.loads(line)) for line in body.splitlines() if line], bool(tail)


def test_kill_minus_nine_at_random_points(tmp_path, seed, rng):
    state, logs = tmp_path / "state", tmp_path / "logs"
    logs.mkdir()
    kills = {"during_startup": 0, "while_watching": 0}
    resumed_rounds = 0
    started = time.monotonic()
    sim = Simulator().start()
    try:
        with Driver(sim, rng) as driver:
            for n in range(ROUNDS):
                out, err = logs / f"out-{n:04d}.jsonl", logs / f"err-{n:04d}.log"
                with killing(spawn(sim, state, out, err)) as proc:
                    if rng.random() < 0.25:
                        time.sleep(rng.uniform(0.0, 0.6))
                        kills["during_startup"] += 1
                    else:
                        wait_for_text(err, "watching")
                        time.sleep(rng.uniform(0.0, 0.5))
                        kills["while_watching"] += 1
                    assert proc.poll() is None, f"round {n}: the bridge exited by itself"
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                if "resuming:" in err.read_text(errors="replace"):
                    resumed_rounds += 1
            changes = driver.changes
            final = dict(driver.final)
        # A clean run drains the outbox and catches up with the final values.
        out, err = logs / "out-final.jsonl", logs / "err-final.log"
        wanted = {key: final_canonical(key, value) for key, value in final.items()}
        with killing(spawn(sim, state, out, err)) as proc:
            settle(proc, state, err, wanted)
        next_sequence = read_status(state / "bridge.sqlite3")["next_sequence"]
    finally:
        sim.stop()

    # What was published: every JSON line of every round (a line torn by the kill is no ack).
    copies: list[Event] = []
    torn = 0
    for path in sorted(logs.glob("out-*.jsonl")):
        events, was_torn = published(path)
        torn += was_torn
        copies += events
        # Within one run, events go out in sequence order, what it resumed from the outbox first.
        sequences = [e.data.sequence for e in events]
        assert sequences == sorted(set(sequences)), f"{path.name} out of order: {sequences}"
    by_id: dict[str, Event] = {}
    for event in copies:
        first = by_id.setdefault(event.id, event)
        assert first.to_structured() == event.to_structured(), "a re-publish changed the event"
    ids_by_sequence: dict[int, set[str]] = defaultdict(set)
    for event in by_id.values():
        ids_by_sequence[event.data.sequence].add(event.id)
    two_ids = {seq: ids for seq, ids in ids_by_sequence.items() if len(ids) > 1}
    assert not two_ids, f"transitions published under two ids: {two_ids}"

    # Nothing recorded is lost: sequences 1..N are all published.
    recorded = next_sequence - 1
    lost = sorted(set(range(1, recorded + 1)) - set(ids_by_sequence))
    assert not lost, f"recorded but never published: {lost}"
    assert max(ids_by_sequence) == recorded

    # Every transition the bridge said it recorded went out under that (first) id.
    logged: dict[str, int] = {}
    for path in sorted(logs.glob("err-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if m := RECORDED.search(line):
                logged[m.group(1)] = int(m.group(2))
    assert logged, "no transition was logged"
    for event_id, seq in logged.items():
        assert event_id in by_id, f"logged event {event_id} (sequence {seq}) never published"
        assert by_id[event_id].data.sequence == seq

    # Per key, the events chain up from the baseline to the final value: no transition missed
    # in the bridge's own view, none told twice.
    events = sorted(by_id.values(), key=lambda e: e.data.sequence)
    for key in VALUES:
        chain = [e for e in events if e.data.key == key]
        previous = KEYS[key].baseline
        for event in chain:
            assert event.data.previous == previous, (key, event.data.sequence)
            assert event.data.current != previous
            previous = event.data.current
        assert previous == wanted[key], key

    redelivered = len(copies) - len(by_id)
    figures = {
        "rounds": ROUNDS,
        "seed": seed,
        "kills_during_startup": kills["during_startup"],
        "kills_while_watching": kills["while_watching"],
        "rounds_that_resumed_a_non_empty_outbox": resumed_rounds,
        "metadata_changes_made": changes,
        "transitions_recorded": recorded,
        "transitions_logged_as_recorded": len(logged),
        "events_published_distinct_ids": len(by_id),
        "lines_published_total": len(copies),
        "same_id_published_again": redelivered,
        "torn_lines": torn,
        "events_lost": len(lost),
        "transitions_under_two_ids": len(two_ids),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(figures))
    write_figures("crash", figures)


# -- kills at named points ------------------------------------------------------------------------

QUIET = {MAINTENANCE: "NONE", PREEMPTED: "FALSE", UPCOMING: KEYS[UPCOMING].baseline}


def noted(path: Path) -> list[dict[str, Any]]:
    """What `faulty` noted: the id and sequence of each event its sink was given."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def outbox_rows(state: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(state / "bridge.sqlite3")) as db:
        return db.execute("SELECT seq, id FROM outbox ORDER BY seq").fetchall()


@pytest.mark.parametrize("point", ["before_write", "after_write"])
def test_killed_at_the_send_a_restart_sends_the_event_under_its_first_id(
    sim: Simulator, tmp_path: Path, point: str
) -> None:
    """SIGKILL at the moment the sink is handed the event (before it has it, or after it has it
    and before the bridge retired it): the restart sends it under the id it was recorded with,
    once more, and records nothing again (the new value was stored with the event). The commit
    is held up meanwhile (SQLite's write lock, from the test): a bridge that sent before
    committing dies with nothing committed, and its restart tells the change again, under a new
    id."""
    state, logs = tmp_path / "state", tmp_path / "logs"
    logs.mkdir()
    fault_log = logs / "sends.jsonl"
    out, err = logs / "out-1.jsonl", logs / "err-1.log"
    with killing(spawn(sim, state, out, err, point, fault_log)) as proc:
        wait_for_text(err, "watching")
        with stalled(state / "bridge.sqlite3"):
            sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
            holds_for("nothing sent while the commit waits", lambda: not noted(fault_log), STALL)
        assert proc.wait(30) == -signal.SIGKILL, err.read_text()
    (attempt,) = noted(fault_log)
    before, _ = published(out)
    assert [e.id for e in before] == ([attempt["id"]] if point == "after_write" else [])
    assert outbox_rows(state) == [(attempt["sequence"], attempt["id"])]
    out, err = logs / "out-2.jsonl", logs / "err-2.log"
    with killing(spawn(sim, state, out, err)) as proc:
        settle(proc, state, err, QUIET | {MAINTENANCE: "MIGRATE_ON_HOST_MAINTENANCE"})
    after, torn = published(out)
    assert not torn
    assert [(e.id, e.data.sequence) for e in after] == [(attempt["id"], attempt["sequence"])], (
        "the restart did not send the recorded event once, under its first id"
    )
    assert after[0].kind == "maintenance.started"
    assert not after[0].data.happened_while_down
    assert before in ([], after), "the event sent again is not the one the sink had"


def test_a_restart_sends_the_unacknowledged_events_in_sequence_order(
    sim: Simulator, tmp_path: Path
) -> None:
    """Three events sent, none acknowledged, then SIGKILL: the restart sends all three before
    anything else, in sequence order, under their ids."""
    state, logs = tmp_path / "state", tmp_path / "logs"
    logs.mkdir()
    fault_log = logs / "sends.jsonl"
    out, err = logs / "out-1.jsonl", logs / "err-1.log"
    changes = {MAINTENANCE: VALUES[MAINTENANCE][0], PREEMPTED: "TRUE", UPCOMING: WINDOWS[0]}
    with killing(spawn(sim, state, out, err, "hold", fault_log)) as proc:
        wait_for_text(err, "watching")
        for key, value in changes.items():
            sim.set_value(key, value)
        wait_for("three events in the outbox", lambda: len(outbox_rows(state)) == 3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    held = outbox_rows(state)
    assert [seq for seq, _ in held] == [1, 2, 3]
    assert {n["id"] for n in noted(fault_log)} <= {event_id for _, event_id in held}
    out, err = logs / "out-2.jsonl", logs / "err-2.log"
    with killing(spawn(sim, state, out, err)) as proc:
        wanted = {key: final_canonical(key, value) for key, value in changes.items()}
        settle(proc, state, err, wanted)
    after, _ = published(out)
    assert [(e.data.sequence, e.id) for e in after] == held
