"""Retry policies as values: the one place that decides how soon a failed call is tried again.

The metadata server's disruptions during maintenance last under a second and come exactly when
a notice does, so its policy first retries quickly and steadily (every 25-50 ms, for
`FAST_ATTEMPTS` attempts: 5 to 10 s) and only then backs off exponentially to the cap: a blip
costs tens of milliseconds of blindness, a long outage costs one request per key every
cap/2..cap seconds. A rate limit (HTTP 429) skips the quick phase: hurrying would make it worse.
A connection that cannot be made or that died (a migration blackout: the guest cannot reach the
server at all) backs off to at most `RECONNECT_CAP` instead: such an attempt costs the server
nothing (the SYN is lost, or the guest's own stack refuses it), and the first attempt after the
network returns must come within about a second even when the blackout outlasted the quick phase.
Publishing retries back off from the first failure (the outbox holds the events meanwhile).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from bridge.metadata import MetadataError

FAST_INTERVAL = 0.05
FAST_ATTEMPTS = 200
RECONNECT_CAP = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """Delay after the n-th consecutive failure: `fast` for the first `fast_attempts` failures,
    then `initial * multiplier**k` capped at `cap`; every delay is drawn from
    [(1 - jitter) * d, d] so that a fleet does not retry in step."""

    initial: float
    cap: float
    multiplier: float = 2.0
    jitter: float = 0.5
    fast: float = 0.0
    fast_attempts: int = 0
    retryable: tuple[type[BaseException], ...] = (Exception,)
    slow_classes: tuple[str, ...] = ()  # failure classes that skip the quick phase
    class_caps: tuple[tuple[str, float], ...] = ()  # a lower cap for these failure classes

    def delay(self, failures: int, failure_class: str = "", rand: float | None = None) -> float:
        """Seconds to wait after `failures` (>= 1) consecutive failures, the last of
        `failure_class`; `rand` in [0, 1) replaces the random draw (tests)."""
        cap = min([self.cap, *(c for name, c in self.class_caps if name == failure_class)])
        quick = self.fast_attempts and failure_class not in self.slow_classes
        if quick and failures <= self.fast_attempts:
            base = min(self.fast, cap)
        else:
            k = max(0, failures - 1 - (self.fast_attempts if quick else 0))
            base = min(cap, self.initial * self.multiplier ** min(k, 64))
        draw = random.random() if rand is None else rand
        return base * (1.0 - self.jitter * draw)

    def max_rate(self) -> tuple[float, float]:
        """Worst-case requests per second while failing at once: (quick phase, after it)."""
        quick = 1.0 / (min(self.fast, self.cap) * (1 - self.jitter)) if self.fast_attempts else 0.0
        return quick, 1.0 / (self.cap * (1 - self.jitter))

    def retrying(
        self,
        sleep: Callable[[float], None],
        before_sleep: Callable[[tenacity.RetryCallState], None],
        *,
        already_failed: int = 0,
    ) -> tenacity.Retrying:
        """A tenacity loop that retries forever on `retryable`; `sleep` raises to stop it.
        `already_failed`: attempts the caller made (and waited after) before entering it."""

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            failures = state.attempt_number + already_failed
            return self.delay(failures, getattr(exc, "failure_class", ""))

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(self.retryable),
            wait=wait,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )


def metadata_policy(cap: float) -> RetryPolicy:
    """Watchers and the identity read: quick and steady first, then back off to `cap`."""
    return RetryPolicy(
        initial=0.1,
        cap=cap,
        fast=FAST_INTERVAL,
        fast_attempts=FAST_ATTEMPTS,
        retryable=(MetadataError,),
        slow_classes=("http_429",),
        class_caps=(("connection", RECONNECT_CAP), ("timeout", RECONNECT_CAP)),
    )


def publish_policy(cap: float) -> RetryPolicy:
    """The relay: back off from 100 ms to `cap` (the sink's own outage, not a blip)."""
    return RetryPolicy(initial=0.1, cap=cap)
