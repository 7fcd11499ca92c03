"""The benchmark's machinery: child processes stopped by their pid, one thread that stamps every
line as it arrives, simulated VMs and the schedule player, observations matched to changes."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from bench.plan import BENCH, EVENT_KEY, NONE, POLL_INTERVAL, PYTHON, REPO, Before, Plan
from bench.simhost import instance_id
from tests.support.pubsub import PubSubAdmin, PubSubServer


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


def wait_connected(b: Bench, labels: list[str], timeout: float = 60.0) -> None:
    """Until each stamped bridge's sink is connected: the Pub/Sub client is created in the
    background after the watch is armed, and a figure of the steady state must not include
    the first events' wait for it (the fleet phase once did: every ack took 0.7 s)."""

    def connected() -> bool:
        return all(any('"connected"' in line.text for line in b.hub.get(x)) for x in labels)

    if not b.hub.wait(connected, timeout):
        raise RuntimeError(f"sinks not connected within {timeout:.0f} s: {labels}")


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
