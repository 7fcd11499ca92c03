"""`maintenance-bridge status`: what a bridge is doing, without touching its state dir.

A running daemon with its HTTP endpoint on is asked over loopback (`/status`): the freshest
answer, and nothing on disk is opened. Otherwise the store is read from a private copy (see
`store.read_status`), so running `status` as root never leaves root-owned files behind that
the daemon's user cannot write.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bridge.store import DB_NAME, read_status

ASK_TIMEOUT = 2.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def status(state_dir: Path, *, as_json: bool) -> int:
    report = read_status(state_dir / DB_NAME)
    recorded = report["daemon"] or {}
    live = _ask(recorded)
    if live is not None:
        report = live
    report["state_dir"] = str(state_dir)
    report["daemon"] = {
        **recorded,
        "running": True if live is not None else _running(recorded),
        "answered": live is not None,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    _print_text(report)
    return 0


def daemon_record(
    *, version: str, sink: str, target: str, started_at: str, endpoint: tuple[str, int] | None
) -> dict[str, Any]:
    """What the daemon writes into its store at start, for `status` to find it."""
    return {
        "pid": os.getpid(),
        "version": version,
        "sink": sink,
        "target": target or None,  # where the sink delivers: a topic, a URL
        "started_at": started_at,
        "stopped_at": None,
        "endpoint": None if endpoint is None else {"host": endpoint[0], "port": endpoint[1]},
    }


def _ask(recorded: dict[str, Any]) -> dict[str, Any] | None:
    """The running daemon's own report, or None when it does not answer as itself."""
    endpoint = recorded.get("endpoint")
    if not endpoint or recorded.get("stopped_at"):
        return None
    host = _WILDCARDS.get(endpoint["host"], endpoint["host"])
    host = f"[{host}]" if ":" in host else host
    try:
        with _OPENER.open(f"http://{host}:{endpoint['port']}/status", timeout=ASK_TIMEOUT) as r:
            answer: dict[str, Any] = json.loads(r.read())
    except (OSError, ValueError):
        return None
    # Another process may hold the port now: only the daemon that wrote the record counts.
    same = (answer.get("daemon") or {}).get("pid") == recorded.get("pid")
    return answer if same else None


def _running(recorded: dict[str, Any]) -> bool | None:
    """From the recorded pid: None when it cannot be told (no record, or Windows)."""
    pid = recorded.get("pid")
    if recorded.get("stopped_at"):
        return False
    if not pid or sys.platform == "win32":  # os.kill(pid, 0) would terminate it there
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _print_text(report: dict[str, Any]) -> None:
    daemon = report["daemon"]
    rows = [("state dir", report["state_dir"]), ("daemon", _describe_daemon(daemon))]
    if daemon.get("version"):
        sink = daemon.get("sink") or "-"
        rows += [
            ("version", daemon["version"]),
            ("sink", f"{sink} {daemon['target']}" if daemon.get("target") else sink),
        ]
    for key, entry in sorted(report["keys"].items()):
        value = entry["value"] or "(nothing scheduled)"
        rows.append((key, f"{value}  since {entry['observed_at']}"))
    age = report["outbox_oldest_age_seconds"]
    publish, error = report["last_publish"], report["last_error"]
    rows += [
        (
            "outbox",
            f"{report['outbox_depth']} waiting"
            + (f", oldest {age:.1f} s" if age is not None else ""),
        ),
        ("parked", _describe_parked(report.get("parked_count", 0))),
        *(
            ("", f"{p['event_id']} {p['kind']} parked {p['parked_at']}: {p['reason'][:100]}")
            for p in report.get("parked", [])
        ),
        ("last publish", f"{publish['at']} {publish['event_id']}" if publish else "-"),
        ("last error", f"{error['at']} {error['message']}" if error else "-"),
        ("next sequence", str(report["next_sequence"])),
    ]
    width = max(len(label) for label, _ in rows) + 2  # one column, whatever the keys
    for label, text in rows:
        print(f"{label:<{width}}{text}")


def _describe_parked(count: int) -> str:
    if not count:
        return "0"
    return f"{count} refused for good by the sink (send again: maintenance-bridge redrive)"


def _describe_daemon(daemon: dict[str, Any]) -> str:
    pid = daemon.get("pid")
    if daemon["answered"]:
        endpoint = daemon["endpoint"]
        return f"running (pid {pid}, answered on {endpoint['host']}:{endpoint['port']})"
    if daemon.get("stopped_at"):
        return f"stopped at {daemon['stopped_at']}"
    running = daemon["running"]
    if running is None:
        return "unknown" if pid else "unknown (no daemon record: written by an older bridge)"
    if running and daemon.get("endpoint"):
        return f"running (pid {pid}; not answering on its endpoint, read from the state dir)"
    return f"running (pid {pid})" if running else f"not running (pid {pid} is gone)"
