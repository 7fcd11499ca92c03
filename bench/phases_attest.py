"""Verified origin's cost on the hot path (issue 26): this tree's bridge with `--attest off` and
with `--attest on`, side by side in one run, stdout sink, each on its own simulated VM (the
same simhosts, the same changes): change -> stdout line, and CPU per event (`ab_measure`).
With `--attest on` every event waits for one identity-token request to the simulated metadata
server, whose signing (RSA-2048, in the simhost process) is part of the latency but not of the
bridge's CPU. Also the size of the token the simulator serves (format=full, claims as Compute
Engine's), against Pub/Sub's 1024-byte limit on an attribute value."""

from __future__ import annotations

import time
from typing import Any

from bench.harness import Bench, log, wait_ready
from bench.phases import Sides, ab_measure
from bench.plan import Dist, fmt_ms
from bridge.attestation import IDENTITY_PATH, Attestor
from bridge.metadata import MetadataClient
from bridge.origin import PIECE, binding
from bridge.simulator import Simulator

SIDES = ("off", "on")


def token_probe(n: int = 50) -> tuple[int, Dist]:
    """Bytes of a format=full token of the simulated VM, and the round trip of `n` token
    requests one after another (distinct audiences, as the bridge asks them: no cache), on a
    simulator in this process: how much of the latency the simulated server's signing is."""
    times: list[float] = []
    with Simulator().start() as sim:
        attestor = Attestor(MetadataClient(sim.url), lambda: None)
        try:
            for k in range(n):
                started = time.monotonic()
                token = attestor.token(binding({"k": k}))  # as long as every event's audience
                times.append(time.monotonic() - started)
        finally:
            attestor.close()
    if token is None:
        raise RuntimeError("the simulator served no identity token")
    return len(token.encode()), Dist.of(times[1:], 0)  # the first one makes the signing key


def phase_attest(b: Bench) -> dict[str, Any]:
    vms = b.vms(2)
    sides: Sides = {}
    for side, vm in zip(SIDES, vms, strict=True):
        label, proc = b.bridge(vm, name=f"attest-{side}", extra=("--attest", side))
        sides[side] = (vm, label, proc)
    for vm in vms:
        wait_ready(b, vm, bridges=1)
    measured = ab_measure(b, sides, b.plan.ab_changes, b.plan.ab_cpu_seconds)
    tokens = {side: vm.stats().get(IDENTITY_PATH, 0) for side, (vm, _, _) in sides.items()}
    b.procs.stop(*(proc for _, _, proc in sides.values()))
    size, fetch = token_probe()
    out = {
        **measured,
        "token_requests": tokens,
        "token_bytes": size,
        "fetch": fetch,
    }
    lat, cpu = out["latency"], out["cpu_ms_per_event"]
    log(
        "attest: change -> stdout p50 (p99) off/on "
        + " / ".join(f"{fmt_ms(lat[s].p50)} ({fmt_ms(lat[s].p99)})" for s in SIDES)
        + ", CPU per event "
        + " / ".join(f"{cpu[s]:.2f} ms" for s in SIDES)
        + f", token {size} bytes, one token request p50 {fmt_ms(fetch.p50)}"
        + f", identity requests {tokens}"
    )
    return out


def attest_text(r: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md: informational, no target."""
    a = r.get("attest")
    if not a:
        return ""
    lat, cpu, n, fetch = a["latency"], a["cpu_ms_per_event"], a["token_requests"], a["fetch"]
    events = lat["on"].n + lat["on"].missed
    return "\n".join(
        [
            "## Verified origin: the cost of `--attest on`",
            "",
            "This tree's bridge with `--attest off` and with `--attest on`, stdout sink, each on a",
            f"simulated VM of its own, in this run: {events} changes each, alternating between",
            "the two, 40 ms apart, for latency; CPU time of each bridge process over changes at",
            "100/s to one at a time (off, on, on, off). With it on, each event waits for one",
            "identity-token request to the simulated metadata server (on loopback; its RSA",
            "signing runs in the simulator's process, so it is in the latency, not in the",
            "bridge's CPU; a real metadata server's token latency is not measured here).",
            "",
            "| | `--attest off` | `--attest on` |",
            "|---|---|---|",
            f"| change -> stdout line, p50 / p99 / max | {lat['off'].row()} | {lat['on'].row()} |",
            f"| CPU per event at 100 changes/s | {cpu['off']:.2f} ms | {cpu['on']:.2f} ms |",
            f"| identity-token requests in the phase | {n['off']} | {n['on']} |",
            "",
            f"One token request alone (the bridge's client, a simulator on loopback, "
            f"{fetch.n} in a row): p50 {fmt_ms(fetch.p50)}, p99 {fmt_ms(fetch.p99)}.",
            f"A format=full token from the simulator is {a['token_bytes']} bytes, over Pub/Sub's",
            f"1024-byte limit on one attribute value: it travels in pieces of at most {PIECE}",
            "characters (`attestation1`, `attestation2`, ...).",
            "",
        ]
    )
