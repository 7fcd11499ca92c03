"""A store whose disk is full for one of its methods: the fault a test names, not a real disk.

The disk-full tests that fill a real filesystem (test_faults) cannot choose which write meets
the full disk; these choose it, so the window they test is hit every run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from bridge.store import Store


class FullDisk(Store):
    """`method` raises SQLite's own "database or disk is full" on its first `times` calls
    (every call when `times` is None), then works again, as a freed disk does."""

    def __init__(self, path: Path, method: str, times: int | None = None) -> None:
        super().__init__(path)
        self.refusals = 0
        works = getattr(self, method)

        def refusing(*args: Any, **kwargs: Any) -> Any:
            if times is None or self.refusals < times:
                self.refusals += 1
                raise sqlite3.OperationalError("database or disk is full")
            return works(*args, **kwargs)

        setattr(self, method, refusing)
