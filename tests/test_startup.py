"""Start-up order: the watch is armed before anything slow, the sink connects after it.

The first request for `instance/maintenance-event` is what keeps Google's 60 s migration warning
armed, so it goes out before the sink's slow connection (importing and creating the Pub/Sub
client). An event recorded meanwhile waits, as it would during a Pub/Sub outage, and goes out
once the sink is connected; a sink that cannot be created at all stops the bridge with the
configuration error.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from support.harness import wait_for

from bridge.config import Config, ConfigError
from bridge.daemon import run
from bridge.events import MAINTENANCE, Event
from bridge.simulator import Simulator
from bridge.simulator import handler as handler_module
from bridge.store import read_status


class GatedSink:
    """A sink whose connection waits for the test, as the Pub/Sub client's import would."""

    name = "gated"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.gate = threading.Event()
        self.connecting_at: float | None = None
        self.sent: list[Event] = []
        self._waiting: list[tuple[Event, Future[str]]] = []
        self._connected = False
        self._lock = threading.Lock()

    def start_connecting(self) -> None:
        return None

    def connect(self) -> None:
        self.connecting_at = time.monotonic()
        if self.error is not None:
            raise self.error
        self.gate.wait(30)
        with self._lock:
            self._connected = True
            for event, future in self._waiting:
                self._deliver(event, future)
            self._waiting.clear()

    def send(self, event: Event) -> Future[str]:
        future: Future[str] = Future()
        with self._lock:
            if self._connected:
                self._deliver(event, future)
            else:
                self._waiting.append((event, future))
        return future

    def _deliver(self, event: Event, future: Future[str]) -> None:
        self.sent.append(event)
        future.set_result(event.id)

    def recover(self, event: Event) -> None:
        return None

    def close(self) -> None:
        self.gate.set()


@pytest.fixture
def first_request(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """When the simulator first saw a request for each key (monotonic)."""
    seen: dict[str, float] = {}
    original = handler_module._Handler._metadata

    def recording(self: Any, path: str, query: str) -> None:
        seen.setdefault(path.rsplit("/v1/", 1)[-1], time.monotonic())
        original(self, path, query)

    monkeypatch.setattr(handler_module._Handler, "_metadata", recording)
    return seen


def config(sim: Simulator, state: Path) -> Config:
    return Config(metadata_url=sim.url, state_dir=state, poll_timeout=5, drain_timeout=1.0)


def test_watch_armed_before_the_sink_connects_and_an_early_event_waits(
    sim: Simulator, first_request: dict[str, float], tmp_path: Path
) -> None:
    sink, stop = GatedSink(), threading.Event()
    cfg = config(sim, tmp_path)
    thread = threading.Thread(target=run, args=(cfg, stop), kwargs={"sink": sink}, daemon=True)
    thread.start()
    try:
        wait_for("the sink starts connecting", lambda: sink.connecting_at)
        assert first_request[MAINTENANCE] < sink.connecting_at
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        wait_for("the event in the outbox", lambda: read_status(cfg.db_path)["outbox_depth"])
        assert sink.sent == [], "nothing can be sent before the sink is connected"
        sink.gate.set()
        wait_for("the event sent", lambda: sink.sent)
        wait_for("the outbox emptied", lambda: read_status(cfg.db_path)["outbox_depth"] == 0)
        assert [e.data.current for e in sink.sent] == ["MIGRATE_ON_HOST_MAINTENANCE"]
    finally:
        stop.set()
        thread.join(15)


def test_a_sink_that_cannot_be_created_stops_the_bridge(sim: Simulator, tmp_path: Path) -> None:
    sink = GatedSink(error=RuntimeError("Your default credentials were not found.\nmore"))
    with pytest.raises(
        ConfigError, match=r"^--sink gated: Your default credentials were not found\.$"
    ):
        run(config(sim, tmp_path), threading.Event(), sink=sink)
