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
  has_bridge   False when only the cloud's events (cloud.*, the system-events function) ever
               named the instance: it has no bridge, or one that never published
  disruptions  the last DISRUPTION_LIMIT disruptions, each one record whichever side saw it
               (see reconcile): cause, started_at, ended_at (ended_by), seen_by (`bridge`,
               `cloud`), the events it is made of, the cloud's message (`error`)
and one sub-document `events/<stream_id>:<sequence>` per processed event (`<sha256(source, id)>`
for events of bridges older than stream_id): the de-duplication key, written in the same
transaction as the state, so a redelivered event changes nothing.

Order (docs/events.md, "Ordering"): within one stream (`data.stream_id`, one per bridge state
store) a family's state only moves forward in `data.sequence`; an older event still lands in the
history. A new stream (the VM's bridge started on an empty state dir and counts from 1 again)
supersedes the old one: streams of one instance follow each other, so the one observed later
is current.

The cloud's events (`data.origin` "cloud": Compute Engine's system-event log) are recorded in
the same document: under `state.cloud` (their own stream, ordered by the entry's timestamp),
in the history, and reconciled with the bridge's into `disruptions`: a bridge's
`maintenance.started`, the cloud's `cloud.migrated` and the bridge's `maintenance.ended` are one
disruption seen by both; a host error or a preemption the cloud logged confirms or closes the
disruption the VM announced, or is one of its own when no bridge saw it. Their markers are keyed
on the event id (derived from the log entry), so a redelivered entry changes nothing.

Origin (docs/events.md, "Verified origin"): every entry (state, history, marker, heartbeat)
records `verified` (True: signed by the VM it speaks for, or by the system-events function for
the cloud's events) and, when not, `origin_reason` (unattested, another instance's token, a
replayed token, an altered payload, ...). Nothing is refused here: an unverified event is
recorded like any other and shown as unverified (the board marks it), whatever
REQUIRE_ATTESTATION says. Two rules keep a forgery from hiding the truth: a verified event
supersedes a state an unverified one set, whatever their order; and an unverified event's
marker is its own digest, so a forgery sent first under a genuine event's stream and sequence
does not make the genuine one a duplicate.

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
from subscriber import event_key, load_filter, log, origin_of, parse_time, unwrap

from bridge import origin
from bridge.cloud_kinds import CLOUD_KEY, UPCOMING_COMPLETED, UPCOMING_SCHEDULED, UPCOMING_UPDATED
from bridge.events import Event

COLLECTION = os.environ.get("LEDGER_COLLECTION", "maintenance-ledger")
DATABASE = os.environ.get("FIRESTORE_DATABASE", "(default)")
HISTORY_LIMIT = int(os.environ.get("HISTORY_LIMIT", "50"))
SILENT_INTERVALS = float(os.environ.get("SILENT_INTERVALS", "3"))
# How far apart the VM's notice and the cloud's record of one disruption may be: a TERMINATE
# notice comes an hour ahead, and the log is written when the disruption happens.
MATCH_SECONDS = float(os.environ.get("MATCH_SECONDS", "7200"))
DISRUPTION_LIMIT = 20
FILTER = load_filter()

_client: firestore.Client | None = None


def client() -> firestore.Client:
    """The Firestore client, created on first use so that importing needs no credentials."""
    global _client
    if _client is None:
        _client = firestore.Client(database=DATABASE)
    return _client


def _advances(event: Event, stored: dict[str, Any] | None, verified: bool = True) -> bool:
    """Whether `event` supersedes what is stored (a state or a heartbeat) for its instance; a
    verified event always supersedes what an unverified one set (a forged high sequence must
    not hold the instance's state)."""
    if not stored or (verified and stored.get("verified") is False):
        return True
    if stored.get("stream_id", "") == event.data.stream_id:
        return event.data.sequence > stored.get("sequence", -1)
    # Another stream: a late event of the old one, or the first events of a new one.
    now, before = parse_time(event.data.observed_at), parse_time(stored.get("observed_at", ""))
    return bool(now and before and now > before)


def _entry(event: Event, envelope: dict[str, Any], verdict: origin.Verdict) -> dict[str, Any]:
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
        "verified": verdict.verified,
        "origin_reason": verdict.reason,
    }
    if d.cloud is not None:
        entry["origin"] = d.origin
        entry["cloud"] = {
            "method": d.cloud.method,
            "status_message": d.cloud.status_message,
            "operation_id": d.cloud.operation_id,
            "log_name": d.cloud.log_name,
            "insert_id": d.cloud.insert_id,
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


# --- one disruption, whichever side saw it -----------------------------------------------------

KNOWN_BY_BRIDGE = ("maintenance", "preemption", "upcoming")
# The cloud's window kinds that set upcoming_window_start where no bridge reports windows; a
# completed window clears it.
CLOUD_WINDOWS = (UPCOMING_SCHEDULED, UPCOMING_UPDATED, UPCOMING_COMPLETED)
MAINTENANCE_CAUSES = {
    "MIGRATE_ON_HOST_MAINTENANCE": "migration",
    "TERMINATE_ON_HOST_MAINTENANCE": "maintenance_termination",
}
# The cloud's record of what a bridge announces: confirms the notice (the same cause).
CLOUD_CONFIRMS = {
    "cloud.migrated": "migration",
    "cloud.terminated_for_maintenance": "maintenance_termination",
    "cloud.preempted": "preemption",
}
# What the cloud logs with no notice: stand alone unless they end a disruption under way.
CLOUD_ALONE = ("cloud.host_error", "cloud.guest_terminated", "cloud.halted_for_restart")
CLOUD_ALONE += ("cloud.recreated", "cloud.automatic_restart")


def _near(a: str | None, b: str | None) -> bool:
    x, y = parse_time(a), parse_time(b)
    return bool(x and y and abs((x - y).total_seconds()) <= MATCH_SECONDS)


def _latest(disruptions: list[dict[str, Any]], wanted: Any) -> dict[str, Any] | None:
    found = [d for d in disruptions if wanted(d)]
    return max(found, key=lambda d: _text(d.get("started_at")), default=None)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def reconcile(
    disruptions: list[dict[str, Any]], event: Event
) -> tuple[list[dict[str, Any]], str | None]:
    """The instance's disruptions with `event` applied, and the id of the one it is part of
    (None: the event is no part of a disruption, e.g. a window or an unknown method). Pure.

    A bridge's `started` opens one (or joins the cloud's record of it, when that came first);
    its `changed` moves the cause, its `ended` ends it. The cloud's `migrated`,
    `terminated_for_maintenance` and `preempted` join the disruption of that cause within
    MATCH_SECONDS (a preemption also ends it: the VM is stopped); a host error ends the one
    under way; with no disruption to join, the cloud's record is a disruption of its own, over
    when logged. Each record lists who saw it (`seen_by`) and its events.
    """
    out = [dict(d) for d in disruptions if isinstance(d, dict)]
    d, at, kind = event.data, event.data.observed_at, event.kind

    def join(record: dict[str, Any], side: str) -> str:
        record["seen_by"] = sorted({*record.get("seen_by", []), side})
        record["events"] = [*record.get("events", []), event.id]
        if d.cloud is not None:
            record["cloud_method"] = d.cloud.method
            record["error"] = d.cloud.status_message
        return record["id"]

    def new(cause: str, side: str, ended: bool) -> str:
        record = {"id": event.id, "cause": cause, "started_at": at, "ended_at": None}
        if ended:
            record.update(ended_at=at, ended_by=side)
        if d.notice_seconds is not None:
            record["notice_seconds"] = d.notice_seconds
        out.append(record)
        return join(record, side)

    def end(record: dict[str, Any], side: str) -> None:
        record.update(ended_at=at, ended_by=side)

    def done(part: str) -> tuple[list[dict[str, Any]], str]:  # after `part` changed `out`
        out.sort(key=lambda r: _text(r.get("started_at")))
        return out[-DISRUPTION_LIMIT:], part

    family = kind.split(".")[0]
    if d.key != CLOUD_KEY and family in ("maintenance", "preemption"):
        causes = set(MAINTENANCE_CAUSES.values()) if family == "maintenance" else {"preemption"}
        mine = _latest(out, lambda r: r.get("cause") in causes and "bridge" in r["seen_by"])
        if kind.endswith(".ended"):
            if mine is None:
                return out, None
            end(mine, "bridge")
            return done(join(mine, "bridge"))
        cause = "preemption" if family == "preemption" else MAINTENANCE_CAUSES.get(d.current)
        if cause is None:
            return out, None
        if (  # under way: its value moved, or a restarted bridge saw it again
            mine is not None and mine.get("ended_at") is None and _near(mine.get("started_at"), at)
        ):
            mine["cause"] = cause
            return done(join(mine, "bridge"))
        theirs = _latest(
            out,
            lambda r: (
                r.get("cause") == cause
                and "bridge" not in r["seen_by"]
                and _near(r.get("started_at"), at)
            ),
        )
        if theirs is not None:  # the cloud's record came first
            theirs["started_at"] = min(_text(theirs.get("started_at")), at) or at
            theirs["notice_seconds"] = d.notice_seconds
            return done(join(theirs, "bridge"))
        return done(new(cause, "bridge", ended=False))
    if d.key != CLOUD_KEY:
        return out, None
    if kind in CLOUD_CONFIRMS:
        cause = CLOUD_CONFIRMS[kind]
        known = _latest(
            out,
            lambda r: (
                r.get("cause") == cause
                and "cloud" not in r["seen_by"]
                and _near(r.get("started_at"), at)
            ),
        )
        if known is None:
            return done(new(cause, "cloud", ended=True))
        if cause == "preemption" and known.get("ended_at") is None:
            end(known, "cloud")
        return done(join(known, "cloud"))
    if kind in CLOUD_ALONE:
        cause = kind.removeprefix("cloud.")
        under_way = _latest(
            out, lambda r: r.get("ended_at") is None and _near(r.get("started_at"), at)
        )
        if kind == "cloud.automatic_restart":  # restarts what the latest disruption stopped
            under_way = _latest(out, lambda r: _near(r.get("started_at"), at)) or under_way
            if under_way is not None:
                under_way["restarted_at"] = at
        if under_way is None:
            return done(new(cause, "cloud", ended=True))
        if under_way.get("ended_at") is None:
            end(under_way, "cloud")
        if kind == "cloud.host_error":
            under_way["host_error"] = True
        return done(join(under_way, "cloud"))
    return out, None


def doc_id(event: Event) -> str:
    inst = event.data.instance
    return f"{inst.project_id}_{inst.id}"


def record_heartbeat(db: firestore.Client, event: Event, verdict: origin.Verdict) -> str:
    """A heartbeat only moves `heartbeat` forward: no history, no marker (it is idempotent).
    It learns the bridge's interval, and brings back a notice expired while it was silent."""
    instance_ref = db.collection(COLLECTION).document(doc_id(event))
    beat: dict[str, Any] = {
        "observed_at": event.data.observed_at,
        "sequence": event.data.sequence,
        "stream_id": event.data.stream_id,
        "verified": verdict.verified,
        "origin_reason": verdict.reason,
    }

    @firestore.transactional
    def apply(tx: firestore.Transaction) -> str:
        snap = instance_ref.get(transaction=tx)
        doc = (snap.to_dict() or {}) if snap.exists else {}
        stored = doc.get("heartbeat")
        if not _advances(event, stored, verdict.verified):
            return "stale-heartbeat"
        if stored and stored.get("stream_id", "") == beat["stream_id"]:  # not across a restart
            now, before = parse_time(beat["observed_at"]), parse_time(stored["observed_at"])
            if now and before:
                beat["interval_seconds"] = (now - before).total_seconds()
        update: dict[str, Any] = {
            "heartbeat": beat,
            "has_bridge": True,
            "updated_at": firestore.SERVER_TIMESTAMP,
        }
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
                {
                    "disrupting": False,
                    "expired": {"at": now, "reason": reason},
                    "updated_at": firestore.SERVER_TIMESTAMP,  # the board reads what changed
                },
                option=db.write_option(last_update_time=snap.update_time),
            )
        except gexc.FailedPrecondition:
            continue
        expired.append(snap.id)
    return expired


def record(
    db: firestore.Client, event: Event, envelope: dict[str, Any], verdict: origin.Verdict
) -> str:
    """Apply one event in a transaction; returns `applied`, `history-only` or `duplicate`."""
    if event.kind == "bridge.heartbeat":
        return record_heartbeat(db, event, verdict)
    instance_ref = db.collection(COLLECTION).document(doc_id(event))
    cloud = event.data.key == CLOUD_KEY
    if not verdict.verified:  # its own: what it claims (stream, sequence, id) may be a victim's
        marker = "unverified-" + hashlib.sha256(origin.canonical(event.to_structured())).hexdigest()
    elif event.data.stream_id and not cloud:
        marker = f"{event.data.stream_id}:{event.data.sequence}"
    else:  # the cloud's ids come from the log entry; a bridge older than stream_id: its
        # sequence may restart, its ids never repeat
        marker = hashlib.sha256(event_key(event).encode()).hexdigest()
    marker_ref = instance_ref.collection("events").document(marker)
    entry = _entry(event, envelope, verdict)

    @firestore.transactional
    def apply(tx: firestore.Transaction) -> str:
        if marker_ref.get(transaction=tx).exists:
            return "duplicate"
        snap = instance_ref.get(transaction=tx)
        doc = snap.to_dict() if snap.exists else {}
        state = dict(doc.get("state") or {})
        family = event.kind.split(".")[0]
        disruptions, part_of = reconcile(list(doc.get("disruptions") or []), event)
        if part_of is not None:
            entry["disruption"] = part_of  # the VM's notice and the cloud's record: one id
        history = [*(doc.get("history") or []), entry]
        history.sort(key=lambda e: (e.get("observed_at", ""), e.get("sequence", 0)))
        outcome = "history-only"
        bridged = bool(doc.get("has_bridge")) or any(f in state for f in KNOWN_BY_BRIDGE)
        update: dict[str, Any] = {
            "history": history[-HISTORY_LIMIT:],
            "disruptions": disruptions,
            "has_bridge": bridged or not cloud or bool(doc.get("heartbeat")),
            "updated_at": firestore.SERVER_TIMESTAMP,
        }
        if not cloud or not doc.get("instance"):  # the log knows no project number, hostname
            update["instance"] = asdict(event.data.instance)
        if _advances(event, state.get(family), verdict.verified):
            outcome = "applied"
            state[family] = entry
            update["state"] = state
            update["disrupting"] = _disrupting(state)
            if family == "upcoming":
                start = None
                if event.kind != "upcoming.cleared" and event.data.upcoming is not None:
                    start = parse_time(event.data.upcoming.window_start_time)
                update["upcoming_window_start"] = start
            elif event.kind in CLOUD_WINDOWS and "upcoming" not in state:  # no bridge reads it
                window = event.data.upcoming
                start = parse_time(window.window_start_time) if window is not None else None
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
    verdict = origin_of(event, cloud_event)
    outcome = record(client(), event, envelope, verdict)
    log(
        "INFO",
        f"ledger {outcome}",
        event_id=event.id,
        kind=event.kind,
        doc=doc_id(event),
        verified=verdict.verified,
    )
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
