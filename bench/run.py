"""Benchmarks of maintenance-bridge against Google's sample and a 2 s poller, in one run.

    .venv/bin/python bench/run.py          # full run, < 12 min: docs/benchmarks.md and .png
    .venv/bin/python bench/run.py --quick  # smoke run for CI, < 60 s, written to a temp dir

It starts everything it measures and stops it again by pid: simulated VMs (bench/simhost.py,
one `bridge.simulator.Simulator` each), the official Pub/Sub emulator (tests/support/pubsub.py;
the in-repo fake if the emulator is not installed, which the report then says), the bridge as
`maintenance-bridge run` subprocesses (bench/stamped_bridge.py where the moment of the Pub/Sub
acknowledgement is needed), Google's sample (bench/baselines/google_sample.py), a 2 s poller
(bench/baselines/poller.py) and a streaming-pull subscriber (bench/subscriber.py).

Timing: every moment is `time.monotonic()` (CLOCK_MONOTONIC, one clock for every process on
Linux) taken where it happens: the simulator host stamps each change right before applying it,
this driver stamps each stdout line as it arrives on the pipe (one selector thread), the
stamped bridge stamps the publish future's resolution, the subscriber its callback.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.simhost import instance_id  # noqa: E402
from bridge.config import Config  # noqa: E402
from bridge.events import Event, Instance, Scheduling, Transition, build_event  # noqa: E402
from bridge.retry import metadata_policy  # noqa: E402
from tests.support.pubsub import PubSubAdmin, PubSubServer, start_pubsub  # noqa: E402

BENCH = REPO / "bench"
PYTHON = sys.executable
PROJECT = "bench-project"
EVENT_KEY = "instance/maintenance-event"
MIGRATE, TERMINATE, NONE = "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE", "NONE"
POLL_INTERVAL = 2.0
# A stall shows as a cluster of samples near 40 ms (the delayed-ACK timer), not as a stray slow
# sample on a busy machine: flag it when this share of the samples lies between 30 and 50 ms.
NAGLE_CLUSTER = 0.05

# Targets from issues 8 and 12: (label, unit, limit); a figure meets its target when <= limit.
TARGETS = {
    "detect_ratio": ("change -> stdout event p50 / the sample's, same changes", "x", 1.4),
    "recovery_median": ("end of a 503 burst -> the hidden change, median", "ms", 150.0),
    "recovery_ratio": ("recovery median / the sample's, same bursts", "x", 0.5),
    "recovery_worst": ("slowest burst / the sample's slowest burst", "x", 1.0),
    "startup_ratio": ("start -> first long-poll, Pub/Sub sink / the sample's (medians)", "x", 2.0),
    "cpu_ratio": ("CPU per event at 100 changes/s, after / before (A/B)", "x", 0.5),
    "stdout_p99": ("change -> stdout event, p99", "ms", 5.0),
    "ack_p99": ("change -> Pub/Sub emulator ack, p99", "ms", 15.0),
    "startup": ("start -> first long-poll (worst of the starts)", "s", 1.0),
    "idle_cpu": ("idle CPU", "% of a core", 0.2),
    "idle_rss": ("idle RSS", "MB", 70.0),
    "idle_requests": ("idle metadata requests (worst key)", "/min/key", 1.0),
}


@dataclass(frozen=True)
class Plan:
    """Sizes of each phase: the full run and the quick smoke run."""

    quick: bool
    idle_seconds: float
    startup_runs: int
    floor_changes: int
    latency_vms: int
    latency_changes: int
    latency_spacing: float
    breakdown_changes: int
    bursts: tuple[float, ...]
    growth: tuple[tuple[float, float], ...]  # (changes per second, seconds)
    fleet_vms: int
    fleet_rounds: int
    fleet_spacing: float
    ab_changes: int  # per side, interleaved
    ab_cpu_seconds: float  # at 100 changes/s, per side


FULL = Plan(
    quick=False,
    idle_seconds=300.0,
    startup_runs=5,
    floor_changes=200,
    latency_vms=8,
    latency_changes=400,
    latency_spacing=0.27,
    breakdown_changes=150,
    bursts=(0.5, 1.0, 2.0, 4.0, 0.5, 1.0, 2.0, 4.0),
    growth=((1, 30.0), (10, 15.0), (100, 8.0)),
    fleet_vms=50,
    fleet_rounds=4,
    fleet_spacing=0.02,
    ab_changes=200,
    ab_cpu_seconds=8.0,
)
QUICK = Plan(
    quick=True,
    idle_seconds=30.0,
    startup_runs=1,
    floor_changes=30,
    latency_vms=4,
    latency_changes=8,
    latency_spacing=0.55,
    breakdown_changes=15,
    bursts=(1.0,),
    growth=((1, 2.0), (10, 1.0), (100, 0.5)),
    fleet_vms=8,
    fleet_rounds=2,
    fleet_spacing=0.03,
    ab_changes=20,
    ab_cpu_seconds=1.0,
)


@dataclass(frozen=True)
class Before:
    """The bridge package as of BASELINE_COMMIT (`git archive`), beside this tree's: the
    "before" of every before/after figure, measured in this run."""

    root: Path
    commit: str

    @classmethod
    def extract(cls, into: Path) -> Before | None:
        try:
            commit = (
                subprocess.run(
                    ["git", "log", "-1", "--format=%h of %cs", BASELINE_COMMIT],
                    cwd=REPO,
                    capture_output=True,
                    check=True,
                )
                .stdout.decode()
                .strip()
            )
            tar = subprocess.run(
                ["git", "archive", "--format=tar", BASELINE_COMMIT, "bridge"],
                cwd=REPO,
                capture_output=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None  # not a git checkout: the A/B rows say n/a
        into.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
        return cls(into, commit)


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """A latency distribution in milliseconds (nearest-rank percentiles)."""

    values: tuple[float, ...]
    missed: int = 0

    @classmethod
    def of(cls, seconds: list[float], missed: int = 0) -> Dist:
        return cls(tuple(sorted(s * 1000.0 for s in seconds)), missed)

    @property
    def n(self) -> int:
        return len(self.values)

    def pct(self, q: float) -> float:
        if not self.values:
            return math.nan
        return self.values[max(0, math.ceil(q / 100.0 * self.n) - 1)]

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def max(self) -> float:
        return self.values[-1] if self.values else math.nan

    def around(self, low: float, high: float) -> int:
        return sum(low <= v <= high for v in self.values)

    def row(self) -> str:
        return f"{fmt_ms(self.p50)} / {fmt_ms(self.p99)} / {fmt_ms(self.max)}"


def fmt_ms(ms: float) -> str:
    if math.isnan(ms):
        return "n/a"
    if math.isinf(ms):
        return "missed"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def ratio(ours: float, theirs: float) -> str:
    if math.isnan(ours) or math.isnan(theirs) or theirs == 0 or ours == 0:
        return "n/a"
    r = ours / theirs
    return f"{r:.2f}x" if r >= 0.1 else f"1/{1 / r:.0f}"


def median(values: list[float]) -> float:
    return Dist(tuple(sorted(values))).p50 if values else math.nan


# -- processes and their output --------------------------------------------------------------


class Line(NamedTuple):
    t: float  # monotonic arrival
    text: str


class Hub:
    """Reads every child's stdout in one thread and stamps each line on arrival."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._cond = threading.Condition()
        self._pending: list[tuple[int, str]] = []
        self._names: dict[int, str] = {}
        self._bufs: dict[int, bytes] = {}
        self._closing = False
        self.lines: dict[str, list[Line]] = defaultdict(list)
        self._thread = threading.Thread(target=self._run, name="hub", daemon=True)
        self._thread.start()

    def add(self, name: str, fd: int) -> None:
        with self._cond:
            self._pending.append((fd, name))
        os.write(self._wake_w, b"+")

    def close(self) -> None:
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join(2.0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while not self._closing:
            events = self._sel.select()
            now = time.monotonic()
            for key, _ in events:
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    with self._cond:
                        for fd, name in self._pending:
                            self._names[fd], self._bufs[fd] = name, b""
                            self._sel.register(fd, selectors.EVENT_READ, name)
                        self._pending.clear()
                    continue
                fd = key.fd
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:
                    chunk = b""
                if not chunk:
                    self._sel.unregister(fd)
                    continue
                *complete, self._bufs[fd] = (self._bufs[fd] + chunk).split(b"\n")
                with self._cond:
                    for raw in complete:
                        self.lines[key.data].append(Line(now, raw.decode(errors="replace")))
                    self._cond.notify_all()

    def get(self, name: str) -> list[Line]:
        with self._cond:
            return list(self.lines.get(name, ()))

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


# Children exec through this so that they die with the driver even if it is killed hard
# (PR_SET_PDEATHSIG survives exec). Not a preexec_fn: forking a process with live gRPC threads
# runs gRPC's fork handlers, which can hang the child before it execs.
_GUARD = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Procs:
    """Every child process, started from the main thread and stopped by its own pid."""

    def __init__(self, root: Path, hub: Hub) -> None:
        self.root = root
        self.hub = hub
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.names: dict[int, str] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        for var in ("GCE_METADATA_HOST", "PUBSUB_EMULATOR_HOST", "PUBSUB_PROJECT_ID"):
            self.env.pop(var, None)
        self.env["PYTHONUNBUFFERED"] = "1"  # as deployed (systemd unit, container)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        watch: bool = True,
        stdin: bool = False,
        guard: bool = True,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        """Spawn `argv`; `guard=False` skips the die-with-parent launcher (start-up timing)."""
        log = (self.root / "logs" / f"{name}.log").open("wb")
        if guard and sys.platform == "linux":
            argv = [PYTHON, "-c", _GUARD, *argv]
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**self.env, **(env or {})},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        self.live[proc.pid] = proc
        self.names[proc.pid] = name
        if watch:
            assert proc.stdout is not None
            self.hub.add(name, proc.stdout.fileno())
        return proc

    def stop(self, *procs: subprocess.Popen[bytes], grace: float = 8.0) -> None:
        """SIGTERM each (the bridge drains), SIGKILL what is still there after `grace`."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.live.pop(proc.pid, None)

    def stop_all(self) -> None:
        self.stop(*self.live.values(), grace=5.0)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.root / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class SimHost:
    """Client of one bench/simhost.py process (synchronous, thread-safe)."""

    def __init__(self, procs: Procs, name: str) -> None:
        self.proc = procs.start(name, [PYTHON, str(BENCH / "simhost.py")], watch=False, stdin=True)
        self.name = name
        self._lock = threading.Lock()

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def add(self, ids: list[int]) -> list[VM]:
        reply = self.call(op="add", ids=ids)["vms"]
        return [VM(self, i, hp, g) for (i, hp), g in zip(reply, ids, strict=True)]


@dataclass(frozen=True)
class VM:
    """One simulated VM: a simulator in a simhost."""

    host: SimHost
    index: int  # in its simhost
    host_port: str
    number: int  # across the run: the VM's identity

    @property
    def url(self) -> str:
        return f"http://{self.host_port}/computeMetadata/v1/"

    @property
    def instance_id(self) -> str:
        return instance_id(self.number)

    @property
    def key(self) -> str:
        return f"vm {self.number}"

    def stats(self) -> dict[str, int]:
        return self.host.call(op="stats", vm=self.index)["stats"]

    def first(self) -> dict[str, float]:
        return self.host.call(op="first", vm=self.index)["first"]


@dataclass(frozen=True)
class Step:
    at: float
    vm: VM
    op: str = "set"
    value: str = ""
    path: str = EVENT_KEY


def play(steps: list[Step]) -> list[float]:
    """Apply the steps on their simhosts (in parallel across hosts); their stamps, in order."""
    by_host: dict[SimHost, list[int]] = defaultdict(list)
    for i, step in enumerate(steps):
        by_host[step.vm.host].append(i)
    stamps: list[float] = [math.nan] * len(steps)

    def run(host: SimHost, idx: list[int]) -> None:
        wire = []
        for i in idx:
            s = steps[i]
            item: dict[str, Any] = {"at": s.at, "vm": s.vm.index, "op": s.op, "path": s.path}
            if s.op == "set":
                item["value"] = s.value
            elif s.op == "fault":
                item.update(kind="status", status=503, count=1_000_000)
            wire.append(item)
        for i, t in zip(idx, host.call(op="play", steps=wire)["t"], strict=True):
            stamps[i] = t

    threads = [threading.Thread(target=run, args=item) for item in by_host.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return stamps


# -- observations ----------------------------------------------------------------------------


class Obs(NamedTuple):
    t: float
    value: str
    seq: int | None = None


def parse(kind: str, lines: list[Line]) -> list[Obs]:
    """Observations of one consumer: (moment, value seen[, bridge sequence])."""
    out: list[Obs] = []
    for line in lines:
        text = line.text.strip()
        if not text:
            continue
        if kind == "sample":
            if text.startswith("Undergoing host maintenance: "):
                out.append(Obs(line.t, text.split(": ", 1)[1]))
            elif text == "Finished host maintenance":
                out.append(Obs(line.t, NONE))
        elif kind == "poller":
            if text.startswith("changed: "):
                out.append(Obs(line.t, text.split(": ", 1)[1]))
        elif kind == "stdout":  # CloudEvents from the stdout sink; the moment is arrival
            with contextlib.suppress(ValueError, KeyError):
                obj = json.loads(text)
                if "specversion" in obj:
                    data = obj["data"]
                    out.append(Obs(line.t, data["current"], data["sequence"]))
        elif kind == "ack":  # stamped bridge: the moment is the publish future's resolution
            with contextlib.suppress(ValueError, KeyError):
                obj = json.loads(text)
                if "ack" in obj:
                    out.append(Obs(obj["ack"], obj["current"], obj["seq"]))
    return out


def match(changes: list[tuple[float, str]], seen: list[Obs]) -> tuple[list[float], int]:
    """Latency of each change to the first later observation of its value, in order.

    An observation counts for change i only if it comes before change i+2 (which may set
    the same value again); changes never observed are counted as missed.
    """
    latencies, missed, j = [], 0, 0
    for i, (t, value) in enumerate(changes):
        limit = changes[i + 2][0] if i + 2 < len(changes) else math.inf
        k = j
        while k < len(seen) and not (seen[k].value == value and seen[k].t >= t):
            k += 1
        if k < len(seen) and seen[k].t < limit:
            latencies.append(seen[k].t - t)
            j = k + 1
        else:
            missed += 1
    return latencies, missed


# -- the run ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def bridge_cli() -> list[str]:
    script = Path(PYTHON).with_name("maintenance-bridge")
    return [str(script)] if script.exists() else [PYTHON, "-m", "bridge"]


@dataclass
class Bench:
    """Shared state of one benchmark run."""

    plan: Plan
    root: Path
    procs: Procs
    hub: Hub
    pubsub: PubSubServer
    admin: PubSubAdmin
    hosts: list[SimHost]
    results: dict[str, Any] = field(default_factory=dict)
    before: Before | None = None  # the A/B baseline's bridge
    _names: Iterator[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))
    _rr: int = 0

    def vms(self, n: int) -> list[VM]:
        """n new simulated VMs, spread over the simhosts, each with its own identity."""
        out: list[VM] = []
        for _ in range(n):
            self._rr += 1
            out += self.hosts[self._rr % len(self.hosts)].add([self._rr])
        return out

    def name(self, what: str) -> str:
        return f"{what}-{next(self._names)}"

    def state_dir(self) -> Path:
        path = self.root / "state" / str(next(self._names))
        path.mkdir(parents=True)
        return path

    def subscriber(self, sub: str | None) -> tuple[str, subprocess.Popen[bytes]]:
        """A subscriber process on `sub`: streaming pull, or Pull on the fake."""
        label = self.name("subscriber")
        argv = [PYTHON, str(BENCH / "subscriber.py"), str(sub)]
        if self.pubsub.kind != "emulator":
            argv.append("--pull")
        return label, self.procs.start(label, argv, self.pubsub.env())

    def topic(self, name: str, subscription: bool = False) -> tuple[str, str | None]:
        topic = self.admin.create_topic(name)
        sub = None
        if subscription:
            sub = self.admin.create_subscription(topic, f"{name}-sub", ordering=True)
        return topic, sub

    def bridge(
        self,
        vm: VM,
        *,
        topic: str = "",
        http_port: int = 0,
        stamped: bool = False,
        extra: tuple[str, ...] = (),
        name: str = "bridge",
        guard: bool = True,
        before: bool = False,
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """Start a bridge on `vm`: `maintenance-bridge run`, the stamped one, or (`before`) the
        A/B baseline's `python -m bridge run`, from its own copy of the package."""
        argv = [PYTHON, str(BENCH / "stamped_bridge.py")] if stamped else [*bridge_cli(), "run"]
        cwd = REPO
        if before:
            assert self.before is not None and not stamped
            argv, cwd = [PYTHON, "-m", "bridge", "run"], self.before.root
        argv += ["--metadata-url", vm.url, "--state-dir", str(self.state_dir())]
        if topic:
            argv += ["--topic", topic]
        if http_port:
            argv += ["--http-port", str(http_port)]
        argv += list(extra)
        env = self.pubsub.env() if topic else {}
        label = self.name(name)
        return label, self.procs.start(label, argv, env, guard=guard, cwd=cwd)

    def sample(self, vm: VM, guard: bool = True) -> tuple[str, subprocess.Popen[bytes]]:
        label = self.name("sample")
        argv = [PYTHON, str(BENCH / "baselines" / "google_sample.py")]
        env = {"GCE_METADATA_HOST": vm.host_port}
        return label, self.procs.start(label, argv, env, guard=guard)

    def poller(self, vm: VM) -> tuple[str, subprocess.Popen[bytes]]:
        label = self.name("poller")
        argv = [PYTHON, str(BENCH / "baselines" / "poller.py"), EVENT_KEY, str(POLL_INTERVAL)]
        return label, self.procs.start(label, argv, {"GCE_METADATA_HOST": vm.host_port})

    def seen(self, watchers: list[tuple[str, str]], value: str) -> dict[str, int]:
        """How many times each (label, kind) has observed `value` so far."""
        return {
            label: sum(o.value == value for o in parse(kind, self.hub.get(label)))
            for label, kind in watchers
        }

    def wait_seen(
        self, watchers: list[tuple[str, str]], value: str, before: dict[str, int], timeout: float
    ) -> list[str]:
        """Wait until each watcher has observed `value` more often than `before`; the laggards."""

        def late() -> list[str]:
            now = self.seen(watchers, value)
            return [label for label, _ in watchers if now[label] <= before[label]]

        self.hub.wait(lambda: not late(), timeout)
        return late()


def settle(plan: Plan) -> None:
    """Flush dirty pages left by the last phase (its processes' logs and databases) so that
    their write-back does not land on the next phase's fsyncs, then let the machine calm."""
    os.sync()
    time.sleep(0.2 if plan.quick else 1.0)


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return True
        time.sleep(interval)
    return False


def wait_ready(
    b: Bench,
    vm: VM,
    *,
    bridges: int = 0,
    samples: int = 0,
    pollers: tuple[str, ...] = (),
    base: dict[str, int] | None = None,
    timeout: float = 60.0,
) -> None:
    """Until every client on `vm` is watching: each bridge's long polls hang (two requests per
    key), each sample has asked twice, each poller has printed its first reading."""
    base = base or {}

    def count(stats: dict[str, int], key: str) -> int:
        return stats.get(key, 0) - base.get(key, 0)

    def ready() -> bool:
        stats = vm.stats()
        return (
            count(stats, "instance/preempted") >= 2 * bridges
            and count(stats, EVENT_KEY) >= 2 * (bridges + samples) + len(pollers)
            and all(b.hub.get(label) for label in pollers)
        )

    if not wait_until(ready, timeout, 0.05):
        raise RuntimeError(f"{vm.key}: clients not watching within {timeout:.0f} s: {vm.stats()}")


# -- phases ----------------------------------------------------------------------------------


class Idle:
    """A pub/sub bridge left alone on its own VM, measured while the other phases run."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        # A simhost of its own: the others block while they play a schedule.
        self.vm = SimHost(b.procs, "simhost-idle").add([0])[0]
        topic, _ = b.topic("bench-idle")
        self.port = free_port()
        self.label, self.proc = b.bridge(self.vm, topic=topic, http_port=self.port, name="idle")
        self.thread: threading.Thread | None = None
        self.rss_samples: list[int] = []
        self.result: dict[str, Any] = {}

    def begin(self) -> None:
        """Wait until ready, publish one event (as a bridge that has worked), then measure."""
        if not wait_until(lambda: http_get(self.port, "/readyz")[0] == 200, 30.0):
            raise RuntimeError("idle bridge not ready:\n" + self.b.procs.log_tail(self.label))
        play([Step(0.0, self.vm, value=MIGRATE)])

        def published() -> bool:
            text = http_get(self.port, "/metrics")[1].decode()
            return "maintenance_bridge_publish_success_total 1.0" in text

        if not wait_until(published, 30.0, 0.05):
            raise RuntimeError("idle bridge did not publish:\n" + self.b.procs.log_tail(self.label))
        time.sleep(1.0)  # let the post-publish work settle
        self.thread = threading.Thread(target=self._measure, name="idle", daemon=True)
        self.thread.start()

    def _measure(self) -> None:
        proc = psutil.Process(self.proc.pid)
        seconds = self.b.plan.idle_seconds
        cpu0, stats0, t0 = proc.cpu_times(), self.vm.stats(), time.monotonic()
        end = t0 + seconds
        while (left := end - time.monotonic()) > 0:
            self.rss_samples.append(proc.memory_info().rss)
            time.sleep(min(5.0, left))
        cpu1, stats1, t1 = proc.cpu_times(), self.vm.stats(), time.monotonic()
        mem = proc.memory_full_info()
        wall = t1 - t0
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        keys = ("instance/maintenance-event", "instance/preempted", "instance/upcoming-maintenance")
        per_key = {k: (stats1.get(k, 0) - stats0.get(k, 0)) / (wall / 60.0) for k in keys}
        self.result = {
            "seconds": wall,
            "cpu_seconds": cpu,
            "cpu_percent": 100.0 * cpu / wall,
            "rss_mb": mem.rss / 2**20,
            "rss_max_mb": max([*self.rss_samples, mem.rss]) / 2**20,
            "uss_mb": mem.uss / 2**20,
            "threads": proc.num_threads(),
            "requests_per_min": per_key,
            "total_requests": stats1.get("total", 0) - stats0.get("total", 0),
        }

    def finish(self) -> dict[str, Any]:
        if self.thread is not None:
            left = self.b.plan.idle_seconds + 30
            log(f"idle: waiting for the {self.b.plan.idle_seconds:.0f} s window to close")
            self.thread.join(left)
        self.b.procs.stop(self.proc)
        return self.result


def phase_startup(b: Bench) -> dict[str, Any]:
    """Process start -> first long-poll (simulator stamp) and -> /readyz 200, per client."""
    vm = b.vms(1)[0]
    topic, _ = b.topic("bench-startup")
    out: dict[str, Any] = {}
    kinds = ["pubsub", "stdout", "sample"] + (["pubsub_before"] if b.before else [])
    for kind in kinds:
        first_poll, ready = [], []
        for _ in range(b.plan.startup_runs):
            vm.host.call(op="reset_first", vm=vm.index)
            port = free_port()
            t0 = time.monotonic()
            if kind == "sample":
                label, proc = b.sample(vm, guard=False)
            else:
                use_topic = topic if kind.startswith("pubsub") else ""
                label, proc = b.bridge(
                    vm,
                    topic=use_topic,
                    http_port=port,
                    name="start",
                    guard=False,
                    before=kind.endswith("_before"),
                )
            if kind != "sample":
                if not wait_until(lambda port=port: http_get(port, "/readyz")[0] == 200, 30.0):
                    raise RuntimeError("not ready:\n" + b.procs.log_tail(label))
                ready.append(time.monotonic() - t0)
            if not wait_until(lambda: EVENT_KEY in vm.first(), 30.0):
                raise RuntimeError("no long-poll:\n" + b.procs.log_tail(label))
            first_poll.append(vm.first()[EVENT_KEY] - t0)
            b.procs.stop(proc)
        out[kind] = {"first_poll": first_poll, "ready": ready}
        log(f"startup {kind}: first long-poll median {median(first_poll):.3f} s")
    return out


def sample_event() -> Event:
    """A maintenance.started event like those the bridge publishes."""
    instance = Instance("4520031799277500001", "bench-vm-001", "us-central1-a", PROJECT, "1234")
    transition = Transition(EVENT_KEY, NONE, MIGRATE, "maintenance.started")
    return build_event(
        transition,
        event_id="00000000-0000-4000-8000-000000000000",
        sequence=1,
        observed_at=datetime.now(timezone.utc),
        instance=instance,
        scheduling=Scheduling("MIGRATE", "TRUE", "FALSE", "STANDARD"),
        happened_while_down=False,
        notice_seconds=60,
    )


def phase_floor(b: Bench) -> dict[str, Any]:
    """The floor: one long-poll answer to a Python client, one publish round trip, one commit."""
    vm = b.vms(1)[0]
    label, proc = b.sample(vm)
    wait_ready(b, vm, samples=1)
    time.sleep(0.3)
    values = [MIGRATE if i % 2 == 0 else NONE for i in range(b.plan.floor_changes)]
    stamps = play([Step(i * 0.03, vm, value=v) for i, v in enumerate(values)])
    b.hub.wait(lambda: len(parse("sample", b.hub.get(label))) >= len(values), 5.0)
    lat, missed = match(list(zip(stamps, values, strict=True)), parse("sample", b.hub.get(label)))
    b.procs.stop(proc)
    http_floor = Dist.of(lat, missed)

    topic, _ = b.topic("bench-floor")
    attributes, data = sample_event().to_pubsub("binary")  # the message the bridge sends
    publish: dict[str, Dist] = {}
    for latency in (0.0005, 0.0):  # the bridge's old default and its default now
        client = b.admin.publisher(ordering=True, max_latency=latency)
        rtt = []
        for i in range(max(20, b.plan.floor_changes // 2)):
            t0 = time.monotonic()
            client.publish(topic, data, ordering_key="floor", **attributes).result(timeout=10)
            if i >= 3:  # the first publishes open the channel
                rtt.append(time.monotonic() - t0)
            time.sleep(0.03)  # one at a time after a pause, as the bridge publishes
        client.stop()
        publish[f"{latency:g}"] = Dist.of(rtt)

    db_path = b.root / "floor.sqlite3"
    db = sqlite3.connect(str(db_path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    commits: dict[str, Dist] = {}
    for mode in ("FULL", "NORMAL"):
        db.execute(f"PRAGMA synchronous={mode}")
        db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB)")
        times = []
        for _ in range(b.plan.floor_changes):
            t0 = time.monotonic()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t(v) VALUES (?)", (b"x" * 900,))
            db.execute("COMMIT")
            times.append(time.monotonic() - t0)
            time.sleep(0.01)  # spaced like the bridge's commits, not back to back
        commits[mode] = Dist.of(times)
    db.close()
    log(
        f"floor: long-poll answer p50 {fmt_ms(http_floor.p50)}, publish RTT p50 "
        f"{fmt_ms(publish['0'].p50)}, durable commit p50 {fmt_ms(commits['FULL'].p50)}"
    )
    return {"http": http_floor, "publish": publish, "commit": commits}


def phase_latency(b: Bench) -> dict[str, Any]:
    """Change -> event on the stdout sink and -> Pub/Sub ack, beside the two baselines.

    Half the VMs run the stdout bridge, half the stamped Pub/Sub bridge; every VM also runs
    Google's sample and the 2 s poller, so each change is watched by three clients at once.
    Changes go round-robin over the VMs, one at a time, each value held longer than the
    poller's interval so that it sees every change too.
    """
    plan = b.plan
    vms = b.vms(plan.latency_vms)
    topic, sub = b.topic("bench-latency", subscription=True)
    sub_label, subscriber = b.subscriber(sub)
    half = len(vms) // 2
    watchers: dict[VM, list[tuple[str, str]]] = {}
    procs = [subscriber]
    for i, vm in enumerate(vms):
        if i < half:
            label, proc = b.bridge(vm, name="latency-stdout")
            kind = "stdout"
        else:
            label, proc = b.bridge(vm, topic=topic, stamped=True, name="latency-pubsub")
            kind = "ack"
        s_label, s_proc = b.sample(vm)
        p_label, p_proc = b.poller(vm)
        procs += [proc, s_proc, p_proc]
        watchers[vm] = [(label, kind), (s_label, "sample"), (p_label, "poller")]
    for vm in vms:
        poller = watchers[vm][2][0]
        wait_ready(b, vm, bridges=1, samples=1, pollers=(poller,))
    time.sleep(0.5)
    # Warm-up (not counted): each client sees one change; the first publish opens the channel.
    cold: list[float] = []
    everyone = [w for ws in watchers.values() for w in ws]
    for value in (MIGRATE, NONE):
        before = b.seen(everyone, value)
        stamps = play([Step(0.05 * i, vm, value=value) for i, vm in enumerate(vms)])
        if late := b.wait_seen(everyone, value, before, 15.0):
            raise RuntimeError(f"warm-up change to {value} not seen by {late}")
        if value == MIGRATE:
            for vm, t in zip(vms, stamps, strict=True):
                label, kind = watchers[vm][0]
                if kind == "ack":
                    cold += [o.t - t for o in parse("ack", b.hub.get(label)) if o.seq == 1]
    time.sleep(0.3)
    cycle = (MIGRATE, NONE, TERMINATE, NONE)
    steps, changes = [], defaultdict(list)
    counters: dict[VM, int] = defaultdict(int)
    for k in range(plan.latency_changes):
        vm = vms[k % len(vms)]
        value = cycle[counters[vm] % len(cycle)]
        counters[vm] += 1
        steps.append(Step(k * plan.latency_spacing + random.uniform(0, 0.02), vm, value=value))
    log(f"latency: {len(steps)} changes over {len(vms)} VMs, {steps[-1].at:.0f} s")
    stamps = play(steps)
    for step, t in zip(steps, stamps, strict=True):
        changes[step.vm].append((t, step.value))
    time.sleep(POLL_INTERVAL + 0.5)
    per_kind: dict[str, list[float]] = defaultdict(list)
    missed: dict[str, int] = defaultdict(int)
    sample_by_sink: dict[str, list[float]] = defaultdict(list)
    for vm in vms:
        sink = watchers[vm][0][1]
        for label, kind in watchers[vm]:
            lat, miss = match(changes[vm], parse(kind, b.hub.get(label)))
            per_kind[kind] += lat
            missed[kind] += miss
            if kind == "sample":
                sample_by_sink[sink] += lat
    # Delivery to the subscriber, for the Pub/Sub half.
    delivered: list[float] = []
    by_instance = {vm.instance_id: vm for vm in vms[half:]}
    got: dict[str, list[Obs]] = defaultdict(list)
    for line in b.hub.get(sub_label):
        with contextlib.suppress(ValueError, KeyError):
            obj = json.loads(line.text)
            if "instance" in obj:
                got[obj["instance"]].append(Obs(obj["t"], obj["current"], obj["seq"]))
    delivery_missed = 0
    for instance, vm in by_instance.items():
        lat, miss = match(changes[vm], got[instance])
        delivered += lat
        delivery_missed += miss
    b.procs.stop(*procs)
    out = {k: Dist.of(v, missed[k]) for k, v in per_kind.items()}
    out["sample_stdout_vms"] = Dist.of(sample_by_sink["stdout"])
    out["sample_pubsub_vms"] = Dist.of(sample_by_sink["ack"])
    out["delivered"] = Dist.of(delivered, delivery_missed)
    out["cold_ack"] = Dist.of(cold)
    log(
        f"latency: stdout p50/p99 {out['stdout'].p50:.2f}/{out['stdout'].p99:.2f} ms, "
        f"ack {out['ack'].p50:.2f}/{out['ack'].p99:.2f} ms, "
        f"sample {out['sample'].p50:.2f}/{out['sample'].p99:.2f} ms"
    )
    return out


STAGES = (
    ("metadata answer received", None, "received"),
    ("decode, classify, build event", "received", "commit_begin"),
    ("SQLite commit (synchronous=FULL)", "commit_begin", "commit_end"),
    ("hand-off to the relay", "commit_end", "enqueue"),
    ("queued -> sink.send called", "enqueue", "send"),
    ("sink: written / publish acknowledged", "send", "ack"),
)


def phase_breakdown(b: Bench) -> dict[str, Any]:
    """Where the time goes: the stamped bridge with --trace, stdout and Pub/Sub sinks."""
    vm = b.vms(1)[0]
    topic, _ = b.topic("bench-breakdown")
    default = Config().publish_latency
    other = 0.0005 if default == 0 else 0.0
    variants = {
        "stdout": ("--sink", "stdout"),
        f"pubsub, publish_latency {default:g} (default)": ("--topic", topic),
        f"pubsub, publish_latency {other:g}": ("--topic", topic, "--publish-latency", f"{other:g}"),
    }
    out: dict[str, Any] = {}
    for name, args in variants.items():
        use_topic = topic if "--topic" in args else ""
        extra = (*(a for a in args if a not in ("--topic", topic)), "--trace")
        play([Step(0.0, vm, value=NONE)])  # a fresh bridge takes the first reading as it is
        before = vm.stats()
        label, proc = b.bridge(vm, topic=use_topic, stamped=True, extra=extra, name="trace")
        wait_ready(b, vm, bridges=1, base=before)
        time.sleep(0.3)
        n = b.plan.breakdown_changes
        # Every value unique, so that each record is matched to its own change. Matching by
        # sequence number (as this phase once did) assumes no change is ever coalesced: one
        # missed early change shifted every later match by 40 ms per change missed.
        values = [f"{MIGRATE if i % 2 == 0 else TERMINATE}_{i}" for i in range(n + 1)]
        stamps = play([Step(i * 0.04, vm, value=v) for i, v in enumerate(values)])
        last = values[-1]
        b.hub.wait(
            lambda label=label, last=last: any(
                o.value == last for o in parse("ack", b.hub.get(label))
            ),
            10.0,
        )
        b.procs.stop(proc)
        by_value: dict[str, dict[str, Any]] = {}
        for line in b.hub.get(label):
            with contextlib.suppress(ValueError):
                obj = json.loads(line.text)
                if "ack" in obj and "received" in obj:
                    by_value.setdefault(obj["current"], obj)
        rows: dict[str, list[float]] = defaultdict(list)
        missed = 0
        for value, t in zip(values[1:], stamps[1:], strict=True):  # the first is a warm-up
            r = by_value.get(value)
            if r is None:
                missed += 1
                continue
            r = {**r, None: t}
            for stage, start, end in STAGES:
                rows[stage].append(r[end] - r[start])
            rows["total"].append(r["ack"] - t)
        out[name] = {k: Dist.of(v, missed) for k, v in rows.items()}
        log(f"breakdown {name}: total p50 {fmt_ms(out[name]['total'].p50)}, {missed} missed")
    return out


# What earlier measurements led to change (static text: these before/after figures come from
# interleaved A/B runs made when each change was made, and say so with their date).
HISTORY = """#### Earlier (history: interleaved A/B runs of 2026-11-25, not this run)

- **The thread hand-off before the first send** (bridge/relay.py). The relay thread used to
  send every event, so each one waited for that thread to be woken and scheduled: 0.7-0.8 ms
  p50 on the development machine (2 busy cores), the "queued -> sink.send called" stage. Now
  the thread that records an event sends it at once when nothing is queued or in flight; the
  relay thread still awaits the acknowledgement, retires events in order and owns every
  retry. 300 changes each: change -> stdout line written p50 2.69 -> 1.67 ms, p99 9.77 ->
  7.90 ms; change -> Pub/Sub ack p50 10.81 -> 9.36 ms; the stage itself 0.75 -> 0.01 ms.
- **The Pub/Sub batching delay** (`--publish-latency`, default 0.0005 s -> 0). One event at a
  time gains nothing from waiting for a batch, and batches still form behind a publish in
  flight (one per ordering key). 395 publishes each: round trip p50 8.52 -> 8.39 ms, p99
  15.75 -> 15.15 ms (small next to the emulator's own round trip, which dominates)."""

# The A/B baseline: the last commit before issue 12's changes (pinned, so that the comparison
# keeps its meaning once those changes are committed).
BASELINE_COMMIT = "5e03562"
CHANGES = """What changed between the two (the figures above measure it):

- **The metadata client talks urllib3 directly** (bridge/metadata.py), not through requests:
  one request per change, and requests' per-request work (hooks, cookie jar, header merging,
  URL re-parsing, response wrapping) cost more CPU than the rest of handling the event. The
  checks on what is accepted are unchanged (flavor header, no redirect, body cap, failure
  classes).
- **Nothing slow before the watch** (bridge/daemon.py, bridge/sinks.py): the Pub/Sub client
  is imported and connected in the background once every key has had its first answer; an
  event recorded meanwhile waits for it (and in the outbox), as during a Pub/Sub outage.
- **A retry schedule shaped for the metadata server** (bridge/retry.py): quick and steady
  first, back-off only after (see the recovery section).
- **Kept: the durable commit** (SQLite WAL, synchronous=FULL) before anything is published:
  a recorded notice must survive a power loss and keep its id. Its cost is the machine's
  fsync, shown in the floor table; on a busy disk it is the largest part of the stdout
  path."""


RECOVERY_CLIENTS = (
    ("bridge", "stdout", "bridge"),
    ("bridge_before", "stdout", "bridge before (A/B baseline)"),
    ("sample", "sample", "Google's sample"),
    ("poller", "poller", "2 s poller"),
)


def recovery_clients(b: Bench) -> list[tuple[str, str, str]]:
    return [c for c in RECOVERY_CLIENTS if c[0] != "bridge_before" or b.before]


def phase_recovery(b: Bench) -> dict[str, Any]:
    """503 bursts: from the end of each burst to the next event, bridge vs baselines.

    The A/B baseline's bridge watches the same bursts: the retry schedule's before/after.
    """
    vm = b.vms(1)[0]
    labels: dict[str, tuple[str, str]] = {}
    procs = []
    for key, kind, _ in recovery_clients(b):
        if key == "bridge":
            label, proc = b.bridge(vm, name="recovery")
        elif key == "bridge_before":
            label, proc = b.bridge(vm, name="recovery-before", before=True)
        elif key == "sample":
            label, proc = b.sample(vm)
        else:
            label, proc = b.poller(vm)
        labels[key] = (label, kind)
        procs.append(proc)
    bridges = sum(key.startswith("bridge") for key in labels)
    wait_ready(b, vm, bridges=bridges, samples=1, pollers=(labels["poller"][0],))
    time.sleep(0.3)
    everyone = list(labels.values())
    results: dict[str, list[float]] = defaultdict(list)
    bursts = []
    for nominal in b.plan.bursts:
        # A random fraction of a second on top: fixed lengths would line up with the sample's
        # 1 s sleep and the poller's 2 s tick and always catch them at the same phase.
        burst = nominal + random.uniform(0.0, 1.0)
        bursts.append(burst)
        # During the burst every request for the key gets a 503: the long polls hanging when it
        # starts answer MIGRATE, the retries meet the 503s, TERMINATE is set while they do.
        before = b.seen(everyone, TERMINATE)
        steps = [
            Step(0.0, vm, op="fault"),
            Step(0.05, vm, value=MIGRATE),
            Step(0.05 + burst / 2, vm, value=TERMINATE),
            Step(burst, vm, op="clear"),
        ]
        end = play(steps)[-1]
        b.wait_seen(everyone, TERMINATE, before, POLL_INTERVAL + 3.0)
        for key, (label, kind) in labels.items():
            seen = [o for o in parse(kind, b.hub.get(label)) if o.t >= end and o.value == TERMINATE]
            results[key].append(seen[0].t - end if seen else math.inf)  # inf: missed
        before = b.seen(everyone, NONE)
        play([Step(0.0, vm, value=NONE)])
        b.wait_seen(everyone, NONE, before, POLL_INTERVAL + 1.0)
    b.procs.stop(*procs)
    log("recovery: bridge " + ", ".join(f"{x * 1000:.0f} ms" for x in results["bridge"]))
    return {"bursts": bursts, **results}


def phase_ab(b: Bench) -> dict[str, Any]:
    """Before/after in this run: the A/B baseline's bridge and this tree's, stdout sink, each on
    its own VM. Latency: changes alternate between the two VMs, one at a time, 40 ms apart
    (interleaved, so both see the same machine). CPU: 100 changes/s to one, then the other."""
    assert b.before is not None
    vms = b.vms(2)
    sides: dict[str, tuple[VM, str, subprocess.Popen[bytes]]] = {}
    for side, vm in zip(("before", "after"), vms, strict=True):
        label, proc = b.bridge(vm, name=f"ab-{side}", before=side == "before")
        sides[side] = (vm, label, proc)
    for vm in vms:
        wait_ready(b, vm, bridges=1)

    def changes(tag: str, n: int, spacing: float, only: str | None = None) -> dict[str, Any]:
        """n changes per side (or to `only`), unique values; latencies and CPU per side."""
        names = [only] if only else list(sides)
        steps = [
            Step(k * spacing, sides[names[k % len(names)]][0], value=f"{MIGRATE}_{tag}_{k}")
            for k in range(n * len(names))
        ]
        cpu0 = {s: psutil.Process(sides[s][2].pid).cpu_times() for s in names}
        stamps = play(steps)
        last = {s: next(st.value for st in reversed(steps) if st.vm is sides[s][0]) for s in names}

        def done() -> bool:
            return all(
                any(o.value == last[s] for o in parse("stdout", b.hub.get(sides[s][1])))
                for s in names
            )

        b.hub.wait(done, 10.0)
        out: dict[str, Any] = {}
        for s in names:
            seen: dict[str, float] = {}
            for o in parse("stdout", b.hub.get(sides[s][1])):
                seen.setdefault(o.value, o.t)
            mine = [
                (st.value, t) for st, t in zip(steps, stamps, strict=True) if st.vm is sides[s][0]
            ]
            lat = [seen[v] - t for v, t in mine if v in seen]
            cpu1 = psutil.Process(sides[s][2].pid).cpu_times()
            cpu = (cpu1.user + cpu1.system) - (cpu0[s].user + cpu0[s].system)
            out[s] = {"latency": Dist.of(lat, len(mine) - len(lat)), "cpu": cpu, "events": len(lat)}
        return out

    changes("warm", 2, 0.05)
    time.sleep(0.3)
    interleaved = changes("lat", b.plan.ab_changes, 0.04)
    cpu: dict[str, float] = {}
    for side in sides:
        time.sleep(0.5)
        n = int(100 * b.plan.ab_cpu_seconds)
        got = changes(f"cpu{side}", n, 0.01, only=side)[side]
        cpu[side] = 1000.0 * got["cpu"] / max(1, got["events"])
    b.procs.stop(*(proc for _, _, proc in sides.values()))
    out = {
        "commit": b.before.commit,
        "latency": {s: interleaved[s]["latency"] for s in sides},
        "cpu_ms_per_event": cpu,
        "parts": cpu_parts(b, int(100 * b.plan.ab_cpu_seconds)),
    }
    log(
        "A/B: p50 before/after "
        + " / ".join(fmt_ms(out["latency"][s].p50) for s in sides)
        + ", CPU per event "
        + " / ".join(f"{cpu[s]:.2f} ms" for s in sides)
    )
    return out


def cpu_parts(b: Bench, events: int) -> dict[str, dict[str, float]]:
    """CPU per event by part of the path, before and after (bench/profile_hot_path.py --parts,
    in-process, 100 changes/s); runs in the order before, after, after, before and averages, so
    that a machine getting busier or quieter weighs on both alike."""
    assert b.before is not None
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for side in ("before", "after", "after", "before"):
        code = b.before.root if side == "before" else REPO
        argv = [PYTHON, str(BENCH / "profile_hot_path.py"), "--parts", "--json", "--rate", "100"]
        argv += ["--events", str(events), "--code", str(code)]
        done = subprocess.run(argv, cwd=REPO, env=b.procs.env, capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"profile_hot_path.py --parts failed:\n{done.stderr.decode()}")
        runs[side].append(json.loads(done.stdout.decode().splitlines()[-1])["ms_per_event"])
    return {
        side: {part: sum(r[part] for r in rs) / len(rs) for part in rs[0]}
        for side, rs in runs.items()
    }


def phase_memory(b: Bench) -> dict[str, Any]:
    """What a Pub/Sub bridge's memory is made of, step by step (bench/memory_probe.py)."""
    topic, _ = b.topic("bench-memory")
    label = b.name("memory")
    proc = b.procs.start(label, [PYTHON, str(BENCH / "memory_probe.py"), topic], b.pubsub.env())
    proc.wait(60)
    b.hub.wait(lambda: len(b.hub.get(label)) >= 5, 5.0)  # the last lines may still be in flight
    steps = []
    for line in b.hub.get(label):
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line.text))
    log("memory: " + ", ".join(f"{s['rss_mb']:.0f} MB" for s in steps))
    return {"steps": steps}


def phase_growth(b: Bench) -> dict[str, Any]:
    """Latency and CPU at 1, 10 and 100 changes per second (each value unique).

    Both bridges (stdout, Pub/Sub) start together on VMs of their own, are warmed up with one
    change, then measured one after the other.
    """
    topic, _ = b.topic("bench-growth")
    bridges: dict[str, tuple[VM, str, subprocess.Popen[bytes]]] = {}
    for sink in ("stdout", "ack"):
        vm = b.vms(1)[0]
        if sink == "stdout":
            label, proc = b.bridge(vm, name="growth-stdout")
        else:
            label, proc = b.bridge(vm, topic=topic, stamped=True, name="growth-pubsub")
        bridges[sink] = (vm, label, proc)
    for vm, _, _ in bridges.values():
        wait_ready(b, vm, bridges=1)
    for value in (MIGRATE, NONE):  # warm-up: the first publish opens the channel
        watchers = [(label, sink) for sink, (_, label, _) in bridges.items()]
        before = b.seen(watchers, value)
        play([Step(0.0, vm, value=value) for vm, _, _ in bridges.values()])
        b.wait_seen(watchers, value, before, 10.0)
    out: dict[str, Any] = {}
    for sink, (vm, label, proc) in bridges.items():
        ps = psutil.Process(proc.pid)
        rows = []
        for rate, seconds in b.plan.growth:
            n = max(3, int(rate * seconds))
            values = [f"{MIGRATE}_{rate:g}_{i}" for i in range(n)] + [NONE]
            before = b.seen([(label, sink)], NONE)
            cpu0, t0 = ps.cpu_times(), time.monotonic()
            stamps = play([Step(i / rate, vm, value=v) for i, v in enumerate(values)])
            b.wait_seen([(label, sink)], NONE, before, 10.0)
            cpu1, t1 = ps.cpu_times(), time.monotonic()
            seen: dict[str, float] = {}
            for o in parse(sink, b.hub.get(label)):
                seen.setdefault(o.value, o.t)
            lat = [seen[v] - t for v, t in zip(values[:-1], stamps[:-1], strict=True) if v in seen]
            cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            rows.append(
                {
                    "rate": rate,
                    "changes": n,
                    "events": len(lat),
                    "latency": Dist.of(lat, n - len(lat)),
                    "cpu_percent": 100.0 * cpu / (t1 - t0),
                    "rss_mb": ps.memory_info().rss / 2**20,
                }
            )
            log(
                f"growth {sink} {rate:g}/s: {len(lat)}/{n} events, p50 "
                f"{fmt_ms(rows[-1]['latency'].p50)}, CPU {rows[-1]['cpu_percent']:.1f} %"
            )
        out[sink] = rows
    b.procs.stop(*(proc for _, _, proc in bridges.values()))
    return out


def phase_fleet(b: Bench) -> dict[str, Any]:
    """N bridges, each on its own simulated VM, publishing to one topic; one subscriber."""
    plan = b.plan
    vms = b.vms(plan.fleet_vms)
    topic, sub = b.topic("bench-fleet", subscription=True)
    sub_label, subscriber = b.subscriber(sub)
    labels: dict[VM, str] = {}
    procs = [subscriber]
    t_start = time.monotonic()
    for vm in vms:
        label, proc = b.bridge(vm, topic=topic, stamped=True, name="fleet")
        labels[vm] = label
        procs.append(proc)
    for vm in vms:
        wait_ready(b, vm, bridges=1, timeout=120.0)
    started = time.monotonic() - t_start
    log(f"fleet: {len(vms)} bridges watching after {started:.1f} s")
    time.sleep(1.0)
    cycle = (MIGRATE, NONE)
    steps = []
    for r in range(plan.fleet_rounds + 1):  # round 0 is the warm-up (cold channel)
        for i, vm in enumerate(vms):
            k = r * len(vms) + i
            steps.append(Step(k * plan.fleet_spacing, vm, value=cycle[r % 2]))
    stamps = play(steps)
    expected = {vm.instance_id: plan.fleet_rounds + 1 for vm in vms}
    total = sum(expected.values())

    def received() -> int:
        return sum('"instance"' in line.text for line in b.hub.lines.get(sub_label, ()))

    b.hub.wait(lambda: received() >= total, 30.0)
    time.sleep(0.5)
    rss = uss = 0
    for proc in procs[1:]:
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(proc.pid).memory_full_info()
            rss += info.rss
            uss += info.uss
    emulator_rss = 0
    if b.pubsub.pid:
        with contextlib.suppress(psutil.Error):
            emulator_rss = psutil.Process(b.pubsub.pid).memory_info().rss
    # Per-instance order at the subscriber, and latencies (warm-up round excluded).
    got: dict[str, list[Obs]] = defaultdict(list)
    for line in b.hub.get(sub_label):
        with contextlib.suppress(ValueError, KeyError):
            obj = json.loads(line.text)
            if "instance" in obj:
                got[obj["instance"]].append(Obs(obj["t"], obj["current"], obj["seq"]))
    in_order = complete = duplicates = 0
    for instance, n in expected.items():
        seqs = [o.seq for o in got[instance]]
        unique = list(dict.fromkeys(seqs))
        duplicates += len(seqs) - len(unique)
        in_order += unique == sorted(unique)
        complete += sorted(unique) == list(range(1, n + 1))
    changes: dict[VM, list[tuple[float, str]]] = defaultdict(list)
    for step, t in zip(steps, stamps, strict=True):
        changes[step.vm].append((t, step.value))
    ack, delivered = [], []
    ack_missed = delivered_missed = 0
    for vm in vms:
        measured = changes[vm][1:]
        lat, miss = match(measured, [o for o in parse("ack", b.hub.get(labels[vm])) if o.seq != 1])
        ack += lat
        ack_missed += miss
        lat, miss = match(measured, [o for o in got[vm.instance_id] if o.seq != 1])
        delivered += lat
        delivered_missed += miss
    b.procs.stop(*procs)
    out = {
        "bridges": len(vms),
        "events": total,
        "received": sum(len(v) for v in got.values()),
        "in_order": in_order,
        "complete": complete,
        "duplicates": duplicates,
        "ack": Dist.of(ack, ack_missed),
        "delivered": Dist.of(delivered, delivered_missed),
        "rss_mb": rss / 2**20,
        "uss_mb": uss / 2**20,
        "emulator_rss_mb": emulator_rss / 2**20,
        "start_seconds": started,
    }
    log(
        f"fleet: {complete}/{len(vms)} instances complete and in order, ack p50 "
        f"{fmt_ms(out['ack'].p50)}, total RSS {out['rss_mb']:.0f} MB"
    )
    return out


def nodelay_facts() -> str:
    """TCP_NODELAY where the bridge's metadata traffic flows, read from the code in use."""
    import urllib3.connection

    from bridge.simulator import _Handler

    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = nodelay in urllib3.connection.HTTPConnection.default_socket_options
    return (
        f"urllib3 {urllib3.__version__} default_socket_options set TCP_NODELAY: "
        f"{'yes' if client else 'NO'}; simulator handler disable_nagle_algorithm: "
        f"{'yes' if _Handler.disable_nagle_algorithm else 'NO'}"
    )


def nagle_control() -> Dist:
    """The stall this bench must be able to see: Nagle on, head and body written apart."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        reader = conn.makefile("rb")
        with conn, reader:
            while reader.readline():
                while reader.readline() not in (b"\r\n", b""):
                    pass
                body = MIGRATE.encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                conn.sendall(body)

    threading.Thread(target=serve, daemon=True).start()
    client = http.client.HTTPConnection("127.0.0.1", srv.getsockname()[1], timeout=5)
    times = []
    for _ in range(20):
        t0 = time.monotonic()
        client.request("GET", "/")
        client.getresponse().read()
        times.append(time.monotonic() - t0)
    client.close()
    srv.close()
    return Dist.of(times[2:])


# -- report ----------------------------------------------------------------------------------


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(label, measured, target, met) for every target of issue 8."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def add(key: str, value: float, shown: str) -> None:
        label, unit, limit = TARGETS[key]
        met = None if math.isnan(value) else value <= limit
        rows.append((label, shown, f"<= {limit:g} {unit}", met))

    for key, (value, shown) in beat_sample(r).items():
        add(key, value, shown)
    ab = r.get("ab")
    if ab:
        before, after = ab["cpu_ms_per_event"]["before"], ab["cpu_ms_per_event"]["after"]
        add("cpu_ratio", after / before, f"{after:.2f} / {before:.2f} ms = {after / before:.2f}x")
    lat = r.get("latency", {})
    if lat:
        add("stdout_p99", lat["stdout"].p99, fmt_ms(lat["stdout"].p99))
        add("ack_p99", lat["ack"].p99, fmt_ms(lat["ack"].p99))
    if "startup" in r:
        first = r["startup"]["pubsub"]["first_poll"]
        add("startup", max(first), f"{max(first):.3f} s")
    idle = r.get("idle") or {}
    if idle:
        add("idle_cpu", idle["cpu_percent"], f"{idle['cpu_percent']:.3f} %")
        add("idle_rss", idle["rss_max_mb"], f"{idle['rss_max_mb']:.1f} MB")
        worst = max(idle["requests_per_min"].values())
        if idle["seconds"] >= 120:
            add("idle_requests", worst, f"{worst:.2f} /min")
        else:  # a long poll lasts 60 s: a shorter window cannot say
            label, unit, limit = TARGETS["idle_requests"]
            shown = f"n/a ({idle['seconds']:.0f} s window)"
            rows.append((label, shown, f"<= {limit:g} {unit}", None))
    fleet = r.get("fleet")
    if fleet:
        n = fleet["bridges"]
        ok = fleet["complete"] == n and fleet["in_order"] == n
        shown = f"{fleet['complete']}/{n} complete, {fleet['in_order']}/{n} in order"
        rows.append(("fleet: every event delivered, per-instance order", shown, "all", ok))
    ng = r.get("nagle")
    if ng:
        hits, n = ng["stdout_hits"] + ng["ack_hits"], ng["stdout_n"] + ng["ack_n"]
        shown = f"{hits} of {n} samples in 30-50 ms"
        limit = f"< {NAGLE_CLUSTER:.0%} of samples"
        rows.append(("no 40 ms Nagle/delayed-ACK stall", shown, limit, hits < NAGLE_CLUSTER * n))
    return rows


def beat_sample(r: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """The rows of issue 12, bridge against Google's sample in this run: key -> (value, shown)."""
    out: dict[str, tuple[float, str]] = {}
    lat = r.get("latency")
    if lat:
        ours, theirs = lat["stdout"].p50, lat["sample_stdout_vms"].p50
        out["detect_ratio"] = (
            ours / theirs,
            f"{fmt_ms(ours)} / {fmt_ms(theirs)} = {ours / theirs:.2f}x",
        )
    rec = r.get("recovery")
    if rec:
        ours, theirs = median(rec["bridge"]) * 1000, median(rec["sample"]) * 1000
        out["recovery_median"] = (ours, fmt_ms(ours))
        out["recovery_ratio"] = (
            ours / theirs,
            f"{fmt_ms(ours)} / {fmt_ms(theirs)} = {ours / theirs:.2f}x",
        )
        slowest, their_slowest = worst(rec["bridge"]) * 1000, worst(rec["sample"]) * 1000
        out["recovery_worst"] = (
            slowest / their_slowest,
            f"{fmt_ms(slowest)} / {fmt_ms(their_slowest)} = {slowest / their_slowest:.2f}x",
        )
    st = r.get("startup")
    if st:
        ours, theirs = median(st["pubsub"]["first_poll"]), median(st["sample"]["first_poll"])
        out["startup_ratio"] = (
            ours / theirs,
            f"{ours:.3f} s / {theirs:.3f} s = {ours / theirs:.2f}x",
        )
    return out


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT MET")


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def print_table(r: dict[str, Any]) -> None:
    print()
    print(f"{'target':44} {'measured':>12}  {'target':>18}  verdict")
    for label, shown, limit, met in targets(r):
        print(f"{label:44} {shown:>12}  {limit:>18}  {verdict(met)}")
    lat = r.get("latency")
    if lat:
        print()
        print(f"{'change -> detection (n)':44} {'p50 / p99 / max':>30}")
        for name, key in (
            ("bridge, stdout event", "stdout"),
            ("bridge, Pub/Sub ack", "ack"),
            ("bridge, delivered to subscriber", "delivered"),
            ("Google's sample", "sample"),
            ("2 s poller", "poller"),
        ):
            d = lat[key]
            print(f"{name + f' ({d.n})':44} {d.row():>30}")
    print()


def above(ms: float) -> str:
    if ms >= 0:
        return f"{fmt_ms(ms)} above"
    return f"{fmt_ms(-ms)} below (within the noise of measurements made apart)"


def floor_text(lat: dict[str, Dist], fl: dict[str, Any], bd: dict[str, Any]) -> str:
    """How far above the floor we are, for both sinks, alone and side by side."""
    answer = fl["http"].p50
    publish = fl["publish"][f"{Config().publish_latency:g}"].p50
    stdout_alone = next(v for k, v in bd.items() if k.startswith("stdout"))
    pubsub_alone = next(v for k, v in bd.items() if "(default)" in k)
    commit = stdout_alone["SQLite commit (synchronous=FULL)"].p50
    out = []
    for name, alone, side, floor in (
        ("stdout", stdout_alone["total"].p50, lat["stdout"].p50, answer),
        ("Pub/Sub", pubsub_alone["total"].p50, lat["ack"].p50, answer + publish),
    ):
        what = "one long-poll answer" + (" + one publish round trip" if name != "stdout" else "")
        out.append(
            f"- {name}: floor = {what} = {fmt_ms(floor)}; with the durable commit the bridge "
            f"must make first ({fmt_ms(commit)} inside the bridge), {fmt_ms(floor + commit)}. "
            f"The bridge alone (breakdown below): {fmt_ms(alone)} p50, "
            f"{above(alone - floor)} the floor, {above(alone - floor - commit)} floor + commit. "
            f"Side by side with two other clients on each VM (above): {fmt_ms(side)} p50."
        )
    out.append("")
    out.append(
        "What is left above floor + commit is the bridge's own Python (decoding, classifying,"
    )
    out.append("building and serialising the event: the second stage below) and scheduling noise.")
    return "\n".join(out)


def worst(seconds: list[float]) -> float:
    """The slowest recovery (a burst whose change was never seen is infinitely slow)."""
    return max(seconds) if seconds else math.nan


def sample_text(r: dict[str, Any]) -> str:
    """The three rows of issue 12: the bridge against Google's sample, same run, as ratios."""
    rows = beat_sample(r)
    if not rows:
        return ""
    lines = [
        "## Against Google's sample",
        "",
        "The rows where a user compares the bridge with the sample they already have, measured",
        "side by side in this run (the sections below say how).",
        "",
        "| row | bridge / Google's sample | target | verdict |",
        "|---|---|---|---|",
    ]
    for key in ("detect_ratio", "recovery_median", "recovery_ratio", "recovery_worst"):
        if key in rows:
            value, shown = rows[key]
            label, unit, limit = TARGETS[key]
            met = None if math.isnan(value) else value <= limit
            lines.append(f"| {label} | {shown} | <= {limit:g} {unit} | {verdict(met)} |")
    if "startup_ratio" in rows:
        value, shown = rows["startup_ratio"]
        label, unit, limit = TARGETS["startup_ratio"]
        lines.append(f"| {label} | {shown} | <= {limit:g} {unit} | {verdict(value <= limit)} |")
    lines += [
        "",
        "Detection: the stdout bridges against the sample on the same VMs and changes (the",
        "bridge also commits each change durably before writing it). Recovery: the same 503",
        "bursts for both. Start-up: process start to the first request for",
        "`instance/maintenance-event`, as the simulator saw it.",
        "",
    ]
    return "\n".join(lines)


def ab_text(r: dict[str, Any]) -> str:
    """Before/after, all measured in this run: the A/B baseline's bridge against this tree's."""
    ab = r["ab"]
    before, after = ab["latency"]["before"], ab["latency"]["after"]
    cpu = ab["cpu_ms_per_event"]
    lines = [
        "### What was removed from the hot path",
        "",
        f"Before = the bridge as of commit {ab['commit']} (extracted with `git archive`), after =",
        "this tree; both measured in this run, on VMs of their own, stdout sink. Latency: "
        f"{before.n + before.missed} changes each, alternating between the two, 40 ms apart.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| change -> stdout line, p50 / p99 / max | {before.row()} | {after.row()} |",
        f"| CPU per event at 100 changes/s | {cpu['before']:.2f} ms | {cpu['after']:.2f} ms |",
    ]
    st = r.get("startup", {})
    if "pubsub_before" in st:
        b0, a0 = median(st["pubsub_before"]["first_poll"]), median(st["pubsub"]["first_poll"])
        lines.append(
            f"| start -> first long-poll, Pub/Sub sink, median | {b0:.3f} s | {a0:.3f} s |"
        )
    rec = r.get("recovery", {})
    if "bridge_before" in rec:
        b1, a1 = rec["bridge_before"], rec["bridge"]
        lines.append(
            f"| 503 burst -> hidden change, median (slowest) | {fmt_ms(median(b1) * 1000)} "
            f"({fmt_ms(worst(b1) * 1000)}) | {fmt_ms(median(a1) * 1000)} "
            f"({fmt_ms(worst(a1) * 1000)}) |"
        )
    parts = ab.get("parts")
    if parts:
        lines += [
            "",
            "CPU per event by part of the path (bench/profile_hot_path.py --parts: in-process, "
            "100 changes/s,",
            "thread CPU, each side run twice in the order before, after, after, before):",
            "",
            "| part | before | after |",
            "|---|---|---|",
        ]
        for part in parts["after"]:
            lines.append(
                f"| {part} | {parts['before'][part]:.3f} ms | {parts['after'][part]:.3f} ms |"
            )
    return "\n".join([*lines, "", CHANGES])


def memory_text(steps: list[dict[str, Any]], idle: dict[str, Any] | None) -> str:
    """What a Pub/Sub bridge's memory is made of, and where its floor is."""
    lines = [
        "## Memory",
        "",
        "One fresh process (bench/memory_probe.py), each step on top of the previous one:",
        "",
        "| step | RSS | added | threads |",
        "|---|---|---|---|",
    ]
    previous = 0.0
    for st in steps:
        added = f"+{st['rss_mb'] - previous:.1f} MB" if previous else "-"
        lines.append(f"| {st['step']} | {st['rss_mb']:.1f} MB | {added} | {st['threads']} |")
        previous = st["rss_mb"]
    base = steps[1]["rss_mb"] if len(steps) > 1 else math.nan
    total = steps[-1]["rss_mb"]
    lines += [
        "",
        f"google-cloud-pubsub (import, client, open channel) adds {total - base:.1f} MB to the "
        f"{base:.1f} MB of a stdout bridge's code; a Pub/Sub bridge cannot idle below "
        f"{total:.1f} MB with this client library, so 60 MB is "
        + ("within reach." if total < 60 else "not reachable with it (the floor is the library).")
        + (
            f" The idle bridge above, with its watchers, relay, HTTP endpoint and SQLite store, "
            f"held {idle['rss_max_mb']:.1f} MB."
            if idle
            else ""
        ),
    ]
    return "\n".join(lines)


def markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    """docs/benchmarks.md, entirely from this run's results."""
    lines: list[str] = []
    w = lines.append
    w("# Benchmarks")
    w("")
    w("Regenerated by `.venv/bin/python bench/run.py` (`--quick` is a smoke run for CI whose")
    w("figures are not meant for this page). Every figure below comes from one run on one")
    w("machine; nothing here is edited by hand.")
    w("")
    w(f"- Run: {meta['date']}, {meta['mode']} mode, {meta['wall']:.0f} s wall clock.")
    m = meta["machine"]
    w(f"- Machine: {m['cpu']}, {m['memory']}, {m['os']}, Python {m['python']}.")
    w(f"- Load average at start / end: {meta['load_start']} / {meta['load_end']}.")
    w(f"- Pub/Sub: {meta['pubsub']}.")
    w("")
    w("![latency distributions, growth and fleet](benchmarks.png)")
    w("")
    w("## Targets")
    w("")
    w("| target | measured | limit | verdict |")
    w("|---|---|---|---|")
    for label, shown, limit, met in targets(r):
        w(f"| {label} | {shown} | {limit} | {verdict(met)} |")
    w("")
    w(sample_text(r))
    lat = r.get("latency")
    if lat:
        w("## Change to event, side by side")
        w("")
        w(f"{lat['stdout'].n + lat['ack'].n} transitions of `instance/maintenance-event` (NONE ->")
        w("MIGRATE_ON_HOST_MAINTENANCE -> NONE -> TERMINATE_ON_HOST_MAINTENANCE -> ...) on")
        w(f"{meta['latency_vms']} simulated VMs, one change at a time, each value held longer")
        w("than the poller's 2 s. Every VM is watched at once by a bridge (half of them")
        w("`maintenance-bridge run` with the stdout sink, half the bridge publishing to the")
        w("emulator), by Google's sample and by the 2 s poller. A change is stamped by the")
        w("simulator right before it takes effect; an stdout event when its line arrives on the")
        w("benchmark's pipe; a Pub/Sub event when the publish future resolves inside the bridge")
        w("(the emulator acknowledged it: measured at the publisher, by bench/stamped_bridge.py,")
        w("which is `bridge.daemon.run` with the real sink wrapped); a delivery when the")
        w("streaming-pull subscriber's callback runs; the baselines when their line arrives. The")
        w("first change on each VM is a warm-up and is not counted. Each change wakes three")
        w("clients at once, on a machine whose few cores all of them share: the bridge alone is")
        w("measured in the breakdown further down.")
        w("")
        w("| client | n | missed | p50 | p99 | max | p50 ratio | p99 ratio |")
        w("|---|---|---|---|---|---|---|---|")
        s_std, s_ack, poll = lat["sample_stdout_vms"], lat["sample_pubsub_vms"], lat["poller"]
        rows = (
            ("bridge -> stdout event", lat["stdout"], s_std, "vs the sample on the same changes"),
            ("bridge -> Pub/Sub ack", lat["ack"], s_ack, "vs the sample on the same changes"),
            ("bridge -> delivered to a subscriber", lat["delivered"], s_ack, ""),
            ("Google's sample (detection only)", lat["sample"], None, ""),
            ("2 s poller (detection only)", poll, None, ""),
        )
        for name, d, base, _ in rows:
            rp50 = ratio(d.p50, base.p50) if base else "-"
            rp99 = ratio(d.p99, base.p99) if base else "-"
            w(
                f"| {name} | {d.n} | {d.missed} | {fmt_ms(d.p50)} | {fmt_ms(d.p99)} | "
                f"{fmt_ms(d.max)} | {rp50} | {rp99} |"
            )
        w("")
        w("Ratios are ours / Google's sample on the same changes (the stdout VMs' sample for the")
        w("stdout row, the Pub/Sub VMs' sample for the Pub/Sub rows); the sample only detects,")
        w("the bridge also commits the change durably and publishes it. Against the 2 s poller:")
        w(
            f"stdout p50 {ratio(lat['stdout'].p50, poll.p50)}, Pub/Sub ack p50 "
            f"{ratio(lat['ack'].p50, poll.p50)} of the poller's {fmt_ms(poll.p50)}."
        )
        cold = lat["cold_ack"]
        w(
            f"The first publish of each Pub/Sub bridge (warm-up, channel still closed): p50 "
            f"{fmt_ms(cold.p50)}, max {fmt_ms(cold.max)} over {cold.n} bridges."
        )
        w("")
    fl, bd = r.get("floor"), r.get("breakdown")
    if fl and lat:
        w("## The floor, and how far above it we are")
        w("")
        w("| component, measured on loopback | p50 | p99 |")
        w("|---|---|---|")
        w(
            f"| one long-poll answer: change -> Google's sample's line, nothing else running "
            f"({fl['http'].n} changes) | {fmt_ms(fl['http'].p50)} | {fmt_ms(fl['http'].p99)} |"
        )
        default = f"{Config().publish_latency:g}"
        for key, d in fl["publish"].items():
            note = " (the bridge's default)" if key == default else ""
            w(
                f"| one publish round trip of a bridge event (binary mode, ordering key), "
                f"30 ms apart, max_latency {key}{note} | {fmt_ms(d.p50)} | {fmt_ms(d.p99)} |"
            )
        for key, d in fl["commit"].items():
            w(f"| one SQLite commit, WAL, synchronous={key} | {fmt_ms(d.p50)} | {fmt_ms(d.p99)} |")
        w("")
        if bd:
            w(floor_text(lat, fl, bd))
            w("")
    if bd:
        w("## Where the time goes")
        w("")
        w("bench/stamped_bridge.py --trace stamps each stage of the hot path in one bridge process")
        w(
            f"({r['plan'].breakdown_changes} changes, 40 ms apart, one client). "
            "p50 (p99) per stage, in ms:"
        )
        w("")
        names = list(bd)
        w("| stage | " + " | ".join(names) + " |")
        w("|---|" + "---|" * len(names))
        for stage in [s for s, _, _ in STAGES] + ["total"]:
            cells = []
            for n in names:
                d = bd[n].get(stage)
                cells.append(f"{d.p50:.3f} ({d.p99:.3f})" if d and d.n else "-")
            w(f"| {stage} | " + " | ".join(cells) + " |")
        w("")
        w("The first stage runs from the change to the moment the bridge's HTTP client has the")
        w("response; the last ends when the line is flushed (stdout) or the publish future")
        w("resolves (Pub/Sub).")
        w("")
    if r.get("ab"):
        w(ab_text(r))
        w("")
    if bd:
        w(HISTORY)
        w("")
    if "startup" in r:
        st = r["startup"]
        w("## Start-up")
        w("")
        w("From just before the process is spawned to its first request for")
        w("`instance/maintenance-event` (stamped by the simulator), and to `/readyz` answering 200")
        w(f"(polled every 5 ms); {r['plan'].startup_runs} starts each, fresh state directory.")
        w("")
        w("| client | first long-poll, median (max) | ready, median (max) |")
        w("|---|---|---|")
        for kind, name in (
            ("pubsub", "bridge, Pub/Sub sink"),
            ("stdout", "bridge, stdout sink"),
            ("sample", "Google's sample"),
            ("pubsub_before", "bridge before (A/B baseline), Pub/Sub sink"),
        ):
            if kind not in st:
                continue
            fp, rd = st[kind]["first_poll"], st[kind]["ready"]
            ready = f"{median(rd):.3f} s ({max(rd):.3f} s)" if rd else "-"
            w(f"| {name} | {median(fp):.3f} s ({max(fp):.3f} s) | {ready} |")
        w("")
    idle = r.get("idle")
    if idle:
        w("## Idle cost")
        w("")
        w(
            f"A bridge with the Pub/Sub sink and `--http-port` (as the container runs it), on its "
            f"own VM, after publishing one event, left alone for {idle['seconds']:.0f} s while the"
        )
        w("other phases ran (its CPU time counts only its own work).")
        w("")
        w("| CPU seconds | CPU | RSS (max sampled) | USS | threads | requests per minute per key |")
        w("|---|---|---|---|---|---|")
        per = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in idle["requests_per_min"].items())
        w(
            f"| {idle['cpu_seconds']:.2f} | {idle['cpu_percent']:.3f} % of a core | "
            f"{idle['rss_mb']:.1f} MB ({idle['rss_max_mb']:.1f} MB) | {idle['uss_mb']:.1f} MB | "
            f"{idle['threads']} | {per} |"
        )
        w("")
    rec = r.get("recovery")
    if rec:
        w("## Recovery after a 503 burst")
        w("")
        w("During each burst every request for `instance/maintenance-event` gets a 503; the value")
        w("changes in the middle of it. Time from the end of the burst to the next event:")
        w("")
        clients = [c for c in RECOVERY_CLIENTS if c[0] in rec]
        w("| burst | " + " | ".join(name for _, _, name in clients) + " |")
        w("|---|" + "---|" * len(clients))
        for i, burst in enumerate(rec["bursts"]):
            cells = [fmt_ms(rec[key][i] * 1000) for key, _, _ in clients]
            w(f"| {burst:.2f} s | " + " | ".join(cells) + " |")
        for what, pick in (("median", median), ("slowest", worst)):
            cells = [fmt_ms(pick(rec[key]) * 1000) for key, _, _ in clients]
            w(f"| {what} | " + " | ".join(cells) + " |")
        w("")
        policy = metadata_policy(Config().retry_cap)
        quick, slow = policy.max_rate()
        w(
            f"The bridge (bridge/retry.py) retries a failing key every "
            f"{policy.fast * (1 - policy.jitter) * 1000:.0f}-{policy.fast * 1000:.0f} ms for its "
            f"first {policy.fast_attempts} failed attempts, then backs off from "
            f"{policy.initial * 1000:.0f} ms to `--retry-cap` ({policy.cap:g} s); a 429 skips the"
        )
        w(
            f"quick phase. Worst case per key while every request fails at once: {quick:.0f} "
            f"requests/s during the quick phase, then at most {slow:.1f}/s however long the outage."
        )
        w("An answer that comes at once by design (404, the 'no notifications' 503) is asked")
        w("again after `--absent-interval` (60 s). The A/B baseline backed off exponentially from")
        w("50 ms to 2 s; the sample sleeps 1 s after each 503; the poller waits for its next tick.")
        w("")
    mem = r.get("memory")
    if mem and mem["steps"]:
        w(memory_text(mem["steps"], idle))
        w("")
    gr = r.get("growth")
    if gr:
        w("## Growth with the event rate")
        w("")
        w("Every change sets a new value; an event counts if its value arrives at all (the")
        w("metadata server coalesces changes that come faster than a client re-polls).")
        w("")
        w("| sink | changes/s | changes | events | p50 | p99 | max | CPU (% of a core) | RSS |")
        w("|---|---|---|---|---|---|---|---|---|")
        for sink, rows in gr.items():
            for row in rows:
                d = row["latency"]
                w(
                    f"| {'stdout' if sink == 'stdout' else 'Pub/Sub ack'} | {row['rate']:g} | "
                    f"{row['changes']} | {row['events']} | {fmt_ms(d.p50)} | {fmt_ms(d.p99)} | "
                    f"{fmt_ms(d.max)} | {row['cpu_percent']:.1f} | {row['rss_mb']:.0f} MB |"
                )
        w("")
    fleet = r.get("fleet")
    if fleet:
        w("## Fleet")
        w("")
        w(f"{fleet['bridges']} bridges, each on its own simulated VM (own simulator, own instance")
        w("id), all publishing to one emulator topic with ordering keys; one streaming-pull")
        w("subscriber on an ordered subscription. Changes go round-robin over the VMs.")
        w("")
        w("| | |")
        w("|---|---|")
        w(f"| all started at once, all watching after | {fleet['start_seconds']:.1f} s |")
        w(f"| events published / received | {fleet['events']} / {fleet['received']} |")
        w(
            f"| instances complete and in order (data.sequence) | {fleet['complete']} / "
            f"{fleet['bridges']} complete, {fleet['in_order']} / {fleet['bridges']} in order, "
            f"{fleet['duplicates']} duplicates |"
        )
        w(f"| change -> ack p50 / p99 / max | {fleet['ack'].row()} |")
        w(f"| change -> delivered p50 / p99 / max | {fleet['delivered'].row()} |")
        w(
            f"| memory of all bridges | {fleet['rss_mb']:.0f} MB RSS, {fleet['uss_mb']:.0f} MB "
            f"USS ({fleet['rss_mb'] / fleet['bridges']:.1f} MB RSS each) |"
        )
        w(f"| emulator (JVM) | {fleet['emulator_rss_mb']:.0f} MB RSS |")
        w("")
        w("All bridges share this machine's cores here; on a real fleet each has its VM's own.")
        w("")
    ng = r.get("nagle")
    if ng:
        w("## The 40 ms stall (Nagle against delayed ACKs)")
        w("")
        w(
            f"Control, to show this machine exhibits it: a keep-alive client and a server with "
            f"Nagle on that writes the head and the body apart: p50 {fmt_ms(ng['control'].p50)}."
        )
        w(
            f"Our samples between 30 and 50 ms: {ng['stdout_hits']} of {ng['stdout_n']} (stdout), "
            f"{ng['ack_hits']} of {ng['ack_n']} (Pub/Sub); a stall would put a cluster there"
        )
        w("(the verdict above flags 5 % or more), a stray slow sample on a busy machine does")
        w("not. Why there is none: the simulator writes each response in one send with")
        w("TCP_NODELAY; the bridge's metadata client (urllib3) sets TCP_NODELAY and sends each")
        w("request in one write; its /healthz server answers in one write and closes; gRPC sets")
        w(f"TCP_NODELAY on its own. Checked in this run: {ng['static']}.")
        w("")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    lat = r.get("latency", {})
    for key, name in (
        ("stdout", "bridge -> stdout"),
        ("ack", "bridge -> Pub/Sub ack"),
        ("delivered", "bridge -> subscriber"),
        ("sample", "Google's sample"),
        ("poller", "2 s poller"),
    ):
        d = lat.get(key)
        if d and d.n:
            ax.plot(d.values, [(i + 1) / d.n for i in range(d.n)], label=f"{name} (n={d.n})")
    ax.set_xscale("log")
    ax.set_xlabel("change -> event (ms, log)")
    ax.set_ylabel("fraction of changes")
    ax.set_title("Latency distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    bd = r.get("breakdown", {})
    names = list(bd)
    stages = [s for s, _, _ in STAGES]
    bottom = [0.0] * len(names)
    for stage in stages:
        vals = [bd[n][stage].p50 if stage in bd[n] and bd[n][stage].n else 0.0 for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, label=stage)
        bottom = [a + v for a, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set_ylabel("ms (p50 of each stage)")
    ax.set_title("Where the time goes")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    gr = r.get("growth", {})
    ax2 = ax.twinx()
    for j, (sink, rows) in enumerate(gr.items()):
        name, color = ("stdout", "C0") if sink == "stdout" else ("Pub/Sub ack", "C1")
        rates = [row["rate"] for row in rows]
        for q, style in ((50, "o-"), (99, "s--")):
            values = [row["latency"].pct(q) for row in rows]
            ax.plot(rates, values, style, color=color, label=f"{name} p{q}")
        xs = [rate * (0.8 if j == 0 else 1.25) for rate in rates]
        cpu = [row["cpu_percent"] for row in rows]
        ax2.bar(xs, cpu, width=[x * 0.25 for x in xs], color=color, alpha=0.25)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("changes per second")
    ax.set_ylabel("change -> event (ms)")
    ax.set_title("Growth: latency (lines) and CPU (bars, right axis)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax2.set_ylabel("CPU, % of a core")

    ax = axes[1][1]
    fleet = r.get("fleet")
    if fleet:
        for key, name in (("ack", "ack"), ("delivered", "delivered")):
            d = fleet[key]
            if d.n:
                ax.hist(d.values, bins=40, alpha=0.6, label=f"{name} (n={d.n})")
        ax.set_xlabel("change -> event (ms)")
        ax.set_title(f"Fleet of {fleet['bridges']} bridges")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run for CI (< 60 s)")
    parser.add_argument(
        "--output",
        type=Path,
        help="where benchmarks.md and .png go (default: docs/, or a temp dir with --quick)",
    )
    parser.add_argument("--simhosts", type=int, default=2, help="simulator processes")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    output = args.output or (
        Path(tempfile.gettempdir()) / "maintenance-bridge-bench-quick"
        if args.quick
        else REPO / "docs"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.setswitchinterval(0.0005)  # the hub thread stamps promptly even when others run
    started = time.monotonic()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    root = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    (root / "logs").mkdir()
    hub = Hub()
    procs = Procs(root, hub)
    pubsub: PubSubServer | None = None
    admin: PubSubAdmin | None = None
    idle: Idle | None = None
    results: dict[str, Any] = {"plan": plan}
    ok = False
    try:
        log(f"{'quick' if plan.quick else 'full'} run; work dir {root}")
        pubsub = start_pubsub(project=PROJECT, data_dir=root / "pubsub")
        admin = PubSubAdmin(pubsub)
        hosts = [SimHost(procs, f"simhost{i}") for i in range(max(1, args.simhosts))]
        before = Before.extract(root / "before")
        b = Bench(plan, root, procs, hub, pubsub, admin, hosts, results, before)
        idle = Idle(b)
        idle.begin()
        log(f"idle: measuring for {plan.idle_seconds:.0f} s in the background")
        results["nagle_control"] = nagle_control()
        phases: list[tuple[str, Callable[[Bench], dict[str, Any]]]] = [
            ("startup", phase_startup),
            ("floor", phase_floor),
            ("latency", phase_latency),
            ("breakdown", phase_breakdown),
            ("ab", phase_ab),
            ("recovery", phase_recovery),
            ("growth", phase_growth),
            ("memory", phase_memory),
            ("fleet", phase_fleet),
        ]
        if b.before is None:
            log("no git history here: the before/after (A/B) figures are left out")
            phases = [p for p in phases if p[0] != "ab"]
        for name, phase in phases:
            settle(plan)
            results[name] = phase(b)
        results["idle"] = idle.finish()
        idle = None
        lat = results["latency"]
        results["nagle"] = {
            "control": results["nagle_control"],
            "static": nodelay_facts(),
            "stdout_hits": lat["stdout"].around(30, 50),
            "stdout_n": lat["stdout"].n,
            "ack_hits": lat["ack"].around(30, 50),
            "ack_n": lat["ack"].n,
        }
        ok = True
    finally:
        if idle is not None:
            procs.stop(idle.proc)
        procs.stop_all()
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()
        if pubsub is not None:
            pubsub.stop()
        hub.close()
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"benchmark failed; logs kept in {root / 'logs'}", file=sys.stderr)
    wall = time.monotonic() - started
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if plan.quick else "full",
        "wall": wall,
        "machine": machine(),
        "load_start": load_start,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "pubsub": (
            f"official emulator on {pubsub.host_port}"
            if pubsub and pubsub.kind == "emulator"
            else "in-repo fake (emulator not installed): Pub/Sub figures are not the emulator's"
        ),
        "latency_vms": plan.latency_vms,
    }
    print_table(results)
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmarks.md").write_text(markdown(results, meta))
    plot(results, output / "benchmarks.png")
    log(f"done in {wall:.0f} s; wrote {output / 'benchmarks.md'} and benchmarks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
