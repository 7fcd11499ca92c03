"""bench/plan.py's `gap_interval`: the verdict "REST's ack p99 no worse than gRPC's" rests on it."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.plan import Dist, gap_interval


def sample(shift: float = 0.0, seed: int = 1, n: int = 400) -> Dist:
    """Latencies shaped like the emulator's acks: mostly 2-4 ms, a tail to ~10 ms."""
    rng = random.Random(seed)
    return Dist.of([(2.0 + rng.expovariate(0.8) + shift) / 1000 for _ in range(n)])


def test_two_samples_of_one_distribution_give_an_interval_around_zero():
    gap, low, high = gap_interval((sample(seed=1),), (sample(seed=2),))
    assert low <= 0 <= high
    assert low <= gap <= high


def test_a_tail_slower_by_more_than_chance_is_told_apart():
    slower = gap_interval((sample(shift=5.0, seed=1),), (sample(seed=2),))
    assert slower[1] > 0, f"a 5 ms slower tail was not told apart: {slower}"


def test_the_same_samples_give_the_same_interval():
    a, b = sample(seed=3), sample(seed=4)
    assert gap_interval((a,), (b,)) == gap_interval((a,), (b,))


def test_a_gap_that_is_the_servers_own_is_not_the_clients():
    """Each client adds the same over its server; one server is slower: the measured gap is
    told apart, the clients' shares are not."""
    slow_server, fast_server = sample(shift=5.0, seed=5), sample(seed=6)
    over_slow, over_fast = sample(shift=6.0, seed=7), sample(shift=1.0, seed=8)
    measured = gap_interval((over_slow,), (over_fast,))
    share = gap_interval((over_slow, fast_server), (over_fast, slow_server))
    assert measured[1] > 0
    assert share[1] <= 0 <= share[2]
