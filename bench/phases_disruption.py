"""Through the disruption: time to see a change after a blackout, beside Google's sample, the
blindness a frozen poll costs during a notice, and the calm request rate.

Every case runs in a network namespace of its own (tests/support/disruption_lab.py, the lab the
suite asserts on): `ip link set lo down` is the blackout, the simulator forgets every connection
meanwhile (its reset lost, as on the new host after a live migration), the link comes back and
the change is made. `seen`: from the change after the network's return to the bridge's event,
the slowest of the three watched keys in each round; `rearm`: the next round's fresh notice.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.harness import Bench, log
from tests.support.disruption_lab import namespace_unavailable_reason, run_case

TARGET_SEEN = 5.0  # s, issue 22: the change after a blackout reaches the sink within 5 s
TARGET_FROZEN = 15.0  # s, issue 22: a frozen poll during a notice blinds a key at most this


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "worst": max(values), "n": len(values)}


def phase_disruption(b: Bench) -> dict[str, Any]:
    """Blackouts of 2 s (10 rounds; 3 in a quick run), one of 30 s, frozen polls, calm."""
    reason = namespace_unavailable_reason()
    if reason:
        raise RuntimeError(f"no network namespace here: {reason}")
    work = b.root / "disruption"
    work.mkdir(exist_ok=True)
    rounds = 3 if b.plan.quick else 10
    log(f"disruption: {rounds} rounds of a 2 s blackout with forgotten connections")
    short = run_case("blackouts", work, 600, rounds=rounds, seconds=2, during=False, calm=False)
    seen = [max(r["seen"]["bridge"].values()) for r in short["rounds"]]
    rearm = [max(r["rearm"]["bridge"].values()) for r in short["rounds"]]
    sample = [r["seen"]["sample"] for r in short["rounds"] if r["seen"]["sample"] is not None]
    log("disruption: one 30 s blackout, the change made during it")
    long = run_case("blackouts", work, 300, rounds=1, seconds=30, during=True, calm=False)
    log("disruption: frozen polls during a notice (2 rounds)")
    frozen = run_case("frozen", work, 300, rounds=2)
    blind = [v for r in frozen["rounds"] for v in r["bridge"].values()]
    calm_seconds = 65.0 if b.plan.quick else 125.0
    log(f"disruption: {calm_seconds:.0f} s of calm at the default poll_timeout")
    calm = run_case("calm", work, calm_seconds + 120, seconds=calm_seconds)
    result = {
        "rounds": rounds,
        "seen": _summary(seen),
        "rearm": _summary(rearm),
        "sample_seen": len(sample),
        "sample": _summary(sample) if sample else None,
        "long_seen": max(long["rounds"][0]["seen"]["bridge"].values()),
        "frozen": _summary(blind),
        "calm": calm,
    }
    log(
        f"disruption: seen median {result['seen']['median']:.2f} s, worst "
        f"{result['seen']['worst']:.2f} s (sample saw {len(sample)}/{rounds}); next notice "
        f"median {result['rearm']['median']:.3f} s, worst {result['rearm']['worst']:.3f} s; "
        f"30 s blackout "
        f"{result['long_seen']:.2f} s; frozen worst {result['frozen']['worst']:.2f} s; calm "
        f"{max(calm['per_min'].values()):.2f} /min/key worst"
    )
    return result


def disruption_rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """The target rows (label, measured, limit, met) of bench/report.py."""
    d = r.get("disruption")
    if not d:
        return []
    worst = max(d["seen"]["worst"], d["rearm"]["worst"], d["long_seen"])
    calm = max(d["calm"]["per_min"].values())
    return [
        (
            "blackout with forgotten connections -> change seen (worst key, every round)",
            f"{worst:.2f} s",
            f"<= {TARGET_SEEN:g} s",
            worst <= TARGET_SEEN,
        ),
        (
            "frozen poll during a notice -> change seen (worst key)",
            f"{d['frozen']['worst']:.2f} s",
            f"<= {TARGET_FROZEN:g} s",
            d["frozen"]["worst"] <= TARGET_FROZEN,
        ),
        (
            f"calm metadata requests (worst key, {d['calm']['seconds']:.0f} s)",
            f"{calm:.2f} /min",
            "<= 1 /min/key",
            calm <= 1.0 if d["calm"]["seconds"] >= 120 else None,
        ),
    ]


def disruption_text(r: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md, from this run's figures."""
    d = r.get("disruption")
    if not d:
        return ""
    s, a = d["seen"], d["rearm"]
    sample = (
        f"Google's sample saw the change within 5 s in {d['sample_seen']} of {d['rounds']} "
        "rounds: it sets neither a timeout nor keepalive, so the request the server forgot "
        "waits for ever."
    )
    p = d["sample"]
    seen_by_sample = (
        f"median {p['median']:.2f} s, worst {p['worst']:.2f} s, in {d['sample_seen']} rounds"
        if p
        else f"not within 5 s in any of {d['rounds']} rounds"
    )
    calm = ", ".join(f"`{k}` {v:.2f}" for k, v in d["calm"]["per_min"].items())
    return "\n".join(
        [
            "## Through the disruption",
            "",
            f"{d['rounds']} rounds in a network namespace: a notice on, a 2 s blackout in which "
            "the metadata server forgets every connection (its reset lost), the change back to "
            "calm once the network is back, then a fresh notice. Slowest of the three keys in "
            "each round:",
            "",
            "| | median | worst | Google's sample |",
            "|---|---|---|---|",
            f"| change after the blackout -> event | {s['median']:.2f} s | {s['worst']:.2f} s "
            f"| {seen_by_sample} |",
            f"| the next notice -> `started` | {a['median']:.3f} s | {a['worst']:.3f} s | - |",
            "",
            f"{sample} A 30 s blackout with the change made during it: seen "
            f"{d['long_seen']:.2f} s after the network returned. Frozen polls (taken, never "
            f"answered) during a notice: every key's change seen within "
            f"{d['frozen']['worst']:.2f} s (median {d['frozen']['median']:.2f} s). Calm, "
            f"{d['calm']['seconds']:.0f} s at the default poll_timeout, requests per minute: "
            f"{calm}.",
            "",
        ]
    )
