"""The disruption lab: the real bridge and Google's sample against the simulator, inside a
network namespace of their own, through blackouts and frozen polls.

Outside, `run_case` starts this module under `unshare -rn` (no privileges needed) and reads
the one JSON line it prints. Inside, the loopback link is the whole network: `ip link set lo
down` is a blackout (packets dropped, sockets kept), and the simulator forgetting its
connections meanwhile (a reset that is lost) is what a new host does after a live migration.
Shared by tests/test_disruption.py (asserts on the figures) and bench/phases_disruption.py
(reports them). Every wait is on a condition with a deadline; the only timed sleep is the
blackout itself, the disruption being simulated.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge.keys import MAINTENANCE, PREEMPTED, UPCOMING
from bridge.simulator import Simulator, sample_window
from bridge.simulator.handler import _LINGER_RST

from .bridge import REPO, BridgeProcess
from .harness import wait_for

SAMPLE = REPO / "bench" / "baselines" / "google_sample.py"
NOTICE_VALUES = {MAINTENANCE: "MIGRATE_ON_HOST_MAINTENANCE", PREEMPTED: "TRUE"}
CALM_VALUES = {MAINTENANCE: "NONE", PREEMPTED: "FALSE", UPCOMING: "{}"}
# An ONGOING window is a notice too; `{}` is nothing scheduled and still long-polls.
NOTICE_VALUES[UPCOMING] = json.dumps(
    {**json.loads(sample_window(15)), "maintenance_status": "ONGOING"}
)
ON_KINDS = {
    MAINTENANCE: "maintenance.started",
    PREEMPTED: "preemption.started",
    UPCOMING: "upcoming.scheduled",
}
OFF_KINDS = {
    MAINTENANCE: "maintenance.ended",
    PREEMPTED: "preemption.ended",
    UPCOMING: "upcoming.cleared",
}


def _kind(event_type: str) -> str:
    """`maintenance.started` of a CloudEvent type, whatever the configured prefix."""
    return ".".join(event_type.rsplit(".", 2)[-2:])


def namespace_unavailable_reason() -> str | None:
    """Why no network namespace can be made here, or None when one can."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is not installed"
    try:
        done = subprocess.run(
            ["unshare", "-rn", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -rn failed: {exc}"
    if done.returncode:
        return f"unshare -rn is refused here: {done.stderr.strip()[:200]}"
    return None


def run_case(case: str, work: Path, timeout: float, **params: Any) -> dict[str, Any]:
    """Run one case in a fresh namespace; its figures. AssertionError with the driver's stderr
    when it fails or overruns `timeout`."""
    cmd = ["unshare", "-rn", sys.executable, "-m", "tests.support.disruption_lab", case]
    cmd += [str(work), json.dumps(params)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "GCE_"))}
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"lab case {case} overran {timeout} s: {exc.stderr!r}") from None
    if done.returncode:
        raise AssertionError(f"lab case {case} failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- inside the namespace ---------------------------------------------------------------------


def _link(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


class Events:
    """The bridge's events as they arrive, with their arrival times, by kind."""

    def __init__(self, bridge: BridgeProcess) -> None:
        self.bridge = bridge
        self.got: list[tuple[float, str]] = []

    def _drain(self) -> None:
        while True:
            try:
                at, event = self.bridge.lines.get_nowait()
            except queue.Empty:
                return
            self.got.append((at, _kind(event["type"])))

    def after(self, kind: str, since: float) -> float | None:
        """When the first `kind` arrived after `since` (monotonic), if it did."""
        self._drain()
        return next((at for at, k in self.got if k == kind and at >= since), None)

    def wait(self, kind: str, since: float, timeout: float) -> float:
        return wait_for(
            f"{kind} from the bridge",
            lambda: self.after(kind, since),
            timeout,
            detail=lambda: (self.got[-6:], self.bridge.logs()[-8:]),
        )


class Sample:
    """Google's sample on maintenance-event: its callback lines, with their arrival times."""

    def __init__(self, sim: Simulator) -> None:
        env = {**os.environ, "GCE_METADATA_HOST": sim.host_port}
        self.proc = subprocess.Popen(
            [sys.executable, str(SAMPLE), MAINTENANCE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.stuck = False  # missed a change once: its forgotten request waits for ever
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def after(self, text: str, since: float) -> float | None:
        return next((at for at, line in self.lines if line.startswith(text) and at >= since), None)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextmanager
def _lab(
    work: Path, *args: str, sample: bool = True, env: dict[str, str] | None = None
) -> Iterator[tuple[Simulator, Events, Sample | None]]:
    _link("up")
    sim = Simulator().start()
    for key, value in CALM_VALUES.items():
        sim.set_value(key, value)
    state = Path(tempfile.mkdtemp(prefix="lab-", dir=work))
    bridge = BridgeProcess(sim.url, state / "state", *args, env=env)
    events = Events(bridge)
    baseline = Sample(sim) if sample else None
    try:
        bridge.wait_for_log("watching", 30)
        _armed(sim, baseline)
        yield sim, events, baseline
    finally:
        if baseline is not None:
            baseline.stop()
        _link("up")
        bridge.terminate(20)
        sim.stop()


def _armed(sim: Simulator, sample: Sample | None) -> None:
    """Every watcher (and the sample, unless stuck) has a poll hanging on its key again."""
    want = {key: 1 for key in CALM_VALUES}
    if sample is not None and not sample.stuck:
        want[MAINTENANCE] += 1
    wait_for(
        "every watch armed",
        lambda: all(sim.hanging(key) >= n for key, n in want.items()),
        30,
        detail=lambda: {key: sim.hanging(key) for key in want},
    )


def _flip(
    sim: Simulator, events: Events, sample: Sample | None, values: dict[str, str], since: float
) -> dict[str, Any]:
    """`values` were set (or the network came back with them set) at `since`: how long after
    it each key's event and the sample's line arrived (the sample's: None if not within 5 s)."""
    notice = values is NOTICE_VALUES
    kinds = ON_KINDS if notice else OFF_KINDS
    deadline = since + 30.0
    got = {
        key: events.wait(kind, since, deadline - time.monotonic()) - since
        for key, kind in kinds.items()
    }
    out: dict[str, Any] = {"bridge": got, "sample": None}
    if sample is not None:
        text = "Undergoing" if notice else "Finished"
        # The sample has as long as the bridge's target (5 s) to be counted as seeing it; once
        # it missed a change its request hangs for ever, so it is no longer waited for.
        left = 0.0 if sample.stuck else max(0.1, since + 5.0 - time.monotonic())
        try:
            at = wait_for("the sample's line", lambda: sample.after(text, since), left)
            out["sample"] = at - since
        except AssertionError:
            sample.stuck = True
    return out


def _set(sim: Simulator, values: dict[str, str]) -> float:
    for key, value in values.items():
        sim.set_value(key, value)
    return time.monotonic()


def blackouts(work: Path, rounds: int, seconds: float, during: bool, calm: bool) -> dict[str, Any]:
    """Rounds of: a notice on, a blackout of `seconds` in which the server forgets every
    connection, the change back to calm after the network returns (or made `during` it), then
    the next round's fresh notice (`rearm`). `calm`: the blackout comes in calm instead, and
    the change is the notice."""
    out: list[dict[str, Any]] = []
    before, change = (CALM_VALUES, NOTICE_VALUES) if calm else (NOTICE_VALUES, CALM_VALUES)
    with _lab(work) as (sim, events, sample):
        for n in range(rounds + 1):
            if n or not calm:  # a calm lab starts calm
                rearm = _flip(sim, events, sample, before, _set(sim, before))
                if out:
                    out[-1]["rearm"] = rearm
            if n == rounds:
                break
            _armed(sim, sample)
            _link("down")
            forgotten = sim.forget()
            if during:
                _set(sim, change)
            time.sleep(seconds)  # the blackout itself
            _link("up")
            since = time.monotonic() if during else _set(sim, change)
            out.append({"seen": _flip(sim, events, sample, change, since), "forgotten": forgotten})
        requests = sim.stats()
    return {"rounds": out, "requests": requests}


def frozen(work: Path, rounds: int) -> dict[str, Any]:
    """A notice on, then the server takes every request and never answers (the polls hanging
    at the time included); the calm values are set and the server thaws at once: how long is
    each key blind? Then the next round's notice."""
    out: list[dict[str, Any]] = []
    with _lab(work) as (sim, events, sample):
        for _ in range(rounds):
            since = _set(sim, NOTICE_VALUES)
            _flip(sim, events, sample, NOTICE_VALUES, since)
            _armed(sim, sample)
            sim.freeze()
            since = _set(sim, CALM_VALUES)
            sim.thaw()  # the polls taken so far stay unanswered
            out.append(_flip(sim, events, sample, CALM_VALUES, since))
    return {"rounds": out}


def calm(work: Path, seconds: float) -> dict[str, Any]:
    """Requests per minute per key while nothing happens, over `seconds` after every watch is
    armed, at the default poll_timeout (60 s)."""
    with _lab(work, "--absent-interval", "60", sample=False) as (sim, _, _):
        before = sim.stats()
        start = time.monotonic()
        time.sleep(seconds)  # the measurement window
        after = sim.stats()
        minutes = (time.monotonic() - start) / 60
    return {
        "seconds": seconds,
        "per_min": {k: (after.get(k, 0) - before.get(k, 0)) / minutes for k in CALM_VALUES},
    }


class _Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.got: list[tuple[float, str]] = []
        self.connections: list[socket.socket] = []
        super().__init__(("127.0.0.1", 0), _Receive)

    def forget(self) -> None:
        """Drop every connection with a reset, as `Simulator.forget` does."""
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                conn.shutdown(socket.SHUT_RD)
            fd = conn.detach()
            if fd >= 0:
                os.close(fd)
        self.connections.clear()

    def received(self, kinds: dict[str, str], since: float) -> float | None:
        """When the last of `kinds` arrived after `since`, once all of them have."""
        ats = [
            next((at for at, k in self.got if k == kind and at >= since), None)
            for kind in kinds.values()
        ]
        return None if None in ats else max(a for a in ats if a is not None)


class _Receive(http.server.BaseHTTPRequestHandler):
    """A CloudEvents receiver (binary mode): records each event's type, answers 204."""

    protocol_version = "HTTP/1.1"
    server: _Receiver

    def setup(self) -> None:
        super().setup()
        self.server.connections.append(self.connection)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        kind = self.headers.get("ce-type", "")
        self.server.got.append((time.monotonic(), _kind(kind)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def http_peer(work: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """The HTTP receiver is the peer that forgot: during a blackout it drops the bridge's kept
    connection with a lost reset; after the network returns, how long do new events take to
    reach it?"""
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, args=(0.1,), daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/"
    out: list[float] = []
    try:
        with _lab(work, "--http-url", url, sample=False) as (sim, _, _):

            def flip(values: dict[str, str], kinds: dict[str, str]) -> float:
                since = _set(sim, values)
                return (
                    wait_for("the receiver's events", lambda: receiver.received(kinds, since), 30)
                    - since
                )

            flip(NOTICE_VALUES, ON_KINDS)  # the sink's connection is made and kept
            flip(CALM_VALUES, OFF_KINDS)
            for _ in range(rounds):
                _link("down")
                receiver.forget()
                time.sleep(seconds)  # the blackout itself
                _link("up")
                out.append(flip(NOTICE_VALUES, ON_KINDS))
                flip(CALM_VALUES, OFF_KINDS)
    finally:
        receiver.shutdown()
        receiver.server_close()
    return {"rounds": out}


class _ForgetfulProxy:
    """A TCP relay in front of a server that cannot forget on demand (the Pub/Sub emulator):
    `forget` resets the client side of every connection, as a peer that lost them would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream, timeout=5)
            server.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def forget(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    sock.shutdown(socket.SHUT_RD)  # wakes its pump (sends nothing)
                fd = sock.detach()
                if fd >= 0:
                    os.close(fd)
        return len(pairs)

    def close(self) -> None:
        self.forget()
        self.listener.close()


def pubsub_peer(work: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """The Pub/Sub endpoint is the peer that forgot: during a blackout every connection of the
    bridge's publisher is reset (the reset lost); after the network returns, how long do new
    events take to be pulled from the subscription?"""
    from .pubsub import PubSubAdmin, start_pubsub

    _link("up")
    server = start_pubsub("lab-project", data_dir=work / "pubsub")
    proxy = _ForgetfulProxy(("127.0.0.1", server.port))
    admin = PubSubAdmin(server)
    out: list[float] = []
    forgotten: list[int] = []
    try:
        topic = admin.create_topic("lab-events")
        admin.create_subscription(topic, "lab-events-sub")
        env = {
            "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{proxy.port}",
            "PUBSUB_PROJECT_ID": "lab-project",
        }
        with _lab(work, "--topic", topic, sample=False, env=env) as (sim, _, _):

            def flip(values: dict[str, str]) -> float:
                since = _set(sim, values)
                admin.pull_until("lab-events-sub", len(values), timeout=30)
                return time.monotonic() - since

            flip(NOTICE_VALUES)  # the publisher's connections are made and kept
            flip(CALM_VALUES)
            for _ in range(rounds):
                _link("down")
                forgotten.append(proxy.forget())
                time.sleep(seconds)  # the blackout itself
                _link("up")
                out.append(flip(NOTICE_VALUES))
                flip(CALM_VALUES)
    finally:
        proxy.close()
        admin.close()
        server.stop()
    return {"rounds": out, "forgotten": forgotten}


CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "pubsub_peer": pubsub_peer,
    "blackouts": blackouts,
    "frozen": frozen,
    "http_peer": http_peer,
    "calm": calm,
}


def main() -> int:
    parser = argparse.ArgumentParser(description="one disruption-lab case, in a namespace")
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("work", type=Path)
    parser.add_argument("params", type=json.loads)
    args = parser.parse_args()
    print(json.dumps(CASES[args.case](args.work, **args.params)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
