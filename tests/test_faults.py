"""Fault injection: whatever fails around the bridge, no observed transition is lost.

Run alone with `pytest -m faults`. Four sides, each against the real pieces where they exist:

- metadata side: every fault kind of the simulator (bursts of 5xx and 429, dropped and reset
  connections, answers slower than the client timeout, malformed, huge and non-UTF-8 bodies,
  no `Metadata-Flavor`, a redirect, no ETag) against an in-process bridge: it keeps running,
  logs one line per failure class, never follows the redirect and misses no transition;
- Pub/Sub side, against the official emulator (skipped, saying why, where it is absent): the
  emulator SIGKILLed and restarted, a topic that does not exist, a permission error (a sink
  wrapper raising google.api_core's PermissionDenied: neither the emulator nor the fake checks
  IAM) and a paused ordering key (a real one: an invalid publish on the bridge's own client);
- disk side: the state dir full (a real 1 MiB tmpfs filled to ENOSPC; needs root, else skipped)
  or read-only (SQLite `query_only` on the bridge's own connection; a read-only tmpfs at
  start-up where mounting is possible): loud error, /healthz 503, still publishing;
- the outbox bound by count and by bytes: lower-priority events go, oldest first, a
  maintenance or preemption event never.

When BRIDGE_FIGURES_DIR is set, each test writes what it measured there as JSON
(bench/reliability_figures.py turns that into docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc
from support.harness import InProcessBridge, free_port, in_process, wait_for
from support.memory_sink import MemorySink

from bridge import simulator as simulator_module
from bridge.config import Config
from bridge.events import MAINTENANCE, PREEMPTED, UPCOMING, Event, decode_pubsub
from bridge.simulator import Simulator, sample_window
from bridge.sinks import PubSubSink
from bridge.sinks.pubsub import TRANSPORTS, PubSubOptions
from bridge.sinks.pubsub.rest import PublishFailed
from bridge.store import Store, read_status

pytestmark = pytest.mark.faults

WINDOWS = [sample_window(day) for day in range(1, 29)]
MAINTENANCE_VALUES = ["MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE"]


# -- shared helpers ------------------------------------------------------------------------------


def write_figures(name: str, figures: dict[str, Any]) -> None:
    """Record what a test measured, for docs/reliability.md (only when asked to)."""
    target = os.environ.get("BRIDGE_FIGURES_DIR")
    if not target:
        return
    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    figures = {"test": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | (
        figures
    )
    (path / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def make_config(sim: Simulator, state_dir: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "metadata_url": sim.url,
        "state_dir": state_dir,
        "poll_timeout": 1,
        "retry_cap": 0.3,
        "absent_interval": 0.2,
        "drain_timeout": 2.0,
        "http_port": free_port(),
        "publish_latency": 0.001,
    }
    values.update(overrides)
    state_dir.mkdir(parents=True, exist_ok=True)
    return Config(**values)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator().start()
    simulator.set_value(UPCOMING, WINDOWS[0])  # present: long-polled like the other keys
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def requests_seen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every metadata request line (path and query) the simulator answers."""
    seen: list[str] = []
    original = simulator_module._Handler._metadata

    def recording(self: Any, path: str, query: str) -> None:
        seen.append(f"{path}?{query}")
        original(self, path, query)

    monkeypatch.setattr(simulator_module._Handler, "_metadata", recording)
    return seen


@pytest.fixture
def bridge_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="bridge")
    return caplog


def lines(caplog: pytest.LogCaptureFixture, level: int, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [
        r.getMessage()
        for r in list(caplog.records)
        if r.levelno == level and rx.search(r.getMessage())
    ]


def wait_ready(bridge: InProcessBridge, sim: Simulator) -> None:
    """Watching every key, each with a long poll in flight."""

    def ready() -> bool:
        try:
            return bridge.get("/readyz").status_code == 200
        except requests.ConnectionError:  # not listening yet
            return False

    wait_for("/readyz 200", ready)
    for key in bridge.config.keys:
        wait_for(f"a long poll on {key}", lambda key=key: sim.stats().get(key, 0) >= 2)


# -- metadata side -----------------------------------------------------------------------------

# name -> (faults as (kind, count, params), failure classes expected in the logs)
BURSTS: dict[str, tuple[list[tuple[str, int, dict[str, Any]]], list[str]]] = {
    "5xx": (
        [
            ("status", 3, {"status": 503}),
            ("status", 2, {"status": 500}),
            ("status", 2, {"status": 504}),
        ],
        ["http_5xx"],
    ),
    "429": ([("status", 5, {"status": 429})], ["http_429"]),
    "drop": ([("drop", 5, {})], ["connection"]),
    "reset": ([("reset", 5, {})], ["connection"]),
    # One answer slower than the client deadline (poll_timeout 1 s + 10 s).
    "slow": ([("delay", 1, {"seconds": 12.5})], ["timeout"]),
    "malformed": ([("malformed", 5, {})], ["protocol"]),
    "huge": ([("huge", 3, {})], ["protocol"]),
    "invalid_utf8": ([("invalid_utf8", 5, {})], ["protocol"]),
    "no_flavor": ([("no_flavor", 5, {})], ["protocol"]),
    "redirect": ([("redirect", 5, {})], ["protocol"]),
    # Classes interleaved within one outage: still one line per class.
    "mixed": (
        [
            ("status", 1, {"status": 503}),
            ("status", 1, {"status": 429}),
            ("reset", 1, {}),
            ("status", 1, {"status": 500}),
            ("status", 1, {"status": 429}),
            ("drop", 1, {}),
            ("status", 1, {"status": 503}),
        ],
        ["http_5xx", "http_429", "connection"],
    ),
}


@pytest.mark.parametrize("burst", list(BURSTS))
def test_metadata_fault_burst(burst, sim, requests_seen, bridge_logs, tmp_path):
    faults, classes = BURSTS[burst]
    key = MAINTENANCE
    sink = MemorySink()
    config = make_config(sim, tmp_path / "state")
    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        sim.set_value(key, MAINTENANCE_VALUES[0])  # seen before the faults
        wait_for("the first event", lambda: len(sink.events(key)) == 1)
        before = sim.stats().get(key, 0)
        for kind, count, params in faults:
            sim.inject(kind, count, key, **params)
        # The long poll in flight ends within poll_timeout; the next request is faulted.
        wait_for("a faulted request", lambda: sim.stats().get(key, 0) > before)
        sim.set_value(key, MAINTENANCE_VALUES[1])  # changes while the faults last
        wait_for("the event made mid-burst", lambda: len(sink.events(key)) == 2, timeout=40)
        wait_for(
            "the recovery line",
            lambda: lines(bridge_logs, logging.INFO, f"metadata {key} answering again"),
        )
        sim.set_value(key, "NONE")  # and the watch goes on after it
        wait_for("the event after the burst", lambda: len(sink.events(key)) == 3)
        assert bridge.alive
        assert bridge.get("/healthz").status_code == 200
        errors_total = sum(
            bridge.metric("maintenance_bridge_metadata_errors_total", f'class="{cls}"')
            for cls in classes
        )

    events = sink.events(key)
    assert [(e.data.previous, e.data.current) for e in events] == [
        ("NONE", MAINTENANCE_VALUES[0]),
        (MAINTENANCE_VALUES[0], MAINTENANCE_VALUES[1]),
        (MAINTENANCE_VALUES[1], "NONE"),
    ]
    assert [e.data.sequence for e in events] == sorted(e.data.sequence for e in events)
    injected = sum(count for _, count, _ in faults)
    assert errors_total == injected, "every faulted request is counted as a failure"
    # One line per failure class, whatever the number of retries.
    told = lines(bridge_logs, logging.WARNING, f"^metadata \\S+ on {key}:")
    told_classes = [m.split()[1] for m in told]
    assert sorted(told_classes) == sorted(classes), told
    assert len(lines(bridge_logs, logging.INFO, f"metadata {key} answering again")) == 1
    assert not lines(bridge_logs, logging.ERROR, ".") + lines(bridge_logs, logging.CRITICAL, ".")
    # The redirect target is never requested: the bridge does not follow redirects.
    followed = [r for r in requests_seen if "redirected=1" in r]
    assert not followed
    if burst == "redirect":
        assert len([r for r in requests_seen if r.startswith("/computeMetadata/v1/" + key)]) > 5
    write_figures(
        f"metadata_{burst}",
        {
            "faults_injected": injected,
            "failure_classes_logged": told_classes,
            "log_lines_for_the_burst": len(told),
            "transitions_made": 3,
            "events_published": len(events),
            "events_lost": 3 - len(events),
            "redirect_target_requests": len(followed),
        },
    )


def test_metadata_without_etag_is_told_once(sim, bridge_logs, tmp_path):
    """A server that stops sending ETags is watched by re-asking, and said so once."""
    key = PREEMPTED
    sink = MemorySink()
    with in_process(make_config(sim, tmp_path / "state"), sink) as bridge:
        wait_ready(bridge, sim)
        sim.inject("no_etag", 4, key)
        sim.set_value(key, "TRUE")
        wait_for("preemption.started", lambda: len(sink.events(key)) == 1)
        wait_for("the faults used up", lambda: sim.stats().get(key, 0) >= 6, timeout=30)
        sim.set_value(key, "FALSE")
        wait_for("preemption.ended", lambda: len(sink.events(key)) == 2)
        assert bridge.get("/healthz").status_code == 200
    told = lines(bridge_logs, logging.WARNING, "without an ETag")
    assert len(told) == 1, told
    assert [e.kind for e in sink.events(key)] == ["preemption.started", "preemption.ended"]
    write_figures("metadata_no_etag", {"faults_injected": 4, "log_lines": len(told)})


def test_transitions_on_every_key_survive_a_faulty_server(sim, bridge_logs, tmp_path, rng):
    """Random faults of every kind on every key while all three keys change: nothing missed."""
    kinds = [
        ("status", {"status": 503}),
        ("status", {"status": 500}),
        ("status", {"status": 429}),
        ("drop", {}),
        ("reset", {}),
        ("malformed", {}),
        ("invalid_utf8", {}),
        ("no_flavor", {}),
        ("redirect", {}),
        ("huge", {}),
    ]
    sink = MemorySink()
    expected: dict[str, list[str]] = {MAINTENANCE: [], PREEMPTED: [], UPCOMING: []}
    injected = 0
    with in_process(make_config(sim, tmp_path / "state", retry_cap=0.1), sink) as bridge:
        wait_ready(bridge, sim)
        wait_for("the window present at start", lambda: sink.events(UPCOMING))
        expected[UPCOMING].append(WINDOWS[0])
        values = {
            MAINTENANCE: ["MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE"],
            PREEMPTED: ["TRUE", "FALSE"],
            UPCOMING: WINDOWS[1:],
        }
        for round_ in range(12):
            for key in expected:
                kind, params = rng.choice(kinds)
                count = rng.randint(1, 3)
                sim.inject(kind, count, key, **params)
                injected += count
                value = values[key][round_ % len(values[key])]
                sim.set_value(key, value)
                expected[key].append(value)
            # Each change is seen before the next one is made (else A -> B -> A can coalesce).
            wait_for(
                f"round {round_}",
                lambda: all(len(sink.events(k)) == len(v) for k, v in expected.items()),
                timeout=30,
            )
        assert bridge.get("/healthz").status_code == 200
    for key, values_set in expected.items():
        seen = [e.data.current for e in sink.events(key)]
        if key == UPCOMING:
            seen = [json.dumps(json.loads(v), sort_keys=True) for v in seen]
            values_set = [json.dumps(json.loads(v), sort_keys=True) for v in values_set]
        assert seen == values_set
    sequences = [e.data.sequence for e in sink.events()]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    write_figures(
        "metadata_random",
        {
            "faults_injected": injected,
            "transitions_made": sum(map(len, expected.values())),
            "events_published": len(sink.events()),
            "events_lost": sum(map(len, expected.values())) - len(sink.events()),
        },
    )


# -- Pub/Sub side ------------------------------------------------------------------------------


class TcpGate:
    """A TCP relay in front of Pub/Sub that the test can shut: connections refused while shut.

    Used only to hold the bridge off while a restarted emulator (which forgets everything) gets
    its topic and subscription back: a message published to a topic with no subscription yet
    is dropped by Pub/Sub by design, which would otherwise look like a loss.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.is_open = threading.Event()
        self.is_open.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host_port = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._pairs: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-gate", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.is_open.is_set():
                client.close()
                continue
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=2)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def shut(self) -> None:
        self.is_open.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for s in pairs:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def open(self) -> None:
        self.is_open.set()

    def close(self) -> None:
        self._closed = True
        self.shut()
        self._listener.close()


@pytest.fixture(scope="module")
def pubsub() -> Iterator[Any]:
    """This module's own Pub/Sub, shadowing the session one of conftest.py: these tests kill it."""
    from support.pubsub import emulator_or_skip

    server = emulator_or_skip()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def gate(pubsub) -> Iterator[TcpGate]:
    g = TcpGate(pubsub.host_port)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    return f"bridge-faults-{suffix}", f"bridge-faults-sub-{suffix}"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Every Pub/Sub fault test runs on both transports of the sink."""
    return str(request.param)


def pubsub_sink(topic: str, gate: TcpGate, transport: str) -> PubSubSink:
    """The bridge's own sink, publishing through the gate to the emulator."""
    return PubSubSink(
        PubSubOptions(
            topic=topic,
            publish_latency=0.001,
            pubsub_transport=transport,
            pubsub_emulator_host=gate.host_port,
        )
    )


def pulled_events(adm: Any, sub: str, n: int, timeout: float = 60.0) -> list[Event]:
    """Pull until n distinct event ids arrived; the events in arrival order, first copies."""
    seen: dict[str, Event] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(seen)} of {n} events arrived in {timeout} s")
        try:
            got = adm.pull(sub, max_messages=50, timeout=2.0)
        except gexc.GoogleAPICallError:  # reconnecting after a restart
            time.sleep(0.2)
            continue
        for m in got:
            event = decode_pubsub(m.attributes, m.data)
            assert m.ordering_key == event.extensions["instanceid"]
            seen.setdefault(event.id, event)
    return list(seen.values())


def make_transitions(sim: Simulator, bridge_logs: Any, n: int, start: int = 0) -> list[str]:
    """n maintenance-event transitions, each waited for in the logs; their event ids."""
    ids = []
    for i in range(start, start + n):
        value = MAINTENANCE_VALUES[0] if i % 2 == 0 else "NONE"
        sim.set_value(MAINTENANCE, value)
        rx = re.compile(rf"sequence {i + 1}\b")
        found = wait_for(
            f"transition {i + 1} recorded",
            lambda rx=rx: [
                m for m in lines(bridge_logs, logging.INFO, r"^maintenance\.") if rx.search(m)
            ],
        )
        ids.append(re.search(r"event ([0-9a-f-]{36})", found[0]).group(1))
    return ids


def outbox_depth(config: Config) -> int:
    return int(read_status(config.db_path)["outbox_depth"])


def test_pubsub_killed_and_restarted(pubsub, gate, names, sim, bridge_logs, tmp_path, transport):
    from support.pubsub import admin

    with admin(pubsub) as adm:
        topic = adm.create_topic(names[0])
        sub = adm.create_subscription(topic, names[1], ordering=True)
    sink = pubsub_sink(topic, gate, transport)
    config = make_config(sim, tmp_path / "state", keys=(MAINTENANCE,), topic=topic, sink="pubsub")
    try:
        _killed_and_restarted(pubsub, gate, names, sim, bridge_logs, config, sink, topic, sub)
    finally:  # the emulator is shared by the module: never leave it dead
        if pubsub.pid is None:
            pubsub.restart()


def _killed_and_restarted(pubsub, gate, names, sim, bridge_logs, config, sink, topic, sub):
    from support.pubsub import admin

    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        before = make_transitions(sim, bridge_logs, 3)
        wait_for("the first events published", lambda: outbox_depth(config) == 0)
        pubsub.kill()  # SIGKILL: the emulator and everything it held are gone
        during = make_transitions(sim, bridge_logs, 4, start=3)
        wait_for(
            "the relay's own retry",
            lambda: lines(bridge_logs, logging.ERROR, "failed: unavailable"),
        )
        assert outbox_depth(config) == 4, "events wait in the outbox while Pub/Sub is down"
        gate.shut()
        pubsub.restart()
        with admin(pubsub) as adm:
            adm.create_topic(names[0])
            adm.create_subscription(topic, names[1], ordering=True)
        gate.open()
        with admin(pubsub) as adm:
            events = pulled_events(adm, sub, 4, timeout=90)
        wait_for("the outbox emptied", lambda: outbox_depth(config) == 0, timeout=30)
        after = make_transitions(sim, bridge_logs, 2, start=7)
        with admin(pubsub) as adm:
            events += pulled_events(adm, sub, 2)
        assert bridge.get("/healthz").status_code == 200
        attempts = bridge.metric(
            "maintenance_bridge_publish_failures_total", 'reason="unavailable"'
        )
    told = lines(bridge_logs, logging.ERROR, "publish of")
    assert len(told) == 1, told
    # What was published before the kill died with the emulator; all the rest arrived in order.
    assert [e.id for e in events] == during + after
    assert [e.data.sequence for e in events] == list(range(4, 10))
    assert not set(before) & {e.id for e in events}
    write_figures(
        f"pubsub_restart_{sink.options.pubsub_transport}",
        {
            "pubsub": f"{pubsub.kind}, {sink.options.pubsub_transport}",
            "events_during_outage": len(during),
            "failed_attempts": attempts,
            "error_lines": len(told),
            "events_lost": len(set(during + after) - {e.id for e in events}),
        },
    )


def test_pubsub_topic_missing_then_created(
    pubsub, gate, names, sim, bridge_logs, tmp_path, transport
):
    from support.pubsub import admin

    topic = f"projects/{pubsub.project}/topics/{names[0]}"
    sink = pubsub_sink(topic, gate, transport)
    config = make_config(sim, tmp_path / "state", keys=(MAINTENANCE,), topic=topic, sink="pubsub")
    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        ids = make_transitions(sim, bridge_logs, 3)
        wait_for(
            "several failed attempts",
            lambda: (
                bridge.metric("maintenance_bridge_publish_failures_total", 'reason="not_found"')
                >= 4
            ),
        )
        assert outbox_depth(config) == 3
        told = lines(bridge_logs, logging.ERROR, "not_found")
        assert len(told) == 1, told
        assert "does the topic" in told[0] and names[0] in told[0]
        assert "not_found" in str(read_status(config.db_path)["last_error"])
        gate.shut()  # the topic and its subscription appear together, for the test's sake
        with admin(pubsub) as adm:
            adm.create_topic(names[0])
            adm.create_subscription(topic, names[1], ordering=True)
        gate.open()
        with admin(pubsub) as adm:
            events = pulled_events(adm, names[1], 3)
        wait_for("the outbox emptied", lambda: outbox_depth(config) == 0)
        attempts = bridge.metric("maintenance_bridge_publish_failures_total", 'reason="not_found"')
    assert [e.id for e in events] == ids
    told = lines(bridge_logs, logging.ERROR, "not_found")
    assert len(told) == 1
    assert lines(bridge_logs, logging.INFO, "accepting again")
    write_figures(
        f"pubsub_no_topic_{transport}",
        {
            "pubsub": f"{pubsub.kind}, {transport}",
            "failed_attempts": attempts,
            "error_lines": len(told),
            "events_lost": len(set(ids) - {e.id for e in events}),
        },
    )


class DenyingSink:
    """The real PubSubSink, but publishes fail with PermissionDenied while `deny` is set (the
    emulator and the fake have no IAM); failed futures as the transport returns them."""

    def __init__(self, inner: PubSubSink) -> None:
        self.inner = inner
        self.name = inner.name
        self.topic = inner.topic
        self.deny = True
        self.denied = 0

    def send(self, event: Event) -> Any:
        if self.deny:
            self.denied += 1
            future: Future[str] = Future()
            why = "User not authorized to perform this action."
            denied = (
                gexc.PermissionDenied(why)
                if self.inner.options.pubsub_transport == "grpc"
                else PublishFailed("permission", f"HTTP 403 PERMISSION_DENIED: {why}")
            )
            future.set_exception(denied)
            return future
        return self.inner.send(event)

    def recover(self, event: Event) -> None:
        self.inner.recover(event)

    def close(self) -> None:
        self.inner.close()


def test_pubsub_permission_denied(pubsub, gate, names, sim, bridge_logs, tmp_path, transport):
    from support.pubsub import admin

    with admin(pubsub) as adm:
        topic = adm.create_topic(names[0])
        adm.create_subscription(topic, names[1], ordering=True)
    sink = DenyingSink(pubsub_sink(topic, gate, transport))
    config = make_config(sim, tmp_path / "state", keys=(MAINTENANCE,), topic=topic, sink="pubsub")
    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        ids = make_transitions(sim, bridge_logs, 3)
        wait_for("several denied attempts", lambda: sink.denied >= 4)
        assert outbox_depth(config) == 3
        sink.deny = False
        with admin(pubsub) as adm:
            events = pulled_events(adm, names[1], 3)
        wait_for("the outbox emptied", lambda: outbox_depth(config) == 0)
    assert [e.id for e in events] == ids
    told = lines(bridge_logs, logging.ERROR, "permission")
    assert len(told) == 1 and "roles/pubsub.publisher" in told[0], told
    assert names[0] in told[0], "the line names the topic"
    write_figures(
        f"pubsub_permission_{transport}",
        {
            "pubsub": f"{pubsub.kind}, {transport} + PermissionDenied wrapper",
            "denied_attempts": sink.denied,
            "error_lines": len(told),
            "events_lost": len(set(ids) - {e.id for e in events}),
        },
    )


def test_pubsub_paused_ordering_key(pubsub, gate, names, sim, bridge_logs, tmp_path, transport):
    """A real paused key: an invalid (empty) publish on the bridge's own transport and key."""
    from support.pubsub import admin

    with admin(pubsub) as adm:
        topic = adm.create_topic(names[0])
        adm.create_subscription(topic, names[1], ordering=True)
    sink = pubsub_sink(topic, gate, transport)
    instance_id = sim.get_value("instance/id")
    failed = sink.transport.publish(instance_id, {}, b"")
    with pytest.raises((gexc.InvalidArgument, PublishFailed), match="empty"):
        failed.result(timeout=30)
    config = make_config(sim, tmp_path / "state", keys=(MAINTENANCE,), topic=topic, sink="pubsub")
    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        ids = make_transitions(sim, bridge_logs, 3)
        with admin(pubsub) as adm:
            events = pulled_events(adm, names[1], 3)
        wait_for("the outbox emptied", lambda: outbox_depth(config) == 0)
        paused = bridge.metric("maintenance_bridge_publish_failures_total", 'reason="paused"')
    assert [e.id for e in events] == ids
    assert paused >= 1
    told = lines(bridge_logs, logging.ERROR, "paused")
    assert len(told) == 1, told
    write_figures(
        f"pubsub_paused_{transport}",
        {
            "pubsub": f"{pubsub.kind}, {transport}",
            "paused_attempts": paused,
            "error_lines": len(told),
            "events_lost": len(set(ids) - {e.id for e in events}),
        },
    )


# -- disk side ---------------------------------------------------------------------------------


@functools.cache
def can_mount() -> bool:
    """Root on Linux with mount(2) allowed (checked once, when a disk test first asks)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    probe = Path(f"/tmp/bridge-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
            capture_output=True,
            check=False,
        )
        if ok.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=False)
        return True
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> list[Store]:
    """The Store objects the daemon opens, so a test can reach the bridge's own connection."""
    opened: list[Store] = []

    class Captured(Store):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr("bridge.daemon.Store", Captured)
    return opened


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def _disk_round(sim, bridge_logs, state_dir, break_it, repair_it, how: str) -> None:
    sink = MemorySink()
    config = make_config(sim, state_dir)

    def published(key: str, n: int, what: str) -> None:
        wait_for(what, lambda: len(sink.events(key)) == n)

    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        published(UPCOMING, 1, "the window present at start")
        sim.set_value(MAINTENANCE, MAINTENANCE_VALUES[0])
        published(MAINTENANCE, 1, "an event before the failure")
        assert bridge.get("/healthz").status_code == 200
        break_it()
        values = ["NONE", MAINTENANCE_VALUES[1], "NONE", MAINTENANCE_VALUES[0]]
        for i, value in enumerate(values):
            sim.set_value(MAINTENANCE, value)
            published(MAINTENANCE, 2 + i, "published from memory")
        sim.set_value(PREEMPTED, "TRUE")
        published(PREEMPTED, 1, "the preemption, from memory")
        health = bridge.get("/healthz")
        assert health.status_code == 503 and "state store not writable" in health.text
        critical = lines(bridge_logs, logging.CRITICAL, "state store .* not writable")
        assert len(critical) == 1, critical
        assert "publishing from memory" in critical[0]
        repair_it()
        sim.set_value(PREEMPTED, "FALSE")
        published(PREEMPTED, 2, "an event after the repair")
        wait_for("/healthz green again", lambda: bridge.get("/healthz").status_code == 200)
        store_errors = bridge.metric("maintenance_bridge_store_errors_total")
    events = sink.events()
    assert [e.data.sequence for e in events] == list(range(1, 9))
    assert lines(bridge_logs, logging.WARNING, "state store writable again")
    # Loud once, not once per event: the CRITICAL line, and at most one line from the relay.
    noisy = lines(bridge_logs, logging.ERROR, "could not retire")
    assert len(noisy) <= 1, noisy
    write_figures(
        f"disk_{how}",
        {
            "events_while_broken": 5,
            "events_published": len(events),
            "events_lost": 8 - len(events),
            "critical_lines": len(critical),
            "store_errors": store_errors,
            "ack_error_lines": len(noisy),
        },
    )


def test_disk_full_mid_run(sim, bridge_logs, tmp_path):
    """A real full disk: the state dir on a 1 MiB tmpfs, filled to ENOSPC mid-run, then freed.

    Without mount(2) (not root, not Linux) this skips: SQLite's max_page_count is no substitute,
    as an event fits in the free space of the outbox's own pages whatever the page limit.
    """
    if not can_mount():
        pytest.skip("a tmpfs state dir needs mount(2): root on Linux")
    with tmpfs(tmp_path / "state", "1m") as state:
        holder: list[Path] = []
        _disk_round(
            sim,
            bridge_logs,
            state,
            lambda: holder.append(_fill(state)),
            lambda: holder[0].unlink(),
            "full_tmpfs",
        )


def test_disk_full_then_freed_heals_without_a_transition_and_repeats_nothing(
    sim, bridge_logs, tmp_path
):
    """Not persisted is a state: an event published from memory while the disk was full is
    written once space is freed, on a timer: /healthz green within seconds with no new
    transition, and after a restart nothing goes out again (no new id, no second seq 1)."""
    if not can_mount():
        pytest.skip("a tmpfs state dir needs mount(2): root on Linux")
    with tmpfs(tmp_path / "state", "1m") as state:
        sink = MemorySink()
        config = make_config(sim, state)
        with in_process(config, sink) as bridge:
            wait_ready(bridge, sim)
            wait_for("the window present at start", lambda: len(sink.events(UPCOMING)) == 1)
            filler = _fill(state)
            sim.set_value(PREEMPTED, "TRUE")
            wait_for("the preemption, from memory", lambda: len(sink.events(PREEMPTED)) == 1)
            assert bridge.get("/healthz").status_code == 503
            filler.unlink()
            freed = time.monotonic()
            wait_for("/healthz green", lambda: bridge.get("/healthz").status_code == 200, 10)
            healed = time.monotonic() - freed
            assert healed < 5, f"green {healed:.1f} s after the space was freed"
            assert len(sink.events()) == 2, "healed by a new transition"
        first = [e.id for e in sink.events()]
        status = read_status(state / "bridge.sqlite3")
        assert status["keys"][PREEMPTED]["value"] == "TRUE"
        assert status["next_sequence"] == 3
        again = MemorySink()
        with in_process(make_config(sim, state, http_port=free_port()), again) as bridge:
            wait_ready(bridge, sim)
            sim.set_value(MAINTENANCE, MAINTENANCE_VALUES[0])  # a later change: seq 3
            wait_for("the later change", lambda: len(again.events(MAINTENANCE)) == 1)
    assert [e.data.sequence for e in again.events()] == [3], "something went out again"
    assert again.events()[0].id not in first
    write_figures("disk_full_then_freed", {"seconds_to_green": round(healed, 2)})


def test_disk_read_only_mid_run(sim, stores, bridge_logs, tmp_path):
    def query_only(on: bool) -> None:
        store = stores[0]
        with store._lock:
            store._db.execute(f"PRAGMA query_only = {int(on)}")

    _disk_round(
        sim,
        bridge_logs,
        tmp_path / "state",
        lambda: query_only(True),
        lambda: query_only(False),
        "read_only_query_only",
    )


def test_disk_read_only_at_start_is_refused(sim, tmp_path):
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root on Linux")
    with tmpfs(tmp_path / "ro", "64k", readonly=True) as state:
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("maintenance-bridge")),
                "run",
                "--state-dir",
                str(state),
                "--metadata-url",
                sim.url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BRIDGE_LOG_FORMAT": "text"},
        )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not writable" in proc.stderr, proc.stderr


# -- the outbox bound --------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["count", "bytes", "tiny"])
def test_outbox_bound_never_drops_a_maintenance_event(bound, sim, bridge_logs, tmp_path):
    sink = MemorySink()
    sink.fail = gexc.ServiceUnavailable("Pub/Sub is down")
    limits = {
        "count": {"outbox_max_events": 8},
        "bytes": {"outbox_max_bytes": 8 * 1400},
        "tiny": {"outbox_max_events": 2},  # less than the notices alone: the bound yields
    }[bound]
    config = make_config(sim, tmp_path / "state", heartbeat_interval=0.05, **limits)
    made: list[tuple[str, str]] = []
    with in_process(config, sink) as bridge:
        wait_ready(bridge, sim)
        plan = [
            (UPCOMING, WINDOWS[1]),
            (MAINTENANCE, MAINTENANCE_VALUES[0]),
            (UPCOMING, WINDOWS[2]),
            (MAINTENANCE, "NONE"),
            (PREEMPTED, "TRUE"),
            (UPCOMING, WINDOWS[3]),
            (MAINTENANCE, MAINTENANCE_VALUES[1]),
            (UPCOMING, WINDOWS[4]),
            (MAINTENANCE, "NONE"),
            (PREEMPTED, "FALSE"),
        ]
        for i, (key, value) in enumerate(plan):
            sim.set_value(key, value)
            made.append((key, value))
            wait_for(
                f"change {i} recorded",
                lambda i=i: len(lines(bridge_logs, logging.INFO, r"\(event .*sequence")) == i + 1,
            )
            time.sleep(0.15)  # heartbeats pile up too
        with sqlite3.connect(f"file:{config.db_path}?mode=ro", uri=True) as db:
            kinds = [k for (k,) in db.execute("SELECT kind FROM outbox ORDER BY seq")]
        if bound == "tiny":  # six notices in an outbox bounded at two: all kept
            assert len(kinds) == 6
        assert [k for k in kinds if not k.startswith(("upcoming.", "bridge."))] == [
            "maintenance.started",
            "maintenance.ended",
            "preemption.started",
            "maintenance.started",
            "maintenance.ended",
            "preemption.ended",
        ]
        dropped = bridge.metric("maintenance_bridge_outbox_dropped_total")
        assert dropped > 0
        recorded = bridge.get("/metrics").text
        sink.fail = None
        wait_for("drained", lambda: bridge.metric("maintenance_bridge_outbox_depth") == 0)
        bridge.stop.set()  # no more heartbeats while the result is read
    events = sink.events()
    sequences = [e.data.sequence for e in events]
    assert sequences == sorted(sequences)
    vital = [e for e in events if e.kind.startswith(("maintenance.", "preemption."))]
    assert [(e.data.key, e.data.current) for e in vital] == [
        (k, v) for k, v in made if k != UPCOMING
    ]
    # What went missing is lower-priority only, oldest first: the survivors are the newest.
    logged = {
        int(m.group(1)): r.getMessage()
        for r in bridge_logs.records
        if (m := re.search(r"sequence (\d+)", r.getMessage()))
    }
    last = max(sequences)
    missing = set(range(1, last + 1)) - set(sequences)
    assert missing, "the bound was never reached"
    for seq in missing:
        assert seq not in logged or logged[seq].startswith("upcoming."), seq
    assert "maintenance_bridge_outbox_dropped_total" in recorded
    # Oldest first: every lower-priority event that survived is newer than every dropped one.
    # Heartbeats are also coalesced by the relay (only the newest queued one goes out), so the
    # order of drops is judged on the recorded (logged) upcoming events.
    dropped_logged = {seq for seq in missing if seq in logged}
    kept_low = [
        e.data.sequence
        for e in events
        if e.kind.startswith("upcoming.") and e.data.sequence < max(dropped_logged, default=0)
    ]
    assert not kept_low, f"{kept_low} kept while newer ones were dropped"
    told = lines(bridge_logs, logging.ERROR, "outbox full")
    assert len(told) == 1, told
    write_figures(
        f"outbox_{bound}",
        {
            "limit": limits,
            "events_recorded": last,
            "dropped": len(missing),
            "maintenance_or_preemption_dropped": len(
                [s for s in missing if s in logged and not logged[s].startswith("upcoming.")]
            ),
            "maintenance_or_preemption_published": len(vital),
        },
    )
