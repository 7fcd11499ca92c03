"""A local GCE metadata server to test maintenance watchers and their subscribers offline.

Compute Engine has no offline way to rehearse a host-maintenance notice, so this module
serves the metadata API the way the real server behaves (header rules, content-derived
ETags, ``wait_for_change`` long polls, ``recursive``/``alt`` rendering, the 503 of an
empty ``upcoming-maintenance``) and adds what the real one cannot: a control API to
change values, inject faults and play scenarios. Stdlib only, so it runs anywhere.

Where the real server's behaviour is undocumented, a switch picks the variant so that a client
can be tested against each: ``plain_alt_json`` renders a plain value under ``alt=json`` as a
JSON string (``"NONE"``) or as raw text (``NONE``); ``scheduling`` makes
``instance/scheduling/?recursive=true`` answer its JSON object, a text listing, a 404 or a
truncated JSON body.

Point a client at it with ``GCE_METADATA_HOST=<Simulator.host_port>``. The control API
lives on the same port under ``/simulator/v1/`` (no ``Metadata-Flavor`` needed):
``PUT|GET|DELETE values/<path>``, ``POST|DELETE faults``, ``GET stats``,
``POST scenario`` with ``{"name": ..., "speed": ...}`` or ``{"steps": [...]}``.

Scenarios (times in seconds at speed 1; ``speed`` divides them). Each first sets the
state it starts from at t=0 so that it can loop:

- ``migrate``: live migration. ``on-host-maintenance=MIGRATE``; ``maintenance-event``
  goes ``MIGRATE_ON_HOST_MAINTENANCE`` at 1 (the 60 s notice) and back to ``NONE`` at 61
  when the migration is over.
- ``terminate``: a GPU VM (``on-host-maintenance=TERMINATE``) gets
  ``TERMINATE_ON_HOST_MAINTENANCE`` at 1, the 60 minute notice, held until 3601, ``NONE``.
- ``preempt``: a Spot VM (``preemptible=TRUE``, ``provisioning-model=SPOT``); ``preempted``
  turns ``TRUE`` at 1, power-off comes 30 s later and the restarted VM reads ``FALSE`` at 31.
- ``upcoming``: ``upcoming-maintenance`` is empty (503) at 0, a SCHEDULED, reschedulable,
  PENDING window for 2030-01-15 02:00-06:00 UTC appears at 1, is moved by the user to
  2030-01-20 at 5, and is gone again (503) at 10.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import logging
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

V1 = "/computeMetadata/v1/"
CONTROL = "/simulator/v1/"
UPCOMING = "instance/upcoming-maintenance"
NO_NOTIFICATION = b'{"error":"no notifications have been received yet, try again later"}'
MISSING_FLAVOR = b"Missing Metadata-Flavor:Google header."
TEXT = "application/text"
JSON = "application/json"
SCHEDULING = "instance/scheduling/"
PLAIN_ALT_JSON = ("string", "raw")  # how a plain value reads under alt=json: "NONE" or NONE
SCHEDULING_MODES = ("json", "text", "404", "broken")  # what scheduling/?recursive=true answers
HUGE_SIZE = 1 << 20
# Windows declares struct linger with two u_shorts, POSIX with two ints.
_LINGER_RST = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)

DEFAULT_IDENTITY: dict[str, str] = {
    "instance/maintenance-event": "NONE",
    "instance/preempted": "FALSE",
    "instance/id": "4520031799277579481",
    "instance/name": "demo-vm",
    "instance/hostname": "demo-vm.us-central1-a.c.demo-project.internal",
    "instance/zone": "projects/123456789012/zones/us-central1-a",
    "project/project-id": "demo-project",
    "project/numeric-project-id": "123456789012",
    "instance/scheduling/on-host-maintenance": "MIGRATE",
    "instance/scheduling/automatic-restart": "TRUE",
    "instance/scheduling/preemptible": "FALSE",
    "instance/scheduling/provisioning-model": "STANDARD",
}


@dataclass(frozen=True)
class Step:
    """Set ``path`` to ``value`` (``None`` deletes it) ``at`` seconds into a scenario."""

    at: float
    path: str
    value: str | None


def _window(day: int) -> str:
    return json.dumps(
        {
            "type": "SCHEDULED",
            "can_reschedule": "true",
            "window_start_time": f"2030-01-{day:02d}T02:00:00Z",
            "window_end_time": f"2030-01-{day:02d}T06:00:00Z",
            "latest_window_start_time": "2030-01-29T02:00:00Z",
            "maintenance_status": "PENDING",
        }
    )


_EVENT = "instance/maintenance-event"
_ON_HOST = "instance/scheduling/on-host-maintenance"
SCENARIOS: dict[str, list[Step]] = {
    "migrate": [
        Step(0, _ON_HOST, "MIGRATE"),
        Step(0, _EVENT, "NONE"),
        Step(1, _EVENT, "MIGRATE_ON_HOST_MAINTENANCE"),
        Step(61, _EVENT, "NONE"),
    ],
    "terminate": [
        Step(0, _ON_HOST, "TERMINATE"),
        Step(0, _EVENT, "NONE"),
        Step(1, _EVENT, "TERMINATE_ON_HOST_MAINTENANCE"),
        Step(3601, _EVENT, "NONE"),
    ],
    "preempt": [
        Step(0, "instance/scheduling/preemptible", "TRUE"),
        Step(0, "instance/scheduling/provisioning-model", "SPOT"),
        Step(0, "instance/preempted", "FALSE"),
        Step(1, "instance/preempted", "TRUE"),
        Step(31, "instance/preempted", "FALSE"),
    ],
    "upcoming": [
        Step(0, UPCOMING, None),
        Step(1, UPCOMING, _window(15)),
        Step(5, UPCOMING, _window(20)),
        Step(10, UPCOMING, None),
    ],
}

# Fault kind -> the parameters it accepts.
_FAULTS: dict[str, frozenset[str]] = {
    "status": frozenset({"status", "body"}),
    "delay": frozenset({"seconds"}),
    **dict.fromkeys(
        ("drop", "reset", "no_flavor", "redirect", "malformed", "no_etag", "huge", "invalid_utf8"),
        frozenset(),
    ),
}


def _etag(data: bytes) -> str:
    """Content-derived, like Google's emulators: A -> B -> A gives the first ETag back."""
    return hashlib.sha256(data).hexdigest()[:16]


def _key(path: str) -> str:
    """Accept ``instance/x``, ``/instance/x`` or ``/computeMetadata/v1/instance/x``."""
    key = path.lstrip("/").removeprefix(V1.lstrip("/"))
    if not key or key.endswith("/") or "//" in key:
        raise ValueError(f"not a metadata key: {path!r}")
    return key


def _container(value: str) -> Any:
    """The parsed value if it is a JSON object or array (served as JSON), else None."""
    if not value.startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


def _camel(name: str) -> str:
    first, *rest = name.split("-")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True)
class _Query:
    alt: str | None = None
    recursive: bool = False
    wait: bool = False
    last_etag: str | None = None
    timeout: int | None = None

    @classmethod
    def parse(cls, query: str) -> _Query:
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        alt = q.get("alt")
        if alt not in (None, "json", "text"):
            raise ValueError(f"unsupported alt={alt}")
        timeout = q.get("timeout_sec")
        if timeout is not None and not (timeout.isdigit() and int(timeout) > 0):
            raise ValueError("timeout_sec must be a positive integer")
        return cls(
            alt=alt,
            recursive=q.get("recursive", "").lower() == "true",
            wait=q.get("wait_for_change", "").lower() == "true",
            last_etag=q.get("last_etag"),
            timeout=None if timeout is None else int(timeout),
        )


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    ctype: str = TEXT
    etag: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class _Fault:
    kind: str
    remaining: int
    prefix: str
    params: dict[str, Any]


def _parse_steps(data: object) -> list[Step]:
    if not isinstance(data, list):
        raise ValueError("a scenario is a JSON list of {at, path, value} objects")
    steps = []
    for i, item in enumerate(data):
        at = item.get("at") if isinstance(item, dict) else None
        if not isinstance(at, (int, float)) or isinstance(at, bool) or at < 0:
            raise ValueError(f"step {i}: 'at' must be a number of seconds >= 0")
        value = item.get("value")
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"step {i}: 'value' must be a string, an object or null")
        if not isinstance(item.get("path"), str):
            raise ValueError(f"step {i}: 'path' must be a metadata key such as {_EVENT!r}")
        steps.append(Step(float(at), _key(item["path"]), value))
    return steps


def load_scenario(name_or_path: str) -> list[Step]:
    """A built-in scenario by name, or a JSON file ``[{"at": 1.5, "path": ..., "value": ...}]``.

    A JSON object or array as ``value`` is stored serialised; ``null`` deletes the key.
    """
    if name_or_path in SCENARIOS:
        return list(SCENARIOS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown scenario {name_or_path!r}: neither a JSON file nor one of {sorted(SCENARIOS)}"
        )
    return _parse_steps(json.loads(path.read_text(encoding="utf-8")))


class Simulator:
    """A metadata server on a daemon thread; every method is thread-safe."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        identity: Mapping[str, str] | None = None,
        *,
        max_wait: float = 300.0,
        quiet: bool = True,
        plain_alt_json: str = "string",
        scheduling: str = "json",
    ) -> None:
        """Bind at once so that ``port`` is known before ``start``.

        ``max_wait`` caps a hanging GET (the real cap is undocumented); ``quiet=False``
        logs every request to stderr; ``plain_alt_json`` and ``scheduling`` pick among the
        undocumented or broken renderings (see the module docstring).
        """
        if plain_alt_json not in PLAIN_ALT_JSON:
            raise ValueError(f"plain_alt_json must be one of {PLAIN_ALT_JSON}")
        if scheduling not in SCHEDULING_MODES:
            raise ValueError(f"scheduling must be one of {SCHEDULING_MODES}")
        self.plain_alt_json = plain_alt_json
        self.scheduling = scheduling
        self._values = dict(DEFAULT_IDENTITY)
        self._cond = threading.Condition()
        for key, value in (identity or {}).items():
            self.set_value(key, value)
        self._lock = threading.Lock()  # faults and stats
        self._faults: list[_Fault] = []
        self._counts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._scenario_stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.max_wait = max_wait
        self.quiet = quiet
        self._server = _Server((host, port), self)
        self.host = host
        self.port: int = self._server.server_address[1]

    @property
    def host_port(self) -> str:
        """What ``GCE_METADATA_HOST`` takes."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}{V1}"

    def start(self) -> Simulator:
        # Where stop() cannot wake the accept loop, the poll interval bounds its wait.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection, hanging polls included."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._scenario_stop.set()
        with self._cond:
            self._cond.notify_all()
        self._server.drop_connections()
        if self._thread is not None:
            with contextlib.suppress(OSError):  # wakes the accept loop at once on Linux
                self._server.socket.shutdown(socket.SHUT_RDWR)
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- values ---------------------------------------------------------------------

    def set_value(self, path: str, value: str) -> None:
        key = _key(path)
        if not isinstance(value, str):
            raise TypeError(f"metadata values are strings, got {type(value).__name__}")
        with self._cond:
            parents = {key[: i + 1] for i, c in enumerate(key) if c == "/"}
            if any(k.startswith(key + "/") or k + "/" in parents for k in self._values):
                raise ValueError(f"{key!r} would clash with a directory of the same name")
            if self._values.get(key) != value:
                self._values[key] = value
                self._cond.notify_all()

    def delete_value(self, path: str) -> None:
        """Remove a key: it then answers 404 (``upcoming-maintenance``: the 503)."""
        with self._cond:
            if self._values.pop(_key(path), None) is not None:
                self._cond.notify_all()

    def get_value(self, path: str) -> str | None:
        with self._cond:
            return self._values.get(_key(path))

    # -- faults and stats ------------------------------------------------------------

    def inject(self, kind: str, count: int = 1, path: str | None = None, **params: Any) -> None:
        """Misbehave on the next ``count`` metadata requests under ``path`` (any if None).

        Kinds: status (status=503, body), delay (seconds=5), drop, reset, no_flavor,
        redirect, malformed, no_etag, huge, invalid_utf8. Faults queue up in order.
        """
        if kind not in _FAULTS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(_FAULTS)}")
        if unknown := set(params) - _FAULTS[kind]:
            raise ValueError(f"fault {kind!r} takes no {sorted(unknown)}")
        if not isinstance(count, int) or count < 1:
            raise ValueError("count must be a positive integer")
        if kind == "status":
            params["status"] = HTTPStatus(int(params.get("status", 503)))
            params.setdefault("body", params["status"].phrase)
        if kind == "delay" and float(params.setdefault("seconds", 5.0)) < 0:
            raise ValueError("seconds must be >= 0")
        prefix = "" if path is None else path.lstrip("/").removeprefix(V1.lstrip("/"))
        with self._lock:
            self._faults.append(_Fault(kind, count, prefix, params))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def stats(self) -> dict[str, int]:
        """Requests per metadata path (relative to v1, faulted ones too) plus ``total``."""
        with self._lock:
            return {"total": sum(self._counts.values()), **self._counts}

    def _begin(self, key: str) -> _Fault | None:
        """Count a metadata request and take the first fault that applies to it."""
        with self._lock:
            self._counts[key] += 1
            for fault in self._faults:
                if key.startswith(fault.prefix):
                    fault.remaining -= 1
                    if not fault.remaining:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- scenarios --------------------------------------------------------------------

    def play(
        self, steps: Sequence[Step], speed: float = 1.0, stop_event: threading.Event | None = None
    ) -> None:
        """Apply ``steps`` on their schedule (divided by ``speed``); blocks until done.

        Returns early when ``stop_event`` (default: the simulator stopping) is set.
        """
        if speed <= 0:
            raise ValueError("speed must be > 0")
        stop = stop_event if stop_event is not None else self._stopping
        start = time.monotonic()
        for step in sorted(steps, key=lambda s: s.at):
            if stop.wait(max(0.0, start + step.at / speed - time.monotonic())):
                return
            if step.value is None:
                self.delete_value(step.path)
            else:
                self.set_value(step.path, step.value)
            log.info("t=%.3fs %s = %s", time.monotonic() - start, step.path, step.value)

    def _play_background(self, steps: Sequence[Step], speed: float) -> None:
        """Control API: a new scenario replaces the one playing."""
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._scenario_stop.set()
        self._scenario_stop = stop = threading.Event()
        threading.Thread(
            target=self.play, args=(steps, speed, stop), name="simulator-scenario", daemon=True
        ).start()

    # -- rendering ----------------------------------------------------------------------

    def _respond(self, rel: str, q: _Query) -> _Reply:
        """Answer a metadata GET, hanging first if it is a long poll on the current ETag."""
        is_dir = rel == "" or rel.endswith("/")
        if q.wait and is_dir and not q.recursive:
            return _Reply(400, b"wait_for_change needs recursive=true on a directory")
        limit = self.max_wait if q.timeout is None else min(q.timeout, self.max_wait)
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                reply = self._render(rel, q)
                if (
                    not q.wait
                    or reply.status != 200
                    or reply.etag != q.last_etag
                    or self._stopping.is_set()
                ):
                    return reply
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return reply
                self._cond.wait(remaining)

    def _render(self, rel: str, q: _Query) -> _Reply:
        with self._cond:
            if rel == "" or rel.endswith("/"):
                return self._render_dir(rel, q)
            value = self._values.get(rel)
        if value is None:
            if rel == UPCOMING:
                return _Reply(503, NO_NOTIFICATION, JSON)
            return _Reply(404, b"Not Found")
        etag = _etag(value.encode())
        is_json = _container(value) is not None
        if q.alt == "json":
            raw = is_json or self.plain_alt_json == "raw"
            return _Reply(200, (value if raw else json.dumps(value)).encode(), JSON, etag)
        return _Reply(200, value.encode(), JSON if is_json and q.alt != "text" else TEXT, etag)

    def _render_dir(self, rel: str, q: _Query) -> _Reply:
        keys = sorted(k for k in self._values if k.startswith(rel))
        odd = self.scheduling if rel == SCHEDULING and q.recursive else "json"
        if not keys or odd == "404":
            return _Reply(404, b"Not Found")
        if q.recursive and odd != "text":
            tree: dict[str, Any] = {}
            for key in keys:
                *dirs, leaf = key[len(rel) :].split("/")
                node = tree
                for d in dirs:
                    node = node.setdefault(_camel(d), {})
                # User-chosen attribute names are not camelCased by the real server.
                name = leaf if dirs[-1:] == ["attributes"] else _camel(leaf)
                value = self._values[key]
                node[name] = value if (parsed := _container(value)) is None else parsed
            body, ctype = json.dumps(tree, separators=(",", ":")).encode(), JSON
            if odd == "broken":
                body = body[: len(body) // 2]
        else:
            depth = rel.count("/")
            children = sorted(
                k[len(rel) :].split("/")[0] + ("/" if k.count("/") > depth else "") for k in keys
            )
            children = list(dict.fromkeys(children))
            if q.alt == "json" and odd != "text":
                body, ctype = json.dumps(children).encode(), JSON
            else:
                body, ctype = "".join(c + "\n" for c in children).encode(), TEXT
        return _Reply(200, body, ctype, _etag(body))

    def _is_dir(self, rel: str) -> bool:
        with self._cond:
            return any(k.startswith(rel + "/") for k in self._values)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many simulated VMs and their hanging GETs

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def drop_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive sockets."""
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Peers vanishing is routine here (faults, stop, client timeouts): stay silent."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Metadata Server for VM"
    sys_version = ""
    disable_nagle_algorithm = True  # with one write per response: no 40 ms stall
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.sim.quiet:
            super().log_message(format, *args)

    def _dispatch(self) -> None:
        length = self.headers.get("Content-Length", "")
        body = self.rfile.read(int(length)) if length.isdigit() else b""
        path, _, query = self.path.partition("?")
        if self.server.sim._stopping.is_set():
            self._abort(rst=False)
        elif path.startswith(CONTROL):
            self._send(self._control(path.removeprefix(CONTROL), body))
        elif path == "/":
            self._send(_Reply(200, b"computeMetadata/\n"))
        elif not path.startswith("/computeMetadata/"):
            self._send(_Reply(404, b"Not Found"))
        elif self.command != "GET":
            self._send(_Reply(405, b"Method Not Allowed", headers=(("Allow", "GET"),)))
        else:
            self._metadata(path, query)

    do_GET = do_PUT = do_POST = do_DELETE = _dispatch

    def _metadata(self, path: str, query: str) -> None:
        sim = self.server.sim
        fault = sim._begin(path.removeprefix(V1))
        kind = fault.kind if fault else None
        if kind in ("drop", "reset"):
            self._abort(rst=kind == "reset")
            return
        if fault and kind == "delay":
            sim._stopping.wait(float(fault.params["seconds"]))
        if fault and kind == "status":
            reply = _Reply(fault.params["status"], str(fault.params["body"]).encode())
        elif kind == "redirect":
            target = f"http://{sim.host_port}{path}?{query + '&' if query else ''}redirected=1"
            reply = _Reply(302, headers=(("Location", target),))
        elif kind in ("malformed", "huge", "invalid_utf8"):
            body = {"malformed": b"{not json", "huge": b"x" * HUGE_SIZE}.get(kind, b"\xff\xfe\xfa")
            reply = _Reply(200, body, JSON if kind == "malformed" else TEXT, _etag(body))
        else:
            reply = self._answer(path, query)
        if sim._stopping.is_set():
            self._abort(rst=False)
            return
        if kind == "no_etag":
            reply = replace(reply, etag=None)
        self._send(reply, flavor=kind != "no_flavor")

    def _answer(self, path: str, query: str) -> _Reply:
        """The real server's answer: header rules first, then the value or listing."""
        if "%" in path:
            return _Reply(400, b"Percent-encoding is not supported in the path")
        if "X-Forwarded-For" in self.headers:
            return _Reply(403, b"Request denied: X-Forwarded-For header present")
        if self.headers.get("Metadata-Flavor") != "Google":
            return _Reply(403, MISSING_FLAVOR)
        sim = self.server.sim
        if path == "/computeMetadata/":
            return _Reply(200, b"v1/\n")
        rel = path.removeprefix(V1)
        if path + "/" == V1 or (path.startswith(V1) and rel and sim._is_dir(rel)):
            location = f"http://{sim.host_port}{path}/" + (f"?{query}" if query else "")
            return _Reply(301, headers=(("Location", location),))
        if not path.startswith(V1):
            return _Reply(404, b"Not Found")
        try:
            q = _Query.parse(query)
        except ValueError as exc:
            return _Reply(400, str(exc).encode())
        return sim._respond(rel, q)

    def _control(self, route: str, body: bytes) -> _Reply:
        sim, method = self.server.sim, self.command
        try:
            if route.startswith("values/") and method in ("PUT", "DELETE", "GET"):
                key = route.removeprefix("values/")
                if method == "PUT":
                    sim.set_value(key, body.decode("utf-8"))
                elif method == "DELETE":
                    sim.delete_value(key)
                elif (value := sim.get_value(key)) is None:
                    return _Reply(404, b"Not Found")
                else:
                    return _Reply(200, value.encode())
                return _Reply(204)
            if route == "faults" and method == "POST":
                sim.inject(**json.loads(body or b"{}"))
                return _Reply(204)
            if route == "faults" and method == "DELETE":
                sim.clear_faults()
                return _Reply(204)
            if route == "stats" and method == "GET":
                return _Reply(200, json.dumps(sim.stats()).encode(), JSON)
            if route == "scenario" and method == "POST":
                spec = json.loads(body or b"{}")
                if "steps" in spec:
                    steps = _parse_steps(spec["steps"])
                elif spec.get("name") in SCENARIOS:
                    steps = SCENARIOS[spec["name"]]
                else:
                    raise ValueError(f"give 'steps' or a 'name' in {sorted(SCENARIOS)}")
                sim._play_background(steps, float(spec.get("speed", 1.0)))
                return _Reply(202)
        except (ValueError, TypeError, AttributeError) as exc:
            return _Reply(400, str(exc).encode())
        return _Reply(404, b"Not Found")

    def _send(self, reply: _Reply, flavor: bool = True) -> None:
        """Write the whole response in one send: a split write can stall on delayed ACKs."""
        lines = [f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}"]
        if flavor:
            lines.append("Metadata-Flavor: Google")
        lines += [f"Content-Type: {reply.ctype}", f"Date: {self.date_time_string()}"]
        lines.append(f"Server: {self.server_version}")
        if reply.status != 204:
            lines.append(f"Content-Length: {len(reply.body)}")
        if reply.etag:
            lines.append(f"ETag: {reply.etag}")
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
        self.wfile.flush()

    def _abort(self, rst: bool) -> None:
        """Close without answering; ``rst`` makes it a TCP reset instead of a FIN."""
        self.close_connection = True
        if rst:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self.rfile.close()  # the socket only really closes once its file is closed too
        self.connection.close()


def _on_signals(done: threading.Event) -> Callable[[], None]:
    """Make SIGINT/SIGTERM (SIGBREAK on Windows) set ``done``; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous: dict[int, Any] = {}
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        signum = getattr(signal, name, None)
        if signum is not None:
            try:
                previous[signum] = signal.signal(signum, handler)
            except (OSError, ValueError):
                continue

    def restore() -> None:
        for signum, old in previous.items():
            if old is not None:
                signal.signal(signum, old)

    return restore


def open_simulator(
    host: str,
    port: int,
    scenario: str | None,
    loop: bool,
    *,
    plain_alt_json: str = "string",
    scheduling: str = "json",
) -> tuple[Simulator, list[Step]]:
    """The bound simulator and its scenario, for ``serve``; ValueError names what is wrong."""
    try:
        steps = load_scenario(scenario) if scenario else []
    except OSError as exc:
        raise ValueError(f"--scenario {scenario}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:  # invalid JSON (JSONDecodeError, UnicodeDecodeError) or steps
        raise ValueError(f"--scenario {scenario}: {exc}") from None
    if loop and steps and not any(step.at > 0 for step in steps):
        raise ValueError("--loop needs a scenario that lasts longer than 0 s")
    try:
        sim = Simulator(host, port, plain_alt_json=plain_alt_json, scheduling=scheduling)
    except (OSError, OverflowError) as exc:  # port in use or out of range, unknown host
        reason = getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None
    return sim, steps


def serve(sim: Simulator, steps: Sequence[Step], speed: float, loop: bool) -> int:
    """Run ``sim`` in the foreground (``maintenance-bridge simulate``) until a signal."""
    sim.start()
    done = threading.Event()
    restore = _on_signals(done)
    print(f"simulator: listening on {sim.url}", file=sys.stderr, flush=True)

    def player() -> None:
        while True:
            sim.play(steps, speed, done)
            if not loop or done.is_set():
                return

    if steps:
        threading.Thread(target=player, name="simulator-scenario", daemon=True).start()
    try:
        # A timed wait: on Windows an untimed one cannot be interrupted by Ctrl+C.
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        restore()
    return 0
