"""What the bridge's memory is made of: RSS and threads after each step a Pub/Sub bridge takes.

    python bench/memory_probe.py TOPIC [--transport rest|grpc]   # PUBSUB_EMULATOR_HOST set

One JSON line per step, `{"transport", "step", "rss_mb", "threads"}`. Without --transport, both
are probed, each in a fresh process of its own (a library once imported cannot be unloaded):
the default REST path first, then gRPC. Steps, each on top of the previous one: the
interpreter; the daemon and everything it imports (what a stdout bridge loads); then the sink
as `maintenance-bridge run --topic` builds it (bridge.config from the command line,
`make_sink`, `connect`) and one event sent through it and acknowledged. On gRPC the import of
google-cloud-pubsub and the client's creation are steps of their own, since they are what the
REST transport saves. bench/run.py reports the increments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

TRANSPORTS = ("rest", "grpc")


def status() -> dict[str, str]:
    """/proc/self/status: VmRSS in kB, Threads counts the transport's own threads too."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def step(transport: str, name: str) -> None:
    now = status()
    rss = int(now["VmRSS"].split()[0]) / 1024
    record = {"transport": transport, "step": name, "rss_mb": rss, "threads": int(now["Threads"])}
    print(json.dumps(record), flush=True)


def probe(topic: str, transport: str) -> None:
    step(transport, "interpreter")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import bridge.daemon
    import bridge.endpoints
    import bridge.hooks
    import bridge.metrics
    import bridge.recorder
    import bridge.relay
    import bridge.status
    import bridge.watcher  # noqa: F401 - the daemon imports these once the watch is armed
    from bridge.cli import parser
    from bridge.config import build
    from bridge.events import MAINTENANCE, Instance, Scheduling, Transition, build_event
    from bridge.sinks import make_sink

    step(transport, "the bridge's code and its imports (what a stdout bridge loads)")
    if transport == "grpc":
        from google.cloud import pubsub_v1  # noqa: F401 - the step measures the import

        step(transport, "google-cloud-pubsub imported")
    args = parser().parse_args(["run", "--topic", topic, "--pubsub-transport", transport])
    sink = make_sink(build(args, dict(os.environ), check_dirs=False))
    sink.connect()
    step(transport, "the sink connected (gRPC: the publisher client created)")
    event = build_event(
        Transition(MAINTENANCE, "NONE", "MIGRATE", "maintenance.started"),
        event_id="00000000-0000-4000-8000-000000000001",
        sequence=1,
        observed_at=datetime.now(timezone.utc),
        instance=Instance("4520031799277500001", "probe-vm", "us-central1-a", "p-probe", "1"),
        scheduling=Scheduling("MIGRATE", "TRUE", "FALSE", "STANDARD"),
        happened_while_down=False,
        notice_seconds=60,
    )
    sink.send(event).result(timeout=30)
    step(transport, "one event published and acknowledged (the connection or channel open)")
    sink.close()


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("topic")
    cli.add_argument("--transport", choices=TRANSPORTS)
    args = cli.parse_args()
    if args.transport:
        probe(args.topic, args.transport)
        return 0
    for transport in TRANSPORTS:  # each in a fresh process: nothing of the other loaded
        command = [sys.executable, __file__, args.topic, "--transport", transport]
        subprocess.run(command, check=True, timeout=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
