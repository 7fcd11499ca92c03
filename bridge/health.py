"""Liveness and readiness, from promises the loops make before they block.

Each watcher says how long its next blocking step may take at most (`expect`); a loop that
overruns its own promise is stuck, whatever the reason. The store reports its last write.
Readiness adds what liveness cannot see: loops that all keep their promises while nothing
gets out (a deleted topic, a revoked role), told by the age of the oldest unpublished event, a
sink blocked inside a send (stdout into a full pipe) and events parked for good. A thread that
met an unexpected exception (its supervisor restarts it) is reported for a while after.
Every verdict is on the monotonic clock: a step of the wall clock changes none.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

GRACE_SECONDS = 15.0
CRASH_SHOWN = 60.0  # seconds a thread's unexpected exception stays on /healthz


class Outbox(Protocol):
    """The relay, as readiness sees it."""

    last_failure: str  # why the last publish failed, "" once the sink accepts again
    parked: int  # events the sink refused for good, waiting for `redrive`

    def oldest_seen(self) -> float | None:
        """Monotonic time the oldest waiting event entered the outbox; None when empty."""

    def stuck(self, now: float) -> str:
        """Why the sink takes nothing at all (blocked in a send), "" when it does not."""


@dataclass
class Health:
    """Shared by the watchers, the recorder and the HTTP endpoint."""

    deadlines: dict[str, float] = field(default_factory=dict)
    store_error: str = ""
    ready: bool = False
    outbox: Outbox | None = None
    max_outbox_age: float = 30.0
    crashes: dict[str, tuple[float, str]] = field(default_factory=dict)  # thread -> when, why
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def expect(self, loop: str, seconds: float) -> None:
        """`loop` will be back within `seconds` (plus grace), or it is stuck."""
        with self._lock:
            self.deadlines[loop] = time.monotonic() + seconds + GRACE_SECONDS

    def done(self, loop: str) -> None:
        """`loop` has finished for good: nothing more to promise."""
        with self._lock:
            self.deadlines.pop(loop, None)

    def crashed(self, thread: str, why: str) -> None:
        """`thread` met an unexpected exception (it is being restarted)."""
        with self._lock:
            self.crashes[thread] = (time.monotonic(), why)

    def store_failed(self, error: str) -> None:
        self.store_error = error

    def store_ok(self) -> None:
        self.store_error = ""

    def problems(self, now: float | None = None) -> list[str]:
        """Empty when healthy; otherwise one line per problem."""
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [
                f"{loop} is {now - deadline:.0f} s overdue"
                for loop, deadline in sorted(self.deadlines.items())
                if now > deadline
            ]
            late += [
                f"thread {thread} restarted {now - at:.0f} s ago after: {why}"
                for thread, (at, why) in sorted(self.crashes.items())
                if now - at < CRASH_SHOWN
            ]
        if self.store_error:
            late.append(f"state store not writable: {self.store_error}")
        return late

    def not_ready(self, now: float | None = None) -> list[str]:
        """Empty when ready: started, healthy, and no event waiting too long for the sink."""
        if not self.ready:
            return ["not ready"]
        now = time.monotonic() if now is None else now
        problems = self.problems(now)
        outbox = self.outbox
        if outbox is None:
            return problems
        stuck = outbox.stuck(now)
        if stuck:
            problems.append(stuck)
        since = outbox.oldest_seen()
        if since is not None and now - since > self.max_outbox_age:
            why = outbox.last_failure
            problems.append(
                f"oldest unpublished event waiting {now - since:.0f} s "
                f"(--ready-max-outbox-age {self.max_outbox_age:g} s): "
                + (f"last publish error: {why}" if why else "the sink has not acknowledged it")
            )
        if outbox.parked:
            problems.append(
                f"{outbox.parked} events parked, refused by the sink for good: "
                "`maintenance-bridge status` says why, `maintenance-bridge redrive` sends them "
                "again"
            )
        return problems
