"""Simulated VMs for the benchmark, in a process of their own.

Hosts any number of `bridge.simulator.Simulator`s (one per simulated VM) and plays schedules of
value changes and faults on them, stamping each with `time.monotonic()` right before it takes
effect. CLOCK_MONOTONIC is system-wide on Linux, so these stamps compare directly with the
arrival stamps taken by the benchmark driver and the bridges.

Being a separate process keeps the simulators' threads from competing for the driver's GIL
while it timestamps event lines. Protocol: one JSON command per line on stdin, one JSON reply
per line on stdout (see `Host.handle`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.simulator import Simulator


class StampedSimulator(Simulator):
    """A Simulator that remembers when each metadata key was first asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.first_request: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def _begin(self, key: str) -> Any:
        self.first_request.setdefault(key, time.monotonic())
        return super()._begin(key)


def identity(vm: int) -> dict[str, str]:
    """A distinct simulated VM: its own instance id and name."""
    return {
        "instance/id": instance_id(vm),
        "instance/name": f"bench-vm-{vm:03d}",
        "instance/hostname": f"bench-vm-{vm:03d}.us-central1-a.c.bench-project.internal",
        "project/project-id": "bench-project",
    }


def instance_id(vm: int) -> str:
    return str(4520031799277500000 + vm)


class Host:
    """The simulators and the commands that drive them."""

    def __init__(self) -> None:
        self.sims: list[StampedSimulator] = []

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """One command -> one reply.

        add {ids}: start a VM per id (its identity) -> {vms: [[index, host_port], ...]};
        play {steps: [{at, vm, op: set|fault|clear, path, value, kind, count, status}]}:
        apply each step `at` seconds from now -> {t: [monotonic stamp of each step]};
        stats {vm} -> the simulator's request counts; first {vm} -> first request per key;
        reset_first {vm}; stop {vm}; quit.
        """
        op = cmd["op"]
        if op == "add":
            out = []
            for vm_id in cmd["ids"]:
                sim = StampedSimulator(identity=identity(int(vm_id)), max_wait=300.0).start()
                self.sims.append(sim)
                out.append([len(self.sims) - 1, sim.host_port])
            return {"vms": out}
        if op == "play":
            return {"t": self.play(cmd["steps"])}
        sim = self.sims[int(cmd["vm"])]
        if op == "stats":
            return {"stats": sim.stats(), "t": time.monotonic()}
        if op == "first":
            return {"first": dict(sim.first_request)}
        if op == "reset_first":
            sim.first_request.clear()
            return {}
        if op == "stop":
            sim.stop()
            return {}
        raise ValueError(f"unknown op {op!r}")

    def play(self, steps: list[dict[str, Any]]) -> list[float]:
        start = time.monotonic()
        stamps: list[float] = []
        for step in steps:
            left = start + float(step["at"]) - time.monotonic()
            if left > 0:
                time.sleep(left)  # the stamp below is what counts, not hitting `at` exactly
            sim = self.sims[int(step["vm"])]
            op = step.get("op", "set")
            stamps.append(time.monotonic())
            if op == "set":
                sim.set_value(step["path"], step["value"])
            elif op == "fault":
                sim.inject(
                    step.get("kind", "status"),
                    count=int(step.get("count", 1)),
                    path=step.get("path"),
                    **({"status": step["status"]} if "status" in step else {}),
                )
            elif op == "clear":
                sim.clear_faults()
            else:
                raise ValueError(f"unknown step op {op!r}")
        return stamps


def main() -> int:
    sys.setswitchinterval(0.0005)  # handler threads hand the GIL on quickly
    host = Host()
    lock = threading.Lock()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            with lock:
                reply = host.handle(cmd)
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for sim in host.sims:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
