"""The event contract: the typed CloudEvent model, its two Pub/Sub encodings and the one decoder.

Standard library only, so that every subscriber (the example Cloud Functions vendor this file
with `bridge/keys.py` and `bridge/__init__.py`) decodes exactly what the bridge encodes. Building
an event is pure: the id, the sequence number and the observation time are given, never taken
from a clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

# The cloud's kinds (events the system-events function makes of Compute Engine's audit log).
from bridge.cloud_kinds import CLOUD_KINDS as CLOUD_KINDS

# The keys are declared in bridge.keys; the contract's names for them are re-exported here.
from bridge.keys import KEYS, KINDS
from bridge.keys import MAINTENANCE as MAINTENANCE
from bridge.keys import PREEMPTED as PREEMPTED
from bridge.keys import UPCOMING as UPCOMING
from bridge.keys import WATCHED_KEYS as WATCHED_KEYS

SPECVERSION = "1.0"
DEFAULT_TYPE_PREFIX = "io.github.maintenancebridge.gce.v1"
DATASCHEMA = "https://maintenance-bridge.github.io/schemas/v1/event-data.json"
DATA_CONTENT_TYPE = "application/json"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"

# CloudEvents attributes that are not extensions; everything else under ce-* is an extension.
_CORE_ATTRIBUTES = ("specversion", "id", "source", "type", "time", "subject", "dataschema")
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_INT64_TEXT = re.compile(r"[0-9]{1,19}")


class DecodeError(ValueError):
    """Raised for anything that is not a well-formed maintenance-bridge event.

    The only error the decoder raises; its message says what was wrong, so that a subscriber can
    log it and acknowledge the message instead of retrying it forever.
    """


@dataclass(frozen=True)
class Transition:
    """One observed change of a watched key, values in canonical form (see `transitions`)."""

    key: str
    previous: str
    current: str
    kind: str


@dataclass(frozen=True)
class Instance:
    """Who the event is about: read once from the metadata server at start."""

    id: str
    name: str
    zone: str
    project_id: str
    project_number: str
    hostname: str = ""


@dataclass(frozen=True)
class Scheduling:
    """The VM's `instance/scheduling/` values; "" where the key does not exist on this VM."""

    on_host_maintenance: str = ""
    automatic_restart: str = ""
    preemptible: str = ""
    provisioning_model: str = ""


@dataclass(frozen=True)
class Upcoming:
    """A maintenance window from `instance/upcoming-maintenance`."""

    type: str = ""
    can_reschedule: bool | None = None
    window_start_time: str = ""
    window_end_time: str = ""
    latest_window_start_time: str = ""
    maintenance_status: str = ""
    maintenance_reasons: tuple[str, ...] = ()

    @classmethod
    def from_canonical(cls, value: str) -> Upcoming | None:
        """The window in a canonical `upcoming-maintenance` value, or None for nothing scheduled."""
        if not value:
            return None
        raw = json.loads(value)
        if not isinstance(raw, dict):
            return cls(type=value)
        flag = raw.get("can_reschedule")
        reasons = raw.get("maintenance_reasons")
        if reasons is None:
            reasons = []
        return cls(
            type=_text(raw.get("type")),
            can_reschedule=None if flag is None else str(flag).lower() == "true",
            window_start_time=_text(raw.get("window_start_time")),
            window_end_time=_text(raw.get("window_end_time")),
            latest_window_start_time=_text(raw.get("latest_window_start_time")),
            maintenance_status=_text(raw.get("maintenance_status")),
            maintenance_reasons=tuple(_text(r) for r in reasons)
            if isinstance(reasons, list)
            else (_text(reasons),),
        )


@dataclass(frozen=True)
class CloudRecord:
    """What Compute Engine's system-event log says (`data.cloud`, on the cloud's events only):
    enough to find the entry again (log name, insert id) and to tell what the cloud saw."""

    log_name: str
    insert_id: str
    method: str
    timestamp: str  # when it happened, as the entry says (RFC 3339, up to nanoseconds)
    receive_timestamp: str = ""  # when Cloud Logging received the entry
    service: str = ""
    resource_name: str = ""  # projects/P/zones/Z/instances/NAME
    severity: str = ""
    status_message: str = ""  # e.g. "Instance terminated by Compute Engine."
    principal: str = ""  # system@google.com, or "" when the entry names nobody
    operation_id: str = ""  # systemevent-<ms>-...: one disruption, across its entries
    operation_producer: str = ""


@dataclass(frozen=True)
class EventData:
    """The `data` of every event (schemas/v1/event-data.schema.json)."""

    key: str
    previous: str
    current: str
    observed_at: str
    happened_while_down: bool
    sequence: int
    instance: Instance
    scheduling: Scheduling
    notice_seconds: int | None = None
    upcoming: Upcoming | None = None
    # Seen on the first reading after a start: the change may be older than observed_at.
    # Last, as additions within v1: events recorded by an older bridge lack them.
    at_startup: bool = False
    # The state store's UUID: a new state dir (a recreated VM) is a new stream, whose sequence
    # starts again at 1. Order and dedupe are on (instance id, stream_id, sequence).
    stream_id: str = ""
    # Who saw it: "" (a bridge, on its VM) or "cloud" (the system-event log, with `cloud`).
    origin: str = ""
    cloud: CloudRecord | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "previous": self.previous,
            "current": self.current,
            "observed_at": self.observed_at,
            "happened_while_down": self.happened_while_down,
            "at_startup": self.at_startup,
            "sequence": self.sequence,
            **({"stream_id": self.stream_id} if self.stream_id else {}),
            "instance": _fields(self.instance),
            "scheduling": _fields(self.scheduling),
        }
        if self.notice_seconds is not None:
            out["notice_seconds"] = self.notice_seconds
        if self.upcoming is not None:
            up = _fields(self.upcoming)
            up["maintenance_reasons"] = list(self.upcoming.maintenance_reasons)
            if self.upcoming.can_reschedule is None:
                del up["can_reschedule"]
            out["upcoming"] = up
        if self.origin:
            out["origin"] = self.origin
        if self.cloud is not None:
            out["cloud"] = _fields(self.cloud)
        return out


@dataclass(frozen=True)
class Event:
    """One CloudEvent 1.0 as the bridge emits it."""

    id: str
    source: str
    type: str
    time: str
    subject: str
    data: EventData
    extensions: Mapping[str, str] = field(default_factory=dict)
    dataschema: str = DATASCHEMA
    datacontenttype: str = DATA_CONTENT_TYPE
    specversion: str = SPECVERSION

    @property
    def kind(self) -> str:
        """The type without its (configurable) prefix, e.g. `maintenance.started`."""
        return ".".join(self.type.split(".")[-2:])

    def attributes(self) -> dict[str, str]:
        """Context attributes and extensions, without data."""
        out = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "subject": self.subject,
            "dataschema": self.dataschema,
            "datacontenttype": self.datacontenttype,
        }
        out.update(self.extensions)
        return out

    def to_structured(self) -> dict[str, Any]:
        """The structured-mode JSON object."""
        return {**self.attributes(), "data": self.data.to_json()}

    @cached_property
    def structured(self) -> bytes:
        """`to_structured()` serialised, once per event: the store, the stdout sink, hooks and
        the structured content modes all write these same bytes."""
        return dumps(self.to_structured())

    def to_pubsub(self, mode: str = "binary") -> tuple[dict[str, str], bytes]:
        """Message attributes and payload per Google's CloudEvents Pub/Sub binding."""
        if mode == "structured":
            return {"content-type": STRUCTURED_CONTENT_TYPE}, self.structured
        attrs = {f"ce-{k}": v for k, v in self.attributes().items() if k != "datacontenttype"}
        attrs["content-type"] = self.datacontenttype
        return attrs, dumps(self.data.to_json())


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the one serialisation used on every wire."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def rfc3339(moment: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix."""
    m = moment if moment.tzinfo is timezone.utc else moment.astimezone(timezone.utc)
    return (  # formatted by hand: strftime costs three times as much, five times per event
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond // 1000:03d}Z"
    )


def source_of(instance: Instance) -> str:
    """The instance's full resource name, the CloudEvents `source`."""
    return (
        f"//compute.googleapis.com/projects/{instance.project_id}"
        f"/zones/{instance.zone}/instances/{instance.name}"
    )


def build_event(
    transition: Transition,
    *,
    event_id: str,
    sequence: int,
    observed_at: datetime,
    instance: Instance,
    scheduling: Scheduling,
    happened_while_down: bool,
    notice_seconds: int | None,
    type_prefix: str = DEFAULT_TYPE_PREFIX,
    at_startup: bool = False,
    stream_id: str = "",
) -> Event:
    """The CloudEvent for one recorded transition; everything it depends on is an argument."""
    key = KEYS.get(transition.key)
    upcoming = None
    if key is not None and key.window:  # a cleared window is described by the one that went
        cleared = transition.current == key.baseline
        upcoming = Upcoming.from_canonical(transition.previous if cleared else transition.current)
    when = rfc3339(observed_at)
    data = EventData(
        key=transition.key,
        previous=transition.previous,
        current=transition.current,
        observed_at=when,
        happened_while_down=happened_while_down,
        sequence=sequence,
        instance=instance,
        scheduling=scheduling,
        notice_seconds=notice_seconds,
        upcoming=upcoming,
        at_startup=at_startup,
        stream_id=stream_id,
    )
    return Event(
        id=event_id,
        source=source_of(instance),
        type=f"{type_prefix}.{transition.kind}",
        time=when,
        subject=transition.key,
        data=data,
        extensions={
            "instanceid": instance.id,
            "zone": instance.zone,
            "project": instance.project_id,
        },
    )


# ---------------------------------------------------------------------------------------------
# Decoding: every envelope a subscriber meets, one error type.


def decode_pubsub(attributes: Mapping[str, str], data: bytes | str) -> Event:
    """A Pub/Sub message (attributes + payload), in binary or structured content mode."""
    if not isinstance(attributes, Mapping):
        raise DecodeError(f"message attributes must be a map, not {type(attributes).__name__}")
    if not isinstance(data, bytes | str):
        raise DecodeError(f"message data must be bytes, not {type(data).__name__}")
    content_type = attributes.get("content-type", attributes.get("Content-Type", ""))
    if not isinstance(content_type, str):
        raise DecodeError("the content-type attribute must be a string")
    payload = _json(data, "message data")
    if content_type.lower().startswith("application/cloudevents"):
        return decode_structured(payload)
    ce = {}
    for name, value in attributes.items():
        if isinstance(name, str) and name.startswith("ce-"):
            ce[name[3:]] = value
    ce["datacontenttype"] = content_type
    return _event(ce, payload, "binary-mode attributes")


def decode_structured(obj: Any) -> Event:
    """A structured-mode JSON CloudEvent (already parsed), e.g. one line of the stdout sink."""
    if not isinstance(obj, Mapping):
        raise DecodeError(f"a structured CloudEvent must be a JSON object, not {_kind(obj)}")
    attrs = {k: v for k, v in obj.items() if k not in ("data", "data_base64")}
    if "data" in obj:
        data = obj["data"]
    elif "data_base64" in obj:
        data = _json(_b64(obj["data_base64"], "data_base64"), "data_base64")
    else:
        raise DecodeError("the structured CloudEvent has no data")
    return _event(attrs, data, "structured CloudEvent")


def decode_message_published(payload: Any) -> Event:
    """The data of an Eventarc `google.cloud.pubsub.topic.v1.messagePublished` CloudEvent."""
    if not isinstance(payload, Mapping):
        raise DecodeError(f"messagePublished data must be a JSON object, not {_kind(payload)}")
    message = payload.get("message")
    if not isinstance(message, Mapping):
        raise DecodeError("messagePublished data has no message object")
    attributes = message.get("attributes") or {}
    raw = message.get("data", "")
    return decode_pubsub(attributes, _b64(raw, "message.data"))


def decode_push(body: bytes | str | Mapping[str, Any]) -> Event:
    """The body of a Pub/Sub push request (`{"message": {...}, "subscription": ...}`)."""
    if isinstance(body, bytes | str):
        body = _json(body, "push request body")
    return decode_message_published(body)


def _event(attrs: Mapping[str, Any], data: Any, where: str) -> Event:
    for name in ("specversion", "id", "source", "type"):
        if not isinstance(attrs.get(name), str) or not attrs[name]:
            raise DecodeError(f"{where}: required attribute {name!r} is missing or not a string")
    if attrs["specversion"] != SPECVERSION:
        raise DecodeError(f"{where}: unsupported specversion {attrs['specversion']!r}")
    kind = ".".join(attrs["type"].split(".")[-2:])
    if kind not in KINDS and kind not in CLOUD_KINDS:
        raise DecodeError(f"{where}: type {attrs['type']!r} is not a maintenance-bridge event")
    extensions: dict[str, str] = {}
    for name, value in attrs.items():
        if name in _CORE_ATTRIBUTES or name == "datacontenttype":
            continue
        # fullmatch: `$` would let a trailing newline through; "data" is reserved by the format.
        if not isinstance(name, str) or not _EXTENSION_NAME.fullmatch(name) or name == "data":
            raise DecodeError(f"{where}: invalid attribute name {name!r}")
        if not isinstance(value, str):
            raise DecodeError(f"{where}: attribute {name!r} must be a string")
        extensions[name] = value
    optional = {n: attrs.get(n, "") for n in ("time", "subject", "dataschema")}
    for name, value in optional.items():
        if not isinstance(value, str):
            raise DecodeError(f"{where}: attribute {name!r} must be a string")
    content_type = attrs.get("datacontenttype") or DATA_CONTENT_TYPE
    if not isinstance(content_type, str) or not content_type.startswith("application/json"):
        raise DecodeError(f"{where}: unsupported datacontenttype {content_type!r}")
    return Event(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        time=optional["time"],
        subject=optional["subject"],
        dataschema=optional["dataschema"],
        datacontenttype=content_type,
        data=_event_data(data),
        extensions=extensions,
    )


def _event_data(raw: Any) -> EventData:
    obj = _object(raw, "data")
    notice = obj.get("notice_seconds")
    if notice is not None and (type(notice) is not int or notice < 0):
        raise DecodeError("data.notice_seconds must be a non-negative integer")
    sequence = _int64(obj.get("sequence"))
    if sequence is None or sequence < 1:  # the schemas' minimum: every stream starts at 1
        raise DecodeError("data.sequence must be a positive integer (number or string)")
    down = obj.get("happened_while_down")
    if not isinstance(down, bool):
        raise DecodeError("data.happened_while_down must be a boolean")
    at_startup = obj.get("at_startup", False)
    if not isinstance(at_startup, bool):
        raise DecodeError("data.at_startup must be a boolean")
    upcoming = obj.get("upcoming")
    cloud = obj.get("cloud")
    return EventData(
        key=_str(obj, "key", "data"),
        previous=_str(obj, "previous", "data"),
        current=_str(obj, "current", "data"),
        observed_at=_str(obj, "observed_at", "data"),
        happened_while_down=down,
        sequence=sequence,
        instance=_record(Instance, obj.get("instance"), "data.instance"),
        scheduling=_record(Scheduling, obj.get("scheduling", {}), "data.scheduling"),
        notice_seconds=notice,
        upcoming=None if upcoming is None else _upcoming(upcoming),
        at_startup=at_startup,
        stream_id=_str(obj, "stream_id", "data", required=False),
        origin=_str(obj, "origin", "data", required=False),
        cloud=None if cloud is None else _record(CloudRecord, cloud, "data.cloud"),
    )


def _int64(value: Any) -> int | None:
    """An int64 as JSON carries it: a number, or (proto3's canonical JSON) a decimal string."""
    if isinstance(value, str) and _INT64_TEXT.fullmatch(value):
        value = int(value)
    if type(value) is not int or not -(2**63) <= value < 2**63:
        return None
    return value


def _upcoming(raw: Any) -> Upcoming:
    obj = _object(raw, "data.upcoming")
    flag = obj.get("can_reschedule")
    if flag is not None and not isinstance(flag, bool):
        raise DecodeError("data.upcoming.can_reschedule must be a boolean")
    reasons = obj.get("maintenance_reasons", [])
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise DecodeError("data.upcoming.maintenance_reasons must be a list of strings")
    texts = {
        name: _str(obj, name, "data.upcoming", required=False)
        for name in (
            "type",
            "window_start_time",
            "window_end_time",
            "latest_window_start_time",
            "maintenance_status",
        )
    }
    return Upcoming(can_reschedule=flag, maintenance_reasons=tuple(reasons), **texts)


def _record(cls: type, raw: Any, where: str) -> Any:
    obj = _object(raw, where)
    return cls(
        **{
            name: _str(obj, name, where, required=spec.default is MISSING)
            for name, spec in cls.__dataclass_fields__.items()
        }
    )


def _fields(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def _str(obj: Mapping[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = obj.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DecodeError(f"{where}.{name} is missing or not a string")
    return value


def _object(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise DecodeError(f"{where} must be a JSON object, not {_kind(raw)}")
    return raw


def _json(raw: bytes | str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DecodeError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError(f"{where} is not valid JSON: nested too deeply") from None


def _b64(raw: Any, where: str) -> bytes:
    if not isinstance(raw, str):
        raise DecodeError(f"{where} must be a base64 string, not {_kind(raw)}")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"{where} is not valid base64: {exc}") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any) -> str:
    return "" if value is None else str(value)
