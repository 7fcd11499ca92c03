"""system-events: Compute Engine's system-event log, published as the fleet's CloudEvents.

A log sink routes every System Event audit log entry of the fleet's instances (host errors,
preemptions, migrations, ...) to a topic of its own; this function, triggered by that topic,
turns each entry into one CloudEvent of the project's contract (bridge/system_events.py) and
publishes it on the main topic, beside the bridges' events: the one place where every
disruption of every VM shows, from whichever side saw it first.

Delivery: what Eventarc sends for a Pub/Sub trigger (messagePublished), whose message data is
the LogEntry JSON. At least once: a redelivered entry becomes the same event under the same id.
A malformed entry, or one of another log or service, is logged once and acknowledged (no retry
makes it publishable); a failed publish raises `TransientError` so that the trigger retries.

Published in binary content mode, as the bridges publish by default and as the main topic's
Avro schema needs, with the instance id as ordering key.

Origin (docs/events.md, "Verified origin"): each event is attested with this function's own
identity token (google-auth's `fetch_id_token`: the metadata server of Cloud Run functions names
the function's service account in the token's `email`), bound to the event by
`bridge.origin.binding_of` and carried in its `attestation1..N` extensions. Consumers check a
cloud event (`data.origin` "cloud") against CLOUD_EVENTS_IDENTITY, that service account: no VM
can get a token naming it, so no VM can speak as the cloud. No token to be had: the event is
published unattested (consumers then mark it or, drain, do not act on it) and that is logged;
the cloud's record is not held back for it.

Configuration (environment):
  EVENTS_TOPIC     the main topic, projects/P/topics/T (required).
  TYPE_PREFIX      CloudEvents type prefix (default the bridge's own).
  PUBLISH_TIMEOUT  seconds to wait for Pub/Sub to accept one event (default 30).
  PUBSUB_EMULATOR_HOST as usual for google-cloud-pubsub.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping

import functions_framework
import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.id_token
from google.cloud import pubsub_v1
from subscriber import TransientError, log

from bridge import origin
from bridge.events import DEFAULT_TYPE_PREFIX, Event
from bridge.system_events import NotASystemEvent, convert, parse

EVENTS_TOPIC = os.environ.get("EVENTS_TOPIC", "")
TYPE_PREFIX = os.environ.get("TYPE_PREFIX", "") or DEFAULT_TYPE_PREFIX
PUBLISH_TIMEOUT = float(os.environ.get("PUBLISH_TIMEOUT", "30"))
if not re.fullmatch(r"projects/[^/]+/topics/[^/]+", EVENTS_TOPIC):
    raise RuntimeError(f"EVENTS_TOPIC must be projects/P/topics/T, not {EVENTS_TOPIC!r}")

_publisher: pubsub_v1.PublisherClient | None = None


def publisher() -> pubsub_v1.PublisherClient:
    """The client, created on first use (no credentials needed to import); ordering on, since
    every event carries its instance's ordering key as a bridge's does."""
    global _publisher
    if _publisher is None:
        _publisher = pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        )
    return _publisher


def attested(event: Event) -> Event:
    """The event carrying this function's identity token for it, or as it is (logged) when no
    token can be had: the metadata server unreachable, or no service account to sign for."""
    try:
        request = google.auth.transport.requests.Request()
        token = google.oauth2.id_token.fetch_id_token(request, origin.binding_of(event))
        return origin.with_token(event, token)
    except (google.auth.exceptions.GoogleAuthError, ValueError) as exc:
        log("WARNING", f"no identity token; published unattested: {exc}", event_id=event.id)
        return event


def entry_of(data: object) -> bytes:
    """The LogEntry bytes inside a messagePublished payload."""
    message = data.get("message") if isinstance(data, Mapping) else None
    raw = message.get("data") if isinstance(message, Mapping) else None
    if not isinstance(raw, str):
        raise NotASystemEvent("the delivery has no message data")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NotASystemEvent(f"message data is not base64: {exc}") from None


@functions_framework.cloud_event
def handle(cloud_event) -> None:
    """One entry -> one event on the main topic; ack what can never be published."""
    data = cloud_event.get_data()
    message = data.get("message") if isinstance(data, Mapping) else None
    envelope = {
        "ce_id": cloud_event.get("id"),
        "message_id": message.get("messageId") if isinstance(message, Mapping) else None,
    }
    try:
        event = convert(parse(entry_of(data)), type_prefix=TYPE_PREFIX)
    except NotASystemEvent as exc:
        what = "unrelated entry" if exc.unrelated else "malformed entry"
        log("WARNING" if exc.unrelated else "ERROR", f"{what} acked: {exc}", **envelope)
        return
    attributes, payload = attested(event).to_pubsub("binary")
    key = event.extensions["instanceid"]
    fields = {**envelope, "event_id": event.id, "kind": event.kind, "instance": key}
    try:
        future = publisher().publish(EVENTS_TOPIC, payload, ordering_key=key, **attributes)
        published = future.result(timeout=PUBLISH_TIMEOUT)
    except Exception as exc:  # any failure: the trigger retries; the same entry, the same id
        publisher().resume_publish(EVENTS_TOPIC, key)  # a failed key stays paused otherwise
        log("ERROR", f"publish failed, will be retried: {exc!r}", **fields)
        raise TransientError(f"publishing {event.id} failed: {exc!r}") from exc
    log("INFO", "cloud event published", published_id=published, **fields)
