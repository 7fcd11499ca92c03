"""docs/benchmarks.md from one run's results: the targets, the rows against Google's sample and
every section, with the method beside each figure."""

from __future__ import annotations

import math
from typing import Any

from bench.phases import STAGES
from bench.phases_attest import attest_text
from bench.phases_disruption import disruption_rows, disruption_text
from bench.phases_load import RECOVERY_CLIENTS
from bench.phases_pubsub import pubsub_text, transport_targets
from bench.plan import NAGLE_CLUSTER, TARGETS, Dist, fmt_ms, median, ratio, verdict, worst
from bench.report_text import CHANGES, HISTORY
from bridge.config import Config
from bridge.retry import metadata_policy


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(label, measured, target, met) for every target of issues 8, 12 and 24."""
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
    if http := r.get("http"):
        gap = http["http"].p50 - http["stdout"].p50
        shown = f"{fmt_ms(http['http'].p50)} - {fmt_ms(http['stdout'].p50)} = {fmt_ms(gap)}"
        add("http_gap", gap, shown)
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
    if pubsub := r.get("pubsub"):
        for key, (value, shown) in transport_targets(pubsub).items():
            add(key, value, shown)
    rows += disruption_rows(r)
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


def above(ms: float) -> str:
    if ms >= 0:
        return f"{fmt_ms(ms)} above"
    return f"{fmt_ms(-ms)} below (within the noise of measurements made apart)"


def floor_text(lat: dict[str, Dist], fl: dict[str, Any], bd: dict[str, Any]) -> str:
    """How far above the floor we are, for both sinks, alone and side by side."""
    answer = fl["http"].p50
    publish = fl["publish"]["rest"].p50  # the bridge's default transport
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


def sample_text(r: dict[str, Any]) -> str:
    """The three rows of issue 12: the bridge beside Google's sample, same run, as ratios."""
    lat, rec, st = r.get("latency"), r.get("recovery"), r.get("startup")
    rows: list[tuple[str, str, str, float, list[str]]] = []  # row, ours, theirs, ratio, targets
    if lat:
        ours, theirs = lat["stdout"].p50, lat["sample_stdout_vms"].p50
        rows.append(
            ("change -> line, p50", fmt_ms(ours), fmt_ms(theirs), ours / theirs, ["detect_ratio"])
        )
    if rec:
        ours, theirs = median(rec["bridge"]) * 1000, median(rec["sample"]) * 1000
        targets_ = ["recovery_median", "recovery_ratio"]
        rows.append(
            (
                "end of a 503 burst -> the hidden change, median",
                fmt_ms(ours),
                fmt_ms(theirs),
                ours / theirs,
                targets_,
            )
        )
        ours, theirs = worst(rec["bridge"]) * 1000, worst(rec["sample"]) * 1000
        rows.append(
            (
                "... the slowest burst",
                fmt_ms(ours),
                fmt_ms(theirs),
                ours / theirs,
                ["recovery_worst"],
            )
        )
    if st:
        ours, theirs = median(st["pubsub"]["first_poll"]), median(st["sample"]["first_poll"])
        rows.append(
            (
                "start -> first long-poll of maintenance-event (bridge: Pub/Sub sink), median",
                f"{ours:.3f} s",
                f"{theirs:.3f} s",
                ours / theirs,
                ["startup_ratio"],
            )
        )
    if not rows:
        return ""
    measured = beat_sample(r)
    lines = [
        "## Against Google's sample",
        "",
        "The rows where a user compares the bridge with the sample they already have, measured",
        "side by side in this run (the sections below say how):",
        "",
        "| row | bridge | Google's sample | ratio | targets | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, ours_, theirs_, ratio_, keys in rows:
        limits = " and ".join(f"{TARGETS[k][2]:g} {TARGETS[k][1]}" for k in keys)
        met = [measured[k][0] <= TARGETS[k][2] for k in keys]
        lines.append(
            f"| {name} | {ours_} | {theirs_} | {ratio_:.2f}x | <= {limits} | {verdict(all(met))} |"
        )
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
        f"{before.n + before.missed} changes each, alternating between the two, 40 ms apart;",
        "CPU: the process's CPU time over changes at 100/s to one bridge at a time (before, after,",
        "after, before).",
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
        for part in dict.fromkeys([*parts["before"], *parts["after"]]):
            cells = [
                f"{parts[side][part]:.3f} ms" if part in parts[side] else "n/a"
                for side in ("before", "after")
            ]
            lines.append(f"| {part} | {cells[0]} | {cells[1]} |")
    return "\n".join([*lines, "", CHANGES])


def memory_text(steps: list[dict[str, Any]], idle: dict[str, Any] | None) -> str:
    """What a Pub/Sub bridge's memory is made of, per transport (bench/memory_probe.py: one
    fresh process per transport, each step on top of the previous one)."""
    lines = ["## Memory", ""]
    totals: dict[str, float] = {}
    for transport in dict.fromkeys(st["transport"] for st in steps):
        mine = [st for st in steps if st["transport"] == transport]
        lines += [
            f"`--pubsub-transport {transport}`, one fresh process, each step on top of the last:",
            "",
            "| step | RSS | added | threads |",
            "|---|---|---|---|",
        ]
        previous = 0.0
        for st in mine:
            added = f"+{st['rss_mb'] - previous:.1f} MB" if previous else "-"
            lines.append(f"| {st['step']} | {st['rss_mb']:.1f} MB | {added} | {st['threads']} |")
            previous = st["rss_mb"]
        totals[transport] = mine[-1]["rss_mb"]
        lines.append("")
    if "rest" in totals and "grpc" in totals:
        lines.append(
            f"After one acknowledged publish: {totals['rest']:.1f} MB over REST (the default), "
            f"{totals['grpc']:.1f} MB with google-cloud-pubsub and gRPC."
        )
    if idle:
        lines.append(
            f"The idle bridge above, with its watchers, relay, HTTP endpoint and SQLite store, "
            f"held {idle['rss_max_mb']:.1f} MB."
        )
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
    for name, why in meta.get("failed", {}).items():
        w(f"- **Phase `{name}` failed in this run; its figures are missing**: {why}")
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
    w(disruption_text(r))
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
        how = {
            "rest": "REST on a bare socket (the bridge's default transport)",
            "grpc": "gRPC through the library, max_latency 0",
        }
        for key, d in fl["publish"].items():
            w(
                f"| one publish round trip of a bridge event (binary mode, ordering key), "
                f"30 ms apart, {how[key]} | {fmt_ms(d.p50)} | {fmt_ms(d.p99)} |"
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
        w("resolves (Pub/Sub). Every change sets a value of its own and each stamped record is")
        w("matched to its change by that value. (This phase once matched them by sequence")
        w("number, which assumes no change is ever coalesced: a few changes lost to a stall at")
        w("the start of one variant shifted every later match by 40 ms per change lost, which")
        w("is how a 240 ms 'metadata answer received' stage once appeared here.) Changes never")
        w(
            "reported (coalesced by the server while the bridge was busy): "
            + ", ".join(f"{n} {bd[n]['total'].missed}" for n in names)
            + "."
        )
        w("")
    if r.get("ab"):
        w(ab_text(r))
        w("")
    if bd:
        w(HISTORY)
        w("")
    if r.get("attest"):
        w(attest_text(r))
    if r.get("pubsub"):
        w(pubsub_text(r))
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
            f"own VM, after publishing a migration's two events (back to calm), left alone for "
            f"{idle['seconds']:.0f} s while the"
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
        w(f"| ... all connected to Pub/Sub after | {fleet['connected_seconds']:.1f} s |")
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
        w("TCP_NODELAY; the bridge's metadata client (bridge/http1.py) sets TCP_NODELAY and")
        w("sends each request in one write; its /healthz server answers in one write and closes;")
        w("the HTTP sink sets TCP_NODELAY and writes each request in one piece; gRPC sets")
        w(f"TCP_NODELAY on its own. Checked in this run: {ng['static']}.")
        w("")
    return "\n".join(lines) + "\n"
