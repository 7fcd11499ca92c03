"""The state store and outbox: one SQLite database, one transaction per observed change.

The last seen value of each key and the event it produced are written together before
anything is published, so a crash at any point either loses nothing (the event is in the
outbox, and goes out under its first id after a restart) or never saw the change (the restart
compares the live value with the stored one and records it then).

The layout carries a version (`PRAGMA user_version`): a store from an older bridge is migrated
when opened, and a bridge refuses, with one line, a store written by a newer one rather than
guess at a layout it does not know.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.config import Config, ConfigError
from bridge.events import Event, decode_structured
from bridge.keys import DROPPABLE_KINDS

DB_NAME = "bridge.sqlite3"
SCHEMA_VERSION = 2  # 2: the parked table (dead letters)
PARKED_SHOWN = 20  # parked events listed by `status`, newest first
# The write-ahead log is made this many pages long at start, and copied back to the database
# every CHECKPOINT_EVERY retirements so that it restarts from its head within that length (see
# `Store.reserve_wal`).
WAL_RESERVE_PAGES = 256
CHECKPOINT_EVERY = 16
RESERVE_ROOM = 64 * 1024 * 1024  # free space below which the log is not reserved
_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, observed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    body BLOB NOT NULL, recorded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parked (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    body BLOB NOT NULL, recorded_at REAL NOT NULL, parked_at TEXT NOT NULL,
    status INTEGER, reason TEXT NOT NULL, redrive INTEGER NOT NULL DEFAULT 0);
"""
# Version 0 (before versioning) kept "TIME ID" and "TIME TEXT" in one meta row each.
_SPLIT_V0 = (
    ("last_publish", "last_publish_at", "last_publish_id"),
    ("last_error", "last_error_at", "last_error"),
)


def open_db(path: Path, *, named: Path | None = None, **connect: Any) -> sqlite3.Connection:
    """Connect, refuse a newer layout, create or migrate an older one; one transaction.
    `named`: the path errors name, when `path` is a private copy of it."""
    db = sqlite3.connect(str(path), isolation_level=None, **connect)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"--state-dir: {named or path} has state-store schema {version}, written by a "
                f"newer maintenance-bridge; this one ({__version__}) reads up to {SCHEMA_VERSION}: "
                "run the newer bridge, or move the state dir away to start afresh"
            )
        if version < SCHEMA_VERSION:
            with _Transaction(db):
                for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript commits
                    db.execute(statement)
                if version == 0:
                    _migrate_v0(db)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _migrate_v0(db: sqlite3.Connection) -> None:
    for old, at_name, value_name in _SPLIT_V0:
        row = db.execute("SELECT value FROM meta WHERE name=?", (old,)).fetchone()
        if row is None:
            continue
        at, _, value = row[0].partition(" ")
        db.execute("DELETE FROM meta WHERE name=?", (old,))
        db.executemany(
            "INSERT INTO meta(name, value) VALUES (?, ?)", ((at_name, at), (value_name, value))
        )


@dataclass(frozen=True)
class Snapshot:
    """What a (re)start resumes from."""

    values: dict[str, str]
    next_sequence: int
    pending: list[tuple[int, Event, float]]  # (seq, event, unix time recorded)
    stream_id: str  # made with the store, kept across restarts: see EventData.stream_id


def _in_stream(body: dict[str, Any], stream_id: str) -> Event:
    """A stored event; one recorded by a bridge older than stream_id joins this store's stream
    (it is numbered in it), so that a topic schema requiring the field accepts it."""
    event = decode_structured(body)
    if event.data.stream_id:
        return event
    return replace(event, data=replace(event.data, stream_id=stream_id))


class Store:
    """Thread-safe access to the database; every method is one transaction."""

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = Config.outbox_max_events,
        max_bytes: int = Config.outbox_max_bytes,
    ) -> None:
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = open_db(path, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed notice survives power loss
        # Made once with the store (or on the first open of an older one), never changed after.
        self._db.execute(
            "INSERT OR IGNORE INTO meta(name, value) VALUES ('stream_id', ?)", (str(uuid.uuid4()),)
        )
        # seq -> body size of every outbox row, so that the bound is checked without a scan of
        # the outbox on each record (thousands of rows during a long sink outage).
        self._sizes: dict[int, int] = dict(
            self._db.execute("SELECT seq, LENGTH(body) FROM outbox").fetchall()
        )
        self._bytes = sum(self._sizes.values())
        self._retired = 0  # retirements since the store was opened, for checkpoints

    def reserve_wal(self) -> bool:
        """Make the write-ahead log long enough for the commits between two checkpoints, before
        any is made (the daemon does, once at start); False if it could not.

        A commit that makes the log longer has fdatasync also journal the file's new length: a
        second device flush on the path of every recorded change (0.15-0.25 ms here, a quarter
        of the commit). Pages of a transaction too large for the page cache spill into the log;
        rolled back, they leave it that long with nothing in it. Best effort, and not on a
        filesystem with less than RESERVE_ROOM free: a nearly full disk keeps its room for
        events (a log that stays short only costs that flush)."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            with self._lock:
                page = self._db.execute("PRAGMA page_size").fetchone()[0]
                if wal.exists() and wal.stat().st_size >= WAL_RESERVE_PAGES * (page + 24):
                    return True
                if shutil.disk_usage(self.path.parent).free < RESERVE_ROOM:
                    return False
                (cache,) = self._db.execute("PRAGMA cache_size").fetchone()
                self._db.execute("PRAGMA cache_size=16")
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.execute("CREATE TABLE wal_reserve (b BLOB)")
                    blobs = [(page - 100,)] * (WAL_RESERVE_PAGES + 64)  # some stay in the cache
                    self._db.executemany("INSERT INTO wal_reserve VALUES (zeroblob(?))", blobs)
                finally:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self._db.execute(f"PRAGMA cache_size={int(cache)}")
            fd = os.open(wal, os.O_RDONLY)  # the new length journalled now, not by a commit
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (sqlite3.Error, OSError):
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self) -> Snapshot:
        self.take_redrives()  # asked for while no daemon ran: they go out with the rest
        with self._lock:
            values = dict(self._db.execute("SELECT key, value FROM state").fetchall())
            row = self._db.execute("SELECT value FROM meta WHERE name='next_sequence'").fetchone()
            (stream,) = self._db.execute("SELECT value FROM meta WHERE name='stream_id'").fetchone()
            rows = self._db.execute(
                "SELECT seq, body, recorded_at FROM outbox ORDER BY seq"
            ).fetchall()
        pending = [(seq, _in_stream(json.loads(body), stream), at) for seq, body, at in rows]
        return Snapshot(values, int(row[0]) if row else 1, pending, stream)

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
            seq, body = event.data.sequence, event.structured
            self._db.execute(
                "INSERT INTO outbox(seq, id, kind, body, recorded_at) VALUES (?, ?, ?, ?, ?)",
                (seq, event.id, event.kind, body, time.time()),
            )
            self._set(("next_sequence", str(seq + 1)))
            dropped = self._enforce_bound(len(self._sizes) + 1, self._bytes + len(body))
        self._counted(added={seq: len(body)}, removed=dropped)
        return dropped

    def ack(self, seq: int, event_id: str, published_at: str, *, clear_error: bool = False) -> None:
        """The sink has the event: it leaves the outbox (and, after a failure, the last error
        is history, not a current problem: cleared in the same transaction).

        Not synced to disk on its own (the next recorded event's commit syncs it): an ack lost
        to a power cut only sends the event again, under its own id."""
        with self._lock:
            self._retired += 1
            if self._retired % CHECKPOINT_EVERY == 0:
                # Off the path of a change, and before this commit, which then restarts the log
                # from its head (a commit with its own sync would sync the new log header too).
                # Best effort: SQLite checkpoints on its own too (every 1000 pages).
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            with self._transaction(durable=False):
                self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
                self._set(("last_publish_at", published_at), ("last_publish_id", event_id))
                if clear_error:
                    self._db.execute(
                        "DELETE FROM meta WHERE name IN ('last_error', 'last_error_at')"
                    )
            self._counted(removed=[seq])

    def forget(self, seqs: list[int]) -> None:
        """These events leave the outbox unpublished (stale heartbeats, coalesced); not synced
        on its own: lost to a power cut, they are coalesced again."""
        if not seqs:
            return
        with self._lock:
            with self._transaction(durable=False):
                self._db.executemany("DELETE FROM outbox WHERE seq=?", [(seq,) for seq in seqs])
            self._counted(removed=seqs)

    def rewrite(
        self,
        events: list[Event],
        states: list[tuple[str, str, str]],
        next_sequence: int,
    ) -> None:
        """What was published from memory while the store could not be written, written now:
        the keys' values (`states`: key, value, observed_at), the events still waiting under
        their own seq and id, and the sequence counter; one transaction."""
        with self._lock, self._transaction():
            if states:
                self._db.executemany(
                    "INSERT INTO state(key, value, observed_at) VALUES (?, ?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value=excluded.value, observed_at=excluded.observed_at",
                    states,
                )
            now = time.time()
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox(seq, id, kind, body, recorded_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(e.data.sequence, e.id, e.kind, e.structured, now) for e in events],
            )
            self._db.execute(
                "INSERT INTO meta(name, value) VALUES ('next_sequence', ?) ON CONFLICT(name) "
                "DO UPDATE SET value=MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (str(next_sequence),),
            )
        self._counted(added={e.data.sequence: len(e.structured) for e in events})

    def park(self, seq: int, status: int | None, reason: str, at: str) -> None:
        """The sink refused the event for good: out of the outbox, into the parked table (one
        transaction), so that the queue goes on and `redrive` can send it again later. Not
        synced on its own, like `ack`: lost to a power cut, the event is sent and parked again."""
        with self._lock:
            with self._transaction(durable=False):
                self._db.execute(
                    "INSERT OR REPLACE INTO parked(seq, id, kind, body, recorded_at, parked_at, "
                    "status, reason) SELECT seq, id, kind, body, recorded_at, ?, ?, ? FROM outbox "
                    "WHERE seq=?",
                    (at, status, reason, seq),
                )
                self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            self._counted(removed=[seq])

    def request_redrive(self, ids: list[str] | None = None) -> list[str]:
        """Mark parked events (all, or those ids) to go back into the outbox; returns the ids
        marked. The daemon owns the outbox's order and its in-memory queue: it moves them
        (`take_redrives`) within a second, or at its next start."""
        with self._lock, self._transaction():
            if ids is None:
                rows = self._db.execute("SELECT id FROM parked ORDER BY seq").fetchall()
            else:
                marks = ",".join("?" * len(ids))
                rows = self._db.execute(
                    f"SELECT id FROM parked WHERE id IN ({marks}) ORDER BY seq", ids
                ).fetchall()
            marked = [row[0] for row in rows]
            self._db.executemany("UPDATE parked SET redrive=1 WHERE id=?", rows)
            return marked

    def take_redrives(self) -> list[tuple[int, Event, float]]:
        """Move the parked events marked for redrive back into the outbox, under their own
        seq and id; returns them as `Snapshot.pending` entries (their wait counts from now)."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM parked WHERE redrive=1 LIMIT 1").fetchone() is None:
                return []
            now = time.time()
            with self._transaction():
                rows = self._db.execute(
                    "SELECT seq, body FROM parked WHERE redrive=1 ORDER BY seq"
                ).fetchall()
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox(seq, id, kind, body, recorded_at) "
                    "SELECT seq, id, kind, body, ? FROM parked WHERE redrive=1",
                    (now,),
                )
                self._db.execute("DELETE FROM parked WHERE redrive=1")
                (stream,) = self._db.execute(
                    "SELECT value FROM meta WHERE name='stream_id'"
                ).fetchone()
            self._counted(added={seq: len(body) for seq, body in rows})
        return [(seq, _in_stream(json.loads(body), stream), now) for seq, body in rows]

    def parked_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM parked").fetchone()[0])

    def note_error(self, text: str, at: str) -> None:
        with self._lock, self._transaction():
            self._set(("last_error_at", at), ("last_error", text))

    def note_daemon(self, daemon: dict[str, Any]) -> None:
        """Who runs on this state dir (pid, version, sink, endpoint), for `status`; not synced
        on its own (bookkeeping: a start or a stop need not wait for the disk)."""
        with self._lock, self._transaction(durable=False):
            self._set(("daemon", json.dumps(daemon)))

    def report(self) -> dict[str, Any]:
        """What `status` shows, from the daemon's own connection."""
        with self._lock:
            return _report(self._db)

    def _enforce_bound(self, count: int, size: int) -> list[int]:
        """Drop what may be dropped, oldest first, while the outbox (`count` rows, `size`
        bytes with the row just written) is over its bound; returns the seqs dropped."""
        if count <= self.max_events and size <= self.max_bytes:
            return []
        dropped: list[int] = []
        rows = self._db.execute("SELECT seq, kind, LENGTH(body) FROM outbox ORDER BY seq")
        for seq, kind, length in rows:
            if count <= self.max_events and size <= self.max_bytes:
                break
            # A notice is never dropped: the bound is exceeded rather than lose one.
            if kind in DROPPABLE_KINDS:
                self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
                dropped.append(seq)
                count -= 1
                size -= length
        return dropped

    def _counted(self, *, added: dict[int, int] | None = None, removed: Iterable[int] = ()) -> None:
        """Keep `_sizes` in step with the outbox, after a commit."""
        for seq, size in (added or {}).items():
            self._bytes += size - self._sizes.get(seq, 0)
            self._sizes[seq] = size
        for seq in removed:
            self._bytes -= self._sizes.pop(seq, 0)

    def _set(self, *pairs: tuple[str, str]) -> None:
        """Upsert meta rows (name, value), in one statement."""
        self._db.execute(
            "INSERT INTO meta(name, value) VALUES "
            + ", ".join(["(?, ?)"] * len(pairs))
            + " ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            [part for pair in pairs for part in pair],
        )

    def _transaction(self, *, durable: bool = True) -> _Transaction:
        return _Transaction(self._db, durable=durable)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. Not `durable`: committed without
    its own fsync (WAL, synchronous=NORMAL); the next durable commit syncs it with its own."""

    def __init__(self, db: sqlite3.Connection, *, durable: bool = True) -> None:
        self.db = db
        self.durable = durable

    def __enter__(self) -> None:
        if not self.durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:  # no __exit__ follows: FULL again here, or it sticks
            if not self.durable:
                self.db.execute("PRAGMA synchronous=FULL")
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
            elif self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=FULL")


def read_status(path: Path) -> dict[str, Any]:
    """What `status` shows, read from a private copy: never a byte written to the state dir.

    Opening the store itself, even read-only, can create `-wal`/`-shm` files owned by whoever
    runs `status` (root, typically), which the daemon's user then cannot write. The copy takes
    the database and its write-ahead log, so committed transactions not yet checkpointed are
    seen too; a copy torn by a daemon writing at that moment fails to open and is taken again.
    """
    if not path.exists():
        raise ConfigError(f"--state-dir: no bridge state in {path.parent} (has the bridge run?)")
    attempt = 1
    while True:
        try:
            return _read_copy(path)
        except OSError as exc:
            raise ConfigError(
                f"--state-dir: cannot read {path} ({exc.strerror or exc}): run as the bridge's "
                "user or root"
            ) from None
        except sqlite3.DatabaseError:
            if attempt == 3:
                raise
            attempt += 1
            time.sleep(0.05)


def _read_copy(path: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bridge-status-") as scratch:
        copy = Path(scratch) / DB_NAME
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        db = open_db(copy, named=path)
        try:
            return _report(db)
        finally:
            db.close()


def _report(db: sqlite3.Connection) -> dict[str, Any]:
    keys = {
        key: {"value": value, "observed_at": at}
        for key, value, at in db.execute("SELECT key, value, observed_at FROM state ORDER BY key")
    }
    depth, oldest = db.execute("SELECT COUNT(*), MIN(recorded_at) FROM outbox").fetchone()
    meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    return {
        "schema_version": db.execute("PRAGMA user_version").fetchone()[0],
        "daemon": json.loads(meta["daemon"]) if "daemon" in meta else None,
        "keys": keys,
        "outbox_depth": depth,
        # Wall-clock stamps: after a clock step back the age would be negative, not news.
        "outbox_oldest_age_seconds": round(max(0.0, time.time() - oldest), 3) if oldest else None,
        "last_publish": (
            {"at": meta["last_publish_at"], "event_id": meta["last_publish_id"]}
            if "last_publish_id" in meta
            else None
        ),
        "last_error": (
            {"at": meta["last_error_at"], "message": meta["last_error"]}
            if "last_error" in meta
            else None
        ),
        "next_sequence": int(meta.get("next_sequence", "1")),
        "parked_count": db.execute("SELECT COUNT(*) FROM parked").fetchone()[0],
        "parked": [
            {"event_id": i, "kind": k, "parked_at": at, "status": st, "reason": why}
            for i, k, at, st, why in db.execute(
                "SELECT id, kind, parked_at, status, reason FROM parked ORDER BY seq DESC LIMIT ?",
                (PARKED_SHOWN,),
            )
        ],
    }
