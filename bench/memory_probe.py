"""What the bridge's memory is made of: RSS and threads after each step a Pub/Sub bridge takes.

    python bench/memory_probe.py TOPIC    # PUBSUB_EMULATOR_HOST set; one JSON line per step

Steps, each on top of the previous one, in one fresh process: the interpreter; the daemon and
everything it imports (what a stdout bridge loads); google-cloud-pubsub imported; the publisher
client created; one publish acknowledged (gRPC channel open, its threads running). bench/run.py
reports the increments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def status() -> dict[str, str]:
    """/proc/self/status: VmRSS in kB, Threads counts gRPC's own threads too."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def step(name: str) -> None:
    now = status()
    rss = int(now["VmRSS"].split()[0]) / 1024
    print(json.dumps({"step": name, "rss_mb": rss, "threads": int(now["Threads"])}), flush=True)


def main() -> int:
    topic = sys.argv[1]
    step("interpreter")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import bridge.daemon
    import bridge.endpoints
    import bridge.hooks
    import bridge.metrics
    import bridge.recorder
    import bridge.relay
    import bridge.status
    import bridge.watcher  # noqa: F401 - the daemon imports these once the watch is armed

    step("the bridge's code and its imports (what a stdout bridge loads)")
    from google.cloud import pubsub_v1

    step("google-cloud-pubsub imported")
    client = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    step("publisher client created")
    client.publish(topic, b"{}", ordering_key="probe").result(timeout=30)
    step("one publish acknowledged (gRPC channel open)")
    client.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
