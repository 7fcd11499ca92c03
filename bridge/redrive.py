"""`maintenance-bridge redrive`: send parked events again, under their own ids.

The daemon owns the outbox and its in-memory queue, so redrive does not touch them: it marks
parked events in the store (one transaction, safe while the daemon runs), and the daemon moves
them back into the outbox and sends them within a second, or at its next start if it is not
running. The store is written as the state dir's owner: files SQLite creates beside it
(`-wal`, `-shm`) must stay writable by the daemon's user.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bridge.options import ConfigError
from bridge.store import DB_NAME, Store


def redrive(state_dir: Path, ids: list[str] | None) -> int:
    """Exit code 0 when every asked id was parked (and is now marked), 1 otherwise."""
    path = state_dir / DB_NAME
    if not path.exists():
        raise ConfigError(f"--state-dir: no bridge state in {state_dir} (has the bridge run?)")
    _become_owner(path)
    store = Store(path)
    try:
        marked = store.request_redrive(ids)
    finally:
        store.close()
    for event_id in marked:
        print(f"redrive {event_id}")
    missing = [i for i in ids or () if i not in marked]
    if missing:
        print(f"not parked: {', '.join(missing)}", file=sys.stderr)
    if marked:
        print(
            f"{len(marked)} parked events go back to the outbox: a running bridge sends them "
            "within a second, a stopped one when it starts",
            file=sys.stderr,
        )
    elif not missing:
        print("nothing is parked", file=sys.stderr)
    return 1 if missing else 0


def _become_owner(path: Path) -> None:
    """Run as the store's owner: root switches to it, another user is refused."""
    if sys.platform == "win32":
        return
    owner = path.stat()
    if os.geteuid() == owner.st_uid:
        return
    if os.geteuid() != 0:
        raise ConfigError(
            f"--state-dir: {path} belongs to uid {owner.st_uid}: run redrive as the bridge's "
            "user or root"
        )
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)
