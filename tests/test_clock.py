"""The wall clock only stamps: a step of it (NTP, a VM resumed) changes no deadline, retry,
heartbeat interval, health verdict or outbox age.

The bridge's own clock is stepped, not the machine's: libfaketime is broken under Python 3.11
here, so a `sitecustomize` put on the bridge process's PYTHONPATH offsets `time.time`,
`time.time_ns` and `datetime.now` by the number of seconds in a file the test writes. The
events' own stamps show that the step took effect (so the test cannot pass with a fake that
does nothing); latency, heartbeat gaps and the endpoints are measured on the test's clock.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from support.bridge import BridgeProcess
from support.harness import free_port, holds_for, in_process, wait_for
from support.memory_sink import MemorySink

from bridge.config import Config
from bridge.events import MAINTENANCE
from bridge.simulator import Simulator

SITECUSTOMIZE = '''
"""Test-only: this process's wall clock is offset by the seconds in $MB_TEST_CLOCK_FILE."""
import datetime as _dt
import os
import time as _time

_FILE = os.environ["MB_TEST_CLOCK_FILE"]
_REAL_TIME, _REAL_TIME_NS, _REAL_DATETIME = _time.time, _time.time_ns, _dt.datetime
_state = {"checked": -1.0, "offset": 0.0}


def _offset():
    now = _time.monotonic()
    if now - _state["checked"] > 0.01:
        _state["checked"] = now
        try:
            with open(_FILE) as f:
                _state["offset"] = float(f.read() or 0)
        except (OSError, ValueError):
            pass
    return _state["offset"]


def _stepped_time():
    return _REAL_TIME() + _offset()


def _stepped_time_ns():
    return _REAL_TIME_NS() + int(_offset() * 1e9)


class _SteppedDatetime(_REAL_DATETIME):
    @classmethod
    def now(cls, tz=None):
        return _REAL_DATETIME.fromtimestamp(_stepped_time(), tz)

    @classmethod
    def utcnow(cls):
        return _REAL_DATETIME.utcfromtimestamp(_stepped_time())


_time.time, _time.time_ns, _dt.datetime = _stepped_time, _stepped_time_ns, _SteppedDatetime
'''
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
INTERVAL = 0.5  # --heartbeat-interval


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator.start()


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def status(port: int, route: str) -> int | None:
    """The endpoint's status code; None while it is not listening yet."""
    try:
        return requests.get(f"http://127.0.0.1:{port}{route}", timeout=5).status_code
    except requests.ConnectionError:
        return None


def test_a_clock_step_of_an_hour_either_way_changes_nothing_but_stamps(sim, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(SITECUSTOMIZE)
    offset = tmp_path / "offset"
    offset.write_text("0")
    port = free_port()
    bridge = BridgeProcess(
        sim.url,
        tmp_path / "state",
        "--heartbeat-interval",
        str(INTERVAL),
        "--http-port",
        str(port),
        "--poll-timeout",
        "5",
        "--ready-max-outbox-age",
        "5",
        env={"PYTHONPATH": str(fake), "MB_TEST_CLOCK_FILE": str(offset)},
    )
    value = "NONE"
    try:
        wait_for("ready", lambda: status(port, "/readyz") == 200, 30)
        for step in (0, 3600, -3600):
            offset.write_text(str(step))

            def stepped(step: int = step) -> bool:  # a heartbeat stamped on the new clock
                _, event = bridge.next_event(timeout=5)
                return abs(stamp(event) - time.time() - step) < 60

            wait_for(f"the bridge's clock at {step:+d} s", stepped, 10)
            # Heartbeats keep their interval (arrival gaps on the test's own clock).
            beats = []
            while len(beats) < 5:
                arrived, event = bridge.next_event(timeout=5)
                if event["type"].endswith(".bridge.heartbeat"):
                    beats.append(arrived)
            gaps = [b - a for a, b in itertools.pairwise(beats)]
            assert max(gaps) < INTERVAL + 1.0 and min(gaps) > INTERVAL / 2, (step, gaps)
            # Changes arrive at normal latency.
            for _ in range(3):
                value = MIGRATE if value == "NONE" else "NONE"
                changed = time.monotonic()
                sim.set_value(MAINTENANCE, value)
                while True:
                    arrived, event = bridge.next_event(timeout=5)
                    if not event["type"].endswith(".bridge.heartbeat"):
                        break
                assert event["data"]["current"] == value
                assert arrived - changed < 1.0, f"{arrived - changed:.3f} s after a {step} s step"
            holds_for(
                f"/healthz and /readyz 200 after a {step:+d} s step",
                lambda: status(port, "/healthz") == 200 and status(port, "/readyz") == 200,
                1.0,
                0.1,
            )
    finally:
        assert bridge.terminate() == 0


def test_a_restored_outbox_age_is_neither_negative_nor_huge(sim, tmp_path):
    """Events left by the last run carry wall-clock stamps that a step since has made an hour
    in the future or a day in the past: their age is clamped to [0, --ready-max-outbox-age]
    (neither negative nor a day), and once they are out /readyz is green."""
    state = tmp_path / "state"
    config = Config(
        metadata_url=sim.url,
        state_dir=state,
        poll_timeout=1,
        http_port=free_port(),
        drain_timeout=0.2,
        ready_max_outbox_age=30,
    )
    state.mkdir()
    held = MemorySink(hold=True)
    with in_process(config, held) as bridge:
        wait_for("ready", lambda: status(bridge.port, "/readyz") == 200)
        sim.set_value(MAINTENANCE, MIGRATE)
        wait_for("its send", lambda: len(held.sends) == 1)
        sim.set_value(MAINTENANCE, "NONE")
        wait_for(
            "the second recorded", lambda: bridge.metric("maintenance_bridge_outbox_depth") == 2
        )
    with sqlite3.connect(state / "bridge.sqlite3") as db:  # stamped before two clock steps
        db.execute("UPDATE outbox SET recorded_at = ? WHERE seq = 1", (time.time() - 86400,))
        db.execute("UPDATE outbox SET recorded_at = ? WHERE seq = 2", (time.time() + 3600,))
    held = MemorySink(hold=True)
    config = dataclasses.replace(config, http_port=free_port())
    with in_process(config, held) as bridge:
        wait_for("the restored events sent", lambda: len(held.sends) == 2)
        age = bridge.metric("maintenance_bridge_outbox_oldest_age_seconds")
        assert 0 <= age <= 31, age
        held.hold = False
        held.ack()
        wait_for("delivered", lambda: bridge.metric("maintenance_bridge_outbox_depth") == 0)
        wait_for("ready", lambda: status(bridge.port, "/readyz") == 200)
    assert [e.data.sequence for e in held.acked] == [1, 2]
