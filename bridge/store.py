"""The state store and outbox: one SQLite database, one transaction per observed change.

The last seen value of each key and the event it produced are written together before
anything is published, so a crash at any point either loses nothing (the event is in the
outbox, and goes out under its first id after a restart) or never saw the change (the restart
compares the live value with the stored one and records it then).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.events import Event, decode_structured, dumps

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, observed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    body BLOB NOT NULL, recorded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# When the outbox is over its bound, these kinds go first, oldest first; a maintenance or
# preemption notice is never dropped (the bound is then exceeded rather than lose one).
DROPPABLE_PREFIXES = ("bridge.", "upcoming.")


@dataclass(frozen=True)
class Snapshot:
    """What a (re)start resumes from."""

    values: dict[str, str]
    next_sequence: int
    pending: list[tuple[int, Event, float]]  # (seq, event, unix time recorded)


class Store:
    """Thread-safe access to the database; every method is one transaction."""

    def __init__(self, path: Path, *, max_events: int = 10000, max_bytes: int = 16 << 20) -> None:
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=5.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed notice survives power loss
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self) -> Snapshot:
        with self._lock:
            values = dict(self._db.execute("SELECT key, value FROM state").fetchall())
            row = self._db.execute("SELECT value FROM meta WHERE name='next_sequence'").fetchone()
            rows = self._db.execute(
                "SELECT seq, body, recorded_at FROM outbox ORDER BY seq"
            ).fetchall()
        pending = [(seq, decode_structured(json.loads(body)), at) for seq, body, at in rows]
        return Snapshot(values, int(row[0]) if row else 1, pending)

    def record(self, event: Event | None, state: tuple[str, str, str] | None = None) -> list[int]:
        """Store a key's new value (`state`: key, value, observed_at) and, in the same
        transaction, its event; returns the outbox seqs dropped to keep within the bound."""
        with self._lock, self._transaction():
            if state is not None:
                self._db.execute(
                    "INSERT INTO state(key, value, observed_at) VALUES (?, ?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value=excluded.value, observed_at=excluded.observed_at",
                    state,
                )
            if event is None:
                return []
            seq = event.data.sequence
            self._db.execute(
                "INSERT INTO outbox(seq, id, kind, body, recorded_at) VALUES (?, ?, ?, ?, ?)",
                (seq, event.id, event.kind, dumps(event.to_structured()), time.time()),
            )
            self._set("next_sequence", str(seq + 1))
            return self._enforce_bound()

    def ack(self, seq: int, event_id: str, published_at: str) -> None:
        """The sink has the event: it leaves the outbox."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            self._set("last_publish", f"{published_at} {event_id}")

    def note_error(self, text: str, at: str) -> None:
        with self._lock, self._transaction():
            self._set("last_error", f"{at} {text}")

    def _enforce_bound(self) -> list[int]:
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox"
        ).fetchone()
        if count <= self.max_events and size <= self.max_bytes:
            return []
        dropped: list[int] = []
        rows = self._db.execute("SELECT seq, kind, LENGTH(body) FROM outbox ORDER BY seq")
        for seq, kind, length in rows:
            if count <= self.max_events and size <= self.max_bytes:
                break
            if kind.startswith(DROPPABLE_PREFIXES):
                self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
                dropped.append(seq)
                count -= 1
                size -= length
        return dropped

    def _set(self, name: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")


def read_status(path: Path) -> dict[str, Any]:
    """What `maintenance-bridge status` shows, read-only (safe while the daemon runs)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        keys = {
            key: {"value": value, "observed_at": at}
            for key, value, at in db.execute("SELECT key, value, observed_at FROM state")
        }
        depth, oldest = db.execute("SELECT COUNT(*), MIN(recorded_at) FROM outbox").fetchone()
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    finally:
        db.close()
    return {
        "keys": keys,
        "outbox_depth": depth,
        "outbox_oldest_age_seconds": round(time.time() - oldest, 3) if oldest else None,
        "last_publish": meta.get("last_publish"),
        "last_error": meta.get("last_error"),
        "next_sequence": int(meta.get("next_sequence", "1")),
    }
