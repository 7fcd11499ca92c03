"""A streaming-pull subscriber that stamps each delivered event: the fleet's far end.

Usage: subscriber.py SUBSCRIPTION_PATH [--pull] (PUBSUB_EMULATOR_HOST selects the emulator;
--pull uses synchronous Pull, for the in-repo fake, which has no StreamingPull). Prints one
JSON line per message, `{"instance", "seq", "current", "id", "t"}`, `t` being
`time.monotonic()` at the callback (CLOCK_MONOTONIC: comparable across processes on Linux),
and acknowledges it. Prints `{"ready": true}` once subscribed.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.cloud import pubsub_v1

from bridge.events import DecodeError, decode_pubsub

_lock = threading.Lock()


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record) + "\n"
    with _lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def stamp(attributes: Any, data: bytes, t: float) -> None:
    try:
        event = decode_pubsub(dict(attributes), data)
    except DecodeError as exc:
        emit({"error": str(exc), "t": t})
    else:
        emit(
            {
                "instance": event.extensions.get("instanceid", ""),
                "seq": event.data.sequence,
                "current": event.data.current,
                "id": event.id,
                "t": t,
            }
        )


def pull_loop(client: Any, subscription: str, stop: threading.Event) -> int:
    emit({"ready": True})
    while not stop.is_set():
        try:
            resp = client.pull(subscription=subscription, max_messages=100, timeout=3.0)
        except Exception:  # DeadlineExceeded on an empty pull, or the server going away
            continue
        t = time.monotonic()
        for received in resp.received_messages:
            stamp(received.message.attributes, received.message.data, t)
        if resp.received_messages:
            ack_ids = [r.ack_id for r in resp.received_messages]
            client.acknowledge(subscription=subscription, ack_ids=ack_ids)
    return 0


def main() -> int:
    subscription = sys.argv[1]
    client = pubsub_v1.SubscriberClient()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if "--pull" in sys.argv[2:]:
        return pull_loop(client, subscription, stop)

    def callback(message: Any) -> None:
        stamp(message.attributes, message.data, time.monotonic())
        message.ack()

    future = client.subscribe(
        subscription,
        callback,
        flow_control=pubsub_v1.types.FlowControl(max_messages=1000),
    )
    emit({"ready": True})
    try:
        while not stop.wait(0.5):
            if future.done():
                future.result()  # raises what ended the stream
                return 1
    finally:
        future.cancel()
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
