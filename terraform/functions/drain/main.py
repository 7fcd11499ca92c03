"""drain: take an instance out of its load-balancer backend before maintenance, put it back after.

On a DRAIN_KINDS event (default `maintenance.started`, `preemption.started`) the instance is
removed from its unmanaged instance group (`instanceGroups.removeInstances`) or detached from its
zonal network endpoint group (`networkEndpointGroups.detachNetworkEndpoints`); on a RESTORE_KINDS
event (default `maintenance.ended`, `preemption.ended`) it is added / attached again. Calls go
through the Compute Engine REST API with google-auth's AuthorizedSession.

Configuration (environment):
  DRAIN_TARGETS      JSON list of backends, e.g.
                     [{"type": "instance_group", "zone": "us-central1-a", "name": "web"},
                      {"type": "network_endpoint_group", "zone": "us-central1-a", "name": "neg",
                       "port": 8080}]
                     Only targets in the event's zone (and project, if given) are touched.
  DRAIN_GROUP, DRAIN_ZONE   shorthand for one instance group.
  DRAIN_METADATA_KEY optional instance metadata key naming the VM's own backends
                     (`instanceGroups/NAME` or `networkEndpointGroups/NAME[:PORT]`, comma
                     separated, in the VM's zone); when the VM has it, it replaces DRAIN_TARGETS.
                     Needs compute.instances.get.
  COMPUTE_API_BASE   default https://compute.googleapis.com/compute/v1 (tests: a local fake).
  COMPUTE_ANONYMOUS  `1` to send no credentials (local fakes only).

Origin (docs/events.md, "Verified origin"): load balancing acts on what an event says about
an instance, so an event whose origin is not verified (unattested, forged for another VM,
replayed, altered) is logged with the reason and acknowledged without any backend change while
REQUIRE_ATTESTATION is on (the default). Off (a fleet whose bridges do not attest yet), it is
acted on like a verified one and logged as unverified. A refused event is not remembered as
processed: a forgery sent first under a genuine event's id must not make that one a duplicate.
  REQUIRE_ATTESTATION, ATTESTATION_CERTS_URL, CLOUD_EVENTS_IDENTITY   see subscriber.POLICY.

Idempotence: events are de-duplicated on source + id in memory, "already a member" / "not a
member" answers count as success, and an event older (lower `data.sequence`) than the last one
acted upon for the same instance and stream (`data.stream_id`: a bridge on a new state dir counts
from 1 again) is ignored, so a late `started` cannot undo an `ended`. Both
memories are per function instance: run it with max instances 1 (the module does).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import functions_framework
import google.auth
import requests
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from subscriber import (
    POLICY,
    SeenIds,
    TransientError,
    event_key,
    load_filter,
    log,
    origin_of,
    stream_key,
    unwrap,
)

from bridge.events import Event

API = os.environ.get("COMPUTE_API_BASE", "https://compute.googleapis.com/compute/v1").rstrip("/")
TIMEOUT = float(os.environ.get("COMPUTE_TIMEOUT_SECONDS", "20"))
DRAIN_KINDS = frozenset(
    os.environ.get("DRAIN_KINDS", "maintenance.started,preemption.started").split(",")
)
RESTORE_KINDS = frozenset(
    os.environ.get("RESTORE_KINDS", "maintenance.ended,preemption.ended").split(",")
)
METADATA_KEY = os.environ.get("DRAIN_METADATA_KEY", "")
FILTER = load_filter()
SEEN = SeenIds(int(os.environ.get("DEDUPE_SIZE", "10000")))
_last_sequence: dict[str, int] = {}
_lock = threading.Lock()
_session: AuthorizedSession | None = None

# Answers that mean "already in the wanted state".
_NOOP_REASONS = frozenset(
    {"memberAlreadyExists", "alreadyExists", "resourceNotFound", "notFound", "memberNotFound"}
)
_NOOP_TEXT = ("already a member", "not a member", "already exists", "does not exist")


@dataclass(frozen=True)
class Target:
    """One backend the instance belongs to."""

    type: str  # instance_group | network_endpoint_group
    zone: str
    name: str
    project: str = ""
    port: int | None = None


def _targets_from_env() -> list[Target]:
    raw = os.environ.get("DRAIN_TARGETS", "").strip()
    out = [Target(**t) for t in json.loads(raw)] if raw else []
    if os.environ.get("DRAIN_GROUP") and os.environ.get("DRAIN_ZONE"):
        out.append(Target("instance_group", os.environ["DRAIN_ZONE"], os.environ["DRAIN_GROUP"]))
    for t in out:
        if t.type not in ("instance_group", "network_endpoint_group"):
            raise ValueError(f"DRAIN_TARGETS: unknown type {t.type!r}")
    return out


TARGETS = _targets_from_env()


def session() -> AuthorizedSession:
    """One AuthorizedSession per instance (token refresh is handled by google-auth)."""
    global _session
    if _session is None:
        if os.environ.get("COMPUTE_ANONYMOUS") == "1":
            credentials = AnonymousCredentials()
        else:
            credentials, _ = google.auth.default(
                scopes=["https://www.googleapis.com/auth/cloud-platform"]
            )
        _session = AuthorizedSession(credentials)
    return _session


def _call(method: str, path: str, body: dict | None = None) -> requests.Response:
    try:
        resp = session().request(method, f"{API}/{path}", json=body, timeout=TIMEOUT)
    except requests.RequestException as exc:
        raise TransientError(f"Compute API unreachable: {exc}") from exc
    if resp.status_code in (401, 403, 408, 429) or resp.status_code >= 500:
        # 403 included: fresh IAM grants take minutes to propagate; retrying then succeeds.
        raise TransientError(f"Compute API {method} {path} answered {resp.status_code}")
    return resp


def _noop(resp: requests.Response) -> bool:
    try:
        error = resp.json().get("error", {})
    except ValueError:
        return False
    reasons = {e.get("reason", "") for e in error.get("errors", []) if isinstance(e, dict)}
    text = str(error.get("message", "")).lower()
    return bool(reasons & _NOOP_REASONS) or any(t in text for t in _NOOP_TEXT)


def _targets_from_metadata(event: Event) -> list[Target] | None:
    inst = event.data.instance
    resp = _call("GET", f"projects/{inst.project_id}/zones/{inst.zone}/instances/{inst.name}")
    if resp.status_code != 200:
        log("WARNING", f"instance lookup answered {resp.status_code}", instance=inst.name)
        return None
    items = resp.json().get("metadata", {}).get("items", [])
    value = next((i.get("value", "") for i in items if i.get("key") == METADATA_KEY), "")
    out = []
    for ref in filter(None, (part.strip() for part in value.split(","))):
        parts = ref.split("/")
        zone = parts[1] if len(parts) == 4 and parts[0] == "zones" else inst.zone
        kind, name = parts[-2], parts[-1]
        port = None
        if ":" in name:
            name, port_text = name.split(":", 1)
            port = int(port_text)
        type_ = "instance_group" if kind == "instanceGroups" else "network_endpoint_group"
        out.append(Target(type_, zone, name, inst.project_id, port))
    return out or None


def _apply(target: Target, event: Event, drain: bool) -> str:
    inst = event.data.instance
    project = target.project or inst.project_id
    if target.type == "instance_group":
        verb = "removeInstances" if drain else "addInstances"
        path = f"projects/{project}/zones/{target.zone}/instanceGroups/{target.name}/{verb}"
        ref = f"projects/{inst.project_id}/zones/{inst.zone}/instances/{inst.name}"
        body: dict = {"instances": [{"instance": ref}]}
    else:
        verb = "detachNetworkEndpoints" if drain else "attachNetworkEndpoints"
        path = f"projects/{project}/zones/{target.zone}/networkEndpointGroups/{target.name}/{verb}"
        endpoint: dict = {"instance": inst.name}
        if target.port is not None:
            endpoint["port"] = target.port
        body = {"networkEndpoints": [endpoint]}
    resp = _call("POST", path, body)
    if resp.status_code == 200:
        op = resp.json().get("name", "")
        log("INFO", f"{verb} accepted", target=target.name, instance=inst.name, operation=op)
        return "done"
    if _noop(resp):
        log("INFO", f"{verb}: already in that state", target=target.name, instance=inst.name)
        return "noop"
    log(
        "ERROR",
        f"{verb} rejected with {resp.status_code}; acked",
        target=target.name,
        instance=inst.name,
        body=resp.text[:500],
    )
    return "rejected"


@functions_framework.cloud_event
def handle(cloud_event) -> None:
    """Drain or restore once per event; ack malformed ones; raise on transient API faults."""
    event = unwrap(cloud_event, FILTER)
    if event is None:
        return
    drain = event.kind in DRAIN_KINDS
    if not drain and event.kind not in RESTORE_KINDS:
        log("INFO", "nothing to do for this kind", kind=event.kind, event_id=event.id)
        return
    verdict = origin_of(event, cloud_event)
    if not verdict.verified:
        if POLICY.require_attestation:
            log("WARNING", f"not acted on: {verdict.reason}; acked", event_id=event.id)
            return
        log("WARNING", "acting on an unverified event (REQUIRE_ATTESTATION off)", event_id=event.id)
    key = event_key(event)
    inst = event.data.instance
    stream = stream_key(event)
    with _lock:
        if key in SEEN:
            log("INFO", "duplicate event skipped", event_id=event.id)
            return
        if event.data.sequence < _last_sequence.get(stream, -1):
            log(
                "WARNING",
                "older than the last event acted upon; ignored",
                event_id=event.id,
                sequence=event.data.sequence,
            )
            SEEN.add(key)
            return
    targets = (_targets_from_metadata(event) if METADATA_KEY else None) or [
        t for t in TARGETS if t.zone == inst.zone and t.project in ("", inst.project_id)
    ]
    if not targets:
        log("INFO", "no backend configured for this instance", instance=inst.name, zone=inst.zone)
    failures = []
    for target in targets:
        try:
            _apply(target, event, drain)
        except TransientError as exc:
            failures.append(str(exc))
    if failures:
        raise TransientError("; ".join(failures))
    with _lock:
        SEEN.add(key)
        _last_sequence[stream] = max(event.data.sequence, _last_sequence.get(stream, -1))
