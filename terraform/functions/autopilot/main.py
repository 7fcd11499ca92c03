"""autopilot: start scheduled maintenance early, when the fleet can afford it (docs/autopilot.md).

Cloud Scheduler calls `tick` (HTTP, OIDC) every few minutes. Each tick reads the ledger's
instances with a scheduled window, confirms each with instances.get, lets the pure planner
(plan.py) choose within AUTOPILOT_POLICY, calls instances.performMaintenance with a requestId
derived from the window (a retried tick never starts one window twice), records what it did in
the instance's ledger document (the `autopilot` field, which the ledger function never writes)
and answers a JSON summary: what it started, what waits and why.

Configuration (environment, read once at import into `SETTINGS`):
  LEDGER_COLLECTION   the ledger's collection (default `maintenance-ledger`)
  FIRESTORE_DATABASE  its database (default `(default)`)
  AUTOPILOT_POLICY    the policy, JSON (plan.Policy.from_json); malformed: one ERROR line, exit 2
  COMPUTE_API_BASE    default https://compute.googleapis.com/compute/v1 (tests: a local fake)
  COMPUTE_ANONYMOUS   `1` to send no credentials, to Compute or the pre-hook (local fakes only)
  COMPUTE_TIMEOUT_SECONDS  per call (default 20)

The record, `autopilot` in `<collection>/<doc>` (dotted updates only, so the fields the ledger
writes are never touched):
  state        starting (claimed; the call's outcome unknown) | started | done | refused
  released     on a "starting" claim: its call failed in a way a retry can fix (take it again)
  window       `<doc>/<windowStartTime>`: the one window the record is about
  request_id   the performMaintenance requestId (uuid5 of `window`)
  operation    the zonal operation it answered; started_at, done_at, done_by
  error        the last failed call {status, message, window}: logged once per instance
  next_slot, deadline, reason   what the board shows for an instance that waits
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import functions_framework
import google.auth
import google.auth.exceptions
import requests
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.auth.transport.requests import Request as AuthRequest
from google.cloud import firestore
from google.oauth2 import id_token
from plan import Busy, Candidate, Plan, Policy, plan, rfc3339, window_id
from subscriber import log, parse_time

OPEN = ("starting", "started")  # a record whose instance counts as in maintenance
# Longer than a tick can live (the function's timeout is 300 s): a "starting" claim this old
# was left by a tick that died.
CLAIM_TTL = timedelta(minutes=6)
# Answers after which the same call can only fail again for this window: never retried.
FINAL = frozenset({400, 404, 409, 412})
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Settings:
    """The function's configuration, built once from the environment."""

    collection: str
    database: str
    compute_api: str
    anonymous: bool
    timeout: float
    policy: Policy

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        return cls(
            collection=env.get("LEDGER_COLLECTION", "maintenance-ledger"),
            database=env.get("FIRESTORE_DATABASE", "(default)"),
            compute_api=env.get(
                "COMPUTE_API_BASE", "https://compute.googleapis.com/compute/v1"
            ).rstrip("/"),
            anonymous=env.get("COMPUTE_ANONYMOUS") == "1",
            timeout=float(env.get("COMPUTE_TIMEOUT_SECONDS", "20")),
            policy=Policy.from_json(env.get("AUTOPILOT_POLICY", "")),
        )


try:
    SETTINGS = Settings.from_env(dict(os.environ))
except ValueError as exc:  # PolicyError, or a timeout that is not a number
    log("ERROR", f"autopilot configuration: {exc}")
    raise SystemExit(2) from None


@dataclass(frozen=True)
class Answer:
    """One Compute API answer: status (0 when unreachable), body, and a short message."""

    status: int
    body: dict[str, Any]
    message: str


class Compute:
    """The two calls the custom role allows (instances.get, instances.performMaintenance)."""

    def __init__(self, settings: Settings) -> None:
        self.base = settings.compute_api
        self.timeout = settings.timeout
        if settings.anonymous:
            credentials = AnonymousCredentials()
        else:
            credentials, _ = google.auth.default(
                scopes=["https://www.googleapis.com/auth/cloud-platform"]
            )
        self.session = AuthorizedSession(credentials)

    def call(self, method: str, path: str, params: dict[str, str] | None = None) -> Answer:
        try:
            resp = self.session.request(
                method, f"{self.base}/{path}", params=params, timeout=self.timeout
            )
        except requests.RequestException as exc:
            return Answer(0, {}, f"unreachable: {type(exc).__name__}")
        try:
            body = resp.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        return Answer(resp.status_code, body, str(error.get("message", ""))[:300])


@dataclass(frozen=True)
class Observed:
    """What instances.get says about one instance."""

    upcoming: dict[str, Any] | None
    labels: dict[str, str]
    created_by: str


def observe(answer: Answer) -> Observed:
    body = answer.body
    status = body.get("resourceStatus") or {}
    upcoming = status.get("upcomingMaintenance") if isinstance(status, dict) else None
    items = (body.get("metadata") or {}).get("items") or []
    created_by = next((i.get("value", "") for i in items if i.get("key") == "created-by"), "")
    labels = body.get("labels") if isinstance(body.get("labels"), dict) else {}
    return Observed(
        upcoming if isinstance(upcoming, dict) and upcoming else None, labels, created_by
    )


def finished(record: dict[str, Any], doc: dict[str, Any], seen: Observed | None) -> str:
    """Why a started maintenance counts as over ("" while it is not): the ledger saw the window
    cleared or replaced, or the maintenance end after the start; or the instance shows none."""
    state = doc.get("state") or {}
    upcoming = state.get("upcoming") or {}
    if upcoming.get("kind") == "upcoming.cleared":
        return "upcoming.cleared"
    ledger_start = parse_time((upcoming.get("upcoming") or {}).get("window_start_time"))
    ours = parse_time(record.get("window_start"))
    if ledger_start and ours and ledger_start != ours:
        return "upcoming.updated"
    maintenance = state.get("maintenance") or {}
    started = parse_time(record.get("started_at") or record.get("claimed_at"))
    ended = parse_time(maintenance.get("observed_at"))
    if maintenance.get("kind") == "maintenance.ended" and started and ended and ended > started:
        return "maintenance.ended"
    if seen is not None and seen.upcoming is None:
        return "instance shows no maintenance"
    return ""


def _free(record: dict[str, Any], now: datetime) -> bool:
    """Whether a "starting" claim may be taken again: its tick answered a failure it can retry
    (`released`), or it is older than any tick lives (CLAIM_TTL: the tick died between claiming
    and recording). A fresh one belongs to a tick still running: hands off."""
    claimed = parse_time(record.get("claimed_at"))
    return record.get("state") == "starting" and (
        record.get("released") is True or claimed is None or now - claimed > CLAIM_TTL
    )


def _unsent(record: dict[str, Any], seen: Observed | None, now: datetime) -> bool:
    """A free claim whose call may never have reached Compute: the instance is still PENDING,
    so the same call is made again, under the same requestId, which Compute answers with the
    operation it started if it did."""
    up = seen.upcoming if seen else None
    return (
        _free(record, now)
        and up is not None
        and up.get("maintenanceStatus") == "PENDING"
        and parse_time(up.get("windowStartTime")) == parse_time(record.get("window_start"))
    )


def _deadline(upcoming: dict[str, Any]) -> datetime | None:
    return parse_time(upcoming.get("latestWindowStartTime")) or parse_time(
        upcoming.get("windowStartTime")
    )


def _instance_path(doc: dict[str, Any]) -> str:
    inst = doc.get("instance") or {}
    zone, name = inst.get("zone"), inst.get("name")
    return f"projects/{inst.get('project_id')}/zones/{zone}/instances/{name}"


def _entry(doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    inst = doc.get("instance") or {}
    return {"instance": inst.get("name", ""), "zone": inst.get("zone", ""), **fields}


class Tick:
    """One run: read, confirm, plan, act, record. Holds the run's reads and its summary."""

    def __init__(self, settings: Settings, db: Any, compute: Compute, now: datetime, dry: bool):
        self.settings = settings
        self.policy = settings.policy
        self.col = db.collection(settings.collection)
        self.db = db
        self.compute = compute
        self.now = now
        self.dry = dry
        self.summary: dict[str, Any] = {
            "at": rfc3339(now),
            "dry_run": dry,
            "started": [],
            "waiting": [],
            "under_way": [],
            "done": [],
            "failed": [],
        }

    # --- reading ------------------------------------------------------------------------

    def ledger(self) -> dict[str, dict[str, Any]]:
        """The documents that matter: a window scheduled, a disruption, or a start of ours not
        yet over. Three single-field queries (indexed automatically), merged."""
        docs: dict[str, dict[str, Any]] = {}
        queries = [
            firestore.FieldFilter("upcoming_window_start", ">=", EPOCH),
            firestore.FieldFilter("disrupting", "==", True),
            firestore.FieldFilter("autopilot.state", "in", list(OPEN)),
        ]
        for where in queries:
            for snap in self.col.where(filter=where).stream():
                docs.setdefault(snap.id, snap.to_dict() or {})
        return docs

    def get(self, doc: dict[str, Any]) -> Answer:
        return self.compute.call("GET", _instance_path(doc))

    # --- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        busy: list[Busy] = []
        windows: dict[str, dict[str, Any]] = {}
        candidates: list[Candidate] = []
        for key, doc in sorted(self.ledger().items()):
            candidate = self._consider(key, doc, busy, windows)
            if candidate is not None:
                candidates.append(candidate)
        chosen = plan(self.policy, candidates, busy, self.now)
        for wait in chosen.waits:
            item = windows[wait.candidate.key]
            self._wait(item["doc"], wait.reason, chosen, wait.candidate)
        for c in chosen.start:
            self._start(c, windows[c.key], chosen)
        return self.summary

    def _consider(
        self,
        key: str,
        doc: dict[str, Any],
        busy: list[Busy],
        windows: dict[str, dict[str, Any]],
    ) -> Candidate | None:
        """One ledger document: a confirmed candidate, or None (it waits, is under way or over,
        and says so in the summary); appends to `busy` what uses a zone's or group's room."""
        record = doc.get("autopilot") or {}
        ledger_up = ((doc.get("state") or {}).get("upcoming") or {}).get("upcoming") or {}
        scheduled = doc.get("upcoming_window_start") is not None
        name = (doc.get("instance") or {}).get("name", "")
        zone = (doc.get("instance") or {}).get("zone", "")
        if scheduled and ledger_up.get("can_reschedule") is False:
            self._wait(doc, "cannot be rescheduled: Google starts it in its own window")
            if ledger_up.get("maintenance_status") == "ONGOING" or doc.get("disrupting"):
                busy.append(Busy(key, zone, self.policy.group_of(name, {}, "")))
            return None
        seen: Observed | None = None
        needs_get = scheduled or record.get("state") in OPEN or self.policy.group_by != ""
        answer = self.get(doc) if needs_get else None
        if answer is not None and answer.status == 200:
            seen = observe(answer)
        group = self.policy.group_of(
            name, seen.labels if seen else {}, seen.created_by if seen else ""
        )
        if record.get("state") in OPEN:
            why = finished(record, doc, seen)
            if why:
                self._finish(key, doc, why)
                record = {**record, "state": "done"}
            elif not _unsent(record, seen, self.now):
                busy.append(Busy(key, zone, record.get("group") or group))
                self.summary["under_way"].append(
                    _entry(
                        doc,
                        since=record.get("started_at", ""),
                        request_id=record.get("request_id"),
                    )
                )
                return None
        elif doc.get("disrupting"):
            busy.append(Busy(key, zone, group))
        if not scheduled:
            return None
        if answer is None or answer.status != 200:
            answer = answer or Answer(0, {}, "not asked")
            gone = answer.status == 404
            wid = window_id(key, str(ledger_up.get("window_start_time", "")))
            self._failed(key, doc, record, wid, answer, gone, call="instances.get")
            if gone:
                self._wait(doc, "stale ledger entry: the instance no longer exists")
            else:
                self._wait(doc, f"instances.get failed ({answer.status}); asked again next tick")
            return None
        if seen is None or seen.upcoming is None:
            self._wait(doc, "stale ledger entry: the instance has no maintenance scheduled")
            return None
        up = seen.upcoming
        wid = window_id(key, str(up.get("windowStartTime", "")))
        windows[key] = {"doc": doc, "upcoming": up, "window": wid}
        blocked = ""
        if record.get("window") == wid and record.get("state") in ("done", "refused"):
            blocked = f"already {record['state']} for this window; never started twice"
        return Candidate(
            key=key,
            name=name,
            zone=zone,
            can_reschedule=up.get("canReschedule") is True,
            status=str(up.get("maintenanceStatus", "")),
            deadline=_deadline(up),
            group=group,
            left_alone=self.policy.left_alone(name, seen.labels),
            blocked=blocked,
        )

    # --- acting and recording -----------------------------------------------------------

    def _update(self, key: str, fields: dict[str, Any]) -> None:
        if not self.dry:
            self.col.document(key).update({f"autopilot.{k}": v for k, v in fields.items()})

    def _wait(
        self,
        doc: dict[str, Any],
        reason: str,
        chosen: Plan | None = None,
        c: Candidate | None = None,
    ) -> None:
        slot = rfc3339(chosen.next_slot.get(c.key)) if chosen and c else ""
        deadline = rfc3339(c.deadline) if c else ""
        self.summary["waiting"].append(
            _entry(doc, reason=reason, next_slot=slot, deadline=deadline)
        )
        record = doc.get("autopilot") or {}
        shown = {"reason": reason, "next_slot": slot, "deadline": deadline}
        if c is not None and any(record.get(k) != v for k, v in shown.items()):
            self._update(c.key, shown)  # for the board; written only when it changes

    def _finish(self, key: str, doc: dict[str, Any], why: str) -> None:
        self.summary["done"].append(_entry(doc, by=why))
        log("INFO", "autopilot: maintenance over", instance=_entry(doc)["instance"], by=why)
        self._update(key, {"state": "done", "done_at": rfc3339(self.now), "done_by": why})

    def _start(self, c: Candidate, item: dict[str, Any], chosen: Plan) -> None:
        doc, up, wid = item["doc"], item["upcoming"], item["window"]
        record = doc.get("autopilot") or {}
        # A claim taken again sends what the first call sent; otherwise one id per window.
        request_id = (record.get("window") == wid and record.get("request_id")) or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"maintenance-bridge-autopilot/{wid}")
        )
        why = "deadline margin" if c.key in chosen.urgent else "window open"
        entry = _entry(doc, request_id=request_id, why=why, deadline=rfc3339(c.deadline))
        if self.dry:
            self.summary["started"].append({**entry, "operation": None})
            return
        if self.policy.pre_hook_url and not self._pre_hook(c, doc, up, record, request_id):
            return
        if not self._claim(c.key, wid, up, request_id, c.group):
            self._wait(doc, "already claimed for this window by another tick")
            return
        path = f"{_instance_path(doc)}/performMaintenance"
        answer = self.compute.call("POST", path, {"requestId": request_id})
        if answer.status == 200:
            operation = str(answer.body.get("name", ""))
            self._update(
                c.key,
                {"state": "started", "operation": operation, "started_at": rfc3339(self.now)},
            )
            self.summary["started"].append({**entry, "operation": operation})
            log(
                "INFO",
                "autopilot: maintenance started",
                instance=c.name,
                zone=c.zone,
                request_id=request_id,
                operation=operation,
                why=why,
            )
            return
        final = answer.status in FINAL
        # Not final (unreachable, 403, 429, 5xx): the call may or may not have reached Compute, so
        # the claim stays "starting", released: next tick the instance is ONGOING (it did) or
        # still PENDING (it did not, and the same requestId goes again).
        self._failed(c.key, doc, record, wid, answer, final, state="refused" if final else None)
        if not final:
            self._update(c.key, {"released": True})

    def _claim(self, key: str, wid: str, up: dict[str, Any], request_id: str, group: str) -> bool:
        """Take the window in a transaction: false if a record for it exists (another tick)."""
        ref = self.col.document(key)

        @firestore.transactional
        def claim(tx: firestore.Transaction) -> bool:
            snap = ref.get(transaction=tx)
            record = (snap.to_dict() or {}).get("autopilot") or {}
            if record.get("window") == wid and record.get("state") in (
                "started",
                "done",
                "refused",
            ):
                return False
            busy_claim = record.get("state") == "starting" and not _free(record, self.now)
            if record.get("window") == wid and busy_claim:
                return False  # another tick is calling it right now
            fields = {
                "released": False,
                "state": "starting",
                "window": wid,
                "window_start": str(up.get("windowStartTime", "")),
                "request_id": request_id,
                "claimed_at": rfc3339(self.now),
                "group": group,
            }
            tx.update(ref, {f"autopilot.{k}": v for k, v in fields.items()})
            return True

        return claim(self.db.transaction())

    def _pre_hook(
        self,
        c: Candidate,
        doc: dict[str, Any],
        up: dict[str, Any],
        record: dict[str, Any],
        request_id: str,
    ) -> bool:
        """POST the instance to the policy's pre-hook (drain, checkpoint); a 2xx lets it start.
        With credentials, the request carries an ID token whose audience is the hook's origin
        (what Cloud Run checks: its service URL, without a path)."""
        url = self.policy.pre_hook_url
        body = {
            "instance": doc.get("instance") or {},
            "upcoming_maintenance": up,
            "request_id": request_id,
            "deadline": rfc3339(c.deadline),
        }
        try:
            headers = {"content-type": "application/json"}
            if not self.settings.anonymous:
                origin = urlsplit(url)._replace(path="", query="", fragment="").geturl()
                token = id_token.fetch_id_token(AuthRequest(), origin)
                headers["authorization"] = f"Bearer {token}"
            resp = requests.post(url, json=body, headers=headers, timeout=self.settings.timeout)
            answer = Answer(resp.status_code, {}, resp.text[:300])
        except (requests.RequestException, google.auth.exceptions.GoogleAuthError) as exc:
            answer = Answer(0, {}, f"unreachable: {type(exc).__name__}")
        if 200 <= answer.status < 300:
            return True
        wid = window_id(c.key, str(up.get("windowStartTime", "")))
        self._failed(c.key, doc, record, wid, answer, False, call="pre-hook")
        return False

    def _failed(
        self,
        key: str,
        doc: dict[str, Any],
        record: dict[str, Any],
        wid: str,
        answer: Answer,
        final: bool,
        call: str = "performMaintenance",
        state: str | None = None,
    ) -> None:
        """Summarise a failed call; log it only when it differs from the instance's last."""
        error = {"call": call, "status": answer.status, "detail": answer.message, "window": wid}
        self.summary["failed"].append({**_entry(doc, **error), "retry": not final})
        last = record.get("error") or {}
        new = any(last.get(k) != error[k] for k in ("call", "status", "window"))
        if new:
            log(
                "ERROR" if final else "WARNING",
                f"autopilot: {call} answered {answer.status}"
                + ("; not retried for this window" if final else "; tried again on a later tick"),
                instance=_entry(doc)["instance"],
                **error,
            )
        fields = {"error": error} if new else {}
        if state is not None:
            fields["state"] = state
        if fields:
            self._update(key, fields)


_db: Any = None
_compute: Compute | None = None


def clients() -> tuple[Any, Compute]:
    """Firestore and Compute clients, created on first use and kept for the instance."""
    global _db, _compute
    if _db is None:
        _db = firestore.Client(database=SETTINGS.database)
    if _compute is None:
        _compute = Compute(SETTINGS)
    return _db, _compute


@functions_framework.http
def tick(request: Any) -> tuple[str, int, dict[str, str]]:
    """One tick. `?dry_run=true` plans and answers without acting or writing; with it,
    `&at=<RFC 3339>` plans for another moment (what would happen at 02:00 on Saturday)."""
    dry = SETTINGS.policy.dry_run or request.args.get("dry_run", "") in ("1", "true")
    now = datetime.now(timezone.utc)
    if dry and request.args.get("at"):
        at = parse_time(request.args["at"])
        if at is None:
            return json.dumps({"error": "at must be an RFC 3339 time"}), 400, _JSON
        now = at
    db, compute = clients()
    summary = Tick(SETTINGS, db, compute, now, dry).run()
    log(
        "INFO",
        "autopilot tick",
        started=len(summary["started"]),
        waiting=len(summary["waiting"]),
        under_way=len(summary["under_way"]),
        failed=len(summary["failed"]),
        dry_run=dry,
        # What it started, always; in a dry run the whole plan, which is what the run is for.
        **({"plan": summary} if dry else {"started_instances": summary["started"]}),
    )
    return json.dumps(summary, sort_keys=True), 200, _JSON


_JSON = {"content-type": "application/json"}
