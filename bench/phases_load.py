"""The phases under stress: 503 bursts (recovery), growth with the event rate, a fleet of
bridges on one topic; and the check that no Nagle/delayed-ACK stall hides in the figures."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import socket
import subprocess
import threading
import time
from collections import defaultdict
from typing import Any

import psutil

from bench.harness import (
    VM,
    Bench,
    Obs,
    Step,
    free_port,
    log,
    match,
    parse,
    play,
    wait_connected,
    wait_ready,
)
from bench.plan import BENCH, MIGRATE, NONE, POLL_INTERVAL, PYTHON, TERMINATE, Dist, fmt_ms

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
    wait_connected(b, [bridges["ack"][1]])
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
    wait_connected(b, list(labels.values()), timeout=120.0)
    connected = time.monotonic() - t_start
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
        "connected_seconds": connected,
    }
    log(
        f"fleet: {complete}/{len(vms)} instances complete and in order, ack p50 "
        f"{fmt_ms(out['ack'].p50)}, total RSS {out['rss_mb']:.0f} MB"
    )
    return out


def nodelay_facts() -> str:
    """TCP_NODELAY where the bridge's metadata traffic flows, checked on the code in use."""
    from bridge.http1 import Connection
    from bridge.simulator import _Handler

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        conn = Connection("127.0.0.1", port, connect_timeout=2.0, max_body=1)
        try:
            client = conn._open().sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            conn.close()
    return (
        f"the metadata client's connection (bridge/http1.py) has TCP_NODELAY: "
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


def phase_http(b: Bench) -> dict[str, Any]:
    """Change -> 2xx at a loopback CloudEvents receiver (the HTTP sink, binary mode), beside
    the stdout sink watching the same VMs, so both see the same changes."""
    plan = b.plan
    vms = b.vms(2)
    port = free_port()
    r_label = b.name("receiver")
    receiver = b.procs.start(r_label, [PYTHON, str(BENCH / "receiver.py"), str(port)], {})
    if not b.hub.wait(lambda: bool(b.hub.get(r_label)), 15.0):
        raise RuntimeError("the receiver did not start")
    url = ("--sink", "http", "--http-url", f"http://127.0.0.1:{port}/")
    procs, stdout_labels = [receiver], {}
    for vm in vms:
        s_label, s_proc = b.bridge(vm, name="http-stdout")
        _, h_proc = b.bridge(vm, extra=url, name="http-sink")
        procs += [s_proc, h_proc]
        stdout_labels[vm] = s_label
        wait_ready(b, vm, bridges=2)
    # Warm-up (not counted): the sink's first send opens its session.
    play(
        [
            Step(0.3 * (i // 2) + 0.05 * (i % 2), vms[i % 2], value=v)
            for i, v in enumerate((MIGRATE, MIGRATE, NONE, NONE))
        ]
    )
    if not b.hub.wait(lambda: len(b.hub.get(r_label)) >= 5, 15.0):
        raise RuntimeError("warm-up events did not reach the receiver")
    n = max(8, plan.latency_changes // 2)
    cycle = (MIGRATE, NONE, TERMINATE, NONE)
    steps = [Step(0.5 + k * 0.1, vms[k % 2], value=cycle[(k // 2) % 4]) for k in range(n)]
    stamps = play(steps)
    time.sleep(1.0)
    changes: dict[VM, list[tuple[float, str]]] = defaultdict(list)
    for step, t in zip(steps, stamps, strict=True):
        changes[step.vm].append((t, step.value))
    got: dict[str, list[Obs]] = defaultdict(list)
    for line in b.hub.get(r_label):
        with contextlib.suppress(ValueError, KeyError):
            obj = json.loads(line.text)
            got[obj["instance"]].append(Obs(obj["t"], obj["current"], obj["seq"]))
    out: dict[str, list[float]] = defaultdict(list)
    missed: dict[str, int] = defaultdict(int)
    for vm in vms:
        for kind, seen in (
            ("stdout", parse("stdout", b.hub.get(stdout_labels[vm]))),
            ("http", got[vm.instance_id]),
        ):
            lat, miss = match(changes[vm], seen)
            out[kind] += lat
            missed[kind] += miss
    b.procs.stop(*procs)
    dists = {k: Dist.of(v, missed[k]) for k, v in out.items()}
    log(f"http: 2xx p50 {dists['http'].p50:.2f} ms, stdout p50 {dists['stdout'].p50:.2f} ms")
    return dists
