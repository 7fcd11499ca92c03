"""Scenarios: timed value changes, built in (see the package docstring) or read from JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bridge.keys import MAINTENANCE, PREEMPTED, UPCOMING
from bridge.simulator.wire import metadata_key


@dataclass(frozen=True)
class Step:
    """Set ``path`` to ``value`` (``None`` deletes it) ``at`` seconds into a scenario."""

    at: float
    path: str
    value: str | None


def sample_window(day: int = 15) -> str:
    """The sample window (SCHEDULED, reschedulable, PENDING, 2030-01-<day> 02:00-06:00 UTC) as
    the metadata server holds it: the one the scenarios, the demo, bench and tests share."""
    return json.dumps(
        {
            "type": "SCHEDULED",
            "can_reschedule": "true",
            "window_start_time": f"2030-01-{day:02d}T02:00:00Z",
            "window_end_time": f"2030-01-{day:02d}T06:00:00Z",
            "latest_window_start_time": "2030-01-29T02:00:00Z",
            "maintenance_status": "PENDING",
        }
    )


_ON_HOST = "instance/scheduling/on-host-maintenance"
SCENARIOS: dict[str, list[Step]] = {
    "migrate": [
        Step(0, _ON_HOST, "MIGRATE"),
        Step(0, MAINTENANCE, "NONE"),
        Step(1, MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE"),
        Step(61, MAINTENANCE, "NONE"),
    ],
    "terminate": [
        Step(0, _ON_HOST, "TERMINATE"),
        Step(0, MAINTENANCE, "NONE"),
        Step(1, MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE"),
        Step(3601, MAINTENANCE, "NONE"),
    ],
    "preempt": [
        Step(0, "instance/scheduling/preemptible", "TRUE"),
        Step(0, "instance/scheduling/provisioning-model", "SPOT"),
        Step(0, PREEMPTED, "FALSE"),
        Step(1, PREEMPTED, "TRUE"),
        Step(31, PREEMPTED, "FALSE"),
    ],
    "upcoming": [
        Step(0, UPCOMING, None),
        Step(1, UPCOMING, sample_window(15)),
        Step(5, UPCOMING, sample_window(20)),
        Step(10, UPCOMING, None),
    ],
}


def parse_steps(data: object) -> list[Step]:
    if not isinstance(data, list):
        raise ValueError("a scenario is a JSON list of {at, path, value} objects")
    steps = []
    for i, item in enumerate(data):
        at = item.get("at") if isinstance(item, dict) else None
        if not isinstance(at, (int, float)) or isinstance(at, bool) or at < 0:
            raise ValueError(f"step {i}: 'at' must be a number of seconds >= 0")
        value = item.get("value")
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"step {i}: 'value' must be a string, an object or null")
        if not isinstance(item.get("path"), str):
            raise ValueError(f"step {i}: 'path' must be a metadata key such as {MAINTENANCE!r}")
        steps.append(Step(float(at), metadata_key(item["path"]), value))
    return steps


def load_scenario(name_or_path: str) -> list[Step]:
    """A built-in scenario by name, or a JSON file ``[{"at": 1.5, "path": ..., "value": ...}]``.

    A JSON object or array as ``value`` is stored serialised; ``null`` deletes the key.
    """
    if name_or_path in SCENARIOS:
        return list(SCENARIOS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown scenario {name_or_path!r}: neither a JSON file nor one of {sorted(SCENARIOS)}"
        )
    return parse_steps(json.loads(path.read_text(encoding="utf-8")))
