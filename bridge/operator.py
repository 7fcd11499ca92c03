"""Operator commands: `status` (what a bridge's state dir says) and `listen` (a subscription)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bridge.config import ConfigError
from bridge.events import DecodeError, Event, decode_pubsub


def status(state_dir: Path, *, as_json: bool) -> int:
    from bridge.store import read_status

    db = state_dir / "bridge.sqlite3"
    if not db.exists():
        raise ConfigError(f"--state-dir: no bridge state in {state_dir} (has the bridge run?)")
    report = read_status(db)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [("state dir", str(state_dir))]
    for key, entry in sorted(report["keys"].items()):
        value = entry["value"] or "(nothing scheduled)"
        rows.append((key, f"{value}  since {entry['observed_at']}"))
    age = report["outbox_oldest_age_seconds"]
    rows += [
        (
            "outbox",
            f"{report['outbox_depth']} waiting"
            + (f", oldest {age:.1f} s" if age is not None else ""),
        ),
        ("last publish", report["last_publish"] or "-"),
        ("last error", report["last_error"] or "-"),
        ("next sequence", str(report["next_sequence"])),
    ]
    width = max(len(label) for label, _ in rows) + 2  # one column, whatever the keys
    for label, text in rows:
        print(f"{label:<{width}}{text}")
    return 0


def describe(event: Event) -> str:
    """One readable line per event."""
    data = event.data
    notice = f" notice {data.notice_seconds}s" if data.notice_seconds is not None else ""
    down = " (happened while the bridge was down)" if data.happened_while_down else ""
    change = f"{data.previous or '(nothing)'} -> {data.current or '(nothing)'}"
    if data.upcoming is not None:
        up = data.upcoming
        change = (
            f"{up.type} {up.maintenance_status} window {up.window_start_time} .. "
            f"{up.window_end_time}"
        )
    if event.kind == "bridge.heartbeat":
        change = "alive"
    return (
        f"{event.time}  {event.kind:<20} {data.instance.name} ({data.instance.zone})  "
        f"{change}{notice}  seq={data.sequence} id={event.id}{down}"
    )


def listen(subscription: str, *, count: int, timeout: float, as_json: bool) -> int:
    """`maintenance-bridge listen`: the exit code."""
    pull(subscription, count=count, timeout=timeout, as_json=as_json)
    return 0


def pull(subscription: str, *, count: int, timeout: float, as_json: bool) -> int:
    """Pull, decode (both content modes), print and acknowledge; returns how many."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    seen = 0
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while (not count or seen < count) and (deadline is None or time.monotonic() < deadline):
            # Never pull more than --count still wants (the rest would be acknowledged unseen),
            # nor wait past --timeout (a quiet subscription holds a pull for its whole timeout).
            wanted = min(10, count - seen) if count else 10
            wait = 10.0 if deadline is None else min(10.0, deadline - time.monotonic())
            try:
                response = client.pull(
                    request={"subscription": subscription, "max_messages": wanted},
                    timeout=max(0.1, wait),
                )
            except exceptions.DeadlineExceeded:
                continue
            except exceptions.NotFound:
                raise ConfigError(f"--subscription: {subscription} does not exist") from None
            if not response.received_messages:  # an early empty answer: pause, do not spin
                left = 0.2 if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(0.2, left)))
                continue
            ack_ids = []
            for received in response.received_messages:
                message = received.message
                ack_ids.append(received.ack_id)
                seen += 1
                _show(dict(message.attributes), bytes(message.data), message.ordering_key, as_json)
            if ack_ids:
                client.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids})
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return seen


def _show(attributes: dict[str, str], data: bytes, ordering_key: str, as_json: bool) -> None:
    try:
        event = decode_pubsub(attributes, data)
    except DecodeError as exc:
        print(f"not a maintenance-bridge event ({exc}); acknowledged", file=sys.stderr)
        return
    if as_json:
        out: dict[str, Any] = event.to_structured()
        out["orderingkey"] = ordering_key
        print(json.dumps(out, ensure_ascii=False), flush=True)
    else:
        print(describe(event), flush=True)
