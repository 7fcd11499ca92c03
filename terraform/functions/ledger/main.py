"""ledger: one Firestore document per instance with its current maintenance state and history.

Configuration (environment):
  LEDGER_COLLECTION   collection of instance documents (default `maintenance-ledger`).
  FIRESTORE_DATABASE  database id (default `(default)`).
  HISTORY_LIMIT       history entries kept on the instance document (default 50).
  SILENT_INTERVALS    heartbeat intervals of silence after which a notice still on is expired
                      (default 3; see expire_silent).
  EVENT_FILTER        optional JSON attribute filter, see subscriber.load_filter.
  GOOGLE_CLOUD_PROJECT / FIRESTORE_EMULATOR_HOST as usual for google-cloud-firestore.

Document `<collection>/<project_id>_<instance_id>`:
  instance     the instance's identity (name, zone, ids, hostname)
  state        per family (`maintenance`, `preemption`, `upcoming`): the latest transition
  disrupting   True while a maintenance event or a preemption is under way
  upcoming_window_start  Firestore timestamp of a scheduled window (absent when none)
  history      the last HISTORY_LIMIT transitions, in observation order
  heartbeat    the latest `bridge.heartbeat` (observed_at, sequence, stream_id, and
               interval_seconds, the gap to the one before): is the bridge alive?
  expired      set while a notice was expired because the bridge fell silent
and one sub-document `events/<stream_id>:<sequence>` per processed event (`<sha256(source, id)>`
for events of bridges older than stream_id): the de-duplication key, written in the same
transaction as the state, so a redelivered event changes nothing.

Order (docs/events.md, "Ordering"): within one stream (`data.stream_id`, one per bridge state
store) a family's state only moves forward in `data.sequence`; an older event still lands in the
history. A new stream (the VM's bridge started on an empty state dir and counts from 1 again)
supersedes the old one: streams of one instance follow each other, so the one observed later
is current.

A VM deleted during a notice never sends its `ended`: its document would say `disrupting`
forever. Every heartbeat (from any VM) sweeps the disrupting documents whose own bridge used to
beat and has been silent for SILENT_INTERVALS of its intervals, and expires them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

import functions_framework
from google.api_core import exceptions as gexc
from google.cloud import firestore
from subscriber import event_key, load_filter, log, parse_time, unwrap

from bridge.events import Event

COLLECTION = os.environ.get("LEDGER_COLLECTION", "maintenance-ledger")
DATABASE = os.environ.get("FIRESTORE_DATABASE", "(default)")
HISTORY_LIMIT = int(os.environ.get("HISTORY_LIMIT", "50"))
SILENT_INTERVALS = float(os.environ.get("SILENT_INTERVALS", "3"))
FILTER = load_filter()

_client: firestore.Client | None = None


def client() -> firestore.Client:
    """The Firestore client, created on first use so that importing needs no credentials."""
    global _client
    if _client is None:
        _client = firestore.Client(database=DATABASE)
    return _client


def _advances(event: Event, stored: dict[str, Any] | None) -> bool:
    """Whether `event` supersedes what is stored (a state or a heartbeat) for its instance."""
    if not stored:
        return True
    if stored.get("stream_id", "") == event.data.stream_id:
        return event.data.sequence > stored.get("sequence", -1)
    # Another stream: a late event of the old one, or the first events of a new one.
    now, before = parse_time(event.data.observed_at), parse_time(stored.get("observed_at", ""))
    return bool(now and before and now > before)


def _entry(event: Event, envelope: dict[str, Any]) -> dict[str, Any]:
    d = event.data
    entry = {
        "event_id": event.id,
        "event_source": event.source,
        "kind": event.kind,
        "key": d.key,
        "previous": d.previous,
        "current": d.current,
        "sequence": d.sequence,
        "stream_id": d.stream_id,
        "observed_at": d.observed_at,
        "happened_while_down": d.happened_while_down,
        "at_startup": d.at_startup,
        "notice_seconds": d.notice_seconds,
        "subscription": envelope.get("subscription"),
        "message_id": envelope.get("message_id"),
    }
    if d.upcoming is not None:
        entry["upcoming"] = {
            "type": d.upcoming.type,
            "window_start_time": d.upcoming.window_start_time,
            "window_end_time": d.upcoming.window_end_time,
            "maintenance_status": d.upcoming.maintenance_status,
            "can_reschedule": d.upcoming.can_reschedule,
        }
    return entry


def _disrupting(state: dict[str, Any]) -> bool:
    maintenance = state.get("maintenance", {}).get("current", "NONE")
    preempted = state.get("preemption", {}).get("current", "FALSE")
    return maintenance not in ("NONE", "") or preempted == "TRUE"


def doc_id(event: Event) -> str:
    inst = event.data.instance
    return f"{inst.project_id}_{inst.id}"


def record_heartbeat(db: firestore.Client, event: Event) -> str:
    """A heartbeat only moves `heartbeat` forward: no history, no marker (it is idempotent).
    It learns the bridge's interval, and brings back a notice expired while it was silent."""
    instance_ref = db.collection(COLLECTION).document(doc_id(event))
    beat: dict[str, Any] = {
        "observed_at": event.data.observed_at,
        "sequence": event.data.sequence,
        "stream_id": event.data.stream_id,
    }

    @firestore.transactional
    def apply(tx: firestore.Transaction) -> str:
        snap = instance_ref.get(transaction=tx)
        doc = (snap.to_dict() or {}) if snap.exists else {}
        stored = doc.get("heartbeat")
        if not _advances(event, stored):
            return "stale-heartbeat"
        if stored and stored.get("stream_id", "") == beat["stream_id"]:  # not across a restart
            now, before = parse_time(beat["observed_at"]), parse_time(stored["observed_at"])
            if now and before:
                beat["interval_seconds"] = (now - before).total_seconds()
        update: dict[str, Any] = {"heartbeat": beat, "updated_at": firestore.SERVER_TIMESTAMP}
        if "expired" in doc:
            update["expired"] = firestore.DELETE_FIELD
            update["disrupting"] = _disrupting(doc.get("state") or {})
        tx.set(instance_ref, update, merge=True)
        return "heartbeat"

    return apply(db.transaction())


def expire_silent(db: firestore.Client, now: datetime, collection: str = COLLECTION) -> list[str]:
    """Expire the notices of VMs whose bridge fell silent: returns the document ids expired.

    A VM deleted during a notice (a preempted Spot VM, a MIG scale-in) never sends `ended`.
    Only a bridge that beats can be judged: silent for SILENT_INTERVALS of its own heartbeat
    interval (learnt from its last two beats) means gone; the document keeps its state and
    history, stops counting as disrupting, and says why in `expired`.
    """
    expired = []
    col = db.collection(collection)
    for snap in col.where(filter=firestore.FieldFilter("disrupting", "==", True)).stream():
        beat = (snap.to_dict() or {}).get("heartbeat") or {}
        last, interval = parse_time(beat.get("observed_at", "")), beat.get("interval_seconds")
        if not last or not interval or now - last <= timedelta(seconds=SILENT_INTERVALS * interval):
            continue
        reason = (
            f"no heartbeat since {beat['observed_at']} ({SILENT_INTERVALS:g} intervals of "
            f"{interval:g} s): VM deleted or bridge stopped during the notice"
        )
        try:  # only if nothing arrived since the read; else the next sweep judges again
            snap.reference.update(
                {"disrupting": False, "expired": {"at": now, "reason": reason}},
                option=db.write_option(last_update_time=snap.update_time),
            )
        except gexc.FailedPrecondition:
            continue
        expired.append(snap.id)
    return expired


def record(db: firestore.Client, event: Event, envelope: dict[str, Any]) -> str:
    """Apply one event in a transaction; returns `applied`, `history-only` or `duplicate`."""
    if event.kind == "bridge.heartbeat":
        return record_heartbeat(db, event)
    instance_ref = db.collection(COLLECTION).document(doc_id(event))
    if event.data.stream_id:
        marker = f"{event.data.stream_id}:{event.data.sequence}"
    else:  # a bridge older than stream_id: its sequence may restart, its ids never repeat
        marker = hashlib.sha256(event_key(event).encode()).hexdigest()
    marker_ref = instance_ref.collection("events").document(marker)
    entry = _entry(event, envelope)

    @firestore.transactional
    def apply(tx: firestore.Transaction) -> str:
        if marker_ref.get(transaction=tx).exists:
            return "duplicate"
        snap = instance_ref.get(transaction=tx)
        doc = snap.to_dict() if snap.exists else {}
        state = dict(doc.get("state") or {})
        family = event.kind.split(".")[0]
        history = [*(doc.get("history") or []), entry]
        history.sort(key=lambda e: (e.get("observed_at", ""), e.get("sequence", 0)))
        outcome = "history-only"
        update: dict[str, Any] = {
            "instance": asdict(event.data.instance),
            "history": history[-HISTORY_LIMIT:],
            "updated_at": firestore.SERVER_TIMESTAMP,
        }
        if _advances(event, state.get(family)):
            outcome = "applied"
            state[family] = entry
            update["state"] = state
            update["disrupting"] = _disrupting(state)
            if family == "upcoming":
                start = None
                if event.kind != "upcoming.cleared" and event.data.upcoming is not None:
                    start = parse_time(event.data.upcoming.window_start_time)
                update["upcoming_window_start"] = start
        tx.set(instance_ref, update, merge=True)
        tx.set(marker_ref, {**entry, "recorded_at": firestore.SERVER_TIMESTAMP, "outcome": outcome})
        return outcome

    return apply(db.transaction())


def about_to_be_disrupted(
    db: firestore.Client,
    within: timedelta = timedelta(hours=24),
    now: datetime | None = None,
    collection: str = COLLECTION,
) -> list[dict[str, Any]]:
    """Which VMs are about to be disrupted? Those under way plus windows starting `within`.

    Two single-field queries (automatically indexed, no composite index to deploy), merged.
    """
    now = now or datetime.now(timezone.utc)
    docs = {}
    col = db.collection(collection)
    for snap in col.where(filter=firestore.FieldFilter("disrupting", "==", True)).stream():
        docs[snap.id] = snap.to_dict()
    soon = firestore.FieldFilter("upcoming_window_start", "<=", now + within)
    for snap in col.where(filter=soon).stream():
        docs.setdefault(snap.id, snap.to_dict())
    return [{"id": k, **v} for k, v in sorted(docs.items())]


@functions_framework.cloud_event
def handle(cloud_event) -> None:
    """Record the event once; ack malformed ones; Firestore errors raise and are retried."""
    event = unwrap(cloud_event, FILTER)
    if event is None:
        return
    data = cloud_event.get_data()
    envelope = {
        "subscription": data.get("subscription"),
        "message_id": (data.get("message") or {}).get("messageId"),
    }
    outcome = record(client(), event, envelope)
    log("INFO", f"ledger {outcome}", event_id=event.id, kind=event.kind, doc=doc_id(event))
    if outcome == "heartbeat":  # any bridge's beat is the clock that finds the silent ones
        for expired in expire_silent(client(), datetime.now(timezone.utc)):
            log("WARNING", "ledger expired a silent VM's notice", doc=expired)


if __name__ == "__main__":  # `python main.py [HOURS]`: print the VMs about to be disrupted.
    hours = float(sys.argv[1]) if len(sys.argv) > 1 else 24.0
    for vm in about_to_be_disrupted(client(), timedelta(hours=hours)):
        inst = vm.get("instance", {})
        start = vm.get("upcoming_window_start")
        print(
            f"{inst.get('name')} ({inst.get('zone')}): disrupting={vm.get('disrupting')}"
            f" window_start={start}"
        )
