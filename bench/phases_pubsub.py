"""The Pub/Sub sink's two transports side by side, in one run (`bench/run.py --only pubsub`).

For REST (the default, the standard library) and gRPC (`--pubsub-transport grpc`,
google-cloud-pubsub), on the same emulator and machine, interleaved:

- start -> first publish acknowledged (a notice already on at start, fresh state each time);
- change -> emulator ack, p50 and p99 (the stamped bridge, both transports' changes alternated);
- CPU per event over that run (the bridge process's user + system time / changes);
- idle RSS and threads of `maintenance-bridge run` with heartbeats on, after it has published;
- the installed size of the default install's site-packages against the one with the [grpc]
  extra: the dependency closures' files as their RECORDs list them, read from this venv.

The emulator is warmed on both APIs first, equally (`warm_emulator`): it is a JVM, and its REST
path (an HTTP/1.1 front end that transcodes JSON and calls the emulator's own gRPC service; 24-27
voluntary thread switches inside the emulator per publish against 9-10 on gRPC, read from /proc)
is JIT-compiled only after some 2,500 publishes: a bare REST publish, back to back, 8.4 ms p50
over the first 250 and 1.9 ms after 2,500, gRPC through the library 4-5 ms throughout. With
twenty warm-up changes the REST figures measured the emulator's compiler; Google's servers are
never cold for a client.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.harness import (
    VM,
    Bench,
    Step,
    free_port,
    http_get,
    log,
    match,
    parse,
    play,
    wait_connected,
    wait_until,
)
from bench.plan import MIGRATE, NONE, REPO, TERMINATE, Dist, fmt_ms, gap_interval, median

TRANSPORTS = ("rest", "grpc")
WARM_UP = 20  # changes per transport before the measured ones
# The ack latencies are also cut into this many interleaved samples, each with its own p99: how
# far a p99 moves within one run, so that two transports' p99s are compared against that spread.
QUARTERS = 4
# Publishes on each emulator API before any measured one (see the docstring); quick: a smoke run.
EMULATOR_WARM_UP, EMULATOR_WARM_UP_QUICK = 3000, 200
HEARTBEAT = "5"  # seconds: heartbeats on while idle, as the bar says
PUBLISHED = re.compile(r"^maintenance_bridge_publish_success_total (\S+)$", re.MULTILINE)


def phase_pubsub(b: Bench) -> dict[str, Any]:
    topic, _ = b.topic("bench-transports")
    vms = dict(zip(TRANSPORTS, b.vms(len(TRANSPORTS)), strict=True))
    out: dict[str, Any] = {"install": installed_sizes()}
    out["emulator_warm_up"] = warm_emulator(b)
    out["first_publish"] = _first_publish(b, topic, vms)
    out.update(_latency_and_cpu(b, topic, vms))
    out["idle"] = _idle(b, topic, vms)
    out["server_floor"], out["server_switches"] = _server_floor(b, topic)
    for t in TRANSPORTS:
        idle = out["idle"][t]
        quarters = "/".join(f"{v:.1f}" for v in out["ack_p99_quarters"][t])
        log(
            f"pubsub {t}: start->first ack median {median(out['first_publish'][t]):.3f} s, "
            f"ack p50/p99 {out['ack'][t].p50:.2f}/{out['ack'][t].p99:.2f} ms "
            f"(p99 of quarters {quarters}), CPU {out['cpu_ms_per_event'][t]:.2f} ms/event, "
            f"idle RSS {idle['rss_mb']:.1f} MB, {idle['threads']} threads"
        )
    floor = out["server_floor"]
    switches = out["server_switches"]
    for what, (gap, low, high) in (("", raw_gap(out)), (" (the bridge's share)", share_gap(out))):
        log(
            f"pubsub: ack p99 REST minus gRPC{what} {gap:+.2f} ms, "
            f"95 % interval {low:+.2f}..{high:+.2f}"
        )
    log(
        f"pubsub: emulator round trip without the bridge, p50/p99 REST {floor['rest'].p50:.2f}/"
        f"{floor['rest'].p99:.2f} ms (bare socket), gRPC {floor['grpc'].p50:.2f}/"
        f"{floor['grpc'].p99:.2f} ms (the library); the emulator's thread switches per publish: "
        + ", ".join(f"{t} {n:.1f}" for t, n in switches.items())
    )
    sizes = out["install"]
    log(
        f"pubsub: installed {sizes['default_mb']:.1f} MB (default) vs "
        f"{sizes['grpc_mb']:.1f} MB (with [grpc])"
    )
    return out


def _flags(transport: str) -> tuple[str, ...]:
    return ("--pubsub-transport", transport)


def _acks(b: Bench, label: str) -> list[dict[str, Any]]:
    acks = []
    for line in b.hub.get(label):
        try:
            record = json.loads(line.text)
        except ValueError:
            continue
        if isinstance(record, dict) and "ack" in record:
            acks.append(record)
    return acks


def _first_publish(b: Bench, topic: str, vms: dict[str, VM]) -> dict[str, list[float]]:
    """Spawn -> the first publish acknowledged, a notice being on at start (state fresh)."""
    out: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    for _ in range(b.plan.startup_runs):
        for transport, vm in vms.items():
            play([Step(0.0, vm, value=MIGRATE)])
            t0 = time.monotonic()
            label, proc = b.bridge(
                vm, topic=topic, stamped=True, extra=_flags(transport), name="first", guard=False
            )
            if not b.hub.wait(lambda label=label: bool(_acks(b, label)), 30.0):
                raise RuntimeError(f"no first publish ({transport}):\n" + b.procs.log_tail(label))
            out[transport].append(_acks(b, label)[0]["ack"] - t0)
            b.procs.stop(proc)
            play([Step(0.0, vm, value=NONE)])
    return out


def _latency_and_cpu(b: Bench, topic: str, vms: dict[str, VM]) -> dict[str, Any]:
    """Both stamped bridges at once; changes alternate between their VMs."""
    running = {
        t: b.bridge(vm, topic=topic, stamped=True, extra=_flags(t), name=f"ack-{t}")
        for t, vm in vms.items()
    }
    wait_connected(b, [label for label, _ in running.values()])
    # Warm-up, not counted: the first publish opens a channel, and the emulator (a JVM) serves
    # each API's first requests slowly until its JIT has compiled that path.
    cycle = (MIGRATE, NONE, TERMINATE, NONE)
    play([Step(k * 0.05, vm, value=cycle[k % 4]) for k in range(WARM_UP) for vm in vms.values()])
    for transport in TRANSPORTS:
        if not _acks_stopped(b, running[transport][0]):
            raise RuntimeError(f"warm-up not acknowledged ({transport})")
    time.sleep(0.3)
    cpu0 = {t: _cpu(proc) for t, (_, proc) in running.items()}
    steps = []
    n = b.plan.transport_changes
    for k in range(n):
        for i, transport in enumerate(TRANSPORTS):
            at = (k * len(TRANSPORTS) + i) * b.plan.latency_spacing / 2
            steps.append(Step(at, vms[transport], value=cycle[k % len(cycle)]))
    log(f"pubsub: {len(steps)} changes over both transports, {steps[-1].at:.0f} s")
    stamps = play(steps)
    time.sleep(1.0)
    ack: dict[str, Dist] = {}
    quarters: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    for transport, (label, proc) in running.items():
        changes = [
            (t, s.value) for s, t in zip(steps, stamps, strict=True) if s.vm is vms[transport]
        ]
        cpu[transport] = (_cpu(proc) - cpu0[transport]) * 1000 / len(changes)
        lat, missed = match(changes, parse("ack", b.hub.get(label)))
        ack[transport] = Dist.of(lat, missed)
        quarters[transport] = [Dist.of(lat[q::QUARTERS]).p99 for q in range(QUARTERS)]
    b.procs.stop(*(proc for _, proc in running.values()))
    return {"ack": ack, "ack_p99_quarters": quarters, "cpu_ms_per_event": cpu}


def _acks_stopped(b: Bench, label: str, quiet: float = 1.0, timeout: float = 30.0) -> bool:
    """The bridge has acknowledged what it will of the warm-up: some acks, then none for
    `quiet` seconds. Not a count: on a busy machine the metadata server coalesces a change the
    bridge had no time to re-poll for (20 played, 18 recorded, seen under load)."""
    end = time.monotonic() + timeout
    count, since = 0, time.monotonic()
    while time.monotonic() < end:
        now = len(_acks(b, label))
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= quiet:
            return True
        time.sleep(0.05)
    return False


def _cpu(proc: Any) -> float:
    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


def _idle(b: Bench, topic: str, vms: dict[str, VM]) -> dict[str, dict[str, Any]]:
    """`maintenance-bridge run`, heartbeats on, after one publish: RSS and threads at rest."""
    ports = {t: free_port() for t in TRANSPORTS}
    running = {
        t: b.bridge(
            vm,
            topic=topic,
            http_port=ports[t],
            extra=(*_flags(t), "--heartbeat-interval", HEARTBEAT),
            name=f"idle-{t}",
        )
        for t, vm in vms.items()
    }
    for transport, vm in vms.items():
        play([Step(0.0, vm, value=MIGRATE)])
        port = ports[transport]

        def published(port: int = port) -> bool:
            text = http_get(port, "/metrics")[1].decode()
            found = PUBLISHED.search(text)
            return found is not None and float(found.group(1)) >= 1

        if not wait_until(published, 60.0, 0.05):
            label = running[transport][0]
            raise RuntimeError(f"idle {transport} did not publish:\n" + b.procs.log_tail(label))
    seconds = 10.0 if b.plan.quick else 30.0
    samples: dict[str, list[int]] = {t: [] for t in TRANSPORTS}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for t, (_, proc) in running.items():
            samples[t].append(psutil.Process(proc.pid).memory_info().rss)
        time.sleep(1.0)
    out = {}
    for t, (_, proc) in running.items():
        p = psutil.Process(proc.pid)
        rss = p.memory_info().rss
        out[t] = {
            "seconds": seconds,
            "rss_mb": rss / 2**20,
            "rss_max_mb": max([*samples[t], rss]) / 2**20,
            "threads": p.num_threads(),
            "heartbeat_interval_s": float(HEARTBEAT),
        }
    b.procs.stop(*(proc for _, proc in running.values()))
    return out


class RawRest:
    """One bridge event published by hand on a kept-alive socket: the emulator's REST API with
    no client work at all (each answer is one segment: Content-Length and a JSON object)."""

    def __init__(self, b: Bench, topic: str, key: str) -> None:
        from bench.phases import sample_event

        attributes, data = sample_event().to_pubsub("binary")
        host, port = b.pubsub.host_port.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = {"data": base64.b64encode(data).decode(), "attributes": attributes}
        body = json.dumps({"messages": [{**message, "orderingKey": key}]}).encode()
        self.request = (
            f"POST /v1/{topic}:publish HTTP/1.1\r\nHost: {b.pubsub.host_port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.attributes, self.data = attributes, data

    def publish(self) -> None:
        self.sock.sendall(self.request)
        answer = b""
        while not (b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}")):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the emulator closed the connection")
            answer += chunk

    def close(self) -> None:
        self.sock.close()


_warmed: dict[str, dict[str, Any]] = {}  # emulator host:port -> its warm-up, once per run


def warm_emulator(b: Bench) -> dict[str, Any]:
    """Publish EMULATOR_WARM_UP messages on each of the emulator's APIs, alternated, back to back,
    on a topic of their own (the JIT compiles code paths, not topics); once per emulator. Any
    phase that measures a Pub/Sub publish should call this first."""
    if b.pubsub.host_port in _warmed:
        return _warmed[b.pubsub.host_port]
    topic, _ = b.topic("bench-warm-up")
    count = EMULATOR_WARM_UP_QUICK if b.plan.quick else EMULATOR_WARM_UP
    rest = RawRest(b, topic, "warm-rest")
    client = b.admin.publisher(ordering=True, max_latency=0.0)
    t0 = time.monotonic()
    try:
        for _ in range(count):
            rest.publish()
            client.publish(topic, rest.data, ordering_key="warm-grpc", **rest.attributes).result(10)
    finally:
        rest.close()
        client.stop()
    _warmed[b.pubsub.host_port] = {"publishes": count, "seconds": time.monotonic() - t0}
    log(f"pubsub: emulator warmed, {count} publishes on each API in {time.monotonic() - t0:.0f} s")
    return _warmed[b.pubsub.host_port]


def _switches(pid: int | None) -> int:
    """Voluntary context switches of all of the emulator's threads so far (0 without a JVM)."""
    if pid is None:
        return 0
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            status = (task / "status").read_text()
            total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def _server_floor(b: Bench, topic: str) -> tuple[dict[str, Dist], dict[str, float]]:
    """The emulator's own answer time on each API, spaced as the latency run's changes: a
    publish written on a bare socket (REST: no client work at all) and through the library
    (gRPC), alternated. What the bridge adds on each transport is its figure minus this. With
    it, the emulator's voluntary thread switches per publish on each API (read from /proc
    outside the timed part): the hand-offs each request costs inside the server."""
    rest = RawRest(b, topic, "floor-rest")
    client = b.admin.publisher(ordering=True, max_latency=0.0)
    pid = b.pubsub.pid
    rtt: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    switches: dict[str, int] = dict.fromkeys(TRANSPORTS, 0)
    measured = b.plan.floor_publishes
    try:
        for i in range(WARM_UP + measured):
            s0 = _switches(pid)
            t0 = time.monotonic()
            rest.publish()
            t1 = time.monotonic()
            s1 = _switches(pid)
            time.sleep(b.plan.latency_spacing / 2)
            s2 = _switches(pid)
            t2 = time.monotonic()
            client.publish(topic, rest.data, ordering_key="floor-grpc", **rest.attributes).result(
                10
            )
            t3 = time.monotonic()
            s3 = _switches(pid)
            if i >= WARM_UP:
                rtt["rest"].append(t1 - t0)
                rtt["grpc"].append(t3 - t2)
                switches["rest"] += s1 - s0
                switches["grpc"] += s3 - s2
            time.sleep(b.plan.latency_spacing / 2)
    finally:
        rest.close()
        client.stop()
    return {t: Dist.of(v) for t, v in rtt.items()}, {t: n / measured for t, n in switches.items()}


def installed_sizes() -> dict[str, Any]:
    """The default install's dependency closure and the [grpc] one, in MB of installed files
    (each distribution's RECORD sizes, as pip installed them into this venv)."""
    project = _pyproject()
    default = _closure(project["dependencies"])
    with_grpc = _closure([*project["dependencies"], *project["optional-dependencies"]["grpc"]])
    return {
        "default_mb": _size(default) / 2**20,
        "grpc_mb": _size(with_grpc) / 2**20,
        "default_packages": sorted(default),
        "grpc_only_packages": sorted(set(with_grpc) - set(default)),
    }


def _pyproject() -> dict[str, Any]:
    import tomllib

    return dict(tomllib.loads((REPO / "pyproject.toml").read_text())["project"])


def _closure(specs: list[str]) -> dict[str, metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(specs)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in seen:
            seen[name] = metadata.distribution(name)
            todo += seen[name].requires or []
    return seen


def _size(dists: dict[str, metadata.Distribution]) -> int:
    return sum(f.size or 0 for d in dists.values() for f in (d.files or []))


def raw_gap(p: dict[str, Any]) -> tuple[float, float, float]:
    """REST's ack p99 minus gRPC's, with its 95 % interval (`gap_interval`)."""
    return gap_interval((p["ack"]["rest"],), (p["ack"]["grpc"],))


def share_gap(p: dict[str, Any]) -> tuple[float, float, float]:
    """The same for what each bridge adds at p99 over its API of the emulator answering alone
    (`_server_floor`): the emulator's REST front end is itself slower at p99 than its gRPC
    service, by more than the whole gap in some runs, and no client can take that away."""
    ack, floor = p["ack"], p["server_floor"]
    return gap_interval((ack["rest"], floor["grpc"]), (ack["grpc"], floor["rest"]))


def transport_targets(p: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Issue 24's rows, key -> (value, shown): REST's ack p99 no worse than gRPC's (the gap's
    interval reaches 0 or below: the run cannot tell REST slower), as measured and as the
    bridge's share over the emulator's own; REST's idle RSS; the install's size."""
    ack, floor = p["ack"], p["server_floor"]
    gap, low, high = raw_gap(p)
    share, share_low, share_high = share_gap(p)
    rss, sizes = p["idle"]["rest"]["rss_mb"], p["install"]
    install = sizes["default_mb"] / sizes["grpc_mb"]
    return {
        "rest_p99_gap": (
            low,
            f"{ack['rest'].p99:.2f} - {ack['grpc'].p99:.2f} = {gap:+.2f} ms "
            f"(interval {low:+.2f}..{high:+.2f}; the emulator alone: "
            f"{floor['rest'].p99:.2f} - {floor['grpc'].p99:.2f} ms)",
        ),
        "rest_share_gap": (
            share_low,
            f"{ack['rest'].p99 - floor['rest'].p99:.2f} - {ack['grpc'].p99 - floor['grpc'].p99:.2f}"
            f" = {share:+.2f} ms (interval {share_low:+.2f}..{share_high:+.2f})",
        ),
        "rest_rss": (rss, f"{rss:.1f} MB"),
        "install_ratio": (
            install,
            f"{sizes['default_mb']:.1f} / {sizes['grpc_mb']:.1f} MB = {install:.2f}x",
        ),
    }


def pubsub_text(r: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md comparing the two transports (issue 24): informational
    rows of this run, side by side, the same emulator warmed equally for both."""
    p = r.get("pubsub")
    if not p:
        return ""
    ack, cpu, idle, first = p["ack"], p["cpu_ms_per_event"], p["idle"], p["first_publish"]
    floor, sizes, warm = p["server_floor"], p["install"], p["emulator_warm_up"]
    gap, low, high = raw_gap(p)
    share, share_low, share_high = share_gap(p)

    def row(name: str, cell: Any) -> str:
        return f"| {name} | " + " | ".join(cell(t) for t in TRANSPORTS) + " |"

    return "\n".join(
        [
            "## Pub/Sub transports: REST (default) and gRPC (`--pubsub-transport grpc`)",
            "",
            "Both transports in this run, one bridge each on its own simulated VM, the same topic",
            f"of the official emulator, after {warm['publishes']} publishes on each of its APIs",
            "(the emulator is a JVM: its REST path is some 4x slower until compiled).",
            "",
            "| | REST | gRPC |",
            "|---|---|---|",
            row("change -> emulator ack, p50 / p99 / max", lambda t: ack[t].row()),
            row(
                f"the ack p99 of each of {QUARTERS} interleaved samples",
                lambda t: " / ".join(fmt_ms(v) for v in p["ack_p99_quarters"][t]),
            ),
            row("CPU per event", lambda t: f"{cpu[t]:.2f} ms"),
            row("start -> first ack, median", lambda t: f"{median(first[t]):.3f} s"),
            row("idle RSS, heartbeats on", lambda t: f"{idle[t]['rss_mb']:.1f} MB"),
            row("threads, idle", lambda t: str(idle[t]["threads"])),
            row("the emulator alone (raw publish), p50 / p99", lambda t: _p50_p99(floor[t])),
            row(
                "the bridge's share of the p99 (its ack p99 minus the emulator's alone)",
                lambda t: fmt_ms(ack[t].p99 - floor[t].p99),
            ),
            "",
            f"REST's ack p99 minus gRPC's: {gap:+.2f} ms, 95 % bootstrap interval "
            f"{low:+.2f}..{high:+.2f} ms (the {ack['rest'].n} and {ack['grpc'].n} acks "
            "resampled 2,000 times). The emulator's REST front end alone answers with a p99 "
            f"{floor['rest'].p99 - floor['grpc'].p99:+.2f} ms from its gRPC service's: that "
            "part of a gap is the emulator's, and Google's servers are not the emulator. What "
            "each bridge adds at p99 over its API answering alone, REST minus gRPC: "
            f"{share:+.2f} ms, interval {share_low:+.2f}..{share_high:+.2f} ms.",
            "",
            f"Installed on the VM (site-packages of the dependency closure): "
            f"{sizes['default_mb']:.1f} MB by default, {sizes['grpc_mb']:.1f} MB with the "
            f"`[grpc]` extra ({', '.join(sizes['grpc_only_packages'])}).",
            "",
        ]
    )


def _p50_p99(d: Dist) -> str:
    return f"{fmt_ms(d.p50)} / {fmt_ms(d.p99)}"
