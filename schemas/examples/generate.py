"""Write the golden events and the producer schema: `python schemas/examples/generate.py [--check]`.

For every kind, `<kind>.json` is the structured-mode CloudEvent (what the stdout sink prints and
what structured content mode publishes) and `<kind>.pubsub.json` is the binary-mode Pub/Sub
message: `{"attributes": {...}, "data": {...}}`, where `data` is the payload shown as a JSON
object; the bytes on the wire are that object in compact UTF-8 JSON (`bridge.events.dumps`).
For every kind of the cloud's events
(bridge/cloud_kinds.py), `logentry.<kind>.json` is a system-event LogEntry as a log sink
publishes it (written here from the documented shapes: no captured real entry of every kind is
public) and `<kind>.json` / `<kind>.pubsub.json` the event `bridge.system_events.convert` makes
of it. `envelope.<path>.json` shows the maintenance.started message as each delivery path
hands it to a subscriber, raw: a Pub/Sub pull response, a push request body, and the Eventarc
`messagePublished` CloudEvent (structured form; over HTTP its attributes come as ce-* headers and
`data` as the body).

Pure and deterministic: fixed ids, times and instances go through the bridge's own
`build_event`, `classify` and `notice_seconds`, so a test can regenerate every file in memory
and fail when the code and the goldens drift apart. The same run refreshes the examples
embedded in docs/events.md (a ```json block after `<!-- example: NAME -->` shows NAME.json),
and derives `v1/event-data.producer.schema.json` from the published consumer schema
(`v1/event-data.schema.json`), so that the strict schema the tests hold the bridge to is never
a second hand-kept copy.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bridge.cloud_kinds import (
    CLOUD_KEY,
    CLOUD_KINDS,
    GENERIC_KIND,
    METHODS,
    UPCOMING_COMPLETED,
    UPCOMING_METHOD,
    UPCOMING_SCHEDULED,
    UPCOMING_UPDATED,
)
from bridge.events import Event, Instance, Scheduling, Transition, build_event
from bridge.keys import HEARTBEAT_KEY, KINDS, MAINTENANCE, PREEMPTED, UPCOMING, WATCHED_KEYS
from bridge.recorder import HEARTBEAT
from bridge.system_events import convert
from bridge.transitions import canonical, classify, notice_seconds

HERE = Path(__file__).resolve().parent
DOCS = HERE.parents[1] / "docs" / "events.md"
CONSUMER_SCHEMA = HERE.parent / "v1" / "event-data.schema.json"
PRODUCER_SCHEMA = HERE.parent / "v1" / "event-data.producer.schema.json"
EXAMPLE_BLOCK = re.compile(
    r"(?P<head><!-- example: (?P<name>[a-z._]+) -->\n```json\n)(?P<body>.*?)(?P<tail>^```$)",
    re.DOTALL | re.MULTILINE,
)

STANDARD_VM = Instance(
    id="4520031799277579481",
    name="demo-vm",
    zone="us-central1-a",
    project_id="demo-project",
    project_number="123456789012",
    hostname="demo-vm.us-central1-a.c.demo-project.internal",
)
STANDARD = Scheduling(
    on_host_maintenance="MIGRATE",
    automatic_restart="TRUE",
    preemptible="FALSE",
    provisioning_model="STANDARD",
)
SPOT_VM = Instance(
    id="7091345577210934712",
    name="spot-vm",
    zone="europe-west4-b",
    project_id="demo-project",
    project_number="123456789012",
    hostname="spot-vm.europe-west4-b.c.demo-project.internal",
)
SPOT = Scheduling(
    on_host_maintenance="TERMINATE",
    automatic_restart="FALSE",
    preemptible="TRUE",
    provisioning_model="SPOT",
)


def _window(start: str, end: str) -> str:
    """An upcoming-maintenance value as the metadata server gives it (alt=json), canonical."""
    return canonical(
        UPCOMING,
        {
            "type": "SCHEDULED",
            "canReschedule": True,
            "windowStartTime": start,
            "windowEndTime": end,
            "latestWindowStartTime": "2030-01-29T02:00:00Z",
            "maintenanceStatus": "PENDING",
            "maintenanceReasons": ["PLANNED_UPDATE"],
        },
    )


def stream_of(instance: Instance) -> str:
    """A fixed stream id per example VM (the bridge makes a random one with its state store)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"maintenance-bridge:example:stream:{instance.name}"))


FIRST = _window("2030-01-15T02:00:00Z", "2030-01-15T06:00:00Z")
MOVED = _window("2030-01-20T02:00:00Z", "2030-01-20T06:00:00Z")


@dataclass(frozen=True)
class Example:
    """One point of the example timeline: which value changed, on which VM, when."""

    kind: str
    key: str
    previous: str
    current: str
    instance: Instance
    scheduling: Scheduling
    sequence: int
    at: str
    happened_while_down: bool = False
    at_startup: bool = False


# Two VMs' weeks, sequence numbers per VM as the bridge counts them.
TIMELINE: tuple[Example, ...] = (
    Example("upcoming.scheduled", UPCOMING, "", FIRST, STANDARD_VM, STANDARD, 1,
            "2030-01-08T09:00:00.125"),
    Example("upcoming.updated", UPCOMING, FIRST, MOVED, STANDARD_VM, STANDARD, 2,
            "2030-01-09T16:30:12.500"),
    Example("bridge.heartbeat", HEARTBEAT_KEY, "", "", STANDARD_VM, STANDARD, 3,
            "2030-01-10T00:00:00.000"),
    Example("maintenance.started", MAINTENANCE, "NONE", "MIGRATE_ON_HOST_MAINTENANCE",
            STANDARD_VM, STANDARD, 4, "2030-01-20T02:00:01.042"),
    Example("maintenance.changed", MAINTENANCE, "MIGRATE_ON_HOST_MAINTENANCE",
            "TERMINATE_ON_HOST_MAINTENANCE", STANDARD_VM, STANDARD, 5, "2030-01-20T02:00:31.317"),
    Example("maintenance.ended", MAINTENANCE, "TERMINATE_ON_HOST_MAINTENANCE", "NONE",
            STANDARD_VM, STANDARD, 6, "2030-01-20T02:55:04.880"),
    Example("upcoming.cleared", UPCOMING, MOVED, "", STANDARD_VM, STANDARD, 7,
            "2030-01-20T02:55:05.013"),
    Example("preemption.started", PREEMPTED, "FALSE", "TRUE", SPOT_VM, SPOT, 1,
            "2030-02-03T11:42:07.604"),
    Example("preemption.changed", PREEMPTED, "TRUE", "UNKNOWN", SPOT_VM, SPOT, 2,
            "2030-02-03T11:42:20.001"),
    Example("preemption.ended", PREEMPTED, "UNKNOWN", "FALSE", SPOT_VM, SPOT, 3,
            "2030-02-03T12:10:45.338", happened_while_down=True, at_startup=True),
)  # fmt: skip


def event_for(example: Example) -> Event:
    """The event the bridge builds for `example`, exactly as the recorder calls build_event."""
    if example.kind == HEARTBEAT.kind:
        transition: Transition | None = HEARTBEAT
    else:
        transition = classify(example.key, example.previous, example.current)
    if transition is None or transition.kind != example.kind:
        raise AssertionError(f"{example.kind}: the values classify as {transition}")
    observed = datetime.fromisoformat(example.at).replace(tzinfo=timezone.utc)
    return build_event(
        transition,
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"maintenance-bridge:example:{example.kind}")),
        sequence=example.sequence,
        observed_at=observed,
        instance=example.instance,
        scheduling=example.scheduling,
        happened_while_down=example.happened_while_down,
        notice_seconds=notice_seconds(transition),
        at_startup=example.at_startup,
        stream_id=stream_of(example.instance),
    )


def events() -> dict[str, Event]:
    """kind -> golden event, in `KINDS` order."""
    by_kind = {example.kind: event_for(example) for example in TIMELINE}
    if sorted(by_kind) != sorted(KINDS):
        raise AssertionError(f"examples {sorted(by_kind)} != kinds {sorted(KINDS)}")
    return {kind: by_kind[kind] for kind in KINDS}


# The cloud's record of the same weeks: (kind, method, status message, metadata, timestamp, VM).
_WINDOW_METADATA = {
    "@type": "type.googleapis.com/google.cloud.compute.v1.UpcomingMaintenance",
    "canReschedule": True,
    "maintenanceStatus": "PENDING",
    "type": "SCHEDULED",
    "windowStartTime": "2030-01-15T02:00:00Z",
    "windowEndTime": "2030-01-15T06:00:00Z",
    "latestWindowStartTime": "2030-01-29T02:00:00Z",
}
_MOVED_METADATA = {
    **_WINDOW_METADATA,
    "windowStartTime": "2030-01-20T02:00:00Z",
    "windowEndTime": "2030-01-20T06:00:00Z",
}
CLOUD_TIMELINE: tuple[tuple[str, str, str, dict[str, Any] | None, str, Instance], ...] = (
    (UPCOMING_SCHEDULED, UPCOMING_METHOD, "Maintenance window has been scheduled.",
     _WINDOW_METADATA, "2030-01-08T08:59:58.512Z", STANDARD_VM),
    (UPCOMING_UPDATED, UPCOMING_METHOD, "Maintenance window has been rescheduled.",
     _MOVED_METADATA, "2030-01-09T16:30:10.004Z", STANDARD_VM),
    ("cloud.migrated", "compute.instances.migrateOnHostMaintenance",
     "Instance migrated during Compute Engine maintenance.", None,
     "2030-01-20T02:01:02.290123Z", STANDARD_VM),
    ("cloud.terminated_for_maintenance", "compute.instances.terminateOnHostMaintenance",
     "Instance terminated during Compute Engine maintenance.", None,
     "2030-01-20T02:55:01.133Z", STANDARD_VM),
    ("cloud.automatic_restart", "compute.instances.automaticRestart",
     "Instance automatically restarted by Compute Engine.", None,
     "2030-01-20T02:56:40.020Z", STANDARD_VM),
    (UPCOMING_COMPLETED, UPCOMING_METHOD, "Maintenance window has completed.", None,
     "2030-01-20T02:57:00.000Z", STANDARD_VM),
    ("cloud.host_error", "compute.instances.hostError", "Instance terminated by Compute Engine.",
     None, "2030-01-27T04:12:33.626Z", STANDARD_VM),
    ("cloud.preempted", "compute.instances.preempted", "Instance was preempted.", None,
     "2030-02-03T11:42:37.118Z", SPOT_VM),
    ("cloud.guest_terminated", "compute.instances.guestTerminate",
     "Instance terminated by guest OS shutdown.", None, "2030-02-04T09:00:03.001Z", SPOT_VM),
    ("cloud.halted_for_restart", "compute.instances.instanceManagerHaltForRestart",
     "Instance halted by the instance group manager for a restart.", None,
     "2030-02-05T10:20:00.100Z", SPOT_VM),
    ("cloud.recreated", "compute.instances.repair.recreateInstance",
     "Instance recreated by the instance group manager.", None,
     "2030-02-05T10:21:30.700Z", SPOT_VM),
    (GENERIC_KIND, "compute.instances.notifyInstanceLocation", "", None,
     "2030-02-06T00:00:00.000Z", SPOT_VM),
)  # fmt: skip


def log_entry(
    method: str,
    message: str,
    metadata: dict[str, Any] | None,
    timestamp: str,
    instance: Instance,
    insert_id: str,
) -> dict[str, Any]:
    """A system-event LogEntry in the documented shape (FACTS.md section 8)."""
    millis = int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)
    payload: dict[str, Any] = {
        "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
        "status": {"message": message} if message else {},
        "authenticationInfo": {"principalEmail": "system@google.com"},
        "requestMetadata": {"requestAttributes": {}, "destinationAttributes": {}},
        "serviceName": "compute.googleapis.com",
        "methodName": method,
        "resourceName": (
            f"projects/{instance.project_id}/zones/{instance.zone}/instances/{instance.name}"
        ),
        "request": {"@type": f"type.googleapis.com/{method}"},
    }
    if metadata is not None:
        payload["metadata"] = metadata
    return {
        "protoPayload": payload,
        "insertId": insert_id,
        "resource": {
            "type": "gce_instance",
            "labels": {
                "project_id": instance.project_id,
                "instance_id": instance.id,
                "zone": instance.zone,
            },
        },
        "timestamp": timestamp,
        "severity": "NOTICE" if method == UPCOMING_METHOD else "INFO",
        "logName": f"projects/{instance.project_id}/logs/cloudaudit.googleapis.com%2Fsystem_event",
        "operation": {
            "id": f"systemevent-{millis}-{insert_id.strip('-')}",
            "producer": method,
            "first": True,
            "last": True,
        },
        "receiveTimestamp": timestamp.replace("Z", "").ljust(29, "0")[:23] + "917422Z",
    }


def log_entries() -> dict[str, dict[str, Any]]:
    """Cloud kind -> the LogEntry of the example timeline, in `CLOUD_KINDS` order."""
    by_kind = {
        kind: log_entry(method, message, metadata, at, vm, f"-{i:02d}e0ull7dew{i:02d}")
        for i, (kind, method, message, metadata, at, vm) in enumerate(CLOUD_TIMELINE)
    }
    if sorted(by_kind) != sorted(CLOUD_KINDS):
        raise AssertionError(f"cloud examples {sorted(by_kind)} != {sorted(CLOUD_KINDS)}")
    known = {METHODS.get(e["protoPayload"]["methodName"]) for e in by_kind.values()}
    if not set(METHODS.values()) <= known:
        raise AssertionError("every mapped method needs an example")
    return {kind: by_kind[kind] for kind in CLOUD_KINDS}


def cloud_events() -> dict[str, Event]:
    """Cloud kind -> the event the system-events function makes of its example entry."""
    out = {kind: convert(entry) for kind, entry in log_entries().items()}
    for kind, event in out.items():
        if event.kind != kind:
            raise AssertionError(f"{kind}: the example entry converts to {event.kind}")
    return out


def pubsub_form(event: Event) -> dict[str, Any]:
    """The binary-mode message: attributes, and the payload shown as a JSON object."""
    attributes, payload = event.to_pubsub("binary")
    return {"attributes": attributes, "data": json.loads(payload)}


# What Pub/Sub and Eventarc add around the message: fixed, made-up but well-formed values.
TOPIC = "projects/demo-project/topics/maintenance-bridge-events"
SUBSCRIPTION = "projects/demo-project/subscriptions/maintenance-events"
MESSAGE_ID = "2070443601311540"
PUBLISH_TIME = "2030-01-20T02:00:01.100Z"


def envelopes(event: Event) -> dict[str, dict[str, Any]]:
    """Path -> the raw JSON a subscriber receives for `event` published in binary mode."""
    attributes, payload = event.to_pubsub("binary")
    message = {
        "attributes": attributes,
        "data": base64.b64encode(payload).decode("ascii"),
        "messageId": MESSAGE_ID,
        "publishTime": PUBLISH_TIME,
        "orderingKey": event.extensions["instanceid"],
    }
    # Push and Eventarc repeat the ids in snake_case.
    pushed = {**message, "message_id": MESSAGE_ID, "publish_time": PUBLISH_TIME}
    published = {"message": pushed, "subscription": SUBSCRIPTION}
    return {
        "pull": {
            "receivedMessages": [
                {"ackId": "RVNEUAYWLF1GSFE3GQhoUQ5PXiM_NSAoRRIJB08CKF15", "message": message}
            ]
        },
        "push": published,
        "eventarc": {
            "specversion": "1.0",
            "id": MESSAGE_ID,
            "source": f"//pubsub.googleapis.com/{TOPIC}",
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "time": PUBLISH_TIME,
            "datacontenttype": "application/json",
            "data": published,
        },
    }


def _text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """File name -> content of every golden file."""
    files: dict[str, str] = {}
    for kind, event in events().items():
        files[f"{kind}.json"] = _text(event.to_structured())
        files[f"{kind}.pubsub.json"] = _text(pubsub_form(event))
    entries = log_entries()
    for kind, event in cloud_events().items():
        files[f"{kind}.json"] = _text(event.to_structured())
        files[f"{kind}.pubsub.json"] = _text(pubsub_form(event))
        files[f"logentry.{kind}.json"] = _text(entries[kind])
    for path, envelope in envelopes(events()["maintenance.started"]).items():
        files[f"envelope.{path}.json"] = _text(envelope)
    return files


def producer_schema(consumer: dict[str, Any]) -> dict[str, Any]:
    """The consumer schema made exact: no unknown field anywhere, every field this release
    always writes required, `sequence` a JSON number as the bridge writes it, `key` one of
    the keys this release knows (bridge/keys.py, which the consumer schema's examples list)."""
    strict = copy.deepcopy(consumer)
    strict["$id"] = consumer["$id"].replace("/event-data.json", "/event-data.producer.json")
    strict["title"] = "maintenance-bridge v1 event data, exactly as this release emits it"
    strict["description"] = (
        "For the project's own tests, not for consumers: it rejects fields added in later v1 "
        "releases. Consumers validate with event-data.schema.json. Generated from it by "
        "schemas/examples/generate.py."
    )
    strict["required"] = [*consumer["required"], "at_startup", "stream_id"]
    key = strict["properties"]["key"]
    known = [*WATCHED_KEYS, HEARTBEAT_KEY, CLOUD_KEY]
    if key.pop("examples") != known:
        raise AssertionError(f"{CONSUMER_SCHEMA.name}: properties.key.examples must be {known}")
    key["enum"] = known
    sequence = strict["properties"]["sequence"]
    sequence["type"] = "integer"
    del sequence["pattern"]
    for obj in (strict, *strict["$defs"].values()):
        if "properties" in obj:
            obj["additionalProperties"] = False
    return strict


def embed(doc: str, files: dict[str, str]) -> str:
    """`doc` with every marked example block replaced by the golden file it names."""

    def block(match: re.Match[str]) -> str:
        return match["head"] + files[f"{match['name']}.json"] + match["tail"]

    return EXAMPLE_BLOCK.sub(block, doc)


def main(argv: list[str]) -> int:
    """Write the files, or with --check report the ones that differ (exit 1)."""
    check = "--check" in argv
    files = render()
    wanted = {HERE / name: text for name, text in files.items()}
    consumer = json.loads(CONSUMER_SCHEMA.read_text(encoding="utf-8"))
    wanted[PRODUCER_SCHEMA] = _text(producer_schema(consumer))
    if DOCS.exists():
        wanted[DOCS] = embed(DOCS.read_text(encoding="utf-8"), files)
    stale = []
    for path, text in wanted.items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text, encoding="utf-8")
    verb = "stale" if check else "written"
    print(f"{len(stale)} files {verb}: {', '.join(stale) or '-'}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
