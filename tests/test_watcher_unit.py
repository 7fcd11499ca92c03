"""One key's watcher on its own, against the simulator in the test process.

What users rely on: every value the server gives is passed on in the order it came (the first
one flagged), failures are retried and logged once per failure class per outage with one
recovery line, a key that does not exist is asked again at its pace rather than in a tight
loop, and setting `stop` ends the watch even in the middle of a retry.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from support.harness import holds_for, wait_for

from bridge.config import Config
from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING
from bridge.health import Health
from bridge.metadata import CLIENT_SLACK, Reading
from bridge.metrics import Metrics
from bridge.simulator import Simulator
from bridge.watcher import NOTICE_POLL, NOTICE_SLACK, NoticeBoard, Watcher

ABSENT_INTERVAL = 0.2


class Observed:
    """The watcher's observer: every (value, first) it was given, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, key: str, value: str, at: datetime, seen: float, first: bool) -> None:
        with self._lock:
            self.calls.append((value, first))

    def values(self) -> list[str]:
        with self._lock:
            return [value for value, _ in self.calls]


class Watch:
    def __init__(
        self,
        sim: Simulator,
        key: str,
        state_dir: Path,
        board: NoticeBoard | None = None,
        poll_timeout: int = 1,
    ) -> None:
        self.sim, self.key = sim, key
        self.metrics = Metrics()
        self.observed = Observed()
        self.stop = threading.Event()
        config = Config(
            metadata_url=sim.url,
            state_dir=state_dir,
            poll_timeout=poll_timeout,
            retry_cap=0.2,
            absent_interval=ABSENT_INTERVAL,
        )
        self.watcher = Watcher(
            key, config, self.observed, self.stop, Health(), self.metrics, board=board
        )

    def errors(self, cls: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "maintenance_bridge_metadata_errors_total", {"class": cls}
        )
        return float(value or 0)

    def requests(self) -> int:
        return self.sim.stats().get(self.key, 0)

    def close(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.watcher.hurry()  # a poll in flight ends now, not at its timeout_sec
        self.watcher.thread.join(timeout)
        assert not self.watcher.thread.is_alive(), f"the watcher did not stop within {timeout} s"


@pytest.fixture
def watch(sim: Simulator, tmp_path: Path) -> Iterator[Watch]:
    w = Watch(sim, MAINTENANCE, tmp_path)
    w.watcher.start()
    assert w.watcher.answered.wait(10), "no first answer"
    try:
        yield w
    finally:
        w.close()


def lines(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.watcher" and r.levelno == level and text in r.getMessage()
    ]


def test_values_are_passed_on_in_order_and_only_the_first_is_flagged(watch, sim):
    changes = ["MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE", "NONE"]
    for n, value in enumerate(changes, start=2):
        sim.set_value(MAINTENANCE, value)
        wait_for(f"{value} observed", lambda n=n: len(watch.observed.values()) >= n)
    assert watch.observed.calls == [("NONE", True)] + [(v, False) for v in changes]


def test_an_outage_is_logged_once_per_class_and_its_end_once(watch, sim, caplog):
    caplog.set_level(logging.INFO, logger="bridge.watcher")
    for outage in (1, 2):  # each outage is news
        sim.inject("status", 4, MAINTENANCE, status=503)
        sim.inject("reset", 3, MAINTENANCE)
        sim.inject("status", 2, MAINTENANCE, status=500)
        # The poll in flight ends within poll_timeout; the requests after it fail.
        wait_for(
            "the faults used up",
            lambda n=outage: watch.errors("http_5xx") + watch.errors("connection") == 9 * n,
        )
        value = ("MIGRATE_ON_HOST_MAINTENANCE", "NONE")[outage - 1]
        sim.set_value(MAINTENANCE, value)
        wait_for(f"{value} observed", lambda v=value: watch.observed.values()[-1] == v)
        wait_for(
            "the recovery line",
            lambda n=outage: len(lines(caplog, logging.INFO, "answering again")) == n,
        )
    assert len(lines(caplog, logging.WARNING, "metadata http_5xx")) == 2
    assert len(lines(caplog, logging.WARNING, "metadata connection")) == 2
    assert len(lines(caplog, logging.INFO, "answering again")) == 2
    assert (watch.errors("http_5xx"), watch.errors("connection")) == (12, 6)


def test_a_rate_limit_is_retried_and_told_as_such(watch, sim, caplog):
    caplog.set_level(logging.INFO, logger="bridge.watcher")
    sim.inject("status", 3, MAINTENANCE, status=429)
    wait_for("the faults used up", lambda: watch.errors("http_429") == 3)
    sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    wait_for("the change", lambda: watch.observed.values()[-1] == "MIGRATE_ON_HOST_MAINTENANCE")
    assert len(lines(caplog, logging.WARNING, "metadata http_429")) == 1
    assert watch.errors("http_429") == 3
    assert len(lines(caplog, logging.INFO, "answering again")) == 1


def test_an_absent_key_is_asked_again_at_its_pace_and_told_once(sim, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bridge.watcher")
    sim.delete_value(PREEMPTED)
    w = Watch(sim, PREEMPTED, tmp_path)
    started = time.monotonic()
    w.watcher.start()
    try:
        wait_for("five requests", lambda: w.requests() >= 5)
        elapsed = time.monotonic() - started
        sim.set_value(PREEMPTED, "TRUE")
        wait_for("the key once it exists", lambda: w.observed.values() == ["TRUE"])
    finally:
        w.close()
    # Four pauses of absent_interval between five requests: never a tight loop.
    assert elapsed >= 4 * ABSENT_INTERVAL
    assert len(lines(caplog, logging.WARNING, "does not exist")) == 1


def test_stop_ends_the_watch_in_the_middle_of_retrying(watch, sim):
    sim.inject("status", 1_000_000, MAINTENANCE, status=503)
    wait_for("a few failed requests", lambda: watch.errors("http_5xx") >= 3)
    watch.close(timeout=5)  # the back-off sleep ends on stop: no waiting out a million 503s


class _Asked:
    """A client that records how each long-poll was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, float]] = []

    def watch(
        self, path: str, etag: str, timeout_sec: int, alt: str | None, slack: float = CLIENT_SLACK
    ) -> Reading:
        self.asked.append((timeout_sec, slack))
        return Reading("NONE", "e", 0.0)


def test_while_any_notice_is_on_every_key_is_asked_briefly(sim, tmp_path):
    """Calm: one request a minute per key; while any key says a notice is on, a poll the
    server never answers costs at most NOTICE_POLL + NOTICE_SLACK = 13 s (target: 15 s)."""
    board = NoticeBoard()
    w = Watch(sim, PREEMPTED, tmp_path, board, poll_timeout=60)
    client = _Asked()
    window = '{"maintenance_status":"ONGOING","type":"SCHEDULED"}'
    for key, value, on in [
        (UPCOMING, "", False),
        (MAINTENANCE, "NONE", False),
        (MAINTENANCE, "SOME_FUTURE_VALUE", True),  # unknown values are notices too
        (MAINTENANCE, "NONE", False),
        (PREEMPTED, "TRUE", True),
        (UPCOMING, window, True),  # two keys on: one going off leaves the other
        (PREEMPTED, "FALSE", True),
        (UPCOMING, window.replace("ONGOING", "PENDING"), False),
    ]:
        board.update(key, value)
        w.watcher._poll(client, "e")  # type: ignore[arg-type]
        assert client.asked[-1] == ((NOTICE_POLL, NOTICE_SLACK) if on else (60, CLIENT_SLACK))
    assert NOTICE_POLL + NOTICE_SLACK <= 15


def test_a_notice_cuts_the_other_watchers_calm_polls_short(sim, tmp_path, caplog):
    """The preempted watcher's calm poll (timeout_sec=60) is re-asked at once when
    maintenance-event turns: silently, since nothing failed."""
    caplog.set_level(logging.INFO, logger="bridge.watcher")
    board = NoticeBoard()
    watches = [
        Watch(sim, key, tmp_path, board, poll_timeout=60) for key in (MAINTENANCE, PREEMPTED)
    ]
    for w in watches:
        w.watcher.start()
    try:
        wait_for("both polls hanging", lambda: sim.hanging(MAINTENANCE) and sim.hanging(PREEMPTED))
        asked = watches[1].requests()  # the first answer (last_etag=0) and the hanging poll
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        wait_for("preempted asked again", lambda: watches[1].requests() == asked + 1, 5)
        sim.set_value(PREEMPTED, "TRUE")
        wait_for("its change", lambda: watches[1].observed.values() == ["FALSE", "TRUE"], 5)
    finally:
        for w in watches:
            w.close()
    assert not lines(caplog, logging.WARNING, "metadata"), "a hurried poll is not an outage"
    assert watches[1].errors("connection") == 0


def test_an_absent_key_is_asked_at_a_notices_pace_while_one_is_on(sim, tmp_path, monkeypatch):
    """upcoming-maintenance answering its 503 is asked again after absent_interval (here 60 s)
    in calm, but after NOTICE_POLL (scaled down to 1 s here) while a notice is on."""
    monkeypatch.setattr("bridge.watcher.NOTICE_POLL", 1)
    sim.delete_value(UPCOMING)
    board = NoticeBoard()
    board.update(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    w = Watch(sim, UPCOMING, tmp_path, board, poll_timeout=60)
    w.watcher.config = dataclasses.replace(w.watcher.config, absent_interval=60.0)
    w.watcher.start()
    try:
        wait_for("three requests a second apart", lambda: w.requests() >= 3, 10)
        board.update(MAINTENANCE, "NONE")
        calm = w.requests()
        holds_for("calm: no request before absent_interval", lambda: w.requests() <= calm + 1, 3)
    finally:
        w.close()
