"""Liveness and readiness, from promises the loops make before they block.

Each watcher says how long its next blocking step may take at most (`expect`); a loop that
overruns its own promise is stuck, whatever the reason. The store reports its last write.
Readiness adds what liveness cannot see: loops that all keep their promises while nothing
gets out (a deleted topic, a revoked role), told by the age of the oldest unpublished event.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

GRACE_SECONDS = 15.0


class Outbox(Protocol):
    """The relay, as readiness sees it."""

    last_failure: str  # why the last publish failed, "" once the sink accepts again

    def oldest_seen(self) -> float | None:
        """Monotonic time the oldest waiting event entered the outbox; None when empty."""


@dataclass
class Health:
    """Shared by the watchers, the recorder and the HTTP endpoint."""

    deadlines: dict[str, float] = field(default_factory=dict)
    store_error: str = ""
    ready: bool = False
    outbox: Outbox | None = None
    max_outbox_age: float = 30.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def expect(self, loop: str, seconds: float) -> None:
        """`loop` will be back within `seconds` (plus grace), or it is stuck."""
        with self._lock:
            self.deadlines[loop] = time.monotonic() + seconds + GRACE_SECONDS

    def done(self, loop: str) -> None:
        """`loop` has finished for good: nothing more to promise."""
        with self._lock:
            self.deadlines.pop(loop, None)

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
        since = outbox.oldest_seen() if outbox is not None else None
        if outbox is not None and since is not None and now - since > self.max_outbox_age:
            why = outbox.last_failure
            problems.append(
                f"oldest unpublished event waiting {now - since:.0f} s "
                f"(--ready-max-outbox-age {self.max_outbox_age:g} s): "
                + (f"last publish error: {why}" if why else "the sink has not acknowledged it")
            )
        return problems
