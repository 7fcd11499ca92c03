"""What the benchmark measures and how it sums figures up: constants, the full and quick plans,
the targets, the A/B baseline and the latency distribution (bench/run.py runs it all)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

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
    "http_gap": ("change -> 2xx (HTTP sink, loopback) p50 minus the stdout sink's", "ms", 1.5),
    "startup": ("start -> first long-poll (worst of the starts)", "s", 1.0),
    "idle_cpu": ("idle CPU", "% of a core", 0.2),
    "idle_rss": ("idle RSS", "MB", 70.0),
    "idle_requests": ("idle metadata requests (worst key)", "/min/key", 1.0),
    # Issue 24: the REST transport against gRPC, one bridge each in the same run.
    "rest_p99_gap": (
        "change -> emulator ack p99, REST minus gRPC: the low end of its 95 % interval",
        "ms",
        0.0,
    ),
    "rest_share_gap": (
        "the same for each bridge's share (its p99 over the emulator's API alone)",
        "ms",
        0.0,
    ),
    "rest_rss": ("idle RSS, Pub/Sub sink over REST, heartbeats on", "MB", 40.0),
    "install_ratio": ("installed on the VM, default / with [grpc]", "x", 0.5),
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
    # Pub/Sub transports side by side: changes per transport, and raw publishes per API of the
    # emulator alone (the p99 of 800 is the 8th worst: a tighter interval than 400's 4th)
    transport_changes: int
    floor_publishes: int
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
    transport_changes=800,
    floor_publishes=600,
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
    transport_changes=20,
    floor_publishes=20,
    bursts=(1.0,),
    growth=((1, 2.0), (10, 1.0), (100, 0.5)),
    fleet_vms=8,
    fleet_rounds=2,
    fleet_spacing=0.03,
    ab_changes=20,
    ab_cpu_seconds=1.0,
)

# The A/B baseline: the last commit before issue 12's changes (pinned, so that the comparison
# keeps its meaning once those changes are committed).
BASELINE_COMMIT = "5e03562"


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


def gap_interval(
    plus: tuple[Dist, ...],
    minus: tuple[Dist, ...],
    q: float = 99,
    rounds: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The sum of `plus`'s q-th percentiles minus `minus`'s (one transport's p99 minus
    another's; or each one's p99 over its server's own), and the 95 % bootstrap interval of
    that difference: every sample resampled with replacement, `rounds` times, seeded (the same
    samples give the same interval). Two transports' p99s from one run differ by chance by a
    few ms on this machine: the interval says whether a gap is more than that. Samples of 400
    hold the p99 as the 4th worst, so the interval is wide; it is what the data can say."""
    if not all(d.values for d in (*plus, *minus)):
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)

    def pct(d: Dist, resample: bool) -> float:
        return Dist(tuple(sorted(rng.choices(d.values, k=d.n)))).pct(q) if resample else d.pct(q)

    def gap(resample: bool) -> float:
        return sum(pct(d, resample) for d in plus) - sum(pct(d, resample) for d in minus)

    gaps = sorted(gap(True) for _ in range(rounds))
    return gap(False), gaps[int(0.025 * rounds)], gaps[int(0.975 * rounds) - 1]


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


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT MET")


def worst(seconds: list[float]) -> float:
    """The slowest recovery (a burst whose change was never seen is infinitely slow)."""
    return max(seconds) if seconds else math.nan
