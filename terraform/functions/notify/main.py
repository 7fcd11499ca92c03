"""notify: post each maintenance event to a chat webhook (Google Chat or Slack).

Configuration (environment):
  WEBHOOK_SECRET   Secret Manager secret holding the webhook URL
                   (`projects/P/secrets/S`, latest version is read, cached WEBHOOK_CACHE_SECONDS).
  WEBHOOK_URL      overrides the secret (local tests, or a URL that is not secret).
  CHAT_FORMAT      `google_chat` (default) or `slack`.
  EVENT_FILTER     optional JSON attribute filter, see subscriber.load_filter.
  SKIP_KINDS       kinds never posted (default `bridge.heartbeat`: liveness is not news).
  DEDUPE_SIZE      how many event ids the in-memory de-duplication remembers (default 10000).

Origin (docs/events.md, "Verified origin"): an event whose origin is not verified is posted all
the same, its message starting with `[unverified origin: REASON]`, whatever REQUIRE_ATTESTATION
says (a person reads it and decides; a page that never comes is worse than a marked one). It is
de-duplicated apart from verified events, so a forgery sent first under a genuine event's id does
not silence the genuine one.

Duplicates are suppressed per function instance only (a bounded in-memory LRU): a redelivery that
lands on another instance, or after a restart, posts again. For chat that is an accepted cost;
the ledger shows the durable alternative.
"""

from __future__ import annotations

import base64
import os
import threading
import time

import functions_framework
import google.auth
import requests
from google.auth.transport.requests import AuthorizedSession
from subscriber import (
    SeenIds,
    TransientError,
    event_key,
    instance_key,
    load_filter,
    log,
    origin_of,
    unwrap,
)

from bridge.events import Event

SECRET_API = os.environ.get("SECRET_MANAGER_API", "https://secretmanager.googleapis.com/v1")
CHAT_FORMAT = os.environ.get("CHAT_FORMAT", "google_chat")
CACHE_SECONDS = float(os.environ.get("WEBHOOK_CACHE_SECONDS", "300"))
TIMEOUT = float(os.environ.get("WEBHOOK_TIMEOUT_SECONDS", "10"))
FILTER = load_filter()
SKIP_KINDS = frozenset(filter(None, os.environ.get("SKIP_KINDS", "bridge.heartbeat").split(",")))
SEEN = SeenIds(int(os.environ.get("DEDUPE_SIZE", "10000")))

if CHAT_FORMAT not in ("google_chat", "slack"):
    raise ValueError(f"CHAT_FORMAT must be google_chat or slack, not {CHAT_FORMAT!r}")


_cache_lock = threading.Lock()
_cached: tuple[float, str] | None = None


def webhook_url() -> str:
    """The webhook URL: WEBHOOK_URL, else the latest version of WEBHOOK_SECRET (cached)."""
    global _cached
    override = os.environ.get("WEBHOOK_URL")
    if override:
        return override
    secret = os.environ["WEBHOOK_SECRET"]
    with _cache_lock:
        if _cached and time.monotonic() - _cached[0] < CACHE_SECONDS:
            return _cached[1]
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
        session = AuthorizedSession(credentials)
        try:
            resp = session.get(f"{SECRET_API}/{secret}/versions/latest:access", timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise TransientError(f"Secret Manager unreachable: {exc}") from exc
        if resp.status_code != 200:
            # Also for 403/404: a missing secret version is fixed by adding one, then retries win.
            raise TransientError(f"Secret Manager answered {resp.status_code}: {resp.text[:200]}")
        url = base64.b64decode(resp.json()["payload"]["data"]).decode().strip()
        _cached = (time.monotonic(), url)
        return url


def _duration(seconds: int) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


_WHAT = {
    "MIGRATE_ON_HOST_MAINTENANCE": "live migration",
    "TERMINATE_ON_HOST_MAINTENANCE": "host maintenance (the VM will be stopped)",
}


def describe(event: Event) -> str:
    """One readable line, e.g. `demo-vm (us-central1-a): live migration starts in 60 s`."""
    d = event.data
    who = f"{d.instance.name} ({d.instance.zone})"
    kind = event.kind
    what = _WHAT.get(d.current, f"maintenance event {d.current}")
    if kind == "maintenance.started":
        notice = d.notice_seconds
        text = f"{what} starts in {_duration(notice)}" if notice else f"{what} started"
    elif kind == "maintenance.changed":
        text = f"maintenance changed from {d.previous} to {d.current}"
    elif kind == "maintenance.ended":
        text = f"{_WHAT.get(d.previous, 'maintenance')} ended"
    elif kind == "preemption.started":
        notice = f", powering off in {_duration(d.notice_seconds)}" if d.notice_seconds else ""
        text = f"preempted{notice}"
    elif kind == "preemption.changed":
        text = f"preemption flag changed from {d.previous} to {d.current}"
    elif kind == "preemption.ended":
        text = "preemption flag cleared"
    elif kind in ("upcoming.scheduled", "upcoming.updated") and d.upcoming:
        up = d.upcoming
        verb = "scheduled" if kind == "upcoming.scheduled" else "rescheduled"
        window = f"{up.window_start_time or '?'} - {up.window_end_time or '?'}"
        extra = [x for x in (up.type, up.maintenance_status) if x]
        if up.can_reschedule is not None:
            extra.append("can be rescheduled" if up.can_reschedule else "cannot be rescheduled")
        text = f"maintenance {verb} for {window}" + (f" ({', '.join(extra)})" if extra else "")
    elif kind == "upcoming.cleared":
        text = "scheduled maintenance cleared"
    elif d.cloud is not None:  # the cloud's system-event log (the system-events function)
        said = f": {d.cloud.status_message}" if d.cloud.status_message else ""
        text = f"the cloud logged {d.cloud.method}{said}"
    else:
        text = f"{kind}: {d.previous or '-'} -> {d.current or '-'}"
    if d.happened_while_down:
        text += " (noticed when the bridge restarted)"
    return f"{who}: {text}"


def payload(event: Event, fmt: str = CHAT_FORMAT, unverified: str = "") -> dict:
    """The webhook body for Google Chat (threaded per instance) or Slack (Block Kit); with
    `unverified` (why its origin is not verified), marked as such in the first words."""
    text = describe(event)
    if unverified:
        text = f"[unverified origin: {unverified}] {text}"
    footer = f"{event.kind} · event {event.id} · {event.data.observed_at}"
    if fmt == "slack":
        return {
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*{text}*"}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": footer}]},
            ],
        }
    return {"text": f"*{text}*\n{footer}", "thread": {"threadKey": instance_key(event)}}


def _target(url: str) -> str:
    if CHAT_FORMAT == "google_chat" and "messageReplyOption=" not in url:
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
    return url


@functions_framework.cloud_event
def handle(cloud_event) -> None:
    """Post the event once; ack malformed or rejected ones, raise on transient faults."""
    event = unwrap(cloud_event, FILTER)
    if event is None:
        return
    if event.kind in SKIP_KINDS:
        log("INFO", "kind not posted", event_id=event.id, kind=event.kind)
        return
    verdict = origin_of(event, cloud_event)
    key = event_key(event) + ("" if verdict.verified else "\nunverified")
    if key in SEEN:
        log("INFO", "duplicate event skipped", event_id=event.id, event_source=event.source)
        return
    try:
        resp = requests.post(
            _target(webhook_url()), json=payload(event, unverified=verdict.reason), timeout=TIMEOUT
        )
    except requests.RequestException as exc:
        raise TransientError(f"webhook unreachable: {exc}") from exc
    if resp.status_code == 429 or resp.status_code >= 500:
        raise TransientError(f"webhook answered {resp.status_code}")
    if resp.status_code >= 400:
        # A permanent rejection (bad payload, revoked webhook): retrying cannot fix it.
        log(
            "ERROR",
            f"webhook rejected the message with {resp.status_code}; acked",
            event_id=event.id,
            body=resp.text[:500],
        )
    else:
        log("INFO", "notification posted", event_id=event.id, kind=event.kind)
    SEEN.add(key)
