"""The outbox relay on its own: an in-memory sink, a real state store, no emulator.

What users rely on: events reach the sink in sequence order, sent by the relay thread alone
(never the caller of `enqueue`), an event leaves the outbox only once the sink has it, a
failing sink is retried with back-off under the same id, an outage is logged once per failure
class with one recovery line, stale heartbeats are coalesced, and a drain retires what was
acknowledged before it ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support.full_disk import FullDisk
from support.harness import INSTANCE, SCHEDULING, event_for, holds_for, wait_for
from support.memory_sink import DENIED_HINT, FAILURES, MemorySink, SinkDenied, SinkDown, SinkPaused

from bridge.events import MAINTENANCE, PREEMPTED, Event, build_event
from bridge.metrics import Metrics
from bridge.relay import Relay
from bridge.retry import publish_policy
from bridge.store import Store

RETRY_CAP = 0.2

# A run of transitions alternating between two keys, as the recorder would number them.
STEPS = [
    (MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE"),
    (PREEMPTED, "FALSE", "TRUE"),
    (MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "NONE"),
    (PREEMPTED, "TRUE", "FALSE"),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "bridge.sqlite3")
    try:
        yield store
    finally:
        store.close()


def start_relay(sink: MemorySink, store: Store, *, start: bool = True) -> Relay:
    relay = Relay(sink, store, Metrics(), retry_cap=RETRY_CAP, failures=FAILURES)
    if start:
        relay.start()
    return relay


def record(relay: Relay, store: Store, events: list[Event]) -> None:
    """What the recorder does: the outbox row first, then the relay's queue."""
    for event in events:
        store.record(event)
        relay.enqueue(event.data.sequence, event, None, [])


def pending(store: Store) -> list[int]:
    return [seq for seq, _, _ in store.load().pending]


def numbered(n: int, first: int = 1) -> list[Event]:
    return [event_for(*STEPS[i % len(STEPS)], sequence=first + i) for i in range(n)]


def relay_lines(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.relay" and r.levelno == level and text in r.getMessage()
    ]


def test_events_reach_the_sink_in_sequence_order_and_each_once(store):
    sink = MemorySink()
    relay = start_relay(sink, store)
    events = numbered(250)  # more than one send window
    record(relay, store, events)
    assert relay.drain(timeout=20), "the outbox did not empty"
    assert sink.acked_ids() == [e.id for e in events]
    assert sink.sent_ids() == [e.id for e in events], "a healthy sink got a duplicate"
    assert pending(store) == []


def test_the_relay_thread_alone_sends_even_when_it_is_idle(store):
    sink = MemorySink(hold=True)
    relay = start_relay(sink, store)
    try:
        first, second = numbered(2)
        record(relay, store, [first])
        sink.wait("the first send", lambda s: len(s.sends) == 1)
        record(relay, store, [second])
        sink.ack()
        sink.wait("the second send", lambda s: len(s.sends) == 2)
        assert [s.thread for s in sink.sends] == ["relay", "relay"]
    finally:
        sink.hold = False
        sink.ack()
        assert relay.drain(timeout=10)
    assert sink.sent_ids() == [first.id, second.id], "an event was sent twice"


def heartbeat(sequence: int) -> Event:
    from bridge.recorder import HEARTBEAT

    return build_event(
        HEARTBEAT,
        event_id=str(uuid.uuid4()),
        sequence=sequence,
        observed_at=datetime.now(timezone.utc),
        instance=INSTANCE,
        scheduling=SCHEDULING,
        happened_while_down=False,
        notice_seconds=None,
    )


def test_stale_heartbeats_are_coalesced_and_never_hold_up_a_notice(store, caplog):
    """After an outage the outbox holds a heartbeat per interval: only the newest goes out,
    the others leave the outbox too, and the notices go out in order."""
    caplog.set_level(logging.INFO, logger="bridge.relay")
    sink = MemorySink()
    relay = start_relay(sink, store, start=False)
    events = [heartbeat(seq) for seq in range(1, 6)]
    events.append(event_for(PREEMPTED, "FALSE", "TRUE", sequence=6))
    events += [heartbeat(seq) for seq in range(7, 10)]
    record(relay, store, events)
    relay.start()
    assert relay.drain(timeout=10)
    assert [e.data.sequence for e in sink.acked] == [6, 9]
    assert pending(store) == []
    assert relay_lines(caplog, logging.INFO, "coalesced 7 stale heartbeats")


def test_a_drain_retires_what_was_acknowledged_before_it_ends(store):
    """SIGTERM while events are in flight: those acknowledged within the drain leave the
    outbox (the relay thread retires them before it ends), the rest stay for the next start,
    and the drain ends at its deadline."""
    sink = MemorySink(hold=True)
    relay = start_relay(sink, store, start=False)
    events = numbered(3)
    record(relay, store, events)  # queued together: one window, all three in flight
    relay.start()
    sink.wait("three sends", lambda s: len(s.sends) == 3)
    timer = threading.Timer(0.2, sink.ack, args=(1,))
    timer.start()
    started = time.monotonic()
    try:
        assert not relay.drain(timeout=1.0)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.5
    assert relay.stopped
    assert pending(store) == [2, 3]


def test_a_retirement_refused_by_a_full_disk_is_made_before_the_relay_ends(tmp_path):
    """An event acknowledged while the disk was full, then a drain once it is freed (before
    the relay's own retry timer): it leaves the outbox, so the next start does not send it
    again (a flake of test_faults' disk-full test, made deterministic)."""
    store = FullDisk(tmp_path / "bridge.sqlite3", "ack", times=1)
    try:
        sink = MemorySink()
        relay = start_relay(sink, store)
        (event,) = numbered(1)
        record(relay, store, [event])
        wait_for("the refused retirement", lambda: store.refusals == 1)
        assert relay.drain(timeout=10)
        assert relay.stopped
        assert pending(store) == [], "acknowledged, yet the next start would send it again"
        assert sink.sent_ids() == [event.id]
    finally:
        store.close()


def test_an_event_leaves_the_outbox_only_once_the_sink_has_it(store):
    sink = MemorySink(hold=True)
    relay = start_relay(sink, store, start=False)
    try:
        events = numbered(3)
        record(relay, store, events)  # queued together: one window, all three in flight
        relay.start()
        sink.wait("three sends", lambda s: len(s.sends) == 3)
        assert pending(store) == [1, 2, 3]
        # Later events acknowledged first: nothing retires past the unacknowledged first one.
        sink.ack(2, 3)
        holds_for("all three in the outbox", lambda: pending(store) == [1, 2, 3], 0.3)
        assert relay.depth() == 3
        sink.ack(1)
        wait_for("all three retired", lambda: pending(store) == [], timeout=10)
        assert relay.depth() == 0
        assert store.report()["last_publish"]["event_id"] == events[-1].id
    finally:
        sink.hold = False
        sink.ack()
        relay.drain(timeout=10)


def test_a_failing_sink_is_retried_with_back_off_under_the_same_id(store, caplog):
    caplog.set_level(logging.INFO, logger="bridge.relay")
    sink = MemorySink()
    sink.fail = SinkDown("the sink is down")
    relay = start_relay(sink, store)
    (event,) = numbered(1)
    record(relay, store, [event])
    sink.wait("eight attempts", lambda s: len(s.sends) >= 8, timeout=30)
    assert pending(store) == [1], "a refused event left the outbox"
    sink.fail = None
    sink.wait("the retry that gets through", lambda s: s.acked_ids() == [event.id], timeout=10)
    assert relay.drain(timeout=10)
    assert set(sink.sent_ids()) == {event.id}, "a retry changed the id"
    assert sink.recovered, "the sink was never asked to recover"
    # Back-off, not a tight loop: the n-th retry waits at least the policy's shortest draw.
    policy = publish_policy(RETRY_CAP)
    times = [s.at for s in sink.sends]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    shortest = [policy.delay(n, rand=1.0) for n in range(1, len(gaps) + 1)]
    assert all(gap >= least - 0.002 for gap, least in zip(gaps, shortest, strict=True)), gaps
    assert pending(store) == []


def fail_for(
    sink: MemorySink, error: Exception, then: Callable[[], None] = lambda: None, attempts: int = 3
) -> None:
    """Make the sink fail with `error`, call `then`, and wait for that many failed attempts."""
    before = len(sink.sends)
    sink.fail = error
    then()
    sink.wait(
        f"{attempts} attempts failing with {error!r}",
        lambda s: len(s.sends) >= before + attempts,
        timeout=30,
    )


def test_an_outage_is_logged_once_per_failure_class_and_its_end_once(store, caplog):
    caplog.set_level(logging.INFO, logger="bridge.relay")
    sink = MemorySink()
    relay = start_relay(sink, store)
    events = numbered(3)
    fail_for(sink, SinkDown("down"), lambda: record(relay, store, events[:1]))
    fail_for(sink, SinkDenied("no role"))
    fail_for(sink, SinkPaused("paused after the failure"))  # a follow-up: not news
    fail_for(sink, SinkDown("down again"))
    sink.fail = None
    wait_for("the recovery line", lambda: relay_lines(caplog, logging.INFO, "accepting again"))
    assert len(relay_lines(caplog, logging.ERROR, "unavailable")) == 1
    [denied] = relay_lines(caplog, logging.ERROR, "permission")
    assert denied.endswith(DENIED_HINT), "the sink's hint says what to fix"
    assert relay_lines(caplog, logging.ERROR, "paused") == []
    assert len(relay_lines(caplog, logging.INFO, "accepting again")) == 1
    # A second outage is news again: one more line, one more recovery.
    fail_for(
        sink,
        SinkDown("down once more"),
        lambda: record(relay, store, events[1:2]),
        1,
    )
    sink.fail = None
    record(relay, store, events[2:])
    assert relay.drain(timeout=10)
    wait_for(
        "the second recovery line",
        lambda: len(relay_lines(caplog, logging.INFO, "accepting again")) == 2,
    )
    assert len(relay_lines(caplog, logging.ERROR, "unavailable")) == 2
    assert len(relay_lines(caplog, logging.INFO, "accepting again")) == 2
    assert sink.acked_ids() == [e.id for e in events]


def test_a_follow_up_failure_is_told_when_it_is_the_first_of_its_outage(store, caplog):
    caplog.set_level(logging.INFO, logger="bridge.relay")
    sink = MemorySink()
    relay = start_relay(sink, store)
    events = numbered(1)
    fail_for(sink, SinkPaused("paused since the last run"), lambda: record(relay, store, events))
    sink.fail = None
    assert relay.drain(timeout=10)
    assert len(relay_lines(caplog, logging.ERROR, "paused")) == 1
    assert sink.acked_ids() == [events[0].id]


def test_pubsub_failures_are_classified_by_type_not_by_name():
    from google.api_core import exceptions as gexc
    from google.cloud.pubsub_v1.publisher.exceptions import PublishToPausedOrderingKeyException

    from bridge.config import Config
    from bridge.sinks import sink_type

    class NotFound(Exception):  # the library's class name, not its type
        pass

    class TopicGone(gexc.NotFound):  # a subclass is still a not-found
        pass

    topic = "projects/test-project/topics/maintenance"
    failures = sink_type("pubsub").failures(Config(sink="pubsub", topic=topic))
    assert failures.class_of(TopicGone("gone")) == "not_found"
    assert failures.class_of(NotFound("gone")) == "other"
    assert failures.class_of(gexc.Forbidden("no")) == "permission"
    assert failures.class_of(PublishToPausedOrderingKeyException("key")) == "paused"
    assert failures.class_of(gexc.DeadlineExceeded("slow")) == "unavailable"
    assert topic in failures.hint("permission"), "the hint names what to fix"
    assert "paused" in failures.follow_ups


def test_a_sink_without_classes_counts_every_failure_as_other(store, caplog):
    caplog.set_level(logging.INFO, logger="bridge.relay")
    sink = MemorySink()
    metrics = Metrics()
    relay = Relay(sink, store, metrics, retry_cap=RETRY_CAP)  # no failures: nothing classified
    relay.start()
    (event,) = numbered(1)
    fail_for(sink, SinkDown("down"), lambda: record(relay, store, [event]), 2)
    sink.fail = None
    assert relay.drain(timeout=10)
    assert metrics.publish_failures.labels("other")._value.get() >= 2
    assert metrics.publish_failures.labels("unavailable")._value.get() == 0
    assert len(relay_lines(caplog, logging.ERROR, "publish of")) == 1
