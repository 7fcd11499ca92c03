"""Profile the bridge's hot path in-process: where its CPU goes, per event.

    .venv/bin/python bench/profile_hot_path.py [--events 300] [--rate 50] [--top 25]

Runs `bridge.daemon.run` in this process against a simulator in a separate process
(bench/simhost.py, so that the simulator's threads are not profiled), with the stdout sink
writing to /dev/null, and profiles every watcher thread and the relay thread with cProfile on
thread CPU time. Prints CPU per event and the functions that cost most, by own time and by
cumulative time within bridge/. This is the tool behind "remove what does not need to be
there"; bench/run.py's breakdown phase measures the same path in wall-clock stages.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bridge import daemon, relay, watcher  # noqa: E402
from bridge.config import Config  # noqa: E402
from bridge.logs import configure  # noqa: E402
from bridge.sinks import StdoutSink  # noqa: E402

_profiles: list[cProfile.Profile] = []


def _profiled(cls: type, name: str) -> None:
    original = getattr(cls, name)

    def run(self: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        _profiles.append(profile)
        profile.runcall(original, self)

    setattr(cls, name, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="changes per second")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    host = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "simhost.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert host.stdin is not None and host.stdout is not None

    def call(**cmd: Any) -> dict[str, Any]:
        assert host.stdin is not None and host.stdout is not None
        host.stdin.write(json.dumps(cmd) + "\n")
        host.stdin.flush()
        return json.loads(host.stdout.readline())

    state = tempfile.TemporaryDirectory(prefix="mb-profile-")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run
    try:
        (_, host_port), *_ = call(op="add", ids=[1])["vms"]
        configure("json", "INFO")
        logging.getLogger().handlers[0].setStream(devnull)  # type: ignore[attr-defined]
        _profiled(watcher.Watcher, "_run")
        _profiled(relay.Relay, "_run")
        config = Config(
            metadata_url=f"http://{host_port}/computeMetadata/v1/", state_dir=Path(state.name)
        )
        stop = threading.Event()
        thread = threading.Thread(
            target=daemon.run, args=(config, stop), kwargs={"sink": StdoutSink(devnull)}
        )
        thread.start()
        while call(op="stats", vm=0)["stats"].get("instance/preempted", 0) < 2:
            time.sleep(0.05)
        steps = [
            {"at": i / args.rate, "vm": 0, "path": "instance/maintenance-event", "value": f"V{i}"}
            for i in range(args.events)
        ]
        call(op="play", steps=steps)
        time.sleep(0.5)
        stop.set()
        thread.join(15)
    finally:
        host.stdin.close()  # the simhost stops its simulators and exits at end of input
        host.wait(10)
        state.cleanup()
        devnull.close()
    stats = pstats.Stats(_profiles[0])
    for profile in _profiles[1:]:
        stats.add(profile)
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    print(
        f"{args.events} changes at {args.rate:g}/s: profiled threads used "
        f"{total / args.events * 1000:.3f} ms of CPU per change (cProfile overhead included)"
    )
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats("bridge/", args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
