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

Layout: bench/plan.py (what is measured, targets, statistics), bench/harness.py (processes,
simulated VMs, matching), bench/phases.py and bench/phases_load.py (the phases),
bench/report.py (docs/benchmarks.md); this file runs them in order and draws the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Bench, Hub, Procs, SimHost, log, settle
from bench.phases import (
    STAGES,
    Idle,
    phase_ab,
    phase_breakdown,
    phase_floor,
    phase_latency,
    phase_memory,
    phase_startup,
)
from bench.phases_attest import phase_attest
from bench.phases_disruption import phase_disruption
from bench.phases_load import (
    nagle_control,
    nodelay_facts,
    phase_fleet,
    phase_growth,
    phase_http,
    phase_recovery,
)
from bench.phases_pubsub import phase_pubsub
from bench.plan import FULL, PROJECT, QUICK, REPO, Before, verdict
from bench.report import markdown, targets
from tests.support.pubsub import PubSubAdmin, PubSubServer, start_pubsub


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
    parser.add_argument(
        "--only",
        help="comma-separated phases to run while developing (e.g. latency,ab): their log lines "
        "only; no idle window, nothing written",
    )
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
    failed: dict[str, str] = {}  # phase -> why it failed
    ok = False
    try:
        log(f"{'quick' if plan.quick else 'full'} run; work dir {root}")
        pubsub = start_pubsub(project=PROJECT, data_dir=root / "pubsub")
        admin = PubSubAdmin(pubsub)
        hosts = [SimHost(procs, f"simhost{i}") for i in range(max(1, args.simhosts))]
        before = Before.extract(root / "before")
        b = Bench(plan, root, procs, hub, pubsub, admin, hosts, results, before)
        if not args.only:
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
            ("attest", phase_attest),
            ("recovery", phase_recovery),
            ("growth", phase_growth),
            ("http", phase_http),
            ("memory", phase_memory),
            ("fleet", phase_fleet),
            ("pubsub", phase_pubsub),
            ("disruption", phase_disruption),
        ]
        if b.before is None:
            log("no git history here: the before/after (A/B) figures are left out")
            phases = [p for p in phases if p[0] != "ab"]
        if args.only:
            phases = [p for p in phases if p[0] in args.only.split(",")]
        for name, phase in phases:
            settle(plan)
            running = set(procs.live)
            try:
                results[name] = phase(b)
            except Exception as exc:  # one broken phase must not cost the others their figures
                traceback.print_exc()
                log(f"phase {name} FAILED; its figures are left out")
                failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                procs.stop(*(p for pid, p in list(procs.live.items()) if pid not in running))
        if idle is not None:
            results["idle"] = idle.finish()
            idle = None
        lat = results.get("latency")
        if lat:
            results["nagle"] = {
                "control": results["nagle_control"],
                "static": nodelay_facts(),
                "stdout_hits": lat["stdout"].around(30, 50),
                "stdout_n": lat["stdout"].n,
                "ack_hits": lat["ack"].around(30, 50),
                "ack_n": lat["ack"].n,
            }
        ok = not failed
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
    if args.only:
        log(f"done in {wall:.0f} s (--only: nothing written)")
        return 1 if failed else 0
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
        "failed": failed,
    }
    print_table(results)
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmarks.md").write_text(markdown(results, meta))
    plot(results, output / "benchmarks.png")
    log(f"done in {wall:.0f} s; wrote {output / 'benchmarks.md'} and benchmarks.png")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
