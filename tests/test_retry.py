"""The retry policies: quick and steady through a metadata blip, cheap through a long outage."""

from __future__ import annotations

import threading
from datetime import datetime

from support.harness import wait_for

from bridge.config import Config
from bridge.events import MAINTENANCE
from bridge.health import Health
from bridge.metadata import MetadataError
from bridge.metrics import Metrics
from bridge.retry import (
    FAST_ATTEMPTS,
    RECONNECT_CAP,
    RetryPolicy,
    metadata_policy,
    publish_policy,
)
from bridge.simulator import Simulator
from bridge.watcher import Watcher


def test_metadata_policy_retries_quickly_then_backs_off_to_the_cap() -> None:
    policy = metadata_policy(2.0)
    quick = [policy.delay(n) for n in range(1, FAST_ATTEMPTS + 1)]
    assert max(quick) <= 0.05 and min(quick) >= 0.025
    assert sum(policy.delay(n, rand=1.0) for n in range(1, FAST_ATTEMPTS + 1)) >= 5.0
    later = [policy.delay(n, rand=0.0) for n in range(FAST_ATTEMPTS + 1, FAST_ATTEMPTS + 40)]
    assert later == sorted(later) and later[0] == 0.1 and later[-1] == 2.0
    # A long outage costs at most one request per key every cap/2 seconds.
    assert all(policy.delay(n) >= 1.0 for n in range(FAST_ATTEMPTS + 6, FAST_ATTEMPTS + 500))
    assert policy.max_rate() == (40.0, 1.0)


def test_a_rate_limit_skips_the_quick_phase() -> None:
    policy = metadata_policy(2.0)
    assert [policy.delay(n, "http_429", rand=0.0) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert policy.delay(1, "http_5xx", rand=0.0) == 0.05


def test_a_cap_below_the_quick_interval_wins() -> None:
    assert metadata_policy(0.02).delay(1, rand=0.0) == 0.02
    assert publish_policy(0.3).delay(50, rand=0.0) == 0.3


def test_publish_policy_backs_off_from_the_first_failure() -> None:
    policy = publish_policy(2.0)
    assert [policy.delay(n, rand=0.0) for n in (1, 2, 3, 10)] == [0.1, 0.2, 0.4, 2.0]


def test_a_change_inside_a_503_burst_is_seen_once_it_ends(sim: Simulator, tmp_path) -> None:
    """The watcher keeps retrying quickly through a long burst of 503s and reads the change made
    during it. How soon after the burst is measured by bench/ (phase_recovery), not asserted on
    a shared machine; the schedule itself is the pure tests' above."""
    seen: list[str] = []
    got = threading.Event()

    def observe(key: str, value: str, at: datetime, when: float, first: bool) -> None:
        seen.append(value)
        if value == "TERMINATE_ON_HOST_MAINTENANCE":
            got.set()

    stop = threading.Event()
    config = Config(metadata_url=sim.url, state_dir=tmp_path, poll_timeout=1)
    watcher = Watcher(MAINTENANCE, config, observe, stop, Health(max_outbox_age=30), Metrics())
    watcher.start()
    try:
        assert watcher.answered.wait(10)
        before = sim.stats()[MAINTENANCE]
        sim.inject("status", 1_000_000, MAINTENANCE, status=503)
        sim.set_value(MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE")  # ends the hanging poll
        # 20 s for 40 failures: the quick phase needs 1-2 s, a back-off to the 2 s cap minutes.
        wait_for("20 failed requests", lambda: sim.stats()[MAINTENANCE] >= before + 20)
        sim.set_value(MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE")
        wait_for("20 more", lambda: sim.stats()[MAINTENANCE] >= before + 40)
        sim.clear_faults()
        assert got.wait(10), "the change made during the burst was not seen after it"
    finally:
        stop.set()
        watcher.thread.join(10)
    assert seen[-1] == "TERMINATE_ON_HOST_MAINTENANCE"


def test_the_loop_continues_the_schedule_of_attempts_made_before_it():
    """The watcher asks once outside the loop (the usual round costs no retry machinery): the
    loop it enters after a failure must go on with the second delay, not start again."""
    policy = RetryPolicy(
        initial=0.1, cap=2.0, jitter=0.0, fast=0.05, fast_attempts=2, retryable=(MetadataError,)
    )
    slept: list[float] = []
    calls = iter([MetadataError("http_5xx", "1"), MetadataError("http_5xx", "2"), None])

    def flaky() -> str:
        failure = next(calls)
        if failure is not None:
            raise failure
        return "answered"

    loop = policy.retrying(slept.append, lambda state: None, already_failed=1)
    assert loop(flaky) == "answered"
    assert slept == [policy.delay(2), policy.delay(3)] == [0.05, 0.1]


def test_a_lost_network_is_retried_within_a_second_even_after_the_quick_phase() -> None:
    """A blackout longer than the quick phase (a 30 s migration blackout) must not leave the
    watcher in the slow back-off: the first attempt after the network returns comes within
    RECONNECT_CAP, while a server answering 5xx still backs off to the cap."""
    policy = metadata_policy(2.0)
    for cls in ("connection", "timeout"):
        later = [
            policy.delay(n, cls, rand=0.0) for n in range(FAST_ATTEMPTS + 1, FAST_ATTEMPTS + 400)
        ]
        assert max(later) == RECONNECT_CAP == 1.0
        assert min(later) >= 0.1  # still backing off from the quick phase: no tight loop
    assert policy.delay(FAST_ATTEMPTS + 40, "http_5xx", rand=0.0) == 2.0
    assert metadata_policy(0.5).delay(FAST_ATTEMPTS + 40, "connection", rand=0.0) == 0.5
