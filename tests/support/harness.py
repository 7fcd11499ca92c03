"""The one harness the tests share: waiting on conditions, ports, events, an in-process bridge.

Tests synchronise by waiting for what they need (`wait_for`), never by sleeping a guessed
time; every wait has its own deadline and names what it waited for when it runs out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from bridge.config import Config
from bridge.daemon import run
from bridge.events import Event, Instance, Scheduling, build_event
from bridge.metadata import MetadataClient
from bridge.simulator import Simulator
from bridge.transitions import classify, notice_seconds

INSTANCE = Instance(
    id="4520031799277579481",
    name="demo-vm",
    zone="us-central1-a",
    project_id="demo-project",
    project_number="123456789012",
)
SCHEDULING = Scheduling(on_host_maintenance="TERMINATE", automatic_restart="TRUE")


def wait_for(
    what: str,
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    step: float = 0.01,
    detail: Callable[[], object] | None = None,
) -> Any:
    """Poll `predicate` until it is truthy and return its value; AssertionError naming `what`
    (and `detail()`, e.g. the logs) after `timeout` (generous: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            more = "" if detail is None else f": {detail()}"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{more}")
        time.sleep(step)


def holds_for(what: str, predicate: Callable[[], Any], seconds: float, step: float = 0.01) -> None:
    """Assert that `predicate` stays truthy for `seconds`: the only way to see that something
    does not happen. A slow machine can make it pass wrongly, never fail wrongly."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(step)


def wait_for_text(path: Path, needle: str, timeout: float = 30.0) -> str:
    """Wait until `needle` is in the file at `path` (a log being written); its text."""

    def text() -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    wait_for(
        f"{needle!r} in {path.name}",
        lambda: needle in text(),
        timeout,
        detail=lambda: "it ends with:\n" + text()[-3000:],
    )
    return text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enrichment_under(
    mode: str, values: dict[str, str] | None = None
) -> tuple[str, Scheduling, list[str]]:
    """What `MetadataClient.enrichment` reads from a simulator whose scheduling directory is
    rendered in `mode` (after setting `values`): hostname, scheduling, problems."""
    with Simulator(scheduling=mode) as sim:
        for path, value in (values or {}).items():
            sim.set_value(path, value)
        sim.start()
        client = MetadataClient(sim.url)
        try:
            return client.enrichment()
        finally:
            client.close()


def event_for(key: str, previous: str, current: str, sequence: int = 1) -> Event:
    """The event the bridge would record for this transition, as sequence number `sequence`."""
    transition = classify(key, previous, current)
    assert transition is not None, (key, previous, current)
    return build_event(
        transition,
        event_id=str(uuid.uuid4()),
        sequence=sequence,
        observed_at=datetime.now(timezone.utc),
        instance=INSTANCE,
        scheduling=SCHEDULING,
        happened_while_down=False,
        notice_seconds=notice_seconds(transition),
    )


@dataclass
class InProcessBridge:
    """`maintenance-bridge run` (bridge.daemon.run) on a thread of the test process, so that a
    test can hand it its own sink and read its logs with caplog."""

    config: Config
    sink: Any
    environ: dict[str, str] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    result: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def start(self) -> InProcessBridge:
        def main() -> None:
            try:
                kwargs = {} if self.environ is None else {"environ": self.environ}
                self.result.append(run(self.config, self.stop, sink=self.sink, **kwargs))
            except BaseException as exc:  # surfaced by the test, not swallowed
                self.errors.append(exc)

        self.thread = threading.Thread(target=main, name="bridge-under-test", daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=timeout)
            assert not self.thread.is_alive(), f"the bridge did not stop within {timeout} s"

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def port(self) -> int:
        return self.config.http_port

    def get(self, route: str) -> requests.Response:
        """A GET on the bridge's own endpoint (/healthz, /readyz, /metrics)."""
        return requests.get(f"http://127.0.0.1:{self.port}{route}", timeout=5)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics, e.g. metric('maintenance_bridge_outbox_depth')."""
        text = self.get("/metrics").text
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{wanted} not in /metrics")


@contextlib.contextmanager
def in_process(
    config: Config, sink: Any, environ: dict[str, str] | None = None
) -> Iterator[InProcessBridge]:
    """The bridge running for the block; it must stop cleanly (exit code 0) after it."""
    bridge = InProcessBridge(config, sink, environ).start()
    try:
        yield bridge
    finally:
        bridge.close()
    assert not bridge.errors, bridge.errors
    assert bridge.result == [0]
