"""The phases that look at one bridge at a time: start-up, the floor, side by side with the
baselines, where the time goes, before/after (A/B), memory; and the idle bridge meanwhile."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import subprocess
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import psutil

from bench.harness import (
    VM,
    Bench,
    Obs,
    SimHost,
    Step,
    free_port,
    http_get,
    log,
    match,
    parse,
    play,
    wait_connected,
    wait_ready,
    wait_until,
)
from bench.phases_pubsub import RawRest, warm_emulator
from bench.plan import (
    BENCH,
    EVENT_KEY,
    MIGRATE,
    NONE,
    POLL_INTERVAL,
    PROJECT,
    PYTHON,
    REPO,
    TERMINATE,
    Dist,
    fmt_ms,
    median,
)
from bridge.events import Event, Instance, Scheduling, Transition, build_event


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
        """Wait until ready, publish a migration's two events (as a bridge that has worked),
        then measure in calm: a notice left on would have every key polled at the notice's
        pace (bridge/watcher.py NOTICE_POLL), which is not idling."""
        if not wait_until(lambda: http_get(self.port, "/readyz")[0] == 200, 30.0):
            raise RuntimeError("idle bridge not ready:\n" + self.b.procs.log_tail(self.label))
        play([Step(0.0, self.vm, value=MIGRATE), Step(0.5, self.vm, value=NONE)])

        def published() -> bool:
            text = http_get(self.port, "/metrics")[1].decode()
            return "maintenance_bridge_publish_success_total 2.0" in text

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
    warm_emulator(b)  # a JVM: its REST path is slow until compiled
    rest = RawRest(b, topic, "floor-rest")  # the bridge's message, written on a bare socket
    client = b.admin.publisher(ordering=True, max_latency=0.0)
    rtt: dict[str, list[float]] = {"rest": [], "grpc": []}
    for i in range(max(20, b.plan.floor_changes // 2)):
        for transport in rtt:  # one at a time after a pause, as the bridge publishes
            t0 = time.monotonic()
            if transport == "rest":
                rest.publish()
            else:
                client.publish(topic, rest.data, ordering_key="floor", **rest.attributes).result(
                    timeout=10
                )
            if i >= 3:  # the first publishes open the channel
                rtt[transport].append(time.monotonic() - t0)
            time.sleep(0.03)
    rest.close()
    client.stop()
    publish = {t: Dist.of(v) for t, v in rtt.items()}

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
        f"{fmt_ms(publish['rest'].p50)} (REST), durable commit p50 {fmt_ms(commits['FULL'].p50)}"
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
    # The emulator is a JVM whose REST path runs some 4x slower until compiled (issue 24, about
    # 2,500 publishes): warmed first, the ack row measures the bridge, not the emulator's JIT.
    warm_emulator(b)
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
    wait_connected(b, [ws[0][0] for ws in watchers.values() if ws[0][1] == "ack"])
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
    variants = {
        "stdout": ("--sink", "stdout"),
        "pubsub, REST (default)": ("--topic", topic),
        "pubsub, gRPC": ("--topic", topic, "--pubsub-transport", "grpc"),
    }
    out: dict[str, Any] = {}
    for name, args in variants.items():
        use_topic = topic if "--topic" in args else ""
        extra = (*(a for a in args if a not in ("--topic", topic)), "--trace")
        play([Step(0.0, vm, value=NONE)])  # a fresh bridge takes the first reading as it is
        before = vm.stats()
        label, proc = b.bridge(vm, topic=use_topic, stamped=True, extra=extra, name="trace")
        wait_ready(b, vm, bridges=1, base=before)
        wait_connected(b, [label])
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
        stages = ", ".join(f"{k} {d.p50:.3f}" for k, d in out[name].items())
        log(f"breakdown {name}: {missed} missed; p50 in ms: {stages}")
    return out


Sides = dict[str, tuple[VM, str, subprocess.Popen[bytes]]]  # side -> (vm, label, process)


def side_by_side(
    b: Bench, sides: Sides, tag: str, n: int, spacing: float, only: str | None = None
) -> dict[str, Any]:
    """n changes per side (or to `only`), alternating between the sides' VMs `spacing` s
    apart, unique values; each side's change -> stdout line latencies and the CPU its bridge
    process spent meanwhile."""
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
            any(o.value == last[s] for o in parse("stdout", b.hub.get(sides[s][1]))) for s in names
        )

    b.hub.wait(done, 10.0)
    out: dict[str, Any] = {}
    for s in names:
        seen: dict[str, float] = {}
        for o in parse("stdout", b.hub.get(sides[s][1])):
            seen.setdefault(o.value, o.t)
        mine = [(st.value, t) for st, t in zip(steps, stamps, strict=True) if st.vm is sides[s][0]]
        lat = [seen[v] - t for v, t in mine if v in seen]
        cpu1 = psutil.Process(sides[s][2].pid).cpu_times()
        cpu = (cpu1.user + cpu1.system) - (cpu0[s].user + cpu0[s].system)
        out[s] = {"latency": Dist.of(lat, len(mine) - len(lat)), "cpu": cpu, "events": len(lat)}
    return out


def ab_measure(b: Bench, sides: Sides, changes: int, cpu_seconds: float) -> dict[str, Any]:
    """Latency of `changes` interleaved changes per side, 40 ms apart (both see the same
    machine), and CPU per event at 100 changes/s to one side at a time, in the order first,
    second, second, first (a machine getting busier weighs on both alike)."""
    first, second = sides
    side_by_side(b, sides, "warm", 2, 0.05)
    time.sleep(0.3)
    interleaved = side_by_side(b, sides, "lat", changes, 0.04)
    seconds: dict[str, float] = defaultdict(float)
    events: dict[str, int] = defaultdict(int)
    half = int(100 * cpu_seconds / 2)
    for i, side in enumerate((first, second, second, first)):
        time.sleep(0.5)
        got = side_by_side(b, sides, f"cpu{i}", half, 0.01, only=side)[side]
        seconds[side] += got["cpu"]
        events[side] += got["events"]
    return {
        "latency": {s: interleaved[s]["latency"] for s in sides},
        "cpu_ms_per_event": {s: 1000.0 * seconds[s] / max(1, events[s]) for s in sides},
    }


def phase_ab(b: Bench) -> dict[str, Any]:
    """Before/after in this run: the A/B baseline's bridge and this tree's, stdout sink, each on
    its own VM (`ab_measure`: interleaved latency, CPU before, after, after, before)."""
    assert b.before is not None
    vms = b.vms(2)
    sides: Sides = {}
    for side, vm in zip(("before", "after"), vms, strict=True):
        label, proc = b.bridge(vm, name=f"ab-{side}", before=side == "before")
        sides[side] = (vm, label, proc)
    for vm in vms:
        wait_ready(b, vm, bridges=1)
    measured = ab_measure(b, sides, b.plan.ab_changes, b.plan.ab_cpu_seconds)
    cpu = measured["cpu_ms_per_event"]
    b.procs.stop(*(proc for _, _, proc in sides.values()))
    out = {
        "commit": b.before.commit,
        **measured,
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
