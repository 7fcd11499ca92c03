"""A fake Compute Engine API (compute/v1) for the autopilot: instances.get with
`resourceStatus.upcomingMaintenance`, instances.performMaintenance with `requestId`, zonal
operations. Faithful to FACTS.md section 9; where Google does not document the behaviour, the
fake's answer is a parameter so that a test can hold the autopilot to each plausible one.

Mirrors the real API where it is known:
- instances.get answers the instance with `resourceStatus.upcomingMaintenance` (camelCase, a
  boolean `canReschedule`) only while maintenance is scheduled; 404 with reason `notFound` for
  an unknown instance.
- performMaintenance (POST, empty body) starts the maintenance at once and answers a zonal
  Operation (`operationType` performMaintenance, RUNNING until the maintenance is over). It is
  allowed only while `canReschedule` is true and `maintenanceStatus` is PENDING; otherwise the
  answer is `refusal` (UNSURE: undocumented; REFUSALS lists the plausible ones).
- `requestId` must be a UUID; a request repeated with one already seen answers the operation it
  started and starts nothing (Compute keeps them for at least 60 minutes).
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PREFIX = "/compute/v1/"
# A fault status: the request is carried out, then the connection closes without an answer.
LOST = 0
_URL = "https://www.googleapis.com/compute/v1/"

# The undocumented refusal of performMaintenance for an instance that is not PENDING and
# reschedulable: the answers Compute gives for a request its state does not allow.
REFUSALS: dict[str, tuple[int, str]] = {
    "400-badRequest": (400, "badRequest"),
    "400-invalid": (400, "invalid"),
    "400-resourceNotReady": (400, "resourceNotReady"),
    "412-conditionNotMet": (412, "conditionNotMet"),
}


@dataclass
class FakeInstance:
    project: str
    zone: str
    name: str
    id: str
    upcoming: dict[str, Any] | None = None  # camelCase, as instances.get shows it
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    status: str = "RUNNING"

    @property
    def path(self) -> str:
        return f"projects/{self.project}/zones/{self.zone}/instances/{self.name}"

    def resource(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        if self.upcoming is not None:
            status["upcomingMaintenance"] = dict(self.upcoming)
        return {
            "kind": "compute#instance",
            "id": self.id,
            "name": self.name,
            "zone": f"{_URL}projects/{self.project}/zones/{self.zone}",
            "status": self.status,
            "selfLink": _URL + self.path,
            "labels": dict(self.labels),
            "metadata": {
                "kind": "compute#metadata",
                "items": [{"key": k, "value": v} for k, v in self.metadata.items()],
            },
            "resourceStatus": status,
        }


def window(
    start: datetime,
    end: datetime,
    latest: datetime | None = None,
    *,
    can_reschedule: bool = True,
    status: str = "PENDING",
) -> dict[str, Any]:
    """An `upcomingMaintenance` as instances.get shows it."""

    def text(moment: datetime) -> str:
        return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")

    out = {
        "type": "SCHEDULED",
        "canReschedule": can_reschedule,
        "windowStartTime": text(start),
        "windowEndTime": text(end),
        "maintenanceStatus": status,
        "maintenanceReasons": ["PLATFORM_MAINTENANCE"],
    }
    if latest is not None:
        out["latestWindowStartTime"] = text(latest)
    return out


def _error(status: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
    }


class ComputeApi(ThreadingHTTPServer):
    """The fake, serving on loopback from a thread of its own; `stop()` ends it."""

    daemon_threads = True

    def __init__(self, refusal: str = "400-badRequest") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.refusal = REFUSALS[refusal]
        self.instances: dict[str, FakeInstance] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.by_request_id: dict[str, str] = {}
        self.calls: list[dict[str, Any]] = []
        self.faults: list[tuple[str, int]] = []  # (verb or "get", status) answered once each
        # instance path -> the upcomingMaintenance it has once a GET answered: the state moving
        # between the autopilot's instances.get and its performMaintenance
        self.after_get: dict[str, dict[str, Any] | None] = {}
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        """COMPUTE_API_BASE for a client of this fake."""
        return f"http://127.0.0.1:{self.server_address[1]}/compute/v1"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)

    def add(self, project: str, zone: str, name: str, **fields: Any) -> FakeInstance:
        with self.lock:
            inst = FakeInstance(project, zone, name, id=str(7_000_000 + next(self._ids)), **fields)
            self.instances[inst.path] = inst
            return inst

    def set_upcoming(self, inst: FakeInstance, upcoming: dict[str, Any] | None) -> None:
        with self.lock:
            inst.upcoming = upcoming

    def finish(self, inst: FakeInstance, error: dict[str, Any] | None = None) -> None:
        """The maintenance is over: nothing scheduled any more, its operations DONE."""
        with self.lock:
            inst.upcoming = None
            for op in self.operations.values():
                if op["targetLink"].endswith(inst.path) and op["status"] != "DONE":
                    op.update(status="DONE", progress=100, endTime=_now())
                    if error is not None:
                        op["error"] = error

    def performed(self, inst: FakeInstance | None = None) -> list[dict[str, Any]]:
        """The performMaintenance calls, all or for one instance, each with its query."""
        with self.lock:
            return [
                c
                for c in self.calls
                if c["verb"] == "performMaintenance" and (inst is None or c["path"] == inst.path)
            ]

    def started(self, inst: FakeInstance | None = None) -> list[str]:
        """Operations that really started a maintenance (not answered again for a requestId)."""
        with self.lock:
            return [
                name
                for name, op in self.operations.items()
                if inst is None or op["targetLink"].endswith(inst.path)
            ]

    # --- the API ------------------------------------------------------------------------

    def answer(self, method: str, url: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(url)
        path = parts.path.removeprefix(PREFIX)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segments = path.split("/")
        verb = segments[-1] if method == "POST" else "get"
        target = "/".join(segments[:6])
        with self.lock:
            self.calls.append({"method": method, "path": target, "verb": verb, "query": query})
            fault = next((f for f in self.faults if f[0] == verb), None)
            if fault is not None:
                self.faults.remove(fault)
                if fault[1] != LOST:
                    return fault[1], _error(fault[1], "backendError", "injected fault")
            status, body = self._route(method, path, segments, target, verb, query)
            return (LOST, {}) if fault is not None else (status, body)

    def _route(
        self,
        method: str,
        path: str,
        segments: list[str],
        target: str,
        verb: str,
        query: dict[str, str],
    ) -> tuple[int, dict[str, Any]]:
        if len(segments) == 6 and segments[4] == "instances" and method == "GET":
            inst = self.instances.get(target)
            if inst is None:
                return 404, _error(404, "notFound", f"The resource '{target}' was not found")
            answer = inst.resource()
            if target in self.after_get:
                inst.upcoming = self.after_get.pop(target)
            return 200, answer
        if len(segments) == 7 and segments[4] == "instances" and verb == "performMaintenance":
            return self._perform(target, query.get("requestId"))
        if len(segments) >= 6 and segments[4] == "operations":
            op = self.operations.get(segments[5])
            if op is None:
                return 404, _error(404, "notFound", f"The resource '{path}' was not found")
            return 200, dict(op)
        return 404, _error(404, "notFound", f"no such method {method} {path}")

    def _perform(self, target: str, request_id: str | None) -> tuple[int, dict[str, Any]]:
        if request_id is not None:
            try:
                uuid.UUID(request_id)
            except ValueError:
                message = f"Invalid value for field 'requestId': '{request_id}'."
                return 400, _error(400, "invalid", message)
            if request_id in self.by_request_id:
                return 200, dict(self.operations[self.by_request_id[request_id]])
        inst = self.instances.get(target)
        if inst is None:
            return 404, _error(404, "notFound", f"The resource '{target}' was not found")
        up = inst.upcoming or {}
        if up.get("canReschedule") is not True or up.get("maintenanceStatus") != "PENDING":
            status, reason = self.refusal
            message = "The instance has no pending maintenance that can be rescheduled."
            return status, _error(status, reason, message)
        name = f"operation-{next(self._ids)}-{uuid.uuid4().hex[:12]}"
        op = {
            "kind": "compute#operation",
            "id": str(9_000_000 + next(self._ids)),
            "name": name,
            "zone": f"{_URL}projects/{inst.project}/zones/{inst.zone}",
            "operationType": "performMaintenance",
            "targetLink": _URL + inst.path,
            "targetId": inst.id,
            "status": "RUNNING",
            "progress": 0,
            "insertTime": _now(),
            "startTime": _now(),
            "selfLink": f"{_URL}projects/{inst.project}/zones/{inst.zone}/operations/{name}",
        }
        self.operations[name] = op
        if request_id is not None:
            self.by_request_id[request_id] = name
        inst.upcoming = {**up, "maintenanceStatus": "ONGOING"}
        return 200, dict(op)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    server: ComputeApi

    def log_message(self, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        status, body = self.server.answer(self.command, self.path)
        if status == LOST:
            self.close_connection = True
            return
        out = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json; charset=UTF-8")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = _serve
    do_POST = _serve
