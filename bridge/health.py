"""Liveness and readiness, from promises the loops make before they block.

Each watcher says how long its next blocking step may take at most (`expect`); a loop that
overruns its own promise is stuck, whatever the reason. The store reports its last write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

GRACE_SECONDS = 15.0


@dataclass
class Health:
    """Shared by the watchers, the recorder and the HTTP endpoint."""

    deadlines: dict[str, float] = field(default_factory=dict)
    store_error: str = ""
    ready: bool = False
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
