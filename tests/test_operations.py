"""Operating the bridge on a fleet: local hooks, /healthz /readyz /metrics, heartbeats and the
operator commands (`status`, `listen`), end to end against the simulator and Pub/Sub.

The bridge runs in-process (`bridge.daemon.run` in a thread) so that tests can wrap its sink
and time each acknowledgement; `listen` also runs once as the real console script. Every hook
process a test starts is killed by its pid before the test ends.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import itertools
import json
import logging
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.bridge import BridgeProcess
from support.harness import (
    INSTANCE,
    InProcessBridge,
    event_for,
    free_port,
    holds_for,
    in_process,
    wait_for,
    wait_for_text,
)
from support.pubsub import PubSubAdmin, PubSubServer, Received, admin

import bridge.daemon
import bridge.health
from bridge import __version__
from bridge.cli import main
from bridge.config import Config, ConfigError
from bridge.daemon import run
from bridge.endpoints import serve
from bridge.events import (
    KINDS,
    MAINTENANCE,
    PREEMPTED,
    UPCOMING,
    WATCHED_KEYS,
    Event,
    decode_pubsub,
    decode_structured,
    dumps,
)
from bridge.health import Health
from bridge.hooks import MAX_QUEUED, Hooks
from bridge.logs import JsonFormatter
from bridge.metadata import FAILURE_CLASSES
from bridge.metrics import HOOK_RESULTS, LATENCY_BUCKETS, PUBLISH_FAILURE_CLASSES, Metrics
from bridge.simulator import DEFAULT_IDENTITY, Simulator
from bridge.sinks import Sink, StdoutSink, make_sink
from bridge.store import DB_NAME, SCHEMA_VERSION, Store, read_status

PY = sys.executable
CLI = str(Path(sys.executable).with_name("maintenance-bridge"))
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


# -- helpers ---------------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET on the bridge's endpoint."""
    try:
        with OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def kill_pids(path: Path) -> list[int]:
    """SIGKILL every pid listed in `path` (one per line) that still runs; the pids."""
    pids = [int(p) for p in path.read_text().split()] if path.exists() else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def runs(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "maintenance_bridge_hook_runs_total", {"result": result}
    )
    return float(value or 0)


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one sample (by its full name) with exactly these labels."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError(f"{name}{labels} not exported")


def scrape(port: int) -> tuple[str, dict[str, Any]]:
    status, ctype, text = http_get(port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    return text, {f.name: f for f in text_string_to_metric_families(text)}


class Recording:
    """A sink wrapper that notes when each event was acknowledged (monotonic time)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.name = inner.name
        self.acked: list[tuple[Event, float]] = []
        self._lock = threading.Lock()

    def send(self, event: Event) -> Any:
        future = self.inner.send(event)
        future.add_done_callback(lambda f: self._done(event, f))
        return future

    def _done(self, event: Event, future: Future[Any]) -> None:
        if future.exception() is None:
            with self._lock:
                self.acked.append((event, time.monotonic()))

    def events(self, kind: str | None = None) -> list[tuple[Event, float]]:
        with self._lock:
            return [(e, t) for e, t in self.acked if kind is None or e.kind == kind]

    def recover(self, event: Event) -> None:
        self.inner.recover(event)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Bridge:
    """The in-process bridge (support.harness) and the simulator it watches."""

    sim: Simulator
    running: InProcessBridge
    baseline: dict[str, int] = field(default_factory=dict)  # the simulator's stats before

    @property
    def config(self) -> Config:
        return self.running.config

    @property
    def sink(self) -> Recording:
        return self.running.sink

    @property
    def port(self) -> int:
        return self.config.http_port

    def requests(self, key: str) -> int:
        return self.sim.stats().get(key, 0)

    def settled(self) -> None:
        """Every watcher has its first answer and hangs in its next long poll."""
        for key in self.config.keys:
            start = self.baseline.get(key, 0)
            wait_for(f"{key} watched", lambda k=key, n=start: self.requests(k) >= n + 2)

    def change(self, key: str, value: str | None, kind: str) -> float:
        """Set a value and wait for its event's acknowledgement; the time of the change."""
        before = len(self.sink.events(kind))
        t0 = time.monotonic()
        if value is None:
            self.sim.delete_value(key)
        else:
            self.sim.set_value(key, value)
        wait_for(f"{kind} acknowledged", lambda: len(self.sink.events(kind)) > before)
        return t0


def config_for(sim: Simulator, state_dir: Path, **overrides: Any) -> Config:
    base = Config(
        metadata_url=sim.url,
        state_dir=state_dir,
        keys=(MAINTENANCE, PREEMPTED),
        poll_timeout=5,
        absent_interval=0.2,
        retry_cap=0.1,
        drain_timeout=1.0,
        exec_timeout=5.0,
    )
    return replace(base, **overrides)


@contextlib.contextmanager
def bridge_running(
    sim: Simulator,
    config: Config,
    inner: Sink | None = None,
    *,
    settle: bool = True,
    environ: dict[str, str] | None = None,
) -> Iterator[Bridge]:
    """The bridge in a thread; `environ` is its environment (hooks inherit it)."""
    sink = Recording(inner or StdoutSink(io.StringIO()))
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(environ or {})}
    baseline = sim.stats()  # the simulator may have served an earlier run
    with in_process(config, sink, environ) as running:
        handle = Bridge(sim, running, baseline)
        if settle:
            handle.settled()
        yield handle


def pubsub_sink(config: Config, server: PubSubServer, monkeypatch: pytest.MonkeyPatch) -> Sink:
    """The bridge's own Pub/Sub sink, pointed at the local server through the environment."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return make_sink(replace(config, sink="pubsub", pubsub_emulator_host=server.host_port))


@pytest.fixture
def adm(pubsub: PubSubServer) -> Iterator[PubSubAdmin]:
    with admin(pubsub) as a:
        yield a


def topic_and_sub(adm: PubSubAdmin, *, create_topic: bool = True) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    topic = adm.topic_path(f"ops-{suffix}")
    if create_topic:
        adm.create_topic(topic)
    return topic, adm.subscription_path(f"ops-{suffix}-sub")


# -- hooks, on their own -------------------------------------------------------------------


def test_hook_gets_the_cloudevent_on_stdin_and_its_fields_in_the_environment(tmp_path):
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        "out = {'stdin': json.load(sys.stdin), 'env': dict(os.environ)}\n"
        f"open({str(tmp_path / 'seen.json')!r}, 'w').write(json.dumps(out))\n"
    )
    other = tmp_path / "other-ran"
    metrics = Metrics()
    hooks = Hooks(
        (f"maintenance.={PY} {script}", f"preemption.=touch {other}"),
        timeout=10,
        metrics=metrics,
        environ={"PATH": os.environ["PATH"], "FROM_BRIDGE": "kept"},
    )
    event = event_for(MAINTENANCE, "NONE", "TERMINATE_ON_HOST_MAINTENANCE", sequence=7)
    try:
        hooks.dispatch(event)
        wait_for("hook run", lambda: runs(metrics, "ok") == 1)
    finally:
        hooks.close()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["stdin"] == event.to_structured()
    assert decode_structured(seen["stdin"]) == event
    env = seen["env"]
    assert {k: v for k, v in env.items() if k.startswith(("CE_", "BRIDGE_"))} == {
        "CE_ID": event.id,
        "CE_TYPE": "io.github.maintenancebridge.gce.v1.maintenance.started",
        "CE_SOURCE": "//compute.googleapis.com/projects/demo-project/zones/us-central1-a"
        "/instances/demo-vm",
        "CE_SUBJECT": MAINTENANCE,
        "CE_TIME": event.time,
        "BRIDGE_KIND": "maintenance.started",
        "BRIDGE_KEY": MAINTENANCE,
        "BRIDGE_PREVIOUS": "NONE",
        "BRIDGE_CURRENT": "TERMINATE_ON_HOST_MAINTENANCE",
        "BRIDGE_NOTICE_SECONDS": "3600",
        "BRIDGE_HAPPENED_WHILE_DOWN": "false",
        "BRIDGE_INSTANCE_ID": INSTANCE.id,
        "BRIDGE_INSTANCE_NAME": "demo-vm",
        "BRIDGE_ZONE": "us-central1-a",
    }
    assert env["FROM_BRIDGE"] == "kept", "the bridge's own environment is passed on"
    assert not other.exists(), "a hook limited to preemption.* does not run for maintenance"


def test_hung_hook_is_killed_with_its_children_at_the_timeout(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bridge.hooks")
    pids, child = tmp_path / "pids", tmp_path / "child"
    # The hook leaves a grandchild behind it: the timeout must take the whole group.
    hook = f"sh -c 'sleep 30 & echo $! > {child}; echo $$ > {pids}; wait'"
    metrics = Metrics()
    hooks = Hooks((hook,), timeout=0.5, metrics=metrics, environ=dict(os.environ))
    try:
        t0 = time.monotonic()
        hooks.dispatch(event_for(PREEMPTED, "FALSE", "TRUE"))
        wait_for("timeout counted", lambda: runs(metrics, "timeout") == 1)
        took = time.monotonic() - t0
        assert 0.5 <= took < 3.0
        hook_pid, child_pid = int(pids.read_text()), int(child.read_text())
        wait_for("hook and its child gone", lambda: not alive(hook_pid) and not alive(child_pid))
    finally:
        hooks.close()
        kill_pids(pids)
        kill_pids(child)
    assert runs(metrics, "ok") == 0
    assert re.search(
        r"hook .* for preemption\.started .*: timeout \(exit None\) in 0\.\d{3} s", caplog.text
    )


def test_failing_hook_is_logged_with_exit_code_and_duration_and_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bridge.hooks")
    metrics = Metrics()
    hooks = Hooks(
        ("sh -c 'exit 3'", str(tmp_path / "no-such-hook")),
        timeout=5,
        metrics=metrics,
        environ=dict(os.environ),
    )
    try:
        hooks.dispatch(event_for(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE"))
        wait_for("both runs counted", lambda: sum(runs(metrics, r) for r in HOOK_RESULTS) == 2)
    finally:
        hooks.close()
    assert runs(metrics, "failed") == 1
    assert runs(metrics, "error") == 1, "a hook that cannot start"
    failed = [r for r in caplog.records if "exit 3" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert re.search(
        r"maintenance\.started \S+: failed \(exit 3\) in \d+\.\d{3} s", failed[0].getMessage()
    )
    assert "could not run" in caplog.text and "no-such-hook" in caplog.text


def test_flood_of_events_drops_past_the_queue_bound_without_piling_up_threads(tmp_path):
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    hook = f"sh -c 'echo $$ >> {started}; while [ ! -e {gate} ]; do sleep 0.01; done'"
    metrics = Metrics()
    threads_before = threading.active_count()
    hooks = Hooks((hook,), timeout=20, metrics=metrics, environ=dict(os.environ))
    flood = 3 * MAX_QUEUED
    try:
        t0 = time.monotonic()
        for seq in range(flood):
            hooks.dispatch(event_for(PREEMPTED, "FALSE", "TRUE", sequence=seq))
        dispatch_took = time.monotonic() - t0

        def count(result: str) -> float:
            return runs(metrics, result)

        assert count("dropped") == flood - MAX_QUEUED
        assert dispatch_took < 0.5, f"dispatch blocked the caller for {dispatch_took:.3f} s"
        wait_for(
            "the pool busy", lambda: started.exists() and len(started.read_text().split()) == 4
        )

        def hook_processes() -> int:
            return sum(p.name() == "sh" for p in psutil.Process().children())

        # Give a fifth process every chance to appear.
        holds_for("at most 4 hook processes", lambda: hook_processes() <= 4, 0.3)
        assert hook_processes() == 4, "hooks run on a pool of 4, not one process per event"
        hook_threads = [t for t in threading.enumerate() if t.name.startswith("hook")]
        assert len(hook_threads) == 4
        assert threading.active_count() <= threads_before + 4
        gate.touch()
        wait_for("the queue worked off", lambda: count("ok") == MAX_QUEUED)
        assert count("failed") == count("timeout") == 0
        # The slots are free again: a new event after the flood runs.
        hooks.dispatch(event_for(PREEMPTED, "TRUE", "FALSE"))
        wait_for("a run after the flood", lambda: count("ok") == MAX_QUEUED + 1)
    finally:
        gate.touch()
        hooks.close()
        kill_pids(started)
    assert len(started.read_text().split()) == MAX_QUEUED + 1


def test_an_event_recorded_while_stopping_is_dropped_not_raised(tmp_path, caplog):
    """A watcher that records one last event during shutdown must not die on a closed pool."""
    metrics = Metrics()
    hooks = Hooks((f"touch {tmp_path / 'ran'}",), timeout=5, metrics=metrics, environ={})
    hooks.close()
    hooks.dispatch(event_for(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE"))
    assert runs(metrics, "dropped") == 1
    assert "the bridge is stopping" in caplog.text
    assert not (tmp_path / "ran").exists()


# -- hooks inside the bridge: the done-when --------------------------------------------------


def _publication_delays(bridge: Bridge, rounds: int) -> list[float]:
    """Seconds from a metadata change to Pub/Sub's acknowledgement of its event."""
    delays = []
    for _ in range(rounds):
        for value, kind in (
            ("TERMINATE_ON_HOST_MAINTENANCE", "maintenance.started"),
            ("NONE", "maintenance.ended"),
        ):
            t0 = bridge.change(MAINTENANCE, value, kind)
            delays.append(bridge.sink.events(kind)[-1][1] - t0)
    return delays


def test_a_hook_that_sleeps_30_s_does_not_delay_publication(tmp_path, pubsub, adm, monkeypatch):
    topic, _ = topic_and_sub(adm)
    pids, starts = tmp_path / "pids", tmp_path / "starts"
    # The hook notes its pid and its start (wall clock), then sleeps 30 s (its own timeout: 60).
    hook = f"maintenance.=sh -c 'echo $$ >> {pids}; date +%s.%N >> {starts}; exec sleep 30'"
    rounds = 2  # 4 events: each hook gets one of the pool's 4 workers at once
    results: dict[str, list[float]] = {}
    try:
        for name, execs in (("without", ()), ("with", (hook,))):
            sim = Simulator().start()
            try:
                config = config_for(
                    sim, tmp_path / name, topic=topic, sink="pubsub", exec=execs, exec_timeout=60
                )
                (tmp_path / name).mkdir()
                with bridge_running(sim, config, pubsub_sink(config, pubsub, monkeypatch)) as b:
                    changed_wall = time.time()
                    results[name] = _publication_delays(b, rounds)
                    if execs:  # before stopping, which cancels hooks not started yet
                        wait_for(
                            "every hook started",
                            lambda: pids.exists() and len(pids.read_text().split()) == 2 * rounds,
                        )
                        running = [int(p) for p in pids.read_text().split()]
                        assert all(alive(pid) for pid in running), "every hook still sleeping"
            finally:
                sim.stop()
        hook_pids = [int(p) for p in pids.read_text().split()]
        assert len(hook_pids) == 2 * rounds, "one hook per maintenance event"
        # Stopping the bridge killed them: a hook must not outlive its service's stop timeout.
        wait_for("every hook killed", lambda: not any(alive(pid) for pid in hook_pids))
        first_start = float(starts.read_text().split()[0])
        # With its event, not after another hook's 30 s (bounds from the hook's sleep, not from
        # how fast this machine is today).
        assert first_start - changed_wall < 10, "the hook started with its event"
    finally:
        kill_pids(pids)
    without, with_hook = statistics.median(results["without"]), statistics.median(results["with"])
    print(
        f"change -> Pub/Sub ack, median of {2 * rounds}: {without * 1000:.1f} ms without hooks, "
        f"{with_hook * 1000:.1f} ms with a 30 s hook on every event"
    )
    assert max(results["with"]) < 10, "publication waited for a 30 s hook"


# -- the recipes in docs/local-actions.md, as printed there -----------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "local-actions.md"


def recipe(name: str, into: Path) -> Path:
    """Write the `#!/bin/sh` block of docs/local-actions.md that names itself `name`."""
    blocks = dict(
        (m[2], m[1])
        for m in re.finditer(r"```sh\n(#!/bin/sh\n# (mb-[a-z]+):.*?)```", DOCS.read_text(), re.S)
    )
    path = into / name
    path.write_text(blocks[name])
    path.chmod(0o755)
    return path


class Trainer(http.server.ThreadingHTTPServer):
    """Recipe 1's other side: a checkpoint endpoint that notes what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
                self.requests.append((handler.headers["Content-Type"], body))
                handler.send_response(202)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, format: str, *args: Any) -> None:
                return None

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/checkpoint"


def test_recipes_checkpoint_on_terminate_and_drain_around_a_migration(tmp_path, sim, caplog):
    caplog.set_level(logging.INFO, logger="bridge.hooks")
    checkpoint, drain = recipe("mb-checkpoint", tmp_path), recipe("mb-drain", tmp_path)
    flag = tmp_path / "drain"
    trainer = Trainer()
    port = free_port()
    config = config_for(
        sim, tmp_path, http_port=port, exec=(f"maintenance.={checkpoint}", f"maintenance.={drain}")
    )
    env = {"CHECKPOINT_URL": trainer.url, "DRAIN_FLAG": str(flag)}

    def runs_of(result: str) -> float:
        return sample(scrape(port)[1], "maintenance_bridge_hook_runs_total", result=result)

    def hooks_said() -> list[str]:  # a failure says what each hook run ended with
        return [r.getMessage() for r in caplog.records if r.name == "bridge.hooks"]

    try:
        with bridge_running(sim, config, environ=env) as b:
            # A live migration: drained at the notice, serving again when it is over.
            b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
            wait_for("the drain flag", flag.exists, detail=hooks_said)
            migration = b.sink.events("maintenance.started")[-1][0]
            assert flag.read_text() == f"{migration.id}\n"
            b.change(MAINTENANCE, "NONE", "maintenance.ended")
            wait_for("the drain flag removed", lambda: not flag.exists(), detail=hooks_said)
            wait_for("four runs", lambda: runs_of("ok") == 4, detail=hooks_said)
            assert trainer.requests == [], "a migration needs no checkpoint"

            # Host maintenance that stops the VM: the trainer gets the CloudEvent.
            b.change(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE", "maintenance.started")
            wait_for("the checkpoint request", lambda: trainer.requests, detail=hooks_said)
            terminate = b.sink.events("maintenance.started")[-1][0]
            ctype, body = trainer.requests[0]
            assert ctype == "application/cloudevents+json"
            assert decode_structured(json.loads(body)) == terminate
            wait_for("six runs", lambda: runs_of("ok") == 6, detail=hooks_said)
            assert not flag.exists(), "no drain for a stop"

            # The trainer is gone: the hook fails, and says so in its exit code.
            trainer.shutdown()
            trainer.server_close()
            b.change(MAINTENANCE, "NONE", "maintenance.ended")
            b.change(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE", "maintenance.started")
            wait_for("a failed run", lambda: runs_of("failed") == 1, detail=hooks_said)
            assert runs_of("ok") == 9
    finally:
        trainer.server_close()


# -- /metrics ----------------------------------------------------------------------------------

FIXED_LABELS: dict[str, set[str]] = {
    "kind": set(KINDS),
    "reason": set(PUBLISH_FAILURE_CLASSES),
    "class": set(FAILURE_CLASSES),
    "result": set(HOOK_RESULTS),
    "le": {f"{float(b)}" for b in LATENCY_BUCKETS} | {"+Inf"},
    "key": set(WATCHED_KEYS),
    "version": {__version__},
}
SERIES = {  # family -> (type, label names)
    "maintenance_bridge_events": ("counter", {"kind"}),
    "maintenance_bridge_publish_success": ("counter", set()),
    "maintenance_bridge_publish_failures": ("counter", {"reason"}),
    "maintenance_bridge_outbox_depth": ("gauge", set()),
    "maintenance_bridge_outbox_oldest_age_seconds": ("gauge", set()),
    "maintenance_bridge_outbox_dropped": ("counter", set()),
    "maintenance_bridge_parked_events": ("gauge", set()),
    "maintenance_bridge_metadata_errors": ("counter", {"class"}),
    "maintenance_bridge_hook_runs": ("counter", {"result"}),
    "maintenance_bridge_last_change_timestamp_seconds": ("gauge", set()),
    "maintenance_bridge_store_errors": ("counter", set()),
    "maintenance_bridge_change_to_publish_seconds": ("histogram", set()),
    "maintenance_bridge_build_info": ("gauge", {"version"}),
    "maintenance_bridge_last_poll_timestamp_seconds": ("gauge", {"key"}),
    # prometheus_client's ProcessCollector: CPU, memory, file descriptors, start time.
    "process_cpu_seconds": ("counter", set()),
    "process_virtual_memory_bytes": ("gauge", set()),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_start_time_seconds": ("gauge", set()),
    "process_open_fds": ("gauge", set()),
    "process_max_fds": ("gauge", set()),
}
UNKNOWN_VALUES = ("FUTURE_MAINTENANCE_Q7", "PERHAPS_Z3", "WEIRD_WINDOW_X9")


def check_bounded(text: str, families: dict[str, Any]) -> None:
    """Only the documented families, and every label value from its fixed set."""
    assert set(families) == set(SERIES), "no series beyond the documented ones"
    assert "_created" not in text, "no per-series start times: process_start_time_seconds says it"
    for name, family in families.items():
        kind, label_names = SERIES[name]
        assert family.type == kind, name
        for s in family.samples:
            assert set(s.labels) - {"le"} == label_names, (s.name, s.labels)
            for label, value in s.labels.items():
                assert value in FIXED_LABELS[label], f"{s.name}: {label}={value!r}"
    # Nothing instance-specific and no raw metadata value anywhere, label or help text.
    for raw in (*UNKNOWN_VALUES, "demo-vm", DEFAULT_IDENTITY["instance/id"], "us-central1"):
        assert raw not in text


def test_metrics_parse_carry_every_series_and_keep_labels_bounded(
    tmp_path, sim, pubsub, adm, monkeypatch
):
    topic, _ = topic_and_sub(adm, create_topic=False)  # missing at first: publishes fail
    port = free_port()
    config = config_for(
        sim,
        tmp_path,
        keys=(MAINTENANCE, PREEMPTED, UPCOMING),
        topic=topic,
        sink="pubsub",
        http_port=port,
        exec=("true", "maintenance.=false"),
    )
    with bridge_running(sim, config, pubsub_sink(config, pubsub, monkeypatch)) as b:
        text, fam = scrape(port)
        check_bounded(text, fam)
        for kind in KINDS:  # every fixed label value is there from the first scrape, at 0
            assert sample(fam, "maintenance_bridge_events_total", kind=kind) == 0
        assert sample(fam, "maintenance_bridge_last_change_timestamp_seconds") == 0
        assert sample(fam, "maintenance_bridge_build_info", version=__version__) == 1
        started = sample(fam, "process_start_time_seconds")
        assert time.time() - 3600 < started <= time.time(), "this process's start: a restart shows"
        assert sample(fam, "process_resident_memory_bytes") > 10e6
        assert sample(fam, "process_cpu_seconds_total") > 0
        for key in (MAINTENANCE, PREEMPTED, UPCOMING):  # each watcher has had its first answer
            polled = sample(fam, "maintenance_bridge_last_poll_timestamp_seconds", key=key)
            assert abs(polled - time.time()) < 10, key

        # Publishing fails (topic missing): failures by class, the outbox fills and ages.
        b.sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        wait_for(
            "a not_found failure",
            lambda: sample(
                scrape(port)[1], "maintenance_bridge_publish_failures_total", reason="not_found"
            ),
        )
        wait_for(
            "the waiting event 0.3 s old",
            lambda: sample(scrape(port)[1], "maintenance_bridge_outbox_oldest_age_seconds") >= 0.3,
        )
        _, fam = scrape(port)
        assert sample(fam, "maintenance_bridge_outbox_depth") == 1
        assert 0.3 <= sample(fam, "maintenance_bridge_outbox_oldest_age_seconds") < 10
        assert sample(fam, "maintenance_bridge_publish_success_total") == 0
        assert (
            abs(sample(fam, "maintenance_bridge_last_change_timestamp_seconds") - time.time()) < 10
        )

        adm.create_topic(topic)  # the outbox drains on its own
        wait_for(
            "the outbox drained",
            lambda: sample(scrape(port)[1], "maintenance_bridge_publish_success_total") == 1,
            timeout=15,
        )
        _, fam = scrape(port)
        assert sample(fam, "maintenance_bridge_outbox_depth") == 0
        assert sample(fam, "maintenance_bridge_outbox_oldest_age_seconds") == 0

        # Metadata errors, one of each class the simulator can produce quickly, in order.
        for kind, params in (
            ("status", {"status": 503}),
            ("status", {"status": 429}),
            ("status", {"status": 400}),
            ("drop", {}),
            ("malformed", {}),
        ):
            b.sim.inject(kind, 1, MAINTENANCE, **params)
        b.change(MAINTENANCE, "NONE", "maintenance.ended")  # frees the hanging poll
        expected = {"http_5xx": 1, "http_429": 1, "http_4xx": 1, "connection": 1, "protocol": 1}

        def errors() -> dict[str, float]:
            fam = scrape(port)[1]
            return {
                c: sample(fam, "maintenance_bridge_metadata_errors_total", **{"class": c})
                for c in FAILURE_CLASSES
            }

        wait_for(
            "every error class counted", lambda: all(errors()[c] >= n for c, n in expected.items())
        )
        assert errors()["timeout"] == 0
        b.settled()

        # Values nobody has seen before: events flow, labels stay within the fixed sets.
        b.change(MAINTENANCE, UNKNOWN_VALUES[0], "maintenance.started")
        b.change(PREEMPTED, UNKNOWN_VALUES[1], "preemption.started")
        window = {"type": UNKNOWN_VALUES[2], "window_start_time": "2030-01-01T00:00:00Z"}
        b.change(UPCOMING, json.dumps(window), "upcoming.scheduled")
        hooks_expected = {"ok": 5, "failed": 3}  # `true` on all 5 events, `false` on 3

        def hook_runs() -> dict[str, float]:
            fam = scrape(port)[1]
            return {
                r: sample(fam, "maintenance_bridge_hook_runs_total", result=r) for r in HOOK_RESULTS
            }

        wait_for(
            "hook runs counted", lambda: all(hook_runs()[r] == n for r, n in hooks_expected.items())
        )
        text, fam = scrape(port)
    check_bounded(text, fam)
    events = {k: sample(fam, "maintenance_bridge_events_total", kind=k) for k in KINDS}
    assert {k: v for k, v in events.items() if v} == {
        "maintenance.started": 2,
        "maintenance.ended": 1,
        "preemption.started": 1,
        "upcoming.scheduled": 1,
    }
    assert sample(fam, "maintenance_bridge_publish_success_total") == 5
    assert sample(fam, "maintenance_bridge_publish_failures_total", reason="not_found") >= 1
    assert hook_runs_ok(fam) == hooks_expected
    count = sample(fam, "maintenance_bridge_change_to_publish_seconds_count")
    assert count == 5, "each published event observed once"
    assert sample(fam, "maintenance_bridge_change_to_publish_seconds_bucket", le="+Inf") == 5
    assert 0 < sample(fam, "maintenance_bridge_change_to_publish_seconds_sum") < 60
    assert sample(fam, "maintenance_bridge_store_errors_total") == 0
    assert sample(fam, "maintenance_bridge_outbox_dropped_total") == 0


def hook_runs_ok(fam: dict[str, Any]) -> dict[str, float]:
    runs = {r: sample(fam, "maintenance_bridge_hook_runs_total", result=r) for r in HOOK_RESULTS}
    return {r: v for r, v in runs.items() if v}


def test_outbox_age_counts_events_restored_from_disk(tmp_path, sim, pubsub, adm, monkeypatch):
    """After a restart, events still waiting from the last run are as old as they are."""
    topic, _ = topic_and_sub(adm, create_topic=False)
    config = config_for(sim, tmp_path, topic=topic, sink="pubsub", drain_timeout=0.2)
    with bridge_running(sim, config, pubsub_sink(config, pubsub, monkeypatch)) as b:
        b.sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        wait_for(
            "the event 0.5 s in the outbox",
            lambda: (read_status(tmp_path / DB_NAME)["outbox_oldest_age_seconds"] or 0) >= 0.5,
        )
    port = free_port()
    config = replace(config, http_port=port)
    with bridge_running(sim, config, pubsub_sink(config, pubsub, monkeypatch)):
        _, fam = scrape(port)
        assert sample(fam, "maintenance_bridge_outbox_depth") == 1
        assert sample(fam, "maintenance_bridge_outbox_oldest_age_seconds") >= 0.5


# -- /healthz and /readyz ------------------------------------------------------------------------


def test_endpoint_verdicts_follow_health():
    health, metrics = Health(), Metrics()
    server = serve("127.0.0.1", 0, health, metrics)
    port = server.server_address[1]
    try:
        assert http_get(port, "/healthz")[::2] == (200, "ok\n")
        assert http_get(port, "/readyz")[::2] == (503, "not ready\n")
        health.ready = True
        assert http_get(port, "/readyz")[::2] == (200, "ok\n")
        health.deadlines["instance/preempted"] = time.monotonic() - 42  # a promise broken
        status, _, body = http_get(port, "/healthz")
        assert (status, body) == (503, "instance/preempted is 42 s overdue\n")
        assert http_get(port, "/readyz")[0] == 503, "not ready while not healthy"
        health.deadlines["instance/preempted"] = time.monotonic() + 60
        health.store_failed("disk I/O error")
        assert http_get(port, "/healthz")[::2] == (
            503,
            "state store not writable: disk I/O error\n",
        )
        health.store_ok()
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/nope")[0] == 404
        assert http_get(port, "/healthz?verbose=1")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


class _ShiftedClock:
    """health.py's view of time, movable forward: a stuck loop without waiting for it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_healthz_goes_red_when_one_watcher_is_stuck(tmp_path, sim, monkeypatch):
    clock = _ShiftedClock()
    monkeypatch.setattr(bridge.health, "time", clock)
    port = free_port()
    config = config_for(sim, tmp_path, http_port=port, poll_timeout=1)
    with bridge_running(sim, config) as b:
        assert http_get(port, "/healthz")[::2] == (200, "ok\n")
        assert http_get(port, "/readyz")[::2] == (200, "ok\n")
        # The maintenance watcher's next request hangs (the server holds it 60 s) ...
        sim.inject("delay", 1, MAINTENANCE, seconds=60)
        before = b.requests(MAINTENANCE)
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        wait_for("the stuck request", lambda: b.requests(MAINTENANCE) > before)
        # ... and two minutes pass: the preempted watcher keeps its promises, this one cannot.
        clock.offset = 120.0

        def red() -> tuple[int, str] | None:
            status, _, body = http_get(port, "/healthz")
            return (status, body) if body.count("overdue") == 1 else None

        status, body = wait_for("only the stuck watcher overdue", red)
        assert status == 503
        assert re.fullmatch(r"instance/maintenance-event is \d+ s overdue\n", body)
        assert http_get(port, "/readyz")[0] == 503
        assert http_get(port, "/metrics")[0] == 200, "metrics still served"


def test_healthz_goes_red_while_the_store_is_not_writable(tmp_path, sim, monkeypatch, caplog):
    stores: list[Store] = []

    class Captured(Store):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(bridge.daemon, "Store", Captured)
    port = free_port()
    config = config_for(sim, tmp_path, http_port=port)
    with bridge_running(sim, config) as b:
        assert http_get(port, "/healthz")[0] == 200
        store = stores[0]
        with store._lock:  # as a read-only remount would: every write now fails
            store._db.execute("PRAGMA query_only=ON")
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        status, _, body = http_get(port, "/healthz")
        assert status == 503
        assert body.startswith("state store not writable: attempt to write a readonly database")
        _, fam = scrape(port)
        assert sample(fam, "maintenance_bridge_store_errors_total") == 1
        assert len(b.sink.events("maintenance.started")) == 1, "published from memory"
        with store._lock:
            store._db.execute("PRAGMA query_only=OFF")
        b.change(MAINTENANCE, "NONE", "maintenance.ended")
        assert http_get(port, "/healthz")[::2] == (200, "ok\n")
    assert "not writable" in caplog.text and "writable again" in caplog.text


def test_readyz_turns_503_while_an_event_waits_too_long_and_200_once_it_is_out(
    tmp_path, sim, pubsub, adm, monkeypatch
):
    topic, _ = topic_and_sub(adm)
    port, age = free_port(), 1.0
    config = config_for(
        sim, tmp_path, topic=topic, sink="pubsub", http_port=port, ready_max_outbox_age=age
    )
    with bridge_running(sim, config, pubsub_sink(config, pubsub, monkeypatch)) as b:
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        assert http_get(port, "/readyz")[::2] == (200, "ok\n")
        adm.delete_topic(topic)
        t0 = time.monotonic()
        b.sim.set_value(MAINTENANCE, "NONE")  # its event cannot get out

        def refused() -> str | None:
            status, _, body = http_get(port, "/readyz")
            return body if status == 503 else None

        body = wait_for("/readyz 503", refused, timeout=age + 10)
        waited = time.monotonic() - t0
        assert age <= waited < age + 3, f"503 after {waited:.2f} s, limit {age} s"
        assert re.fullmatch(
            r"oldest unpublished event waiting \d+ s \(--ready-max-outbox-age 1 s\): "
            r"last publish error: publish not_found: .*\n",
            body,
        ), body
        assert http_get(port, "/healthz")[::2] == (200, "ok\n"), "the loops themselves are fine"

        adm.create_topic(topic)
        wait_for("/readyz 200", lambda: http_get(port, "/readyz")[::2] == (200, "ok\n"), 20)
        assert len(b.sink.events("maintenance.ended")) == 1


def test_readyz_waits_for_the_instance_identity(tmp_path, sim):
    sim.inject("status", 10_000, "instance/zone", status=503)
    port = free_port()
    config = config_for(sim, tmp_path, http_port=port)
    with bridge_running(sim, config, settle=False) as b:
        wait_for("identity retried", lambda: b.requests("instance/zone") >= 3)
        assert http_get(port, "/readyz")[::2] == (503, "not ready\n")
        assert http_get(port, "/healthz")[0] == 200, "alive while it retries"
        sim.clear_faults()
        wait_for("ready", lambda: http_get(port, "/readyz")[0] == 200)
        b.settled()


# -- heartbeats -------------------------------------------------------------------------------


def test_heartbeats_come_at_the_interval(tmp_path, sim):
    interval = 0.25
    config = config_for(sim, tmp_path, heartbeat_interval=interval)
    with bridge_running(sim, config) as b:
        wait_for("five heartbeats", lambda: len(b.sink.events("bridge.heartbeat")) >= 5)
    beats = [e for e, _ in b.sink.events("bridge.heartbeat")]
    # Each waits the interval out after the last one: never sooner (times have millisecond
    # precision). How punctual they are on a busy machine is not a unit test's to judge.
    made = [datetime.fromisoformat(e.data.observed_at.replace("Z", "+00:00")) for e in beats]
    gaps = [(t2 - t1).total_seconds() for t1, t2 in itertools.pairwise(made)]
    assert min(gaps) >= interval - 0.001, gaps
    sequences = [e.data.sequence for e in beats]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    first = beats[0]
    assert first.type.endswith(".bridge.heartbeat")
    assert first.data.instance.name == "demo-vm"


def test_each_published_event_is_logged_once_with_its_id_kind_and_latency(tmp_path, sim, caplog):
    caplog.set_level(logging.DEBUG, logger="bridge")
    config = config_for(sim, tmp_path, heartbeat_interval=0.2)
    with bridge_running(sim, config) as b:
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        wait_for("two heartbeats", lambda: len(b.sink.events("bridge.heartbeat")) >= 2)
    event = b.sink.events("maintenance.started")[0][0]
    published = [r for r in caplog.records if r.getMessage().startswith("published ")]
    (line,) = [r for r in published if getattr(r, "event_id", None) == event.id]
    assert line.levelno == logging.INFO and line.name == "bridge.relay"
    assert line.kind == "maintenance.started"
    assert 0 < line.latency_ms < 5000
    beats = [r for r in published if getattr(r, "kind", None) == "bridge.heartbeat"]
    assert len(beats) >= 2 and all(r.levelno == logging.DEBUG for r in beats), "beats are quiet"
    (recorded,) = [
        r
        for r in caplog.records
        if r.name == "bridge.recorder" and r.getMessage().startswith("maintenance.started:")
    ]
    assert (recorded.event_id, recorded.kind) == (event.id, event.kind)

    # In JSON (what Cloud Logging parses) the fields are top-level keys, next to the usual four.
    entry = json.loads(JsonFormatter().format(line))
    assert entry["severity"] == "INFO" and entry["logger"] == "bridge.relay"
    assert (entry["event_id"], entry["kind"]) == (event.id, "maintenance.started")
    assert entry["latency_ms"] == line.latency_ms
    assert entry["message"] == (
        f"published maintenance.started event {event.id} (sequence {event.data.sequence})"
    )
    clash = logging.makeLogRecord({"msg": "m", "levelname": "INFO", "severity": "DEBUG"})
    assert json.loads(JsonFormatter().format(clash))["severity"] == "INFO", "extra never wins"


# -- status -----------------------------------------------------------------------------------


def test_status_after_a_run_text_and_json(tmp_path, sim, capsys):
    config = config_for(sim, tmp_path, keys=(MAINTENANCE, PREEMPTED, UPCOMING))
    with bridge_running(sim, config) as b:
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        b.change(MAINTENANCE, "NONE", "maintenance.ended")
        b.change(PREEMPTED, "TRUE", "preemption.started")
    last_id = b.sink.events()[-1][0].id
    capsys.readouterr()
    before = files_of(tmp_path)

    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert files_of(tmp_path) == before, "no -wal/-shm created, nothing touched"
    stamp = r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    for pattern in (
        rf"state dir\s+{re.escape(str(tmp_path))}",
        rf"daemon\s+stopped at {stamp}",
        rf"version\s+{re.escape(__version__)}",
        r"sink\s+stdout",
        rf"{MAINTENANCE}\s+NONE  since {stamp}",
        rf"{PREEMPTED}\s+TRUE  since {stamp}",
        rf"{UPCOMING}\s+\(nothing scheduled\)  since {stamp}",
        r"outbox\s+0 waiting",
        rf"last publish\s+{stamp} {last_id}",
        r"last error\s+-",
        r"next sequence\s+4",
    ):
        assert re.search(f"^{pattern}$", text, re.M), pattern

    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keys"][MAINTENANCE]["value"] == "NONE"
    assert report["keys"][PREEMPTED]["value"] == "TRUE"
    assert report["keys"][UPCOMING]["value"] == ""
    assert report["outbox_depth"] == 0 and report["outbox_oldest_age_seconds"] is None
    # Typed fields: a time is an RFC 3339 string of its own, an id is separate, numbers numbers.
    assert report["last_publish"]["event_id"] == last_id
    assert re.fullmatch(stamp, report["last_publish"]["at"])
    assert report["last_error"] is None
    assert report["next_sequence"] == 4
    daemon = report["daemon"]
    assert daemon["running"] is False and daemon["answered"] is False
    assert daemon["pid"] == os.getpid() and daemon["version"] == __version__
    assert daemon["sink"] == "stdout" and daemon["target"] is None
    assert re.fullmatch(stamp, daemon["started_at"]) and re.fullmatch(stamp, daemon["stopped_at"])


def test_status_shows_waiting_events_and_the_last_error(
    tmp_path, sim, pubsub, adm, monkeypatch, capsys
):
    topic, _ = topic_and_sub(adm, create_topic=False)
    config = config_for(sim, tmp_path, topic=topic, sink="pubsub", drain_timeout=0.2)
    with bridge_running(sim, config, pubsub_sink(config, pubsub, monkeypatch)) as b:
        b.sim.set_value(PREEMPTED, "TRUE")
        wait_for(
            "the failure noted",
            lambda: (
                main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
                and json.loads(capsys.readouterr().out)["last_error"]
            ),
        )
        assert main(["status", "--state-dir", str(tmp_path)]) == 0
        text = capsys.readouterr().out
        assert re.search(r"^outbox\s+1 waiting, oldest \d+\.\d s$", text, re.M)
        assert re.search(r"^last error\s+20\S+Z publish not_found: ", text, re.M)
        assert re.search(r"^last publish\s+-$", text, re.M)
        assert re.search(rf"^sink\s+pubsub {re.escape(topic)}$", text, re.M)
        assert re.search(rf"^daemon\s+running \(pid {os.getpid()}\)$", text, re.M)

        adm.create_topic(topic)  # recovery: the event goes out and the error is history
        b.change(PREEMPTED, "FALSE", "preemption.ended")
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["last_error"] is None, "an error cleared by recovery is not shown as current"
    assert report["outbox_depth"] == 0 and report["last_publish"]["event_id"]


def test_status_without_state_is_a_one_line_error(tmp_path, capsys):
    assert main(["status", "--state-dir", str(tmp_path / "never-ran")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no bridge state" in err


def files_of(state_dir: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """Every file of a state dir: (uid, gid, mode, size, mtime in ns)."""
    return {
        path.name: (st.st_uid, st.st_gid, st.st_mode, st.st_size, st.st_mtime_ns)
        for path in sorted(state_dir.iterdir())
        for st in [path.stat()]
    }


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: the harm was root-owned -wal/-shm files left in a service user's dir",
)
def test_status_as_root_on_a_stopped_bridge_changes_nothing_in_its_state_dir(tmp_path, sim):
    state = tmp_path / "state"
    bridge = BridgeProcess(sim.url, state, "--keys", f"{MAINTENANCE},{PREEMPTED}")
    try:
        bridge.wait_for_log("watching")
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
        event = bridge.next_event(10)[1]
        wait_for(
            "the publish recorded", lambda: read_status(state / "bridge.sqlite3")["last_publish"]
        )
    finally:
        bridge.kill()  # kill -9: the last writes are only in the -wal, with its -shm beside it
    assert {"bridge.sqlite3-wal", "bridge.sqlite3-shm"} <= set(files_of(state))
    for path in [state, *state.iterdir()]:  # as the packaged service user owns them
        os.chown(path, 65534, 65534)
    before = files_of(state)
    time.sleep(0.05)  # a write now would show in mtime_ns

    proc = subprocess.run(
        [CLI, "status", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert files_of(state) == before, "status wrote to the state dir"
    report = json.loads(proc.stdout)
    assert report["keys"][MAINTENANCE]["value"] == "MIGRATE_ON_HOST_MAINTENANCE", "WAL read too"
    assert report["last_publish"]["event_id"] == event["id"]
    assert report["daemon"]["running"] is False and report["daemon"]["stopped_at"] is None
    text = subprocess.run(
        [CLI, "status", "--state-dir", str(state)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(rf"^daemon\s+not running \(pid {bridge.proc.pid} is gone\)$", text, re.M)
    assert files_of(state) == before


def test_status_asks_a_running_daemon_over_loopback(tmp_path, sim, capsys):
    port = free_port()
    config = config_for(sim, tmp_path, http_port=port)
    with bridge_running(sim, config) as b:
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        status, ctype, body = http_get(port, "/status")
        assert (status, ctype) == (200, "application/json")
        assert json.loads(body)["daemon"]["pid"] == os.getpid()
        capsys.readouterr()
        assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        daemon = report["daemon"]
        assert (daemon["running"], daemon["answered"]) == (True, True)
        assert daemon["endpoint"] == {"host": "127.0.0.1", "port": port}
        assert report["keys"][MAINTENANCE]["value"] == "MIGRATE_ON_HOST_MAINTENANCE"
        assert report["last_publish"]["event_id"] == b.sink.events()[-1][0].id
        assert main(["status", "--state-dir", str(tmp_path)]) == 0
        text = capsys.readouterr().out
        pattern = rf"^daemon\s+running \(pid {os.getpid()}, answered on 127\.0\.0\.1:{port}\)$"
        assert re.search(pattern, text, re.M)
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    daemon = json.loads(capsys.readouterr().out)["daemon"]
    assert (daemon["running"], daemon["answered"]) == (False, False), "stopped: not asked"


# -- state-store schema version -----------------------------------------------------------------

V0_SCHEMA = """
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL, observed_at TEXT NOT NULL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    body BLOB NOT NULL, recorded_at REAL NOT NULL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def user_version(db_path: Path) -> int:
    db = sqlite3.connect(db_path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_a_store_from_a_newer_bridge_is_refused_with_one_line(tmp_path, sim, capsys):
    Store(tmp_path / "bridge.sqlite3").close()
    db = sqlite3.connect(tmp_path / "bridge.sqlite3")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError) as refused:
        run(config_for(sim, tmp_path), threading.Event())
    line = str(refused.value)
    assert "\n" not in line
    assert f"schema {SCHEMA_VERSION + 1}" in line and "newer maintenance-bridge" in line
    assert main(["status", "--state-dir", str(tmp_path)]) == 2, "status refuses it as well"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "newer maintenance-bridge" in err
    assert str(tmp_path / "bridge.sqlite3") in err, "names the real store, not status's copy"
    assert user_version(tmp_path / "bridge.sqlite3") == SCHEMA_VERSION + 1, "left as it was"


def test_a_store_from_an_older_bridge_is_migrated_on_open(tmp_path, sim, capsys):
    """Version 0 (before versioning) packed 'TIME ID' into one meta row; the event it left in
    the outbox goes out, and the old error, cleared by that publish, is not shown as current."""
    db_path = tmp_path / "bridge.sqlite3"
    waiting = event_for(MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE", sequence=7)
    db = sqlite3.connect(db_path)
    db.executescript(V0_SCHEMA)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [
            ("next_sequence", "8"),
            ("last_publish", "2026-01-02T03:04:05.678Z 0f1e2d3c-old"),
            ("last_error", "2026-01-02T03:04:06.000Z publish unavailable: timed out"),
        ],
    )
    db.execute(
        "INSERT INTO state VALUES (?, ?, ?)",
        (MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "2026-01-02T03:04:05.000Z"),
    )
    db.execute(
        "INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
        (7, waiting.id, waiting.kind, dumps(waiting.to_structured()), time.time() - 5),
    )
    db.commit()
    db.close()

    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["last_publish"] == {"at": "2026-01-02T03:04:05.678Z", "event_id": "0f1e2d3c-old"}
    assert report["last_error"]["message"] == "publish unavailable: timed out"
    assert user_version(db_path) == 0, "status migrated its private copy, not the store"

    sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")
    with bridge_running(sim, config_for(sim, tmp_path)) as b:
        wait_for("the waiting event published", lambda: b.sink.events("maintenance.started"))
    assert user_version(db_path) == SCHEMA_VERSION
    assert [e.id for e, _ in b.sink.events()] == [waiting.id]
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema_version"] == SCHEMA_VERSION
    assert report["last_publish"]["event_id"] == waiting.id
    assert report["last_error"] is None
    assert report["next_sequence"] == 8 and report["outbox_depth"] == 0


# -- listen against the official emulator ----------------------------------------------------


@pytest.fixture
def emulator(pubsub: PubSubServer, monkeypatch: pytest.MonkeyPatch) -> PubSubServer:
    """The official emulator, and the environment `listen` finds it through."""
    for name, value in pubsub.env().items():
        monkeypatch.setenv(name, value)
    return pubsub


def _publish_a_story(
    sim: Simulator, tmp_path: Path, topic: str, mode: str, server: PubSubServer, monkeypatch
) -> list[Event]:
    """Run the bridge through four transitions; the events, in order."""
    config = config_for(
        sim,
        tmp_path,
        keys=(MAINTENANCE, PREEMPTED, UPCOMING),
        topic=topic,
        sink="pubsub",
        content_mode=mode,
    )
    window = {
        "type": "SCHEDULED",
        "window_start_time": "2030-01-15T02:00:00Z",
        "window_end_time": "2030-01-15T06:00:00Z",
        "maintenance_status": "PENDING",
    }
    with bridge_running(sim, config, pubsub_sink(config, server, monkeypatch)) as b:
        b.change(UPCOMING, json.dumps(window), "upcoming.scheduled")
        b.change(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE", "maintenance.started")
        b.change(MAINTENANCE, "NONE", "maintenance.ended")
        b.change(PREEMPTED, "TRUE", "preemption.started")
    return [e for e, _ in b.sink.events()]


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_listen_decodes_both_content_modes(mode, tmp_path, sim, emulator, adm, monkeypatch, capsys):
    topic, sub = topic_and_sub(adm)
    adm.create_subscription(topic, sub)
    sub_json = adm.create_subscription(topic, sub + "-json")
    events = _publish_a_story(sim, tmp_path, topic, mode, emulator, monkeypatch)
    assert [e.kind for e in events] == [
        "upcoming.scheduled",
        "maintenance.started",
        "maintenance.ended",
        "preemption.started",
    ]
    capsys.readouterr()

    # Without --ack, listen reads and gives everything back to the subscription's consumer.
    assert main(["listen", "--subscription", sub, "--count", "4", "--timeout", "20"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    returned = adm.pull_until(sub, 4, timeout=5)  # at once, not after the 10 s ack deadline
    assert ids_of(returned) == [e.id for e in events], "all left there"
    assert len(lines) == 4
    for line, event in zip(lines, events, strict=True):
        assert line.startswith(f"{event.time}  {event.kind}")
        assert f"seq={event.data.sequence} id={event.id}" in line
        assert "demo-vm (us-central1-a)" in line
    assert "SCHEDULED PENDING window 2030-01-15T02:00:00Z .. 2030-01-15T06:00:00Z" in lines[0]
    assert "NONE -> MIGRATE_ON_HOST_MAINTENANCE notice 60s" in lines[1]
    assert "FALSE -> TRUE notice 30s" in lines[3]

    json_listen = ["listen", "--subscription", sub_json, "--count", "4", "--timeout", "20"]
    assert main([*json_listen, "--json", "--ack"]) == 0
    decoded = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d.pop("orderingkey") for d in decoded] == [INSTANCE.id] * 4
    assert [decode_structured(d) for d in decoded] == events
    assert adm.pull(sub_json, timeout=1.0) == [], "--ack acknowledged what it printed"


def test_listen_console_script_prints_and_skips_foreign_messages(
    tmp_path, sim, emulator, adm, monkeypatch
):
    topic, sub = topic_and_sub(adm)
    adm.create_subscription(topic, sub)
    events = _publish_a_story(sim, tmp_path, topic, "binary", emulator, monkeypatch)
    publisher = adm.publisher()
    try:
        publisher.publish(topic, b"hello", ordering_key="someone-else").result(timeout=10)
    finally:
        publisher.stop()
    env = {**os.environ, **emulator.env()}
    proc = subprocess.run(
        [CLI, "listen", "--subscription", sub, "--ack", "--count", "5", "--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines()] == [e.kind for e in events]
    assert "not a maintenance-bridge event" in proc.stderr and "skipped" in proc.stderr
    assert adm.pull(sub, timeout=1.0) == []


def test_listen_count_takes_no_more_than_asked(tmp_path, sim, emulator, adm, monkeypatch, capsys):
    topic, sub = topic_and_sub(adm)
    adm.create_subscription(topic, sub)
    events = _publish_a_story(sim, tmp_path, topic, "binary", emulator, monkeypatch)
    capsys.readouterr()
    assert main(["listen", "--subscription", sub, "--ack", "--count", "1", "--timeout", "20"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["listen", "--subscription", sub, "--ack", "--count", "3", "--timeout", "20"]) == 0
    rest = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in rest] == [e.kind for e in events[1:]]


def test_listen_timeout_on_a_quiet_subscription_is_kept(emulator, adm, monkeypatch, capsys):
    from google.cloud import pubsub_v1

    topic, sub = topic_and_sub(adm)
    adm.create_subscription(topic, sub)
    pulls: list[float] = []
    real_pull = pubsub_v1.SubscriberClient.pull

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        pulls.append(kwargs["timeout"])
        return real_pull(self, *args, **kwargs)

    monkeypatch.setattr(pubsub_v1.SubscriberClient, "pull", counted)
    t0 = time.monotonic()
    assert main(["listen", "--subscription", sub, "--timeout", "2"]) == 0
    took = time.monotonic() - t0
    assert capsys.readouterr().out == ""
    assert 2.0 <= took < 3.5, f"--timeout 2 took {took:.1f} s"
    assert pulls[0] <= 2.0, "no pull waits past --timeout"
    assert len(pulls) < 20, f"{len(pulls)} pulls: an empty subscription must not be spun on"


def test_listen_on_a_missing_subscription_is_a_one_line_error(emulator, capsys):
    sub = f"projects/{emulator.project}/subscriptions/missing-{uuid.uuid4().hex[:6]}"
    assert main(["listen", "--subscription", sub, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err == f"maintenance-bridge: error: --subscription: {sub} does not exist\n"


def ids_of(messages: list[Received]) -> list[str]:
    return [decode_pubsub(m.attributes, m.data).id for m in messages]


def temporary_subscriptions(adm: PubSubAdmin, topic: str) -> list[str]:
    subs = adm.publisher_api.list_topic_subscriptions(topic=topic, timeout=10)
    return [name for name in subs if "/maintenance-bridge-listen-" in name]


def test_listen_topic_reads_through_its_own_subscription_and_deletes_it(
    tmp_path, sim, emulator, adm, monkeypatch
):
    topic, sub = topic_and_sub(adm)
    adm.create_subscription(topic, sub)  # a consumer's: listen must leave its messages alone
    env = {**os.environ, **emulator.env()}
    cmd = [CLI, "listen", "--topic", topic, "--count", "4", "--timeout", "60"]
    listener = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for("its temporary subscription", lambda: temporary_subscriptions(adm, topic))
        events = _publish_a_story(sim, tmp_path, topic, "binary", emulator, monkeypatch)
        out, err = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert listener.returncode == 0, err
    assert [line.split()[1] for line in out.decode().splitlines()] == [e.kind for e in events]
    assert temporary_subscriptions(adm, topic) == [], "deleted on exit"
    untouched = adm.pull_until(sub, 4, timeout=10)
    assert ids_of(untouched) == [e.id for e in events]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_listen_topic_deletes_its_subscription_when_interrupted(sig, emulator, adm, tmp_path):
    topic, _ = topic_and_sub(adm)
    env = {**os.environ, **emulator.env()}
    err = tmp_path / "listen.err"
    with err.open("wb") as stderr:
        listener = subprocess.Popen(
            [CLI, "listen", "--topic", topic], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        wait_for("its temporary subscription", lambda: temporary_subscriptions(adm, topic))
        # Interrupted while listening: a foreign message it says it skipped shows it pulls.
        publisher = adm.publisher()
        try:
            publisher.publish(topic, b"hello", ordering_key="someone-else").result(timeout=10)
        finally:
            publisher.stop()
        wait_for_text(err, "skipped")
        listener.send_signal(sig)
        listener.wait(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert listener.returncode == 0, err.read_text()
    assert temporary_subscriptions(adm, topic) == []


def test_listen_ack_only_with_a_subscription(capsys):
    topic = "projects/p-123456/topics/t-1"
    assert main(["listen", "--topic", topic, "--ack"]) == 2
    assert "--ack: only with --subscription" in capsys.readouterr().err


def test_listen_on_a_missing_topic_is_a_one_line_error(emulator, capsys):
    topic = f"projects/{emulator.project}/topics/missing-{uuid.uuid4().hex[:6]}"
    assert main(["listen", "--topic", topic, "--timeout", "5"]) == 2
    assert (
        capsys.readouterr().err == f"maintenance-bridge: error: --topic: {topic} does not exist\n"
    )
