"""Say it once per outage: every loop that retries logs each failure class once and the
recovery once, then counts silently (the metrics count every attempt).

A loop that fails every 50 ms for an hour would otherwise write 72,000 lines that say nothing
new and bury the one that does.
"""

from __future__ import annotations

import logging


class Outage:
    """One loop's failures since it last succeeded. `recovery` is the start of the line logged
    when it succeeds again (" after N failed attempts" is appended); None: recover silently."""

    def __init__(
        self, log: logging.Logger, recovery: str | None = None, level: int = logging.WARNING
    ) -> None:
        self.log = log
        self.recovery = recovery
        self.level = level
        self.failures = 0
        self.told: set[str] = set()  # the failure classes logged in this outage

    def failed(self, cls: str, message: str, *args: object, news: bool = True) -> bool:
        """Count a failure; log `message % args` if `cls` is new in this outage (and `news`).
        True when it logged."""
        self.failures += 1
        if not news or cls in self.told:
            return False
        self.told.add(cls)
        self.log.log(self.level, message, *args)
        return True

    def recovered(self) -> int:
        """End the outage, if any: the recovery line once. Returns how many attempts failed."""
        failures, self.failures = self.failures, 0
        self.told.clear()
        if failures and self.recovery is not None:
            self.log.info("%s after %d failed attempts", self.recovery, failures)
        return failures
