"""`maintenance-bridge demo`: the simulator, the bridge and a scenario in one process.

Offline by default (stdout sink). With `PUBSUB_EMULATOR_HOST` set it publishes to that
emulator (creating a topic and an ordered subscription) and reads the events back.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bridge.config import Config
from bridge.events import Event
from bridge.keys import MAINTENANCE, PREEMPTED, UPCOMING
from bridge.listen import describe
from bridge.logs import configure
from bridge.simulator import Simulator, Step, sample_window
from bridge.sinks import Sink, StdoutSink, make_sink

# A week of a VM's life in a few seconds: a window announced, a live migration, a GPU-style
# stop notice, the window withdrawn, and finally a Spot preemption.
STEPS = (
    Step(0.5, UPCOMING, sample_window()),
    Step(1.0, MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE"),
    Step(2.5, MAINTENANCE, "NONE"),
    Step(3.0, MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE"),
    Step(4.0, MAINTENANCE, "NONE"),
    Step(4.5, UPCOMING, None),
    Step(5.0, PREEMPTED, "TRUE"),
)
DEMO_TOPIC = "projects/demo-project/topics/maintenance-demo"


class _Printing:
    """Wraps the real sink and prints each event once it is acknowledged."""

    def __init__(self, inner: Sink, as_json: bool, started: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.as_json = as_json
        self.started = started
        self.count = 0

    def send(self, event: Event) -> Any:
        future = self.inner.send(event)
        future.add_done_callback(lambda f: self._show(event, f))
        return future

    def _show(self, event: Event, future: Future[Any]) -> None:
        if future.exception() is None and not self.as_json:
            print(f"[+{time.monotonic() - self.started:5.2f}s] {describe(event)}", flush=True)
        self.count += 1

    def recover(self, event: Event) -> None:
        self.inner.recover(event)

    def close(self) -> None:
        self.inner.close()


def demo(*, speed: float, as_json: bool, environ: Mapping[str, str]) -> int:
    from bridge.daemon import run

    configure("text", "WARNING")
    emulator = environ.get("PUBSUB_EMULATOR_HOST")
    with Simulator() as sim, tempfile.TemporaryDirectory(prefix="bridge-demo-") as state:
        sim.start()
        config = Config(
            metadata_url=sim.url,
            state_dir=Path(state),
            sink="pubsub" if emulator else "stdout",
            topic=DEMO_TOPIC if emulator else "",
            pubsub_emulator_host=emulator or "",
            absent_interval=0.2,  # the simulator's upcoming key starts empty (503)
        )
        subscription = _prepare_emulator() if emulator else None
        where = f"Pub/Sub emulator at {emulator}" if emulator else "stdout"
        print(f"demo: simulator on {sim.host_port}, bridge publishing to {where}", flush=True)
        started = time.monotonic()
        inner: Sink = (
            make_sink(config) if emulator else StdoutSink(sys.stdout if as_json else io.StringIO())
        )
        sink = _Printing(inner, as_json, started)
        stop = threading.Event()
        bridge = threading.Thread(
            target=run, args=(config, stop), kwargs={"sink": sink}, daemon=True
        )
        bridge.start()
        sim.play(STEPS, speed=speed)
        deadline = time.monotonic() + 10
        while sink.count < len(STEPS) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        bridge.join(timeout=10)
        ok = sink.count == len(STEPS)
        if subscription:
            ok = _read_back(subscription, len(STEPS)) and ok
        print(
            f"demo: {sink.count} events in {time.monotonic() - started:.1f} s "
            f"({'as expected' if ok else f'expected {len(STEPS)}'})",
            flush=True,
        )
        return 0 if ok else 1


def _prepare_emulator() -> str:
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    subscription = DEMO_TOPIC.replace("/topics/", "/subscriptions/") + "-sub"
    with contextlib.suppress(exceptions.AlreadyExists):
        publisher.create_topic(name=DEMO_TOPIC)
    with contextlib.suppress(exceptions.NotFound):
        subscriber.delete_subscription(subscription=subscription)
    subscriber.create_subscription(
        request={
            "name": subscription,
            "topic": DEMO_TOPIC,
            "ack_deadline_seconds": 10,
            "enable_message_ordering": True,
        }
    )
    subscriber.close()
    return subscription


def _read_back(subscription: str, expected: int) -> bool:
    from bridge.listen import pull

    print(f"demo: reading {subscription} back:", flush=True)
    return pull(subscription, count=expected, timeout=10, as_json=False, ack=True) == expected
