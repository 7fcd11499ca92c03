"""The durability core under faults a user meets: a sink that blocks, a value nobody expected,
a thread that meets a bug, a hook that will not end, a sink that refuses for good.

Each runs the real bridge (a `maintenance-bridge run` process, or `bridge.daemon.run` on a
thread where the test hands it a sink) against the simulator. What users rely on: a stdout
nobody reads delays delivery and nothing else (the preemption is recorded and its hook runs at
once, /readyz answers with the reason, and once read every event arrives in order, once); a
lone surrogate is an event, escaped, and the watch goes on; a thread that meets an unexpected
exception is restarted and reported; SIGTERM with a 60 s hook running exits well within the
unit's stop timeout, nothing lost and nothing sent twice; parked events count against /readyz.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from support.bridge import REPO, BridgeProcess
from support.harness import free_port, in_process, wait_for
from support.memory_sink import MemorySink
from test_faults import make_config  # the fault suite's in-process config, not a copy

from bridge import recorder as recorder_module
from bridge import relay as relay_module
from bridge.events import MAINTENANCE, PREEMPTED, Event
from bridge.simulator import Simulator
from bridge.sinks import Permanent
from bridge.store import DB_NAME, read_status

MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), not exported by every Python


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator.start()


def get(port: int, route: str, timeout: float = 5.0) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{route}", timeout=timeout)


def recorded(port: int) -> int:
    """Events recorded so far, from the bridge's own /metrics (answered while it is blocked)."""
    text = get(port, "/metrics").text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("maintenance_bridge_events_total{")
        )
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stdout_nobody_reads_delays_delivery_and_nothing_else(sim, tmp_path):
    """A full pipe on stdout (a blocking log driver): 120 changes, then `preempted=TRUE`: the
    preemption is recorded and its hook runs within 100 ms, /readyz answers within 1 s saying
    why; once the pipe is read, every event arrives in order, once."""
    port, started = free_port(), tmp_path / "hook-started"
    hook = f"preemption.=sh -c 'date +%s.%N > {started}'"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    log_path = tmp_path / "bridge.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "run",
                "--metadata-url",
                sim.url,
                "--state-dir",
                str(tmp_path / "state"),
                "--poll-timeout",
                "5",
                "--http-port",
                str(port),
                "--exec",
                hook,
                "--drain-timeout",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdout is not None
    try:
        fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 4096)  # fills after a few events
        wait_for("ready", lambda: _status(port, "/readyz") == 200, 30)
        for i in range(120):
            sim.set_value(MAINTENANCE, MIGRATE if i % 2 == 0 else "NONE")
            wait_for(f"change {i + 1} recorded", lambda i=i: recorded(port) == i + 1)
        changed = time.time()
        sim.set_value(PREEMPTED, "TRUE")
        hook_at = float(wait_for("the hook ran", lambda: _read(started), 10))
        assert hook_at - changed < 0.1, f"the hook started {hook_at - changed:.3f} s after"
        assert recorded(port) == 121
        status = read_status(tmp_path / "state" / DB_NAME)
        assert status["keys"][PREEMPTED]["value"] == "TRUE", "recorded in the store"

        def blocked() -> str | None:
            began = time.monotonic()
            answer = get(port, "/readyz")
            assert time.monotonic() - began < 1.0, "/readyz took a second"
            return answer.text if answer.status_code == 503 and "blocked" in answer.text else None

        reason = wait_for("/readyz saying the sink is blocked", blocked, 10)
        assert re.search(r"sink stdout blocked in send for \d+ s", reason), reason
        assert get(port, "/healthz").status_code == 200, "alive: only delivery waits"

        lines: list[dict[str, Any]] = []
        reader = threading.Thread(
            target=lambda: lines.extend(json.loads(raw) for raw in proc.stdout), daemon=True
        )
        reader.start()
        wait_for("every event on stdout", lambda: len(lines) >= 121, 30)
        wait_for("/readyz 200 again", lambda: _status(port, "/readyz") == 200, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    reader.join(timeout=5)
    assert code == 0
    assert [line["data"]["sequence"] for line in lines] == list(range(1, 122))
    assert len({line["id"] for line in lines}) == 121, "an event went out twice"
    assert lines[-1]["type"].endswith(".preemption.started")


def _status(port: int, route: str) -> int | None:
    try:
        return get(port, route, timeout=2).status_code
    except requests.RequestException:
        return None


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def test_a_lone_surrogate_is_an_event_and_the_watch_goes_on(sim, tmp_path):
    """JSON `"\\ud800"` decodes to a lone surrogate, which UTF-8 cannot encode: the event
    carries it escaped, and later changes of that key and the others give events."""
    sink = MemorySink()
    config = make_config(sim, tmp_path / "state")
    for _ in range(2):  # and a restart reads the stored value back, no crash loop
        with in_process(config, sink) as bridge:
            wait_for("ready", lambda: _status(bridge.port, "/readyz") == 200)
            if not sink.acked:
                sim.set_value(MAINTENANCE, '"\\ud800"')  # JSON text: the client decodes it
                wait_for("the odd value's event", lambda: len(sink.events()) == 1)
            else:
                sim.set_value(MAINTENANCE, "NONE")
                sim.set_value(PREEMPTED, "TRUE")
                wait_for("the later events", lambda: len(sink.events()) == 3)
            assert get(bridge.port, "/healthz").status_code == 200
    kinds = [(e.kind, e.data.current) for e in sink.events()]
    assert kinds[0] == ("maintenance.started", "\\ud800")
    assert sorted(kinds[1:]) == [("maintenance.ended", "NONE"), ("preemption.started", "TRUE")]


def test_a_thread_that_meets_a_bug_is_restarted_and_reported(sim, tmp_path, monkeypatch):
    """An unexpected exception in a watcher (from the recorder) and in the relay: each thread
    is restarted after a back-off, /healthz says so, and no change is lost."""
    observe = recorder_module.Recorder.observe
    send = relay_module.Relay._send
    bugs = {"observe": 1, "send": 1}

    def buggy_observe(self: Any, key: str, value: str, *args: Any) -> None:
        if key == PREEMPTED and value == "TRUE" and bugs["observe"]:
            bugs["observe"] -= 1
            raise RuntimeError("a bug in observe")
        observe(self, key, value, *args)

    def buggy_send(self: Any, batch: list[Any]) -> bool:
        if any(event.kind == "maintenance.started" for _, event, _ in batch) and bugs["send"]:
            bugs["send"] -= 1
            raise RuntimeError("a bug in send")
        return send(self, batch)

    monkeypatch.setattr(recorder_module.Recorder, "observe", buggy_observe)
    monkeypatch.setattr(relay_module.Relay, "_send", buggy_send)
    sink = MemorySink()
    with in_process(make_config(sim, tmp_path / "state"), sink) as bridge:
        wait_for("ready", lambda: _status(bridge.port, "/readyz") == 200)
        sim.set_value(PREEMPTED, "TRUE")
        sim.set_value(MAINTENANCE, MIGRATE)
        wait_for("both events", lambda: len(sink.events()) == 2, 20)
        health = get(bridge.port, "/healthz")
        assert health.status_code == 503
        assert "thread watch instance/preempted restarted" in health.text, health.text
        assert "thread relay restarted" in health.text and "a bug in send" in health.text
        sim.set_value(PREEMPTED, "FALSE")
        wait_for("a later change", lambda: len(sink.events(PREEMPTED)) == 2)
    assert bugs == {"observe": 0, "send": 0}
    assert [e.data.sequence for e in sink.events()] == [1, 2, 3]


def test_sigterm_with_a_60_s_hook_running_exits_within_10_s(sim, tmp_path):
    """The unit's stop timeout (30 s) must hold however long a hook runs: the hook is killed
    (its process group), said in the log; every event is out once and none is left."""
    pids = tmp_path / "pids"
    hook = f"maintenance.=sh -c 'echo $$ >> {pids}; exec sleep 60'"
    state = tmp_path / "state"
    bridge = BridgeProcess(sim.url, state, "--exec", hook, "--poll-timeout", "5")
    try:
        wait_for("polling", lambda: sim.stats().get(MAINTENANCE, 0) >= 2, 30)
        sim.set_value(MAINTENANCE, MIGRATE)
        sim.set_value(PREEMPTED, "TRUE")
        events = bridge.events(2, timeout=20)
        wait_for("the hook running", lambda: _read(pids))
        hook_pid = int(_read(pids))
        began = time.monotonic()
        assert bridge.terminate(timeout=15) == 0
        took = time.monotonic() - began
    finally:
        if bridge.proc.poll() is None:
            bridge.kill()
        for pid in map(int, _read(pids).split() or []):
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
    assert took < 10, f"exit took {took:.1f} s"
    wait_for("the hook killed", lambda: not alive(hook_pid), 5)
    assert any("killed: the bridge is stopping" in r.get("message", "") for r in bridge.logs())
    kinds = sorted(e["type"].rsplit(".", 2)[-2:] for e in events)
    assert kinds == [["maintenance", "started"], ["preemption", "started"]]
    assert bridge.no_more_events(0.2)
    assert read_status(state / DB_NAME)["outbox_depth"] == 0, "left to go out a second time"


class RefusingSink(MemorySink):
    """Refuses maintenance events for good (an HTTP 400, say): they are parked."""

    def send(self, event: Event) -> Future[str]:
        if event.kind.startswith("maintenance."):
            future: Future[str] = Future()
            future.set_exception(Permanent(400, "bad request"))
            return future
        return super().send(event)


def test_parked_events_count_against_readyz(sim, tmp_path):
    sink = RefusingSink()
    with in_process(make_config(sim, tmp_path / "state"), sink) as bridge:
        wait_for("ready", lambda: _status(bridge.port, "/readyz") == 200)
        sim.set_value(MAINTENANCE, MIGRATE)
        wait_for("not ready", lambda: _status(bridge.port, "/readyz") == 503)
        assert "1 events parked" in get(bridge.port, "/readyz").text
        assert get(bridge.port, "/healthz").status_code == 200
        sim.set_value(PREEMPTED, "TRUE")
        wait_for("the next event still delivered", lambda: len(sink.events(PREEMPTED)) == 1)
        bridge_store = tmp_path / "state" / DB_NAME
        assert read_status(bridge_store)["parked_count"] == 1
