"""A Compute Engine system-event LogEntry as the project's Event: the cloud's side of the stream.

What a bridge cannot tell (a host error comes with no notice; a VM whose bridge was down, or
that never had one; a Spot VM whose 30 s ran out first), the cloud writes to Cloud Logging as a
System Event audit log entry, and a log sink routes it to Pub/Sub (docs/events.md, "The cloud's
events"). `convert` turns one entry into one event of the same contract as a bridge's: same
`source`, extensions and ordering key, so filters and consumers work unchanged; `data.key` is
`cloud/system-event` and `data.origin` `cloud`, and `data.cloud` says which entry it was.

Pure: the parsed entry in, the Event out, or `NotASystemEvent` saying why not (the function
logs that once and acknowledges: no retry makes a malformed entry well-formed). No clock: every
time comes from the entry. The id is derived from the entry (log name + insertId), so a
redelivered entry is the same event under the same id.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

from bridge.cloud_kinds import (
    CLOUD_KEY,
    CLOUD_ORIGIN,
    GENERIC_KIND,
    METHODS,
    RESOURCE_TYPE,
    SERVICE,
    SYSTEM_EVENT_LOG,
    UPCOMING_COMPLETED,
    UPCOMING_METHOD,
    UPCOMING_SCHEDULED,
    UPCOMING_UPDATED,
)
from bridge.events import (
    DEFAULT_TYPE_PREFIX,
    CloudRecord,
    Event,
    EventData,
    Instance,
    Scheduling,
    Upcoming,
)

_TIMESTAMP = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<zone>Z|z|[+-]\d{2}:\d{2})"
)
_INSTANCE_NAME = re.compile(r"(?:^|/)instances/(?P<name>[^/]+)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
# A window's entry that says it moved (no captured entry is public: the message is our reading).
_UPDATED = re.compile(r"resched|updat|chang|moved", re.IGNORECASE)
_COMPLETED = re.compile(r"complet", re.IGNORECASE)


class NotASystemEvent(ValueError):
    """The entry is not one to publish. `unrelated`: another log, resource or service (a sink
    with a wider filter, a test message); otherwise malformed. Either way: log and ack."""

    def __init__(self, message: str, *, unrelated: bool = False) -> None:
        super().__init__(message)
        self.unrelated = unrelated


def parse(raw: bytes | str) -> Any:
    """The LogEntry JSON of a Pub/Sub message (UTF-8, may end in a newline), parsed."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NotASystemEvent(f"the message is not a JSON LogEntry: {exc}") from None


def event_id(log_name: str, insert_id: str) -> str:
    """The event's id: the same entry (log name + insertId, unique per log) gives the same id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"maintenance-bridge:cloud:{log_name}\n{insert_id}"))


def stream_of(project_id: str, instance_id: str) -> str:
    """The cloud's stream of one instance: a bridge's streams never share it."""
    name = f"maintenance-bridge:cloud:stream:{project_id}/{instance_id}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def convert(entry: Any, *, type_prefix: str = DEFAULT_TYPE_PREFIX) -> Event:
    """The event for one system-event LogEntry (parsed JSON); NotASystemEvent if there is none.

    `sequence` is the entry's timestamp in microseconds since the epoch: it orders the cloud's
    stream of an instance (`stream_of`), it does not count; deduplicate cloud events on the id.
    Microseconds, not nanoseconds: under 2^53 until the year 2255, so that a consumer whose JSON
    numbers are doubles (JavaScript's) reads it exactly.
    """
    entry = _object(entry, "the LogEntry")
    log_name = _text(entry, "logName", "the LogEntry")
    if not unquote(log_name).endswith(f"/logs/{SYSTEM_EVENT_LOG}"):
        raise NotASystemEvent(f"another log: {log_name!r}", unrelated=True)
    resource = _object(entry.get("resource"), "resource")
    if resource.get("type") != RESOURCE_TYPE:
        raise NotASystemEvent(f"another resource type: {resource.get('type')!r}", unrelated=True)
    payload = _object(entry.get("protoPayload"), "protoPayload")
    if payload.get("serviceName") != SERVICE:
        raise NotASystemEvent(f"another service: {payload.get('serviceName')!r}", unrelated=True)
    method = _text(payload, "methodName", "protoPayload")
    insert_id = _text(entry, "insertId", "the LogEntry")
    timestamp = _text(entry, "timestamp", "the LogEntry")
    when, micros = _moment(timestamp)
    labels = _object(resource.get("labels"), "resource.labels")
    resource_name = _text(payload, "resourceName", "protoPayload")
    named = _INSTANCE_NAME.search(resource_name)
    if not named:
        raise NotASystemEvent(f"protoPayload.resourceName names no instance: {resource_name!r}")
    instance = Instance(
        id=_label(labels, "instance_id"),
        name=named["name"],
        zone=_label(labels, "zone"),
        project_id=_label(labels, "project_id"),
        project_number="",  # the log names the project by id only
    )
    status = payload.get("status")
    message = _optional(status.get("message") if isinstance(status, Mapping) else None)
    auth = payload.get("authenticationInfo")
    operation = entry.get("operation")
    operation = operation if isinstance(operation, Mapping) else {}
    upcoming = _window(payload.get("metadata")) if method == UPCOMING_METHOD else None
    kind = upcoming_kind(upcoming, message) if method == UPCOMING_METHOD else None
    kind = kind or METHODS.get(method, GENERIC_KIND)
    cloud = CloudRecord(
        log_name=log_name,
        insert_id=insert_id,
        method=method,
        timestamp=timestamp,
        receive_timestamp=_optional(entry.get("receiveTimestamp")),
        service=SERVICE,
        resource_name=resource_name,
        severity=_optional(entry.get("severity")),
        status_message=message,
        principal=_optional(auth.get("principalEmail") if isinstance(auth, Mapping) else None),
        operation_id=_optional(operation.get("id")),
        operation_producer=_optional(operation.get("producer")),
    )
    data = EventData(
        key=CLOUD_KEY,
        previous="",
        current=method,
        observed_at=when,
        happened_while_down=False,
        sequence=micros,
        instance=instance,
        scheduling=Scheduling(),  # the log does not say; "" as for a key a VM lacks
        upcoming=upcoming,
        stream_id=stream_of(instance.project_id, instance.id),
        origin=CLOUD_ORIGIN,
        cloud=cloud,
    )
    return Event(
        id=event_id(log_name, insert_id),
        source=(
            f"//compute.googleapis.com/projects/{instance.project_id}"
            f"/zones/{instance.zone}/instances/{instance.name}"
        ),
        type=f"{type_prefix}.{kind}",
        time=when,
        subject=CLOUD_KEY,
        data=data,
        extensions={
            "instanceid": instance.id,
            "zone": instance.zone,
            "project": instance.project_id,
        },
    )


def upcoming_kind(window: Upcoming | None, message: str) -> str | None:
    """A maintenance-window entry's kind: with a window, scheduled (or updated when its message
    says it moved); without one, completed when its message says so. None: neither, so the
    entry goes on under the generic kind rather than as a window it does not describe."""
    if window is not None:
        return UPCOMING_UPDATED if _UPDATED.search(message) else UPCOMING_SCHEDULED
    return UPCOMING_COMPLETED if _COMPLETED.search(message) else None


def _window(raw: Any) -> Upcoming | None:
    """The window in an upcomingMaintenance entry's metadata: flat or under
    `upcomingMaintenance`, camelCase or snake_case, unknown fields ignored; None without one."""
    if not isinstance(raw, Mapping):
        return None
    fields = {_CAMEL.sub("_", str(k)).lower(): v for k, v in raw.items()}
    nested = fields.get("upcoming_maintenance")
    if isinstance(nested, Mapping):
        return _window(nested)
    times = ("window_start_time", "window_end_time", "latest_window_start_time")
    if not any(fields.get(name) for name in (*times, "type", "maintenance_status")):
        return None
    flag = fields.get("can_reschedule")
    if isinstance(flag, str):
        flag = {"true": True, "false": False}.get(flag.lower())
    reasons = fields.get("maintenance_reasons")
    if isinstance(reasons, str):
        reasons = [reasons]
    return Upcoming(
        type=_optional(fields.get("type")),
        can_reschedule=flag if isinstance(flag, bool) else None,
        window_start_time=_optional(fields.get("window_start_time")),
        window_end_time=_optional(fields.get("window_end_time")),
        latest_window_start_time=_optional(fields.get("latest_window_start_time")),
        maintenance_status=_optional(fields.get("maintenance_status")),
        maintenance_reasons=tuple(
            r for r in (reasons if isinstance(reasons, list) else []) if isinstance(r, str)
        ),
    )


def _moment(text: str) -> tuple[str, int]:
    """An RFC 3339 time as UTC text (the entry's precision kept) and microseconds since 1970."""
    m = _TIMESTAMP.fullmatch(text)
    try:
        if not m:
            raise ValueError("not RFC 3339")
        local = datetime.fromisoformat(f"{m['date']}T{m['time']}")
        zone = m["zone"].upper()
        offset = timedelta() if zone == "Z" else _offset(zone)
        moment = (local - offset).replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise NotASystemEvent(f"timestamp {text!r}: {exc}") from None
    frac = m["frac"] or ""
    micros = (moment - _EPOCH) // timedelta(seconds=1) * 10**6 + int(frac[:6].ljust(6, "0"))
    if not 1 <= micros < 2**53:
        raise NotASystemEvent(f"timestamp {text!r} is outside 1970..2255")
    rendered = f"{moment:%Y-%m-%dT%H:%M:%S}" + (f".{frac}" if frac else "") + "Z"
    return rendered, micros


def _offset(zone: str) -> timedelta:
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {zone} out of range")
    sign = -1 if zone[0] == "-" else 1
    return sign * timedelta(hours=hours, minutes=minutes)


def _object(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise NotASystemEvent(f"{where} is not a JSON object")
    return raw


def _text(obj: Mapping[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise NotASystemEvent(f"{where} has no {name}")
    return value


def _label(labels: Mapping[str, Any], name: str) -> str:
    value = labels.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise NotASystemEvent(f"resource.labels has no {name}")
    return value


def _optional(value: Any) -> str:
    """A field the entry may omit or Google may retype: kept when it is text, else ""."""
    return value if isinstance(value, str) else ""
