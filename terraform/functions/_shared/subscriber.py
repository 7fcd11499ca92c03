"""What every example subscriber needs: unwrap, filter, identify, verify, deduplicate, log,
retry.

Terraform copies this file next to each function's `main.py` (with `bridge/events.py`, the
project's one decoder, `bridge/origin.py`, its origin verifier, and `bridge/keys.py`;
functions/archive.json lists them) in the function's zip, so every subscriber treats the
envelope the same way: a malformed message is logged and acknowledged, never raised (with
retries on, a raise would loop), and only a `TransientError` propagates so that Eventarc /
Pub/Sub retries the delivery.

Origin (docs/events.md, "Verified origin"): `POLICY` is read from the function's environment
when the function loads (REQUIRE_ATTESTATION, ATTESTATION_CERTS_URL, CLOUD_EVENTS_IDENTITY; a
malformed value stops the start-up rather than running with a policy nobody chose), and
`origin_of` gives each event's verdict. What a function does with an unverified event is its
own: drain does not act on it while REQUIRE_ATTESTATION is on; the ledger, the board and notify
mark it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from bridge import origin
from bridge.events import DecodeError, Event, decode_message_published, decode_structured

MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
POLICY = origin.Policy.from_env(os.environ)
# Fetched on the first attested event and kept an hour: one round trip per instance, not per event.
CERTS = origin.Certs(POLICY.certs_url)


class TransientError(RuntimeError):
    """Raised so that the trigger retries the delivery (network fault, 5xx, 429, IAM lag)."""


def log(severity: str, message: str, **fields: Any) -> None:
    """One JSON line on stdout: Cloud Logging parses it into a structured entry with severity."""
    entry = {"severity": severity, "message": message, **fields}
    print(json.dumps(entry, default=str, sort_keys=True), file=sys.stdout, flush=True)


class SeenIds:
    """A bounded, thread-safe LRU of processed event keys.

    Per function instance and lost on restart: it stops the common case (Pub/Sub redelivering a
    message seconds later to the same instance) but not a duplicate that lands on another
    instance. Subscribers whose effect must happen exactly once keep the ids in durable storage
    (the ledger does, in Firestore).
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = max(1, limit)
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            if key in self._ids:
                self._ids.move_to_end(key)  # type: ignore[arg-type]
                return True
            return False

    def add(self, key: str) -> None:
        with self._lock:
            self._ids[key] = None
            self._ids.move_to_end(key)
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)


def event_key(event: Event) -> str:
    """The identity of an inner event, the dedupe key: CloudEvents makes `source` + `id` unique."""
    return f"{event.source}\n{event.id}"


def instance_key(event: Event) -> str:
    """The VM an event is about, unique across projects and zones."""
    inst = event.data.instance
    return f"{inst.project_id}/{inst.zone}/{inst.id}"


def stream_key(event: Event) -> str:
    """The stream whose `data.sequence` orders the event: one bridge state store on one VM (a
    bridge on a new state dir counts from 1 again, under a new `data.stream_id`)."""
    return f"{instance_key(event)}/{event.data.stream_id}"


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time from an event or a Firestore document (a string, or a datetime the
    client already parsed), always timezone-aware; None for anything else: a ledger entry is
    written from untrusted events."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def load_filter(raw: str | None = None) -> dict[str, frozenset[str]]:
    """The accepted values per attribute, from `EVENT_FILTER` (JSON: name -> list of values).

    Names are the Pub/Sub attribute names the bridge writes (`ce-type`, `ce-zone`, ...). An empty
    or absent filter accepts everything. Malformed configuration fails loudly at start-up.
    """
    raw = os.environ.get("EVENT_FILTER", "") if raw is None else raw
    if not raw.strip():
        return {}
    parsed = json.loads(raw)
    if not isinstance(parsed, dict):
        raise ValueError("EVENT_FILTER must be a JSON object of attribute -> [values]")
    out: dict[str, frozenset[str]] = {}
    for name, values in parsed.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"EVENT_FILTER[{name!r}] must be a list of strings")
        if values:
            out[str(name)] = frozenset(values)
    return out


def accepts(event: Event, wanted: Mapping[str, frozenset[str]]) -> bool:
    """Whether the event passes the filter: every listed attribute must have a listed value.

    Matched on the decoded event's attributes rather than on the raw message attributes, so the
    filter works for structured-mode messages too (whose only Pub/Sub attribute is content-type).
    """
    attributes = event.attributes()
    for name, values in wanted.items():
        bare = name[3:] if name.startswith("ce-") else name
        if attributes.get(bare) not in values:
            return False
    return True


def unwrap(cloud_event: Any, wanted: Mapping[str, frozenset[str]]) -> Event | None:
    """The maintenance event inside an Eventarc messagePublished CloudEvent, or sent directly
    by the bridge's HTTP sink; None to ack.

    Logs the envelope (type, source, subscription) first: a push that the Functions Framework
    converted from a plain Pub/Sub push body has no subscription, which the logs then show.
    """
    data = cloud_event.get_data()
    envelope = {
        "ce_type": cloud_event.get("type"),
        "ce_source": cloud_event.get("source"),
        "ce_id": cloud_event.get("id"),
        "subscription": data.get("subscription") if isinstance(data, Mapping) else None,
    }
    try:
        if cloud_event.get("type") == MESSAGE_PUBLISHED:
            event = decode_message_published(data)
        else:  # the bridge's own event, POSTed straight by its HTTP sink (docs/http.md)
            event = decode_structured({**cloud_event.get_attributes(), "data": data})
    except DecodeError as exc:
        log("ERROR", f"malformed message acked: {exc}", error="DecodeError", **envelope)
        return None
    fields = {**envelope, "event_id": event.id, "event_source": event.source, "kind": event.kind}
    if not accepts(event, wanted):
        log("INFO", "event filtered out; acked", **fields)
        return None
    log("INFO", "event received", **fields)
    return event


def published_at(cloud_event: Any) -> float:
    """When the event was published (epoch seconds), the time its token is judged at: the
    Pub/Sub message's publishTime for a messagePublished delivery, so that a redelivery hours
    later is judged as of its first publication; now for an event POSTed straight by the HTTP
    sink (no one else records when it was sent), or a delivery without a readable publishTime."""
    message = _message(cloud_event)
    if message is not None:
        moment = parse_time(message.get("publishTime") or message.get("publish_time"))
        if moment is not None:
            return moment.timestamp()
    return time.time()


def as_published(cloud_event: Any) -> Mapping[str, Any] | None:
    """The event as its sender wrote it, what the token's audience digests
    (`origin.signed_part_of_message`): from the Pub/Sub message itself, so that a field a newer
    bridge adds, which the decoder drops, is still digested; for an HTTP POST, the CloudEvent's
    attributes and data as the framework read them. None: digest the decoded event."""
    message = _message(cloud_event)
    if message is None:
        return {**cloud_event.get_attributes(), "data": cloud_event.get_data()}
    attributes = message.get("attributes")
    try:
        payload = base64.b64decode(str(message.get("data", "")), validate=True)
        return origin.signed_part_of_message(
            attributes if isinstance(attributes, Mapping) else {}, payload
        )
    except ValueError:  # decoded already, so not expected; the decoded event still binds
        return None


def _message(cloud_event: Any) -> Mapping[str, Any] | None:
    """The Pub/Sub message of a messagePublished delivery; None for an HTTP POST."""
    if cloud_event.get("type") != MESSAGE_PUBLISHED:
        return None
    data = cloud_event.get_data()
    message = data.get("message") if isinstance(data, Mapping) else None
    return message if isinstance(message, Mapping) else None


def origin_of(event: Event, cloud_event: Any) -> origin.Verdict:
    """The origin verdict of an unwrapped event, under POLICY; an unverified one is logged with
    the reason. The certificates are fetched only for an event that carries a token; a fetch
    that fails raises TransientError (the trigger retries): Google's endpoint being unreachable
    says nothing about who signed the event."""
    certs: Mapping[str, str] = {}
    token = origin.token_of(event)
    if token is not None:
        try:
            certs = CERTS.get(origin.key_id(token))
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise TransientError(f"signing certificates unavailable: {exc}") from exc
    verdict = origin.check(
        event,
        at=published_at(cloud_event),
        certs=certs,
        cloud_identity=POLICY.cloud_identity,
        signed=as_published(cloud_event),
    )
    if not verdict.verified:
        log(
            "WARNING",
            f"origin not verified: {verdict.reason}",
            event_id=event.id,
            event_source=event.source,
            kind=event.kind,
            attested=verdict.attested,
            require_attestation=POLICY.require_attestation,
        )
    return verdict
