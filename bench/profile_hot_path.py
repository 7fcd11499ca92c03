"""Profile the bridge's hot path in-process: where its CPU goes, per event.

    .venv/bin/python bench/profile_hot_path.py [--events 300] [--rate 50] [--top 25]
    .venv/bin/python bench/profile_hot_path.py --parts [--code DIR] [--json]

Runs `bridge.daemon.run` in this process against a simulator in a separate process
(bench/simhost.py, so that the simulator's threads are not profiled), with the stdout sink
writing to /dev/null. By default it profiles every watcher thread and the relay thread with
cProfile on thread CPU time and prints the functions that cost most, by own time and by
cumulative time within bridge/. `--parts` instead times a few named parts of the path (the
metadata request, the store's two transactions, logging, the sink) on thread CPU time, without
a profiler's overhead, for the `bridge` package found in DIR (default: this checkout):
bench/run.py uses it to compare the A/B baseline with this tree. This is the tool behind
"remove what does not need to be there"; bench/run.py's breakdown phase measures the same path
in wall-clock stages.
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
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# (label, module, class or None, attribute): the parts --parts times, in thread CPU; of the
# attributes "a|b", the first the code has (newer code names the part differently).
PARTS = (
    ("watcher threads, all of it", "watcher", "Watcher", "_run"),
    ("relay thread, all of it", "relay", "Relay", "_run"),
    ("metadata request (HTTP client)", "metadata", "MetadataClient", "_get|get"),
    (
        "record: build, commit, send, log (and retire, if sent at once)",
        "recorder",
        "Recorder",
        "observe",
    ),
    ("store: record transaction", "store", "Store", "record"),
    ("store: ack transaction", "store", "Store", "ack"),
    ("logging (two lines per event)", "logging", "Logger", "_log"),
    ("sink: line written", "sinks", "StdoutSink", "send"),
)


def _wrap(
    owner: Any, name: str, around: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    setattr(owner, name, around(getattr(owner, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="changes per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--parts", action="store_true", help="thread CPU of named parts")
    parser.add_argument("--code", type=Path, default=REPO, help="where the bridge package is")
    parser.add_argument("--json", action="store_true", help="--parts as one JSON line")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    import importlib

    from bridge import daemon, relay, watcher
    from bridge.config import Config
    from bridge.logs import configure
    from bridge.sinks import StdoutSink

    profiles: list[cProfile.Profile] = []
    spent: dict[str, float] = defaultdict(float)
    missing: list[str] = []  # parts this version of the code does not have
    if args.parts:
        for label, module, cls, attr in PARTS:
            try:
                mod = (
                    logging if module == "logging" else importlib.import_module(f"bridge.{module}")
                )
                owner = getattr(mod, cls)
                attr = next(name for name in attr.split("|") if hasattr(owner, name))
            except (ImportError, AttributeError, StopIteration):
                missing.append(label)
                continue

            def timed(original: Callable[..., Any], label: str = label) -> Callable[..., Any]:
                def run(*a: Any, **k: Any) -> Any:
                    t0 = time.thread_time()
                    try:
                        return original(*a, **k)
                    finally:
                        spent[label] += time.thread_time() - t0

                return run

            _wrap(owner, attr, timed)
    else:
        for cls in (watcher.Watcher, relay.Relay):

            def profiled(original: Callable[..., Any]) -> Callable[..., Any]:
                def run(self: Any) -> None:
                    profile = cProfile.Profile(time.thread_time)
                    profiles.append(profile)
                    profile.runcall(original, self)

                return run

            _wrap(cls, "_run", profiled)

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
        time.sleep(0.2)
        spent.clear()  # start-up is not the hot path
        cpu0 = time.process_time()
        call(op="play", steps=steps)
        time.sleep(0.5)
        cpu = time.process_time() - cpu0
        stop.set()
        thread.join(15)
    finally:
        host.stdin.close()  # the simhost stops its simulators and exits at end of input
        host.wait(10)
        state.cleanup()
        devnull.close()
    if args.parts:
        per = {
            label: 1000 * spent[label] / args.events for label, *_ in PARTS if label not in missing
        }
        per["process, all threads"] = 1000 * cpu / args.events
        if args.json:
            print(json.dumps({"rate": args.rate, "events": args.events, "ms_per_event": per}))
        else:
            print(f"{args.events} changes at {args.rate:g}/s, CPU per change (thread CPU):")
            for label, ms in per.items():
                print(f"  {label:40} {ms:.3f} ms")
        return 0
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
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
