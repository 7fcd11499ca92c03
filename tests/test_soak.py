"""Soak: thousands of transitions on every watched key, memory flat, every one in order.

A real `maintenance-bridge run` subprocess (stdout sink, its lines read as they come) watches an
in-process simulator. Each step changes all three keys at once and waits until the bridge has
published the three events before the next step: with long polling, changes faster than the
bridge re-polls may legitimately coalesce (A -> B -> A between two polls is invisible), so the
driver never outruns it and every change made is a change observed. That is the fastest rate at
which "every transition appears" is a meaningful claim: three parallel long polls, each change
answered at once by the simulator, recorded (SQLite, synchronous=FULL), published and retired.

RSS of the bridge process is sampled at start, after a warm-up (the first 10 %) and at the end.
BRIDGE_SOAK_TRANSITIONS sets the size (CI defaults 2,000 via stdout, 600 via Pub/Sub; the docs
quote 10,000 each).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bridge.events import (
    MAINTENANCE,
    PREEMPTED,
    UPCOMING,
    Event,
    decode_pubsub,
    decode_structured,
)
from bridge.simulator import Simulator
from bridge.transitions import canonical

# Its length is BRIDGE_SOAK_TRANSITIONS's; every step has its own 60 s deadline instead.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(0)]

# CI defaults: 2,000 through stdout, 600 through Pub/Sub (each step waits for the emulator's
# pull); BRIDGE_SOAK_TRANSITIONS sets both.
TRANSITIONS = {
    sink: int(os.environ.get("BRIDGE_SOAK_TRANSITIONS", default))
    for sink, default in (("stdout", "2000"), ("pubsub", "600"))
}
BIN = Path(sys.executable).with_name("maintenance-bridge")
WINDOWS = [
    json.dumps({"type": "SCHEDULED", "maintenance_status": "PENDING", "window_start_time": w})
    for w in ("2030-01-15T02:00:00Z", "2030-01-20T02:00:00Z")
]
CYCLES: dict[str, list[str | None]] = {
    MAINTENANCE: ["MIGRATE_ON_HOST_MAINTENANCE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE", "NONE"],
    PREEMPTED: ["TRUE", "FALSE"],
    UPCOMING: [WINDOWS[0], WINDOWS[1], None],  # None: withdrawn (the 'no notifications' 503)
}
# Memory is flat when the end is within this of the warmed-up size (allocator noise, SQLite's
# page cache filling up to its bound); a leak of even 1 KB per transition would exceed it.
RSS_SLACK = 8 * 1024 * 1024


def expected_current(key: str, value: str | None) -> str:
    if value is None:
        return ""
    return canonical(key, json.loads(value) if key == UPCOMING else value)


@pytest.fixture(params=["stdout", "pubsub-rest", "pubsub-grpc"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """How the bridge publishes and how the test reads back: args, env, a reader. Pub/Sub on
    each transport of its sink (REST, the default, and gRPC)."""
    if request.param == "stdout":
        yield {"name": "stdout", "args": [], "env": {}, "reader": None, "n": TRANSITIONS["stdout"]}
        return
    from support.pubsub import admin, emulator_or_skip

    transport = request.param.removeprefix("pubsub-")
    server = emulator_or_skip()
    try:
        with admin(server) as adm:
            topic = adm.create_topic("soak")
            sub = adm.create_subscription(topic, "soak-sub", ordering=True)

            def reader(put: Any, stop: threading.Event) -> None:
                while not stop.is_set():
                    try:
                        got = adm.pull(sub, max_messages=100, timeout=2.0)
                    except Exception:  # shutting down
                        if stop.is_set():
                            return
                        raise
                    for m in got:
                        put(decode_pubsub(m.attributes, m.data))

            yield {
                "name": f"pubsub {transport} ({server.kind})",
                "args": [
                    "--topic",
                    topic,
                    "--publish-latency",
                    "0.0005",
                    "--pubsub-transport",
                    transport,
                ],
                "env": server.env(),
                "reader": reader,
                "n": TRANSITIONS["pubsub"],
            }
    finally:
        server.kill()


def test_soak(sink, tmp_path):
    sim = Simulator().start()
    args = [
        str(BIN),
        "run",
        "--metadata-url",
        sim.url,
        "--state-dir",
        str(tmp_path / "state"),
        "--poll-timeout",
        "30",
        "--absent-interval",
        "0.005",
        "--log-level",
        "WARNING",
        *sink["args"],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "GCE_", "PUBSUB"))}
    env.update(sink["env"])
    stderr_path = tmp_path / "stderr.log"
    events: queue.Queue[Event | None] = queue.Queue()
    stop_reading = threading.Event()
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
    try:

        def read_stdout() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                events.put(decode_structured(json.loads(line)))
            events.put(None)

        if sink["reader"] is None:
            threading.Thread(target=read_stdout, name="soak-reader", daemon=True).start()
        else:
            threading.Thread(
                target=sink["reader"], args=(events.put, stop_reading), daemon=True
            ).start()
        process = psutil.Process(proc.pid)
        # Ready: each key answered once and is long-polled (nothing to publish yet).
        deadline = time.monotonic() + 30
        while not all(sim.stats().get(k, 0) >= 2 for k in CYCLES):
            assert time.monotonic() < deadline, stderr_path.read_text()
            assert proc.poll() is None, stderr_path.read_text()
            time.sleep(0.01)
        rss_start = process.memory_info().rss
        rss_samples: list[int] = []
        made: dict[str, list[str]] = {key: [] for key in CYCLES}
        seen: list[Event] = []
        total = 0
        wanted = sink["n"]
        steps = -(-wanted // len(CYCLES))
        warm_at = max(1, steps // 10)
        rss_warm = rss_start
        started = time.monotonic()
        for step in range(steps):
            for key, cycle in list(CYCLES.items())[: wanted - total]:
                value = cycle[step % len(cycle)]
                if value is None:
                    sim.delete_value(key)
                else:
                    sim.set_value(key, value)
                made[key].append(expected_current(key, value))
                total += 1
            while len({e.id for e in seen}) < total:
                try:
                    event = events.get(timeout=60)
                except queue.Empty:
                    pytest.fail(f"step {step}: no event in 60 s; {stderr_path.read_text()[-2000:]}")
                assert event is not None, f"the bridge exited: {stderr_path.read_text()[-2000:]}"
                seen.append(event)
            if step + 1 == warm_at:
                rss_warm = process.memory_info().rss
            if step % max(1, steps // 20) == 0:
                rss_samples.append(process.memory_info().rss)
        elapsed = time.monotonic() - started
        rss_end = process.memory_info().rss
        db_bytes = sum(p.stat().st_size for p in (tmp_path / "state").glob("bridge.sqlite3*"))
    finally:
        stop_reading.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        sim.stop()
    assert proc.returncode == 0, stderr_path.read_text()[-2000:]

    # Every transition made appears, in order, under one id; sequences strictly increasing.
    copies = len(seen)
    seen = list({e.id: e for e in reversed(seen)}.values())[::-1]  # first copy of each id
    sequences = [e.data.sequence for e in seen]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    for key, values in made.items():
        assert [e.data.current for e in seen if e.data.key == key] == values, key
    assert not [line for line in stderr_path.read_text().splitlines() if "ERROR" in line]
    growth = rss_end - rss_warm
    figures = {
        "sink": sink["name"],
        "transitions": len(seen),
        "seconds": round(elapsed, 1),
        "transitions_per_second": round(len(seen) / elapsed, 1),
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_max_sampled_mib": round(max(rss_samples) / 2**20, 1),
        "state_files_bytes_at_end": db_bytes,
        "events_lost": sum(map(len, made.values())) - len(seen),
        "same_id_delivered_again": copies - len(seen),
        "transitions_under_two_ids": 0,
    }
    print(json.dumps(figures))
    write_figures("soak_" + "_".join(sink["name"].split()[:2]), figures)
    assert growth < RSS_SLACK, f"RSS grew by {growth / 2**20:.1f} MiB after the warm-up"


def write_figures(name: str, figures: dict[str, Any]) -> None:
    target = os.environ.get("BRIDGE_FIGURES_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"test": name, "finished": stamp, **figures}
        (Path(target) / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")
